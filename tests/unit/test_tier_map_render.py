"""A tier chain on nftables: a few lookups, however many policies select its endpoints
(the rules' first match is resolved into verdict maps), read back as rendered."""

from __future__ import annotations

import ipaddress

from stockade.compile.ir import DENY, INGRESS, Chain, ChainRule, Ruleset
from stockade.compile.lower import compile_cluster
from stockade.compile.nft import (
    DECISION,
    DENIED,
    Table,
    _read_tier_element,
    _tier_element,
    chain_rules,
    nft_target,
    render_full,
)
from stockade.model.cluster import Cluster, Endpoint, Namespace
from stockade.model.cnp import (
    ACCEPT,
    ADMIN,
    NAMESPACES,
    PASS,
    PODS,
    ClusterNetworkPolicy,
    CnpPeer,
    CnpPort,
    CnpRule,
)
from stockade.model.cnp import (
    DENY as CNP_DENY,
)
from stockade.model.labels import Labels
from stockade.model.selector import ALL, Selector


def _cluster(policies: int, *, named: bool = False) -> Cluster:
    ns = tuple(Namespace(f"ns{i}", Labels({"kubernetes.io/metadata.name": f"ns{i}"}))
               for i in range(3))
    eps = tuple(Endpoint(f"ns{i % 3}", f"p{i}", Labels({"app": f"a{i % 4}"}),
                         (f"10.2.0.{i + 1}", f"fd00:2::{i + 1:x}")) for i in range(40))
    actions = (CNP_DENY, ACCEPT, PASS)
    cnps = []
    for i in range(policies):
        peer = CnpPeer(PODS, ALL, Selector(Labels({"app": f"a{i % 4}"})))
        ports = ((CnpPort("TCP", 0, 0, "http"),) if named and i == 0
                 else (CnpPort("TCP", 80 + i, 80 + i),))
        cnps.append(ClusterNetworkPolicy(
            name=f"c{i:04}", tier=ADMIN, priority=i % 1000, subject=CnpPeer(NAMESPACES, ALL),
            ingress=(CnpRule(actions[i % 3], (peer,), ports, "in"),),
            egress=(CnpRule(actions[i % 3], (peer,), None, "out"),)))
    return Cluster(ns, eps, (), tuple(cnps))


def _admin_chains(rs: Ruleset) -> list[Chain]:
    return [c for c in rs.chains.values() if c.tier == ADMIN and c.calls is None]


def test_a_tier_chain_is_a_constant_number_of_rules_whatever_its_policies() -> None:
    table = Table("t", log_group=5)
    counts = set()
    for n in (3, 30, 300):
        rs = compile_cluster(_cluster(n))
        chains = _admin_chains(rs)
        assert len(chains) == 2 and all(len(c.rules) >= n for c in chains)
        counts.add(tuple(sorted(len(chain_rules(table, c)) for c in chains)))
    # per direction, per family: a lookup of the denials (it logs) and the verdict map (a
    # shared Admin chain has no end of its own: its caller goes on)
    assert counts == {(4, 4)}


def test_an_ingress_named_port_stays_a_rule_before_the_lookups() -> None:
    rs = compile_cluster(_cluster(30, named=True))
    ingress = next(c for c in _admin_chains(rs) if c.direction == INGRESS)
    named = [i for i, r in enumerate(ingress.rules) if r.named_set is not None]
    assert named
    rendered = chain_rules(Table("t"), ingress)
    # the named rules (first: the first policy's), then one map per family for the rest
    assert named == list(range(len(named)))
    assert len(rendered) == len(named) + 2
    assert all("vmap" in expr[0] for expr, _ in rendered[len(named):])


def test_the_maps_hold_what_the_rules_decide() -> None:
    rs = compile_cluster(_cluster(30))
    target = nft_target(rs)
    maps = {n: s for n, s in target.sets.items() if s.kind in (DECISION, DENIED)}
    assert maps and all(n.startswith(("d4-", "d6-", "x4-", "x6-")) for n in maps)
    ingress = next(c for c in _admin_chains(rs) if c.direction == INGRESS)
    d4 = target.sets[f"d4-{ingress.name}-0"]
    # a0's pods (p0, p4, ...) meet c0000 first: a Deny of TCP/80
    p0 = int(ipaddress.ip_address("10.2.0.1"))
    hits = [e for e in d4.elements if isinstance(e, str)
            and int(e.split()[0].split("-")[0]) <= p0 <= int(e.split()[0].split("-")[1])
            and e.split()[1] == "6-6" and e.split()[2] == "80-80"]
    assert hits == [f"{p0}-{p0} 6-6 80-80 drop"]
    assert f"{p0}-{p0} 6-6 80-80" in target.sets[f"x4-{ingress.name}-0"].elements


def test_elements_read_back_as_rendered_whatever_libnftables_prints() -> None:
    rs = compile_cluster(_cluster(12))
    for s in nft_target(rs).sets.values():
        if s.kind not in (DECISION, DENIED):
            continue
        for e in s.elements:
            assert _read_tier_element(s.kind, s.family, _tier_element(s, e)) == e
    # what libnftables prints: prefixes, protocol names, single values
    printed = [{"concat": [{"prefix": {"addr": "10.1.0.0", "len": 16}}, "tcp",
                           {"range": [1000, 2000]}]}, {"goto": {"target": "be-x"}}]
    lo, hi = (int(ipaddress.ip_address(a)) for a in ("10.1.0.0", "10.1.255.255"))
    assert _read_tier_element(DECISION, 4, printed) == f"{lo}-{hi} 6-6 1000-2000 goto be-x"
    assert _read_tier_element(DENIED, 6, {"concat": ["fd00::1", "sctp", 9]}) == (
        f"{int(ipaddress.ip_address('fd00::1'))}-{int(ipaddress.ip_address('fd00::1'))} "
        "132-132 9-9")


def test_a_full_load_declares_maps_before_the_chains_that_look_them_up() -> None:
    cmds = render_full(Table("t", log_group=1), compile_cluster(_cluster(6)))
    first_map = next(i for i, c in enumerate(cmds) if "map" in c.get("add", {})
                     and c["add"]["map"]["name"].startswith("d"))
    first_rule = next(i for i, c in enumerate(cmds) if "rule" in c.get("add", {})
                      and "vmap" in str(c["add"]["rule"]["expr"])
                      and c["add"]["rule"]["chain"].startswith("a"))
    assert first_map < first_rule


def test_a_chain_without_rules_of_a_family_has_no_map_of_it() -> None:
    chain = Chain("ai-x", INGRESS, (ChainRule(4, protocol="TCP", action=DENY),), tier=ADMIN)
    rs = Ruleset({}, {"ai-x": chain}, {}, {})
    names = {n for n, s in nft_target(rs).sets.items() if s.kind in (DECISION, DENIED)}
    assert names == {"d4-ai-x-0", "x4-ai-x-0"}
    assert nft_target(rs).sets["d4-ai-x-0"].elements == frozenset(
        {f"0-{(1 << 32) - 1} 6-6 0-65535 drop"})
