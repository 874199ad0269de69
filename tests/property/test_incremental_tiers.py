"""The incremental compiler with ClusterNetworkPolicy tiers equals the full compiler on
random clusters, built in a random order and then changed at random: endpoints added,
removed and relabelled, namespaces relabelled, tier policies added, replaced by others
(another tier, priority, subject, rules) and removed."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.property.strategies import DENSE, label_maps, namespace_vocab, pod_vocab
from tests.property.tier_strategies import cluster_network_policies, cnp_clusters

from stockade.compile.incremental import IncrementalCompiler
from stockade.compile.lower import compile_cluster
from stockade.compile.plan import full_plan, plan
from stockade.model.cluster import Endpoint, Namespace
from stockade.model.cnp import ClusterNetworkPolicy
from stockade.model.policy import NetworkPolicy


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_random_clusters_and_changes(data: st.DataObject) -> None:
    c = data.draw(cnp_clusters(DENSE, min_cnps=1, max_cnps=4))
    steps: list[object] = [*c.namespaces, *c.endpoints, *c.policies, *c.cluster_policies]
    order = data.draw(st.permutations(range(len(steps))))
    inc = IncrementalCompiler()
    for i in order:
        step = steps[i]
        if isinstance(step, Namespace):
            inc.upsert_namespace(step)
        elif isinstance(step, ClusterNetworkPolicy):
            inc.upsert_cluster_policy(step)
        elif isinstance(step, NetworkPolicy):
            inc.upsert_policy(step)
        else:
            assert isinstance(step, Endpoint)
            inc.upsert_endpoint(step)
    before = inc.ruleset()
    assert before == compile_cluster(c)
    assert IncrementalCompiler.of(c).ruleset() == before
    names = [p.name for p in c.cluster_policies] + ["cnp-new"]
    for _ in range(data.draw(st.integers(1, 8))):
        kind = data.draw(st.sampled_from(("endpoint", "gone", "namespace", "cnp", "no-cnp")))
        if kind == "endpoint" and c.endpoints:
            ep = data.draw(st.sampled_from(c.endpoints))
            inc.upsert_endpoint(replace(ep, labels=data.draw(label_maps(pod_vocab(DENSE)))))
        elif kind == "gone" and c.endpoints:
            inc.delete_endpoint(data.draw(st.sampled_from(c.endpoints)).key)
        elif kind == "namespace" and c.namespaces:
            ns = data.draw(st.sampled_from(c.namespaces))
            inc.upsert_namespace(Namespace(ns.name, data.draw(
                label_maps(namespace_vocab(DENSE)))))
        elif kind == "cnp":
            name = data.draw(st.sampled_from(names))
            inc.upsert_cluster_policy(data.draw(cluster_network_policies(DENSE, name)))
        else:
            inc.delete_cluster_policy(data.draw(st.sampled_from(names)))
        after = inc.ruleset()
        assert after == compile_cluster(inc.cluster()), kind
        assert plan(before, after).narrows == full_plan(before, after).narrows
        before = after
