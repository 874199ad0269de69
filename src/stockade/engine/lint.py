"""Lint: valid NetworkPolicies that probably do not mean what their author meant.

Every check has a stable code, so that findings can be grepped, counted and
silenced by code. Warnings are likely mistakes; notes are worth knowing but often
intended (a default deny is good practice), so only warnings make a run fail.

    SK001 warning  peers split in two: a namespaceSelector-only peer beside a
                   podSelector-only peer (OR), where one peer with both (AND) is usual
    SK002 warning  a peer with both selectors (AND) matches no pod, though read as
                   two peers (OR) it would
    SK003 warning  pods isolated for egress with no rule allowing DNS (port 53)
    SK004 warning  namespaceSelector {} without a podSelector: every pod of every namespace
    SK005 note     podSelector {} and no rules for a direction: a default deny
    SK006 warning  rules ignored because policyTypes leaves their direction out
    SK007 warning  ipBlock 0.0.0.0/0 or ::/0 without except: every address
    SK008 warning  duplicate policies: the same name twice, or the same spec
    SK009 note     a named port that resolves to different numbers on different pods

ClusterNetworkPolicies (`engine.precedence`; with pods, exactly over their
connections, else from the rules as written):

    SK010 warning  two policies of one tier and priority whose first matching rules
                   disagree on some connection (with pods: one is named; without:
                   their rules of a direction have different actions and peers and
                   ports that can overlap, and subjects that do not require
                   different values of one label): the API leaves the winner to the
                   implementation
    SK011 warning  a rule shadowed by earlier rules of its tier (higher priority, or
                   earlier in its policy): with pods, every connection it matches is
                   decided first; without, one earlier rule of the same policy, or of
                   a policy with the same subject, matches everything it does. A Deny
                   shadowed by an Accept says so
    SK012 note     an Admin Pass with nothing below it: for every pod its policy
                   selects, no NetworkPolicy isolates the pod in that direction and no
                   Baseline policy has rules for it there (without pods: none in the
                   whole set), so what it passes is allowed by default, as an Accept
                   would; harmless until a NetworkPolicy or a Baseline policy appears
    SK013 note     a Baseline Pass: nothing is below Baseline, so it allows (the
                   default); it only keeps the later Baseline rules from matching
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from stockade.engine.coverage import (
    namespace_labels,
    peer_pods,
    peers_key,
    rule_destinations,
    rule_path,
)
from stockade.engine.match import port_matches
from stockade.engine.precedence import precedence
from stockade.engine.tiers import subject_selects
from stockade.model.cidr import parse_cidr
from stockade.model.cluster import Cluster, Endpoint
from stockade.model.cnp import (
    ACCEPT,
    BASELINE,
    DENY,
    NAMESPACES,
    NETWORKS,
    PASS,
    PODS,
    UNKNOWN,
    ClusterNetworkPolicy,
    CnpPeer,
    CnpPort,
    CnpRule,
    rule_label,
)
from stockade.model.labels import Labels
from stockade.model.policy import DIRECTIONS, EGRESS, INGRESS, TCP, UDP, NetworkPolicy, Peer, Rule
from stockade.model.selector import DOES_NOT_EXIST, IN, Selector

WARNING = "warning"
NOTE = "note"

CHECKS: dict[str, tuple[str, str]] = {
    "SK001": (WARNING, "peers split in two (OR) where AND was probably meant"),
    "SK002": (WARNING, "peer with both selectors (AND) matches no pod, OR would"),
    "SK003": (WARNING, "egress isolated without DNS"),
    "SK004": (WARNING, "namespaceSelector {} opens every namespace"),
    "SK005": (NOTE, "default deny"),
    "SK006": (WARNING, "rules ignored: direction missing from policyTypes"),
    "SK007": (WARNING, "ipBlock opens every address"),
    "SK008": (WARNING, "duplicate policy"),
    "SK009": (NOTE, "named port with different numbers"),
    "SK010": (WARNING, "same-priority ClusterNetworkPolicies disagree"),
    "SK011": (WARNING, "ClusterNetworkPolicy rule shadowed by earlier rules"),
    "SK012": (NOTE, "Admin Pass with nothing below it"),
    "SK013": (NOTE, "Baseline Pass is the default allow"),
}

DNS_PORT = 53


@dataclass(frozen=True)
class Finding:
    code: str
    subject: str  # `NetworkPolicy ns/name` (or several, comma-separated)
    where: str  # a field path, or ""
    message: str
    source: str = ""

    @property
    def severity(self) -> str:
        return CHECKS[self.code][0]


def lint(cluster: Cluster, as_loaded: Sequence[NetworkPolicy] = ()) -> tuple[Finding, ...]:
    """Every finding, in a stable order: by file, policy, code, field.

    `as_loaded`: the policies as read, before a later one of the same name replaced
    an earlier one in the cluster; only they can show a name defined twice.
    """
    ns_labels = namespace_labels(cluster)
    found: list[Finding] = []
    for policy in cluster.policies:
        found += policy_findings(policy, cluster, ns_labels)
    found += duplicates(as_loaded or cluster.policies)
    found += dns_blocked(cluster)
    if cluster.cluster_policies:
        found += tier_findings(cluster)
    return tuple(sorted(set(found), key=lambda f: (f.source, f.subject, f.code, f.where)))


def policy_findings(policy: NetworkPolicy, cluster: Cluster,
                    ns_labels: Mapping[str, Labels]) -> list[Finding]:
    out = default_deny(policy) + ignored_rules(policy)
    for direction in DIRECTIONS:
        if not policy.affects(direction):
            continue
        for i, rule in enumerate(policy.rules(direction)):
            out += rule_findings(policy, direction, i, rule, cluster, ns_labels)
    return out


def _finding(code: str, policy: NetworkPolicy, where: str, message: str) -> Finding:
    return Finding(code, f"NetworkPolicy {policy.key}", where, message, policy.source.file)


# ---- per rule ----------------------------------------------------------------------------


def rule_findings(policy: NetworkPolicy, direction: str, index: int, rule: Rule,
                  cluster: Cluster, ns_labels: Mapping[str, Labels]) -> list[Finding]:
    path = rule_path(direction, index)
    key = peers_key(direction)
    out = split_peers(policy, path, key, rule)
    for pi, peer in enumerate(rule.peers):
        where = f"{path}.{key}[{pi}]"
        out += [_finding(code, policy, where, msg)
                for code, msg in _peer_checks(peer, policy, direction, cluster, ns_labels)]
    out += named_port_numbers(policy, direction, index, rule, cluster, ns_labels)
    return out


def split_peers(policy: NetworkPolicy, path: str, key: str, rule: Rule) -> list[Finding]:
    """SK001: `- namespaceSelector: …` and `- podSelector: …` as two list items."""
    ns_only = [i for i, p in enumerate(rule.peers)
               if p.namespace_selector is not None and p.pod_selector is None]
    pod_only = [i for i, p in enumerate(rule.peers)
                if p.pod_selector is not None and p.namespace_selector is None]
    if not ns_only or not pod_only:
        return []
    n, p = rule.peers[ns_only[0]], rule.peers[pod_only[0]]
    assert n.namespace_selector is not None and p.pod_selector is not None
    return [_finding("SK001", policy, f"{path}.{key}", (
        f"{key}[{ns_only[0]}] and {key}[{pod_only[0]}] are two peers, ORed: every pod of "
        f"the namespaces [{n.namespace_selector.render()}], or the pods "
        f"[{p.pod_selector.render()}] of namespace {policy.namespace}; for the pods "
        f"[{p.pod_selector.render()}] of those namespaces, put both selectors in one peer"))]


def _peer_checks(peer: Peer, policy: NetworkPolicy, direction: str, cluster: Cluster,
                 ns_labels: Mapping[str, Labels]) -> Iterator[tuple[str, str]]:
    d = direction.lower()
    if peer.namespace_selector is not None and peer.namespace_selector.is_empty \
            and (peer.pod_selector is None or peer.pod_selector.is_empty):
        yield "SK004", (f"namespaceSelector {{}} allows {d} "
                        f"{'from' if direction == INGRESS else 'to'} every pod of every "
                        "namespace, present and future")
    if peer.ip_block is not None and not peer.ip_block.except_:
        net = parse_cidr(peer.ip_block.cidr)
        if net is not None and net.prefixlen == 0:
            yield "SK007", (f"ipBlock {peer.ip_block.cidr} allows {d} for every IPv"
                            f"{net.version} address, every pod included")
    if peer.namespace_selector is not None and peer.pod_selector is not None \
            and cluster.endpoints and not peer_pods(peer, policy.namespace, cluster, ns_labels):
        yield from _and_matches_nothing(peer, policy, cluster, ns_labels)


def _and_matches_nothing(peer: Peer, policy: NetworkPolicy, cluster: Cluster,
                         ns_labels: Mapping[str, Labels]) -> Iterator[tuple[str, str]]:
    """SK002: the AND matches no pod, yet each selector alone (OR) would match some."""
    assert peer.namespace_selector is not None and peer.pod_selector is not None
    as_ns = peer_pods(Peer(namespace_selector=peer.namespace_selector), policy.namespace,
                      cluster, ns_labels)
    as_pod = peer_pods(Peer(pod_selector=peer.pod_selector), policy.namespace,
                       cluster, ns_labels)
    if as_ns and as_pod:
        yield "SK002", (
            f"this one peer needs both namespaces [{peer.namespace_selector.render()}] and "
            f"pods [{peer.pod_selector.render()}] and matches no pod; as two peers (OR) it "
            f"would match {len(as_ns) + len(as_pod)} pod(s): check the indentation")


def named_port_numbers(policy: NetworkPolicy, direction: str, index: int, rule: Rule,
                       cluster: Cluster, ns_labels: Mapping[str, Labels]) -> list[Finding]:
    """SK009: `port: metrics` is 9090 on one pod and 9100 on another."""
    named = [(i, e) for i, e in enumerate(rule.ports) if isinstance(e.port, str)]
    if not named:
        return []
    dests = rule_destinations(rule, direction, policy, cluster, ns_labels)
    out = []
    for i, entry in named:
        assert isinstance(entry.port, str)
        numbers: dict[int, list[str]] = {}
        for ep in dests:
            n = ep.resolve_port(entry.port, entry.protocol)
            if n is not None:
                numbers.setdefault(n, []).append(ep.key)
        if len(numbers) > 1:
            where = "; ".join(f"{n} on {', '.join(pods)}" for n, pods in sorted(numbers.items()))
            out.append(_finding("SK009", policy, f"{rule_path(direction, index)}.ports[{i}]",
                                f"{entry.protocol} port {entry.port!r} is {where}"))
    return out


# ---- per policy --------------------------------------------------------------------------


def default_deny(policy: NetworkPolicy) -> list[Finding]:
    """SK005: `podSelector: {}` and no rules: nothing in (or out) for the whole namespace."""
    if not policy.pod_selector.is_empty:
        return []
    out = []
    for direction in DIRECTIONS:
        if policy.affects(direction) and not policy.rules(direction):
            d = direction.lower()
            out.append(_finding("SK005", policy, f"spec.{d}", (
                f"denies all {d} of every pod in namespace {policy.namespace} "
                f"(a default deny: other policies must allow what is needed)")))
    return out


def ignored_rules(policy: NetworkPolicy) -> list[Finding]:
    """SK006: `policyTypes: [Ingress]` with egress rules, which the API keeps but ignores."""
    out = []
    for direction in DIRECTIONS:
        rules = policy.rules(direction)
        if rules and not policy.affects(direction):
            types = ", ".join(policy.policy_types)
            out.append(_finding("SK006", policy, f"spec.{direction.lower()}", (
                f"{len(rules)} {direction.lower()} rule(s) have no effect: policyTypes "
                f"[{types}] leaves out {direction}; add it or remove the rules")))
    return out


def duplicates(policies: Sequence[NetworkPolicy]) -> list[Finding]:
    """SK008: one name defined twice (the last applied wins), or two names, one spec."""
    out = []
    seen: dict[str, NetworkPolicy] = {}
    same_spec: dict[object, NetworkPolicy] = {}
    for p in policies:
        if p.key in seen:
            first = seen[p.key]
            out.append(_finding("SK008", p, "metadata.name", (
                f"defined twice (also in {first.source.render()}): "
                "applying both keeps only the last")))
            continue
        seen[p.key] = p
        # Rules are ORed, so their order (and repeats) cannot change what a policy allows.
        spec = (p.namespace, p.pod_selector, frozenset(p.policy_types),
                frozenset(p.ingress), frozenset(p.egress))
        if spec in same_spec:
            out.append(_finding("SK008", p, "spec", (
                f"same spec as NetworkPolicy {same_spec[spec].key}: one of them is redundant")))
        else:
            same_spec[spec] = p
    return out


# ---- per pod -----------------------------------------------------------------------------


def dns_blocked(cluster: Cluster) -> list[Finding]:
    """SK003: egress isolated, and no egress rule of any isolating policy allows port 53.

    Pods are grouped by the set of policies that isolate them, one finding per group.
    Without pods, each egress policy is judged on its own rules.
    """
    groups: dict[tuple[NetworkPolicy, ...], list[Endpoint]] = {}
    for ep in cluster.endpoints:
        pols = tuple(p for p in cluster.policies if p.namespace == ep.namespace
                     and p.affects(EGRESS) and p.pod_selector.matches(ep.labels))
        if pols:
            groups.setdefault(pols, []).append(ep)
    if not cluster.endpoints:
        # Without pods, assume the egress policies of a namespace may select the same pods.
        by_ns: dict[str, list[NetworkPolicy]] = {}
        for p in cluster.policies:
            if p.affects(EGRESS):
                by_ns.setdefault(p.namespace, []).append(p)
        groups = {tuple(pols): [] for pols in by_ns.values()}
    out = []
    for pols, pods in groups.items():
        if any(_allows_dns(rule, cluster) for p in pols for rule in p.egress):
            continue
        first = pols[0]
        if len(pods) == 1:
            who = f"pod {pods[0].key} is"
        elif pods:
            who = f"pods {', '.join(e.key for e in pods)} are"
        else:
            who = f"the pods they select in namespace {first.namespace} are"
        out.append(Finding("SK003", ", ".join(f"NetworkPolicy {p.key}" for p in pols), "spec",
                           f"{who} isolated for egress and no egress rule allows UDP or "
                           "TCP port 53: DNS lookups will fail", first.source.file))
    return out


def _allows_dns(rule: Rule, cluster: Cluster) -> bool:
    """Whether a rule lets port 53 out to some peer (any peer will do for a lint)."""
    if not rule.ports:
        return True
    dests: tuple[Endpoint | None, ...] = (None, *cluster.endpoints)
    return any(port_matches(e, DNS_PORT, proto, d)
               for e in rule.ports for proto in (UDP, TCP) for d in dests)



# ---- ClusterNetworkPolicy tiers ----------------------------------------------------------


def _tier_finding(code: str, policy: ClusterNetworkPolicy, where: str, message: str
                  ) -> Finding:
    return Finding(code, f"ClusterNetworkPolicy {policy.name}", where, message,
                   policy.source.file)


def tier_findings(cluster: Cluster) -> list[Finding]:
    """SK010-SK013 for every ClusterNetworkPolicy."""
    out: list[Finding] = []
    if cluster.endpoints:
        prec = precedence(cluster)
        for overlap in prec.overlaps:
            first = prec.policies[overlap.first]
            out.append(_tier_finding("SK010", first, "spec.priority",
                                     overlap.render(first, prec.policies[overlap.second])))
        for key in prec.shadowed():
            out.append(_tier_finding("SK011", prec.policies[key[0]], rule_path(key[1], key[2]),
                                     prec.shadowed_reason(key)))
    else:
        out += written_overlaps(cluster.cluster_policies)
        out += written_shadows(cluster.cluster_policies)
    # A shadowed Pass is reported as shadowed only: what it would pass is moot.
    shadowed = {(f.subject, f.where) for f in out if f.code == "SK011"}
    out += [f for f in passes(cluster) if (f.subject, f.where) not in shadowed]
    return out


def _by_tier(policies: Sequence[ClusterNetworkPolicy]
             ) -> dict[str, list[ClusterNetworkPolicy]]:
    out: dict[str, list[ClusterNetworkPolicy]] = {}
    for p in sorted(policies, key=ClusterNetworkPolicy.order):
        out.setdefault(p.tier, []).append(p)
    return out


def written_overlaps(policies: Sequence[ClusterNetworkPolicy]) -> list[Finding]:
    """SK010 without pods: same tier and priority, rules of one direction with different
    actions whose peers and ports can overlap (the subjects are assumed to)."""
    out = []
    for ordered in _by_tier(policies).values():
        for i, a in enumerate(ordered):
            for b in ordered[i + 1:]:
                if a.priority != b.priority or not _selections_may_meet(a.subject, b.subject):
                    continue
                hit = next(((d, ai, bi) for d in DIRECTIONS
                            for ai, ra in enumerate(a.rules(d))
                            for bi, rb in enumerate(b.rules(d))
                            if ra.action != rb.action and _rules_may_meet(ra, rb)), None)
                if hit is None:
                    continue
                d, ai, bi = hit
                key = "ingress" if d == INGRESS else "egress"
                out.append(_tier_finding("SK010", a, "spec.priority", (
                    f"same {a.tier} priority {a.priority} as ClusterNetworkPolicy {b.name}, "
                    f"and {key}[{ai}] ({a.rules(d)[ai].action}) and its {key}[{bi}] "
                    f"({b.rules(d)[bi].action}) may match the same connections of a pod both "
                    f"select: the API leaves the winner to the implementation (stockade "
                    f"takes {a.name}, by name); give them different priorities")))
    return out


def _rules_may_meet(a: CnpRule, b: CnpRule) -> bool:
    return _ports_may_meet(a.ports, b.ports) and any(
        _peers_may_meet(pa, a.action, pb, b.action) for pa in a.peers for pb in b.peers)


def _ports_may_meet(a: tuple[CnpPort, ...] | None, b: tuple[CnpPort, ...] | None) -> bool:
    if a is None or b is None:
        return True
    return any(x.name or y.name or (x.protocol == y.protocol and x.start <= y.end
                                    and y.start <= x.end) for x in a for y in b)


def _peers_may_meet(a: CnpPeer, a_action: str, b: CnpPeer, b_action: str) -> bool:
    if (a.kind == UNKNOWN and a_action == ACCEPT) or (b.kind == UNKNOWN and b_action == ACCEPT):
        return False  # an Accept of a peer stockade cannot read matches nothing
    if a.kind == NETWORKS and b.kind == NETWORKS:
        return any(x.version == y.version and x.overlaps(y)
                   for x in _nets(a) for y in _nets(b))
    if a.kind in (NAMESPACES, PODS) and b.kind in (NAMESPACES, PODS):
        return _selections_may_meet(a, b)
    return True


def _selections_may_meet(a: CnpPeer, b: CnpPeer) -> bool:
    """Whether two subjects (or selector peers) can select one pod: not when their
    namespace selectors, or both pod selectors, require different values of a label."""
    if _disjoint(a.namespace_selector, b.namespace_selector):
        return False
    return not (a.kind == PODS and b.kind == PODS
                and _disjoint(a.pod_selector, b.pod_selector))


def _disjoint(a: Selector, b: Selector) -> bool:
    """Whether no labels match both: one key required In disjoint values, or In by one
    and DoesNotExist by the other."""
    for x in a.requirements():
        for y in b.requirements():
            if x.key != y.key:
                continue
            ops = {x.operator, y.operator}
            if ops == {IN} and not set(x.values) & set(y.values):
                return True
            if ops == {IN, DOES_NOT_EXIST}:
                return True
    return False


def _nets(peer: CnpPeer) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [n for text in peer.networks if (n := parse_cidr(text)) is not None]


def written_shadows(policies: Sequence[ClusterNetworkPolicy]) -> list[Finding]:
    """SK011 without pods: an earlier rule of the same policy, or of an earlier policy of
    the tier with the same subject, matches everything the rule does."""
    out = []
    for ordered in _by_tier(policies).values():
        for pi, policy in enumerate(ordered):
            earlier_policies = [p for p in ordered[:pi] if p.subject == policy.subject]
            for d in DIRECTIONS:
                for ri, rule in enumerate(policy.rules(d)):
                    before = [(p, i, r) for p in earlier_policies
                              for i, r in enumerate(p.rules(d))]
                    before += [(policy, i, r) for i, r in enumerate(policy.rules(d)[:ri])]
                    cover = next(((p, i, r) for p, i, r in before if _covers(r, rule)), None)
                    if cover is None:
                        continue
                    p, i, r = cover
                    head = "a Deny shadowed by an earlier Accept" \
                        if rule.action == DENY and r.action == ACCEPT else "shadowed"
                    out.append(_tier_finding("SK011", policy, rule_path(d, ri), (
                        f"{head}: {rule_label(p, d, i)} matches every connection it does, "
                        "first")))
    return out


def _covers(e: CnpRule, r: CnpRule) -> bool:
    """Whether rule `e` matches every connection rule `r` matches, whatever the pods."""
    if e.ports is not None:
        if r.ports is None:
            return False
        for x in r.ports:
            if not any((x.name and y.name == x.name) or (
                    not x.name and not y.name and y.protocol == x.protocol
                    and y.start <= x.start and x.end <= y.end) for y in e.ports):
                return False
    return all(any(_peer_covers(pe, e.action, pr, r.action) for pe in e.peers)
               for pr in r.peers)


def _peer_covers(e: CnpPeer, e_action: str, r: CnpPeer, r_action: str) -> bool:
    if r.kind == UNKNOWN and r_action == ACCEPT:
        return True  # matches nothing
    if e.kind == UNKNOWN:
        return e_action != ACCEPT
    if r.kind == UNKNOWN:
        return False
    if e == replace(r, written=e.written):
        return True
    if e.kind == NAMESPACES and r.kind in (NAMESPACES, PODS):
        return e.namespace_selector.is_empty or e.namespace_selector == r.namespace_selector
    if e.kind == PODS and r.kind == PODS:
        return (e.namespace_selector.is_empty
                or e.namespace_selector == r.namespace_selector) \
            and (e.pod_selector.is_empty or e.pod_selector == r.pod_selector)
    if e.kind == NETWORKS and r.kind == NETWORKS:
        outer = _nets(e)
        return all(any(n.version == o.version and n.subnet_of(o)  # type: ignore[arg-type]
                       for o in outer) for n in _nets(r))
    return False


def passes(cluster: Cluster) -> list[Finding]:
    """SK012 (an Admin Pass with nothing below it) and SK013 (every Baseline Pass)."""
    out = []
    ns_labels = namespace_labels(cluster)
    baseline = [p for p in cluster.cluster_policies if p.tier == BASELINE]
    for policy in cluster.cluster_policies:
        for d in DIRECTIONS:
            for i, rule in enumerate(policy.rules(d)):
                if rule.action != PASS:
                    continue
                if policy.tier == BASELINE:
                    out.append(_tier_finding("SK013", policy, rule_path(d, i), (
                        "a Baseline Pass allows what it matches (nothing is below Baseline: "
                        "the default allows); it only keeps the later Baseline rules from "
                        "matching, which an Accept says explicitly")))
                elif _nothing_below(policy, d, cluster, baseline, ns_labels):
                    where = "the pods it selects" if cluster.endpoints else "any pod"
                    out.append(_tier_finding("SK012", policy, rule_path(d, i), (
                        f"passes to nothing: no NetworkPolicy isolates {where} for "
                        f"{d.lower()} and no Baseline policy has {d.lower()} rules for "
                        "them, so what it passes is allowed by default, as an Accept would "
                        "allow it (a NetworkPolicy or Baseline policy added later will "
                        "decide instead)")))
    return out


def _nothing_below(policy: ClusterNetworkPolicy, direction: str, cluster: Cluster,
                   baseline: list[ClusterNetworkPolicy], ns_labels: Mapping[str, Labels]
                   ) -> bool:
    below = [b for b in baseline if b.rules(direction)]
    if not cluster.endpoints:
        return not below and not any(p.affects(direction) for p in cluster.policies)
    pods = [ep for ep in cluster.endpoints if subject_selects(policy.subject, ep, ns_labels)]
    if not pods:
        return False  # coverage reports the policy as unused
    return not any(
        any(p.namespace == ep.namespace and p.affects(direction)
            and p.pod_selector.matches(ep.labels) for p in cluster.policies)
        or any(subject_selects(b.subject, ep, ns_labels) for b in below)
        for ep in pods)
