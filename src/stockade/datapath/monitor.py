"""Notice changes to stockade's table made by anyone else, as they happen.

nf_tables announces every committed transaction on the NFNLGRP_NFTABLES
netlink group: one message per object changed, then NEWGEN with the pid of the
process that committed it. A transaction by another process that touched our
table is drift; the agent then re-reads the kernel and repairs it at once,
instead of waiting for the periodic resync.

What the batch did is passed on too (`TableEvent`): when it deleted the table,
the kernel holds nothing of it, and the datapath can restore the last ruleset
whole without reading the kernel back first (`NftDatapath.foreign_change`).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from stockade.datapath.nfnetlink import (
    NFNL_SUBSYS_NFTABLES,
    NFPROTO_BRIDGE,
    NFPROTO_INET,
    NFT_MSG_NEWSETELEM,
)
from stockade.net.namespace import entered
from stockade.netlink import (
    NETLINK_ADD_MEMBERSHIP,
    NETLINK_NETFILTER,
    NLMSG_HEADER,
    SOL_NETLINK,
    attr_map,
    find_attr,
    u32,
)

log = logging.getLogger("stockade.monitor")

NFNLGRP_NFTABLES = 7
NFT_MSG_NEWTABLE = 0
NFT_MSG_DELTABLE = 2
NFT_MSG_NEWGEN = 15
NFTA_GEN_PROC_PID = 2
# Every nf_tables object message carries its table's name as attribute 1.
TABLE_ATTR = 1


def _attrs(data: bytes, offset: int, end: int) -> dict[int, bytes]:
    return attr_map(data, offset, end, strict=False)


@dataclass(frozen=True)
class TableEvent:
    """One committed batch that touched the table: who committed it and what it did."""

    pid: int
    # The batch deleted the table and did not create it again.
    deleted: bool = False
    # nf_tables message types the batch sent about the table (NEWRULE, DELSET, ...).
    messages: frozenset[int] = field(default_factory=frozenset)
    # Events were lost (the socket overflowed): anything may have happened.
    lost: bool = False


@dataclass
class _Batch:
    messages: list[int] = field(default_factory=list)


def parse_batches(data: bytes, table: str,
                  pending: _Batch | None) -> tuple[_Batch | None, list[TableEvent]]:
    """Walk one datagram: the batches that touched our table, as events.

    `pending` carries a batch over from the previous datagram (a batch may span
    several); it is returned for the next call.
    """
    events: list[TableEvent] = []
    offset = 0
    name = table.encode()
    while offset + 20 <= len(data):
        length, kind, _flags, _seq, _pid = NLMSG_HEADER.unpack_from(data, offset)
        if length < 20:
            break
        family = data[offset + 16]
        subsys, msg = kind >> 8, kind & 0xFF
        if subsys == NFNL_SUBSYS_NFTABLES and msg != NFT_MSG_NEWGEN:
            # The common case, fast: our own transactions announce thousands of
            # objects, and this thread competes with the one writing them.
            if family == NFPROTO_BRIDGE and _table_of(data, offset, length) == name:
                # The guard table of the same name: a change to it is drift too, but its
                # deletion is not the policy table's.
                pending = pending or _Batch()
                pending.messages.append(NFT_MSG_NEWSETELEM)
            elif family == NFPROTO_INET and _table_of(data, offset, length) == name:
                pending = pending or _Batch()
                if msg == NFT_MSG_DELTABLE:
                    # The last deletion counts: a NEWTABLE after it re-creates the table.
                    pending.messages = [m for m in pending.messages if m != NFT_MSG_NEWTABLE]
                pending.messages.append(msg)
        elif subsys == NFNL_SUBSYS_NFTABLES:
            attrs = _attrs(data, offset + 20, offset + length)
            if msg == NFT_MSG_NEWGEN:
                if pending is not None and NFTA_GEN_PROC_PID in attrs:
                    pid = u32(attrs[NFTA_GEN_PROC_PID], big=True)
                    msgs = pending.messages
                    # (a NEWTABLE before the last DELTABLE was dropped from the list)
                    deleted = NFT_MSG_DELTABLE in msgs and NFT_MSG_NEWTABLE not in msgs
                    events.append(TableEvent(pid, deleted, frozenset(msgs)))
                pending = None
        offset += (length + 3) & ~3
    return pending, events


def _table_of(data: bytes, offset: int, length: int) -> bytes:
    """The table a message is about: its attribute 1, found without parsing the rest."""
    found = find_attr(data, TABLE_ATTR, offset + 20, offset + length)
    return b"" if found is None else found.rstrip(b"\0")


def parse_events(data: bytes, table: str, touched: bool) -> tuple[bool, list[int]]:
    """Walk one datagram: whether our table was touched, and the pids of finished batches.

    `touched` carries over from the previous datagram (a batch may span several).
    Returns the new `touched` and, per NEWGEN, the pid that committed, only for
    batches that touched the table (`parse_batches`, without what the batches did).
    """
    pending, events = parse_batches(data, table, _Batch() if touched else None)
    return pending is not None, [e.pid for e in events]


def is_ours(pid: int) -> bool:
    """Whether a committing task is a thread of this process.

    The kernel reports the id of the task that committed, which for a thread
    is its thread id, not the process id.
    """
    return pid == os.getpid() or os.path.exists(f"/proc/self/task/{pid}")


class TableMonitor:
    """Calls `on_foreign_change()` when another process commits a change to our table.

    `on_event`, if given, hears first what the batch did (the datapath's
    `foreign_change`), so that the repair `on_foreign_change` asks for can be
    the quickest one that is safe.
    """

    def __init__(self, table: str, on_foreign_change: Callable[[], None],
                 netns: str | None = None,
                 on_event: Callable[[TableEvent], None] | None = None) -> None:
        self.table = table
        self.on_foreign_change = on_foreign_change
        self.on_event = on_event
        with entered(netns):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((0, 0))
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="nft-monitor", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        pending: _Batch | None = None
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.5)
            if not ready:
                continue
            try:
                data = self.sock.recv(1 << 20)
            except OSError as exc:
                # ENOBUFS: events were lost; the listener decides whether to look (an
                # owned table, which no one else can change, waits for the periodic check).
                log.warning("nftables events lost (%s); the table is checked unless owned",
                            exc)
                pending = None
                if self.on_event is not None:
                    self.on_event(TableEvent(0, lost=True))
                self.on_foreign_change()
                continue
            pending, events = parse_batches(data, self.table, pending)
            foreign = [e for e in events if not is_ours(e.pid)]
            if not foreign:
                continue
            if self.on_event is not None:
                for event in foreign:
                    self.on_event(event)
            self.on_foreign_change()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sock.close()
