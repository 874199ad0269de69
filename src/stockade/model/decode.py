"""Strict decoding of Kubernetes objects (as kubectl's strict field validation does).

A document that is not a well-typed object never reaches validation: an unknown
field, a value of the wrong type, a number that does not fit int32 or a wrong
apiVersion/kind raises DecodeError naming the field. Decoding applies the API
server's defaults (protocol TCP, policyTypes inference, empty podSelector).

The order of checks follows the API server: apiVersion/kind first (they pick the
type), then the first value of a wrong type in document order (the JSON decoder
fails on it), and only then unknown fields (strict decoding collects those and
reports them after a successful decode). JSON `null` is the zero value: an absent
field, an empty string, an empty list item.

Paths use the API server's notation with list indexes (`spec.ingress[0].ports[1]`);
a bad value inside a string map names the map, as Go's decoder does.
"""

from __future__ import annotations

import marshal
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

from stockade.errors import DecodeError
from stockade.model.cidr import is_canonical_ipv4, parse_ip
from stockade.model.cluster import NS_NAME_LABEL, ContainerPort, Endpoint, Namespace
from stockade.model.labels import EMPTY, Labels
from stockade.model.policy import (
    NO_SOURCE,
    TCP,
    IPBlock,
    NetworkPolicy,
    Peer,
    PolicyPort,
    Rule,
    Source,
    default_policy_types,
)
from stockade.model.selector import ALL, Requirement, Selector

T = TypeVar("T")

INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
NETPOL_API = "networking.k8s.io/v1"

_TOP_LEVEL = frozenset({"apiVersion", "kind", "metadata", "spec"})
_TOP_LEVEL_WITH_STATUS = _TOP_LEVEL | {"status"}
_SPEC = frozenset({"podSelector", "ingress", "egress", "policyTypes"})
_SELECTOR = frozenset({"matchLabels", "matchExpressions"})
_REQUIREMENT = frozenset({"key", "operator", "values"})
_PEER = frozenset({"podSelector", "namespaceSelector", "ipBlock"})
_IP_BLOCK = frozenset({"cidr", "except"})
_PORT = frozenset({"protocol", "port", "endPort"})
_OWNER_REFERENCE = frozenset({"apiVersion", "kind", "name", "uid", "controller",
                              "blockOwnerDeletion"})
_MANAGED_FIELDS = frozenset({"manager", "operation", "apiVersion", "time", "fieldsType",
                             "fieldsV1", "subresource"})
# metav1.Time reads RFC 3339 (Go's time.RFC3339 layout, fractional seconds allowed).
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})",
                      re.ASCII)


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def wrong_type(path: str, value: Any, want: str) -> DecodeError:
    return DecodeError(f"cannot decode {type_name(value)} as {want}", path=path)


def join_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _key_text(key: Any, path: str) -> str:
    """A mapping key as kubectl's YAML-to-JSON step spells it."""
    if isinstance(key, str):
        return key
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, int):
        return str(key)
    raise DecodeError(f"unsupported map key {key!r} of type {type_name(key)}", path=path)


def read_object(value: Any, path: str) -> dict[str, Any]:
    """A JSON object with its keys as JSON text; null is the empty object.

    Callers only read the result: an object whose keys are all strings (always,
    from JSON) is returned as it is, not copied.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise wrong_type(path, value, "an object")
    if _STR.issuperset(map(type, value)):
        return value
    return {_key_text(k, path): v for k, v in value.items()}


_STR = frozenset({str})


def read_string(value: Any, path: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise wrong_type(path, value, "a string")
    return value


def _integer(value: Any, path: str, lo: int, hi: int, name: str) -> int:
    # YAML 80.0 reaches the API server as JSON 80, which an integer field accepts.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise wrong_type(path, value, f"an {name}")
    if not lo <= value <= hi:
        raise DecodeError(f"number {_show_number(value)} does not fit {name}", path=path)
    return value


def read_int32(value: Any, path: str) -> int:
    return _integer(value, path, INT32_MIN, INT32_MAX, "int32")


def _int64(value: Any, path: str) -> int | None:
    return None if value is None else _integer(value, path, INT64_MIN, INT64_MAX, "int64")


def read_boolean(value: Any, path: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise wrong_type(path, value, "a boolean")
    return value


def _time(value: Any, path: str) -> str:
    text = read_string(value, path)
    if not text:
        if value is None:
            return ""
        raise DecodeError('cannot parse "" as an RFC 3339 time', path=path)
    try:
        if not _RFC3339.fullmatch(text):
            raise ValueError(text)
        datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise DecodeError(f"cannot parse {text!r} as an RFC 3339 time", path=path) from None
    return text


def read_list(value: Any, path: str, item: Callable[[Any, str], T]) -> tuple[T, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise wrong_type(path, value, "an array")
    return tuple(item(v, f"{path}[{i}]") for i, v in enumerate(value))


def read_string_map(value: Any, path: str) -> Labels:
    """map[string]string; a bad value names the map, as Go's decoder reports it.

    Equal maps come back as one shared `Labels` (interned): replicas carry the
    same labels, and every cache keyed by labels then compares by identity.
    """
    if value is None:  # no labels, no annotations: most objects
        return EMPTY
    if isinstance(value, dict) and _STR.issuperset(map(type, value)) \
            and _STR.issuperset(map(type, value.values())):
        items = tuple(value.items())  # strings only: what the loop below would give
        return _intern(_LABELS, items, lambda: Labels(dict(items)))
    out: dict[str, str] = {}
    for k, v in read_object(value, path).items():
        if v is not None and not isinstance(v, str):
            raise DecodeError(
                f"cannot decode {type_name(v)} as a string (key {k!r})", path=path)
        out[k] = v or ""
    return _intern(_LABELS, tuple(out.items()), lambda: Labels(out))


# Interned values of the decoder, bounded (the agent decodes for as long as it runs).
_LABELS: dict[Any, Labels] = {}
_PORT_LISTS: dict[Any, tuple[ContainerPort, ...]] = {}
# A NetworkPolicy's spec as decoded: podSelector, ingress, egress, policyTypes.
PolicySpec = tuple[Selector | None, tuple[Rule, ...], tuple[Rule, ...], tuple[str, ...]]
_SPECS: dict[bytes, PolicySpec] = {}
_INTERNED_MAX = 1 << 16


def clear_interned() -> None:
    """Forget the interned labels and ports (a one-shot command, before it exits)."""
    _LABELS.clear()
    _PORT_LISTS.clear()
    _SPECS.clear()


def _intern(table: dict[Any, T], key: Any, make: Callable[[], T]) -> T:
    found = table.get(key)
    if found is None:
        found = _remember(table, key, make())
    return found


def _remember(table: dict[Any, T], key: Any, value: T) -> T:
    if len(table) >= _INTERNED_MAX:
        table.clear()
    table[key] = value
    return value


class StrictReader:
    """One strict decode: type errors raise at once, unknown fields wait for `finish`.

    The reader of every kind stockade decodes: NetworkPolicies and Pods here, the
    operator's MicroServices (a subclass adds each kind's objects).
    """

    def __init__(self) -> None:
        self.unknown: list[str] = []

    def mapping(self, value: Any, path: str, known: frozenset[str]) -> dict[str, Any]:
        m = read_object(value, path)
        if not known.issuperset(m):
            self.unknown.extend(join_path(path, k) for k in m if k not in known)
        return m

    def finish(self) -> None:
        if self.unknown:
            first, *more = self.unknown
            also = f" (also {', '.join(more)})" if more else ""
            raise DecodeError(f"unknown field{also}", path=first)


class _Strict(StrictReader):
    """The NetworkPolicy's objects (selectors, rules, metadata)."""

    # --- label selectors -------------------------------------------------------

    def selector(self, value: Any, path: str) -> Selector | None:
        if value is None:
            return None
        m = self.mapping(value, path, _SELECTOR)
        return Selector(
            match_labels=read_string_map(m.get("matchLabels"), join_path(path, "matchLabels")),
            match_expressions=read_list(m.get("matchExpressions"),
                                    join_path(path, "matchExpressions"), self.requirement),
        )

    def requirement(self, value: Any, path: str) -> Requirement:
        m = self.mapping(value, path, _REQUIREMENT)
        return Requirement(
            key=read_string(m.get("key"), join_path(path, "key")),
            operator=read_string(m.get("operator"), join_path(path, "operator")),
            values=read_list(m.get("values"), join_path(path, "values"), read_string),
        )

    # --- rules -------------------------------------------------------------------

    def ip_block(self, value: Any, path: str) -> IPBlock | None:
        if value is None:
            return None
        m = self.mapping(value, path, _IP_BLOCK)
        return IPBlock(
            cidr=read_string(m.get("cidr"), join_path(path, "cidr")),
            except_=read_list(m.get("except"), join_path(path, "except"), read_string),
        )

    def peer(self, value: Any, path: str) -> Peer:
        m = self.mapping(value, path, _PEER)
        return Peer(
            pod_selector=self.selector(m.get("podSelector"), join_path(path, "podSelector")),
            namespace_selector=self.selector(m.get("namespaceSelector"),
                                             join_path(path, "namespaceSelector")),
            ip_block=self.ip_block(m.get("ipBlock"), join_path(path, "ipBlock")),
        )

    def port(self, value: Any, path: str) -> PolicyPort:
        m = self.mapping(value, path, _PORT)
        protocol = m.get("protocol")
        end_port = m.get("endPort")
        return PolicyPort(
            # D1: a missing protocol is TCP; an explicit one, even '', is kept for validation.
            protocol=(TCP if protocol is None
                      else read_string(protocol, join_path(path, "protocol"))),
            port=_int_or_string(m.get("port"), join_path(path, "port")),
            end_port=None if end_port is None else read_int32(end_port, join_path(path, "endPort")),
        )

    def rule(self, peers_key: str) -> Callable[[Any, str], Rule]:
        def decode(value: Any, path: str) -> Rule:
            m = self.mapping(value, path, frozenset({"ports", peers_key}))
            return Rule(
                ports=read_list(m.get("ports"), join_path(path, "ports"), self.port),
                peers=read_list(m.get(peers_key), join_path(path, peers_key), self.peer),
            )

        return decode

    # --- metadata ---------------------------------------------------------------

    def metadata(self, value: Any) -> dict[str, Any]:
        """ObjectMeta: every field type-checked, though only some reach the model."""
        m = self.mapping(value, "metadata", frozenset(_META_FIELDS))
        for key, check in _META_FIELDS.items():
            if key in m:
                check(self, m[key], f"metadata.{key}")
        return m

    def owner_reference(self, value: Any, path: str) -> None:
        m = self.mapping(value, path, _OWNER_REFERENCE)
        for key in ("apiVersion", "kind", "name", "uid"):
            read_string(m.get(key), join_path(path, key))
        for key in ("controller", "blockOwnerDeletion"):
            read_boolean(m.get(key), join_path(path, key))

    def managed_fields_entry(self, value: Any, path: str) -> None:
        m = self.mapping(value, path, _MANAGED_FIELDS)
        for key in ("manager", "operation", "apiVersion", "fieldsType", "subresource"):
            read_string(m.get(key), join_path(path, key))
        _time(m.get("time"), join_path(path, "time"))
        # fieldsV1 is free-form JSON, but it has to be an object.
        read_object(m.get("fieldsV1"), join_path(path, "fieldsV1"))


def _int_or_string(value: Any, path: str) -> int | str | None:
    """intstr.IntOrString: a JSON string is a name, anything else must be an int32."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return read_int32(value, path)


def _check(fn: Callable[[Any, str], object]) -> Callable[[_Strict, Any, str], None]:
    def check(_: _Strict, value: Any, path: str) -> None:
        fn(value, path)

    return check


def _check_list(
    item: Callable[[_Strict, Any, str], None],
) -> Callable[[_Strict, Any, str], None]:
    def check(strict: _Strict, value: Any, path: str) -> None:
        read_list(value, path, lambda v, p: item(strict, v, p))

    return check


_META_FIELDS: dict[str, Callable[[_Strict, Any, str], None]] = {
    "name": _check(read_string),
    "generateName": _check(read_string),
    "namespace": _check(read_string),
    "selfLink": _check(read_string),
    "uid": _check(read_string),
    "resourceVersion": _check(read_string),
    "generation": _check(_int64),
    "creationTimestamp": _check(_time),
    "deletionTimestamp": _check(_time),
    "deletionGracePeriodSeconds": _check(_int64),
    "labels": _check(read_string_map),
    "annotations": _check(read_string_map),
    "ownerReferences": _check_list(_Strict.owner_reference),
    "finalizers": _check(lambda v, p: read_list(v, p, read_string)),
    "managedFields": _check_list(_Strict.managed_fields_entry),
}


def type_meta(doc: Any, kind: str, api_versions: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise DecodeError(f"the document is {type_name(doc)}, not a {kind} object")
    api = doc.get("apiVersion")
    if not isinstance(api, str) or api not in api_versions:
        want = " or ".join(api_versions)
        problem = "is missing" if api is None else f"{describe_value(api)!r} does not serve {kind}"
        raise DecodeError(f"{problem}; use {want}", path="apiVersion")
    if doc.get("kind") != kind:
        got = doc.get("kind")
        problem = "is missing" if got is None else f"{describe_value(got)!r} is not {kind}"
        raise DecodeError(problem, path="kind")
    return doc


def _show_number(value: int) -> str:
    # Python refuses to print integers of more than 4300 digits; YAML allows them.
    return str(value) if abs(value) < 10**18 else f"of {value.bit_length()} bits"


def describe_value(value: Any) -> str:
    """A value from a document, shown in a message whatever its type."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return _show_number(value)
    return f"<{type_name(value)}>"


def object_name(doc: Any) -> str:
    """`namespace/name` of a document, as far as it can be told, for messages."""
    if not isinstance(doc, dict):
        return ""
    kind = describe_value(doc.get("kind", "object"))
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return kind
    name = describe_value(meta.get("name") or meta.get("generateName") or "")
    ns = meta.get("namespace")
    ident = f"{ns}/{name}" if isinstance(ns, str) and ns else name
    return f"{kind} {ident}"


def decode_selector(value: Any, path: str) -> Selector | None:
    """A metav1.LabelSelector (None when absent), decoded strictly."""
    strict = _Strict()
    selector = strict.selector(value, path)
    strict.finish()
    return selector


def decode_network_policy(
    doc: Any, source: Source = NO_SOURCE, default_namespace: str = "default", *,
    allow_status: bool = False,
) -> NetworkPolicy:
    """`allow_status`: a top-level `status` object is ignored rather than an unknown
    field (the offline analyses: `kubectl get -o yaml` of clusters before 1.27, and
    generators, write `status: {}`; the API server of today refuses it)."""
    strict = _Strict()
    m = strict.mapping(type_meta(doc, "NetworkPolicy", (NETPOL_API,)), "",
                       _TOP_LEVEL_WITH_STATUS if allow_status else _TOP_LEVEL)
    if allow_status:
        read_object(m.get("status"), "status")
    meta = strict.metadata(m.get("metadata"))
    pod_selector, ingress, egress, types = _policy_spec(strict, m.get("spec"))
    strict.finish()
    return NetworkPolicy(
        # kubectl fills in the namespace of the context when the manifest has none.
        namespace=read_string(meta.get("namespace"), "metadata.namespace") or default_namespace,
        name=read_string(meta.get("name"), "metadata.name"),
        generate_name=read_string(meta.get("generateName"), "metadata.generateName"),
        labels=read_string_map(meta.get("labels"), "metadata.labels"),
        annotations=read_string_map(meta.get("annotations"), "metadata.annotations"),
        pod_selector=pod_selector or ALL,  # D3: no podSelector selects every pod
        ingress=ingress,
        egress=egress,
        policy_types=types,
        source=source,
    )


def _policy_spec(strict: _Strict, value: Any) -> PolicySpec:
    """The spec of a NetworkPolicy: podSelector, ingress, egress and policyTypes.

    Equal specs decode to one value, found by their bytes in `marshal` (version 2,
    which has no back-references: equal values give equal bytes whatever objects
    they share). Those tell apart the types that equality mixes up (`1`, `1.0`,
    `True`), and are written three times faster than a repr. A cluster's namespaces
    repeat the same policies (a default deny, an allow of DNS), and the rules,
    selectors and peers they then share are answered once downstream. Only a
    spec without unknown fields is kept (their paths are reported later).
    """
    try:
        key = marshal.dumps(value, 2) if type(value) is dict else None
    except ValueError:  # a value marshal has no form for (a YAML timestamp) or one
        key = None  # nested too deeply: decoded (and refused) field by field
    found = _SPECS.get(key) if key is not None else None
    if found is not None:
        return found
    own = _Strict()
    spec = own.mapping(value, "spec", _SPEC)  # D3: no spec is an empty spec
    pod_selector = own.selector(spec.get("podSelector"), "spec.podSelector")
    ingress = read_list(spec.get("ingress"), "spec.ingress", own.rule("from"))
    egress = read_list(spec.get("egress"), "spec.egress", own.rule("to"))
    types = read_list(spec.get("policyTypes"), "spec.policyTypes", read_string)
    if not types:
        # D2: absent or empty; `egress: []` does not add Egress.
        types = default_policy_types(spec.get("ingress"), spec.get("egress"))
    decoded = (pod_selector, ingress, egress, types)
    if own.unknown:
        strict.unknown.extend(own.unknown)
    elif key is not None:
        _remember(_SPECS, key, decoded)
    return decoded


def decode_namespace(doc: Any, source: Source = NO_SOURCE) -> Namespace:
    """A Namespace object; the API server always sets the metadata.name label."""
    m = type_meta(doc, "Namespace", ("v1",))
    meta = m.get("metadata") if isinstance(m.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    name = read_string(meta.get("name"), "metadata.name")
    if not name:
        raise DecodeError("a Namespace needs a name", path="metadata.name")
    labels = dict(read_string_map(meta.get("labels"), "metadata.labels"))
    labels[NS_NAME_LABEL] = name
    return Namespace(name, Labels(labels), source)


def decode_pod(doc: Any, source: Source = NO_SOURCE, *, require_ip: bool = True) -> Endpoint:
    """The parts of a Pod that policy depends on: labels, IPs, named ports.

    Pods are read leniently (fields stockade does not use are ignored): they
    describe a cluster, they are not submitted for validation. `require_ip`:
    a Pod without an IP is an error (enforcement needs addresses); the offline
    analyses read Pods whatever their status, and such a Pod has no address.
    """
    plain = _plain_pod(doc, source)
    return plain if plain is not None else decode_pod_reference(doc, source,
                                                               require_ip=require_ip)


def decode_pod_reference(doc: Any, source: Source = NO_SOURCE, *,
                         require_ip: bool = True) -> Endpoint:
    """`decode_pod` field by field, whatever the Pod (the definition; tests compare)."""
    m = type_meta(doc, "Pod", ("v1",))
    meta = m.get("metadata") if isinstance(m.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    name = read_string(meta.get("name"), "metadata.name")
    if not name:
        raise DecodeError("a Pod needs a name", path="metadata.name")
    namespace = read_string(meta.get("namespace"), "metadata.namespace") or "default"
    labels = read_string_map(meta.get("labels"), "metadata.labels")
    status = m.get("status") if isinstance(m.get("status"), dict) else {}
    assert isinstance(status, dict)
    ips: list[str] = []
    for i, entry in enumerate(_pod_list(status.get("podIPs"), "status.podIPs")):
        ip = entry.get("ip") if isinstance(entry, Mapping) else None
        ips.append(read_string(ip, f"status.podIPs[{i}].ip"))
    pod_ip = read_string(status.get("podIP"), "status.podIP")
    if pod_ip and pod_ip not in ips:
        ips.insert(0, pod_ip)
    if not ips and require_ip:
        raise DecodeError("the Pod has no IP (status.podIP or status.podIPs)", path="status.podIP")
    for i, ip in enumerate(ips):
        if not is_canonical_ipv4(ip) and parse_ip(ip) is None:
            where = "status.podIP" if ip == pod_ip and i == 0 else f"status.podIPs[{i}].ip"
            raise DecodeError(f"{ip!r} is not an IP address", path=where)
    spec = m.get("spec") if isinstance(m.get("spec"), dict) else {}
    assert isinstance(spec, dict)
    return Endpoint(namespace, name, labels, tuple(ips), _container_ports(spec), source)


def _plain_pod(doc: Any, source: Source) -> Endpoint | None:
    """`decode_pod` of the usual Pod (a name and a namespace, one canonical IPv4
    address, every field of the expected type) in a few lookups; None for any
    other, which the general reading decodes or words the error of."""
    if type(doc) is not dict or doc.get("apiVersion") != "v1" or doc.get("kind") != "Pod":
        return None
    meta, status, spec = doc.get("metadata"), doc.get("status"), doc.get("spec")
    if type(meta) is not dict or type(status) is not dict or type(spec) is not dict:
        return None
    name, namespace = meta.get("name"), meta.get("namespace")
    if type(name) is not str or type(namespace) is not str or not name or not namespace:
        return None
    ip = status.get("podIP")
    if type(ip) is not str or not is_canonical_ipv4(ip):
        return None
    ips = status.get("podIPs")
    if ips is not None and not (type(ips) is list and len(ips) == 1
                                and type(ips[0]) is dict and ips[0].get("ip") == ip):
        return None
    labels = read_string_map(meta.get("labels"), "metadata.labels")
    return Endpoint(namespace, name, labels, (ip,), _container_ports(spec), source)


# Workload kinds whose pods are described by a pod template, and where it is.
WORKLOAD_TEMPLATES: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


def workload_endpoint_name(name: str, kind: str) -> str:
    """The endpoint name a workload is analysed under: `name[Kind]`, as netpol-analyzer
    writes peers (no Pod name has brackets, so it never meets one)."""
    return f"{name}[{kind}]"


def decode_workload(doc: Any, source: Source = NO_SOURCE) -> Endpoint:
    """A workload as one address-less endpoint: its pod template's labels and ports.

    Named `name[Kind]` in the workload's namespace (see `workload_endpoint_name`);
    read leniently, as Pods are. Every apiVersion is accepted (apps/v1, batch/v1,
    their betas): only the template matters.
    """
    if not isinstance(doc, dict):
        raise DecodeError(f"the document is {type_name(doc)}, not an object")
    kind = doc.get("kind")
    if not isinstance(kind, str) or kind not in WORKLOAD_TEMPLATES:
        raise DecodeError(f"{describe_value(kind)!r} is not a workload kind", path="kind")
    meta = read_object(doc.get("metadata"), "metadata")
    name = read_string(meta.get("name"), "metadata.name")
    if not name:
        raise DecodeError(f"a {kind} needs a name", path="metadata.name")
    namespace = read_string(meta.get("namespace"), "metadata.namespace") or "default"
    template: Any = doc
    path = ""
    for key in WORKLOAD_TEMPLATES[kind]:
        template = read_object(template, path or "document").get(key)
        path = join_path(path, key)
    tmpl = read_object(template, path)
    tmeta = read_object(tmpl.get("metadata"), join_path(path, "metadata"))
    labels = read_string_map(tmeta.get("labels"), join_path(path, "metadata.labels"))
    spec = read_object(tmpl.get("spec"), join_path(path, "spec"))
    try:
        ports = _container_ports(spec)
    except DecodeError as exc:
        raise DecodeError(exc.message.removeprefix(f"{exc.path}: "),
                          path=join_path(path, exc.path)) from None
    return Endpoint(namespace, workload_endpoint_name(name, kind), labels, (), ports, source)


def pod_controller(doc: Any) -> tuple[str, str] | None:
    """(kind, name) of a Pod's controller, as its ownerReferences write it.

    The first reference marked `controller: true` whose kind is not Node (a static
    pod's mirror is its own workload); None when there is none.
    """
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    refs = meta.get("ownerReferences") if isinstance(meta, dict) else None
    if not isinstance(refs, list):
        return None
    for ref in refs:
        if not isinstance(ref, dict) or ref.get("controller") is not True:
            continue
        kind, name = ref.get("kind"), ref.get("name")
        if isinstance(kind, str) and isinstance(name, str) and kind and name \
                and kind != "Node":
            return kind, name
    return None


def _container_ports(spec: Mapping[str, Any]) -> tuple[ContainerPort, ...]:
    """Every `containers[*].ports[*]` of a pod spec.

    The same declarations decode to the same ports: replicas share one tuple,
    found by the declarations' plain values (`_ports_key`)."""
    key = _ports_key(spec.get("containers"))
    if key is None:
        return _read_container_ports(spec)
    found = _PORT_LISTS.get(key)
    if found is None:
        found = _remember(_PORT_LISTS, key, _read_container_ports(spec))
    return found


def _ports_key(containers: Any) -> tuple[object, ...] | None:
    """The port declarations of a pod's containers, in order, as a key (None ends a
    container, so the position of each, and so its path, is in the key); None when
    one is not plain (an int port, a string or null protocol and name: `True == 1`
    must not meet)."""
    if type(containers) is not list:
        return None
    key: list[object] = []
    for c in containers:
        if type(c) is not dict:
            return None
        ports = c.get("ports")
        if ports is not None:
            if type(ports) is not list:
                return None
            for p in ports:
                if type(p) is not dict:
                    return None
                raw = (p.get("containerPort"), p.get("protocol"), p.get("name"))
                if type(raw[0]) is not int or type(raw[1]) not in _TEXT \
                        or type(raw[2]) not in _TEXT:
                    return None
                key.append(raw)
        key.append(None)
    return tuple(key)


_TEXT = frozenset({str, type(None)})


def _read_container_ports(spec: Mapping[str, Any]) -> tuple[ContainerPort, ...]:
    ports: list[ContainerPort] = []
    for ci, c in enumerate(_pod_list(spec.get("containers"), "spec.containers")):
        if not isinstance(c, dict):
            raise wrong_type(f"spec.containers[{ci}]", c, "an object")
        for pi, p in enumerate(_pod_list(c.get("ports"), f"spec.containers[{ci}].ports")):
            if not isinstance(p, dict):
                raise wrong_type(f"spec.containers[{ci}].ports[{pi}]", p, "an object")
            ports.append(_container_port(f"spec.containers[{ci}].ports[{pi}]",
                                         p.get("containerPort"), p.get("protocol"),
                                         p.get("name")))
    return tuple(ports)


def _container_port(path: str, port: Any, protocol: Any, name: Any) -> ContainerPort:
    return ContainerPort(
        port=read_int32(port, f"{path}.containerPort"),
        protocol=read_string(protocol, f"{path}.protocol") or TCP,
        name=read_string(name, f"{path}.name"),
        path=path,
    )


def _pod_list(value: Any, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise wrong_type(path, value, "an array")
    return value
