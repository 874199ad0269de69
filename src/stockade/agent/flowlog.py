"""The denied-flow log: NFLOG packets read in a thread, kept, counted, written (shell).

One NETLINK_NETFILTER socket, opened in the namespace whose ruleset logs (the
socket stays bound to it, whichever namespace the thread is in later), bound
to the log group of `compile.nft.Table.log_group`. A background thread turns
each packet into a `DeniedFlow` through the `describe` callback (the agent
swaps it whenever the cluster changes: see `agent.nflog.describer`), keeps the
most recent ones in a ring buffer that clients page through by sequence
number, and optionally appends them as JSON lines to a file.

The kernel drops log messages when the socket buffer is full and says so once
with ENOBUFS: the reader counts that and goes on. Nothing here can block the
datapath; at worst records are lost, and the counters say how many times.

Public API::

    DeniedFlow(seq, record); .to_dict()
    FlowLogStats(received, recorded, ignored, malformed, dropped, failed, write_errors)
    FlowLogReader(group, netns=None, *, describe=None, capacity=1024, path=None,
                  on_record=None, copy_range=128)
        .start() -> FlowLogReader     .stop()     context manager
        .since(seq=0, limit=100) -> (list[DeniedFlow], next_seq)
        .stats -> FlowLogStats        .describe (settable)     .error
        .handle(datagram, received_at=...) -> list[DeniedFlow]   (what the thread calls)
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import itertools
import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

from stockade.agent.nflog import (
    NETLINK_NETFILTER,
    LoggedPacket,
    bind_message,
    describe_packet,
    parse_datagram,
    unbind_message,
)
from stockade.errors import AgentError
from stockade.net.namespace import entered

Describe = Callable[[LoggedPacket], Mapping[str, Any]]
RECV_SIZE = 1 << 17  # one kernel batch is at most nlbufsiz (a page or so); be generous
ACK_TIMEOUT = 2.0


@dataclass(frozen=True)
class DeniedFlow:
    """One denied flow as recorded: its place in the log and its JSON record."""

    seq: int
    record: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, **self.record}


@dataclass(frozen=True)
class FlowLogStats:
    received: int = 0  # log messages decoded
    recorded: int = 0  # of those, stockade's: made into DeniedFlow records
    ignored: int = 0  # another prefix on the same group: not ours
    malformed: int = 0  # messages that did not decode
    dropped: int = 0  # ENOBUFS reports: the kernel lost one or more messages each time
    failed: int = 0  # describe() (then recorded with the bare packet facts) or on_record raised
    write_errors: int = 0  # the JSON lines file could not be written


def _bare(packet: LoggedPacket) -> Mapping[str, Any]:
    return describe_packet(packet, {}, lambda _ip: None)


class FlowLogReader:
    """Reads one NFLOG group in a thread; records denied flows; pages through them."""

    def __init__(self, group: int, netns: str | None = None, *,
                 describe: Describe | None = None, capacity: int = 1024,
                 path: str | None = None, on_record: Callable[[DeniedFlow], None] | None = None,
                 copy_range: int = 128, rcvbuf: int = 1 << 21) -> None:
        if not 0 <= group <= 0xFFFF:
            raise ValueError(f"log group {group} is not a 16-bit number")
        self.group = group
        self.netns = netns
        # Replaced by the agent on every cluster change; read once per packet.
        self.describe: Describe = describe or _bare
        self.path = path
        self.on_record = on_record
        self.copy_range = copy_range
        self.rcvbuf = rcvbuf
        self._ring: collections.deque[DeniedFlow] = collections.deque(maxlen=capacity)
        self._next_seq = 1
        self._stats = FlowLogStats()
        self._lock = threading.Lock()
        self._seq = itertools.count(int.from_bytes(os.urandom(2), "big") << 8)
        self._sock: socket.socket | None = None
        self._wake: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._file: IO[str] | None = None
        self.error: str | None = None  # why the thread stopped on its own, if it did

    # ---- lifecycle ----------------------------------------------------------------------

    def _open(self) -> socket.socket:
        """The netlink socket, created in the log's namespace (it stays bound there)."""
        with entered(self.netns):
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            try:  # root may exceed net.core.rmem_max, which bursts of logs need
                sock.setsockopt(socket.SOL_SOCKET, 33, self.rcvbuf)  # SO_RCVBUFFORCE
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.bind((0, 0))
        except BaseException:
            sock.close()
            raise
        return sock

    def _request(self, sock: socket.socket, message: bytes, seq: int) -> None:
        """Send a config message and wait for its acknowledgement."""
        sock.sendall(message)
        deadline = time.monotonic() + ACK_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            data = sock.recv(RECV_SIZE)
            for got, code in parse_datagram(data).errors:
                if got != seq:
                    continue
                if code in (errno.EBUSY, errno.EPERM):  # the kernel says EPERM for both
                    raise AgentError(f"NFLOG group {self.group} is already bound by another "
                                     "socket in this network namespace (or this process "
                                     "lacks CAP_NET_ADMIN)")
                if code:
                    raise AgentError(f"the kernel refused to configure NFLOG group "
                                     f"{self.group}: {os.strerror(code)}")
                return
        raise AgentError(f"the kernel did not answer the NFLOG configuration of group "
                         f"{self.group}")

    def _configure(self, sock: socket.socket) -> None:
        seq = next(self._seq)
        self._request(sock, bind_message(self.group, seq, copy_range=self.copy_range), seq)

    def start(self) -> FlowLogReader:
        """Bind the group (raising AgentError if refused) and start the reading thread."""
        if self._thread is not None:
            return self
        sock = self._open()
        try:
            self._configure(sock)
            if self.path is not None:
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        self._sock = sock
        self._wake = os.pipe()
        self._thread = threading.Thread(target=self._run, name=f"flowlog-{self.group}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread, release the group, close the file. Idempotent."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        assert self._wake is not None and self._sock is not None
        os.write(self._wake[1], b"x")
        thread.join()
        try:
            self._sock.setblocking(True)
            self._sock.settimeout(ACK_TIMEOUT)
            self._sock.sendall(unbind_message(self.group, next(self._seq)))
        except OSError:
            pass  # closing the socket releases the group anyway
        self._sock.close()
        self._sock = None
        for fd in self._wake:
            os.close(fd)
        self._wake = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> FlowLogReader:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- reading ------------------------------------------------------------------------

    def _count(self, **deltas: int) -> None:
        with self._lock:
            self._stats = dataclasses.replace(self._stats, **{
                k: getattr(self._stats, k) + v for k, v in deltas.items()})

    def _run(self) -> None:
        assert self._sock is not None and self._wake is not None
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake[0], select.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._wake[0] in events:
                return
            try:
                data = self._sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._count(dropped=1)
                    continue
                if exc.errno == errno.EINTR:
                    continue
                self.error = f"reading NFLOG group {self.group}: {exc}"
                return
            self.handle(data, received_at=time.time())

    def handle(self, data: bytes, *, received_at: float) -> list[DeniedFlow]:
        """Record the packets of one datagram (called by the thread; public for tests)."""
        datagram = parse_datagram(data)
        flows: list[DeniedFlow] = []
        ignored = failed = 0
        for packet in datagram.packets:
            if not packet.chain:
                ignored += 1
                continue
            if packet.timestamp is None:
                packet = dataclasses.replace(packet, timestamp=received_at)
            try:
                record = dict(self.describe(packet))
            except Exception:  # a resolver bug must not cost the record
                failed += 1
                record = dict(_bare(packet))
            flows.append(self._append(record))
        self._count(received=len(datagram.packets), recorded=len(flows), ignored=ignored,
                    malformed=datagram.malformed, failed=failed)
        if flows:
            self._write(flows)
        if self.on_record is not None:
            for flow in flows:
                try:
                    self.on_record(flow)
                except Exception:  # the agent's counter must not stop the log
                    self._count(failed=1)
        return flows

    def _append(self, record: Mapping[str, Any]) -> DeniedFlow:
        with self._lock:
            flow = DeniedFlow(self._next_seq, record)
            self._next_seq += 1
            self._ring.append(flow)
        return flow

    def _write(self, flows: list[DeniedFlow]) -> None:
        if self._file is None:
            return
        try:
            self._file.write("".join(json.dumps(dict(f.record), separators=(",", ":")) + "\n"
                                     for f in flows))
            self._file.flush()
        except (OSError, ValueError):
            self._count(write_errors=1)

    # ---- reading the log ----------------------------------------------------------------

    def since(self, seq: int = 0, limit: int = 100) -> tuple[list[DeniedFlow], int]:
        """Records with sequence number >= seq, oldest first, and the cursor to pass next.

        A cursor from before the ring's oldest record starts at the oldest (the
        rest is gone); a cursor beyond the newest (say, from a previous agent
        process) is brought back to the next number to come, so its holder
        sees new records rather than none.
        """
        with self._lock:
            seq = min(max(seq, 0), self._next_seq)
            items = [f for f in self._ring if f.seq >= seq][:max(limit, 0)]
            next_seq = items[-1].seq + 1 if items else seq
        return items, next_seq

    @property
    def stats(self) -> FlowLogStats:
        with self._lock:
            return self._stats
