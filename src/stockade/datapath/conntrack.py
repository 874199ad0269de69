"""The conntrack table of a network namespace over ctnetlink: list and delete (shell).

Why by hand and not pyroute2 0.9.7's `Conntrack`: it opens its socket lazily,
on every call, in whatever namespace the calling thread is in at that moment
(an object made inside `entered(ns)` and used outside it lists the host's
table), it asks one address family per socket, and it decodes every entry
into generic objects. Here one socket is opened in the namespace at
construction and stays bound to it; a dump of both families is one request;
deletions go to the kernel in batches of messages on that socket, with one
acknowledgement each, never a process per entry.

Deleting an entry is how a revoked connection is cut: the next packet of the
connection is no longer `ct state established`, so it meets the policy chains
again, as a new connection (conntrack picks TCP up mid-stream). For the cut to
hold, the forward chain must drop new TCP conntracks that did not start with a
SYN: otherwise the *server's* next segment (a retransmission is enough) opens
a "connection" server -> client that nothing isolates, and the client's
segments become its replies (tests/integration/test_agent_conntrack.py shows
both).

Public API::

    ConnEntry (stockade.model.connection: pure, what agent.revoke decides about)
    decode_entry(body) -> ConnEntry | None          (pure; one IPCTNL_MSG_CT_NEW message)
    dump_request(seq) -> bytes, delete_request(entry, seq) -> bytes   (pure)
    stats_request(seq) -> bytes, decode_count(body) -> int            (pure)
    Conntrack(netns=None): .entries() -> list[ConnEntry], .count() -> int | None,
                           .delete(entries) -> int, .close()

Why a count: a dump walks every bucket of the kernel's one conntrack hash
table, shared by all namespaces (/proc/sys/net/netfilter/nf_conntrack_buckets,
262,144 on a large host: 11-13 ms of kernel time), even when this namespace has
no entry at all; the stats request reads the namespace's own counter.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Sequence

from stockade.errors import DataplaneError
from stockade.model.connection import ConnEntry
from stockade.net.namespace import entered
from stockade.netlink import (
    NETLINK_CAP_ACK,
    NETLINK_NETFILTER,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    SOL_NETLINK,
    MalformedMessage,
    NetlinkError,
    attr,
    attr_map,
    drained,
    nested,
    nfnl_message,
    read_acks,
    replies,
    sequence,
    u32,
)

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
IPCTNL_MSG_CT_GET_STATS = 5
CTA_STATS_GLOBAL_ENTRIES = 1

CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
CTA_PROTOINFO = 4
CTA_ID = 12
CTA_ZONE = 18
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_SCTP = 3
CTA_PROTOINFO_TCP_STATE = 1
CTA_PROTOINFO_SCTP_STATE = 1

PROTOCOLS = {1: "ICMP", 6: "TCP", 17: "UDP", 33: "DCCP", 58: "ICMPv6", 132: "SCTP",
             136: "UDPLite"}
_NUMBERS = {name: num for num, name in PROTOCOLS.items()}
_PORTED = frozenset({"TCP", "UDP", "SCTP", "DCCP", "UDPLite"})
TCP_STATES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
              "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2")
SCTP_STATES = ("NONE", "CLOSED", "COOKIE_WAIT", "COOKIE_ECHOED", "ESTABLISHED",
               "SHUTDOWN_SENT", "SHUTDOWN_RECD", "SHUTDOWN_ACK_SENT", "HEARTBEAT_SENT",
               "HEARTBEAT_ACKED")


# ---- codec (pure) -------------------------------------------------------------------------

def _tuple(raw: bytes) -> tuple[int, str, str, int, int]:
    """(protocol number, src, dst, sport, dport) of a CTA_TUPLE_* attribute."""
    attrs = attr_map(raw)
    ip = attr_map(attrs.get(CTA_TUPLE_IP, b""))
    proto = attr_map(attrs.get(CTA_TUPLE_PROTO, b""))
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    if CTA_IP_V4_SRC in ip and CTA_IP_V4_DST in ip:
        src = ipaddress.IPv4Address(ip[CTA_IP_V4_SRC][:4])
        dst = ipaddress.IPv4Address(ip[CTA_IP_V4_DST][:4])
    elif CTA_IP_V6_SRC in ip and CTA_IP_V6_DST in ip:
        src = ipaddress.IPv6Address(ip[CTA_IP_V6_SRC][:16])
        dst = ipaddress.IPv6Address(ip[CTA_IP_V6_DST][:16])
    else:
        raise MalformedMessage("conntrack tuple without addresses")
    if not proto.get(CTA_PROTO_NUM):
        raise MalformedMessage("conntrack tuple without a protocol")
    sport = dport = 0
    if CTA_PROTO_SRC_PORT in proto and CTA_PROTO_DST_PORT in proto:
        (sport,) = struct.unpack("!H", proto[CTA_PROTO_SRC_PORT][:2])
        (dport,) = struct.unpack("!H", proto[CTA_PROTO_DST_PORT][:2])
    return proto[CTA_PROTO_NUM][0], str(src), str(dst), sport, dport


def _state(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    info = attr_map(raw)
    for kind, names, key in ((CTA_PROTOINFO_TCP, TCP_STATES, CTA_PROTOINFO_TCP_STATE),
                             (CTA_PROTOINFO_SCTP, SCTP_STATES, CTA_PROTOINFO_SCTP_STATE)):
        if kind in info:
            value = attr_map(info[kind]).get(key)
            if value:
                return names[value[0]] if value[0] < len(names) else str(value[0])
    return None


def decode_entry(body: bytes) -> ConnEntry:
    """One conntrack message (nfgenmsg and attributes) → ConnEntry."""
    attrs = attr_map(body, 4)
    if CTA_TUPLE_ORIG not in attrs:
        raise MalformedMessage("conntrack entry without an original tuple")
    proto, src, dst, sport, dport = _tuple(attrs[CTA_TUPLE_ORIG])
    reply_src = reply_sport = None
    if CTA_TUPLE_REPLY in attrs:
        _, reply_src, _, reply_sport, _ = _tuple(attrs[CTA_TUPLE_REPLY])
    zone = struct.unpack("!H", attrs[CTA_ZONE][:2])[0] if CTA_ZONE in attrs else 0
    ct_id = struct.unpack("!I", attrs[CTA_ID][:4])[0] if CTA_ID in attrs else None
    return ConnEntry(PROTOCOLS.get(proto, str(proto)), src, dst, sport, dport,
                     _state(attrs.get(CTA_PROTOINFO)), zone, reply_src, reply_sport, ct_id)


def dump_request(seq: int) -> bytes:
    """Dump every entry of both families (nfgen_family AF_UNSPEC means all)."""
    return nfnl_message(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP,
                        seq, socket.AF_UNSPEC, 0, b"")


def stats_request(seq: int) -> bytes:
    """Ask for the namespace's counters (IPCTNL_MSG_CT_GET_STATS, not a dump).

    With an acknowledgement: the answer is flagged NLM_F_MULTI, yet no
    NLMSG_DONE follows it, so only the ack tells the reader it is complete.
    """
    return nfnl_message(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_GET_STATS,
                        NLM_F_REQUEST | NLM_F_ACK, seq, socket.AF_UNSPEC, 0, b"")


def decode_count(body: bytes) -> int:
    """The entry count of a stats answer (nfgenmsg and attributes)."""
    raw = attr_map(body, 4).get(CTA_STATS_GLOBAL_ENTRIES)
    if raw is None or len(raw) < 4:
        raise MalformedMessage("conntrack stats without an entry count")
    return u32(raw, big=True)


def _protocol_number(protocol: str) -> int:
    return _NUMBERS[protocol] if protocol in _NUMBERS else int(protocol)


def delete_request(entry: ConnEntry, seq: int) -> bytes:
    """Delete one entry by its original tuple (and id and zone, when known).

    Only protocols with ports: an ICMP tuple is keyed by type, code and id,
    which ConnEntry does not carry (no policy rule is about ICMP anyway).
    """
    if entry.protocol not in _PORTED:
        raise ValueError(f"cannot delete a {entry.protocol} conntrack entry by tuple")
    src, dst = ipaddress.ip_address(entry.src), ipaddress.ip_address(entry.dst)
    if src.version == 4:
        kinds, family = (CTA_IP_V4_SRC, CTA_IP_V4_DST), socket.AF_INET
    else:
        kinds, family = (CTA_IP_V6_SRC, CTA_IP_V6_DST), socket.AF_INET6
    proto = [attr(CTA_PROTO_NUM, struct.pack("B", _protocol_number(entry.protocol)))]
    if entry.protocol in _PORTED:
        proto += [attr(CTA_PROTO_SRC_PORT, struct.pack("!H", entry.sport)),
                  attr(CTA_PROTO_DST_PORT, struct.pack("!H", entry.dport))]
    attrs = nested(CTA_TUPLE_ORIG,
                   nested(CTA_TUPLE_IP, attr(kinds[0], src.packed), attr(kinds[1], dst.packed)),
                   nested(CTA_TUPLE_PROTO, *proto))
    if entry.zone:
        attrs += attr(CTA_ZONE, struct.pack("!H", entry.zone))
    if entry.id is not None:
        attrs += attr(CTA_ID, struct.pack("!I", entry.id))
    return nfnl_message(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK,
                        seq, family, 0, attrs)


# ---- the socket -------------------------------------------------------------------------

ENTRY_KIND = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
STATS_KIND = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET_STATS
RECV_SIZE = 1 << 17
TIMEOUT = 5.0


class Conntrack:
    """One ctnetlink socket in a network namespace (None: the caller's current one)."""

    # Messages per send: a delete is ~80 bytes, so a batch stays far below the
    # socket buffers, and its acknowledgements (20 bytes each with CAP_ACK) too.
    BATCH = 256

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._seq = sequence()
        with entered(netns):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            with contextlib.suppress(OSError):  # older kernels: acks carry the request
                self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            self.sock.bind((0, 0))
            self.sock.settimeout(TIMEOUT)
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Conntrack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(RECV_SIZE)
        except TimeoutError:
            raise DataplaneError("the kernel did not answer a conntrack request",
                                 command="ctnetlink") from None

    def entries(self) -> list[ConnEntry]:
        """Every tracked connection of the namespace, both address families."""
        seq = next(self._seq)
        self.sock.sendall(dump_request(seq))
        out: list[ConnEntry] = []
        try:
            for msg in replies(self._recv, seq):
                if msg.kind == ENTRY_KIND:
                    try:
                        out.append(decode_entry(msg.payload))
                    except MalformedMessage:
                        continue  # an entry of a kind we cannot name is not ours to cut
        except NetlinkError as exc:
            raise DataplaneError("the kernel refused to list conntrack entries",
                                 command="ctnetlink dump", stderr=os.strerror(exc.code)) from None
        return out

    def count(self) -> int | None:
        """How many entries the namespace holds; None when the kernel does not say.

        The kernel's per-namespace counter (nf_conntrack_count) also counts
        entries not yet confirmed or dying, so it is never below what a dump
        would list at that moment: 0 means a dump would list nothing. None
        (refused, unanswered, unreadable) leaves the caller to dump, so that
        an error never passes for an empty table.
        """
        seq = next(self._seq)
        found: int | None = None
        try:
            self.sock.sendall(stats_request(seq))
            for msg in replies(self._recv, seq):
                if msg.kind == STATS_KIND:
                    found = decode_count(msg.payload)
        except (OSError, MalformedMessage, DataplaneError):  # NetlinkError is an OSError
            return None
        return found

    def delete(self, entries: Iterable[ConnEntry]) -> int:
        """Delete entries; how many the kernel removed (gone already is not an error).

        Raises ValueError, before sending anything, for an entry of a protocol
        without ports.
        """
        todo = list(entries)
        for entry in todo:
            if entry.protocol not in _PORTED:
                raise ValueError(f"cannot delete a {entry.protocol} conntrack entry by tuple")
        removed = 0
        for start in range(0, len(todo), self.BATCH):
            removed += self._delete_batch(todo[start:start + self.BATCH])
        return removed

    def _delete_batch(self, batch: Sequence[ConnEntry]) -> int:
        pending: set[int] = set()
        messages: list[bytes] = []
        for entry in batch:
            seq = next(self._seq)
            pending.add(seq)
            messages.append(delete_request(entry, seq))
        self.sock.sendall(b"".join(messages))
        removed = 0
        errors: list[str] = []
        for code in read_acks(self._recv, pending).values():
            if code == 0:
                removed += 1
            elif code != errno.ENOENT:  # ENOENT: it ended (or was cut) meanwhile
                errors.append(os.strerror(code))
        if errors:
            raise DataplaneError(f"the kernel refused to delete {len(errors)} conntrack "
                                 "entries", command="ctnetlink delete",
                                 stderr="; ".join(sorted(set(errors))))
        return removed


# ctnetlink's multicast group of new connections (enum nfnetlink_groups).
NFNLGRP_CONNTRACK_NEW = 1


class Arrivals:
    """Whether a namespace may have tracked a new connection since the last look.

    A socket on ctnetlink's group of new-connection events, drained without
    decoding: any message, a lost one (ENOBUFS), or events switched off in the
    namespace (net.netfilter.nf_conntrack_events = 0, or switched on since the
    last look: connections made meanwhile carry no event) answers yes. Only a
    certain "no new connection" answers no, so a caller that skips a dump on it
    misses nothing: what the last dump listed is all there can be, less what
    ended since. The socket must be open before that dump.
    """

    def __init__(self, netns: str | None = None) -> None:
        with entered(netns):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            try:
                # A sysctl of the net namespace it was opened in, re-read at each look.
                self._sysctl = os.open("/proc/sys/net/netfilter/nf_conntrack_events",
                                       os.O_RDONLY | os.O_CLOEXEC)
            except BaseException:
                self.sock.close()
                raise
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self.sock.bind((0, 1 << (NFNLGRP_CONNTRACK_NEW - 1)))
            self.sock.setblocking(False)
        except BaseException:
            self.close()
            raise
        self._events = self._setting()

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            os.close(self._sysctl)

    def _setting(self) -> int:
        try:
            return int(os.pread(self._sysctl, 16, 0) or b"0")
        except (OSError, ValueError):
            return 0

    def seen(self) -> bool:
        """True unless the namespace certainly tracked no new connection since the last
        call (or since the socket opened); drains what came."""
        setting, self._events = self._events, self._setting()
        came = drained(lambda: self.sock.recv(RECV_SIZE))
        return came or not setting or not self._events
