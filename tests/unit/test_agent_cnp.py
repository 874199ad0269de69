"""ClusterNetworkPolicy through the agent's service (no root): apply, get, delete, all or
nothing, survival in the store and in snapshots, the ruleset the reconciler programs
(the full compiler's), and the datapaths that cannot enforce tiers refusing them."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_cni_ops import MemoryDatapath

from stockade.agent.admission import QUARANTINE_POLICY, enforceable, quarantine
from stockade.agent.protocol import INVALID, ApiError
from stockade.agent.reconcile import Reconciler
from stockade.agent.records import AgentState, PutEndpoint
from stockade.agent.service import Service
from stockade.agent.store import SCHEMA_VERSION, Store
from stockade.compile.incremental import IncrementalCompiler
from stockade.compile.interpret import allows
from stockade.compile.lower import compile_cluster
from stockade.compile.nft import canonical
from stockade.model.labels import Labels


class TieredMemory(MemoryDatapath):
    """The in-memory kernel, enforcing tiers as the nftables datapath does."""

    enforces_tiers = True


class Agent:
    """Store, service and a reconciler applying at once, on one state directory."""

    def __init__(self, state_dir: Path, datapath: MemoryDatapath | None = None) -> None:
        self.store = Store(state_dir)
        state, revision = self.store.load()
        # As agent/daemon.py: what cannot be enforced as stored is held fail-closed.
        state.quarantined = quarantine(state)
        self.datapath = datapath or TieredMemory()
        self.reconciler = Reconciler(
            IncrementalCompiler.of(enforceable(state, state.quarantined)), self.datapath,
            revision, cluster_of=lambda: enforceable(self.service.state,
                                                     self.service.state.quarantined))
        self.reconciler.attach(lambda: self.reconciler.run(False))
        self.reconciler.run(True)
        self.service = Service(self.store, state, self.reconciler)

    def call(self, op: str, **args: Any) -> Any:
        return self.service.handle(op, args)

    def apply(self, *docs: dict[str, Any]) -> Any:
        return self.call("apply", documents=list(docs))

    def allowed(self, src: str, dst: str, port: int = 80) -> bool:
        return allows(self.datapath.kernel, src, dst, "TCP", port)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(tmp_path)
    yield a
    a.close()


def pod(ns: str, name: str, ip: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": name}},
            "spec": {"containers": [{"name": "c", "image": "i"}]},
            "status": {"podIP": ip}}


def namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels}}


def cnp(name: str, tier: str, priority: int, action: str, *,
        subject: dict[str, Any] | None = None,
        peer: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": "policy.networking.k8s.io/v1alpha2",
            "kind": "ClusterNetworkPolicy", "metadata": {"name": name},
            "spec": {"tier": tier, "priority": priority,
                     "subject": subject or {"namespaces": {"matchLabels": {"team": "db"}}},
                     "ingress": [{"name": "r", "action": action,
                                  "from": [peer or {"namespaces": {}}]}]}}


ALLOW_ALL_INGRESS = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                     "metadata": {"name": "allow", "namespace": "db"},
                     "spec": {"podSelector": {}, "ingress": [{}]}}
SCENE = (namespace("web", team="web"), namespace("db", team="db"),
         pod("web", "w", "10.1.0.1"), pod("db", "d", "10.1.0.2"))


def _kernel_is_the_full_compile(a: Agent) -> None:
    assert a.datapath.kernel == canonical(compile_cluster(a.service.state.cluster()))


def test_apply_get_and_enforce_an_admin_deny_over_a_networkpolicy_allow(agent: Agent) -> None:
    agent.apply(*SCENE, ALLOW_ALL_INGRESS)
    assert agent.allowed("10.1.0.1", "10.1.0.2")
    out = agent.apply(cnp("deny-db", "Admin", 10, "Deny"))
    assert out["created"] == ["clusternetworkpolicy/deny-db"]
    assert not agent.allowed("10.1.0.1", "10.1.0.2")
    _kernel_is_the_full_compile(agent)
    items = agent.call("get", kind="clusternetworkpolicies")["items"]
    assert items == [cnp("deny-db", "Admin", 10, "Deny")]  # the manifest as applied
    assert agent.call("get", kind="cnp")["items"] == items
    assert agent.call("status")["counts"]["clusterPolicies"] == 1
    again = agent.apply(cnp("deny-db", "Admin", 10, "Deny"))
    assert again["unchanged"] == ["clusternetworkpolicy/deny-db"]
    # A higher-priority (lower number) Accept decides first; then the Deny again.
    agent.apply(cnp("accept-db", "Admin", 5, "Accept"))
    assert agent.allowed("10.1.0.1", "10.1.0.2")
    changed = agent.apply(cnp("accept-db", "Admin", 20, "Accept"))
    assert changed["configured"] == ["clusternetworkpolicy/accept-db"]
    assert not agent.allowed("10.1.0.1", "10.1.0.2")
    _kernel_is_the_full_compile(agent)


def test_pass_and_baseline(agent: Agent) -> None:
    agent.apply(*SCENE, cnp("base-deny", "Baseline", 1, "Deny"))
    assert not agent.allowed("10.1.0.1", "10.1.0.2")  # no NetworkPolicy selects db/d
    agent.apply(ALLOW_ALL_INGRESS)
    assert agent.allowed("10.1.0.1", "10.1.0.2")  # NetworkPolicy is final: no Baseline
    agent.apply(cnp("admin-deny", "Admin", 10, "Deny"), cnp("admin-pass", "Admin", 1, "Pass"))
    assert agent.allowed("10.1.0.1", "10.1.0.2")  # Pass skips the Admin Deny
    _kernel_is_the_full_compile(agent)


def test_one_invalid_object_changes_nothing(agent: Agent) -> None:
    agent.apply(*SCENE)
    before = agent.call("status")["revision"]
    bad = cnp("bad", "Admin", 2000, "Deny")
    with pytest.raises(ApiError) as err:
        agent.apply(cnp("good", "Admin", 1, "Deny"), bad, ALLOW_ALL_INGRESS)
    assert err.value.code == INVALID
    assert any("ClusterNetworkPolicy bad" in line and "spec.priority" in line
               for line in err.value.lines), err.value.lines
    with pytest.raises(ApiError) as twice:
        agent.apply(cnp("x", "Admin", 1, "Deny"), cnp("x", "Admin", 2, "Deny"))
    assert any("clusternetworkpolicy x is given twice" in line
               for line in twice.value.lines), twice.value.lines
    assert agent.call("status")["revision"] == before
    assert agent.call("get", kind="clusternetworkpolicies")["items"] == []
    assert agent.call("get", kind="policies")["items"] == []


def test_delete_by_name_alias_and_document(agent: Agent) -> None:
    agent.apply(*SCENE, cnp("a", "Admin", 1, "Deny"), cnp("b", "Baseline", 1, "Deny"),
                cnp("c", "Admin", 2, "Deny"))
    out = agent.call("delete", refs=[{"kind": "clusternetworkpolicy", "name": "a"},
                                     {"kind": "cnp", "name": "b"},
                                     {"kind": "cnp", "name": "zz"}])
    assert out["deleted"] == ["clusternetworkpolicy/a", "clusternetworkpolicy/b"]
    assert out["missing"] == ["clusternetworkpolicy/zz"]
    assert not agent.allowed("10.1.0.1", "10.1.0.2")  # c still denies
    agent.call("delete", documents=[cnp("c", "Admin", 2, "Deny")])
    assert agent.allowed("10.1.0.1", "10.1.0.2")
    assert agent.call("get", kind="clusternetworkpolicies")["items"] == []
    assert not any(c.tier for c in agent.datapath.kernel.chains.values())


def test_restart_keeps_them_and_programs_the_same_ruleset(tmp_path: Path) -> None:
    first = Agent(tmp_path)
    first.apply(*SCENE, ALLOW_ALL_INGRESS, cnp("deny-db", "Admin", 10, "Deny"))
    kernel = first.datapath.kernel
    first.close()
    dp = TieredMemory()
    dp.kernel = kernel  # the table the last agent left
    second = Agent(tmp_path, dp)
    try:
        assert list(second.service.state.cluster_policies) == ["deny-db"]
        assert second.reconciler.last is not None and second.reconciler.last.summary == {}
        assert second.datapath.kernel == kernel
    finally:
        second.close()


def test_snapshots_carry_them(tmp_path: Path) -> None:
    a = Agent(tmp_path / "a")
    b = Agent(tmp_path / "b")
    try:
        a.apply(*SCENE, cnp("deny-db", "Admin", 10, "Deny"))
        snap = a.call("snapshot.save")["snapshot"]
        assert [p["metadata"]["name"] for p in snap["clusterPolicies"]] == ["deny-db"]
        b.apply(cnp("other", "Baseline", 3, "Deny"))
        b.call("snapshot.restore", snapshot=snap)
        assert list(b.service.state.cluster_policies) == ["deny-db"]
        assert b.datapath.kernel == a.datapath.kernel
        # A snapshot of an agent without them (no clusterPolicies field) removes them.
        del snap["clusterPolicies"]
        b.call("snapshot.restore", snapshot=snap)
        assert b.service.state.cluster_policies == {}
        # What the decoder refuses in a snapshot names the field.
        bad = json.loads(json.dumps(snap))
        bad["clusterPolicies"] = [cnp("bad", "Admin", -1, "Deny")]
        with pytest.raises(ApiError, match=r"clusterPolicies\[0\] bad.*spec.priority"):
            b.call("snapshot.restore", snapshot=bad)
    finally:
        a.close()
        b.close()


def test_a_datapath_without_tiers_refuses_them_at_admission(tmp_path: Path) -> None:
    agent = Agent(tmp_path, MemoryDatapath())  # enforces no tier (by its name)
    try:
        with pytest.raises(ApiError) as err:
            agent.apply(*SCENE, cnp("deny-db", "Admin", 10, "Deny"))
        assert err.value.code == INVALID
        assert "does not enforce ClusterNetworkPolicy" in " ".join(err.value.lines)
        assert agent.call("get", kind="namespaces")["items"] == []  # nothing applied
        agent.apply(*SCENE)  # the rest still works
        with Agent(tmp_path / "other") as other:
            other.apply(cnp("deny-db", "Admin", 10, "Deny"))
            snap = other.call("snapshot.save")["snapshot"]
        with pytest.raises(ApiError, match=r"not restored: .*does not enforce"):
            agent.call("snapshot.restore", snapshot=snap)
        assert agent.service.state.cluster_policies == {}
    finally:
        agent.close()


def test_a_schema_1_store_gains_the_table(tmp_path: Path) -> None:
    Store(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.execute("DROP TABLE cluster_policies")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    conn.commit()
    conn.close()
    agent = Agent(tmp_path)
    try:
        agent.apply(*SCENE, cnp("deny-db", "Admin", 10, "Deny"))
        assert agent.store.get_meta("schema") == SCHEMA_VERSION
        state, _ = agent.store.load()
        assert list(state.cluster_policies) == ["deny-db"]
    finally:
        agent.close()


def test_get_yaml_is_the_manifest(agent: Agent) -> None:
    doc = cnp("deny-db", "Admin", 10, "Deny")
    agent.apply(doc)
    items = agent.call("get", kind="clusternetworkpolicies")["items"]
    assert yaml.safe_load(yaml.safe_dump_all(items)) == doc
    assert AgentState().cluster().cluster_policies == ()


def test_a_held_endpoint_stays_closed_under_an_admin_accept(agent: Agent) -> None:
    """An endpoint held fail-closed (its stored record cannot be enforced) is denied both
    ways before any tier: an Admin Accept of every pod does not open it."""
    agent.apply(*SCENE, cnp("accept-all", "Admin", 0, "Accept", subject={"namespaces": {}}))
    state = agent.service.state
    assert allows(compile_cluster(enforceable(state, {})), "10.1.0.1", "10.1.0.2", "TCP", 80)
    held = enforceable(state, {"db/d": ["held for the test"]})
    assert QUARANTINE_POLICY in [p.name for p in held.cluster_policies]
    rs = compile_cluster(held)
    assert not allows(rs, "10.1.0.1", "10.1.0.2", "TCP", 80)
    assert not allows(rs, "10.1.0.2", "10.1.0.1", "TCP", 80)
    assert not allows(rs, "10.1.0.2", "192.0.2.1", "TCP", 80)
    # Without tiers nothing changes: the deny-all NetworkPolicy alone holds it.
    agent.call("delete", refs=[{"kind": "cnp", "name": "accept-all"}])
    assert enforceable(agent.service.state, {"db/d": ["held"]}).cluster_policies == ()


def test_the_get_table(agent: Agent) -> None:
    from stockade.cli.agent import _table

    pods = {"pods": {"namespaceSelector": {"matchLabels": {"team": "db"}},
                     "podSelector": {"matchExpressions": [
                         {"key": "app", "operator": "In", "values": ["d", "e"]}]}}}
    agent.apply(cnp("deny-db", "Admin", 10, "Deny"),
                cnp("base", "Baseline", 3, "Deny", subject=pods))
    items = agent.call("get", kind="clusternetworkpolicies")["items"]
    rows = [line.split("  ") for line in _table("clusternetworkpolicies", items).splitlines()]
    assert [[cell.strip() for cell in row if cell.strip()] for row in rows] == [
        ["NAME", "TIER", "PRIORITY", "SUBJECT", "INGRESS", "EGRESS"],
        ["base", "Baseline", "3", "pods {app In (d,e)} in namespaces {team=db}", "1", "0"],
        ["deny-db", "Admin", "10", "namespaces {team=db}", "1", "0"]]


def test_a_stored_bad_endpoint_stays_closed_when_tiers_come_later(tmp_path: Path) -> None:
    """Held at start (its stored labels are invalid), then an Admin Accept of every pod
    is applied: the held endpoint stays closed both ways, the others are opened."""
    first = Agent(tmp_path)
    first.apply(*SCENE)
    rec = first.service.state.endpoints["db/d"]
    bad = replace(rec.endpoint, labels=Labels({"not a key!": "x"}))
    first.store.commit([PutEndpoint(replace(rec, endpoint=bad))])  # behind admission
    first.close()
    agent = Agent(tmp_path)
    try:
        assert list(agent.service.state.quarantined) == ["db/d"]
        agent.apply(pod("web", "w2", "10.1.0.3"),
                    cnp("accept-all", "Admin", 0, "Accept", subject={"namespaces": {}}))
        assert not agent.allowed("10.1.0.1", "10.1.0.2")
        assert not agent.allowed("10.1.0.2", "10.1.0.1")
        assert agent.allowed("10.1.0.3", "10.1.0.1")
        state = agent.service.state
        assert agent.datapath.kernel == canonical(compile_cluster(
            enforceable(state, state.quarantined)))
        agent.call("delete", refs=[{"kind": "cnp", "name": "accept-all"}])
        assert not agent.allowed("10.1.0.1", "10.1.0.2")
        assert agent.datapath.kernel == canonical(compile_cluster(
            enforceable(state, state.quarantined)))
    finally:
        agent.close()
