"""Reading conformance cases: a cluster, policies, and expected verdicts per probe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stockade.errors import DecodeError, InputError
from stockade.model.cluster import Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.decode import decode_network_policy
from stockade.model.labels import Labels
from stockade.model.parse import parse_documents
from stockade.model.policy import PROTOCOLS, Source

STANDARD_CLUSTER = "standard-cluster.yaml"


@dataclass(frozen=True)
class ProbeGroup:
    port: int | str
    protocol: str
    default: bool  # True: allow
    flipped: frozenset[tuple[str, str]]

    def expected(self, src: str, dst: str) -> bool:
        return self.default != ((src, dst) in self.flipped)

    def render(self) -> str:
        return f"{self.protocol}/{self.port}"


@dataclass(frozen=True)
class Case:
    id: str
    description: str
    cluster: Cluster
    probes: tuple[ProbeGroup, ...]
    source: str = ""

    def pairs(self) -> list[tuple[Endpoint, Endpoint]]:
        eps = self.cluster.endpoints
        return [(a, b) for a in eps for b in eps if a.key != b.key]


def _need(m: dict[str, Any], key: str, where: str) -> Any:
    if key not in m:
        raise InputError(f"missing key {key!r}", source=where)
    return m[key]


def parse_cluster(raw: Any, where: str) -> tuple[tuple[Namespace, ...], tuple[Endpoint, ...]]:
    """The `cluster` mapping: namespace labels are complete as written."""
    if not isinstance(raw, dict):
        raise InputError("cluster must be a mapping", source=where)
    namespaces = tuple(
        Namespace(str(name), Labels({str(k): str(v) for k, v in (labels or {}).items()}))
        for name, labels in (raw.get("namespaces") or {}).items()
    )
    endpoints = []
    for i, pod in enumerate(raw.get("pods") or []):
        if not isinstance(pod, dict):
            raise InputError(f"cluster.pods[{i}] must be a mapping", source=where)
        ports = tuple(
            ContainerPort(int(p["port"]), str(p.get("protocol", "TCP")), str(p.get("name", "")))
            for p in pod.get("ports") or []
        )
        endpoints.append(Endpoint(
            namespace=str(_need(pod, "namespace", where)),
            name=str(_need(pod, "name", where)),
            labels=Labels({str(k): str(v) for k, v in (pod.get("labels") or {}).items()}),
            ips=(str(_need(pod, "ip", where)),),
            ports=ports,
            source=Source(where),
        ))
    return namespaces, tuple(endpoints)


def parse_case(text: str, where: str, standard: Any | None) -> Case:
    """One case file; `standard` is the parsed standard-cluster.yaml, if any."""
    docs = parse_documents(text, where)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise InputError("a case is one YAML mapping", source=where)
    raw = docs[0]
    case_id = str(_need(raw, "id", where))
    cluster_raw = raw.get("cluster")
    if cluster_raw is None:
        if standard is None:
            raise InputError(f"no cluster and no {STANDARD_CLUSTER} beside it", source=where)
        cluster_raw = standard.get("cluster") if isinstance(standard, dict) else None
    namespaces, endpoints = parse_cluster(cluster_raw, where)
    policies = []
    for i, doc in enumerate(_need(raw, "policies", where) or []):
        try:
            policies.append(decode_network_policy(doc, Source(where, i)))
        except DecodeError as exc:
            raise InputError(f"policies[{i}]: {exc.message}", source=where) from None
    groups = []
    for i, g in enumerate(_need(raw, "probes", where) or []):
        protocol = str(g.get("protocol", "TCP"))
        default = g.get("default")
        if protocol not in PROTOCOLS or default not in ("allow", "deny"):
            raise InputError(f"probes[{i}]: bad protocol or default", source=where)
        port = g.get("port")
        if not isinstance(port, int | str) or isinstance(port, bool):
            raise InputError(f"probes[{i}]: port must be a number or a name", source=where)
        flipped = frozenset((str(e["from"]), str(e["to"])) for e in g.get("except") or [])
        groups.append(ProbeGroup(port, protocol, default == "allow", flipped))
    cluster = Cluster(namespaces, endpoints, tuple(policies))
    return Case(case_id, str(raw.get("description", "")), cluster, tuple(groups), where)
