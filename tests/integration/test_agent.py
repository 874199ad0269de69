"""The node agent, end to end: a real agent process, real namespaces, real packets."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.agent.protocol import ApiError
from stockade.compile.lower import compile_cluster
from stockade.datapath import open_datapath
from stockade.datapath.ebpf import EbpfDatapath
from stockade.datapath.iptables import BACKEND_ENV
from stockade.datapath.nft import NftDatapath
from stockade.probe.client import Probe, run_probes
from stockade.probe.launcher import ProbeServer
from stockade.probe.protocol import Port, Protocol

from .agent_harness import AgentProcess
from .netio import EchoServer, connect, echo

pytestmark = pytest.mark.privileged

TCP80 = Port(80, Protocol.TCP)
PORTS = [TCP80, Port(81, Protocol.TCP)]


def _policy(name: str, target: str, source_labels: dict[str, str], port: int = 80,
            annotations: dict[str, str] | None = None) -> dict:
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "x", **(
            {"annotations": annotations} if annotations else {})},
        "spec": {"podSelector": {"matchLabels": {"pod": target}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": source_labels}}],
                              "ports": [{"port": port}]}]},
    }


# The agent's datapaths: (--datapath, STOCKADE_IPTABLES_BACKEND or None). The restart,
# drift and kill -9 tests run on each (`indirect` parametrization of `agent`).
DATAPATHS = {"nft": ("nft", None), "iptables-nft": ("iptables", "nft"),
             "iptables-legacy": ("iptables", "legacy"), "ebpf": ("ebpf", None)}


def _pins(agent: AgentProcess) -> Path:
    return EbpfDatapath(agent.table, netns=agent.netns).dir


def _sh(netns: str, *argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], check=True,
                          capture_output=True, text=True).stdout


@pytest.fixture
def agent(request: pytest.FixtureRequest, tmp_path: Path, trio, netns_prefix: str,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[AgentProcess]:
    kind, backend = DATAPATHS[getattr(request, "param", "nft")]
    env = {BACKEND_ENV: backend} if backend else None
    if backend:
        monkeypatch.setenv(BACKEND_ENV, backend)  # for this process's reads of the kernel
    # eBPF pins are not per namespace: the test's own name, removed afterwards.
    table = f"{netns_prefix}agent" if kind == "ebpf" else "stockade"
    # Not owned, so that tests can play another process changing the table.
    proc = AgentProcess(tmp_path, trio.host_netns, netns_prefix, datapath=kind, table=table,
                        env=env, extra=("--no-table-owner",))
    try:
        proc.start()
    except BaseException:
        _remove_pins(kind, table, trio.host_netns)
        raise
    for att in trio.all:
        ns, name = att.key.split("/")
        proc.call("endpoint.add", endpoint={
            "namespace": ns, "name": name, "labels": {"pod": name},
            "ips": [att.address4, att.address6], "netns": att.netns_path,
            "interface": att.ifname, "hostInterface": att.host_ifname})
    try:
        yield proc
    finally:
        proc.stop()
        _remove_pins(kind, table, trio.host_netns)


def _remove_pins(kind: str, table: str, netns: str) -> None:
    if kind == "ebpf":
        datapath = EbpfDatapath(table, netns=netns)
        datapath.remove()
        assert not datapath.dir.exists()


@pytest.fixture
def servers(trio) -> Iterator[ProbeServer]:
    with ProbeServer({a.netns: PORTS for a in trio.all}) as server:
        yield server


def _probe(trio, pairs, timeout: float = 0.6) -> dict[tuple[str, str, int], bool]:
    atts = {a.key.split("/")[1]: a for a in trio.all}
    probes = [Probe(s, atts[s].netns, d, atts[d].address4, Port(port, Protocol.TCP))
              for s, d, port in pairs]
    return {(v.probe.src, v.probe.dst, v.probe.port.number): v.allowed
            for v in run_probes(probes, timeout=timeout)}


def test_apply_relabel_delete_with_real_packets(trio, agent, servers) -> None:
    out = agent.call("apply", documents=[_policy("web", "a", {"role": "client"})],
                     source="test")
    assert out["created"] == ["networkpolicy/x/web"]
    pairs = [("b", "a", 80), ("c", "a", 80), ("a", "b", 80)]
    assert _probe(trio, pairs) == {("b", "a", 80): False, ("c", "a", 80): False,
                                   ("a", "b", 80): True}
    agent.call("label", kind="endpoint", name="x/b", set={"role": "client"}, remove=[])
    assert _probe(trio, pairs) == {("b", "a", 80): True, ("c", "a", 80): False,
                                   ("a", "b", 80): True}
    again = agent.call("apply", documents=[_policy("web", "a", {"role": "client"})],
                       source="test")
    assert again["unchanged"] == ["networkpolicy/x/web"]
    agent.call("delete", refs=[{"kind": "NetworkPolicy", "namespace": "x", "name": "web"}])
    assert all(_probe(trio, pairs).values())
    st = agent.call("status")
    assert st["inSync"] and st["counts"]["policies"] == 0 and st["counts"]["endpoints"] == 3


def test_a_set_with_one_invalid_object_changes_nothing(trio, agent, servers) -> None:
    agent.call("apply", documents=[_policy("web", "a", {"pod": "b"})], source="test")
    before = agent.call("status")["revision"]
    shown = NftDatapath(netns=trio.host_netns).show()
    bad = _policy("bad", "c", {"pod": "a"})
    bad["spec"]["ingress"][0]["ports"][0]["port"] = 70000
    with pytest.raises(ApiError) as err:
        agent.call("apply", documents=[_policy("other", "b", {"pod": "a"}), bad],
                   source="test")
    assert err.value.code == "invalid"
    assert any("spec.ingress[0].ports[0].port" in line for line in err.value.lines)
    assert agent.call("status")["revision"] == before
    assert NftDatapath(netns=trio.host_netns).show() == shown
    assert [p["metadata"]["name"] for p in agent.call("get", kind="policies")["items"]] == \
        ["web"]


def _nft_delete_table(trio, agent: AgentProcess) -> None:
    _sh(trio.host_netns, "nft", "delete", "table", "inet", agent.table)


def _iptables_flush_chain(trio, agent: AgentProcess) -> None:
    # our base chain, reached from FORWARD: flushed, nothing is enforced any more
    tool = f"iptables-{os.environ[BACKEND_ENV]}"
    _sh(trio.host_netns, tool, "-F", f"{agent.table}-forward")


def _ipset_delete_member(trio, agent: AgentProcess) -> None:
    # b's address out of every set of ours holding it: b -> a is denied until repaired
    members = [line.split()[1:3] for line in _sh(trio.host_netns, "ipset", "save").splitlines()
               if line.startswith(f"add {agent.table}-") and
               line.split()[2].split(",")[0] == trio.b.address4]
    assert members, _sh(trio.host_netns, "ipset", "save")
    for name, member in members:
        _sh(trio.host_netns, "ipset", "del", name, member)


def _ebpf_detach_link(trio, agent: AgentProcess) -> None:
    links = sorted(p for p in os.listdir(_pins(agent)) if p.startswith("link-"))
    assert links
    for link in links:
        subprocess.run(["bpftool", "link", "detach", "pinned", str(_pins(agent) / link)],
                       check=True, capture_output=True)


def _ebpf_delete_map_entry(trio, agent: AgentProcess) -> None:
    # b's address out of the ipcache (both slots): b -> a is denied until repaired
    addr = [f"{int(x):02x}" for x in trio.b.address4.split(".")]
    deleted = 0
    for slot in (0, 1):
        key = ["28", "00", "00", "00", f"{slot:02x}", *addr, "00", "00", "00"]
        done = subprocess.run(["bpftool", "map", "delete", "pinned",
                               str(_pins(agent) / "ipcache4"), "key", "hex", *key],
                              capture_output=True)
        deleted += done.returncode == 0
    assert deleted


# Per datapath, the external interference it can suffer (one test body for all).
TAMPER = {"nft-delete-table": ("nft", _nft_delete_table),
          "iptables-nft-flush-chain": ("iptables-nft", _iptables_flush_chain),
          "iptables-nft-ipset-member": ("iptables-nft", _ipset_delete_member),
          "iptables-legacy-flush-chain": ("iptables-legacy", _iptables_flush_chain),
          "ebpf-detach-links": ("ebpf", _ebpf_detach_link),
          "ebpf-delete-map-entry": ("ebpf", _ebpf_delete_map_entry)}


@pytest.mark.parametrize(("agent", "tamper"), list(TAMPER.values()), ids=list(TAMPER),
                         indirect=["agent"])
def test_drift_is_repaired(trio, agent, servers, tamper) -> None:
    agent.call("apply", documents=[_policy("web", "a", {"pod": "b"})], source="test")
    assert _probe(trio, [("c", "a", 80), ("b", "a", 80)]) == {("c", "a", 80): False,
                                                             ("b", "a", 80): True}
    tamper(trio, agent)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and agent.call("status")["driftRepairs"] == 0:
        time.sleep(0.05)
    assert agent.call("status")["driftRepairs"] >= 1
    assert _probe(trio, [("c", "a", 80), ("b", "a", 80)]) == {("c", "a", 80): False,
                                                             ("b", "a", 80): True}
    assert "drift repaired" in agent.logs()


# Tampering no change event tells of: found by the periodic check alone.
UNHEARD = ["ebpf-delete-map-entry", "iptables-nft-ipset-member"]


@pytest.mark.parametrize(("agent", "tamper"), [TAMPER[t] for t in UNHEARD], ids=UNHEARD,
                         indirect=["agent"])
def test_drift_is_repaired_while_changes_keep_coming(trio, agent, servers, tamper) -> None:
    """A change every 0.1 s, far more often than the 1 s resync: a change's run writes only
    what changed, and must not put off the periodic check that finds the tampering."""
    agent.call("apply", documents=[_policy("web", "a", {"pod": "b"})], source="test")
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        i = 0
        while not stop.is_set():
            try:
                agent.call("label", kind="endpoint", name="x/c", set={"round": str(i)},
                           remove=[])
            except BaseException as exc:  # reported by the test, not lost in the thread
                errors.append(exc)
                return
            i += 1
            stop.wait(0.1)

    before, verified = (agent.call("status")[k] for k in ("driftRepairs", "lastVerified"))
    worker = threading.Thread(target=churn)
    worker.start()
    try:
        time.sleep(0.5)
        tamper(trio, agent)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and agent.call("status")["driftRepairs"] == before:
            time.sleep(0.1)
    finally:
        stop.set()
        worker.join()
    assert not errors, errors
    status = agent.call("status")
    assert status["driftRepairs"] > before, "the changes held the check off"
    assert status["lastVerified"] > (verified or 0)
    assert _probe(trio, [("c", "a", 80), ("b", "a", 80)]) == {("c", "a", 80): False,
                                                             ("b", "a", 80): True}


@pytest.mark.parametrize("agent", list(DATAPATHS), indirect=True)
def test_kill9_during_changes_then_restart_keeps_enforcing(trio, agent, servers) -> None:
    """Allowed traffic never fails and denied traffic never passes, across a kill -9."""
    agent.call("apply", documents=[_policy("web", "a", {"pod": "b"})], source="test")
    failures: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen = _probe(trio, [("b", "a", 80), ("c", "a", 80)], timeout=0.5)
            if not seen[("b", "a", 80)]:
                failures.append("allowed b->a failed")
            if seen[("c", "a", 80)]:
                failures.append("denied c->a passed")

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(30):
            # unrelated churn: policies on other ports come and go
            agent.call("apply", documents=[_policy(f"p{i}", "c", {"pod": "a"}, 81)],
                       source="test", sync=False)
            if i == 15:
                agent.kill9()
                agent.start()
        stop.set()
    finally:
        stop.set()
        watcher.join()
    assert failures == []
    # the last changes were sent without waiting: in sync once they are applied
    deadline = time.monotonic() + 10
    while not (st := agent.call("status"))["inSync"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert st["inSync"], st
    # the kernel holds exactly what the store says
    from stockade.agent.store import Store

    with Store(agent.state) as store:
        state, _ = store.load()
    desired = compile_cluster(state.cluster())
    kernel = open_datapath(agent.datapath, agent.table, netns=trio.host_netns)
    assert kernel.diff(desired).empty


@pytest.mark.parametrize("agent", list(DATAPATHS), indirect=True)
def test_restarts_start_warm_with_the_changes_since_folded_in(trio, agent, servers) -> None:
    """A clean stop keeps what the next start computes (agent/warm.py); the start takes
    it and enforces as before. A store changed while the agent was down folds the
    change in and enforces the store. While running, the agent keeps it once idle:
    a kill -9 after a later change starts warm too, with that change folded in."""
    from stockade.agent.records import DeletePolicy
    from stockade.agent.store import Store

    def kernel_is_the_store() -> None:
        with Store(agent.state) as store:
            state, _ = store.load()
        kernel = open_datapath(agent.datapath, agent.table, netns=trio.host_netns)
        assert kernel.diff(compile_cluster(state.cluster())).empty

    agent.call("apply", documents=[_policy("web", "a", {"pod": "b"})], source="test")
    pairs = [("b", "a", 80), ("c", "a", 80)]
    assert _probe(trio, pairs) == {("b", "a", 80): True, ("c", "a", 80): False}
    agent.stop()
    assert "warm start kept" in agent.logs()
    if agent.datapath == "nft":
        # What was kept is the store's, not the kernel's: the kernel is read back anyway.
        _sh(trio.host_netns, "nft", "delete", "table", "inet", agent.table)
    agent.start()
    assert agent.logs().count("warm=True folded=0") == 1, agent.logs()[-3000:]
    assert _probe(trio, pairs) == {("b", "a", 80): True, ("c", "a", 80): False}
    assert agent.call("status")["inSync"]
    kernel_is_the_store()
    agent.stop()
    with Store(agent.state) as store:
        store.commit([DeletePolicy("x/web")])
    agent.cmd += ["--warm-idle", "0.3", "--warm-interval", "0"]
    # counted before the start: the keeper may keep while the probes below run
    kept = agent.logs().count("warm start kept")
    agent.start()
    assert agent.logs().count("warm=True folded=1") == 1, agent.logs()[-3000:]
    assert _probe(trio, pairs) == {("b", "a", 80): True, ("c", "a", 80): True}
    kernel_is_the_store()
    # the keeper keeps the state it started with (it folded a change in), once idle
    deadline = time.monotonic() + 30
    while agent.logs().count("warm start kept") == kept and time.monotonic() < deadline:
        time.sleep(0.1)
    assert agent.logs().count("warm start kept") == kept + 1, agent.logs()[-3000:]
    st = agent.call("status")
    assert st["warmStart"]["keptRevision"] == st["revision"], st
    agent.call("apply", documents=[_policy("web", "a", {"pod": "b"})], source="test")
    agent.kill9()
    agent.start()
    assert agent.logs().count("warm=True folded=1") == 2, agent.logs()[-3000:]
    assert _probe(trio, pairs) == {("b", "a", 80): True, ("c", "a", 80): False}
    assert agent.call("status")["inSync"]
    kernel_is_the_store()


def test_snapshot_save_and_restore(trio, agent, servers, tmp_path: Path) -> None:
    agent.call("apply", documents=[_policy("web", "a", {"pod": "b"})], source="test")
    snap = agent.call("snapshot.save")["snapshot"]
    agent.call("delete", refs=[{"kind": "NetworkPolicy", "namespace": "x", "name": "web"}])
    assert _probe(trio, [("c", "a", 80)]) == {("c", "a", 80): True}
    agent.call("snapshot.restore", snapshot=snap)
    assert _probe(trio, [("c", "a", 80)]) == {("c", "a", 80): False}
    assert [p["metadata"]["name"] for p in agent.call("get", kind="policies")["items"]] == \
        ["web"]



@pytest.mark.parametrize("keep", [False, True])
def test_revoked_connection_is_cut_unless_kept(trio, agent, keep: bool) -> None:
    annotations = {"stockade.io/existing-connections": "keep"} if keep else None
    agent.call("apply", documents=[_policy("web", "a", {"pod": "b"}, 7777, annotations)],
               source="test")
    with EchoServer(trio.a.netns, 7777):
        conn = connect(trio.b.netns, trio.a.address4, 7777)
        try:
            assert echo(conn, b"before")
            agent.call("apply", source="test",
                       documents=[_policy("web", "a", {"pod": "c"}, 7777, annotations)])
            if keep:
                time.sleep(0.5)
                assert agent.call("status")["connectionsCut"] == 0
                assert echo(conn, b"after")
            else:
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline and \
                        agent.call("status")["connectionsCut"] == 0:
                    time.sleep(0.05)
                assert agent.call("status")["connectionsCut"] == 1
                assert not echo(conn, b"after")
        finally:
            conn.close()


@pytest.mark.parametrize("which", ["nft", "iptables-nft", "ebpf"])
def test_denied_flows_are_logged(tmp_path: Path, trio, netns_prefix: str, servers,
                                 which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    kind, backend = DATAPATHS[which]
    table = f"{netns_prefix}agent" if kind == "ebpf" else "stockade"
    proc = AgentProcess(tmp_path, trio.host_netns, netns_prefix,
                        log_group=random.randint(2000, 60000), datapath=kind, table=table,
                        env={BACKEND_ENV: backend} if backend else None)
    try:
        proc.start()
        for att in trio.all:
            ns, name = att.key.split("/")
            proc.call("endpoint.add", endpoint={"namespace": ns, "name": name,
                                                "labels": {"pod": name},
                                                "ips": [att.address4]})
        proc.call("apply", documents=[_policy("web", "a", {"pod": "b"})], source="test")
        seen = _probe(trio, [("c", "a", 81), ("b", "a", 80)])
        assert seen == {("c", "a", 81): False, ("b", "a", 80): True}
        deadline = time.monotonic() + 3
        items: list[dict] = []
        while time.monotonic() < deadline and not items:
            items = proc.call("flows", since=0, limit=10)["items"]
            time.sleep(0.05)
        assert items, proc.logs()[-2000:]
        first = items[0]
        assert (first["src"], first["dst"], first["port"], first["protocol"]) == \
            ("x/c", "x/a", 81, "TCP")
        assert first["direction"] == "ingress" and first["policies"] == ["x/web"]
        assert all(i["src"] != "x/b" for i in items)  # allowed flows are not logged
        assert (tmp_path / "state" / "denied-flows.jsonl").read_text().count("x/c") >= 1
    finally:
        proc.stop()
        _remove_pins(kind, table, trio.host_netns)


def test_metrics_are_served(tmp_path: Path, trio, netns_prefix: str) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:  # a free port on loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = AgentProcess(tmp_path, trio.host_netns, netns_prefix,
                        extra=("--metrics-address", f"127.0.0.1:{port}")).start()
    try:
        proc.call("endpoint.add", endpoint={"namespace": "x", "name": "a",
                                            "labels": {"pod": "a"}, "ips": [trio.a.address4]})
        proc.call("apply", documents=[_policy("web", "a", {"pod": "b"})], source="test")
        url = f"http://127.0.0.1:{port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                  if line and not line.startswith("#")}
        assert values["stockade_state_endpoints"] == 1
        assert values["stockade_state_policies"] == 1
        assert values["stockade_reconcile_applies_total"] >= 2
        assert values["stockade_reconcile_enforcement_latency_seconds_count"] >= 1
        assert values['stockade_datapath_objects{kind="chains"}'] >= 1
    finally:
        proc.stop()
