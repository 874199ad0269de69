"""Denied packets from NFLOG: the group's socket and its messages (kernel adapter).

The policy chains end with `log group N prefix "stockade-deny <chain>"` (see
`compile.nft.Table`), so the kernel copies the first bytes of every denied
new connection (rate-limited) to netlink group N of the nfnetlink_log
subsystem. This module is stockade's side of that traffic:

* the NFULNL_MSG_CONFIG messages that bind a socket to a group and ask for a
  copy of the packet's headers (`bind_message`, `unbind_message`), framed by
  the shared codec (`stockade.netlink`);
* NFULNL_MSG_PACKET messages → `LoggedPacket` (addresses, protocol, ports
  parsed out of the copied IPv4/IPv6 header): pure, tested with hand-built bytes;
* `NflogSocket`: the NETLINK_NETFILTER socket, opened in a namespace, bound
  to a group.

Naming the endpoints and policies of a denied packet is the agent's
(`agent.flowlog.describe_packet`).

Public API::

    LoggedPacket(prefix, family, src, dst, protocol, sport, dport, timestamp, ...)
    parse_packet(body) -> LoggedPacket
    parse_datagram(data) -> Datagram(packets, malformed, errors)
    bind_message(group, seq, copy_range=128, qthresh=16, timeout_cs=10) -> bytes
    unbind_message(group, seq) -> bytes
    NflogSocket(netns=None, rcvbuf=1 << 21): .request(message, seq, timeout) -> errno,
        and as a socket: .recv(size) .sendall(data) .fileno() .setblocking(flag)
        .settimeout(t) .close()
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import time
from dataclasses import dataclass

from stockade.compile.nft import LOG_PREFIX
from stockade.net.namespace import entered
from stockade.netlink import (
    NETLINK_NETFILTER,
    NFGENMSG,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    MalformedMessage,
    attr,
    attr_map,
    error_code,
    iter_messages,
    nfnl_message,
)

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
        # NetworkPolicy chains (i-, e-), and the tiers' (Admin ai-, Baseline bi-, ...)
        head = self.chain[1:3] if self.chain[:1] in ("a", "b", "l") else self.chain[:2]
        return {"i-": "ingress", "e-": "egress"}.get(head, "")


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
    _family, _version, group = NFGENMSG.unpack_from(body)
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
                        group, hw_protocol, flags)


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




# ---- the socket -------------------------------------------------------------------------

RECV_SIZE = 1 << 17  # one kernel batch is at most nlbufsiz (a page or so); be generous
SO_RCVBUFFORCE = 33


class NflogSocket:
    """One NETLINK_NETFILTER socket for nfnetlink_log, bound to a namespace at creation.

    The socket stays in the namespace it was made in, whichever namespace the
    reading thread is in later.
    """

    def __init__(self, netns: str | None = None, rcvbuf: int = 1 << 21) -> None:
        with entered(netns):
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            try:  # root may exceed net.core.rmem_max, which bursts of logs need
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.bind((0, 0))
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def request(self, message: bytes, seq: int, timeout: float) -> int:
        """Send a config message and wait for its answer: the errno (0: acknowledged).

        Raises TimeoutError when the kernel does not answer within ``timeout``.
        """
        self.sock.sendall(message)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                break
            for got, code in parse_datagram(self.sock.recv(RECV_SIZE)).errors:
                if got == seq:
                    return code
        raise TimeoutError("the kernel did not answer an NFLOG configuration request")

    def sendall(self, message: bytes) -> None:
        self.sock.sendall(message)

    def recv(self, size: int = RECV_SIZE) -> bytes:
        return self.sock.recv(size)

    def fileno(self) -> int:
        return self.sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def close(self) -> None:
        self.sock.close()
