"""Reading conformance cases: a cluster, policies, and expected verdicts per probe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stockade.errors import DecodeError, InputError
from stockade.model.cluster import Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.cnp import CNP_KIND
from stockade.model.cnp_decode import decode_cluster_network_policy
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
    # A `pairs:` group judges only these (from, to); None: every ordered pair.
    listed: tuple[tuple[str, str], ...] | None = None

    def expected(self, src: str, dst: str) -> bool:
        return self.default != ((src, dst) in self.flipped)

    def judged(self, case: Case) -> list[tuple[Endpoint, Endpoint]]:
        """The pairs this group makes a claim about, in the case's order."""
        if self.listed is None:
            return case.pairs()
        by_key = {ep.key: ep for ep in case.cluster.endpoints}
        return [(by_key[a], by_key[b]) for a, b in self.listed]

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
    tiers = []
    for i, doc in enumerate(_need(raw, "policies", where) or []):
        try:
            if isinstance(doc, dict) and doc.get("kind") == CNP_KIND:
                tiers.append(decode_cluster_network_policy(doc, Source(where, i)))
            else:
                policies.append(decode_network_policy(doc, Source(where, i)))
        except DecodeError as exc:
            raise InputError(f"policies[{i}]: {exc.message}", source=where) from None
        except InputError as exc:
            raise InputError(f"policies[{i}]: {exc.message}", source=where) from None
    keys = {ep.key for ep in endpoints}
    groups = [_probe_group(g, f"probes[{i}]", keys, where)
              for i, g in enumerate(_need(raw, "probes", where) or [])]
    cluster = Cluster(namespaces, endpoints, tuple(policies), tuple(tiers))
    return Case(case_id, str(raw.get("description", "")), cluster, tuple(groups), where)


def _probe_group(g: Any, at: str, pods: set[str], where: str) -> ProbeGroup:
    """A group of probes: `default`/`except` over every pair, or `pairs` (only those)."""
    if not isinstance(g, dict):
        raise InputError(f"{at} must be a mapping", source=where)
    protocol = str(g.get("protocol", "TCP"))
    if protocol not in PROTOCOLS:
        raise InputError(f"{at}.protocol: {protocol!r} is not one of {', '.join(PROTOCOLS)}",
                         source=where)
    port = g.get("port")
    if not isinstance(port, int | str) or isinstance(port, bool):
        raise InputError(f"{at}.port: must be a number or a name", source=where)
    if "pairs" in g:
        if "default" in g or "except" in g:
            raise InputError(f"{at}: `pairs` is never written with `default`/`except`",
                             source=where)
        listed: list[tuple[str, str]] = []
        allowed = set()
        for j, pair in enumerate(g.get("pairs") or []):
            here = f"{at}.pairs[{j}]"
            if not isinstance(pair, dict) or pair.get("expect") not in ("allow", "deny"):
                raise InputError(f"{here}: needs from, to and expect (allow or deny)",
                                 source=where)
            key = (str(pair.get("from")), str(pair.get("to")))
            if key[0] not in pods or key[1] not in pods:
                raise InputError(f"{here}: no pod {key[0] if key[0] not in pods else key[1]}"
                                 " in the cluster", source=where)
            if key[0] == key[1] or key in listed:
                raise InputError(f"{here}: a pod with itself, or a pair listed twice",
                                 source=where)
            listed.append(key)
            if pair["expect"] == "allow":
                allowed.add(key)
        if not listed:
            raise InputError(f"{at}.pairs: must not be empty", source=where)
        return ProbeGroup(port, protocol, False, frozenset(allowed), tuple(listed))
    default = g.get("default")
    if default not in ("allow", "deny"):
        raise InputError(f"{at}.default: must be allow or deny", source=where)
    flipped = frozenset((str(e["from"]), str(e["to"])) for e in g.get("except") or [])
    return ProbeGroup(port, protocol, default == "allow", flipped)
