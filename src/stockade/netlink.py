"""The one netlink codec: messages, attributes, acknowledgements (every family).

rtnetlink (links, addresses, routes: `stockade.net.rtnl`), nf_tables
(`stockade.datapath.nfnetlink`, `stockade.datapath.monitor`), ctnetlink
(`stockade.datapath.conntrack`) and nfnetlink_log (`stockade.datapath.nflog`)
all speak the same framing, so it is written once, here::

    nlmsghdr  (length, type, flags, seq, pid)   16 bytes, native order
    [nfgenmsg (family, version, res_id)]          4 bytes, nfnetlink only, res_id big endian
    attributes (length, type, payload)            each padded to 4 bytes; nested ones
                                                  carry NLA_F_NESTED and attributes

It must stay light: the CNI plugin, a process started once per ADD, imports it
through `stockade.net.rtnl`. Only the standard library's ``struct``,
``socket``, ``os``, ``errno`` and ``itertools`` are used (importing it costs ~0.3 ms).

The helpers that read from a socket take a ``recv`` callable rather than a
socket, so that each caller keeps its own way of waiting (a blocking socket,
a timeout, select on a socket shared with libnftables).

Public API::

    # building
    attr(kind, payload) -> bytes            nested(kind, *parts) -> bytes
    attr_str(kind, text)   attr_u8(kind, v)   attr_u16(kind, v, big=False)
    attr_u32(kind, v, big=False)            attr_u64(kind, v, big=True)
    message(kind, flags, seq, body, pid=0) -> bytes          (nlmsghdr + body)
    nfgenmsg(family, res_id=0, version=0) -> bytes
    nfnl_message(subsys, msg, flags, seq, family, res_id, attrs) -> bytes
    sequence() -> Iterator[int]             (sequence numbers from a random start)
    # parsing
    NetlinkMessage(kind, flags, seq, pid, payload)
    iter_messages(data) -> Iterator[NetlinkMessage]          (MalformedMessage on bad framing)
    iter_attrs(data, offset=0, end=None, *, strict=True) -> Iterator[(type, payload)]
    attr_map(data, offset=0, end=None, *, strict=True) -> dict[type, payload] (last one wins)
    find_attr(data, kind, offset=0, end=None) -> bytes | None (without parsing the rest)
    text(raw) -> str    u8(raw) / u16(raw, big=False) / u32(raw, big=False) / u64(raw, big=True)
    error_code(msg) -> int                   (positive errno of NLMSG_ERROR; 0: an ack)
    # a socket's answers
    replies(recv, seq) -> Iterator[NetlinkMessage]    (until the ack or NLMSG_DONE; errors raise)
    read_acks(recv, pending) -> dict[seq, errno]      (until every seq of `pending` is answered)
    drained(recv) -> bool            (a group's socket emptied: whether anything came or was lost)
    NetlinkError(code)  (an OSError: .errno, .code, .strerror)       MalformedMessage (a ValueError)
"""

from __future__ import annotations

import errno
import itertools
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_CAP_ACK = 10  # acknowledgements without a copy of the request

NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE = 1, 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = 0x3FFF

NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, seq, pid
NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (big endian)
NLATTR = struct.Struct("=HH")  # length, type

_U16 = {False: struct.Struct("=H"), True: struct.Struct("!H")}
_U32 = {False: struct.Struct("=I"), True: struct.Struct("!I")}
_U64 = {False: struct.Struct("=Q"), True: struct.Struct("!Q")}
_ERRNO = struct.Struct("=i")


class MalformedMessage(ValueError):
    """Bytes that are not the netlink message they claim to be."""


class NetlinkError(OSError):
    """The kernel refused a request; ``errno`` (also as ``code``, an int) says why."""

    def __init__(self, code: int, message: str | None = None) -> None:
        super().__init__(code, message if message is not None else os.strerror(code))
        self.code = code


def align(n: int) -> int:
    """``n`` rounded up to netlink's 4-byte alignment."""
    return (n + 3) & ~3


# ---- building ---------------------------------------------------------------------------


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    length = NLATTR.size + len(payload)
    return NLATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def nested(kind: int, *parts: bytes) -> bytes:
    """An attribute holding attributes (flagged NLA_F_NESTED, as nfnetlink wants)."""
    return attr(kind | NLA_F_NESTED, b"".join(parts))


def attr_str(kind: int, value: str) -> bytes:
    """A NUL-terminated string attribute."""
    return attr(kind, value.encode() + b"\0")


def attr_u8(kind: int, value: int) -> bytes:
    return attr(kind, bytes((value,)))


def attr_u16(kind: int, value: int, big: bool = False) -> bytes:
    return attr(kind, _U16[big].pack(value))


def attr_u32(kind: int, value: int, big: bool = False) -> bytes:
    """A 32-bit attribute: host order (rtnetlink) or big endian (``big``: nfnetlink)."""
    return attr(kind, _U32[big].pack(value))


def attr_u64(kind: int, value: int, big: bool = True) -> bytes:
    return attr(kind, _U64[big].pack(value))


def message(kind: int, flags: int, seq: int, body: bytes, pid: int = 0) -> bytes:
    """One netlink message: the 16-byte header, then ``body``."""
    return NLMSG_HEADER.pack(NLMSG_HEADER.size + len(body), kind, flags, seq, pid) + body


def nfgenmsg(family: int, res_id: int = 0, version: int = 0) -> bytes:
    """nfnetlink's 4-byte header; ``res_id`` (a group, a subsystem) in network order."""
    return NFGENMSG.pack(family, version, res_id)


def nfnl_message(subsys: int, msg: int, flags: int, seq: int, family: int, res_id: int,
                 attrs: bytes) -> bytes:
    """An nfnetlink message: netlink header, nfgenmsg, attributes."""
    return message((subsys << 8) | msg, flags, seq, nfgenmsg(family, res_id) + attrs)


def sequence() -> Iterator[int]:
    """Sequence numbers from a random start, so two sockets' requests are told apart."""
    return itertools.count(int.from_bytes(os.urandom(2), "big") << 8)


# ---- parsing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NetlinkMessage:
    kind: int
    flags: int
    seq: int
    pid: int
    payload: bytes  # everything after the 16-byte header


def iter_messages(data: bytes) -> Iterator[NetlinkMessage]:
    """The messages of one datagram; a truncated tail raises MalformedMessage."""
    offset = 0
    while offset + NLMSG_HEADER.size <= len(data):
        length, kind, flags, seq, pid = NLMSG_HEADER.unpack_from(data, offset)
        if length < NLMSG_HEADER.size or offset + length > len(data):
            raise MalformedMessage(f"netlink message of length {length} at offset {offset}")
        yield NetlinkMessage(kind, flags, seq, pid, data[offset + NLMSG_HEADER.size:
                                                         offset + length])
        offset += align(length)
    if offset < len(data) and data[offset:].strip(b"\0"):
        raise MalformedMessage(f"{len(data) - offset} stray bytes after the last message")


def iter_attrs(data: bytes, offset: int = 0, end: int | None = None, *,
               strict: bool = True) -> Iterator[tuple[int, bytes]]:
    """(type without the nested/byte-order flags, payload) of each attribute.

    A truncated attribute raises MalformedMessage, or with ``strict=False``
    ends the walk (what a reader of the kernel's own answers can afford);
    padding at the end is fine.
    """
    stop = len(data) if end is None else min(end, len(data))
    while offset + NLATTR.size <= stop:
        length, kind = NLATTR.unpack_from(data, offset)
        if length < NLATTR.size or offset + length > stop:
            if strict:
                raise MalformedMessage(f"attribute {kind & NLA_TYPE_MASK} of length {length}")
            return
        yield kind & NLA_TYPE_MASK, data[offset + NLATTR.size:offset + length]
        offset += align(length)


def attr_map(data: bytes, offset: int = 0, end: int | None = None, *,
             strict: bool = True) -> dict[int, bytes]:
    """Attributes by type (the last one wins; nested ones stay raw)."""
    return dict(iter_attrs(data, offset, end, strict=strict))


def find_attr(data: bytes, kind: int, offset: int = 0, end: int | None = None) -> bytes | None:
    """The payload of the first attribute of type ``kind``, found without parsing the rest.

    Lenient, for hot paths: a truncated attribute ends the search.
    """
    stop = len(data) if end is None else min(end, len(data))
    while offset + NLATTR.size <= stop:
        length, found = NLATTR.unpack_from(data, offset)
        if length < NLATTR.size:
            return None
        if found & NLA_TYPE_MASK == kind:
            return data[offset + NLATTR.size:offset + length]
        offset += align(length)
    return None


def text(raw: bytes | None) -> str:
    """A string attribute's text, up to its NUL ("" for None)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace") if raw else ""


def u8(raw: bytes) -> int:
    return raw[0]


def u16(raw: bytes, big: bool = False) -> int:
    return int(_U16[big].unpack_from(raw)[0])


def u32(raw: bytes, big: bool = False) -> int:
    return int(_U32[big].unpack_from(raw)[0])


def u64(raw: bytes, big: bool = True) -> int:
    return int(_U64[big].unpack_from(raw)[0])


def error_code(msg: NetlinkMessage) -> int:
    """The errno of an NLMSG_ERROR message, positive; 0 for an acknowledgement."""
    if len(msg.payload) < _ERRNO.size:
        raise MalformedMessage("short netlink error message")
    return -int(_ERRNO.unpack_from(msg.payload)[0])


# ---- a socket's answers -----------------------------------------------------------------


def replies(recv: Callable[[], bytes], seq: int) -> Iterator[NetlinkMessage]:
    """The messages answering ``seq``, until its ACK or NLMSG_DONE (others are skipped).

    An error answer raises NetlinkError with the kernel's errno.
    """
    while True:
        for msg in iter_messages(recv()):
            if msg.seq != seq:
                continue
            if msg.kind == NLMSG_DONE:
                return
            if msg.kind == NLMSG_ERROR:
                code = error_code(msg)
                if code:
                    raise NetlinkError(code)
                return
            yield msg


def read_acks(recv: Callable[[], bytes], pending: Iterable[int]) -> dict[int, int]:
    """Read until every sequence number of ``pending`` is answered: its errno (0: acked)."""
    waiting = set(pending)
    out: dict[int, int] = {}
    while waiting:
        for msg in iter_messages(recv()):
            if msg.kind == NLMSG_ERROR and msg.seq in waiting:
                waiting.discard(msg.seq)
                out[msg.seq] = error_code(msg)
    return out


def drained(recv: Callable[[], bytes]) -> bool:
    """Read a non-blocking socket (a multicast group's) until it holds nothing, without
    decoding: True when anything came, when the kernel dropped some (ENOBUFS: the
    socket overflowed), or when the socket failed. Only a certain "nothing" is False,
    so a caller that skips work on False misses nothing."""
    seen = False
    while True:
        try:
            if not recv():
                return True
            seen = True
        except BlockingIOError:
            return seen
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                return True
            seen = True  # events were lost: anything may have come
