"""Resolution: which policies isolate each identity.

This is the shared first half of every bulk computation (the matrix, the
compiled ruleset, the benchmark): per identity (namespace + labels) the set of
policies selecting it in each direction; identities with the same set share one
`PolicySet`. Peers are resolved to identities through the label index
(`ClusterIndex.peer_identities`), once per peer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stockade.engine.index import ClusterIndex
from stockade.model.cluster import Cluster
from stockade.model.policy import DIRECTIONS, EGRESS, INGRESS, NetworkPolicy, Rule


@dataclass(frozen=True)
class PolicySet:
    """The policies that isolate some identities in one direction, sorted by key."""

    direction: str
    policies: tuple[NetworkPolicy, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(p.key for p in self.policies)

    def rules(self) -> list[tuple[NetworkPolicy, int, Rule]]:
        return [(p, i, r) for p in self.policies for i, r in enumerate(p.rules(self.direction))]


@dataclass
class Resolution:
    index: ClusterIndex
    # identity -> policy set, only for identities some policy isolates
    isolated: dict[str, dict[int, PolicySet]] = field(default_factory=dict)

    def policy_set(self, identity: int, direction: str) -> PolicySet | None:
        return self.isolated[direction].get(identity)

    def policy_sets(self, direction: str) -> set[PolicySet]:
        return set(self.isolated[direction].values())


def resolve(cluster: Cluster, index: ClusterIndex | None = None) -> Resolution:
    """Policy sets per identity, by set algebra over the label index."""
    index = index or ClusterIndex(cluster)
    res = Resolution(index, {INGRESS: {}, EGRESS: {}})
    for direction in DIRECTIONS:
        chosen: dict[int, list[NetworkPolicy]] = {}
        for policy in cluster.policies:
            if not policy.affects(direction):
                continue
            for ident in index.selected_by_policy(policy.namespace, policy.pod_selector):
                chosen.setdefault(ident, []).append(policy)
        shared: dict[tuple[str, ...], PolicySet] = {}
        for ident, policies in chosen.items():
            policies.sort(key=lambda p: p.key)
            key = tuple(p.key for p in policies)
            ps = shared.get(key)
            if ps is None:
                ps = shared[key] = PolicySet(direction, tuple(policies))
            res.isolated[direction][ident] = ps
    return res
