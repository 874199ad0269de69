"""Reconciliation: make the kernel enforce the agent's state, level-triggered.

Every accepted change is folded into the incremental compiler and marks the
state dirty with its store revision; the bounded-frequency runner then applies
the whole desired ruleset as one delta (bursts coalesce into one transaction).
The periodic run reads the kernel back instead of trusting the last apply: it
is how a restart adopts what is there and how drift is found and repaired.
Callers that must not return before enforcement wait for their revision.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from stockade.agent.records import (
    Change,
    DeleteClusterPolicy,
    DeleteEndpoint,
    DeleteNamespace,
    DeletePolicy,
    PutClusterPolicy,
    PutEndpoint,
    PutNamespace,
    PutPolicy,
)
from stockade.compile.incremental import IncrementalCompiler
from stockade.compile.ir import Ruleset
from stockade.compile.plan import Plan
from stockade.datapath.base import Datapath, KernelSnapshot
from stockade.errors import StockadeError
from stockade.model.cluster import Cluster

log = logging.getLogger("stockade.reconcile")


@dataclass(frozen=True)
class ApplyReport:
    revision: int
    at: float  # wall clock
    duration: float
    summary: dict[str, int]
    verified: bool
    error: str = ""


@dataclass
class Hooks:
    """What the agent wants to hear about; every hook is optional."""

    applied: Callable[[ApplyReport, Ruleset], None] | None = None
    drift: Callable[[Plan], None] | None = None
    enforced: Callable[[float], None] | None = None  # seconds from change to enforcement
    revoked: Callable[[Ruleset], None] | None = None  # access may have been taken away
    # (an apply whose delta narrows, or a repair; not one that only allows more)


class Reconciler:
    # Beyond this many changes at once, compiling the whole state anew is faster.
    BULK = 500
    # Reads of the kernel that see drift before the verifying run repairs it.
    QUIET_READS = 3

    def __init__(self, compiler: IncrementalCompiler, datapath: Datapath, revision: int,
                 hooks: Hooks | None = None,
                 cluster_of: Callable[[], Cluster] | None = None) -> None:
        self.compiler = compiler
        self.cluster_of = cluster_of
        self.datapath = datapath
        self.hooks = hooks or Hooks()
        self._lock = threading.Lock()  # compiler and desired revision
        self._apply_lock = threading.Lock()  # one kernel transaction at a time
        self._cond = threading.Condition()
        self.desired_revision = revision
        self.applied_revision = -1
        self.last: ApplyReport | None = None
        self.drift_repairs = 0
        self.failures = 0  # failed runs in all
        self.consecutive_failures = 0  # since the last success; drives the backoff
        self._accepted: list[tuple[int, float]] = []  # (revision, monotonic time accepted)
        self._changes = 0  # calls of `changed`: tells a rebuild whether it is current
        self._kick: Callable[[], None] = lambda: None
        self.verifications = 0  # periodic checks that found the kernel as applied
        # wall clock of the last check that found the kernel as applied (a quiet one, or
        # a verifying run, which repairs what differs)
        self.last_verified: float | None = None

    def attach(self, kick: Callable[[], None]) -> None:
        """`kick` asks the runner for a run soon."""
        self._kick = kick

    # ---- changes in ------------------------------------------------------------------------

    def changed(self, revision: int, changes: Sequence[Change], *,
                rebuild: bool = False) -> None:
        """Fold accepted changes into the compiler; `rebuild`: compile the whole state
        anew instead (what the changes imply is more than the changes themselves)."""
        with self._lock:
            self._changes += 1
            if (rebuild or len(changes) > self.BULK) and self.cluster_of is not None:
                self.compiler = IncrementalCompiler.of(self.cluster_of())
            else:
                for c in changes:
                    feed(self.compiler, c)
            self.desired_revision = max(self.desired_revision, revision)
            self._accepted.append((revision, time.monotonic()))
        self._kick()

    # ---- the run --------------------------------------------------------------------------

    def run(self, periodic: bool) -> bool:
        """One reconciliation; a periodic one reads the kernel back (adopt, repair drift).

        The read-back is slow at scale, so it happens before taking the apply
        lock: changes keep reaching the kernel meanwhile. If one did, the
        snapshot is stale and the apply reads the kernel again under the lock.
        """
        snapshot: bool | KernelSnapshot = False
        if periodic:
            with self._lock:
                known = self.compiler.chains()
            try:
                snapshot = self.datapath.snapshot(known)
            except Exception:  # read again under the lock; apply reports what fails
                snapshot = True
        with self._apply_lock:
            started = time.monotonic()
            if self.consecutive_failures >= 2:
                self._rebuild()
            with self._lock:
                revision = self.desired_revision
                try:
                    desired = self.compiler.ruleset()
                except Exception as exc:  # a compiler bug must not stop reconciliation
                    log.exception("compiling the ruleset failed")
                    self._failed(revision, started, periodic, f"compile: {exc}", Ruleset())
                    return False
            try:
                delta = self.datapath.apply(desired, verify=snapshot)
            except Exception as exc:  # the reconciler must outlive any failure
                if not isinstance(exc, StockadeError):
                    log.exception("apply raised unexpectedly")
                self._failed(revision, started, periodic,
                             f"{type(exc).__name__}: {exc}" if not isinstance(
                                 exc, StockadeError) else str(exc), desired)
                return False
            self.consecutive_failures = 0
            finished = time.monotonic()
            if periodic:  # read back and, if it differed, repaired: as applied now
                self.last_verified = time.time()
            summary = {k: v for k, v in delta.summary().items() if v}
            report = ApplyReport(revision, time.time(), finished - started, summary, periodic)
            self.last = report
            drift = self.datapath.last_drift
            if periodic and drift is not None:
                # The kernel differed from what the last apply left: someone changed it.
                self.drift_repairs += 1
                details = list(getattr(self.datapath, "last_drift_details", []) or [])
                what = "; ".join((details or drift.describe())[:10]) or "base chain or maps"
                log.warning("drift repaired: %s", what)
                if self.hooks.drift:
                    self.hooks.drift(drift)
            if self.hooks.applied:
                self.hooks.applied(report, desired)
            # Drift may have let connections in (an inserted accept, a dormant table)
            # that conntrack now passes as established: cut them like revoked ones.
            # A delta that only allows more revokes nothing (see Plan.narrows).
            if (delta.narrows or drift is not None) and self.hooks.revoked:
                self.hooks.revoked(desired)
            with self._cond:
                self.applied_revision = max(self.applied_revision, revision)
                done = [t for r, t in self._accepted if r <= revision]
                self._accepted = [(r, t) for r, t in self._accepted if r > revision]
                self._cond.notify_all()
            if self.hooks.enforced:
                for t in done:
                    self.hooks.enforced(finished - t)
        return True

    def verify_quietly(self) -> bool | None:
        """The periodic check of the kernel, without holding up changes.

        On a datapath that can check its kernel objects while transactions go on
        (`verify_quietly` of nft and eBPF): True when the kernel holds what was
        applied, False when a verifying run must repair it (it reads again, under the
        apply lock). None: this datapath cannot; the verifying run is the check.
        A datapath whose read cannot meet a transaction halfway says so with its
        own `QUIET_READS` of 1.
        """
        quiet = getattr(self.datapath, "verify_quietly", None)
        if quiet is None:
            return None
        started = time.monotonic()
        clean = False
        # An object changed twice during a read may be read in between and look like
        # drift: read again (a few seconds) before holding up changes to repair.
        for _ in range(getattr(self.datapath, "QUIET_READS", self.QUIET_READS)):
            try:
                clean = bool(quiet())
            except Exception:  # the verifying run reads again, and reports what fails
                log.exception("reading the kernel back failed")
                return False
            if clean:
                break
        if clean:
            self.verifications += 1
            self.last_verified = time.time()
            log.debug("verified", extra={"fields": {
                "ms": round((time.monotonic() - started) * 1000, 1)}})
        return clean

    def _rebuild(self) -> None:
        """The same failure twice: do not trust the incremental state, compile anew.

        The cluster is read without holding `_lock` (its source takes the service's
        lock, which callers of `changed` hold before ours); the result is installed
        only if no change came in meanwhile, else the next retry tries again.
        """
        if self.cluster_of is None:
            return
        seen = self._changes
        try:
            fresh = IncrementalCompiler.of(self.cluster_of())
        except Exception:  # reported by the apply that follows, with the old compiler
            log.exception("recompiling the state failed")
            return
        with self._lock:
            if self._changes == seen:
                self.compiler = fresh

    def _failed(self, revision: int, started: float, periodic: bool, error: str,
                desired: Ruleset) -> None:
        self.failures += 1
        self.consecutive_failures += 1
        log.error("apply failed; the previous ruleset stays in force; retrying in %.2fs: %s",
                  self.backoff(), error)
        report = ApplyReport(revision, time.time(), time.monotonic() - started, {},
                             periodic, error)
        with self._cond:
            self.last = report
            self._cond.notify_all()  # waiters for this revision learn of the failure
        if self.hooks.applied:
            try:
                self.hooks.applied(report, desired)
            except Exception:  # a hook must not hide the failure it reports
                log.exception("apply hook failed")

    def backoff(self) -> float:
        """Seconds before the next attempt after failures: 0.1 s doubling, at most 30 s."""
        if not self.consecutive_failures:
            return 0.0
        return float(min(30.0, 0.1 * 2 ** min(self.consecutive_failures - 1, 10)))

    def desired(self) -> Ruleset:
        """The ruleset of the state as the compiler holds it now."""
        with self._lock:
            return self.compiler.ruleset()

    def chain_uses(self) -> dict[str, tuple[str, int, list[tuple[str, ...]]]]:
        with self._lock:
            return self.compiler.chain_uses()

    def wait_for(self, revision: int, timeout: float) -> bool | str:
        """Block until the kernel enforces `revision` (or a later one): True.

        An attempt to enforce it that failed returns its error at once (the
        reconciler goes on retrying); False when the time is up.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.applied_revision < revision:
                last = self.last
                if last is not None and last.error and last.revision >= revision:
                    return last.error
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    @property
    def healthy(self) -> bool:
        """The last attempt succeeded: the kernel holds what the agent meant."""
        return self.applied_revision >= 0 and (self.last is None or not self.last.error)

    @property
    def in_sync(self) -> bool:
        return self.applied_revision >= self.desired_revision and (
            self.last is None or not self.last.error)


def feed(compiler: IncrementalCompiler, change: Change) -> None:
    if isinstance(change, PutNamespace):
        compiler.upsert_namespace(change.namespace)
    elif isinstance(change, DeleteNamespace):
        compiler.delete_namespace(change.name)
    elif isinstance(change, PutEndpoint):
        compiler.upsert_endpoint(change.record.endpoint)
    elif isinstance(change, DeleteEndpoint):
        compiler.delete_endpoint(change.key)
    elif isinstance(change, PutPolicy):
        compiler.upsert_policy(change.record.policy)
    elif isinstance(change, DeletePolicy):
        compiler.delete_policy(change.key)
    elif isinstance(change, PutClusterPolicy):
        compiler.upsert_cluster_policy(change.record.policy)
    elif isinstance(change, DeleteClusterPolicy):
        compiler.delete_cluster_policy(change.name)
