"""The matrix on bitsets (engine.reach, the default) against the reference evaluator.

`compute_matrix` without a judge computes every table from bitsets; with
`evaluator_judge` it asks the evaluator pair by pair. Both must give the same
tables for any cluster, numeric ports, named ports (resolved per destination)
and protocols alike: the CLI's output depends on it.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.property.strategies import DEFAULT, DENSE, Universe, scenarios

from stockade.engine.matrix import compute_matrix, evaluator_judge


@pytest.mark.parametrize("u", [DEFAULT, DENSE], ids=["default", "dense"])
@settings(max_examples=2 * settings().max_examples)
@given(data=st.data())
def test_bitsets_equal_the_evaluator(u: Universe, data: st.DataObject) -> None:
    sc = data.draw(scenarios(u, min_policies=0), label="scenario")
    if not sc.cluster.endpoints:
        return
    names = sorted({p.name for ep in sc.cluster.endpoints for p in ep.ports if p.name})
    ports: list[int | str] = [port for port, _ in sc.probes]
    ports += names[:2]
    protocols = sorted({proto for _, proto in sc.probes})
    fast = compute_matrix(sc.cluster, ports, protocols)
    slow = compute_matrix(sc.cluster, ports, protocols, judge=evaluator_judge(sc.cluster))
    assert fast == slow
    # Every declared port, as the CLI computes it without --port.
    assert compute_matrix(sc.cluster) == compute_matrix(
        sc.cluster, judge=evaluator_judge(sc.cluster))
