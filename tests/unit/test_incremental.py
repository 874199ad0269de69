"""The incremental compiler equals the full compiler after every change."""

from __future__ import annotations

import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
from tests.support import shared

from stockade.cli.conformance import load_cases
from stockade.compile.incremental import IncrementalCompiler
from stockade.compile.lower import compile_cluster
from stockade.compile.nft import canonical
from stockade.compile.plan import Plan, derived, full_plan, plan
from stockade.conformance.case import Case
from stockade.datapath.nft import NftDatapath
from stockade.model.cluster import Namespace

CORPUS = shared("conformance")


def _cases() -> list[Case]:
    if not CORPUS.is_dir():
        pytest.skip(f"no conformance corpus at {CORPUS}")
    return load_cases([str(CORPUS)])


def _same(inc: IncrementalCompiler) -> None:
    assert inc.ruleset() == compile_cluster(inc.cluster())


@pytest.mark.parametrize("order", [0, 1, 2])
def test_every_case_built_in_any_order_equals_the_full_compile(order: int) -> None:
    rnd = random.Random(order)
    for case in _cases():
        c = case.cluster
        inc = IncrementalCompiler()
        steps: list[object] = [*c.namespaces, *c.endpoints, *c.policies]
        rnd.shuffle(steps)
        for step in steps:
            if isinstance(step, Namespace):
                inc.upsert_namespace(step)
            elif hasattr(step, "pod_selector"):
                inc.upsert_policy(step)  # type: ignore[arg-type]
            else:
                inc.upsert_endpoint(step)  # type: ignore[arg-type]
            _same(inc)
        assert inc.ruleset() == compile_cluster(c), case.id
        assert IncrementalCompiler.of(c).ruleset() == inc.ruleset(), case.id


def test_removals_relabels_and_namespace_changes() -> None:
    rnd = random.Random(5)
    for case in _cases():
        inc = IncrementalCompiler.of(case.cluster)
        eps = list(case.cluster.endpoints)
        for ep in rnd.sample(eps, min(3, len(eps))):
            inc.upsert_endpoint(replace(ep, labels=ep.labels.with_labels(pod="b")))
            _same(inc)
        for ns in case.cluster.namespaces:
            inc.upsert_namespace(Namespace(ns.name, ns.labels.with_labels(ns="y")))
            _same(inc)
        for p in list(case.cluster.policies):
            inc.delete_policy(p.key)
            _same(inc)
        for p in case.cluster.policies:
            inc.upsert_policy(p)
            _same(inc)
        for ep in eps[:4]:
            inc.delete_endpoint(ep.key)
            _same(inc)
        inc.delete_namespace(case.cluster.namespaces[0].name)
        _same(inc)


def test_untouched_sets_keep_their_identity_so_plans_stay_small() -> None:
    case = next(c for c in _cases() if len(compile_cluster(c.cluster).sets) >= 2)
    inc = IncrementalCompiler.of(case.cluster)
    before = inc.ruleset()
    ep = case.cluster.endpoints[0]
    inc.upsert_endpoint(replace(ep, labels=ep.labels.with_labels(extra="1")))
    after = inc.ruleset()
    kept = [n for n in before.sets if n in after.sets and before.sets[n] is after.sets[n]]
    assert kept, "unchanged sets should be the same objects"
    assert plan(before, after) == plan(compile_cluster(case.cluster), after)


def test_a_change_that_changes_nothing_gives_the_same_ruleset_and_an_empty_plan() -> None:
    """A relabel no selector reads, or an endpoint removed and put back, leaves every set,
    chain and map entry as it was: the same ruleset, not a copy of its tables."""
    seen = 0
    for case in _cases():
        inc = IncrementalCompiler.of(case.cluster)
        before = inc.ruleset()
        for ep in case.cluster.endpoints[:3]:
            inc.upsert_endpoint(replace(ep, labels=ep.labels.with_labels(unread="1")))
            inc.upsert_endpoint(ep)
            inc.delete_endpoint(ep.key)
            inc.upsert_endpoint(ep)
        after = inc.ruleset()
        assert after is before, case.id
        assert plan(before, after).empty
        assert after == compile_cluster(inc.cluster()), case.id
        # and a real change still gives a new one: an isolated endpoint goes
        isolated = [ep for ep in case.cluster.endpoints
                    if any(ip in before.ingress or ip in before.egress for ip in ep.ips)]
        if isolated:
            inc.delete_endpoint(isolated[0].key)
            changed = inc.ruleset()
            assert changed is not before and changed == compile_cluster(inc.cluster())
            seen += 1
    assert seen


def _normal(p: Plan) -> tuple[object, ...]:
    """A plan's content without its order."""
    return (sorted(s.name for s in p.add_sets), sorted((s.name, sorted(e, key=str))
                                                       for s, e in p.add_elements),
            sorted(c.name for c in p.add_chains), sorted(c.name for c in p.replace_chains),
            sorted(p.del_map), sorted(p.set_map), sorted(p.del_chains),
            sorted((s.name, sorted(e, key=str)) for s, e in p.del_elements),
            sorted(p.del_sets))


def test_a_plan_between_successive_rulesets_looks_at_what_changed_only() -> None:
    """The compiler records what each change touched (plan.derive): the plan from the
    previous ruleset, and the datapath's canonical target derived alike, are those of
    the full comparison, over random changes of every kind."""
    rnd = random.Random(11)
    for case in _cases():
        c = case.cluster
        inc = IncrementalCompiler.of(c)
        dp = SimpleNamespace(_last_desired=None, _last_target=None)
        before = inc.ruleset()
        target = NftDatapath._target(dp, before)  # type: ignore[arg-type]
        eps, pols = list(c.endpoints), list(c.policies)
        for _ in range(12):
            kind = rnd.randrange(5)
            if kind == 0 and eps:
                ep = rnd.choice(eps)
                inc.upsert_endpoint(replace(ep, labels=ep.labels.with_labels(
                    pod=rnd.choice("abc"))))
            elif kind == 1 and eps:
                inc.delete_endpoint(rnd.choice(eps).key)
            elif kind == 2 and eps:
                inc.upsert_endpoint(rnd.choice(eps))
            elif kind == 3 and pols:
                p = rnd.choice(pols)
                if rnd.random() < 0.5:
                    inc.delete_policy(p.key)
                else:
                    inc.upsert_policy(p)
            elif c.namespaces:
                ns = rnd.choice(c.namespaces)
                inc.upsert_namespace(Namespace(ns.name, ns.labels.with_labels(
                    ns=rnd.choice("xy"))))
            after = inc.ruleset()
            if after is before:  # nothing differs: the compiler hands out the same one
                assert after == compile_cluster(inc.cluster()), case.id
            else:
                assert derived(after, before) is not None
            assert _normal(plan(before, after)) == _normal(full_plan(before, after)), case.id
            new_target = NftDatapath._target(dp, after)  # type: ignore[arg-type]
            assert new_target == canonical(after), case.id
            assert _normal(plan(target, new_target)) == _normal(
                full_plan(target, new_target)), case.id
            before, target = after, new_target


def test_a_derivation_is_kept_on_the_ruleset_and_keeps_its_origin_weakly() -> None:
    """`derive` records on the new ruleset itself, with no table, lock or weakref
    callback: the first version's callback, run by the cyclic collector inside the
    table's lock, deadlocked the reconciler."""
    import gc
    import weakref

    from stockade.compile.ir import Ruleset
    from stockade.compile.plan import Touched, derive

    old, other = Ruleset(), Ruleset()
    new = Ruleset()
    touched = Touched(sets=frozenset({"s"}))
    derive(new, old, touched)
    assert derived(new, old) == touched
    assert derived(new, other) is None and derived(old, new) is None
    assert new == Ruleset() and repr(new) == repr(Ruleset())  # not a field
    gone = weakref.ref(old)
    del old
    gc.collect()
    assert gone() is None  # a chain of derived rulesets does not keep the first alive


def test_the_first_and_last_endpoint_of_a_family_lower_every_chain_again() -> None:
    """An IPv4 cluster has no IPv6 pod sets (lower.absent); the first IPv6 endpoint brings
    them and their rules back, the last one gone takes them away, and every ruleset on
    the way equals the full compile, with a plan to it as the full comparison's."""
    from stockade.model.cluster import Endpoint
    from stockade.model.labels import Labels

    seen = 0
    for case in _cases():
        c = case.cluster
        if not c.endpoints or any(":" in ip for ep in c.endpoints for ip in ep.ips):
            continue
        inc = IncrementalCompiler.of(c)
        before = inc.ruleset()
        assert not any(s.family == 6 and s.kind != "net" for s in before.sets.values())
        first = c.endpoints[0]
        six = Endpoint(first.namespace, "six", first.labels, ("fd00::99",), first.ports)
        inc.upsert_endpoint(six)
        with_six = inc.ruleset()
        assert with_six == compile_cluster(inc.cluster()), case.id
        assert _normal(plan(before, with_six)) == _normal(full_plan(before, with_six))
        if any(s.family == 6 and s.kind != "net" for s in with_six.sets.values()):
            seen += 1
        # an ordinary change after the flip is incremental again
        inc.upsert_endpoint(replace(six, labels=Labels({**six.labels, "more": "1"})))
        again = inc.ruleset()
        assert again == compile_cluster(inc.cluster()), case.id
        inc.delete_endpoint(six.key)
        back = inc.ruleset()
        assert back == before, case.id
        assert _normal(plan(again, back)) == _normal(full_plan(again, back))
    assert seen > 10
