"""Export and import of the agent's whole state (pure; the store glue is in store.py).

A snapshot is a JSON-able dict, sorted so that equal states give equal text::

    {"kind": "StockadeSnapshot", "version": 1, "revision": N,
     "namespaces": [namespace_to_dict...], "endpoints": [EndpointRecord.to_dict...],
     "policies": [manifest...], "clusterPolicies": [manifest...],
     "meta": {"ipam": Ipam.to_dict()}}

``clusterPolicies`` (ClusterNetworkPolicy manifests) is written when there are
any, and optional when read, so a snapshot of an agent without them is the same
text as before.

A snapshot may come from a user's file, so :func:`parse_snapshot` checks every
field and names the one that is wrong (`stockade.errors.DecodeError`, an
InputError) before anything reaches the store or the kernel. Restoring does not
replace the store wholesale: :func:`changes_to_restore` computes the ordinary
changes that turn the current state into the snapshot's, so a restore goes
through the same commit and reconcile path as any other change (and touches only
what differs). The snapshot's revision is informative; the store's revision only
grows, and a restore is one more committed transaction (none when nothing differs).

Public API::

    snapshot_of(state, revision, meta) -> dict
    parse_snapshot(data, meta_keys=SNAPSHOT_META_KEYS, *, strict_cidr=False)
        -> (AgentState, meta)
    changes_to_restore(current, target) -> list[Change]

Saving and restoring straight through a store (`save_snapshot`,
`restore_snapshot`) is in :mod:`stockade.agent.store`, which imports this module.
"""

from __future__ import annotations

import copy
import ipaddress
import math
from collections.abc import Callable, Collection, Mapping
from typing import Any, NoReturn, TypeVar

from stockade.agent.records import (
    OWNER_API,
    OWNER_CNI,
    OWNER_RUN,
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
    namespace_from_dict,
    namespace_to_dict,
)
from stockade.errors import DecodeError, NetError, ValidationError
from stockade.model.cluster import Namespace
from stockade.model.policy import PROTOCOLS
from stockade.model.validate import validate_policy
from stockade.net.ipam import Ipam

KIND = "StockadeSnapshot"
VERSION = 1
SOURCE = "snapshot"  # what error messages name as the input
SNAPSHOT_META_KEYS = ("ipam",)  # the meta blobs that travel with a snapshot

_TOP_FIELDS = {"kind", "version", "revision", "namespaces", "endpoints", "policies",
               "clusterPolicies", "meta"}
_NAMESPACE_FIELDS = {"name", "labels"}
_ENDPOINT_FIELDS = {"namespace", "name", "labels", "ips", "ports", "netns", "interface",
                    "hostInterface", "owner", "containerID", "pid", "command", "created"}
_PORT_FIELDS = {"name", "port", "protocol"}
_OWNERS = (OWNER_API, OWNER_RUN, OWNER_CNI)

_R = TypeVar("_R")


# ---- export -------------------------------------------------------------------------


def snapshot_of(state: AgentState, revision: int, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The snapshot of a state (records sorted by key; nothing aliases the state)."""
    out: dict[str, Any] = {
        "kind": KIND,
        "version": VERSION,
        "revision": revision,
        "namespaces": [namespace_to_dict(state.namespaces[k]) for k in sorted(state.namespaces)],
        "endpoints": [state.endpoints[k].to_dict() for k in sorted(state.endpoints)],
        "policies": [copy.deepcopy(state.policies[k].to_dict()) for k in sorted(state.policies)],
    }
    if state.cluster_policies:
        out["clusterPolicies"] = [copy.deepcopy(state.cluster_policies[k].to_dict())
                                  for k in sorted(state.cluster_policies)]
    out["meta"] = {k: copy.deepcopy(meta[k]) for k in sorted(meta)}
    return out


# ---- import -------------------------------------------------------------------------


def parse_snapshot(data: Any, meta_keys: Collection[str] = SNAPSHOT_META_KEYS, *,
                   strict_cidr: bool = False) -> tuple[AgentState, dict[str, Any]]:
    """The state and meta a snapshot holds; DecodeError/ValidationError naming the
    field on anything wrong. Only `meta_keys` may appear under ``meta``; policies
    are validated as `apply` does (`strict_cidr` as the agent's own setting)."""
    top = _mapping(data, "", _TOP_FIELDS)
    _check_header(top)

    def policy(item: Any, path: str) -> PolicyRecord:
        return _policy(item, path, strict_cidr)

    state = AgentState(
        namespaces=_records(top, "namespaces", _namespace, lambda ns: ns.name),
        endpoints=_records(top, "endpoints", _endpoint, lambda r: r.key),
        policies=_records(top, "policies", policy, lambda r: r.key),
        cluster_policies=_records(top, "clusterPolicies", _cluster_policy, lambda r: r.key,
                                  required=False),
    )
    _check_namespaces_exist(state)
    return state, _meta(top.get("meta", {}), meta_keys)


def _check_namespaces_exist(state: AgentState) -> None:
    """The agent never holds an endpoint or policy without its namespace (it creates
    namespaces implicitly and deletes their contents with them); neither may a restore."""
    owned = (("endpoints", [(k, r.endpoint.namespace) for k, r in state.endpoints.items()]),
             ("policies", [(k, r.policy.namespace) for k, r in state.policies.items()]))
    for field, items in owned:  # in snapshot order, so the index is the list's
        for i, (key, ns) in enumerate(items):
            if ns not in state.namespaces:
                _fail(f"{field}[{i}]", f"namespace {ns!r} is not among the snapshot's"
                                       " namespaces", key)


def _check_header(top: Mapping[str, Any]) -> None:
    if top.get("kind") != KIND:
        _fail("kind", f"must be {KIND!r}, not {top.get('kind')!r}")
    version = _int(_required(top, "version", ""), "version", 1)
    if version != VERSION:
        _fail("version", f"snapshot format version {version} is not supported"
                         f" (this agent reads version {VERSION})")
    _int(_required(top, "revision", ""), "revision", 0)


def _records(top: Mapping[str, Any], field: str, decode: Callable[[Any, str], _R],
             key_of: Callable[[_R], str], *, required: bool = True) -> dict[str, _R]:
    """One list of records, decoded, with duplicate keys refused."""
    items = _list(_required(top, field, "") if required else top.get(field, []), field)
    out: dict[str, _R] = {}
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        path = f"{field}[{i}]"
        record = decode(item, path)
        key = key_of(record)
        if key in out:
            _fail(path, f"duplicate {key!r} (also {field}[{first[key]}])", obj=key)
        out[key], first[key] = record, i
    return out


def _namespace(item: Any, path: str) -> Namespace:
    d = _mapping(item, path, _NAMESPACE_FIELDS)
    _name(_required(d, "name", path), f"{path}.name")
    _string_map(d.get("labels", {}), f"{path}.labels")
    return namespace_from_dict(d)


def _endpoint(item: Any, path: str) -> EndpointRecord:
    d = _mapping(item, path, _ENDPOINT_FIELDS)
    ns = _name(_required(d, "namespace", path), f"{path}.namespace")
    obj = f"{ns}/{_name(_required(d, 'name', path), f'{path}.name')}"
    _string_map(d.get("labels", {}), f"{path}.labels", obj)
    for i, ip in enumerate(_list(d.get("ips", []), f"{path}.ips", obj)):
        _ip(ip, f"{path}.ips[{i}]", obj)
    for i, port in enumerate(_list(d.get("ports", []), f"{path}.ports", obj)):
        _port(port, f"{path}.ports[{i}]", obj)
    for key in ("netns", "interface", "hostInterface", "containerID"):
        _string(d.get(key, ""), f"{path}.{key}", obj)
    if d.get("owner", OWNER_API) not in _OWNERS:
        _fail(f"{path}.owner", f"must be one of {', '.join(_OWNERS)}, not {d['owner']!r}", obj)
    _int(d.get("pid", 0), f"{path}.pid", 0, obj)
    for i, arg in enumerate(_list(d.get("command", []), f"{path}.command", obj)):
        _string(arg, f"{path}.command[{i}]", obj)
    _number(d.get("created", 0.0), f"{path}.created", obj)
    return EndpointRecord.from_dict(d)


def _port(item: Any, path: str, obj: str) -> None:
    d = _mapping(item, path, _PORT_FIELDS, obj)
    port = _int(_required(d, "port", path, obj), f"{path}.port", 1, obj)
    if port > 65535:
        _fail(f"{path}.port", f"must be between 1 and 65535, not {port}", obj)
    if d.get("protocol", "TCP") not in PROTOCOLS:
        _fail(f"{path}.protocol", f"must be one of {', '.join(PROTOCOLS)},"
                                  f" not {d['protocol']!r}", obj)
    _string(d.get("name", ""), f"{path}.name", obj)


def _policy(item: Any, path: str, strict_cidr: bool) -> PolicyRecord:
    """Decode with the same strict decoder as `apply`, then validate as `apply` does,
    so a hand-edited snapshot cannot slip in what the API would refuse."""
    d = _mapping(item, path, None)
    obj = _manifest_name(d)
    try:
        record = PolicyRecord.from_dict(d)
    except DecodeError as exc:
        inner = exc.message.removeprefix(f"{exc.path}: ") if exc.path else exc.message
        _fail(f"{path}.{exc.path}" if exc.path else path, inner, obj)
    errors = validate_policy(record.policy, strict_cidr=strict_cidr)
    if errors:
        raise ValidationError(errors, source=SOURCE, obj=f"{path} {record.key}")
    return record


def _cluster_policy(item: Any, path: str) -> ClusterPolicyRecord:
    """Decoded and validated by the same decoder as `apply` (every error, named)."""
    d = _mapping(item, path, None)
    meta = d.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    obj = f"{path} {name}" if isinstance(name, str) else path
    try:
        return ClusterPolicyRecord.from_dict(d)
    except ValidationError as exc:
        raise ValidationError(exc.errors, source=SOURCE, obj=obj) from None
    except DecodeError as exc:
        inner = exc.message.removeprefix(f"{exc.path}: ") if exc.path else exc.message
        _fail(f"{path}.{exc.path}" if exc.path else path, inner, obj)


def _manifest_name(d: Mapping[str, Any]) -> str:
    meta = d.get("metadata")
    if not isinstance(meta, Mapping):
        return ""
    ns, name = meta.get("namespace"), meta.get("name")
    return f"{ns}/{name}" if isinstance(ns, str) and isinstance(name, str) else ""


def _meta(value: Any, allowed: Collection[str]) -> dict[str, Any]:
    """The meta blobs: known keys only, and each one that the agent decodes is
    checked here, so a restore cannot store a blob the agent then fails to load."""
    d = _mapping(value, "meta", None)
    for key in d:
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            _fail(f"meta.{key}", f"unknown meta key (known: {known})")
    if "ipam" in d:
        try:
            Ipam.from_dict(_mapping(d["ipam"], "meta.ipam", None))
        except NetError as exc:
            _fail("meta.ipam", str(exc))
    return copy.deepcopy(dict(d))


# ---- field checks -------------------------------------------------------------------


def _fail(path: str, message: str, obj: str = "") -> NoReturn:
    raise DecodeError(message, path=path, source=SOURCE, obj=obj)


def _required(d: Mapping[str, Any], key: str, path: str, obj: str = "") -> Any:
    if key not in d:
        _fail(f"{path}.{key}" if path else key, "required field is missing", obj)
    return d[key]


def _mapping(value: Any, path: str, allowed: set[str] | None,
             obj: str = "") -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        _fail(path, f"must be an object, not {type(value).__name__}", obj)
    for key in value:
        if not isinstance(key, str):
            _fail(path, f"keys must be strings, not {key!r}", obj)
        if allowed is not None and key not in allowed:
            _fail(f"{path}.{key}" if path else key, "unknown field", obj)
    return value


def _list(value: Any, path: str, obj: str = "") -> list[Any]:
    if not isinstance(value, list | tuple):
        _fail(path, f"must be a list, not {type(value).__name__}", obj)
    return list(value)


def _string(value: Any, path: str, obj: str = "") -> str:
    if not isinstance(value, str):
        _fail(path, f"must be a string, not {type(value).__name__}", obj)
    return value


def _name(value: Any, path: str, obj: str = "") -> str:
    """A non-empty name without '/', since keys are "<namespace>/<name>"."""
    text = _string(value, path, obj)
    if not text or "/" in text:
        _fail(path, f"must be a non-empty name without '/', not {text!r}", obj)
    return text


def _int(value: Any, path: str, minimum: int, obj: str = "") -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(path, f"must be an integer, not {type(value).__name__}", obj)
    if value < minimum:
        _fail(path, f"must be at least {minimum}, not {value}", obj)
    return value


def _number(value: Any, path: str, obj: str = "") -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) \
            or not math.isfinite(value):
        _fail(path, f"must be a finite number, not {value!r}", obj)
    return float(value)


def _string_map(value: Any, path: str, obj: str = "") -> dict[str, str]:
    d = _mapping(value, path, None, obj)
    for key, v in d.items():
        _string(v, f"{path}.{key}", obj)
    return dict(d)


def _ip(value: Any, path: str, obj: str) -> str:
    text = _string(value, path, obj)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        _fail(path, f"{text!r} is not an IP address", obj)
    return text


# ---- restore ------------------------------------------------------------------------


def changes_to_restore(current: AgentState, target: AgentState) -> list[Change]:
    """The fewest changes that turn `current` into `target`, in an order safe for
    incremental consumers: deletes of dependents first (policies, endpoints,
    namespaces), then puts of what they depend on first (namespaces, endpoints,
    policies). Each group is sorted by key, so the result is deterministic."""
    return [
        *(DeletePolicy(k) for k in sorted(current.policies.keys() - target.policies.keys())),
        *(DeleteEndpoint(k) for k in sorted(current.endpoints.keys() - target.endpoints.keys())),
        *(DeleteNamespace(k)
          for k in sorted(current.namespaces.keys() - target.namespaces.keys())),
        *(PutNamespace(ns) for k, ns in sorted(target.namespaces.items())
          if current.namespaces.get(k) != ns),
        *(PutEndpoint(r) for k, r in sorted(target.endpoints.items())
          if current.endpoints.get(k) != r),
        *(PutPolicy(r) for k, r in sorted(target.policies.items())
          if not _same_policy(current.policies.get(k), r)),
        # Cluster-scoped, depending on nothing: last among the puts, first of the deletes.
        *(DeleteClusterPolicy(k) for k in sorted(current.cluster_policies.keys()
                                                 - target.cluster_policies.keys())),
        *(PutClusterPolicy(r) for k, r in sorted(target.cluster_policies.items())
          if not _same_policy(current.cluster_policies.get(k), r)),
    ]


def _same_policy(a: PolicyRecord | ClusterPolicyRecord | None,
                 b: PolicyRecord | ClusterPolicyRecord) -> bool:
    # PolicyRecord equality ignores the manifest; what `get -o yaml` shows counts too.
    return a is not None and a == b and a.to_dict() == b.to_dict()
