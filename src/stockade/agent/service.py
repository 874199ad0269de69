"""The agent's operations: what each API call does to the state (the shell's core).

The service holds the agent's ONE table of operations (:attr:`Service.table`,
name → handler). Its own core operations are registered in it like any
extension's (:meth:`Service.operations`); the others come from
:meth:`Service.register` (see :mod:`stockade.agent.extension`, which says how
to add an operation). :meth:`Service.handle` looks the table up and nothing else.

Every changing operation validates everything first and fails as a whole, then
commits its changes to the store in one transaction, folds them into the
in-memory state and hands them to the reconciler; with `sync` it returns only
once the kernel enforces them. One lock orders these steps, so the store, the
state and the compiler always see changes in the same order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType
from typing import Any, TypeVar

from stockade.agent.admission import check_changes, quarantine
from stockade.agent.extension import Handler, Operations
from stockade.agent.group import GroupCommit
from stockade.agent.protocol import (
    BAD_REQUEST,
    INVALID,
    NOT_FOUND,
    TIMEOUT,
    UNAVAILABLE,
    ApiError,
    Args,
)
from stockade.agent.reconcile import Reconciler
from stockade.agent.records import (
    OWNER_API,
    AgentState,
    Change,
    ClusterPolicyRecord,
    DeleteClusterPolicy,
    DeleteEndpoint,
    DeleteNamespace,
    DeletePolicy,
    EndpointRecord,
    PolicyRecord,
    PutClusterPolicy,
    PutEndpoint,
    PutNamespace,
    PutPolicy,
    namespace_to_dict,
)
from stockade.agent.snapshot import changes_to_restore, parse_snapshot, snapshot_of
from stockade.agent.store import Store
from stockade.errors import AgentError, BlockNeeded, DecodeError, InputError, NetError
from stockade.heap import collector_paused
from stockade.model.admit import admit_objects, validate_label_change
from stockade.model.cluster import Namespace, implicit_namespace
from stockade.model.cnp import CNP_KIND, ClusterNetworkPolicy
from stockade.model.labels import Labels
from stockade.model.parse import decode_objects, expand_lists
from stockade.net.ipam import Ipam

SYNC_TIMEOUT = 30.0
# Allocations retried after a block claim (with_blocks): each retry found the new block
# filled by concurrent callers; more in a row means a pool claimed as fast as it fills.
CLAIM_TRIES = 8
T = TypeVar("T")
# What another datastore owns (see Service.read_only); reads and the node's own
# containers (run, cni.*) stay local.
LOCAL_WRITES = frozenset({"apply", "delete", "label", "snapshot.restore", "endpoint.add",
                          "endpoint.remove"})
# The datapaths that enforce ClusterNetworkPolicy tiers by name, for one that does not
# say (`enforces_tiers`); an agent on any other refuses the objects at admission.
TIERED_DATAPATHS = frozenset({"nft"})
# The names `get` and `delete` know a ClusterNetworkPolicy by (kubectl's, and short).
CNP_NAMES = frozenset({"clusternetworkpolicy", "clusternetworkpolicies", "cnp", "cnps"})


def enforces_tiers(datapath: object) -> bool:
    """Whether a datapath enforces tiers: its `enforces_tiers`, else by its name."""
    said = getattr(datapath, "enforces_tiers", None)
    if isinstance(said, bool):
        return said
    return getattr(datapath, "name", "") in TIERED_DATAPATHS


def tiers_refused(datapath: object, names: Iterable[str]) -> str:
    """Why this agent cannot take these ClusterNetworkPolicy objects (empty: it can)."""
    listed = sorted(names)
    if enforces_tiers(datapath) or not listed:
        return ""
    return (f"ClusterNetworkPolicy {', '.join(listed)}: the {getattr(datapath, 'name', '?')} "
            "datapath does not enforce ClusterNetworkPolicy tiers (nothing was applied); "
            "run the agent with --datapath nft")


class Service:
    def __init__(self, store: Store, state: AgentState, reconciler: Reconciler,
                 *, ipam: Ipam | None = None, strict_cidr: bool = False) -> None:
        self.store = store
        self.ipam = ipam
        # False while an API datastore's first lists are awaited: the extensions (CNI,
        # containers) start after them, and `status` is not ready until they have.
        self.extensions_ready = True
        self.state = state
        self.reconciler = reconciler
        self.strict_cidr = strict_cidr
        self.lock = threading.RLock()
        # Taken before the lock, never under it: one block claim at a time (claim_block);
        # the claims made so far and the last one's error, for the callers that waited.
        self._claiming = threading.Lock()
        self._claims = 0
        self._claim_error = ""
        # Endpoints added (here and by the CNI operations), relabelled and removed by
        # parallel callers, committed together.
        self.group = GroupCommit(self.lock, lambda changes, meta: self.commit(
            changes, sync=False, meta=meta, durable=False))
        self.started = time.time()
        self._table: dict[str, Handler] = {}
        self._providers: list[Operations] = []
        # Set when another datastore is the truth (`--datastore kubernetes`): local
        # writes of namespaces, policies and pods would fork it and are refused.
        self.read_only: str = ""
        self.register(self)  # the core operations, the same way as any extension's

    # ---- the table of operations ---------------------------------------------------------

    def operations(self) -> Mapping[str, Handler]:
        """The core operations (the service itself as a provider, see agent/extension.py)."""
        return {
            "status": self.op_status,
            "get": self.op_get,
            "apply": self.op_apply,
            "delete": self.op_delete,
            "label": self.op_label,
            "snapshot.save": self.op_snapshot_save,
            "snapshot.restore": self.op_snapshot_restore,
            "endpoint.add": self.op_endpoint_add,
            "endpoint.remove": self.op_endpoint_remove,
            "ipam.allocate": self.op_ipam_allocate,
            "ipam.release": self.op_ipam_release,
        }

    def register(self, provider: Operations) -> None:
        """Add a provider's operations to the table and its fields to `status`.

        Before the socket opens (the table is not locked). An operation already
        in the table is a wiring error: nothing is overridden.
        """
        ops = dict(provider.operations())
        taken = sorted(set(ops) & set(self._table))
        if taken:
            raise AgentError(f"operation(s) {', '.join(taken)} registered twice "
                             f"(again by {type(provider).__name__})")
        self._table.update(ops)
        self._providers.append(provider)

    @property
    def table(self) -> Mapping[str, Handler]:
        """Every operation this agent serves, name → handler (read-only)."""
        return MappingProxyType(self._table)

    def handle(self, op: str, args: dict[str, Any]) -> Any:
        handler = self._table.get(op)
        if handler is None:
            raise ApiError(BAD_REQUEST, f"operation {op!r} is not served by this agent")
        if self.read_only and op in LOCAL_WRITES:
            raise ApiError(INVALID, f"{op}: this agent's datastore is {self.read_only}; "
                                    "namespaces, policies and pods are changed there (e.g. "
                                    "kubectl apply), not through the agent, whose local "
                                    "changes would fork the truth")
        return handler(args)

    # ---- plumbing ---------------------------------------------------------------------

    def with_blocks(self, attempt: Callable[[], T]) -> T:
        """`attempt` (which allocates with ``claim=False`` under the lock), again after a
        block is claimed each time it finds the pool's blocks full (BlockNeeded)."""
        for _ in range(CLAIM_TRIES):
            try:
                return attempt()
            except BlockNeeded:
                self.claim_block()
        raise ApiError(UNAVAILABLE, f"the address blocks claimed were filled by other "
                                    f"callers {CLAIM_TRIES} times in a row; try again")

    def claim_block(self) -> None:
        """Claim the block the address pool needs, with the lock let go: a claim is
        etcd's round trips (its timeout when etcd is slow or away), which would hold
        up every other operation and the reconciler. Callers that find the pool full
        together share one claim: the first claims, the others take its outcome (room,
        or its error: etcd is not asked again by each in turn, up to its timeout each).
        Never called with the lock held (the lock order is _claiming, then lock)."""
        seen = self._claims
        with self._claiming:
            if self._claims != seen:  # one finished while this caller waited
                if self._claim_error:
                    raise ApiError(UNAVAILABLE, self._claim_error)
                return
            with self.lock:
                claim = self.ipam.block_claim() if self.ipam is not None else None
            if claim is None:
                return  # addresses given back meanwhile
            self._claim_error = "the address block claim failed"  # until it succeeds
            try:
                block = claim()
                self._claim_error = ""
            except NetError as exc:
                self._claim_error = str(exc)
                raise ApiError(UNAVAILABLE, self._claim_error) from None
            finally:
                self._claims += 1
            with self.lock:
                if self.ipam is not None:  # the pool in use now (a DEL swaps in a copy)
                    self.ipam.adopt(block)

    def commit(self, changes: Sequence[Change], *, sync: bool = True,
               meta: Mapping[str, Any] | None = None, admitted: bool = False,
               validated: bool = False, durable: bool = True) -> int:
        """Admit, store, fold, reconcile; with `sync`, wait for the kernel.

        The store's fsync comes after the service's lock is released (see
        agent/store.py: concurrent changes share it). An operation that commits
        while holding the lock itself passes ``durable=False`` and calls
        :meth:`durable` once it has let go, before it answers.

        Admission is here, not only in each operation, so that no path can store
        an object the kernel would refuse (see agent/admission.py). ``admitted``
        is for the Kubernetes feed alone (kube/datastore.py): it admits each object
        itself with the same functions and holds what fails fail-closed, object by
        object, where this check would refuse the whole batch. ``validated`` says the
        caller validated every object with `admit_objects` already (`apply`): only
        what depends on the batch and the state is checked again.
        """
        with self.lock:
            problems = [] if admitted else check_changes(self.state, changes,
                                                         strict_cidr=self.strict_cidr,
                                                         validated=validated)
            if problems:
                raise ApiError(INVALID, f"{len(problems)} error(s); nothing was applied",
                               problems)
            if not changes and not meta:
                revision = self.reconciler.desired_revision
            else:
                revision = self.store.commit(changes, meta, durable=False)
                released = self._releases_refused(changes)
                self.state.apply(changes)
                if released:
                    # What held endpoints for a refused ClusterNetworkPolicy is gone: held
                    # again is exactly what a restart would hold now.
                    self.state.quarantined = quarantine(self.state,
                                                        strict_cidr=self.strict_cidr)
                if changes:
                    self.reconciler.changed(
                        revision, changes,
                        rebuild=released or self._tiers_meet_held(changes, admitted))
        if durable:
            self.durable()
        if sync and changes:
            self._wait(revision)
        return revision

    def durable(self) -> None:
        """Everything committed so far is on disk (one fsync for every waiting thread)."""
        self.store.sync()

    def _releases_refused(self, changes: Sequence[Change]) -> bool:
        """A change replaces or deletes a stored ClusterNetworkPolicy that was refused."""
        refused = self.state.refused_cluster_policies
        return bool(refused) and any(
            (c.record.key if isinstance(c, PutClusterPolicy) else c.name) in refused
            for c in changes if isinstance(c, PutClusterPolicy | DeleteClusterPolicy))

    def _tiers_meet_held(self, changes: Sequence[Change], admitted: bool) -> bool:
        """Tier policies change while endpoints are held fail-closed (the local store):
        the compiler is given the whole enforceable state again, so that the Admin
        deny-all of held endpoints comes and goes with the tiers (admission.py). A feed
        (`admitted`) stores that policy itself."""
        return (not admitted and bool(self.state.quarantined)
                and any(isinstance(c, PutClusterPolicy | DeleteClusterPolicy)
                        for c in changes))

    def implicit_namespaces(self, names: Iterable[str],
                            pending: Mapping[str, Namespace]) -> list[Change]:
        """Namespaces referenced but unknown: created as the API server labels them."""
        out: list[Change] = []
        for name in sorted(set(names)):
            if name not in self.state.namespaces and name not in pending:
                out.append(PutNamespace(implicit_namespace(name)))
        return out

    # ---- status and reads ------------------------------------------------------------

    def op_status(self, args: dict[str, Any]) -> dict[str, Any]:
        """The core's fields, then each provider's, in registration order."""
        # Read last-registered first: a feed's progress (say, the resourceVersion it has
        # seen) is read before the core's state, so a caller who sees the feed at X also
        # sees the state and inSync with X committed (never older than the feed's part).
        parts = [provider.status() for provider in reversed(self._providers)]
        out: dict[str, Any] = {}
        for part in reversed(parts):
            out.update(part)
        return out

    def status(self) -> dict[str, Any]:
        """The core's part of `status`: the reconciler, the state, the datapath."""
        r = self.reconciler
        last = r.last
        out: dict[str, Any] = {
            # Not ready while the kernel refuses what the agent means to enforce, nor
            # before every operation is served (the CNI's start after an API's lists).
            "ready": r.healthy and self.extensions_ready,
            "inSync": r.in_sync,
            "revision": r.desired_revision,
            "appliedRevision": r.applied_revision,
            "lastApply": None if last is None else {
                "at": last.at, "durationMs": round(last.duration * 1000, 3),
                "summary": last.summary, "verified": last.verified, "error": last.error},
            "counts": {"namespaces": len(self.state.namespaces),
                       "endpoints": len(self.state.endpoints),
                       "policies": len(self.state.policies),
                       "clusterPolicies": len(self.state.cluster_policies)},
            "driftRepairs": r.drift_repairs,
            # When the kernel was last read back and found as applied (or repaired):
            # the periodic check, every --resync-interval whatever changes come.
            "lastVerified": r.last_verified,
            "applyFailures": r.failures,
            "consecutiveFailures": r.consecutive_failures,
            "error": (last.error if last is not None else "") or "",
            # Endpoints enforced fail-closed because what was stored is invalid.
            "quarantined": {k: list(v) for k, v in sorted(self.state.quarantined.items())},
            "datapath": r.datapath.name,
            "table": getattr(r.datapath, "owner_status", ""),
            # Connections a source may hold in conntrack (--conntrack-limit; 0: any).
            "conntrackLimit": getattr(r.datapath, "conntrack_limit", 0),
            "uptime": round(time.time() - self.started, 1),
            # Commits that served several callers at once (agent/group.py), and those callers.
            "groupCommits": {"batches": self.group.batches, "callers": self.group.grouped},
        }
        return out

    def op_get(self, args: dict[str, Any]) -> dict[str, Any]:
        kind = Args(args, "get").text("kind")
        with self.lock:
            if kind == "namespaces":
                items = [namespace_to_dict(n) for n in sorted(self.state.namespaces.values(),
                                                              key=lambda n: n.name)]
            elif kind == "endpoints":
                items = [r.to_dict() for _, r in sorted(self.state.endpoints.items())]
            elif kind == "policies":
                items = [r.to_dict() for _, r in sorted(self.state.policies.items())]
            elif kind in CNP_NAMES:
                items = [r.to_dict() for _, r in sorted(self.state.cluster_policies.items())]
            elif kind == "chains":
                items = [{"name": name, "direction": direction, "endpoints": users,
                          "policies": [list(keys) for keys in sets]}
                         for name, (direction, users, sets) in
                         sorted(self.reconciler.chain_uses().items())]
            else:
                raise ApiError(BAD_REQUEST, "kind must be namespaces, endpoints, policies, "
                                            "clusternetworkpolicies or chains")
        return {"items": items}

    # ---- apply and delete --------------------------------------------------------------

    def op_apply(self, args: dict[str, Any]) -> dict[str, Any]:
        docs = args.get("documents")
        if isinstance(docs, list) and _objects(docs) > self.reconciler.BULK:
            with collector_paused():  # bulk work: see heap.py
                return self._apply(args)
        return self._apply(args)

    def _apply(self, args: dict[str, Any]) -> dict[str, Any]:
        a = Args(args, "apply")
        if not isinstance(args.get("documents"), list):
            raise ApiError(BAD_REQUEST, "apply: args.documents must be a list")
        docs = a.items("documents")
        source = a.text("source", "<api>")
        sync = a.flag("sync", True)  # read before anything changes: a bad one changes nothing
        policies, namespaces, endpoints, tiers = self._decode(docs, source)
        with self.lock:
            changes: list[Change] = []
            created: list[str] = []
            configured: list[str] = []
            unchanged: list[str] = []

            def classify(label: str, old: object, new: object) -> bool:
                if old is None:
                    created.append(label)
                elif old != new:
                    configured.append(label)
                else:
                    unchanged.append(label)
                    return False
                return True

            for ns in namespaces.values():
                if classify(f"namespace/{ns.name}", self.state.namespaces.get(ns.name), ns):
                    changes.append(PutNamespace(ns))
            for rec in endpoints:
                old_ep = self.state.endpoints.get(rec.key)
                if old_ep is not None and old_ep.owner != OWNER_API:
                    raise ApiError(INVALID, f"endpoint {rec.key} is managed by "
                                            f"{old_ep.owner}; it cannot be replaced by a Pod")
                if classify(f"endpoint/{rec.key}", old_ep and old_ep.endpoint, rec.endpoint):
                    changes.append(PutEndpoint(rec))
            for prec in policies:
                old_p = self.state.policies.get(prec.key)
                if classify(f"networkpolicy/{prec.key}", old_p and old_p.policy, prec.policy):
                    changes.append(PutPolicy(prec))
            for crec in tiers:
                old_c = self.state.cluster_policies.get(crec.key)
                if classify(f"clusternetworkpolicy/{crec.key}", old_c and old_c.policy,
                            crec.policy):
                    changes.append(PutClusterPolicy(crec))
            referenced = [p.policy.namespace for p in policies] + [
                e.endpoint.namespace for e in endpoints]
            implicit = self.implicit_namespaces(referenced, namespaces)
            created += [f"namespace/{c.namespace.name}" for c in implicit
                        if isinstance(c, PutNamespace)]
            revision = self.commit(implicit + changes, sync=False, durable=False,
                                   validated=True)
        self.durable()
        if sync and changes:
            self._wait(revision)
        return {"created": created, "configured": configured, "unchanged": unchanged,
                "revision": revision}

    def _wait(self, revision: int) -> None:
        wait_enforced(self.reconciler, revision)

    def _decode(self, docs: list[Any], source: str) -> tuple[
            list[PolicyRecord], dict[str, Namespace], list[EndpointRecord],
            list[ClusterPolicyRecord]]:
        """Every document decoded and validated as files are; all errors or nothing."""
        objects, decode_errors = decode_objects(docs, source, strict_kinds=True)
        errors: list[InputError] = [*decode_errors, *admit_objects(
            objects.policies, objects.namespaces, objects.endpoints,
            strict_cidr=self.strict_cidr)]
        errors += _duplicate_tiers(objects.cluster_policies)
        refused = tiers_refused(self.reconciler.datapath,
                                {p.name for p in objects.cluster_policies})
        if refused:
            errors.append(InputError(refused, source=source))
        lines = [line for e in errors for line in e.lines()]
        if lines:
            raise ApiError(INVALID, f"{len(lines)} error(s); nothing was applied", lines)
        manifests = {id(p): doc for p, doc in zip(objects.policies,
                                                  _kind_docs(docs, "NetworkPolicy"),
                                                  strict=False)}
        tier_docs = {id(p): doc for p, doc in zip(objects.cluster_policies,
                                                  _kind_docs(docs, CNP_KIND), strict=False)}
        now = time.time()
        return ([PolicyRecord(p, manifests.get(id(p), {})) for p in objects.policies],
                {ns.name: ns for ns in objects.namespaces},
                [EndpointRecord(ep, owner=OWNER_API, created=now) for ep in objects.endpoints],
                [ClusterPolicyRecord(p, tier_docs.get(id(p), {}))
                 for p in objects.cluster_policies])

    def op_delete(self, args: dict[str, Any]) -> dict[str, Any]:
        a = Args(args, "delete")
        sync = a.flag("sync", True)
        refs: list[dict[str, str]] = []
        for n, ref in enumerate(a.items("refs")):
            if not isinstance(ref, dict) or not all(
                    isinstance(ref.get(k, ""), str) for k in ("kind", "namespace", "name")):
                raise ApiError(BAD_REQUEST, f"delete: args.refs[{n}] must be an object of "
                                            "strings (kind, namespace, name)")
            refs.append(ref)
        for _, doc in expand_lists(a.items("documents")):
            if isinstance(doc, dict):
                meta = doc.get("metadata")
                meta = meta if isinstance(meta, dict) else {}
                refs.append({"kind": _text(doc.get("kind")),
                             "namespace": _text(meta.get("namespace")) or "default",
                             "name": _text(meta.get("name"))})
        with self.lock:
            changes: list[Change] = []
            deleted: list[str] = []
            missing: list[str] = []
            for ref in refs:
                kind = str(ref.get("kind", "")).lower()
                ns = str(ref.get("namespace") or "default")
                name = str(ref.get("name") or "")
                if kind in ("networkpolicy", "policy"):
                    key = f"{ns}/{name}"
                    if key in self.state.policies:
                        changes.append(DeletePolicy(key))
                        deleted.append(f"networkpolicy/{key}")
                    else:
                        missing.append(f"networkpolicy/{key}")
                elif kind in ("pod", "endpoint"):
                    key = f"{ns}/{name}"
                    rec = self.state.endpoints.get(key)
                    if rec is None:
                        missing.append(f"endpoint/{key}")
                    elif rec.owner != OWNER_API:
                        raise ApiError(INVALID, f"endpoint {key} is managed by {rec.owner}; "
                                                "remove it there (stockade rm, CNI DEL)")
                    else:
                        changes.append(DeleteEndpoint(key))
                        deleted.append(f"endpoint/{key}")
                elif kind in CNP_NAMES:
                    # Cluster-scoped: a namespace given with it is ignored, as kubectl does.
                    if (name in self.state.cluster_policies
                            or name in self.state.refused_cluster_policies):
                        changes.append(DeleteClusterPolicy(name))
                        deleted.append(f"clusternetworkpolicy/{name}")
                    else:
                        missing.append(f"clusternetworkpolicy/{name}")
                elif kind == "namespace":
                    changes += self._delete_namespace(name, deleted, missing)
                else:
                    raise ApiError(BAD_REQUEST, f"cannot delete kind {ref.get('kind')!r}")
            revision = self.commit(changes, sync=False, durable=False)
        self.durable()
        if sync and changes:
            self._wait(revision)
        return {"deleted": deleted, "missing": missing, "revision": revision}

    def _delete_namespace(self, name: str, deleted: list[str],
                          missing: list[str]) -> list[Change]:
        if name not in self.state.namespaces:
            missing.append(f"namespace/{name}")
            return []
        live = [r.key for r in self.state.endpoints.values()
                if r.endpoint.namespace == name and r.owner != OWNER_API]
        if live:
            raise ApiError(INVALID, f"namespace {name} still has running endpoints: "
                                    f"{', '.join(sorted(live))}")
        out: list[Change] = [DeletePolicy(k) for k, r in self.state.policies.items()
                             if r.policy.namespace == name]
        out += [DeleteEndpoint(k) for k, r in self.state.endpoints.items()
                if r.endpoint.namespace == name]
        out.append(DeleteNamespace(name))
        deleted.append(f"namespace/{name}")
        return out

    # ---- snapshots ------------------------------------------------------------------------

    def op_snapshot_save(self, args: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            meta = {"ipam": self.ipam.to_dict()} if self.ipam is not None else {}
            return {"snapshot": snapshot_of(self.state, self.reconciler.desired_revision,
                                            meta)}

    def op_snapshot_restore(self, args: dict[str, Any]) -> dict[str, Any]:
        sync = Args(args, "snapshot.restore").flag("sync", True)
        try:
            target, meta = parse_snapshot(args.get("snapshot"), strict_cidr=self.strict_cidr)
        except InputError as exc:
            raise ApiError(INVALID, f"not a valid snapshot: {exc}") from None
        refused = tiers_refused(self.reconciler.datapath, target.cluster_policies)
        if refused:
            raise ApiError(INVALID, f"not restored: {refused}")
        with self.lock:
            changes = changes_to_restore(self.state, target)
            extra: dict[str, Any] = {}
            pool = None
            if "ipam" in meta and self.ipam is not None:
                try:
                    pool = self.ipam.restored(meta["ipam"])
                except NetError as exc:
                    raise ApiError(INVALID, f"not restored: {exc}") from None
                extra["ipam"] = pool.to_dict()
            revision = self.commit(changes, sync=False, meta=extra or None)
            if pool is not None:
                self.ipam = pool  # once committed: a refused commit leaves the pool as it was
        if sync and changes:
            self._wait(revision)
        return {"revision": revision, "changes": len(changes)}

    # ---- labels -----------------------------------------------------------------------------

    def op_label(self, args: dict[str, Any]) -> dict[str, Any]:
        a = Args(args, "label")
        kind, name = a.text("kind"), a.text("name")
        set_, remove = a.text_map("set"), a.texts("remove")
        sync = a.flag("sync", True)
        if kind not in ("namespace", "endpoint"):
            raise ApiError(BAD_REQUEST, "label: args.kind must be namespace or endpoint")
        errors = validate_label_change(kind, set_, remove)
        if errors:
            raise ApiError(INVALID, f"{kind} {name}: invalid labels",
                           [f"{kind} {name}: {e.render()}" for e in errors])

        def build() -> list[Change]:
            if kind == "namespace":
                ns = self.state.namespaces.get(name)
                if ns is None:
                    raise ApiError(NOT_FOUND, f"no namespace {name}")
                return [PutNamespace(Namespace(name, _relabel(ns.labels, set_, remove)))]
            rec = self.state.endpoints.get(name)
            if rec is None:
                raise ApiError(NOT_FOUND, f"no endpoint {name}")
            ep = replace(rec.endpoint, labels=_relabel(rec.endpoint.labels, set_, remove))
            return [PutEndpoint(replace(rec, endpoint=ep))]

        revision = self.group.submit(build)
        assert revision is not None  # a build of one change
        self.durable()
        if sync:
            self._wait(revision)
        return {"revision": revision}

    # ---- endpoints (the CNI plugin's door) --------------------------------------------------

    def op_endpoint_add(self, args: dict[str, Any]) -> dict[str, Any]:
        a = Args(args, "endpoint.add")
        sync = a.flag("sync", True)
        try:
            rec = EndpointRecord.from_dict(a.mapping("endpoint"))
        except DecodeError as exc:
            raise ApiError(BAD_REQUEST, f"endpoint.add: args.endpoint.{exc.message}") from None

        def build() -> list[Change]:
            existing = self.state.endpoints.get(rec.key)
            if existing is not None and existing.owner != rec.owner:
                raise ApiError(INVALID, f"endpoint {rec.key} is managed by {existing.owner}; "
                                        f"it cannot be replaced by one managed by {rec.owner}")
            return [*self.implicit_namespaces([rec.endpoint.namespace], {}), PutEndpoint(rec)]

        revision = self.group.submit(build)
        assert revision is not None  # a build of one change at least
        self.durable()
        if sync:
            self._wait(revision)
        return {"revision": revision}

    def op_ipam_allocate(self, args: dict[str, Any]) -> dict[str, Any]:
        owner = Args(args, "ipam.allocate").text("owner")
        if not owner:
            raise ApiError(BAD_REQUEST, "owner is required")
        address = ipam_allocate(self, owner)
        assert self.ipam is not None
        return {"address": address, "gateway": self.ipam.gateway_interface.split("/")[0],
                "subnet": str(self.ipam.subnet)}

    def op_ipam_release(self, args: dict[str, Any]) -> dict[str, Any]:
        owner = Args(args, "ipam.release").text("owner")
        if not owner:
            raise ApiError(BAD_REQUEST, "ipam.release: args.owner is required")
        return {"address": ipam_release(self, owner)}

    def op_endpoint_remove(self, args: dict[str, Any]) -> dict[str, Any]:
        a = Args(args, "endpoint.remove")
        key, sync = a.text("key"), a.flag("sync", True)
        if not key:
            raise ApiError(BAD_REQUEST, "endpoint.remove: args.key is required")
        revision = self.group.submit(
            lambda: [DeleteEndpoint(key)] if key in self.state.endpoints else [])
        if revision is None:
            return {"removed": False, "revision": self.reconciler.desired_revision}
        self.durable()
        if sync:
            self._wait(revision)
        return {"removed": True, "revision": revision}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _objects(docs: list[Any]) -> int:
    """How many objects the documents hold (a `kind: List` holds its items)."""
    return sum(len(d["items"]) if isinstance(d, dict) and isinstance(d.get("items"), list)
               else 1 for d in docs)


def _kind_docs(docs: list[Any], kind: str) -> list[Any]:
    """The documents of one kind, in the order `decode_objects` decodes them."""
    return [doc for _, doc in expand_lists(docs)
            if isinstance(doc, dict) and doc.get("kind") == kind]


def _duplicate_tiers(policies: Iterable[ClusterNetworkPolicy]) -> list[InputError]:
    """A ClusterNetworkPolicy given twice in one batch is refused, like any object."""
    first: dict[str, ClusterNetworkPolicy] = {}
    out: list[InputError] = []
    for p in policies:
        if p.name in first:
            out.append(InputError(f"clusternetworkpolicy {p.name} is given twice: "
                                  f"{first[p.name].source.render() or 'an earlier object'} "
                                  f"and {p.source.render() or 'a later one'}"))
        else:
            first[p.name] = p
    return out


def wait_enforced(reconciler: Reconciler, revision: int) -> None:
    """Return once the kernel enforces `revision`; a clear error if it cannot.

    The change is stored either way; when the kernel refuses the transaction
    the previous ruleset stays in force and the reconciler keeps retrying.
    """
    outcome = reconciler.wait_for(revision, SYNC_TIMEOUT)
    if outcome is True:
        return
    if outcome:
        raise ApiError(UNAVAILABLE, f"revision {revision} is stored, but the kernel refused "
                                    f"it; the previous ruleset stays in force and the agent "
                                    f"keeps retrying: {outcome}")
    raise ApiError(TIMEOUT, f"revision {revision} is stored but not enforced after "
                            f"{SYNC_TIMEOUT:.0f}s; see `stockade status`")


def _relabel(labels: Labels, set_: Mapping[str, str], remove: Sequence[str]) -> Labels:
    data = dict(labels)
    data.update(set_)
    for k in remove:
        data.pop(k, None)
    return Labels(data)



def ipam_allocate(service: Service, owner: str) -> str:
    """An address for `owner` (the same one again if it has one), stored durably."""
    if service.ipam is None:
        raise ApiError(BAD_REQUEST, "this agent has no address pool")

    def attempt() -> str:
        with service.lock:
            assert service.ipam is not None
            before = service.ipam.address_of(owner)
            address = service.ipam.allocate(owner, claim=False)
            if before is None:
                service.commit([], sync=False, meta={"ipam": service.ipam.to_dict()})
        return address

    return service.with_blocks(attempt)


def ipam_release(service: Service, owner: str) -> str | None:
    if service.ipam is None:
        return None
    with service.lock:
        address = service.ipam.release(owner)
        if address is not None:
            service.commit([], sync=False, meta={"ipam": service.ipam.to_dict()})
    return address
