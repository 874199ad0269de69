"""Admission: every object stockade reads, checked with the API server's rules (pure).

Policies have `validate.validate_policy`; this module adds the Pods and
Namespaces stockade reads its selectors' inputs from: names, namespaces,
labels, IPs and container ports, worded like the API server (field path,
reason, value, detail). It is the one function every path calls (files, the
agent's socket, the CNI plugin, the container manager), so an object refused on
one path is refused on all of them.

Why each rule matters here and not only in Kubernetes: a container port outside
1-65535 is a kernel set element the kernel refuses, which failed every later
transaction; a name with a newline spoofs `get` output; two endpoints holding
one address make the kernel map point at one of their chains only.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from stockade.errors import InputError, ValidationError
from stockade.model import names
from stockade.model.cidr import ip_version, is_canonical_ipv4, parse_ip
from stockade.model.cluster import NS_NAME_LABEL, Endpoint, Namespace
from stockade.model.field import (
    FORBIDDEN,
    INVALID,
    REQUIRED,
    UNSUPPORTED,
    FieldError,
    invalid_each,
)
from stockade.model.policy import PROTOCOLS, NetworkPolicy
from stockade.model.validate import VALID, validate_labels, validate_names, validate_policy

DUPLICATE = "Duplicate value"
# Labels the system sets; nobody may set or remove them by hand.
RESERVED_NAMESPACE_LABELS = (NS_NAME_LABEL,)


def validate_namespace(ns: Namespace) -> list[FieldError]:
    """A Namespace: a DNS-1123 label for a name, valid labels, its name label intact."""
    errs: list[FieldError] = []
    if not ns.name:
        errs.append(FieldError("metadata.name", REQUIRED, "name or generateName is required"))
    else:
        errs += invalid_each("metadata.name", ns.name, names.name_is_dns_label(ns.name, False))
    errs += validate_labels(ns.labels, "metadata.labels")
    if ns.labels.get(NS_NAME_LABEL) != ns.name:
        errs.append(FieldError(f"metadata.labels[{NS_NAME_LABEL}]", INVALID,
                               "is set by the system to the namespace's name",
                               ns.labels.get(NS_NAME_LABEL, "")))
    return errs


def validate_label_change(kind: str, set_: Mapping[str, str],
                          remove: Iterable[str]) -> list[FieldError]:
    """Labels set or removed by hand: valid, and none the system owns."""
    errs = validate_labels(set_, "labels")
    if kind == "namespace":
        for key in [*set_, *remove]:
            if key in RESERVED_NAMESPACE_LABELS:
                errs.append(FieldError(f"labels[{key}]", FORBIDDEN,
                                       "is set by the system to the namespace's name and "
                                       "cannot be changed"))
    return errs


def validate_endpoint(ep: Endpoint) -> list[FieldError]:
    """A Pod as policy reads it: name, namespace, labels, IPs, container ports."""
    errs = validate_names(ep.name, ep.namespace)
    errs += validate_labels(ep.labels, "metadata.labels")
    errs += validate_pod_ips(ep.ips)
    errs += validate_container_ports(ep)
    if ep.port or ep.mac:
        errs += validate_attachment(ep.port, ep.mac)
    return errs


# What stockade's plumber and CNI plugin name a host interface (a kernel name is at most
# 15 bytes); a guard's port is a set element and a map key, so nothing else gets there.
_IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def validate_attachment(port: str, mac: str) -> list[FieldError]:
    """The host interface and MAC an endpoint is bound to: a port name, and a lowercase
    unicast MAC (a guard on a multicast or zero MAC would pass nothing of the pod's)."""
    errs: list[FieldError] = []
    if not _IFNAME.fullmatch(port):
        errs.append(FieldError("hostInterface", INVALID if port else REQUIRED,
                               "must be an interface name (1-15 letters, digits, '_', '.' "
                               "or '-', starting with a letter or digit)", port))
    if mac and (not _MAC.fullmatch(mac) or int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00"):
        errs.append(FieldError("mac", INVALID, "must be a unicast MAC address in lowercase "
                                               "(aa:bb:cc:dd:ee:ff)", mac))
    return errs


def validate_pod_ips(ips: Sequence[str]) -> list[FieldError]:
    """status.podIPs: at least one, each an IP, at most one per family."""
    if len(ips) == 1 and is_canonical_ipv4(ips[0]):
        return []  # a pod's usual address: no need to parse it
    if not ips:
        return [FieldError("status.podIPs", REQUIRED, "an endpoint needs an IP address")]
    errs: list[FieldError] = []
    families: dict[int, str] = {}
    for i, text in enumerate(ips):
        path = f"status.podIPs[{i}].ip"
        version = ip_version(text)
        if version is None:
            errs.append(FieldError(path, INVALID, "must be a valid IP address", text))
        elif version in families:
            errs.append(FieldError(path, INVALID,
                                   "may specify no more than one IP for each IP family", text))
        else:
            families[version] = text
    return errs


def validate_container_ports(ep: Endpoint) -> list[FieldError]:
    """containerPort 1-65535, a supported protocol, unique IANA service names."""
    if ep.ports in VALID.seen:
        return []
    errs: list[FieldError] = []
    seen: dict[str, str] = {}
    for i, port in enumerate(ep.ports):
        path = port.path or f"spec.containers[*].ports[{i}]"
        errs += invalid_each(f"{path}.containerPort", port.port, names.is_valid_port_num(port.port))
        if port.protocol not in PROTOCOLS:
            errs.append(FieldError(f"{path}.protocol", UNSUPPORTED,
                                   "supported values: " + ", ".join(f'"{p}"' for p in PROTOCOLS),
                                   port.protocol))
        if port.name:
            errs += invalid_each(f"{path}.name", port.name, names.is_valid_port_name(port.name))
            if port.name in seen:
                errs.append(FieldError(f"{path}.name", DUPLICATE,
                                       f"also the name of {seen[port.name]}", port.name))
            else:
                seen[port.name] = path
    if not errs:
        VALID.add(ep.ports)
    return errs


# ---- a batch as a whole ---------------------------------------------------------------


@dataclass(frozen=True)
class Conflict:
    """Two objects of one batch (or of a batch and the state) that cannot both be."""

    what: str  # "networkpolicy default/x", "address 10.0.0.5"
    first: str  # where or who: "file.yaml#2", "endpoint a/b"
    second: str
    verb: str = "is given twice"

    def render(self) -> str:
        return f"{self.what} {self.verb}: {self.first} and {self.second}"


def duplicate_objects(policies: Sequence[NetworkPolicy], namespaces: Sequence[Namespace],
                      endpoints: Sequence[Endpoint],
                      where: Mapping[int, str] | None = None) -> list[Conflict]:
    """One kind, namespace and name given twice in one batch: refused, never last-wins.

    `where` names an object (by `id()`) for the message; by default its source.
    """
    def place(obj: object, fallback: str) -> str:
        if where is not None and id(obj) in where:
            return where[id(obj)]
        source = getattr(obj, "source", None)
        text = source.render() if source is not None else ""
        return text or fallback

    out: list[Conflict] = []
    for kind, items in (("networkpolicy", [(p.key, p) for p in policies]),
                        ("namespace", [(n.name, n) for n in namespaces]),
                        ("pod", [(e.key, e) for e in endpoints])):
        first: dict[str, object] = {}
        for n, (key, obj) in enumerate(items):
            if key in first:
                out.append(Conflict(f"{kind} {key}", place(first[key], "an earlier object"),
                                    place(obj, f"object {n + 1}")))
            else:
                first[key] = obj
    return out


PORT_CLAIM = "port "  # a claim's key for a bridge port: no address starts so
MAC_CLAIM = "mac "  # and for a MAC


def claims(ep: Endpoint) -> list[str]:
    """What one endpoint holds alone: its addresses (canonical text), the bridge port
    its addresses are bound to (``port NAME``) and its MAC (``mac AA:..``). Two
    endpoints on one port would bind it to both: each could send as the other, and a
    datapath holding one address of a family per port (eBPF) could not program it at
    all. Two with one MAC could not be told apart as a frame's destination (the port
    guard holds a frame to a pod's MAC to that pod's addresses)."""
    out = [canonical_ip(text) for text in ep.ips]
    if ep.port:
        out.append(PORT_CLAIM + ep.port)
    if ep.mac:
        out.append(MAC_CLAIM + ep.mac)
    return out


def claim_name(claim: str) -> str:
    """``address 10.0.0.1``, ``port veth1`` or ``mac aa:..``: a claim as messages name
    it."""
    return claim if claim.startswith((PORT_CLAIM, MAC_CLAIM)) else f"address {claim}"


def address_conflicts(changed: Iterable[Endpoint], others: Mapping[str, str],
                      leaving: Collection[str] = ()) -> list[Conflict]:
    """Addresses and bridge ports held by two endpoints: among `changed`, or with `others`
    (claim -> key, see `claims`).

    `others` is the state around this change; the endpoints in `leaving` (those
    the change replaces or deletes) hold nothing in it. One endpoint may of
    course keep its own address. Neither mapping is copied: the agent calls this
    on every commit, with every address of the node in `others`.
    """
    claimed: dict[str, str] = {}
    out: list[Conflict] = []
    for ep in changed:
        for claim in claims(ep):
            owner = claimed.get(claim)
            if owner is None:
                owner = others.get(claim)
                if owner in leaving:
                    owner = None
            if owner is not None and owner != ep.key:
                out.append(Conflict(claim_name(claim), f"endpoint {owner}", f"endpoint {ep.key}",
                                    "is held by two endpoints"))
            else:
                claimed[claim] = ep.key
    return out


def admit_objects(policies: Sequence[NetworkPolicy], namespaces: Sequence[Namespace],
                  endpoints: Sequence[Endpoint], *, strict_cidr: bool = False,
                  duplicates: bool = True) -> list[InputError]:
    """Every error of every object of a batch, and every key given twice in it.

    The one validation of files (`validate`, the analyses, `dataplane apply`) and
    of the agent's `apply`; its lines read `SOURCE: Kind ns/name: field: reason`.
    A batch to enforce refuses a key given twice; the analyses describe manifests
    as `kubectl apply` would take them (the later wins) and `lint` reports it
    (SK008), so they pass `duplicates=False`.
    """
    out: list[InputError] = []

    def report(errors: list[FieldError], source: str, obj: str) -> None:
        if errors:
            out.append(ValidationError(errors, source=source, obj=obj))

    for p in policies:
        report(validate_policy(p, strict_cidr=strict_cidr), p.source.render(),
               f"NetworkPolicy {p.namespace}/{p.name or p.generate_name}")
    for ns in namespaces:
        report(validate_namespace(ns), ns.source.render(), f"Namespace {ns.name}")
    for ep in endpoints:
        report(validate_endpoint(ep), ep.source.render(), f"Pod {ep.key}")
    if duplicates:
        out += [InputError(c.render()) for c in duplicate_objects(policies, namespaces,
                                                                  endpoints)]
    return out


def canonical_ip(text: str) -> str:
    if is_canonical_ipv4(text):
        return text  # what pods have: no parse (~0.4 µs against ~5)
    ip = parse_ip(text)
    return str(ip) if ip is not None else text



__all__ = [
    "PORT_CLAIM", "Conflict", "address_conflicts", "admit_objects", "canonical_ip", "claim_name",
    "claims",
    "duplicate_objects",
    "validate_container_ports", "validate_endpoint", "validate_label_change",
    "validate_namespace", "validate_pod_ips", "validate_policy",
]
