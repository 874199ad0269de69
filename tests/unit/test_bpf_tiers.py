"""ClusterNetworkPolicy tiers in the eBPF map contents, without a kernel.

A tier chain's first-match order is resolved into disjoint LPM entries per (policy,
peer identity, protocol, port prefix) with an action; a side is judged by at most
two stages (Admin, then NetworkPolicy or Baseline). `compile.bpf.allows` models the
program on those entries and must agree with the IR interpreter on random clusters
with both kinds of policy; the maps must read back to the ruleset they enforce, and
`keeps_connection` must keep what the agent's revoker keeps on nftables (policies of
both kinds annotated keep: a tier's Deny is kept only by its own policy's annotation).
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.property.strategies import DEFAULT, DENSE, Scenario
from tests.property.tier_strategies import cnp_scenarios

from stockade.agent.revoke import keeping_policies, should_cut
from stockade.compile import bpf, interpret
from stockade.compile.incremental import IncrementalCompiler
from stockade.compile.ir import (
    ADDR,
    ALLOW,
    DENY,
    NET,
    PASS,
    AddressSet,
    Chain,
    ChainRule,
    Ruleset,
)
from stockade.compile.lower import compile_cluster
from stockade.compile.plan import plan
from stockade.compile.tiers import lower_tier_rule
from stockade.engine.evaluate import Evaluator
from stockade.errors import DataplaneError
from stockade.model import cnp
from stockade.model.cluster import Cluster
from stockade.model.labels import Labels
from stockade.model.policy import INGRESS, KEEP_ANNOTATION

KEEP = Labels({KEEP_ANNOTATION: "keep"})


def _annotated(cluster: Cluster, data: st.DataObject) -> Cluster:
    """The cluster with a random choice of its policies of both kinds annotated keep
    (now and then in another case, with blanks: the revoker reads it so)."""
    keys = [p.key for p in cluster.policies] + [p.key for p in cluster.cluster_policies]
    marked = data.draw(st.sets(st.sampled_from(keys)) if keys else st.just(set()))
    value = data.draw(st.sampled_from(["keep", " Keep "]))
    note = Labels({KEEP_ANNOTATION: value})
    return dataclasses.replace(
        cluster,
        policies=tuple(dataclasses.replace(p, annotations=note) if p.key in marked else p
                       for p in cluster.policies),
        cluster_policies=tuple(dataclasses.replace(p, annotations=note)
                               if p.key in marked else p for p in cluster.cluster_policies))


def _agrees(sc: Scenario, rs: Ruleset, state: bpf.BpfState) -> int:
    checked = 0
    judge = bpf.Judge(state)
    for flow in sc.flows():
        want = interpret.allows(rs, flow.src_ip, flow.dst_ip, flow.protocol, flow.port)
        got = judge.allows(flow.src_ip, flow.dst_ip, flow.protocol, flow.port)
        assert got == want, (flow, want)
        checked += 1
    return checked


@settings(max_examples=200, deadline=None)
@given(sc=cnp_scenarios(DENSE, max_cnps=4))
def test_the_maps_decide_tiers_like_the_interpreter(sc: Scenario) -> None:
    rs = compile_cluster(sc.cluster)
    _agrees(sc, rs, bpf.compile_state(rs))


@settings(max_examples=100, deadline=None)
@given(sc=cnp_scenarios(DEFAULT, max_cnps=3))
def test_every_feature_with_tiers_v4_and_v6(sc: Scenario) -> None:
    rs = compile_cluster(sc.cluster)
    _agrees(sc, rs, bpf.compile_state(rs))


@settings(max_examples=100, deadline=None)
@given(sc=cnp_scenarios(DENSE, max_cnps=4), slot=st.sampled_from([0, 1]), data=st.data())
def test_tiered_maps_read_back_to_the_same_state_and_ruleset(sc: Scenario, slot: int,
                                                             data: st.DataObject) -> None:
    rs = compile_cluster(_annotated(sc.cluster, data))
    state = bpf.compile_state(rs)
    back = bpf.decode(bpf.encode_maps(state, slot), bpf.encode_meta(state), slot)
    assert back == state
    assert bpf.ruleset_of(back) == rs
    assert plan(bpf.ruleset_of(back), rs).empty
    # adoption: recompiling what was read back, with its ids, changes nothing
    assert bpf.compile_state(bpf.ruleset_of(back), back) == state


@settings(max_examples=80, deadline=None)
@given(a=cnp_scenarios(DENSE, max_cnps=3), b=cnp_scenarios(DENSE, max_cnps=3))
def test_a_delta_between_tiered_states(a: Scenario, b: Scenario) -> None:
    first = bpf.compile_state(compile_cluster(a.cluster))
    rs = compile_cluster(b.cluster)
    second = bpf.compile_state(rs, first)
    _agrees(b, rs, second)
    for slot in (0, 1):
        old, new = bpf.encode_maps(first, slot), bpf.encode_maps(second, slot)
        full = bpf.map_delta(old, new)
        assert bpf.state_delta(first, second, slot) == full
        assert bpf.apply_delta(old, full) == new


@settings(max_examples=60, deadline=None)
@given(sc=cnp_scenarios(DENSE, max_cnps=3), data=st.data())
def test_an_annotation_changed_on_the_agent_is_a_changed_rule(sc: Scenario,
                                                              data: st.DataObject) -> None:
    # the agent compiles incrementally: policies annotated afterwards must give the
    # ruleset (rules' keep included) a full compilation gives, and so the same maps
    inc = IncrementalCompiler.of(sc.cluster)
    changed = _annotated(sc.cluster, data)
    for p in changed.cluster_policies:
        inc.upsert_cluster_policy(p)
    for p in changed.policies:
        inc.upsert_policy(p)
    rs = compile_cluster(changed)
    assert inc.ruleset() == rs
    assert bpf.ruleset_of(bpf.compile_state(inc.ruleset())) == rs


KEPT: list[tuple[int, int, int]] = []  # (denied flows kept, denied flows cut, tier-kept)


@settings(max_examples=300, deadline=None)
@given(sc=cnp_scenarios(DENSE, max_cnps=4), data=st.data())
def test_keeps_what_the_revoker_keeps(sc: Scenario, data: st.DataObject) -> None:
    cluster = _annotated(sc.cluster, data)
    ev = Evaluator(cluster)
    keep = keeping_policies(ev)
    judge = bpf.Judge(bpf.compile_state(compile_cluster(cluster)))
    kept = cut = by_tier = 0
    for flow in sc.flows():
        verdict = ev.verdict(flow)
        want = not should_cut(verdict, keep)
        got = judge.keeps_connection(flow.src_ip, flow.dst_ip, flow.protocol, flow.port)
        assert got == want, (flow, want)
        if not verdict.allowed:
            kept, cut = kept + want, cut + (not want)
            by_tier += want and any(s.decided_by in ("Admin", "Baseline")
                                    for s in (verdict.egress, verdict.ingress)
                                    if not s.allowed)
    KEPT.append((kept, cut, by_tier))


def test_the_examples_kept_and_cut_tier_denials() -> None:
    """Worth something only if denied flows were kept (some by a tier's own
    annotation) and others cut."""
    if not KEPT:
        pytest.fail("runs after the property test, in the same session")
    kept, cut, by_tier = (sum(k[i] for k in KEPT) for i in range(3))
    assert kept > 0 and cut > 0 and by_tier > 0, (kept, cut, by_tier)


# ---- the resolution, by hand ----------------------------------------------------------

PEERS = AddressSet("s4-p", 4, ADDR, frozenset({"10.0.0.1", "10.0.0.2"}))
PEERS6 = AddressSet("s6-p", 6, ADDR, frozenset({"fd00::1"}))
NETS = AddressSet("c4-n", 4, NET, frozenset({"10.0.0.0/24"}))


def _tiered(admin: tuple[ChainRule, ...], then: Chain | None, direction: str = "ingress"
            ) -> Ruleset:
    a = Chain("ai-a", direction, admin, "admin", tier="Admin")
    chains = {a.name: a}
    if then is not None:
        chains[then.name] = then
    link = Chain("li-l", direction, (), "admin", tier="Admin",
                 next=then.name if then else None, calls=a.name)
    chains[link.name] = link
    m = {"10.0.0.3": link.name, "fd00::3": link.name}
    return Ruleset({s.name: s for s in (PEERS, PEERS6, NETS)}, chains,
                   m if direction == "ingress" else {}, m if direction == "egress" else {})


def _both(rs: Ruleset, src: str, dst: str, proto: str, port: int) -> bool:
    want = interpret.allows(rs, src, dst, proto, port)
    got = bpf.allows(bpf.compile_state(rs), src, dst, proto, port)
    assert got == want, (src, dst, proto, port)
    return got


def test_first_match_splits_port_ranges_into_disjoint_prefixes() -> None:
    # deny 80 to the peers, then allow 1-1024 to anyone: port 80 from a peer is denied,
    # 81 allowed, 80 from elsewhere allowed; the NetworkPolicy chain (nothing) denies the rest
    np = Chain("i-n", "ingress", ())
    rs = _tiered((ChainRule(4, "s4-p", None, "TCP", ((80, 80),), action=DENY),
                  ChainRule(None, None, None, "TCP", ((1, 1024),), action=ALLOW)), np)
    assert not _both(rs, "10.0.0.1", "10.0.0.3", "TCP", 80)
    assert _both(rs, "10.0.0.1", "10.0.0.3", "TCP", 81)
    assert _both(rs, "10.0.0.9", "10.0.0.3", "TCP", 80)
    assert not _both(rs, "10.0.0.1", "10.0.0.3", "TCP", 1025)
    assert not _both(rs, "10.0.0.1", "10.0.0.3", "UDP", 81)
    state = bpf.compile_state(rs)
    admin = next(i for i, r in state.policies.items() if r.chain == "ai-a" and r.family == 4)
    peer = state.ipcache[(4, "10.0.0.1/32")][0]
    entries = {k[2:]: v for k, v in state.policy.items() if k[:2] == (admin, peer)}
    # 80 deny, 1-79 and 81-1024 allow as prefixes, the rest passes (the 64-bit entry)
    assert entries[(6, 80, 88)] == bpf.DENY_VALUE
    assert entries[(0, 0, 64)] == bpf.PASS_VALUE
    covered = sorted((port, 1 << (88 - plen)) for (proto, port, plen), v in entries.items()
                     if proto == 6 and v == bpf.ALLOW_VALUE)
    ports = {p for base, size in covered for p in range(base, base + size)}
    assert ports == set(range(1, 1025)) - {80}
    # a later rule shadowed by an earlier one for every port adds nothing
    assert all(v != bpf.ALLOW_VALUE or k[2] != 17 for k, v in entries.items())


def test_pass_goes_on_and_a_deny_is_final() -> None:
    np = Chain("i-n", "ingress", (ChainRule(4, "s4-p", None, "TCP", ((443, 443),)),))
    rs = _tiered((ChainRule(None, "s4-p", None, None, (), action=PASS),
                  ChainRule(None, None, None, None, (), action=DENY)), np)
    assert _both(rs, "10.0.0.2", "10.0.0.3", "TCP", 443)  # passed, then NetworkPolicy allows
    assert not _both(rs, "10.0.0.2", "10.0.0.3", "TCP", 444)  # NetworkPolicy: no rule
    assert not _both(rs, "10.0.0.9", "10.0.0.3", "TCP", 443)  # Admin denies the rest
    # no chain after Admin: a pass or no match lets the side pass
    rs = _tiered((ChainRule(4, "s4-p", None, "TCP", (), action=PASS),
                  ChainRule(4, None, None, "TCP", ((1, 100),), action=DENY)), None)
    assert _both(rs, "10.0.0.2", "10.0.0.3", "TCP", 50)
    assert not _both(rs, "10.0.0.9", "10.0.0.3", "TCP", 50)
    assert _both(rs, "10.0.0.9", "10.0.0.3", "TCP", 101)


def test_baseline_after_admin_and_ipv6() -> None:
    base = Chain("bi-b", "ingress", (ChainRule(6, "s6-p", None, "UDP", ((53, 53),),
                                               action=ALLOW),
                                     ChainRule(None, None, None, None, (), action=DENY)),
                 tier="Baseline")
    rs = _tiered((ChainRule(None, None, None, "UDP", ((53, 53),), action=PASS),
                  ChainRule(6, "s6-p", None, "TCP", ((22, 22),), action=ALLOW)), base)
    assert _both(rs, "fd00::1", "fd00::3", "UDP", 53)
    assert _both(rs, "fd00::1", "fd00::3", "TCP", 22)  # Admin allows, Baseline not asked
    assert not _both(rs, "fd00::9", "fd00::3", "UDP", 53)
    assert not _both(rs, "10.0.0.1", "10.0.0.3", "UDP", 53)
    assert not _both(rs, "fd00::1", "fd00::3", "TCP", 23)


def test_egress_networks_and_named_ports() -> None:
    named = AddressSet("n4-h", 4, "addr_port", frozenset({("10.0.0.2", "tcp", 8080)}))
    rs = _tiered((ChainRule(4, None, "n4-h", "TCP", (), action=DENY),
                  ChainRule(4, "c4-n", None, None, (), action=ALLOW)), None, "egress")
    rs = dataclasses.replace(rs, sets={**rs.sets, named.name: named})
    assert not _both(rs, "10.0.0.3", "10.0.0.2", "TCP", 8080)
    assert _both(rs, "10.0.0.3", "10.0.0.2", "TCP", 8081)
    assert _both(rs, "10.0.0.3", "10.0.0.1", "TCP", 8080)
    assert _both(rs, "10.0.0.3", "10.9.0.1", "TCP", 8080)  # no match: passes


def test_an_admin_chain_is_shared_by_every_policy_set_under_it() -> None:
    one = Chain("i-1", "ingress", (ChainRule(4, "s4-p", None, "TCP", ()),))
    two = Chain("i-2", "ingress", (ChainRule(4, None, None, "UDP", ()),))
    rs = _tiered((ChainRule(4, "s4-p", None, "TCP", ((22, 22),), action=DENY),), one)
    link2 = Chain("li-2", "ingress", (), "admin", tier="Admin", next="i-2", calls="ai-a")
    rs = dataclasses.replace(rs, chains={**rs.chains, "i-2": two, "li-2": link2},
                             ingress={**rs.ingress, "10.0.0.4": "li-2"})
    state = bpf.compile_state(rs)
    admins = {i for i, r in state.policies.items() if r.chain == "ai-a" and r.family == 4}
    assert len(admins) == 1
    (admin,) = admins
    three, four = state.ipcache[(4, "10.0.0.3/32")], state.ipcache[(4, "10.0.0.4/32")]
    assert three[3] == four[3] == admin | bpf.STAGE_TIER  # no rule without a peer: no ANY
    # one lookup per stage but where a rule has no peer condition (i-2's UDP rule)
    assert not three[4] & (bpf.STAGE_TIER | bpf.STAGE_ANY)
    assert four[4] & bpf.STAGE_ANY and not four[4] & bpf.STAGE_TIER
    # nothing that would pass is written: one Deny entry, for s4-p's one identity
    assert [v for k, v in state.policy.items() if k[0] == admin] == [bpf.DENY_VALUE]
    assert not _both(rs, "10.0.0.1", "10.0.0.4", "TCP", 22)
    assert _both(rs, "10.0.0.9", "10.0.0.4", "UDP", 22)


def test_more_stages_than_the_program_runs_are_refused() -> None:
    b2 = Chain("bi-2", "ingress", (ChainRule(action=DENY),), tier="Baseline")
    b1 = Chain("bi-1", "ingress", (ChainRule(action=PASS),), tier="Baseline", next="bi-2")
    rs = _tiered((ChainRule(action=PASS),), b1)
    rs = dataclasses.replace(rs, chains={**rs.chains, "bi-1": b1, "bi-2": b2})
    with pytest.raises(DataplaneError, match="at most 2"):
        bpf.compile_state(rs)


def test_a_tier_deny_is_kept_by_its_own_policy_only() -> None:
    # Admin on 10.0.0.3: a kept Deny of TCP/80 from the peers, then an unkept Deny of
    # TCP 1-100 from anyone; a NetworkPolicy chain that keeps behind it.
    np = Chain("i-n", "ingress", (ChainRule(4, "s4-p", None, "TCP", ((443, 443),)),),
               keep=True)
    rs = _tiered((ChainRule(4, "s4-p", None, "TCP", ((80, 80),), action=DENY, keep=True),
                  ChainRule(4, None, None, "TCP", ((1, 100),), action=DENY),
                  ChainRule(4, "s4-p", None, "TCP", ((443, 443),), action=PASS)), np)
    state = bpf.compile_state(rs)
    admin = next(i for i, r in state.policies.items() if r.chain == "ai-a" and r.family == 4)
    peer = state.ipcache[(4, "10.0.0.1/32")][0]
    assert state.policy[(admin, peer, 6, 80, 88)] == bpf.DENY_VALUE | bpf.KEEP_BIT
    assert state.policy[(admin, peer, 6, 81, 88)] == bpf.DENY_VALUE
    for src, port, kept in (("10.0.0.1", 80, True),  # the kept Deny decides
                            ("10.0.0.1", 81, False),  # the other Deny
                            ("10.0.0.9", 80, False),  # not a peer: the other Deny
                            ("10.0.0.1", 444, True)):  # passed on: the NetworkPolicy keeps
        assert not _both(rs, src, "10.0.0.3", "TCP", port)
        assert bpf.keeps_connection(state, src, "10.0.0.3", "TCP", port) == kept, (src, port)
    # keep on a rule that does not deny means nothing: the entries are the same
    plain = _tiered((ChainRule(4, "s4-p", None, "TCP", (), action=ALLOW),), np)
    marked = _tiered((ChainRule(4, "s4-p", None, "TCP", (), action=ALLOW, keep=True),), np)
    assert bpf.compile_state(plain).policy == bpf.compile_state(marked).policy
    # the rule's keep is read back from meta: a new process sees the same ruleset
    back = bpf.decode(bpf.encode_maps(state, 1), bpf.encode_meta(state), 1)
    assert bpf.ruleset_of(back) == rs
    assert bpf.ruleset_of(back).chains["ai-a"].rules[0].keep


def test_an_annotated_cluster_network_policy_lowers_to_kept_denies() -> None:
    everyone = cnp.CnpPeer(cnp.NAMESPACES)
    rules = [cnp.CnpRule(a, (everyone,)) for a in (cnp.DENY, cnp.ACCEPT, cnp.PASS)]
    for note, want in ((Labels(), False), (KEEP, True),
                       (Labels({KEEP_ANNOTATION: "no"}), False)):
        p = cnp.ClusterNetworkPolicy("p", cnp.ADMIN, 1, everyone, ingress=tuple(rules),
                                     annotations=note)
        lowered = [lower_tier_rule(INGRESS, p, i, r, lambda spec: spec.name)
                   for i, r in enumerate(rules)]
        assert all(r.keep == want for r in lowered[0]) and lowered[0]
        assert not any(r.keep for rs in lowered[1:] for r in rs)
