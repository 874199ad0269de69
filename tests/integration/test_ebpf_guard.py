"""The eBPF datapath's anti-spoofing guards (`Ruleset.guards`), with real frames.

A frame leaving a pod's bridge port is held to what the pod owns before anything
else (conntrack included): its MAC, its IPv4 and IPv6 source (IPv6 link-local
and :: too), the target of its neighbour advertisements, the sender of its ARP;
no VLAN tag and no other ethertype. Most frames are fed to `stockade_from_pod`
itself (BPF_PROG_TEST_RUN) as arriving on the port's ifindex, so each byte is
the one wanted; a tagged frame also goes through a real veth, where the kernel
moves the tag out of the frame before tc sees it.

x/a and x/b are guarded (their bridge ports and MACs are given), x/c is not: its
port behaves as before guards. No policy applies unless a test adds one, so only
the guards drop anything.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from stockade.compile import bpf as bpfc
from stockade.compile.guard import link_local
from stockade.compile.ir import Guard
from stockade.compile.lower import compile_cluster
from stockade.datapath import libbpf
from stockade.datapath.ebpf import EbpfDatapath
from stockade.errors import DataplaneError
from stockade.model.cluster import Cluster, Endpoint, Namespace
from stockade.model.labels import Labels
from stockade.model.policy import INGRESS, NetworkPolicy
from stockade.model.selector import Selector
from stockade.net.namespace import entered

from .ebpf_pins import ebpf_datapath, from_pod
from .frames import eth, mac_bytes, tcp4

pytestmark = pytest.mark.privileged

PASSED, SHOT = 0xFFFFFFFF, 2  # TC_ACT_UNSPEC, TC_ACT_SHOT
A_ISOLATED = NetworkPolicy("x", "a-isolated", Selector(Labels({"pod": "a"})),
                           policy_types=(INGRESS,))


def _endpoint(att: Any, name: str, guarded: bool) -> Endpoint:
    return Endpoint("x", name, Labels({"pod": name}), (att.address4, att.address6),
                    port=att.host_ifname if guarded else "", mac=att.mac if guarded else "")


def _cluster(trio: Any, *policies: NetworkPolicy, guarded: str = "ab") -> Cluster:
    ns = Namespace("x", Labels({"kubernetes.io/metadata.name": "x"}))
    return Cluster((ns,), tuple(_endpoint(getattr(trio, n), n, n in guarded) for n in "abc"),
                   policies)


def _ifindex(trio: Any, att: Any) -> int:
    with entered(trio.host_netns):
        return socket.if_nametoindex(att.host_ifname)


def _udp4(src: str, dst: str) -> bytes:
    udp = struct.pack("!HHHH", 4444, 5003, 12, 0) + b"four"
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + udp


def _ip6(src: str, dst: str, next_header: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, 255,
                       socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst)) + payload


def _udp6(src: str, dst: str) -> bytes:
    return _ip6(src, dst, 17, struct.pack("!HHHH", 4444, 5003, 12, 0) + b"six!")


def _na(src: str, target: str, *, hop_by_hop: bool = False, truncated: bool = False) -> bytes:
    """A neighbour advertisement (ICMPv6 136) to ff02::1 claiming `target`."""
    icmp = struct.pack("!BBHI", 136, 0, 0, 0x20000000)
    if not truncated:
        icmp += socket.inet_pton(socket.AF_INET6, target)
    if not hop_by_hop:
        return _ip6(src, "ff02::1", 58, icmp)
    # an 8-byte hop-by-hop header (PadN) in front: the walk finds the ICMPv6 behind it
    return _ip6(src, "ff02::1", 0, bytes([58, 0, 1, 4, 0, 0, 0, 0]) + icmp)


def _ns(src: str, target: str) -> bytes:
    """A neighbour solicitation (duplicate address detection when `src` is ::)."""
    icmp = struct.pack("!BBHI", 135, 0, 0, 0) + socket.inet_pton(socket.AF_INET6, target)
    return _ip6(src, "ff02::1:ff00:1", 58, icmp)


def _arp(sender_mac: str, sender_ip: str, target_ip: str, *, htype: int = 1) -> bytes:
    return (struct.pack("!HHBBH", htype, 0x0800, 6, 4, 1) + mac_bytes(sender_mac)
            + socket.inet_aton(sender_ip) + bytes(6) + socket.inet_aton(target_ip))


@pytest.fixture
def datapath(trio: Any) -> Iterator[EbpfDatapath]:
    with ebpf_datapath(trio) as dp:
        yield dp


@pytest.fixture
def judge(trio: Any, datapath: EbpfDatapath) -> Any:
    """The guards of a and b applied: frame, port (a trio attachment) -> the verdict of
    stockade_from_pod for that frame arriving on the port."""
    rs = compile_cluster(_cluster(trio))
    assert set(rs.guards) == {trio.a.host_ifname, trio.b.host_ifname}
    datapath.apply(rs)
    return from_pod(trio, datapath)


def test_ipv4_only_from_the_ports_own_address_and_mac(trio, datapath, judge) -> None:
    a, b, c = trio.a, trio.b, trio.c
    before = datapath.stats()["spoofed_dropped"]
    assert judge(eth(b.mac, 0x0800, _udp4(b.address4, c.address4)), b) == PASSED
    assert judge(eth(b.mac, 0x0800, _udp4(a.address4, c.address4)), b) == SHOT  # a's source
    assert judge(eth(b.mac, 0x0800, _udp4("0.0.0.0", "255.255.255.255")), b) == SHOT
    assert judge(eth(a.mac, 0x0800, _udp4(b.address4, c.address4)), b) == SHOT  # a's MAC
    assert judge(eth(a.mac, 0x0800, _udp4(a.address4, c.address4)), a) == PASSED
    assert datapath.stats()["spoofed_dropped"] == before + 3


def test_an_unguarded_port_is_judged_as_before_but_for_a_guarded_pods_mac(
        trio, datapath, judge) -> None:
    a, c = trio.a, trio.c
    # c's port has no guard: a forged source, another MAC, another ethertype all pass...
    assert judge(eth(c.mac, 0x0800, _udp4(a.address4, trio.b.address4)), c) == PASSED
    assert judge(eth("02:00:00:00:00:99", 0x0800, _udp4(a.address4, trio.b.address4)),
                 c) == PASSED
    # ...but a guarded pod's MAC, which the bridge would learn at c's port
    before = datapath.stats()["spoofed_dropped"]
    assert judge(eth(a.mac, 0x0800, _udp4(a.address4, trio.b.address4)), c) == SHOT
    assert judge(eth(a.mac, 0x0806, _arp(a.mac, a.address4, trio.b.address4)), c) == SHOT
    assert datapath.stats()["spoofed_dropped"] == before + 2
    assert judge(eth(c.mac, 0x86DD, _udp6(a.address6, trio.b.address6)), c) == PASSED
    assert judge(eth(c.mac, 0x0806, _arp(c.mac, a.address4, trio.b.address4)), c) == PASSED
    assert judge(eth(c.mac, 0x88CC, bytes(46)), c) == PASSED


def _ll(att: Any) -> str:
    """The attachment's link-local address: its MAC's (EUI-64), as the kernel made it."""
    return str(link_local(att.mac))


def test_ipv6_from_its_own_address_and_nd_from_link_local_or_unspecified(trio, judge) -> None:
    a, b, c = trio.a, trio.b, trio.c
    assert judge(eth(b.mac, 0x86DD, _udp6(b.address6, c.address6)), b) == PASSED
    assert judge(eth(b.mac, 0x86DD, _udp6(a.address6, c.address6)), b) == SHOT
    assert judge(eth(b.mac, 0x86DD, _udp6("fd00:244::99", c.address6)), b) == SHOT
    assert judge(eth(b.mac, 0x86DD, _ns(_ll(b), b.address6)), b) == PASSED
    assert judge(eth(b.mac, 0x86DD, _ns("::", b.address6)), b) == PASSED  # DAD
    assert judge(eth(a.mac, 0x86DD, _ns(_ll(b), b.address6)), b) == SHOT  # a's MAC
    # from a link-local address not its own (its MAC's): a's, or any other
    assert judge(eth(b.mac, 0x86DD, _ns(_ll(a), b.address6)), b) == SHOT
    assert judge(eth(b.mac, 0x86DD, _ns("fe80::1234", b.address6)), b) == SHOT
    # anything else from link-local: no policy names the address, so none would judge it
    assert judge(eth(b.mac, 0x86DD, _udp6(_ll(b), "fe80::c")), b) == SHOT
    assert judge(eth(b.mac, 0x86DD, _udp6(_ll(b), "ff02::1")), b) == SHOT


def test_a_port_whose_mac_is_not_known_may_use_any_link_local_address(
        trio, datapath) -> None:
    b = trio.b
    rs = compile_cluster(_cluster(trio))
    blind = {port: replace(g, mac="") for port, g in rs.guards.items()}
    datapath.apply(replace(rs, guards=blind))
    judge = from_pod(trio, datapath)
    assert judge(eth(b.mac, 0x86DD, _ns("fe80::1234", b.address6)), b) == PASSED
    assert judge(eth(b.mac, 0x86DD, _na("fe80::1234", "fe80::1234")), b) == PASSED
    assert judge(eth(b.mac, 0x86DD, _na("fe80::1234", trio.a.address6)), b) == SHOT


def test_a_neighbour_advertisement_claims_only_the_ports_address(trio, judge) -> None:
    a, b = trio.a, trio.b
    assert judge(eth(b.mac, 0x86DD, _na(_ll(b), b.address6)), b) == PASSED
    assert judge(eth(b.mac, 0x86DD, _na(b.address6, b.address6)), b) == PASSED
    assert judge(eth(b.mac, 0x86DD, _na(_ll(b), _ll(b))), b) == PASSED
    assert judge(eth(b.mac, 0x86DD, _na(_ll(b), a.address6)), b) == SHOT
    assert judge(eth(b.mac, 0x86DD, _na(b.address6, a.address6)), b) == SHOT
    # another pod's link-local address, or any other than its own
    assert judge(eth(b.mac, 0x86DD, _na(_ll(b), _ll(a))), b) == SHOT
    assert judge(eth(b.mac, 0x86DD, _na(_ll(b), "fe80::b")), b) == SHOT
    # behind an extension header, as the program walks them
    assert judge(eth(b.mac, 0x86DD, _na(_ll(b), a.address6, hop_by_hop=True)), b) == SHOT
    assert judge(eth(b.mac, 0x86DD, _na(_ll(b), b.address6, hop_by_hop=True)), b) == PASSED
    # a target that is not there cannot be checked
    assert judge(eth(b.mac, 0x86DD, _na(_ll(b), "", truncated=True)), b) == SHOT
    # more extension headers than the walk follows: whatever is behind them, not let out
    deep = b"".join(bytes([0, 0, 1, 4, 0, 0, 0, 0]) for _ in range(6)) + bytes(
        [58, 0, 1, 4, 0, 0, 0, 0]) + struct.pack("!BBHI", 136, 0, 0, 0) + socket.inet_pton(
        socket.AF_INET6, a.address6)
    assert judge(eth(b.mac, 0x86DD, _ip6(_ll(b), "ff02::1", 0, deep)), b) == SHOT
    # a duplicate address probe (from ::) only for its own address, global or link-local;
    # a solicitation from an address of its own asks, and may ask for any
    assert judge(eth(b.mac, 0x86DD, _ns("::", b.address6)), b) == PASSED
    assert judge(eth(b.mac, 0x86DD, _ns("::", _ll(b))), b) == PASSED
    assert judge(eth(b.mac, 0x86DD, _ns("::", _ll(a))), b) == SHOT
    assert judge(eth(b.mac, 0x86DD, _ns("::", a.address6)), b) == SHOT
    assert judge(eth(b.mac, 0x86DD, _ns(b.address6, a.address6)), b) == PASSED


def test_arp_claims_only_the_ports_ipv4_address_at_its_mac(trio, judge) -> None:
    a, b, c = trio.a, trio.b, trio.c
    assert judge(eth(b.mac, 0x0806, _arp(b.mac, b.address4, c.address4)), b) == PASSED
    assert judge(eth(b.mac, 0x0806, _arp(b.mac, "0.0.0.0", b.address4)), b) == PASSED  # probe
    assert judge(eth(b.mac, 0x0806, _arp(b.mac, a.address4, c.address4)), b) == SHOT
    assert judge(eth(b.mac, 0x0806, _arp(a.mac, b.address4, c.address4)), b) == SHOT
    assert judge(eth(b.mac, 0x0806, _arp(b.mac, b.address4, c.address4)[:20]), b) == SHOT
    assert judge(eth(b.mac, 0x0806, _arp(b.mac, b.address4, c.address4, htype=6)), b) == SHOT


def test_tags_and_other_ethertypes_do_not_leave_a_guarded_port(trio, judge) -> None:
    b, c = trio.b, trio.c
    inner = struct.pack("!HH", 7, 0x0800) + _udp4(b.address4, c.address4)
    assert judge(eth(b.mac, 0x8100, inner), b) == SHOT
    assert judge(eth(b.mac, 0x88A8, inner), b) == SHOT
    assert judge(eth(b.mac, 0x88CC, bytes(46)), b) == SHOT  # LLDP
    assert judge(eth(b.mac, 0x8035, bytes(46)), b) == SHOT  # RARP


# A UDP datagram in a frame tagged VLAN 7, from the pod's own addresses: on a veth the
# receiving kernel moves the tag into the skb before tc (skb->vlan_present).
TAGGED = """
import socket, struct, sys
ifname, smac, src, dst, dmac = sys.argv[1:6]
mac = lambda text: bytes.fromhex(text.replace(":", ""))
udp = struct.pack("!HHHH", 4444, 5003, 12, 0) + b"tag!"
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                 socket.inet_aton(src), socket.inet_aton(dst)) + udp
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
raw.bind((ifname, 0))
for kind in (0x8100, 0x0800):
    tag = struct.pack("!HH", 0x8100, 7) if kind == 0x8100 else b""
    raw.send(mac(dmac) + mac(smac) + tag + struct.pack("!H", 0x0800) + ip)
"""


def test_a_tagged_frame_through_the_veth_is_dropped(trio, datapath, judge) -> None:
    b, c = trio.b, trio.c
    before = datapath.stats()["spoofed_dropped"]
    subprocess.run(["ip", "netns", "exec", b.netns, sys.executable, "-c", TAGGED, b.ifname,
                    b.mac, b.address4, c.address4, c.mac], check=True, timeout=30)
    # the tagged one: dropped; the same datagram untagged: not
    assert datapath.stats()["spoofed_dropped"] == before + 1


def test_a_forged_syn_leaves_no_connection_to_reply_on(trio, datapath) -> None:
    """a admits nothing. b forges a SYN from a to itself, which b's ingress would allow:
    tracked, its reversed tuple would carry b's packets to a as replies."""
    datapath.apply(compile_cluster(_cluster(trio, A_ISOLATED)))
    a, b = trio.a, trio.b
    prog = datapath._progs["in"]

    def verdict(frame: bytes, index: int) -> int:
        with entered(trio.host_netns):
            return libbpf.test_run(prog, frame, 1, ifindex=index)[0]

    syn, ack = 0x02, 0x10
    forged = eth(b.mac, 0x0800, tcp4(a.address4, b.address4, 80, 40000, syn))
    reply = eth(b.mac, 0x0800, tcp4(b.address4, a.address4, 40000, 80, ack))
    assert verdict(forged, _ifindex(trio, b)) == SHOT
    assert verdict(reply, _ifindex(trio, b)) == SHOT  # nothing tracked: mid-stream
    # the control: unguarded (judged where nothing binds the port), the forgery works
    # (from a MAC no pod has: a guarded pod's is refused on an unguarded port)
    stranger = "02:00:00:00:00:99"
    assert verdict(eth(stranger, 0x0800, tcp4(a.address4, b.address4, 80, 40000, syn)),
                   1) == PASSED
    assert verdict(eth(stranger, 0x0800, tcp4(b.address4, a.address4, 40000, 80, ack)),
                   1) == PASSED
    datapath.flush_connections()


# ---- the guard map: written, read back, repaired ----------------------------------------


def _guard_map(datapath: EbpfDatapath) -> dict[int, bytes]:
    raw = libbpf.dump(datapath._maps["guard"], bpfc.GUARD_KEY.size, bpfc.GUARD_VALUE.size)
    return {bpfc.GUARD_KEY.unpack(k)[0]: v for k, v in raw.items()}


def test_guards_read_back_and_a_new_process_adopts_them(trio, datapath) -> None:
    rs = compile_cluster(_cluster(trio))
    datapath.apply(rs)
    assert set(_guard_map(datapath)) == {_ifindex(trio, trio.a), _ifindex(trio, trio.b)}
    assert datapath.read().guards == rs.guards
    assert rs.guards[trio.b.host_ifname] == Guard(
        tuple(sorted((trio.b.address4, trio.b.address6))), trio.b.mac)
    again = EbpfDatapath(netns=trio.host_netns)
    assert again.diff(rs).empty
    assert again.apply(rs).empty
    assert again.last_timing["entries"] == 0
    assert f"guard {trio.a.host_ifname}: " in again.show()
    again.close()
    # unguarding a port deletes its entry
    fewer = compile_cluster(_cluster(trio, guarded="a"))
    delta = datapath.apply(fewer)
    assert delta.del_guards == (trio.b.host_ifname,)
    assert set(_guard_map(datapath)) == {_ifindex(trio, trio.a)}
    assert EbpfDatapath(netns=trio.host_netns).read().guards == fewer.guards


def test_a_tampered_guard_is_repaired_by_a_verifying_apply(trio, datapath) -> None:
    rs = compile_cluster(_cluster(trio))
    datapath.apply(rs)
    a, b, c = trio.a, trio.b, trio.c
    fd = datapath._maps["guard"]
    key_b = bpfc.GUARD_KEY.pack(_ifindex(trio, b))
    # b's guard rebound to a's addresses, a's removed, c given one
    libbpf.update(fd, key_b, bpfc.encode_guard("x", Guard(
        tuple(sorted((a.address4, a.address6))), b.mac)))
    libbpf.delete(fd, bpfc.GUARD_KEY.pack(_ifindex(trio, a)))
    libbpf.update(fd, bpfc.GUARD_KEY.pack(_ifindex(trio, c)), bpfc.encode_guard("x", Guard(())))
    prog = datapath._progs["in"]
    forged = eth(b.mac, 0x0800, _udp4(a.address4, c.address4))
    with entered(trio.host_netns):
        assert libbpf.test_run(prog, forged, 1, ifindex=_ifindex(trio, b))[0] == PASSED
    datapath.apply(rs, verify=True)
    assert datapath.last_drift is not None
    assert any(d.startswith("guard: 1 missing, 1 changed, 1 foreign")
               for d in datapath.last_drift_details), datapath.last_drift_details
    assert datapath.read().guards == rs.guards
    assert _guard_map(datapath) == {
        _ifindex(trio, a): bpfc.encode_guard(a.host_ifname, rs.guards[a.host_ifname]),
        _ifindex(trio, b): bpfc.encode_guard(b.host_ifname, rs.guards[b.host_ifname])}
    with entered(trio.host_netns):
        assert libbpf.test_run(prog, forged, 1, ifindex=_ifindex(trio, b))[0] == SHOT
    datapath.apply(rs, verify=True)
    assert datapath.last_drift is None


def test_a_guard_waits_for_its_port_and_goes_with_it(trio, datapath, spec_for) -> None:
    """A guard naming a port that does not exist yet is not written (and so does not read
    back, without being drift); the first apply that finds the port writes it. A port
    that goes leaves a stale entry, which the next apply deletes."""
    late = Endpoint("x", "d", Labels({"pod": "d"}), ("10.244.0.40", "fd00:244::28"),
                    port=f"{trio.plumber.naming.prefix}-late", mac="02:00:00:00:00:28")
    cluster = _cluster(trio)
    rs = compile_cluster(replace(cluster, endpoints=(*cluster.endpoints, late)))
    assert late.port in rs.guards
    datapath.apply(rs)
    assert late.port not in datapath.read().guards
    assert len(_guard_map(datapath)) == 2
    delta = datapath.apply(rs, verify=True)
    assert datapath.last_drift is None  # not written, so not missed
    assert [p for p, _ in delta.set_guards] == [late.port]  # the kernel lacks it: retried
    # the port comes (the plumber names host sides itself: a real endpoint's, renamed)
    d = trio.plumber.ensure_endpoint(spec_for("x/d", 40))
    with entered(trio.host_netns):
        subprocess.run(["ip", "link", "set", d.host_ifname, "down"], check=True)
        subprocess.run(["ip", "link", "set", d.host_ifname, "name", late.port], check=True)
        subprocess.run(["ip", "link", "set", late.port, "up"], check=True)
        index = socket.if_nametoindex(late.port)
    datapath.apply(rs)
    assert index in _guard_map(datapath)
    assert datapath.read().guards == rs.guards
    assert EbpfDatapath(netns=trio.host_netns).apply(rs, verify=True).empty
    # and goes: its entry is stale (read back without it), then deleted
    with entered(trio.host_netns):
        subprocess.run(["ip", "link", "del", late.port], check=True)
    assert late.port not in datapath.read().guards
    datapath.apply(rs, verify=True)
    assert datapath.last_drift is None
    assert index not in _guard_map(datapath)


def test_two_addresses_of_a_family_on_one_port_are_refused(trio, datapath) -> None:
    rs = compile_cluster(_cluster(trio))
    datapath.apply(rs)
    port = trio.b.host_ifname
    two = replace(rs, guards={**rs.guards, port: Guard(
        tuple(sorted((trio.b.address4, "10.244.0.99"))), trio.b.mac)})
    with pytest.raises(DataplaneError, match=port):
        datapath.apply(two)
    assert datapath.read().guards == rs.guards  # nothing was changed


def test_remove_takes_the_guard_map_with_it(trio) -> None:
    dp = EbpfDatapath(netns=trio.host_netns)
    dp.check()
    try:
        dp.apply(compile_cluster(_cluster(trio)))
        assert (dp.dir / "guard").exists()
    finally:
        dp.remove()
    assert not dp.dir.exists()
    again = EbpfDatapath(netns=trio.host_netns)
    try:
        again.check()
        assert _guard_map(again) == {}  # a new map, not the removed one's entries
    finally:
        again.remove()


def test_ip_broadcast_and_multicast_leave_only_as_nd_or_mld(trio, judge) -> None:
    """No pod's ingress policy judges a datagram to every pod at once: from a guarded port
    none leaves, but neighbour discovery and MLD (which go to multicast addresses)."""
    b = trio.b
    everyone = "ff:ff:ff:ff:ff:ff"
    assert judge(eth(b.mac, 0x0800, _udp4(b.address4, "10.244.255.255"), everyone), b) \
        == SHOT
    assert judge(eth(b.mac, 0x0800, _udp4(b.address4, "224.0.0.1"), "01:00:5e:00:00:01"),
                 b) == SHOT
    assert judge(eth(b.mac, 0x86DD, _udp6(b.address6, "ff02::1"), "33:33:00:00:00:01"),
                 b) == SHOT
    ns = eth(b.mac, 0x86DD, _ns(b.address6, b.address6), "33:33:ff:00:00:01")
    assert judge(ns, b) == PASSED  # from its own address to a solicited-node group


def test_into_a_guarded_port_only_what_is_for_its_own_address(trio, datapath) -> None:
    """stockade_to_pod: a frame to one host entering a guarded port is for the pod's own
    address. One to its MAC with a broadcast, multicast or link-local destination would
    be taken by the pod as its own, and no policy judges those: dropped. Neighbour
    discovery goes to any; a frame to every host is the sender guard's business; an
    unguarded port is judged as before."""
    a, b, c = trio.a, trio.b, trio.c
    datapath.apply(compile_cluster(_cluster(trio)))
    prog = datapath._progs["out"]

    def into(frame: bytes, att: Any) -> int:
        index = _ifindex(trio, att)
        with entered(trio.host_netns):
            return libbpf.test_run(prog, frame, 1, ifindex=index)[0]

    before = datapath.stats()["spoofed_dropped"]
    assert into(eth(b.mac, 0x0800, _udp4(b.address4, a.address4), a.mac), a) == PASSED
    assert into(eth(b.mac, 0x86DD, _udp6(b.address6, a.address6), a.mac), a) == PASSED
    for dst in ("10.244.255.255", "255.255.255.255", "224.0.0.1", c.address4):
        assert into(eth(b.mac, 0x0800, _udp4(b.address4, dst), a.mac), a) == SHOT, dst
    for dst in ("ff02::1", "fe80::1", c.address6):
        assert into(eth(b.mac, 0x86DD, _udp6(b.address6, dst), a.mac), a) == SHOT, dst
    assert datapath.stats()["spoofed_dropped"] == before + 7
    # neighbour discovery to a link-local or multicast address; ARP; to every host
    assert into(eth(b.mac, 0x86DD, _ns("fe80::2", "fe80::1"), a.mac), a) == PASSED
    assert into(eth(b.mac, 0x0806, _arp(b.mac, b.address4, a.address4), a.mac), a) == PASSED
    assert into(eth(b.mac, 0x0800, _udp4(b.address4, "10.244.255.255"),
                     "ff:ff:ff:ff:ff:ff"), a) == PASSED
    # c's port is unguarded
    assert into(eth(b.mac, 0x0800, _udp4(b.address4, "224.0.0.1"), c.mac), c) == PASSED


def test_a_program_left_on_an_unpinned_guard_map_is_replaced(trio, datapath) -> None:
    """The guard map's pin lost while only a is guarded: a new process guarding b too
    writes a new pinned map, and the program (the same build, left on the old map,
    which holds no guard for b) is replaced by one on the pinned maps: b's forgery is
    dropped, and a later process adopts the pins as they are."""
    a, b, c = trio.a, trio.b, trio.c
    datapath.apply(compile_cluster(_cluster(trio, guarded="a")))
    (datapath.dir / "guard").unlink()
    datapath.close()
    again = EbpfDatapath(netns=trio.host_netns)
    rs = compile_cluster(_cluster(trio))
    again.apply(rs, verify=True)
    forged = eth(b.mac, 0x0800, _udp4(a.address4, c.address4))
    with entered(trio.host_netns):
        assert libbpf.test_run(again._progs["in"], forged, 1,
                               ifindex=_ifindex(trio, b))[0] == SHOT
    pinned = {libbpf.obj_id(fd) for fd in again._maps.values()}
    assert all(libbpf.prog_map_ids(fd) <= pinned for fd in again._progs.values())
    again.close()
    last = EbpfDatapath(netns=trio.host_netns)
    assert last.apply(rs, verify=True).empty and last.last_drift is None
    last.close()


def test_pins_lost_or_replaced_under_a_running_process_are_pinned_again(
        trio, datapath, monkeypatch) -> None:
    """The guard map's and a program's pins removed while the datapath's process holds
    them: the link poll's check sees it, the next apply pins the process's own objects
    again (said as drift), and a new process adopts them without loading anything. A
    pin replaced by another map is found by a verifying apply."""
    rs = compile_cluster(_cluster(trio))
    datapath.apply(rs)
    for name in ("guard", "prog_from_pod"):
        (datapath.dir / name).unlink()
    assert not datapath.skeleton_intact()
    datapath.apply(rs)
    assert sorted(datapath.last_drift_details) == [
        "pin lost: guard (pinned again)", "pin lost: prog_from_pod (pinned again)"]
    assert datapath.skeleton_intact()
    fd = libbpf.obj_get(str(datapath.dir / "guard"))
    try:
        assert libbpf.obj_id(fd) == libbpf.obj_id(datapath._maps["guard"])
    finally:
        os.close(fd)
    # another map pinned in the guard map's place: a verifying apply puts it right
    (datapath.dir / "guard").unlink()
    libbpf.obj_pin(datapath._maps["mac_port"], str(datapath.dir / "guard"))
    datapath.apply(rs)
    assert datapath.last_drift is None  # only its existence is checked on each apply
    datapath.apply(rs, verify=True)
    assert "pin lost: guard (pinned again)" in datapath.last_drift_details
    monkeypatch.setattr(libbpf, "load_object", lambda *a: pytest.fail("loaded again"))
    again = EbpfDatapath(netns=trio.host_netns)
    assert again.apply(rs, verify=True).empty and again.last_drift is None
    again.close()
