"""The incremental compiler equals the full compiler on random NetworkPolicy clusters
changed at random, whether a ruleset is taken after every change or after several.

Sets are rebuilt from what joins and leaves added and removed since the last
ruleset (an endpoint that leaves and joins again rebuilds nothing), so the
rulesets between changes are part of what is tested: skipping some of them lets
additions and removals of one element accumulate and cancel.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.property.strategies import DENSE, clusters, label_maps, namespace_vocab, pod_vocab

from stockade.compile.incremental import IncrementalCompiler
from stockade.compile.lower import compile_cluster
from stockade.model.cluster import Namespace


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_random_changes_with_rulesets_taken_now_and_then(data: st.DataObject) -> None:
    c = data.draw(clusters(DENSE, with_policies=True, min_policies=1))
    inc = IncrementalCompiler.of(c)
    assert inc.ruleset() == compile_cluster(c)
    eps = list(c.endpoints)
    policies = list(c.policies)
    for _ in range(data.draw(st.integers(1, 12))):
        kind = data.draw(st.sampled_from(("relabel", "same", "gone", "back", "namespace",
                                          "no-policy", "policy")))
        if kind in ("relabel", "same", "gone", "back") and not eps:
            continue
        if kind == "relabel":
            ep = data.draw(st.sampled_from(eps))
            inc.upsert_endpoint(replace(ep, labels=data.draw(label_maps(pod_vocab(DENSE)))))
        elif kind == "same":  # leaves and joins again: labels changed and changed back
            ep = data.draw(st.sampled_from(eps))
            inc.upsert_endpoint(replace(ep, labels=ep.labels.with_labels(zz="tmp")))
            inc.upsert_endpoint(ep)
        elif kind == "gone":
            inc.delete_endpoint(data.draw(st.sampled_from(eps)).key)
        elif kind == "back":
            inc.upsert_endpoint(data.draw(st.sampled_from(eps)))
        elif kind == "namespace" and c.namespaces:
            ns = data.draw(st.sampled_from(c.namespaces))
            inc.upsert_namespace(Namespace(ns.name, data.draw(
                label_maps(namespace_vocab(DENSE)))))
        elif kind == "no-policy" and policies:
            inc.delete_policy(data.draw(st.sampled_from(policies)).key)
        elif kind == "policy" and policies:
            inc.upsert_policy(data.draw(st.sampled_from(policies)))
        if data.draw(st.booleans()):
            assert inc.ruleset() == compile_cluster(inc.cluster())
    assert inc.ruleset() == compile_cluster(inc.cluster())
