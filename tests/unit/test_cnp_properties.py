"""Issue #14's properties of the reference evaluator with ClusterNetworkPolicy tiers, on
random small clusters with random NetworkPolicies and ClusterNetworkPolicies
(`tests.property.tier_strategies`), over every pod pair and pod/external pair of
sampled ports and protocols:

(a) with no ClusterNetworkPolicy, every verdict is NetworkPolicy's alone (restated
    here from the spec fields, independently of the tiers), and policies that select
    no pod change nothing;
(b) an Admin Deny of everything at priority 0, first by name, selecting every
    namespace, denies every pod pair and every pod's connections to any address;
(c) an Admin Pass of everything at priority 0, first by name, is no Admin tier (for
    connections from pods: no ingress peer the CRD allows matches an address);
(d) Baseline policies never change the verdict of a side whose pod a NetworkPolicy
    isolates in that direction;
(e) the evaluator agrees with the compiled ruleset interpreted in Python.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.property.strategies import DEFAULT, DENSE, Scenario, Universe
from tests.property.tier_strategies import cnp_scenarios, cnp_sets

from stockade.compile.interpret import allows
from stockade.compile.lower import compile_cluster
from stockade.engine.evaluate import Evaluator, Flow
from stockade.engine.match import matching_port, peer_matches
from stockade.model.cluster import Cluster
from stockade.model.cnp import (
    ADMIN,
    BASELINE,
    DENY,
    NAMESPACES,
    NETWORKS,
    PASS,
    ClusterNetworkPolicy,
    CnpPeer,
    CnpRule,
)
from stockade.model.labels import Labels
from stockade.model.policy import EGRESS, INGRESS
from stockade.model.selector import Selector

UNIVERSES = {"default": DEFAULT, "dense": DENSE}
EVERY_NAMESPACE = CnpPeer(NAMESPACES)
EVERY_ADDRESS = CnpPeer(NETWORKS, networks=("0.0.0.0/0", "::/0"))


def everything(action: str) -> ClusterNetworkPolicy:
    """An Admin policy at priority 0, named to come first, with one rule of `action`
    for every peer in each direction."""
    return ClusterNetworkPolicy(
        "0-everything", ADMIN, 0, EVERY_NAMESPACE,
        ingress=(CnpRule(action, (EVERY_NAMESPACE,)),),
        egress=(CnpRule(action, (EVERY_ADDRESS, EVERY_NAMESPACE)),))


def with_tiers(cluster: Cluster, tiers: tuple[ClusterNetworkPolicy, ...]) -> Cluster:
    return Cluster(cluster.namespaces, cluster.endpoints, cluster.policies, tiers)


def scenario(data: st.DataObject, name: str, **kw: int) -> Scenario:
    u: Universe = UNIVERSES[name]
    return data.draw(cnp_scenarios(u, **kw), label="scenario")


def flows(sc: Scenario) -> list[Flow]:
    return list(sc.flows())


def network_policy_only(ev: Evaluator, flow: Flow) -> bool:
    """NetworkPolicy's verdict restated from the spec: each side is unrestricted until a
    policy selects its pod for the direction, then some rule of one must admit."""
    def side(direction: str) -> bool:
        subject, other, ip = ((flow.src, flow.dst, flow.dst_ip) if direction == EGRESS
                              else (flow.dst, flow.src, flow.src_ip))
        if subject is None:
            return True
        policies = [p for p in ev.cluster.policies if p.namespace == subject.namespace
                    and p.affects(direction) and p.pod_selector.matches(subject.labels)]
        return not policies or any(
            matching_port(rule, flow.port, flow.protocol, flow.dst) is not None
            and (not rule.peers or any(peer_matches(peer, p.namespace, other, ip,
                                                    ev.namespace_labels)
                                       for peer in rule.peers))
            for p in policies for rule in p.rules(direction))
    return side(EGRESS) and side(INGRESS)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(UNIVERSES)))
def test_a_without_tiers_every_verdict_is_networkpolicys(data: st.DataObject,
                                                         name: str) -> None:
    sc = scenario(data, name)
    plain = with_tiers(sc.cluster, ())
    ev = Evaluator(plain)
    # Tiers whose subjects select no pod (a namespace label no namespace has).
    nobody = tuple(ClusterNetworkPolicy(p.name, p.tier, p.priority, CnpPeer(
        NAMESPACES, Selector(Labels({"no-such-label": "x"}))), p.ingress, p.egress)
        for p in sc.cluster.cluster_policies)
    idle = Evaluator(with_tiers(sc.cluster, nobody))
    for flow in flows(sc):
        verdict = ev.verdict(flow)
        assert verdict.allowed == network_policy_only(ev, flow), flow
        assert verdict.egress.decided_by in ("NetworkPolicy", "default")
        assert verdict.ingress.decided_by in ("NetworkPolicy", "default")
        assert idle.allowed(flow) == verdict.allowed, flow


@settings(max_examples=60, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(UNIVERSES)))
def test_b_an_admin_deny_of_everything_first_denies_every_pair(data: st.DataObject,
                                                               name: str) -> None:
    sc = scenario(data, name, min_cnps=0)
    ev = Evaluator(with_tiers(sc.cluster, (everything(DENY), *sc.cluster.cluster_policies)))
    for flow in flows(sc):
        if flow.src is not None:
            # Every pod pair, and every pod's connections to any address.
            assert not ev.allowed(flow), flow
            assert ev.verdict(flow).egress.decided_by == ADMIN
        else:
            # From an address: namespaces match pods only, so the ingress Deny has no peer
            # for it (the CRD allows no networks peer in ingress rules).
            decision = ev.verdict(flow).ingress.admin
            assert decision is None or decision.policy != "0-everything"


@settings(max_examples=60, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(UNIVERSES)))
def test_c_an_admin_pass_of_everything_first_is_no_admin_tier(data: st.DataObject,
                                                              name: str) -> None:
    sc = scenario(data, name, min_cnps=0)
    baseline = tuple(p for p in sc.cluster.cluster_policies if p.tier == BASELINE)
    passing = Evaluator(with_tiers(sc.cluster,
                                   (everything(PASS), *sc.cluster.cluster_policies)))
    no_admin = Evaluator(with_tiers(sc.cluster, baseline))
    for flow in flows(sc):
        if flow.src is None:
            # From an address: no ingress peer of the CRD matches one (namespaces and pods
            # match pods only), so the Pass does not pass it and later Admin rules decide.
            continue
        assert passing.allowed(flow) == no_admin.allowed(flow), flow
        assert passing.verdict(flow).allowed == no_admin.verdict(flow).allowed, flow


@settings(max_examples=60, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(UNIVERSES)))
def test_d_baseline_never_changes_a_side_a_networkpolicy_isolates(data: st.DataObject,
                                                                  name: str) -> None:
    sc = scenario(data, name, min_cnps=0)
    u: Universe = UNIVERSES[name]
    extra = data.draw(cnp_sets(u, min_size=1, prefix="base"), label="baseline")
    extra = tuple(ClusterNetworkPolicy(p.name, BASELINE, p.priority, p.subject,
                                       p.ingress, p.egress) for p in extra)
    before = Evaluator(sc.cluster)
    after = Evaluator(with_tiers(sc.cluster, sc.cluster.cluster_policies + extra))
    for flow in flows(sc):
        for direction in (EGRESS, INGRESS):
            was, now = before.side(flow, direction), after.side(flow, direction)
            if was.isolated:
                assert was.allowed == now.allowed, (flow, direction)
                assert now.baseline is None


@settings(max_examples=80, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(UNIVERSES)))
def test_e_the_compiled_ruleset_agrees_with_the_evaluator(data: st.DataObject,
                                                          name: str) -> None:
    sc = scenario(data, name)
    ev = Evaluator(sc.cluster)
    rs = compile_cluster(sc.cluster)
    wrong = [f"{flow.render_side('src')} {flow.src_ip} -> {flow.render_side('dst')} "
             f"{flow.dst_ip} {flow.protocol}/{flow.port}: evaluator {want}"
             for flow in flows(sc)
             if (want := ev.allowed(flow)) != allows(rs, flow.src_ip, flow.dst_ip,
                                                     flow.protocol, flow.port)]
    assert not wrong, "\n".join(wrong)
