"""ClusterNetworkPolicy through a real agent (nftables datapath), with real packets: an
Admin Deny over a NetworkPolicy allow, a priority change flipping a verdict in one
transaction, Pass handing over to NetworkPolicy, a Baseline Deny for a pod no
NetworkPolicy selects, an established connection cut by an Admin Deny, everything
restored on delete, a restart adopting the tier chains without rewriting any and without
a dropped packet; and an agent on iptables enforcing them."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from stockade.agent.store import DB_NAME, Store
from stockade.compile.lower import compile_cluster
from stockade.datapath.nft import NftDatapath

from . import test_agent as base
from .agent_harness import AgentProcess
from .netio import EchoServer, connect, echo
from .test_agent import _policy, _probe

# The agent fixture of test_agent.py (trio's three endpoints added; its datapath a
# parameter, nft by default) and its probe servers (TCP 80 and 81).
agent = base.agent
servers = base.servers

pytestmark = pytest.mark.privileged


def cnp(name: str, tier: str, priority: int, action: str, *, subject: str,
        peer: dict[str, Any] | None = None, port: int | None = None) -> dict[str, Any]:
    """`subject` (a pod's name) judged on ingress: `action` for `peer` (default: every
    pod), on TCP `port` (default: every port)."""
    rule: dict[str, Any] = {"name": f"{action.lower()}-rule", "action": action,
                            "from": [peer or {"namespaces": {}}]}
    if port is not None:
        rule["protocols"] = [{"tcp": {"destinationPort": {"number": port}}}]
    return {"apiVersion": "policy.networking.k8s.io/v1alpha2",
            "kind": "ClusterNetworkPolicy", "metadata": {"name": name},
            "spec": {"tier": tier, "priority": priority,
                     "subject": {"pods": {"namespaceSelector": {},
                                          "podSelector": {"matchLabels": {"pod": subject}}}},
                     "ingress": [rule]}}


def pods(name: str) -> dict[str, Any]:
    return {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": name}}}}


def apply(agent: AgentProcess, *docs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = agent.call("apply", documents=list(docs), source="test")
    return out


B_A, C_A, A_B, A_C = ("b", "a", 80), ("c", "a", 80), ("a", "b", 80), ("a", "c", 80)


def test_tiers_with_real_packets(trio, agent, servers) -> None:
    apply(agent, _policy("web", "a", {"pod": "b"}))  # NetworkPolicy: b may reach a
    pairs = [B_A, C_A, A_B, A_C]
    assert _probe(trio, pairs) == {B_A: True, C_A: False, A_B: True, A_C: True}
    # An Admin Deny of b over the NetworkPolicy's allow.
    out = apply(agent, cnp("deny-b", "Admin", 10, "Deny", subject="a", peer=pods("b")))
    assert out["created"] == ["clusternetworkpolicy/deny-b"]
    assert _probe(trio, [B_A, C_A]) == {B_A: False, C_A: False}
    # An Admin Accept of every pod at 20 loses to the Deny at 10; at 5 it wins.
    apply(agent, cnp("accept-all", "Admin", 20, "Accept", subject="a"))
    assert _probe(trio, [B_A, C_A]) == {B_A: False, C_A: True}
    out = apply(agent, cnp("accept-all", "Admin", 5, "Accept", subject="a"))
    assert out["configured"] == ["clusternetworkpolicy/accept-all"]
    assert _probe(trio, [B_A, C_A]) == {B_A: True, C_A: True}
    # The action changed: Pass hands both to the NetworkPolicy (b allowed, c not).
    apply(agent, cnp("accept-all", "Admin", 5, "Pass", subject="a"))
    assert _probe(trio, [B_A, C_A]) == {B_A: True, C_A: False}
    # A Baseline Deny for c, which no NetworkPolicy selects; a is selected: unaffected.
    apply(agent, cnp("base-deny", "Baseline", 1, "Deny", subject="c"),
          cnp("base-deny-a", "Baseline", 1, "Deny", subject="a"))
    assert _probe(trio, [A_C, A_B, B_A]) == {A_C: False, A_B: True, B_A: True}
    st = agent.call("status")
    assert st["inSync"] and st["counts"]["clusterPolicies"] == 4
    names = [i["metadata"]["name"] for i in
             agent.call("get", kind="clusternetworkpolicies")["items"]]
    assert names == ["accept-all", "base-deny", "base-deny-a", "deny-b"]
    # Deleted: what the NetworkPolicy alone gives, and no tier chain left.
    out = agent.call("delete", refs=[{"kind": "cnp", "name": n} for n in names])
    assert len(out["deleted"]) == 4
    assert _probe(trio, pairs) == {B_A: True, C_A: False, A_B: True, A_C: True}
    # No map entry jumps to a tier chain any more; the datapath keeps unused chains a
    # while for reuse (SPARE_AGE, 10 s) and then removes them.
    assert not [i for i in agent.call("get", kind="chains")["items"]
                if i["name"].startswith(("ai-", "li-", "bi-"))]
    deadline = time.monotonic() + 20
    while any(n.startswith(("ai-", "li-", "bi-")) for n in _rule_handles(trio.host_netns)):
        assert time.monotonic() < deadline, sorted(_rule_handles(trio.host_netns))
        time.sleep(0.5)


@pytest.mark.parametrize("agent", ["nft", "iptables-nft"], indirect=True)
def test_an_admin_deny_cuts_an_established_connection(trio, agent) -> None:
    with EchoServer(trio.a.netns, 7777):
        conn = connect(trio.b.netns, trio.a.address4, 7777)
        try:
            assert echo(conn, b"before")
            apply(agent, cnp("deny-b", "Admin", 1, "Deny", subject="a", peer=pods("b"),
                             port=7777))
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and \
                    agent.call("status")["connectionsCut"] == 0:
                time.sleep(0.05)
            assert agent.call("status")["connectionsCut"] == 1
            assert not echo(conn, b"after")
        finally:
            conn.close()


def _rule_handles(netns: str) -> dict[str, list[int]]:
    """Each chain of the table with its rules' handles: a rewritten chain has new ones."""
    out = subprocess.run(["ip", "netns", "exec", netns, "nft", "-j", "list", "table", "inet",
                          "stockade"], check=True, capture_output=True, text=True).stdout
    handles: dict[str, list[int]] = {}
    for item in json.loads(out)["nftables"]:
        if "chain" in item:
            handles.setdefault(item["chain"]["name"], [])
        elif "rule" in item:
            handles.setdefault(item["rule"]["chain"], []).append(item["rule"]["handle"])
    return handles


def test_a_restart_adopts_the_tier_chains(trio, agent, servers) -> None:
    """Stopped and started again: the same table, not one chain rewritten, and no probe
    meanwhile sees an allowed pair denied or a denied one allowed."""
    apply(agent, _policy("web", "a", {"pod": "b"}),
          cnp("deny-c", "Admin", 1, "Deny", subject="a", peer=pods("c")),
          cnp("pass-b", "Admin", 0, "Pass", subject="a", peer=pods("b")),
          cnp("base", "Baseline", 3, "Deny", subject="b"))
    expected = {B_A: True, C_A: False, A_B: False, A_C: True}
    assert _probe(trio, list(expected)) == expected
    dp = NftDatapath(netns=trio.host_netns)
    kernel = dp.read()
    handles = _rule_handles(trio.host_netns)
    # Admin (ai-), link (li-) and Baseline (bi-) chains, by the names the lowering gives.
    assert {n[:3] for n in handles} >= {"ai-", "li-", "bi-"}, sorted(handles)
    failures: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen = _probe(trio, list(expected), timeout=0.5)
            failures.extend(f"{pair}: {got}" for pair, got in seen.items()
                            if got != expected[pair])

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        agent.stop()
        time.sleep(0.5)
        agent.start()
        time.sleep(1.5)  # a periodic resync (1 s here) reads the table back once more
    finally:
        stop.set()
        watcher.join()
    assert failures == []
    st = agent.call("status")
    assert st["inSync"] and st["driftRepairs"] == 0, st
    assert dp.read() == kernel
    assert _rule_handles(trio.host_netns) == handles
    with Store(agent.state) as store:
        state, _ = store.load()
    assert sorted(state.cluster_policies) == ["base", "deny-c", "pass-b"]
    assert dp.diff(compile_cluster(state.cluster())).empty


@pytest.mark.parametrize("agent", ["iptables-nft", "iptables-legacy"], indirect=True)
def test_an_agent_on_iptables_enforces_them(trio, agent, servers) -> None:
    apply(agent, _policy("web", "a", {"pod": "b"}))  # NetworkPolicy: b may reach a
    # An Admin Deny of b at 10 over the NetworkPolicy; an Accept of every pod at 20.
    apply(agent, cnp("deny-b", "Admin", 10, "Deny", subject="a", peer=pods("b")),
          cnp("accept-all", "Admin", 20, "Accept", subject="a"))
    assert _probe(trio, [B_A, C_A]) == {B_A: False, C_A: True}
    # Pass at 5 hands both to the NetworkPolicy (b allowed, c not).
    apply(agent, cnp("accept-all", "Admin", 5, "Pass", subject="a"))
    assert _probe(trio, [B_A, C_A]) == {B_A: True, C_A: False}
    st = agent.call("status")
    assert st["inSync"] and st["driftRepairs"] == 0 and not st["error"], st
    assert st["counts"]["clusterPolicies"] == 2


def test_get_and_delete_from_the_command_line(trio, agent, tmp_path: Path) -> None:
    doc = cnp("deny-b", "Admin", 10, "Deny", subject="a", peer=pods("b"))
    path = tmp_path / "cnp.yaml"
    path.write_text(json.dumps(doc))

    def cli(*argv: str) -> str:
        return subprocess.run([sys.executable, "-m", "stockade.cli.main", *argv,
                               "--socket", agent.socket], check=True,
                              capture_output=True, text=True).stdout

    assert "clusternetworkpolicy/deny-b created" in cli("apply", "-f", str(path))
    table = cli("get", "cnp").splitlines()
    assert table[0].split() == ["NAME", "TIER", "PRIORITY", "SUBJECT", "INGRESS", "EGRESS"]
    assert table[1].split()[:3] == ["deny-b", "Admin", "10"]
    assert json.loads(cli("get", "clusternetworkpolicies", "-o", "json")) == [doc]
    assert "clusternetworkpolicy/deny-b deleted" in cli("delete", "cnp", "deny-b")
    assert agent.call("get", kind="cnp")["items"] == []


def test_priority_flips_reach_the_kernel_in_one_transaction(trio, agent, servers) -> None:
    """Two Admin policies for a's ingress from c, Accept and Deny, swap priorities again
    and again: each swap is one apply rewriting a's Admin chain in place (its rules and
    its verdict map, in one nft transaction; a's map entry stays), c's verdict is the new
    one when the call returns, and b, which neither policy names, is never dropped
    meanwhile."""
    apply(agent, _policy("web", "a", {"pod": "b"}))
    failures: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if not _probe(trio, [B_A], timeout=0.5)[B_A]:
                failures.append("b->a dropped during a swap")

    watcher = threading.Thread(target=watch)
    watcher.start()
    swaps = 0
    try:
        for i in range(12):
            accept_first = i % 2 == 0
            apply(agent, cnp("accept-c", "Admin", 10 if accept_first else 30, "Accept",
                             subject="a", peer=pods("c")),
                  cnp("deny-c", "Admin", 20, "Deny", subject="a", peer=pods("c")))
            last = agent.call("status")["lastApply"]
            if i and not last["verified"]:  # not a periodic run (1 s) come in between
                swaps += 1
                assert last["summary"].get("chains_replaced", 0) >= 1, last
                assert not last["summary"].get("map_entries_set", 0), last
                assert not last["summary"].get("chains_added", 0), last
            assert _probe(trio, [C_A])[C_A] is accept_first, i
    finally:
        stop.set()
        watcher.join()
    assert failures == []
    assert swaps >= 6
    assert agent.call("status")["driftRepairs"] == 0


def _store_raw(state_dir: Path, name: str, doc: dict[str, Any]) -> None:
    """Write a ClusterNetworkPolicy row by hand, past every check, as an operator or an
    older agent might have."""
    import sqlite3

    conn = sqlite3.connect(state_dir / DB_NAME)
    try:
        conn.execute("UPDATE cluster_policies SET doc = ? WHERE name = ?",
                     (json.dumps(doc), name))
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize("subject_readable", [True, False])
def test_a_stored_invalid_policy_holds_its_subject_closed(trio, agent, servers,
                                                          subject_readable: bool) -> None:
    """A ClusterNetworkPolicy made invalid in the store by hand does not stop the agent:
    the pods its subject selects (every pod when the subject cannot be read) are held
    closed both ways, `status` says why, and deleting the policy releases them."""
    apply(agent, cnp("deny-c", "Admin", 1, "Deny", subject="a", peer=pods("c")))
    pairs = [B_A, C_A, A_B, ("b", "c", 80)]
    assert _probe(trio, pairs) == {B_A: True, C_A: False, A_B: True, ("b", "c", 80): True}
    agent.stop()
    bad = cnp("deny-c", "Admin", 5000, "Deny", subject="a", peer=pods("c"))
    if not subject_readable:
        bad["spec"]["subject"] = {"pods": {"podSelector": {"matchLabels": {"x": "/"}}}}
    _store_raw(agent.state, "deny-c", bad)
    agent.start()
    st = agent.call("status")
    held = ["x/a"] if subject_readable else ["x/a", "x/b", "x/c"]
    assert sorted(st["quarantined"]) == held, st["quarantined"]
    reason = st["quarantined"]["x/a"][0]
    assert reason.startswith("clusternetworkpolicy deny-c: spec."), reason
    closed = {B_A: False, C_A: False, A_B: False,
              ("b", "c", 80): subject_readable}
    assert _probe(trio, pairs) == closed
    out = agent.call("delete", refs=[{"kind": "cnp", "name": "deny-c"}])
    assert out["deleted"] == ["clusternetworkpolicy/deny-c"]
    assert agent.call("status")["quarantined"] == {}
    assert _probe(trio, pairs) == {B_A: True, C_A: True, A_B: True, ("b", "c", 80): True}
