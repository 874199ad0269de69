"""The denied-flow log: NFLOG packets read in a thread, described, kept, counted, written.

One NFLOG socket (`datapath.nflog.NflogSocket`), opened in the namespace
whose ruleset logs (the socket stays bound to it, whichever namespace the
thread is in later), bound to the log group of `compile.nft.Table.log_group`.
A background thread turns each packet into a `DeniedFlow` through the
`describe` callback (the agent swaps it whenever the cluster changes: see
`describer`; `describe_packet` is pure and names the endpoints and the
policies that isolate the denying side), keeps the
most recent ones in a ring buffer that clients page through by sequence
number, and optionally appends them as JSON lines to a file.

The kernel drops log messages when the socket buffer is full and says so once
with ENOBUFS: the reader counts that and goes on. Nothing here can block the
datapath; at worst records are lost, and the counters say how many times.

Public API::

    describe_packet(packet, chain_policies, endpoint_at, *, isolating=None) -> dict  (pure)
    chain_policies_of(ruleset) -> dict[str, tuple[str, ...]]                          (pure)
    describer(evaluator, ruleset=None) -> Callable[[LoggedPacket], dict]
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
import json
import os
import select
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, Protocol

from stockade.compile.ir import Ruleset
from stockade.datapath.nflog import (
    RECV_SIZE,
    TCP_ACK,
    TCP_SYN,
    LoggedPacket,
    NflogSocket,
    bind_message,
    parse_datagram,
    unbind_message,
)
from stockade.engine.evaluate import Evaluator
from stockade.errors import AgentError
from stockade.model.policy import EGRESS as MODEL_EGRESS
from stockade.model.policy import INGRESS as MODEL_INGRESS
from stockade.netlink import sequence

Describe = Callable[[LoggedPacket], Mapping[str, Any]]
ACK_TIMEOUT = 2.0


# ---- describing a denied packet (pure) ---------------------------------------------

Isolating = Callable[[str, str], tuple[str, ...] | None]


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    stamp = datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


# A tier chain's first letter: its denials name ClusterNetworkPolicies, not isolation.
_TIERS = {"a": "Admin", "b": "Baseline"}


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
    tier = _TIERS.get(chain[:1], "") if chain[1:3] in ("i-", "e-") else ""
    found = isolating(subject_ip, direction) \
        if isolating is not None and direction and not tier else None
    policies = tuple(found) if found else tuple(chain_policies.get(chain, ()))
    what = packet.protocol if packet.dport is None else f"{packet.protocol}/{packet.dport}"
    if not direction:
        reason = f"dropped by a log rule with prefix {packet.prefix!r}, not a stockade chain"
    elif tier:
        by = ", ".join(policies) if policies else f"the policies of chain {chain}"
        peer = f"from {src}" if direction == "ingress" else f"to {dst}"
        reason = (f"{what} {peer} denied for the {direction} of {subject} by a Deny rule of "
                  f"the {tier} ClusterNetworkPolicies {by}")
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

# ---- the reader -------------------------------------------------------------------------


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
        self._seq = sequence()
        self._sock: NflogSocket | None = None
        self._wake: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._file: IO[str] | None = None
        self.error: str | None = None  # why the thread stopped on its own, if it did

    # ---- lifecycle ----------------------------------------------------------------------

    def _open(self) -> NflogSocket:
        """The NFLOG socket, created in the log's namespace (it stays bound there)."""
        return NflogSocket(self.netns, self.rcvbuf)

    def _request(self, sock: NflogSocket, message: bytes, seq: int) -> None:
        """Send a config message and wait for its acknowledgement."""
        try:
            code = sock.request(message, seq, ACK_TIMEOUT)
        except TimeoutError:
            raise AgentError(f"the kernel did not answer the NFLOG configuration of group "
                             f"{self.group}") from None
        if code in (errno.EBUSY, errno.EPERM):  # the kernel says EPERM for both
            raise AgentError(f"NFLOG group {self.group} is already bound by another "
                             "socket in this network namespace (or this process "
                             "lacks CAP_NET_ADMIN)")
        if code:
            raise AgentError(f"the kernel refused to configure NFLOG group "
                             f"{self.group}: {os.strerror(code)}")

    def _configure(self, sock: NflogSocket) -> None:
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
        return self.record(datagram.packets, received_at=received_at,
                           malformed=datagram.malformed)

    def record(self, packets: Sequence[LoggedPacket], *, received_at: float,
               malformed: int = 0) -> list[DeniedFlow]:
        """Record logged packets, whatever read them (NFLOG here, a ring buffer below)."""
        flows: list[DeniedFlow] = []
        ignored = failed = 0
        for packet in packets:
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
        self._count(received=len(packets), recorded=len(flows), ignored=ignored,
                    malformed=malformed, failed=failed)
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


class PacketSource(Protocol):
    """Denied packets from elsewhere than NFLOG (the eBPF datapath's `DeniedEvents`)."""

    def read(self, timeout: float = 0.0) -> list[LoggedPacket]: ...

    def close(self) -> None: ...


class EventFlowReader(FlowLogReader):
    """The same log, fed by a `PacketSource` read in a thread (the eBPF ring buffer):
    the same records, counters, file and paging as NFLOG's."""

    POLL = 0.2  # how long one read waits, so that stop() is noticed

    def __init__(self, open_source: Callable[[], PacketSource], *,
                 describe: Describe | None = None, capacity: int = 1024,
                 path: str | None = None,
                 on_record: Callable[[DeniedFlow], None] | None = None) -> None:
        super().__init__(0, None, describe=describe, capacity=capacity, path=path,
                         on_record=on_record)
        self.open_source = open_source
        self._source: PacketSource | None = None
        self._halt = threading.Event()

    def start(self) -> FlowLogReader:
        if self._thread is not None:
            return self
        source = self.open_source()
        try:
            if self.path is not None:
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        except BaseException:
            source.close()
            raise
        self._source = source
        self._halt.clear()
        self._thread = threading.Thread(target=self._run, name="flowlog-events",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._halt.set()
        thread.join()
        if self._source is not None:
            self._source.close()
            self._source = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def _run(self) -> None:
        assert self._source is not None
        while not self._halt.is_set():
            try:
                packets = self._source.read(self.POLL)
            except Exception as exc:  # said in `error`, as NFLOG's is
                self.error = f"reading the denied-connection events: {exc}"
                return
            if packets:
                self.record(packets, received_at=time.time())
