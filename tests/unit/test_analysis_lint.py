"""Lint: every check fires on its construct, stays quiet on the correct one."""

from __future__ import annotations

from typing import Any

from stockade.engine.lint import CHECKS, NOTE, WARNING, Finding, lint
from stockade.model.cluster import NS_NAME_LABEL, Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.decode import decode_network_policy
from stockade.model.labels import Labels
from stockade.model.policy import NetworkPolicy, Source


def policy(ns: str, name: str, spec: dict[str, Any], file: str = "p.yaml") -> NetworkPolicy:
    return decode_network_policy({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                                  "metadata": {"namespace": ns, "name": name}, "spec": spec},
                                 Source(file))


def standard(*policies: NetworkPolicy) -> Cluster:
    nss = tuple(Namespace(n, Labels({"ns": n, NS_NAME_LABEL: n})) for n in "xyz")
    eps = tuple(Endpoint(n, p, Labels({"pod": p}), (f"10.0.{i}.{j + 1}",))
                for i, n in enumerate("xyz") for j, p in enumerate("abc"))
    return Cluster(nss, eps, policies)


def codes(found: tuple[Finding, ...]) -> list[str]:
    return [f.code for f in found]


def only(found: tuple[Finding, ...], code: str) -> list[Finding]:
    return [f for f in found if f.code == code]


SELECT_A = {"matchLabels": {"pod": "a"}}


def test_codes_are_stable_and_classified() -> None:
    assert list(CHECKS) == [f"SK{i:03d}" for i in range(1, 14)]
    assert {c for c, (sev, _) in CHECKS.items() if sev == NOTE} == {"SK005", "SK009", "SK012",
                                                                    "SK013"}


def test_sk001_namespace_only_and_pod_only_peers() -> None:
    split = policy("x", "p", {"podSelector": SELECT_A, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"ns": "y"}}},
        {"podSelector": {"matchLabels": {"pod": "b"}}}]}]})
    (f,) = only(lint(standard(split)), "SK001")
    assert (f.subject, f.where, f.source) == ("NetworkPolicy x/p", "spec.ingress[0].from", "p.yaml")
    assert "from[0] and from[1] are two peers, ORed" in f.message
    assert f.severity == WARNING
    joined = policy("x", "p", {"podSelector": SELECT_A, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"ns": "y"}},
         "podSelector": {"matchLabels": {"pod": "b"}}}]}]})
    assert not only(lint(standard(joined)), "SK001")


def test_sk002_and_peer_matching_nothing_where_or_would() -> None:
    # x has a and b, y has only c: pods b of namespace y do not exist.
    nss = (Namespace("x", Labels({"ns": "x"})), Namespace("y", Labels({"ns": "y"})))
    eps = (Endpoint("x", "a", Labels({"pod": "a"}), ("10.0.0.1",)),
           Endpoint("x", "b", Labels({"pod": "b"}), ("10.0.0.2",)),
           Endpoint("y", "c", Labels({"pod": "c"}), ("10.0.1.1",)))
    pol = policy("x", "p", {"podSelector": SELECT_A, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"ns": "y"}},
         "podSelector": {"matchLabels": {"pod": "b"}}}]}]})
    (f,) = only(lint(Cluster(nss, eps, (pol,))), "SK002")
    assert f.where == "spec.ingress[0].from[0]"
    assert "as two peers (OR) it would match 2 pod(s)" in f.message
    # In the standard cluster y/b exists: the AND matches, nothing to say.
    assert not only(lint(standard(pol)), "SK002")


def test_sk003_egress_without_dns() -> None:
    deny = policy("x", "deny-egress", {"podSelector": {}, "policyTypes": ["Egress"]})
    (f,) = only(lint(standard(deny)), "SK003")
    assert f.subject == "NetworkPolicy x/deny-egress"
    assert f.message.startswith("pods x/a, x/b, x/c are isolated for egress")
    dns = policy("x", "dns", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [
        {"to": [{"namespaceSelector": {}}], "ports": [{"port": 53, "protocol": "UDP"}]}]})
    assert not only(lint(standard(deny, dns)), "SK003")
    # An egress rule without ports lets DNS out too.
    anything = policy("x", "any", {"podSelector": {}, "egress": [{"to": [{"podSelector": {}}]}]})
    assert not only(lint(standard(deny, anything)), "SK003")


def test_sk003_dns_on_a_range_or_for_other_pods_only() -> None:
    deny = policy("x", "deny-egress", {"podSelector": {}, "policyTypes": ["Egress"]})
    rng = policy("x", "rng", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [
        {"ports": [{"port": 50, "endPort": 60, "protocol": "TCP"}]}]})
    assert not only(lint(standard(deny, rng)), "SK003")
    only_a = policy("x", "dns-a", {"podSelector": SELECT_A, "policyTypes": ["Egress"],
                                   "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]})
    (f,) = only(lint(standard(deny, only_a)), "SK003")
    assert f.message.startswith("pods x/b, x/c are isolated")


def test_sk003_without_pods_judges_each_namespace() -> None:
    deny = policy("x", "deny-egress", {"podSelector": {}, "policyTypes": ["Egress"]})
    dns = policy("x", "dns", {"podSelector": {}, "policyTypes": ["Egress"],
                              "egress": [{"ports": [{"port": 53, "protocol": "TCP"}]}]})
    lonely = policy("y", "deny-egress", {"podSelector": {}, "policyTypes": ["Egress"]})
    found = only(lint(Cluster((), (), (deny, dns, lonely))), "SK003")
    assert [f.subject for f in found] == ["NetworkPolicy y/deny-egress"]


def test_sk004_all_namespaces() -> None:
    everyone = policy("x", "p", {"podSelector": SELECT_A, "ingress": [
        {"from": [{"namespaceSelector": {}}]}]})
    (f,) = only(lint(standard(everyone)), "SK004")
    assert f.where == "spec.ingress[0].from[0]"
    assert "every pod of every namespace" in f.message
    narrowed = policy("x", "p", {"podSelector": SELECT_A, "ingress": [
        {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]})
    assert not only(lint(standard(narrowed)), "SK004")


def test_sk005_default_deny_is_a_note() -> None:
    deny = policy("x", "deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                                "egress": []})
    found = only(lint(standard(deny)), "SK005")
    assert [f.where for f in found] == ["spec.egress", "spec.ingress"]
    assert all(f.severity == NOTE for f in found)
    assert not only(lint(standard(policy("x", "p", {"podSelector": SELECT_A}))), "SK005")


def test_sk006_rules_ignored_by_policy_types() -> None:
    pol = policy("x", "p", {"podSelector": {}, "policyTypes": ["Egress"],
                            "ingress": [{}], "egress": [{}]})
    (f,) = only(lint(standard(pol)), "SK006")
    assert f.where == "spec.ingress"
    assert "leaves out Ingress" in f.message
    # Without policyTypes the API infers Egress from the egress rules: nothing ignored.
    inferred = policy("x", "p", {"podSelector": {}, "egress": [{}]})
    assert not only(lint(standard(inferred)), "SK006")


def test_sk007_ip_block_everything() -> None:
    pol = policy("x", "p", {"podSelector": {}, "egress": [{"to": [
        {"ipBlock": {"cidr": "0.0.0.0/0"}},
        {"ipBlock": {"cidr": "::/0"}},
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}},
        {"ipBlock": {"cidr": "10.0.0.0/8"}}]}]})
    found = only(lint(standard(pol)), "SK007")
    assert [f.where for f in found] == ["spec.egress[0].to[0]", "spec.egress[0].to[1]"]
    assert "every IPv6 address" in found[1].message


def test_sk008_duplicates() -> None:
    a = policy("x", "p", {"podSelector": SELECT_A, "ingress": [{"ports": [{"port": 80}]}, {}]},
               file="one.yaml")
    same_name = policy("x", "p", {"podSelector": {}}, file="two.yaml")
    same_spec = policy("x", "q", {"podSelector": SELECT_A,
                                  "ingress": [{}, {"ports": [{"port": 80}]}]})
    other_ns = policy("y", "q", {"podSelector": SELECT_A,
                                 "ingress": [{}, {"ports": [{"port": 80}]}]})
    found = only(lint(standard(a, same_name, same_spec, other_ns)), "SK008")
    assert sorted((f.subject, f.where) for f in found) == [
        ("NetworkPolicy x/p", "metadata.name"), ("NetworkPolicy x/q", "spec")]
    by_where = {f.where: f for f in found}
    assert "also in one.yaml" in by_where["metadata.name"].message
    assert "same spec as NetworkPolicy x/p" in by_where["spec"].message


def test_sk009_named_port_with_different_numbers() -> None:
    def pod(name: str, app: str, port: int) -> Endpoint:
        return Endpoint("x", name, Labels({"app": app}), (f"10.0.0.{port % 7}",),
                        (ContainerPort(port, name="metrics"),))

    eps = (pod("a", "m", 9090), pod("b", "m", 9100), pod("c", "o", 9090))
    pol = policy("x", "p", {"podSelector": {"matchLabels": {"app": "m"}},
                            "ingress": [{"ports": [{"port": "metrics"}]}]})
    (f,) = only(lint(Cluster((), eps, (pol,))), "SK009")
    assert f.message == "TCP port 'metrics' is 9090 on x/a; 9100 on x/b"
    assert f.severity == NOTE
    same = policy("x", "p", {"podSelector": {"matchLabels": {"app": "o"}},
                             "ingress": [{"ports": [{"port": "metrics"}]}]})
    assert not only(lint(Cluster((), eps, (same,))), "SK009")


def test_clean_policies_have_no_findings() -> None:
    pol = policy("x", "p", {"podSelector": SELECT_A, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"ns": "y"}},
         "podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80}]}]})
    assert codes(lint(standard(pol))) == []
