"""One agent per node name (etcd/nodes.py): the name's claim, held with a lease; what
an agent writes for its node (blocks, Pods, its host address) waits for the claim."""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.etcd import EtcdServer

from stockade.errors import NetError
from stockade.etcd.client import EtcdClient, EtcdError
from stockade.etcd.ipam import Blocks
from stockade.etcd.ipam import main as ipam_tool
from stockade.etcd.nodes import NodeClaim, NodeTaken, holder, instance_id


@pytest.fixture
def client(etcd: EtcdServer) -> Iterator[EtcdClient]:
    with etcd.client() as c:
        yield c


def test_the_instance_is_kept_in_the_state_directory(tmp_path: Path) -> None:
    first = instance_id(str(tmp_path))
    assert len(first) == 32 and instance_id(str(tmp_path)) == first
    path = tmp_path / "instance"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("not an id\n")  # damaged: a new one, not the damage
    second = instance_id(str(tmp_path))
    assert second != first and len(second) == 32 and path.read_text().strip() == second
    other = tmp_path / "other"
    other.mkdir()
    assert instance_id(str(other)) not in (first, second)  # another agent


def test_a_name_is_one_agents_until_it_lets_go(client: EtcdClient) -> None:
    a = NodeClaim(client, "/s", "node-1", "a" * 32)
    a.claim()
    assert a.held and holder(client, "/s", "node-1")["instance"] == "a" * 32
    b = NodeClaim(client, "/s", "node-1", "b" * 32)
    with pytest.raises(NodeTaken) as refused:
        b.claim()
    assert "'node-1'" in str(refused.value) and f"pid {os.getpid()}" in str(refused.value)
    assert "--node" in str(refused.value)
    assert not b.held and holder(client, "/s", "node-1")["instance"] == "a" * 32
    # The same instance started again (the first run's lease still alive) takes it back.
    again = NodeClaim(client, "/s", "node-1", "a" * 32)
    again.claim()
    assert again.held and again.lease != a.lease
    # Another name is anyone's.
    NodeClaim(client, "/s", "node-2", "b" * 32).claim()
    # A clean stop gives the name up at once.
    again.release()
    assert holder(client, "/s", "node-1") is None
    b.claim()
    assert b.held


def test_a_claim_outlives_its_agent_by_its_ttl_only(client: EtcdClient) -> None:
    a = NodeClaim(client, "/s", "node-1", "a" * 32, ttl=2)
    a.claim()  # and never kept alive: the agent was killed
    b = NodeClaim(client, "/s", "node-1", "b" * 32)
    with pytest.raises(NodeTaken) as refused:
        b.claim()
    assert "ends within 2 s" in str(refused.value)  # the holder's TTL, not b's
    deadline = time.monotonic() + 10
    while holder(client, "/s", "node-1") is not None:
        assert time.monotonic() < deadline, "the lease did not run out"
        time.sleep(0.2)
    b.claim()
    assert b.held


def test_a_kept_claim_lives_on_and_one_lost_meanwhile_writes_nothing(
        client: EtcdClient) -> None:
    a = NodeClaim(client, "/s", "node-1", "a" * 32, ttl=2)
    a.claim()
    a.start()
    try:
        time.sleep(3.5)  # past the TTL: kept alive
        assert a.held and holder(client, "/s", "node-1")["instance"] == "a" * 32
        # The lease gone (etcd was away longer than the TTL) and the name taken by another.
        client.call("/v3/lease/revoke", {"ID": str(a.lease)})
        b = NodeClaim(client, "/s", "node-1", "b" * 32)
        b.claim()
        deadline = time.monotonic() + 5
        while a.held or a.taken_by is None:
            assert time.monotonic() < deadline, "the lost claim was not noticed"
            time.sleep(0.1)
        assert a.taken_by["instance"] == "b" * 32
        assert a.status()["held"] is False and "another agent" in a.status()["error"]
        # Nothing is written for the node while the name is another's.
        blocks = Blocks(client, "/s", "node-1", a)
        with pytest.raises(NetError, match="held in etcd by another agent"):
            blocks.claim(ipaddress.ip_network("10.244.0.0/16"), 26)
        assert Blocks(client, "/s", "").owned() == {}
        with pytest.raises(EtcdError):
            blocks.give_back(ipaddress.ip_network("10.244.0.0/26"))
        # The other lets go: the name is claimed again, and blocks with it.
        b.release()
        got = blocks.claim(ipaddress.ip_network("10.244.0.0/16"), 26)
        assert str(got) == "10.244.0.0/26" and a.held
    finally:
        a.release()


def test_a_name_not_claimed_yet_is_claimed_before_the_first_write(
        client: EtcdClient) -> None:
    a = NodeClaim(client, "/s", "node-1", "a" * 32)  # etcd was away at the agent's start
    blocks = Blocks(client, "/s", "node-1", a)
    blocks.claim(ipaddress.ip_network("10.244.0.0/16"), 26)
    assert a.held and holder(client, "/s", "node-1")["instance"] == "a" * 32
    a.release()


def test_reclaim_refuses_a_host_whose_agent_runs(
        etcd: EtcdServer, client: EtcdClient, capsys: pytest.CaptureFixture[str]) -> None:
    client.put("/s/ipam/blocks/10.244.0.0-26", json.dumps({"host": "node-1"}))
    a = NodeClaim(client, "/s", "node-1", "a" * 32)
    a.claim()
    argv = ["reclaim", "node-1", "--etcd-endpoints", etcd.url, "--etcd-prefix", "/s"]
    assert ipam_tool(argv) == 1
    assert "not gone" in capsys.readouterr().err
    assert Blocks(client, "/s", "").owned()  # untouched
    assert ipam_tool([*argv, "--force"]) == 0
    assert Blocks(client, "/s", "").owned() == {}
    a.release()
    client.put("/s/ipam/blocks/10.244.0.0-26", json.dumps({"host": "node-1"}))
    client.put("/s/pods/x/c0", json.dumps({
        "metadata": {"annotations": {"stockade.io/owner": "cni"}},
        "spec": {"nodeName": "node-1"}}))
    assert ipam_tool(argv) == 0  # gone: freed
    out = capsys.readouterr().out
    assert "1 block(s) freed" in out and "; 1 published Pod(s) deleted" in out, out
    assert client.get("/s/pods/x/c0") is None


def test_an_agent_put_out_of_its_name_by_its_own_instance_does_not_take_it_back(
        client: EtcdClient) -> None:
    """A state directory copied with a cloned machine: two agents of one instance. The
    later takes the name (an agent restarted looks the same to etcd); the earlier sees
    the key under another lease, stops writing for the node, and leaves it be (taking it
    back would flap between the two) until the key is gone."""
    a = NodeClaim(client, "/s", "node-1", "a" * 32, ttl=2)
    a.claim()
    a.start()
    try:
        clone = NodeClaim(client, "/s", "node-1", "a" * 32, ttl=2)
        clone.claim()
        clone.start()
        deadline = time.monotonic() + 5
        while a.held:
            assert time.monotonic() < deadline, "the displacement was not noticed"
            time.sleep(0.1)
        assert a.displaced and not a.status()["held"]
        time.sleep(2.0)  # rounds of its loop: it does not take the name back
        kv = client.get("/s/nodes/node-1")
        assert kv is not None and kv.lease == clone.lease
        with pytest.raises(NodeTaken):
            a.ensure()
        clone.release()
        deadline = time.monotonic() + 5
        while not a.held:
            assert time.monotonic() < deadline, "the name was not claimed again"
            time.sleep(0.1)
        assert not a.displaced
    finally:
        a.release()


def test_a_claim_deleted_by_hand_is_put_back(client: EtcdClient) -> None:
    a = NodeClaim(client, "/s", "node-1", "a" * 32, ttl=2)
    a.claim()
    a.start()
    try:
        client.delete("/s/nodes/node-1")
        deadline = time.monotonic() + 5
        while holder(client, "/s", "node-1") is None:
            assert time.monotonic() < deadline, "not put back"
            time.sleep(0.1)
        assert a.held
    finally:
        a.release()


def test_a_claim_put_by_hand_with_no_lease_is_said_to_stay(client: EtcdClient) -> None:
    """A key written by hand (no lease, no holder's fields) never runs out: the refusal
    says so and how to delete it, rather than a wait that would not end it."""
    client.put("/s/nodes/node-1", "not json")
    b = NodeClaim(client, "/s", "node-1", "b" * 32)
    with pytest.raises(NodeTaken) as refused:
        b.claim()
    assert refused.value.ttl == 0
    assert "another agent (not named)" in str(refused.value)
    assert "etcdctl del /s/nodes/node-1" in str(refused.value)
    assert "ends within" not in str(refused.value)
