"""NFLOG messages decoded from hand-built bytes, config messages checked byte by byte,
and denied packets described in policy terms."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest

from stockade.agent.flowlog import chain_policies_of, describe_packet, describer
from stockade.compile.lower import compile_cluster
from stockade.datapath.nflog import (
    LoggedPacket,
    bind_message,
    parse_datagram,
    parse_packet,
    unbind_message,
)
from stockade.engine.evaluate import Evaluator
from stockade.model.cluster import Cluster, Endpoint, Namespace
from stockade.model.labels import Labels
from stockade.model.policy import EGRESS, INGRESS, NetworkPolicy
from stockade.model.selector import Selector
from stockade.netlink import MalformedMessage, iter_attrs, iter_messages

# ---- building bytes the way the kernel does -------------------------------------------------


def nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def nlmsg(kind: int, body: bytes, seq: int = 0, flags: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def packet_msg(payload: bytes, prefix: str = "stockade-deny i-0123456789ab", group: int = 7,
               family: int = socket.AF_INET, hw: int = 0x0800,
               stamp: tuple[int, int] | None = None) -> bytes:
    attrs = nla(1, struct.pack("!HBx", hw, 2))  # NFULA_PACKET_HDR: ethertype, hook forward
    if stamp is not None:
        attrs += nla(3, struct.pack("!QQ", *stamp))
    attrs += nla(10, prefix.encode() + b"\0") + nla(9, payload)
    return nlmsg((4 << 8) | 0, struct.pack("=BBH", family, 0, socket.htons(group)) + attrs)


def ipv4(src: str, dst: str, proto: int, l4: bytes, *, options: int = 0, frag: int = 0) -> bytes:
    ihl = 5 + options
    total = ihl * 4 + len(l4)
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 1, frag, 64, proto, 0,
                       ipaddress.IPv4Address(src).packed,
                       ipaddress.IPv4Address(dst).packed) + b"\x01" * (options * 4) + l4


def ipv6(src: str, dst: str, nh: int, rest: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(rest), nh, 64,
                       ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed) + rest


def ext(next_header: int, units: int) -> bytes:
    """A hop-by-hop / routing / destination options header of (units + 1) * 8 bytes."""
    return bytes([next_header, units]) + b"\0" * ((units + 1) * 8 - 2)


def tcp(sport: int, dport: int, flags: int = 0x02) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)


def udp(sport: int, dport: int) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8, 0)


# ---- parsing ---------------------------------------------------------------------------------


def test_ipv4_tcp_packet_with_everything() -> None:
    msg = packet_msg(ipv4("10.244.0.12", "10.244.0.10", 6, tcp(40000, 81)),
                     stamp=(1_700_000_000, 250_000))
    (packet,) = parse_datagram(msg).packets
    assert packet == LoggedPacket("stockade-deny i-0123456789ab", 4, "10.244.0.12",
                                  "10.244.0.10", "TCP", 40000, 81, 1_700_000_000.25, 7,
                                  0x0800, 0x02)
    assert packet.chain == "i-0123456789ab" and packet.direction == "ingress"


def test_ipv4_options_sctp_and_icmp() -> None:
    sctp = struct.pack("!HHII", 5000, 80, 0, 0)
    (p,) = parse_datagram(packet_msg(ipv4("10.0.0.1", "10.0.0.2", 132, sctp,
                                          options=2))).packets
    assert (p.protocol, p.sport, p.dport, p.tcp_flags) == ("SCTP", 5000, 80, None)
    (p,) = parse_datagram(packet_msg(ipv4("10.0.0.1", "10.0.0.2", 1, b"\x08\0\0\0"))).packets
    assert (p.protocol, p.sport, p.dport) == ("ICMP", None, None)
    (p,) = parse_datagram(packet_msg(ipv4("10.0.0.1", "10.0.0.2", 47, b"\0" * 8))).packets
    assert (p.protocol, p.sport, p.dport) == ("47", None, None)


def test_ipv4_later_fragment_has_no_ports() -> None:
    (p,) = parse_datagram(packet_msg(ipv4("10.0.0.1", "10.0.0.2", 17, udp(1, 2),
                                          frag=185))).packets
    assert (p.protocol, p.sport, p.dport) == ("UDP", None, None)
    (p,) = parse_datagram(packet_msg(ipv4("10.0.0.1", "10.0.0.2", 17, udp(1, 2),
                                          frag=0x2000))).packets  # MF set, offset 0: first
    assert (p.sport, p.dport) == (1, 2)


def test_ipv6_extension_headers_are_skipped() -> None:
    # hop-by-hop (8 bytes) -> destination options (16 bytes) -> AH (24 bytes) -> UDP
    ah = bytes([17, 4]) + b"\0" * 22
    rest = ext(60, 0) + ext(51, 1) + ah + udp(5353, 53)
    (p,) = parse_datagram(packet_msg(ipv6("fd00:244::b", "fd00:244::a", 0, rest),
                                     family=socket.AF_INET6, hw=0x86DD)).packets
    assert (p.family, p.src, p.dst, p.protocol, p.sport, p.dport) == (
        6, "fd00:244::b", "fd00:244::a", "UDP", 5353, 53)


def test_ipv6_fragments() -> None:
    first = struct.pack("!BBHI", 6, 0, 1, 9) + tcp(40000, 80)  # offset 0, more fragments
    (p,) = parse_datagram(packet_msg(ipv6("::1", "::2", 44, first))).packets
    assert (p.protocol, p.sport, p.dport, p.tcp_flags) == ("TCP", 40000, 80, 0x02)
    later = struct.pack("!BBHI", 6, 0, 100 << 3, 9) + b"\0" * 20
    (p,) = parse_datagram(packet_msg(ipv6("::1", "::2", 44, later))).packets
    assert (p.protocol, p.sport, p.dport) == ("TCP", None, None)


def test_ipv6_cut_by_the_copy_range_has_no_ports() -> None:
    rest = ext(0, 0) + ext(6, 3)[:10]  # the second extension header is cut short
    (p,) = parse_datagram(packet_msg(ipv6("::1", "::2", 0, rest))).packets
    assert (p.sport, p.dport) == (None, None)
    (p,) = parse_datagram(packet_msg(ipv6("::1", "::2", 58, b"\x80\0\0\0"))).packets
    assert (p.protocol, p.sport) == ("ICMPv6", None)


@pytest.mark.parametrize("payload", [b"", b"\x45\0\0", b"\x50" + b"\0" * 39,
                                     b"\x4f" + b"\0" * 19, b"\x60" + b"\0" * 20])
def test_malformed_payloads(payload: bytes) -> None:
    with pytest.raises(MalformedMessage):
        parse_packet(packet_msg(payload)[16:])


def test_a_batch_with_a_bad_message_keeps_the_others() -> None:
    good = packet_msg(ipv4("10.0.0.1", "10.0.0.2", 6, tcp(1, 80)))
    bad = packet_msg(b"\x45\0")
    done = nlmsg(3, struct.pack("=i", 0), flags=0x2)
    ack = nlmsg(2, struct.pack("=i", -16) + b"\0" * 16, seq=77)  # EBUSY
    other = nlmsg(0x999, b"")
    datagram = parse_datagram(good + bad + other + good + ack + done)
    assert len(datagram.packets) == 2 and datagram.malformed == 1
    assert datagram.errors == ((77, 16),)


def test_a_truncated_datagram_counts_as_malformed() -> None:
    good = packet_msg(ipv4("10.0.0.1", "10.0.0.2", 6, tcp(1, 80)))
    datagram = parse_datagram(good + good[:30])
    assert len(datagram.packets) == 1 and datagram.malformed == 1


# ---- configuration ---------------------------------------------------------------------------


def _config(data: bytes) -> tuple[int, int, int, dict[int, bytes]]:
    (msg,) = iter_messages(data)
    _family, version, res_id = struct.unpack_from("=BBH", msg.payload)
    assert version == 0
    return msg.kind, msg.flags, socket.ntohs(res_id), dict(iter_attrs(msg.payload, 4))


def test_bind_message() -> None:
    kind, flags, group, attrs = _config(bind_message(4242, 9, copy_range=96))
    assert (kind, flags, group) == ((4 << 8) | 1, 0x1 | 0x4, 4242)
    assert attrs[1] == b"\x01"  # NFULA_CFG_CMD: bind
    assert attrs[2] == struct.pack("!IBx", 96, 2)  # NFULA_CFG_MODE: copy packet, 96 bytes
    assert attrs[5] == struct.pack("!I", 16) and attrs[4] == struct.pack("!I", 10)
    assert struct.unpack_from("=I", bind_message(4242, 9))[0] % 4 == 0


def test_unbind_message() -> None:
    kind, _flags, group, attrs = _config(unbind_message(300, 1))
    assert (kind, group, attrs) == ((4 << 8) | 1, 300, {1: b"\x02"})


# ---- describing ------------------------------------------------------------------------------

IPS = {"10.244.0.10": "x/a", "10.244.0.11": "x/b", "10.244.0.12": "x/c"}


def _packet(prefix: str, src: str = "10.244.0.12", dst: str = "10.244.0.10",
            flags: int | None = 0x02, **kw: object) -> LoggedPacket:
    fields: dict[str, object] = dict(prefix=prefix, family=4, src=src, dst=dst,
                                     protocol="TCP", sport=40000, dport=81,
                                     timestamp=1_700_000_000.5, tcp_flags=flags)
    fields.update(kw)
    return LoggedPacket(**fields)  # type: ignore[arg-type]


def test_describe_ingress() -> None:
    record = describe_packet(_packet("stockade-deny i-aaa"), {"i-aaa": ("x/p1", "x/p2")},
                             IPS.get)
    assert record == {
        "time": "2023-11-14T22:13:20.500Z", "src": "x/c", "dst": "x/a",
        "srcIP": "10.244.0.12", "dstIP": "10.244.0.10", "protocol": "TCP", "port": 81,
        "direction": "ingress", "policies": ["x/p1", "x/p2"], "chain": "i-aaa",
        "reason": "x/a is isolated for ingress by x/p1, x/p2; no rule allows TCP/81 from x/c",
    }


def test_describe_egress_to_an_outside_address() -> None:
    record = describe_packet(_packet("stockade-deny e-bbb", src="10.244.0.10", dst="8.8.8.8",
                                     protocol="UDP", dport=53, flags=None),
                             {"e-bbb": ("x/dns",)}, IPS.get)
    assert (record["src"], record["dst"], record["direction"]) == ("x/a", "8.8.8.8", "egress")
    assert record["reason"] == ("x/a is isolated for egress by x/dns; no rule allows UDP/53 "
                                "to 8.8.8.8")


def test_describe_fallbacks() -> None:
    unknown = describe_packet(_packet("stockade-deny i-gone", timestamp=None), {}, IPS.get)
    assert unknown["policies"] == [] and unknown["time"] is None
    assert "by the policies of chain i-gone" in unknown["reason"]
    icmp = describe_packet(_packet("stockade-deny i-gone", protocol="ICMP", sport=None,
                                   dport=None, flags=None), {}, IPS.get)
    assert icmp["port"] is None and "no rule allows ICMP from x/c" in icmp["reason"]
    foreign = describe_packet(_packet("somebody-else"), {}, IPS.get)
    assert foreign["direction"] == "" and "not a stockade chain" in foreign["reason"]
    midstream = describe_packet(_packet("stockade-deny i-aaa", flags=0x18), {}, IPS.get)
    assert "not a connection opening" in midstream["reason"]


def test_isolating_overrides_the_chain_comment_when_it_knows() -> None:
    chains = {"i-aaa": ("x/first",)}
    seen: list[tuple[str, str]] = []

    def isolating(ip: str, direction: str) -> tuple[str, ...] | None:
        seen.append((ip, direction))
        return {"10.244.0.10": ("x/right",), "10.244.0.11": ()}.get(ip)

    right = describe_packet(_packet("stockade-deny i-aaa"), chains, IPS.get, isolating=isolating)
    assert right["policies"] == ["x/right"] and seen == [("10.244.0.10", "ingress")]
    # known but no longer isolated (the policy went since): the chain's comment is all we have
    stale = describe_packet(_packet("stockade-deny i-aaa", dst="10.244.0.11"), chains, IPS.get,
                            isolating=isolating)
    assert stale["policies"] == ["x/first"]


def _cluster() -> Cluster:
    ns = Namespace("x", Labels({"kubernetes.io/metadata.name": "x"}))
    eps = tuple(Endpoint("x", n, Labels({"pod": n}), (ip,))
                for ip, n in (("10.244.0.10", "a"), ("10.244.0.11", "b"), ("10.244.0.12", "c")))
    pols = (NetworkPolicy("x", "deny-a", Selector(Labels({"pod": "a"}))),
            NetworkPolicy("x", "deny-b", Selector(Labels({"pod": "b"}))),
            NetworkPolicy("x", "deny-b-out", Selector(Labels({"pod": "b"})),
                          policy_types=(EGRESS,)),
            NetworkPolicy("x", "deny-b-too", Selector(Labels({"pod": "b"})),
                          policy_types=(INGRESS,)))
    return Cluster((ns,), eps, pols)


def test_describer_names_the_policies_even_when_chains_are_shared() -> None:
    cluster = _cluster()
    ruleset = compile_cluster(cluster)
    chain = ruleset.ingress["10.244.0.11"]
    assert ruleset.ingress["10.244.0.10"] == chain  # same (empty) rules: one chain for both
    assert chain_policies_of(ruleset)[chain] == ("x/deny-a",)  # the comment names the first
    describe = describer(Evaluator(cluster), ruleset)
    to_b = describe(_packet(f"stockade-deny {chain}", dst="10.244.0.11"))
    assert to_b["policies"] == ["x/deny-b", "x/deny-b-too"] and to_b["dst"] == "x/b"
    out = describe(_packet(f"stockade-deny {ruleset.egress['10.244.0.11']}", src="10.244.0.11",
                           dst="1.1.1.1"))
    assert out["policies"] == ["x/deny-b-out"] and out["direction"] == "egress"
    gone = describe(_packet(f"stockade-deny {chain}", dst="10.244.0.99"))
    assert gone["policies"] == ["x/deny-a"] and gone["dst"] == "10.244.0.99"


def test_chain_policies_of_splits_the_comment() -> None:
    ruleset = compile_cluster(_cluster())
    assert sorted(chain_policies_of(ruleset).values()) == [("x/deny-a",), ("x/deny-b-out",)]
