"""A large plan in parts (plan.staged): the parts add only what nothing reaches yet,
and together with the rest they are the plan, exactly."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.property.strategies import DENSE
from tests.property.tier_strategies import cnp_clusters

from stockade.compile.ir import ADDR, ADDR_PORT, INGRESS, NET, AddressSet, Chain, ChainRule, Ruleset
from stockade.compile.lower import compile_cluster
from stockade.compile.plan import RULE_COST, Plan, plan, staged


def _weight(p: Plan) -> int:
    return sum(1 + len(s.elements) for s in p.add_sets) + sum(
        RULE_COST * (1 + len(c.rules)) for c in p.add_chains)


def _check(p: Plan, part: int) -> tuple[tuple[Plan, ...], Plan]:
    parts, rest = staged(p, part)
    if not parts:
        assert rest is p
        return parts, rest
    # Each part adds sets or NetworkPolicy chains, and nothing else.
    for q in parts:
        assert bool(q.add_sets) != bool(q.add_chains)
        assert replace(q, add_sets=(), add_chains=()).empty
        assert all(c.final and c.next is None and c.calls is None for c in q.add_chains)
    # Sets before chains: every set a part's rule names is in the kernel by then.
    kinds = [bool(q.add_sets) for q in parts]
    assert kinds == sorted(kinds, reverse=True)
    # Together they are the plan: nothing lost, nothing twice.
    assert all(s.kind not in (ADDR, ADDR_PORT, NET) for s in rest.add_sets)  # tier maps
    assert Counter(s.name for q in (*parts, rest) for s in q.add_sets) == Counter(
        s.name for s in p.add_sets)
    assert sorted(c.name for q in (*parts, rest) for c in q.add_chains) == sorted(
        c.name for c in p.add_chains)
    assert replace(rest, add_sets=(), add_chains=()) == replace(p, add_sets=(), add_chains=())
    # A part is closed once it weighs `part`: never more than one object over it.
    for q in parts:
        last = q.add_sets[-1] if q.add_sets else None
        over = (1 + len(last.elements)) if last else RULE_COST * (1 + len(q.add_chains[-1].rules))
        assert _weight(q) - over < part
    return parts, rest


@settings(max_examples=60, deadline=None)
@given(c=cnp_clusters(DENSE, max_cnps=3), part=st.sampled_from([1, 5, 40, 10 ** 9]))
def test_parts_and_rest_are_the_plan(c, part: int) -> None:
    p = plan(Ruleset(), compile_cluster(c))
    parts, _ = _check(p, part)
    stageable = Plan(
        add_sets=tuple(s for s in p.add_sets if s.kind in (ADDR, ADDR_PORT, NET)),
        add_chains=tuple(ch for ch in p.add_chains
                         if ch.final and ch.next is None and ch.calls is None))
    assert (parts == ()) == (_weight(stageable) < part)


def test_a_small_plan_is_all_rest() -> None:
    s = AddressSet("a4-x", 4, ADDR, frozenset({"10.0.0.1"}))
    p = Plan(add_sets=(s,), add_chains=(Chain("i-1", INGRESS, (ChainRule(4, "a4-x"),)),))
    assert staged(p, 10 ** 6) == ((), p)


def test_sets_many_rules_name_come_first() -> None:
    """The kernel finds a rule's set by walking the table's sets in the order they
    came: the set most rules name goes first."""
    sets = tuple(AddressSet(f"a4-{n}", 4, ADDR, frozenset({f"10.0.0.{i}"}))
                 for i, n in enumerate("abc", 1))
    chains = (Chain("i-1", INGRESS, (ChainRule(4, "a4-c"), ChainRule(4, "a4-b"))),
              Chain("i-2", INGRESS, (ChainRule(4, "a4-c"),)))
    parts, _ = _check(Plan(add_sets=sets, add_chains=chains), 1)
    assert [s.name for q in parts for s in q.add_sets] == ["a4-c", "a4-b", "a4-a"]


def test_tier_chains_stay_in_the_rest() -> None:
    """A tier chain jumps to the next one (or is jumped to): it goes with the rest."""
    tier = Chain("ai-1", INGRESS, (ChainRule(4, "a4-x", action="deny"),), tier="Admin",
                 next="i-1")
    final = Chain("i-1", INGRESS, (ChainRule(4, "a4-x"),))
    s = AddressSet("a4-x", 4, ADDR, frozenset({"10.0.0.1"}))
    parts, rest = _check(Plan(add_sets=(s,), add_chains=(tier, final)), 1)
    assert [c.name for q in parts for c in q.add_chains] == ["i-1"]
    assert rest.add_chains == (tier,)
