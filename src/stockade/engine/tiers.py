"""The administrator's tiers: which ClusterNetworkPolicy rule decides a flow's side.

For one direction of a connection, the policies of a tier whose subject selects
the judged pod are read by precedence (priority, then name: see
`ClusterNetworkPolicy.order`), and their rules of that direction in written
order. The first rule whose peer and protocols match the flow decides: `Accept`
or `Deny` for the direction, or `Pass`, which leaves the tier. A pod talking to
itself is not subject to the tiers (the caller keeps that rule).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from stockade.model.cidr import parse_cidr, parse_ip
from stockade.model.cluster import Endpoint
from stockade.model.cnp import (
    ACCEPT,
    NAMESPACES,
    NETWORKS,
    PODS,
    ClusterNetworkPolicy,
    CnpPeer,
    CnpPort,
    CnpRule,
)
from stockade.model.labels import Labels
from stockade.model.policy import INGRESS


@dataclass(frozen=True)
class TierDecision:
    """The rule of a tier that matched a flow's side, and what it does."""

    tier: str
    policy: str
    priority: int
    direction: str
    rule: int
    rule_name: str
    action: str
    peer: int  # the first peer that matched; -1 for a peer that fails closed

    def render(self) -> str:
        key = "ingress" if self.direction == INGRESS else "egress"
        named = f" ({self.rule_name})" if self.rule_name else ""
        return (f"{self.tier} ClusterNetworkPolicy {self.policy} (priority {self.priority}) "
                f"{key}[{self.rule}]{named}: {self.action}")


def subject_selects(subject: CnpPeer, endpoint: Endpoint,
                    namespace_labels: Mapping[str, Labels]) -> bool:
    """Whether a policy's subject selects a pod (a subject is never `networks`)."""
    labels = namespace_labels.get(endpoint.namespace)
    if labels is None or subject.kind not in (NAMESPACES, PODS):
        return False
    if not subject.namespace_selector.matches(labels):
        return False
    return subject.kind == NAMESPACES or subject.pod_selector.matches(endpoint.labels)


def peer_matches(peer: CnpPeer, action: str, endpoint: Endpoint | None, ip: str,
                 namespace_labels: Mapping[str, Labels]) -> bool:
    """Whether the other side of a flow (a pod, or only an address) is this peer.

    `networks` match addresses, pods' as well as external ones; selectors match
    pods only. A peer stockade cannot read fails closed: it matches nothing for
    an Accept and everything for a Deny or a Pass.
    """
    if peer.kind == NETWORKS:
        addr = parse_ip(ip) if ip else None
        if addr is None:
            return False
        for text in peer.networks:
            net = parse_cidr(text)
            if net is not None and net.version == addr.version and addr in net:
                return True
        return False
    if peer.kind in (NAMESPACES, PODS):
        return endpoint is not None and subject_selects(peer, endpoint, namespace_labels)
    return action != ACCEPT


def port_matches(entry: CnpPort, port: int, protocol: str,
                 destination: Endpoint | None) -> bool:
    """A `protocols` entry against a flow; a named port on the destination pod."""
    if entry.name:
        return destination is not None and any(
            p.name == entry.name and p.port == port and p.protocol == protocol
            for p in destination.ports)
    return entry.protocol == protocol and entry.start <= port <= entry.end


def rule_matches_port(rule: CnpRule, port: int, protocol: str,
                      destination: Endpoint | None) -> bool:
    return rule.ports is None or any(port_matches(e, port, protocol, destination)
                                     for e in rule.ports)


class TierIndex:
    """The policies of one cluster by tier, in precedence order, with the pods they select."""

    def __init__(self, policies: tuple[ClusterNetworkPolicy, ...],
                 namespace_labels: Mapping[str, Labels]) -> None:
        self.namespace_labels = namespace_labels
        self.by_tier: dict[str, tuple[ClusterNetworkPolicy, ...]] = {}
        for tier in sorted({p.tier for p in policies}):
            self.by_tier[tier] = tuple(sorted((p for p in policies if p.tier == tier),
                                              key=ClusterNetworkPolicy.order))
        self._selecting: dict[tuple[str, str, Labels, str],
                              tuple[ClusterNetworkPolicy, ...]] = {}

    def selecting(self, tier: str, endpoint: Endpoint,
                  direction: str) -> tuple[ClusterNetworkPolicy, ...]:
        """The tier's policies with rules of `direction` whose subject selects the pod."""
        key = (tier, endpoint.namespace, endpoint.labels, direction)
        found = self._selecting.get(key)
        if found is None:
            found = tuple(p for p in self.by_tier.get(tier, ())
                          if p.rules(direction)
                          and subject_selects(p.subject, endpoint, self.namespace_labels))
            self._selecting[key] = found
        return found

    def decide(self, tier: str, direction: str, subject: Endpoint, other: Endpoint | None,
               other_ip: str, port: int, protocol: str,
               destination: Endpoint | None) -> TierDecision | None:
        """The first matching rule of the tier for one side of a flow, or None."""
        for policy in self.selecting(tier, subject, direction):
            for ri, rule in enumerate(policy.rules(direction)):
                if not rule_matches_port(rule, port, protocol, destination):
                    continue
                for pi, peer in enumerate(rule.peers):
                    if peer_matches(peer, rule.action, other, other_ip, self.namespace_labels):
                        return TierDecision(tier, policy.name, policy.priority, direction, ri,
                                            rule.name, rule.action,
                                            pi if peer.kind in (NAMESPACES, PODS, NETWORKS)
                                            else -1)
        return None

    def __bool__(self) -> bool:
        return bool(self.by_tier)

