"""The Kubernetes API server test double (tests/support/kubeapi), proven with the real kubectl.

Every kubectl test runs the real binary (skipped only when there is none) with
argument lists, a timeout, a kubeconfig and a discovery cache in tmp_path. The
Python-level tests speak HTTP with httpx, as our client does: watch resume,
410 after compaction, bookmarks, pagination, server-side apply, garbage
collection and the fault injection.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from tests.support.kubeapi import ApiError, KubeAPI, Kubectl, kube_api_fixture, kubectl_path

_kube_api = kube_api_fixture(name="_kube_api", bookmark_interval=0.2)


@pytest.fixture
def kube_api(_kube_api: KubeAPI) -> Iterator[KubeAPI]:
    yield _kube_api
    assert _kube_api.internal_errors == []  # no bug of the double answered 500


needs_kubectl = pytest.mark.skipif(kubectl_path() is None, reason="kubectl is not installed")

Obj = dict[str, Any]


def pod(
    name: str, namespace: str = "default", labels: dict[str, str] | None = None, node: str = ""
) -> Obj:
    spec: Obj = {"containers": [{"name": "c", "image": "busybox"}]}
    if node:
        spec["nodeName"] = node
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": spec,
    }


def netpol(name: str, app: str, namespace: str = "default") -> Obj:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
        "spec": {"podSelector": {"matchLabels": {"app": app}}, "policyTypes": ["Ingress"]},
    }


CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "microservices.stockade.io"},
    "spec": {
        "group": "stockade.io",
        "scope": "Namespaced",
        "names": {
            "plural": "microservices",
            "singular": "microservice",
            "kind": "MicroService",
            "shortNames": ["ms"],
        },
        "versions": [
            {
                "name": "v1alpha1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Tier", "type": "string", "jsonPath": ".spec.tier"}
                ],
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
            }
        ],
    },
}


@pytest.fixture
def kubectl(kube_api: KubeAPI, tmp_path: Path) -> Iterator[Kubectl]:
    if kubectl_path() is None:
        pytest.skip("kubectl is not installed")
    k = Kubectl(kube_api.write_kubeconfig(tmp_path / "kubeconfig", namespace="default"))
    yield k
    k.cleanup()


@pytest.fixture
def client(kube_api: KubeAPI) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=kube_api.url, timeout=10, headers={"Authorization": "Bearer test-token"}
    ) as c:
        yield c


def write(tmp_path: Path, name: str, *docs: Obj) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def watch(client: httpx.Client, path: str, **params: str) -> list[Obj]:
    """Every event of a watch that ends by itself (timeoutSeconds, an ERROR)."""
    with client.stream("GET", path, params={"watch": "1", **params}) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line) for line in r.iter_lines() if line]


class Watcher:
    """A watch read by a thread into a queue, so that a test can act while it runs."""

    def __init__(self, client: httpx.Client, path: str, **params: str) -> None:
        self.events: queue.Queue[Obj | BaseException | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(client, path, params), daemon=True)
        self._thread.start()

    def _run(self, client: httpx.Client, path: str, params: dict[str, str]) -> None:
        try:
            with client.stream("GET", path, params={"watch": "true", **params}) as r:
                for line in r.iter_lines():
                    if line:
                        self.events.put(json.loads(line))
            self.events.put(None)
        except httpx.HTTPError as e:
            self.events.put(e)

    def next(self, timeout: float = 5) -> Obj | BaseException | None:
        return self.events.get(timeout=timeout)

    def join(self, timeout: float = 5) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive()


def names(events: list[Obj]) -> list[tuple[str, str]]:
    return [(e["type"], e["object"]["metadata"].get("name", "")) for e in events]


# --------------------------------------------------------------------------- kubectl


@needs_kubectl
def test_kubectl_version_and_discovery(kubectl: Kubectl) -> None:
    out = json.loads(kubectl.run("version", "-o", "json").stdout)
    assert out["serverVersion"]["gitVersion"] == "v1.32.0"
    resources = kubectl.run("api-resources", "-o", "name").stdout.split()
    for r in (
        "pods",
        "namespaces",
        "networkpolicies.networking.k8s.io",
        "daemonsets.apps",
        "clusterroles.rbac.authorization.k8s.io",
        "customresourcedefinitions.apiextensions.k8s.io",
    ):
        assert r in resources


@needs_kubectl
def test_kubectl_apply_client_side_create_then_update(
    kube_api: KubeAPI, kubectl: Kubectl, tmp_path: Path
) -> None:
    path = write(tmp_path, "np.yaml", netpol("deny", "web"))
    assert (
        "networkpolicy.networking.k8s.io/deny created"
        in kubectl.run("apply", "-f", str(path)).stdout
    )
    live = kube_api.get("networkpolicies", "deny", "default")
    last = json.loads(
        live["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
    )
    assert last["spec"]["podSelector"] == {"matchLabels": {"app": "web"}}
    rv = live["metadata"]["resourceVersion"]

    assert "unchanged" in kubectl.run("apply", "-f", str(path)).stdout
    assert kube_api.get("networkpolicies", "deny", "default")["metadata"]["resourceVersion"] == rv

    changed = netpol("deny", "web")
    changed["spec"]["policyTypes"] = ["Ingress", "Egress"]
    del changed["metadata"]["labels"]
    path = write(tmp_path, "np.yaml", changed)
    assert "configured" in kubectl.run("apply", "-f", str(path)).stdout
    live = kube_api.get("networkpolicies", "deny", "default")
    assert live["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert (
        "labels" not in live["metadata"] or not live["metadata"]["labels"]
    )  # removed: 3-way patch
    assert int(live["metadata"]["resourceVersion"]) > int(rv)
    assert live["metadata"]["generation"] == 2

    # a pod: the strategic merge patch merges containers by name
    p = pod("web", labels={"app": "web"})
    path = write(tmp_path, "pod.yaml", p)
    kubectl.run("apply", "-f", str(path))
    p["spec"]["containers"][0]["image"] = "busybox:2"
    p["spec"]["containers"].append({"name": "side", "image": "pause"})
    kubectl.run("apply", "-f", str(write(tmp_path, "pod.yaml", p)))
    live = kube_api.get("pods", "web")
    assert [(c["name"], c["image"]) for c in live["spec"]["containers"]] == [
        ("c", "busybox:2"),
        ("side", "pause"),
    ]


@needs_kubectl
def test_kubectl_apply_server_side(kube_api: KubeAPI, kubectl: Kubectl, tmp_path: Path) -> None:
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "cfg"},
        "data": {"a": "1", "b": "2"},
    }
    path = write(tmp_path, "cm.yaml", cm)
    assert "serverside-applied" in kubectl.run("apply", "--server-side", "-f", str(path)).stdout
    live = kube_api.get("configmaps", "cfg")
    (entry,) = live["metadata"]["managedFields"]
    assert (entry["manager"], entry["operation"], entry["fieldsType"]) == (
        "kubectl",
        "Apply",
        "FieldsV1",
    )
    assert entry["fieldsV1"] == {"f:data": {"f:a": {}, "f:b": {}}}
    rv = live["metadata"]["resourceVersion"]

    kubectl.run("apply", "--server-side", "-f", str(path))  # identical: a no-op
    assert kube_api.get("configmaps", "cfg")["metadata"]["resourceVersion"] == rv

    cm["data"]["b"] = "3"
    path = write(tmp_path, "cm.yaml", cm)
    proc = kubectl.run(
        "apply", "--server-side", "--field-manager=other", "-f", str(path), check=False
    )
    assert proc.returncode != 0
    assert 'conflict with "kubectl"' in proc.stderr and ".data.b" in proc.stderr
    kubectl.run(
        "apply", "--server-side", "--field-manager=other", "--force-conflicts", "-f", str(path)
    )
    live = kube_api.get("configmaps", "cfg")
    assert live["data"] == {"a": "1", "b": "3"}
    owners = {e["manager"]: e["fieldsV1"] for e in live["metadata"]["managedFields"]}
    assert owners == {
        "kubectl": {"f:data": {"f:a": {}}},
        "other": {"f:data": {"f:a": {}, "f:b": {}}},
    }

    # a manager that stops applying a field it alone owns removes it
    del cm["data"]["b"]
    kubectl.run(
        "apply", "--server-side", "--field-manager=other", "-f", str(write(tmp_path, "cm.yaml", cm))
    )
    assert kube_api.get("configmaps", "cfg")["data"] == {"a": "1"}


@needs_kubectl
def test_kubectl_get_outputs_and_selectors(kube_api: KubeAPI, kubectl: Kubectl) -> None:
    kube_api.create(pod("web-1", labels={"app": "web", "tier": "front"}, node="n1"))
    kube_api.create(pod("web-2", labels={"app": "web"}, node="n2"))
    kube_api.create(pod("db-1", labels={"app": "db"}, node="n1"))
    kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}})
    kube_api.create(pod("x", namespace="other", labels={"app": "web"}))

    doc = json.loads(kubectl.run("get", "pods", "-o", "json").stdout)
    assert doc["kind"] == "List"
    assert sorted(i["metadata"]["name"] for i in doc["items"]) == ["db-1", "web-1", "web-2"]
    assert kubectl.run("get", "pods", "-o", "name").stdout.split() == [
        "pod/db-1",
        "pod/web-1",
        "pod/web-2",
    ]
    table = kubectl.run("get", "pods").stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert [line.split()[0] for line in table[1:]] == ["db-1", "web-1", "web-2"]
    assert table[1].split()[1:3] == ["0/1", "Pending"]
    wide = kubectl.run("get", "pods", "-o", "wide").stdout.splitlines()
    assert wide[0].split()[:7] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"]
    assert wide[2].split()[6] == "n1"

    def sel(*args: str) -> list[str]:
        return kubectl.run("get", "pods", "-o", "name", *args).stdout.split()

    assert sel("-l", "app=web") == ["pod/web-1", "pod/web-2"]
    assert sel("-l", "app!=web") == ["pod/db-1"]
    assert sel("-l", "app in (db,web),tier") == ["pod/web-1"]
    assert sel("-l", "app notin (web)") == ["pod/db-1"]
    assert sel("-l", "!tier") == ["pod/db-1", "pod/web-2"]
    assert sel("--field-selector", "spec.nodeName=n1") == ["pod/db-1", "pod/web-1"]
    assert sel("--field-selector", "metadata.name!=web-1,spec.nodeName=n1") == ["pod/db-1"]
    assert sel("-A", "-l", "app=web") == ["pod/web-1", "pod/web-2", "pod/x"]
    all_ns = kubectl.run("get", "pods", "-A", "-l", "app=web").stdout.splitlines()
    assert all_ns[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert [line.split()[:2] for line in all_ns[1:]] == [
        ["default", "web-1"],
        ["default", "web-2"],
        ["other", "x"],
    ]
    proc = kubectl.run("get", "pods", "--field-selector", "spec.bogus=1", check=False)
    assert proc.returncode != 0 and "field label not supported: spec.bogus" in proc.stderr
    # kubectl pages with limit=500 and follows continue tokens
    assert kubectl.run("get", "pods", "-o", "name", "--chunk-size=1").stdout.split() == [
        "pod/db-1",
        "pod/web-1",
        "pod/web-2",
    ]


@needs_kubectl
def test_kubectl_watch_sees_an_event_made_from_python(kube_api: KubeAPI, kubectl: Kubectl) -> None:
    kube_api.create(pod("before"))
    proc = kubectl.popen("get", "pods", "--watch", "--output-watch-events", "-o", "json")
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # one event per line: {"type": ..., "object": ...}
            if line.strip():
                lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        kube_api.wait_for_watches(1)
        kube_api.create(pod("after"))
        kube_api.delete("pods", "before")
        seen = []
        while len(seen) < 3:
            ev = json.loads(lines.get(timeout=10))
            seen.append((ev["type"], ev["object"]["metadata"]["name"]))
        assert seen == [("ADDED", "before"), ("ADDED", "after"), ("DELETED", "before")]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        reader.join(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@needs_kubectl
def test_kubectl_watch_table_output(kube_api: KubeAPI, kubectl: Kubectl) -> None:
    proc = kubectl.popen("get", "pods", "-w", "--output-watch-events")
    try:
        kube_api.wait_for_watches(1)
        kube_api.create(pod("late"))
        kube_api.wait_for_watches(1)
        time.sleep(0.5)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    rows = [line.split() for line in out.splitlines()]
    assert rows[0][:3] == ["EVENT", "NAME", "READY"]
    assert rows[1][:2] == ["ADDED", "late"]


@needs_kubectl
def test_kubectl_delete(kube_api: KubeAPI, kubectl: Kubectl) -> None:
    kube_api.create(pod("doomed"))
    assert 'pod "doomed" deleted' in kubectl.run("delete", "pod", "doomed", timeout=30).stdout
    assert not kube_api.exists("pods", "doomed")
    proc = kubectl.run("delete", "pod", "doomed", check=False)
    assert proc.returncode != 0 and 'pods "doomed" not found' in proc.stderr
    assert kube_api.count("delete", "pods") == 2


@needs_kubectl
def test_kubectl_crd_then_custom_object(
    kube_api: KubeAPI, kubectl: Kubectl, tmp_path: Path
) -> None:
    out = kubectl.run("apply", "-f", str(write(tmp_path, "crd.yaml", CRD))).stdout
    assert "customresourcedefinition.apiextensions.k8s.io/microservices.stockade.io created" in out
    kubectl.run(
        "wait", "--for=condition=Established", "crd/microservices.stockade.io", "--timeout=10s"
    )
    ms = {
        "apiVersion": "stockade.io/v1alpha1",
        "kind": "MicroService",
        "metadata": {"name": "web", "labels": {"tier": "front"}},
        "spec": {"tier": "frontend", "ports": [80]},
    }
    assert (
        "microservice.stockade.io/web created"
        in kubectl.run("apply", "-f", str(write(tmp_path, "ms.yaml", ms))).stdout
    )
    table = kubectl.run("get", "ms").stdout.splitlines()
    assert table[0].split() == ["NAME", "TIER", "AGE"] and table[1].split()[:2] == [
        "web",
        "frontend",
    ]
    assert kubectl.run("get", "microservices", "-l", "tier=front", "-o", "name").stdout.split() == [
        "microservice.stockade.io/web"
    ]
    live = kube_api.get("microservices.stockade.io", "web")
    assert live["spec"] == {"tier": "frontend", "ports": [80]}
    # the status subresource: the main resource ignores status, /status takes only it
    kube_api.update_status({**live, "status": {"ready": True}, "spec": {"tier": "ignored"}})
    live = kube_api.get("microservices", "web")
    assert live["status"] == {"ready": True} and live["spec"]["tier"] == "frontend"

    kubectl.run("delete", "crd", "microservices.stockade.io", timeout=30)
    assert not kube_api.crd_registered("microservices.stockade.io")
    with pytest.raises(KeyError):
        kube_api.resource("microservices")


@needs_kubectl
def test_kubectl_apply_k_deploy_dir(kube_api: KubeAPI, kubectl: Kubectl, tmp_path: Path) -> None:
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    write(deploy, "crd.yaml", CRD)
    write(
        deploy,
        "rbac.yaml",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "stockade-system"}},
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "stockade", "namespace": "stockade-system"},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "stockade:agent"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["pods", "namespaces"],
                    "verbs": ["get", "list", "watch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "stockade:agent"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "stockade:agent",
            },
            "subjects": [
                {"kind": "ServiceAccount", "name": "stockade", "namespace": "stockade-system"}
            ],
        },
    )
    template = {
        "metadata": {"labels": {"app": "agent"}},
        "spec": {"containers": [{"name": "agent", "image": "stockade:dev"}]},
    }
    write(
        deploy,
        "workloads.yaml",
        {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": "agent", "namespace": "stockade-system"},
            "spec": {"selector": {"matchLabels": {"app": "agent"}}, "template": template},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "operator", "namespace": "stockade-system"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "agent"}},
                "template": template,
            },
        },
    )
    (deploy / "kustomization.yaml").write_text("resources: [crd.yaml, rbac.yaml, workloads.yaml]\n")
    out = kubectl.run("apply", "-k", str(deploy)).stdout
    for line in (
        "namespace/stockade-system created",
        "customresourcedefinition.apiextensions.k8s.io/microservices.stockade.io created",
        "clusterrole.rbac.authorization.k8s.io/stockade:agent created",
        "daemonset.apps/agent created",
        "deployment.apps/operator created",
    ):
        assert line in out
    out = kubectl.run("apply", "-k", str(deploy)).stdout
    assert "created" not in out and "configured" not in out
    assert kube_api.get("daemonsets", "agent", "stockade-system")["spec"]["template"] == template
    assert kube_api.crd_registered("microservices.stockade.io")


def _prune(value: Any) -> Any:
    """Drop empty values, as protobuf cannot carry them (``resources: {}``, ``strategy: {}``)."""
    if isinstance(value, dict):
        out = {k: _prune(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in ({}, [], None, "")}
    if isinstance(value, list):
        return [_prune(v) for v in value]
    return value


@needs_kubectl
@pytest.mark.parametrize(
    "args",
    [
        ["create", "namespace", "demo"],
        ["create", "configmap", "c", "--from-literal=a=1", "--from-literal=b=two"],
        ["create", "secret", "generic", "s", "--from-literal=pw=x"],
        ["create", "serviceaccount", "robot"],
        [
            "run",
            "p",
            "--image=busybox",
            "--labels=app=web,tier=x",
            "--env=X=1",
            "--port=80",
            "--restart=Never",
            "--",
            "sleep",
            "10",
        ],
        ["create", "deployment", "d", "--image=nginx", "--replicas=2", "--port=8080"],
    ],
    ids=["namespace", "configmap", "secret", "serviceaccount", "run", "deployment"],
)
def test_kubectl_typed_commands_send_protobuf(
    kube_api: KubeAPI, kubectl: Kubectl, args: list[str]
) -> None:
    """kubectl's generators send protobuf; the double decodes what they send, exactly."""
    cut = args.index("--") if "--" in args else len(args)
    dry = [*args[:cut], "--dry-run=client", "-o", "json", *args[cut:]]
    want = json.loads(kubectl.run(*dry).stdout)
    kubectl.run(*args)
    t = kube_api.resource(want["kind"])
    got = kube_api.get(t.plural, want["metadata"]["name"])
    for k in (
        "uid",
        "resourceVersion",
        "creationTimestamp",
        "generation",
        "managedFields",
        "namespace",
    ):
        got["metadata"].pop(k, None)
        want["metadata"].pop(k, None)
    got.pop("status", None)
    want.pop("status", None)
    if want["kind"] == "Namespace":
        got.pop("spec")
    assert _prune(got) == _prune(want)


@needs_kubectl
def test_kubectl_auth_can_i_is_always_yes(kubectl: Kubectl) -> None:
    """No authorization: access reviews (protobuf, from kubectl) allow everything."""
    assert (
        kubectl.run("auth", "can-i", "delete", "nodes", "--all-namespaces").stdout.strip() == "yes"
    )
    assert "*.*" in kubectl.run("auth", "can-i", "--list").stdout


def test_metadata_only_lists(kube_api: KubeAPI, client: httpx.Client) -> None:
    kube_api.create(pod("a", labels={"app": "web"}))
    accept = {"Accept": "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"}
    doc = client.get("/api/v1/namespaces/default/pods", headers=accept).json()
    assert doc["kind"] == "PartialObjectMetadataList"
    assert doc["items"] == [
        {
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": kube_api.get("pods", "a")["metadata"],
        }
    ]


@needs_kubectl
def test_kubectl_errors(kube_api: KubeAPI, kubectl: Kubectl, tmp_path: Path) -> None:
    proc = kubectl.run("get", "pod", "nope", check=False)
    assert proc.returncode == 1 and '(NotFound): pods "nope" not found' in proc.stderr
    path = write(tmp_path, "p.yaml", pod("dup"))
    kubectl.run("create", "-f", str(path))
    proc = kubectl.run("create", "-f", str(path), check=False)
    assert proc.returncode == 1 and "(AlreadyExists): error when creating" in proc.stderr
    bad = pod("Bad_Name")
    proc = kubectl.run("create", "-f", str(write(tmp_path, "bad.yaml", bad)), check=False)
    assert proc.returncode == 1 and 'Pod "Bad_Name" is invalid: metadata.name' in proc.stderr
    proc = kubectl.run(
        "create", "-f", str(write(tmp_path, "ns.yaml", pod("p", namespace="absent"))), check=False
    )
    assert proc.returncode == 1 and 'namespaces "absent" not found' in proc.stderr


# --------------------------------------------------------------------------- watch


def test_watch_410_after_compact_as_an_error_event(kube_api: KubeAPI, client: httpx.Client) -> None:
    rv = kube_api.create(pod("a"))["metadata"]["resourceVersion"]
    kube_api.create(pod("b"))
    kube_api.compact()
    events = watch(client, "/api/v1/namespaces/default/pods", resourceVersion=rv)
    assert len(events) == 1 and events[0]["type"] == "ERROR"
    status = events[0]["object"]
    assert (status["kind"], status["code"], status["reason"]) == ("Status", 410, "Expired")
    assert status["message"].startswith(f"too old resource version: {rv} (")
    # from the current resourceVersion it is fine
    current = str(kube_api.resource_version)
    assert watch(client, "/api/v1/pods", resourceVersion=current, timeoutSeconds="1") == []


def test_watch_410_after_compact_as_http_status(tmp_path: Path) -> None:
    with KubeAPI(watch_gone="http") as api, httpx.Client(base_url=api.url) as c:
        rv = api.create(pod("a"))["metadata"]["resourceVersion"]
        api.update(
            {
                **api.get("pods", "a"),
                "metadata": {**api.get("pods", "a")["metadata"], "labels": {"x": "y"}},
            }
        )
        api.compact()
        r = c.get("/api/v1/pods", params={"watch": "1", "resourceVersion": rv})
        assert r.status_code == 410
        assert r.json()["kind"] == "Status" and r.json()["reason"] == "Expired"


def test_watch_that_falls_behind_a_compaction_gets_410(
    kube_api: KubeAPI, client: httpx.Client
) -> None:
    w = Watcher(client, "/api/v1/pods", resourceVersion=str(kube_api.resource_version))
    kube_api.wait_for_watches(1)
    kube_api.stall_watches(1.0)
    kube_api.create(pod("a"))
    kube_api.compact()
    ev = w.next()
    assert isinstance(ev, dict) and ev["type"] == "ERROR" and ev["object"]["code"] == 410
    assert w.next() is None
    w.join()


def test_bookmarks(kube_api: KubeAPI, client: httpx.Client) -> None:
    kube_api.create(pod("a"))
    rv = str(kube_api.resource_version)
    events = watch(
        client,
        "/api/v1/namespaces/default/pods",
        resourceVersion=rv,
        allowWatchBookmarks="true",
        timeoutSeconds="1",
    )
    assert len(events) >= 3  # every 0.2 s for 1 s
    for ev in events:
        assert ev == {
            "type": "BOOKMARK",
            "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": rv}},
        }
    # without allowWatchBookmarks: none
    assert watch(client, "/api/v1/pods", resourceVersion=rv, timeoutSeconds="1") == []


def test_bookmark_resource_version_follows_other_resources(
    kube_api: KubeAPI, client: httpx.Client
) -> None:
    rv = str(kube_api.resource_version)
    w = Watcher(
        client, "/api/v1/pods", resourceVersion=rv, allowWatchBookmarks="1", timeoutSeconds="2"
    )
    kube_api.wait_for_watches(1)
    kube_api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}})
    last = None
    while (ev := w.next()) is not None:
        assert isinstance(ev, dict) and ev["type"] == "BOOKMARK"
        last = ev["object"]["metadata"]["resourceVersion"]
    assert last == str(kube_api.resource_version)
    w.join()


def test_watch_from_zero_and_initial_events(kube_api: KubeAPI, client: httpx.Client) -> None:
    kube_api.create(pod("a"))
    kube_api.create(pod("b"))
    events = watch(client, "/api/v1/pods", resourceVersion="0", timeoutSeconds="1")
    assert names(events) == [("ADDED", "a"), ("ADDED", "b")]
    assert names(watch(client, "/api/v1/pods", timeoutSeconds="1")) == [
        ("ADDED", "a"),
        ("ADDED", "b"),
    ]
    events = watch(
        client,
        "/api/v1/pods",
        sendInitialEvents="true",
        allowWatchBookmarks="true",
        resourceVersionMatch="NotOlderThan",
        timeoutSeconds="1",
    )
    assert names(events[:2]) == [("ADDED", "a"), ("ADDED", "b")]
    assert events[2]["type"] == "BOOKMARK"
    assert events[2]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_watch_resume_sees_exactly_the_missed_events(
    kube_api: KubeAPI, client: httpx.Client
) -> None:
    kube_api.create(pod("a"))
    kube_api.create(pod("b"))
    seen = watch(client, "/api/v1/namespaces/default/pods", timeoutSeconds="1")
    last_rv = seen[-1]["object"]["metadata"]["resourceVersion"]
    # while "disconnected"
    kube_api.create(pod("c"))
    kube_api.patch("pods", "a", {"metadata": {"labels": {"v": "2"}}})
    kube_api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "noise"}})
    kube_api.delete("pods", "b")
    kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "elsewhere"}})
    kube_api.create(pod("d", namespace="elsewhere"))
    events = watch(
        client, "/api/v1/namespaces/default/pods", resourceVersion=last_rv, timeoutSeconds="1"
    )
    assert names(events) == [("ADDED", "c"), ("MODIFIED", "a"), ("DELETED", "b")]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == sorted(rvs) and rvs[0] > int(last_rv)
    assert events[1]["object"]["metadata"]["labels"] == {"v": "2"}
    # all namespaces
    events = watch(client, "/api/v1/pods", resourceVersion=last_rv, timeoutSeconds="1")
    assert names(events) == [("ADDED", "c"), ("MODIFIED", "a"), ("DELETED", "b"), ("ADDED", "d")]


def test_watch_with_selectors_sends_deleted_when_an_object_stops_matching(
    kube_api: KubeAPI, client: httpx.Client
) -> None:
    kube_api.create(pod("a", labels={"app": "web"}))
    rv = str(kube_api.resource_version)
    kube_api.patch("pods", "a", {"metadata": {"labels": {"app": "db"}}})  # leaves the selection
    kube_api.patch("pods", "a", {"metadata": {"labels": {"app": "web"}}})  # enters it again
    kube_api.create(pod("b", labels={"app": "db"}))
    kube_api.patch("pods", "a", {"spec": {"nodeName": "n1"}})
    events = watch(
        client, "/api/v1/pods", resourceVersion=rv, labelSelector="app=web", timeoutSeconds="1"
    )
    assert names(events) == [("DELETED", "a"), ("ADDED", "a"), ("MODIFIED", "a")]
    assert events[0]["object"]["metadata"]["labels"] == {"app": "web"}  # the state it had
    events = watch(
        client,
        "/api/v1/pods",
        resourceVersion=rv,
        fieldSelector="spec.nodeName=n1",
        timeoutSeconds="1",
    )
    assert names(events) == [("ADDED", "a")]
    events = watch(
        client,
        "/api/v1/pods",
        resourceVersion=rv,
        fieldSelector="metadata.name=b",
        timeoutSeconds="1",
    )
    assert names(events) == [("ADDED", "b")]


def test_dropped_watch(kube_api: KubeAPI, client: httpx.Client) -> None:
    w = Watcher(client, "/api/v1/pods", resourceVersion=str(kube_api.resource_version))
    kube_api.wait_for_watches(1)
    kube_api.create(pod("a"))
    ev = w.next()
    assert isinstance(ev, dict) and ev["type"] == "ADDED"
    kube_api.drop_watches()
    ev = w.next()
    assert isinstance(ev, httpx.RemoteProtocolError | httpx.ReadError), ev  # no final chunk
    w.join()
    deadline = time.monotonic() + 5
    while kube_api.open_watches and time.monotonic() < deadline:
        time.sleep(0.01)
    assert kube_api.open_watches == 0
    # the server keeps serving new watches
    assert names(watch(client, "/api/v1/pods", timeoutSeconds="1")) == [("ADDED", "a")]


def test_stalled_watch_sends_nothing_then_catches_up(
    kube_api: KubeAPI, client: httpx.Client
) -> None:
    w = Watcher(
        client,
        "/api/v1/pods",
        resourceVersion=str(kube_api.resource_version),
        allowWatchBookmarks="true",
    )
    kube_api.wait_for_watches(1)
    ev = w.next()
    assert isinstance(ev, dict) and ev["type"] == "BOOKMARK"
    kube_api.stall_watches(1.0)
    start = time.monotonic()
    kube_api.create(pod("a"))
    ev = w.next(timeout=5)
    while isinstance(ev, dict) and ev["type"] == "BOOKMARK":  # a bookmark already in flight
        ev = w.next(timeout=5)
    assert time.monotonic() - start >= 0.9
    assert isinstance(ev, dict) and (ev["type"], ev["object"]["metadata"]["name"]) == ("ADDED", "a")
    kube_api.drop_watches()
    w.join()


def test_watch_timeout_ends_cleanly(kube_api: KubeAPI, client: httpx.Client) -> None:
    start = time.monotonic()
    assert (
        watch(
            client,
            "/api/v1/pods",
            resourceVersion=str(kube_api.resource_version),
            timeoutSeconds="1",
        )
        == []
    )
    assert 0.9 <= time.monotonic() - start < 10


# --------------------------------------------------------------------------- lists


def test_pagination_is_consistent_at_the_list_resource_version(
    kube_api: KubeAPI, client: httpx.Client
) -> None:
    for i in range(25):
        kube_api.create(pod(f"p{i:02d}"))
    first = client.get("/api/v1/namespaces/default/pods", params={"limit": "10"}).json()
    rv = first["metadata"]["resourceVersion"]
    assert len(first["items"]) == 10 and first["metadata"]["remainingItemCount"] == 15
    assert "kind" not in first["items"][0]  # typed lists: items carry no kind
    # changes after the first page are not seen by the continuation
    kube_api.delete("pods", "p15")
    kube_api.create(pod("p99"))
    kube_api.patch("pods", "p20", {"metadata": {"labels": {"late": "yes"}}})
    names_seen = [i["metadata"]["name"] for i in first["items"]]
    token = first["metadata"]["continue"]
    while token:
        page = client.get(
            "/api/v1/namespaces/default/pods", params={"limit": "10", "continue": token}
        ).json()
        assert page["metadata"]["resourceVersion"] == rv
        names_seen += [i["metadata"]["name"] for i in page["items"]]
        for item in page["items"]:
            assert "labels" not in item["metadata"] or "late" not in item["metadata"]["labels"]
        token = page["metadata"].get("continue", "")
    assert names_seen == [f"p{i:02d}" for i in range(25)]
    # a full list sees the changes
    now = client.get("/api/v1/namespaces/default/pods").json()
    assert len(now["items"]) == 25 and int(now["metadata"]["resourceVersion"]) > int(rv)
    # after a compaction the token is too old
    kube_api.compact()
    r = client.get(
        "/api/v1/namespaces/default/pods",
        params={"limit": "10", "continue": first["metadata"]["continue"]},
    )
    assert r.status_code == 410 and r.json()["reason"] == "Expired"


def test_list_with_selectors_and_pagination(kube_api: KubeAPI, client: httpx.Client) -> None:
    for i in range(10):
        kube_api.create(pod(f"p{i}", labels={"even": str(i % 2 == 0).lower()}))
    got, token = [], ""
    while True:
        params = {"limit": "2", "labelSelector": "even=true"}
        if token:
            params["continue"] = token
        page = client.get("/api/v1/pods", params=params).json()
        assert "remainingItemCount" not in page["metadata"]
        got += [i["metadata"]["name"] for i in page["items"]]
        token = page["metadata"].get("continue", "")
        if not token:
            break
    assert got == ["p0", "p2", "p4", "p6", "p8"]


def test_large_lists_are_fast(kube_api: KubeAPI, client: httpx.Client) -> None:
    for ns in ("a", "b"):
        kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    start = time.monotonic()
    for i in range(10_000):
        kube_api.store.create(
            kube_api.resource("pods"),
            "a" if i % 2 else "b",
            pod(f"pod-{i}", "a" if i % 2 else "b", {"app": f"app{i % 50}"}),
            manager="bench",
        )
    for i in range(1_000):
        kube_api.store.create(
            kube_api.resource("netpol"),
            "a",
            netpol(f"np-{i}", f"app{i % 50}", "a"),
            manager="bench",
        )
    load = time.monotonic() - start
    start = time.monotonic()
    pods = client.get("/api/v1/pods").json()
    policies = client.get("/apis/networking.k8s.io/v1/networkpolicies").json()
    elapsed = time.monotonic() - start
    assert len(pods["items"]) == 10_000 and len(policies["items"]) == 1_000
    assert elapsed < 5, f"listing took {elapsed:.2f} s (loading {load:.2f} s)"
    start = time.monotonic()
    selected = client.get("/api/v1/namespaces/a/pods", params={"labelSelector": "app=app1"}).json()
    assert len(selected["items"]) == 200 and time.monotonic() - start < 2


# --------------------------------------------------------------------------- writes


def test_create_replace_and_conflicts(kube_api: KubeAPI, client: httpx.Client) -> None:
    r = client.post(
        "/api/v1/namespaces/default/configmaps",
        json={
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "c"},
            "data": {"k": "v"},
        },
    )
    assert r.status_code == 201
    created = r.json()
    for field in ("uid", "resourceVersion", "creationTimestamp", "generation"):
        assert field in created["metadata"]
    r = client.post(
        "/api/v1/namespaces/default/configmaps",
        json={"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}},
    )
    assert r.status_code == 409
    assert r.json() == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'configmaps "c" already exists',
        "reason": "AlreadyExists",
        "details": {"name": "c", "kind": "configmaps"},
        "code": 409,
    }
    updated = {**created, "data": {"k": "w"}}
    r = client.put("/api/v1/namespaces/default/configmaps/c", json=updated)
    assert r.status_code == 200 and r.json()["data"] == {"k": "w"}
    r = client.put("/api/v1/namespaces/default/configmaps/c", json=updated)  # stale RV
    assert r.status_code == 409 and r.json()["reason"] == "Conflict"
    assert "the object has been modified" in r.json()["message"]
    r = client.get("/api/v1/namespaces/default/configmaps/nope")
    assert r.status_code == 404 and r.json()["details"] == {"name": "nope", "kind": "configmaps"}
    r = client.post(
        "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies",
        json={
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {},
            "spec": {},
        },
    )
    assert r.status_code == 422 and r.json()["reason"] == "Invalid"
    assert r.json()["details"]["causes"][0]["field"] == "metadata.name"
    r = client.patch(
        "/api/v1/namespaces/default/configmaps/c",
        content=b"{}",
        headers={"Content-Type": "text/plain"},
    )
    assert r.status_code == 415 and r.json()["reason"] == "UnsupportedMediaType"
    r = client.post("/api/v1/namespaces/default/configmaps/c", json={})
    assert r.status_code == 405 and r.json()["reason"] == "MethodNotAllowed"
    r = client.post(
        "/api/v1/namespaces/default/configmaps",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["reason"] == "BadRequest"
    r = client.get("/api/v1/namespaces/default/bogus")
    assert r.status_code == 404


def test_patches(kube_api: KubeAPI, client: httpx.Client) -> None:
    kube_api.create(pod("p", labels={"a": "1", "b": "2"}))
    url = "/api/v1/namespaces/default/pods/p"
    r = client.patch(
        url,
        content=json.dumps({"metadata": {"labels": {"a": None, "c": "3"}}}),
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert r.json()["metadata"]["labels"] == {"b": "2", "c": "3"}
    r = client.patch(
        url,
        content=json.dumps(
            [
                {"op": "test", "path": "/metadata/labels/b", "value": "2"},
                {"op": "replace", "path": "/metadata/labels/b", "value": "20"},
                {"op": "add", "path": "/spec/containers/-", "value": {"name": "d", "image": "x"}},
            ]
        ),
        headers={"Content-Type": "application/json-patch+json"},
    )
    assert r.status_code == 200
    assert r.json()["metadata"]["labels"]["b"] == "20" and len(r.json()["spec"]["containers"]) == 2
    r = client.patch(
        url,
        content=json.dumps([{"op": "test", "path": "/metadata/labels/b", "value": "x"}]),
        headers={"Content-Type": "application/json-patch+json"},
    )
    assert r.status_code == 422
    r = client.patch(
        url,
        content=json.dumps(
            {
                "spec": {
                    "containers": [{"name": "d", "image": "y"}, {"name": "c", "$patch": "delete"}]
                }
            }
        ),
        headers={"Content-Type": "application/strategic-merge-patch+json"},
    )
    assert r.json()["spec"]["containers"] == [{"name": "d", "image": "y"}]
    r = client.patch(
        url,
        content=json.dumps({"metadata": {"resourceVersion": "1", "labels": {"z": "z"}}}),
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert r.status_code == 409
    r = client.patch(
        "/api/v1/namespaces/default/pods/absent",
        content=b"{}",
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert r.status_code == 404


def test_server_side_apply_noop_conflict_force(kube_api: KubeAPI, client: httpx.Client) -> None:
    url = "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies/np"
    body = yaml.safe_dump(netpol("np", "web"))

    def apply(manager: str, doc: str, force: bool = False) -> httpx.Response:
        params = {"fieldManager": manager} | ({"force": "true"} if force else {})
        return client.patch(
            url,
            content=doc,
            params=params,
            headers={"Content-Type": "application/apply-patch+yaml"},
        )

    r = apply("operator", body)
    assert r.status_code == 201
    rv = r.json()["metadata"]["resourceVersion"]
    (entry,) = r.json()["metadata"]["managedFields"]
    assert entry["manager"] == "operator" and entry["operation"] == "Apply"
    assert entry["fieldsV1"] == {
        "f:metadata": {"f:labels": {"f:app": {}}},
        "f:spec": {"f:podSelector": {"f:matchLabels": {"f:app": {}}}, "f:policyTypes": {}},
    }
    w = Watcher(
        client, "/apis/networking.k8s.io/v1/networkpolicies", resourceVersion=rv, timeoutSeconds="1"
    )
    r = apply("operator", body)
    assert r.status_code == 200 and r.json()["metadata"]["resourceVersion"] == rv  # no-op
    assert w.next() is None  # and no event
    w.join()
    r = client.patch(
        url, params={}, content=body, headers={"Content-Type": "application/apply-patch+yaml"}
    )
    assert r.status_code == 400 and "fieldManager is required" in r.json()["message"]

    other = netpol("np", "web")
    other["spec"]["policyTypes"] = ["Egress"]
    r = apply("intruder", yaml.safe_dump(other))
    assert r.status_code == 409 and r.json()["reason"] == "Conflict"
    causes = r.json()["details"]["causes"]
    assert [(c["reason"], c["field"]) for c in causes] == [
        ("FieldManagerConflict", ".spec.policyTypes")
    ]
    assert 'conflict with "operator"' in r.json()["message"]
    # same values: shared ownership, no conflict
    assert apply("friend", body).status_code == 200
    r = apply("intruder", yaml.safe_dump(other), force=True)
    assert r.status_code == 200 and r.json()["spec"]["policyTypes"] == ["Egress"]
    fields = {e["manager"]: e["fieldsV1"] for e in r.json()["metadata"]["managedFields"]}
    assert "f:policyTypes" not in fields["operator"]["f:spec"]
    assert "f:policyTypes" in fields["intruder"]["f:spec"]

    # a field dropped from the operator's config goes when nobody else owns it
    kube_api.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "c"},
            "data": {"x": "1", "y": "2"},
        },
        field_manager="operator",
    )
    kube_api.apply(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"y": "2"}},
        field_manager="other",
    )
    kube_api.apply(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {}},
        field_manager="operator",
    )
    assert kube_api.get("configmaps", "c")["data"] == {"y": "2"}
    # a non-apply update takes ownership: a later apply of a different value conflicts
    kube_api.patch("configmaps", "c", {"data": {"y": "3"}}, field_manager="editor")
    with pytest.raises(ApiError) as e:
        kube_api.apply(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "c"},
                "data": {"y": "2"},
            },
            field_manager="other",
        )
    assert e.value.code == 409 and 'conflict with "editor"' in e.value.message
    # a resourceVersion in the applied configuration is a precondition
    with pytest.raises(ApiError) as e:
        kube_api.apply(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "c", "resourceVersion": "1"},
                "data": {},
            },
            field_manager="other",
            force=True,
        )
    assert e.value.code == 409 and e.value.reason == "Conflict"


def test_server_side_apply_associative_lists(kube_api: KubeAPI) -> None:
    ds = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "agent"},
        "spec": {
            "selector": {"matchLabels": {"app": "a"}},
            "template": {
                "metadata": {"labels": {"app": "a"}},
                "spec": {
                    "containers": [
                        {
                            "name": "agent",
                            "image": "v1",
                            "ports": [{"containerPort": 80, "protocol": "TCP"}],
                        }
                    ]
                },
            },
        },
    }
    live = kube_api.apply(ds, field_manager="op")
    fields = live["metadata"]["managedFields"][0]["fieldsV1"]
    containers = fields["f:spec"]["f:template"]["f:spec"]["f:containers"]
    assert containers == {
        'k:{"name":"agent"}': {
            ".": {},
            "f:image": {},
            "f:name": {},
            "f:ports": {
                'k:{"containerPort":80,"protocol":"TCP"}': {
                    ".": {},
                    "f:containerPort": {},
                    "f:protocol": {},
                }
            },
        }
    }
    side = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "agent"},
        "spec": {"template": {"spec": {"containers": [{"name": "sidecar", "image": "s"}]}}},
    }
    live = kube_api.apply(side, field_manager="injector")
    assert [c["name"] for c in live["spec"]["template"]["spec"]["containers"]] == [
        "agent",
        "sidecar",
    ]
    assert live["metadata"]["generation"] == 2
    live = kube_api.apply(
        {**side, "spec": {"template": {"spec": {"containers": []}}}}, field_manager="injector"
    )
    assert [c["name"] for c in live["spec"]["template"]["spec"]["containers"]] == ["agent"]


def test_status_subresource(kube_api: KubeAPI, client: httpx.Client) -> None:
    created = kube_api.create({**pod("p"), "status": {"phase": "Running", "podIP": "10.0.0.5"}})
    assert created["status"]["podIP"] == "10.0.0.5"  # the helper wrote /status after create
    r = client.post(
        "/api/v1/namespaces/default/pods", json={**pod("q"), "status": {"phase": "Running"}}
    )
    assert r.json()["status"]["phase"] == "Pending"  # create ignores status
    r = client.patch(
        "/api/v1/namespaces/default/pods/q",
        content=json.dumps({"status": {"phase": "Running"}}),
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert r.json()["status"]["phase"] == "Pending"  # the main resource ignores status
    r = client.patch(
        "/api/v1/namespaces/default/pods/q/status",
        content=json.dumps(
            {
                "status": {"phase": "Running", "podIP": "10.0.0.6"},
                "metadata": {"labels": {"ignored": "yes"}},
            }
        ),
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert r.status_code == 200 and r.json()["status"]["podIP"] == "10.0.0.6"
    assert not r.json()["metadata"].get("labels")
    assert r.json()["metadata"]["generation"] == 1
    assert (
        kube_api.list("pods", field_selector="status.podIP=10.0.0.6")[0]["metadata"]["name"] == "q"
    )
    r = client.get("/api/v1/namespaces/default/configmaps/x/status")
    assert r.status_code == 404


# --------------------------------------------------------------------------- deletion


def owner_ref(obj: Obj) -> Obj:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
    }


def test_garbage_collection_cascades(kube_api: KubeAPI, client: httpx.Client) -> None:
    kube_api.create(CRD)
    ms = kube_api.create(
        {
            "apiVersion": "stockade.io/v1alpha1",
            "kind": "MicroService",
            "metadata": {"name": "web"},
            "spec": {},
        }
    )
    np = netpol("web-ingress", "web")
    np["metadata"]["ownerReferences"] = [owner_ref(ms)]
    np = kube_api.create(np)
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "grandchild", "ownerReferences": [owner_ref(np)]},
    }
    kube_api.create(cm)
    other = kube_api.create(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "keeper"}}
    )
    coowned = kube_api.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "co-owned", "ownerReferences": [owner_ref(ms), owner_ref(other)]},
        }
    )
    rv = str(kube_api.resource_version)
    r = client.delete("/apis/stockade.io/v1alpha1/namespaces/default/microservices/web")
    assert r.status_code == 200 and r.json()["metadata"]["name"] == "web"
    assert not kube_api.exists("networkpolicies", "web-ingress")
    assert not kube_api.exists("configmaps", "grandchild")
    left = kube_api.get("configmaps", "co-owned")
    assert left["metadata"]["ownerReferences"] == [owner_ref(other)]
    assert int(left["metadata"]["resourceVersion"]) > int(coowned["metadata"]["resourceVersion"])
    events = watch(client, "/api/v1/configmaps", resourceVersion=rv, timeoutSeconds="1")
    assert ("DELETED", "grandchild") in names(events) and ("MODIFIED", "co-owned") in names(events)


def test_garbage_collection_can_lag_like_the_real_one() -> None:
    with KubeAPI(gc_delay=0.3) as api:
        owner = api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "o"}})
        child = api.create(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "c", "ownerReferences": [owner_ref(owner)]},
            }
        )
        api.create(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "g", "ownerReferences": [owner_ref(child)]},
            }
        )
        start = time.monotonic()
        api.delete("configmaps", "o")
        assert api.exists("configmaps", "c")  # the DELETE returned before the collector ran
        while api.exists("configmaps", "g") and time.monotonic() - start < 10:
            time.sleep(0.02)
        assert not api.exists("configmaps", "c") and not api.exists("configmaps", "g")
        assert time.monotonic() - start >= 0.6  # two generations, 0.3 s each
        owner = api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "o"}})
        api.create(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "c", "ownerReferences": [owner_ref(owner)]},
            }
        )
        api.delete("configmaps", "o")
        api.collect_garbage()
        assert not api.exists("configmaps", "c")


def test_watch_ends_when_its_crd_goes(kube_api: KubeAPI, client: httpx.Client) -> None:
    kube_api.create(CRD)
    kube_api.create(
        {
            "apiVersion": "stockade.io/v1alpha1",
            "kind": "MicroService",
            "metadata": {"name": "web"},
            "spec": {},
        }
    )
    w = Watcher(
        client,
        "/apis/stockade.io/v1alpha1/microservices",
        resourceVersion=str(kube_api.resource_version),
    )
    kube_api.wait_for_watches(1)
    kube_api.delete("crd", "microservices.stockade.io")
    ev = w.next()
    assert isinstance(ev, dict) and (ev["type"], ev["object"]["metadata"]["name"]) == (
        "DELETED",
        "web",
    )
    assert w.next() is None
    w.join()


def test_orphan_propagation(kube_api: KubeAPI, client: httpx.Client) -> None:
    owner = kube_api.create(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}}
    )
    kube_api.create(
        {**pod("child"), "metadata": {"name": "child", "ownerReferences": [owner_ref(owner)]}}
    )
    r = client.request(
        "DELETE",
        "/api/v1/namespaces/default/configmaps/owner",
        json={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Orphan"},
    )
    assert r.status_code == 200
    child = kube_api.get("pods", "child")
    assert "ownerReferences" not in child["metadata"]


def test_namespace_deletion_and_finalizers(kube_api: KubeAPI) -> None:
    kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "gone"}})
    kube_api.create(pod("a", namespace="gone"))
    kube_api.create(netpol("np", "a", namespace="gone"))
    kube_api.create(pod("kept"))
    out = kube_api.delete("namespaces", "gone")
    assert out["status"]["phase"] == "Terminating"
    assert kube_api.list("pods") == [kube_api.get("pods", "kept")]
    assert kube_api.list("networkpolicies") == []
    assert not kube_api.exists("namespaces", "gone")

    kube_api.create({**pod("held"), "metadata": {"name": "held", "finalizers": ["x/y"]}})
    marked = kube_api.delete("pods", "held")
    assert marked["metadata"]["deletionTimestamp"]
    assert kube_api.exists("pods", "held")
    kube_api.patch("pods", "held", {"metadata": {"finalizers": None}})
    assert not kube_api.exists("pods", "held")


# --------------------------------------------------------------------------- faults, threads


def test_fail_next_delay_and_counts(kube_api: KubeAPI, client: httpx.Client) -> None:
    kube_api.fail_next(2, 503, verb="list", resource="pods")
    assert client.get("/api/v1/configmaps").status_code == 200
    for _ in range(2):
        r = client.get("/api/v1/pods")
        assert r.status_code == 503 and r.json()["reason"] == "ServiceUnavailable"
    assert client.get("/api/v1/pods").status_code == 200
    kube_api.fail_next(1, 500)
    assert client.get("/api/v1/namespaces").status_code == 500
    kube_api.delay(0.3)
    start = time.monotonic()
    client.get("/version")
    assert time.monotonic() - start >= 0.3
    kube_api.delay(0)
    assert kube_api.count("list", "pods") == 3
    assert kube_api.count("list") == 5
    assert kube_api.count(resource="pods") == 3


def test_concurrent_writers_and_watchers_agree(kube_api: KubeAPI) -> None:
    """Eight writers over HTTP and eight watches: every watch sees every write, once, in
    resourceVersion order, and the final state matches."""
    start_rv = str(kube_api.resource_version)
    clients = [httpx.Client(base_url=kube_api.url, timeout=10) for _ in range(16)]
    try:
        watchers = [
            Watcher(c, "/api/v1/configmaps", resourceVersion=start_rv, timeoutSeconds="30")
            for c in clients[8:]
        ]
        kube_api.wait_for_watches(8)

        def writer(n: int, c: httpx.Client) -> None:
            for i in range(25):
                name = f"w{n}-{i}"
                r = c.post(
                    "/api/v1/namespaces/default/configmaps",
                    json={"metadata": {"name": name}, "data": {"v": "0"}},
                )
                assert r.status_code == 201
                r = c.patch(
                    f"/api/v1/namespaces/default/configmaps/{name}",
                    content=b'{"data":{"v":"1"}}',
                    headers={"Content-Type": "application/merge-patch+json"},
                )
                assert r.status_code == 200
                if i % 5 == 0:
                    assert (
                        c.delete(f"/api/v1/namespaces/default/configmaps/{name}").status_code == 200
                    )

        threads = [threading.Thread(target=writer, args=(n, c)) for n, c in enumerate(clients[:8])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        final_rv = kube_api.resource_version
        expected = 8 * (25 * 2 + 5)
        for w in watchers:
            got: list[Obj] = []
            while len(got) < expected:
                ev = w.next(timeout=10)
                assert isinstance(ev, dict), ev
                got.append(ev)
            rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in got]
            assert rvs == sorted(set(rvs)) and rvs[-1] == final_rv
            state: dict[str, str] = {}
            for e in got:
                name = e["object"]["metadata"]["name"]
                if e["type"] == "DELETED":
                    del state[name]
                else:
                    state[name] = e["object"]["data"]["v"]
            live = {o["metadata"]["name"]: o["data"]["v"] for o in kube_api.list("configmaps")}
            assert state == live and len(live) == 8 * 20
        kube_api.drop_watches()
        for w in watchers:
            w.join()
    finally:
        for c in clients:
            c.close()


def test_a_bug_of_the_double_is_a_500_and_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    with KubeAPI() as api, httpx.Client(base_url=api.url) as c:

        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("boom")

        monkeypatch.setattr(api.store, "get", broken)
        r = c.get("/api/v1/namespaces/default/pods/x")
        assert r.status_code == 500 and r.json()["reason"] == "InternalError"
        assert "RuntimeError: boom" in r.json()["message"]
        assert len(api.internal_errors) == 1
        assert c.get("/api/v1/pods").status_code == 200  # the connection and server carry on


def test_stop_joins_every_thread() -> None:
    before = set(threading.enumerate())
    api = KubeAPI(bookmark_interval=0.1).start()
    client = httpx.Client(base_url=api.url)
    try:
        watchers = [Watcher(client, "/api/v1/pods", allowWatchBookmarks="true") for _ in range(20)]
        api.wait_for_watches(20)
        client.get("/api/v1/pods")  # an idle keep-alive connection stays open
        start = time.monotonic()
        api.stop()
        assert time.monotonic() - start < 5
        for w in watchers:
            w.join()
    finally:
        client.close()
        api.stop()
    leftover = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert leftover == []


def test_kubeconfig(kube_api: KubeAPI, tmp_path: Path) -> None:
    path = kube_api.write_kubeconfig(tmp_path / "cfg", namespace="other")
    doc = yaml.safe_load(path.read_text())
    assert doc["clusters"][0]["cluster"]["server"] == kube_api.url
    assert doc["contexts"][0]["context"]["namespace"] == "other"
    assert doc["users"][0]["user"]["token"]
