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

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field

from stockade.engine.connectivity import (
    NO_CONNECTIONS,
    AddressRange,
    Connections,
    address_ranges,
    cnp_rule_connections,
)
from stockade.engine.tiers import TierIndex, peer_matches, subject_selects
from stockade.model.cidr import parse_ip
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


def _others(subject: Endpoint, direction: str, cluster: Cluster,
            ranges: dict[str, tuple[AddressRange, ...]]) -> Iterator[Other]:
    """Every other end of the subject's connections in a direction, with each address
    it may use."""
    for ep in cluster.endpoints:
        if ep.key == subject.key:
            continue  # a pod talking to itself is not subject to the tiers
        # Any of its addresses: a dual-stack pod is reached (or connects) over each.
        for ip in ep.ips or ("",):
            yield Other(ep.key, ep, ip)
    for rng in ranges[direction]:
        yield Other(rng.render().removesuffix("[External]"), None, rng.sample)


def _ip_key(ip: str, cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
            ) -> tuple[bool, ...]:
    addr = parse_ip(ip) if ip else None
    return tuple(addr is not None and addr.version == n.version and addr in n for n in cidrs)


class _Walker:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.ns_labels: dict[str, Labels] = {ns.name: ns.labels for ns in cluster.namespaces}
        self.index = TierIndex(cluster.cluster_policies, self.ns_labels)

    def matched(self, rule: CnpRule, other: Other, destination: Endpoint | None
                ) -> Connections:
        """The connections a rule matches towards (or from) one other end."""
        if not any(peer_matches(p, rule.action, other.endpoint, other.ip, self.ns_labels)
                   for p in rule.peers):
            return NO_CONNECTIONS
        return cnp_rule_connections(rule, destination)


def precedence(cluster: Cluster) -> Precedence:
    """Every rule's use and every same-priority overlap, over the cluster's pods and the
    address pieces of every `networks` CIDR (IPv4 and IPv6)."""
    walker = _Walker(cluster)
    cnps = cluster.cluster_policies
    ranges = {d: address_ranges((), d, 4, cnps) + address_ranges((), d, 6, cnps)
              for d in DIRECTIONS}
    cidrs = tuple(n for p in cnps for r in p.ingress + p.egress for peer in r.peers
                  for text in peer.networks
                  if (n := _network(text)) is not None)
    uses = {(p.name, d, i): RuleUse() for p in cnps for d in DIRECTIONS
            for i in range(len(p.rules(d)))}
    overlaps: dict[tuple[str, str, str], Overlap] = {}
    selected = {p.name: tuple(ep for ep in cluster.endpoints
                              if subject_selects(p.subject, ep, walker.ns_labels))
                for p in cnps}
    seen: set[object] = set()
    for tier in TIERS:
        for direction in DIRECTIONS:
            for subject in cluster.endpoints:
                policies = walker.index.selecting(tier, subject, direction)
                if not policies:
                    continue
                for other in _others(subject, direction, cluster, ranges):
                    destination = other.endpoint if direction == EGRESS else subject
                    key = (tier, direction, subject.namespace, subject.labels,
                           subject.ports if direction == INGRESS else (),
                           other.endpoint.namespace if other.endpoint else None,
                           other.endpoint.labels if other.endpoint else None,
                           destination.ports if destination else (),
                           _ip_key(other.ip, cidrs), other.endpoint is None and other.ip)
                    if key in seen:
                        continue
                    seen.add(key)
                    _walk(walker, policies, direction, other, destination, uses)
                    _overlaps(walker, policies, direction, subject, other, destination,
                              overlaps)
    return Precedence({p.name: p for p in cnps}, uses, list(overlaps.values()), selected)


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


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
