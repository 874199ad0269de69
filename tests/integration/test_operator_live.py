"""`stockade operator run` against the Kubernetes API test double (tests/support/kubeapi).

The CRD of deploy/ is applied to the double first; the operator runs in-process
(`Operator.start/stop`) over our client and reflector, as `operator run` does,
and once as the real command in a subprocess. Write requests are counted by the
double: a reconcile with nothing to change, and a restart, must make none.
No root needed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.support.kubeapi import KubeAPI, kube_api_fixture

from stockade.kube.client import KubeClient
from stockade.operator.controller import Operator, OperatorConfig
from stockade.operator.reconcile import read_services
from stockade.operator.render import MANAGED_BY_LABEL, MANAGER, render_all

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "deploy" / "crd-microservice.yaml"
WRITES = ("create", "update", "patch", "delete", "deletecollection")

kube_api = kube_api_fixture(bookmark_interval=0.1)

Obj = dict[str, Any]


def ms(name: str, namespace: str = "backend", *, depends: list[Obj] | None = None,
       ports: list[Obj] | None = None, isolation: Obj | None = None) -> Obj:
    spec: Obj = {"selector": {"matchLabels": {"app": name}},
                 "ports": ports if ports is not None else [{"name": "http", "port": 8080}]}
    if depends is not None:
        spec["dependsOn"] = depends
    if isolation is not None:
        spec["isolation"] = isolation
    return {"apiVersion": "stockade.io/v1alpha1", "kind": "MicroService",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def wait_for(what: Callable[[], Any], timeout: float = 10.0, message: str = "") -> Any:
    end = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {message or what}")
        time.sleep(0.02)


def writes(api: KubeAPI) -> int:
    return sum(api.count(verb=v) for v in WRITES)


def settle(op: Operator, api: KubeAPI, timeout: float = 10.0) -> None:
    """Until the operator has seen everything the API holds and has nothing left to do."""

    def quiet() -> bool:
        rv = api.resource_version
        seen = all(r.status.resource_version and int(r.status.resource_version) >= rv
                   for r in op.reflectors)
        return seen and op.idle and api.resource_version == rv

    end = time.monotonic() + timeout
    while True:
        if quiet():
            time.sleep(0.05)
            if quiet():
                return
        if time.monotonic() > end:
            raise AssertionError(f"the operator did not settle: idle={op.idle} "
                                 f"errors={op.last_outcome.errors}")
        time.sleep(0.02)


def managed(api: KubeAPI) -> dict[str, Obj]:
    return {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p
            for p in api.list("networkpolicies", label_selector=f"{MANAGED_BY_LABEL}={MANAGER}")}


def conditions(api: KubeAPI, name: str, namespace: str = "backend") -> dict[str, Obj]:
    obj = api.get("microservices", name, namespace)
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def warnings(api: KubeAPI, name: str, namespace: str = "backend") -> list[Obj]:
    return [e for e in api.list("events", namespace)
            if e["involvedObject"]["name"] == name and e["type"] == "Warning"]


@pytest.fixture
def cluster(kube_api: KubeAPI, tmp_path: Path) -> Path:
    kube_api.create(yaml.safe_load(CRD.read_text()))
    assert kube_api.crd_registered("microservices.stockade.io")
    for ns in ("frontend", "backend"):
        kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    return kube_api.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def operator(cluster: Path) -> Iterator[Callable[[], Operator]]:
    """Start an operator (several: one after the other); all stopped at the end."""
    running: list[tuple[Operator, KubeClient]] = []

    def start() -> Operator:
        client = KubeClient.connect(str(cluster))
        op = Operator(client, OperatorConfig(coalesce=0.02, retry_base=0.05, retry_cap=0.5))
        op.start()
        running.append((op, client))
        return op

    yield start
    for op, client in running:
        op.stop()
        client.close()


def graph(api: KubeAPI) -> None:
    """frontend/web -> backend/api -> backend/db; web is public, api limits its egress."""
    api.create(ms("web", "frontend", depends=[{"name": "api", "namespace": "backend"}],
                  isolation={"ingress": False}))
    api.create(ms("api", depends=[{"name": "db", "ports": ["pg"]}],
                  isolation={"ingress": True, "egress": True}))
    api.create(ms("db", ports=[{"name": "pg", "port": 5432}]))


# ---- tests ---------------------------------------------------------------------------


def test_services_become_exactly_the_rendered_policies(
        kube_api: KubeAPI, operator: Callable[[], Operator]) -> None:
    graph(kube_api)
    op = operator()
    settle(op, kube_api)
    services = read_services(kube_api.list("microservices"))
    expected = render_all([s.service for s in services if s.service is not None])
    got = managed(kube_api)
    assert sorted(got) == sorted(k.render() for k in expected.policies)
    uids = {s.key: s.uid for s in services}
    for key, manifest in expected.policies.items():
        policy = got[key.render()]
        assert policy["spec"] == manifest["spec"]
        assert policy["metadata"]["labels"] == {MANAGED_BY_LABEL: MANAGER}
        [ref] = policy["metadata"]["ownerReferences"]
        assert ref["uid"] == uids[expected.owners[key]] and ref["controller"] is True
        assert ref["kind"] == "MicroService" and ref["blockOwnerDeletion"] is True
        assert any(m["manager"] == MANAGER and m["operation"] == "Apply"
                   for m in policy["metadata"]["managedFields"])
    api = conditions(kube_api, "api")
    assert api["DependenciesResolved"]["status"] == "True"
    assert api["Ready"]["status"] == "True" and api["Valid"]["status"] == "True"
    status = kube_api.get("microservices", "api", "backend")["status"]
    assert status["policies"] == ["api-egress", "api-ingress"]
    assert status["observedGeneration"] == 1


def test_a_reconcile_with_nothing_changed_writes_nothing(
        kube_api: KubeAPI, operator: Callable[[], Operator]) -> None:
    graph(kube_api)
    op = operator()
    settle(op, kube_api)
    kube_api.reset_counts()
    n = op.reconciles
    op.trigger()
    wait_for(lambda: op.reconciles > n, message="a reconcile")
    # a change that is not one for the operator: a label on a MicroService
    kube_api.patch("microservices", "db", {"metadata": {"labels": {"tier": "data"}}}, "backend")
    wait_for(lambda: op.reconciles > n + 1, message="another reconcile")
    settle(op, kube_api)
    assert writes(kube_api) == 0, kube_api.requests


def test_a_new_dependency_changes_only_the_targets_policy(
        kube_api: KubeAPI, operator: Callable[[], Operator]) -> None:
    graph(kube_api)
    kube_api.create(ms("cache", ports=[{"name": "redis", "port": 6379}]))
    op = operator()
    settle(op, kube_api)
    before = {k: p["metadata"]["resourceVersion"] for k, p in managed(kube_api).items()}
    kube_api.reset_counts()
    # web (not egress-isolated) now also calls cache: only cache's ingress changes
    web = kube_api.get("microservices", "web", "frontend")
    deps = [*web["spec"]["dependsOn"], {"name": "cache", "namespace": "backend"}]
    kube_api.patch("microservices", "web", {"spec": {"dependsOn": deps}}, "frontend")
    settle(op, kube_api)
    after = {k: p["metadata"]["resourceVersion"] for k, p in managed(kube_api).items()}
    assert [k for k in after if after[k] != before[k]] == ["backend/cache-ingress"]
    rules = managed(kube_api)["backend/cache-ingress"]["spec"]["ingress"]
    assert [r["from"][0]["podSelector"] for r in rules] == [{"matchLabels": {"app": "web"}}]
    assert kube_api.count("patch", "networkpolicies") == 1
    assert kube_api.count("delete") == 0


def test_a_missing_dependency_is_a_condition_and_one_event_until_it_exists(
        kube_api: KubeAPI, operator: Callable[[], Operator]) -> None:
    kube_api.create(ms("api", depends=[{"name": "db", "ports": ["pg"]}]))
    op = operator()
    settle(op, kube_api)
    cond = conditions(kube_api, "api")["DependenciesResolved"]
    assert cond["status"] == "False" and cond["reason"] == "DependencyNotFound"
    assert "spec.dependsOn[0]" in cond["message"]
    since = cond["lastTransitionTime"]
    [event] = warnings(kube_api, "api")
    assert event["reason"] == "DependencyNotFound"
    assert event["involvedObject"]["kind"] == "MicroService"
    assert event["message"].startswith("spec.dependsOn[0]: depends on MicroService backend/db")
    # more reconciles (a label, a trigger): no second event, no status write
    kube_api.reset_counts()
    kube_api.patch("microservices", "api", {"metadata": {"labels": {"x": "y"}}}, "backend")
    op.trigger()
    time.sleep(0.2)
    settle(op, kube_api)
    assert len(warnings(kube_api, "api")) == 1
    assert writes(kube_api) == 0  # (the double counts HTTP requests only)
    # the dependency is created: resolved, and db's ingress admits api
    time.sleep(1.1)  # lastTransitionTime has a resolution of one second
    kube_api.create(ms("db", ports=[{"name": "pg", "port": 5432}]))
    settle(op, kube_api)
    cond = conditions(kube_api, "api")["DependenciesResolved"]
    assert cond["status"] == "True" and cond["lastTransitionTime"] != since
    rules = managed(kube_api)["backend/db-ingress"]["spec"]["ingress"]
    assert rules == [{"from": [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "backend"}}, "podSelector": {"matchLabels": {
            "app": "api"}}}], "ports": [{"protocol": "TCP", "port": 5432}]}]
    assert len(warnings(kube_api, "api")) == 1


def test_a_deleted_service_loses_its_policies_to_the_garbage_collector(
        kube_api: KubeAPI, operator: Callable[[], Operator]) -> None:
    graph(kube_api)
    op = operator()
    settle(op, kube_api)
    kube_api.reset_counts()
    kube_api.delete("microservices", "api", "backend")
    settle(op, kube_api)
    got = managed(kube_api)
    assert "backend/api-ingress" not in got and "backend/api-egress" not in got
    assert kube_api.count("delete", "networkpolicies") == 0  # the API's GC, not us
    # web now depends on a missing service
    assert conditions(kube_api, "web", "frontend")["DependenciesResolved"]["status"] == "False"
    # db's ingress no longer admits api: nobody depends on db
    assert managed(kube_api)["backend/db-ingress"]["spec"].get("ingress", []) == []


def test_isolation_turned_off_deletes_that_policy(
        kube_api: KubeAPI, operator: Callable[[], Operator]) -> None:
    graph(kube_api)
    op = operator()
    settle(op, kube_api)
    kube_api.patch("microservices", "api",
                   {"spec": {"isolation": {"ingress": False, "egress": True}}}, "backend")
    settle(op, kube_api)
    got = managed(kube_api)
    assert "backend/api-ingress" not in got and "backend/api-egress" in got
    assert kube_api.get("microservices", "api", "backend")["status"]["policies"] == [
        "api-egress"]


def test_a_policy_we_do_not_manage_is_never_overwritten(
        kube_api: KubeAPI, operator: Callable[[], Operator]) -> None:
    users = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "db-ingress", "namespace": "backend",
                          "labels": {"owner": "alice"}},
             "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                      "policyTypes": ["Ingress"], "ingress": [{}]}}
    kube_api.create(users)
    graph(kube_api)
    op = operator()
    settle(op, kube_api)
    mine = kube_api.get("networkpolicies", "db-ingress", "backend")
    assert mine["metadata"]["labels"] == {"owner": "alice"}
    assert mine["spec"]["ingress"] == [{}]
    assert "ownerReferences" not in mine["metadata"]
    ready = conditions(kube_api, "db")["Ready"]
    assert ready["status"] == "False" and ready["reason"] == "PolicyNameTaken"
    assert [e["reason"] for e in warnings(kube_api, "db")] == ["PolicyNameTaken"]
    # alice deletes hers: the operator writes its own
    kube_api.delete("networkpolicies", "db-ingress", "backend")
    settle(op, kube_api)
    assert "backend/db-ingress" in managed(kube_api)
    assert conditions(kube_api, "db")["Ready"]["status"] == "True"


def test_a_policy_created_by_someone_between_two_looks_is_not_taken_over(
        kube_api: KubeAPI, operator: Callable[[], Operator]) -> None:
    """The create is an apply without force: a 409, a re-read, the policy left alone."""
    op = operator()
    settle(op, kube_api)
    op.stop()  # the cache will not see alice's policy; a fresh operator would
    users = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "db-ingress", "namespace": "backend"},
             "spec": {"podSelector": {"matchLabels": {"app": "other"}},
                      "policyTypes": ["Ingress"]}}
    kube_api.create(users)
    kube_api.create(ms("db", ports=[{"name": "pg", "port": 5432}]))
    # the stopped operator's caches hold the service and not alice's policy
    op.services.event("ADDED", kube_api.get("microservices", "db", "backend"))
    out = op.reconcile()
    assert out.applied == 0 and not out.errors
    assert kube_api.get("networkpolicies", "db-ingress", "backend")["spec"]["podSelector"] == {
        "matchLabels": {"app": "other"}}
    assert kube_api.count("get", "networkpolicies") >= 1


def test_a_restarted_operator_writes_nothing(
        kube_api: KubeAPI, operator: Callable[[], Operator]) -> None:
    graph(kube_api)
    kube_api.create(ms("batch", depends=[{"name": "queue"}], isolation={"ingress": False}))
    op = operator()
    settle(op, kube_api)
    assert len(warnings(kube_api, "batch")) == 1
    op.stop()
    kube_api.reset_counts()
    again = operator()
    settle(again, kube_api)
    assert again.reconciles >= 1
    assert writes(kube_api) == 0, kube_api.requests
    assert len(warnings(kube_api, "batch")) == 1


def test_api_errors_are_retried(kube_api: KubeAPI, operator: Callable[[], Operator]) -> None:
    kube_api.fail_next(2, 500, verb="patch", resource="networkpolicies")
    kube_api.fail_next(1, 503, verb="patch", resource="microservices/status")
    graph(kube_api)
    op = operator()
    settle(op, kube_api, timeout=20)
    assert len(managed(kube_api)) == 3
    assert conditions(kube_api, "db")["Ready"]["status"] == "True"


def test_nothing_is_written_before_both_lists(
        kube_api: KubeAPI, operator: Callable[[], Operator]) -> None:
    graph(kube_api)
    kube_api.fail_next(3, 500, verb="list", resource="networkpolicies")
    op = operator()
    time.sleep(0.3)
    assert not op.synced and writes(kube_api) == 0
    settle(op, kube_api, timeout=20)
    assert len(managed(kube_api)) == 3


def test_the_command_runs_until_sigterm(cluster: Path, kube_api: KubeAPI) -> None:
    graph(kube_api)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "stockade"), "operator", "run",
         "--kubeconfig", str(cluster), "--metrics-address", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        wait_for(lambda: len(managed(kube_api)) == 3, timeout=20, message="policies")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert out == ""
    assert "backend/db: ingress allowed from backend/api on TCP/5432" in err
    assert "operator stopped" in err


def test_a_relist_after_410_deletes_nothing_and_catches_up(
        kube_api: KubeAPI, operator: Callable[[], Operator]) -> None:
    graph(kube_api)
    op = operator()
    settle(op, kube_api)
    kube_api.reset_counts()
    kube_api.stall_watches(2.0)  # the change is not sent, and then forgotten: 410
    kube_api.patch("microservices", "db", {"spec": {"isolation": {"egress": True}}}, "backend")
    kube_api.compact()
    kube_api.drop_watches()
    settle(op, kube_api, timeout=20)
    assert "backend/db-egress" in managed(kube_api)
    assert kube_api.count("delete") == 0
    assert kube_api.count("patch", "networkpolicies") == 1
    assert kube_api.count("list") >= 1  # listed again, not resumed from "now"


def test_metrics_count_what_the_operator_does(cluster: Path, kube_api: KubeAPI) -> None:
    from stockade.agent.prometheus import MetricsServer, Registry
    from stockade.operator.controller import OperatorMetrics

    graph(kube_api)
    registry = Registry()
    metrics = OperatorMetrics.create(registry)
    client = KubeClient.connect(str(cluster))
    op = Operator(client, OperatorConfig(coalesce=0.02), metrics=metrics)
    server = MetricsServer(registry, "127.0.0.1:0", health=op.healthy)
    server.start()
    try:
        import httpx

        assert httpx.get(f"http://127.0.0.1:{server.port}/healthz").status_code == 503
        op.start()
        settle(op, kube_api)
        assert metrics.writes.value(kind="apply") == 3
        assert metrics.writes.value(kind="status") == 3
        assert metrics.policies.value() == 3
        assert metrics.reconciles.value() >= 1
        assert httpx.get(f"http://127.0.0.1:{server.port}/healthz").status_code == 200
        text = httpx.get(f"http://127.0.0.1:{server.port}/metrics").text
        assert 'stockade_operator_writes_total{kind="apply"} 3' in text
    finally:
        op.stop()
        server.stop()
        client.close()


def test_an_invalid_service_gets_valid_false_and_keeps_its_policies(
        kube_api: KubeAPI, operator: Callable[[], Operator]) -> None:
    graph(kube_api)
    op = operator()
    settle(op, kube_api)
    before = managed(kube_api)["backend/db-ingress"]["metadata"]["resourceVersion"]
    # the double checks no schema: a port the CRD would refuse reaches the operator
    kube_api.patch("microservices", "db", {"spec": {"ports": [{"name": "pg", "port": 70000}]}},
                   "backend")
    settle(op, kube_api)
    valid = conditions(kube_api, "db")["Valid"]
    assert valid["status"] == "False" and valid["reason"] == "Invalid"
    assert valid["message"].startswith("spec.ports[0].port: Invalid value: 70000")
    assert managed(kube_api)["backend/db-ingress"]["metadata"]["resourceVersion"] == before
    assert kube_api.get("microservices", "db", "backend")["status"]["policies"] == ["db-ingress"]
    resolved = conditions(kube_api, "api")["DependenciesResolved"]
    assert resolved["reason"] == "DependencyInvalid"
    assert [e["reason"] for e in warnings(kube_api, "db")] == ["Invalid"]
    assert [e["reason"] for e in warnings(kube_api, "api")] == ["DependencyInvalid"]
