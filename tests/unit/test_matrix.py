"""The reachability matrix: computation (engine.matrix) and its renderings (engine.report)."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pytest
from tests.support import shared

from stockade.conformance.case import STANDARD_CLUSTER, parse_case
from stockade.engine.evaluate import Evaluator
from stockade.engine.graph import matrix_graph, render_dot
from stockade.engine.matrix import (
    Matrix,
    MatrixPort,
    TruthTable,
    compute_matrix,
    pod_classes,
    probes_for,
)
from stockade.engine.report import (
    render_csv,
    render_json,
    render_markdown,
    render_table,
)
from stockade.model.cluster import NS_NAME_LABEL, Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.decode import decode_network_policy
from stockade.model.labels import Labels
from stockade.model.parse import parse_documents
from stockade.model.policy import PROTOCOLS, NetworkPolicy

CONFORMANCE = shared("conformance")


def policy(ns: str, name: str, spec: dict[str, Any]) -> NetworkPolicy:
    return decode_network_policy({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                                  "metadata": {"namespace": ns, "name": name}, "spec": spec})


def standard(*policies: NetworkPolicy) -> Cluster:
    """Namespaces x, y, z; pods a, b, c in each, serving 80 and 81 on every protocol."""
    nss = tuple(Namespace(n, Labels({"ns": n, NS_NAME_LABEL: n})) for n in "xyz")
    ports = tuple(ContainerPort(p, proto, f"serve-{p}-{proto.lower()}")
                  for p in (80, 81) for proto in PROTOCOLS)
    eps = tuple(Endpoint(n, pod, Labels({"pod": pod}), (f"192.168.{i + 1}.{(j + 1) * 10}",),
                         ports)
                for i, n in enumerate("xyz") for j, pod in enumerate("abc"))
    return Cluster(nss, eps, policies)


def cell(m: Matrix, table: int, src: str, dst: str) -> bool | None:
    return m.tables[table].cells[m.pods.index(src)][m.pods.index(dst)]


# ---- computation ---------------------------------------------------------------------------


def test_no_policy_allows_everything() -> None:
    m = compute_matrix(standard(), [80], ["TCP"])
    assert m.pods == tuple(f"{n}/{p}" for n in "xyz" for p in "abc")
    assert all(c is True for row in m.tables[0].cells for c in row)


def test_deny_all_ingress_in_x_keeps_self_traffic() -> None:
    deny = policy("x", "deny", {"podSelector": {}})
    m = compute_matrix(standard(deny), [80], ["TCP"])
    for src in m.pods:
        for dst in m.pods:
            expected = src == dst or not dst.startswith("x/")
            assert cell(m, 0, src, dst) is expected, (src, dst)


def test_ingress_from_other_namespace_on_one_port() -> None:
    # x/a accepts TCP 80 from namespace y only; 81 is closed to everyone.
    allow = policy("x", "allow-y", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                     "ports": [{"port": 80}]}]})
    m = compute_matrix(standard(allow), [80, 81], ["TCP"])
    assert [t.probe for t in m.tables] == [MatrixPort("TCP", 80), MatrixPort("TCP", 81)]
    into_a_80 = {src for src in m.pods if cell(m, 0, src, "x/a")}
    into_a_81 = {src for src in m.pods if cell(m, 1, src, "x/a")}
    assert into_a_80 == {"x/a", "y/a", "y/b", "y/c"}
    assert into_a_81 == {"x/a"}
    assert cell(m, 1, "z/c", "x/b") is True  # x/b is not selected


def test_named_port_resolves_per_destination_and_unserved_is_none() -> None:
    http = {"a": (ContainerPort(8080, "TCP", "http"),), "b": (ContainerPort(9090, "TCP", "http"),),
            "c": ()}
    eps = tuple(Endpoint("x", p, Labels({"pod": p}), (f"10.0.0.{i}",), http[p])
                for i, p in enumerate("abc", 1))
    only_9090 = policy("x", "p", {"podSelector": {},
                                  "ingress": [{"ports": [{"port": 9090}]}]})
    m = compute_matrix(Cluster((), eps, (only_9090,)), ["http"], ["TCP"])
    t = m.tables[0]
    # Destination a serves http on 8080 (denied), b on 9090 (allowed), c not at all.
    assert t.cells[2] == (False, True, None)
    assert t.cells[0][0] is True  # self traffic
    assert t.cells[2][2] is None  # no such port to talk to, even to itself


def test_default_probes_are_the_served_ports() -> None:
    c = standard()
    assert probes_for(c, [], []) == tuple(
        MatrixPort(proto, port)
        for proto, port in sorted((p, n) for p in PROTOCOLS for n in (80, 81)))
    assert probes_for(c, [], ["UDP"]) == (MatrixPort("UDP", 80), MatrixPort("UDP", 81))
    assert probes_for(c, [80, "serve-81-tcp"], []) == \
        (MatrixPort("TCP", 80), MatrixPort("TCP", "serve-81-tcp"))
    bare = Cluster((), (Endpoint("x", "a", Labels(), ("10.0.0.1",)),), ())
    assert probes_for(bare, [], []) == (MatrixPort("TCP", 80),)
    assert probes_for(bare, [], ["SCTP", "UDP"]) == (MatrixPort("SCTP", 80), MatrixPort("UDP", 80))


def test_pod_classes_group_interchangeable_pods_only() -> None:
    block = policy("x", "b", {"podSelector": {}, "ingress": [
        {"from": [{"ipBlock": {"cidr": "10.0.0.0/24", "except": ["10.0.0.2/32"]}}]}]})
    eps = [
        Endpoint("x", "r1", Labels({"app": "r"}), ("10.0.0.1",)),
        Endpoint("x", "r2", Labels({"app": "r"}), ("10.0.0.3",)),
        Endpoint("x", "r3", Labels({"app": "r"}), ("10.0.0.2",)),  # in the except
        Endpoint("x", "r4", Labels({"app": "r"}), ("10.0.1.1",)),  # outside the block
        Endpoint("y", "r5", Labels({"app": "r"}), ("10.0.0.4",)),  # another namespace
        Endpoint("x", "s", Labels({"app": "s"}), ("10.0.0.5",)),  # other labels
    ]
    classes = pod_classes(Cluster((), tuple(eps), (block,)), eps)
    # r1, r2 are inside the block; r3 (excepted) and r4 (outside) are both not in it,
    # which is all a policy can ask of an IP here; r5 and s differ otherwise.
    assert classes[0] == classes[1]
    assert classes[2] == classes[3] != classes[0]
    assert len(set(classes)) == 4


def test_classes_give_the_same_verdicts_as_judging_every_pair() -> None:
    # Replicas on both sides of an ipBlock except: the shortcut must not blur them.
    eps = tuple(Endpoint("x", f"r{i}", Labels({"app": "r"}), (f"10.0.0.{i}",)) for i in range(1, 7))
    pol = policy("x", "p", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/29",
                                                               "except": ["10.0.0.4/30"]}}]}],
                            "egress": [{"to": [{"podSelector": {}}]}]})
    cluster = Cluster((), eps, (pol,))
    ev = Evaluator(cluster)
    m = compute_matrix(cluster, [80], ["TCP"])
    for i, src in enumerate(sorted(eps, key=lambda e: e.name)):
        for j, dst in enumerate(sorted(eps, key=lambda e: e.name)):
            assert m.tables[0].cells[i][j] == ev.allowed(ev.flow(src, dst, 80, "TCP"))
    # 10.0.0.4-7 are excepted: r4..r6 are denied into anyone but themselves.
    assert cell(m, 0, "x/r4", "x/r1") is False
    assert cell(m, 0, "x/r3", "x/r1") is True


def test_judge_is_replaceable() -> None:
    calls: list[tuple[str, str, int, str]] = []

    def judge(src: Endpoint, dst: Endpoint, port: int, protocol: str) -> bool:
        calls.append((src.key, dst.key, port, protocol))
        return src.namespace == dst.namespace

    m = compute_matrix(standard(), ["serve-81-udp"], ["UDP"], judge=judge)
    assert cell(m, 0, "x/a", "x/b") is True
    assert cell(m, 0, "x/a", "y/b") is False
    assert all(port == 81 and proto == "UDP" for _, _, port, proto in calls)
    # Pods of one namespace with distinct labels are distinct classes: 9*9 - 9 pairs at most.
    assert 0 < len(calls) <= 72


@pytest.mark.skipif(not CONFORMANCE.is_dir(), reason="no shared conformance cases")
def test_matrix_agrees_with_every_conformance_case() -> None:
    standard_doc = parse_documents((CONFORMANCE / STANDARD_CLUSTER).read_text())[0]
    checked = 0
    for path in sorted(CONFORMANCE.glob("*.yaml")):
        if path.name == STANDARD_CLUSTER:
            continue
        case = parse_case(path.read_text(), str(path), standard_doc)
        for group in case.probes:
            m = compute_matrix(case.cluster, [group.port], [group.protocol])
            for src, dst in case.pairs():
                assert cell(m, 0, src.key, dst.key) is group.expected(src.key, dst.key), \
                    (case.id, group.render(), src.key, dst.key)
                checked += 1
    assert checked > 1000


# ---- renderings ----------------------------------------------------------------------------


def small() -> Matrix:
    """x/a accepts only x/b; so y/a -> x/a is the one denied pair."""
    eps = (Endpoint("x", "a", Labels({"pod": "a"}), ("10.0.0.1",)),
           Endpoint("x", "b", Labels({"pod": "b"}), ("10.0.0.2",)),
           Endpoint("y", "a", Labels({"pod": "a"}), ("10.0.1.1",)))
    from_b = {"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}
    pol = policy("x", "p", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [from_b]})
    return compute_matrix(Cluster((), eps, (pol,)), [80], ["TCP"])


def test_table_rendering() -> None:
    assert render_table(small()) == (
        "TCP/80 x/a x/b y/a\n"
        "x/a    .   .   .\n"
        "x/b    .   .   .\n"
        "y/a    X   .   .\n")


def test_table_marks_unserved_named_ports() -> None:
    m = Matrix(("x/a", "x/b"),
               (TruthTable(MatrixPort("TCP", "http"), ((True, None), (False, None))),))
    assert render_table(m).splitlines() == ["TCP/http x/a x/b", "x/a      .   -", "x/b      X   -"]


def test_json_rendering() -> None:
    data = json.loads(render_json(small()))
    assert data["pods"] == ["x/a", "x/b", "y/a"]
    (table,) = data["tables"]
    assert (table["protocol"], table["port"]) == ("TCP", 80)
    assert table["allowed"]["y/a"] == {"x/a": False, "x/b": True, "y/a": True}
    assert table["allowed"]["x/b"]["x/a"] is True


def test_csv_rendering() -> None:
    rows = list(csv.DictReader(io.StringIO(render_csv(small()))))
    assert len(rows) == 9
    assert set(rows[0]) == {"protocol", "port", "from", "to", "verdict"}
    denied = [(r["from"], r["to"]) for r in rows if r["verdict"] == "deny"]
    assert denied == [("y/a", "x/a")]
    assert {r["port"] for r in rows} == {"80"}


def test_markdown_rendering() -> None:
    lines = render_markdown(small()).splitlines()
    assert lines[0] == "### TCP/80"
    assert lines[2] == "| from \\ to | x/a | x/b | y/a |"
    assert lines[3] == "|---|---|---|---|"
    assert lines[6] == "| **y/a** | X | . | . |"
    assert lines[-1].startswith("Legend: ")


def test_dot_rendering() -> None:
    dot = render_dot(matrix_graph(small()))
    assert dot.startswith('digraph "stockade matrix (TCP/80)" {')
    assert dot.rstrip().endswith("}")
    assert 'subgraph cluster_0 {\n    label="x";' in dot
    assert '"y/a" [label="a",' in dot
    edges = {line.strip() for line in dot.splitlines() if "->" in line}
    # Six ordered pairs of different pods, one denied: five edges, no self loops.
    assert len(edges) == 5
    assert '"x/b" -> "x/a" [label="TCP/80", penwidth="1.6"];' in edges
    assert not any(e.startswith('"y/a" -> "x/a"') for e in edges)
