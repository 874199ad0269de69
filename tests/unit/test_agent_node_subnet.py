"""On a cluster the agent's address pool is its node's podCIDR, so nodes never share addresses."""

from __future__ import annotations

from typing import Any

import pytest

from stockade.agent.daemon import DEFAULT_SUBNET, Agent, AgentConfig
from stockade.errors import AgentError
from stockade.kube.client import NODES, KubeError


class _Client:
    def __init__(self, node: dict[str, Any] | None, error: KubeError | None = None) -> None:
        self.node, self.error, self.asked = node, error, []

    def get(self, res: Any, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        self.asked.append((res, name))
        if self.error is not None:
            raise self.error
        return self.node


class _Feed:
    def __init__(self, client: _Client) -> None:
        self.client, self.node = client, "node-7"


def _pool(node: dict[str, Any] | None, error: KubeError | None = None) -> tuple[str, _Client]:
    agent = Agent(AgentConfig(datastore="kubernetes"))
    client = _Client(node, error)
    agent.kube_feed = _Feed(client)
    return agent._node_pod_cidr(), client


def test_the_pool_is_the_nodes_ipv4_pod_cidr() -> None:
    pool, client = _pool({"spec": {"podCIDRs": ["fd00:10:244:7::/64", "10.244.7.0/24"]}})
    assert pool == "10.244.7.0/24"
    assert client.asked == [(NODES, "node-7")]
    assert _pool({"spec": {"podCIDR": "10.244.3.0/24"}})[0] == "10.244.3.0/24"


def test_a_node_without_a_pod_cidr_falls_back_to_the_default() -> None:
    assert _pool({"spec": {}})[0] == DEFAULT_SUBNET
    assert _pool(None)[0] == DEFAULT_SUBNET


def test_an_unreadable_node_stops_the_agent_with_the_way_out() -> None:
    with pytest.raises(AgentError, match="--subnet"):
        _pool(None, KubeError(403, "Forbidden", "nodes is forbidden"))
