"""The bulk analyses with ClusterNetworkPolicy tiers against the reference evaluator.

For random small clusters with random NetworkPolicies and ClusterNetworkPolicies
(`tests.property.tier_strategies`): the matrix's bitsets give the evaluator's
tables; `stockade list`'s port intervals are the evaluator's verdicts on sampled
ports of every protocol and on addresses inside and outside every ipBlock and
every `networks` CIDR; `diff` reports exactly the sampled connections whose
verdict differs when the tiers change; removing what coverage reports as dead or
shadowed changes no verdict; and when lint reports no same-priority overlap, the
tie-break between equal priorities changes no verdict.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.property.strategies import DEFAULT, DENSE, Universe, policy_sets
from tests.property.test_connectivity import _range_of, addresses_of, sample_ports
from tests.property.tier_strategies import (
    PRIORITIES,
    cnp_cidrs,
    cnp_clusters,
    cnp_scenarios,
    cnp_sets,
)

from stockade.engine.connectivity import (
    Connections,
    address_ranges,
    connectivity,
    workload_peers,
)
from stockade.engine.coverage import DEAD_RULE, UNUSED_POLICY, coverage
from stockade.engine.diff import diff_policies, render_range
from stockade.engine.evaluate import Evaluator, Flow
from stockade.engine.lint import lint
from stockade.engine.matrix import compute_matrix, evaluator_judge
from stockade.model.cluster import Cluster
from stockade.model.cnp import ACTIONS
from stockade.model.policy import (
    EGRESS,
    INGRESS,
    PROTOCOLS,
    IPBlock,
    NetworkPolicy,
    Peer,
    Rule,
)
from stockade.model.selector import ALL

UNIVERSES = {"default": DEFAULT, "dense": DENSE}


@settings(max_examples=150, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(UNIVERSES)))
def test_matrix_bitsets_equal_the_evaluator(data: st.DataObject, name: str) -> None:
    u: Universe = UNIVERSES[name]
    sc = data.draw(cnp_scenarios(u), label="scenario")
    names = sorted({p.name for ep in sc.cluster.endpoints for p in ep.ports if p.name})
    ports: list[int | str] = [port for port, _ in sc.probes]
    ports += names[:2]
    protocols = sorted({proto for _, proto in sc.probes})
    fast = compute_matrix(sc.cluster, ports, protocols)
    slow = compute_matrix(sc.cluster, ports, protocols, judge=evaluator_judge(sc.cluster))
    assert fast == slow


# ---- stockade list ---------------------------------------------------------------------


def tier_ports(cluster: Cluster, u: Universe) -> list[int]:
    """Every edge of every port entry (NetworkPolicy and tiers), its neighbours,
    container ports, and the ends of the port space."""
    ports = set(sample_ports(cluster, u))
    for policy in cluster.cluster_policies:
        for rule in policy.ingress + policy.egress:
            for entry in rule.ports or ():
                if not entry.name:
                    ports |= {entry.start - 1, entry.start, entry.start + 1,
                              entry.end - 1, entry.end, entry.end + 1}
    return sorted(p for p in ports if 1 <= p <= 65535)


def tier_addresses(cluster: Cluster, version: int = 4) -> list[str]:
    """Inside and just outside every ipBlock, except and `networks` CIDR, and the ends."""
    blocks = tuple(IPBlock(text) for text in cnp_cidrs(cluster.cluster_policies))
    extra = NetworkPolicy("x", "cidrs", ALL, ingress=(Rule((), tuple(
        Peer(ip_block=b) for b in blocks)),)) if blocks else None
    return addresses_of(cluster.policies + ((extra,) if extra else ()), version)


def _check(conns: Connections, ev: Evaluator, flow: Flow, ports: list[int], what: str) -> None:
    for protocol in PROTOCOLS:
        for port in ports:
            f = Flow(flow.src, flow.src_ip, flow.dst, flow.dst_ip, port, protocol)
            assert conns.allows(protocol, port) == ev.allowed(f), \
                f"{what} {protocol}/{port}: list says {conns.render()}"


@settings(max_examples=120, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(UNIVERSES)))
def test_list_equals_the_evaluator(data: st.DataObject, name: str) -> None:
    u: Universe = UNIVERSES[name]
    cluster = data.draw(cnp_clusters(u), label="cluster")
    peers, warnings = workload_peers(cluster.endpoints, {}, ())
    assert not warnings
    result = connectivity(cluster, peers)
    lines = {(c.src, c.dst): c.connections for c in result.connections}
    judged = Cluster(cluster.namespaces, tuple(p.endpoint for p in peers), cluster.policies,
                     cluster.cluster_policies)
    ev = Evaluator(judged)
    ports = tier_ports(cluster, u)
    none = Connections()
    for s in peers:
        for d in peers:
            if s is not d:
                _check(lines.get((s.name, d.name), none), ev,
                       Flow(s.endpoint, "", d.endpoint, "", 0, "TCP"), ports,
                       f"{s.name} => {d.name}")
    for address in tier_addresses(cluster):
        src_range = _range_of(result.sources, address).render()
        dst_range = _range_of(result.destinations, address).render()
        for p in peers:
            _check(lines.get((src_range, p.name), none), ev,
                   Flow(None, address, p.endpoint, "", 0, "TCP"), ports,
                   f"{address} in {src_range} => {p.name}")
            _check(lines.get((p.name, dst_range), none), ev,
                   Flow(p.endpoint, "", None, address, 0, "TCP"), ports,
                   f"{p.name} => {address} in {dst_range}")


# ---- stockade diff ---------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_diff_of_tiers_is_exactly_the_changed_verdicts(data: st.DataObject) -> None:
    """Two random sets of tiers (and NetworkPolicies) over one cluster: a (source,
    destination, protocol, port) is in a change line exactly when the evaluator's
    verdict on it differs; between pods, and between pods and addresses inside and
    outside every ipBlock and networks CIDR."""
    u = DENSE
    cluster = data.draw(cnp_clusters(u, min_cnps=0), label="old")
    new_cnps = data.draw(cnp_sets(u, prefix="cnp"), label="new tiers")
    if data.draw(st.booleans(), label="same NetworkPolicies"):
        new_nps = cluster.policies
    else:
        new_nps = data.draw(policy_sets(u, tuple(ns.name for ns in cluster.namespaces),
                                        prefix="new"), label="new policies")
    old = cluster
    new = Cluster(cluster.namespaces, cluster.endpoints, new_nps, new_cnps)
    _assert_diff_exact(old, new, u)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_diff_of_a_priority_or_action_change(data: st.DataObject) -> None:
    """One policy of the tiers with another priority, or one rule with another action:
    exactly the connections whose verdict that changes."""
    u = DENSE
    cluster = data.draw(cnp_clusters(u, min_cnps=1), label="old")
    cnps = list(cluster.cluster_policies)
    i = data.draw(st.integers(0, len(cnps) - 1), label="policy")
    target = cnps[i]
    rules = [(d, j) for d in (INGRESS, EGRESS) for j in range(len(target.rules(d)))]
    if rules and data.draw(st.booleans(), label="action"):
        d, j = data.draw(st.sampled_from(rules), label="rule")
        changed = list(target.rules(d))
        changed[j] = replace(changed[j], action=data.draw(st.sampled_from(ACTIONS)))
        cnps[i] = replace(target, **{"ingress" if d == INGRESS else "egress": tuple(changed)})
    else:
        cnps[i] = replace(target, priority=data.draw(st.sampled_from(PRIORITIES)))
    new = Cluster(cluster.namespaces, cluster.endpoints, cluster.policies, tuple(cnps))
    _assert_diff_exact(cluster, new, u)


def _assert_diff_exact(old: Cluster, new: Cluster, u: Universe) -> None:
    result = diff_policies(old.with_policies(()), old.policies, new.policies, external=True,
                           old_tiers=old.cluster_policies, new_tiers=new.cluster_policies)
    before, after = Evaluator(old), Evaluator(new)
    both = Cluster(old.namespaces, old.endpoints, old.policies + new.policies,
                   old.cluster_policies + new.cluster_policies)
    ports = tier_ports(both, u)
    changed: dict[tuple[str, str], list[tuple[str, int, int]]] = {}
    for c in result.changes:
        assert c.reason, c
        for ps in c.ports:
            changed.setdefault((c.src, c.dst), []).extend(
                (ps.protocol, r.low, r.high) for r in ps.ranges)

    def listed(src: str, dst: str, protocol: str, port: int) -> bool:
        return any(p == protocol and lo <= port <= hi
                   for p, lo, hi in changed.get((src, dst), ()))

    for s in old.endpoints:
        for d in old.endpoints:
            if s.key == d.key:
                continue
            for protocol in PROTOCOLS:
                for port in ports:
                    was = before.allowed(before.flow(s, d, port, protocol))
                    now = after.allowed(after.flow(s, d, port, protocol))
                    assert listed(s.key, d.key, protocol, port) == (was != now), \
                        (s.key, d.key, protocol, port, was, now)
    cnps = both.cluster_policies
    nps = both.policies
    sources = tuple(r for v in (4, 6) for r in address_ranges(nps, INGRESS, v, cnps))
    destinations = tuple(r for v in (4, 6) for r in address_ranges(nps, EGRESS, v, cnps))
    for address in tier_addresses(both) + tier_addresses(both, 6):
        inbound = render_range(_range_of(sources, address))
        outbound = render_range(_range_of(destinations, address))
        for pod in old.endpoints:
            for protocol in PROTOCOLS:
                for port in ports:
                    into = Flow(None, address, pod, pod.ips[0], port, protocol)
                    assert listed(inbound, pod.key, protocol, port) == \
                        (before.allowed(into) != after.allowed(into)), (address, pod.key)
                    out = Flow(pod, pod.ips[0], None, address, port, protocol)
                    assert listed(pod.key, outbound, protocol, port) == \
                        (before.allowed(out) != after.allowed(out)), (pod.key, address)


# ---- coverage and lint -----------------------------------------------------------------


def _verdicts(cluster: Cluster, flows: list[Flow]) -> list[bool]:
    ev = Evaluator(cluster)
    return [ev.allowed(f) for f in flows]


@settings(max_examples=100, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(UNIVERSES)))
def test_what_coverage_calls_dead_or_shadowed_changes_no_verdict(data: st.DataObject,
                                                                 name: str) -> None:
    """Removing every ClusterNetworkPolicy that selects no pod and every rule coverage
    reports as dead or shadowed (lint's SK011 too) leaves every verdict as it was."""
    sc = data.draw(cnp_scenarios(UNIVERSES[name]), label="scenario")
    report = coverage(sc.cluster)
    gone = {g.subject.removeprefix("ClusterNetworkPolicy ") for g in report.gaps
            if g.kind == UNUSED_POLICY and g.subject.startswith("ClusterNetworkPolicy ")}
    dead = {(g.subject.removeprefix("ClusterNetworkPolicy "), g.where) for g in report.gaps
            if g.kind == DEAD_RULE and g.subject.startswith("ClusterNetworkPolicy ")}
    shadowed = {(f.subject.removeprefix("ClusterNetworkPolicy "), f.where)
                for f in lint(sc.cluster) if f.code == "SK011"}
    assert shadowed <= dead
    kept = []
    for p in sc.cluster.cluster_policies:
        if p.name in gone:
            continue
        kept.append(replace(
            p, ingress=tuple(r for i, r in enumerate(p.ingress)
                             if (p.name, f"spec.ingress[{i}]") not in dead),
            egress=tuple(r for i, r in enumerate(p.egress)
                         if (p.name, f"spec.egress[{i}]") not in dead)))
    pruned = Cluster(sc.cluster.namespaces, sc.cluster.endpoints, sc.cluster.policies,
                     tuple(kept))
    flows = list(sc.flows())
    assert _verdicts(pruned, flows) == _verdicts(sc.cluster, flows)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(UNIVERSES)))
def test_without_a_same_priority_overlap_the_tie_break_does_not_matter(
        data: st.DataObject, name: str) -> None:
    """When lint reports no SK010 (given the pods, or given none), reversing the order of
    policies of equal priority (by renaming them) changes no verdict."""
    sc = data.draw(cnp_scenarios(UNIVERSES[name]), label="scenario")
    # With the pods, or read from the rules alone (which must hold for any pods).
    podless = data.draw(st.booleans(), label="without pods")
    judged = Cluster(sc.cluster.namespaces, (), sc.cluster.policies,
                     sc.cluster.cluster_policies) if podless else sc.cluster
    if any(f.code == "SK010" for f in lint(judged)):
        return
    ordered = sorted(sc.cluster.cluster_policies, key=lambda p: p.name)
    renamed = tuple(replace(p, name=f"r-{len(ordered) - i:03d}") for i, p in enumerate(ordered))
    flipped = Cluster(sc.cluster.namespaces, sc.cluster.endpoints, sc.cluster.policies, renamed)
    flows = list(sc.flows())
    assert _verdicts(flipped, flows) == _verdicts(sc.cluster, flows)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(UNIVERSES)))
def test_what_lint_calls_shadowed_without_pods_is_shadowed_for_any_pods(
        data: st.DataObject, name: str) -> None:
    """SK011 read from the rules alone (no pod given) holds for the pods that come: the
    rules it names can be removed without changing any verdict."""
    sc = data.draw(cnp_scenarios(UNIVERSES[name]), label="scenario")
    podless = Cluster(sc.cluster.namespaces, (), sc.cluster.policies,
                      sc.cluster.cluster_policies)
    shadowed = {(f.subject.removeprefix("ClusterNetworkPolicy "), f.where)
                for f in lint(podless) if f.code == "SK011"}
    kept = tuple(replace(
        p, ingress=tuple(r for i, r in enumerate(p.ingress)
                         if (p.name, f"spec.ingress[{i}]") not in shadowed),
        egress=tuple(r for i, r in enumerate(p.egress)
                     if (p.name, f"spec.egress[{i}]") not in shadowed))
        for p in sc.cluster.cluster_policies)
    pruned = Cluster(sc.cluster.namespaces, sc.cluster.endpoints, sc.cluster.policies, kept)
    flows = list(sc.flows())
    assert _verdicts(pruned, flows) == _verdicts(sc.cluster, flows)
