"""A tier's keep (`ChainRule.keep`) is the eBPF datapath's alone.

nftables and iptables leave cutting to the agent's revoker, which reads the
annotation through the evaluator: a ruleset whose ClusterNetworkPolicies are
annotated `stockade.io/existing-connections: keep` renders exactly as without, so
their read-backs (which match the kernel's text against the expected chains) see
no drift when only the annotation changed. eBPF stores it.
"""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from tests.property.strategies import DENSE, Scenario
from tests.property.tier_strategies import cnp_scenarios

from stockade.compile import bpf, iptables, nft
from stockade.compile.lower import compile_cluster
from stockade.model.labels import Labels
from stockade.model.policy import KEEP_ANNOTATION

DIFFERED: list[bool] = []


@settings(max_examples=60, deadline=None)
@given(sc=cnp_scenarios(DENSE, max_cnps=3))
def test_nftables_and_iptables_render_a_kept_tier_as_before(sc: Scenario) -> None:
    note = Labels({KEEP_ANNOTATION: "keep"})
    marked = dataclasses.replace(sc.cluster, cluster_policies=tuple(
        dataclasses.replace(p, annotations=note) for p in sc.cluster.cluster_policies))
    plain, kept = compile_cluster(sc.cluster), compile_cluster(marked)
    assert plain.chains.keys() == kept.chains.keys()
    assert nft.render_full(nft.Table(), plain) == nft.render_full(nft.Table(), kept)
    layout = iptables.Layout.of()
    for name in plain.chains:
        for family in (4, 6):
            assert (iptables.chain_bodies(layout, plain.chains[name], family)
                    == iptables.chain_bodies(layout, kept.chains[name], family))
    differs = plain != kept
    if differs:  # eBPF stores the rules' keep (its entries differ where a kept Deny decides)
        assert bpf.encode_meta(bpf.compile_state(plain)) != bpf.encode_meta(
            bpf.compile_state(kept))
    DIFFERED.append(differs)


def test_the_examples_had_kept_denies() -> None:
    if not DIFFERED:
        raise AssertionError("runs after the property test, in the same session")
    assert any(DIFFERED)
