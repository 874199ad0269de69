"""The incremental compiler equals the full compiler after every change."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from tests.support import shared

from stockade.cli.conformance import load_cases
from stockade.compile.incremental import IncrementalCompiler
from stockade.compile.lower import compile_cluster
from stockade.compile.plan import plan
from stockade.conformance.case import Case
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
    case = next(c for c in _cases() if len(compile_cluster(c.cluster).sets) >= 4)
    inc = IncrementalCompiler.of(case.cluster)
    before = inc.ruleset()
    ep = case.cluster.endpoints[0]
    inc.upsert_endpoint(replace(ep, labels=ep.labels.with_labels(extra="1")))
    after = inc.ruleset()
    kept = [n for n in before.sets if n in after.sets and before.sets[n] is after.sets[n]]
    assert kept, "unchanged sets should be the same objects"
    assert plan(before, after) == plan(compile_cluster(case.cluster), after)
