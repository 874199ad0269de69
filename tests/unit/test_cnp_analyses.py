"""The bulk analyses with ClusterNetworkPolicy tiers, on hand-written cases with the
answers worked out from the semantics (the property tests in
tests/property/test_cnp_analyses.py hold them to the evaluator on random cases).

The cluster (tests/unit/test_cnp_evaluate.py): namespaces a and b (labels team=a,
team=b); a/a1 (app=web, 10.0.0.1) and a/a2 (app=db, 10.0.0.2) serve TCP 80 named
`web`, b/b1 (app=web, 10.0.1.1) serves TCP 8080 named `web`; all serve UDP 53 `dns`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.unit.test_cnp_evaluate import ALL_NS, BASE, cluster, cnp, netpol, ns

from stockade.cli.main import main
from stockade.engine.connectivity import connectivity, workload_peers
from stockade.engine.coverage import UNISOLATED_EGRESS, UNISOLATED_INGRESS, coverage
from stockade.engine.diff import CLOSED, OPENED, diff_policies
from stockade.engine.lint import lint
from stockade.engine.matrix import compute_matrix, evaluator_judge
from stockade.model.cluster import Cluster
from stockade.model.parse import parse_objects

DENY_A_TO_B = cnp("deny-a", "Admin", 5, ns("b"), ingress=[{"action": "Deny",
                                                           "from": [ns("a")]}])
ALLOW_A_IN_B = netpol("b", "allow-a", {"podSelector": {}, "ingress": [
    {"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]}]})


def cells(c: Cluster, port: int | str = 8080, protocol: str = "TCP"
          ) -> dict[tuple[str, str], bool | None]:
    """The matrix of one probe, by (source, destination), checked against the evaluator."""
    m = compute_matrix(c, [port], [protocol])
    assert m == compute_matrix(c, [port], [protocol], judge=evaluator_judge(c))
    (table,) = m.tables
    return {(s, d): table.cells[i][j] for i, s in enumerate(m.pods)
            for j, d in enumerate(m.pods)}


# ---- matrix ----------------------------------------------------------------------------


def test_matrix_an_admin_deny_overrides_a_networkpolicy_allow() -> None:
    assert cells(cluster(ALLOW_A_IN_B))["a/a1", "b/b1"] is True
    got = cells(cluster(ALLOW_A_IN_B, DENY_A_TO_B))
    assert got["a/a1", "b/b1"] is False and got["a/a2", "b/b1"] is False
    assert got["b/b1", "a/a1"] is True and got["a/a1", "a/a2"] is True
    assert got["b/b1", "b/b1"] is True  # a pod talking to itself


def test_matrix_pass_reaches_networkpolicy_and_baseline_only_the_unisolated() -> None:
    passing = cnp("pass", "Admin", 1, ALL_NS, ingress=[{"action": "Pass", "from": [ALL_NS]}])
    deny_b = netpol("b", "deny-all", {"podSelector": {}, "policyTypes": ["Ingress"]})
    base = cnp("base", "Baseline", 0, ALL_NS, ingress=[
        {"action": "Accept", "from": [ns("b")]}, {"action": "Deny", "from": [ALL_NS]}])
    got = cells(cluster(passing, deny_b, base))
    assert got["a/a1", "b/b1"] is False  # NetworkPolicy isolates b1: Baseline not reached
    assert got["a/a1", "a/a2"] is False  # Baseline denies a to a
    assert got["b/b1", "a/a1"] is True  # Baseline accepts b
    assert cells(cluster(passing))["a/a1", "b/b1"] is True  # passed to the default


def test_matrix_a_named_port_and_networks_in_the_tiers() -> None:
    web = cnp("web", "Admin", 1, ns("a"), egress=[
        {"action": "Deny", "to": [ALL_NS], "protocols": [{"destinationNamedPort": "web"}]}])
    got = cells(cluster(web), "web")
    assert got["a/a1", "b/b1"] is False and got["a/a1", "a/a2"] is False  # 8080, 80
    assert got["b/b1", "a/a1"] is True
    cidr = cnp("net", "Admin", 1, ns("a"), egress=[
        {"action": "Deny", "to": [{"networks": ["10.0.1.0/24"]}]}])
    got = cells(cluster(cidr))
    assert got["a/a1", "b/b1"] is False and got["a/a1", "a/a2"] is True


# ---- list ------------------------------------------------------------------------------


def listing(c: Cluster) -> list[str]:
    peers, _ = workload_peers(c.endpoints, {}, ())
    return [line.render() for line in connectivity(c, peers).connections]


def test_list_admin_rules_cut_port_intervals() -> None:
    rules = cnp("ports", "Admin", 1, ns("b"), ingress=[
        {"action": "Accept", "from": [ns("a")],
         "protocols": [{"tcp": {"destinationPort": {"number": 8443}}}]},
        {"action": "Deny", "from": [ns("a")],
         "protocols": [{"tcp": {"destinationPort": {"range": {"start": 8000, "end": 9000}}}},
                       {"udp": {"destinationPort": {"number": 53}}}]}])
    lines = listing(cluster(rules))
    assert "a/a1[Pod] => b/b1[Pod] : SCTP 1-65535,TCP 1-7999,8443,9001-65535,UDP 1-52,54-65535" \
        in lines
    assert "b/b1[Pod] => a/a1[Pod] : All Connections" in lines


def test_list_pass_then_networkpolicy_keeps_only_what_it_allows() -> None:
    passing = cnp("pass", "Admin", 1, ns("b"), ingress=[
        {"action": "Pass", "from": [ns("a")],
         "protocols": [{"tcp": {"destinationPort": {"range": {"start": 1, "end": 1000}}}}]},
        {"action": "Accept", "from": [ns("a")]}])
    only_80 = netpol("b", "only-80", {"podSelector": {}, "ingress": [
        {"ports": [{"port": 80}]}]})
    lines = listing(cluster(passing, only_80))
    # 1-1000 passed to the NetworkPolicy (which allows 80 of them), the rest accepted.
    assert "a/a1[Pod] => b/b1[Pod] : SCTP 1-65535,TCP 80,1001-65535,UDP 1-65535" in lines
    assert not any(line.startswith("b/b1[Pod] => ") and "b/b1" in line.split("=>")[1]
                   for line in lines)


def test_list_baseline_denies_a_named_port_of_the_destination() -> None:
    base = cnp("no-web", "Baseline", 3, ALL_NS, ingress=[
        {"action": "Deny", "from": [ALL_NS], "protocols": [{"destinationNamedPort": "web"}]}])
    lines = listing(cluster(base))
    assert "a/a1[Pod] => b/b1[Pod] : SCTP 1-65535,TCP 1-8079,8081-65535,UDP 1-65535" in lines
    assert "b/b1[Pod] => a/a1[Pod] : SCTP 1-65535,TCP 1-79,81-65535,UDP 1-65535" in lines


def test_list_networks_cut_the_external_ranges() -> None:
    deny = cnp("no-net", "Admin", 1, ns("a"), egress=[
        {"action": "Deny", "to": [{"networks": ["192.168.0.0/16"]}]},
        {"action": "Accept", "to": [{"networks": ["0.0.0.0/0"]}],
         "protocols": [{"tcp": {"destinationPort": {"number": 443}}}]},
        {"action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}]}])
    lines = listing(cluster(deny))
    assert "a/a1[Pod] => 0.0.0.0-192.167.255.255[External] : TCP 443" in lines
    assert "a/a1[Pod] => 192.169.0.0-255.255.255.255[External] : TCP 443" in lines
    assert not any("a/a1[Pod] => 192.168.0.0-192.168.255.255" in line for line in lines)
    assert "b/b1[Pod] => 0.0.0.0-192.167.255.255[External] : All Connections" in lines
    # Workloads have no address: networks never match them (as an ipBlock never does).
    assert "a/a1[Pod] => b/b1[Pod] : All Connections" in lines


# ---- diff ------------------------------------------------------------------------------


def test_diff_a_priority_change_is_a_change_of_connections() -> None:
    accept = cnp("accept-a", "Admin", 9, ns("b"), ingress=[{"action": "Accept",
                                                             "from": [ns("a")]}])
    old = cluster(DENY_A_TO_B, accept)
    raised = cluster(DENY_A_TO_B, accept.replace("priority: 9", "priority: 1"))
    result = diff_policies(old, old.policies, raised.policies,
                           old_tiers=old.cluster_policies, new_tiers=raised.cluster_policies)
    assert [(c.change, c.src, c.dst) for c in result.changes] == [
        (OPENED, "a/a1", "b/b1"), (OPENED, "a/a2", "b/b1")]
    change = result.changes[0]
    assert [p.render() for p in change.ports] == ["TCP/*", "UDP/*", "SCTP/*"]
    assert change.reason == ("by Admin ClusterNetworkPolicy accept-a (changed) (priority 1) "
                             "ingress[0] (Accept); Admin ClusterNetworkPolicy deny-a "
                             "(priority 5) ingress[0] no longer denies it")
    back = diff_policies(old, old.policies, old.policies, old_tiers=raised.cluster_policies,
                         new_tiers=old.cluster_policies)
    assert [c.change for c in back.changes] == [CLOSED, CLOSED]
    assert back.changes[0].reason == ("Admin ClusterNetworkPolicy deny-a (priority 5) "
                                      "ingress[0] denies it")


def test_diff_an_action_change_on_some_ports() -> None:
    def web(action: str) -> str:
        return cnp("web", "Baseline", 1, ns("b"), ingress=[
            {"action": action, "from": [ns("a")],
             "protocols": [{"tcp": {"destinationPort": {"range": {"start": 8000,
                                                                   "end": 8100}}}}]}])
    old, new = cluster(web("Accept")), cluster(web("Deny"))
    result = diff_policies(old, (), (), old_tiers=old.cluster_policies,
                           new_tiers=new.cluster_policies)
    assert [c.render() for c in result.changes] == [
        "- a/a1 -> b/b1 TCP/8000-8100 (closed: Baseline ClusterNetworkPolicy web (changed) "
        "(priority 1) ingress[0] denies it)",
        "- a/a2 -> b/b1 TCP/8000-8100 (closed: Baseline ClusterNetworkPolicy web (changed) "
        "(priority 1) ingress[0] denies it)"]
    # Baseline is not reached for a pod a NetworkPolicy isolates: the same change, no diff.
    old, new = cluster(web("Accept"), ALLOW_A_IN_B), cluster(web("Deny"), ALLOW_A_IN_B)
    assert diff_policies(old, old.policies, new.policies, old_tiers=old.cluster_policies,
                         new_tiers=new.cluster_policies).changes == ()


def test_diff_command_reads_the_tiers_of_each_side(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(BASE)
    new.write_text("---\n".join([BASE, DENY_A_TO_B]))
    assert main(["diff", "-f", str(old), "-a", str(new)]) == 1
    out = capsys.readouterr().out
    assert ("- a/a1 -> b/b1 TCP/* UDP/* SCTP/* (closed: Admin ClusterNetworkPolicy deny-a "
            "(new) (priority 5) ingress[0] denies it)") in out
    assert main(["diff", "-f", str(new), "-a", str(new)]) == 0


# ---- coverage --------------------------------------------------------------------------


def test_coverage_selections_unused_dead_and_shadowed_rules(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    accept = cnp("accept-all", "Admin", 1, ns("b"), ingress=[
        {"action": "Accept", "from": [ALL_NS]}])
    later = cnp("later", "Admin", 2, ALL_NS, ingress=[
        {"action": "Deny", "from": [ns("a")]},  # for b1: after accept-all; for a1, a2: live
        {"action": "Pass", "from": [{"pods": {"podSelector": {"matchLabels": {"app": "no"}}}}]},
        {"action": "Deny", "from": [ns("a")]}])  # after the first for every pod
    unused = cnp("unused", "Baseline", 2, ns("zzz"), ingress=[{"action": "Deny",
                                                               "from": [ns("a")]}])
    report = coverage(cluster(accept, later, unused))
    assert [(s.policy, s.pods) for s in report.selections] == [
        ("accept-all", ("b/b1",)), ("later", ("a/a1", "a/a2", "b/b1")), ("unused", ())]
    gaps = [(g.kind, g.subject, g.where, g.reason) for g in report.gaps
            if g.subject.startswith("ClusterNetworkPolicy")]
    assert gaps == [
        ("unused-policy", "ClusterNetworkPolicy unused", "spec.subject",
         "subject namespaces [team=zzz] selects no pod"),
        ("dead-rule", "ClusterNetworkPolicy later", "spec.ingress[1]",
         "can never match: no connection of the pods it selects meets its peers and protocols"),
        ("dead-rule", "ClusterNetworkPolicy later", "spec.ingress[2]",
         "shadowed: every connection it matches is decided first by Admin "
         "ClusterNetworkPolicy accept-all (priority 1) ingress[0], Admin "
         "ClusterNetworkPolicy later (priority 2) ingress[0]"),
    ]
    # Every pod may be denied ingress by `later`: none is reported as unrestricted.
    assert not report.of_kind(UNISOLATED_INGRESS)
    assert len(report.of_kind(UNISOLATED_EGRESS)) == 3
    assert report.policies == 3
    # The command shows the selections and the ClusterNetworkPolicy gaps with their paths.
    path = tmp_path / "c.yaml"
    path.write_text("---\n".join([BASE, accept, later, unused]))
    assert main(["coverage", "-f", str(path)]) == 0
    out = capsys.readouterr().out
    assert "  ClusterNetworkPolicy later spec.ingress[2] (" in out
    assert "ClusterNetworkPolicies and the pods they select:\n" \
           "  Admin priority 1 accept-all: b/b1\n" \
           "  Admin priority 2 later: a/a1, a/a2, b/b1\n" \
           "  Baseline priority 2 unused: no pod\n" in out


def test_coverage_a_deny_shadowed_by_an_earlier_accept() -> None:
    accept = cnp("accept-all", "Admin", 1, ns("b"), ingress=[
        {"action": "Accept", "from": [ALL_NS]}])
    deny = cnp("deny-a", "Admin", 2, ns("b"), ingress=[{"action": "Deny", "from": [ns("a")]}])
    (gap,) = [g for g in coverage(cluster(accept, deny)).gaps if g.kind == "dead-rule"]
    assert gap.reason == ("a Deny shadowed by an earlier Accept: every connection it matches "
                          "is decided first by Admin ClusterNetworkPolicy accept-all "
                          "(priority 1) ingress[0]")
    # A narrower Accept leaves ports to the Deny: it takes effect.
    narrow = accept.replace("from:", "protocols: [{tcp: {destinationPort: {number: 80}}}]\n"
                                     "    from:")
    assert "protocols" in narrow
    assert not [g for g in coverage(cluster(narrow, deny)).gaps if g.kind == "dead-rule"]


# ---- lint ------------------------------------------------------------------------------

A_ACCEPT = cnp("a-accept", "Admin", 5, ns("b"), ingress=[{"action": "Accept",
                                                           "from": [ns("a")]}])
B_DENY = cnp("b-deny", "Admin", 5, ALL_NS, ingress=[{"action": "Deny", "from": [ALL_NS]},
                                                     {"action": "Pass", "from": [ALL_NS]}])


def codes(c: Cluster) -> list[tuple[str, str, str]]:
    return [(f.code, f.subject, f.where) for f in lint(c) if f.code >= "SK010"]


def test_lint_same_priority_overlap_with_pods_names_a_connection() -> None:
    findings = [f for f in lint(cluster(A_ACCEPT, B_DENY)) if f.code == "SK010"]
    assert [(f.subject, f.where, f.severity) for f in findings] == [
        ("ClusterNetworkPolicy a-accept", "spec.priority", "warning")]
    assert findings[0].message == (
        "same Admin priority 5 as ClusterNetworkPolicy b-deny, and their first matching "
        "rules disagree (a-accept ingress[0] Accept, b-deny ingress[0] Deny), e.g. on "
        "a/a1 -> b/b1 TCP 1: the API leaves the winner to the implementation (stockade "
        "takes a-accept, by name); give them different priorities")
    # Different priorities, or the same action: no overlap to report.
    assert not [f for f in lint(cluster(A_ACCEPT, B_DENY.replace("priority: 5",
                                                                 "priority: 6")))
                if f.code == "SK010"]
    same = A_ACCEPT.replace("a-accept", "a-deny").replace("Accept", "Deny")
    assert not [f for f in lint(cluster(same, B_DENY)) if f.code == "SK010"]


def test_lint_shadowed_rules_and_passes_with_pods() -> None:
    assert codes(cluster(A_ACCEPT.replace("priority: 5", "priority: 1"), B_DENY)) == [
        # b-deny's Pass comes after its Deny of everything: shadowed, not also SK012.
        ("SK011", "ClusterNetworkPolicy b-deny", "spec.ingress[1]")]
    deny_a = cnp("deny-a", "Admin", 9, ns("b"), ingress=[{"action": "Deny", "from": [ns("a")]}])
    (f,) = [f for f in lint(cluster(A_ACCEPT, deny_a)) if f.code == "SK011"]
    assert f.message == ("a Deny shadowed by an earlier Accept: every connection it matches "
                         "is decided first by Admin ClusterNetworkPolicy a-accept "
                         "(priority 5) ingress[0]")


def test_lint_pass_with_nothing_below_and_baseline_pass() -> None:
    passing = cnp("pass", "Admin", 7, ns("a"), egress=[{"action": "Pass", "to": [ALL_NS]}])
    base_pass = cnp("bp", "Baseline", 7, ns("b"), egress=[{"action": "Pass", "to": [ALL_NS]}])
    got = [(f.code, f.subject, f.severity) for f in lint(cluster(passing, base_pass))]
    assert got == [("SK013", "ClusterNetworkPolicy bp", "note"),
                   ("SK012", "ClusterNetworkPolicy pass", "note")]
    # Something below for a's pods: a NetworkPolicy isolating them for egress, or a
    # Baseline policy with egress rules selecting them.
    isolate = netpol("a", "egress", {"podSelector": {}, "policyTypes": ["Egress"]})
    assert "SK012" not in [f.code for f in lint(cluster(passing, isolate))]
    below = cnp("below", "Baseline", 1, ns("a"), egress=[{"action": "Deny", "to": [ALL_NS]}])
    assert "SK012" not in [f.code for f in lint(cluster(passing, below))]


def test_lint_without_pods_reads_the_rules_as_written(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    shadow = cnp("shadow", "Admin", 3, ALL_NS, egress=[
        {"action": "Accept", "to": [{"networks": ["10.0.0.0/8"]}]},
        {"action": "Deny", "to": [{"networks": ["10.1.0.0/16"]}],
         "protocols": [{"tcp": {"destinationPort": {"number": 22}}}]},
        {"action": "Deny", "to": [{"networks": ["192.168.0.0/16"]}]}])
    other = cnp("other", "Admin", 3, ns("b"), egress=[
        {"action": "Deny", "to": [{"networks": ["10.2.0.0/16"]}]}])
    disjoint = cnp("disjoint", "Admin", 3, ns("b"), egress=[
        {"action": "Deny", "to": [{"networks": ["172.16.0.0/12"]}]}])
    path = tmp_path / "tiers.yaml"
    path.write_text("---\n".join([shadow, other, disjoint]))
    assert main(["lint", "-f", str(path)]) == 1
    out = capsys.readouterr().out
    line = shadow.count("\n") + 2  # where the second document starts
    assert (f"{path}:{line}: ClusterNetworkPolicy other: spec.priority: SK010 warning: same Admin "
            "priority 3 as ClusterNetworkPolicy shadow, and egress[0] (Deny) and its "
            "egress[0] (Accept) may match") in out
    assert "ClusterNetworkPolicy disjoint: spec.priority: SK010" not in out
    assert ("ClusterNetworkPolicy shadow: spec.egress[1]: SK011 warning: a Deny shadowed by "
            "an earlier Accept: Admin ClusterNetworkPolicy shadow (priority 3) egress[0] "
            "matches every connection it does, first") in out
    assert "spec.egress[2]: SK011" not in out


def test_lint_without_pods_subjects_and_peers_that_cannot_meet() -> None:
    a = cnp("a", "Admin", 3, ns("a"), egress=[{"action": "Deny", "to": [ALL_NS]}])
    b = cnp("b", "Admin", 3, ns("b"), egress=[{"action": "Accept", "to": [ALL_NS]}])
    c = cnp("c", "Admin", 3, ALL_NS, egress=[{"action": "Accept", "to": [ns("x")]}])
    d = cnp("d", "Admin", 3, ns("b"), egress=[{"action": "Deny", "to": [ns("y")]}])
    objects = parse_objects("---\n".join([a, b, c, d])).cluster()
    # a and b select different namespaces (team=a, team=b); c and d's peers too (x, y);
    # b and c both accept. a meets c, and b meets d, which b's Accept also shadows.
    assert [(f.code, f.subject, f.message.split(",")[0]) for f in lint(objects)] == [
        ("SK010", "ClusterNetworkPolicy a",
         "same Admin priority 3 as ClusterNetworkPolicy c"),
        ("SK010", "ClusterNetworkPolicy b",
         "same Admin priority 3 as ClusterNetworkPolicy d"),
        ("SK011", "ClusterNetworkPolicy d",
         "a Deny shadowed by an earlier Accept: Admin ClusterNetworkPolicy b (priority 3) "
         "egress[0] matches every connection it does"),
    ]
