"""The incremental compiler with ClusterNetworkPolicy tiers equals the full compiler
after every change: the shared CNP cases built in any order, then random changes of
every kind (endpoints added, removed and relabelled, namespaces relabelled, tier
policies added, changed, reprioritised, their actions flipped, removed)."""

from __future__ import annotations

import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
from tests.support import shared

from stockade.cli.conformance import load_cases
from stockade.compile.incremental import IncrementalCompiler
from stockade.compile.lower import compile_cluster
from stockade.compile.nft import nft_target
from stockade.compile.plan import Plan, derived, full_plan, plan
from stockade.conformance.case import Case
from stockade.datapath.nft import NftDatapath
from stockade.model.cluster import Cluster, Endpoint, Namespace
from stockade.model.cnp import ACCEPT, ADMIN, BASELINE, DENY, PASS, ClusterNetworkPolicy
from stockade.model.policy import NetworkPolicy

CORPUS = shared("conformance-cnp")


def _cases() -> list[Case]:
    if not CORPUS.is_dir():
        pytest.skip(f"no conformance corpus at {CORPUS}")
    cases = [c for c in load_cases([str(CORPUS)]) if c.cluster.cluster_policies]
    assert cases
    return cases


def _same(inc: IncrementalCompiler, what: str) -> None:
    assert inc.ruleset() == compile_cluster(inc.cluster()), what


def _normal(p: Plan) -> tuple[object, ...]:
    return (sorted(s.name for s in p.add_sets), sorted((s.name, sorted(e, key=str))
                                                       for s, e in p.add_elements),
            sorted(c.name for c in p.add_chains), sorted(c.name for c in p.replace_chains),
            sorted(p.del_map), sorted(p.set_map), sorted(p.del_chains),
            sorted((s.name, sorted(e, key=str)) for s, e in p.del_elements),
            sorted(p.del_sets), p.narrows)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_every_cnp_case_built_in_any_order_equals_the_full_compile(order: int) -> None:
    rnd = random.Random(order)
    for case in _cases():
        c = case.cluster
        inc = IncrementalCompiler()
        steps: list[object] = [*c.namespaces, *c.endpoints, *c.policies, *c.cluster_policies]
        rnd.shuffle(steps)
        for step in steps:
            if isinstance(step, Namespace):
                inc.upsert_namespace(step)
            elif isinstance(step, ClusterNetworkPolicy):
                inc.upsert_cluster_policy(step)
            elif isinstance(step, NetworkPolicy):
                inc.upsert_policy(step)
            else:
                assert isinstance(step, Endpoint)
                inc.upsert_endpoint(step)
            _same(inc, case.id)
        assert inc.ruleset() == compile_cluster(c), case.id
        assert any(ch.tier for ch in inc.ruleset().chains.values()), case.id
        assert IncrementalCompiler.of(c).ruleset() == inc.ruleset(), case.id


def _mutated(rnd: random.Random, p: ClusterNetworkPolicy) -> ClusterNetworkPolicy:
    """The policy with another priority, tier or action of one rule."""
    what = rnd.randrange(4)
    if what == 0:
        return replace(p, priority=rnd.choice((0, 1, p.priority, 500, 1000)))
    if what == 1:
        return replace(p, tier=BASELINE if p.tier == ADMIN else ADMIN)
    rules = list(p.ingress if what == 2 else p.egress)
    if not rules:
        return replace(p, priority=(p.priority + 7) % 1001)
    i = rnd.randrange(len(rules))
    rules[i] = replace(rules[i], action=rnd.choice((ACCEPT, DENY, PASS)))
    return replace(p, **{"ingress" if what == 2 else "egress": tuple(rules)})


def _random_change(rnd: random.Random, inc: IncrementalCompiler, c: Cluster) -> str:
    eps, tiers = list(c.endpoints), list(c.cluster_policies)
    kind = rnd.randrange(8)
    if kind == 0 and eps:
        ep = rnd.choice(eps)
        inc.upsert_endpoint(replace(ep, labels=ep.labels.with_labels(pod=rnd.choice("ab"))))
        return f"relabel {ep.key}"
    if kind == 1 and eps:
        ep = rnd.choice(eps)
        inc.delete_endpoint(ep.key)
        return f"delete {ep.key}"
    if kind == 2 and eps:
        ep = rnd.choice(eps)
        inc.upsert_endpoint(ep)
        return f"add {ep.key}"
    if kind == 3 and c.namespaces:
        ns = rnd.choice(c.namespaces)
        labels = rnd.choice((ns.labels, ns.labels.with_labels(ns=rnd.choice("xy"))))
        inc.upsert_namespace(Namespace(ns.name, labels))
        return f"relabel namespace {ns.name}"
    if kind == 4 and tiers:
        p = rnd.choice(tiers)
        inc.delete_cluster_policy(p.name)
        return f"delete cnp {p.name}"
    if kind in (5, 6) and tiers:
        p = rnd.choice(tiers)
        current = inc.cluster_policies.get(p.name, p)
        new = _mutated(rnd, current)
        inc.upsert_cluster_policy(new)
        return f"change cnp {p.name}: {new.tier} {new.priority}"
    if tiers:
        p = rnd.choice(tiers)
        inc.upsert_cluster_policy(p)
        return f"restore cnp {p.name}"
    return "nothing"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_changes_keep_the_incremental_ruleset_equal_to_the_full_one(
        seed: int) -> None:
    """And the plan from the previous ruleset (derived: what changed only), and the
    nftables datapath's canonical target, are those of the full comparison."""
    rnd = random.Random(seed)
    for case in _cases():
        c = case.cluster
        inc = IncrementalCompiler.of(c)
        dp = SimpleNamespace(_last_desired=None, _last_target=None)
        before = inc.ruleset()
        target = NftDatapath._target(dp, before)  # type: ignore[arg-type]
        done: list[str] = []
        for _ in range(15):
            done.append(_random_change(rnd, inc, c))
            after = inc.ruleset()
            assert after == compile_cluster(inc.cluster()), (case.id, done)
            assert after is before or derived(after, before) is not None
            assert _normal(plan(before, after)) == _normal(full_plan(before, after)), (
                case.id, done)
            new_target = NftDatapath._target(dp, after)  # type: ignore[arg-type]
            assert new_target == nft_target(after), case.id
            assert _normal(plan(target, new_target)) == _normal(
                full_plan(target, new_target)), (case.id, done)
            before, target = after, new_target
        # Everything removed again: no chain, set or entry of a tier is left behind.
        for p in list(inc.cluster_policies):
            inc.delete_cluster_policy(p)
        assert inc.ruleset() == compile_cluster(inc.cluster()), case.id
        assert not any(ch.tier for ch in inc.ruleset().chains.values()), case.id


def test_a_priority_change_replaces_the_tier_chains_and_moves_no_entry() -> None:
    """Swapping two Admin policies' precedence: the chains holding both keep their names
    (they are named by their policies' subjects) and get the rules in the new order, in
    one plan; no map entry, link chain or set changes, whatever the endpoints served."""
    case = next(c for c in _cases()
                if sum(p.tier == ADMIN for p in c.cluster.cluster_policies) >= 2)
    inc = IncrementalCompiler.of(case.cluster)
    before = inc.ruleset()
    admins = sorted((p for p in case.cluster.cluster_policies if p.tier == ADMIN),
                    key=ClusterNetworkPolicy.order)
    first, second = admins[0], admins[1]
    inc.upsert_cluster_policy(replace(first, priority=second.priority + 1))
    after = inc.ruleset()
    assert after == compile_cluster(inc.cluster())
    assert after.chains.keys() == before.chains.keys()
    assert after.ingress == before.ingress and after.egress == before.egress
    p = plan(before, after)
    assert _normal(p) == _normal(full_plan(before, after))
    if not p.replace_chains:
        pytest.skip(f"{case.id}: the two policies never share an endpoint")
    assert all(c.tier == ADMIN and c.calls is None for c in p.replace_chains)
    assert not (p.add_chains or p.del_chains or p.set_map or p.del_map)
    assert p.narrows  # a reordering may deny what was allowed: a revocation pass
