"""The agent with etcd as its datastore, end to end: a real etcd on loopback started by
the test (tests/support/etcd.py), a real agent process (``--datastore etcd``), real
network namespaces and real packets.

* policies, pods and namespaces written into etcd are enforced; writes through the
  agent (apply, label, delete) land in etcd and are enforced when the call returns;
* an etcd outage: the kernel keeps enforcing (probed throughout), reads are served,
  writes are refused naming etcd, ``status`` says degraded; etcd back, the agent
  catches up without flushing anything;
* a compaction while the agent is cut off from etcd: relist, nothing flushed, a
  deletion made meanwhile not lost;
* a restarted agent adopts the kernel's table (nothing changed for an unchanged
  etcd), and one started after changes and a compaction applies only the difference.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from tests.support.etcd import EtcdServer, etcd_binary
from tests.support.hosts import Hosts

from stockade.agent.protocol import ApiError
from stockade.datapath.nft import NftDatapath
from stockade.etcd.client import EtcdClient, b64
from stockade.probe.launcher import ProbeServer

from .agent_harness import AgentProcess
from .test_agent_kubernetes import (
    TCP80,
    Watchers,
    allow,
    probe,
    publish_trio,
    wait_enforced,
    wait_status,
)

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(etcd_binary() is None, reason="etcd is not installed")]

NODE = "node-1"
PREFIX = "/stockade"
CLAIM_TTL = 3  # a killed agent's node name is free again within this (etcd/nodes.py)


class EtcdWriter:
    """Writes into etcd as another host or an operator would (etcdctl put), remembering
    the revision of the last write of each resource (what the agent must reach)."""

    def __init__(self, client: EtcdClient) -> None:
        self.c = client
        self.rvs: dict[str, int] = {}

    def _put(self, plural: str, key: str, doc: Mapping[str, Any]) -> None:
        self.rvs[plural] = self.c.put(f"{PREFIX}/{plural}/{key}", json.dumps(doc))

    def namespace(self, name: str, labels: Mapping[str, str]) -> None:
        self._put("namespaces", name, {"apiVersion": "v1", "kind": "Namespace",
                                       "metadata": {"name": name, "labels": dict(labels)}})

    def pod(self, ns: str, name: str, labels: Mapping[str, str], ips: Sequence[str],
            node: str = NODE) -> None:
        self._put("pods", f"{ns}/{name}", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": dict(labels)},
            "spec": {"nodeName": node, "containers": [{"name": "main"}]},
            "status": {"phase": "Running", "podIP": ips[0],
                       "podIPs": [{"ip": ip} for ip in ips]}})

    def policy(self, manifest: Mapping[str, Any]) -> None:
        meta = manifest["metadata"]
        self._put("networkpolicies", f"{meta['namespace']}/{meta['name']}", manifest)

    def delete(self, plural: str, key: str) -> None:
        self.rvs[plural] = self.c.delete(f"{PREFIX}/{plural}/{key}")

    def doc(self, plural: str, key: str) -> dict[str, Any] | None:
        kv = self.c.get(f"{PREFIX}/{plural}/{key}")
        return None if kv is None else dict(json.loads(kv.value))


@pytest.fixture
def writer(etcd: EtcdServer) -> Iterator[EtcdWriter]:
    with etcd.client() as c:
        yield EtcdWriter(c)


def etcd_agent(tmp: Path, etcd: EtcdServer, host: str, prefix: str,
               *extra: str) -> AgentProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    return AgentProcess(tmp, host, prefix, resync=1.0, extra=(
        "--datastore", "etcd", "--etcd-endpoints", etcd.url, "--etcd-prefix", PREFIX,
        "--node", NODE, "--watch-stall-timeout", "5", "--node-claim-ttl", str(CLAIM_TTL),
        *extra))


def enforced_then_stopped(tmp: Path, etcd: EtcdServer, writer: EtcdWriter, trio: Any,
                          prefix: str) -> tuple[NftDatapath, Any]:
    """The trio published and enforced by a first agent, which then stops: the
    datapath and the table it left."""
    publish_trio(writer, trio)
    first = etcd_agent(tmp / "one", etcd, trio.host_netns, prefix).start()
    wait_enforced(first, writer.rvs)
    assert first.stop() == 0
    dp = NftDatapath(netns=trio.host_netns)
    kernel = dp.read()
    assert kernel.ingress
    return dp, kernel


def names(agent: AgentProcess, kind: str) -> set[str]:
    return {i["metadata"]["name"] if kind == "policies" else i["name"]
            for i in agent.call("get", kind=kind)["items"]}


def until_status(agent: AgentProcess, pred: Any, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = agent.call("status")
        if pred(st):
            return st
        time.sleep(0.05)
    raise AssertionError(f"not reached in {timeout} s: {st}")


# ---- (1) enforced from etcd; writes through the agent land in etcd ---------------------------


def test_etcd_objects_are_enforced_and_writes_through_the_agent_land_in_etcd(
        tmp_path: Path, etcd: EtcdServer, writer: EtcdWriter, trio: Any,
        netns_prefix: str) -> None:
    publish_trio(writer, trio)
    agent = etcd_agent(tmp_path, etcd, trio.host_netns, netns_prefix).start()
    try:
        st = wait_enforced(agent, writer.rvs)
        assert st["datastore"]["kind"] == "etcd" and st["datastore"]["synced"]
        assert st["datastore"]["degraded"] is False
        with ProbeServer({a.netns: [TCP80] for a in trio.all}):
            assert probe(trio, [("b", "a"), ("c", "a")]) == {("b", "a"): True,
                                                             ("c", "a"): False}
            # apply: in etcd, and enforced when the call returns.
            out = agent.call("apply", documents=[allow("from-c", "a", "c")])
            assert out["created"] == ["networkpolicy/x/from-c"]
            doc = writer.doc("networkpolicies", "x/from-c")
            assert doc is not None and doc["spec"]["podSelector"] == {
                "matchLabels": {"pod": "a"}}
            assert probe(trio, [("c", "a")]) == {("c", "a"): True}
            # label: the Pod in etcd changes, and c is no longer what from-c admits.
            agent.call("label", kind="endpoint", name="x/c", set={"pod": "z"}, remove=[])
            doc = writer.doc("pods", "x/c")
            assert doc is not None and doc["metadata"]["labels"] == {"pod": "z"}
            assert doc["status"]["podIP"] == trio.c.address4  # the rest is kept
            assert probe(trio, [("c", "a")]) == {("c", "a"): False}
            agent.call("label", kind="endpoint", name="x/c", set={"pod": "c"}, remove=[])
            # delete: gone from etcd, and from the kernel.
            out = agent.call("delete", refs=[{"kind": "NetworkPolicy", "namespace": "x",
                                              "name": "from-c"}])
            assert out["deleted"] == ["networkpolicy/x/from-c"]
            assert writer.doc("networkpolicies", "x/from-c") is None
            assert probe(trio, [("c", "a")]) == {("c", "a"): False}
        # A Pod applied through the agent without spec.nodeName is this host's.
        agent.call("apply", documents=[{
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "d", "namespace": "x", "labels": {"pod": "d"}},
            "status": {"podIP": "10.244.0.99"}}])
        doc = writer.doc("pods", "x/d")
        assert doc is not None and doc["spec"]["nodeName"] == NODE
        # Another writer's change arrives through the watch like any other.
        writer.policy(allow("other", "b", "a"))
        wait_enforced(agent, writer.rvs)
        assert names(agent, "policies") == {"web", "extra", "other"}
        # Re-applying what etcd holds changes nothing (no write, no conflict).
        out = agent.call("apply", documents=[allow("web", "a", "b")])
        assert out["unchanged"] == ["networkpolicy/x/web"]
    finally:
        agent.stop()


def test_an_apply_larger_than_one_etcd_transaction_returns_once_delivered(
        tmp_path: Path, etcd: EtcdServer, host_netns: str, netns_prefix: str) -> None:
    """etcd takes at most 128 operations per transaction: the namespace goes in the
    first, the pods in the next ones. Each resource's watch reaches the last
    transaction that wrote it and no later one, so that is what the call waits for
    (it waited for the last transaction on every watch: the namespaces' never came,
    and the apply failed after SEEN_TIMEOUT)."""
    from stockade.etcd.datastore import SEEN_TIMEOUT

    agent = etcd_agent(tmp_path, etcd, host_netns, netns_prefix).start()
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "big"}},
        *({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"p{i}", "namespace": "big", "labels": {"app": "a"}},
           "spec": {"nodeName": "node-2"},
           "status": {"podIP": f"10.99.{i // 250}.{i % 250 + 1}"}} for i in range(300))]
    try:
        started = time.monotonic()
        out = agent.call("apply", documents=docs)
        assert time.monotonic() - started < SEEN_TIMEOUT / 2
        assert len(out["created"]) == 301
        assert names(agent, "endpoints") == {f"p{i}" for i in range(300)}
    finally:
        agent.stop()


# ---- (2) an etcd outage -------------------------------------------------------------------------


def test_an_etcd_outage_keeps_enforcing_refuses_writes_and_catches_up(
        tmp_path: Path, etcd: EtcdServer, writer: EtcdWriter, trio: Any,
        netns_prefix: str) -> None:
    from tests.support.etcd import free_port

    publish_trio(writer, trio)
    port = free_port()
    agent = etcd_agent(tmp_path, etcd, trio.host_netns, netns_prefix,
                       "--metrics-address", f"127.0.0.1:{port}").start()

    def degraded_metric() -> float:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
        return float(next(line for line in text.splitlines()
                          if line.startswith("stockade_etcd_degraded ")).split()[1])

    try:
        wait_enforced(agent, writer.rvs)
        assert degraded_metric() == 0
        with ProbeServer({a.netns: [TCP80] for a in trio.all}), Watchers(trio) as watch:
            etcd.kill()
            st = until_status(agent, lambda s: s["datastore"]["degraded"])
            assert st["inSync"] and st["ready"]  # enforcing the last state
            assert degraded_metric() == 1
            with pytest.raises(ApiError) as e:
                agent.call("apply", documents=[allow("refused", "a", "c")])
            assert e.value.code == "unavailable"
            assert "etcd is unreachable" in e.value.message, e.value.message
            assert names(agent, "policies") == {"web", "extra"}  # reads from the cache
            assert names(agent, "endpoints") == {"a", "b", "c"}
            out = subprocess.run([*agent.cmd[:3], "status", "--socket", agent.socket],
                                 capture_output=True, text=True, check=False)
            assert out.returncode == 1 and "DEGRADED" in out.stdout, out
            time.sleep(1.5)  # probes and kernel reads go on while etcd is away
            etcd.start()
            until_status(agent, lambda s: not s["datastore"]["degraded"])
            assert degraded_metric() == 0
            writer.delete("networkpolicies", "x/extra")
            wait_enforced(agent, writer.rvs)
            agent.call("apply", documents=[allow("after", "b", "a", 81)])
            time.sleep(0.5)
            watch.wait_rounds(5)
        assert watch.rounds >= 5, watch.rounds
        assert watch.problems == [], watch.problems[:20]
        assert names(agent, "policies") == {"web", "after"}
        res = agent.call("status")["datastore"]["resources"]
        assert all(r["lists"] == 1 for r in res.values()), res  # resumed, no relist
        assert all(r["errors"] >= 1 for r in res.values()), res
    finally:
        agent.stop()


# ---- (3) compaction while the agent is cut off ------------------------------------------------


def test_a_compaction_while_cut_off_relists_without_flushing(
        tmp_path: Path, etcd: EtcdServer, writer: EtcdWriter, trio: Any,
        netns_prefix: str) -> None:
    publish_trio(writer, trio)
    agent = etcd_agent(tmp_path, etcd, trio.host_netns, netns_prefix).start()
    assert agent.proc is not None
    try:
        wait_enforced(agent, writer.rvs)
        with ProbeServer({a.netns: [TCP80] for a in trio.all}), Watchers(trio) as watch:
            # The agent frozen, its watches broken by an etcd restart, changes made and
            # the history compacted before it can resume: its revision is gone.
            os.kill(agent.proc.pid, signal.SIGSTOP)
            try:
                etcd.stop()
                etcd.start()
                writer.delete("networkpolicies", "x/extra")
                writer.pod("x", "c", {"pod": "c", "moved": "yes"},
                           [trio.c.address4, trio.c.address6])
                writer.policy(allow("later", "b", "c"))
                writer.namespace("x", {"team": "t"})
                etcd.compact()
            finally:
                os.kill(agent.proc.pid, signal.SIGCONT)
            res = wait_status(agent, lambda r: all(x["lists"] >= 2 for x in r.values()),
                              timeout=30)
            assert all(r["gone"] >= 1 for r in res.values()), res
            wait_enforced(agent, writer.rvs)
            time.sleep(1.0)  # probes and kernel reads go on after the relist
            watch.wait_rounds(5)
        assert watch.rounds >= 5, watch.rounds
        assert watch.problems == [], watch.problems[:20]
        assert names(agent, "policies") == {"web", "later"}  # the deletion is not lost
        labels = {e["name"]: e["labels"] for e in agent.call("get", kind="endpoints")["items"]}
        assert labels["c"] == {"pod": "c", "moved": "yes"}
        ns = agent.call("get", kind="namespaces")["items"]
        assert [n["labels"].get("team") for n in ns if n["name"] == "x"] == ["t"]
        assert "relisted" in agent.logs()
    finally:
        agent.stop()


# ---- (4) restarts adopt --------------------------------------------------------------------


def test_a_restarted_agent_adopts_and_applies_only_what_changed_while_it_was_down(
        tmp_path: Path, etcd: EtcdServer, writer: EtcdWriter, trio: Any,
        netns_prefix: str) -> None:
    dp, kernel = enforced_then_stopped(tmp_path, etcd, writer, trio, netns_prefix)
    # The same etcd: the next agent changes nothing in the kernel.
    second = etcd_agent(tmp_path / "two", etcd, trio.host_netns, netns_prefix).start()
    try:
        wait_enforced(second, writer.rvs)
        assert dp.read() == kernel
        assert 'msg="applied"' not in second.logs().split("first lists")[-1]
    finally:
        assert second.stop() == 0
    # Changes and a compaction while no agent runs: the third applies the difference
    # only, with traffic flowing throughout.
    writer.delete("networkpolicies", "x/extra")
    writer.policy(allow("later", "b", "c"))
    etcd.compact()
    with ProbeServer({a.netns: [TCP80] for a in trio.all}), Watchers(trio) as watch:
        third = etcd_agent(tmp_path / "three", etcd, trio.host_netns, netns_prefix).start()
        try:
            wait_enforced(third, writer.rvs)
            time.sleep(1.0)
            assert names(third, "policies") == {"web", "later"}
            watch.wait_rounds(3)
        finally:
            third.stop()
    assert watch.rounds >= 3, watch.rounds
    assert watch.problems == [], watch.problems[:20]
    after = dp.read()
    assert after.ingress[trio.a.address4] == kernel.ingress[trio.a.address4]


# ---- (5) two hosts' agents writing at once ------------------------------------------------------


def test_two_agents_writing_one_object_at_once_lose_no_update(
        tmp_path: Path, etcd: EtcdServer, writer: EtcdWriter, trio: Any,
        netns_prefix: str) -> None:
    """Each label call is a read-modify-write of one Pod: without the comparison on the
    mod revision, concurrent calls through two agents would overwrite each other's
    labels. Every call must succeed (a conflict is retried on the newer state) and
    every label must be there at the end, in etcd and in both agents."""
    from stockade.net.namespace import create_netns

    publish_trio(writer, trio)
    # The trio's addresses are in the pool: node-2 believes node-1's Pods in its block.
    writer.c.put(f"{PREFIX}/ipam/blocks/10.244.0.0-26", json.dumps({"host": NODE}))
    other_host = f"{netns_prefix}-h2"
    create_netns(other_host)  # removed with the test's namespaces
    one = etcd_agent(tmp_path / "one", etcd, trio.host_netns, netns_prefix)
    two = AgentProcess(tmp_path / "two", other_host, netns_prefix, resync=1.0, extra=(
        "--datastore", "etcd", "--etcd-endpoints", etcd.url, "--node", "node-2"))
    (tmp_path / "two").mkdir()
    try:
        one.start()
        two.start()
        wait_enforced(one, writer.rvs)
        wait_enforced(two, writer.rvs)
        errors: list[str] = []

        def label(agent: AgentProcess, n: int) -> None:
            try:
                agent.call("label", kind="endpoint", name="x/b", set={f"k{n}": "v"},
                           remove=[])
            except Exception as e:
                errors.append(f"{n}: {e}")

        import threading

        threads = [threading.Thread(target=label, args=(one if n % 2 else two, n))
                   for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        want = {"pod": "b", **{f"k{n}": "v" for n in range(16)}}
        doc = writer.doc("pods", "x/b")
        assert doc is not None and doc["metadata"]["labels"] == want
        for agent in (one, two):
            until_status(agent, lambda s: True)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                got = {e["name"]: e for e in agent.call("get", kind="endpoints")["items"]}
                if got["b"]["labels"] == want:
                    break
                time.sleep(0.05)
            assert got["b"]["labels"] == want
        # node-2's agent knows node-1's pods as peers only.
        got = {e["name"]: e for e in two.call("get", kind="endpoints")["items"]}
        assert all(e.get("remote") for e in got.values()), got
        conflicts = sum(a.call("status")["datastore"]["conflicts"] for a in (one, two))
        assert conflicts >= 1  # they did race, and the comparison caught it
    finally:
        one.stop()
        two.stop()


# ---- (6) several hosts: the conformance corpus across three ----------------------------------


class SpreadPods:
    """A case's pods spread over the hosts (by a hash of the key: a pod stays on its
    host from case to case), probed with real packets from each pod's own namespace;
    the probe servers run in every pod."""

    def __init__(self, hosts: Hosts, timeout: float = 1.0) -> None:
        from stockade.net.plumber import Attachment

        self.hosts = hosts
        self.timeout = timeout
        self.attached: dict[str, tuple[str, Attachment]] = {}
        self.server: ProbeServer | None = None
        self.bindings: dict[str | None, tuple[Any, ...]] = {}
        self.changed = False  # a namespace was made again: its servers too

    def place(self, case: Any) -> dict[str, str]:
        import zlib

        names = self.hosts.names
        return {ep.key: names[zlib.crc32(ep.key.encode()) % len(names)]
                for ep in case.cluster.endpoints}

    def attach(self, case: Any) -> dict[str, str]:
        import ipaddress

        from stockade.conformance.kernel import on_link_prefix
        from stockade.net.plumber import EndpointSpec

        placement = self.place(case)
        prefixes = on_link_prefix(ip for ep in case.cluster.endpoints for ip in ep.ips)
        for ep in case.cluster.endpoints:
            v4 = [ip for ip in ep.ips if ipaddress.ip_address(ip).version == 4]
            v6 = [ip for ip in ep.ips if ipaddress.ip_address(ip).version == 6]
            spec = EndpointSpec(ep.key, f"{v4[0]}/{prefixes[4]}",
                                f"{v6[0]}/{prefixes[6]}" if v6 else None)
            host = placement[ep.key]
            have = self.attached.get(ep.key)
            if have is not None and (have[0] != host or have[1].ipv4 != spec.ipv4
                                     or have[1].ipv6 != spec.ipv6):
                self._detach(ep.key)
                have = None
            if have is None:
                att = self.hosts.plumbers[host].ensure_endpoint(spec)
                self.attached[ep.key] = (host, att)
                self.changed = True
                self.hosts.route(v4[0], host)
        for key in set(self.attached) - set(placement):
            self._detach(key)
            self.changed = True
        if self.changed:
            # An address may have moved to another host: a gratuitous ARP reaches only
            # the new host's bridge, so every neighbour cache forgets it here.
            for ns in [*(att.netns for _, att in self.attached.values()),
                       *self.hosts.netns.values()]:
                subprocess.run(["ip", "-n", ns, "neigh", "flush", "all"],
                               capture_output=True, check=False)
        return placement

    def _detach(self, key: str) -> None:
        host, att = self.attached.pop(key)
        self.hosts.plumbers[host].remove_endpoint(key)
        self.hosts.route(att.address4, None)

    def probe(self, case: Any) -> Any:
        from stockade.probe.client import Probe, run_probes
        from stockade.probe.protocol import Port, Protocol

        probes: list[Any] = []
        keys: list[tuple[int, str, str]] = []
        for gi, group in enumerate(case.probes):
            for src, dst in case.pairs():
                port = group.port
                if isinstance(port, str):
                    port = dst.resolve_port(port, group.protocol)
                probes.append(Probe(src.key, self.attached[src.key][1].netns, dst.key,
                                    self.attached[dst.key][1].address4,
                                    Port(port, Protocol(group.protocol))))
                keys.append((gi, src.key, dst.key))
        bindings: dict[str | None, tuple[Any, ...]] = {
            att.netns: tuple(sorted({p.port for p in probes}))
            for _, att in self.attached.values()}
        if self.server is None or bindings != self.bindings or self.changed:
            self.changed = False
            if self.server is not None:
                self.server.stop()
            self.server = ProbeServer(bindings).start()
            self.bindings = bindings
        verdicts = run_probes(probes, timeout=self.timeout)
        return {k: v.allowed for k, v in zip(keys, verdicts, strict=True)}

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


class EtcdCases:
    """A CaseBackend: each case's objects written to etcd (what changed only), its pods
    spread over the hosts (``spec.nodeName`` each pod's host), every host's agent
    enforcing them, real packets across hosts judging."""

    def __init__(self, writer: EtcdWriter, agents: Sequence[AgentProcess],
                 pods: SpreadPods) -> None:
        self.writer = writer
        self.agents = agents
        self.pods = pods
        self.written: dict[str, tuple[Any, ...]] = {}
        self.policies: set[str] = set()

    def judge(self, case: Any) -> Any:
        from stockade.load import read_text
        from stockade.model.parse import parse_documents

        placement = self.pods.attach(case)
        w = self.writer
        w.rvs.clear()
        raw = parse_documents(read_text(case.source), case.source)[0].get("policies") or []
        manifests = {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p for p in raw}
        for key in sorted(self.policies - set(manifests)):
            w.delete("networkpolicies", key)
        pods = {ep.key: ep for ep in case.cluster.endpoints}
        for key in sorted(set(self.written) - set(pods)):
            w.delete("pods", key)
            del self.written[key]
        for ns in case.cluster.namespaces:
            w.namespace(ns.name, dict(ns.labels))
        for key, ep in sorted(pods.items()):
            ports = [{**({"name": p.name} if p.name else {}), "containerPort": p.port,
                      "protocol": p.protocol} for p in ep.ports]
            shape = (tuple(sorted(ep.labels.items())), ep.ips, tuple(map(str, ports)),
                     placement[key])
            if self.written.get(key) == shape:
                continue
            w._put("pods", key, {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": ep.name, "namespace": ep.namespace,
                             "labels": dict(ep.labels)},
                "spec": {"nodeName": placement[key],
                         "containers": [{"name": "main", "ports": ports}]},
                "status": {"phase": "Running", "podIP": ep.ips[0],
                           "podIPs": [{"ip": ip} for ip in ep.ips]}})
            self.written[key] = shape
        for manifest in manifests.values():
            w.policy(manifest)
        self.policies = set(manifests)
        for agent in self.agents:
            wait_enforced(agent, w.rvs)
        self.pods.hosts.flush_conntrack()
        return self.pods.probe(case)


def test_the_conformance_corpus_across_three_hosts(
        tmp_path: Path, etcd: EtcdServer, writer: EtcdWriter, netns_prefix: str) -> None:
    from tests.support import shared

    from stockade.cli.conformance import load_cases
    from stockade.conformance.runner import check_case

    cases = load_cases([str(shared("conformance"))])
    assert len(cases) > 40
    hosts = Hosts(netns_prefix, 3)
    # The corpus gives the pods' addresses (as an IPAM other than stockade's would), some
    # in the default pool; the pool is elsewhere, or the blocks would say whose they are.
    agents = [AgentProcess(tmp_path / host, hosts.netns[host], netns_prefix, resync=1.0,
                           extra=("--datastore", "etcd", "--etcd-endpoints", etcd.url,
                                  "--node", host, "--watch-stall-timeout", "5",
                                  "--subnet", "10.99.0.0/16"))
              for host in hosts.names]
    pods = SpreadPods(hosts)
    failed: list[str] = []
    started = time.monotonic()
    try:
        for agent in agents:
            agent.log.parent.mkdir(parents=True, exist_ok=True)
            agent.start()
        backend = EtcdCases(writer, agents, pods)
        for case in cases:
            result = check_case(case, backend)
            if not result.passed:
                failed += [result.error] if result.error else [
                    m.render(case.id) for m in result.mismatches]
        statuses = [a.call("status") for a in agents]
    finally:
        pods.close()
        for agent in agents:
            agent.stop()
    assert failed == [], "\n".join(failed[:40])
    for st in statuses:
        for plural, r in st["datastore"]["resources"].items():
            assert r["lists"] == 1 and r["gone"] == 0, (plural, r)
    print(f"{len(cases)} cases across 3 hosts in {time.monotonic() - started:.1f} s")


# ---- (7) several hosts, the agents plumbing and routing themselves --------------------------


SERVER = str(Path(__file__).resolve().parents[2] / "examples" / "agent" / "server.py")


def _connect(src: Mapping[str, Any], dst: Mapping[str, Any], port: int = 8080) -> bool:
    from stockade.probe.client import Probe, run_probes
    from stockade.probe.protocol import Port

    a, b = src["endpoint"], dst["endpoint"]
    probe = Probe(a["name"], os.path.basename(a["netns"]), b["name"], b["ips"][0], Port(port))
    return bool(run_probes([probe], timeout=1.0)[0].allowed)


def _until(pred: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_containers_on_two_hosts_get_blocks_routes_and_policy_across_hosts(
        tmp_path: Path, etcd: EtcdServer, writer: EtcdWriter, netns_prefix: str) -> None:
    """`stockade run` on two hosts: each host's addresses come from blocks it claimed
    in etcd, each agent publishes its containers (the other host's peers) and routes
    the other host's blocks; policy is enforced across hosts, ingress at the
    destination and egress at the source."""
    from stockade.etcd.ipam import Blocks

    hosts = Hosts(netns_prefix, 2, plumb=False)
    agents = {h: AgentProcess(tmp_path / h, hosts.netns[h], netns_prefix, resync=1.0, extra=(
        "--datastore", "etcd", "--etcd-endpoints", etcd.url, "--node", h,
        "--host-address", hosts.address(h))) for h in hosts.names}
    one, two = agents["host-1"], agents["host-2"]
    try:
        for h, agent in agents.items():
            (tmp_path / h).mkdir()
            agent.start()

        def serve(agent: AgentProcess, name: str) -> dict[str, Any]:
            out: dict[str, Any] = agent.call(
                "run", namespace="x", name=name, labels={"app": name},
                command=[sys.executable, SERVER, "8080"],
                ports=[{"name": "http", "port": 8080, "protocol": "TCP"}])
            log = Path(out["log"])
            _until(lambda: "listening" in log.read_text(), what=f"{name} listening")
            return out

        a, b, c = serve(one, "a"), serve(two, "b"), serve(two, "c")
        # Addresses from blocks each host claimed: never one address twice.
        owned = Blocks(writer.c, PREFIX, "").owned()
        assert set(owned.values()) == {"host-1", "host-2"}, owned
        import ipaddress

        def host_of(out: Mapping[str, Any]) -> str:
            ip = ipaddress.ip_address(out["endpoint"]["ips"][0])
            return next(h for blk, h in owned.items() if ip in blk)

        assert [host_of(x) for x in (a, b, c)] == ["host-1", "host-2", "host-2"]
        # Each host knows the other's containers as peers, and routes its block.
        for agent, others in ((one, {"b", "c"}), (two, {"a"})):
            _until(lambda agent=agent, others=others: others <= {
                e["name"] for e in agent.call("get", kind="endpoints")["items"]
                if e.get("remote")}, what="the other host's containers")
            _until(lambda agent=agent: agent.call("status")["datastore"]["hosts"]["routes"],
                   what="routes to the other host")
        # No policy: everything reaches everything, across hosts.
        _until(lambda: _connect(b, a) and _connect(a, c), what="traffic across hosts")
        # Ingress at the destination (host-1): only b may reach a.
        two.call("apply", documents=[{
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "a-from-b", "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": {"app": "a"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}],
                                  "ports": [{"port": "http"}]}]}}])
        wait_enforced(one, {"networkpolicies": two.call("status")["datastore"]["revision"]})
        assert _connect(b, a) and not _connect(c, a)
        # Egress at the source (host-2): b may send nothing.
        one.call("apply", documents=[{
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "b-silent", "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": {"app": "b"}},
                     "policyTypes": ["Egress"]}}])
        wait_enforced(two, {"networkpolicies": one.call("status")["datastore"]["revision"]})
        assert not _connect(b, a) and _connect(a, c)
        # A container that goes: its Pod leaves etcd and the other host's peers.
        one.call("rm", key="x/a", grace=0.5)
        _until(lambda: writer.doc("pods", "x/a") is None, what="x/a unpublished")
        _until(lambda: "a" not in {e["name"] for e in two.call("get", kind="endpoints")[
            "items"]}, what="x/a gone from host-2")
    finally:
        for agent in agents.values():
            with contextlib.suppress(Exception):
                for item in agent.call("ps")["items"]:
                    agent.call("rm", key=item["key"], grace=0.5)
            agent.stop()


# ---- (8) several hosts: failures, with probes across hosts throughout -----------------------


class CrossProbes:
    """b->a allowed and c->a denied, probed across hosts in the background."""

    def __init__(self, atts: Mapping[str, Any]) -> None:
        import threading

        self.atts = atts
        self.problems: list[str] = []
        self.rounds = 0
        self.expect = {("b", "a"): True, ("c", "a"): False}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> CrossProbes:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        from stockade.probe.client import Probe, run_probes

        while not self._stop.is_set():
            pairs = list(self.expect)
            got = run_probes([Probe(s, self.atts[s].netns, d, self.atts[d].address4, TCP80)
                              for s, d in pairs], timeout=0.5)
            self.rounds += 1
            for (s, d), v in zip(pairs, got, strict=True):
                if v.allowed != self.expect[(s, d)]:
                    self.problems.append(f"{s}->{d}: {v.allowed} (round {self.rounds})")


def test_across_hosts_agent_kill_etcd_restart_and_compaction_keep_enforcement(
        tmp_path: Path, etcd: EtcdServer, writer: EtcdWriter, netns_prefix: str) -> None:
    from stockade.net.plumber import EndpointSpec

    hosts = Hosts(netns_prefix, 3)
    placement = {"a": "host-1", "b": "host-2", "c": "host-3"}
    atts = {}
    writer.namespace("x", {})
    for i, (name, host) in enumerate(sorted(placement.items())):
        ip = f"10.250.0.{10 + i}"
        atts[name] = hosts.plumbers[host].ensure_endpoint(EndpointSpec(f"x/{name}",
                                                                       f"{ip}/24", None))
        hosts.route(ip, host)
        writer.pod("x", name, {"pod": name}, [ip], node=host)
    writer.policy(allow("web", "a", "b"))
    writer.policy(allow("extra", "c", "a", 81))

    def agent_of(host: str, tag: str = "") -> AgentProcess:
        (tmp_path / f"{host}{tag}").mkdir()
        return AgentProcess(tmp_path / f"{host}{tag}", hosts.netns[host], netns_prefix,
                            resync=1.0, extra=(
                                "--datastore", "etcd", "--etcd-endpoints", etcd.url,
                                "--node", host, "--watch-stall-timeout", "5",
                                "--node-claim-ttl", str(CLAIM_TTL)))

    agents = {h: agent_of(h) for h in hosts.names}
    try:
        for agent in agents.values():
            agent.start()
        for agent in agents.values():
            wait_enforced(agent, writer.rvs)
        with ProbeServer({att.netns: [TCP80] for att in atts.values()}), \
                CrossProbes(atts) as probes:
            time.sleep(0.5)
            # (1) The destination's agent killed: its kernel keeps enforcing; a new
            # agent adopts its table and converges, with a change made meanwhile.
            agents["host-1"].kill9()
            writer.policy(allow("while-dead", "b", "c", 82))
            time.sleep(1.0)
            agents["host-1"] = agent_of("host-1", "-again").start()
            for agent in agents.values():
                wait_enforced(agent, writer.rvs)
            # (2) etcd stopped and started: every host degraded, then caught up.
            etcd.stop()
            for agent in agents.values():
                until_status(agent, lambda s: s["datastore"]["degraded"])
            time.sleep(1.0)
            etcd.start()
            for agent in agents.values():
                until_status(agent, lambda s: not s["datastore"]["degraded"])
            writer.delete("networkpolicies", "x/extra")
            for agent in agents.values():
                wait_enforced(agent, writer.rvs)
            # (3) Compaction while the source's agent is cut off: it relists.
            src = agents["host-2"]
            assert src.proc is not None
            os.kill(src.proc.pid, signal.SIGSTOP)
            try:
                etcd.stop()
                etcd.start()
                writer.delete("networkpolicies", "x/while-dead")
                for i in range(3):  # history moves on past the agent's revision
                    writer.c.put(f"/elsewhere/{i}", "x")
                etcd.compact()
            finally:
                os.kill(src.proc.pid, signal.SIGCONT)
            wait_status(src, lambda r: all(x["lists"] >= 2 for x in r.values()), timeout=30)
            for agent in agents.values():
                wait_enforced(agent, writer.rvs)
            time.sleep(0.5)
        assert probes.rounds >= 10, probes.rounds
        assert probes.problems == [], probes.problems[:20]
        # Converged: every host holds the same policies, and a new one is enforced
        # across hosts at once.
        for agent in agents.values():
            assert names(agent, "policies") == {"web"}
        writer.policy(allow("c-too", "a", "c"))
        for agent in agents.values():
            wait_enforced(agent, writer.rvs)
        from stockade.probe.client import Probe, run_probes

        with ProbeServer({att.netns: [TCP80] for att in atts.values()}):
            got = run_probes([Probe("c", atts["c"].netns, "a", atts["a"].address4, TCP80)],
                             timeout=1.0)
            assert got[0].allowed
    finally:
        for agent in agents.values():
            agent.stop()


# ---- (9) TLS with client certificates ----------------------------------------------------------


def test_an_agent_talks_to_etcd_over_tls_with_a_client_certificate(
        tmp_path: Path, host_netns: str, netns_prefix: str) -> None:
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    with EtcdServer(tmp_path / "etcd", tls=True) as etcd, etcd.client() as c:
        assert etcd.tls is not None
        tls = etcd.tls
        (tmp_path / "agent").mkdir()
        agent = AgentProcess(tmp_path / "agent", host_netns, netns_prefix, extra=(
            "--datastore", "etcd", "--etcd-endpoints", etcd.url, "--node", NODE,
            "--etcd-cacert", tls.ca, "--etcd-cert", tls.client_cert,
            "--etcd-key", tls.client_key)).start()
        try:
            agent.call("apply", documents=[allow("web", "a", "b")])
            assert c.get(f"{PREFIX}/networkpolicies/x/web") is not None
            assert agent.call("status")["datastore"]["server"].startswith("https://")
        finally:
            agent.stop()


# ---- (10) an agent starting while etcd is away ---------------------------------------------------


def test_an_agent_starting_without_etcd_keeps_the_kernel_until_the_first_lists(
        tmp_path: Path, etcd: EtcdServer, writer: EtcdWriter, trio: Any,
        netns_prefix: str) -> None:
    dp, kernel = enforced_then_stopped(tmp_path, etcd, writer, trio, netns_prefix)
    etcd.stop()
    second = etcd_agent(tmp_path / "two", etcd, trio.host_netns, netns_prefix)
    with open(second.log, "ab") as out:
        second.proc = subprocess.Popen(second.cmd, stdout=out, stderr=out)
    try:
        # The socket may answer before the first attempt on etcd has failed: until then
        # the datastore is neither synced nor yet known to be degraded.
        deadline = time.monotonic() + 20
        st: dict[str, Any] = {}
        while time.monotonic() < deadline and not st.get("datastore", {}).get("degraded"):
            with contextlib.suppress(Exception):
                st = second.call("status")
            assert not st or (not st["inSync"] and not st["ready"]), st
            time.sleep(0.05)
        assert st and not st["inSync"] and not st["ready"], st
        assert st["datastore"]["synced"] is False and st["datastore"]["degraded"] is True
        with pytest.raises(ApiError) as e:
            second.call("apply", documents=[allow("early", "a", "c")])
        assert e.value.code == "unavailable" and "not in sync with etcd" in e.value.message
        with ProbeServer({a.netns: [TCP80] for a in trio.all}):
            assert probe(trio, [("b", "a"), ("c", "a")]) == {("b", "a"): True,
                                                             ("c", "a"): False}
        assert dp.read() == kernel  # kept as the last agent left it
        etcd.start()
        wait_enforced(second, writer.rvs)
        assert dp.read() == kernel  # adopted: the same state, nothing changed
    finally:
        second.stop()


# ---- (9) address blocks: the agent's pool stays etcd's after a DEL and a restore --------------


def _cni_add(agent: AgentProcess, cid: str) -> str:
    out = agent.call("cni.add", network="blocks", containerID=cid, ifname="eth0",
                     allocate=True, sync=True, labels={"app": "blocks"},
                     endpoint={"namespace": "x", "name": cid})
    return str(out["address"]).split("/")[0]


def _cni_del(agent: AgentProcess, cid: str) -> None:
    agent.call("cni.del", network="blocks", containerID=cid, ifname="eth0", sync=True)


def _block_of(writer: EtcdWriter, address: str) -> tuple[str, str]:
    import ipaddress

    from stockade.etcd.ipam import Blocks

    owned = Blocks(writer.c, PREFIX, "").owned()
    ip = ipaddress.ip_address(address)
    return next(((str(b), h) for b, h in owned.items() if ip in b), ("", ""))


def test_a_host_keeps_claiming_blocks_after_a_del_and_a_restore(
        tmp_path: Path, etcd: EtcdServer, writer: EtcdWriter, host_netns: str,
        netns_prefix: str) -> None:
    """The agent's address pool is the block pool of etcd (BlockIpam) for its whole life:
    a CNI DEL releases an address on a copy of the pool that the agent then keeps, and a
    snapshot restore replaces the pool's allocations. Both once left an agent whose pool
    claimed no block (every ADD refused once its blocks were full) or that handed out
    addresses from the whole pool, another host's blocks included."""
    # Another host owns the pool's first block, as in a cluster.
    writer.c.put(f"{PREFIX}/ipam/blocks/10.244.0.0-26", json.dumps({"host": "other"}))
    agent = etcd_agent(tmp_path, etcd, host_netns, netns_prefix).start()
    try:
        first = _cni_add(agent, "c0")
        assert _block_of(writer, first) == ("10.244.0.64/26", NODE)
        # A DEL (the pool is changed on a copy the agent keeps), then the block filled.
        _cni_del(agent, "c0")
        got = [_cni_add(agent, f"c{i}") for i in range(1, 66)]
        assert len(set(got)) == 65
        blocks = {_block_of(writer, a) for a in got}
        assert blocks == {("10.244.0.64/26", NODE), ("10.244.0.128/26", NODE)}, blocks
        # A snapshot restored: the same blocks, claimed in etcd, and no address of another's.
        snap = agent.call("snapshot.save")["snapshot"]
        agent.call("snapshot.restore", snapshot=snap)
        after = [_cni_add(agent, f"r{i}") for i in range(64)]
        owners = {_block_of(writer, a) for a in after}
        assert owners <= {("10.244.0.128/26", NODE), ("10.244.0.192/26", NODE)}, owners
        assert ("10.244.0.192/26", NODE) in owners  # claimed when the others were full
        assert not set(after) & set(got)
    finally:
        agent.stop()


def test_a_published_pod_of_an_endpoint_gone_here_is_no_endpoint_of_etcd(
        tmp_path: Path, etcd: EtcdServer, writer: EtcdWriter, host_netns: str,
        netns_prefix: str) -> None:
    """The Pod an agent publishes for its CNI endpoint can come back on its own watch after
    a DEL removed the endpoint (the publisher put it just before). It is this host's
    local store's to say, never an endpoint of etcd: it once stood as one, holding the
    freed address, and the next ADD, given that address, was refused ("held by two
    endpoints"). The late delivery is made here by putting the Pod back by hand."""
    agent = etcd_agent(tmp_path, etcd, host_netns, netns_prefix).start()
    try:
        first = _cni_add(agent, "c0")
        _until(lambda: writer.doc("pods", "x/c0") is not None, what="x/c0 published")
        published = writer.doc("pods", "x/c0")
        assert published is not None
        assert published["metadata"]["annotations"] == {"stockade.io/owner": "cni"}
        _cni_del(agent, "c0")
        _until(lambda: writer.doc("pods", "x/c0") is None, what="x/c0 unpublished")
        writer._put("pods", "x/c0", published)  # the publisher's put, delivered late
        until_status(agent, lambda s: s["datastore"]["revision"] >= writer.rvs["pods"])
        assert "x/c0" not in {f"{e['namespace']}/{e['name']}"
                              for e in agent.call("get", kind="endpoints")["items"]}
        # The freed address is the next ADD's, and the stray Pod goes from etcd.
        assert _cni_add(agent, "c1") == first
        _until(lambda: writer.doc("pods", "x/c0") is None, what="the stray x/c0 deleted")
        _until(lambda: writer.doc("pods", "x/c1") is not None, what="x/c1 published")
    finally:
        agent.stop()


def test_a_gone_hosts_pod_holding_an_address_of_this_hosts_block_gives_it_up(
        tmp_path: Path, etcd: EtcdServer, writer: EtcdWriter, host_netns: str,
        netns_prefix: str) -> None:
    """A host is gone and its blocks reclaimed; a Pod it published still shows an
    address of a block this host then claims. The Pod is not believed (its address is
    in no block of its host's), and this host's attachment takes the address: the ADD
    given it succeeds, and the Pod waits (said in `status`). Before, every ADD given it
    was refused ("held by two endpoints"), and the pool offered it again each time: no
    container started on the host. Reclaiming the host deletes its published Pods too."""
    from stockade.etcd.ipam import reclaim

    writer.c.put(f"{PREFIX}/hosts/gone", json.dumps({"address": "192.0.2.9"}))
    writer.pod("x", "stale", {"app": "db"}, ["10.244.0.3"], node="gone")
    stale = writer.doc("pods", "x/stale")
    assert stale is not None
    writer._put("pods", "x/stale", {**stale, "metadata": {
        **stale["metadata"], "annotations": {"stockade.io/owner": "cni"}}})
    writer._put("pods", "x/stale-run", {**stale, "metadata": {
        **stale["metadata"], "name": "stale-run", "annotations": {"stockade.io/owner": "run"}},
        "status": {"podIP": "10.244.0.5", "podIPs": [{"ip": "10.244.0.5"}]}})
    writer.pod("x", "static", {"app": "db"}, ["10.9.0.1"], node="gone")  # not published
    agent = etcd_agent(tmp_path, etcd, host_netns, netns_prefix).start()
    try:
        nowhere = "is in the pool 10.244.0.0/16 but in no block a host holds; the Pod " \
            "is of host 'gone'"
        assert agent.call("status")["datastore"]["waiting"] == {
            "x/stale": f"address 10.244.0.3 {nowhere}",
            "x/stale-run": f"address 10.244.0.5 {nowhere}"}
        assert not {"stale", "stale-run"} & names(agent, "endpoints")
        got = [_cni_add(agent, f"c{i}") for i in range(3)]
        assert got == ["10.244.0.2", "10.244.0.3", "10.244.0.4"], got
        # `stockade run` takes its address the same way.
        ran = agent.call("run", namespace="x", name="r", labels={"app": "r"},
                         command=[sys.executable, "-c", "import time; time.sleep(60)"])
        assert ran["endpoint"]["ips"] == ["10.244.0.5"], ran
        assert not {"stale", "stale-run"} & names(agent, "endpoints")
        mine = f"in block 10.244.0.0/26 of host {NODE!r}; the Pod is of host 'gone'"
        until_status(agent, lambda s: s["datastore"]["waiting"] == {
            "x/stale": f"address 10.244.0.3 is {mine}",
            "x/stale-run": f"address 10.244.0.5 is {mine}"})
        # The host reclaimed: its published Pod goes from etcd, and waits no more; a Pod
        # of it that an agent did not publish stays.
        reclaim(writer.c, PREFIX, "gone")
        assert writer.doc("pods", "x/stale") is None
        assert writer.doc("pods", "x/stale-run") is None
        assert writer.doc("pods", "x/static") is not None
        until_status(agent, lambda s: s["datastore"]["waiting"] == {})
        assert "static" in names(agent, "endpoints")
        agent.call("rm", key="x/r", grace=0.5)
    finally:
        agent.stop()


def test_a_pod_of_another_host_is_believed_only_in_that_hosts_blocks(
        tmp_path: Path, etcd: EtcdServer, writer: EtcdWriter, host_netns: str,
        netns_prefix: str) -> None:
    """An address of the pool is handed out only in the block of the host that holds
    it: a Pod of another host showing one of another host's block (or of no host's,
    or with no host at all) is not believed here, or traffic from that address would be
    judged by its labels. It waits, said in `status`, and is examined again the moment
    the blocks change: a block that moves to its host makes it an endpoint, one that
    leaves its host makes it wait (the retry of waiting Pods alone would never see
    that). Addresses outside the pool are not the blocks' to say."""
    writer.namespace("x", {})
    block = f"{PREFIX}/ipam/blocks"
    writer.c.put(f"{block}/10.244.1.0-26", json.dumps({"host": "h2"}))
    writer.c.put(f"{block}/10.244.3.0-26", json.dumps({}))  # a record naming no host
    writer.pod("x", "own", {"app": "db"}, ["10.244.1.5"], node="h2")
    writer.pod("x", "fake", {"app": "web"}, ["10.244.1.6"], node="h1")
    writer.pod("x", "nowhere", {"app": "web"}, ["10.244.2.7"], node="h1")
    writer.pod("x", "nonode", {"app": "web"}, ["10.244.1.8"], node="")
    writer.pod("x", "lost", {"app": "web"}, ["10.244.3.9"], node="")
    writer.pod("x", "outside", {"app": "web"}, ["192.168.77.7"], node="h1")
    agent = etcd_agent(tmp_path, etcd, host_netns, netns_prefix).start()

    def waiting() -> dict[str, str]:
        return dict(agent.call("status")["datastore"]["waiting"])

    try:
        assert waiting() == {
            "x/fake": "address 10.244.1.6 is in block 10.244.1.0/26 of host 'h2'; the Pod "
                      "is of host 'h1'",
            "x/nowhere": "address 10.244.2.7 is in the pool 10.244.0.0/16 but in no block "
                         "a host holds; the Pod is of host 'h1'",
            "x/nonode": "address 10.244.1.8 is in block 10.244.1.0/26 of host 'h2'; the "
                        "Pod is of no host (spec.nodeName is empty)",
            "x/lost": "address 10.244.3.9 is in the pool 10.244.0.0/16 but in no block a "
                      "host holds; the Pod is of no host (spec.nodeName is empty)"}, waiting()
        assert names(agent, "endpoints") == {"own", "outside"}
        # h1 claims 10.244.2.0/26: its Pod there is believed.
        writer.c.put(f"{block}/10.244.2.0-26", json.dumps({"host": "h1"}))
        until_status(agent, lambda s: "x/nowhere" not in s["datastore"]["waiting"])
        assert names(agent, "endpoints") == {"own", "outside", "nowhere"}
        # 10.244.1.0/26 moves to h1: h2's Pod there waits, h1's is believed.
        writer.c.put(f"{block}/10.244.1.0-26", json.dumps({"host": "h1"}))
        until_status(agent, lambda s: set(s["datastore"]["waiting"]) == {
            "x/own", "x/nonode", "x/lost"})
        assert names(agent, "endpoints") == {"fake", "outside", "nowhere"}
        # 10.244.2.0/26 given back: h1's Pod there waits again.
        writer.c.delete(f"{block}/10.244.2.0-26")
        until_status(agent, lambda s: "x/nowhere" in s["datastore"]["waiting"])
        assert names(agent, "endpoints") == {"fake", "outside"}
    finally:
        agent.stop()


def test_a_second_agent_of_one_node_name_is_refused_and_a_restart_takes_it_back(
        tmp_path: Path, etcd: EtcdServer, writer: EtcdWriter, host_netns: str,
        netns_prefix: str) -> None:
    """Cloned machines share a host name, the node name's default. A second agent of one
    name would hand out the same blocks' addresses on another host, overwrite the host's
    address and delete the first's Pods: it waits for the name's claim to run out (a
    killed agent's does), then stops, naming the first. The first killed and started
    again takes its name back at once; another agent, once the claim has run out; a
    clean stop gives the name up."""
    from stockade.net.namespace import create_netns

    one = etcd_agent(tmp_path / "one", etcd, host_netns, netns_prefix).start()
    other_host = f"{netns_prefix}-h2"
    create_netns(other_host)  # removed with the test's namespaces
    two = AgentProcess(tmp_path / "two", other_host, netns_prefix, resync=1.0, extra=(
        "--datastore", "etcd", "--etcd-endpoints", etcd.url, "--etcd-prefix", PREFIX,
        "--node", NODE, "--watch-stall-timeout", "5", "--node-claim-ttl", str(CLAIM_TTL)))
    (tmp_path / "two").mkdir()
    try:
        first = _cni_add(one, "c0")
        _until(lambda: writer.doc("pods", "x/c0") is not None, what="x/c0 published")
        claim = writer.doc("nodes", NODE)
        assert claim is not None and claim["pid"] == one.proc.pid  # type: ignore[union-attr]
        t0 = time.monotonic()
        refused = subprocess.run(two.cmd, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2, refused.stderr
        assert time.monotonic() - t0 >= CLAIM_TTL  # it waited: the claim was kept alive
        assert f"node name '{NODE}' is held in etcd by another agent" in refused.stderr
        assert f"pid {one.proc.pid}" in refused.stderr  # type: ignore[union-attr]
        assert writer.doc("nodes", NODE) == claim
        assert writer.doc("pods", "x/c0") is not None  # the first's Pod stays
        assert _cni_add(one, "c1") != first
        # Killed: started again from its state, it holds its name at once.
        one.kill9()
        one.start()
        assert one.call("status")["datastore"]["node"]["held"] is True
        again = writer.doc("nodes", NODE)
        assert again is not None and again["instance"] == claim["instance"]
        assert again["pid"] == one.proc.pid  # type: ignore[union-attr]
        # Killed, and another agent of the name started: it gets the name once the
        # killed one's claim has run out.
        one.kill9()
        two.start(timeout=CLAIM_TTL + 30)
        assert two.call("status")["datastore"]["node"]["held"] is True
        held = writer.doc("nodes", NODE)
        assert held is not None and held["pid"] == two.proc.pid  # type: ignore[union-attr]
        # A clean stop gives the name up at once.
        assert two.stop() == 0
        assert writer.doc("nodes", NODE) is None
        # A claim put by hand, with no lease, never runs out: refused at once, and told.
        writer.c.put(f"{PREFIX}/nodes/{NODE}", json.dumps({"hostname": "elsewhere"}))
        t0 = time.monotonic()
        refused = subprocess.run(two.cmd, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2, refused.stderr
        assert time.monotonic() - t0 < CLAIM_TTL
        assert f"etcdctl del {PREFIX}/nodes/{NODE}" in refused.stderr, refused.stderr
    finally:
        one.stop()
        two.stop()


def test_an_agent_whose_name_another_took_writes_nothing_for_the_node(
        tmp_path: Path, etcd: EtcdServer, writer: EtcdWriter, host_netns: str,
        netns_prefix: str) -> None:
    """The agent's lease ran out (etcd away longer than its TTL) and another agent took
    the name meanwhile: this one keeps serving its own containers but publishes and
    deletes no Pod of the node's until the name is its own again."""
    from stockade.etcd.nodes import NodeClaim

    agent = etcd_agent(tmp_path, etcd, host_netns, netns_prefix).start()
    try:
        _cni_add(agent, "c0")
        _until(lambda: writer.doc("pods", "x/c0") is not None, what="x/c0 published")
        kv = writer.c.get(f"{PREFIX}/nodes/{NODE}")
        assert kv is not None and kv.lease
        # As etcd would have it after the lease ran out and another agent claimed the
        # name: the key under the other's lease before the agent's lease is gone (revoked
        # first, the agent could claim the name back in between).
        other = NodeClaim(writer.c, PREFIX, NODE, "f" * 32, ttl=60)
        other.lease = int(writer.c.call("/v3/lease/grant", {"TTL": 60})["ID"])
        other.held = True
        writer.c.txn([], [{"request_put": {
            "key": b64(f"{PREFIX}/nodes/{NODE}"), "value": b64(other._value()),
            "lease": str(other.lease)}}])
        writer.c.call("/v3/lease/revoke", {"ID": str(kv.lease)})
        st = until_status(agent, lambda s: s["datastore"]["node"]["held"] is False
                          and s["datastore"]["node"]["heldBy"] is not None)
        assert st["datastore"]["node"]["heldBy"]["instance"] == "f" * 32
        assert "held in etcd by another agent" in st["datastore"]["node"]["error"]
        out = subprocess.run([*agent.cmd[:3], "status", "--socket", agent.socket],
                             capture_output=True, text=True, check=False)
        assert out.returncode == 1 and "NODE NAME NOT HELD" in out.stdout, out
        _cni_add(agent, "c1")  # served: an address of the host's block, the local store
        _cni_del(agent, "c0")
        time.sleep(2 * CLAIM_TTL)
        assert writer.doc("pods", "x/c1") is None  # not published for a node not its own
        assert writer.doc("pods", "x/c0") is not None  # nor deleted
        other.release()
        until_status(agent, lambda s: s["datastore"]["node"]["held"] is True)
        out = subprocess.run([*agent.cmd[:3], "status", "--socket", agent.socket],
                             capture_output=True, text=True, check=False)
        assert out.returncode == 0 and "NODE NAME" not in out.stdout, out
        _until(lambda: writer.doc("pods", "x/c1") is not None and writer.doc(
            "pods", "x/c0") is None, what="published again once the name is its own")
    finally:
        agent.stop()


def test_a_host_record_that_cannot_be_routed_to_leaves_the_other_routes_be(
        tmp_path: Path, etcd: EtcdServer, writer: EtcdWriter, host_netns: str,
        netns_prefix: str) -> None:
    """Anything may write a host record. One that is no next hop (not an address, this
    host's own) is said in `status` and its blocks left unrouted; a route the kernel
    refuses (a next hop on no link of this host) is said too; every other host's blocks
    are routed all the same. Before, the first route refused ended the round, and the
    blocks after it (in order) were never routed."""
    def ip(*args: str) -> str:
        return subprocess.run(["ip", "-n", host_netns, *args], check=True,
                              capture_output=True, text=True).stdout

    ip("link", "add", "fab0", "type", "veth", "peer", "name", "fab1")  # goes with it
    ip("addr", "add", "192.0.2.1/24", "dev", "fab0")
    ip("link", "set", "fab0", "up")
    ip("link", "set", "fab1", "up")
    for host, address, block in (("bad", "not-an-ip", "10.244.0.128-26"),
                                 ("twin", "192.0.2.1", "10.244.0.192-26"),
                                 ("far", "198.51.100.7", "10.244.1.0-26"),
                                 ("good", "192.0.2.3", "10.244.1.64-26")):
        writer.c.put(f"{PREFIX}/hosts/{host}", json.dumps({"address": address}))
        writer.c.put(f"{PREFIX}/ipam/blocks/{block}", json.dumps({"host": host}))
    agent = etcd_agent(tmp_path, etcd, host_netns, netns_prefix,
                       "--host-address", "192.0.2.1").start()
    try:
        st = until_status(agent, lambda s: s["datastore"]["hosts"]["routes"] == {
            "10.244.1.64/26": "192.0.2.3"} and len(s["datastore"]["hosts"]["unroutable"]) == 2
            and "10.244.1.0/26" in s["datastore"]["hosts"]["error"])
        unroutable = st["datastore"]["hosts"]["unroutable"]
        assert "is not an IP address" in unroutable["bad"], unroutable
        assert "this host's own address" in unroutable["twin"], unroutable
        routes = ip("route", "show")
        assert "10.244.1.64/26 via 192.0.2.3" in routes, routes
        assert "10.244.0.128/26" not in routes and "10.244.0.192/26" not in routes
        # Mended records are routed on the next round.
        writer.c.put(f"{PREFIX}/hosts/bad", json.dumps({"address": "192.0.2.4"}))
        writer.c.put(f"{PREFIX}/hosts/far", json.dumps({"address": "192.0.2.5"}))
        st = until_status(agent, lambda s: s["datastore"]["hosts"]["routes"] == {
            "10.244.0.128/26": "192.0.2.4", "10.244.1.0/26": "192.0.2.5",
            "10.244.1.64/26": "192.0.2.3"})
        assert st["datastore"]["hosts"]["unroutable"] == {"twin": unroutable["twin"]}
        # "twin" has this host's address: this host is not registered (the others would
        # route its blocks to twin's machine), and says so.
        hosts = st["datastore"]["hosts"]
        assert hosts["addressOf"] == "twin" and not hosts["registered"]
        assert hosts["error"].startswith("cannot register this host: its address "
                                         "192.0.2.1 is in the record of host 'twin'")
        assert writer.c.get(f"{PREFIX}/hosts/{NODE}") is None
        out = subprocess.run([*agent.cmd[:3], "status", "--socket", agent.socket],
                             capture_output=True, text=True, check=False)
        assert out.returncode == 1 and "HOST ADDRESS TAKEN" in out.stdout, out
        writer.c.delete(f"{PREFIX}/hosts/twin")  # reclaimed
        st = until_status(agent, lambda s: s["datastore"]["hosts"]["registered"])
        assert st["datastore"]["hosts"]["error"] == ""
        assert st["datastore"]["hosts"]["unroutable"] == {}
        assert writer.c.get(f"{PREFIX}/hosts/{NODE}") is not None
    finally:
        agent.stop()


def test_an_emptied_block_goes_back_to_the_pool(
        tmp_path: Path, etcd: EtcdServer, writer: EtcdWriter, host_netns: str,
        netns_prefix: str) -> None:
    """A block the host has left empty for --empty-block-grace leaves etcd (another host
    may claim it); the host's last block stays; a new ADD then claims again."""
    from stockade.etcd.ipam import Blocks

    writer.c.put(f"{PREFIX}/ipam/blocks/10.244.0.0-26", json.dumps({"host": "other"}))
    agent = etcd_agent(tmp_path, etcd, host_netns, netns_prefix,
                       "--empty-block-grace", "0.5").start()
    try:
        got = [_cni_add(agent, f"c{i}") for i in range(65)]
        assert _block_of(writer, got[-1]) == ("10.244.0.128/26", NODE)
        _cni_del(agent, "c64")
        _until(lambda: _block_of(writer, got[-1]) == ("", ""), timeout=15,
               what="the emptied block deleted in etcd")
        # etcd's key goes first; the agent's pool says so once the round has swapped it
        blocks = until_status(agent, lambda s: s["datastore"]["blocks"]["givenBack"] == [
            "10.244.0.128/26"] and s["datastore"]["blocks"]["returning"] == [])[
            "datastore"]["blocks"]
        assert blocks["mine"] == ["10.244.0.64/26"]
        # The last block stays, though empty.
        for i in range(64):
            _cni_del(agent, f"c{i}")
        time.sleep(2.0)
        assert [str(b) for b in Blocks(writer.c, PREFIX, NODE).mine()] == ["10.244.0.64/26"]
        # Filled again: the given-back block is the lowest free one, claimed anew.
        again = [_cni_add(agent, f"d{i}") for i in range(65)]
        assert _block_of(writer, again[-1]) == ("10.244.0.128/26", NODE)
        assert agent.call("status")["datastore"]["blocks"]["mine"] == [
            "10.244.0.64/26", "10.244.0.128/26"]
    finally:
        agent.stop()


def test_a_block_claim_waiting_on_etcd_holds_up_no_other_operation(
        tmp_path: Path, etcd: EtcdServer, writer: EtcdWriter, host_netns: str,
        netns_prefix: str) -> None:
    """An ADD that needs a new block claims it in etcd with the agent's lock let go:
    while its claim waits on an etcd that does not answer, the agent answers reads and
    commits and enforces a DEL; once etcd answers, the block is the host's and the ADD
    gets an address. (Claimed under the lock, the DEL waited for the claim's etcd
    timeout.)"""
    import threading

    writer.c.put(f"{PREFIX}/ipam/blocks/10.244.0.0-26", json.dumps({"host": "other"}))
    agent = etcd_agent(tmp_path, etcd, host_netns, netns_prefix).start()
    try:
        got = [_cni_add(agent, f"c{i}") for i in range(64)]  # 10.244.0.64/26, full
        assert {_block_of(writer, a) for a in got} == {("10.244.0.64/26", NODE)}
        assert etcd.proc is not None
        added: dict[str, Any] = {}

        def add() -> None:
            try:
                added["address"] = _cni_add(agent, "late")
            except ApiError as exc:
                added["error"] = exc

        os.kill(etcd.proc.pid, signal.SIGSTOP)
        try:
            late = threading.Thread(target=add)
            late.start()
            time.sleep(0.5)  # the ADD is in its claim, waiting on etcd
            t0 = time.monotonic()
            assert "c1" in names(agent, "endpoints")
            _cni_del(agent, "c0")
            took = time.monotonic() - t0
            claiming = late.is_alive()
        finally:
            os.kill(etcd.proc.pid, signal.SIGCONT)
        late.join(30)
        assert claiming, added  # the DEL was done while the ADD still waited on etcd
        assert took < 2.0, took
        assert "error" not in added, added
        # The block was claimed; the address the DEL freed meanwhile went first.
        assert added["address"] == got[0]
        assert _block_of(writer, _cni_add(agent, "next")) == ("10.244.0.128/26", NODE)
    finally:
        agent.stop()
