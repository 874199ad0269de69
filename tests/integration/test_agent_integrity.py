"""Attacks on the agent that once opened or stopped enforcement, replayed with real packets.

After each: the denied connection stays denied, the allowed one stays allowed,
and the agent answers.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stockade.agent.protocol import ApiError
from stockade.probe.client import Probe, run_probes
from stockade.probe.launcher import ProbeServer
from stockade.probe.protocol import Port, Protocol

from .agent_harness import AgentProcess

pytestmark = pytest.mark.privileged

PORTS = [Port(80, Protocol.TCP)]

# x/a accepts port 80 from x/b only, through a named port.
ONLY_B = {
    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
    "metadata": {"name": "only-b", "namespace": "x"},
    "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
             "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}],
                          "ports": [{"port": "http"}]}]},
}
DENY_ALL = {
    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
    "metadata": {"name": "deny-all", "namespace": "x"},
    "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
}


def _pod(name: str, namespace: str, ips: list[str], port: int,
         labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"containers": [{"ports": [{"containerPort": port, "name": "http"}]}]},
            "status": {"podIPs": [{"ip": ip} for ip in ips]}}


@pytest.fixture
def agent(tmp_path: Path, trio, netns_prefix: str) -> Iterator[AgentProcess]:
    proc = AgentProcess(tmp_path, trio.host_netns, netns_prefix).start()
    docs = [_pod(att.key.split("/")[1], "x", [att.address4, att.address6], 80,
                 {"pod": att.key.split("/")[1]}) for att in trio.all]
    proc.call("apply", documents=[*docs, ONLY_B], source="setup")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def servers(trio) -> Iterator[ProbeServer]:
    with ProbeServer({a.netns: PORTS for a in trio.all}) as server:
        yield server


def _probe(trio, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], bool]:
    atts = {a.key.split("/")[1]: a for a in trio.all}
    probes = [Probe(s, atts[s].netns, d, atts[d].address4, PORTS[0]) for s, d in pairs]
    return {(v.probe.src, v.probe.dst): v.allowed for v in run_probes(probes, timeout=0.6)}


BASELINE = {("b", "a"): True, ("c", "a"): False, ("a", "c"): True}


def _refused(agent: AgentProcess, op: str, **args: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        agent.call(op, **args)
    return info.value


def test_a_pod_port_out_of_range_is_refused_and_enforcement_goes_on(trio, agent,
                                                                     servers) -> None:
    assert _probe(trio, list(BASELINE)) == BASELINE
    a = trio.a
    for port in (70000, -5, 0):
        err = _refused(agent, "apply", documents=[
            _pod("a", "x", [a.address4, a.address6], port, {"pod": "a"})])
        assert err.code == "invalid"
        assert any("containerPort" in line and str(port) in line for line in err.lines)
        err = _refused(agent, "endpoint.add", endpoint={
            "namespace": "x", "name": "d", "ips": ["10.250.0.9"],
            "ports": [{"port": port, "name": "http"}]})
        assert err.code == "invalid"
    # The kernel still takes changes: a deny-all applied afterwards is enforced.
    agent.call("apply", documents=[DENY_ALL])
    assert _probe(trio, [("b", "a"), ("a", "c")]) == {("b", "a"): True, ("a", "c"): False}
    st = agent.call("status")
    assert st["ready"] and st["inSync"] and st["applyFailures"] == 0


def test_an_address_held_by_another_pod_is_refused(trio, agent, servers) -> None:
    err = _refused(agent, "apply", documents=[
        _pod("evil", "y", [trio.a.address4], 80, {"pod": "b"})])
    assert err.code == "invalid"
    assert err.lines == [f"address {trio.a.address4} is held by two endpoints: "
                         "endpoint x/a and endpoint y/evil"]
    assert _probe(trio, list(BASELINE)) == BASELINE
    assert "y/evil" not in {f"{e['namespace']}/{e['name']}"
                            for e in agent.call("get", kind="endpoints")["items"]}


def test_a_stored_bad_endpoint_is_held_closed_on_restart(trio, agent, servers) -> None:
    agent.stop()
    # What an older agent (or a hand edit) could have stored: a port the kernel refuses.
    db = sqlite3.connect(agent.state / "state.db")
    (doc,) = db.execute("SELECT doc FROM endpoints WHERE key = 'x/c'").fetchone()
    record = json.loads(doc)
    record["ports"] = [{"name": "http", "port": 70000, "protocol": "TCP"}]
    db.execute("UPDATE endpoints SET doc = ? WHERE key = 'x/c'", (json.dumps(record),))
    db.commit()
    db.close()
    agent.start()
    st = agent.call("status")
    assert st["ready"] and st["inSync"]
    assert list(st["quarantined"]) == ["x/c"] and "containerPort" in st["quarantined"]["x/c"][0]
    # x/c is isolated both ways; the rest is enforced as before.
    assert _probe(trio, [("b", "a"), ("c", "a"), ("a", "c"), ("c", "b"), ("a", "b")]) == {
        ("b", "a"): True, ("c", "a"): False, ("a", "c"): False, ("c", "b"): False,
        ("a", "b"): True}
    assert "held fail-closed" in agent.logs()
    # A valid record releases it.
    agent.call("apply", documents=[_pod("c", "x", [trio.c.address4, trio.c.address6], 80,
                                        {"pod": "c"})])
    assert agent.call("status")["quarantined"] == {}
    assert _probe(trio, list(BASELINE)) == BASELINE


def _start_fails(agent: AgentProcess, *extra: str, state: Path | None = None) -> str:
    cmd = list(agent.cmd)
    if state is not None:
        cmd[cmd.index("--state-dir") + 1] = str(state)
    out = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0, out.stderr[-2000:]
    return out.stderr


def test_losing_the_store_never_opens_enforcement(trio, agent, servers, tmp_path: Path) -> None:
    snapshot = tmp_path / "snap.json"
    snapshot.write_text(json.dumps(agent.call("snapshot.save")["snapshot"]))
    agent.stop()
    # A mistyped --state-dir: an empty store.
    err = _start_fails(agent, state=tmp_path / "stat")
    assert "is empty" in err and "--restore-snapshot" in err and "--accept-empty-store" in err
    assert _probe(trio, list(BASELINE)) == BASELINE
    # The database removed.
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (agent.state / name).unlink(missing_ok=True)
    err = _start_fails(agent)
    assert "is empty" in err
    assert _probe(trio, list(BASELINE)) == BASELINE
    # Told how to proceed: restore the snapshot. Nothing is flushed on the way.
    agent.cmd += ["--restore-snapshot", str(snapshot)]
    agent.start()
    st = agent.call("status")
    assert st["inSync"] and st["counts"] == {"namespaces": 1, "endpoints": 3, "policies": 1,
                                             "clusterPolicies": 0}
    assert _probe(trio, list(BASELINE)) == BASELINE
    agent.stop()
    # A snapshot is only for an empty store.
    err = _start_fails(agent)
    assert "--restore-snapshot is for an empty store" in err
    agent.cmd = agent.cmd[:-2]
    agent.start()
    assert agent.call("status")["counts"]["policies"] == 1
    agent.stop()
    # Replacing the kernel's rules by an empty state is possible, but only on purpose.
    (agent.state / "state.db").unlink()
    agent.cmd += ["--accept-empty-store"]
    agent.start()
    assert _probe(trio, [("c", "a")]) == {("c", "a"): True}


def test_the_cli_reports_a_refused_start_in_one_line(tmp_path: Path, trio, agent) -> None:
    agent.stop()
    (agent.state / "state.db").unlink()
    out = subprocess.run([sys.executable, "-m", "stockade.cli.main", *agent.cmd[3:]],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "refuses" in out.stderr


def _nft(netns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", netns, "nft", *args], capture_output=True,
                          text=True, check=False)


def test_no_other_process_can_change_the_agents_table(trio, agent, servers) -> None:
    assert agent.call("status")["table"].startswith("owned")
    host = trio.host_netns
    for attempt in (("delete", "table", "inet", "stockade"),
                    ("flush", "table", "inet", "stockade"),
                    ("insert", "rule", "inet", "stockade", "forward", "accept"),
                    ("add", "chain", "inet", "stockade", "foreign"),
                    ("add", "table", "inet", "stockade", "{", "flags", "dormant", ";", "}")):
        out = _nft(host, *attempt)
        assert out.returncode != 0 and "Operation not permitted" in out.stderr, attempt
    assert _nft(host, "list", "table", "inet", "stockade").returncode == 0  # reads are fine
    assert _probe(trio, list(BASELINE)) == BASELINE
    # The owner dies: the table stays and enforces, and the next agent claims it.
    agent.kill9()
    assert _probe(trio, list(BASELINE)) == BASELINE
    agent.start()
    st = agent.call("status")
    assert st["table"].startswith("owned") and st["inSync"] and st["driftRepairs"] == 0
    assert _nft(host, "delete", "table", "inet", "stockade").returncode != 0
    assert _probe(trio, list(BASELINE)) == BASELINE


def _nftables_listeners(netns: str) -> int:
    """Sockets of the namespace that joined nf_tables' event group (NFNLGRP_NFTABLES,
    7: bit 6 of /proc/net/netlink's Groups), as the kernel lists them."""
    out = subprocess.run(["ip", "netns", "exec", netns, "cat", "/proc/net/netlink"],
                         check=True, capture_output=True, text=True).stdout
    rows = [line.split() for line in out.splitlines()[1:]]
    return sum(1 for r in rows if r[1] == "12" and int(r[3], 16) & (1 << 6))


def test_an_owned_table_is_not_followed_through_events(agent: AgentProcess, trio,
                                                       tmp_path: Path,
                                                       netns_prefix: str) -> None:
    """Nobody else can change an owned table, so the agent does not make nf_tables build
    an event for each object it changes; a table it cannot own is followed."""
    assert agent.call("status")["ready"]
    assert _nftables_listeners(trio.host_netns) == 0
    agent.stop()
    (tmp_path / "unowned").mkdir()
    other = AgentProcess(tmp_path / "unowned", trio.host_netns, netns_prefix,
                         table=f"{netns_prefix}unowned", extra=("--no-table-owner",))
    other.start()
    try:
        assert _nftables_listeners(trio.host_netns) == 1
    finally:
        other.stop()


def test_a_store_that_does_not_load_leaves_the_kernel_as_it_was(
        tmp_path: Path, host_netns: str, netns_prefix: str) -> None:
    """The table's read-back starts before the store loads; with no table there is
    nothing to read, and an agent whose store cannot be read makes none on its way out."""
    proc = AgentProcess(tmp_path, host_netns, netns_prefix)
    proc.state.mkdir(parents=True)
    (proc.state / "state.db").write_bytes(b"not a database" * 100)
    err = _start_fails(proc)
    assert "Traceback" not in err and "state.db" in err, err[-2000:]
    assert _nft(host_netns, "list", "table", "inet", "stockade").returncode != 0
    assert _nft(host_netns, "list", "tables").stdout.strip() == ""
    # the read-back itself, waited for (the agent above may exit before it gets far)
    from stockade.datapath import open_datapath

    dp: Any = open_datapath("nft", "stockade", netns=host_netns, owner=True)
    dp.prefetch()
    assert dp._ahead.take() is None
    assert _nft(host_netns, "list", "tables").stdout.strip() == ""


def test_the_table_is_read_ahead_once_and_only_with_the_local_datastore(
        agent: AgentProcess, trio) -> None:
    """`stockade agent` opens its datapath and starts the read-back before the agent's
    modules load (agent/early.py); the start's own prefetch then starts no second read,
    and the snapshot takes what was read ahead."""
    from stockade.agent.early import read_ahead

    agent.stop()  # the table stays, as an orphan an owner claims
    assert read_ahead("nft", "stockade", datastore="kubernetes", netns=trio.host_netns,
                      owner=True, log_group=None) is None
    dp: Any = read_ahead("nft", "stockade", datastore="local", netns=trio.host_netns,
                         owner=True, log_group=None)
    thread = dp._ahead._thread
    assert thread is not None and dp.keep_unused
    dp.prefetch()
    assert dp._ahead._thread is thread
    taken = dp._ahead.take()
    assert taken is not None and taken[0] == dp._generation
    rc, listing, _, _ = taken[1]
    assert rc == 0 and '"chain"' in listing  # the agent's table, read
    dp.close()


def _kernel_print(datapath: str, netns: str, table: str) -> object:
    """What a second agent would change if it went as far as the datapath: the ruleset
    with its handles (nft); the pinned objects' inodes and the programs, links and maps
    loaded, by id (eBPF)."""
    if datapath == "nft":
        return _nft(netns, "-a", "list", "ruleset").stdout
    from stockade.datapath.ebpf import EbpfDatapath

    pins = EbpfDatapath(table, netns=netns).dir
    inodes = sorted((p.name, p.stat().st_ino) for p in pins.iterdir())

    def listed(what: str) -> list[dict[str, Any]]:
        out = subprocess.run(["bpftool", "-j", what, "show"], check=True,
                             capture_output=True, text=True).stdout
        return list(json.loads(out))

    # stockade's own objects only: the machine's others (systemd loads programs as
    # units start) come and go while the test runs.
    progs = [p for p in listed("prog") if str(p.get("name", "")).startswith("stockade_")]
    prog_ids = {p["id"] for p in progs}
    map_ids = {m for p in progs for m in p.get("map_ids", [])}
    links = [k for k in listed("link") if k.get("prog_id") in prog_ids]
    maps = [m for m in listed("map") if m["id"] in map_ids]
    assert progs and links and maps, "the agent's programs, links and maps are listed"

    def ids(objects: list[dict[str, Any]]) -> list[tuple[object, ...]]:
        return sorted((o.get("id"), o.get("prog_id"), o.get("name")) for o in objects)

    return inodes, ids(progs), ids(links), ids(maps)


@pytest.mark.parametrize("datapath", ["nft", "ebpf"])
def test_a_second_agent_is_refused_before_it_touches_the_state_or_the_kernel(
        trio, tmp_path: Path, netns_prefix: str, datapath: str) -> None:
    """On one state directory, or on one datapath (name and namespace; also from a
    mount namespace with a /run of its own), a second agent stops at once with the
    first's pid, and the kernel and the store are as the first left them; after the
    first is killed -9, an agent starts there."""
    from stockade.datapath.ebpf import EbpfDatapath

    table = f"{netns_prefix}own"
    (tmp_path / "first").mkdir()
    first = AgentProcess(tmp_path / "first", trio.host_netns, netns_prefix,
                         datapath=datapath, table=table)
    try:
        first.start()
        docs = [_pod(att.key.split("/")[1], "x", [att.address4, att.address6], 80,
                     {"pod": att.key.split("/")[1]}) for att in trio.all]
        first.call("apply", documents=[*docs, ONLY_B], source="setup")
        for att in trio.all:
            first.call("label", kind="endpoint", name=att.key, set={"seen": "1"}, remove=[])
        before = _kernel_print(datapath, trio.host_netns, table)
        db = (first.state / "state.db").read_bytes()
        revision = first.call("status")["revision"]
        same_state = [*first.cmd]
        same_state[same_state.index("--socket") + 1] = str(tmp_path / "other.sock")
        same_state[same_state.index("--table") + 1] = f"{netns_prefix}else"
        same_table = [*first.cmd]
        same_table[same_table.index("--socket") + 1] = str(tmp_path / "other.sock")
        same_table[same_table.index("--state-dir") + 1] = str(tmp_path / "other-state")
        # The same table from an agent with a /run of its own (a container's): the lock
        # files differ, the datapath's name in the namespace does not.
        own_run = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount -t tmpfs -o mode=0755 none /run/stockade && exec "$@"', "sh",
                   *same_table]
        for cmd, option in ((same_state, "--state-dir"), (same_table, "--table or --netns"),
                            (own_run, "--table or --netns")):
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            assert out.returncode == 2, out.stderr[-2000:]
            assert f"another agent (pid {first.proc.pid})" in out.stderr, out.stderr
            assert option in out.stderr and "Traceback" not in out.stderr
            assert _kernel_print(datapath, trio.host_netns, table) == before
            assert (first.state / "state.db").read_bytes() == db
            assert not (tmp_path / "other-state").exists()
            assert not (tmp_path / "other.sock").exists()
        assert not EbpfDatapath(f"{netns_prefix}else", netns=trio.host_netns).dir.exists()
        st = first.call("status")
        assert st["inSync"] and st["revision"] == revision
        first.kill9()
        first.start()  # the dead agent's locks are free
        assert first.call("status")["inSync"]
    finally:
        first.stop()
        if datapath == "ebpf":
            EbpfDatapath(table, netns=trio.host_netns).remove()
        else:
            _nft(trio.host_netns, "delete", "table", "inet", table)


def test_a_detached_ebpf_program_is_attached_again_by_the_agent_itself(
        trio, tmp_path: Path, netns_prefix: str, servers) -> None:
    """Every port's programs detached under an agent on eBPF (`bpftool link detach`):
    with no change to apply, the agent's link poll finds it within a few seconds,
    attaches them again (a drift repaired) and the denied connection is denied again."""
    from stockade.datapath import libbpf
    from stockade.datapath.ebpf import EbpfDatapath

    table = f"{netns_prefix}lk"
    # a resync far off: only the link poll (every second) can find it in time
    agent = AgentProcess(tmp_path, trio.host_netns, netns_prefix, datapath="ebpf",
                         table=table, resync=120.0).start()
    pins = EbpfDatapath(table, netns=trio.host_netns).dir
    try:
        docs = [_pod(att.key.split("/")[1], "x", [att.address4, att.address6], 80,
                     {"pod": att.key.split("/")[1]}) for att in trio.all]
        agent.call("apply", documents=[*docs, ONLY_B], source="setup")
        assert _probe(trio, list(BASELINE)) == BASELINE
        before = agent.call("status")["driftRepairs"]
        links = sorted(p for p in os.listdir(pins) if p.startswith("link-"))
        assert len(links) == 6
        for pin in links:
            fd = libbpf.obj_get(str(pins / pin))
            try:
                libbpf.link_detach(fd)
            finally:
                os.close(fd)
        deadline = time.monotonic() + 10
        while agent.call("status")["driftRepairs"] == before:
            assert time.monotonic() < deadline, "the agent left the programs detached"
            time.sleep(0.1)
        assert _probe(trio, list(BASELINE)) == BASELINE
        for pin in links:
            fd = libbpf.obj_get(str(pins / pin))
            try:
                assert libbpf.link_info(fd)[2] != 0  # attached to its port again
            finally:
                os.close(fd)
    finally:
        agent.stop()
        EbpfDatapath(table, netns=trio.host_netns).remove()


def test_an_agent_attaches_with_clsact_when_asked_and_not_the_other_way_over_its_pins(
        trio, tmp_path: Path, netns_prefix: str, servers) -> None:
    """`--ebpf-attach clsact`: the programs go on each port as clsact filters (no tcx
    link); an agent asked for tcx over those pins stops before changing anything,
    saying how to change over; one left to choose (auto) takes the filters there."""
    from stockade.datapath.ebpf import EbpfDatapath
    from stockade.net.namespace import entered
    from stockade.net.rtnl import CLSACT_EGRESS, CLSACT_INGRESS, Rtnl

    table = f"{netns_prefix}cls"
    dp = EbpfDatapath(table, netns=trio.host_netns)
    agent = AgentProcess(tmp_path, trio.host_netns, netns_prefix, datapath="ebpf",
                         table=table, extra=("--ebpf-attach", "clsact"))

    def filters() -> dict[tuple[str, int], list[tuple[int, int]]]:
        with entered(trio.host_netns), Rtnl() as nl:
            return {(att.host_ifname, hook): [(f.pref, f.program) for f in
                                              nl.filters(nl.link(att.host_ifname).index, hook)
                                              if f.kind == "bpf" and f.program]
                    for att in trio.all for hook in (CLSACT_INGRESS, CLSACT_EGRESS)}

    try:
        agent.start()
        docs = [_pod(att.key.split("/")[1], "x", [att.address4, att.address6], 80,
                     {"pod": att.key.split("/")[1]}) for att in trio.all]
        agent.call("apply", documents=[*docs, ONLY_B], source="setup")
        assert _probe(trio, list(BASELINE)) == BASELINE
        attached = filters()
        assert all(len(f) == 1 for f in attached.values()), attached
        assert not [p for p in os.listdir(dp.dir) if p.startswith("link-")]
        assert agent.stop() == 0
        tcx = AgentProcess(tmp_path, trio.host_netns, netns_prefix, datapath="ebpf",
                           table=table, extra=("--ebpf-attach", "tcx"))
        out = subprocess.run(tcx.cmd, capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        assert "attached with clsact, not tcx" in out.stderr, out.stderr[-2000:]
        assert "stockade dataplane remove --datapath ebpf" in out.stderr
        assert "Traceback" not in out.stderr
        assert filters() == attached
        assert not [p for p in os.listdir(dp.dir) if p.startswith("link-")]
        assert _probe(trio, list(BASELINE)) == BASELINE
        auto = AgentProcess(tmp_path, trio.host_netns, netns_prefix, datapath="ebpf",
                            table=table).start()
        agent = auto
        assert auto.call("status")["inSync"]
        assert filters() == attached
        assert _probe(trio, list(BASELINE)) == BASELINE
    finally:
        agent.stop()
        dp.remove()


def test_ebpf_attach_is_refused_for_another_datapath(tmp_path: Path, netns_prefix: str,
                                                     host_netns: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "stockade.cli.main", "agent", "--state-dir",
         str(tmp_path / "state"), "--socket", str(tmp_path / "agent.sock"), "--netns",
         host_netns, "--table", f"{netns_prefix}x", "--ebpf-attach", "clsact"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "--ebpf-attach clsact is for the eBPF datapath, not nft" in out.stderr
    assert "Traceback" not in out.stderr
