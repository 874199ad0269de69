"""What hangs off reconciliation: the denied-flow log and cutting revoked connections.

Both need the current cluster to name endpoints and policies. Building an
evaluator over a large cluster is not free, so it is built lazily: once per
change, and only when a packet is logged or conntrack holds candidates. The
revoker's evaluator holds only the endpoints at the candidates' addresses
(`cluster_near`): a verdict reads the flow's two endpoints, the policies and
the namespaces, nothing else, so it is the whole cluster's verdict at the cost
of the connections there are, not of the cluster's size.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stockade.agent.flowlog import (
    DeniedFlow,
    EventFlowReader,
    FlowLogReader,
    PacketSource,
    describer,
)
from stockade.agent.metrics import AgentMetrics
from stockade.agent.revoke import CANDIDATES, FINISHED, connections_to_cut
from stockade.compile.ir import Ruleset
from stockade.datapath.conntrack import Arrivals, Conntrack
from stockade.datapath.nflog import LoggedPacket
from stockade.engine.evaluate import Evaluator
from stockade.errors import StockadeError
from stockade.model.cluster import Cluster
from stockade.model.connection import ConnEntry

log = logging.getLogger("stockade.visibility")


class Visibility:
    def __init__(self, cluster_of: Callable[[], Cluster], metrics: AgentMetrics,
                 netns: str | None, log_group: int | None, state_dir: str, *,
                 events: Callable[[], PacketSource] | None = None,
                 revoke: bool = True,
                 cluster_near: Callable[[set[str]], Cluster | None] | None = None) -> None:
        """`cluster_near(addresses)`: the cluster with only the endpoints holding those
        addresses (None when none does); without it the revoker takes the whole one."""
        self.cluster_of = cluster_of
        self.cluster_near = cluster_near
        self.metrics = metrics
        self.netns = netns
        self._lock = threading.Lock()
        self._ruleset = Ruleset()
        self._describe: Callable[[LoggedPacket], dict[str, Any]] | None = None
        self._revoke = threading.Event()
        self._failed = False  # the last revocation pass failed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ct: Conntrack | None = None  # the revoker's socket, kept between passes
        self._ct_lock = threading.Lock()
        # New connections since the last dump (None: unknown, dump every pass), and
        # the candidates that dump listed; a pass with no arrival judges those again.
        self._arrivals: Arrivals | None = None
        self._known: list[ConnEntry] | None = None
        self._full = False  # the next pass lists the table whatever arrived
        self.reader: FlowLogReader | None = None
        self.revoke = revoke
        if log_group is not None and events is not None:
            # The eBPF datapath: its ring buffer, read in a thread, recorded the same way.
            self.reader = EventFlowReader(events, describe=self.describe,
                                          path=str(Path(state_dir) / "denied-flows.jsonl"),
                                          on_record=self._counted)
        elif log_group is not None:
            self.reader = FlowLogReader(log_group, netns, describe=self.describe,
                                        path=str(Path(state_dir) / "denied-flows.jsonl"),
                                        on_record=self._counted)
        self.cut_total = 0

    def start(self) -> None:
        if self.reader is not None:
            self.reader.start()
        if self.revoke:
            self._thread = threading.Thread(target=self._revoker, name="revoke",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._revoke.set()
        if self._thread is not None:
            self._thread.join()
        with self._ct_lock:
            self._drop_conntrack()
        if self.reader is not None:
            self.reader.stop()

    def refresh(self, ruleset: Ruleset) -> None:
        """A new ruleset is in force that takes nothing away: refresh names only (and
        retry a revocation that failed)."""
        with self._lock:
            self._ruleset = ruleset
            self._describe = None
        if self._failed:
            self._revoke.set()

    def applied(self, ruleset: Ruleset) -> None:
        """A new ruleset is in force: refresh names, and look for revoked connections."""
        self.refresh(ruleset)
        self._revoke.set()

    def revoke_soon(self) -> None:
        """Look for connections to cut (the periodic check's safety net): with a dump,
        whatever the new-connection events said."""
        self._full = True
        self._revoke.set()

    # ---- the denied-flow log ----------------------------------------------------------

    def describe(self, packet: LoggedPacket) -> dict[str, Any]:
        with self._lock:
            if self._describe is None:
                self._describe = describer(Evaluator(self.cluster_of()), self._ruleset)
            fn = self._describe
        return fn(packet)

    def _counted(self, flow: DeniedFlow) -> None:
        self.metrics.flows_denied_packets.inc()

    def flows(self, since: int, limit: int, tail: bool) -> dict[str, Any]:
        if self.reader is None:
            return {"items": [], "next": 0, "enabled": False}
        if tail:
            items, nxt = self.reader.since(0, 1 << 30)
            items = items[-limit:] if limit > 0 else []
        else:
            items, nxt = self.reader.since(since, limit)
        return {"items": [f.to_dict() for f in items], "next": nxt, "enabled": True}

    # ---- cutting what is no longer allowed ------------------------------------------------

    # Between the starts of two passes, at least: listing conntrack walks the whole
    # host's table in the kernel (11-13 ms at 262,144 buckets, however few entries
    # the namespace holds; an empty one is skipped by its count), so under a stream
    # of changes one pass covers many of them.
    MIN_GAP = 0.05

    def _revoker(self) -> None:
        last = float("-inf")
        while not self._stop.is_set():
            self._revoke.wait()
            if self._stop.wait(max(0.0, last + self.MIN_GAP - time.monotonic())):
                return
            self._revoke.clear()
            last = time.monotonic()
            try:
                self.revoke_now()
                self._failed = False
            except StockadeError as exc:
                self._failed = True  # tried again at the next apply
                log.warning("could not check connections against the new policy: %s", exc)

    def revoke_now(self) -> int:
        """Delete conntrack entries of connections the current policy denies."""
        with self._ct_lock:
            if self._ct is None:
                self._arrivals = _arrivals(self.netns)  # before the first dump
                self._known = None
                self._ct = Conntrack(self.netns)
            try:
                cut, deleted = self._cut(self._ct)
            except BaseException:
                # A request left half answered must not meet the next pass's replies.
                self._drop_conntrack()
                raise
        if deleted:
            self.cut_total += deleted
            self.metrics.conntrack_flows_cut.inc(deleted)
            log.info("cut connections no longer allowed", extra={"fields": {
                "count": deleted, "first": f"{cut[0].src} -> {cut[0].dst}:{cut[0].dport}"}})
        return deleted

    def _drop_conntrack(self) -> None:
        # The socket is kept open between passes because closing any ctnetlink socket
        # makes nf_tables take the namespace's commit lock and wait out the previous
        # transaction's grace period (nft_rcv_nl_event): a pass per change closed one
        # every 50 ms, and the agent's own next commit waited 10-40 ms behind it.
        if self._ct is not None:
            self._ct.close()
            self._ct = None
        if self._arrivals is not None:
            self._arrivals.close()
            self._arrivals = None
        self._known = None

    def _cut(self, ct: Conntrack) -> tuple[list[ConnEntry], int]:
        """One pass on `ct`: the entries to cut, and how many the kernel removed."""
        # A dump costs the walk of the host's whole table (12-13 ms without preemption
        # here: what else wanted that CPU waits, an fsync's completion too); the count,
        # the namespace's own counter. Only a 0 skips it: None (no answer) lists.
        # With no new connection since the last dump, its candidates are all there
        # can be (less what ended): they are judged again without walking the table.
        arrived = self._arrivals is None or self._arrivals.seen()  # drained first
        full, self._full = self._full, False
        if ct.count() == 0:
            self._known = []
            return [], 0
        if arrived or full or self._known is None:
            # Only what the revocation could cut: a ported protocol, not finished.
            self._known = [e for e in ct.entries()
                           if e.protocol in CANDIDATES and e.state not in FINISHED]
        entries = self._known
        if not entries:
            return [], 0
        if self.cluster_near is None:
            cluster: Cluster | None = self.cluster_of()
        else:
            cluster = self.cluster_near({a for e in entries
                                         for a in (e.src, e.dst, e.reply_src) if a})
        if cluster is None:
            return [], 0  # no endpoint at either end of any: no policy governs them
        cut = connections_to_cut(entries, Evaluator(cluster))
        return cut, ct.delete(cut) if cut else 0


def _arrivals(netns: str | None) -> Arrivals | None:
    """A listener for new connections in `netns`; None (every pass dumps) if it cannot."""
    try:
        return Arrivals(netns)
    except (OSError, StockadeError) as exc:
        log.warning("cannot follow new connections (%s); every revocation lists the "
                    "conntrack table", exc)
        return None
