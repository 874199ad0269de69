"""The analysis commands on the example manifests: results, formats, exit statuses.

The expectations are worked out from examples/: backend and db deny by default;
web -> api on the named port `api` (8000); api -> postgres on 5432; backend pods
reach DNS; Prometheus scrapes `metrics` (9090 on api, 9100 on worker).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from stockade.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
EX = ROOT / "examples"
CLUSTER, V1, V2 = (str(EX / f) for f in ("cluster.yaml", "policies.yaml", "policies-v2.yaml"))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code, out, _ = run(capsys, *argv, "-o", "json")
    return code, json.loads(out)


# ---- matrix ----------------------------------------------------------------------------


def test_matrix_default_probes_every_served_port(capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run_json(capsys, "matrix", "-f", CLUSTER, V1)
    assert code == 0
    probes = [f"{t['protocol']}/{t['port']}" for t in data["tables"]]
    assert probes == ["TCP/53", "TCP/5432", "TCP/8000", "TCP/8080", "TCP/9090", "TCP/9100",
                      "UDP/53"]
    assert len(data["pods"]) == 7
    t = {f"{t['protocol']}/{t['port']}": t["allowed"] for t in data["tables"]}
    assert t["TCP/8000"]["frontend/web"]["backend/api"] is True
    assert t["TCP/8000"]["frontend/admin"]["backend/api"] is False
    assert t["TCP/8000"]["backend/api"]["db/postgres"] is False
    assert t["TCP/5432"]["backend/api"]["db/postgres"] is True
    assert t["TCP/5432"]["backend/worker"]["db/postgres"] is False
    assert t["UDP/53"]["backend/api"]["kube-system/coredns"] is True
    assert t["UDP/53"]["backend/api"]["frontend/web"] is False  # backend egress is isolated
    assert t["UDP/53"]["frontend/web"]["db/postgres"] is False  # db ingress is isolated
    # `metrics` is 9090 on api and 9100 on worker: each is open on its own number only.
    assert t["TCP/9090"]["monitoring/prometheus"]["backend/api"] is True
    assert t["TCP/9090"]["monitoring/prometheus"]["backend/worker"] is False
    assert t["TCP/9100"]["monitoring/prometheus"]["backend/worker"] is True
    assert t["TCP/9100"]["monitoring/prometheus"]["backend/api"] is False
    assert all(t[p][pod][pod] is True for p in t for pod in data["pods"])


def test_matrix_table_named_port(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "matrix", "-f", CLUSTER, V1, "--port", "api")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["TCP/api", "backend/api", "backend/worker", "db/postgres",
                                "frontend/admin", "frontend/web", "kube-system/coredns",
                                "monitoring/prometheus"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    # Only backend/api serves `api`: every other column is '-'.
    assert rows["frontend/web"] == [".", "-", "-", "-", "-", "-", "-"]
    assert rows["frontend/admin"] == ["X", "-", "-", "-", "-", "-", "-"]
    assert rows["backend/api"][0] == "."


def test_matrix_csv_md_dot(capsys: pytest.CaptureFixture[str]) -> None:
    args = ("matrix", "-f", CLUSTER, V1, "--port", "8000", "--port", "5432", "-o")
    code, out, _ = run(capsys, *args, "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(rows) == 2 * 7 * 7
    allowed = {(r["port"], r["from"], r["to"]) for r in rows
               if r["verdict"] == "allow" and r["from"] != r["to"]}
    assert ("8000", "frontend/web", "backend/api") in allowed
    assert ("5432", "backend/api", "db/postgres") in allowed
    assert ("8000", "frontend/admin", "backend/api") not in allowed
    _, md, _ = run(capsys, *args, "md")
    assert md.count("### TCP/") == 2 and "| **frontend/web** |" in md
    _, dot, _ = run(capsys, *args, "dot")
    assert '"frontend/web" -> "backend/api" [label="TCP/8000",' in dot
    assert '"backend/api" -> "db/postgres" [label="TCP/5432",' in dot
    assert '"frontend/admin" -> "backend/api"' not in dot


def test_matrix_protocols_and_bad_port(capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run_json(capsys, "matrix", "-f", CLUSTER, V1, "--protocol", "udp")
    assert code == 0 and [(t["protocol"], t["port"]) for t in data["tables"]] == [("UDP", 53)]
    code, out, err = run(capsys, "matrix", "-f", CLUSTER, V1, "--port", "70000")
    assert code == 2 and out == "" and "--port 70000" in err


# ---- explain ---------------------------------------------------------------------------


def test_explain_allowed(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "explain", "-f", CLUSTER, V1, "--from", "frontend/web",
                       "--to", "backend/api", "--port", "api")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "ALLOWED: frontend/web -> backend/api TCP/8000 (port 'api' of backend/api)"
    assert "frontend/web is not isolated for egress" in lines[1]
    assert lines[2].startswith("  ingress: allowed: backend/api is isolated for ingress by "
                               "policies backend/allow-prometheus, backend/allow-web-to-api, "
                               "backend/default-deny; allowed by:")
    assert lines[3].strip() == ("NetworkPolicy backend/allow-web-to-api ingress[0] from[0] "
                                "(namespaces [tier=frontend] and pods [app=web]) "
                                "ports[0] (TCP/api)")


def test_explain_denied_names_every_rule(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "explain", "-f", CLUSTER, V1, "--from", "backend/worker",
                       "--to", "db/postgres", "--port", "5432")
    assert code == 1
    assert out.startswith("DENIED: backend/worker -> db/postgres TCP/5432\n")
    assert "none allows TCP/5432 to db/postgres:" in out
    assert "none allows TCP/5432 from backend/worker:" in out
    assert "backend/default-deny: no egress rules: it allows no egress at all" in out
    assert ("db/allow-backend ingress[0]: does not match: backend/worker is none of its peers"
            in out)
    assert "pod labels (app=worker) are not selected" in out
    assert "TCP/5432 is not in its ports (UDP/53, TCP/53)" in out


def test_explain_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run_json(capsys, "explain", "-f", CLUSTER, V1, "--from", "frontend/admin",
                          "--to", "backend/api", "--port", "api")
    assert code == 1
    assert data["allowed"] is False
    assert data["flow"] == {"from": "frontend/admin", "from_ip": "10.0.1.20",
                            "to": "backend/api", "to_ip": "10.0.2.10", "protocol": "TCP",
                            "port": 8000, "port_name": "api"}
    assert data["egress"]["isolated"] is False and data["egress"]["allowed"] is True
    ingress = data["ingress"]
    assert ingress["policies"] == ["backend/allow-prometheus", "backend/allow-web-to-api",
                                   "backend/default-deny"]
    assert ingress["allowed_by"] == []
    rules = {(r["policy"], r["rule"]): r for r in ingress["rules"]}
    assert set(rules) == {("backend/allow-prometheus", 0), ("backend/allow-web-to-api", 0),
                          ("backend/default-deny", None)}
    assert not any(r["matches"] for r in ingress["rules"])


def test_explain_ip_and_self(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "explain", "-f", CLUSTER, V1, "--from", "10.0.1.10",
                       "--to", "10.0.2.10", "--port", "8000")
    assert code == 0 and out.startswith("ALLOWED: frontend/web -> backend/api TCP/8000")
    code, out, _ = run(capsys, "explain", "-f", CLUSTER, V1, "--from", "backend/api",
                       "--to", "203.0.113.9", "--port", "443")
    assert code == 1 and "203.0.113.9 is none of its peers" in out
    code, out, _ = run(capsys, "explain", "-f", CLUSTER, V1, "--from", "db/postgres",
                       "--to", "db/postgres", "--port", "1")
    assert code == 0 and "talking to itself is always allowed" in out


def test_explain_ip_block_except(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pol = tmp_path / "except.yaml"
    pol.write_text("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
                   "metadata: {name: not-web, namespace: db}\n"
                   "spec: {podSelector: {}, ingress: [{from: [{ipBlock: "
                   "{cidr: 10.0.0.0/16, except: [10.0.1.0/24]}}]}]}\n")
    code, out, _ = run(capsys, "explain", "-f", CLUSTER, str(pol), "--from", "frontend/web",
                       "--to", "db/postgres", "--port", "5432")
    assert code == 1
    assert ("db/not-web ingress[0]: does not match: frontend/web is none of its peers "
            "(from[0] ipBlock 10.0.0.0/16 except 10.0.1.0/24: 10.0.1.10 is in an except)") in out
    code, out, _ = run(capsys, "explain", "-f", CLUSTER, str(pol), "--from", "backend/api",
                       "--to", "db/postgres", "--port", "5432")
    assert code == 0
    assert "NetworkPolicy db/not-web ingress[0] from[0] (ipBlock 10.0.0.0/16 except " \
           "10.0.1.0/24) (any port)" in out


# ---- coverage ----------------------------------------------------------------------------


def test_coverage_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "coverage", "-f", CLUSTER, V1)
    assert code == 0
    assert "Not isolated for ingress (any pod may connect to them):\n  frontend/admin:" in out
    assert ("  NetworkPolicy frontend/allow-legacy-admin spec.podSelector "
            f"({V1}): podSelector [app=legacy-admin] matches no pod in namespace frontend") in out
    assert out.splitlines()[-1] == (
        "7 pods, 8 policies: 4 not isolated for ingress, 5 not isolated for egress, "
        "1 policy selecting no pod, 1 rule or entry that can never match")
    code, data = run_json(capsys, "coverage", "-f", CLUSTER, V1)
    assert code == 0
    kinds: dict[str, list[str]] = {}
    for g in data["gaps"]:
        kinds.setdefault(g["kind"], []).append(g["subject"])
    assert kinds == {
        "unisolated-ingress": ["frontend/admin", "frontend/web", "kube-system/coredns",
                               "monitoring/prometheus"],
        "unisolated-egress": ["db/postgres", "frontend/admin", "frontend/web",
                              "kube-system/coredns", "monitoring/prometheus"],
        "unused-policy": ["NetworkPolicy frontend/allow-legacy-admin"],
        "dead-peer": ["NetworkPolicy db/allow-backend"],
    }


def test_coverage_without_pods_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "coverage", "-f", V2)
    assert code == 0
    assert "no Pod in the files" in err
    assert out.splitlines()[-1].startswith("0 pods, 6 policies: 0 not isolated")


# ---- lint --------------------------------------------------------------------------------


def test_lint_v1_has_only_notes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "lint", "-f", CLUSTER, V1)
    assert code == 0
    assert out.splitlines()[-1] == "0 warnings, 4 notes"
    assert (f"{V1}:68: NetworkPolicy backend/allow-prometheus: spec.ingress[0].ports[0]: SK009 "
            "note: TCP port 'metrics' is 9090 on backend/api; 9100 on backend/worker") in out


def test_lint_v2_flags_the_split_peer(capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run_json(capsys, "lint", "-f", CLUSTER, V2)
    assert code == 1
    assert (data["warnings"], data["notes"]) == (1, 3)
    (warning,) = [f for f in data["findings"] if f["severity"] == "warning"]
    assert (warning["code"], warning["subject"], warning["where"]) == (
        "SK001", "NetworkPolicy backend/allow-web-to-api", "spec.ingress[0].from")
    code, out, _ = run(capsys, "lint", "-f", CLUSTER, V2, "--ignore", "sk001,SK005")
    assert code == 0 and out == "0 warnings, 0 notes\n"


def test_lint_policy_defined_twice(tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    again = tmp_path / "again.yaml"
    again.write_text("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
                     "metadata: {name: default-deny, namespace: db}\n"
                     "spec: {podSelector: {}, policyTypes: [Ingress, Egress]}\n")
    code, data = run_json(capsys, "lint", "-f", CLUSTER, V1, str(again))
    assert code == 1
    found = {(f["code"], f["where"]): f for f in data["findings"]}
    assert f"also in {V1}" in found[("SK008", "metadata.name")]["message"]
    # The second definition (with Egress) is the one in force: postgres loses DNS.
    assert found[("SK003", "spec")]["message"].startswith("pod db/postgres is isolated")


def test_lint_unknown_ignore_code(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "lint", "-f", V1, "--ignore", "SK999")
    assert code == 2 and out == "" and "SK999" in err


# ---- diff --------------------------------------------------------------------------------


def test_diff_v1_to_v2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "diff", "-f", CLUSTER, V1, "--against", V2)
    assert code == 1
    assert out.splitlines() == [
        "+ backend/worker -> db/postgres TCP/5432 (opened by NetworkPolicy backend/allow-to-db "
        "(new) egress[0] and NetworkPolicy db/allow-backend ingress[0])",
        "+ frontend/admin -> backend/api TCP/8000 (opened by NetworkPolicy "
        "backend/allow-web-to-api ingress[0])",
        "- monitoring/prometheus -> backend/api TCP/9090 (closed: NetworkPolicy "
        "backend/allow-prometheus (removed) ingress[0] no longer allows it)",
        "- monitoring/prometheus -> backend/worker TCP/9100 (closed: NetworkPolicy "
        "backend/allow-prometheus (removed) ingress[0] no longer allows it)",
        "2 opened, 2 closed (each line: one pod pair and its ports)",
    ]


def test_diff_json_and_no_change(capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run_json(capsys, "diff", "-f", V1, "--against", CLUSTER, V2)
    assert code == 1  # the pods may come from either side
    assert [(c["from"], c["to"]) for c in data["opened"]] == [
        ("backend/worker", "db/postgres"), ("frontend/admin", "backend/api")]
    assert data["opened"][0]["ports"] == [{"protocol": "TCP", "ranges": [[5432, 5432]]}]
    assert len(data["closed"]) == 2
    code, out, _ = run(capsys, "diff", "-f", CLUSTER, V1, "-a", V1)
    assert code == 0 and out == "no connection opened or closed\n"
