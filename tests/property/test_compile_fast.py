"""The full compiler's fast paths against their definitions, on random clusters.

`Lowering` fills a selector's set from per-identity element lists (each pod's
addresses parsed once); `Lowering(reference=True)` asks `SetSpec.contributes`
endpoint by endpoint, which is what the incremental compiler does. The two must
build the same ruleset, and that ruleset, run by the IR interpreter, must give
the evaluator's verdict on every flow between pods (sets of namespaceSelector
peers are shared by every namespace: this is where a wrong share would show).
`render_full` must be the full load `render_plan` gives for the plan from an
empty ruleset.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.property.strategies import DEFAULT, DENSE, Universe, clusters, scenarios

from stockade.compile import interpret
from stockade.compile.ir import Ruleset
from stockade.compile.lower import Lowering
from stockade.compile.nft import Table, canonical, render_full, render_plan
from stockade.compile.plan import plan
from stockade.engine.evaluate import Evaluator
from stockade.engine.resolve import resolve
from stockade.model.cluster import Cluster

UNIVERSES = pytest.mark.parametrize("u", [DEFAULT, DENSE], ids=["default", "dense"])


@UNIVERSES
@given(data=st.data())
def test_fast_lowering_equals_the_reference(u: Universe, data: st.DataObject) -> None:
    cluster: Cluster = data.draw(clusters(u), label="cluster")
    fast = Lowering(resolve(cluster)).ruleset()
    ref = Lowering(resolve(cluster), reference=True).ruleset()
    assert fast == ref
    assert render_full(Table(), fast) == render_plan(
        Table(), plan(Ruleset(), canonical(fast)), skeleton=True)


@UNIVERSES
@given(data=st.data())
def test_compiled_ruleset_gives_the_evaluators_verdicts(u: Universe, data: st.DataObject
                                                       ) -> None:
    sc = data.draw(scenarios(u), label="scenario")
    rs = Lowering(resolve(sc.cluster)).ruleset()
    ev = Evaluator(sc.cluster)
    for flow in sc.flows(external=False):
        got = interpret.allows(rs, flow.src_ip, flow.dst_ip, flow.protocol, flow.port)
        assert got == ev.allowed(flow), flow
