"""Synthetic clusters for benchmarks: many pods and policies with realistic overlap.

Deterministic for a seed. Pods are spread over namespaces and carry app/tier/env
labels; policies select by app or tier, admit peers by pod labels, namespace
labels and ipBlocks, on numeric, ranged and named ports.
"""

from __future__ import annotations

import ipaddress
import random

from stockade.model.cluster import NS_NAME_LABEL, Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.labels import Labels
from stockade.model.policy import (
    EGRESS,
    INGRESS,
    IPBlock,
    NetworkPolicy,
    Peer,
    PolicyPort,
    Rule,
)
from stockade.model.selector import Requirement, Selector

TIERS = ("web", "api", "db", "cache", "batch")
ENVS = ("prod", "staging", "dev")


def make_cluster(pods: int, policies: int, namespaces: int = 50, apps: int = 200,
                 seed: int = 1, base: str = "10.128.0.0") -> Cluster:
    rnd = random.Random(seed)
    nss = [Namespace(f"ns{i}", Labels({NS_NAME_LABEL: f"ns{i}", "team": f"t{i % 10}",
                                       "env": ENVS[i % 3]})) for i in range(namespaces)]
    start = int(ipaddress.ip_address(base))
    eps = []
    for i in range(pods):
        ns = nss[i % namespaces].name
        n = rnd.randrange(apps)
        # an app's tier by its number: hash() of a string differs from one process to
        # the next (PYTHONHASHSEED), and so did the clusters of two runs
        labels = Labels({"app": f"app{n}", "tier": TIERS[n % len(TIERS)],
                         "env": ENVS[rnd.randrange(3)]})
        ports = (ContainerPort(8080, "TCP", "http"), ContainerPort(9090, "TCP", "metrics"))
        eps.append(Endpoint(ns, f"pod{i}", labels, (str(ipaddress.ip_address(start + i)),),
                            ports))
    pols = [_policy(rnd, i, nss, apps) for i in range(policies)]
    return Cluster(tuple(nss), tuple(eps), tuple(pols))


def _policy(rnd: random.Random, i: int, nss: list[Namespace], apps: int) -> NetworkPolicy:
    ns = nss[rnd.randrange(len(nss))].name
    if rnd.random() < 0.7:
        target = Selector(Labels({"app": f"app{rnd.randrange(apps)}"}))
    else:
        target = Selector(Labels({"tier": rnd.choice(TIERS)}))
    rules = []
    for _ in range(rnd.randint(1, 3)):
        peers = []
        for _ in range(rnd.randint(1, 2)):
            kind = rnd.random()
            if kind < 0.5:
                app = f"app{rnd.randrange(apps)}"
                peers.append(Peer(pod_selector=Selector(Labels({"app": app}))))
            elif kind < 0.8:
                peers.append(Peer(
                    pod_selector=Selector(match_expressions=(
                        Requirement("tier", "In", tuple(rnd.sample(TIERS, 2))),)),
                    namespace_selector=Selector(Labels({"team": f"t{rnd.randrange(10)}"}))))
            else:
                peers.append(Peer(ip_block=IPBlock("10.0.0.0/8", ("10.128.0.0/16",))))
        ports = rnd.choice([
            (PolicyPort("TCP", 8080),),
            (PolicyPort("TCP", "http"),),
            (PolicyPort("TCP", 8000, 8100), PolicyPort("UDP", 53)),
            (),
        ])
        rules.append(Rule(ports, tuple(peers)))
    types = (INGRESS,) if rnd.random() < 0.7 else (INGRESS, EGRESS)
    return NetworkPolicy(ns, f"pol{i}", target, tuple(rules),
                         tuple(rules[:1]) if EGRESS in types else (), types)


def _selector(sel: Selector) -> dict[str, object]:
    out: dict[str, object] = {}
    if sel.match_labels:
        out["matchLabels"] = dict(sel.match_labels)
    if sel.match_expressions:
        out["matchExpressions"] = [{"key": r.key, "operator": r.operator,
                                    **({"values": list(r.values)} if r.values else {})}
                                   for r in sel.match_expressions]
    return out


def _peer(peer: Peer) -> dict[str, object]:
    if peer.ip_block is not None:
        return {"ipBlock": {"cidr": peer.ip_block.cidr,
                            **({"except": list(peer.ip_block.except_)}
                               if peer.ip_block.except_ else {})}}
    out: dict[str, object] = {}
    if peer.pod_selector is not None:
        out["podSelector"] = _selector(peer.pod_selector)
    if peer.namespace_selector is not None:
        out["namespaceSelector"] = _selector(peer.namespace_selector)
    return out


def _rule(rule: Rule, key: str) -> dict[str, object]:
    out: dict[str, object] = {}
    if rule.ports:
        out["ports"] = [{"protocol": p.protocol, **({"port": p.port} if p.port is not None
                                                     else {}),
                         **({"endPort": p.end_port} if p.end_port is not None else {})}
                        for p in rule.ports]
    if rule.peers:
        out[key] = [_peer(p) for p in rule.peers]
    return out


def manifests(cluster: Cluster) -> list[dict[str, object]]:
    """The cluster as Kubernetes manifests (Namespaces, Pods, NetworkPolicies)."""
    docs: list[dict[str, object]] = []
    for ns in cluster.namespaces:
        docs.append({"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": ns.name, "labels": dict(ns.labels)}})
    for ep in cluster.endpoints:
        docs.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": ep.name, "namespace": ep.namespace,
                                  "labels": dict(ep.labels)},
                     "spec": {"containers": [{"name": "c", "ports": [
                         {"name": p.name, "containerPort": p.port, "protocol": p.protocol}
                         for p in ep.ports]}]},
                     "status": {"podIP": ep.ips[0]}})
    for p in cluster.policies:
        docs.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                     "metadata": {"name": p.name, "namespace": p.namespace},
                     "spec": {"podSelector": _selector(p.pod_selector),
                              "policyTypes": list(p.policy_types),
                              "ingress": [_rule(r, "from") for r in p.ingress],
                              "egress": [_rule(r, "to") for r in p.egress]}})
    return docs
