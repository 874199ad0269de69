"""Properties of decoding and validation on random *valid* policies and clusters.

A valid policy, written out the way a user would (defaults omitted or spelled
out, empty lists omitted or written `[]`), decodes back to exactly the same model
object, from a dict and from YAML/JSON text; the validator finds nothing wrong
with it, with or without StrictIPCIDRValidation.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from tests.property.strategies import (
    DEFAULT,
    DENSE,
    Universe,
    cluster_manifests,
    clusters,
    namespace_manifest,
    network_policies,
    pod_manifest,
    policy_manifests,
)

from stockade.model.decode import decode_namespace, decode_network_policy, decode_pod
from stockade.model.parse import parse_objects
from stockade.model.validate import validate_policy

UNIVERSES = pytest.mark.parametrize("u", [DEFAULT, DENSE], ids=["default", "dense"])


@UNIVERSES
@given(data=st.data())
def test_policy_manifest_decodes_to_the_same_policy(u: Universe, data: st.DataObject) -> None:
    policy = data.draw(network_policies(u), label="policy")
    manifest = data.draw(policy_manifests(policy), label="manifest")
    assert decode_network_policy(manifest) == policy


@UNIVERSES
@given(data=st.data())
def test_generated_policies_are_valid(u: Universe, data: st.DataObject) -> None:
    """The strategies promise valid objects: if this fails, either the validator
    rejects a valid policy or the strategies generate an invalid one."""
    policy = data.draw(network_policies(u), label="policy")
    for strict in (False, True):
        errors = validate_policy(policy, strict_cidr=strict)
        assert errors == [], [e.render() for e in errors]


@given(clusters(DEFAULT))
def test_pod_and_namespace_manifests_decode_to_the_same_objects(cluster: Any) -> None:
    for ns in cluster.namespaces:
        assert decode_namespace(namespace_manifest(ns)) == ns
    for ep in cluster.endpoints:
        assert decode_pod(pod_manifest(ep)) == ep


def _as_text(docs: list[dict[str, Any]], how: str) -> str:
    if how == "yaml":
        return yaml.safe_dump_all(docs, sort_keys=False)
    if how == "json":
        return "\n---\n".join(json.dumps(d) for d in docs)
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}, indent=1)


@given(data=st.data())
def test_cluster_round_trips_through_text(data: st.DataObject) -> None:
    """YAML multi-document, JSON documents, or one `kind: List`: parse_objects
    gives back every namespace, pod and policy."""
    cluster = data.draw(clusters(DEFAULT, with_policies=True), label="cluster")
    docs = data.draw(cluster_manifests(cluster), label="documents")
    docs = data.draw(st.permutations(docs), label="order")
    how = data.draw(st.sampled_from(("yaml", "json", "list")), label="format")
    objects = parse_objects(_as_text(docs, how), "roundtrip.yaml")
    assert sorted(objects.policies, key=lambda p: p.key) == \
        sorted(cluster.policies, key=lambda p: p.key)
    assert sorted(objects.endpoints, key=lambda e: e.key) == \
        sorted(cluster.endpoints, key=lambda e: e.key)
    assert sorted(objects.namespaces, key=lambda n: n.name) == \
        sorted(cluster.namespaces, key=lambda n: n.name)
    assert objects.skipped == 0
