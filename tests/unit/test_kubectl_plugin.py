"""`kubectl stockade` without a server: the documents it builds from API lists, the pods
it leaves out, its options, what it makes of an agent's /status, and the pod proxy path
(over an in-memory transport). tests/integration/test_kubectl_plugin.py runs it against
the API test double and the real kubectl."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from stockade.cli import kubectl
from stockade.errors import InputError
from stockade.kube.client import NETWORK_POLICIES, PODS, KubeClient, KubeError
from stockade.kube.live import (
    FINISHED,
    HOST_NETWORK,
    NO_ADDRESS,
    as_document,
    fetch_status,
    kube_context,
    left_out_reason,
    policy_differences,
    read_cluster,
    report_problems,
)
from stockade.model.parse import decode_objects, parse_documents

ROOT = Path(__file__).resolve().parents[2]


# ---- documents from lists -------------------------------------------------------------------

def test_listed_items_become_the_documents_a_file_gives() -> None:
    item = {"metadata": {"name": "x", "namespace": "a", "resourceVersion": "5",
                         "managedFields": [{"manager": "kubectl", "operation": "Apply",
                                            "apiVersion": "networking.k8s.io/v1",
                                            "time": "2026-01-01T00:00:00Z",
                                            "fieldsType": "FieldsV1", "fieldsV1": {}}]},
            "spec": {"podSelector": {}}}
    doc = as_document(NETWORK_POLICIES, item)
    assert list(doc)[:2] == ["apiVersion", "kind"]
    assert doc == {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", **item}
    # The one decode path of files takes it, server-set metadata included.
    objects, errors = decode_objects([doc], "context c")
    assert errors == [] and objects.policies[0].key == "a/x"
    assert objects.policies[0].source.render() == "context c"


@pytest.mark.parametrize(("pod", "reason"), [
    ({"spec": {"hostNetwork": True}, "status": {"podIP": "10.0.0.1"}}, HOST_NETWORK),
    ({"status": {"phase": "Succeeded", "podIP": "10.0.0.1"}}, FINISHED),
    ({"status": {"phase": "Failed", "podIP": "10.0.0.1"}}, FINISHED),
    ({"status": {"phase": "Pending"}}, NO_ADDRESS),
    ({}, NO_ADDRESS),
    ({"status": {"phase": "Running", "podIP": "10.0.0.1"}}, None),
    ({"status": {"podIPs": [{"ip": "fd00::1"}]}}, None),
])
def test_pods_policy_does_not_govern(pod: dict[str, Any], reason: str | None) -> None:
    assert left_out_reason(pod) == reason


def _api(routes: dict[str, Any], seen: list[str] | None = None) -> KubeClient:
    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request.url.path)
        body = routes.get(request.url.path)
        if body is None:
            return httpx.Response(404, json={"kind": "Status", "code": 404,
                                             "reason": "NotFound", "message": "not found"})
        return httpx.Response(200, json=body)

    return KubeClient.for_transport(httpx.MockTransport(handler))


def test_read_cluster_one_namespace_and_every_one() -> None:
    pod = {"metadata": {"name": "p", "namespace": "a"}, "status": {"podIP": "10.0.0.1"}}
    host = {"metadata": {"name": "h", "namespace": "a"}, "spec": {"hostNetwork": True}}
    routes = {
        "/api/v1/namespaces/a": {"apiVersion": "v1", "kind": "Namespace",
                                 "metadata": {"name": "a"}},
        "/api/v1/namespaces": {"items": [{"metadata": {"name": "a"}},
                                         {"metadata": {"name": "b"}}], "metadata": {}},
        "/api/v1/namespaces/a/pods": {"items": [pod, host], "metadata": {}},
        "/api/v1/pods": {"items": [pod], "metadata": {}},
        "/apis/networking.k8s.io/v1/namespaces/a/networkpolicies": {"items": [],
                                                                    "metadata": {}},
        "/apis/networking.k8s.io/v1/networkpolicies": {"items": [], "metadata": {}},
    }
    one = read_cluster(_api(routes), "a")
    assert [d["kind"] for d in one.documents()] == ["Namespace", "Pod"]
    assert one.left_out == {HOST_NETWORK: ["a/h"]}
    every = read_cluster(_api(routes), None)
    assert [d["metadata"]["name"] for d in every.namespaces] == ["a", "b"]
    assert every.pods[0] == {"apiVersion": "v1", "kind": "Pod", **pod}
    # A namespace that does not exist holds nothing (as kubectl get -n says "No resources").
    assert read_cluster(_api(routes), "nowhere").documents() == []


# ---- the kubeconfig's context ---------------------------------------------------------------

def _kubeconfig(path: Path, namespace: str | None) -> Path:
    ctx: dict[str, Any] = {"cluster": "c", "user": "u"}
    if namespace:
        ctx["namespace"] = namespace
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "one",
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "one", "context": ctx},
                     {"name": "two", "context": {**ctx, "namespace": "shop"}}]}))
    return path


def test_context_and_its_namespace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _kubeconfig(tmp_path / "config", None)
    assert kube_context(str(cfg)) == kube_context(str(cfg), "one")
    assert kube_context(str(cfg)).namespace == "default"
    assert kube_context(str(cfg), "two").namespace == "shop"
    monkeypatch.setenv("KUBECONFIG", f"{cfg}:/elsewhere")
    assert kube_context(None, "two").name == "two"
    with pytest.raises(KubeError, match="Context 'three' not found"):
        kube_context(str(cfg), "three")


def test_in_cluster_context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "sa").mkdir()
    (tmp_path / "sa" / "namespace").write_text("stockade-system\n")
    ctx = kube_context(service_account=str(tmp_path / "sa"))
    assert (ctx.name, ctx.namespace) == ("in-cluster", "stockade-system")


# ---- options --------------------------------------------------------------------------------

def parse(*argv: str) -> argparse.Namespace:
    return kubectl.build_parser().parse_args(list(argv))


def test_cluster_options_before_or_after_the_command() -> None:
    a = parse("--context", "x", "-n", "shop", "matrix")
    b = parse("matrix", "--context", "x", "-n", "shop")
    for args in (a, b):
        assert (args.context, args.namespace, args.all_namespaces) == ("x", "shop", False)
    # Given after the command, they do not reset what was given before.
    c = parse("--kubeconfig", "k", "lint", "-A")
    assert (c.kubeconfig, c.namespace, c.all_namespaces) == ("k", None, True)
    with pytest.raises(SystemExit):
        parse("matrix", "-n", "a", "-A")


def test_every_offline_command_and_status_are_there() -> None:
    for argv in (["matrix", "--port", "80", "-o", "csv"], ["coverage", "-o", "json"],
                 ["lint", "--ignore", "SK005"], ["validate", "--strict-cidr"],
                 ["explain", "--from", "a", "--to", "b", "--port", "80"],
                 ["diff", "-f", "x.yaml", "--replace"],
                 ["status", "--direct", "--agent-port", "1234", "-o", "json"]):
        assert parse(*argv).command == argv[0]
    with pytest.raises(SystemExit):
        parse("diff")  # -f is required


def test_files_take_the_command_s_namespace(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump_all([
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": {"name": "a"}, "spec": {"podSelector": {}}},
        {"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "b", "namespace": "shop"}, "spec": {"podSelector": {}}}]},
    ]))

    class Scope:
        default_namespace = "shop"
        explicit_namespace: str | None = None

    objects = kubectl.file_objects([str(path)], Scope())  # type: ignore[arg-type]
    assert [p.key for p in objects.policies] == ["shop/a", "shop/b"]
    Scope.default_namespace = Scope.explicit_namespace = "db"
    with pytest.raises(InputError, match=r"NetworkPolicy shop/b: the namespace of the object"):
        kubectl.file_objects([str(path)], Scope())  # type: ignore[arg-type]
    # Read as a file is read: the same documents, the same decoding.
    assert len(parse_documents(path.read_text())) == 2


# ---- an agent's /status ---------------------------------------------------------------------

GOOD = {"node": "n1", "ready": True, "inSync": True,
        "cniConfig": [{"file": "10-stockade.conflist", "name": "stockade",
                       "plugins": ["stockade-cni"]}],
        "features": {"inetForwardHook": True, "conntrack": True},
        "policies": {"a/x": "5"}}


def test_a_good_report_has_no_problem() -> None:
    assert report_problems(GOOD, "n1") == []


@pytest.mark.parametrize(("change", "problem"), [
    ({"node": "n2"}, "the agent says it runs on 'n2'"),
    ({"ready": False, "error": "nft: refused"}, "the agent is not ready: nft: refused"),
    ({"inSync": False}, "the agent is not in sync (the kernel does not enforce its state)"),
    ({"inSync": None}, "the agent is not in sync (the kernel does not enforce its state)"),
    ({"cniConfig": []}, "no CNI configuration in /etc/cni/net.d"),
    ({"cniConfig": None}, "the agent reports no cniConfig"),
    ({"cniConfig": [{"file": "00-flannel.conflist", "plugins": ["flannel"]}]},
     "the container runtime uses 00-flannel.conflist (the first CNI configuration), "
     "which does not call stockade-cni"),
    ({"features": {"conntrack": False, "bridgeNetfilter": False, "verdictMaps": True}},
     "kernel features missing: bridgeNetfilter, conntrack"),
    ({"features": "yes"}, "the agent reports no kernel features"),
    ({"policies": ["a/x"]}, "the agent reports no policies"),
])
def test_report_problems(change: dict[str, Any], problem: str) -> None:
    assert report_problems({**GOOD, **change}, "n1") == [problem]


def test_policy_differences_name_each_policy() -> None:
    cluster = {"a/x": "5", "a/y": "6", "b/z": "9"}
    enforced = {"a/x": "5", "a/y": "4", "c/old": "2"}
    assert policy_differences(cluster, enforced) == [
        "NetworkPolicy a/y: enforces resourceVersion 4, the cluster has 6",
        "NetworkPolicy b/z: not enforced (the cluster has resourceVersion 9)",
        "NetworkPolicy c/old: enforced (resourceVersion 2), but not in the cluster",
    ]
    assert policy_differences(cluster, dict(cluster)) == []


def _agent_pod(port: int | None = 9641) -> dict[str, Any]:
    ports = [{"name": "metrics", "containerPort": port}] if port else []
    return {"metadata": {"name": "stockade-agent-x1", "namespace": "stockade-system"},
            "spec": {"containers": [{"name": "agent", "ports": ports}]},
            "status": {"podIP": "192.0.2.10"}}


def test_status_through_the_pod_proxy() -> None:
    seen: list[str] = []
    path = f"{PODS.path('stockade-system')}/stockade-agent-x1:9641/proxy/status"
    client = _api({path: GOOD}, seen)
    assert fetch_status(client, _agent_pod(), port=None, direct=False) == GOOD
    assert seen == ["/api/v1/namespaces/stockade-system/pods/stockade-agent-x1:9641/proxy/status"]
    # --agent-port wins; without a port named metrics, 9641.
    seen.clear()
    client = _api({}, seen)
    with pytest.raises(KubeError, match="serves no /status"):
        fetch_status(client, _agent_pod(None), port=None, direct=False)
    with pytest.raises(KubeError):
        fetch_status(client, _agent_pod(), port=1234, direct=False)
    assert seen == [f"{PODS.path('stockade-system')}/stockade-agent-x1:9641/proxy/status",
                    f"{PODS.path('stockade-system')}/stockade-agent-x1:1234/proxy/status"]


def test_status_direct_needs_an_address() -> None:
    pod = _agent_pod()
    pod["status"] = {}
    with pytest.raises(KubeError, match="no address"):
        fetch_status(_api({}), pod, port=None, direct=True)


def test_status_json_is_the_report() -> None:
    from stockade.kube.live import ClusterStatus, NodeStatus

    node = NodeStatus("n1", "stockade-agent-x1", True, True, "", GOOD, 1, [])
    status = ClusterStatus({"status": {"desiredNumberScheduled": 1, "numberReady": 1}},
                           [node, NodeStatus("n2", problems=["no agent pod runs on this node"])],
                           1, "stockade-system")
    data = kubectl.status_json(status)
    assert data["problems"] == 1
    assert data["daemonset"] == {"desiredNumberScheduled": 1, "numberReady": 1,
                                 "updatedNumberScheduled": 0, "numberAvailable": 0}
    assert data["nodes"][0]["report"] == GOOD
    json.dumps(data)
    text = kubectl.status_text(status)
    assert text[-1] == "2 node(s), 1 NetworkPolicy object(s) compared: 1 problem(s)"
    assert text[-2] == "  n2: no agent pod runs on this node"
    assert text[3].split() == ["n2", "-", "-", "-", "-", "-", "-"]
