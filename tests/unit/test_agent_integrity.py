"""Integrity of the agent's state: every path admits only what the kernel can enforce.

Regressions of attacks that once worked: a container port outside 1-65535 that
failed every later kernel transaction, names that spoof `get` output, a
namespace impersonating another through its name label, two endpoints holding
one address or one key, wrong argument types answered as `internal`, a failing
kernel that killed the reconcile thread silently, and stored objects that
cannot be enforced blocking the agent's restart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_cni_ops import POLICY, MemoryDatapath, Node

from stockade.agent.admission import QUARANTINE_LABEL, check_changes, enforceable, quarantine
from stockade.agent.protocol import ApiError
from stockade.agent.reconcile import Reconciler
from stockade.agent.records import AgentState, EndpointRecord, PutEndpoint, PutNamespace
from stockade.agent.runner import BoundedFrequencyRunner
from stockade.compile.incremental import IncrementalCompiler
from stockade.compile.interpret import allows
from stockade.compile.ir import Ruleset
from stockade.compile.plan import Plan
from stockade.datapath.base import KernelSnapshot
from stockade.errors import DataplaneError
from stockade.model.admit import validate_endpoint, validate_label_change, validate_namespace
from stockade.model.cluster import ContainerPort, Endpoint, Namespace
from stockade.model.labels import Labels


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    yield n
    n.close()


def pod(name: str, ip: str, *, namespace: str = "x", ports: list[dict[str, Any]] | None = None,
        labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
            "spec": {"containers": [{"ports": ports or []}]},
            "status": {"podIP": ip}}


def refused(node: Node, op: str, code: str, **args: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        node.call(op, **args)
    assert info.value.code == code, (info.value.code, info.value.message, info.value.lines)
    return info.value


# ---- the model's rules ------------------------------------------------------------------


@pytest.mark.parametrize("port", [0, -5, 65536, 70000])
def test_a_container_port_outside_1_to_65535_is_invalid(port: int) -> None:
    ep = Endpoint("x", "a", Labels({}), ("10.0.0.1",),
                  (ContainerPort(port, "TCP", "http", path="spec.containers[0].ports[0]"),))
    [err] = validate_endpoint(ep)
    assert err.render() == (f"spec.containers[0].ports[0].containerPort: Invalid value: "
                            f"{port}: must be between 1 and 65535, inclusive")


def test_every_field_of_an_endpoint_is_checked() -> None:
    ep = Endpoint("bad;ns", "a\nb", Labels({"k": "v\"q"}), ("10.0.0.1", "10.0.0.2", "nope"),
                  (ContainerPort(80, "ICMP", "HTTP"), ContainerPort(81, "TCP", "web"),
                   ContainerPort(82, "TCP", "web")))
    paths = [e.path for e in validate_endpoint(ep)]
    assert paths == ["metadata.name", "metadata.namespace", "metadata.labels",
                     "status.podIPs[1].ip", "status.podIPs[2].ip",
                     "spec.containers[*].ports[0].protocol",
                     # "HTTP": upper case, and so no letter a-z either
                     "spec.containers[*].ports[0].name", "spec.containers[*].ports[0].name",
                     "spec.containers[*].ports[2].name"]


def test_a_namespace_cannot_carry_another_name_label() -> None:
    forged = Namespace("tenant-a", Labels({"kubernetes.io/metadata.name": "kube-system"}))
    [err] = validate_namespace(forged)
    assert "kubernetes.io/metadata.name" in err.path and "kube-system" in err.render()
    errs = validate_label_change("namespace", {"kubernetes.io/metadata.name": "x"}, [])
    assert [e.reason for e in errs] == ["Forbidden"]
    assert validate_label_change("namespace", {}, ["kubernetes.io/metadata.name"])
    assert not validate_label_change("endpoint", {"kubernetes.io/metadata.name": "x"}, [])


def test_one_key_twice_in_a_change_and_an_address_held_twice_are_refused() -> None:
    state = AgentState()
    a = EndpointRecord(Endpoint("x", "a", Labels({}), ("10.0.0.1",)))
    state.apply([PutEndpoint(a)])
    b = EndpointRecord(Endpoint("y", "b", Labels({}), ("10.0.0.1",)))
    assert check_changes(state, [PutEndpoint(b)]) == [
        "address 10.0.0.1 is held by two endpoints: endpoint x/a and endpoint y/b"]
    # The same address in a non-canonical spelling is the same address.
    b6 = EndpointRecord(Endpoint("y", "b", Labels({}), ("fd00::0:1",)))
    c6 = EndpointRecord(Endpoint("y", "c", Labels({}), ("fd00::1",)))
    assert len(check_changes(state, [PutEndpoint(b6), PutEndpoint(c6)])) == 1
    twice = check_changes(state, [PutNamespace(Namespace("n", Labels({
        "kubernetes.io/metadata.name": "n"}))), PutNamespace(Namespace("n", Labels({
            "kubernetes.io/metadata.name": "n"})))])
    assert twice == ["namespace n is given twice in one change (items 1 and 2)"]
    # An endpoint keeps its own address; a moved address is free once its holder goes.
    assert check_changes(state, [PutEndpoint(a)]) == []


def test_two_endpoints_stored_on_one_port_are_both_held() -> None:
    """An older agent's records (or a hand-edited store) with two endpoints on one port:
    neither can be enforced as stored, so both are held closed."""
    state = AgentState()
    state.apply([PutEndpoint(EndpointRecord(Endpoint("x", n, Labels({}), (ip,), port="v1")))
                 for n, ip in (("a", "10.0.0.1"), ("b", "10.0.0.2"))])
    assert quarantine(state) == {k: ["port v1 is held by x/a, x/b"] for k in ("x/a", "x/b")}
    mac = "02:00:00:00:00:0a"
    state = AgentState()
    state.apply([PutEndpoint(EndpointRecord(Endpoint("x", n, Labels({}), (ip,), port=n,
                                                     mac=mac)))
                 for n, ip in (("a", "10.0.0.1"), ("b", "10.0.0.2"))])
    assert quarantine(state) == {k: [f"mac {mac} is held by x/a, x/b"] for k in ("x/a", "x/b")}


# ---- every path of the agent ---------------------------------------------------------------


def test_apply_refuses_a_pod_port_out_of_range_and_changes_nothing(node: Node) -> None:
    before = node.datapath.kernel
    err = refused(node, "apply", "invalid", documents=[
        POLICY, pod("web", "10.99.0.1", ports=[{"containerPort": 70000, "name": "http"}])])
    assert err.lines == ["<api>: Pod x/web: spec.containers[0].ports[0].containerPort: "
                         "Invalid value: 70000: must be between 1 and 65535, inclusive"]
    assert node.datapath.kernel == before and not node.service.state.policies


def test_apply_refuses_the_same_object_twice_naming_both(node: Node) -> None:
    err = refused(node, "apply", "invalid", source="set.yaml",
                  documents=[pod("a", "10.99.0.1"), pod("a", "10.99.0.2")])
    assert err.lines == ["pod x/a is given twice: set.yaml and set.yaml"]


def test_two_pods_in_two_namespaces_cannot_hold_one_address(node: Node) -> None:
    node.call("apply", documents=[pod("a", "10.99.0.1", namespace="x")])
    err = refused(node, "apply", "invalid",
                  documents=[pod("b", "10.99.0.1", namespace="y")])
    assert err.lines == ["address 10.99.0.1 is held by two endpoints: endpoint x/a and "
                         "endpoint y/b"]
    assert set(node.service.state.endpoints) == {"x/a"}


@pytest.mark.parametrize("ports", [[{"port": 70000}], [{"port": -5}], [{"port": 0}],
                                   [{"port": 80, "protocol": "ICMP"}]])
def test_endpoint_add_and_cni_add_refuse_bad_ports(node: Node, ports: list[Any]) -> None:
    ep = {"namespace": "x", "name": "a", "ips": ["10.99.0.9"], "ports": ports}
    refused(node, "endpoint.add", "invalid", endpoint=ep)
    refused(node, "cni.add", "invalid", network="n", containerID="c", ifname="eth0",
            endpoint={**ep, "netns": "/nonexistent"}, allocate=False)
    assert not node.service.state.endpoints


@pytest.mark.parametrize("name", ["a\nb", "x\"y", "a;b", "Ünï"])
def test_names_are_validated_on_the_socket_paths(node: Node, name: str) -> None:
    refused(node, "endpoint.add", "invalid",
            endpoint={"namespace": "x", "name": name, "ips": ["10.99.0.9"]})
    refused(node, "endpoint.add", "invalid",
            endpoint={"namespace": name, "name": "a", "ips": ["10.99.0.9"]})
    refused(node, "cni.add", "invalid", network="n", containerID="c", ifname="eth0",
            endpoint={"namespace": name, "name": "a", "ips": ["10.99.0.9"]}, allocate=False)


def test_a_namespace_cannot_be_labelled_as_another(node: Node) -> None:
    node.call("apply", documents=[pod("a", "10.99.0.1")])
    err = refused(node, "label", "invalid", kind="namespace", name="x",
                  set={"kubernetes.io/metadata.name": "kube-system"})
    assert "Forbidden" in err.lines[0]
    refused(node, "label", "invalid", kind="namespace", name="x",
            remove=["kubernetes.io/metadata.name"])
    assert node.service.state.namespaces["x"].labels["kubernetes.io/metadata.name"] == "x"


@pytest.mark.parametrize(("op", "args"), [
    ("apply", {"documents": [], "sync": "no"}),
    ("apply", {"documents": "x"}),
    ("label", {"kind": "endpoint", "name": 5}),
    ("label", {"kind": "endpoint", "name": "x/a", "set": ["a"]}),
    ("label", {"kind": "endpoint", "name": "x/a", "set": {"a": 1}}),
    ("label", {"kind": "endpoint", "name": "x/a", "remove": "a"}),
    ("delete", {"refs": [{"kind": 3}]}),
    ("delete", {"refs": "x"}),
    ("endpoint.add", {"endpoint": {"namespace": "x", "name": "a", "ips": "10.0.0.1"}}),
    ("endpoint.add", {"endpoint": {"namespace": "x", "name": "a", "ips": ["10.0.0.1"],
                                   "ports": [{"port": "80"}]}}),
    ("endpoint.add", {"endpoint": {"namespace": "x", "name": "a", "ips": ["10.0.0.1"],
                                   "ports": [{"port": True}]}}),
    ("endpoint.add", {"endpoint": {"namespace": 1, "name": "a"}}),
    ("endpoint.add", {"endpoint": []}),
    ("endpoint.remove", {"key": ["x"]}),
    ("get", {"kind": 1}),
    ("ipam.allocate", {"owner": 1}),
    ("cni.add", {"network": "n", "containerID": "c", "ifname": "eth0",
                 "endpoint": {"namespace": "x", "name": "a"}, "labels": {"a": 1}}),
    ("cni.add", {"network": "n", "containerID": "c", "ifname": "eth0",
                 "endpoint": {"namespace": "x", "name": "a", "ips": [1]}}),
    ("cni.add", {"network": "n", "containerID": "c", "ifname": "eth0",
                 "endpoint": {"namespace": "x", "name": "a", "netns": 7}}),
    ("cni.del", {"network": "n", "containerID": "c", "ifname": "eth0", "sync": 1}),
])
def test_wrong_argument_types_are_bad_requests(node: Node, op: str, args: dict[str, Any]) -> None:
    refused(node, op, "bad_request", **args)


def test_a_second_cni_add_cannot_take_a_live_pods_key(node: Node, tmp_path: Path) -> None:
    live = tmp_path / "netns-c1"
    live.write_text("")  # stands for the first sandbox's network namespace, still there
    node.call("cni.add", network="net", containerID="c1", ifname="eth0", allocate=True,
              endpoint={"namespace": "x", "name": "web", "netns": str(live)})
    err = refused(node, "cni.add", "invalid", network="net", containerID="c2",
                  ifname="eth0", allocate=True,
                  endpoint={"namespace": "x", "name": "web", "netns": str(tmp_path / "n2")})
    assert "container c1" in err.message and "c2" in err.message
    assert node.service.state.endpoints["x/web"].container_id == "c1"
    # The refused ADD gave back the address it took.
    assert node.service.ipam is not None and node.service.ipam.address_of("c2/eth0") is None
    # Once the first sandbox is gone, the name can be taken (a recreated sandbox).
    live.unlink()
    node.call("cni.add", network="net", containerID="c2", ifname="eth0", allocate=True,
              endpoint={"namespace": "x", "name": "web", "netns": str(tmp_path / "n2")})
    assert node.service.state.endpoints["x/web"].container_id == "c2"


# ---- the reconciler outlives failures ------------------------------------------------------


class FlakyDatapath(MemoryDatapath):
    """A kernel that refuses (or raises a non-stockade error) while `failing` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: Exception | None = None

    def apply(self, desired: Ruleset, *, verify: bool | KernelSnapshot = False) -> Plan:
        if self.failing is not None:
            raise self.failing
        return super().apply(desired, verify=verify)


@pytest.mark.parametrize("error", [DataplaneError("refused: out of range"),
                                   ValueError("'h' format requires -32768 <= number")])
def test_a_failing_kernel_is_retried_counted_and_reported(error: Exception) -> None:
    dp = FlakyDatapath()
    rec = Reconciler(IncrementalCompiler.of(AgentState().cluster()), dp, 0)
    runner = BoundedFrequencyRunner("t", lambda periodic: (
        None if rec.run(periodic) else runner.retry_in(rec.backoff())), 0.0, 60.0)
    rec.attach(runner.run)
    runner.start()
    try:
        assert rec.wait_for(0, 5) is True and rec.healthy
        dp.failing = error
        rec.changed(1, [PutNamespace(Namespace("n", Labels({
            "kubernetes.io/metadata.name": "n"})))])
        outcome = rec.wait_for(1, 5)
        assert isinstance(outcome, str) and str(error) in outcome  # at once, not a timeout
        assert not rec.healthy and not rec.in_sync and rec.failures >= 1
        deadline = time.monotonic() + 5
        while rec.failures < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rec.failures >= 3, "retried with backoff"
        assert runner._thread is not None and runner._thread.is_alive()
        dp.failing = None
        deadline = time.monotonic() + 10
        while not rec.healthy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rec.wait_for(1, 1) is True
        assert rec.healthy and rec.in_sync and rec.consecutive_failures == 0
    finally:
        runner.stop()


def test_the_runner_survives_a_run_that_raises() -> None:
    calls: list[int] = []
    done = threading.Event()

    def fn(periodic: bool) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        done.set()

    runner = BoundedFrequencyRunner("t", fn, 0.0, 60.0)
    runner.start()
    try:
        runner.run()
        assert done.wait(5), "the loop ran again after a crash"
        assert runner.crashes == 1
    finally:
        runner.stop()


def test_status_says_not_ready_while_the_kernel_refuses(node: Node) -> None:
    flaky = FlakyDatapath()
    node.reconciler.datapath = flaky
    flaky.failing = DataplaneError("refused")
    refused(node, "apply", "unavailable", documents=[pod("a", "10.99.0.1")])
    st = node.call("status")
    assert st["ready"] is False and st["inSync"] is False and "refused" in st["error"]
    flaky.failing = None
    node.reconciler.run(True)
    st = node.call("status")
    assert st["ready"] is True and st["inSync"] is True and st["error"] == ""


# ---- what was stored before the checks: held fail-closed -----------------------------------


def test_stored_invalid_endpoints_are_held_closed_not_dropped() -> None:
    state = AgentState()
    good = Endpoint("x", "good", Labels({"app": "c"}), ("10.0.0.1",))
    bad = Endpoint("x", "bad", Labels({"app": "web"}), ("10.0.0.2",),
                   (ContainerPort(70000, "TCP", "http"),))
    twin_a = Endpoint("y", "a", Labels({}), ("10.0.0.3",))
    twin_b = Endpoint("z", "b", Labels({}), ("10.0.0.3",))
    state.apply([PutEndpoint(EndpointRecord(e)) for e in (good, bad, twin_a, twin_b)])
    held = quarantine(state)
    assert set(held) == {"x/bad", "y/a", "z/b"}
    assert "containerPort" in held["x/bad"][0]
    cluster = enforceable(state, held)
    rs = IncrementalCompiler.of(cluster).ruleset()
    # The held endpoint is isolated both ways; the good one is not restricted.
    assert not allows(rs, "10.0.0.1", "10.0.0.2", "TCP", 80)
    assert not allows(rs, "10.0.0.2", "10.0.0.1", "TCP", 80)
    assert not allows(rs, "10.0.0.1", "10.0.0.3", "TCP", 80)
    assert allows(rs, "10.0.0.1", "10.0.0.4", "TCP", 80)
    assert all(ep.labels == Labels({QUARANTINE_LABEL: "true"})
               for ep in cluster.endpoints if ep.key in held)


def test_the_agent_names_the_policies_behind_each_chain(node: Node) -> None:
    node.call("apply", documents=[POLICY, pod("w", "10.99.0.1", labels={"app": "web"}),
                                  pod("v", "10.99.0.2", labels={"app": "web"})])
    [chain] = node.call("get", kind="chains")["items"]
    assert chain["direction"] == "ingress" and chain["endpoints"] == 2
    assert chain["policies"] == [["x/web"]]
    assert chain["name"] in node.datapath.kernel.chains


def test_repeated_failures_recompile_from_the_state() -> None:
    state = AgentState()
    dp = FlakyDatapath()
    rec = Reconciler(IncrementalCompiler.of(state.cluster()), dp, 0,
                     cluster_of=state.cluster)
    assert rec.run(True)
    first = rec.compiler
    dp.failing = DataplaneError("refused")
    assert not rec.run(False) and not rec.run(False)
    assert rec.compiler is first  # two failures: not yet
    assert not rec.run(False)
    assert rec.compiler is not first  # from the second failure in a row on: anew
    dp.failing = None
    assert rec.run(False) and rec.healthy
