"""Coverage: what the policies leave open, and what in them can never take effect.

Four kinds of gaps, each with a short reason:
- pods that no policy isolates for ingress, or for egress (everything is allowed);
- policies whose podSelector matches no pod of their namespace;
- rules a policy ignores because its policyTypes leaves their direction out;
- peers and port entries that can never match: a selector that matches no pod or
  no namespace, an ipBlock wholly inside one of its excepts, a named port that no
  possible destination pod serves with that protocol. When every peer (or every
  port) of a rule is dead the whole rule is reported instead of its entries.

ClusterNetworkPolicies (`engine.precedence`): which pods each one selects; one
whose subject selects no pod is unused; a rule that matches no connection of the
pods (and addresses) it could judge is dead, and one whose every matching
connection an earlier rule of its tier decides first (a higher priority, or an
earlier rule) is shadowed. A pod is only reported as not isolated for a direction
when no NetworkPolicy isolates it and no ClusterNetworkPolicy selecting it has a
Deny rule for that direction (an Accept or a Pass restricts nothing).

Pod-dependent gaps need pods: without any, only the pod-independent ones are found.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from stockade.engine.match import peer_matches
from stockade.engine.precedence import Precedence, precedence
from stockade.engine.tiers import subject_selects
from stockade.model.cidr import parse_cidr
from stockade.model.cluster import Cluster, Endpoint
from stockade.model.cnp import DENY, ClusterNetworkPolicy
from stockade.model.labels import Labels
from stockade.model.policy import DIRECTIONS, EGRESS, INGRESS, NetworkPolicy, Peer, Rule

UNISOLATED_INGRESS = "unisolated-ingress"
UNISOLATED_EGRESS = "unisolated-egress"
UNUSED_POLICY = "unused-policy"
IGNORED_RULES = "ignored-rules"
DEAD_RULE = "dead-rule"
DEAD_PEER = "dead-peer"
DEAD_PORT = "dead-port"
KINDS = (UNISOLATED_INGRESS, UNISOLATED_EGRESS, UNUSED_POLICY, IGNORED_RULES,
         DEAD_RULE, DEAD_PEER, DEAD_PORT)


@dataclass(frozen=True)
class Selection:
    """The pods a ClusterNetworkPolicy's subject selects."""

    policy: str
    tier: str
    priority: int
    pods: tuple[str, ...]


@dataclass(frozen=True)
class Gap:
    kind: str
    subject: str  # a pod `ns/name`, `NetworkPolicy ns/name` or `ClusterNetworkPolicy name`
    where: str  # a field path in the policy (`spec.ingress[0].from[1]`), or ""
    reason: str
    source: str = ""  # the file the policy came from


@dataclass(frozen=True)
class Coverage:
    gaps: tuple[Gap, ...]
    pods: int
    policies: int
    selections: tuple[Selection, ...] = ()  # one per ClusterNetworkPolicy

    def of_kind(self, kind: str) -> tuple[Gap, ...]:
        return tuple(g for g in self.gaps if g.kind == kind)


# ---- shared queries (lint uses them too) -----------------------------------------------


def namespace_labels(cluster: Cluster) -> dict[str, Labels]:
    return {ns.name: ns.labels for ns in cluster.namespaces}


def selected_pods(policy: NetworkPolicy, cluster: Cluster) -> tuple[Endpoint, ...]:
    return tuple(ep for ep in cluster.endpoints
                 if ep.namespace == policy.namespace and policy.pod_selector.matches(ep.labels))


def peer_pods(peer: Peer, policy_ns: str, cluster: Cluster,
              ns_labels: Mapping[str, Labels]) -> tuple[Endpoint, ...]:
    """The pods a peer stands for; an ipBlock stands for the pods with an IP inside it
    (a workload, or a Pod without an IP, has none: selectors alone can match it)."""
    return tuple(ep for ep in cluster.endpoints
                 if any(peer_matches(peer, policy_ns, ep, ip, ns_labels)
                        for ip in ep.ips or ("",)))


def rule_destinations(rule: Rule, direction: str, policy: NetworkPolicy, cluster: Cluster,
                      ns_labels: Mapping[str, Labels]) -> tuple[Endpoint, ...]:
    """The pods a connection admitted by this rule may go to: where named ports resolve."""
    if direction == INGRESS:
        return selected_pods(policy, cluster)
    if not rule.peers:
        return cluster.endpoints
    keys = {ep.key for p in rule.peers
            for ep in peer_pods(p, policy.namespace, cluster, ns_labels)}
    return tuple(ep for ep in cluster.endpoints if ep.key in keys)


def covering_except(peer: Peer) -> str | None:
    """The except entry that contains the whole ipBlock, if any: the block matches nothing."""
    if peer.ip_block is None:
        return None
    net = parse_cidr(peer.ip_block.cidr)
    for text in peer.ip_block.except_:
        exc = parse_cidr(text)
        if net is not None and exc is not None and net.version == exc.version \
                and net.subnet_of(exc):  # type: ignore[arg-type]
            return text
    return None


def rule_path(direction: str, index: int) -> str:
    return f"spec.{'ingress' if direction == INGRESS else 'egress'}[{index}]"


def peers_key(direction: str) -> str:
    return "from" if direction == INGRESS else "to"


# ---- the analysis ----------------------------------------------------------------------


def coverage(cluster: Cluster) -> Coverage:
    ns_labels = namespace_labels(cluster)
    has_pods = bool(cluster.endpoints)
    gaps: list[Gap] = []
    if has_pods:
        gaps += unisolated_pods(cluster)
    for policy in cluster.policies:
        gaps += policy_gaps(policy, cluster, ns_labels, has_pods)
    selections: tuple[Selection, ...] = ()
    if cluster.cluster_policies:
        prec = precedence(cluster)
        selections = tuple(
            Selection(p.name, p.tier, p.priority, tuple(ep.key for ep in prec.selected[p.name]))
            for p in sorted(cluster.cluster_policies, key=lambda p: (p.tier, *p.order())))
        for cnp in cluster.cluster_policies:
            gaps += tier_gaps(cnp, prec, has_pods)
    order = {k: i for i, k in enumerate(KINDS)}
    gaps.sort(key=lambda g: (order[g.kind], g.subject, g.where))
    return Coverage(tuple(gaps), len(cluster.endpoints),
                    len(cluster.policies) + len(cluster.cluster_policies), selections)


def tier_gaps(policy: ClusterNetworkPolicy, prec: Precedence, has_pods: bool) -> list[Gap]:
    """A ClusterNetworkPolicy that selects no pod, its dead and its shadowed rules."""
    if not has_pods:
        return []
    subject = f"ClusterNetworkPolicy {policy.name}"
    src = policy.source.file
    if not prec.selected[policy.name]:
        return [Gap(UNUSED_POLICY, subject, "spec.subject",
                    f"subject {policy.subject.render()} selects no pod", src)]
    gaps = []
    for direction in DIRECTIONS:
        for i, _ in enumerate(policy.rules(direction)):
            use = prec.uses[(policy.name, direction, i)]
            if use.decided:
                continue
            if not use.matched:
                why = ("can never match: no connection of the pods it selects meets its "
                       "peers and protocols")
            else:
                why = prec.shadowed_reason((policy.name, direction, i))
            gaps.append(Gap(DEAD_RULE, subject, rule_path(direction, i), why, src))
    return gaps


def unisolated_pods(cluster: Cluster) -> list[Gap]:
    """Pods nothing restricts in a direction: no NetworkPolicy isolates them and no
    ClusterNetworkPolicy selecting them can deny (has a Deny rule for it)."""
    gaps = []
    ns_labels = namespace_labels(cluster)
    for ep in sorted(cluster.endpoints, key=lambda e: (e.namespace, e.name)):
        for direction, kind in ((INGRESS, UNISOLATED_INGRESS), (EGRESS, UNISOLATED_EGRESS)):
            pols = [p for p in cluster.policies
                    if p.namespace == ep.namespace and p.affects(direction)]
            if any(p.pod_selector.matches(ep.labels) for p in pols):
                continue
            if any(any(r.action == DENY for r in c.rules(direction))
                   and subject_selects(c.subject, ep, ns_labels)
                   for c in cluster.cluster_policies):
                continue
            d = direction.lower()
            if not pols:
                reason = f"no {d} policy in namespace {ep.namespace}"
            else:
                names = ", ".join(sorted(p.name for p in pols))
                reason = (f"the {d} policies of namespace {ep.namespace} ({names}) do not "
                          f"select its labels ({ep.labels.render() or 'none'})")
            gaps.append(Gap(kind, ep.key, "", reason, ep.source.file))
    return gaps


def policy_gaps(policy: NetworkPolicy, cluster: Cluster, ns_labels: Mapping[str, Labels],
                has_pods: bool) -> list[Gap]:
    subject = f"NetworkPolicy {policy.key}"
    src = policy.source.file
    gaps = []
    unused = has_pods and not selected_pods(policy, cluster)
    if unused:
        gaps.append(Gap(UNUSED_POLICY, subject, "spec.podSelector",
                        f"podSelector [{policy.pod_selector.render()}] matches no pod "
                        f"in namespace {policy.namespace}", src))
    for direction in DIRECTIONS:
        rules = policy.rules(direction)
        if rules and not policy.affects(direction):
            types = ", ".join(policy.policy_types)
            gaps.append(Gap(IGNORED_RULES, subject, f"spec.{direction.lower()}",
                            f"{len(rules)} {direction.lower()} rule(s) ignored: policyTypes "
                            f"[{types}] leaves out {direction}", src))
        elif not unused:  # the rules of a policy that selects nothing are moot
            for i, rule in enumerate(rules):
                gaps += rule_gaps(rule, direction, i, policy,
                                  cluster if has_pods else None, ns_labels)
    return gaps


def rule_gaps(rule: Rule, direction: str, index: int, policy: NetworkPolicy,
              cluster: Cluster | None, ns_labels: Mapping[str, Labels]) -> list[Gap]:
    """Dead peers and ports of one rule; `cluster` None: no pods, ipBlocks only."""
    subject = f"NetworkPolicy {policy.key}"
    path = rule_path(direction, index)
    src = policy.source.file
    dead_peers = [(i, r) for i, p in enumerate(rule.peers)
                  if (r := dead_peer_reason(p, policy.namespace, cluster, ns_labels))]
    dead_ports: list[tuple[int, str]] = []
    if cluster is not None and (not rule.peers or len(dead_peers) < len(rule.peers)):
        dests = rule_destinations(rule, direction, policy, cluster, ns_labels)
        dead_ports = [(i, r) for i, entry in enumerate(rule.ports)
                      if isinstance(entry.port, str)
                      and (r := _dead_named_port(entry.port, entry.protocol, direction, dests))]
    key = peers_key(direction)
    if rule.peers and len(dead_peers) == len(rule.peers):
        why = "; ".join(f"{key}[{i}] {r}" for i, r in dead_peers)
        return [Gap(DEAD_RULE, subject, path, f"can never match: no peer matches ({why})", src)]
    if rule.ports and len(dead_ports) == len(rule.ports):
        why = "; ".join(f"ports[{i}] {r}" for i, r in dead_ports)
        return [Gap(DEAD_RULE, subject, path, f"can never match: no port can ({why})", src)]
    return ([Gap(DEAD_PEER, subject, f"{path}.{key}[{i}]", r, src) for i, r in dead_peers]
            + [Gap(DEAD_PORT, subject, f"{path}.ports[{i}]", r, src) for i, r in dead_ports])


def dead_peer_reason(peer: Peer, policy_ns: str, cluster: Cluster | None,
                     ns_labels: Mapping[str, Labels]) -> str:
    """Why a peer can match nothing, or "" when it can match something."""
    if peer.ip_block is not None:
        if parse_cidr(peer.ip_block.cidr) is None:
            return f"ipBlock {peer.ip_block.cidr} is not a CIDR"
        exc = covering_except(peer)
        return f"ipBlock {peer.ip_block.cidr} lies wholly inside its except {exc}" if exc else ""
    if peer.pod_selector is None and peer.namespace_selector is None:
        return "is empty and matches nothing"
    if cluster is None:
        return ""
    if peer.namespace_selector is not None and \
            not any(peer.namespace_selector.matches(v) for v in ns_labels.values()):
        return f"namespaceSelector [{peer.namespace_selector.render()}] matches no namespace"
    if peer_pods(peer, policy_ns, cluster, ns_labels):
        return ""
    where = f" in namespace {policy_ns}" if peer.namespace_selector is None else ""
    return f"peer {peer.render()} matches no pod{where}"


def _dead_named_port(name: str, protocol: str, direction: str,
                     dests: tuple[Endpoint, ...]) -> str:
    if any(d.resolve_port(name, protocol) is not None for d in dests):
        return ""
    whose = "pod selected by the policy" if direction == INGRESS else "destination pod"
    return f"no {whose} serves a {protocol} port named {name!r}"
