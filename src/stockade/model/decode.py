"""Strict decoding of Kubernetes objects (as kubectl's strict field validation does).

A document that is not a well-typed object never reaches validation: an unknown
field, a value of the wrong type, a number that does not fit int32 or a wrong
apiVersion/kind raises DecodeError naming the field. Decoding applies the API
server's defaults (protocol TCP, policyTypes inference, empty podSelector).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from stockade.errors import DecodeError
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
NETPOL_API = "networking.k8s.io/v1"

_OBJECT_META = {
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion",
    "generation", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds",
    "labels", "annotations", "ownerReferences", "finalizers", "managedFields",
}


def _type_name(value: Any) -> str:
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


def _wrong(path: str, value: Any, want: str) -> DecodeError:
    return DecodeError(f"cannot decode {_type_name(value)} as {want}", path=path)


def _mapping(value: Any, path: str, known: set[str] | frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _wrong(path, value, "an object")
    for key in value:
        if not isinstance(key, str):
            raise DecodeError(f"field name {key!r} is not a string", path=path)
        if key not in known:
            raise DecodeError("unknown field", path=_join(path, key))
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _string(value: Any, path: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _wrong(path, value, "a string")
    return value


def _int32(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise _wrong(path, value, "an int32")
    if not INT32_MIN <= value <= INT32_MAX:
        raise DecodeError(f"number {value} does not fit int32", path=path)
    return int(value)


def _list(value: Any, path: str, item: Callable[[Any, str], T]) -> tuple[T, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _wrong(path, value, "an array")
    return tuple(item(v, f"{path}[{i}]") for i, v in enumerate(value))


def _string_map(value: Any, path: str) -> Labels:
    if value is None:
        return EMPTY
    if not isinstance(value, dict):
        raise _wrong(path, value, "a map of strings")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise DecodeError(f"key {k!r} is not a string", path=path)
        out[k] = _string(v, _join(path, k))
    return Labels(out)


def decode_selector(value: Any, path: str) -> Selector | None:
    if value is None:
        return None
    m = _mapping(value, path, {"matchLabels", "matchExpressions"})
    return Selector(
        match_labels=_string_map(m.get("matchLabels"), _join(path, "matchLabels")),
        match_expressions=_list(
            m.get("matchExpressions"), _join(path, "matchExpressions"), _requirement
        ),
    )


def _requirement(value: Any, path: str) -> Requirement:
    m = _mapping(value, path, {"key", "operator", "values"})
    return Requirement(
        key=_string(m.get("key"), _join(path, "key")),
        operator=_string(m.get("operator"), _join(path, "operator")),
        values=_list(m.get("values"), _join(path, "values"), _string),
    )


def _ip_block(value: Any, path: str) -> IPBlock | None:
    if value is None:
        return None
    m = _mapping(value, path, {"cidr", "except"})
    return IPBlock(
        cidr=_string(m.get("cidr"), _join(path, "cidr")),
        except_=_list(m.get("except"), _join(path, "except"), _string),
    )


def _peer(value: Any, path: str) -> Peer:
    if value is None:
        return Peer()
    m = _mapping(value, path, {"podSelector", "namespaceSelector", "ipBlock"})
    return Peer(
        pod_selector=decode_selector(m.get("podSelector"), _join(path, "podSelector")),
        namespace_selector=decode_selector(
            m.get("namespaceSelector"), _join(path, "namespaceSelector")
        ),
        ip_block=_ip_block(m.get("ipBlock"), _join(path, "ipBlock")),
    )


def _int_or_string(value: Any, path: str) -> int | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return _int32(value, path)


def _port(value: Any, path: str) -> PolicyPort:
    m = _mapping(value or {}, path, {"protocol", "port", "endPort"})
    protocol = m.get("protocol")
    end_port = m.get("endPort")
    return PolicyPort(
        # D1: a missing protocol is TCP; an explicit one, even '', is kept for validation.
        protocol=TCP if protocol is None else _string(protocol, _join(path, "protocol")),
        port=_int_or_string(m.get("port"), _join(path, "port")),
        end_port=None if end_port is None else _int32(end_port, _join(path, "endPort")),
    )


def _rule(peers_key: str) -> Callable[[Any, str], Rule]:
    def decode(value: Any, path: str) -> Rule:
        m = _mapping(value or {}, path, {"ports", peers_key})
        return Rule(
            ports=_list(m.get("ports"), _join(path, "ports"), _port),
            peers=_list(m.get(peers_key), _join(path, peers_key), _peer),
        )

    return decode


def _type_meta(doc: Any, kind: str, api_versions: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise DecodeError(f"the document is {_type_name(doc)}, not a {kind} object")
    api = doc.get("apiVersion")
    if api not in api_versions:
        want = " or ".join(api_versions)
        raise DecodeError(f"{api!r} is not supported for {kind}; use {want}", path="apiVersion")
    if doc.get("kind") != kind:
        raise DecodeError(f"{doc.get('kind')!r} is not {kind}", path="kind")
    return doc


def _metadata(value: Any) -> dict[str, Any]:
    m = _mapping(value or {}, "metadata", _OBJECT_META)
    for key in ("name", "generateName", "namespace"):
        _string(m.get(key), f"metadata.{key}")
    return m


def object_name(doc: Any) -> str:
    """`namespace/name` of a document, as far as it can be told, for messages."""
    if not isinstance(doc, dict):
        return ""
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return str(doc.get("kind", "object"))
    name = meta.get("name") or meta.get("generateName") or ""
    ns = meta.get("namespace")
    ident = f"{ns}/{name}" if isinstance(ns, str) and ns else str(name)
    return f"{doc.get('kind', 'object')} {ident}"


def decode_network_policy(
    doc: Any, source: Source = NO_SOURCE, default_namespace: str = "default"
) -> NetworkPolicy:
    m = _type_meta(doc, "NetworkPolicy", (NETPOL_API,))
    _mapping(m, "", {"apiVersion", "kind", "metadata", "spec"})
    meta = _metadata(m.get("metadata"))
    spec = _mapping(m.get("spec") or {}, "spec", {"podSelector", "ingress", "egress",
                                                  "policyTypes"})
    ingress = _list(spec.get("ingress"), "spec.ingress", _rule("from"))
    egress = _list(spec.get("egress"), "spec.egress", _rule("to"))
    types = _list(spec.get("policyTypes"), "spec.policyTypes", _string)
    if not types:
        # D2: absent or empty; `egress: []` does not add Egress.
        types = default_policy_types(spec.get("ingress"), spec.get("egress"))
    return NetworkPolicy(
        namespace=_string(meta.get("namespace"), "metadata.namespace") or default_namespace,
        name=_string(meta.get("name"), "metadata.name"),
        generate_name=_string(meta.get("generateName"), "metadata.generateName"),
        labels=_string_map(meta.get("labels"), "metadata.labels"),
        annotations=_string_map(meta.get("annotations"), "metadata.annotations"),
        pod_selector=decode_selector(spec.get("podSelector"), "spec.podSelector") or ALL,
        ingress=ingress,
        egress=egress,
        policy_types=types,
        source=source,
    )


def decode_namespace(doc: Any) -> Namespace:
    """A Namespace object; the API server always sets the metadata.name label."""
    m = _type_meta(doc, "Namespace", ("v1",))
    meta = m.get("metadata") if isinstance(m.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    name = _string(meta.get("name"), "metadata.name")
    if not name:
        raise DecodeError("a Namespace needs a name", path="metadata.name")
    labels = dict(_string_map(meta.get("labels"), "metadata.labels"))
    labels[NS_NAME_LABEL] = name
    return Namespace(name, Labels(labels))


def decode_pod(doc: Any, source: Source = NO_SOURCE) -> Endpoint:
    """The parts of a Pod that policy depends on: labels, IPs, named ports.

    Pods are read leniently (fields stockade does not use are ignored): they
    describe a cluster, they are not submitted for validation.
    """
    m = _type_meta(doc, "Pod", ("v1",))
    meta = m.get("metadata") if isinstance(m.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    name = _string(meta.get("name"), "metadata.name")
    if not name:
        raise DecodeError("a Pod needs a name", path="metadata.name")
    namespace = _string(meta.get("namespace"), "metadata.namespace") or "default"
    labels = _string_map(meta.get("labels"), "metadata.labels")
    status = m.get("status") if isinstance(m.get("status"), dict) else {}
    assert isinstance(status, dict)
    ips: list[str] = []
    for i, entry in enumerate(status.get("podIPs") or []):
        ip = entry.get("ip") if isinstance(entry, Mapping) else None
        ips.append(_string(ip, f"status.podIPs[{i}].ip"))
    pod_ip = _string(status.get("podIP"), "status.podIP")
    if pod_ip and pod_ip not in ips:
        ips.insert(0, pod_ip)
    if not ips:
        raise DecodeError("the Pod has no IP (status.podIP or status.podIPs)", path="status.podIP")
    spec = m.get("spec") if isinstance(m.get("spec"), dict) else {}
    assert isinstance(spec, dict)
    ports: list[ContainerPort] = []
    for ci, c in enumerate(spec.get("containers") or []):
        if not isinstance(c, dict):
            raise _wrong(f"spec.containers[{ci}]", c, "an object")
        for pi, p in enumerate(c.get("ports") or []):
            path = f"spec.containers[{ci}].ports[{pi}]"
            if not isinstance(p, dict):
                raise _wrong(path, p, "an object")
            ports.append(ContainerPort(
                port=_int32(p.get("containerPort"), f"{path}.containerPort"),
                protocol=_string(p.get("protocol"), f"{path}.protocol") or TCP,
                name=_string(p.get("name"), f"{path}.name"),
            ))
    return Endpoint(namespace, name, labels, tuple(ips), tuple(ports), source)
