"""The flags every file-reading command shares (cli/inputs.py): -f, -R and -, the
filters -n/-A/-l/--focus-workload (what is shown, never what is analysed), the
output names of -o, and `-n` meaning a namespace in every command."""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from stockade.cli.inputs import Focus, parse_selector
from stockade.cli.main import COMMANDS, build_parser, main
from stockade.errors import InputError
from stockade.model.cluster import Endpoint
from stockade.model.labels import Labels

ROOT = Path(__file__).resolve().parents[2]
EX = ROOT / "examples"
CLUSTER, V1, V2 = (str(EX / f) for f in ("cluster.yaml", "policies.yaml", "policies-v2.yaml"))

# What `kubectl get ns,pods,deploy,netpol -A -o yaml` prints: one List whose items carry
# server-set fields; a Pod of a StatefulSet without an IP yet, a Deployment and its Pod.
DUMP = """\
apiVersion: v1
items:
- apiVersion: v1
  kind: Namespace
  metadata:
    labels: {kubernetes.io/metadata.name: shop}
    name: shop
    resourceVersion: "11"
    uid: 0b5c
  spec: {finalizers: [kubernetes]}
  status: {phase: Active}
- apiVersion: v1
  kind: Namespace
  metadata:
    labels: {kubernetes.io/metadata.name: ops}
    name: ops
  status: {phase: Active}
- apiVersion: v1
  kind: Pod
  metadata:
    creationTimestamp: "2026-01-02T03:04:05Z"
    labels: {app: db}
    name: db-0
    namespace: shop
    ownerReferences:
    - {apiVersion: apps/v1, blockOwnerDeletion: true, controller: true, kind: StatefulSet,
       name: db, uid: 77aa}
  spec:
    containers:
    - image: postgres:16
      name: pg
      ports: [{containerPort: 5432, name: pg, protocol: TCP}]
  status: {phase: Pending, qosClass: BestEffort}
- apiVersion: v1
  kind: Pod
  metadata:
    labels: {app: probe, team: ops}
    name: prober
    namespace: ops
  spec:
    containers: [{image: busybox, name: probe}]
  status: {phase: Running, podIP: 10.244.1.7, podIPs: [{ip: 10.244.1.7}]}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {generation: 3, name: web, namespace: shop}
  spec:
    replicas: 2
    selector: {matchLabels: {app: web}}
    template:
      metadata: {labels: {app: web, tier: front}}
      spec:
        containers:
        - image: web:1
          name: web
          ports: [{containerPort: 8080, name: http}]
  status: {availableReplicas: 2}
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: db, namespace: shop}
  spec:
    podSelector: {matchLabels: {app: db}}
    ingress:
    - from: [{podSelector: {matchLabels: {app: web}}}]
      ports: [{port: pg}]
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: web, namespace: shop}
  spec:
    podSelector: {matchLabels: {app: web}}
    policyTypes: [Ingress]
    ingress:
    - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ops}}}]
      ports: [{port: 8080}]
kind: List
metadata: {resourceVersion: ""}
"""

DUMP_LIST = """\
0.0.0.0-255.255.255.255[External] => ops/prober[Pod] : All Connections
ops/prober[Pod] => 0.0.0.0-255.255.255.255[External] : All Connections
ops/prober[Pod] => shop/web[Deployment] : TCP 8080
shop/db[StatefulSet] => 0.0.0.0-255.255.255.255[External] : All Connections
shop/db[StatefulSet] => ops/prober[Pod] : All Connections
shop/web[Deployment] => 0.0.0.0-255.255.255.255[External] : All Connections
shop/web[Deployment] => ops/prober[Pod] : All Connections
shop/web[Deployment] => shop/db[StatefulSet] : TCP 5432
"""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def stdin(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(text))


# ---- -f, -R and - --------------------------------------------------------------------------


def test_a_kubectl_dump_on_stdin(capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    stdin(monkeypatch, DUMP)
    code, out, err = run(capsys, "list", "-f", "-")
    assert code == 0
    assert out == DUMP_LIST
    assert "Traceback" not in err
    # The Pending Pod (no IP) is its StatefulSet; the matrix reads the dump as well.
    stdin(monkeypatch, DUMP)
    code, out, _ = run(capsys, "matrix", "-f", "-", "--port", "5432", "-o", "json")
    data = json.loads(out)
    assert code == 0
    assert data["tables"][0]["allowed"]["shop/web[Deployment]"]["shop/db-0"] is True
    assert data["tables"][0]["allowed"]["ops/prober"]["shop/db-0"] is False


def test_files_repeat_take_several_values_and_directories(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, whole, _ = run(capsys, "list", "-f", CLUSTER, V1)
    assert whole
    _, repeated, _ = run(capsys, "list", "-f", CLUSTER, "-f", V1)
    assert repeated == whole
    (tmp_path / "deep" / "er").mkdir(parents=True)
    shutil.copy(CLUSTER, tmp_path / "cluster.yaml")
    shutil.copy(V1, tmp_path / "deep" / "er" / "policies.yml")
    (tmp_path / "notes.txt").write_text("not a manifest")
    # Without -R a directory is its own files only: the policies are not read.
    _, shallow, _ = run(capsys, "list", "-f", str(tmp_path))
    assert shallow != whole
    _, deep, _ = run(capsys, "list", "-f", str(tmp_path), "-R")
    assert deep == whole
    # Every file-reading command takes the same.
    for argv in (["coverage"], ["lint"], ["matrix"], ["compile"], ["validate"]):
        code, _, err = run(capsys, *argv, "-R", "-f", str(tmp_path))
        assert code in (0, 1), (argv, err)


def test_stdin_and_files_together(capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _, whole, _ = run(capsys, "coverage", "-f", CLUSTER, V1, "-o", "json")
    stdin(monkeypatch, Path(V1).read_text())
    _, mixed, _ = run(capsys, "coverage", "-f", CLUSTER, "-", "-o", "json")
    assert json.loads(mixed)["counts"] == json.loads(whole)["counts"]


# ---- label selectors -----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "matching", "not_matching"), [
    ("a=b", [{"a": "b"}, {"a": "b", "c": "d"}], [{}, {"a": "c"}]),
    ("a==b", [{"a": "b"}], [{"a": "x"}]),
    ("c!=d", [{}, {"c": "x"}], [{"c": "d"}]),
    ("e in (x,y)", [{"e": "x"}, {"e": "y"}], [{"e": "z"}, {}]),
    ("e notin (x, y)", [{}, {"e": "z"}], [{"e": "x"}]),
    ("!f", [{}, {"g": "1"}], [{"f": ""}]),
    ("g", [{"g": ""}], [{}]),
    ("app.kubernetes.io/name=web", [{"app.kubernetes.io/name": "web"}], [{"app": "web"}]),
    ("a=b,c!=d,e in (x,y),!f,g", [{"a": "b", "e": "y", "g": "1"}],
     [{"a": "b", "e": "y", "g": "1", "f": "1"}, {"a": "b", "c": "d", "e": "x", "g": ""},
      {"a": "b", "e": "y"}]),
    ("a=", [{"a": ""}], [{"a": "b"}, {}]),
])
def test_selectors_as_kubectl_reads_them(text: str, matching: list[dict[str, str]],
                                         not_matching: list[dict[str, str]]) -> None:
    selector = parse_selector(text)
    for labels in matching:
        assert selector.matches(Labels(labels)), (text, labels)
    for labels in not_matching:
        assert not selector.matches(Labels(labels)), (text, labels)


@pytest.mark.parametrize("text", ["a in ()", "a in (x", "=b", "a=b=c", "a in x", "!", "a b"])
def test_bad_selectors_are_bad_input(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InputError):
        parse_selector(text)
    with pytest.raises(SystemExit) as exc:
        main(["list", "-f", CLUSTER, "-l", text])
    assert exc.value.code == 2
    assert "-l" in capsys.readouterr().err


def test_focus_names() -> None:
    pod = Endpoint("shop", "web-1", Labels({}), ())
    workload = Endpoint("shop", "web[Deployment]", Labels({}), ())
    assert Focus.parse("web").matches(workload)
    assert Focus.parse("shop/web").matches(workload)
    assert Focus.parse("shop/web[Deployment]").matches(workload)
    assert not Focus.parse("shop/web[StatefulSet]").matches(workload)
    assert not Focus.parse("ops/web").matches(workload)
    assert Focus.parse("web-1").matches(pod)
    assert Focus.parse("shop/web").matches(pod, ("Deployment", "web"))  # its controller
    assert not Focus.parse("web").matches(pod)


# ---- filters: what is shown, never what is analysed ----------------------------------------


def lines(text: str) -> set[str]:
    return set(text.splitlines())


def test_list_filters_show_a_subset_with_the_same_verdicts(
        capsys: pytest.CaptureFixture[str]) -> None:
    _, whole, _ = run(capsys, "list", "-f", CLUSTER, V1)
    for flags, involved in [(["-n", "db"], ["db/"]),
                            (["-l", "app=api"], ["backend/api["]),
                            (["-l", "app in (web,admin)"], ["frontend/web[", "frontend/admin["]),
                            (["--focus-workload", "backend/api"], ["backend/api["]),
                            (["--focus-workload", "api"], ["backend/api["]),
                            (["--focus-workload", "postgres", "-n", "backend"], ["db/postgres["]),
                            ]:
        code, out, _ = run(capsys, "list", "-f", CLUSTER, V1, *flags)
        assert code == 0
        shown = lines(out)
        assert shown and shown < lines(whole), flags
        for line in shown:
            src, dst = line.split(" : ")[0].split(" => ")
            assert any(src.startswith(i) or dst.startswith(i) for i in involved), (flags, line)
        # Every line of the whole list that involves the selection is there.
        missing = [w for w in lines(whole) - shown
                   if flags[0] == "-n" and (" db/" in w or w.startswith("db/"))]
        assert not missing
    code, out, _ = run(capsys, "list", "-f", CLUSTER, V1, "-A")
    assert (code, out) == (0, whole)


def test_focus_and_namespace_together_need_both(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "list", "-f", CLUSTER, V1, "--focus-workload", "postgres",
                       "-n", "backend")
    assert code == 0
    assert lines(out) == {"backend/api[Pod] => db/postgres[Pod] : TCP 5432"}


def test_focus_on_nothing_is_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("list", "matrix"):
        code, out, err = run(capsys, command, "-f", CLUSTER, V1, "--focus-workload", "nope")
        assert (code, out) == (2, ""), command
        assert "--focus-workload nope: no such workload" in err


def test_namespace_and_all_namespaces_exclude_each_other(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["list", "-f", CLUSTER, "-n", "db", "-A"])
    capsys.readouterr()


def test_matrix_filters_keep_the_verdicts(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "matrix", "-f", CLUSTER, V1, "-o", "json")
    whole = json.loads(out)
    code, out, _ = run(capsys, "matrix", "-f", CLUSTER, V1, "-o", "json", "-n", "backend")
    part = json.loads(out)
    assert code == 0
    assert part["pods"] == [p for p in whole["pods"] if p.startswith("backend/")]
    for t_whole, t_part in zip(whole["tables"], part["tables"], strict=True):
        for src, row in t_part["allowed"].items():
            assert set(row) == set(part["pods"])
            for dst, cell in row.items():
                assert cell == t_whole["allowed"][src][dst]
    # The focus: its pods and every pod it reaches or is reached from.
    _, out, _ = run(capsys, "matrix", "-f", CLUSTER, V1, "-o", "json", "--port", "5432")
    allowed = json.loads(out)["tables"][0]["allowed"]
    _, out, _ = run(capsys, "matrix", "-f", CLUSTER, V1, "-o", "json", "--port", "5432",
                    "--focus-workload", "db/postgres")
    focus = json.loads(out)
    near = {p for p in allowed if allowed[p]["db/postgres"] or allowed["db/postgres"][p]}
    assert set(focus["pods"]) == near
    assert "backend/api" in near and "backend/worker" not in near
    # With -l as well: only the pods selected, around the focus.
    _, out, _ = run(capsys, "matrix", "-f", CLUSTER, V1, "-o", "json", "--port", "5432",
                    "--focus-workload", "db/postgres", "-l", "app in (api,postgres,worker)")
    assert json.loads(out)["pods"] == ["backend/api", "db/postgres"]


def test_diff_filters(capsys: pytest.CaptureFixture[str]) -> None:
    code, whole, _ = run(capsys, "diff", "-f", CLUSTER, V1, "-a", V2, "-o", "json")
    assert code == 1
    changes = json.loads(whole)
    every = changes["opened"] + changes["closed"]
    assert any(c["from"].startswith("frontend/") or c["to"].startswith("frontend/")
               for c in every)
    code, out, _ = run(capsys, "diff", "-f", CLUSTER, V1, "-a", V2, "-o", "json", "-n", "db")
    part = json.loads(out)
    shown = part["opened"] + part["closed"]
    assert shown and all("db/" in (c["from"] + c["to"]) for c in shown)
    assert all(c in every for c in shown)
    # A namespace where nothing changes: no difference shown, exit 0 as diff(1).
    code, out, _ = run(capsys, "diff", "-f", CLUSTER, V1, "-a", V2, "-n", "kube-system",
                       "-o", "txt")
    assert code == 0 and out == "no connection opened or closed\n"


def test_coverage_and_lint_filters(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "coverage", "-f", CLUSTER, V1, "-o", "json")
    whole = json.loads(out)["gaps"]
    _, out, _ = run(capsys, "coverage", "-f", CLUSTER, V1, "-o", "json", "-n", "frontend")
    part = json.loads(out)["gaps"]
    assert part and all("frontend/" in g["subject"] for g in part)
    assert part == [g for g in whole if "frontend/" in g["subject"]]
    _, out, _ = run(capsys, "lint", "-f", CLUSTER, V1, "-o", "json", "-n", "db")
    found = json.loads(out)["findings"]
    assert found and all(f["subject"].startswith("NetworkPolicy db/") for f in found)


# ---- -o ------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["list", "-f", CLUSTER, V1],
    ["matrix", "-f", CLUSTER, V1, "--port", "80"],
    ["coverage", "-f", CLUSTER, V1],
    ["lint", "-f", CLUSTER, V1],
    ["diff", "-f", CLUSTER, V1, "-a", V2],
    ["explain", "-f", CLUSTER, V1, "--from", "frontend/web", "--to", "backend/api",
     "--port", "api"],
    ["validate", "-f", V1],
])
def test_output_names(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, txt, _ = run(capsys, *argv, "-o", "txt")
    assert txt
    assert run(capsys, *argv, "-o", "text")[:2] == (code, txt)
    assert run(capsys, *argv)[:2] == (code, txt)  # txt is the default
    code_j, as_json, _ = run(capsys, *argv, "-o", "json")
    code_y, as_yaml, _ = run(capsys, *argv, "-o", "yaml")
    assert code_j == code_y == code
    assert yaml.safe_load(as_yaml) == json.loads(as_json)


def test_matrix_table_is_txt(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["matrix", "-f", CLUSTER, V1, "--port", "80"]
    assert run(capsys, *argv, "-o", "table") == run(capsys, *argv, "-o", "txt")


@pytest.mark.parametrize(("argv", "columns"), [
    (["coverage", "-f", CLUSTER, V1], ["kind", "subject", "where", "reason", "source"]),
    (["diff", "-f", CLUSTER, V1, "-a", V2], ["change", "from", "to", "ports", "reason"]),
    (["lint", "-f", CLUSTER, V1],
     ["code", "severity", "subject", "where", "message", "source", "line"]),
])
def test_csv_and_md_tables(argv: list[str], columns: list[str],
                           capsys: pytest.CaptureFixture[str]) -> None:
    _, as_json, _ = run(capsys, *argv, "-o", "json")
    data: Any = json.loads(as_json)
    count = len(data.get("gaps", data.get("findings", [])) or
                data.get("opened", []) + data.get("closed", []))
    _, out, _ = run(capsys, *argv, "-o", "csv")
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == columns
    assert len(rows) - 1 == count > 0
    _, md, _ = run(capsys, *argv, "-o", "md")
    table = md.splitlines()
    assert table[0] == "| " + " | ".join(columns) + " |"
    assert len(table) == count + 2


def test_unknown_output_names_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["coverage", "-f", CLUSTER, "-o", "xml"])
    err = capsys.readouterr().err
    assert "'xml'" in err and "txt, json, yaml, csv, md" in err


# ---- -n means a namespace, everywhere ------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser, path: str = "") -> list[tuple[str, Any]]:
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _parsers(sub, f"{path} {name}".strip())
    return found


def test_dash_n_is_a_namespace_in_every_command() -> None:
    from stockade.cli import kubectl

    parsers = _parsers(build_parser()) + _parsers(kubectl.build_parser(), "kubectl")
    assert len(parsers) > len(COMMANDS)
    checked = 0
    for path, parser in parsers:
        for action in parser._actions:
            if "-n" in action.option_strings:
                assert action.dest == "namespace", path
                assert "--namespace" in action.option_strings, path
                checked += 1
            if "-l" in action.option_strings and path != "run":
                # `stockade run -l` sets a label, as kubectl run -l; elsewhere it selects.
                assert action.dest == "selector", path
    assert checked >= 8


def test_flows_count_is_limit(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert parser.parse_args(["flows", "--limit", "5"]).limit == 5
    with pytest.raises(SystemExit):
        parser.parse_args(["flows", "-n", "5"])
    capsys.readouterr()


def test_explain_takes_the_namespace_of_bare_names(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "explain", "-f", CLUSTER, V1, "-n", "backend",
                       "--from", "api", "--to", "db/postgres", "--port", "5432")
    assert code == 0 and "backend/api" in out
    code, _, err = run(capsys, "explain", "-f", CLUSTER, V1, "--from", "api",
                       "--to", "db/postgres", "--port", "5432")
    assert code == 2 and "no such pod" in err


def _shape(parser: argparse.ArgumentParser) -> list[tuple[str, list[tuple[tuple[str, ...], str]]]]:
    return [(path, [(tuple(a.option_strings), a.dest) for a in p._actions])
            for path, p in _parsers(parser)]


def test_each_command_parses_with_its_own_module_alone() -> None:
    # A command runs with only its module imported (main._MODULE_OF): it must know
    # every command, and each must parse as it does with all of them registered.
    from stockade.cli.main import _MODULE_OF

    whole = build_parser()
    commands = next(a for a in whole._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == set(_MODULE_OF)
    everything = dict(_shape(whole))
    for command in commands.choices:
        alone = dict(_shape(build_parser(command)))
        mine = {path: shape for path, shape in alone.items()
                if path == command or path.startswith(command + " ")}
        assert mine == {path: shape for path, shape in everything.items()
                        if path == command or path.startswith(command + " ")}, command
