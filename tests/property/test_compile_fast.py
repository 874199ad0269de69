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
from tests.property.strategies import (
    DEFAULT,
    DENSE,
    Universe,
    clusters,
    network_policies,
    pod_vocab,
    scenarios,
    selectors,
)

from stockade.compile import interpret
from stockade.compile.ir import ADDR, ADDR_PORT, Ruleset, content_name
from stockade.compile.lower import Lowering
from stockade.compile.membership import address, named_specs, peer_members, selector_specs
from stockade.compile.nft import Table, canonical, render_full, render_plan
from stockade.compile.plan import plan
from stockade.engine.evaluate import Evaluator
from stockade.engine.index import ClusterIndex
from stockade.engine.resolve import resolve
from stockade.model.cidr import parse_ip
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


@UNIVERSES
@given(data=st.data())
def test_label_index_select_equals_the_reference(u: Universe, data: st.DataObject) -> None:
    cluster = data.draw(clusters(u), label="cluster")
    index = ClusterIndex(cluster)
    pods = index._pods  # the pod label index
    everyone = set(pods.all)
    some = set(sorted(everyone)[::2])
    for _ in range(5):
        sel = data.draw(selectors(pod_vocab(u)), label="selector")
        for within in (everyone, some, frozenset(some)):
            assert pods.select(sel, within) == pods.select_reference(sel, within)


@UNIVERSES
@given(data=st.data())
def test_set_names_are_content_names(u: Universe, data: st.DataObject) -> None:
    """Names are what the kernel holds: the faster spelling must not change them."""
    policy = data.draw(network_policies(u), label="policy")
    for rule in policy.ingress + policy.egress:
        for peer in rule.peers:
            if peer.ip_block is not None:
                continue
            cand = peer_members(policy.namespace, peer)
            for fam, spec in selector_specs(policy.namespace, peer).items():
                assert spec.name == content_name(f"s{fam}-", ADDR, fam, (cand.namespace, peer))
            for fam, spec in named_specs(cand, "http", "TCP", "x").items():
                key = ("peer", cand.namespace, peer)
                assert spec.name == content_name(f"n{fam}-", ADDR_PORT, fam,
                                                 (key, "http", "TCP"))


@given(st.ip_addresses().map(str)
       | st.lists(st.sampled_from(["0", "00", "01", "1", "9", "10", "255", "256", "999", "",
                                   "\u0661", "+1", " 1"]), min_size=3, max_size=5).map(".".join))
def test_address_is_parse_ip(text: str) -> None:
    a = parse_ip(text)
    assert address(text) == ((a.version, str(a)) if a is not None else None)
