"""Coverage: unisolated pods, policies that select nothing, rules that never match."""

from __future__ import annotations

from typing import Any

from stockade.engine.coverage import (
    DEAD_PEER,
    DEAD_PORT,
    DEAD_RULE,
    IGNORED_RULES,
    UNISOLATED_EGRESS,
    UNISOLATED_INGRESS,
    UNUSED_POLICY,
    Gap,
    coverage,
)
from stockade.model.cluster import NS_NAME_LABEL, Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.decode import decode_network_policy
from stockade.model.labels import Labels
from stockade.model.policy import NetworkPolicy


def policy(ns: str, name: str, spec: dict[str, Any]) -> NetworkPolicy:
    return decode_network_policy({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                                  "metadata": {"namespace": ns, "name": name}, "spec": spec})


def standard(*policies: NetworkPolicy) -> Cluster:
    """x, y, z by a, b, c; every pod serves TCP 80 named http."""
    nss = tuple(Namespace(n, Labels({"ns": n, NS_NAME_LABEL: n})) for n in "xyz")
    eps = tuple(Endpoint(n, p, Labels({"pod": p}), (f"10.0.{i}.{j + 1}",),
                         (ContainerPort(80, "TCP", "http"),))
                for i, n in enumerate("xyz") for j, p in enumerate("abc"))
    return Cluster(nss, eps, policies)


def where(gaps: tuple[Gap, ...]) -> list[tuple[str, str]]:
    return [(g.subject, g.where) for g in gaps]


def test_unisolated_pods_per_direction() -> None:
    only_xa = policy("x", "p", {"podSelector": {"matchLabels": {"pod": "a"}},
                                "policyTypes": ["Ingress"]})
    egress_y = policy("y", "e", {"podSelector": {}, "policyTypes": ["Egress"]})
    report = coverage(standard(only_xa, egress_y))
    ingress = [g.subject for g in report.of_kind(UNISOLATED_INGRESS)]
    egress = [g.subject for g in report.of_kind(UNISOLATED_EGRESS)]
    assert ingress == ["x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c"]
    assert egress == ["x/a", "x/b", "x/c", "z/a", "z/b", "z/c"]
    reasons = {g.subject: g.reason for g in report.of_kind(UNISOLATED_INGRESS)}
    assert reasons["z/a"] == "no ingress policy in namespace z"
    assert reasons["x/b"] == ("the ingress policies of namespace x (p) do not select "
                              "its labels (pod=b)")


def test_policy_selecting_no_pod_and_its_rules_are_not_analysed() -> None:
    stale = policy("x", "stale", {"podSelector": {"matchLabels": {"pod": "gone"}},
                                  "ingress": [{"ports": [{"port": "no-such-port"}]}]})
    report = coverage(standard(stale))
    (gap,) = report.of_kind(UNUSED_POLICY)
    assert (gap.subject, gap.where) == ("NetworkPolicy x/stale", "spec.podSelector")
    assert gap.reason == "podSelector [pod=gone] matches no pod in namespace x"
    assert not report.of_kind(DEAD_RULE) and not report.of_kind(DEAD_PORT)


def test_named_port_no_selected_pod_serves_kills_the_rule() -> None:
    # Every pod serves http on TCP; UDP http is served by nobody.
    pol = policy("x", "p", {"podSelector": {}, "ingress": [
        {"ports": [{"protocol": "UDP", "port": "http"}]},
        {"ports": [{"protocol": "UDP", "port": "http"}, {"port": "http"}]}]})
    report = coverage(standard(pol))
    (rule,) = report.of_kind(DEAD_RULE)
    assert rule.where == "spec.ingress[0]"
    assert rule.reason == ("can never match: no port can (ports[0] no pod selected by the "
                           "policy serves a UDP port named 'http')")
    (port,) = report.of_kind(DEAD_PORT)
    assert port.where == "spec.ingress[1].ports[0]"


def test_egress_named_port_is_looked_up_on_the_destinations() -> None:
    eps = (Endpoint("x", "client", Labels({"app": "client"}), ("10.0.0.1",)),
           Endpoint("x", "db", Labels({"app": "db"}), ("10.0.0.2",),
                    (ContainerPort(5432, "TCP", "pg"),)))
    pol = policy("x", "p", {"podSelector": {"matchLabels": {"app": "client"}},
                            "policyTypes": ["Egress"], "egress": [
        {"to": [{"podSelector": {"matchLabels": {"app": "db"}}}], "ports": [{"port": "pg"}]},
        {"to": [{"podSelector": {"matchLabels": {"app": "client"}}}],
         "ports": [{"port": "pg"}]}]})
    report = coverage(Cluster((), eps, (pol,)))
    assert where(report.of_kind(DEAD_RULE)) == [("NetworkPolicy x/p", "spec.egress[1]")]
    assert "no destination pod serves a TCP port named 'pg'" in report.of_kind(DEAD_RULE)[0].reason


def test_dead_peers_selectors_and_ip_blocks() -> None:
    pol = policy("x", "p", {"podSelector": {}, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"ns": "nowhere"}}},
        {"podSelector": {"matchLabels": {"pod": "b"}}},
        {"podSelector": {"matchLabels": {"pod": "zz"}}},
        {"ipBlock": {"cidr": "10.1.0.0/24", "except": ["10.1.0.0/16"]}},
    ]}]})
    report = coverage(standard(pol))
    gaps = report.of_kind(DEAD_PEER)
    assert [g.where for g in gaps] == ["spec.ingress[0].from[0]", "spec.ingress[0].from[2]",
                                       "spec.ingress[0].from[3]"]
    assert gaps[0].reason == "namespaceSelector [ns=nowhere] matches no namespace"
    assert gaps[1].reason == "peer pods [pod=zz] matches no pod in namespace x"
    assert gaps[2].reason == "ipBlock 10.1.0.0/24 lies wholly inside its except 10.1.0.0/16"
    assert not report.of_kind(DEAD_RULE)


def test_rule_whose_every_peer_is_dead() -> None:
    pol = policy("x", "p", {"podSelector": {}, "egress": [{"to": [
        {"namespaceSelector": {"matchLabels": {"ns": "x"}},
         "podSelector": {"matchLabels": {"pod": "zz"}}}]}]})
    report = coverage(standard(pol))
    (gap,) = report.of_kind(DEAD_RULE)
    assert gap.where == "spec.egress[0]"
    assert gap.reason.startswith("can never match: no peer matches (to[0] peer namespaces")
    assert not report.of_kind(DEAD_PEER)


def test_ignored_rules_are_reported() -> None:
    pol = policy("x", "p", {"podSelector": {}, "policyTypes": ["Ingress"],
                            "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]})
    report = coverage(standard(pol))
    (gap,) = report.of_kind(IGNORED_RULES)
    assert gap.where == "spec.egress"
    assert gap.reason == "1 egress rule(s) ignored: policyTypes [Ingress] leaves out Egress"


def test_external_ip_blocks_and_open_rules_are_not_dead() -> None:
    pol = policy("x", "p", {"podSelector": {}, "ingress": [
        {"from": [{"ipBlock": {"cidr": "203.0.113.0/24"}}]}, {}]})
    report = coverage(standard(pol))
    assert not [g for g in report.gaps if g.subject.startswith("NetworkPolicy")]


def test_without_pods_only_pod_independent_gaps() -> None:
    pol = policy("x", "p", {"podSelector": {"matchLabels": {"pod": "none"}},
                            "policyTypes": ["Egress"], "ingress": [{}],
                            "egress": [{"to": [{"podSelector": {"matchLabels": {"a": "b"}}},
                                               {"ipBlock": {"cidr": "10.0.0.0/8",
                                                            "except": ["0.0.0.0/0"]}}]}]})
    report = coverage(Cluster((), (), (pol,)))
    assert report.pods == 0 and report.policies == 1
    assert [(g.kind, g.where) for g in report.gaps] == [
        (IGNORED_RULES, "spec.ingress"), (DEAD_PEER, "spec.egress[0].to[1]")]
