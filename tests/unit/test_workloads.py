"""Workloads, not only Pods: the offline analyses read Deployments, StatefulSets,
DaemonSets, ReplicaSets, ReplicationControllers, Jobs and CronJobs from their pod
templates, Pods whatever their status, and skip other kinds with a note; what
enforcement reads (`dataplane apply`, the agent) is unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from stockade.cli.main import main
from stockade.errors import DecodeError, InputError
from stockade.load import load_cluster, load_objects
from stockade.model.cluster import ContainerPort
from stockade.model.decode import decode_pod, decode_workload, pod_controller
from stockade.model.parse import parse_objects


def workload(kind: str, name: str, labels: dict[str, str], ns: str | None = "shop",
             ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    template = {"metadata": {"labels": labels},
                "spec": {"containers": [{"name": "c", "image": "i",
                                         "ports": ports or []}]}}
    spec: dict[str, Any] = {"template": template}
    if kind == "CronJob":
        spec = {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": template}}}
    api = {"ReplicationController": "v1", "Job": "batch/v1", "CronJob": "batch/v1"}
    meta: dict[str, Any] = {"name": name}
    if ns:
        meta["namespace"] = ns
    return {"apiVersion": api.get(kind, "apps/v1"), "kind": kind, "metadata": meta,
            "spec": spec}


def pod(name: str, labels: dict[str, str], *, ip: str | None = None,
        owner: tuple[str, str] | None = None, controller: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "shop", "labels": labels}
    if owner:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner[0],
                                    "name": owner[1], "uid": "u", "controller": controller}]
    doc: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                           "spec": {"containers": [{"name": "c", "image": "i"}]},
                           "status": {"phase": "Pending"}}
    if ip:
        doc["status"] = {"phase": "Running", "podIP": ip}
    return doc


POLICY = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
          "metadata": {"name": "api", "namespace": "shop"},
          "spec": {"podSelector": {"matchLabels": {"app": "api"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                                "ports": [{"port": "http"}]}]},
          "status": {}}
SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api",
                                                               "namespace": "shop"},
           "spec": {"ports": [{"port": 80}]}}


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet", "DaemonSet", "ReplicaSet",
                                  "ReplicationController", "Job", "CronJob"])
def test_every_workload_kind_is_read_from_its_pod_template(kind: str) -> None:
    ep = decode_workload(workload(kind, "api", {"app": "api"},
                                  ports=[{"name": "http", "containerPort": 8080}]))
    assert ep.key == f"shop/api[{kind}]"
    assert ep.labels == {"app": "api"}
    assert ep.ips == ()
    assert ep.ports == (ContainerPort(8080, "TCP", "http"),)


def test_a_workload_without_namespace_is_in_default_and_bad_ports_name_the_field() -> None:
    assert decode_workload(workload("Job", "j", {}, ns=None)).namespace == "default"
    with pytest.raises(DecodeError) as info:
        decode_workload(workload("CronJob", "c", {}, ports=[{"containerPort": "x"}]))
    assert info.value.path == \
        "spec.jobTemplate.spec.template.spec.containers[0].ports[0].containerPort"


def test_pod_controller_as_written_never_a_node() -> None:
    assert pod_controller(pod("p", {}, owner=("ReplicaSet", "web-5d8"))) == \
        ("ReplicaSet", "web-5d8")
    assert pod_controller(pod("p", {}, owner=("ReplicaSet", "web"), controller=False)) is None
    assert pod_controller(pod("etcd", {}, owner=("Node", "minikube"))) is None
    assert pod_controller(pod("p", {})) is None


def _stream(*docs: dict[str, Any]) -> str:
    return yaml.safe_dump_all(list(docs))


def test_enforcement_reading_is_unchanged() -> None:
    text = _stream(workload("Deployment", "web", {"app": "web"}), pod("p", {}))
    with pytest.raises(DecodeError, match="has no IP"):
        parse_objects(text, "f.yaml")
    objects = parse_objects(_stream(workload("Deployment", "web", {}), SERVICE), "f.yaml")
    assert (objects.skipped, objects.workloads, objects.ignored) == (2, [], [])
    with pytest.raises(DecodeError, match="has no IP"):
        decode_pod(pod("p", {}))
    with pytest.raises(DecodeError, match="status: unknown field"):
        parse_objects(_stream(POLICY), "f.yaml")


def test_the_analyses_read_workloads_and_pods_whatever_their_status() -> None:
    text = _stream(POLICY, SERVICE, workload("CronJob", "report", {"app": "report"}),
                   pod("web-1", {"app": "web"}, owner=("ReplicaSet", "web-5d8")),
                   pod("lonely", {"app": "x"}, ip="10.0.0.9"))
    objects = parse_objects(text, "f.yaml", workloads=True)
    assert [ep.key for ep in objects.workloads] == ["shop/report[CronJob]"]
    assert [(ep.key, ep.ips) for ep in objects.endpoints] == [
        ("shop/web-1", ()), ("shop/lonely", ("10.0.0.9",))]
    assert objects.controllers == {"shop/web-1": ("ReplicaSet", "web-5d8")}
    assert objects.ignored == ["f.yaml: Service shop/api"]
    assert len(objects.policies) == 1
    keys = {ep.key for ep in objects.cluster().endpoints}
    assert keys == {"shop/report[CronJob]", "shop/web-1", "shop/lonely"}


def test_a_later_pod_without_controller_replaces_an_earlier_one(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text(_stream(pod("p", {}, owner=("Job", "j"))))
    b.write_text(_stream(pod("p", {})))
    assert load_objects([str(a), str(b)], workloads=True).controllers == {}
    assert load_objects([str(b), str(a)], workloads=True).controllers == \
        {"shop/p": ("Job", "j")}


def test_dataplane_loading_still_refuses_a_pod_without_ip(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(_stream(pod("p", {})))
    with pytest.raises(InputError, match="has no IP"):
        load_cluster([str(path)])


def _files(tmp_path: Path) -> Path:
    (tmp_path / "sub").mkdir()
    (tmp_path / "policy.yaml").write_text(_stream(POLICY, SERVICE))
    (tmp_path / "sub" / "apps.yaml").write_text(_stream(
        workload("Deployment", "api", {"app": "api"},
                 ports=[{"name": "http", "containerPort": 8080}]),
        pod("web-a", {"app": "web"}, owner=("ReplicaSet", "web-5d8")),
        pod("web-b", {"app": "web"}, owner=("ReplicaSet", "web-5d8")),
        pod("etcd-node", {"tier": "cp"}, owner=("Node", "n1")),
    ))
    return tmp_path


def test_list_names_workloads_and_groups_pods_by_controller(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _files(tmp_path)
    assert main(["list", "-f", str(root), "-R"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "0.0.0.0-255.255.255.255[External] => shop/etcd-node[Pod] : All Connections",
        "0.0.0.0-255.255.255.255[External] => shop/web-5d8[ReplicaSet] : All Connections",
        "shop/api[Deployment] => 0.0.0.0-255.255.255.255[External] : All Connections",
        "shop/api[Deployment] => shop/etcd-node[Pod] : All Connections",
        "shop/api[Deployment] => shop/web-5d8[ReplicaSet] : All Connections",
        "shop/etcd-node[Pod] => 0.0.0.0-255.255.255.255[External] : All Connections",
        "shop/etcd-node[Pod] => shop/web-5d8[ReplicaSet] : All Connections",
        "shop/web-5d8[ReplicaSet] => 0.0.0.0-255.255.255.255[External] : All Connections",
        "shop/web-5d8[ReplicaSet] => shop/api[Deployment] : TCP 8080",
        "shop/web-5d8[ReplicaSet] => shop/etcd-node[Pod] : All Connections",
    ]
    assert err == (f"stockade: note: {root}/policy.yaml: Service shop/api: skipped "
                   "(not a NetworkPolicy, Namespace, Pod or workload)\n")


def test_list_without_recursion_reads_the_top_directory_only(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _files(tmp_path)
    assert main(["list", "-f", str(root), "-o", "text"]) == 0
    assert capsys.readouterr().out == ""  # a policy, no workload


def test_list_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _files(tmp_path)
    assert main(["list", "-f", str(root), "-R", "-o", "csv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "src,dst,conn"
    assert "shop/web-5d8[ReplicaSet],shop/api[Deployment],TCP 8080" in out
    assert main(["list", "-f", str(root), "-R", "-o", "md"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["| src | dst | conn |", "|-----|-----|------|"]
    assert "| shop/web-5d8[ReplicaSet] | shop/api[Deployment] | TCP 8080 |" in out
    assert main(["list", "-f", str(root), "-R", "-o", "json"]) == 0
    rows = yaml.safe_load(capsys.readouterr().out)
    assert {"src": "shop/web-5d8[ReplicaSet]", "dst": "shop/api[Deployment]",
            "conn": "TCP 8080"} in rows
    with pytest.raises(SystemExit):
        main(["list", "-f", str(root), "-o", "sarif"])


def test_pods_of_one_controller_with_other_labels_are_reported(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p.yaml").write_text(_stream(
        pod("a", {"app": "web"}, owner=("ReplicaSet", "rs")),
        pod("b", {"app": "other"}, owner=("ReplicaSet", "rs"))))
    assert main(["list", "-f", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "warning: shop/b is part of shop/rs[ReplicaSet]" in err


def test_other_analyses_take_workloads_and_pending_pods(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _files(tmp_path)
    files = [str(root / "policy.yaml"), str(root / "sub" / "apps.yaml")]
    assert main(["matrix", "-f", *files, "--port", "8080"]) == 0
    out = capsys.readouterr().out
    assert "shop/api[Deployment]" in out and "shop/web-a" in out
    assert main(["coverage", "-f", *files]) == 0
    assert "no Pod" not in capsys.readouterr().err
    assert main(["explain", "-f", *files, "--from", "shop/web-a",
                 "--to", "shop/api[Deployment]", "--port", "http"]) == 0
    assert main(["lint", "-f", *files]) in (0, 1)
    capsys.readouterr()


def test_validate_checks_policies_and_names_what_it_ignored(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _files(tmp_path)
    policy = dict(POLICY)
    del policy["status"]
    (root / "policy.yaml").write_text(_stream(policy, SERVICE))
    assert main(["validate", str(root / "policy.yaml"), str(root / "sub" / "apps.yaml")]) == 0
    out, err = capsys.readouterr()
    assert out == "1 NetworkPolicy object(s) valid\n"
    assert f"{root}/policy.yaml: Service shop/api: ignored" in err
    assert f"{root}/sub/apps.yaml: Deployment shop/api: ignored" in err
    assert f"{root}/sub/apps.yaml: Pod shop/web-a: ignored" in err
