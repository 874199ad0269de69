"""Strict decoding (kubectl's strict field validation) and API defaulting D1-D3."""

from __future__ import annotations

from typing import Any

import pytest

from stockade.errors import DecodeError
from stockade.model.decode import decode_network_policy, decode_selector
from stockade.model.parse import parse_documents
from stockade.model.policy import EGRESS, INGRESS, TCP, UDP, Peer, PolicyPort
from stockade.model.selector import ALL


def doc(spec: Any = None, **top: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "api", "namespace": "shop"},
    }
    if spec is not None:
        out["spec"] = spec
    out.update(top)
    return out


def meta(**fields: Any) -> dict[str, Any]:
    return doc(metadata={"name": "api", "namespace": "shop", **fields})


def ports(*entries: Any) -> dict[str, Any]:
    return doc({"ingress": [{"ports": list(entries)}]})


def peers(*entries: Any) -> dict[str, Any]:
    return doc({"ingress": [{"from": list(entries)}]})


def decode_path(document: Any) -> str:
    with pytest.raises(DecodeError) as info:
        decode_network_policy(document)
    return info.value.path


# --- apiVersion, kind, the document itself ----------------------------------------


@pytest.mark.parametrize(("document", "path"), [
    (doc(apiVersion="extensions/v1beta1"), "apiVersion"),
    (doc(apiVersion="networking.k8s.io/v1beta1"), "apiVersion"),
    (doc(apiVersion=None), "apiVersion"),
    (doc(apiVersion=["networking.k8s.io/v1"]), "apiVersion"),
    (doc(kind="Networkpolicy"), "kind"),
    (doc(kind=None), "kind"),
    ([doc()], ""),
    ("apiVersion: networking.k8s.io/v1", ""),
    (42, ""),
])
def test_type_meta_and_document(document: Any, path: str) -> None:
    assert decode_path(document) == path


def test_missing_kind_is_reported_after_a_wrong_api_version() -> None:
    assert decode_path(doc(apiVersion="v1", kind=None)) == "apiVersion"


# --- unknown fields ----------------------------------------------------------------


@pytest.mark.parametrize(("document", "path"), [
    (doc(status={}), "status"),
    (meta(labelz={}), "metadata.labelz"),
    (meta(clusterName="x"), "metadata.clusterName"),
    (doc({"ingres": []}), "spec.ingres"),
    (doc({"podSelector": {"matchLabel": {}}}), "spec.podSelector.matchLabel"),
    (doc({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Exists",
                                                "value": []}]}}),
     "spec.podSelector.matchExpressions[0].value"),
    (doc({"ingress": [{"form": []}]}), "spec.ingress[0].form"),
    (doc({"egress": [{"from": []}]}), "spec.egress[0].from"),
    (doc({"ingress": [{"to": []}]}), "spec.ingress[0].to"),
    (peers({"ipBlock": {"cidr": "10.0.0.0/8", "excepts": []}}),
     "spec.ingress[0].from[0].ipBlock.excepts"),
    (peers({"podSelectors": {}}), "spec.ingress[0].from[0].podSelectors"),
    (ports({"port": 80, "end_port": 81}), "spec.ingress[0].ports[0].end_port"),
    (meta(ownerReferences=[{"kind": "X", "owner": True}]), "metadata.ownerReferences[0].owner"),
])
def test_unknown_field(document: Any, path: str) -> None:
    assert decode_path(document) == path


def test_several_unknown_fields_first_named_all_listed() -> None:
    with pytest.raises(DecodeError) as info:
        decode_network_policy(doc({"ingres": [], "egres": []}))
    assert info.value.path == "spec.ingres"
    assert "spec.egres" in info.value.message


def test_a_wrong_type_wins_over_an_earlier_unknown_field() -> None:
    # The API server's JSON decode fails first; unknown fields only come after it.
    assert decode_path(doc({"ingres": [], "podSelector": "app=api"})) == "spec.podSelector"


# --- wrong JSON types ---------------------------------------------------------------


@pytest.mark.parametrize(("document", "path"), [
    (doc("all"), "spec"),
    (doc([]), "spec"),
    (doc(metadata="api"), "metadata"),
    (doc(metadata=[]), "metadata"),
    (meta(name=7), "metadata.name"),
    (meta(namespace=True), "metadata.namespace"),
    (meta(generateName=["a"]), "metadata.generateName"),
    (meta(labels=["app=api"]), "metadata.labels"),
    (meta(labels={"enabled": True}), "metadata.labels"),
    (meta(labels={"replicas": 3}), "metadata.labels"),
    (meta(annotations={"note": {"a": "b"}}), "metadata.annotations"),
    (meta(generation="1"), "metadata.generation"),
    (meta(generation=2**63), "metadata.generation"),
    (meta(creationTimestamp="yesterday"), "metadata.creationTimestamp"),
    (meta(creationTimestamp=""), "metadata.creationTimestamp"),
    (meta(uid=1), "metadata.uid"),
    (meta(finalizers="a"), "metadata.finalizers"),
    (meta(finalizers=[1]), "metadata.finalizers[0]"),
    (meta(ownerReferences={}), "metadata.ownerReferences"),
    (meta(ownerReferences=[{"controller": "yes"}]), "metadata.ownerReferences[0].controller"),
    (meta(managedFields=[{"time": "now"}]), "metadata.managedFields[0].time"),
    (doc({"podSelector": "app=api"}), "spec.podSelector"),
    (doc({"podSelector": {"matchLabels": {"app": False}}}), "spec.podSelector.matchLabels"),
    (doc({"podSelector": {"matchExpressions": {"key": "a"}}}),
     "spec.podSelector.matchExpressions"),
    (doc({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In",
                                                "values": "x"}]}}),
     "spec.podSelector.matchExpressions[0].values"),
    (doc({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In",
                                                "values": ["x", 1]}]}}),
     "spec.podSelector.matchExpressions[0].values[1]"),
    (doc({"podSelector": {"matchExpressions": [{"key": 1, "operator": "Exists"}]}}),
     "spec.podSelector.matchExpressions[0].key"),
    (doc({"ingress": {"from": []}}), "spec.ingress"),
    (doc({"ingress": ["all"]}), "spec.ingress[0]"),
    (doc({"ingress": [{"from": {}}]}), "spec.ingress[0].from"),
    (doc({"ingress": [{"ports": ""}]}), "spec.ingress[0].ports"),
    (ports(""), "spec.ingress[0].ports[0]"),
    (ports(80), "spec.ingress[0].ports[0]"),
    (ports({"port": [80, 443]}), "spec.ingress[0].ports[0].port"),
    (ports({"port": True}), "spec.ingress[0].ports[0].port"),
    (ports({"port": 80.5}), "spec.ingress[0].ports[0].port"),
    (ports({"port": {"number": 80}}), "spec.ingress[0].ports[0].port"),
    (ports({"port": 80, "endPort": "90"}), "spec.ingress[0].ports[0].endPort"),
    (ports({"protocol": 6}), "spec.ingress[0].ports[0].protocol"),
    (peers({"ipBlock": "10.0.0.0/8"}), "spec.ingress[0].from[0].ipBlock"),
    (peers({"ipBlock": {"cidr": 10}}), "spec.ingress[0].from[0].ipBlock.cidr"),
    (peers({"ipBlock": {"cidr": "10.0.0.0/8", "except": "10.1.0.0/16"}}),
     "spec.ingress[0].from[0].ipBlock.except"),
    (doc({"policyTypes": "Ingress"}), "spec.policyTypes"),
    (doc({"policyTypes": [True]}), "spec.policyTypes[0]"),
])
def test_wrong_type(document: Any, path: str) -> None:
    assert decode_path(document) == path


@pytest.mark.parametrize(("value", "fits"), [
    (2**31 - 1, True), (2**31, False), (-(2**31), True), (-(2**31) - 1, False),
])
def test_int32_bounds(value: int, fits: bool) -> None:
    # Out-of-range numbers fail decoding; in-range ones reach validation (which may reject).
    for document, path in ((ports({"port": value}), "spec.ingress[0].ports[0].port"),
                           (ports({"port": 80, "endPort": value}),
                            "spec.ingress[0].ports[0].endPort")):
        if fits:
            decode_network_policy(document)
        else:
            assert decode_path(document) == path


def test_integral_float_is_a_number() -> None:
    # YAML `80.0` reaches the API server as JSON 80.
    policy = decode_network_policy(ports({"port": 80.0, "endPort": 90.0}))
    assert policy.ingress[0].ports[0] == PolicyPort(TCP, 80, 90)


def test_yaml_reading_string_number_and_boolean() -> None:
    text = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api, namespace: shop, labels: {release: "true"}}
spec:
  ingress:
  - ports:
    - port: '8080'
    - port: 8080
"""
    (document,) = parse_documents(text)
    policy = decode_network_policy(document)
    assert [p.port for p in policy.ingress[0].ports] == ["8080", 8080]
    assert policy.labels == {"release": "true"}
    (unquoted,) = parse_documents(text.replace('"true"', "true"))
    assert decode_path(unquoted) == "metadata.labels"


def test_metadata_fields_of_the_right_type_are_accepted() -> None:
    decode_network_policy(meta(
        uid="d9f1", resourceVersion="12", generation=3, selfLink="",
        creationTimestamp=None, deletionTimestamp="2024-05-01T10:00:00.5+02:00",
        deletionGracePeriodSeconds=30, finalizers=["example.com/x"],
        ownerReferences=[{"apiVersion": "v1", "kind": "ConfigMap", "name": "c", "uid": "u",
                          "controller": True, "blockOwnerDeletion": False}],
        managedFields=[{"manager": "kubectl", "operation": "Apply", "apiVersion": "v1",
                        "time": "2024-05-01T10:00:00Z", "fieldsType": "FieldsV1",
                        "fieldsV1": {"f:spec": {}}}],
    ))


def test_non_string_map_keys_are_spelled_as_json() -> None:
    policy = decode_network_policy(meta(labels={2: "a", True: "b"}))
    assert policy.labels == {"2": "a", "true": "b"}


# --- null is the zero value ------------------------------------------------------


def test_nulls_decode_as_zero_values() -> None:
    policy = decode_network_policy(doc(
        {"podSelector": None, "policyTypes": None,
         "ingress": [None, {"from": [None], "ports": [None, {"protocol": None}]}],
         "egress": None},
        metadata={"name": "api", "namespace": None, "labels": None,
                  "annotations": {"a": None}},
    ))
    assert policy.pod_selector == ALL
    assert policy.namespace == "default"
    assert policy.annotations == {"a": ""}
    assert policy.ingress[0].ports == () and policy.ingress[0].peers == ()
    assert policy.ingress[1].peers == (Peer(),)
    assert policy.ingress[1].ports == (PolicyPort(TCP), PolicyPort(TCP))
    assert policy.policy_types == (INGRESS,)


def test_null_values_in_a_list_of_strings_are_empty_strings() -> None:
    policy = decode_network_policy(doc({"podSelector": {"matchExpressions": [
        {"key": "a", "operator": "In", "values": [None]}]}}))
    assert policy.pod_selector.match_expressions[0].values == ("",)


# --- defaulting ----------------------------------------------------------------------


@pytest.mark.parametrize(("entry", "protocol"), [
    ({"port": 80}, TCP),
    ({"port": 80, "protocol": None}, TCP),
    ({"port": 53, "protocol": "UDP"}, UDP),
    ({"port": 80, "protocol": ""}, ""),
    ({"port": 80, "protocol": "tcp"}, "tcp"),
])
def test_d1_protocol(entry: dict[str, Any], protocol: str) -> None:
    assert decode_network_policy(ports(entry)).ingress[0].ports[0].protocol == protocol


@pytest.mark.parametrize(("spec", "types"), [
    ({}, (INGRESS,)),
    ({"policyTypes": []}, (INGRESS,)),
    ({"egress": []}, (INGRESS,)),
    ({"egress": [{}]}, (INGRESS, EGRESS)),
    ({"policyTypes": [], "egress": [{"to": []}]}, (INGRESS, EGRESS)),
    ({"ingress": [{}], "egress": [{}]}, (INGRESS, EGRESS)),
    ({"policyTypes": ["Egress"]}, (EGRESS,)),
    ({"policyTypes": ["Egress"], "ingress": [{}]}, (EGRESS,)),
    ({"policyTypes": ["Ingress", "Ingress"]}, (INGRESS, INGRESS)),
    ({"policyTypes": ["bogus"]}, ("bogus",)),
])
def test_d2_policy_types(spec: dict[str, Any], types: tuple[str, ...]) -> None:
    assert decode_network_policy(doc(spec)).policy_types == types


def test_d3_missing_spec_and_pod_selector() -> None:
    no_spec = decode_network_policy(doc())
    assert no_spec.pod_selector == ALL
    assert no_spec.policy_types == (INGRESS,)
    assert no_spec.ingress == () and no_spec.egress == ()
    assert decode_network_policy(doc({"ingress": [{}]})).pod_selector == ALL


def test_default_namespace_only_when_none_is_given() -> None:
    document = doc(metadata={"name": "api"})
    assert decode_network_policy(document).namespace == "default"
    assert decode_network_policy(document, default_namespace="dev").namespace == "dev"
    assert decode_network_policy(meta(), default_namespace="dev").namespace == "shop"


def test_decode_selector_is_strict_too() -> None:
    assert decode_selector(None, "x") is None
    assert decode_selector({}, "x") == ALL
    with pytest.raises(DecodeError) as info:
        decode_selector({"matchLabel": {}}, "x")
    assert info.value.path == "x.matchLabel"
