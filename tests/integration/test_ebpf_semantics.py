"""Semantics of the eBPF datapath that the nftables one gets from netfilter, with real packets.

* `stockade.io/existing-connections: keep`: a connection the new policy denies is
  cut when the program judges it again, unless every denying side's policies
  keep connections (what the agent's revoker does through conntrack on
  nftables; see `agent.revoke.should_cut`). A keeping chain is a chain of its
  own, which every datapath (nftables and iptables too) adopts on restart.
* IP fragments fail closed: a datagram larger than the MTU, fragmented by the
  sender's kernel, arrives whole when its port is allowed and not at all when
  denied (IPv4 and IPv6); a later fragment whose first fragment was not seen
  passing (crafted with a raw socket) is dropped, as seen by a packet socket in
  the destination's namespace.

Each test builds three endpoints in its own host namespace (see conftest: a
per-test prefix, every namespace removed whatever happens); the datapath's pins
are removed by the fixture, and checked gone.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from stockade.compile import bpf as bpfc
from stockade.compile.lower import compile_cluster
from stockade.datapath import libbpf, open_datapath
from stockade.datapath.ebpf import LAYOUT, EbpfDatapath
from stockade.model.cluster import Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.labels import Labels
from stockade.model.policy import EGRESS, INGRESS, KEEP_ANNOTATION, NetworkPolicy, Peer, PolicyPort
from stockade.model.policy import Rule as PRule
from stockade.model.selector import Selector
from stockade.net.namespace import entered

from .ebpf_pins import ebpf_datapath
from .frames import eth, tcp4
from .netio import EchoServer, connect, echo

pytestmark = pytest.mark.privileged

PORT = 7777


def _ep(trio, name: str) -> Endpoint:
    att = getattr(trio, name)
    return Endpoint("x", name, Labels({"pod": name}), (att.address4, att.address6),
                    (ContainerPort(PORT, "TCP", "echo"),))


def _cluster(trio, *policies: NetworkPolicy) -> Cluster:
    ns = Namespace("x", Labels({"kubernetes.io/metadata.name": "x"}))
    return Cluster((ns,), tuple(_ep(trio, n) for n in "abc"), policies)


def _keep(keep: bool) -> Labels:
    return Labels({KEEP_ANNOTATION: " Keep "} if keep else {})  # case and blanks ignored


def _a_ingress_from(source: str, keep: bool = False) -> NetworkPolicy:
    return NetworkPolicy(
        "x", "a-ingress", Selector(Labels({"pod": "a"})),
        ingress=(PRule((PolicyPort("TCP", PORT),),
                       (Peer(pod_selector=Selector(Labels({"pod": source}))),)),),
        policy_types=(INGRESS,), annotations=_keep(keep))


def _b_egress_to(dest: str, keep: bool = False) -> NetworkPolicy:
    return NetworkPolicy(
        "x", "b-egress", Selector(Labels({"pod": "b"})),
        egress=(PRule((PolicyPort("TCP", PORT),),
                      (Peer(pod_selector=Selector(Labels({"pod": dest}))),)),),
        policy_types=(EGRESS,), annotations=_keep(keep))


@pytest.fixture
def datapath(trio) -> Iterator[EbpfDatapath]:
    with ebpf_datapath(trio) as dp:
        yield dp


@pytest.fixture
def held(trio, datapath) -> Iterator[socket.socket]:
    """a isolated for ingress (TCP/7777 from b), b for egress (TCP/7777 to a), and a
    connection b -> a held open across the test."""
    datapath.apply(compile_cluster(_cluster(trio, _a_ingress_from("b"), _b_egress_to("a"))))
    with EchoServer(trio.a.netns, PORT):
        conn = connect(trio.b.netns, trio.a.address4, PORT)
        try:
            assert echo(conn, b"one")
            yield conn
        finally:
            conn.close()


def test_a_revoked_connection_is_cut_without_keep(trio, datapath, held) -> None:
    datapath.apply(compile_cluster(_cluster(trio, _a_ingress_from("c"), _b_egress_to("a"))))
    assert not echo(held, b"two")
    assert datapath.stats()["cut"] >= 1


def test_keep_on_the_denying_side_keeps_the_connection(trio, datapath, held) -> None:
    kept = compile_cluster(_cluster(trio, _a_ingress_from("c", keep=True), _b_egress_to("a")))
    datapath.apply(kept)
    assert echo(held, b"two")
    assert echo(held, b"three")
    stats = datapath.stats()
    assert stats["rejudged"] >= 1 and stats["cut"] == 0
    # a new connection is still judged by the new policy: b may no longer open one
    with pytest.raises(OSError):
        connect(trio.b.netns, trio.a.address4, PORT).close()
    # the keep mark reads back: a new process adopts without writing
    again = EbpfDatapath(netns=trio.host_netns)
    assert again.diff(kept).empty and again.apply(kept).empty
    assert again.last_timing["entries"] == 0
    # once the policy no longer keeps, the next change cuts the connection
    datapath.apply(compile_cluster(_cluster(trio, _a_ingress_from("c"), _b_egress_to("a"))))
    assert not echo(held, b"four")
    assert datapath.stats()["cut"] >= 1


def test_both_sides_deny_and_only_one_keeps_cuts(trio, datapath, held) -> None:
    datapath.apply(compile_cluster(_cluster(trio, _a_ingress_from("c", keep=True),
                                            _b_egress_to("c"))))
    assert not echo(held, b"two")
    assert datapath.stats()["cut"] >= 1


def test_both_sides_deny_and_both_keep_keeps(trio, datapath, held) -> None:
    datapath.apply(compile_cluster(_cluster(trio, _a_ingress_from("c", keep=True),
                                            _b_egress_to("c", keep=True))))
    assert echo(held, b"two")
    assert datapath.stats()["cut"] == 0


def test_keep_on_a_side_that_allows_does_not_save_the_other(trio, datapath, held) -> None:
    # b's egress still allows (and keeps); a's ingress denies without keep: cut
    datapath.apply(compile_cluster(_cluster(trio, _a_ingress_from("c"),
                                            _b_egress_to("a", keep=True))))
    assert not echo(held, b"two")


@pytest.mark.parametrize("kind", ["nft", "iptables", "ebpf"])
def test_a_keeping_chain_is_adopted_by_a_new_process(trio, kind: str) -> None:
    """A chain that keeps is named apart from the same rules without keep; every
    datapath reads it back as what it renders (a restart adopts, writes nothing)."""
    rs = compile_cluster(_cluster(trio, _a_ingress_from("b", keep=True), _b_egress_to("a")))
    plain = compile_cluster(_cluster(trio, _a_ingress_from("b"), _b_egress_to("a")))
    assert [c.keep for c in rs.chains.values()].count(True) == 1
    assert set(rs.chains) != set(plain.chains) and len(set(rs.chains) & set(plain.chains)) == 1
    dp = open_datapath(kind, netns=trio.host_netns)
    try:
        dp.check()
        dp.apply(rs)
        again = open_datapath(kind, netns=trio.host_netns)
        assert again.diff(rs).empty
        assert again.apply(rs, verify=True).empty
        assert not again.diff(plain).empty  # keep or not is a change
    finally:
        if kind == "ebpf":  # the others' rules go with the test's namespace
            EbpfDatapath(netns=trio.host_netns).remove()


# ---- IP fragments -------------------------------------------------------------------------

ALLOWED, DENIED = 9000, 9001
IP_MTU_DISCOVER, IP_PMTUDISC_DONT = 10, 0  # <linux/in.h>
IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DONT, IPV6_DONTFRAG = 23, 0, 62  # <linux/in6.h>
ETH_P_ALL = 0x0003


def _a_udp_from_b() -> NetworkPolicy:
    return NetworkPolicy(
        "x", "a-udp", Selector(Labels({"pod": "a"})),
        ingress=(PRule((PolicyPort("UDP", ALLOWED),),
                       (Peer(pod_selector=Selector(Labels({"pod": "b"}))),)),),
        policy_types=(INGRESS,))


def _address(att, family: int) -> str:
    addr = att.address4 if family == 4 else att.address6
    assert addr is not None
    return addr


def _datagram(trio, family: int, port: int, size: int = 3000) -> int | None:
    """A UDP datagram of `size` bytes from b to a (over a 1500-byte MTU: the sending
    kernel fragments it); the size a received, or None."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    with entered(trio.a.netns):
        rx = socket.socket(af, socket.SOCK_DGRAM)
    with entered(trio.b.netns):
        tx = socket.socket(af, socket.SOCK_DGRAM)
    try:
        rx.bind(("0.0.0.0" if family == 4 else "::", port))
        rx.settimeout(1.0)
        if family == 4:
            tx.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
        else:
            tx.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DONT)
            tx.setsockopt(socket.IPPROTO_IPV6, IPV6_DONTFRAG, 0)
        tx.sendto(bytes(range(256)) * (size // 256) + bytes(size % 256),
                  (_address(trio.a, family), port))
        try:
            data = rx.recv(65536)
        except OSError:
            return None
        return len(data)
    finally:
        rx.close()
        tx.close()


@pytest.mark.parametrize("family", [4, 6])
def test_a_fragmented_datagram_arrives_whole_only_to_an_allowed_port(trio, datapath,
                                                                     family: int) -> None:
    datapath.apply(compile_cluster(_cluster(trio, _a_udp_from_b())))
    before = datapath.stats()
    assert _datagram(trio, family, ALLOWED) == 3000
    assert _datagram(trio, family, ALLOWED) == 3000  # another datagram, another IP id
    allowed = datapath.stats()
    assert allowed["fragments_dropped"] == before["fragments_dropped"]  # none out of order
    assert _datagram(trio, family, DENIED) is None
    denied = datapath.stats()
    assert denied["denied"] > allowed["denied"]  # the first fragment, judged
    # and its later fragments (3008 bytes of UDP: two more), with no first fragment passed
    assert denied["fragments_dropped"] == allowed["fragments_dropped"] + 2


def _checksum(data: bytes) -> int:
    data += bytes(len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _fragment(family: int, src: str, dst: str, ident: int, offset: int, more: bool,
              payload: bytes) -> bytes:
    """An IP packet holding one fragment (`offset` in bytes, a multiple of 8) of a UDP
    datagram, headers and all."""
    if family == 4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident,
                          (0x2000 if more else 0) | (offset // 8), 64, 17, 0,
                          socket.inet_pton(socket.AF_INET, src),
                          socket.inet_pton(socket.AF_INET, dst))
        hdr = hdr[:10] + struct.pack("!H", _checksum(hdr)) + hdr[12:]
        return hdr + payload
    frag = struct.pack("!BBHI", 17, 0, offset | (1 if more else 0), ident)
    return struct.pack("!IHBB16s16s", 6 << 28, len(frag) + len(payload), 44, 64,
                       socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst)) + frag + payload


def _udp_head(port: int, length: int) -> bytes:
    """The first 24 bytes of a UDP datagram of `length` bytes (checksum 0: never checked
    here, nothing reassembles it into a socket)."""
    return struct.pack("!HHHH", 40000, port, length, 0) + b"first fragment!!"


class _Capture:
    """A packet socket on a's interface: the fragments of one IP id that reached a."""

    def __init__(self, att) -> None:
        with entered(att.netns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                      socket.htons(ETH_P_ALL))
            self.sock.bind((att.ifname, 0))
        self.sock.settimeout(0.1)

    def offsets(self, family: int, ident: int, wait: float = 0.7) -> set[int]:
        """Byte offsets of the fragments of datagram `ident` seen within `wait` s."""
        seen: set[int] = set()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                frame = self.sock.recv(65536)
            except OSError:
                continue
            ethertype = struct.unpack("!H", frame[12:14])[0]
            ip = frame[14:]
            if family == 4 and ethertype == 0x0800 and len(ip) >= 20 and ip[9] == 17:
                if struct.unpack("!H", ip[4:6])[0] == ident:
                    seen.add((struct.unpack("!H", ip[6:8])[0] & 0x1FFF) * 8)
            elif family == 6 and ethertype == 0x86DD and len(ip) >= 48 and ip[6] == 44:
                field, got = struct.unpack("!HI", ip[42:48])
                if got == ident:
                    seen.add(field & 0xFFF8)
        return seen

    def close(self) -> None:
        self.sock.close()


def _raw_sender(att, family: int) -> socket.socket:
    """A raw socket in `att`'s namespace whose packets carry their own IP header."""
    with entered(att.netns):
        if family == 4:
            return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        return socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)


@pytest.mark.parametrize("family", [4, 6])
def test_a_fragment_without_its_first_fragment_is_dropped(trio, datapath,
                                                          family: int) -> None:
    datapath.apply(compile_cluster(_cluster(trio, _a_udp_from_b())))
    src, dst = _address(trio.b, family), _address(trio.a, family)
    # neighbours resolved first: a packet socket must not wait on them
    assert _datagram(trio, family, ALLOWED, 100) == 100
    capture = _Capture(trio.a)
    raw = _raw_sender(trio.b, family)
    try:
        def send(ident: int, offset: int, more: bool, payload: bytes) -> None:
            raw.sendto(_fragment(family, src, dst, ident, offset, more, payload), (dst, 0))

        dropped = datapath.stats()["fragments_dropped"]
        # a lone later fragment (to the allowed port, had its first fragment come)
        send(0x4A11, 24, False, b"tail....")
        assert capture.offsets(family, 0x4A11) == set()
        assert datapath.stats()["fragments_dropped"] > dropped
        # the control: after an allowed first fragment, its later fragment passes
        send(0x4A12, 0, True, _udp_head(ALLOWED, 32))
        send(0x4A12, 24, False, b"tail....")
        assert capture.offsets(family, 0x4A12) == {0, 24}
        # the record is pinned: a new process adopts it with the other maps
        assert (datapath.dir / "frag").exists()
        again = EbpfDatapath(netns=trio.host_netns)
        again.check()
        assert again.apply(compile_cluster(_cluster(trio, _a_udp_from_b()))).empty
        send(0x4A12, 32, False, b"more....")
        assert capture.offsets(family, 0x4A12) == {32}
        again.close()
        # after a denied first fragment, neither passes
        send(0x4A13, 0, True, _udp_head(DENIED, 32))
        send(0x4A13, 24, False, b"tail....")
        assert capture.offsets(family, 0x4A13) == set()
    finally:
        raw.close()
        capture.close()


def test_a_long_tcp_flow_keeps_flowing(trio, datapath) -> None:
    """Packets of one connection judged on both CPUs: a conntrack entry stamped by one CPU
    a moment ahead of the other's clock is not expired (it was, and every bulk flow died
    within milliseconds, the rest of its packets denied as mid-stream)."""
    datapath.apply(compile_cluster(_cluster(trio, _a_ingress_from("b"), _b_egress_to("a"))))
    denied = datapath.stats()["denied"]
    server = subprocess.Popen(["ip", "netns", "exec", trio.a.netns, "iperf3", "-s", "-1",
                               "-p", str(PORT)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):  # until it listens
            if subprocess.run(["ip", "netns", "exec", trio.a.netns, "ss", "-Hltn",
                               f"sport = :{PORT}"], capture_output=True, text=True,
                              check=True).stdout.strip():
                break
            time.sleep(0.05)
        out = subprocess.run(["ip", "netns", "exec", trio.b.netns, "iperf3", "-c",
                              trio.a.address4, "-p", str(PORT), "-t", "2", "-J"],
                             capture_output=True, text=True, timeout=30, check=False)
    finally:
        server.kill()
        server.wait()
    report = json.loads(out.stdout)
    received = report["end"]["sum_received"]["bytes"]
    assert received > 100 * 2**20, report["end"]["sum_received"]  # the bug: ~1 MB
    assert datapath.stats()["denied"] == denied


def test_a_syn_on_a_tracked_connections_reversed_tuple_is_judged_as_new(trio,
                                                                        datapath) -> None:
    """Conntrack matches a reply by the reversed tuple, but a SYN opens a connection of its
    own: one from a to b on the exact reverse of b's allowed connection to a is judged,
    and b's isolation drops it; a's SYN-ACK and ACK on that tuple are replies and pass.
    Once b admits a, the same SYN passes, and its connection takes the tuple over (one
    entry stands for both directions). Fed to the program itself (BPF_PROG_TEST_RUN),
    so the tuple is exactly the one wanted."""
    b_isolated = NetworkPolicy("x", "b-isolated", Selector(Labels({"pod": "b"})),
                               policy_types=(INGRESS,))
    datapath.apply(compile_cluster(_cluster(trio, _a_ingress_from("b"), b_isolated)))
    prog = datapath._progs["in"]  # the program judges both sides at either hook
    a, b = trio.a.address4, trio.b.address4
    passed, shot = 0xFFFFFFFF, 2  # TC_ACT_UNSPEC, TC_ACT_SHOT
    syn, ack = 0x02, 0x10

    def verdict(src: str, dst: str, sport: int, dport: int, flags: int) -> int:
        return libbpf.test_run(prog, eth("04" * 6, 0x0800, tcp4(src, dst, sport, dport,
                                                               flags)), 1)[0]

    def opened() -> list[tuple[bytes, int, int]]:
        ct = libbpf.dump(datapath._maps["ct"], *LAYOUT["ct"])
        return [(o[2][:4], o[4], o[5]) for o in (bpfc.ct_original(k, v) for k, v in ct.items())
                if o[1] == 6]

    assert verdict(a, b, PORT, 40000, syn) == shot  # nothing tracked yet: b is isolated
    assert verdict(b, a, 40000, PORT, syn) == passed  # allowed, and now tracked
    assert verdict(a, b, PORT, 40000, syn) == shot  # the reversed tuple, as a new one
    assert verdict(a, b, PORT, 40000, syn | ack) == passed  # a's answer: a reply
    assert verdict(a, b, PORT, 40000, ack) == passed
    assert verdict(a, b, PORT, 40001, ack) == shot  # mid-stream, never tracked
    assert opened() == [(socket.inet_aton(b), 40000, PORT)]
    datapath.apply(compile_cluster(_cluster(trio, _a_ingress_from("b"), _b_admits_a())))
    assert verdict(a, b, PORT, 40000, syn) == passed
    assert opened() == [(socket.inet_aton(a), PORT, 40000)]
    datapath.flush_connections()


def _b_admits_a() -> NetworkPolicy:
    return NetworkPolicy("x", "b-isolated", Selector(Labels({"pod": "b"})),
                         ingress=(PRule((), (Peer(pod_selector=Selector(Labels({"pod": "a"}))),)),),
                         policy_types=(INGRESS,))


# `count` SYNs from `src` (at `smac`) to `dst` (at `dmac`), each of its own connection
# (source and destination ports counting up), written as whole frames: a pod opening
# connections as fast as it can. The TCP checksum is left wrong, so that the receiver
# drops them unanswered: each stays a new connection the program allowed and tracks.
FLOOD = """
import socket, struct, sys
ifname, smac, dmac, src, dst, count = sys.argv[1:7]
mac = lambda text: bytes.fromhex(text.replace(":", ""))
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0, 64, 6, 0,
                 socket.inet_aton(src), socket.inet_aton(dst))
total = sum(struct.unpack("!10H", ip))
while total >> 16:
    total = (total >> 16) + (total & 0xFFFF)
head = mac(dmac) + mac(smac) + b"\\x08\\x00" + ip[:10] + struct.pack("!H", ~total & 0xFFFF) \\
    + ip[12:]
tail = struct.pack("!IIBBHHH", 1, 0, 5 << 4, 0x02, 65535, 0, 0)
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
raw.bind((ifname, 0))
send = raw.send
for n in range(int(count)):
    send(head + struct.pack("!HH", 1024 + n % 64000, 10000 + n // 64000) + tail)
"""


def _flood(trio, count: int) -> None:
    b, c = trio.b, trio.c
    subprocess.run(["ip", "netns", "exec", c.netns, sys.executable, "-c", FLOOD, c.ifname,
                    c.mac, b.mac, c.address4, b.address4, str(count)], check=True, timeout=300)


def _ct_live(datapath: EbpfDatapath) -> dict[bytes, bytes]:
    return libbpf.dump(datapath._maps["ct_live"], *LAYOUT["ct_live"])


def _live_ports(datapath: EbpfDatapath) -> list[int]:
    """The destination port of each connection in ct_live, as it was opened."""
    return [bpfc.ct_original(k, v)[5] for k, v in _ct_live(datapath).items()]


def _share(datapath: EbpfDatapath, ifindex: int) -> int:
    raw = libbpf.lookup(datapath._maps["ct_owners"], bpfc.CT_OWNER.pack(ifindex), 4)
    return bpfc.CT_OWNER.unpack(raw)[0] if raw else 0


def test_an_established_connection_outlives_a_flood_of_new_ones(trio, datapath, held) -> None:
    """c opens three times as many connections as `ct` holds, as fast as it can: every
    connection there is evicted, but b's to a was answered and went on, so it is in
    `ct_live`, which nothing evicts, and carries data afterwards."""
    assert PORT in _live_ports(datapath)
    started = time.monotonic()
    _flood(trio, 3 * (1 << 17))
    flood_s = time.monotonic() - started
    assert datapath.stats()["allowed"] > 3 * (1 << 17)  # each one a new connection
    assert echo(held, b"two"), f"the connection was cut by the flood ({flood_s:.1f} s)"


def _port(trio, att) -> int:
    with entered(trio.host_netns):
        return socket.if_nametoindex(att.host_ifname)


def _live_to(datapath: EbpfDatapath, port: int) -> int:
    """How many established connections to `port` ct_live holds."""
    return _live_ports(datapath).count(port)


def test_a_ports_share_of_established_connections_is_bounded(trio, datapath, held) -> None:
    """b's connection is counted in b's share; with the share used up, b's next connection
    stays evictable (in `ct`) while c's is established as usual; a verifying apply
    counts the shares again from what `ct_live` holds, and a closed connection leaves
    it (back to `ct`, which ages it out)."""
    b_port, c_port = _port(trio, trio.b), _port(trio, trio.c)
    assert _share(datapath, b_port) == 1 and _live_to(datapath, PORT) == 1
    libbpf.update(datapath._maps["ct_owners"], bpfc.CT_OWNER.pack(b_port),
                  bpfc.CT_OWNER.pack(4096))  # as if b held its whole share
    rs = compile_cluster(_cluster(trio, _a_ingress_from("b"), _b_egress_to("a")))
    with EchoServer(trio.b.netns, PORT + 1):
        from_b = connect(trio.c.netns, trio.b.address4, PORT + 1)  # c's connection
        to_a = connect(trio.b.netns, trio.a.address4, PORT)  # b's second
        try:
            assert echo(from_b, b"x") and echo(to_a, b"y")
            assert _live_to(datapath, PORT + 1) == 1  # c's, to b
            assert _live_to(datapath, PORT) == 1  # b's first, not b's second
            datapath.apply(rs, verify=True)
            assert _share(datapath, b_port) == 1 and _share(datapath, c_port) == 1
        finally:
            to_a.close()
            from_b.close()
    held.close()
    time.sleep(0.3)
    assert _live_to(datapath, PORT) == 0 and _live_to(datapath, PORT + 1) == 0
    assert _share(datapath, b_port) == 0 and _share(datapath, c_port) == 0


def test_a_verifying_apply_sweeps_connections_that_expired_unseen(trio, datapath) -> None:
    """An abandoned connection (no FIN, no packet since) is never looked up again, so
    the program never deletes it: the loader does, and its port's share with it."""
    rs = compile_cluster(_cluster(trio))
    datapath.apply(rs)
    key = bpfc.CT_KEY.pack(4, 17, 0, b"\x04\x00", b"\x00\x35", bytes(16), bytes(16))
    old = bpfc.CT_VALUE.pack(1, 0, 0, 999)  # UDP seen at boot (> 180 s ago), never since
    fresh = bpfc.CT_VALUE.pack(time.clock_gettime_ns(time.CLOCK_MONOTONIC), 0, 0, 998)
    other = bpfc.CT_KEY.pack(4, 17, 0, b"\x04\x01", b"\x00\x35", bytes(16), bytes(16))
    libbpf.update(datapath._maps["ct_live"], key, old)
    libbpf.update(datapath._maps["ct_live"], other, fresh)
    for owner in (999, 998):
        libbpf.update(datapath._maps["ct_owners"], bpfc.CT_OWNER.pack(owner),
                      bpfc.CT_OWNER.pack(7))
    datapath.apply(rs, verify=True)
    assert key not in _ct_live(datapath) and other in _ct_live(datapath)
    assert _share(datapath, 999) == 0 and _share(datapath, 998) == 1
