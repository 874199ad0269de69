"""Workload documents of any shape: the analyses' decoding (`workloads=True`) gives
objects or decoding errors naming the object, never another exception; and the
matrix of address-less endpoints agrees with the evaluator."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.property.strategies import DEFAULT, DENSE, Universe, clusters

from stockade.engine.matrix import compute_matrix, evaluator_judge
from stockade.model.decode import WORKLOAD_TEMPLATES
from stockade.model.parse import decode_objects

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.text(max_size=5),
                    st.floats(allow_nan=False))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=8)


@st.composite
def workload_docs(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from([*WORKLOAD_TEMPLATES, "Pod"]))
    container = draw(st.one_of(VALUES, st.fixed_dictionaries({
        "name": st.just("c"),
        "ports": st.one_of(VALUES, st.lists(st.fixed_dictionaries({
            "containerPort": st.one_of(st.integers(0, 70000), VALUES),
            "name": st.one_of(st.text(max_size=6), VALUES),
            "protocol": st.one_of(st.sampled_from(["TCP", "UDP", "SCTP"]), VALUES),
        }), max_size=3)),
    })))
    template = draw(st.one_of(VALUES, st.fixed_dictionaries({
        "metadata": st.one_of(VALUES, st.fixed_dictionaries({
            "labels": st.one_of(VALUES, st.dictionaries(st.text(max_size=4),
                                                       st.text(max_size=4), max_size=2))})),
        "spec": st.one_of(VALUES, st.fixed_dictionaries({
            "containers": st.one_of(VALUES, st.lists(st.just(container), max_size=2))})),
    })))
    spec: Any = {"template": template}
    if kind == "CronJob":
        spec = {"jobTemplate": draw(st.one_of(VALUES, st.just({"spec": spec})))}
    if kind == "Pod":
        spec = template.get("spec") if isinstance(template, dict) else template
    meta = draw(st.one_of(VALUES, st.fixed_dictionaries({
        "name": st.one_of(st.sampled_from(["w", ""]), VALUES),
        "namespace": st.one_of(st.sampled_from(["x", ""]), VALUES),
        "ownerReferences": st.one_of(VALUES, st.lists(st.fixed_dictionaries({
            "kind": st.one_of(st.sampled_from(["ReplicaSet", "Node"]), VALUES),
            "name": st.one_of(st.just("rs"), VALUES),
            "controller": st.one_of(st.booleans(), VALUES)}), max_size=2)),
    })))
    return {"apiVersion": "v1" if kind == "Pod" else "apps/v1", "kind": kind,
            "metadata": meta, "spec": spec,
            "status": draw(st.one_of(VALUES, st.just({"phase": "Pending"})))}


@settings(max_examples=400, deadline=None)
@given(docs=st.lists(workload_docs(), min_size=1, max_size=3))
def test_any_workload_document_decodes_or_is_a_named_error(docs: list[dict[str, Any]]) -> None:
    objects, errors = decode_objects(docs, "fuzz.yaml", workloads=True)
    assert len(objects.workloads) + len(objects.endpoints) + len(errors) == len(docs)
    for err in errors:
        assert err.source == "fuzz.yaml"
        assert err.obj
    for ep in objects.workloads:
        assert ep.ips == ()
        assert ep.name.endswith("]")


@pytest.mark.parametrize("u", [DEFAULT, DENSE], ids=["default", "dense"])
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_matrix_on_bitsets_equals_the_evaluator_without_addresses(
        u: Universe, data: st.DataObject) -> None:
    """Workloads and Pending Pods have no address: some of the cluster's endpoints lose
    theirs, and the matrix's bitsets (engine.reach) still agree with the evaluator (an
    ipBlock matches none of them)."""
    cluster = data.draw(clusters(u, with_policies=True), label="cluster")
    keep = data.draw(st.lists(st.booleans(), min_size=len(cluster.endpoints),
                              max_size=len(cluster.endpoints)), label="keep addresses")
    eps = tuple(ep if k else replace(ep, ips=()) for ep, k in zip(cluster.endpoints, keep,
                                                                   strict=True))
    cluster = replace(cluster, endpoints=eps)
    fast = compute_matrix(cluster, [80, 443, 53, "http"], ["TCP", "UDP"])
    slow = compute_matrix(cluster, [80, 443, 53, "http"], ["TCP", "UDP"],
                          judge=evaluator_judge(cluster))
    assert fast == slow
