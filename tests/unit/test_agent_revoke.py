"""Which tracked connections a new cluster state revokes, on a small cluster."""

from __future__ import annotations

import random
import sys
from dataclasses import replace
from pathlib import Path

from stockade.agent.admission import cluster_near, enforceable
from stockade.agent.records import (
    AgentState,
    ClusterPolicyRecord,
    EndpointRecord,
    PolicyRecord,
    PutEndpoint,
    PutNamespace,
    PutPolicy,
)
from stockade.agent.revoke import connections_to_cut, flow_of
from stockade.engine.evaluate import Evaluator, Flow, Verdict
from stockade.model.cluster import Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.cnp import NAMESPACES, ClusterNetworkPolicy, CnpPeer, CnpRule
from stockade.model.connection import ConnEntry
from stockade.model.labels import Labels
from stockade.model.policy import (
    EGRESS,
    INGRESS,
    KEEP_ANNOTATION,
    NetworkPolicy,
    Peer,
    PolicyPort,
    Rule,
)
from stockade.model.selector import Selector

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from synthetic import make_cluster

A, B, C = "10.244.0.10", "10.244.0.11", "10.244.0.12"
A6 = "fd00:244::a"
OUTSIDE = "192.0.2.7"
KEEP = Labels({KEEP_ANNOTATION: "keep"})
NONE = Labels()


def _pod(name: str) -> Selector:
    return Selector(Labels({"pod": name}))


def _cluster(*policies: NetworkPolicy) -> Cluster:
    ns = Namespace("x", Labels({"kubernetes.io/metadata.name": "x"}))
    eps = (Endpoint("x", "a", Labels({"pod": "a"}), (A, A6), (ContainerPort(8080, "TCP", "web"),)),
           Endpoint("x", "b", Labels({"pod": "b"}), (B,)),
           Endpoint("x", "c", Labels({"pod": "c"}), (C,)))
    return Cluster((ns,), eps, policies)


def _a_ingress_from(peer: str, port: int = 80, protocol: str = "TCP", name: str = "a-in",
                    annotations: Labels = NONE) -> NetworkPolicy:
    return NetworkPolicy("x", name, _pod("a"),
                         ingress=(Rule((PolicyPort(protocol, port),),
                                       (Peer(pod_selector=_pod(peer)),)),),
                         policy_types=(INGRESS,), annotations=annotations)


def _tcp(src: str, dst: str, dport: int = 80, sport: int = 40000, **kw: object) -> ConnEntry:
    return ConnEntry("TCP", src, dst, sport, dport, **{"state": "ESTABLISHED", **kw})  # type: ignore[arg-type]


def test_denied_flows_are_cut_allowed_ones_kept() -> None:
    ev = Evaluator(_cluster(_a_ingress_from("b")))
    b_to_a, c_to_a = _tcp(B, A), _tcp(C, A)
    b_to_a_81 = _tcp(B, A, 81)
    a_to_c = _tcp(A, C)  # a is isolated for ingress only: its own connections are fine
    assert connections_to_cut([b_to_a, c_to_a, b_to_a_81, a_to_c], ev) == [c_to_a, b_to_a_81]


def test_one_known_side_is_enough_and_none_is_not_a_candidate() -> None:
    ev = Evaluator(_cluster(_a_ingress_from("b")))
    from_outside = _tcp(OUTSIDE, A)
    host_traffic = _tcp(OUTSIDE, "198.51.100.1")
    to_outside = _tcp(B, OUTSIDE, 443)
    assert connections_to_cut([from_outside, host_traffic, to_outside], ev) == [from_outside]


def test_only_tcp_udp_sctp_and_not_finished_ones() -> None:
    ev = Evaluator(_cluster(NetworkPolicy("x", "deny-a", _pod("a"))))  # nothing gets into a
    udp = ConnEntry("UDP", C, A, 5353, 53)
    sctp = ConnEntry("SCTP", C, A, 5000, 80, "ESTABLISHED")
    icmp = ConnEntry("ICMP", C, A)
    dccp = ConnEntry("DCCP", C, A, 1, 2)
    time_wait = _tcp(C, A, state="TIME_WAIT")
    syn_sent = _tcp(C, A, state="SYN_SENT")
    v6 = ConnEntry("TCP", "fd00:244::c", A6, 1, 80, "ESTABLISHED")
    assert connections_to_cut([udp, sctp, icmp, dccp, time_wait, syn_sent, v6], ev) == [
        udp, sctp, syn_sent, v6]


def test_egress_isolation_cuts_the_sources_connections() -> None:
    pol = NetworkPolicy("x", "a-out", _pod("a"),
                        egress=(Rule((PolicyPort("UDP", 53),), ()),), policy_types=(EGRESS,))
    ev = Evaluator(_cluster(pol))
    dns = ConnEntry("UDP", A, OUTSIDE, 4000, 53)
    web = _tcp(A, OUTSIDE, 443)
    reply_side = _tcp(B, A)  # into a: egress of a does not apply to its replies
    assert connections_to_cut([dns, web, reply_side], ev) == [web]


def test_keep_annotation_on_the_isolating_policy() -> None:
    kept = Evaluator(_cluster(_a_ingress_from("b", annotations=KEEP)))
    assert connections_to_cut([_tcp(C, A)], kept) == []
    # any isolating policy of the denying side may ask for it ...
    two = Evaluator(_cluster(_a_ingress_from("b"),
                             _a_ingress_from("b", port=81, name="a-in-2", annotations=KEEP)))
    assert connections_to_cut([_tcp(C, A)], two) == []
    # ... but a policy that does not isolate that side may not
    other = NetworkPolicy("x", "b-in", _pod("b"), annotations=KEEP)
    assert connections_to_cut([_tcp(C, A)],
                              Evaluator(_cluster(_a_ingress_from("b"), other))) == [_tcp(C, A)]
    # and the value must be "keep"
    drain = Labels({KEEP_ANNOTATION: "cut"})
    assert connections_to_cut([_tcp(C, A)],
                              Evaluator(_cluster(_a_ingress_from("b", annotations=drain)))) == [
        _tcp(C, A)]
    assert connections_to_cut([_tcp(C, A)], kept, keep_key="example.com/other") == [_tcp(C, A)]


def test_both_sides_denying_need_both_to_keep() -> None:
    c_out = NetworkPolicy("x", "c-out", _pod("c"), policy_types=(EGRESS,))
    c_out_kept = NetworkPolicy("x", "c-out", _pod("c"), policy_types=(EGRESS,),
                               annotations=KEEP)
    entry = _tcp(C, A)
    one = Evaluator(_cluster(_a_ingress_from("b", annotations=KEEP), c_out))
    assert connections_to_cut([entry], one) == [entry]
    both = Evaluator(_cluster(_a_ingress_from("b", annotations=KEEP), c_out_kept))
    assert connections_to_cut([entry], both) == []
    # only the egress side denies (a lets c in): the egress policy's annotation decides
    egress_only = Evaluator(_cluster(_a_ingress_from("c"), c_out_kept))
    assert connections_to_cut([entry], egress_only) == []


def test_dnat_is_judged_by_the_endpoint_that_answers() -> None:
    ev = Evaluator(_cluster(_a_ingress_from("b", port=8080)))
    # b -> service 10.96.0.1:80, DNATed to a:8080
    via_service = ConnEntry("TCP", B, "10.96.0.1", 40000, 80, "ESTABLISHED",
                            reply_src=A, reply_sport=8080)
    c_via_service = ConnEntry("TCP", C, "10.96.0.1", 40000, 80, "ESTABLISHED",
                              reply_src=A, reply_sport=8080)
    assert connections_to_cut([via_service, c_via_service], ev) == [c_via_service]
    flow = flow_of(c_via_service, ev)
    assert flow is not None and (flow.dst_ip, flow.port) == (A, 8080)
    assert flow.dst is not None and flow.dst.key == "x/a"


def test_self_traffic_is_never_cut() -> None:
    ev = Evaluator(_cluster(NetworkPolicy("x", "deny-a", _pod("a"))))
    assert connections_to_cut([_tcp(A, A), ConnEntry("TCP", A6, A6, 1, 80)], ev) == []


class _Counting(Evaluator):
    calls = 0

    def verdict(self, flow: Flow) -> Verdict:
        self.calls += 1
        return super().verdict(flow)


def test_verdicts_are_computed_once_per_flow() -> None:
    ev = _Counting(_cluster(_a_ingress_from("b")))
    entries = [_tcp(C, A, sport=p) for p in range(1000, 1500)] + [_tcp(B, A, sport=1)]
    cut = connections_to_cut(entries, ev)
    assert len(cut) == 500 and ev.calls == 2


def _state(cluster: Cluster) -> AgentState:
    state = AgentState()
    state.apply([PutNamespace(ns) for ns in cluster.namespaces]
                + [PutEndpoint(EndpointRecord(ep)) for ep in cluster.endpoints]
                + [PutPolicy(PolicyRecord(p)) for p in cluster.policies])
    return state


def test_the_revokers_cluster_judges_as_the_whole_one() -> None:
    """Only the endpoints at the connections' addresses: the same cuts, on a synthetic
    cluster with every kind of peer, for connections among its pods and beyond it."""
    rnd = random.Random(7)
    whole = make_cluster(400, 60)
    state = _state(whole)
    ips = [ep.ips[0] for ep in whole.endpoints] + [OUTSIDE, "10.0.0.1"]
    for _ in range(20):
        entries = [ConnEntry(rnd.choice(("TCP", "UDP")), rnd.choice(ips), rnd.choice(ips),
                             rnd.randrange(1024, 65535), rnd.choice((53, 80, 8080, 9090)),
                             state="ESTABLISHED")
                   for _ in range(rnd.randrange(1, 30))]
        addresses = {a for e in entries for a in (e.src, e.dst, e.reply_src) if a}
        near = cluster_near(state, addresses)
        expected = connections_to_cut(entries, Evaluator(enforceable(state, {})))
        if near is None:
            assert expected == []
            continue
        assert len(near.endpoints) <= len(addresses)
        assert connections_to_cut(entries, Evaluator(near)) == expected


def test_no_endpoint_at_either_end_needs_no_cluster() -> None:
    state = _state(_cluster(_a_ingress_from("b")))
    assert cluster_near(state, {OUTSIDE, "198.51.100.1"}) is None
    near = cluster_near(state, {A, OUTSIDE})
    assert near is not None and [ep.key for ep in near.endpoints] == ["x/a"]


def test_held_endpoints_take_the_whole_cluster() -> None:
    state = _state(_cluster(_a_ingress_from("b")))
    state.quarantined = {"x/c": ["held"]}
    near = cluster_near(state, {A})
    assert near is not None and len(near.endpoints) == 3


def _admin(action: str, annotations: Labels = NONE, tier: str = "Admin") -> ClusterNetworkPolicy:
    """Every pod's ingress from every pod: `action`."""
    return ClusterNetworkPolicy(f"{tier.lower()}-{action.lower()}", tier, 1,
                                CnpPeer(NAMESPACES), ingress=(
                                    CnpRule(action, (CnpPeer(NAMESPACES),)),),
                                annotations=annotations)


def _tiered(*policies: NetworkPolicy | ClusterNetworkPolicy) -> Cluster:
    base = _cluster(*(p for p in policies if isinstance(p, NetworkPolicy)))
    return replace(base, cluster_policies=tuple(
        p for p in policies if isinstance(p, ClusterNetworkPolicy)))


def test_tiers_decide_what_is_cut_and_their_own_annotation_what_is_kept() -> None:
    entry = _tcp(B, A)  # the NetworkPolicy lets b into a
    assert connections_to_cut([entry], Evaluator(_tiered(_a_ingress_from("b")))) == []
    assert connections_to_cut([entry], Evaluator(_tiered(
        _a_ingress_from("b"), _admin("Deny")))) == [entry]
    # The NetworkPolicy's keep does not keep what an Admin Deny decided ...
    assert connections_to_cut([entry], Evaluator(_tiered(
        _a_ingress_from("c", annotations=KEEP), _admin("Deny")))) == [entry]
    # ... the deciding ClusterNetworkPolicy's does.
    assert connections_to_cut([entry], Evaluator(_tiered(
        _a_ingress_from("b"), _admin("Deny", annotations=KEEP)))) == []
    # A Pass hands the side to the NetworkPolicy, whose keep then counts.
    assert connections_to_cut([_tcp(C, A)], Evaluator(_tiered(
        _a_ingress_from("b", annotations=KEEP), _admin("Pass")))) == []
    # A Baseline Deny for pods no NetworkPolicy selects (b and c here, not a).
    assert connections_to_cut([_tcp(A, C), entry], Evaluator(_tiered(
        _a_ingress_from("b"), _admin("Deny", tier="Baseline")))) == [_tcp(A, C)]


def test_the_revokers_cluster_carries_the_tiers() -> None:
    state = _state(_tiered(_a_ingress_from("b")))
    state.cluster_policies["admin-deny"] = ClusterPolicyRecord(_admin("Deny"))
    near = cluster_near(state, {A, B})
    assert near is not None and [p.name for p in near.cluster_policies] == ["admin-deny"]
    assert connections_to_cut([_tcp(B, A)], Evaluator(near)) == [_tcp(B, A)]
