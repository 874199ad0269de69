"""Notice changes to stockade's table made by anyone else, as they happen.

nf_tables announces every committed transaction on the NFNLGRP_NFTABLES
netlink group: one message per object changed, then NEWGEN with the pid of the
process that committed it. A transaction by another process that touched our
table is drift; the agent then re-reads the kernel and repairs it at once,
instead of waiting for the periodic resync.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable

from stockade.dataplane.nfnetlink import NETLINK_NETFILTER, NFNL_SUBSYS_NFTABLES, NFPROTO_INET
from stockade.net.namespace import entered

log = logging.getLogger("stockade.monitor")

NFNLGRP_NFTABLES = 7
NFT_MSG_NEWGEN = 15
NFTA_GEN_PROC_PID = 2
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
# Every nf_tables object message carries its table's name as attribute 1.
TABLE_ATTR = 1


def _attrs(data: bytes, offset: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while offset + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[offset + 4: offset + length]
        offset += (length + 3) & ~3
    return out


def parse_events(data: bytes, table: str, touched: bool) -> tuple[bool, list[int]]:
    """Walk one datagram: whether our table was touched, and the pids of finished batches.

    `touched` carries over from the previous datagram (a batch may span several).
    Returns the new `touched` and, per NEWGEN, the pid that committed, only for
    batches that touched the table.
    """
    pids: list[int] = []
    offset = 0
    name = table.encode()
    while offset + 20 <= len(data):
        length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, offset)
        if length < 20:
            break
        family = data[offset + 16]
        subsys, msg = kind >> 8, kind & 0xFF
        if subsys == NFNL_SUBSYS_NFTABLES:
            attrs = _attrs(data, offset + 20, offset + length)
            if msg == NFT_MSG_NEWGEN:
                if touched and NFTA_GEN_PROC_PID in attrs:
                    pids.append(struct.unpack("!I", attrs[NFTA_GEN_PROC_PID][:4])[0])
                touched = False
            elif family == NFPROTO_INET and attrs.get(TABLE_ATTR, b"").rstrip(b"\0") == name:
                touched = True
        offset += (length + 3) & ~3
    return touched, pids


def is_ours(pid: int) -> bool:
    """Whether a committing task is a thread of this process.

    The kernel reports the id of the task that committed, which for a thread
    is its thread id, not the process id.
    """
    return pid == os.getpid() or os.path.exists(f"/proc/self/task/{pid}")


class TableMonitor:
    """Calls `on_foreign_change()` when another process commits a change to our table."""

    def __init__(self, table: str, on_foreign_change: Callable[[], None],
                 netns: str | None = None) -> None:
        self.table = table
        self.on_foreign_change = on_foreign_change
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
        touched = False
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.5)
            if not ready:
                continue
            try:
                data = self.sock.recv(1 << 20)
            except OSError as exc:
                # ENOBUFS: events were lost; assume the worst and look.
                log.warning("nftables events lost (%s); checking the table", exc)
                self.on_foreign_change()
                continue
            touched, pids = parse_events(data, self.table, touched)
            if any(not is_ours(pid) for pid in pids):
                self.on_foreign_change()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sock.close()
