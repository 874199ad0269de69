"""The backend-neutral ruleset: lowering, its interpreter, plans and nft rendering."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
from tests.support import shared

from stockade.cli.conformance import load_cases
from stockade.compile import interpret
from stockade.compile.ir import ADDR, EGRESS, INGRESS, NET, Ruleset
from stockade.compile.lower import block_networks, compile_cluster
from stockade.compile.nft import Table, render_plan, render_rule_expr, render_skeleton
from stockade.compile.plan import plan
from stockade.conformance.case import Case
from stockade.engine.evaluate import Evaluator
from stockade.model.cluster import Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.labels import Labels
from stockade.model.policy import IPBlock, NetworkPolicy, Peer, PolicyPort, Rule
from stockade.model.selector import Selector

CORPUS = shared("conformance")


def _cases(corpus: Path = CORPUS) -> list[Case]:
    if not corpus.is_dir():
        pytest.fail(f"no conformance corpus at {corpus}")
    return load_cases([str(corpus)])


def test_interpreted_ruleset_matches_every_expected_verdict_of_the_corpus() -> None:
    checked = 0
    for case in _cases():
        rs = compile_cluster(case.cluster)
        ev = Evaluator(case.cluster)
        for group in case.probes:
            for src, dst in case.pairs():
                flow = ev.flow(src, dst, group.port, group.protocol)
                got = interpret.allows(rs, flow.src_ip, flow.dst_ip, flow.protocol, flow.port)
                assert got == group.expected(src.key, dst.key), (case.id, group.render(),
                                                                  src.key, dst.key)
                checked += 1
    assert checked > 15_000


def test_policy_order_does_not_change_the_ruleset() -> None:
    for case in _cases()[:20]:
        policies = list(case.cluster.policies)
        random.Random(7).shuffle(policies)
        assert compile_cluster(case.cluster) == compile_cluster(
            case.cluster.with_policies(policies)), case.id


def _ns(name: str) -> Namespace:
    return Namespace(name, Labels({"kubernetes.io/metadata.name": name}))


def _ep(name: str, ip: str, **labels: str) -> Endpoint:
    return Endpoint("x", name, Labels({"app": name, **labels}), (ip,),
                    (ContainerPort(8080, "TCP", "http"),))


POLICY = NetworkPolicy(
    "x", "db", Selector(Labels({"app": "db"})),
    ingress=(Rule((PolicyPort("TCP", 5432), PolicyPort("TCP", 6000, 6010),
                   PolicyPort("TCP", 6005, 6020)),
                  (Peer(pod_selector=Selector(Labels({"role": "api"}))),)),),
)


def _cluster(*eps: Endpoint) -> Cluster:
    return Cluster((_ns("x"),), eps, (POLICY,))


def test_lowering_shares_sets_and_merges_port_ranges() -> None:
    rs = compile_cluster(_cluster(_ep("db", "10.0.0.1"), _ep("api", "10.0.0.2", role="api")))
    assert rs.ingress == {"10.0.0.1": next(iter(rs.chains))}
    assert rs.egress == {}
    (chain,) = rs.chains.values()
    v4 = [r for r in chain.rules if r.family == 4]
    assert len(v4) == 1 and v4[0].ports == ((5432, 5432), (6000, 6020))
    assert rs.sets[v4[0].peer_set].elements == frozenset({"10.0.0.2"})


def test_a_peer_shared_by_policies_of_two_namespaces_is_each_ones_own_set() -> None:
    """Decoding gives equal specs one object (their peers too), and lowering keeps each
    peer's sets by that object: a podSelector peer still stands for its own namespace's
    pods, a namespaceSelector or ipBlock peer for the same ones from either."""
    from stockade.load import validate_objects
    from stockade.model.parse import decode_objects

    docs = []
    for ns, net in (("a", "10.0.0"), ("b", "10.0.1")):
        docs.append({"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": ns, "labels": {"team": "t"}}})
        for name, app, host in (("x", "web", 1), ("y", "api", 2)):
            docs.append({"apiVersion": "v1", "kind": "Pod", "metadata": {
                "name": name, "namespace": ns, "labels": {"app": app}},
                "status": {"podIP": f"{net}.{host}"}})
        docs.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                     "metadata": {"name": "p", "namespace": ns},
                     "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [
                         {"from": [{"podSelector": {"matchLabels": {"app": "api"}}},
                                   {"namespaceSelector": {"matchLabels": {"team": "t"}},
                                    "podSelector": {"matchLabels": {"app": "api"}}},
                                   {"ipBlock": {"cidr": "192.0.2.0/24"}}]}]}})
    objects, errors = decode_objects(docs, "test")
    assert not errors
    validate_objects(objects)
    cluster = objects.cluster()
    pa, pb = sorted(cluster.policies, key=lambda p: p.namespace)
    assert pa.ingress[0].peers[0] is pb.ingress[0].peers[0]  # one object: the memo's case
    rs = compile_cluster(cluster)
    own = {}
    for addr, ns in (("10.0.0.1", "a"), ("10.0.1.1", "b")):
        rules = [r for r in rs.chains[rs.ingress[addr]].rules if r.family == 4]
        own[ns] = [rs.sets[r.peer_set].elements for r in rules]
    assert own["a"] == [frozenset({"10.0.0.2"}), frozenset({"10.0.0.2", "10.0.1.2"}),
                        frozenset({"192.0.2.0/24"})]
    assert own["b"] == [frozenset({"10.0.1.2"}), frozenset({"10.0.0.2", "10.0.1.2"}),
                        frozenset({"192.0.2.0/24"})]


def test_adding_an_endpoint_is_a_small_delta() -> None:
    old = compile_cluster(_cluster(_ep("db", "10.0.0.1"), _ep("api", "10.0.0.2", role="api")))
    new = compile_cluster(_cluster(_ep("db", "10.0.0.1"), _ep("api", "10.0.0.2", role="api"),
                                   _ep("api2", "10.0.0.3", role="api"),
                                   replace(_ep("db2", "10.0.0.4"), labels=Labels({"app": "db"}))))
    delta = plan(old, new)
    assert not delta.add_chains and not delta.del_chains and not delta.add_sets
    assert [(s.kind, sorted(e)) for s, e in delta.add_elements] == [(ADDR, ["10.0.0.3"])]
    assert delta.set_map == ((("ingress", 4, "10.0.0.4"), next(iter(new.chains))),)
    assert plan(new, new).empty
    back = plan(new, old)
    assert back.del_map == (("ingress", 4, "10.0.0.4"),) and not back.set_map


def test_ipblock_with_except_becomes_disjoint_networks() -> None:
    nets = block_networks(IPBlock("10.0.0.0/24", ("10.0.0.0/26", "10.0.0.128/25")))
    assert [str(n) for n in nets] == ["10.0.0.64/26"]
    nets6 = block_networks(IPBlock("fd00::/64", ("fd00::/65",)))
    assert [str(n) for n in nets6] == ["fd00::8000:0:0:0/65"]
    # host bits are masked off as the API server's legacy parser does
    assert [str(n) for n in block_networks(IPBlock("10.1.2.3/16"))] == ["10.1.0.0/16"]


def test_named_port_egress_is_a_set_of_destination_triples() -> None:
    pol = NetworkPolicy("x", "out", Selector(Labels({"app": "a"})), egress=(
        Rule((PolicyPort("TCP", "http"),)),), policy_types=("Egress",))
    eps = (_ep("a", "10.0.0.1"), _ep("b", "10.0.0.2"),
           Endpoint("x", "c", Labels({"app": "c"}), ("10.0.0.3",),
                    (ContainerPort(9090, "TCP", "http"),)))
    rs = compile_cluster(Cluster((_ns("x"),), eps, (pol,)))
    named = [s for s in rs.sets.values() if s.kind == "addr_port" and s.family == 4]
    assert [sorted(s.elements) for s in named] == [[("10.0.0.1", "tcp", 8080),
                                                    ("10.0.0.2", "tcp", 8080),
                                                    ("10.0.0.3", "tcp", 9090)]]
    assert interpret.allows(rs, "10.0.0.1", "10.0.0.3", "TCP", 9090)
    assert not interpret.allows(rs, "10.0.0.1", "10.0.0.3", "TCP", 8080)


def test_interval_sets_are_rewritten_whole() -> None:
    block = NetworkPolicy("x", "b", Selector(), ingress=(Rule(peers=(
        Peer(ip_block=IPBlock("10.0.0.0/8")),)),))
    rs = compile_cluster(Cluster((_ns("x"),), (_ep("a", "10.0.0.1"),), (block,)))
    (net,) = [s for s in rs.sets.values() if s.kind == NET]
    tampered = Ruleset({**rs.sets, net.name: replace(net, elements=frozenset())}, rs.chains,
                       rs.ingress, rs.egress)
    delta = plan(tampered, rs)
    assert [(s.name, e) for s, e in delta.add_elements] == [(net.name, net.elements)]
    cmds = render_plan(Table(), delta)
    assert [next(iter(c)) for c in cmds] == ["flush", "add"]


def test_render_rule_shapes() -> None:
    from stockade.compile.ir import ChainRule

    expr = render_rule_expr(ChainRule(4, "s4-x", None, "TCP", ((80, 80), (1000, 2000))), INGRESS)
    assert expr == [
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                   "right": "@s4-x"}},
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}},
                   "right": {"set": [80, {"range": [1000, 2000]}]}}},
    ]
    expr = render_rule_expr(ChainRule(6, None, "n6-y", "UDP"), EGRESS)
    assert expr[0]["match"]["left"]["concat"][0] == {"payload": {"protocol": "ip6",
                                                                 "field": "daddr"}}
    assert len(expr) == 1  # the triple already holds protocol and port
    assert render_rule_expr(ChainRule(), INGRESS) == []


def test_skeleton_accepts_established_first_and_checks_egress_before_ingress() -> None:
    rules = [c["add"]["rule"] for c in render_skeleton(Table("t")) if "rule" in c["add"]]
    forward = [r for r in rules if r["chain"] == "forward"]
    assert "ct" in str(forward[0]["expr"]) and forward[0]["expr"][-1] == {"accept": None}
    vmaps = [r["expr"][0]["vmap"]["data"] for r in forward if "vmap" in r["expr"][0]]
    assert vmaps == ["@egress4", "@egress6", "@ingress4", "@ingress6"]
    # where an Admin egress accept goes: the destination's ingress, then accept
    judge = [r["expr"] for r in rules if r["chain"] == "judge-ingress"]
    assert [e[0].get("vmap", {}).get("data") for e in judge] == ["@ingress4", "@ingress6", None]
    assert judge[-1] == [{"accept": None}]



def test_no_policy_name_reaches_the_kernel_for_any_corpus_case() -> None:
    import re

    table = Table(log_group=100)
    neutral = re.compile(r"(ingress|egress) rule \d+ #[0-9a-f]{8}|log denied #(ingress|egress)"
                         r"|default deny #(ingress|egress)|.* #stockade-\d+"
                         r"|(admin tier|end of tier) #(ingress|egress)"
                         r"|(tier map|log denied) \d+ ip6? #(ingress|egress)")
    for case in [*_cases(), *_cases(shared("conformance-cnp"))]:
        rs = compile_cluster(case.cluster)
        cmds = render_plan(table, plan(Ruleset(), rs), skeleton=True)
        comments = [c["add"]["rule"]["comment"] for c in cmds if "rule" in c.get("add", {})]
        assert comments and all(neutral.fullmatch(c) for c in comments), case.id
        # chains are named by content, so the same rules under other names are the same
        ordered = sorted(case.cluster.policies, key=lambda p: p.key)
        renamed = case.cluster.with_policies([replace(p, name=f"renamed-{i:04}")
                                              for i, p in enumerate(ordered)])
        assert render_plan(table, plan(Ruleset(), compile_cluster(renamed)),
                           skeleton=True) == cmds, case.id


def test_a_family_no_endpoint_has_gets_no_pod_sets_but_keeps_its_ipblocks() -> None:
    """An IPv4 cluster's IPv6 twins of selector sets would all be empty: the rules naming
    them are left out with them. An IPv6 ipBlock is fixed and stays; with an IPv6 pod the
    IPv6 pod sets come back, and the chain is another (its name follows its rules)."""
    policy = replace(POLICY, ingress=(*POLICY.ingress, Rule(
        (), (Peer(ip_block=IPBlock("fd00:1::/64")),))))
    v4 = Cluster((_ns("x"),), (_ep("db", "10.0.0.1"), _ep("api", "10.0.0.2", role="api")),
                 (policy,))
    rs = compile_cluster(v4)
    assert {(s.family, s.kind) for s in rs.sets.values()} == {(4, ADDR), (6, NET)}
    ((name, chain),) = rs.chains.items()
    assert sorted((r.family, rs.sets[r.peer_set].kind if r.peer_set else None)
                  for r in chain.rules) == [(4, ADDR), (6, NET)]
    db6 = replace(_ep("db6", "fd00::1"), labels=Labels({"app": "db"}))
    dual = replace(v4, endpoints=(*v4.endpoints, db6, _ep("api6", "fd00::2", role="api")))
    rs6 = compile_cluster(dual)
    assert {(s.family, s.kind) for s in rs6.sets.values()} == {(4, ADDR), (6, ADDR), (6, NET)}
    ((name6, chain6),) = rs6.chains.items()
    assert name6 != name and len(chain6.rules) == 3
    assert interpret.allows(rs6, "fd00::2", "fd00::1", "TCP", 5432)
    assert not interpret.allows(rs6, "fd00::2", "fd00::1", "TCP", 80)
