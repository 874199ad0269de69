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
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from stockade.errors import DataplaneError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14
NFPROTO_INET = 1
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_CREATE = 0x400
NLMSG_ERROR = 0x2
NLA_F_NESTED = 0x8000

NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_DATA = 2
NFTA_DATA_VALUE = 1
NFTA_DATA_VERDICT = 2
NFTA_VERDICT_CODE = 1
NFTA_VERDICT_CHAIN = 2
NFT_JUMP = -3

_PROTO = {"tcp": 6, "udp": 17, "sctp": 132}


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _nested(kind: int, parts: Iterable[bytes]) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(parts))


def _string(kind: int, text: str) -> bytes:
    return _attr(kind, text.encode() + b"\0")


def encode_key(element: str | tuple[str, str, int]) -> bytes:
    """An element's key as the kernel stores it: each field in 32-bit registers."""
    if isinstance(element, str):
        return ipaddress.ip_address(element).packed
    addr, proto, port = element
    return (ipaddress.ip_address(addr).packed + struct.pack("=B3x", _PROTO[proto])
            + struct.pack("!H2x", port))


@dataclass(frozen=True)
class ElementChange:
    """Add (or delete) elements of one set or map; `jumps` gives map values."""

    set_name: str
    elements: Sequence[str | tuple[str, str, int]]
    delete: bool = False
    jumps: Sequence[str] | None = None  # for verdict maps: the chain per element


def _element(key: bytes, jump: str | None) -> bytes:
    parts = [_nested(NFTA_SET_ELEM_KEY, [_attr(NFTA_DATA_VALUE, key)])]
    if jump is not None:
        verdict = _nested(NFTA_DATA_VERDICT, [
            _attr(NFTA_VERDICT_CODE, struct.pack("!i", NFT_JUMP)),
            _string(NFTA_VERDICT_CHAIN, jump),
        ])
        parts.append(_nested(NFTA_SET_ELEM_DATA, [verdict]))
    return _nested(NFTA_LIST_ELEM, parts)


class ElementWriter:
    """One netlink socket, opened in the namespace the caller is in."""

    # Keeps each message well under the socket buffer; the batch stays one transaction.
    CHUNK = 512

    def __init__(self, table: str) -> None:
        self.table = table
        self._seq = itertools.count(int.from_bytes(os.urandom(2), "big") << 8)
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((0, 0))

    def close(self) -> None:
        self.sock.close()

    def _message(self, kind: int, flags: int, family: int, res_id: int, body: bytes,
                 seq: int) -> bytes:
        header = struct.pack("=IHHII", 16 + 4 + len(body), kind, flags, seq, 0)
        return header + struct.pack("=BBH", family, 0, socket.htons(res_id)) + body

    def apply(self, changes: Sequence[ElementChange]) -> None:
        """All changes in one batch; raises DataplaneError (and nothing applies) on refusal."""
        if not changes:
            return
        msgs: list[bytes] = []
        acks: set[int] = set()
        msgs.append(self._message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0,
                                  NFNL_SUBSYS_NFTABLES, b"", next(self._seq)))
        for change in changes:
            kind = (NFNL_SUBSYS_NFTABLES << 8) | (
                NFT_MSG_DELSETELEM if change.delete else NFT_MSG_NEWSETELEM)
            flags = NLM_F_REQUEST | NLM_F_ACK | (0 if change.delete else NLM_F_CREATE)
            for start in range(0, len(change.elements), self.CHUNK):
                chunk = change.elements[start:start + self.CHUNK]
                jumps = (change.jumps[start:start + self.CHUNK]
                         if change.jumps is not None else [None] * len(chunk))
                body = (_string(NFTA_SET_ELEM_LIST_TABLE, self.table)
                        + _string(NFTA_SET_ELEM_LIST_SET, change.set_name)
                        + _nested(NFTA_SET_ELEM_LIST_ELEMENTS, [
                            _element(encode_key(e), None if change.delete else j)
                            for e, j in zip(chunk, jumps, strict=True)]))
                seq = next(self._seq)
                acks.add(seq)
                msgs.append(self._message(kind, flags, NFPROTO_INET, 0, body, seq))
        msgs.append(self._message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0,
                                  NFNL_SUBSYS_NFTABLES, b"", next(self._seq)))
        self.sock.sendall(b"".join(msgs))
        self._collect(acks)

    def _collect(self, acks: set[int]) -> None:
        errors: list[str] = []
        self.sock.settimeout(5.0)
        while acks:
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                raise DataplaneError("the kernel did not answer an element update") from None
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, offset + 16)
                    acks.discard(seq)
                    if code != 0:
                        errors.append(os.strerror(-code))
                offset += max((length + 3) & ~3, 16)
        if errors:
            raise DataplaneError("an element update was refused by the kernel; nothing was "
                                 "changed", command="nfnetlink NEWSETELEM/DELSETELEM",
                                 stderr="; ".join(sorted(set(errors))))
