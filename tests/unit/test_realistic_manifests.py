"""A realistic manifest set, as people have it: a microservice shop of a dozen
Deployments with their Services, a PostgreSQL StatefulSet, a CronJob, a Pending
Pod without an IP, NetworkPolicies; and the same set as a `kubectl get -o yaml`
dump on standard input. `list`, `matrix`, `coverage`, `lint` and `diff` are
checked against the reference evaluator on pods synthesized from the workloads."""

from __future__ import annotations

import io
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from stockade.cli.main import main
from stockade.engine.connectivity import connectivity, workload_peers
from stockade.engine.evaluate import Evaluator, Flow
from stockade.load import load_objects
from stockade.model.policy import PROTOCOLS

SERVICES = {  # name -> (container port, port name)
    "frontend": (8080, "http"), "cart": (7070, "grpc"), "checkout": (5050, "grpc"),
    "catalog": (3550, "grpc"), "payment": (50051, "grpc"), "email": (5000, "grpc"),
    "shipping": (50052, "grpc"), "currency": (7000, "grpc"), "ads": (9555, "grpc"),
    "recommendation": (8081, "grpc"), "redis": (6379, "redis"), "loadgen": (8089, "ui"),
}


def deployment(name: str, port: int, port_name: str) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": name}},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name, "tier": "web"}},
                                  "spec": {"containers": [{
                                      "name": "server", "image": f"shop/{name}:1",
                                      "ports": [{"name": port_name, "containerPort": port}],
                                  }]}}}}


def service(name: str, port: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"selector": {"app": name}, "ports": [{"port": port}]}}


def policy(name: str, spec: dict[str, Any], ns: str = "shop") -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def app(name: str) -> dict[str, Any]:
    return {"podSelector": {"matchLabels": {"app": name}}}


PAYMENT_EGRESS_EXCEPT = ["203.0.113.128/25"]


def manifests(payment_except: list[str] | None = None) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": "shop", "labels": {"team": "shop"}}},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "settings", "namespace": "shop"}, "data": {"a": "b"}},
    ]
    for name, (port, port_name) in SERVICES.items():
        docs += [deployment(name, port, port_name), service(name, port)]
    docs.append({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "db", "namespace": "shop"},
        "spec": {"serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
                 "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": [{
                     "name": "postgres", "image": "postgres:16",
                     "ports": [{"name": "postgres", "containerPort": 5432}]}]}}}})
    docs.append({
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": "nightly-report", "namespace": "shop"},
        "spec": {"schedule": "0 3 * * *", "jobTemplate": {"spec": {"template": {
            "metadata": {"labels": {"app": "report"}},
            "spec": {"restartPolicy": "Never",
                     "containers": [{"name": "r", "image": "shop/report:1"}]}}}}}})
    docs.append({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "debug", "namespace": "tools", "labels": {"app": "debug"}},
        "spec": {"containers": [{"name": "sh", "image": "busybox"}]},
        "status": {"phase": "Pending"}})
    docs += [
        policy("default-deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        policy("allow-dns", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{
            "to": [{"namespaceSelector": {"matchLabels": {
                "kubernetes.io/metadata.name": "kube-system"}}}],
            "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}]}),
        policy("frontend", {**app("frontend"), "policyTypes": ["Ingress", "Egress"],
                            "ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0",
                                                               "except": ["10.0.0.0/8"]}},
                                                  app("loadgen")],
                                         "ports": [{"port": "http"}]}],
                            "egress": [{"to": [app(n) for n in
                                               ("cart", "checkout", "catalog", "currency",
                                                "ads", "recommendation", "shipping")],
                                        "ports": [{"port": "grpc"}]}]}),
        policy("loadgen", {**app("loadgen"), "policyTypes": ["Egress"],
                           "egress": [{"to": [app("frontend")], "ports": [{"port": 8080}]}]}),
        policy("grpc-servers", {"podSelector": {"matchExpressions": [{
            "key": "app", "operator": "In",
            "values": ["cart", "catalog", "currency", "ads", "recommendation", "shipping",
                       "payment", "email", "checkout"]}]},
            "ingress": [{"from": [app("frontend"), app("checkout"), app("recommendation")],
                         "ports": [{"port": "grpc"}]}]}),
        policy("checkout-out", {**app("checkout"), "policyTypes": ["Egress"], "egress": [{
            "to": [app(n) for n in ("cart", "catalog", "currency", "payment", "email",
                                   "shipping")] + [app("db")],
            "ports": [{"port": "grpc"}, {"port": 5432}]}]}),
        policy("recommendation-out", {**app("recommendation"), "policyTypes": ["Egress"],
                                      "egress": [{"to": [app("catalog")]}]}),
        policy("cart-redis", {**app("cart"), "policyTypes": ["Egress"],
                              "egress": [{"to": [app("redis")], "ports": [{"port": 6379}]}]}),
        policy("redis", {**app("redis"), "ingress": [{"from": [app("cart")],
                                                      "ports": [{"port": "redis"}]}]}),
        policy("db", {**app("db"), "ingress": [{"from": [app("checkout"), app("report")],
                                                "ports": [{"port": "postgres"}]}]}),
        policy("report-out", {**app("report"), "policyTypes": ["Egress"],
                              "egress": [{"to": [app("db")], "ports": [{"port": 5432}]}]}),
        policy("payment-out", {**app("payment"), "policyTypes": ["Egress"], "egress": [{
            "to": [{"ipBlock": {"cidr": "203.0.113.0/24",
                                **({"except": payment_except} if payment_except else {})}}],
            "ports": [{"port": 443}]}]}),
    ]
    return docs


def write(tmp: Path, docs: list[dict[str, Any]], name: str = "shop.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump_all(docs))
    return path


def kubectl_dump(docs: list[dict[str, Any]]) -> str:
    """The set as `kubectl get ns,pods,deploy,... -A -o yaml` prints it: one List,
    server-set metadata and status on every object."""
    items = []
    for i, doc in enumerate(docs):
        doc = yaml.safe_load(yaml.safe_dump(doc))
        meta = doc["metadata"]
        meta.update({"uid": f"u-{i}", "resourceVersion": str(1000 + i), "generation": 1,
                     "creationTimestamp": "2026-01-02T03:04:05Z",
                     "managedFields": [{"manager": "kubectl", "operation": "Update",
                                        "apiVersion": doc["apiVersion"],
                                        "time": "2026-01-02T03:04:05Z",
                                        "fieldsType": "FieldsV1", "fieldsV1": {}}]})
        doc.setdefault("status", {})
        items.append(doc)
    return yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items,
                           "metadata": {"resourceVersion": ""}})


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_list_of_the_shop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, manifests())
    code, out, err = run(["list", "-f", str(path)], capsys)
    assert code == 0
    lines = set(out.splitlines())
    for line in [
        "0.0.0.0-9.255.255.255[External] => shop/frontend[Deployment] : TCP 8080",
        "11.0.0.0-255.255.255.255[External] => shop/frontend[Deployment] : TCP 8080",
        "shop/loadgen[Deployment] => shop/frontend[Deployment] : TCP 8080",
        "shop/frontend[Deployment] => shop/cart[Deployment] : TCP 7070",
        "shop/checkout[Deployment] => shop/db[StatefulSet] : TCP 5432",
        "shop/nightly-report[CronJob] => shop/db[StatefulSet] : TCP 5432",
        "shop/cart[Deployment] => shop/redis[Deployment] : TCP 6379",
        "shop/payment[Deployment] => 203.0.113.0-203.0.113.255[External] : TCP 443",
        # nothing selects the Pending Pod: open both ways
        "tools/debug[Pod] => 0.0.0.0-203.0.112.255[External] : All Connections",
        "tools/debug[Pod] => 203.0.113.0-203.0.113.255[External] : All Connections",
        "tools/debug[Pod] => 203.0.114.0-255.255.255.255[External] : All Connections",
        "0.0.0.0-9.255.255.255[External] => tools/debug[Pod] : All Connections",
        "10.0.0.0-10.255.255.255[External] => tools/debug[Pod] : All Connections",
    ]:
        assert line in lines, line
    assert not any(line.startswith("10.0.0.0-10.255.255.255[External] => shop/")
                   for line in lines)
    # DNS is allowed towards kube-system only; the shop's egress is denied elsewhere
    assert "shop/frontend[Deployment] => tools/debug[Pod]" not in out
    # checkout may send to the frontend's grpc port, but the frontend has none
    assert "shop/checkout[Deployment] => shop/frontend[Deployment]" not in out
    assert "shop/recommendation[Deployment] => shop/catalog[Deployment] : TCP 3550" in lines
    # Services and the ConfigMap: one note each
    assert err.count("skipped (not a NetworkPolicy") == len(SERVICES) + 1


def test_list_agrees_with_the_evaluator_on_synthesized_pods(tmp_path: Path) -> None:
    """Every workload becomes a pod with an address; for every pair, external range
    and sampled port, `list` says what the evaluator says (an ipBlock never matches
    a workload: external addresses are bare IPs)."""
    objects = load_objects([str(write(tmp_path, manifests()))], workloads=True)
    cluster = objects.cluster()
    peers, _ = workload_peers(cluster.endpoints, objects.controllers,
                              {ep.key for ep in objects.workloads})
    result = connectivity(cluster, peers)
    lines = {(c.src, c.dst): c.connections for c in result.connections}
    ev = Evaluator(cluster)
    ports = sorted({1, 52, 53, 54, 442, 443, 444, 5432, 6379, 8080, 65535}
                   | {p for p, _ in SERVICES.values()})
    for s in peers:
        for d in peers:
            if s.name == d.name:
                continue
            for proto in PROTOCOLS:
                for port in ports:
                    want = ev.allowed(Flow(s.endpoint, "", d.endpoint, "", port, proto))
                    got = (s.name, d.name) in lines and lines[s.name, d.name].allows(proto, port)
                    assert got == want, (s.name, d.name, proto, port)
    for address in ("9.1.2.3", "10.1.2.3", "203.0.113.7", "203.0.112.255", "8.8.8.8"):
        n = int(ipaddress.IPv4Address(address))
        src = next(r for r in result.sources if r.first <= n <= r.last).render()
        dst = next(r for r in result.destinations if r.first <= n <= r.last).render()
        for p in peers:
            for port in ports:
                inbound = ev.allowed(Flow(None, address, p.endpoint, "", port, "TCP"))
                assert ((src, p.name) in lines and lines[src, p.name].allows("TCP", port)) \
                    == inbound
                outbound = ev.allowed(Flow(p.endpoint, "", None, address, port, "TCP"))
                assert ((p.name, dst) in lines and lines[p.name, dst].allows("TCP", port)) \
                    == outbound


def test_a_kubectl_dump_on_stdin_gives_the_same_list(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, from_files, _ = run(["list", "-f", str(write(tmp_path, manifests()))], capsys)
    monkeypatch.setattr("sys.stdin", io.StringIO(kubectl_dump(manifests())))
    code, out, _ = run(["list", "-f", "-", "-o", "txt"], capsys)
    assert code == 0
    assert out == from_files


def test_matrix_coverage_lint_on_the_shop(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = str(write(tmp_path, manifests()))
    code, out, _ = run(["matrix", "-f", path, "--port", "5432", "-o", "json"], capsys)
    assert code == 0
    assert "shop/db[StatefulSet]" in out and "tools/debug" in out
    code, out, _ = run(["coverage", "-f", path], capsys)
    assert code == 0
    assert "tools/debug" in out  # the only pod no policy isolates
    # selectors match workloads (they have no address): the only dead rule is the
    # one towards kube-system, which is not in the files
    assert out.splitlines()[-1].endswith(", 1 rule or entry that can never match")
    assert "shop/allow-dns spec.egress[0]" in out
    code, out, _ = run(["lint", "-f", path], capsys)
    assert code in (0, 1)
    assert "Traceback" not in out


def test_diff_of_an_except_on_the_shop(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    old = write(tmp_path, manifests(), "old.yaml")
    new = write(tmp_path, manifests(PAYMENT_EGRESS_EXCEPT), "new.yaml")
    code, out, _ = run(["diff", "-f", str(old), "--against", str(new)], capsys)
    assert code == 1
    assert out.splitlines()[0] == (
        "- shop/payment[Deployment] -> 203.0.113.128/25 TCP/443 "
        "(closed: NetworkPolicy shop/payment-out egress[0] no longer allows it)")
    assert len(out.splitlines()) == 2
