"""Decoding and validating a ClusterNetworkPolicy as the API server does for its CRD.

Types and unknown fields are checked strictly first (DecodeError, as for every
kind). Then the CRD's OpenAPI schema and its CEL rules, every error collected, in
the API server's wording for CRDs (`spec.priority in body should be less than or
equal to 1000`); a policy with any of them raises ValidationError and never
reaches the model. What is decoded is stored as written: a CRD has no defaults.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from stockade.errors import DecodeError, ValidationError
from stockade.model.cnp import (
    ACTIONS,
    CNP_API,
    CNP_KIND,
    MAX_NETWORKS,
    MAX_PEERS,
    MAX_PRIORITY,
    MAX_PROTOCOLS,
    MAX_RULE_NAME,
    MAX_RULES,
    MIN_PRIORITY,
    NAMESPACES,
    NETWORKS,
    PODS,
    TIERS,
    UNKNOWN,
    ClusterNetworkPolicy,
    CnpPeer,
    CnpPort,
    CnpRule,
)
from stockade.model.decode import (
    _Strict,
    join_path,
    read_int32,
    read_list,
    read_object,
    read_string,
    read_string_map,
    type_meta,
)
from stockade.model.field import (
    INVALID,
    REQUIRED,
    TOO_LONG,
    UNSUPPORTED,
    FieldError,
    invalid_each,
)
from stockade.model.names import name_is_dns_subdomain
from stockade.model.policy import NO_SOURCE, SCTP, TCP, UDP, Source
from stockade.model.selector import ALL, Selector
from stockade.model.validate import validate_labels, validate_selector

_TOP = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})
_SPEC = frozenset({"tier", "priority", "subject", "ingress", "egress"})
_SUBJECT = frozenset({NAMESPACES, PODS})
_INGRESS_PEER = frozenset({NAMESPACES, PODS})
_EGRESS_PEER = frozenset({NAMESPACES, PODS, NETWORKS, "nodes", "domainNames"})
_NAMESPACED_POD = frozenset({"namespaceSelector", "podSelector"})
_PROTOCOL = frozenset({"tcp", "udp", "sctp", "destinationNamedPort"})
_PROTOCOL_PORT = frozenset({"destinationPort"})
_PORT = frozenset({"number", "range"})
_RANGE = frozenset({"start", "end"})
_PROTOCOL_NAMES = {"tcp": TCP, "udp": UDP, "sctp": SCTP}
_MAX_CIDR = 43
_NAMED_PORT_WITH_NETWORKS = (
    "networks/nodes/domainNames peer cannot be set with namedPorts since there are no "
    "namedPorts for networks/nodes/domainNames")


def _min_properties(path: str, count: int) -> FieldError:
    return FieldError(path, INVALID, f"{path} in body should have at least 1 properties", count)


def _max_properties(path: str, count: int) -> FieldError:
    return FieldError(path, INVALID, f"{path} in body should have at most 1 properties", count)


def _too_many(path: str, count: int, limit: int) -> FieldError:
    return FieldError(path, "Too many", f"must have at most {limit} items", count)


def _too_few(path: str, count: int) -> FieldError:
    return FieldError(path, INVALID, f"{path} in body should have at least 1 items", count)


class _Reader:
    """One policy: strict types through `_Strict`, schema errors collected here."""

    def __init__(self) -> None:
        self.strict = _Strict()
        self.errors: list[FieldError] = []

    def mapping(self, value: Any, path: str, known: frozenset[str]) -> dict[str, Any]:
        return self.strict.mapping(value, path, known)

    def one_of(self, m: dict[str, Any], path: str) -> None:
        """MinProperties=1, MaxProperties=1 (null values do not count)."""
        count = sum(1 for v in m.values() if v is not None)
        if count == 0:
            self.errors.append(_min_properties(path, 0))
        elif count > 1:
            self.errors.append(_max_properties(path, count))

    def items(self, value: Any, path: str, limit: int, *, required: bool) -> list[Any]:
        if value is None:
            if required:
                self.errors.append(FieldError(path, REQUIRED))
            return []
        if not isinstance(value, list):
            read_list(value, path, lambda v, p: v)  # raises the type error
        if required and not value:
            self.errors.append(_too_few(path, 0))
        if len(value) > limit:
            self.errors.append(_too_many(path, len(value), limit))
        return list(value)

    def selector(self, value: Any, path: str) -> Selector:
        selector = self.strict.selector(value, path) or ALL
        self.errors.extend(validate_selector(selector, path))
        return selector

    # --- subject and peers ---------------------------------------------------------

    def peer(self, value: Any, path: str, known: frozenset[str]) -> CnpPeer:
        m = self.mapping(value, path, known)
        self.one_of(m, path)
        written = tuple(k for k in m if m[k] is not None)
        if m.get(NAMESPACES) is not None:
            return CnpPeer(NAMESPACES, namespace_selector=self.selector(
                m[NAMESPACES], join_path(path, NAMESPACES)), written=written)
        if m.get(PODS) is not None:
            return self.namespaced_pod(m[PODS], join_path(path, PODS), written)
        if m.get(NETWORKS) is not None:
            return CnpPeer(NETWORKS, networks=self.networks(m[NETWORKS],
                                                           join_path(path, NETWORKS)),
                           written=written)
        for key in ("nodes", "domainNames"):
            if m.get(key) is not None:
                # Experimental peers stockade does not implement: typed, then failed closed.
                inner = join_path(path, key)
                if key == "nodes":
                    self.selector(m[key], inner)
                else:
                    read_list(m[key], inner, read_string)
        return CnpPeer(UNKNOWN, written=written)

    def namespaced_pod(self, value: Any, path: str, written: tuple[str, ...]) -> CnpPeer:
        m = self.mapping(value, path, _NAMESPACED_POD)
        if "podSelector" not in m:
            self.errors.append(FieldError(join_path(path, "podSelector"), REQUIRED))
        return CnpPeer(
            PODS,
            namespace_selector=self.selector(m.get("namespaceSelector"),
                                             join_path(path, "namespaceSelector")),
            pod_selector=self.selector(m.get("podSelector"), join_path(path, "podSelector")),
            written=written)

    def networks(self, value: Any, path: str) -> tuple[str, ...]:
        cidrs = read_list(value, path, read_string)
        if not cidrs:
            self.errors.append(_too_few(path, 0))
        if len(cidrs) > MAX_NETWORKS:
            self.errors.append(_too_many(path, len(cidrs), MAX_NETWORKS))
        seen: set[str] = set()
        for i, cidr in enumerate(cidrs):
            item = f"{path}[{i}]"
            if cidr in seen:  # listType=set
                self.errors.append(FieldError(item, "Duplicate value", value=cidr))
            seen.add(cidr)
            if len(cidr) > _MAX_CIDR:
                self.errors.append(FieldError(item, TOO_LONG,
                                              f"may not be more than {_MAX_CIDR} bytes"))
            elif not is_cidr(cidr):
                self.errors.append(FieldError(item, INVALID, "Invalid CIDR format provided",
                                              "string"))
        return cidrs

    # --- rules ----------------------------------------------------------------------

    def rule(self, value: Any, path: str, peers_key: str, known: frozenset[str]) -> CnpRule:
        m = self.mapping(value, path, frozenset({"name", "action", peers_key, "protocols"}))
        name = read_string(m.get("name"), join_path(path, "name"))
        if len(name) > MAX_RULE_NAME:
            self.errors.append(FieldError(join_path(path, "name"), TOO_LONG,
                                          f"may not be more than {MAX_RULE_NAME} bytes"))
        action = read_string(m.get("action"), join_path(path, "action"))
        if "action" not in m or m["action"] is None:
            self.errors.append(FieldError(join_path(path, "action"), REQUIRED))
        elif action not in ACTIONS:
            self.errors.append(FieldError(join_path(path, "action"), UNSUPPORTED,
                                          _supported(ACTIONS), action))
        peers_path = join_path(path, peers_key)
        peers = tuple(self.peer(v, f"{peers_path}[{i}]", known) for i, v in
                      enumerate(self.items(m.get(peers_key), peers_path, MAX_PEERS,
                                           required=True)))
        ports: tuple[CnpPort, ...] | None = None
        if m.get("protocols") is not None:
            ppath = join_path(path, "protocols")
            entries = self.items(m["protocols"], ppath, MAX_PROTOCOLS, required=True)
            ports = tuple(self.protocol(v, f"{ppath}[{i}]") for i, v in enumerate(entries))
        if ports and any(p.name for p in ports) \
                and any(p.kind in (NETWORKS, UNKNOWN) and set(p.written) & {
                    NETWORKS, "nodes", "domainNames"} for p in peers):
            self.errors.append(FieldError(path, INVALID, _NAMED_PORT_WITH_NETWORKS, "object"))
        return CnpRule(action=action, peers=peers, ports=ports, name=name)

    def protocol(self, value: Any, path: str) -> CnpPort:
        m = self.mapping(value, path, _PROTOCOL)
        self.one_of(m, path)
        named = read_string(m.get("destinationNamedPort"),
                            join_path(path, "destinationNamedPort"))
        for key, protocol in _PROTOCOL_NAMES.items():
            if m.get(key) is not None:
                return self.protocol_port(m[key], join_path(path, key), protocol)
        if named:
            return CnpPort(name=named)
        return CnpPort()  # nothing usable: already an error

    def protocol_port(self, value: Any, path: str, protocol: str) -> CnpPort:
        m = self.mapping(value, path, _PROTOCOL_PORT)
        if not any(v is not None for v in m.values()):
            self.errors.append(_min_properties(path, 0))
            return CnpPort(protocol, 1, 65535)
        ppath = join_path(path, "destinationPort")
        port = self.mapping(m["destinationPort"], ppath, _PORT)
        self.one_of(port, ppath)
        if port.get("number") is not None:
            number = self.port_number(port["number"], join_path(ppath, "number"))
            return CnpPort(protocol, number, number)
        if port.get("range") is not None:
            rpath = join_path(ppath, "range")
            r = self.mapping(port["range"], rpath, _RANGE)
            start = self.port_number(r.get("start"), join_path(rpath, "start"))
            end = self.port_number(r.get("end"), join_path(rpath, "end"))
            if start and end and not start < end:
                self.errors.append(FieldError(rpath, INVALID,
                                              "Start port must be less than End port", "object"))
            return CnpPort(protocol, start, end)
        return CnpPort(protocol, 1, 65535)

    def port_number(self, value: Any, path: str) -> int:
        if value is None:
            self.errors.append(FieldError(path, REQUIRED))
            return 0
        number = read_int32(value, path)
        if number < 1:
            self.errors.append(FieldError(
                path, INVALID, f"{path} in body should be greater than or equal to 1", number))
        elif number > 65535:
            self.errors.append(FieldError(
                path, INVALID, f"{path} in body should be less than or equal to 65535", number))
        return number


def is_cidr(text: str) -> bool:
    """CEL's `isCIDR` (Go's netip.ParsePrefix): an address, `/`, a prefix length without
    leading zeros; host bits may be set, zones and IPv4-mapped forms may not."""
    address, slash, bits = text.partition("/")
    if not slash or not re.fullmatch(r"0|[1-9][0-9]{0,2}", bits, re.ASCII) or "%" in address:
        return False
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return not (network.version == 6 and "." in address)


def _supported(values: tuple[str, ...]) -> str:
    return "supported values: " + ", ".join(f'"{v}"' for v in values)


def decode_cluster_network_policy(doc: Any, source: Source = NO_SOURCE) -> ClusterNetworkPolicy:
    """A ClusterNetworkPolicy, or DecodeError (types) / ValidationError (every rule)."""
    reader = _Reader()
    m = reader.mapping(type_meta(doc, CNP_KIND, (CNP_API,)), "", _TOP)
    read_object(m.get("status"), "status")
    meta = reader.strict.metadata(m.get("metadata"))
    spec = reader.mapping(m.get("spec"), "spec", _SPEC)
    tier = read_string(spec.get("tier"), "spec.tier")
    priority_raw = spec.get("priority")
    priority = 0 if priority_raw is None else read_int32(priority_raw, "spec.priority")
    subject_raw = spec.get("subject")
    ingress_raw = spec.get("ingress")
    egress_raw = spec.get("egress")
    name = read_string(meta.get("name"), "metadata.name")
    labels = read_string_map(meta.get("labels"), "metadata.labels")
    annotations = read_string_map(meta.get("annotations"), "metadata.annotations")
    # Types first, as the API server decodes before it validates: every rule is read.
    subject = reader.peer(subject_raw, "spec.subject", _SUBJECT) \
        if subject_raw is not None else CnpPeer(UNKNOWN)
    ingress = tuple(reader.rule(v, f"spec.ingress[{i}]", "from", _INGRESS_PEER)
                    for i, v in enumerate(reader.items(ingress_raw, "spec.ingress", MAX_RULES,
                                                       required=False)))
    egress = tuple(reader.rule(v, f"spec.egress[{i}]", "to", _EGRESS_PEER)
                   for i, v in enumerate(reader.items(egress_raw, "spec.egress", MAX_RULES,
                                                      required=False)))
    reader.strict.finish()
    errors = reader.errors
    head: list[FieldError] = []
    if not name:
        head.append(FieldError("metadata.name", REQUIRED, "name or generateName is required"))
    elif meta.get("namespace"):
        # Cluster-scoped: kubectl drops a namespace for such kinds; the API refuses one.
        head.append(FieldError("metadata.namespace", "Forbidden",
                               "not allowed on this type"))
    else:
        head.extend(invalid_each("metadata.name", name, name_is_dns_subdomain(name, False)))
    head.extend(validate_labels(labels, "metadata.labels"))
    if spec.get("tier") is None:
        head.append(FieldError("spec.tier", REQUIRED))
    elif tier not in TIERS:
        head.append(FieldError("spec.tier", UNSUPPORTED, _supported(TIERS), tier))
    if priority_raw is None:
        head.append(FieldError("spec.priority", REQUIRED))
    elif priority < MIN_PRIORITY:
        head.append(FieldError("spec.priority", INVALID,
                               "spec.priority in body should be greater than or equal to 0",
                               priority))
    elif priority > MAX_PRIORITY:
        head.append(FieldError("spec.priority", INVALID,
                               "spec.priority in body should be less than or equal to 1000",
                               priority))
    if subject_raw is None:
        head.append(FieldError("spec.subject", REQUIRED))
    if head or errors:
        raise ValidationError([*head, *errors], source=source.render(),
                              obj=f"{CNP_KIND} {name}")
    return ClusterNetworkPolicy(name=name, tier=tier, priority=priority, subject=subject,
                                ingress=ingress, egress=egress, labels=labels,
                                annotations=annotations, source=source)


def decode_error_in(exc: DecodeError, name: str) -> DecodeError:
    """`exc` naming the policy (decoding errors are raised before the name is known)."""
    return DecodeError(exc.message.removeprefix(f"{exc.path}: "), path=exc.path,
                       source=exc.source, obj=f"{CNP_KIND} {name}")
