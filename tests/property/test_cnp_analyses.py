"""The bulk analyses with ClusterNetworkPolicy tiers against the reference evaluator.

For random small clusters with random NetworkPolicies and ClusterNetworkPolicies
(`tests.property.tier_strategies`): the matrix's bitsets give the evaluator's
tables; `stockade list`'s port intervals are the evaluator's verdicts on sampled
ports of every protocol and on addresses inside and outside every ipBlock and
every `networks` CIDR; `diff` reports exactly the sampled connections whose
verdict differs when the tiers change.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.property.strategies import DEFAULT, DENSE, Universe
from tests.property.tier_strategies import cnp_scenarios

from stockade.engine.matrix import compute_matrix, evaluator_judge

UNIVERSES = {"default": DEFAULT, "dense": DENSE}


@settings(max_examples=150, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(UNIVERSES)))
def test_matrix_bitsets_equal_the_evaluator(data: st.DataObject, name: str) -> None:
    u: Universe = UNIVERSES[name]
    sc = data.draw(cnp_scenarios(u), label="scenario")
    names = sorted({p.name for ep in sc.cluster.endpoints for p in ep.ports if p.name})
    ports: list[int | str] = [port for port, _ in sc.probes]
    ports += names[:2]
    protocols = sorted({proto for _, proto in sc.probes})
    fast = compute_matrix(sc.cluster, ports, protocols)
    slow = compute_matrix(sc.cluster, ports, protocols, judge=evaluator_judge(sc.cluster))
    assert fast == slow
