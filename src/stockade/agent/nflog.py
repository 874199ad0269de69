"""Denied packets from NFLOG, decoded, and described in policy terms (pure).

The policy chains end with `log group N prefix "stockade-deny <chain>"` (see
`compile.nft.Table`), so the kernel copies the first bytes of every denied
new connection (rate-limited) to netlink group N of the nfnetlink_log
subsystem. This module holds everything about that traffic that needs no
socket, so it is tested with hand-built bytes:

* the netlink framing shared by nfnetlink subsystems (messages, attributes);
* the NFULNL_MSG_CONFIG messages that bind a socket to a group and ask for a
  copy of the packet's headers (`bind_message`, `unbind_message`);
* NFULNL_MSG_PACKET messages → `LoggedPacket` (addresses, protocol, ports
  parsed out of the copied IPv4/IPv6 header);
* `describe_packet`: a `LoggedPacket` → the JSON record of a denied flow,
  naming endpoints and the policies that isolate the denying side.

Public API::

    LoggedPacket(prefix, family, src, dst, protocol, sport, dport, timestamp, ...)
    parse_packet(body) -> LoggedPacket
    parse_datagram(data) -> Datagram(packets, malformed, errors)
    bind_message(group, seq, copy_range=128, qthresh=16, timeout_cs=10) -> bytes
    unbind_message(group, seq) -> bytes
    describe_packet(packet, chain_policies, endpoint_at, *, isolating=None) -> dict
    chain_policies_of(ruleset) -> dict[str, tuple[str, ...]]
    describer(evaluator, ruleset=None) -> Callable[[LoggedPacket], dict]
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from stockade.compile.ir import Ruleset
from stockade.compile.nft import LOG_PREFIX
from stockade.engine.evaluate import Evaluator
from stockade.model.policy import EGRESS as MODEL_EGRESS
from stockade.model.policy import INGRESS as MODEL_INGRESS

# ---- netlink framing (shared with agent.conntrack) --------------------------------------

NETLINK_NETFILTER = 12
NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, seq, pid
NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big endian, swapped by hand)
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF


class MalformedMessage(ValueError):
    """Bytes that are not the netlink message they claim to be."""


@dataclass(frozen=True)
class NetlinkMessage:
    kind: int
    flags: int
    seq: int
    pid: int
    payload: bytes  # everything after the 16-byte header


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def nested(kind: int, *parts: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(parts))


def nfnl_message(subsys: int, msg: int, flags: int, seq: int, family: int, res_id: int,
                 attrs: bytes) -> bytes:
    """An nfnetlink message: netlink header, nfgenmsg (res_id in network order), attributes."""
    body = NFGENMSG.pack(family, 0, socket.htons(res_id)) + attrs
    return NLMSG_HEADER.pack(16 + len(body), (subsys << 8) | msg, flags, seq, 0) + body


def iter_messages(data: bytes) -> Iterator[NetlinkMessage]:
    """The messages of one datagram; a truncated tail raises MalformedMessage."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind, flags, seq, pid = NLMSG_HEADER.unpack_from(data, offset)
        if length < 16 or offset + length > len(data):
            raise MalformedMessage(f"netlink message of length {length} at offset {offset}")
        yield NetlinkMessage(kind, flags, seq, pid, data[offset + 16:offset + length])
        offset += (length + 3) & ~3
    if offset < len(data) and data[offset:].strip(b"\0"):
        raise MalformedMessage(f"{len(data) - offset} stray bytes after the last message")


def iter_attrs(data: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(type without the nested/byte-order flags, payload) of each attribute."""
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4 or offset + length > len(data):
            raise MalformedMessage(f"attribute {kind & NLA_TYPE_MASK} of length {length}")
        yield kind & NLA_TYPE_MASK, data[offset + 4:offset + length]
        offset += (length + 3) & ~3


def attr_map(data: bytes, offset: int = 0) -> dict[int, bytes]:
    return dict(iter_attrs(data, offset))


def error_code(msg: NetlinkMessage) -> int:
    """The errno of an NLMSG_ERROR message, positive; 0 for an acknowledgement."""
    if len(msg.payload) < 4:
        raise MalformedMessage("short netlink error message")
    (code,) = struct.unpack_from("=i", msg.payload)
    return -int(code)


# ---- nfnetlink_log ------------------------------------------------------------------------

NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1

NFULA_PACKET_HDR = 1
NFULA_MARK = 2
NFULA_TIMESTAMP = 3
NFULA_IFINDEX_INDEV = 4
NFULA_IFINDEX_OUTDEV = 5
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10

NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_NLBUFSIZ = 3
NFULA_CFG_TIMEOUT = 4
NFULA_CFG_QTHRESH = 5
NFULA_CFG_FLAGS = 6

NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_COPY_PACKET = 2

PACKET_KIND = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET

PROTOCOL_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 33: "DCCP", 58: "ICMPv6", 132: "SCTP",
                  136: "UDPLite"}
# Protocols whose header starts with source and destination port.
_PORTED = frozenset({6, 17, 33, 132, 136})
# IPv6 extension headers skipped to reach the transport header.
_V6_HOP, _V6_ROUTING, _V6_FRAGMENT, _V6_AH, _V6_DSTOPTS = 0, 43, 44, 51, 60
_V6_EXTENSIONS = frozenset({_V6_HOP, _V6_ROUTING, _V6_FRAGMENT, _V6_AH, _V6_DSTOPTS})
TCP_SYN = 0x02
TCP_ACK = 0x10


def bind_message(group: int, seq: int, *, copy_range: int = 128, qthresh: int = 16,
                 timeout_cs: int = 10) -> bytes:
    """Bind the sending socket to a log group, with a copy of the first `copy_range` bytes.

    128 bytes hold the IPv4 or IPv6 header, a few extension headers and the
    ports, which is all a record needs; copying less keeps bursts within the
    socket buffer. The kernel delivers a batch once `qthresh` packets are
    queued or `timeout_cs` hundredths of a second have passed (its default,
    100 packets or one second, makes a log feel stuck).
    """
    attrs = (attr(NFULA_CFG_CMD, struct.pack("B", NFULNL_CFG_CMD_BIND))
             + attr(NFULA_CFG_MODE, struct.pack("!IBx", copy_range, NFULNL_COPY_PACKET))
             + attr(NFULA_CFG_QTHRESH, struct.pack("!I", qthresh))
             + attr(NFULA_CFG_TIMEOUT, struct.pack("!I", timeout_cs)))
    return nfnl_message(NFNL_SUBSYS_ULOG, NFULNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq,
                        socket.AF_UNSPEC, group, attrs)


def unbind_message(group: int, seq: int) -> bytes:
    attrs = attr(NFULA_CFG_CMD, struct.pack("B", NFULNL_CFG_CMD_UNBIND))
    return nfnl_message(NFNL_SUBSYS_ULOG, NFULNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq,
                        socket.AF_UNSPEC, group, attrs)


@dataclass(frozen=True)
class LoggedPacket:
    """One logged packet: who talked to whom, how, and which log rule saw it."""

    prefix: str
    family: int  # 4 or 6
    src: str
    dst: str
    protocol: str  # "TCP", "UDP", "SCTP", "ICMP", "ICMPv6", ... or the number
    sport: int | None  # None: a protocol without ports, or a non-first fragment
    dport: int | None
    timestamp: float | None = None  # seconds since the epoch, when the kernel stamped it
    group: int = 0
    hw_protocol: int = 0  # ethertype: 0x0800, 0x86dd
    tcp_flags: int | None = None

    @property
    def chain(self) -> str:
        """The chain named in a stockade prefix ("stockade-deny i-1a2b..."), else ""."""
        head, _, chain = self.prefix.partition(" ")
        return chain.strip() if head == LOG_PREFIX else ""

    @property
    def direction(self) -> str:
        """"ingress" or "egress" from the chain's name, "" when it is not a stockade chain."""
        return {"i-": "ingress", "e-": "egress"}.get(self.chain[:2], "")


def _ports(proto: int, l4: bytes | None) -> tuple[int | None, int | None, int | None]:
    if l4 is None or proto not in _PORTED or len(l4) < 4:
        return None, None, None
    sport, dport = struct.unpack_from("!HH", l4)
    flags = l4[13] if proto == 6 and len(l4) >= 14 else None
    return sport, dport, flags


def _ipv4(data: bytes) -> tuple[str, str, int, bytes | None]:
    if len(data) < 20:
        raise MalformedMessage("IPv4 header shorter than 20 bytes")
    ihl = (data[0] & 0x0F) * 4
    if ihl < 20 or len(data) < ihl:
        raise MalformedMessage(f"IPv4 header length {ihl}")
    (frag,) = struct.unpack_from("!H", data, 6)
    src = str(ipaddress.IPv4Address(data[12:16]))
    dst = str(ipaddress.IPv4Address(data[16:20]))
    return src, dst, data[9], (data[ihl:] if frag & 0x1FFF == 0 else None)


def _ipv6(data: bytes) -> tuple[str, str, int, bytes | None]:
    """Addresses, the transport protocol and its header, past the extension headers."""
    if len(data) < 40:
        raise MalformedMessage("IPv6 header shorter than 40 bytes")
    src = str(ipaddress.IPv6Address(data[8:24]))
    dst = str(ipaddress.IPv6Address(data[24:40]))
    nh, offset = data[6], 40
    for _ in range(8):  # a bound: a packet could chain extension headers forever
        if nh not in _V6_EXTENSIONS:
            break
        if len(data) < offset + 8:
            return src, dst, nh, None  # cut off by the copy range
        if nh == _V6_FRAGMENT:
            (frag,) = struct.unpack_from("!H", data, offset + 2)
            if frag >> 3:  # a later fragment carries no transport header
                return src, dst, data[offset], None
            size = 8
        elif nh == _V6_AH:
            size = (data[offset + 1] + 2) * 4
        else:
            size = (data[offset + 1] + 1) * 8
        nh, offset = data[offset], offset + size
    if nh in _V6_EXTENSIONS:
        return src, dst, nh, None
    return src, dst, nh, data[offset:] if offset <= len(data) else None


def parse_packet(body: bytes) -> LoggedPacket:
    """An NFULNL_MSG_PACKET message (after the netlink header) → LoggedPacket.

    The address family comes from the IP header itself, not from nfgenmsg: a
    bridge-family or netdev log reports other families for the same headers.
    """
    if len(body) < 4:
        raise MalformedMessage("no nfgenmsg header")
    _family, _version, res_id = NFGENMSG.unpack_from(body)
    attrs = attr_map(body, 4)
    payload = attrs.get(NFULA_PAYLOAD)
    if not payload:
        raise MalformedMessage("no payload: the log group copies no packet bytes")
    version = payload[0] >> 4
    if version == 4:
        src, dst, proto, l4 = _ipv4(payload)
    elif version == 6:
        src, dst, proto, l4 = _ipv6(payload)
    else:
        raise MalformedMessage(f"payload is not IPv4 or IPv6 (version {version})")
    sport, dport, flags = _ports(proto, l4)
    prefix = attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode("utf-8", "replace")
    hw = attrs.get(NFULA_PACKET_HDR, b"")
    hw_protocol = struct.unpack_from("!H", hw)[0] if len(hw) >= 2 else 0
    stamp = attrs.get(NFULA_TIMESTAMP, b"")
    timestamp = None
    if len(stamp) >= 16:
        sec, usec = struct.unpack_from("!QQ", stamp)
        timestamp = sec + usec / 1e6
    return LoggedPacket(prefix, version, src, dst, PROTOCOL_NAMES.get(proto, str(proto)),
                        sport, dport, timestamp,
                        socket.ntohs(res_id), hw_protocol, flags)


@dataclass(frozen=True)
class Datagram:
    """What one recv() brought: packets, undecodable messages, and netlink errors."""

    packets: tuple[LoggedPacket, ...] = ()
    malformed: int = 0
    errors: tuple[tuple[int, int], ...] = ()  # (seq, errno) of NLMSG_ERROR, 0 = ack


def parse_datagram(data: bytes) -> Datagram:
    """Every message of a datagram; a bad message is counted, never fatal to the rest."""
    packets: list[LoggedPacket] = []
    errors: list[tuple[int, int]] = []
    malformed = 0
    try:
        for msg in iter_messages(data):
            if msg.kind == PACKET_KIND:
                try:
                    packets.append(parse_packet(msg.payload))
                except MalformedMessage:
                    malformed += 1
            elif msg.kind == NLMSG_ERROR:
                errors.append((msg.seq, error_code(msg)))
            # NLMSG_DONE closes a batch; anything else is not for us.
    except MalformedMessage:
        malformed += 1
    return Datagram(tuple(packets), malformed, tuple(errors))


# ---- describing a denied packet ---------------------------------------------------------

Isolating = Callable[[str, str], tuple[str, ...] | None]


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    stamp = datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def describe_packet(packet: LoggedPacket, chain_policies: Mapping[str, tuple[str, ...]],
                    endpoint_at: Callable[[str], str | None], *,
                    isolating: Isolating | None = None) -> dict[str, Any]:
    """The JSON record of a denied flow.

    The direction comes from the chain (i-… ingress of the destination, e-…
    egress of the source). The policies come from `isolating(ip, direction)`
    when given and it names some (the endpoint is known and still isolated),
    else from `chain_policies[chain]`.
    The latter alone can be wrong: chains are named by their rules, so two
    policy sets with the same rules (two deny-all policies, say) share one
    chain, and its comment names only the first set.
    """
    chain = packet.chain
    direction = packet.direction
    src = endpoint_at(packet.src) or packet.src
    dst = endpoint_at(packet.dst) or packet.dst
    subject_ip, subject = (packet.dst, dst) if direction == "ingress" else (packet.src, src)
    found = isolating(subject_ip, direction) if isolating is not None and direction else None
    policies = tuple(found) if found else tuple(chain_policies.get(chain, ()))
    what = packet.protocol if packet.dport is None else f"{packet.protocol}/{packet.dport}"
    if not direction:
        reason = f"dropped by a log rule with prefix {packet.prefix!r}, not a stockade chain"
    else:
        by = ", ".join(policies) if policies else f"the policies of chain {chain}"
        peer = f"from {src}" if direction == "ingress" else f"to {dst}"
        reason = f"{subject} is isolated for {direction} by {by}; no rule allows {what} {peer}"
        if packet.tcp_flags is not None and packet.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN:
            reason += " (not a connection opening: a cut or no longer tracked connection)"
    return {
        "time": _iso(packet.timestamp),
        "src": src, "dst": dst, "srcIP": packet.src, "dstIP": packet.dst,
        "protocol": packet.protocol, "port": packet.dport,
        "direction": direction, "policies": list(policies), "reason": reason,
        "chain": chain,
    }


def chain_policies_of(ruleset: Ruleset) -> dict[str, tuple[str, ...]]:
    """chain name → the policy keys its comment lists (see describe_packet's caveat)."""
    return {name: tuple(k.strip() for k in chain.comment.split(",") if k.strip())
            for name, chain in ruleset.chains.items()}


def describer(evaluator: Evaluator,
              ruleset: Ruleset | None = None) -> Callable[[LoggedPacket], dict[str, Any]]:
    """A `describe` callback over the current cluster: endpoints and isolating policies.

    The agent builds one per cluster state and hands it to the reader; the
    ruleset's chain comments only serve packets whose endpoint is gone.
    """
    chains = chain_policies_of(ruleset) if ruleset is not None else {}
    model_dir = {"ingress": MODEL_INGRESS, "egress": MODEL_EGRESS}

    def endpoint_at(ip: str) -> str | None:
        ep = evaluator.endpoint_at(ip)
        return ep.key if ep is not None else None

    def isolating(ip: str, direction: str) -> tuple[str, ...] | None:
        ep = evaluator.endpoint_at(ip)
        if ep is None or direction not in model_dir:
            return None
        return tuple(p.key for p in evaluator.selecting(ep, model_dir[direction]))

    def describe(packet: LoggedPacket) -> dict[str, Any]:
        return describe_packet(packet, chains, endpoint_at, isolating=isolating)

    return describe
