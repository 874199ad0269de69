"""The live MicroService operator (``stockade operator run``): the loop around the pure core.

::

    Reflector(MicroServices) ──▶ Cache ─┐
                                         ├─▶ dirty ─▶ (coalesce) ─▶ reconcile():
    Reflector(NetworkPolicies) ─▶ Cache ─┘      read_services ─▶ plan_writes ─▶ delete / apply
                                                  ─▶ plan_status ─▶ patch_status
                                                  ─▶ plan_events ─▶ create Event

Level-triggered and coalesced: any change of either cache marks the state dirty;
the loop waits a moment for the burst to end, then recomputes ``render_all`` over
the whole graph (a policy depends on every service that depends on its owner)
and writes only what differs from the cache (reconcile.py decides, purely).
Nothing is written before both reflectors have delivered their first list: a
partial view would delete policies whose services are not listed yet.

The reflector (``kube/reflector.py``) is the one list/watch implementation of
the project, shared with the node agent: relist on 410, resume after drops,
bookmarks, a stall watchdog, backoff with jitter.

NetworkPolicies are watched without a label selector (every policy of the
scope): a user's policy holding a name the operator would write must be seen to
be left alone; a watch of the managed ones only would not show it, and would
show a managed policy whose label someone removed as deleted.

Failures: a write that fails (an API error, the API unreachable) is retried by
reconciling again after a backoff with jitter (0.5 s doubling to 30 s, reset by a
clean pass); a 409 on an apply reads the policy again and decides again (taken
by someone else: left alone). Everything is re-derived from the caches at each
pass, so a retry never repeats a stale decision. A resync reconciles every
``resync`` seconds even without a change (a no-op when nothing drifted).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from stockade.kube.client import (
    EVENTS,
    MICROSERVICES,
    NETWORK_POLICIES,
    Conflict,
    KubeClient,
    KubeError,
    NotFound,
)
from stockade.kube.reflector import DELETED, Backoff, Reflector, ReflectorConfig
from stockade.operator.reconcile import (
    Apply,
    Delete,
    Report,
    Reported,
    ServiceState,
    decide,
    event_manifest,
    plan_events,
    plan_status,
    plan_writes,
    read_services,
    resource_version,
    summary_line,
)
from stockade.operator.render import MANAGER, PolicyKey

if TYPE_CHECKING:
    from stockade.agent.prometheus import Counter, Gauge, Histogram, Registry
    from stockade.operator.reconcile import Writes

log = logging.getLogger("stockade.operator")

Obj = dict[str, Any]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Cache:
    """One resource's objects by key, fed by a reflector (its Sink); tells on change."""

    def __init__(self, key: Callable[[Mapping[str, Any]], Any],
                 on_change: Callable[[], None]) -> None:
        self._key = key
        self._on_change = on_change
        self._lock = threading.Lock()
        self._items: dict[Any, Obj] = {}
        self.listed = False

    def replace(self, items: list[Obj], resource_version: str) -> None:
        new = {self._key(o): o for o in items}
        with self._lock:
            changed = new != self._items or not self.listed
            self._items = new
            self.listed = True
        if changed:
            self._on_change()

    def event(self, type: str, obj: Obj) -> None:
        k = self._key(obj)
        with self._lock:
            if type == DELETED:
                self._items.pop(k, None)
            else:
                self._items[k] = obj
        self._on_change()

    def snapshot(self) -> dict[Any, Obj]:
        with self._lock:
            return dict(self._items)


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def service_key(obj: Mapping[str, Any]) -> str:
    m = _meta(obj)
    return f"{m.get('namespace') or 'default'}/{m.get('name') or ''}"


def policy_key(obj: Mapping[str, Any]) -> PolicyKey:
    m = _meta(obj)
    return PolicyKey(str(m.get("namespace") or "default"), str(m.get("name") or ""))


@dataclass
class OperatorConfig:
    namespace: str | None = None  # None: every namespace
    coalesce: float = 0.05  # seconds to let a burst of events end before reconciling
    resync: float = 600.0  # reconcile at least this often, changes or not
    retry_base: float = 0.5
    retry_cap: float = 30.0
    conflict_attempts: int = 3
    instance: str = field(default_factory=socket.gethostname)
    reflector: ReflectorConfig | None = None


@dataclass
class Outcome:
    """What one reconcile did."""

    applied: int = 0
    deleted: int = 0
    statuses: int = 0
    events: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def writes(self) -> int:
        return self.applied + self.deleted + self.statuses + self.events


class Operator:
    """The operator on one API server: :meth:`start`, :meth:`stop`; thread-safe."""

    def __init__(self, client: KubeClient, config: OperatorConfig | None = None, *,
                 metrics: OperatorMetrics | None = None) -> None:
        self.client = client
        self.config = cfg = config or OperatorConfig()
        self.metrics = metrics
        self._cond = threading.Condition()
        self._dirty = False
        self._busy = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.services = Cache(service_key, self.trigger)
        self.policies = Cache(policy_key, self.trigger)
        rc = cfg.reflector or ReflectorConfig()
        self._reflectors = [
            Reflector(client, MICROSERVICES, self.services, namespace=cfg.namespace, config=rc),
            Reflector(client, NETWORK_POLICIES, self.policies, namespace=cfg.namespace,
                      config=rc),
        ]
        self._backoff = Backoff(cfg.retry_base, cfg.retry_cap)
        self._retry_at: float | None = None
        self._policy_memo: dict[PolicyKey, tuple[str, Obj | None]] = {}
        self._status_memo: dict[str, tuple[str, Obj]] = {}
        self._reported = Reported()
        self.reconciles = 0
        self.last_outcome = Outcome()

    # ---- life -----------------------------------------------------------------------

    def start(self) -> None:
        for r in self._reflectors:
            r.start()
        self._thread = threading.Thread(target=self._loop, name="operator", daemon=True)
        self._thread.start()
        log.info("operator started", extra={"fields": {
            "namespace": self.config.namespace or "(all)", "server": self.client.server}})

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for r in self._reflectors:
            r.stop(0)
        if self._thread is not None:
            self._thread.join(timeout)
        for r in self._reflectors:
            r.stop(timeout)
        log.info("operator stopped")

    @property
    def reflectors(self) -> tuple[Reflector, ...]:
        """The MicroService and NetworkPolicy feeds (their ``status`` for reports)."""
        return tuple(self._reflectors)

    @property
    def synced(self) -> bool:
        """Both resources listed once: reconciling may begin."""
        return self.services.listed and self.policies.listed

    @property
    def idle(self) -> bool:
        """Synced, nothing pending, no reconcile running, no retry waiting."""
        with self._cond:
            return self.synced and not self._dirty and not self._busy \
                and self._retry_at is None

    def healthy(self) -> bool:
        return self.synced and not self.last_outcome.errors

    def trigger(self) -> None:
        """Something changed: reconcile soon."""
        with self._cond:
            self._dirty = True
            self._cond.notify_all()

    # ---- the loop -------------------------------------------------------------------

    def _loop(self) -> None:
        next_resync = time.monotonic() + self.config.resync
        while not self._stop.is_set():
            with self._cond:
                while not self._stop.is_set():
                    now = time.monotonic()
                    due = min([next_resync] + ([self._retry_at] if self._retry_at else []))
                    if self.synced and (self._dirty or now >= due):
                        break
                    # Not synced: wait for the lists (each one triggers).
                    self._cond.wait(max(0.01, due - now) if self.synced else None)
            if self._stop.is_set():
                return
            if self._stop.wait(self.config.coalesce):
                return
            with self._cond:
                self._dirty = False
                self._busy = True
                self._retry_at = None
            try:
                outcome = self.reconcile()
            except Exception as e:  # a bug must not end the loop: retried after a backoff
                log.exception("reconcile failed")
                outcome = Outcome(errors=[f"{type(e).__name__}: {e}"])
            next_resync = time.monotonic() + self.config.resync
            with self._cond:
                self._busy = False
                if outcome.errors:
                    delay = self._backoff.next()
                    self._retry_at = time.monotonic() + delay
                    log.warning("reconcile incomplete; retrying", extra={"fields": {
                        "retry_in": f"{delay:.2f}s", "errors": len(outcome.errors),
                        "first": outcome.errors[0]}})
                else:
                    self._backoff.reset()

    # ---- one pass -------------------------------------------------------------------

    def reconcile(self) -> Outcome:
        """Make the cluster what the caches' graph asks for, writing only differences."""
        started = time.monotonic()
        services = read_services(self.services.snapshot().values())
        policies: dict[PolicyKey, Obj] = self.policies.snapshot()
        self._prune_memos(services, policies)
        writes = plan_writes(services, policies, self._policy_memo)
        out = Outcome()
        failed: dict[PolicyKey, str] = {}
        by_uid = {s.uid: s for s in services if s.uid}
        for d in writes.deletes:
            self._delete(d, policies.get(d.key), failed, out)
        for a in writes.applies:
            self._apply(a, policies.get(a.key), by_uid, failed, out)
        now = _now()
        states = {s.key: s for s in services}
        for key, status in plan_status(services, writes, failed, now, self._status_memo).items():
            self._patch_status(states[key], status, out)
        reports, reported = plan_events(services, writes, self._reported)
        for report in reports:
            if not self._event(report, now, out):
                uid = report.state.uid
                reported.by_uid[uid] = reported.by_uid.get(uid, frozenset()) - {report.key}
        self._reported = reported
        self.reconciles += 1
        self.last_outcome = out
        if self.metrics is not None:
            self.metrics.observe(out, time.monotonic() - started, writes)
        if out.writes or out.errors:
            log.info("reconciled", extra={"fields": {
                "services": len(services), "policies": len(writes.rendering.policies),
                "applied": out.applied, "deleted": out.deleted, "statuses": out.statuses,
                "events": out.events, "errors": len(out.errors)}})
        return out

    def _prune_memos(self, services: list[ServiceState],
                     policies: Mapping[PolicyKey, Obj]) -> None:
        """Forget writes the watch has brought back (or overtaken)."""
        self._policy_memo = {k: m for k, m in self._policy_memo.items()
                             if m[0] == resource_version(policies.get(k))}
        rvs = {s.key: s.resource_version for s in services}
        self._status_memo = {k: m for k, m in self._status_memo.items()
                             if rvs.get(k) == m[0]}

    def _failed(self, out: Outcome, what: str, e: Exception, kind: str) -> None:
        out.errors.append(f"{what}: {e}")
        log.warning("write failed", extra={"fields": {"object": what, "error": str(e)}})
        if self.metrics is not None:
            self.metrics.write_errors.inc(kind=kind)

    def _delete(self, d: Delete, current: Obj | None, failed: dict[PolicyKey, str],
                out: Outcome) -> None:
        try:
            self.client.delete(NETWORK_POLICIES, d.key.name, d.key.namespace)
        except KubeError as e:
            failed[d.key] = str(e)
            self._failed(out, f"NetworkPolicy {d.key.render()}", e, "delete")
            return
        self._policy_memo[d.key] = (resource_version(current), None)
        out.deleted += 1
        log.info(summary_line(d))

    def _apply(self, a: Apply, current: Obj | None, by_uid: Mapping[str, ServiceState],
               failed: dict[PolicyKey, str], out: Outcome) -> None:
        action: Apply = a
        for _ in range(self.config.conflict_attempts):
            try:
                self.client.apply(NETWORK_POLICIES, action.manifest, field_manager=MANAGER,
                                  force=action.force)
            except Conflict as e:
                # Created by someone else since the cache saw it, or (without force) a field
                # of another manager: read it again and decide again.
                log.info("conflict; reading again", extra={"fields": {
                    "policy": a.key.render(), "error": str(e)}})
                try:
                    fresh = self.client.get(NETWORK_POLICIES, a.key.name, a.key.namespace)
                except KubeError as e2:
                    failed[a.key] = str(e2)
                    self._failed(out, f"NetworkPolicy {a.key.render()}", e2, "apply")
                    return
                again, why = decide(a.key, a.manifest, fresh, by_uid, a.summary)
                if not isinstance(again, Apply):
                    # Taken by a policy we do not manage (the watch will show it, and the
                    # next pass reports it), or already what we want.
                    log.info("left alone after a conflict", extra={"fields": {
                        "policy": a.key.render(), "why": why or "already applied"}})
                    self.trigger()
                    return
                action = again
                current = fresh
                continue
            except KubeError as e:
                failed[a.key] = str(e)
                self._failed(out, f"NetworkPolicy {a.key.render()}", e, "apply")
                return
            self._policy_memo[a.key] = (resource_version(current), a.manifest)
            out.applied += 1
            log.info(summary_line(action))
            return
        failed[a.key] = "conflict after conflict"
        out.errors.append(f"NetworkPolicy {a.key.render()}: conflicts persist")

    def _patch_status(self, state: ServiceState, status: Obj, out: Outcome) -> None:
        try:
            self.client.patch_status(MICROSERVICES, state.name, state.namespace, status,
                                     field_manager=MANAGER)
        except NotFound:
            return  # deleted meanwhile: nothing to say about it
        except KubeError as e:
            self._failed(out, f"MicroService {state.key} status", e, "status")
            return
        self._status_memo[state.key] = (state.resource_version, status)
        out.statuses += 1
        conds = {c["type"]: c for c in status["conditions"]}
        log.info("MicroService %s: %s", state.key, ", ".join(
            f"{t}={c['status']} ({c['reason']})" for t, c in conds.items()))

    def _event(self, report: Report, now: str, out: Outcome) -> bool:
        s = report.state
        name = f"{s.name}.{time.time_ns():x}"
        try:
            self.client.create(EVENTS, event_manifest(report, name, now, self.config.instance))
        except NotFound:
            return True  # the namespace is going away
        except KubeError as e:
            self._failed(out, f"event for MicroService {s.key}", e, "event")
            return False
        out.events += 1
        log.warning("%s: %s: %s", s.key, report.key.reason, report.key.text)
        return True


@dataclass(frozen=True)
class OperatorMetrics:
    """The operator's metrics (``--metrics-address``): stockade_operator_*."""

    reconciles: Counter
    reconcile_duration: Histogram
    writes: Counter
    write_errors: Counter
    policies: Gauge
    findings: Gauge

    @classmethod
    def create(cls, registry: Registry) -> OperatorMetrics:
        return cls(
            reconciles=registry.counter("stockade_operator_reconciles_total",
                                        "Reconciles of the whole graph"),
            reconcile_duration=registry.histogram(
                "stockade_operator_reconcile_duration_seconds",
                "Time to reconcile the graph, writes included"),
            writes=registry.counter("stockade_operator_writes_total",
                                    "Write requests that succeeded, by kind",
                                    labelnames=("kind",)),
            write_errors=registry.counter("stockade_operator_write_errors_total",
                                          "Write requests that failed, by kind",
                                          labelnames=("kind",)),
            policies=registry.gauge("stockade_operator_policies",
                                    "NetworkPolicies the graph asks for"),
            findings=registry.gauge("stockade_operator_findings",
                                    "Findings (unresolved dependencies, name conflicts, "
                                    "invalid services)"),
        )

    def observe(self, out: Outcome, seconds: float, writes: Writes) -> None:
        self.reconciles.inc()
        self.reconcile_duration.observe(seconds)
        for kind, n in (("apply", out.applied), ("delete", out.deleted),
                        ("status", out.statuses), ("event", out.events)):
            if n:
                self.writes.inc(n, kind=kind)
        self.policies.set(len(writes.rendering.policies))
        self.findings.set(sum(len(f) for f in writes.findings.values()))


__all__ = ["Cache", "Operator", "OperatorConfig", "OperatorMetrics", "Outcome"]
