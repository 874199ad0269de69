"""A pod that claims another pod's address, against every datapath, with real packets.

x/c admits UDP/5003 from x/a only; x/b is admitted by nobody. b writes whole frames
on its interface (a packet socket, which a container has with the default
CAP_NET_RAW):

* a datagram to c with a's address as its source (IPv4 and IPv6): policy judges a
  packet by its addresses, so without the port guard it would be judged as a's and
  let in;
* an ARP request to c from a's IPv4 address at b's MAC: c would learn it, and its
  datagrams to a would then reach b, although b's own isolation admits nothing.

and more: a router advertisement, a redirect, a datagram to c's link-local address
(which no policy names), broadcasts and multicasts (which no pod's ingress judges).

Each datapath binds every pod's bridge port to its addresses and MAC (`compile.ir.
Guard`): all of these are dropped at b's port. `Impersonated` is the failure that
would say otherwise; any other failure is the test's own set-up.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from stockade.compile.lower import compile_cluster
from stockade.datapath import open_datapath
from stockade.datapath.base import Datapath
from stockade.errors import DataplaneError
from stockade.model.labels import Labels
from stockade.model.policy import INGRESS, NetworkPolicy, Peer, PolicyPort
from stockade.model.policy import Rule as PRule
from stockade.model.selector import Selector

from .clusters import cluster

pytestmark = pytest.mark.privileged

PORT = 5003


class Impersonated(AssertionError):
    """A pod was taken for another: what the port guard is there to prevent."""


# Received datagrams' payloads, one per line, until 2 s pass without one.
SINK = """
import socket, sys
family = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
u = socket.socket(family, socket.SOCK_DGRAM)
u.bind(("::" if sys.argv[1] == "6" else "0.0.0.0", int(sys.argv[2])))
u.settimeout(2)
print("ready", flush=True)
try:
    while True:
        print(u.recv(100).decode(), flush=True)
except socket.timeout:
    pass
"""

# One UDP datagram written as a whole Ethernet frame: any source address, any MACs.
FRAME = """
import socket, struct, sys
ifname, smac, dmac, src, dst, port, payload = sys.argv[1:8]
port, payload = int(port), payload.encode()

def fold(data):
    data += b"\\0" * (len(data) % 2)
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total >> 16) + (total & 0xFFFF)
    return ~total & 0xFFFF

udp = struct.pack("!HHHH", 4444, port, 8 + len(payload), 0) + payload
if ":" in src:
    s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    check = fold(s + d + struct.pack("!I3xB", len(udp), 17) + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", check) + udp[8:]
    ip = struct.pack("!IHBB", 6 << 28, len(udp), 17, 64) + s + d
    kind = 0x86DD
else:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", fold(ip)) + ip[12:]
    kind = 0x0800
mac = lambda text: bytes.fromhex(text.replace(":", ""))
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
raw.bind((ifname, 0))
raw.send(mac(dmac) + mac(smac) + struct.pack("!H", kind) + ip + udp)
"""

# FRAME (argv[1]) for each seven arguments after it.
FRAMES = """
import sys
code, args = sys.argv[1], sys.argv[2:]
for i in range(0, len(args), 7):
    sys.argv = [sys.argv[0], *args[i:i + 7]]
    exec(code)
"""

# An ARP request to (`tip`, `dmac`) from `ip` at `smac`: the asked host learns the asker's
# address, replacing what it had (after the neighbour entry's locktime, 1 s).
ARP = """
import socket, struct, sys
ifname, smac, ip, dmac, tip = sys.argv[1:6]
mac = lambda text: bytes.fromhex(text.replace(":", ""))
arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac(smac) + socket.inet_aton(ip) \\
    + bytes(6) + socket.inet_aton(tip)
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
raw.bind((ifname, 0))
raw.send(mac(dmac) + mac(smac) + struct.pack("!H", 0x0806) + arp)
"""

# Frames arriving for an address (IPv4 or IPv6), whoever's it is: their UDP payloads,
# one a line.
CAPTURE = """
import socket, sys
text, seconds = sys.argv[1], float(sys.argv[2])
v6 = ":" in text
dst = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, text)
ethertype = 0x86DD if v6 else 0x0800
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
raw.settimeout(seconds)
print("ready", flush=True)
try:
    while True:
        frame = raw.recv(2048)
        if frame[12:14] != ethertype.to_bytes(2, "big"):
            continue
        if v6 and frame[20] == 17 and frame[38:54] == dst:
            print(frame[62:].decode(errors="replace"), flush=True)
        elif not v6 and frame[23] == 17 and frame[30:34] == dst:
            print(frame[14 + (frame[14] & 15) * 4 + 8:].decode(errors="replace"), flush=True)
except socket.timeout:
    pass
"""

# An ICMPv6 message from `src` at `smac` to (`dst`, `dmac`): its type, code and body (hex)
# given, the checksum and the IPv6 header (hop limit 255, as neighbour discovery needs)
# worked out here.
ICMPV6 = """
import socket, struct, sys
ifname, smac, src, dmac, dst, kind, body = sys.argv[1:8]
mac = lambda text: bytes.fromhex(text.replace(":", ""))
s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
icmp = struct.pack("!BBH", int(kind), 0, 0) + bytes.fromhex(body)
data = s + d + struct.pack("!I3xB", len(icmp), 58) + icmp
total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
while total >> 16:
    total = (total >> 16) + (total & 0xFFFF)
icmp = icmp[:2] + struct.pack("!H", ~total & 0xFFFF) + icmp[4:]
ip = struct.pack("!IHBB", 6 << 28, len(icmp), 58, 255) + s + d
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
raw.bind((ifname, 0))
raw.send(mac(dmac) + mac(smac) + struct.pack("!H", 0x86DD) + ip + icmp)
"""


def _hex(text: str) -> str:
    return bytes.fromhex(text.replace(":", "")).hex()


def advert(target: str, mac: str) -> tuple[str, str]:
    """An unsolicited neighbour advertisement (override set) claiming `target` is at `mac`:
    the asked host replaces the MAC it had. (type, body) for ICMPV6."""
    return "136", "20000000" + socket.inet_pton(socket.AF_INET6, target).hex() \
        + "0201" + _hex(mac)


def router_advert(mac: str) -> tuple[str, str]:
    """A router advertisement: a default router for 1,800 s, preference high, at `mac`."""
    return "134", "40" + "08" + "0708" + "00000000" + "00000000" + "0101" + _hex(mac)


def redirect(target: str, dst: str, mac: str) -> tuple[str, str]:
    """A redirect: `dst` is better reached through `target`, at `mac`."""
    return "137", "00000000" + socket.inet_pton(socket.AF_INET6, target).hex() \
        + socket.inet_pton(socket.AF_INET6, dst).hex() + "0201" + _hex(mac)


C_ONLY_FROM_A_UDP = NetworkPolicy(
    "x", "udp-from-a", Selector(Labels({"pod": "c"})),
    ingress=(PRule((PolicyPort("UDP", PORT),),
                   (Peer(pod_selector=Selector(Labels({"pod": "a"}))),)),),
    policy_types=(INGRESS,))
B_ISOLATED = NetworkPolicy("x", "isolate-b", Selector(Labels({"pod": "b"})),
                           policy_types=(INGRESS,))


@pytest.fixture(params=["nft", "iptables", "ebpf"])
def datapath(request: pytest.FixtureRequest, trio: Any, netns_prefix: str
             ) -> Iterator[Datapath]:
    dp = open_datapath(request.param, netns_prefix, netns=trio.host_netns)
    try:
        dp.check()
        dp.apply(compile_cluster(cluster(trio, C_ONLY_FROM_A_UDP, B_ISOLATED)))
        yield dp
    finally:
        dp.remove()


def python_in(netns: str, code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", code, *args],
                            stdout=subprocess.PIPE, text=True)


def run_in(netns: str, code: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code, *args],
                   check=True, timeout=30)


def collected(proc: subprocess.Popen[str]) -> set[str]:
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    return set(out.split()) - {"ready"}


@pytest.mark.parametrize("family", [4, 6])
def test_a_datagram_with_another_pods_source_is_not_let_in(trio: Any, datapath: Datapath,
                                                           family: int) -> None:
    if _forged_gets_in(trio, family):
        addr = trio.a.address4 if family == 4 else trio.a.address6
        raise Impersonated(f"b's datagram with a's address ({addr}) reached c")


@pytest.mark.parametrize("kind", ["nft", "iptables"])
def test_a_guard_tampered_with_is_repaired(trio: Any, netns_prefix: str, kind: str) -> None:
    """The bridge table behind nft's and iptables' guards: an element that gives b's port
    a's address lets b's forged datagram in; the verifying apply reports and removes it.
    The table deleted: made anew."""
    a, b = trio.a, trio.b
    dp = open_datapath(kind, netns_prefix, netns=trio.host_netns)
    rs = compile_cluster(cluster(trio, C_ONLY_FROM_A_UDP, B_ISOLATED))
    nft = ["ip", "netns", "exec", trio.host_netns, "nft"]
    try:
        dp.check()
        dp.apply(rs)
        subprocess.run([*nft, "add", "element", "bridge", netns_prefix, "a4",
                        f'{{ "{b.host_ifname}" . {a.address4} }}'], check=True)
        assert _forged_gets_in(trio, 4)  # the tampering is what lets it in
        dp.apply(rs, verify=True)
        assert dp.last_drift is not None and dp.last_drift.set_guards, dp.last_drift_details
        assert f"guard of {b.host_ifname}: its elements disagree" in dp.last_drift_details
        assert not _forged_gets_in(trio, 4)
        subprocess.run([*nft, "delete", "table", "bridge", netns_prefix], check=True)
        dp.apply(rs, verify=True)
        assert dp.last_drift is not None and len(dp.last_drift.set_guards) == 3
        assert not _forged_gets_in(trio, 4) and dp.apply(rs, verify=True).empty
        # the receiving side: c's MAC given the subnet's broadcast address as well
        c = trio.c
        subprocess.run([*nft, "add", "element", "bridge", netns_prefix, "d4",
                        f"{{ {c.mac} . 10.244.255.255 }}"], check=True)
        dp.apply(rs, verify=True)
        assert "guard sets dmacs, d4, d6: not their ports' MACs and addresses" in \
            dp.last_drift_details, dp.last_drift_details
        listed = subprocess.run([*nft, "list", "set", "bridge", netns_prefix, "d4"],
                                capture_output=True, text=True, check=True).stdout
        assert "10.244.255.255" not in listed and c.address4 in listed
        # with no port left to guard the table stays (empty); it is not made where none is
        assert dp.apply(replace(rs, guards={})).del_guards
        assert _forged_gets_in(trio, 4)  # unguarded, as asked
    finally:
        dp.remove()


def test_guard_changes_go_over_raw_netlink(trio: Any, netns_prefix: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """nft sends a change of guards as raw netlink messages in the policy's transaction:
    each element's key as the kernel keeps it (a refused one would fall back to
    libnftables, which takes milliseconds more on every CNI ADD and DEL)."""
    dp = open_datapath("nft", netns_prefix, netns=trio.host_netns)
    rs = compile_cluster(cluster(trio, C_ONLY_FROM_A_UDP, B_ISOLATED))
    c_port = trio.c.host_ifname
    try:
        dp.check()
        dp.apply(rs)
        caplog.clear()
        with caplog.at_level("DEBUG", logger="stockade"):
            less = dp.apply(replace(rs, guards={p: g for p, g in rs.guards.items()
                                                if p != c_port}))
            more = dp.apply(rs)
        assert less.del_guards and more.set_guards
        refused = [r.getMessage() for r in caplog.records
                   if "libnftables" in r.getMessage()]
        assert refused == []
        dp.apply(rs, verify=True)
        assert dp.last_drift is None, dp.last_drift_details
        assert not _forged_gets_in(trio, 4) and not _forged_gets_in(trio, 6)
    finally:
        dp.remove()


@pytest.mark.parametrize("kind", ["nft", "iptables"])
def test_the_guard_table_comes_with_the_first_guarded_port(trio: Any, netns_prefix: str,
                                                           kind: str) -> None:
    """A host where no port is guarded has no guard table (nothing to pay per frame); the
    first guard makes it, in an apply that does not read the kernel back."""
    dp = open_datapath(kind, netns_prefix, netns=trio.host_netns)
    rs = compile_cluster(cluster(trio, C_ONLY_FROM_A_UDP, B_ISOLATED))
    tables = ["ip", "netns", "exec", trio.host_netns, "nft", "list", "tables", "bridge"]
    try:
        dp.check()
        dp.apply(replace(rs, guards={}))
        assert netns_prefix not in subprocess.run(tables, capture_output=True, text=True,
                                                  check=True).stdout
        assert _forged_gets_in(trio, 4)
        assert len(dp.apply(rs).set_guards) == 3
        assert not _forged_gets_in(trio, 4) and dp.diff(rs).empty
        # read back, the table is as made: every rule as libnftables lists it
        dp.apply(rs, verify=True)
        assert dp.last_drift is None, dp.last_drift_details
        # the last port unguarded, the table stays; the next first guard goes into it
        # (not a table made anew, as once on every CNI ADD to a node without pods)
        made = _table_handle(trio.host_netns, netns_prefix)
        dp.apply(replace(rs, guards={}))
        assert _forged_gets_in(trio, 4)
        assert len(dp.apply(rs).set_guards) == 3
        assert _table_handle(trio.host_netns, netns_prefix) == made
        assert not _forged_gets_in(trio, 4)
        # deleted behind its back while no port is guarded: the first guard after fails,
        # and the verifying apply that follows a failure makes the table
        dp.apply(replace(rs, guards={}))
        subprocess.run(["ip", "netns", "exec", trio.host_netns, "nft", "delete", "table",
                        "bridge", netns_prefix], check=True)
        with pytest.raises(DataplaneError):
            dp.apply(rs)
        assert len(dp.apply(rs, verify=True).set_guards) == 3
        assert not _forged_gets_in(trio, 4)
    finally:
        dp.remove()


def _table_handle(netns: str, name: str) -> int:
    out = subprocess.run(["ip", "netns", "exec", netns, "nft", "-j", "list", "table", "bridge",
                          name], capture_output=True, text=True, check=True).stdout
    return next(int(i["table"]["handle"]) for i in json.loads(out)["nftables"] if "table" in i)


def _forged_gets_in(trio: Any, family: int) -> bool:
    """b sends c a datagram with a's source (c admits only a): whether it arrives. The
    policy itself is held to (a's own arrives, b's honest one does not)."""
    a, b, c = trio.a, trio.b, trio.c
    addr = (lambda att: att.address4) if family == 4 else (lambda att: att.address6)
    sink = python_in(c.netns, SINK, str(family), str(PORT))
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        for sender, source, payload in ((b, a, "forged"), (b, b, "from-b"), (a, a, "from-a")):
            run_in(sender.netns, FRAME, sender.ifname, sender.mac, c.mac, addr(source),
                   addr(c), str(PORT), payload)
    finally:
        got = collected(sink)
    # the policy is enforced: a's own datagram arrives, b's honest one does not
    assert "from-a" in got and "from-b" not in got, got
    return "forged" in got


def test_an_arp_request_from_another_pods_address_does_not_divert_its_traffic(
        trio: Any, datapath: Datapath) -> None:
    a, b, c = trio.a, trio.b, trio.c
    if _diverted(trio, 4, lambda: run_in(b.netns, ARP, b.ifname, b.mac, a.address4, c.mac,
                                         c.address4)):
        raise Impersonated("c's datagram to a reached b, which claimed a's address by ARP")


def test_a_neighbour_advert_for_another_pods_address_does_not_divert_its_traffic(
        trio: Any, datapath: Datapath) -> None:
    a, b, c = trio.a, trio.b, trio.c
    # from b's own address (which its guard lets out), claiming a's
    if _diverted(trio, 6, lambda: run_in(b.netns, ICMPV6, b.ifname, b.mac, b.address6, c.mac,
                                         c.address6, *advert(a.address6, b.mac))):
        raise Impersonated("c's datagram to a reached b, which claimed a's IPv6 address")


def test_a_frame_from_another_pods_mac_does_not_take_its_place_on_the_bridge(
        trio: Any, datapath: Datapath) -> None:
    """A frame with a's MAC as its source moves a's entry in the bridge's forwarding table
    to b's port, and frames for a go to b until a sends again (a fresh interface's own
    neighbour discovery does, within a second): so b keeps sending while c does."""
    _steal_a_mac(trio, "guarded")


@pytest.mark.parametrize(("datapath", "b_port"), [
    ("nft", "mac unknown"), ("nft", "unguarded"), ("iptables", "mac unknown"),
    ("iptables", "unguarded"), ("ebpf", "mac unknown"), ("ebpf", "unguarded")],
    indirect=["datapath"])
def test_a_pods_mac_is_its_own_port_s_whatever_the_port_sending_it(
        trio: Any, datapath: Datapath, b_port: str) -> None:
    """The same theft from a port bound to no MAC: b's endpoint declared with its port
    and no MAC, or with no port at all (its port unguarded). a's MAC is bound to a's
    port, so no other port sends from it (eBPF: its programs run on every veth of the
    bridge, an unguarded one too)."""
    whole = cluster(trio, C_ONLY_FROM_A_UDP, B_ISOLATED)
    loose = {"mac unknown": {"mac": ""}, "unguarded": {"port": "", "mac": ""}}[b_port]
    datapath.apply(compile_cluster(replace(whole, endpoints=tuple(
        replace(e, **loose) if e.name == "b" else e for e in whole.endpoints))))
    _steal_a_mac(trio, b_port)


def _steal_a_mac(trio: Any, b_port: str) -> None:
    """b sends from a's MAC while c sends to a (which admits everyone: no policy stops
    it before the bridge); Impersonated if b got c's datagram, or if the bridge's table
    puts a's MAC at b's port after one more such frame (what the host sends to a goes
    by it; eBPF delivers c's frames to a's port itself)."""
    a, b = trio.a, trio.b
    steal = ("import subprocess, sys, time\n"
             "for _ in range(40):\n"
             "    subprocess.run([sys.executable, '-c', *sys.argv[1:]], check=True)\n"
             "    time.sleep(0.02)\n")
    forged = (FRAME, b.ifname, a.mac, a.mac, b.address4, a.address4, str(PORT), "x")
    if _diverted(trio, 4, lambda: python_in(b.netns, steal, *forged), sends=40):
        raise Impersonated(f"c's datagram to a reached b ({b_port}), which sent from "
                           "a's MAC")
    run_in(b.netns, *forged)
    if a.mac in _learned(trio.host_netns, b.host_ifname):
        raise Impersonated(f"the bridge took a's MAC to be at b's port ({b_port})")


def _learned(netns: str, port: str) -> set[str]:
    """The MACs the bridge has learned at `port`."""
    out = subprocess.run(["ip", "netns", "exec", netns, "bridge", "fdb", "show", "dev", port],
                         check=True, capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


# `sends` datagrams from c to (argv[2], argv[3]), 25 ms apart.
SEND = """
import socket, sys, time
u = socket.socket(socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[4])):
    u.sendto(b"meant-for-a", (sys.argv[2], int(sys.argv[3])))
    time.sleep(0.025)
"""


def _diverted(trio: Any, family: int, claim: Callable[[], object], sends: int = 1) -> bool:
    """c knows a's real MAC (for longer than a neighbour entry's locktime, 1 s); b makes its
    `claim` (a process left running is waited for); c then sends to a: whether b got it."""
    a, b, c = trio.a, trio.b, trio.c
    addr = a.address4 if family == 4 else a.address6
    subprocess.run(["ip", "netns", "exec", c.netns, "ip", "neigh", "replace", addr,
                    "lladdr", a.mac, "dev", c.ifname, "nud", "reachable"], check=True)
    time.sleep(1.2)
    capture = python_in(b.netns, CAPTURE, addr, "2")
    try:
        assert capture.stdout is not None and capture.stdout.readline().strip() == "ready"
        running = claim()
        run_in(c.netns, SEND, str(family), addr, str(PORT), str(sends))
        if isinstance(running, subprocess.Popen):
            running.wait(30)
    finally:
        got = collected(capture)
    return "meant-for-a" in got


ROUTER = "fe80::bad"  # the source b's advertisements claim (any link-local leaves a port)


def _default_via(netns: str, gateway: str) -> bool:
    out = subprocess.run(["ip", "-n", netns, "-6", "route", "show", "default"],
                         capture_output=True, text=True, check=True).stdout
    return f"via {gateway} " in out


def test_a_pods_router_advert_does_not_route_its_neighbours_through_it(
        trio: Any, datapath: Datapath, netns_prefix: str) -> None:
    """b announces itself as the default router (preference high) to every node: a
    neighbour that listens would send its IPv6 traffic to b (CVE-2020-10749). stockade's
    pods do not listen (accept_ra 0, see the plumbing test); c listens here, so that the
    guard alone stands in the way. With no guard the route appears (the control)."""
    b, c = trio.b, trio.c
    accept_ra = f"net.ipv6.conf.{c.ifname}.accept_ra"
    subprocess.run(["ip", "netns", "exec", c.netns, "sysctl", "-qw", f"{accept_ra}=1"],
                   check=True)
    rs = compile_cluster(cluster(trio, C_ONLY_FROM_A_UDP, B_ISOLATED))

    def announced() -> bool:
        run_in(b.netns, ICMPV6, b.ifname, b.mac, ROUTER, "33:33:00:00:00:01", "ff02::1",
               *router_advert(b.mac))
        time.sleep(0.3)
        return _default_via(c.netns, ROUTER)

    try:
        datapath.apply(replace(rs, guards={}))
        assert announced(), "the control: with no guard, c takes b for its router"
        subprocess.run(["ip", "-n", c.netns, "-6", "route", "flush", "proto", "ra"],
                       check=True)
        datapath.apply(rs)
        if announced():
            raise Impersonated("c routes its IPv6 traffic through b, which announced itself")
    finally:
        subprocess.run(["ip", "netns", "exec", c.netns, "sysctl", "-qw", f"{accept_ra}=0"],
                       check=True)
        subprocess.run(["ip", "-n", c.netns, "-6", "route", "flush", "proto", "ra"],
                       check=False)


def _address_state(netns: str, ifname: str, address: str) -> set[str]:
    out = subprocess.run(["ip", "-n", netns, "-j", "-6", "addr", "show", "dev", ifname],
                         capture_output=True, text=True, check=True).stdout
    return {k for link in json.loads(out) for a in link.get("addr_info", ())
            if a.get("local") == address for k in ("tentative", "dadfailed") if a.get(k)}


def test_a_pods_duplicate_address_probe_takes_no_address_away(
        trio: Any, datapath: Datapath) -> None:
    """c adds an address, detecting duplicates (as pods plumbed by other plugins do); b
    sends a probe for it from :: (as a node detecting the same address would): c would
    give the address up. With no guard it does (the control)."""
    b, c = trio.b, trio.c
    rs = compile_cluster(cluster(trio, C_ONLY_FROM_A_UDP, B_ISOLATED))
    new = "fd00:244::99"

    def taken_away() -> bool:
        subprocess.run(["ip", "-n", c.netns, "addr", "add", f"{new}/64", "dev", c.ifname],
                       check=True)
        try:
            run_in(b.netns, ICMPV6, b.ifname, b.mac, "::", "33:33:ff:00:00:99",
                   "ff02::1:ff00:99", "135", "00000000"
                   + socket.inet_pton(socket.AF_INET6, new).hex())
            deadline = time.monotonic() + 5
            while "tentative" in (state := _address_state(c.netns, c.ifname, new)) and (
                    "dadfailed" not in state and time.monotonic() < deadline):
                time.sleep(0.1)
            return "dadfailed" in state
        finally:
            subprocess.run(["ip", "-n", c.netns, "addr", "del", f"{new}/64", "dev",
                            c.ifname], check=False)

    datapath.apply(replace(rs, guards={}))
    assert taken_away(), "the control: with no guard, c gives its new address up"
    datapath.apply(rs)
    if taken_away():
        raise Impersonated("b's probe made c give up its new address")


def _neighbour_mac(netns: str, ifname: str, address: str) -> str:
    out = subprocess.run(["ip", "-n", netns, "-j", "-6", "neigh", "show", address, "dev",
                          ifname], capture_output=True, text=True, check=True).stdout
    return next((str(n.get("lladdr", "")) for n in json.loads(out or "[]")), "")


def _solicited(address: str) -> tuple[str, str]:
    """The solicited-node multicast group of `address`, and its MAC."""
    low = socket.inet_pton(socket.AF_INET6, address)[-3:]
    group = socket.inet_ntop(socket.AF_INET6, bytes.fromhex("ff0200000000000000000001ff")
                             + low)
    return group, "33:33:ff:" + ":".join(f"{x:02x}" for x in low)


def _link_local_claimed(trio: Any, how: str) -> bool:
    """b claims c's link-local address: `advert` (a neighbour advertisement for it to a,
    which knows it at c's MAC), `solicitation` (one from it to a: a takes the source to
    be at the sender's MAC), `probe` (a duplicate address probe for it while c detects
    it again). Whether the claim took: a has c's link-local at b's MAC, or c gave it up."""
    a, b, c = trio.a, trio.b, trio.c
    a_ll, b_ll, c_ll = (_link_local(x.netns, x.ifname) for x in (a, b, c))
    target = socket.inet_pton(socket.AF_INET6, c_ll).hex()
    if how == "probe":
        subprocess.run(["ip", "-n", c.netns, "addr", "del", f"{c_ll}/64", "dev", c.ifname],
                       check=True)
        subprocess.run(["ip", "-n", c.netns, "addr", "add", f"{c_ll}/64", "dev", c.ifname],
                       check=True)
        group, group_mac = _solicited(c_ll)
        run_in(b.netns, ICMPV6, b.ifname, b.mac, "::", group_mac, group, "135",
               "00000000" + target)
        deadline = time.monotonic() + 5
        while "tentative" in (state := _address_state(c.netns, c.ifname, c_ll)) and (
                "dadfailed" not in state and time.monotonic() < deadline):
            time.sleep(0.1)
        taken = "dadfailed" in state
        if taken:  # c's link-local back, for what follows
            subprocess.run(["ip", "-n", c.netns, "addr", "del", f"{c_ll}/64", "dev",
                            c.ifname], check=True)
            subprocess.run(["ip", "-n", c.netns, "addr", "add", f"{c_ll}/64", "dev",
                            c.ifname, "nodad"], check=True)
        return taken
    subprocess.run(["ip", "-n", a.netns, "neigh", "replace", c_ll, "lladdr", c.mac, "dev",
                    a.ifname, "nud", "reachable"], check=True)
    time.sleep(1.2)  # past the entry's locktime
    if how == "advert":
        run_in(b.netns, ICMPV6, b.ifname, b.mac, b_ll, a.mac, a_ll, *advert(c_ll, b.mac))
    else:  # a solicitation from c's link-local address, b's MAC in its option
        run_in(b.netns, ICMPV6, b.ifname, b.mac, c_ll, a.mac, a_ll, "135",
               "00000000" + socket.inet_pton(socket.AF_INET6, a_ll).hex() + "0101"
               + _hex(b.mac))
    time.sleep(0.3)
    return _neighbour_mac(a.netns, a.ifname, c_ll) == b.mac


@pytest.mark.parametrize("how", ["advert", "solicitation", "probe"])
def test_another_pods_link_local_address_cannot_be_claimed(
        trio: Any, datapath: Datapath, how: str) -> None:
    """A port's link-local address is its MAC's (EUI-64): from a port whose MAC is known,
    neighbour discovery neither comes from nor claims another. With no guard the claim
    takes (the control)."""
    rs = compile_cluster(cluster(trio, C_ONLY_FROM_A_UDP, B_ISOLATED))
    datapath.apply(replace(rs, guards={}))
    assert _link_local_claimed(trio, how), f"the control: with no guard, b's {how} takes"
    datapath.apply(rs)
    if _link_local_claimed(trio, how):
        raise Impersonated(f"b claimed c's link-local address ({how})")


# ICMPv6 messages of the given types arriving, their types one a line, for argv[2] s.
ICMPV6_CAPTURE = """
import socket, sys
kinds, seconds = {int(k) for k in sys.argv[1].split(",")}, float(sys.argv[2])
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD))
raw.settimeout(seconds)
print("ready", flush=True)
try:
    while True:
        frame = raw.recv(2048)
        if frame[20] == 58 and frame[54] in kinds:
            print(frame[54], flush=True)
except socket.timeout:
    pass
"""


def test_a_pods_redirect_reaches_no_one(trio: Any, datapath: Datapath) -> None:
    """A redirect tells its receiver a better first hop for a destination; one from a pod
    (claiming a link-local source, which the guard lets out) is dropped at its port,
    as its router advertisements are. c watches what arrives."""
    a, b, c = trio.a, trio.b, trio.c
    capture = python_in(c.netns, ICMPV6_CAPTURE, "134,136,137", "1.5")
    try:
        assert capture.stdout is not None and capture.stdout.readline().strip() == "ready"
        run_in(b.netns, ICMPV6, b.ifname, b.mac, ROUTER, c.mac, c.address6,
               *redirect(b.address6, a.address6, b.mac))
        run_in(b.netns, ICMPV6, b.ifname, b.mac, ROUTER, "33:33:00:00:00:01", "ff02::1",
               *router_advert(b.mac))
        # a's own neighbour advert passes: the capture sees what arrives (the control)
        run_in(a.netns, ICMPV6, a.ifname, a.mac, a.address6, c.mac, c.address6,
               *advert(a.address6, a.mac))
    finally:
        got = collected(capture)
    assert "136" in got, got
    if got & {"134", "137"}:
        raise Impersonated(f"c received ICMPv6 of types {sorted(got)}, b's among them")


def _link_local(netns: str, ifname: str) -> str:
    """The interface's link-local address, once usable (duplicate detection done)."""
    deadline = time.monotonic() + 5
    while True:
        out = subprocess.run(["ip", "-n", netns, "-j", "-6", "addr", "show", "dev", ifname],
                             capture_output=True, text=True, check=True).stdout
        found = [a for link in json.loads(out) for a in link.get("addr_info", ())
                 if a.get("scope") == "link" and "local" in a]
        if (found and not found[0].get("tentative")) or time.monotonic() > deadline:
            return str(found[0]["local"])
        time.sleep(0.1)


# Datagrams to c's link-local address (argv: the address, b's interface, the port, and the
# address to send from: b's own global one, or none for the kernel's choice, b's
# link-local one): a plain socket, no capability needed.
SEND_LINK_LOCAL = """
import socket, sys, time
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
if len(sys.argv) > 4:
    u.bind((sys.argv[4], 0))
for _ in range(3):  # the first may wait for neighbour discovery
    u.sendto(b"over-link-local", (sys.argv[1] + "%" + sys.argv[2], int(sys.argv[3])))
    time.sleep(0.2)
"""


@pytest.mark.parametrize("source", ["link-local", "global"])
def test_a_link_local_address_is_no_way_around_isolation(trio: Any, datapath: Datapath,
                                                         source: str) -> None:
    """Pods on one bridge share a link, so each has a link-local address the others can
    reach, which no policy names: c admits UDP/5003 from a only, and b's datagram to
    c's link-local address must not get in any more than one to c's own. From b's
    link-local address, or from its own global one (which b's guard lets out: the frame
    goes to c's MAC, and c's port lets in only what is for c's own address)."""
    b, c = trio.b, trio.c
    _link_local(b.netns, b.ifname)  # b's own, usable to send from
    target = _link_local(c.netns, c.ifname)  # before the sink starts: it waits 2 s for each
    sink = python_in(c.netns, SINK, "6", str(PORT))
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        run_in(b.netns, SEND_LINK_LOCAL, target, b.ifname, str(PORT),
               *([b.address6] if source == "global" else []))
    finally:
        got = collected(sink)
    if got:
        raise Impersonated(f"b reached isolated c over its link-local address, from its "
                           f"{source} one: {got}")


# Datagrams to every pod at once (argv: family, b's own address, port): the subnet's
# broadcast address and all-hosts multicast (IPv4), all-nodes multicast (IPv6), from b's
# own address; plain sockets.
SEND_TO_ALL = """
import socket, sys, time
family, own, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if family == "4":
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    u.bind((own, 0))
    targets = [("10.244.255.255", port), ("255.255.255.255", port), ("224.0.0.1", port)]
else:
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.bind((own, 0))
    targets = [("ff02::1%eth0", port)]
for _ in range(3):
    for t in targets:
        try:
            u.sendto(b"to-everyone", t)
        except OSError:
            pass
    time.sleep(0.2)
"""


@pytest.mark.parametrize("family", [4, 6])
def test_broadcast_and_multicast_are_no_way_around_isolation(trio: Any, datapath: Datapath,
                                                             family: int) -> None:
    """A datagram to every pod at once (broadcast, multicast) has no pod's address as its
    destination, so no pod's ingress policy would judge it: isolated c must not get it."""
    b, c = trio.b, trio.c
    sink = python_in(c.netns, SINK, str(family), str(PORT))
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        run_in(b.netns, SEND_TO_ALL, str(family), b.address4 if family == 4 else b.address6,
               str(PORT))
    finally:
        got = collected(sink)
    if got:
        raise Impersonated(f"b reached isolated c by broadcast or multicast: {got}")


@pytest.mark.parametrize("family", [4, 6])
def test_a_broadcast_written_to_one_pods_mac_is_no_way_around_isolation(
        trio: Any, datapath: Datapath, family: int) -> None:
    """b writes whole frames (CAP_NET_RAW) to c's MAC, from its own MAC and address, to
    addresses c takes as its own though its ingress policy judges none of them: the
    subnet's broadcast, the limited broadcast and all-hosts multicast (IPv4), all-nodes
    multicast and c's link-local address (IPv6). The frames' destination MAC is one
    host's, so no rule on broadcast frames sees them. a's datagram to c's own address,
    written the same way, arrives (the control)."""
    a, b, c = trio.a, trio.b, trio.c
    own = (lambda att: att.address4) if family == 4 else (lambda att: att.address6)
    # before the sink starts: it waits 2 s for each datagram
    dsts = (["10.244.255.255", "255.255.255.255", "224.0.0.1"] if family == 4
            else ["ff02::1", _link_local(c.netns, c.ifname)])
    sink = python_in(c.netns, SINK, str(family), str(PORT))
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        # one process for all (the sink waits 2 s for each)
        run_in(b.netns, FRAMES, FRAME, *(arg for dst in dsts for arg in (
            b.ifname, b.mac, c.mac, own(b), dst, str(PORT), "to-" + dst)))
        run_in(a.netns, FRAME, a.ifname, a.mac, c.mac, own(a), own(c), str(PORT), "from-a")
    finally:
        got = collected(sink)
    assert "from-a" in got, got
    if got - {"from-a"}:
        raise Impersonated(f"b reached isolated c, at its MAC: {sorted(got - {'from-a'})}")
