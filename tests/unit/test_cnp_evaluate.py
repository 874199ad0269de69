"""The tiers in the reference evaluator, rule by rule of the semantics (and the compiled
ruleset, interpreted, giving the same verdicts on the same flows)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from tests.support import REPO_ROOT

from stockade.compile.interpret import allows
from stockade.compile.lower import compile_cluster
from stockade.engine.evaluate import Evaluator
from stockade.model.cluster import Cluster
from stockade.model.parse import parse_objects

NS = """
apiVersion: v1
kind: Namespace
metadata: {name: %s, labels: {team: %s}}
"""
POD = """
apiVersion: v1
kind: Pod
metadata: {name: %s, namespace: %s, labels: {app: %s}}
spec: {containers: [{name: c, image: i, ports: [{name: web, containerPort: %d},
                                                 {name: dns, containerPort: 53, protocol: UDP}]}]}
status: {podIP: %s}
"""
BASE = "---".join([NS % ("a", "a"), NS % ("b", "b"),
                   POD % ("a1", "a", "web", 80, "10.0.0.1"),
                   POD % ("a2", "a", "db", 80, "10.0.0.2"),
                   POD % ("b1", "b", "web", 8080, "10.0.1.1")])


def cnp(name: str, tier: str, priority: int, subject: dict[str, Any], *,
        ingress: list[dict[str, Any]] | None = None,
        egress: list[dict[str, Any]] | None = None) -> str:
    spec: dict[str, Any] = {"tier": tier, "priority": priority, "subject": subject}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    return yaml.safe_dump({"apiVersion": "policy.networking.k8s.io/v1alpha2",
                           "kind": "ClusterNetworkPolicy", "metadata": {"name": name},
                           "spec": spec})


def netpol(ns: str, name: str, spec: dict[str, Any]) -> str:
    return yaml.safe_dump({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                           "metadata": {"name": name, "namespace": ns}, "spec": spec})


def cluster(*docs: str) -> Cluster:
    return parse_objects("---\n".join([BASE, *docs])).cluster()


def ns(team: str) -> dict[str, Any]:
    return {"namespaces": {"matchLabels": {"team": team}}}


ALL_NS: dict[str, Any] = {"namespaces": {}}


def verdict(c: Cluster, src: str, dst: str, port: int | str = 80,
            protocol: str = "TCP") -> bool:
    """The evaluator's verdict, checked against the compiled ruleset interpreted."""
    ev = Evaluator(c)
    s, d = c.endpoint(src), c.endpoint(dst)
    assert s is not None and d is not None
    flow = ev.flow(s, d, port, protocol)
    got = ev.verdict(flow).allowed
    assert ev.allowed(flow) is got
    compiled = allows(compile_cluster(c), s.ips[0], d.ips[0], protocol, flow.port)
    assert compiled is got, (src, dst, port, protocol)
    return got


def test_admin_deny_overrides_a_networkpolicy_allow() -> None:
    allow = netpol("b", "allow-a", {"podSelector": {}, "ingress": [
        {"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]}]})
    deny = cnp("deny-a", "Admin", 5, ns("b"), ingress=[{"action": "Deny", "from": [ns("a")]}])
    assert verdict(cluster(allow), "a/a1", "b/b1", 8080)
    assert not verdict(cluster(allow, deny), "a/a1", "b/b1", 8080)


def test_an_egress_accept_does_not_skip_the_destinations_ingress() -> None:
    accept = cnp("out", "Admin", 1, ns("a"), egress=[{"action": "Accept", "to": [ns("b")]}])
    isolate = netpol("b", "deny-all", {"podSelector": {}, "policyTypes": ["Ingress"]})
    c = cluster(accept, isolate)
    assert not verdict(c, "a/a1", "b/b1", 8080)
    ev = Evaluator(c)
    src, dst = c.endpoint("a/a1"), c.endpoint("b/b1")
    assert src is not None and dst is not None
    side = ev.verdict(ev.flow(src, dst, 8080, "TCP"))
    assert side.egress.decided_by == "Admin" and side.egress.allowed
    assert side.ingress.decided_by == "NetworkPolicy" and not side.ingress.allowed


def test_the_first_matching_rule_decides_by_priority_then_order() -> None:
    first = cnp("p1", "Admin", 1, ns("b"), ingress=[
        {"action": "Accept", "from": [ns("a")], "protocols": [{"tcp": {"destinationPort":
                                                                       {"number": 8080}}}]},
        {"action": "Deny", "from": [ns("a")]}])
    later = cnp("p2", "Admin", 2, ns("b"), ingress=[{"action": "Deny", "from": [ns("a")]}])
    c = cluster(first, later)
    assert verdict(c, "a/a1", "b/b1", 8080)
    assert not verdict(c, "a/a1", "b/b1", 8081)
    # swap the priorities: p2's deny comes first
    c = cluster(cnp("p1", "Admin", 3, ns("b"), ingress=[
        {"action": "Accept", "from": [ns("a")]}]), later)
    assert not verdict(c, "a/a1", "b/b1", 8080)


def test_equal_priorities_are_ordered_by_name_everywhere() -> None:
    deny = cnp("a-deny", "Admin", 7, ns("b"), ingress=[{"action": "Deny", "from": [ns("a")]}])
    accept = cnp("b-accept", "Admin", 7, ns("b"), ingress=[{"action": "Accept",
                                                             "from": [ns("a")]}])
    assert not verdict(cluster(accept, deny), "a/a1", "b/b1", 8080)
    assert not verdict(cluster(deny, accept), "a/a1", "b/b1", 8080)


def test_admin_pass_goes_to_networkpolicy_and_baseline_pass_to_the_default() -> None:
    passing = cnp("pass", "Admin", 1, ns("b"), ingress=[{"action": "Pass", "from": [ns("a")]},
                                                        {"action": "Deny", "from": [ns("a")]}])
    c = cluster(passing)
    assert verdict(c, "a/a1", "b/b1", 8080)  # passed, nothing below decides: allowed
    np_deny = netpol("b", "deny-all", {"podSelector": {}, "policyTypes": ["Ingress"]})
    assert not verdict(cluster(passing, np_deny), "a/a1", "b/b1", 8080)
    base_deny = cnp("base", "Baseline", 1, ns("b"), ingress=[{"action": "Deny",
                                                              "from": [ns("a")]}])
    assert not verdict(cluster(passing, base_deny), "a/a1", "b/b1", 8080)
    base_pass = cnp("base", "Baseline", 1, ns("b"), ingress=[
        {"action": "Pass", "from": [ns("a")]}, {"action": "Deny", "from": [ns("a")]}])
    assert verdict(cluster(base_pass), "a/a1", "b/b1", 8080)


def test_baseline_is_not_reached_for_a_pod_a_networkpolicy_isolates() -> None:
    allow = netpol("b", "allow-a", {"podSelector": {}, "ingress": [
        {"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]}]})
    base_deny = cnp("base", "Baseline", 0, ALL_NS, ingress=[{"action": "Deny",
                                                             "from": [ALL_NS]}])
    c = cluster(allow, base_deny)
    assert verdict(c, "a/a1", "b/b1", 8080)  # NetworkPolicy decides for b1
    assert not verdict(c, "b/b1", "a/a1")  # a1 is isolated by nothing: Baseline denies
    assert verdict(c, "a/a1", "a/a1")  # a pod talking to itself is not subject to tiers


def test_networks_match_pod_addresses_too() -> None:
    deny = cnp("no-10", "Admin", 1, ns("a"), egress=[{"action": "Deny",
                                                     "to": [{"networks": ["10.0.1.0/24"]}]}])
    c = cluster(deny)
    assert not verdict(c, "a/a1", "b/b1", 8080)
    assert verdict(c, "a/a1", "a/a2")
    ev = Evaluator(c)
    src = c.endpoint("a/a1")
    assert src is not None
    assert not ev.allowed(ev.flow(src, "10.0.1.77", 443, "TCP"))
    assert ev.allowed(ev.flow(src, "192.0.2.1", 443, "TCP"))


def test_a_named_port_is_the_destinations_on_its_own_protocol() -> None:
    rule = {"action": "Deny", "from": [ns("a")], "protocols": [{"destinationNamedPort": "web"}]}
    c = cluster(cnp("web", "Admin", 1, ns("b"), ingress=[rule]))
    assert not verdict(c, "a/a1", "b/b1", 8080)  # b1's web is 8080/TCP
    assert verdict(c, "a/a1", "b/b1", 80)
    assert verdict(c, "a/a1", "b/b1", 8080, "UDP")
    dns = dict(rule, protocols=[{"destinationNamedPort": "dns"}])
    c = cluster(cnp("dns", "Admin", 1, ns("b"), ingress=[dns]))
    assert not verdict(c, "a/a1", "b/b1", 53, "UDP")
    assert verdict(c, "a/a1", "b/b1", 53, "TCP")


def test_pods_subject_and_peer_select_within_namespaces() -> None:
    subject = {"pods": {"namespaceSelector": {"matchLabels": {"team": "a"}},
                        "podSelector": {"matchLabels": {"app": "db"}}}}
    peer = {"pods": {"podSelector": {"matchLabels": {"app": "web"}}}}  # every namespace
    c = cluster(cnp("db", "Admin", 1, subject, ingress=[{"action": "Deny", "from": [peer]}]))
    assert not verdict(c, "a/a1", "a/a2")
    assert not verdict(c, "b/b1", "a/a2")
    assert verdict(c, "a/a2", "a/a1")  # a1 is not the subject


@pytest.mark.parametrize(("action", "allowed"), [("Accept", False), ("Deny", False),
                                                 ("Pass", True)])
def test_an_unknown_peer_fails_closed(action: str, allowed: bool) -> None:
    # An Accept of an unknown peer matches nothing, so the later Deny decides; a Deny or
    # a Pass of one matches everything (a Pass then reaches the default: allowed).
    rules = [{"action": action, "to": [{"nodes": {}}]},
             {"action": "Deny", "to": [ALL_NS]}]
    c = cluster(cnp("odd", "Admin", 1, ns("a"), egress=rules))
    assert verdict(c, "a/a1", "b/b1", 8080) is allowed


def test_no_rules_in_a_direction_leave_it_alone() -> None:
    egress_only = cnp("out", "Admin", 1, ns("a"), egress=[{"action": "Deny",
                                                            "to": [ns("a")]}])
    c = cluster(egress_only)
    assert verdict(c, "b/b1", "a/a1")  # a's ingress has no CNP rule
    assert not verdict(c, "a/a2", "a/a1")


EXAMPLES = tuple(str(REPO_ROOT / "examples" / name) for name in
                 ("cluster.yaml", "policies.yaml", "cluster-policies.yaml"))


def test_explain_names_the_tier_the_policy_its_priority_and_the_rule(
        capsys: pytest.CaptureFixture[str]) -> None:
    from stockade.cli.main import main

    assert main(["explain", "-f", *EXAMPLES, "--from", "frontend/web", "--to", "backend/api",
                 "--port", "api"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "DENIED: frontend/web -> backend/api TCP/8000 (port 'api' of backend/api)"
    assert out[2] == ("  ingress: denied: by Admin ClusterNetworkPolicy guard-backend "
                      "(priority 10) ingress[1] (deny-frontend): Deny")
    assert "by Baseline ClusterNetworkPolicy no-internet (priority 1) egress[0] " \
           "(accept-pods): Accept" in out[1]
    assert main(["explain", "-f", *EXAMPLES, "--from", "frontend/web", "--to",
                 "93.184.216.34", "--port", "443"]) == 1
    assert "egress[1] (deny-the-internet): Deny" in capsys.readouterr().out
    # a Pass hands over to the NetworkPolicies, which are then explained as always
    assert main(["explain", "-f", *EXAMPLES, "--from", "monitoring/prometheus", "--to",
                 "backend/api", "--port", "9090", "-o", "json"]) in (0, 1)
    import json

    data = json.loads(capsys.readouterr().out)
    ingress = data["ingress"]
    assert ingress["decided_by"] == "NetworkPolicy"
    assert ingress["admin"]["action"] == "Pass"
    assert ingress["admin"]["rule_name"] == "pass-monitoring"
    assert ingress["admin"]["priority"] == 10
    assert data["egress"]["decided_by"] == "Baseline"
    assert data["egress"]["baseline"]["policy"] == "no-internet"


def test_explain_says_when_no_tier_rule_decided(capsys: pytest.CaptureFixture[str]) -> None:
    from stockade.cli.main import main

    main(["explain", "-f", *EXAMPLES, "--from", "backend/api", "--to", "monitoring/prometheus",
          "--port", "9090"])
    out = capsys.readouterr().out
    assert "no ClusterNetworkPolicy rule decided: default allow" in out
