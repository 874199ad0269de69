"""The eBPF datapath's direct delivery between pods on one bridge, with real frames.

A frame `stockade_from_pod` passes from a guarded port to the MAC of another guarded
pod on the same bridge goes to that pod's port at once (`bpf_redirect`), as the
bridge would forward it, without the bridge and the host's netfilter hooks; the
destination's `stockade_to_pod` runs as before. Anything else takes the bridge: a
frame from or to an unguarded port, to a group address, to a MAC two ports claim,
to a port of another bridge. The `mac_port` map that says where each MAC is comes
from the guards, is read back like them, and is repaired when tampered with.

x/a and x/b are guarded unless a test says otherwise, x/c is not.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from stockade.compile import bpf as bpfc
from stockade.compile.lower import compile_cluster
from stockade.datapath import libbpf
from stockade.datapath.ebpf import EbpfDatapath
from stockade.model.cluster import Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.labels import Labels
from stockade.model.policy import INGRESS, NetworkPolicy, Peer, PolicyPort
from stockade.model.policy import Rule as PRule
from stockade.model.selector import Selector
from stockade.net.namespace import entered

from .ebpf_pins import ebpf_datapath, from_pod
from .frames import eth, mac_bytes, tcp4
from .netio import EchoServer, connect, echo

pytestmark = pytest.mark.privileged

PASSED, SHOT, REDIRECTED = 0xFFFFFFFF, 2, 7  # TC_ACT_UNSPEC, TC_ACT_SHOT, TC_ACT_REDIRECT
PORT = 7777
SYN = 0x02
# b admits a on PORT and nothing else
B_FROM_A = NetworkPolicy(
    "x", "b-from-a", Selector(Labels({"pod": "b"})),
    ingress=(PRule((PolicyPort("TCP", PORT),),
                   (Peer(pod_selector=Selector(Labels({"pod": "a"}))),)),),
    policy_types=(INGRESS,))


def _endpoint(att: Any, name: str, guarded: bool, mac: str = "") -> Endpoint:
    return Endpoint("x", name, Labels({"pod": name}), (att.address4, att.address6),
                    (ContainerPort(PORT, "TCP", "echo"),),
                    port=att.host_ifname if guarded else "",
                    mac=(mac or att.mac) if guarded else "")


def _cluster(trio: Any, *policies: NetworkPolicy, guarded: str = "ab",
             macs: dict[str, str] | None = None) -> Cluster:
    ns = Namespace("x", Labels({"kubernetes.io/metadata.name": "x"}))
    return Cluster((ns,), tuple(_endpoint(getattr(trio, n), n, n in guarded,
                                          (macs or {}).get(n, ""))
                                for n in "abc"), policies)


def _ifindex(trio: Any, att: Any) -> int:
    with entered(trio.host_netns):
        return socket.if_nametoindex(att.host_ifname)


def _mac_map(datapath: EbpfDatapath) -> dict[str, tuple[int, int]]:
    raw = libbpf.dump(datapath._maps["mac_port"], bpfc.MAC_PORT_KEY.size,
                      bpfc.MAC_PORT_VALUE.size)
    return {bpfc.MAC_PORT_KEY.unpack(k)[0].hex(":"): bpfc.MAC_PORT_VALUE.unpack(v)
            for k, v in raw.items()}


@pytest.fixture
def datapath(trio: Any) -> Iterator[EbpfDatapath]:
    with ebpf_datapath(trio) as dp:
        yield dp


@pytest.fixture
def leaving(trio: Any, datapath: EbpfDatapath) -> Any:
    return from_pod(trio, datapath)


def _syn(src: Any, dst: Any, dst_mac: str, dport: int = PORT) -> bytes:
    return eth(src.mac, 0x0800, tcp4(src.address4, dst.address4, 40000, dport, SYN), dst_mac)


def test_a_passed_frame_to_a_guarded_pod_goes_to_its_port(trio, datapath, leaving) -> None:
    a, b, c = trio.a, trio.b, trio.c
    datapath.apply(compile_cluster(_cluster(trio, B_FROM_A)))
    bridge = _bridge_index(trio)
    assert _mac_map(datapath) == {a.mac: (_ifindex(trio, a), bridge),
                                  b.mac: (_ifindex(trio, b), bridge)}
    assert leaving(_syn(a, b, b.mac), a) == REDIRECTED
    # what b's policy denies is dropped, not delivered
    assert leaving(_syn(a, b, b.mac, dport=PORT + 1), a) == SHOT
    # ARP between them too, as the bridge would carry it
    assert leaving(eth(a.mac, 0x0806, _arp(a, b, 2), b.mac), a) == REDIRECTED
    # to c (unguarded: no MAC of its port is known), to every host, to a MAC no pod has
    assert leaving(_syn(a, c, c.mac), a) == PASSED
    assert leaving(eth(a.mac, 0x0806, _arp(a, b, 1), "ff:ff:ff:ff:ff:ff"), a) == PASSED
    assert leaving(_syn(a, b, "02:00:00:00:00:99"), a) == PASSED
    # from c (unguarded: its frames' source is nothing the datapath holds it to)
    assert leaving(eth(c.mac, 0x0806, _arp(c, b, 2), b.mac), c) == PASSED
    # b to itself through its own MAC: the bridge's business
    assert leaving(_syn(b, b, b.mac), b) == PASSED
    # to b's MAC for c's address: delivered as the bridge would, and dropped where the
    # bridge would have brought it, by b's receive check
    astray = _syn(a, c, b.mac)
    assert leaving(astray, a) == REDIRECTED
    with entered(trio.host_netns):
        assert libbpf.test_run(datapath._progs["out"], astray, 1,
                               ifindex=_ifindex(trio, b))[0] == SHOT


def _arp(sender: Any, target: Any, op: int) -> bytes:
    return (struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + mac_bytes(sender.mac)
            + socket.inet_aton(sender.address4) + mac_bytes(target.mac if op == 2 else "00" * 6)
            + socket.inet_aton(target.address4))


def _bridge_index(trio: Any) -> int:
    with entered(trio.host_netns):
        return socket.if_nametoindex(trio.plumber.bridge)


def test_a_mac_two_ports_claim_and_a_port_of_another_bridge_take_the_bridge(
        trio, datapath, leaving) -> None:
    a, b, c = trio.a, trio.b, trio.c
    # b claims a's MAC as well: the compiler binds both ports to nothing (their guards
    # hold no address and no MAC: no IP frame leaves either), nothing is delivered to
    datapath.apply(compile_cluster(_cluster(trio, macs={"b": a.mac})))
    assert _mac_map(datapath) == {}
    shared = eth(a.mac, 0x0800, tcp4(b.address4, a.address4, 40000, PORT, SYN), a.mac)
    assert leaving(shared, b) == SHOT
    # c on a bridge of its own, guarded: a frame from a to c's MAC is the bridges' to
    # carry (they are not one segment), between a and b it is delivered
    other = f"{trio.plumber.naming.prefix}b2"
    with entered(trio.host_netns):
        subprocess.run(["ip", "link", "add", other, "type", "bridge"], check=True)
        subprocess.run(["ip", "link", "set", other, "up"], check=True)
        subprocess.run(["ip", "link", "set", c.host_ifname, "master", other], check=True)
    datapath.apply(compile_cluster(_cluster(trio, guarded="abc")))
    assert set(_mac_map(datapath)) == {a.mac, b.mac, c.mac}
    assert leaving(_syn(a, c, c.mac), a) == PASSED
    assert leaving(_syn(c, a, a.mac), c) == PASSED
    assert leaving(_syn(a, b, b.mac), a) == REDIRECTED


def _bridge_counter(trio: Any, name: str, match: str) -> Callable[[], int]:
    """A bridge-family counter of the forwarded frames `match` names (in the trio's host
    namespace, which goes with the test): a function reading it."""
    table = f"{trio.plumber.naming.prefix}{name}"
    rules = (f"table bridge {table} {{\n chain forwarded {{\n"
             f"  type filter hook forward priority 0;\n  {match} counter\n }}\n}}\n")
    subprocess.run(["ip", "netns", "exec", trio.host_netns, "nft", "-f", "-"], input=rules,
                   text=True, check=True)
    return lambda: _bridged(trio.host_netns, table)


def _bridged(host: str, table: str) -> int:
    """Packets the bridge forwarded that its counter rule saw."""
    out = subprocess.run(["ip", "netns", "exec", host, "nft", "-j", "list", "table",
                          "bridge", table], check=True, capture_output=True, text=True).stdout
    for item in json.loads(out)["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                return int(expr["counter"]["packets"])
    raise AssertionError(f"no counter in {out}")


def test_real_connections_skip_the_bridge_and_stay_judged(trio, datapath) -> None:
    """A connection from a to b passes with none of its frames forwarded by the bridge
    (a bridge-family counter sees none; the control, b unguarded, sees them), and b's
    policy still judges: c is refused on the same port, a on another."""
    a, b, c = trio.a, trio.b, trio.c
    bridged = _bridge_counter(trio, "t", f"ether saddr {a.mac} ether daddr {b.mac}")
    datapath.apply(compile_cluster(_cluster(trio, B_FROM_A)))
    with EchoServer(b.netns, PORT), EchoServer(b.netns, PORT + 1):
        conn = connect(a.netns, b.address4, PORT)
        try:
            for i in range(5):
                assert echo(conn, f"hello {i}".encode())
        finally:
            conn.close()
        assert bridged() == 0
        for who, port in ((c, PORT), (a, PORT + 1)):
            with pytest.raises(OSError):
                connect(who.netns, b.address4, port)
        # the control: b unguarded, a's frames to it are forwarded by the bridge
        datapath.apply(compile_cluster(_cluster(trio, B_FROM_A, guarded="a")))
        datapath.flush_connections()
        conn = connect(a.netns, b.address4, PORT)
        try:
            assert echo(conn, b"bridged")
        finally:
            conn.close()
        assert bridged() > 0


def test_the_mac_map_reads_back_and_is_repaired(trio, datapath) -> None:
    a, b, c = trio.a, trio.b, trio.c
    rs = compile_cluster(_cluster(trio))
    datapath.apply(rs)
    want = _mac_map(datapath)
    assert set(want) == {a.mac, b.mac}
    again = EbpfDatapath(netns=trio.host_netns)  # a new process adopts it as it is
    assert again.apply(rs, verify=True).empty
    assert again.last_drift is None and again.last_timing["entries"] == 0
    again.close()
    # a's entry deleted, b's MAC sent to c's port, c's MAC added
    fd = datapath._maps["mac_port"]
    key = bpfc.MAC_PORT_KEY.pack
    libbpf.delete(fd, key(bytes.fromhex(a.mac.replace(":", ""))))
    libbpf.update(fd, key(bytes.fromhex(b.mac.replace(":", ""))),
                  bpfc.MAC_PORT_VALUE.pack(_ifindex(trio, c), _bridge_index(trio)))
    libbpf.update(fd, key(bytes.fromhex(c.mac.replace(":", ""))),
                  bpfc.MAC_PORT_VALUE.pack(_ifindex(trio, c), _bridge_index(trio)))
    datapath.apply(rs, verify=True)
    assert any(d == "mac_port: 1 missing, 1 changed, 1 foreign entries"
               for d in datapath.last_drift_details), datapath.last_drift_details
    assert _mac_map(datapath) == want
    datapath.apply(rs, verify=True)
    assert datapath.last_drift is None
    # unguarding b takes its entry; removing the datapath takes the map
    datapath.apply(compile_cluster(_cluster(trio, guarded="a")))
    assert set(_mac_map(datapath)) == {a.mac}


def _exchange6(trio: Any, port: int) -> bool:
    """One TCP exchange over IPv6 from a to b (sockets made in each pod's namespace)."""
    a, b = trio.a, trio.b
    with entered(b.netns):
        server = socket.socket(socket.AF_INET6)
    with entered(a.netns):
        client = socket.socket(socket.AF_INET6)
    with server, client:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("::", port))
        server.listen(1)
        client.settimeout(5)
        server.settimeout(5)
        try:
            client.connect((b.address6, port))
            conn, _ = server.accept()
            with conn:
                client.sendall(b"six")
                return conn.recv(10) == b"six"
        except OSError:
            return False


def test_ipv6_between_guarded_pods_skips_the_bridge_too(trio, datapath) -> None:
    """Neighbour discovery (its solicitations are multicast, and take the bridge) and a
    TCP exchange over IPv6: none of a's IPv6 frames to b's MAC is forwarded by the
    bridge; with b unguarded (the control) they are."""
    a, b = trio.a, trio.b
    bridged = _bridge_counter(trio, "t6",
                              f"ether saddr {a.mac} ether daddr {b.mac} ether type ip6")
    datapath.apply(compile_cluster(_cluster(trio)))
    assert _exchange6(trio, PORT)
    assert bridged() == 0
    datapath.apply(compile_cluster(_cluster(trio, guarded="a")))
    assert _exchange6(trio, PORT + 2)
    assert bridged() > 0
