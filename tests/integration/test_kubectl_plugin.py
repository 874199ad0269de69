"""`kubectl stockade` against the Kubernetes API test double (tests/support/kubeapi).

The analyses on a cluster must print what the offline commands print on the same
objects (the only difference: messages name `context NAME` where the offline ones
name a file). The plugin also runs as `kubectl stockade …` through the real kubectl,
which finds `kubectl-stockade` on the PATH. `status` is checked against small fake
agents serving /status on loopback addresses (127.0.0.2, 127.0.0.3), as agents on the
host network of two nodes would. No root needed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.support.kubeapi import KubeAPI, kube_api_fixture, kubectl_path

from stockade.cli import kubectl
from stockade.cli import main as offline

kube_api = kube_api_fixture()

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CLUSTER = EXAMPLES / "cluster.yaml"
POLICIES = EXAMPLES / "policies.yaml"
V2 = EXAMPLES / "policies-v2.yaml"
VENV_BIN = Path(sys.executable).parent
SOURCE = "context kubeapi-double"


def docs(*paths: Path) -> list[dict[str, Any]]:
    return [d for p in paths for d in yaml.safe_load_all(p.read_text()) if d]


def load(api: KubeAPI, objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        meta = obj["metadata"]
        kind = obj["kind"]
        if kind == "Namespace" and api.exists("namespaces", meta["name"]):
            continue
        api.create(copy.deepcopy(obj))


@pytest.fixture
def shop(kube_api: KubeAPI, tmp_path: Path) -> Path:
    """The double holding examples/cluster.yaml and policies.yaml; its kubeconfig."""
    load(kube_api, docs(CLUSTER, POLICIES))
    return kube_api.write_kubeconfig(tmp_path / "kubeconfig")


def run(capsys: pytest.CaptureFixture[str], fn: Any, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = fn(argv)
    out, err = capsys.readouterr()
    return code, out, err


def live(capsys: pytest.CaptureFixture[str], cfg: Path, *argv: str) -> tuple[int, str, str]:
    return run(capsys, kubectl.main, [*argv, "--kubeconfig", str(cfg)])


def files(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    return run(capsys, offline.main, list(argv))


def same_source(text: str, *paths: Path | str) -> str:
    """The offline output as the cluster's: its files named as the context, without the
    lines where their objects start (a cluster's objects have none)."""
    for p in paths:
        text = re.sub(re.escape(str(p)) + r":\d+:", f"{SOURCE}:", text)
        text = text.replace(str(p), SOURCE)
    return re.sub(r'"line": \d+', '"line": null', text)


# ---- the analyses: the offline output, read from the cluster ------------------------------

OFFLINE = [str(CLUSTER), str(POLICIES)]

CASES = {
    "matrix": (["matrix"], []),
    "matrix json": (["matrix", "-o", "json"], []),
    "matrix ports": (["matrix", "--port", "5432", "--port", "api", "--protocol", "tcp",
                      "-o", "csv"], []),
    "coverage": (["coverage"], []),
    "coverage json": (["coverage", "-o", "json"], []),
    "lint": (["lint"], []),
    "lint json": (["lint", "-o", "json", "--ignore", "SK005"], []),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_analysis_matches_the_offline_command(case: str, shop: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    argv, _ = CASES[case]
    want = files(capsys, *argv, "-f", *OFFLINE)
    got = live(capsys, shop, *argv, "-A")
    assert got[0] == want[0]
    assert got[1] == same_source(want[1], POLICIES, CLUSTER)
    assert got[1].strip()


def test_validate_matches_the_offline_command(shop: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    want = files(capsys, "validate", str(POLICIES))
    got = live(capsys, shop, "validate", "-A")
    assert got == want
    assert got[1] == "8 NetworkPolicy object(s) valid\n"
    # One namespace: its policies only.
    code, out, _ = live(capsys, shop, "validate", "-n", "backend")
    assert (code, out) == (0, "5 NetworkPolicy object(s) valid\n")


@pytest.mark.parametrize(("src", "dst", "port", "code"), [
    ("frontend/web", "backend/api", "api", 0),
    ("frontend/admin", "backend/api", "8000", 1),
    ("backend/worker", "db/postgres", "postgres", 1),
])
def test_explain_matches_the_offline_command(src: str, dst: str, port: str, code: int,
                                             shop: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    args = ["explain", "--from", src, "--to", dst, "--port", port]
    want = files(capsys, *args, "-f", *OFFLINE)
    # explain reads every namespace whatever -n says; -n names the namespace of bare names.
    got = live(capsys, shop, *args, "-n", "monitoring")
    assert got == want
    assert got[0] == code
    bare = live(capsys, shop, "explain", "--from", src, "--to", dst.split("/")[1],
                "--port", port, "-n", dst.split("/")[0])
    assert bare == want
    assert live(capsys, shop, *args, "-o", "json")[1] == files(capsys, *args, "-o", "json",
                                                                "-f", *OFFLINE)[1]


def test_diff_replace_matches_the_offline_command(shop: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    want = files(capsys, "diff", "-f", *OFFLINE, "--against", str(V2))
    got = live(capsys, shop, "diff", "-A", "--replace", "-f", str(V2))
    assert got == want
    assert got[0] == 1 and "closed" in got[1] and "opened" in got[1]


def test_diff_applies_the_files_over_the_cluster(shop: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # kubectl apply replaces the policies of the same name and keeps the others:
    # the offline equivalent's NEW side is the cluster's policies, then the files'.
    want = files(capsys, "diff", "-f", *OFFLINE, "--against", str(POLICIES), str(V2))
    got = live(capsys, shop, "diff", "-A", "-f", str(V2))
    assert got == want
    assert "2 opened, 0 closed" in got[1]
    # The cluster against itself: no difference.
    assert live(capsys, shop, "diff", "-A", "-f", str(POLICIES))[:2] == (
        0, "no connection opened or closed\n")


def test_diff_files_take_the_namespace_of_the_command(shop: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    deny = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny-all"}, "spec": {"podSelector": {}}}
    path = tmp_path / "deny.yaml"
    path.write_text(yaml.safe_dump(deny))
    code, out, _ = live(capsys, shop, "diff", "-n", "monitoring", "-f", str(path))
    assert code == 1
    assert "-> monitoring/prometheus" in out and "NetworkPolicy monitoring/deny-all (new)" in out
    # With -n, an object of another namespace is refused, as kubectl apply refuses it.
    deny["metadata"]["namespace"] = "db"
    path.write_text(yaml.safe_dump(deny))
    code, out, err = live(capsys, shop, "diff", "-n", "monitoring", "-f", str(path))
    assert (code, out) == (2, "")
    assert "give -n db, or none" in err


def test_namespace_scope(kube_api: KubeAPI, shop: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    """-n NS is the objects of NS; without -n, the context's namespace."""
    backend = [d for d in docs(CLUSTER, POLICIES)
               if d["metadata"].get("namespace") == "backend"
               or (d["metadata"]["name"] == "backend" and d["kind"] == "Namespace")]
    only = tmp_path / "backend.yaml"
    only.write_text(yaml.safe_dump_all(backend))
    for argv in (["matrix"], ["coverage"], ["lint"]):
        want = files(capsys, *argv, "-f", str(only))
        assert live(capsys, shop, *argv, "-n", "backend")[:2] == \
            (want[0], same_source(want[1], only))
    in_backend = kube_api.write_kubeconfig(tmp_path / "backend-kubeconfig", namespace="backend")
    assert live(capsys, in_backend, "matrix") == live(capsys, shop, "matrix", "-n", "backend")
    # -n and -A are exclusive; the options may come before the command too.
    with pytest.raises(SystemExit):
        kubectl.main(["matrix", "-n", "backend", "-A", "--kubeconfig", str(shop)])
    capsys.readouterr()
    assert run(capsys, kubectl.main, ["--kubeconfig", str(shop), "-n", "backend", "matrix"]) \
        == live(capsys, shop, "matrix", "-n", "backend")
    # An empty namespace: no pod, the matrix says so (exit 2), as offline.
    code, out, err = live(capsys, shop, "matrix", "-n", "nowhere")
    assert (code, out) == (2, "")
    assert "no Pod in the cluster" in err


def test_context(kube_api: KubeAPI, shop: Path, tmp_path: Path,
                 capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """--context picks the context; the current one is used otherwise."""
    cfg = yaml.safe_load(shop.read_text())
    cfg["clusters"].append({"name": "gone", "cluster": {"server": "http://127.0.0.1:9"}})
    cfg["contexts"].append({"name": "gone",
                            "context": {"cluster": "gone", "user": "kubeapi-double"}})
    cfg["current-context"] = "gone"
    two = tmp_path / "two-contexts"
    two.write_text(yaml.safe_dump(cfg))
    code, out, err = live(capsys, two, "matrix", "-A")
    assert (code, out) == (2, "")
    assert err.startswith("kubectl stockade: GET /api/v1/namespaces") and "ConnectionError" in err
    assert live(capsys, two, "matrix", "-A", "--context", "kubeapi-double") == \
        live(capsys, shop, "matrix", "-A")
    code, _, err = live(capsys, two, "matrix", "--context", "nope")
    assert code == 2 and "Context 'nope' not found" in err
    # $KUBECONFIG, as kubectl reads it.
    monkeypatch.setenv("KUBECONFIG", str(shop))
    assert run(capsys, kubectl.main, ["matrix", "-A"]) == live(capsys, shop, "matrix", "-A")


def test_pods_policy_does_not_govern_are_left_out(kube_api: KubeAPI, shop: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    before = live(capsys, shop, "matrix", "-A")
    pod = {"apiVersion": "v1", "kind": "Pod",
           "spec": {"containers": [{"name": "c", "image": "x"}]}}
    kube_api.create({**pod, "metadata": {"name": "proxy", "namespace": "kube-system"},
                     "spec": {**pod["spec"], "hostNetwork": True},
                     "status": {"phase": "Running", "podIP": "192.0.2.1"}})
    kube_api.create({**pod, "metadata": {"name": "starting", "namespace": "backend",
                                         "labels": {"app": "api"}}})
    kube_api.create({**pod, "metadata": {"name": "job", "namespace": "backend"},
                     "status": {"phase": "Succeeded", "podIP": "10.0.9.9"}})
    code, out, err = live(capsys, shop, "matrix", "-A")
    assert (code, out) == before[:2]
    assert "left out 1 pod(s) on the host network: kube-system/proxy" in err
    assert "left out 1 pod(s) without an address yet: backend/starting" in err
    assert "left out 1 pod(s) finished: backend/job" in err


def test_invalid_objects_are_reported_like_a_file_s(kube_api: KubeAPI, shop: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # The double does not validate; a real API server would refuse this policy.
    kube_api.create({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                     "metadata": {"name": "bad", "namespace": "db"},
                     "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 70000}]}]}})
    code, out, err = live(capsys, shop, "validate", "-n", "db")
    assert (code, out) == (2, "")
    assert err.startswith(f"{SOURCE}: NetworkPolicy db/bad: spec.ingress[0].ports[0].port:")
    code, out, err = live(capsys, shop, "matrix", "-n", "db")
    assert (code, out) == (2, "")
    assert "NetworkPolicy db/bad" in err


# ---- through the real kubectl ---------------------------------------------------------------

needs_kubectl = pytest.mark.skipif(kubectl_path() is None, reason="kubectl is not installed")


def kubectl_run(*argv: str, cfg: Path) -> subprocess.CompletedProcess[str]:
    binary = kubectl_path()
    assert binary is not None
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("KUBECONFIG", None)
    return subprocess.run([binary, "stockade", *argv, "--kubeconfig", str(cfg)],
                          capture_output=True, text=True, env=env, timeout=60, check=False)


@needs_kubectl
def test_kubectl_finds_the_plugin(shop: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (VENV_BIN / "kubectl-stockade").exists(), "pip install -e . installs the plugin"
    for argv in (["matrix", "-A"], ["lint", "-n", "backend"],
                 ["explain", "--from", "frontend/admin", "--to", "backend/api", "--port", "api"],
                 ["diff", "-A", "--replace", "-f", str(V2)]):
        proc = kubectl_run(*argv, cfg=shop)
        want = live(capsys, shop, *argv)
        assert (proc.returncode, proc.stdout, proc.stderr) == want, argv
    proc = kubectl_run("matrix", "-A", "-o", "json", cfg=shop)
    assert proc.stdout == same_source(
        files(capsys, "matrix", "-o", "json", "-f", *OFFLINE)[1], POLICIES)


@needs_kubectl
def test_kubectl_apply_k_deploy_installs_everything(kube_api: KubeAPI, tmp_path: Path) -> None:
    """`kubectl apply -k deploy/` against the double: every object is created."""
    from tests.support.kubeapi import Kubectl

    cfg = kube_api.write_kubeconfig(tmp_path / "kubeconfig")
    k = Kubectl(cfg)
    out = k.run("apply", "-k", str(ROOT / "deploy")).stdout
    assert "daemonset.apps/stockade-agent created" in out
    assert "customresourcedefinition.apiextensions.k8s.io/microservices.stockade.io created" \
        in out
    ds = kube_api.get("daemonsets", "stockade-agent", "stockade-system")
    assert ds["spec"]["template"]["spec"]["hostNetwork"] is True
    for kind, name, ns in (("clusterroles", "stockade-agent", None),
                           ("clusterroles", "stockade-operator", None),
                           ("clusterroles", "stockade-viewer", None),
                           ("roles", "stockade-status", "stockade-system"),
                           ("serviceaccounts", "stockade-agent", "stockade-system"),
                           ("deployments", "stockade-operator", "stockade-system")):
        assert kube_api.exists(kind, name, ns), (kind, name)
    assert kube_api.crd_registered("microservices.stockade.io")
    # Applying again changes nothing.
    again = k.run("apply", "-k", str(ROOT / "deploy")).stdout
    assert "created" not in again and "configured" not in again


# ---- status: the agents ---------------------------------------------------------------------

class FakeAgent:
    """An agent's /status on a loopback address, as an agent on a node's host network."""

    def __init__(self, host: str, port: int, report: dict[str, Any]) -> None:
        self.report = report
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/status":
                    self.send_error(404)
                    return
                body = json.dumps(agent.report).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@contextlib.contextmanager
def agents(reports: dict[str, dict[str, Any]]) -> Iterator[int]:
    """One fake agent per loopback address, all on one port (as agents on one hostPort)."""
    started: list[FakeAgent] = []
    port = 0
    try:
        for host, report in reports.items():
            a = FakeAgent(host, port, report)
            port = a.port
            started.append(a)
        yield port
    finally:
        for a in started:
            a.close()


CNI_OK = [{"file": "10-stockade.conflist", "name": "stockade", "plugins": ["stockade-cni"]}]
FEATURES_OK = {"inetForwardHook": True, "conntrack": True, "verdictMaps": True,
               "intervalSets": True, "concatenatedSets": True, "bridgeNetfilter": True}


def agent_pod(node: str, ip: str, port: int, ready: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"stockade-agent-{node}", "namespace": "stockade-system",
                     "labels": {"app.kubernetes.io/name": "stockade-agent"}},
        "spec": {"nodeName": node, "hostNetwork": True,
                 "containers": [{"name": "agent", "image": "x",
                                 "ports": [{"name": "metrics", "containerPort": port}]}]},
        "status": {"phase": "Running", "podIP": ip, "hostIP": ip,
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def install_agents(api: KubeAPI, nodes: list[str], pods: list[dict[str, Any]]) -> None:
    api.create({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "stockade-system"}})
    for node in nodes:
        api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}})
    ds = docs(ROOT / "deploy" / "agent-daemonset.yaml")[0]
    n = len(nodes)
    ds["status"] = {"desiredNumberScheduled": n, "currentNumberScheduled": len(pods),
                    "numberReady": sum(p["status"]["conditions"][0]["status"] == "True"
                                       for p in pods),
                    "updatedNumberScheduled": len(pods), "numberAvailable": len(pods),
                    "numberMisscheduled": 0}
    api.create(ds)
    for p in pods:
        api.create(p)


def versions(api: KubeAPI) -> dict[str, str]:
    return {f"{p['metadata']['namespace']}/{p['metadata']['name']}":
            p["metadata"]["resourceVersion"] for p in api.list("networkpolicies")}


def report(node: str, policies: dict[str, str], **over: Any) -> dict[str, Any]:
    return {"node": node, "ready": True, "inSync": True, "cniConfig": CNI_OK,
            "features": FEATURES_OK, "policies": policies, **over}


def test_status_all_consistent(kube_api: KubeAPI, shop: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    enforced = versions(kube_api)
    reports = {"127.0.0.2": report("node-a", enforced), "127.0.0.3": report("node-b", enforced)}
    with agents(reports) as port:
        install_agents(kube_api, ["node-a", "node-b"],
                       [agent_pod("node-a", "127.0.0.2", port),
                        agent_pod("node-b", "127.0.0.3", port)])
        code, out, err = live(capsys, shop, "status", "--direct")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == ("DaemonSet stockade-system/stockade-agent: 2 desired, 2 ready, "
                        "2 up to date, 2 available")
    assert lines[1].split() == ["NODE", "AGENT", "POD", "POD", "READY", "AGENT", "IN", "SYNC",
                                "CNI", "CONFIG", "POLICIES"]
    assert lines[2].split() == ["node-a", "stockade-agent-node-a", "yes", "reached", "yes",
                                "10-stockade.conflist", "8", "of", "8"]
    assert lines[3].split()[0] == "node-b"
    assert lines[-1] == "2 node(s), 8 NetworkPolicy object(s) compared: 0 problem(s)"


def test_status_names_every_difference(kube_api: KubeAPI, shop: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    enforced = versions(kube_api)
    stale = dict(enforced)
    del stale["db/allow-backend"]
    stale["backend/default-deny"] = "1"
    stale["shop/gone"] = "7"
    reports = {
        "127.0.0.2": report("node-a", enforced),
        "127.0.0.3": report("node-b", stale, inSync=False,
                            cniConfig=[{"file": "05-other.conflist", "name": "other",
                                        "plugins": ["bridge"]}, *CNI_OK],
                            features={**FEATURES_OK, "conntrack": False}),
    }
    with agents(reports) as port:
        install_agents(kube_api, ["node-a", "node-b", "node-c", "node-d"], [
            agent_pod("node-a", "127.0.0.2", port),
            agent_pod("node-b", "127.0.0.3", port),
            agent_pod("node-d", "127.0.0.4", port, ready=False),   # nothing listens there
        ])
        code, out, _ = live(capsys, shop, "status", "--direct", "--timeout", "2")
        code_json, out_json, _ = live(capsys, shop, "status", "--direct", "-o", "json")
    assert code == 1 and code_json == 1
    problems = out[out.index("Problems:"):].splitlines()
    rv = enforced["backend/default-deny"]
    expected = [
        "  node-b: the agent is not in sync (the kernel does not enforce its state)",
        "  node-b: the container runtime uses 05-other.conflist (the first CNI configuration),"
        " which does not call stockade-cni",
        "  node-b: kernel features missing: conntrack",
        f"  node-b: NetworkPolicy backend/default-deny: enforces resourceVersion 1, "
        f"the cluster has {rv}",
        f"  node-b: NetworkPolicy db/allow-backend: not enforced (the cluster has "
        f"resourceVersion {enforced['db/allow-backend']})",
        "  node-b: NetworkPolicy shop/gone: enforced (resourceVersion 7), but not in the cluster",
        "  node-c: no agent pod runs on this node",
        "  node-d: agent pod stockade-agent-node-d is not ready",
    ]
    assert problems[1:len(expected) + 1] == expected
    assert problems[len(expected) + 1].startswith(
        "  node-d: the agent cannot be reached, so its CNI configuration, kernel and policies "
        "are unknown: ")
    assert out.splitlines()[-1] == "4 node(s), 8 NetworkPolicy object(s) compared: 9 problem(s)"
    data = json.loads(out_json)
    assert data["problems"] == 9
    assert [n["node"] for n in data["nodes"]] == ["node-a", "node-b", "node-c", "node-d"]
    a, b, c, d = data["nodes"]
    assert a["problems"] == [] and a["policiesAgreed"] == 8 and a["report"]["node"] == "node-a"
    assert b["policiesAgreed"] == 6
    assert c["pod"] == "" and not c["reached"]
    assert d["reached"] is False and d["error"] and d["podReady"] is False


def test_status_with_one_namespace_compares_its_policies(
        kube_api: KubeAPI, shop: Path, capsys: pytest.CaptureFixture[str]) -> None:
    enforced = {k: v for k, v in versions(kube_api).items() if not k.startswith("db/")}
    with agents({"127.0.0.2": report("node-a", enforced)}) as port:
        install_agents(kube_api, ["node-a"], [agent_pod("node-a", "127.0.0.2", port)])
        code, out, _ = live(capsys, shop, "status", "--direct", "-n", "backend")
        assert (code, out.splitlines()[-1]) == (
            0, "1 node(s), 5 NetworkPolicy object(s) compared: 0 problem(s)")
        code, out, _ = live(capsys, shop, "status", "--direct")
    assert code == 1
    assert "node-a: NetworkPolicy db/default-deny: not enforced" in out


def test_status_without_the_daemonset(shop: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = live(capsys, shop, "status")
    assert code == 1
    assert out.splitlines()[0] == "DaemonSet stockade-system/stockade-agent: not found"
    assert "0 node(s)" in out.splitlines()[-1]
