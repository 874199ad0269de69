"""Properties of the reference evaluator, against random valid clusters and policies.

The strongest check is `test_verdict_equals_naive_oracle`: a deliberately naive
re-reading of the networking.k8s.io/v1 NetworkPolicy spec, written here without
the product's matching code. The other properties (order, monotonicity,
isolation, traces, self-traffic) hold whatever the oracle says.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from tests.property.strategies import (
    DEFAULT,
    DENSE,
    MINIMAL,
    Scenario,
    Universe,
    network_policies,
    pod_vocab,
    rules,
    scenarios,
    selectors,
)

from stockade.engine.evaluate import Evaluator, Flow, Side, Verdict
from stockade.engine.explain import context_of, explain_lines
from stockade.model.cluster import Cluster, Endpoint
from stockade.model.labels import Labels
from stockade.model.policy import EGRESS, INGRESS, NetworkPolicy, Peer, PolicyPort, Rule
from stockade.model.selector import ALL, Selector

DIRECTIONS = (INGRESS, EGRESS)

UNIVERSES = pytest.mark.parametrize("u", [DEFAULT, DENSE], ids=["default", "dense"])
"""Every property runs on the full vocabulary and on a dense one where rules,
ports and peers overlap a lot (several allowing rules, second port entries...)."""

# --------------------------------------------------------------------------- the oracle
# Straight from the API reference, one sentence at a time; no caching, no cleverness.


def o_selector(sel: Selector, labels: Labels) -> bool:
    """matchLabels and matchExpressions are ANDed; an empty selector selects all."""
    for key, value in sel.match_labels.items():
        if key not in labels or labels[key] != value:
            return False
    for req in sel.match_expressions:
        present = req.key in labels
        if req.operator == "In":
            ok = present and labels[req.key] in req.values
        elif req.operator == "NotIn":
            ok = not present or labels[req.key] not in req.values
        elif req.operator == "Exists":
            ok = present
        elif req.operator == "DoesNotExist":
            ok = not present
        else:
            raise AssertionError(f"generated an invalid operator {req.operator!r}")
        if not ok:
            return False
    return True


def o_ip_block(cidr: str, excepts: Iterable[str], ip: str) -> bool:
    """The IP is inside `cidr` and outside every `except`."""
    addr = ipaddress.ip_address(ip)
    net = ipaddress.ip_network(cidr)
    if addr.version != net.version or addr not in net:
        return False
    for e in excepts:
        exc = ipaddress.ip_network(e)
        if exc.version == addr.version and addr in exc:
            return False
    return True


def o_peer(cluster: Cluster, policy: NetworkPolicy, peer: Peer, ep: Endpoint | None,
           ip: str) -> bool:
    """ipBlock: by IP. Selectors: pods only; podSelector alone means the policy's own
    namespace; namespaceSelector alone means every pod of those namespaces; both
    means pods matching podSelector in namespaces matching namespaceSelector."""
    if peer.ip_block is not None:
        return o_ip_block(peer.ip_block.cidr, peer.ip_block.except_, ip)
    if ep is None:
        return False
    if peer.namespace_selector is None:
        in_namespace = ep.namespace == policy.namespace
    else:
        ns = next(n for n in cluster.namespaces if n.name == ep.namespace)
        in_namespace = o_selector(peer.namespace_selector, ns.labels)
    pod_ok = peer.pod_selector is None or o_selector(peer.pod_selector, ep.labels)
    return in_namespace and pod_ok


def o_port(entry: PolicyPort, flow: Flow) -> bool:
    """Protocol must match; no port: all ports; a name is the destination pod's
    container port of that name and protocol; port..endPort inclusive."""
    if entry.protocol != flow.protocol:
        return False
    if entry.port is None:
        return True
    if isinstance(entry.port, str):
        if flow.dst is None:
            return False
        return any(cp.name == entry.port and cp.protocol == entry.protocol
                   and cp.port == flow.port for cp in flow.dst.ports)
    end = entry.port if entry.end_port is None else entry.end_port
    return entry.port <= flow.port <= end


def o_subject(flow: Flow, direction: str) -> tuple[Endpoint | None, Endpoint | None, str]:
    """(the pod whose side this is, the other pod, the other side's IP)."""
    if direction == EGRESS:
        return flow.src, flow.dst, flow.dst_ip
    return flow.dst, flow.src, flow.src_ip


def o_selects(policy: NetworkPolicy, ep: Endpoint, direction: str) -> bool:
    """A policy applies to the pods of its namespace its podSelector selects, for
    the directions listed in its policyTypes."""
    return (policy.namespace == ep.namespace and direction in policy.policy_types
            and o_selector(policy.pod_selector, ep.labels))


def o_rule(cluster: Cluster, policy: NetworkPolicy, rule: Rule, flow: Flow,
           direction: str) -> bool:
    """A rule allows when some port entry matches (or there are none) AND some
    peer matches (or there are none)."""
    _, other, other_ip = o_subject(flow, direction)
    ports_ok = not rule.ports or any(o_port(p, flow) for p in rule.ports)
    peers_ok = not rule.peers or any(o_peer(cluster, policy, p, other, other_ip)
                                     for p in rule.peers)
    return ports_ok and peers_ok


def o_isolating(cluster: Cluster, flow: Flow, direction: str) -> set[str]:
    subject, _, _ = o_subject(flow, direction)
    if subject is None:
        return set()
    return {p.key for p in cluster.policies if o_selects(p, subject, direction)}


def o_allowing_rules(cluster: Cluster, flow: Flow, direction: str) -> set[tuple[str, int]]:
    """(policy key, rule index) of every rule of an isolating policy that allows."""
    subject, _, _ = o_subject(flow, direction)
    if subject is None:
        return set()
    out = set()
    for p in cluster.policies:
        if not o_selects(p, subject, direction):
            continue
        for i, rule in enumerate(p.ingress if direction == INGRESS else p.egress):
            if o_rule(cluster, p, rule, flow, direction):
                out.add((p.key, i))
    return out


def o_side_allows(cluster: Cluster, flow: Flow, direction: str) -> bool:
    """Not isolated (no policy selects it for the direction), or some rule allows."""
    return (not o_isolating(cluster, flow, direction)
            or bool(o_allowing_rules(cluster, flow, direction)))


def oracle(cluster: Cluster, flow: Flow) -> bool:
    """Egress of the source AND ingress of the destination; a pod to itself: allowed."""
    if flow.src is not None and flow.dst is not None and flow.src.key == flow.dst.key:
        return True
    return o_side_allows(cluster, flow, EGRESS) and o_side_allows(cluster, flow, INGRESS)


# --------------------------------------------------------------------------- helpers


def side_of(v: Verdict, direction: str) -> Side:
    return v.egress if direction == EGRESS else v.ingress


def side_facts(s: Side) -> tuple[bool, frozenset[str], frozenset[object]]:
    return s.allowed, frozenset(s.isolating), frozenset(s.allowed_by)


def describe(flow: Flow) -> str:
    return (f"{flow.render_side('src')} ({flow.src_ip}) -> {flow.render_side('dst')} "
            f"({flow.dst_ip}) {flow.protocol}/{flow.port}")


def namespaces_of(sc: Scenario) -> tuple[str, ...]:
    return tuple(ns.name for ns in sc.cluster.namespaces)


# --------------------------------------------------------------------------- properties


@UNIVERSES
@given(data=st.data())
def test_no_policies_allow_everything(u: Universe, data: st.DataObject) -> None:
    sc = data.draw(scenarios(u, with_policies=False), label="scenario")
    ev = Evaluator(sc.cluster)
    for flow in sc.flows(self_traffic=True):
        v = ev.verdict(flow)
        assert v.allowed, describe(flow)
        assert ev.allowed(flow), describe(flow)
        for s in (v.egress, v.ingress):
            assert not s.isolating and not s.allowed_by and s.allowed


@pytest.mark.parametrize("u", [DEFAULT, DENSE, MINIMAL], ids=["default", "dense", "minimal"])
@settings(max_examples=2 * settings().max_examples)
@given(data=st.data())
def test_verdict_equals_naive_oracle(u: Universe, data: st.DataObject) -> None:
    sc = data.draw(scenarios(u), label="scenario")
    ev = Evaluator(sc.cluster)
    for flow in sc.flows(self_traffic=True):
        v = ev.verdict(flow)
        expected = oracle(sc.cluster, flow)
        assert v.allowed == expected, (
            f"{describe(flow)}: evaluator says {v.allowed}, the spec says {expected}\n"
            + "\n".join(explain_lines(v, context_of(sc.cluster))))
        if not v.self_traffic:
            for d in DIRECTIONS:
                s = side_of(v, d)
                assert s.allowed == o_side_allows(sc.cluster, flow, d), (
                    f"{describe(flow)}: {d} side")
                if s.isolated:
                    event(f"has {d} flows {'allowed by a rule' if s.allowed else 'denied'}")


@UNIVERSES
@given(data=st.data())
def test_policy_order_never_matters(u: Universe, data: st.DataObject) -> None:
    sc = data.draw(scenarios(u, min_policies=2), label="scenario")
    shuffled = data.draw(st.permutations(sc.cluster.policies), label="shuffled")
    ev1 = Evaluator(sc.cluster)
    ev2 = Evaluator(sc.cluster.with_policies(shuffled))
    for flow in sc.flows(self_traffic=True):
        v1, v2 = ev1.verdict(flow), ev2.verdict(flow)
        assert v1.allowed == v2.allowed, describe(flow)
        assert ev1.allowed(flow) == ev2.allowed(flow), describe(flow)
        for d in DIRECTIONS:
            assert side_facts(side_of(v1, d)) == side_facts(side_of(v2, d)), describe(flow)


@UNIVERSES
@given(data=st.data())
def test_adding_a_policy_only_adds_to_an_isolated_side(u: Universe, data: st.DataObject
                                                         ) -> None:
    """For a pod already isolated in a direction, a new policy can only add allowed
    connections in that direction (Side.allowed of that pod's side), and a flow
    whose two sides were both already isolated (or are bare IPs) can only go from
    denied to allowed."""
    sc = data.draw(scenarios(u), label="scenario")
    extra = data.draw(network_policies(u, name="extra", namespace_names=namespaces_of(sc)),
                      label="extra")
    before = Evaluator(sc.cluster)
    after = Evaluator(sc.cluster.with_policies((*sc.cluster.policies, extra)))
    for flow in sc.flows():
        v0, v1 = before.verdict(flow), after.verdict(flow)
        for d in DIRECTIONS:
            s0, s1 = side_of(v0, d), side_of(v1, d)
            assert set(s0.isolating) <= set(s1.isolating), describe(flow)
            assert set(s0.allowed_by) <= set(s1.allowed_by), describe(flow)
            if s0.isolated:
                assert s1.allowed or not s0.allowed, (
                    f"{describe(flow)}: {d} of an isolated pod went from allowed to denied")
                if s1.allowed and not s0.allowed:
                    event(f"{d} side of an isolated pod newly allowed")
        fixed = all(s.isolated or s.endpoint is None for s in (v0.egress, v0.ingress))
        if fixed:
            assert v1.allowed or not v0.allowed, describe(flow)


@st.composite
def deny_policies(draw: st.DrawFn, u: Universe, sc: Scenario) -> tuple[NetworkPolicy, str]:
    """A policy with no rules for one direction, selecting some pod (or anything)."""
    direction = draw(st.sampled_from(DIRECTIONS), label="direction")
    target = draw(st.sampled_from(sc.cluster.endpoints))
    how = draw(st.sampled_from(("all", "exact", "random")))
    if how == "all":
        sel = ALL
    elif how == "exact":
        sel = Selector(target.labels)
    else:
        sel = draw(selectors(pod_vocab(u)))
    other = EGRESS if direction == INGRESS else INGRESS
    types = (direction, other) if draw(st.booleans()) else (direction,)
    other_rules = tuple(draw(st.lists(rules(u), max_size=2)))
    policy = NetworkPolicy(
        namespace=target.namespace, name="deny", pod_selector=sel,
        ingress=other_rules if other == INGRESS else (),
        egress=other_rules if other == EGRESS else (),
        policy_types=types)
    return policy, direction


@UNIVERSES
@given(data=st.data())
def test_policy_without_rules_isolates_and_allows_nothing_new(u: Universe,
                                                              data: st.DataObject) -> None:
    """A pod selected by a policy with no rules for a direction is isolated in it
    and allows exactly what the other policies allow (nothing if there are none);
    pods it does not select see no change."""
    sc = data.draw(scenarios(u, min_policies=0), label="scenario")
    deny, d = data.draw(deny_policies(u, sc), label="deny policy")
    before = Evaluator(sc.cluster)
    after = Evaluator(sc.cluster.with_policies((*sc.cluster.policies, deny)))
    for flow in sc.flows():
        s0, s1 = side_of(before.verdict(flow), d), side_of(after.verdict(flow), d)
        subject, _, _ = o_subject(flow, d)
        if subject is not None and o_selects(deny, subject, d):
            assert s1.isolated and deny.key in s1.isolating, describe(flow)
            assert set(s1.allowed_by) == set(s0.allowed_by), describe(flow)
            assert s1.allowed == (s0.isolated and s0.allowed), describe(flow)
        else:
            assert side_facts(s1) == side_facts(s0), describe(flow)


@UNIVERSES
@given(data=st.data())
def test_pod_selected_by_no_policy_is_unrestricted(u: Universe, data: st.DataObject) -> None:
    sc = data.draw(scenarios(u), label="scenario")
    ev = Evaluator(sc.cluster)
    for flow in sc.flows():
        v = ev.verdict(flow)
        unisolated = 0
        for d in DIRECTIONS:
            if not o_isolating(sc.cluster, flow, d):
                unisolated += 1
                s = side_of(v, d)
                assert not s.isolating and not s.allowed_by and s.allowed, (
                    f"{describe(flow)}: {d}")
        if unisolated == 2:
            assert v.allowed, describe(flow)


@UNIVERSES
@given(data=st.data())
def test_trace_names_rules_that_really_match(u: Universe, data: st.DataObject) -> None:
    """Every RuleRef's policy selects the pod for that direction, and its rule, peer
    and port entry match the flow; `isolating` is exactly the selecting policies;
    every allowing rule is listed, once."""
    sc = data.draw(scenarios(u), label="scenario")
    ev = Evaluator(sc.cluster)
    by_key = {p.key: p for p in sc.cluster.policies}
    for flow in sc.flows():
        v = ev.verdict(flow)
        for d in DIRECTIONS:
            s = side_of(v, d)
            subject, other, other_ip = o_subject(flow, d)
            assert s.direction == d
            assert s.endpoint == (subject.key if subject is not None else None)
            assert set(s.isolating) == o_isolating(sc.cluster, flow, d), describe(flow)
            assert len(set(s.isolating)) == len(s.isolating)
            for key in s.isolating:
                assert subject is not None and o_selects(by_key[key], subject, d)
            for ref in s.allowed_by:
                where = f"{describe(flow)}: {ref.render()}"
                assert ref.direction == d, where
                assert ref.policy in s.isolating, where
                policy = by_key[ref.policy]
                rule_list = policy.ingress if d == INGRESS else policy.egress
                assert 0 <= ref.rule < len(rule_list), where
                rule = rule_list[ref.rule]
                if ref.port == -1:
                    assert not rule.ports, where
                else:
                    assert 0 <= ref.port < len(rule.ports), where
                    assert o_port(rule.ports[ref.port], flow), where
                if ref.peer == -1:
                    assert not rule.peers, where
                else:
                    assert 0 <= ref.peer < len(rule.peers), where
                    assert o_peer(sc.cluster, policy, rule.peers[ref.peer], other, other_ip), \
                        where
            listed = [(r.policy, r.rule) for r in s.allowed_by]
            assert len(listed) == len(set(listed)), describe(flow)
            assert set(listed) == o_allowing_rules(sc.cluster, flow, d), describe(flow)
            if len(listed) > 1:
                event("a side allowed by several rules")


@UNIVERSES
@given(data=st.data())
def test_denied_verdict_has_an_isolated_side_that_allows_nothing(u: Universe,
                                                                 data: st.DataObject) -> None:
    sc = data.draw(scenarios(u), label="scenario")
    ev = Evaluator(sc.cluster)
    for flow in sc.flows():
        v = ev.verdict(flow)
        if not v.allowed:
            assert any(s.isolated and not s.allowed_by for s in (v.egress, v.ingress)), \
                describe(flow)
        else:
            assert all(s.allowed for s in (v.egress, v.ingress)), describe(flow)


@UNIVERSES
@given(data=st.data())
def test_self_traffic_is_always_allowed(u: Universe, data: st.DataObject) -> None:
    sc = data.draw(scenarios(u), label="scenario")
    policies = list(sc.cluster.policies)
    if data.draw(st.booleans(), label="deny all"):
        policies += [NetworkPolicy(ns.name, "deny-all", ALL, (), (), (INGRESS, EGRESS))
                     for ns in sc.cluster.namespaces]
    ev = Evaluator(sc.cluster.with_policies(policies))
    for port, proto in sc.probes:
        for ep in sc.cluster.endpoints:
            for ip in ep.ips:
                flow = Flow(ep, ip, ep, ip, port, proto)
                v = ev.verdict(flow)
                assert v.allowed and v.self_traffic, describe(flow)
                assert ev.allowed(flow), describe(flow)
            built = ev.flow(ep, ep, port, proto)
            assert ev.allowed(built) and ev.verdict(built).allowed, describe(built)


@UNIVERSES
@given(data=st.data())
def test_allowed_equals_verdict_allowed(u: Universe, data: st.DataObject) -> None:
    sc = data.draw(scenarios(u), label="scenario")
    ev = Evaluator(sc.cluster)
    for flow in sc.flows(self_traffic=True):
        assert ev.allowed(flow) == ev.verdict(flow).allowed, describe(flow)


@UNIVERSES
@given(data=st.data())
def test_flow_resolves_ips_and_named_ports(u: Universe, data: st.DataObject) -> None:
    """`Evaluator.flow` finds the endpoint behind a pod IP and resolves a named port
    on the destination (same name and protocol); the verdict on the flow it builds
    still agrees with the oracle."""
    sc = data.draw(scenarios(u), label="scenario")
    ev = Evaluator(sc.cluster)
    eps = sc.cluster.endpoints
    names = sorted({cp.name for ep in eps for cp in ep.ports if cp.name} | {"nope"})
    for _ in range(4):
        src = data.draw(st.sampled_from(eps))
        dst = data.draw(st.sampled_from(eps))
        proto = data.draw(st.sampled_from(u.protocols))
        by_ip = data.draw(st.booleans())
        dst_arg: Endpoint | str = data.draw(st.sampled_from(dst.ips)) if by_ip else dst
        port: int | str = data.draw(st.sampled_from(names) | st.sampled_from(u.ports))
        if isinstance(port, str):
            served = [cp.port for cp in dst.ports if cp.name == port and cp.protocol == proto]
            if not served:
                try:
                    ev.flow(src, dst_arg, port, proto)
                except ValueError:
                    continue
                raise AssertionError(f"{dst.key} serves no {proto} port {port!r}")
            number = served[0]
        else:
            number = port
        flow = ev.flow(src, dst_arg, port, proto)
        assert flow.dst == dst and flow.src == src
        assert flow.port == number and flow.protocol == proto
        assert flow.dst_ip in dst.ips and flow.src_ip in src.ips
        assert ev.verdict(flow).allowed == oracle(sc.cluster, flow), describe(flow)
