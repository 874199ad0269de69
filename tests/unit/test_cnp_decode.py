"""ClusterNetworkPolicy decoding and validation: the CRD's schema and CEL rules, worded
as the API server words them, every error at once, nothing half-read."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from stockade.errors import DecodeError, InvalidObjects, ValidationError
from stockade.model.cnp import ACCEPT, ADMIN, NAMESPACES, NETWORKS, PODS, UNKNOWN
from stockade.model.cnp_decode import decode_cluster_network_policy, is_cidr
from stockade.model.parse import parse_objects

GOOD: dict[str, Any] = {
    "apiVersion": "policy.networking.k8s.io/v1alpha2",
    "kind": "ClusterNetworkPolicy",
    "metadata": {"name": "guard"},
    "spec": {
        "tier": "Admin",
        "priority": 10,
        "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
        "ingress": [{"name": "from-b", "action": "Accept",
                     "from": [{"pods": {"namespaceSelector": {}, "podSelector":
                                        {"matchLabels": {"app": "b"}}}}],
                     "protocols": [{"tcp": {"destinationPort": {"number": 80}}},
                                   {"udp": {"destinationPort": {"range": {"start": 5000,
                                                                         "end": 5100}}}},
                                   {"destinationNamedPort": "web"}]}],
        "egress": [{"action": "Deny", "to": [{"networks": ["10.0.0.0/8", "fd00::/8"]}]}],
    },
}


def spec(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    doc["spec"].update(changes)
    return doc


def errors(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as info:
        decode_cluster_network_policy(doc)
    return [e.render() for e in info.value.errors]


def test_a_valid_policy_is_decoded_as_written() -> None:
    p = decode_cluster_network_policy(GOOD)
    assert (p.name, p.tier, p.priority) == ("guard", ADMIN, 10)
    assert p.subject.kind == NAMESPACES
    rule = p.ingress[0]
    assert (rule.name, rule.action) == ("from-b", ACCEPT)
    assert rule.peers[0].kind == PODS
    assert [port.render() for port in rule.ports or ()] == ["TCP/80", "UDP/5000-5100",
                                                            "named port web"]
    assert p.egress[0].peers[0].kind == NETWORKS
    assert p.egress[0].peers[0].networks == ("10.0.0.0/8", "fd00::/8")
    assert p.egress[0].ports is None  # no protocols: every protocol and port


def test_every_schema_error_is_reported_with_its_path() -> None:
    doc = spec(tier="Platform", priority=1001,
               subject={"namespaces": {}, "pods": {"podSelector": {}}},
               ingress=[{"action": "Allow", "from": []}],
               egress=[{"action": "Deny", "to": [{"networks": ["10.0.0.1/33"]}],
                        "protocols": [{"tcp": {"destinationPort": {"range": {"start": 90,
                                                                             "end": 80}}}}]}])
    assert errors(doc) == [
        'spec.tier: Unsupported value: "Platform": supported values: "Admin", "Baseline"',
        "spec.priority: Invalid value: 1001: spec.priority in body should be less than or "
        "equal to 1000",
        "spec.subject: Invalid value: 2: spec.subject in body should have at most 1 properties",
        'spec.ingress[0].action: Unsupported value: "Allow": supported values: "Accept", '
        '"Deny", "Pass"',
        "spec.ingress[0].from: Invalid value: 0: spec.ingress[0].from in body should have at "
        "least 1 items",
        'spec.egress[0].to[0].networks[0]: Invalid value: "string": Invalid CIDR format '
        "provided",
        'spec.egress[0].protocols[0].tcp.destinationPort.range: Invalid value: "object": '
        "Start port must be less than End port",
    ]


def test_required_fields_and_limits() -> None:
    doc = copy.deepcopy(GOOD)
    del doc["spec"]["tier"], doc["spec"]["priority"], doc["spec"]["subject"]
    doc["spec"]["ingress"] = [GOOD["spec"]["ingress"][0]] * 26
    doc["spec"]["egress"] = [{"to": [{"namespaces": {}}]}]
    assert errors(doc) == [
        "spec.tier: Required value",
        "spec.priority: Required value",
        "spec.subject: Required value",
        "spec.ingress: Too many: 26: must have at most 25 items",
        "spec.egress[0].action: Required value",
    ]


def test_the_priority_range_is_inclusive() -> None:
    assert decode_cluster_network_policy(spec(priority=0)).priority == 0
    assert decode_cluster_network_policy(spec(priority=1000)).priority == 1000
    assert errors(spec(priority=-1)) == [
        "spec.priority: Invalid value: -1: spec.priority in body should be greater than or "
        "equal to 0"]


def test_a_named_port_with_a_networks_peer_breaks_the_cel_rule() -> None:
    doc = spec(egress=[{"action": "Accept", "to": [{"networks": ["10.0.0.0/8"]}],
                        "protocols": [{"destinationNamedPort": "web"}]}])
    assert errors(doc) == [
        'spec.egress[0]: Invalid value: "object": networks/nodes/domainNames peer cannot be '
        "set with namedPorts since there are no namedPorts for networks/nodes/domainNames"]


def test_exactly_one_field_in_a_peer_a_protocol_and_a_port() -> None:
    doc = spec(ingress=[{"action": "Deny", "from": [{}],
                         "protocols": [{"tcp": {}}, {"tcp": {"destinationPort": {
                             "number": 1, "range": {"start": 1, "end": 2}}}, "udp": None},
                                       {"tcp": {"destinationPort": {"number": 80}},
                                        "sctp": {"destinationPort": {"number": 80}}}]}])
    assert errors(doc) == [
        "spec.ingress[0].from[0]: Invalid value: 0: spec.ingress[0].from[0] in body should "
        "have at least 1 properties",
        "spec.ingress[0].protocols[0].tcp: Invalid value: 0: spec.ingress[0].protocols[0].tcp "
        "in body should have at least 1 properties",
        "spec.ingress[0].protocols[1].tcp.destinationPort: Invalid value: 2: "
        "spec.ingress[0].protocols[1].tcp.destinationPort in body should have at most 1 "
        "properties",
        "spec.ingress[0].protocols[2]: Invalid value: 2: spec.ingress[0].protocols[2] in body "
        "should have at most 1 properties",
    ]


@pytest.mark.parametrize("port", [0, 65536])
def test_port_numbers_are_1_to_65535(port: int) -> None:
    doc = spec(egress=[{"action": "Deny", "to": [{"namespaces": {}}],
                        "protocols": [{"sctp": {"destinationPort": {"number": port}}}]}])
    bound = "greater than or equal to 1" if port == 0 else "less than or equal to 65535"
    path = "spec.egress[0].protocols[0].sctp.destinationPort.number"
    assert errors(doc) == [f"{path}: Invalid value: {port}: {path} in body should be {bound}"]


def test_an_ingress_peer_cannot_be_networks() -> None:
    doc = spec(ingress=[{"action": "Deny", "from": [{"networks": ["10.0.0.0/8"]}]}])
    with pytest.raises(DecodeError, match=r"spec.ingress\[0\].from\[0\].networks: unknown field"):
        decode_cluster_network_policy(doc)


def test_unknown_fields_and_wrong_types_are_decoding_errors() -> None:
    with pytest.raises(DecodeError, match=r"spec.priorty: unknown field"):
        decode_cluster_network_policy(spec(priorty=3))
    with pytest.raises(DecodeError, match=r"spec.priority: cannot decode string"):
        decode_cluster_network_policy(spec(priority="3"))
    doc = copy.deepcopy(GOOD)
    doc["apiVersion"] = "policy.networking.k8s.io/v1alpha1"
    with pytest.raises(DecodeError, match="does not serve ClusterNetworkPolicy"):
        decode_cluster_network_policy(doc)


def test_experimental_peers_are_read_and_fail_closed() -> None:
    doc = spec(egress=[{"action": "Deny", "to": [{"nodes": {"matchLabels": {"a": "b"}}},
                                                 {"domainNames": ["*.example.com"]}]}])
    p = decode_cluster_network_policy(doc)
    assert [peer.kind for peer in p.egress[0].peers] == [UNKNOWN, UNKNOWN]
    assert p.egress[0].peers[0].written == ("nodes",)


def test_cluster_scoped_a_namespace_is_refused_and_names_are_checked() -> None:
    doc = copy.deepcopy(GOOD)
    doc["metadata"] = {"name": "Guard_1", "namespace": "default"}
    assert errors(doc) == ["metadata.namespace: Forbidden: not allowed on this type"]
    doc["metadata"] = {"name": "Guard_1"}
    assert errors(doc)[0].startswith('metadata.name: Invalid value: "Guard_1": a lowercase '
                                     "RFC 1123 subdomain")


def test_duplicate_networks_and_long_rule_names() -> None:
    doc = spec(egress=[{"name": "x" * 101, "action": "Deny",
                        "to": [{"networks": ["10.0.0.0/8", "10.0.0.0/8"]}]}])
    assert errors(doc) == [
        "spec.egress[0].name: Too long: may not be more than 100 bytes",
        'spec.egress[0].to[0].networks[1]: Duplicate value: "10.0.0.0/8"',
    ]


@pytest.mark.parametrize(("text", "ok"), [
    ("10.0.0.0/8", True), ("10.0.0.1/8", True), ("::/0", True), ("fd00::/8", True),
    ("0.0.0.0/0", True), ("10.0.0.0", False), ("10.0.0.0/33", False), ("10.0.0.0/08", False),
    ("010.0.0.0/8", False), ("fe80::1%eth0/64", False), ("::ffff:1.2.3.4/120", False),
    ("10.0.0.0/-1", False), ("", False), ("x/8", False)])
def test_is_cidr_follows_cel(text: str, ok: bool) -> None:
    assert is_cidr(text) is ok


def test_files_carry_them_and_a_bad_one_fails_the_whole_set() -> None:
    import yaml

    good = yaml.safe_dump(GOOD)
    objects = parse_objects(good, "p.yaml")
    assert [p.name for p in objects.cluster_policies] == ["guard"]
    assert objects.cluster().cluster_policies == tuple(objects.cluster_policies)
    bad = yaml.safe_dump_all([GOOD, spec(priority=5000)])
    with pytest.raises(ValidationError, match=r"spec\.priority"):
        parse_objects(bad, "p.yaml")
    worse = yaml.safe_dump_all([spec(priority=5000), spec(tier="x")])
    with pytest.raises(InvalidObjects) as info:
        parse_objects(worse, "p.yaml")
    assert len(info.value.lines()) == 2
    assert all(line.startswith("p.yaml: ClusterNetworkPolicy guard: spec.")
               for line in info.value.lines())


def test_validate_checks_cluster_network_policies(tmp_path: Any,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from stockade.cli.main import main

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(GOOD))
    assert main(["validate", "-f", str(good)]) == 0
    assert capsys.readouterr().out == "0 NetworkPolicy and 1 ClusterNetworkPolicy object(s) valid\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all([GOOD, spec(priority=1001, tier="x")]))
    assert main(["validate", "-f", str(bad)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert err[0].startswith(f"{bad}:") and "ClusterNetworkPolicy guard: spec.tier: " \
        "Unsupported value" in err[0]
    assert "spec.priority: Invalid value: 1001" in err[1]
