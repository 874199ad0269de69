"""What the live operator writes, decided from what it has read (pure).

The controller (controller.py) holds two caches fed by reflectors, MicroServices
and NetworkPolicies, and on every change calls, in order:

1. :func:`read_services` — each MicroService object decoded and validated
   (:class:`ServiceState`: the service, or the field errors that make it invalid).
2. :func:`plan_writes` — ``render_all`` over the whole graph, then, policy by
   policy (:func:`decide`), what to apply and what to delete:

   * rendered, absent: **apply without force**. If someone created a policy of
     that name meanwhile, the API answers 409 rather than letting us take it over;
     the controller reads it again and decides again.
   * rendered, present and managed (label ``app.kubernetes.io/managed-by:
     stockade-operator``), different: **apply with force**. Force because the
     operator is the one writer of these fields: a ``kubectl edit`` of a managed
     policy makes that user a co-owner of the fields it touched, and without
     force every later apply would fail with a conflict and the policy would stay
     what the user left instead of what the graph says.
   * rendered, present and managed, equal in what we write (:func:`same_policy`:
     our labels and ownerReference, and the spec with empty values dropped as the
     API server drops them): **nothing**. A repeated reconcile writes nothing.
   * rendered, present and **not** managed: never touched; a ``PolicyNameTaken``
     finding of its service.
   * managed, not rendered: deleted when its controller MicroService is alive and
     valid (isolation turned off) or when it has none (orphaned); left alone when
     its owner is gone (the API server's garbage collector deletes it: racing it
     gains nothing) and when its owner is invalid (kept as it was, fail-closed:
     deleting an ingress policy would open the pods it isolates).

   ``in_flight`` remembers writes whose watch event has not arrived yet (the
   cached resourceVersion they were made against), so a reconcile that runs in
   between does not send them again.
3. :func:`plan_status` — after the writes, each service's status: conditions
   ``Valid``, ``DependenciesResolved`` (:func:`render.resolved_condition`) and
   ``Ready`` (its policies applied), ``observedGeneration`` and its ``policies``;
   ``lastTransitionTime`` kept unless the condition's status changes; returned
   only for services whose status differs from the stored one.
4. :func:`plan_events` — a Warning event per finding not reported before: the
   findings already reported are remembered by service uid and, after a restart,
   recognised in the stored conditions' messages, so nothing is emitted twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stockade.errors import DecodeError
from stockade.operator.render import (
    MANAGED_BY_LABEL,
    MANAGER,
    POLICY_NAME_TAKEN,
    Finding,
    PolicyKey,
    Rendering,
    is_managed,
    name_conflict,
    render_all,
    resolved_condition,
)
from stockade.operator.service import (
    API_VERSION,
    KIND,
    MicroService,
    decode_microservice,
    validate_microservice,
)

VALID = "Valid"
DEPENDENCIES_RESOLVED = "DependenciesResolved"
READY = "Ready"
INVALID = "Invalid"  # reason of Valid=False, of the events of field errors
OUR_CONDITIONS = (VALID, DEPENDENCIES_RESOLVED, READY)

Obj = dict[str, Any]


# --- reading ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceState:
    """One MicroService object of the cache: decoded and valid, or its errors."""

    key: str  # namespace/name
    namespace: str
    name: str
    uid: str
    generation: int
    resource_version: str
    status: Mapping[str, Any]
    service: MicroService | None  # None: invalid (see errors)
    errors: tuple[Finding, ...] = ()  # field errors, reason Invalid

    @property
    def valid(self) -> bool:
        return self.service is not None


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _errors(obj: Mapping[str, Any], key: str, namespace: str
            ) -> tuple[MicroService | None, tuple[Finding, ...]]:
    try:
        service = decode_microservice(dict(obj), default_namespace=namespace)
    except DecodeError as e:
        message = e.message.removeprefix(f"{e.path}: ")
        return None, (Finding(key, e.path or "(object)", INVALID, message),)
    errs = validate_microservice(service)
    if errs:
        return None, tuple(Finding(key, fe.path, INVALID,
                                   fe.render().removeprefix(f"{fe.path}: ")) for fe in errs)
    return service, ()


def read_service(obj: Mapping[str, Any]) -> ServiceState:
    """One MicroService object as the API gives it."""
    meta = _meta(obj)
    namespace = str(meta.get("namespace") or "default")
    name = str(meta.get("name") or "")
    key = f"{namespace}/{name}"
    status = obj.get("status")
    generation = meta.get("generation")
    service, errors = _errors(obj, key, namespace)
    return ServiceState(
        key=key, namespace=namespace, name=name, uid=str(meta.get("uid") or ""),
        generation=generation if isinstance(generation, int) else 0,
        resource_version=str(meta.get("resourceVersion") or ""),
        status=status if isinstance(status, Mapping) else {},
        service=service, errors=errors)


def read_services(objects: Iterable[Mapping[str, Any]]) -> list[ServiceState]:
    """Every MicroService object of the cache, sorted by key."""
    return sorted((read_service(o) for o in objects), key=lambda s: (s.namespace, s.name))


# --- policies ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Apply:
    """Server-side apply of one rendered policy (force: see the module docstring)."""

    key: PolicyKey
    manifest: Obj
    force: bool
    summary: tuple[str, ...] = ()


@dataclass(frozen=True)
class Delete:
    key: PolicyKey
    why: str


Action = Apply | Delete | None

# A write made and not yet seen by the watch: key -> (the cached resourceVersion it was
# made against, "" for an absent object; the manifest applied, None for a deletion).
InFlight = Mapping[PolicyKey, tuple[str, Obj | None]]


@dataclass(frozen=True)
class Writes:
    """What one reconcile writes to NetworkPolicies, and what it found."""

    rendering: Rendering
    applies: tuple[Apply, ...]
    deletes: tuple[Delete, ...]
    taken: tuple[PolicyKey, ...]  # rendered names held by a policy we do not manage
    findings: Mapping[str, tuple[Finding, ...]]  # by service key (graph, names, fields)
    kept: tuple[tuple[PolicyKey, str], ...] = ()  # managed, not rendered, left alone: why

    @property
    def empty(self) -> bool:
        return not self.applies and not self.deletes


def _normal(value: Any) -> Any:
    """Drop None, empty lists and empty maps, recursively (the API server omits them)."""
    if isinstance(value, Mapping):
        out = {k: _normal(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, [], {})}
    if isinstance(value, list | tuple):
        return [_normal(v) for v in value]
    return value


def _owner_refs(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    refs = _meta(obj).get("ownerReferences")
    if not isinstance(refs, list):
        return []
    return [r for r in refs if isinstance(r, Mapping)
            and r.get("kind") == KIND and r.get("apiVersion") == API_VERSION]


_REF_FIELDS = ("apiVersion", "kind", "name", "uid", "controller", "blockOwnerDeletion")


def same_policy(desired: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether ``current`` already says what ``desired`` writes: its labels, its
    MicroService ownerReferences and its spec (others' labels and fields aside)."""
    want, have = _meta(desired), _meta(current)
    labels = have.get("labels")
    if not isinstance(labels, Mapping):
        labels = {}
    for k, v in (want.get("labels") or {}).items():
        if labels.get(k) != v:
            return False

    def refs(obj: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        return sorted(tuple(str(r.get(f)) for f in _REF_FIELDS) for r in _owner_refs(obj))

    if refs(desired) != refs(current):
        return False
    want_spec, have_spec = desired.get("spec"), current.get("spec")
    return bool(want_spec == have_spec or _normal(want_spec) == _normal(have_spec))


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid of the MicroService controlling a policy; None when there is none."""
    for r in _owner_refs(obj):
        if r.get("controller") is True:
            return str(r.get("uid") or "")
    return None


def resource_version(obj: Mapping[str, Any] | None) -> str:
    return "" if obj is None else str(_meta(obj).get("resourceVersion") or "")


def decide(key: PolicyKey, desired: Obj | None, current: Mapping[str, Any] | None,
           services_by_uid: Mapping[str, ServiceState], summary: tuple[str, ...] = ()
           ) -> tuple[Action, str]:
    """One policy: the write (or None) and, when nothing is written, why (or "")."""
    if desired is not None:
        if current is None:
            return Apply(key, desired, force=False, summary=summary), ""
        if not is_managed(current):
            return None, POLICY_NAME_TAKEN
        if same_policy(desired, current):
            return None, ""
        return Apply(key, desired, force=True, summary=summary), ""
    if current is None or not is_managed(current):
        return None, ""
    uid = controller_uid(current)
    if uid is None:
        return Delete(key, "orphaned: no MicroService controls it"), ""
    owner = services_by_uid.get(uid)
    if owner is None:
        return None, "its MicroService is gone: left to the garbage collector"
    if not owner.valid:
        return None, f"MicroService {owner.key} is invalid: kept as it is until it is valid"
    return Delete(key, f"MicroService {owner.key} no longer asks for it"), ""


def plan_writes(services: Sequence[ServiceState], policies: Mapping[PolicyKey, Mapping[str, Any]],
                in_flight: InFlight | None = None) -> Writes:
    """Every write that makes the cluster's policies what the graph of ``services`` asks for."""
    valid = [s.service for s in services if s.service is not None]
    rendering = render_all(valid, invalid=[s.key for s in services if not s.valid])
    by_uid = {s.uid: s for s in services if s.uid}
    by_key = {s.key: s for s in services}
    findings: dict[str, list[Finding]] = {s.key: list(s.errors) for s in services}
    for f in rendering.findings:
        findings.setdefault(f.service, []).append(f)
    applies: list[Apply] = []
    deletes: list[Delete] = []
    taken: list[PolicyKey] = []
    kept: list[tuple[PolicyKey, str]] = []
    for key in sorted(set(rendering.policies) | set(policies)):
        desired = rendering.policies.get(key)
        current = policies.get(key)
        action, why = decide(key, desired, current, by_uid, rendering.summaries.get(key, ()))
        if why == POLICY_NAME_TAKEN:
            taken.append(key)
            owner = by_key[rendering.owners[key]]
            assert owner.service is not None
            findings[owner.key].append(name_conflict(owner.service, key))
        elif why:
            kept.append((key, why))
        if action is None:
            continue
        memo = (in_flight or {}).get(key)
        if memo is not None and memo == (resource_version(current),
                                         action.manifest if isinstance(action, Apply) else None):
            continue  # written already; the watch has not brought it back yet
        if isinstance(action, Apply):
            applies.append(action)
        else:
            deletes.append(action)
    return Writes(rendering, tuple(applies), tuple(deletes), tuple(taken),
                  {k: tuple(v) for k, v in findings.items()}, tuple(kept))


# --- status -----------------------------------------------------------------------------


def _condition(type_: str, status: str, reason: str, message: str) -> Obj:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def desired_conditions(state: ServiceState, writes: Writes,
                       failed: Mapping[PolicyKey, str]) -> list[Obj]:
    """The operator's conditions of one service (without times and generations)."""
    if not state.valid:
        errors = "; ".join(f"{f.path}: {f.message}" for f in state.errors)
        return [
            _condition(VALID, "False", INVALID, errors),
            _condition(DEPENDENCIES_RESOLVED, "Unknown", INVALID,
                       "not resolved: the MicroService is invalid"),
            _condition(READY, "False", INVALID,
                       "its NetworkPolicies are kept as they are until it is valid"),
        ]
    found = writes.findings.get(state.key, ())
    graph = [f for f in found if f.reason not in (POLICY_NAME_TAKEN, INVALID)]
    mine = writes.rendering.policies_of(state.key)
    blocked = [f for f in found if f.reason == POLICY_NAME_TAKEN]
    failures = [(k, failed[k]) for k in mine if k in failed]
    if blocked:
        ready = _condition(READY, "False", POLICY_NAME_TAKEN,
                           "; ".join(f.message for f in blocked))
    elif failures:
        ready = _condition(READY, "False", "ApplyFailed",
                           "; ".join(f"{k.render()}: {e}" for k, e in failures))
    else:
        names = ", ".join(k.name for k in mine)
        ready = _condition(READY, "True", "Applied",
                           f"NetworkPolicies applied: {names}" if mine
                           else "no NetworkPolicy to apply (isolation is off)")
    return [
        _condition(VALID, "True", VALID, "the MicroService is valid"),
        _condition(DEPENDENCIES_RESOLVED, *resolved_condition(graph)),
        ready,
    ]


def desired_status(state: ServiceState, writes: Writes, failed: Mapping[PolicyKey, str],
                   now: str, known: Mapping[str, Any] | None = None) -> Obj:
    """The whole status of one service: our conditions merged with the stored ones
    (``known``: the status it is known to have, by default the cached one)."""
    stored = (state.status if known is None else known).get("conditions")
    old = {str(c.get("type")): c for c in (stored if isinstance(stored, list) else ())
           if isinstance(c, Mapping)}
    conditions: list[Obj] = []
    for cond in desired_conditions(state, writes, failed):
        before = old.get(cond["type"])
        since = (before.get("lastTransitionTime") if before is not None
                 and before.get("status") == cond["status"] else None)
        conditions.append({**cond, "observedGeneration": state.generation,
                           "lastTransitionTime": since or now})
    conditions += [dict(c) for t, c in sorted(old.items()) if t not in OUR_CONDITIONS]
    taken = set(writes.taken)
    if state.valid:
        policies = [k.name for k in writes.rendering.policies_of(state.key) if k not in taken]
    else:  # its policies are kept as they were: so is the list
        before = (state.status if known is None else known).get("policies")
        policies = [str(p) for p in before] if isinstance(before, list) else []
    return {"observedGeneration": state.generation, "policies": policies,
            "conditions": conditions}


def _comparable(status: Mapping[str, Any]) -> Any:
    conds = status.get("conditions")
    return (status.get("observedGeneration"), status.get("policies") or [],
            sorted((_condition_key(c) for c in (conds if isinstance(conds, list) else ())
                    if isinstance(c, Mapping)), key=str))


def _condition_key(cond: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(str(cond.get(f)) for f in ("type", "status", "reason", "message",
                                              "observedGeneration", "lastTransitionTime"))


def plan_status(services: Sequence[ServiceState], writes: Writes,
                failed: Mapping[PolicyKey, str], now: str,
                in_flight: Mapping[str, tuple[str, Obj]] | None = None) -> dict[str, Obj]:
    """The status to write, by service key: only those that differ from the stored one
    (and from one written against the same cached resourceVersion, not yet seen)."""
    out: dict[str, Obj] = {}
    for state in services:
        memo = (in_flight or {}).get(state.key)
        known = memo[1] if memo is not None and memo[0] == state.resource_version \
            else state.status
        status = desired_status(state, writes, failed, now, known)
        if _comparable(status) != _comparable(known):
            out[state.key] = status
    return out


# --- events -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EventKey:
    reason: str
    path: str
    message: str

    @property
    def text(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class Report:
    """A Warning event to emit about one service."""

    state: ServiceState
    key: EventKey


@dataclass
class Reported:
    """The findings reported as events, by service uid (the controller's memory)."""

    by_uid: dict[str, frozenset[EventKey]] = field(default_factory=dict)


def _stored_messages(state: ServiceState) -> str:
    conds = state.status.get("conditions")
    return "\n".join(str(c.get("message") or "") for c in (conds if isinstance(conds, list)
                                                              else ()) if isinstance(c, Mapping))


def plan_events(services: Sequence[ServiceState], writes: Writes, reported: Reported
                ) -> tuple[list[Report], Reported]:
    """The events to emit (findings not reported before) and the memory after them.

    A service the memory does not know (first reconcile after a start) counts as
    reported every finding its stored conditions already state. A finding that
    goes away is forgotten, so it is reported again if it comes back.
    """
    out: list[Report] = []
    memory: dict[str, frozenset[EventKey]] = {}
    for state in services:
        found = frozenset(EventKey(f.reason, f.path, f.message)
                          for f in writes.findings.get(state.key, ()))
        before = reported.by_uid.get(state.uid)
        if before is None:
            stored = _stored_messages(state)
            before = frozenset(k for k in found if k.text in stored or k.message in stored)
        out += [Report(state, k) for k in sorted(found - before, key=lambda k: (k.path, k.reason))]
        memory[state.uid] = found
    return out, Reported(memory)


def event_manifest(report: Report, name: str, now: str, instance: str = "") -> Obj:
    """A core/v1 Event about a MicroService (``name``: unique, chosen by the caller)."""
    s = report.state
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": s.namespace,
                     "labels": {MANAGED_BY_LABEL: MANAGER}},
        "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": s.name,
                           "namespace": s.namespace, "uid": s.uid,
                           "resourceVersion": s.resource_version},
        "type": "Warning",
        "reason": report.key.reason,
        "message": report.key.text,
        "source": {"component": MANAGER},
        "reportingComponent": MANAGER,
        "reportingInstance": instance or MANAGER,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


def summary_line(write: Apply | Delete) -> str:
    """What a write does, as one line people read."""
    if isinstance(write, Apply):
        return f"NetworkPolicy {write.key.render()} applied: " + "; ".join(write.summary)
    return f"NetworkPolicy {write.key.render()} deleted: {write.why}"
