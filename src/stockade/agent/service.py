"""The agent's operations: what each API call does to the state (the shell's core).

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
from typing import Any

from stockade.agent.protocol import (
    BAD_REQUEST,
    INVALID,
    NOT_FOUND,
    TIMEOUT,
    ApiError,
)
from stockade.agent.reconcile import Reconciler
from stockade.agent.records import (
    OWNER_API,
    AgentState,
    Change,
    DeleteEndpoint,
    DeleteNamespace,
    DeletePolicy,
    EndpointRecord,
    PolicyRecord,
    PutEndpoint,
    PutNamespace,
    PutPolicy,
    namespace_to_dict,
)
from stockade.agent.snapshot import changes_to_restore, parse_snapshot, snapshot_of
from stockade.agent.store import Store
from stockade.errors import DecodeError, InputError
from stockade.model.cidr import parse_ip
from stockade.model.cluster import Namespace, implicit_namespace
from stockade.model.decode import decode_namespace, decode_network_policy, decode_pod, object_name
from stockade.model.labels import Labels
from stockade.model.names import is_dns1123_label
from stockade.model.parse import expand_lists
from stockade.model.policy import Source
from stockade.model.validate import validate_labels, validate_policy
from stockade.net.ipam import Ipam

SYNC_TIMEOUT = 30.0


class Service:
    def __init__(self, store: Store, state: AgentState, reconciler: Reconciler,
                 *, ipam: Ipam | None = None, strict_cidr: bool = False) -> None:
        self.store = store
        self.ipam = ipam
        self.state = state
        self.reconciler = reconciler
        self.strict_cidr = strict_cidr
        self.lock = threading.RLock()
        self.started = time.time()
        # Extensions register more operations (the container manager, IPAM, flows).
        self.extra: dict[str, Callable[[dict[str, Any]], Any]] = {}
        self.status_extra: dict[str, Callable[[], Any]] = {}

    # ---- plumbing ---------------------------------------------------------------------

    def handle(self, op: str, args: dict[str, Any]) -> Any:
        method = self.extra.get(op) or getattr(self, "op_" + op.replace(".", "_"), None)
        if method is None:
            raise ApiError(BAD_REQUEST, f"operation {op!r} is not served by this agent")
        return method(args)

    def commit(self, changes: Sequence[Change], *, sync: bool = True,
               meta: Mapping[str, Any] | None = None) -> int:
        """Store, fold, reconcile; with `sync`, wait for the kernel."""
        with self.lock:
            if not changes and not meta:
                revision = self.reconciler.desired_revision
            else:
                revision = self.store.commit(changes, meta)
                self.state.apply(changes)
                if changes:
                    self.reconciler.changed(revision, changes)
        if sync and changes and not self.reconciler.wait_for(revision, SYNC_TIMEOUT):
            raise ApiError(TIMEOUT, f"revision {revision} is stored but not enforced after "
                                    f"{SYNC_TIMEOUT:.0f}s; see `stockade status`")
        return revision

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
        r = self.reconciler
        last = r.last
        out: dict[str, Any] = {
            "ready": r.applied_revision >= 0,
            "inSync": r.in_sync,
            "revision": r.desired_revision,
            "appliedRevision": r.applied_revision,
            "lastApply": None if last is None else {
                "at": last.at, "durationMs": round(last.duration * 1000, 3),
                "summary": last.summary, "verified": last.verified, "error": last.error},
            "counts": {"namespaces": len(self.state.namespaces),
                       "endpoints": len(self.state.endpoints),
                       "policies": len(self.state.policies)},
            "driftRepairs": r.drift_repairs,
            "applyFailures": r.failures,
            "datapath": r.datapath.name,
            "uptime": round(time.time() - self.started, 1),
        }
        for key, fn in self.status_extra.items():
            out[key] = fn()
        return out

    def op_get(self, args: dict[str, Any]) -> dict[str, Any]:
        kind = args.get("kind")
        with self.lock:
            if kind == "namespaces":
                items = [namespace_to_dict(n) for n in sorted(self.state.namespaces.values(),
                                                              key=lambda n: n.name)]
            elif kind == "endpoints":
                items = [r.to_dict() for _, r in sorted(self.state.endpoints.items())]
            elif kind == "policies":
                items = [r.to_dict() for _, r in sorted(self.state.policies.items())]
            else:
                raise ApiError(BAD_REQUEST, "kind must be namespaces, endpoints or policies")
        return {"items": items}

    # ---- apply and delete --------------------------------------------------------------

    def op_apply(self, args: dict[str, Any]) -> dict[str, Any]:
        docs = args.get("documents")
        if not isinstance(docs, list):
            raise ApiError(BAD_REQUEST, "documents must be a list")
        source = str(args.get("source", "<api>"))
        policies, namespaces, endpoints = self._decode(docs, source)
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
            referenced = [p.policy.namespace for p in policies] + [
                e.endpoint.namespace for e in endpoints]
            implicit = self.implicit_namespaces(referenced, namespaces)
            created += [f"namespace/{c.namespace.name}" for c in implicit
                        if isinstance(c, PutNamespace)]
            revision = self.commit(implicit + changes, sync=False)
        if args.get("sync", True) and changes:
            self._wait(revision)
        return {"created": created, "configured": configured, "unchanged": unchanged,
                "revision": revision}

    def _wait(self, revision: int) -> None:
        if not self.reconciler.wait_for(revision, SYNC_TIMEOUT):
            raise ApiError(TIMEOUT, f"revision {revision} is stored but not enforced after "
                                    f"{SYNC_TIMEOUT:.0f}s; see `stockade status`")

    def _decode(self, docs: list[Any], source: str) -> tuple[
            list[PolicyRecord], dict[str, Namespace], list[EndpointRecord]]:
        """Every document decoded and validated; all errors or nothing."""
        lines: list[str] = []
        policies: list[PolicyRecord] = []
        namespaces: dict[str, Namespace] = {}
        endpoints: list[EndpointRecord] = []
        for index, doc in expand_lists(docs):
            name = object_name(doc) or f"document {index}"
            kind = doc.get("kind") if isinstance(doc, dict) else None
            try:
                if kind == "NetworkPolicy":
                    policy = decode_network_policy(doc, Source(source, index))
                    errors = validate_policy(policy, strict_cidr=self.strict_cidr)
                    ident = f"NetworkPolicy {policy.namespace}/{policy.name}"
                    lines += [f"{source}: {ident}: {e.render()}" for e in errors]
                    policies.append(PolicyRecord(policy, doc))
                elif kind == "Namespace":
                    ns = decode_namespace(doc)
                    errors = validate_labels(ns.labels, "metadata.labels")
                    lines += [f"{source}: {name}: metadata.name: Invalid value: "
                              f"{ns.name!r}: {msg}" for msg in is_dns1123_label(ns.name)]
                    lines += [f"{source}: {name}: {e.render()}" for e in errors]
                    namespaces[ns.name] = ns
                elif kind == "Pod":
                    ep = decode_pod(doc, Source(source, index))
                    lines += [f"{source}: {name}: {e.render()}"
                              for e in validate_labels(ep.labels, "metadata.labels")]
                    endpoints.append(EndpointRecord(ep, owner=OWNER_API, created=time.time()))
                else:
                    lines.append(f"{source}: {name}: kind {kind!r} is not supported "
                                 "(NetworkPolicy, Namespace, Pod)")
            except DecodeError as exc:
                lines.append(f"{source}: {name}: {exc.message}")
        if lines:
            raise ApiError(INVALID, f"{len(lines)} error(s); nothing was applied", lines)
        return policies, namespaces, endpoints

    def op_delete(self, args: dict[str, Any]) -> dict[str, Any]:
        refs = list(args.get("refs") or [])
        for _, doc in expand_lists(list(args.get("documents") or [])):
            if isinstance(doc, dict):
                meta = doc.get("metadata") or {}
                refs.append({"kind": doc.get("kind"), "namespace": meta.get("namespace",
                                                                            "default"),
                             "name": meta.get("name")})
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
                elif kind == "namespace":
                    changes += self._delete_namespace(name, deleted, missing)
                else:
                    raise ApiError(BAD_REQUEST, f"cannot delete kind {ref.get('kind')!r}")
            revision = self.commit(changes, sync=False)
        if args.get("sync", True) and changes:
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
        try:
            target, meta = parse_snapshot(args.get("snapshot"), strict_cidr=self.strict_cidr)
        except InputError as exc:
            raise ApiError(INVALID, f"not a valid snapshot: {exc}") from None
        with self.lock:
            changes = changes_to_restore(self.state, target)
            extra: dict[str, Any] = {}
            if "ipam" in meta and self.ipam is not None:
                self.ipam = Ipam.from_dict(meta["ipam"])
                extra["ipam"] = meta["ipam"]
            revision = self.commit(changes, sync=False, meta=extra or None)
        if args.get("sync", True) and changes:
            self._wait(revision)
        return {"revision": revision, "changes": len(changes)}

    # ---- labels -----------------------------------------------------------------------------

    def op_label(self, args: dict[str, Any]) -> dict[str, Any]:
        kind, name = args.get("kind"), str(args.get("name", ""))
        set_ = {str(k): str(v) for k, v in (args.get("set") or {}).items()}
        remove = [str(k) for k in args.get("remove") or []]
        errors = validate_labels(set_, "labels")
        if errors:
            raise ApiError(INVALID, "invalid labels", [e.render() for e in errors])
        with self.lock:
            if kind == "namespace":
                ns = self.state.namespaces.get(name)
                if ns is None:
                    raise ApiError(NOT_FOUND, f"no namespace {name}")
                labels = _relabel(ns.labels, set_, remove)
                changes: list[Change] = [PutNamespace(Namespace(name, labels))]
            elif kind == "endpoint":
                rec = self.state.endpoints.get(name)
                if rec is None:
                    raise ApiError(NOT_FOUND, f"no endpoint {name}")
                ep = replace(rec.endpoint, labels=_relabel(rec.endpoint.labels, set_, remove))
                changes = [PutEndpoint(replace(rec, endpoint=ep))]
            else:
                raise ApiError(BAD_REQUEST, "kind must be namespace or endpoint")
            revision = self.commit(changes, sync=False)
        if args.get("sync", True):
            self._wait(revision)
        return {"revision": revision}

    # ---- endpoints (the CNI plugin's door) --------------------------------------------------

    def op_endpoint_add(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            rec = EndpointRecord.from_dict(args.get("endpoint") or {})
        except (KeyError, TypeError, ValueError) as exc:
            raise ApiError(BAD_REQUEST, f"bad endpoint: {exc}") from None
        problems = [f"ips: {ip!r} is not an IP address" for ip in rec.endpoint.ips
                    if parse_ip(ip) is None]
        if not rec.endpoint.ips:
            problems.append("ips: at least one address is required")
        problems += [f"namespace: {rec.endpoint.namespace!r}: {msg}"
                     for msg in is_dns1123_label(rec.endpoint.namespace)]
        problems += [e.render() for e in validate_labels(rec.endpoint.labels, "labels")]
        if problems:
            raise ApiError(INVALID, f"endpoint {rec.key} is invalid", problems)
        with self.lock:
            changes = self.implicit_namespaces([rec.endpoint.namespace], {})
            changes.append(PutEndpoint(rec))
            revision = self.commit(changes, sync=False)
        if args.get("sync", True):
            self._wait(revision)
        return {"revision": revision}

    def op_ipam_allocate(self, args: dict[str, Any]) -> dict[str, Any]:
        owner = str(args.get("owner") or "")
        if not owner:
            raise ApiError(BAD_REQUEST, "owner is required")
        address = ipam_allocate(self, owner)
        assert self.ipam is not None
        return {"address": address, "gateway": self.ipam.gateway_interface.split("/")[0],
                "subnet": str(self.ipam.subnet)}

    def op_ipam_release(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"address": ipam_release(self, str(args.get("owner") or ""))}

    def op_endpoint_remove(self, args: dict[str, Any]) -> dict[str, Any]:
        key = str(args.get("key", ""))
        with self.lock:
            if key not in self.state.endpoints:
                return {"removed": False, "revision": self.reconciler.desired_revision}
            revision = self.commit([DeleteEndpoint(key)], sync=False)
        if args.get("sync", True):
            self._wait(revision)
        return {"removed": True, "revision": revision}


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
    with service.lock:
        before = service.ipam.address_of(owner)
        address = service.ipam.allocate(owner)
        if before is None:
            service.commit([], sync=False, meta={"ipam": service.ipam.to_dict()})
    return address


def ipam_release(service: Service, owner: str) -> str | None:
    if service.ipam is None:
        return None
    with service.lock:
        address = service.ipam.release(owner)
        if address is not None:
            service.commit([], sync=False, meta={"ipam": service.ipam.to_dict()})
    return address
