"""Set-element changes over raw nfnetlink: the hot path of endpoint churn.

libnftables fills a cache of the whole table before every command, including
every element of every verdict map: with 10,000 endpoints one element change
costs ~15 ms that way. A change that only adds and removes elements of existing
sets and maps needs none of that, so it goes to the kernel here as one
nf_tables batch (begin, NEWSETELEM/DELSETELEM messages, end): atomic like any
other transaction, and about a tenth of a millisecond.

Only plain sets (addresses), concatenations (address . protocol . port) and
verdict maps are written here; interval sets and anything structural go
through libnftables.

The table itself can be owned (NFT_TABLE_F_OWNER: only the netlink socket that
created or claimed it may change it) and persistent (NFT_TABLE_F_PERSIST,
Linux >= 6.9: it outlives that socket as an orphan, which a new process claims).
libnftables 1.0.6 cannot ask for persist, so the table is created, claimed and
inspected here, on libnftables' own socket (see `netfilter_sockets`), after
which libnftables and the element writer both work on it through that socket.
"""

from __future__ import annotations

import errno
import functools
import os
import select
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from stockade.errors import DataplaneError
from stockade.netlink import (
    NETLINK_NETFILTER,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NetlinkError,
    NetlinkMessage,
    attr,
    attr_map,
    attr_str,
    attr_u32,
    attr_u64,
    error_code,
    iter_messages,
    nested,
    nfnl_message,
    sequence,
    u32,
)

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_NEWTABLE = 0
NFT_MSG_GETTABLE = 1
NFT_MSG_DELTABLE = 2
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELOBJ = 20
NFT_MSG_DELFLOWTABLE = 24
NFT_MSG_DELSETELEM = 14
NFPROTO_INET = 1
NFPROTO_BRIDGE = 7
# A message of a batch is for the `inet` table unless its type carries another family
# above its low 16 bits (`in_family`): the guard's `bridge` table goes in the same
# transaction as the policy.
_FAMILY_SHIFT = 16


def in_family(kind: int, family: int) -> int:
    """A batch message's type `kind` for a table of `family`."""
    return kind | family << _FAMILY_SHIFT

NFTA_TABLE_NAME = 1
NFTA_TABLE_FLAGS = 2
NFTA_TABLE_OWNER = 7
NFT_TABLE_F_DORMANT = 0x1
NFT_TABLE_F_OWNER = 0x2
NFT_TABLE_F_PERSIST = 0x4
NFTA_OBJ_TABLE = 1
NFTA_OBJ_TYPE = 3
NFTA_OBJ_HANDLE = 6
NFTA_FLOWTABLE_TABLE = 1
NFTA_FLOWTABLE_HANDLE = 5
# Stateful object types (NFT_OBJECT_*) by the name libnftables' JSON gives them.
OBJECT_TYPES = {"counter": 1, "quota": 2, "ct helper": 3, "limit": 4, "tunnel": 6,
                "ct timeout": 7, "secmark": 8, "ct expectation": 9, "synproxy": 10}

NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_DATA = 2
NFTA_SET_ELEM_FLAGS = 3
NFTA_SET_ELEM_USERDATA = 6
NFTA_DATA_VALUE = 1
NFTA_DATA_VERDICT = 2
NFTA_VERDICT_CODE = 1
NFTA_VERDICT_CHAIN = 2
NFT_JUMP = -3

_PROTO = {"tcp": 6, "udp": 17, "sctp": 132}
SO_SNDBUFFORCE = 32
# Elements per message: each message stays well under the socket buffer; the batch
# stays one transaction.
CHUNK = 512


def encode_key(element: str | tuple[str, str, int]) -> bytes:
    """An element's key as the kernel stores it: each field in 32-bit registers."""
    if isinstance(element, str):
        return _packed(element)
    addr, proto, port = element
    return _packed(addr) + struct.pack("=B3x", _PROTO[proto]) + struct.pack("!H2x", port)


def _packed(address: str) -> bytes:
    """An address's bytes (inet_pton: a tenth of ipaddress's time, 280,000 times a load)."""
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET,
                                address)
    except OSError:
        raise ValueError(f"{address!r} is not an IP address") from None


@dataclass(frozen=True)
class ElementChange:
    """Add (or delete) elements of one set or map; `jumps` gives map values."""

    set_name: str
    elements: Sequence[str | tuple[str, str, int]]
    delete: bool = False
    jumps: Sequence[str] | None = None  # for verdict maps: the chain per element


def element_messages(table: str, set_name: str,
                     elements: Sequence[str | tuple[str, str, int]], *, delete: bool = False,
                     jumps: Sequence[str] | None = None) -> list[tuple[int, int, bytes]]:
    """NEWSETELEM (or DELSETELEM) messages for elements of one set or verdict-map entries
    (`jumps`: the chain of each), CHUNK elements a message."""
    if not elements:
        return []  # (an empty list would flush the set)
    if jumps is None or delete:
        items = [_item(e) for e in elements]
    else:
        items = [element_item(encode_key(e), jump) for e, jump in zip(elements, jumps,
                                                                      strict=True)]
    return element_list_messages(table, set_name, items, delete=delete)


_ITEM_HEAD: dict[int, bytes] = {}


@functools.lru_cache(maxsize=1 << 16)
def _item(element: str | tuple[str, str, int]) -> bytes:
    """`element_item` of an element's key; an endpoint's address is in ~10 sets (a full
    load encodes 90,000 elements of 10,000 addresses)."""
    return element_item(encode_key(element))


def element_item(key: bytes, jump: str | None = None, flags: int = 0,
                 userdata: bytes = b"") -> bytes:
    """One element of an element list: its key, a verdict-map entry's jump, flags
    (NFT_SET_ELEM_INTERVAL_END), libnftnl's user data."""
    if jump is None and not flags and not userdata and not len(key) % 4:
        # The common case, 300,000 times in a full load: the headers depend on the length.
        head = _ITEM_HEAD.get(len(key))
        if head is None:
            head = _ITEM_HEAD[len(key)] = nested(NFTA_LIST_ELEM, nested(
                NFTA_SET_ELEM_KEY, attr(NFTA_DATA_VALUE, key)))[:-len(key)]
        return head + key
    parts = [nested(NFTA_SET_ELEM_KEY, attr(NFTA_DATA_VALUE, key))]
    if flags:
        parts.append(attr_u32(NFTA_SET_ELEM_FLAGS, flags, big=True))
    if jump is not None:
        parts.append(nested(NFTA_SET_ELEM_DATA, nested(
            NFTA_DATA_VERDICT, attr(NFTA_VERDICT_CODE, struct.pack("!i", NFT_JUMP)),
            attr_str(NFTA_VERDICT_CHAIN, jump))))
    if userdata:
        parts.append(attr(NFTA_SET_ELEM_USERDATA, userdata))
    return nested(NFTA_LIST_ELEM, *parts)


def element_list_messages(table: str, set_name: str, items: Sequence[bytes], *,
                          delete: bool = False) -> list[tuple[int, int, bytes]]:
    """Elements (see `element_item`) of one set, CHUNK a message; with no items and
    `delete`, one message that flushes the set."""
    head = attr_str(NFTA_SET_ELEM_LIST_TABLE, table) + attr_str(NFTA_SET_ELEM_LIST_SET, set_name)
    kind = NFT_MSG_DELSETELEM if delete else NFT_MSG_NEWSETELEM
    flags = 0 if delete else NLM_F_CREATE
    if not items:
        return [(kind, flags, head)] if delete else []
    return [(kind, flags, head + nested(NFTA_SET_ELEM_LIST_ELEMENTS,
                                        *items[start:start + CHUNK]))
            for start in range(0, len(items), CHUNK)]


@dataclass(frozen=True)
class TableInfo:
    """A table as the kernel reports it: its flags and, if owned, the owner's port id."""

    flags: int
    owner: int | None

    @property
    def owned(self) -> bool:
        return bool(self.flags & NFT_TABLE_F_OWNER)

    @property
    def persistent(self) -> bool:
        return bool(self.flags & NFT_TABLE_F_PERSIST)


class NftablesRefused(NetlinkError, DataplaneError):
    """An nf_tables request the kernel refused: the netlink error (``errno``, ``code``)
    that is also a DataplaneError (``command``, ``stderr``), so that callers catching
    either catch it; it renders as a DataplaneError does."""

    def __init__(self, message: str, code: int, *, command: str = "",
                 stderr: str = "") -> None:
        NetlinkError.__init__(self, code, message)
        DataplaneError.__init__(self, message, command=command, stderr=stderr)

    def __str__(self) -> str:
        return BaseException.__str__(self)


def netfilter_sockets() -> set[int]:
    """This process's NETLINK_NETFILTER sockets, by file descriptor."""
    out: set[int] = set()
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            probe = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if probe.family == socket.AF_NETLINK and probe.proto == NETLINK_NETFILTER:
                out.add(fd)
        finally:
            probe.close()
    return out


class ElementWriter:
    """One netlink socket: its own, opened in the namespace the caller is in, or a shared one.

    A shared socket (libnftables' own, through a duplicated descriptor) is what
    an owned table needs: only the socket that owns it may change it. Its
    status flags (non-blocking) are libnftables' and are left alone: replies
    are awaited with select, and every reply is read before returning, so
    libnftables never finds one of ours in its way.
    """

    def __init__(self, table: str, sock: socket.socket | None = None) -> None:
        self.table = table
        self._seq = sequence()
        self.shared = sock is not None
        if sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            sock.bind((0, 0))
        self.sock = sock
        if self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < 1 << 20:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        # What one sendmsg may carry (the kernel reports twice what it allows).
        self._sndbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2

    def close(self) -> None:
        self.sock.close()

    @property
    def port(self) -> int:
        """The socket's netlink port id (0 until it first sent something)."""
        return int(self.sock.getsockname()[0])

    def _message(self, kind: int, flags: int, family: int, res_id: int, body: bytes,
                 seq: int) -> bytes:
        return nfnl_message(kind >> 8, kind & 0xFF, flags, seq, family, res_id, body)

    def _batch(self, body: Sequence[tuple[int, int, bytes]]) -> tuple[bytes, int]:
        """A batch of (message type, flags, attributes); the sequence number of its last
        message, the one that asks for an ack.

        Only the last: the kernel answers a refused message whether asked or not, and
        handles the whole batch before sendmsg returns, so once the last one's ack is
        in, every error is too. An ack for each of 17,000 messages (a full load)
        overflowed the socket's receive buffer.
        """
        msgs = [self._message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES,
                              b"", next(self._seq))]
        seq = 0
        for i, (msg, flags, attrs) in enumerate(body, 1):
            seq = next(self._seq)
            ack = NLM_F_ACK if i == len(body) else 0
            family = msg >> _FAMILY_SHIFT or NFPROTO_INET
            msgs.append(self._message((NFNL_SUBSYS_NFTABLES << 8) | msg & 0xFFFF,
                                      NLM_F_REQUEST | ack | flags, family, 0, attrs, seq))
        msgs.append(self._message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES,
                                  b"", next(self._seq)))
        return b"".join(msgs), seq

    def transact(self, body: Sequence[tuple[int, int, bytes]], what: str) -> None:
        """One transaction of table-level messages; NftablesRefused (nothing applied) if refused."""
        if not body:
            return
        data, last = self._batch(body)
        if len(data) > self._sndbuf:
            # One batch is one sendmsg, refused (EMSGSIZE) beyond the send buffer.
            self.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, len(data) + (1 << 16))
            self._sndbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2
        self.sock.sendall(data)
        errors = self._collect({last})
        if errors:
            code = next(iter(errors.values()))
            raise NftablesRefused(f"{what} was refused by the kernel: {os.strerror(code)}; "
                                  "nothing was changed", code, command="nfnetlink",
                                  stderr="; ".join(sorted({os.strerror(c)
                                                           for c in errors.values()})))

    def table_info(self, name: str | None = None,
                   family: int = NFPROTO_INET) -> TableInfo | None:
        """The table's flags and owner, or None when there is no such table."""
        seq = next(self._seq)
        self.sock.sendall(self._message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE,
                                        NLM_F_REQUEST | NLM_F_ACK, family, 0,
                                        attr_str(NFTA_TABLE_NAME, name or self.table), seq))
        info: TableInfo | None = None
        code = 0
        for kind, _seq, body in self._replies({seq}):
            if kind == NLMSG_ERROR:
                code = _errno(body)
            elif kind >> 8 == NFNL_SUBSYS_NFTABLES:
                attrs = attr_map(body, 4)
                flags = u32(attrs[NFTA_TABLE_FLAGS], big=True) if (
                    NFTA_TABLE_FLAGS in attrs) else 0
                owner = u32(attrs[NFTA_TABLE_OWNER], big=True) if (
                    NFTA_TABLE_OWNER in attrs) else None
                info = TableInfo(flags, owner)
        if code == errno.ENOENT:
            return None
        if code:
            raise NftablesRefused(f"cannot read table {name or self.table}: {os.strerror(code)}",
                               code, command="nfnetlink GETTABLE")
        return info

    def apply(self, changes: Sequence[ElementChange]) -> None:
        """All changes in one batch; raises DataplaneError (and nothing applies) on refusal."""
        body = [m for change in changes for m in element_messages(
            self.table, change.set_name, change.elements, delete=change.delete,
            jumps=change.jumps)]
        if body:
            self.transact(body, "an element update")

    def _collect(self, acks: set[int]) -> dict[int, int]:
        """Wait for the acks of `acks`; the errnos of those refused, by sequence number."""
        errors: dict[int, int] = {}
        for kind, seq, body in self._replies(acks):
            if kind == NLMSG_ERROR:
                code = _errno(body)
                if code != 0:
                    errors[seq] = code
        return errors

    def _replies(self, acks: set[int], timeout: float = 5.0) -> list[tuple[int, int, bytes]]:
        """(type, sequence, payload) of every reply until each of `acks` is answered, then the rest.

        The kernel handles a request while it is sent, so once the acks are in,
        whatever else it answered (an error on the batch itself) is queued
        already: it is read too, so that nothing is left for the next reader of
        a shared socket.
        """
        out: list[tuple[int, int, bytes]] = []
        deadline = time.monotonic() + timeout
        pending = set(acks)
        while True:
            if pending:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                    raise DataplaneError("the kernel did not answer a netlink request")
            try:
                data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if pending:
                    continue
                return out
            for msg in iter_messages(data):
                out.append((msg.kind, msg.seq, msg.payload))
                if msg.kind in (NLMSG_ERROR, NLMSG_DONE):
                    pending.discard(msg.seq)


def _errno(body: bytes) -> int:
    """The positive errno of an NLMSG_ERROR payload (0: an acknowledgement)."""
    return error_code(NetlinkMessage(NLMSG_ERROR, 0, 0, 0, body))


def new_table(name: str, flags: int, family: int = NFPROTO_INET) -> tuple[int, int, bytes]:
    """NEWTABLE: create the table, or update an existing one's flags (claim an orphan)."""
    return (in_family(NFT_MSG_NEWTABLE, family), NLM_F_CREATE,
            attr_str(NFTA_TABLE_NAME, name) + attr_u32(NFTA_TABLE_FLAGS, flags, big=True))


def del_table(name: str, family: int = NFPROTO_INET) -> tuple[int, int, bytes]:
    return (in_family(NFT_MSG_DELTABLE, family), 0, attr_str(NFTA_TABLE_NAME, name))


def del_object(table: str, kind: str, handle: int) -> tuple[int, int, bytes] | None:
    """DELOBJ or DELFLOWTABLE by handle, for an object kind as libnftables names it."""
    if kind == "flowtable":
        return (NFT_MSG_DELFLOWTABLE, 0, attr_str(NFTA_FLOWTABLE_TABLE, table)
                + attr_u64(NFTA_FLOWTABLE_HANDLE, handle))
    if kind not in OBJECT_TYPES:
        return None
    return (NFT_MSG_DELOBJ, 0, attr_str(NFTA_OBJ_TABLE, table)
            + attr_u32(NFTA_OBJ_TYPE, OBJECT_TYPES[kind], big=True)
            + attr_u64(NFTA_OBJ_HANDLE, handle))
