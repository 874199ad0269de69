"""Which ClusterNetworkPolicy rules take effect, and where two policies of one priority
disagree: first-match walks over the connections the cluster's pods can make.

A tier's rules are read in precedence order (priority, name, then written order) for
each pod they select, each direction. For every other end (each pod, and each piece
of the address space the `networks` CIDRs cut), a rule *matches* the connections of
its protocols when one of its peers is that end, and *decides* what no earlier rule
matched. So, over the pods there are:

- a rule that decides something takes effect;
- a rule that matches something but decides nothing is *shadowed*: every connection
  it matches is decided first by the earlier rules named (a Deny after an Accept that
  covers it is the usual mistake);
- a rule that matches nothing is dead (its peers or its ports meet no connection).

Two policies of one tier and priority *overlap* when, for some pod both select and some
connection, their first matching rules have different actions: which one wins is left
to the implementation (stockade orders them by name, as the API suggests; another may
not). Connections are port intervals (`engine.connectivity`), so everything here is
exact for the pods and addresses given; a future pod may change it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stockade.engine.connectivity import (
    NO_CONNECTIONS,
    AddressRange,
    Connections,
    address_ranges,
    cnp_rule_connections,
)
from stockade.engine.tiers import TierIndex, peer_matches, subject_selects
from stockade.model.cluster import Cluster, Endpoint
from stockade.model.cnp import ACCEPT, DENY, TIERS, ClusterNetworkPolicy, CnpRule, rule_label
from stockade.model.labels import Labels
from stockade.model.policy import DIRECTIONS, EGRESS, INGRESS

RuleKey = tuple[str, str, int]  # (policy name, direction, rule index)


@dataclass
class RuleUse:
    """What one rule did over every pod it could judge."""

    matched: bool = False  # matched some connection
    decided: bool = False  # decided some connection (no earlier rule matched it)
    shadowers: dict[RuleKey, None] = field(default_factory=dict)  # earlier rules, in order


@dataclass(frozen=True)
class Overlap:
    """Two policies of one tier and priority whose first matching rules disagree."""

    first: str  # the policy stockade reads first (by name)
    second: str
    direction: str
    first_rule: int
    second_rule: int
    example: str  # `a/x -> b/y TCP 80`

    def render(self, first: ClusterNetworkPolicy, second: ClusterNetworkPolicy) -> str:
        key = "ingress" if self.direction == INGRESS else "egress"
        a = first.rules(self.direction)[self.first_rule].action
        b = second.rules(self.direction)[self.second_rule].action
        return (f"same {first.tier} priority {first.priority} as ClusterNetworkPolicy "
                f"{second.name}, and their first matching rules disagree ({first.name} "
                f"{key}[{self.first_rule}] {a}, {second.name} {key}[{self.second_rule}] {b}), "
                f"e.g. on {self.example}: the API leaves the winner to the implementation "
                f"(stockade takes {first.name}, by name); give them different priorities")


@dataclass(frozen=True)
class Other:
    """The other end of a connection: a pod, or a piece of the address space."""

    name: str
    endpoint: Endpoint | None
    ip: str
    signature: int  # the rules of its direction whose peers match it, as bits


@dataclass
class Precedence:
    policies: dict[str, ClusterNetworkPolicy]
    uses: dict[RuleKey, RuleUse]
    overlaps: list[Overlap]
    selected: dict[str, tuple[Endpoint, ...]]  # policy name -> the pods its subject selects

    def rule(self, key: RuleKey) -> CnpRule:
        return self.policies[key[0]].rules(key[1])[key[2]]

    def label(self, key: RuleKey) -> str:
        return rule_label(self.policies[key[0]], key[1], key[2])

    def shadowed(self) -> list[RuleKey]:
        """The rules that match some connection and decide none, of policies that
        select some pod."""
        return [k for k, use in self.uses.items()
                if use.matched and not use.decided and self.selected[k[0]]]

    def shadowed_reason(self, key: RuleKey) -> str:
        """`shadowed: every connection it matches is decided first by ...`; a Deny
        shadowed only by Accepts says so."""
        earlier = sorted(self.uses[key].shadowers,
                         key=lambda k: (self.policies[k[0]].order(), k[2]))
        head = "shadowed"
        if self.rule(key).action == DENY and all(self.rule(k).action == ACCEPT
                                                 for k in earlier):
            head = "a Deny shadowed by an earlier Accept"
        return (f"{head}: every connection it matches is decided first by "
                + ", ".join(self.label(k) for k in earlier))


class _Walker:
    """Peer matches as signatures: per other end, the rules whose peers match it."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.ns_labels: dict[str, Labels] = {ns.name: ns.labels for ns in cluster.namespaces}
        self.index = TierIndex(cluster.cluster_policies, self.ns_labels)
        self._bits: dict[int, int] = {}
        self._masks: dict[tuple[int, str], int] = {}
        self._conns: dict[tuple[int, object], Connections] = {}

    def bit(self, rule: CnpRule) -> int:
        return self._bits.setdefault(id(rule), 1 << len(self._bits))

    def signature(self, direction: str, other: Endpoint | None, ip: str) -> int:
        found = 0
        for policy in self.cluster.cluster_policies:
            for rule in policy.rules(direction):
                if any(peer_matches(p, rule.action, other, ip, self.ns_labels)
                       for p in rule.peers):
                    found |= self.bit(rule)
        return found

    def mask(self, policies: tuple[ClusterNetworkPolicy, ...], direction: str) -> int:
        found = self._masks.get((id(policies), direction))
        if found is None:
            found = 0
            for policy in policies:
                for rule in policy.rules(direction):
                    found |= self.bit(rule)
            self._masks[(id(policies), direction)] = found
        return found

    def matched(self, rule: CnpRule, other: Other, destination: Endpoint | None
                ) -> Connections:
        """The connections a rule matches towards (or from) one other end."""
        if not other.signature & self.bit(rule):
            return NO_CONNECTIONS
        key = (id(rule), destination.ports if destination is not None else None)
        found = self._conns.get(key)
        if found is None:
            found = self._conns[key] = cnp_rule_connections(rule, destination)
        return found


def _other_ends(walker: _Walker, direction: str, cluster: Cluster,
                ranges: tuple[AddressRange, ...]) -> dict[tuple[int, object], list[Other]]:
    """The other ends of a direction by what a walk can tell apart (the signature, and
    for egress the container ports, where named ports resolve): for each, up to two
    of them, so that one is never the subject itself. Every address of a dual-stack
    pod counts: a connection may use either."""
    groups: dict[tuple[int, object], list[Other]] = {}
    for ep in cluster.endpoints:
        for ip in ep.ips or ("",):
            sig = walker.signature(direction, ep, ip)
            group = groups.setdefault((sig, ep.ports if direction == EGRESS else ()), [])
            if len(group) < 2 and all(o.name != ep.key for o in group):
                group.append(Other(ep.key, ep, ip, sig))
    for rng in ranges:
        sig = walker.signature(direction, None, rng.sample)
        group = groups.setdefault((sig, None), [])
        if not group:
            group.append(Other(rng.render().removesuffix("[External]"), None, rng.sample, sig))
    return groups


def precedence(cluster: Cluster) -> Precedence:
    """Every rule's use and every same-priority overlap, over the cluster's pods and the
    address pieces of every `networks` CIDR (IPv4 and IPv6).

    A walk depends on the subject through the policies selecting it (and, for ingress,
    its container ports) and on the other end through its signature: one walk per
    distinct combination.
    """
    walker = _Walker(cluster)
    cnps = cluster.cluster_policies
    uses = {(p.name, d, i): RuleUse() for p in cnps for d in DIRECTIONS
            for i in range(len(p.rules(d)))}
    overlaps: dict[tuple[str, str, str], Overlap] = {}
    selected = {p.name: tuple(ep for ep in cluster.endpoints
                              if subject_selects(p.subject, ep, walker.ns_labels))
                for p in cnps}
    seen: set[object] = set()
    for direction in DIRECTIONS:
        ranges = address_ranges((), direction, 4, cnps) + address_ranges((), direction, 6, cnps)
        others = _other_ends(walker, direction, cluster, ranges)
        subjects: dict[object, list[Endpoint]] = {}
        for ep in cluster.endpoints:
            key = (ep.namespace, ep.labels, ep.ports if direction == INGRESS else ())
            subjects.setdefault(key, []).append(ep)
        for tier in TIERS:
            for members in subjects.values():
                policies = walker.index.selecting(tier, members[0], direction)
                if not policies:
                    continue
                mask = walker.mask(policies, direction)
                for (sig, ports), group in others.items():
                    # A pod is not its own other end, but another of its class is: the
                    # walk is the same for every member (a group holds two pods if it can).
                    subject = members[0]
                    candidates = [o for o in group if o.name != subject.key]
                    if not candidates and len(members) > 1:
                        subject, candidates = members[1], group
                    if not candidates:
                        continue
                    other = candidates[0]
                    walk = (id(policies), sig & mask,
                            ports if direction == EGRESS else subject.ports)
                    if walk in seen:
                        continue
                    seen.add(walk)
                    destination = other.endpoint if direction == EGRESS else subject
                    _walk(walker, policies, direction, other, destination, uses)
                    _overlaps(walker, policies, direction, subject, other, destination,
                              overlaps)
    return Precedence({p.name: p for p in cnps}, uses, list(overlaps.values()), selected)


def _walk(walker: _Walker, policies: tuple[ClusterNetworkPolicy, ...], direction: str,
          other: Other, destination: Endpoint | None, uses: dict[RuleKey, RuleUse]) -> None:
    """One first-match walk of a tier towards one other end, recorded in `uses`."""
    earlier: list[tuple[RuleKey, Connections]] = []
    covered = NO_CONNECTIONS
    for policy in policies:
        for i, rule in enumerate(policy.rules(direction)):
            key = (policy.name, direction, i)
            mine = walker.matched(rule, other, destination)
            if mine.empty:
                continue
            use = uses[key]
            use.matched = True
            if not mine.difference(covered).empty:
                use.decided = True
            for other_key, theirs in earlier:
                if not theirs.intersection(mine).empty:
                    use.shadowers.setdefault(other_key)
            earlier.append((key, mine))
            covered = covered.union(mine)


def _first_matches(walker: _Walker, policy: ClusterNetworkPolicy, direction: str,
                   other: Other, destination: Endpoint | None
                   ) -> list[tuple[int, Connections]]:
    """Within one policy: each rule and what it decides first."""
    out = []
    covered = NO_CONNECTIONS
    for i, rule in enumerate(policy.rules(direction)):
        mine = walker.matched(rule, other, destination).difference(covered)
        if not mine.empty:
            out.append((i, mine))
            covered = covered.union(mine)
    return out


def _overlaps(walker: _Walker, policies: tuple[ClusterNetworkPolicy, ...], direction: str,
              subject: Endpoint, other: Other, destination: Endpoint | None,
              found: dict[tuple[str, str, str], Overlap]) -> None:
    for a_i, a in enumerate(policies):
        for b in policies[a_i + 1:]:
            if b.priority != a.priority or (a.name, b.name, direction) in found:
                continue
            first = _first_matches(walker, a, direction, other, destination)
            second = _first_matches(walker, b, direction, other, destination)
            for ai, ac in first:
                for bi, bc in second:
                    if a.rules(direction)[ai].action == b.rules(direction)[bi].action:
                        continue
                    both = ac.intersection(bc)
                    if both.empty:
                        continue
                    protocol, ranges = both.ports[0]
                    src, dst = ((subject.key, other.name) if direction == EGRESS
                                else (other.name, subject.key))
                    found[(a.name, b.name, direction)] = Overlap(
                        a.name, b.name, direction, ai, bi,
                        f"{src} -> {dst} {protocol} {ranges[0][0]}")
                    break
                if (a.name, b.name, direction) in found:
                    break
