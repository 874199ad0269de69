"""Outputs for CI: file and line in lint and validate, SARIF 2.1.0 for code scanning,
coverage --fail-on, conformance -o junit|json, and explain's JSON without magic
numbers."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
import yaml
from tests.support import shared

from stockade.cli.main import main
from stockade.engine import coverage as cov
from stockade.engine.lint import CHECKS
from stockade.load import object_lines

ROOT = Path(__file__).resolve().parents[2]
EX = ROOT / "examples"
CLUSTER, V1, V2 = (str(EX / f) for f in ("cluster.yaml", "policies.yaml", "policies-v2.yaml"))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def start_line(path: str, kind: str, key: str) -> int:
    """The first line, not a comment, of the document of `kind` `ns/name` in a file of
    `---`-separated documents, found by reading it as a person would."""
    number = 1
    for chunk in Path(path).read_text().split("\n---\n"):
        doc = yaml.safe_load(chunk)
        first = next(i for i, line in enumerate(chunk.splitlines())
                     if line.strip() and not line.startswith("#"))
        meta = doc["metadata"]
        if doc["kind"] == kind and f"{meta.get('namespace', 'default')}/{meta['name']}" == key:
            return number + first
        number += chunk.count("\n") + 2
    raise AssertionError(f"{kind} {key} not in {path}")


# ---- where each object starts --------------------------------------------------------------


def test_object_lines_of_documents_and_list_items() -> None:
    text = ("# a comment\n"            # 1
            "apiVersion: v1\n"         # 2  first document
            "kind: Namespace\n"
            "metadata: {name: a}\n"
            "---\n"                    # 5
            "---\n"                    # 6  an empty document
            "kind: List\n"             # 7
            "items:\n"
            "- kind: Pod\n"            # 9  first item
            "  metadata: {name: p}\n"
            "-   kind: Pod\n"          # 11 second item
            "    metadata: {name: q}\n"
            "---\n"
            '{"kind": "PodList", "items": [\n'  # 14
            '  {"kind": "Pod"},\n'    # 15
            '  {"kind": "Pod"}]}\n')  # 16
    assert object_lines(text) == [2, 9, 11, 15, 16]
    assert object_lines('{"kind": "Pod",\n "metadata": {}}') == [1]
    assert object_lines("key: [unclosed") == []


# ---- lint and validate: file and line ------------------------------------------------------


def test_lint_names_file_and_line_of_every_finding(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "lint", "-f", CLUSTER, V2)
    assert code == 1
    findings = out.splitlines()[:-1]
    assert findings
    for line in findings:
        m = re.match(r"(?P<file>[^:]+):(?P<line>\d+): NetworkPolicy (?P<key>[^/]+/[^:,]+)"
                     r"(:|,)", line)
        assert m, line
        assert m["file"] == V2
        assert int(m["line"]) == start_line(V2, "NetworkPolicy", m["key"]), line
    _, out, _ = run(capsys, "lint", "-f", CLUSTER, V2, "-o", "json")
    data = json.loads(out)
    assert all(f["line"] == start_line(V2, "NetworkPolicy",
                                       f["subject"].split(", ")[0].split(" ")[1])
               for f in data["findings"])


def test_lint_lines_inside_a_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = list(yaml.safe_load_all(Path(V2).read_text()))
    path = tmp_path / "dump.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": docs,
                                    "metadata": {}}))
    _, out, _ = run(capsys, "lint", "-f", CLUSTER, str(path), "-o", "json")
    found = json.loads(out)["findings"]
    assert found
    text = path.read_text().splitlines()
    for f in found:
        name = f["subject"].split(", ")[0].split("/")[1]
        line = f["line"]
        # The item's first line is inside the List, and the item it starts is that policy.
        item = yaml.safe_load("\n".join(text[line - 1:]).lstrip("- ").split("\n- ")[0]
                              .replace("\n  ", "\n"))
        assert item["metadata"]["name"] == name, (f, item)


def test_validate_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = Path(V1).read_text()
    bad = ("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
           "metadata: {name: bad, namespace: x}\n"
           "spec:\n  podSelector: {}\n  ingress:\n  - ports: [{port: 80, endPort: 70}]\n")
    typo = bad.replace("name: bad", "name: typo").replace("ingress:", "ingres:")
    path = tmp_path / "p.yaml"
    path.write_text(good + "---\n" + bad + "---\n" + typo)
    code, _, err = run(capsys, "validate", "-f", str(path))
    assert code == 2
    bad_line = good.count("\n") + 2
    typo_line = bad_line + bad.count("\n") + 1
    assert err.splitlines() == [
        f"{path}:{bad_line}: NetworkPolicy x/bad: spec.ingress[0].ports[0].endPort: Invalid "
        "value: 70: must be greater than or equal to `port`",
        f"{path}:{typo_line}: NetworkPolicy x/typo: spec.ingres: unknown field",
    ]
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: v1\nkind: [\n")
    code, out, _ = run(capsys, "validate", "-f", str(broken), "-o", "json")
    (problem,) = json.loads(out)["problems"]
    assert (code, problem["rule"], problem["line"]) == (2, "SV003", 3)


# ---- SARIF ---------------------------------------------------------------------------------

LEVELS = {"none", "note", "warning", "error"}


def check_sarif(log: dict[str, Any]) -> list[dict[str, Any]]:
    """The structure SARIF 2.1.0 requires of what stockade writes (the schema's
    required properties and types, and no property the schema does not define);
    the results."""
    assert set(log) <= {"$schema", "version", "runs"}
    assert log["version"] == "2.1.0"
    assert log["$schema"].endswith("sarif-2.1.0.json")
    (run_,) = log["runs"]
    assert set(run_) <= {"tool", "results"}
    driver = run_["tool"]["driver"]
    assert set(driver) <= {"name", "version", "rules"}
    assert isinstance(driver["name"], str) and driver["name"]
    ids = []
    for rule in driver["rules"]:
        assert set(rule) <= {"id", "name", "shortDescription", "defaultConfiguration"}
        assert isinstance(rule["id"], str) and rule["id"]
        assert isinstance(rule["shortDescription"]["text"], str)
        assert rule["defaultConfiguration"]["level"] in LEVELS
        ids.append(rule["id"])
    assert len(set(ids)) == len(ids)
    for result in run_["results"]:
        assert set(result) <= {"ruleId", "ruleIndex", "level", "message", "locations"}
        assert result["ruleId"] in ids
        assert ids[result["ruleIndex"]] == result["ruleId"]
        assert result["level"] in LEVELS
        assert isinstance(result["message"]["text"], str) and result["message"]["text"]
        (location,) = result["locations"]
        physical = location["physicalLocation"]
        assert set(physical) <= {"artifactLocation", "region"}
        uri = physical["artifactLocation"]["uri"]
        assert isinstance(uri, str) and uri and " " not in uri
        if "region" in physical:
            assert isinstance(physical["region"]["startLine"], int)
            assert physical["region"]["startLine"] >= 1
        for logical in location.get("logicalLocations", []):
            assert isinstance(logical["fullyQualifiedName"], str)
    results: list[dict[str, Any]] = run_["results"]
    return results


def test_lint_sarif(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "lint", "-f", CLUSTER, V2, "-o", "sarif")
    assert code == 1  # the exit status is lint's, whatever the format
    log = json.loads(out)
    results = check_sarif(log)
    assert [r["id"] for r in log["runs"][0]["tool"]["driver"]["rules"]] == list(CHECKS)
    _, as_json, _ = run(capsys, "lint", "-f", CLUSTER, V2, "-o", "json")
    findings = json.loads(as_json)["findings"]
    assert len(results) == len(findings) > 0
    for r, f in zip(results, findings, strict=True):
        assert (r["ruleId"], r["level"]) == (f["code"], f["severity"])
        physical = r["locations"][0]["physicalLocation"]
        assert physical["artifactLocation"]["uri"] == Path(V2).as_uri()
        assert physical["region"]["startLine"] == f["line"]
        assert f["message"] in r["message"]["text"]


def test_sarif_uris_stay_relative(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "k8s dir").mkdir()
    shutil.copy(V2, tmp_path / "k8s dir" / "policies.yaml")
    shutil.copy(CLUSTER, tmp_path / "cluster.yaml")
    monkeypatch.chdir(tmp_path)
    _, out, _ = run(capsys, "lint", "-f", "cluster.yaml", "./k8s dir/policies.yaml",
                    "-o", "sarif")
    uris = {r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
            for r in check_sarif(json.loads(out))}
    assert uris == {"k8s%20dir/policies.yaml"}


def test_validate_sarif(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    bad = ("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
           "metadata: {name: bad, namespace: x}\n"
           "spec:\n  podSelector: {}\n  ingress:\n  - ports: [{port: 80, endPort: 70}]\n"
           "  - from: [{}]\n")
    monkeypatch.chdir(tmp_path)
    Path("bad.yaml").write_text("# first\n" + bad)
    code, out, _ = run(capsys, "validate", "-f", "bad.yaml", "-o", "sarif")
    assert code == 2
    results = check_sarif(json.loads(out))
    assert [(r["ruleId"], r["level"]) for r in results] == [("SV001", "error")] * 2
    assert {r["locations"][0]["physicalLocation"]["region"]["startLine"] for r in results} \
        == {2}
    assert all(r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "bad.yaml"
               for r in results)
    # Nothing wrong: an empty run, exit 0.
    code, out, _ = run(capsys, "validate", "-f", V1, "-o", "sarif")
    assert code == 0 and check_sarif(json.loads(out)) == []
    # Standard input is named as such.
    monkeypatch.setattr("sys.stdin", io.StringIO(bad))
    _, out, _ = run(capsys, "validate", "-f", "-", "-o", "sarif")
    assert {r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
            for r in check_sarif(json.loads(out))} == {"stdin"}


# ---- coverage --fail-on --------------------------------------------------------------------


def test_coverage_fail_on(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "coverage", "-f", CLUSTER, V1, "-o", "json")
    counts = json.loads(out)["counts"]
    present = [k for k in cov.KINDS if counts[k]]
    absent = [k for k in cov.KINDS if not counts[k]]
    assert present and absent
    code, out2, _ = run(capsys, "coverage", "-f", CLUSTER, V1, "-o", "json",
                        "--fail-on", present[0])
    assert code == 1 and out2 == out  # the report is the same; only the status differs
    assert run(capsys, "coverage", "-f", CLUSTER, V1, "--fail-on", *absent)[0] == 0
    assert run(capsys, "coverage", "-f", CLUSTER, V1, "--fail-on",
               f"{absent[0]},{present[-1]}")[0] == 1
    # Only the findings shown count: a namespace without that finding passes.
    assert run(capsys, "coverage", "-f", CLUSTER, V1, "-n", "nowhere",
               "--fail-on", *present)[0] == 0


def test_coverage_fail_on_an_unknown_code(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "coverage", "-f", CLUSTER, V1, "--fail-on", "dead-rules")
    assert (code, out) == (2, "")
    assert "--fail-on dead-rules: no such coverage finding" in err
    assert all(k in err for k in cov.KINDS)


# ---- conformance -o junit|json -------------------------------------------------------------


def conformance_dir(tmp_path: Path) -> tuple[Path, int]:
    corpus = shared("conformance")
    cases = sorted(p for p in corpus.glob("cyc-egress-*.yaml"))[:3]
    for p in [*cases, corpus / "standard-cluster.yaml"]:
        shutil.copy(p, tmp_path / p.name)
    wrong = yaml.safe_load(cases[0].read_text())
    wrong["id"] = "wrong-on-purpose"
    group = wrong["probes"][0]
    group["default"] = "deny" if group["default"] == "allow" else "allow"
    (tmp_path / "zz-wrong.yaml").write_text(yaml.safe_dump(wrong))
    return tmp_path, len(cases) + 1


def test_conformance_junit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, count = conformance_dir(tmp_path)
    code, out, _ = run(capsys, "conformance", str(folder), "-o", "junit")
    assert code == 1
    suite = ElementTree.fromstring(out.split("?>", 1)[1])
    assert suite.tag == "testsuite"
    cases = suite.findall("testcase")
    assert len(cases) == count == int(suite.get("tests", ""))
    assert suite.get("failures") == "1"
    (failed,) = [c for c in cases if c.find("failure") is not None]
    assert failed.get("name") == "wrong-on-purpose"
    failure = failed.find("failure")
    assert failure is not None
    assert "wrong verdict" in failure.get("message", "")
    pairs = (failure.text or "").splitlines()
    assert pairs and all(p.startswith("FAIL wrong-on-purpose: ") and "expected" in p
                         for p in pairs)
    assert all(float(c.get("time", "")) >= 0 for c in cases)


def test_conformance_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, count = conformance_dir(tmp_path)
    code, out, _ = run(capsys, "conformance", str(folder), "-o", "json")
    data = json.loads(out)
    assert code == 1
    assert (data["passed"], data["failed"], data["datapath"]) == (count - 1, 1, "model")
    assert [c["id"] for c in data["cases"]][-1] == "wrong-on-purpose"
    for case in data["cases"]:
        assert set(case) >= {"id", "passed", "failures"}
        assert case["passed"] == (not case["failures"])
    # The txt output is the same failures, line for line.
    _, txt, _ = run(capsys, "conformance", str(folder))
    assert [line for line in txt.splitlines() if line.startswith("FAIL")] \
        == data["cases"][-1]["failures"]


# ---- explain's JSON: no magic numbers ------------------------------------------------------


def negatives(data: Any, path: str = "") -> list[str]:
    if isinstance(data, bool):
        return []
    if isinstance(data, int):
        return [path] if data < 0 else []
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in negatives(v, f"{path}.{k}")]
    if isinstance(data, list):
        return [p for i, v in enumerate(data) for p in negatives(v, f"{path}[{i}]")]
    return []


def test_explain_json_says_any(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "open.yaml"
    path.write_text("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
                    "metadata: {name: any, namespace: backend}\n"
                    "spec:\n  podSelector: {}\n  ingress:\n  - {}\n")
    code, out, _ = run(capsys, "explain", "-f", CLUSTER, str(path), "--from", "frontend/web",
                       "--to", "backend/api", "--port", "8000", "-o", "json")
    data = json.loads(out)
    assert code == 0
    assert negatives(data) == []
    (ref,) = data["ingress"]["allowed_by"]
    assert (ref["peer"], ref["any_peer"], ref["port"], ref["any_port"]) == (None, True, None, True)
    # A denied flow through a policy without rules for the direction: rule null.
    code, out, _ = run(capsys, "explain", "-f", CLUSTER, V1, "--from", "frontend/admin",
                       "--to", "backend/api", "--port", "8000", "-o", "json")
    data = json.loads(out)
    assert code == 1 and negatives(data) == []
    assert {r["policy"]: r["rule"] for r in data["ingress"]["rules"]}["backend/default-deny"] \
        is None
    # Every explain of the examples: never a negative number.
    for src, dst, port in [("frontend/web", "backend/api", "api"),
                           ("backend/api", "db/postgres", "5432"),
                           ("backend/api", "8.8.8.8", "53")]:
        _, out, _ = run(capsys, "explain", "-f", CLUSTER, V1, "--from", src, "--to", dst,
                        "--port", port, "-o", "json")
        assert negatives(json.loads(out)) == [], (src, dst)
