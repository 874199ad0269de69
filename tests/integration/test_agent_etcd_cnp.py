"""ClusterNetworkPolicy with etcd as the datastore: applied through the agent it lands in
etcd (``<prefix>/clusternetworkpolicies/<name>``) and is enforced when the call returns;
written into etcd by another writer it arrives through the watch; deleted through the
agent it leaves etcd and the kernel. Real etcd, a real agent, real packets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tests.support.etcd import EtcdServer, etcd_binary

from stockade.probe.launcher import ProbeServer

from . import test_agent_etcd as base
from .test_agent_etcd import PREFIX, EtcdWriter, etcd_agent
from .test_agent_kubernetes import TCP80, probe, publish_trio, wait_enforced

# test_agent_etcd.py's writer into etcd (the etcd fixture is tests/conftest.py's).
writer = base.writer

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(etcd_binary() is None, reason="etcd is not installed")]


def cnp(name: str, priority: int, action: str, peer: str) -> dict[str, Any]:
    """Admin, for x/a's ingress from x/<peer>."""
    return {"apiVersion": "policy.networking.k8s.io/v1alpha2",
            "kind": "ClusterNetworkPolicy", "metadata": {"name": name},
            "spec": {"tier": "Admin", "priority": priority,
                     "subject": {"pods": {"namespaceSelector": {},
                                          "podSelector": {"matchLabels": {"pod": "a"}}}},
                     "ingress": [{"name": "r", "action": action, "from": [{"pods": {
                         "namespaceSelector": {},
                         "podSelector": {"matchLabels": {"pod": peer}}}}]}]}}


def test_cluster_network_policies_through_etcd(tmp_path: Path, etcd: EtcdServer,
                                               writer: EtcdWriter, trio: Any,
                                               netns_prefix: str) -> None:
    publish_trio(writer, trio)  # x/web: a admits b on 80
    agent = etcd_agent(tmp_path, etcd, trio.host_netns, netns_prefix).start()
    try:
        wait_enforced(agent, writer.rvs)
        with ProbeServer({a.netns: [TCP80] for a in trio.all}):
            assert probe(trio, [("b", "a"), ("c", "a")]) == {("b", "a"): True,
                                                             ("c", "a"): False}
            out = agent.call("apply", documents=[cnp("deny-b", 1, "Deny", "b")])
            assert out["created"] == ["clusternetworkpolicy/deny-b"]
            doc = writer.doc("clusternetworkpolicies", "deny-b")
            assert doc is not None and doc["spec"]["priority"] == 1
            assert probe(trio, [("b", "a")]) == {("b", "a"): False}
            # Another writer's ClusterNetworkPolicy arrives through the watch.
            writer.rvs["clusternetworkpolicies"] = writer.c.put(
                f"{PREFIX}/clusternetworkpolicies/accept-c",
                json.dumps(cnp("accept-c", 0, "Accept", "c")))
            wait_enforced(agent, writer.rvs)
            assert probe(trio, [("c", "a")]) == {("c", "a"): True}
            assert {i["metadata"]["name"] for i in agent.call(
                "get", kind="clusternetworkpolicies")["items"]} == {"deny-b", "accept-c"}
            out = agent.call("delete", refs=[{"kind": "cnp", "name": "deny-b"},
                                             {"kind": "cnp", "name": "accept-c"}])
            assert len(out["deleted"]) == 2
            assert writer.doc("clusternetworkpolicies", "deny-b") is None
            assert probe(trio, [("b", "a"), ("c", "a")]) == {("b", "a"): True,
                                                             ("c", "a"): False}
    finally:
        agent.stop()
