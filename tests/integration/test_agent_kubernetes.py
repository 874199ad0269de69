"""The agent with the Kubernetes API as its datastore, end to end: a real agent process
(``--datastore kubernetes``) against the API test double (tests/support/kubeapi), real
network namespaces and real packets.

* the public conformance corpus driven THROUGH THE API: each case's namespaces, pods
  (``spec.nodeName`` this node, ``status.podIP`` written through /status as a kubelet
  does) and policies are server-side applied, what the previous case had and this one
  has not is deleted, and every pair is probed once the agent has seen the writes and
  the kernel enforces them. Cases share pods (an unchanged apply is no event), so a
  case costs its changes and its probes;
* a watch broken mid-stream and a compaction forcing 410 and a relist: nothing is
  flushed (the map entry and set elements of the enforced policy never leave the
  kernel, probed with packets throughout), and a deletion made while the watches were
  down is not lost;
* nothing is programmed before the first lists: the kernel keeps the table of the
  previous agent and ``status``/``/healthz`` say not in sync;
* local writes refused, reads served;
* the CNI plugin resolving a pod's labels through the agent, for a pod the watch
  delivers after ADD started.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from tests.support import shared
from tests.support.cnp import CNP_CRD
from tests.support.kubeapi import KubeAPI

from stockade.agent.protocol import ApiError
from stockade.cli.conformance import load_cases
from stockade.conformance.case import Case
from stockade.conformance.kernel import CasePods
from stockade.conformance.runner import Judgement, check_case
from stockade.datapath.nft import NftDatapath
from stockade.kube.live import policy_differences, policy_versions
from stockade.load import read_text
from stockade.model.parse import parse_documents
from stockade.net.plumber import Plumber
from stockade.probe.client import Probe, run_probes
from stockade.probe.launcher import ProbeServer
from stockade.probe.protocol import Port, Protocol

from .agent_harness import AgentProcess
from .test_cni_harness import World, cni_agent

pytestmark = pytest.mark.privileged

NODE = "node-1"
TCP80 = Port(80, Protocol.TCP)
PLURALS = {"Namespace": "namespaces", "Pod": "pods", "NetworkPolicy": "networkpolicies",
           "ClusterNetworkPolicy": "clusternetworkpolicies"}


# ---- writing to the API as users and kubelets do ------------------------------------------


class Writer:
    """Server-side applies and deletes through the double's Python API, remembering the
    resourceVersion of the last write of each resource (what the agent must reach)."""

    def __init__(self, api: KubeAPI) -> None:
        self.api = api
        self.rvs: dict[str, int] = {}

    def _wrote(self, plural: str) -> None:
        self.rvs[plural] = self.api.resource_version

    def namespace(self, name: str, labels: Mapping[str, str]) -> None:
        self.api.apply({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": name, "labels": dict(labels)}},
                       field_manager="test", force=True)
        self._wrote("namespaces")

    def pod(self, ns: str, name: str, labels: Mapping[str, str], ips: Sequence[str] = (),
            ports: Sequence[Mapping[str, Any]] = (), node: str = NODE, **spec: Any) -> None:
        container: dict[str, Any] = {"name": "main", "image": "stockade/probe"}
        if ports:
            container["ports"] = [dict(p) for p in ports]
        self.api.apply({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": name, "namespace": ns, "labels": dict(labels)},
                        "spec": {"nodeName": node, "containers": [container], **spec}},
                       field_manager="test", force=True)
        if ips:
            self.pod_ips(ns, name, ips)
        self._wrote("pods")

    def pod_ips(self, ns: str, name: str, ips: Sequence[str]) -> None:
        """What the kubelet reports once the sandbox is up."""
        self.api.apply({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": name, "namespace": ns},
                        "status": {"phase": "Running", "podIP": ips[0],
                                   "podIPs": [{"ip": ip} for ip in ips]}},
                       field_manager="kubelet", force=True, subresource="status")
        self._wrote("pods")

    def policy(self, manifest: Mapping[str, Any]) -> None:
        """A NetworkPolicy or a ClusterNetworkPolicy."""
        self.api.apply(dict(manifest), field_manager="test", force=True)
        self._wrote(PLURALS[manifest["kind"]])

    def delete(self, resource: str, name: str, namespace: str | None = None) -> None:
        self.api.delete(resource, name, namespace)
        self._wrote(resource)


def wait_enforced(agent: AgentProcess, rvs: Mapping[str, int],
                  timeout: float = 30.0) -> dict[str, Any]:
    """Until the agent has seen every write (each watch at or past its resourceVersion)
    and the kernel enforces what it committed."""
    deadline = time.monotonic() + timeout
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = agent.call("status")
        res = st["datastore"]["resources"]
        if st["inSync"] and st["ready"] and all(
                int(res[p]["resourceVersion"] or 0) >= rv for p, rv in rvs.items()):
            return st
        time.sleep(0.01)
    raise AssertionError(f"not enforced in {timeout} s: {st}")


def wait_status(agent: AgentProcess, pred: Any, timeout: float = 15.0) -> dict[str, Any]:
    """The feed's per-resource status once ``pred`` holds for it."""
    deadline = time.monotonic() + timeout
    res: dict[str, Any] = {}
    while time.monotonic() < deadline:
        res = agent.call("status")["datastore"]["resources"]
        if pred(res):
            return res
        time.sleep(0.02)
    raise AssertionError(f"not reached in {timeout} s: {res}")


def kube_agent(tmp: Path, api: KubeAPI, host: str, prefix: str,
               *extra: str) -> AgentProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    kubeconfig = api.write_kubeconfig(tmp / "kubeconfig")
    return AgentProcess(tmp, host, prefix, resync=1.0, extra=(
        "--datastore", "kubernetes", "--kubeconfig", str(kubeconfig), "--node", NODE,
        "--watch-stall-timeout", "2", *extra))


@pytest.fixture
def api() -> Iterator[KubeAPI]:
    with KubeAPI(bookmark_interval=0.5) as server:
        server.create(CNP_CRD)  # ClusterNetworkPolicies served (and watched) like the rest
        yield server
    # A 500 from a bug of the double would be mistaken for the API's behaviour.
    assert server.internal_errors == []


# ---- (1) the conformance corpus through the API -------------------------------------------


class ApiCases:
    """A CaseBackend: each case's objects written to the API, the agent enforcing them,
    real packets judging. Pods are plumbed once and kept while a case leaves them as
    they are; the API is only told what changed."""

    def __init__(self, api: KubeAPI, agent: AgentProcess, plumber: Plumber,
                 timeout: float = 1.0) -> None:
        self.writer = Writer(api)
        self.agent = agent
        self.plumber = plumber
        self.pods = CasePods(plumber, timeout)
        self.written: dict[str, tuple[Any, ...]] = {}
        self.policies: set[str] = set()
        self.tiers: dict[str, Any] = {}  # the ClusterNetworkPolicies written, by key
        self.seconds_waiting = 0.0

    def close(self) -> None:
        self.pods.close()

    def _write(self, case: Case) -> None:
        w = self.writer
        w.rvs.clear()
        raw = parse_documents(read_text(case.source), case.source)[0].get("policies") or []
        # plural/namespace/name (no namespace for a ClusterNetworkPolicy)
        manifests = {f"{PLURALS[p['kind']]}/{p['metadata'].get('namespace', '')}/"
                     f"{p['metadata']['name']}": p for p in raw}
        for key in sorted(self.policies - set(manifests)):
            plural, ns, name = key.split("/")
            w.delete(plural, name, ns or None)
        pods = {ep.key: ep for ep in case.cluster.endpoints}
        for key in sorted(set(self.written) - set(pods)):
            ns, name = key.split("/")
            w.delete("pods", name, ns)
            del self.written[key]
        for ns in case.cluster.namespaces:
            w.namespace(ns.name, dict(ns.labels))
        for key, ep in sorted(pods.items()):
            ports = [{**({"name": p.name} if p.name else {}), "containerPort": p.port,
                      "protocol": p.protocol} for p in ep.ports]
            shape = (tuple(sorted(ep.labels.items())), ep.ips, tuple(map(str, ports)))
            if self.written.get(key) == shape:
                continue  # unchanged: no write, no event
            if key in self.written:
                w.delete("pods", ep.name, ep.namespace)  # ports of a pod are immutable
            w.pod(ep.namespace, ep.name, dict(ep.labels), ep.ips, ports)
            self.written[key] = shape
        for key, manifest in manifests.items():
            if key.startswith("clusternetworkpolicies/") and \
                    self.tiers.get(key, manifest) != manifest:
                # Server-side apply merges what the schema-less CRD does not describe (a
                # subject of namespaces would keep one of pods): replaced whole instead.
                plural, _, name = key.split("/")
                w.delete(plural, name)
            w.policy(manifest)
        self.policies = set(manifests)
        self.tiers = {k: m for k, m in manifests.items()
                      if k.startswith("clusternetworkpolicies/")}

    def judge(self, case: Case) -> Judgement:
        self.pods.attach(case)
        self._write(case)
        started = time.monotonic()
        wait_enforced(self.agent, self.writer.rvs)
        self.seconds_waiting += time.monotonic() - started
        # Entries of the previous case's probes must not pass as "established".
        subprocess.run(["ip", "netns", "exec", self.plumber.host_netns or "", "conntrack",
                        "-F"], capture_output=True, check=False)
        return self.pods.probe(case)


@pytest.mark.parametrize("corpus", ["conformance", "conformance-cnp"])
def test_conformance_corpus_through_the_api(tmp_path: Path, api: KubeAPI, host_netns: str,
                                            netns_prefix: str, corpus: str) -> None:
    """Both corpora: NetworkPolicy's, and ClusterNetworkPolicy's (the tiers' objects
    applied to the API like any other, watched and enforced by the agent)."""
    cases = load_cases([str(shared(corpus))])
    assert len(cases) > 30
    plumber = Plumber(prefix=netns_prefix, host_netns=host_netns)
    plumber.ensure_bridge(addresses=[])
    agent = kube_agent(tmp_path, api, host_netns, netns_prefix).start()
    backend = ApiCases(api, agent, plumber)
    failed: list[str] = []
    started = time.monotonic()
    try:
        for case in cases:
            result = check_case(case, backend)
            if not result.passed:
                failed += [result.error] if result.error else [
                    m.render(case.id) for m in result.mismatches]
        st = agent.call("status")
    finally:
        backend.close()
        agent.stop()
        plumber.teardown()
    assert failed == [], "\n".join(failed[:40])
    took = time.monotonic() - started
    # Everything went through watches: one list per resource, no relist, no error.
    for plural, r in st["datastore"]["resources"].items():
        assert r["lists"] == 1 and r["gone"] == 0, (plural, r)
    print(f"{len(cases)} cases through the API in {took:.1f} s, "
          f"{backend.seconds_waiting:.1f} s waiting for enforcement")


# ---- a trio of pods in the API -----------------------------------------------------------


def allow(name: str, target: str, source: str, port: int = 80) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": {"pod": target}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": source}}}],
                                  "ports": [{"port": port}]}]}}


def publish_trio(w: Writer, trio: Any) -> None:
    w.namespace("x", {})
    for att in trio.all:
        name = att.key.split("/")[1]
        w.pod("x", name, {"pod": name}, [att.address4, att.address6])
    w.policy(allow("web", "a", "b"))
    w.policy(allow("extra", "c", "a", 81))


def probe(trio: Any, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], bool]:
    atts = {a.key.split("/")[1]: a for a in trio.all}
    probes = [Probe(s, atts[s].netns, d, atts[d].address4, TCP80) for s, d in pairs]
    return {(v.probe.src, v.probe.dst): v.allowed for v in run_probes(probes, timeout=0.5)}


class Watchers:
    """Probes and kernel reads in the background, recording anything that opens or
    flushes: the allowed b->a must keep passing, c->a stay denied, a's map entry and
    b's set elements never leave the kernel."""

    def __init__(self, trio: Any) -> None:
        self.trio = trio
        self.problems: list[str] = []
        self.rounds = 0
        self._stop = threading.Event()
        dp = NftDatapath(netns=trio.host_netns)
        rs = dp.read()
        a4, b4 = trio.a.address4, trio.b.address4
        self.chain = rs.ingress[a4]
        self.sets = {n for n, s in rs.sets.items() if b4 in s.elements}
        assert self.sets, "b is in no set"
        self._threads = [threading.Thread(target=self._probe),
                         threading.Thread(target=self._kernel)]

    def __enter__(self) -> Watchers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def wait_rounds(self, at_least: int, timeout: float = 30.0) -> None:
        """Go on probing until `at_least` rounds are done: a round waits for the denied
        probe's timeout, so a busy machine fits fewer of them in the same steps."""
        deadline = time.monotonic() + timeout
        while self.rounds < at_least and time.monotonic() < deadline:
            time.sleep(0.05)

    def _probe(self) -> None:
        while not self._stop.is_set():
            seen = probe(self.trio, [("b", "a"), ("c", "a")])
            self.rounds += 1
            if not seen[("b", "a")]:
                self.problems.append("allowed b->a failed")
            if seen[("c", "a")]:
                self.problems.append("denied c->a passed")

    def _kernel(self) -> None:
        dp = NftDatapath(netns=self.trio.host_netns)
        a4, b4 = self.trio.a.address4, self.trio.b.address4
        while not self._stop.wait(0.02):
            rs = dp.read()
            if rs.ingress.get(a4) != self.chain:
                self.problems.append(f"a's map entry changed: {rs.ingress.get(a4)}")
            for name in self.sets:
                if name not in rs.sets or b4 not in rs.sets[name].elements:
                    self.problems.append(f"b left set {name}")


def test_dropped_watches_and_a_relist_after_410_flush_nothing(
        tmp_path: Path, api: KubeAPI, trio: Any, netns_prefix: str) -> None:
    w = Writer(api)
    publish_trio(w, trio)
    agent = kube_agent(tmp_path, api, trio.host_netns, netns_prefix).start()
    try:
        st = wait_enforced(agent, w.rvs)
        with ProbeServer({a.netns: [TCP80] for a in trio.all}):
            assert probe(trio, [("b", "a"), ("c", "a")]) == {("b", "a"): True,
                                                             ("c", "a"): False}
            with Watchers(trio) as watch:
                # (a) every watch broken mid-stream: resumed from the last version.
                before = st["datastore"]["resources"]
                api.drop_watches()
                w.policy(allow("later", "b", "c"))  # delivered on the resumed watch
                wait_enforced(agent, w.rvs)
                res = wait_status(agent, lambda r: all(
                    r[p]["watches"] > before[p]["watches"] and r[p]["connected"]
                    for p in r))
                assert all(res[p]["lists"] == 1 for p in res), res  # no relist
                assert all(res[p]["errors"] >= 1 for p in res), res
                assert any(p["name"] == "later"
                           for p in (x["metadata"] for x in
                                     agent.call("get", kind="policies")["items"]))
                # (b) watches down, a deletion meanwhile, history compacted: 410, relist.
                api.fail_next(3, 503, verb="watch")
                api.drop_watches()
                w.delete("networkpolicies", "extra", "x")
                w.pod("x", "c", {"pod": "c", "moved": "yes"},
                      [trio.c.address4, trio.c.address6])
                api.compact()
                wait_enforced(agent, w.rvs)
                res = wait_status(agent, lambda r: all(x["lists"] >= 2 for x in r.values()))
                assert all(r["gone"] >= 1 for r in res.values()), res
                wait_enforced(agent, w.rvs)
                time.sleep(1.0)  # probes and kernel reads go on after the relist
                watch.wait_rounds(5)
            assert watch.rounds >= 5, watch.rounds
            assert watch.problems == [], watch.problems[:20]
        policies = {p["metadata"]["name"] for p in agent.call("get", kind="policies")["items"]}
        assert policies == {"web", "later"}  # the deletion made while down was not lost
        labels = {e["name"]: e["labels"] for e in agent.call("get", kind="endpoints")["items"]}
        assert labels["c"] == {"pod": "c", "moved": "yes"}
        assert "relisted" in agent.logs()
    finally:
        agent.stop()


def test_a_stalled_watch_is_reconnected_by_the_watchdog(
        tmp_path: Path, api: KubeAPI, trio: Any, netns_prefix: str) -> None:
    w = Writer(api)
    publish_trio(w, trio)
    agent = kube_agent(tmp_path, api, trio.host_netns, netns_prefix).start()
    try:
        wait_enforced(agent, w.rvs)
        api.stall_watches(3.5)  # the agent's watchdog: 2 s without event nor bookmark
        time.sleep(4.0)
        w.policy(allow("after", "b", "a", 81))
        st = wait_enforced(agent, w.rvs)
        res = st["datastore"]["resources"]
        assert all(r["stalls"] >= 1 for r in res.values()), res
        assert all(r["lists"] == 1 for r in res.values()), res  # resumed, not relisted
    finally:
        agent.stop()


# ---- (3) not in sync until the first lists; the kernel's table kept -------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def _report(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as r:
        return dict(json.load(r))


def test_nothing_is_programmed_before_the_first_lists(
        tmp_path: Path, api: KubeAPI, trio: Any, netns_prefix: str) -> None:
    w = Writer(api)
    publish_trio(w, trio)
    first = kube_agent(tmp_path / "one", api, trio.host_netns, netns_prefix).start()
    wait_enforced(first, w.rvs)
    assert first.stop() == 0
    dp = NftDatapath(netns=trio.host_netns)
    kernel = dp.read()
    assert kernel.ingress  # the first agent's table stays, enforcing
    # The next agent cannot list pods for a while (503, then backoff).
    api.fail_next(4, 503, verb="list", resource="pods")
    port = _free_port()
    second = kube_agent(tmp_path / "two", api, trio.host_netns, netns_prefix,
                        "--metrics-address", f"127.0.0.1:{port}")
    assert second.proc is None
    with open(second.log, "ab") as out:
        second.proc = subprocess.Popen(second.cmd, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 20
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                st = second.call("status")
                break
            except Exception:
                time.sleep(0.02)
        assert st and not st["inSync"] and not st["ready"], st
        assert st["datastore"]["synced"] is False
        assert _healthz(port) == 503
        with ProbeServer({a.netns: [TCP80] for a in trio.all}):
            assert probe(trio, [("b", "a"), ("c", "a")]) == {("b", "a"): True,
                                                             ("c", "a"): False}
        assert dp.read() == kernel  # kept as the last agent left it
        with pytest.raises(ApiError) as e:
            second.call("cni.status")
        assert e.value.code == "unavailable"
        assert _report(port)["inSync"] is False
        st = wait_enforced(second, w.rvs)
        assert st["datastore"]["resources"]["pods"]["errors"] >= 1
        assert _healthz(port) == 200
        # GET /status, what `kubectl stockade status` compares with the cluster: every
        # policy enforced at the cluster's resourceVersion.
        report = _report(port)
        assert report["node"] == NODE and report["inSync"] is True and report["ready"]
        assert policy_differences(policy_versions(api.list("networkpolicies")),
                                  report["policies"]) == []
        assert set(report["policies"]) == {"x/web", "x/extra"}
        assert report["features"] and all(report["features"].values())
        assert dp.read() == kernel  # adopted: the same lists, nothing to change
        # "applied" is logged for a run that changed something: none since the lists.
        assert 'msg="applied"' not in second.logs().split("first lists")[-1]
    finally:
        second.stop()


# ---- (4) local writes refused ---------------------------------------------------------------


def test_local_writes_are_refused_and_reads_served(
        tmp_path: Path, api: KubeAPI, trio: Any, netns_prefix: str) -> None:
    w = Writer(api)
    publish_trio(w, trio)
    agent = kube_agent(tmp_path, api, trio.host_netns, netns_prefix).start()
    try:
        wait_enforced(agent, w.rvs)
        before = agent.call("status")["revision"]
        for op, args in (("apply", {"documents": [allow("local", "a", "c")]}),
                         ("delete", {"refs": [{"kind": "NetworkPolicy", "namespace": "x",
                                               "name": "web"}]}),
                         ("label", {"kind": "endpoint", "name": "x/c",
                                    "set": {"pod": "b"}, "remove": []})):
            with pytest.raises(ApiError) as e:
                agent.call(op, **args)
            assert e.value.code == "invalid"
            assert f"datastore is kubernetes ({api.url})" in e.value.message, e.value.message
        assert agent.call("status")["revision"] == before
        got = agent.call("get", kind="endpoints")["items"]
        assert {e["name"]: e["owner"] for e in got} == {"a": "kube", "b": "kube", "c": "kube"}
        assert agent.call("get", kind="chains")["items"]
        manifest = tmp_path / "local.json"
        manifest.write_text(json.dumps(allow("local", "a", "c")))
        out = subprocess.run([*agent.cmd[:3], "apply", "--socket", agent.socket, "-f",
                              str(manifest)], capture_output=True, text=True, check=False)
        assert out.returncode == 2, out
        assert "datastore is kubernetes" in out.stderr and "kubectl" in out.stderr, out.stderr
    finally:
        agent.stop()


# ---- (5) the CNI plugin resolving labels through the agent -----------------------------------


WEB = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
       "metadata": {"name": "web", "namespace": "x"},
       "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                             "ports": [{"port": 80}]}]}}


def _pod_args(name: str) -> str:
    return f"IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME={name};K8S_POD_UID=u-{name}"


def _address(result: dict[str, Any]) -> str:
    return str(result["ips"][0]["address"]).split("/")[0]


def test_cni_takes_labels_from_the_api_for_a_pod_the_watch_delivers_late(
        tmp_path: Path, api: KubeAPI, netns_prefix: str, host_netns: str) -> None:
    w = Writer(api)
    w.namespace("x", {})
    w.policy(WEB)
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    agent = cni_agent(tmp_path, host_netns, netns_prefix, "--datastore", "kubernetes",
                      "--kubeconfig", str(kubeconfig), "--node", NODE, "--pod-wait", "8")
    agent.start()
    world = World(netns_prefix, host_netns, tmp_path, agent)
    try:
        # ADD for a pod the API does not show yet: the agent waits for the watch.
        result: dict[str, Any] = {}
        add = threading.Thread(target=lambda: result.update(out=world.run(
            "ADD", world.conf(), cid="c-web", netns=world.netns("web"),
            args=_pod_args("web"))))
        add.start()
        time.sleep(1.0)
        assert add.is_alive()  # still waiting for the pod
        w.pod("x", "web", {"app": "web"})  # scheduled, no IP yet: the kubelet is here
        add.join(30)
        got = result["out"]
        assert got.code == 0 and got.out is not None, got
        web_ip = _address(got.out)
        rec = world.endpoints()["x/web"]
        assert rec["labels"] == {"app": "web"} and rec["owner"] == "cni", rec
        for name, labels in (("client", {"role": "client"}), ("other", {"role": "other"})):
            w.pod("x", name, labels)
            out = world.run("ADD", world.conf(), cid=f"c-{name}", netns=world.netns(name),
                            args=_pod_args(name))
            assert out.code == 0, out
        with ProbeServer({f"{world.prefix}-web": [TCP80]}):
            def reach(src: str) -> bool:
                [v] = run_probes([Probe(src, f"{world.prefix}-{src}", "web", web_ip, TCP80)],
                                 timeout=0.6)
                return v.allowed

            assert reach("client") is True and reach("other") is False
            # The kubelet reports the IP: the API's pod and the attachment agree; the
            # endpoint stays the attachment's, enforced as before.
            w.pod_ips("x", "web", [web_ip])
            wait_enforced(agent, w.rvs)
            assert world.endpoints()["x/web"]["owner"] == "cni"
            assert reach("client") is True and reach("other") is False
            # A relabel in the API reaches the CNI endpoint.
            w.pod("x", "other", {"role": "client"})
            wait_enforced(agent, w.rvs)
            assert reach("other") is True
        # A pod the API never shows: ADD fails with "try again later" and leaves nothing.
        missing = world.run("ADD", world.conf(), cid="c-ghost", netns=world.netns("ghost"),
                            args=_pod_args("ghost"))
        assert missing.code != 0 and missing.error == 11, missing
        assert "x/ghost" not in world.endpoints()
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.kill9()


def test_a_bad_object_from_the_api_is_held_closed_and_blocks_nothing_else(
        tmp_path: Path, api: KubeAPI, trio: Any, netns_prefix: str) -> None:
    """The double, unlike an API server, accepts a policy stockade's validation refuses
    (an except outside its cidr): its namespace's pods are held isolated both ways, the
    other namespace is enforced as written, and fixing the policy releases them."""
    w = Writer(api)
    w.namespace("x", {})
    w.namespace("y", {})
    for att, ns in ((trio.a, "x"), (trio.b, "x"), (trio.c, "y")):
        name = att.key.split("/")[1]
        w.pod(ns, name, {"pod": name}, [att.address4, att.address6])
    w.policy(allow("web", "a", "b"))
    bad = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "bad", "namespace": "y"},
           "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {
               "cidr": "10.0.0.0/24", "except": ["10.9.0.0/24"]}}]}]}}
    w.policy(bad)
    agent = kube_agent(tmp_path, api, trio.host_netns, netns_prefix).start()
    try:
        st = wait_enforced(agent, w.rvs)
        assert list(st["quarantined"]) == ["y/c"]
        assert "networkpolicy/y/bad" in st["datastore"]["invalid"]
        pairs = [("b", "a"), ("a", "b"), ("b", "c"), ("c", "a"), ("c", "b")]
        with ProbeServer({a.netns: [TCP80] for a in trio.all}):
            assert probe(trio, pairs) == {("b", "a"): True, ("a", "b"): True,
                                          ("b", "c"): False, ("c", "a"): False,
                                          ("c", "b"): False}
            w.policy({**bad, "spec": {"podSelector": {}, "ingress": [{}]}})  # fixed
            st = wait_enforced(agent, w.rvs)
            assert st["quarantined"] == {} and st["datastore"]["invalid"] == {}
            assert probe(trio, pairs) == {("b", "a"): True, ("a", "b"): True,
                                          ("b", "c"): True, ("c", "a"): False,
                                          ("c", "b"): True}
    finally:
        agent.stop()
