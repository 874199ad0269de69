"""ClusterNetworkPolicy with the Kubernetes API as the datastore, on real packets: one
applied to the API is enforced, a priority change flips a verdict, one stockade refuses
holds the pods its subject selects closed both ways (and no other), fixed it releases
them, deleted everything is as NetworkPolicy alone says. A real agent process
(``--datastore kubernetes``) against the API test double with the CRD installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tests.support.kubeapi import KubeAPI

from stockade.probe.launcher import ProbeServer

from . import test_agent_kubernetes as base
from .test_agent_kubernetes import TCP80, Writer, kube_agent, probe, publish_trio, wait_enforced

pytestmark = pytest.mark.privileged

# test_agent_kubernetes.py's API double, serving ClusterNetworkPolicy's CRD.
api = base.api


def cnp(name: str, priority: int, action: str, subject: str, peer: str,
        **extra: Any) -> dict[str, Any]:
    """Admin: x/<subject>'s ingress from x/<peer>."""
    def pods(name: str) -> dict[str, Any]:
        return {"pods": {"namespaceSelector": {},
                         "podSelector": {"matchLabels": {"pod": name}}}}

    return {"apiVersion": "policy.networking.k8s.io/v1alpha2",
            "kind": "ClusterNetworkPolicy", "metadata": {"name": name},
            "spec": {"tier": "Admin", "priority": priority, "subject": pods(subject),
                     "ingress": [{"name": "r", "action": action, "from": [pods(peer)]}],
                     **extra}}


def test_cluster_network_policies_from_the_api(tmp_path: Path, api: KubeAPI, trio: Any,
                                               netns_prefix: str) -> None:
    w = Writer(api)
    publish_trio(w, trio)  # x/web: a admits b on 80 (nothing selects b or c)
    agent = kube_agent(tmp_path, api, trio.host_netns, netns_prefix).start()
    try:
        wait_enforced(agent, w.rvs)
        with ProbeServer({a.netns: [TCP80] for a in trio.all}):
            pairs = [("b", "a"), ("c", "a"), ("a", "b"), ("c", "b")]
            assert probe(trio, pairs) == {("b", "a"): True, ("c", "a"): False,
                                          ("a", "b"): True, ("c", "b"): True}
            w.policy(cnp("deny-b", 10, "Deny", "a", "b"))
            wait_enforced(agent, w.rvs)
            assert probe(trio, [("b", "a")]) == {("b", "a"): False}
            w.policy(cnp("accept-b", 20, "Accept", "a", "b"))
            wait_enforced(agent, w.rvs)
            assert probe(trio, [("b", "a")]) == {("b", "a"): False}  # the Deny is first
            w.policy(cnp("accept-b", 5, "Accept", "a", "b"))
            wait_enforced(agent, w.rvs)
            assert probe(trio, [("b", "a")]) == {("b", "a"): True}  # now the Accept
            # A field stockade does not know: b, its subject, held closed both ways.
            w.policy(cnp("odd", 1, "Deny", "b", "c", sideways=True))
            st = wait_enforced(agent, w.rvs)
            assert list(st["quarantined"]) == ["x/b"], st["quarantined"]
            assert st["datastore"]["invalid"]["clusternetworkpolicy/odd"]
            assert probe(trio, pairs) == {("b", "a"): False, ("c", "a"): False,
                                          ("a", "b"): False, ("c", "b"): False}
            # Fixed: enforced as written (c denied into b), b released.
            api.delete("clusternetworkpolicies", "odd")
            w.policy(cnp("odd", 1, "Deny", "b", "c"))
            st = wait_enforced(agent, w.rvs)
            assert st["quarantined"] == {}
            assert probe(trio, pairs) == {("b", "a"): True, ("c", "a"): False,
                                          ("a", "b"): True, ("c", "b"): False}
            for name in ("deny-b", "accept-b", "odd"):
                w.delete("clusternetworkpolicies", name)
            wait_enforced(agent, w.rvs)
            assert probe(trio, pairs) == {("b", "a"): True, ("c", "a"): False,
                                          ("a", "b"): True, ("c", "b"): True}
            assert agent.call("get", kind="clusternetworkpolicies")["items"] == []
    finally:
        agent.stop()
