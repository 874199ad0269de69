"""Benchmark of the agent on a cluster: from a write to the Kubernetes API to enforcement.

The API is the test double of tests/support/kubeapi (HTTP on 127.0.0.1, list/watch with
bookmarks), holding the synthetic cluster of synthetic.py: 10,000 pods over 100 nodes
and 1,000 NetworkPolicies. A real agent process (``--datastore kubernetes``) runs in a
private network namespace as the node ``node0`` (100 of the pods are its own; the other
9,900 are peers only: in the sets, with no verdict chain here).

Each round writes to the API and polls the agent's ``status`` (every ~2 ms) until its
watch has delivered the write (the resource's resourceVersion reached) and the kernel
enforces what it committed (``inSync``): the whole path, API server, watch stream,
decoding, admission, incremental compile, plan, kernel transaction. The writes: a new
NetworkPolicy selecting one of this node's pods, the same policy changed (its port), a
new pod of this node getting its IP (what a kubelet writes), a pod relabelled. Also: the
first sync (list everything, compile, program), a relist after 410 at this size (it
must commit nothing), and the agent's memory.

Writes are made through the double's Python API in this process; its HTTP threads share
this process's interpreter with the polling, which adds to the figures (an upper bound).
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import AgentProcess, exit_on_sigterm, pct, print_table
from results import Results
from synthetic import make_cluster, manifests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.kubeapi import KubeAPI

from stockade.kube.reflector import NOT_SERVED
from stockade.net.namespace import create_netns, remove_netns

NODE = "node0"


def populate(api: KubeAPI, pods: int, policies: int, nodes: int) -> list[dict[str, Any]]:
    """The synthetic cluster into the API; returns this node's pods (every `nodes`-th)."""
    local: list[dict[str, Any]] = []
    for doc in manifests(make_cluster(pods, policies)):
        if doc["kind"] == "Namespace":
            api.apply(doc, field_manager="bench", force=True)
            continue
        if doc["kind"] == "Pod":
            meta, spec, status = doc["metadata"], doc["spec"], doc["status"]
            assert isinstance(meta, dict) and isinstance(spec, dict) and isinstance(status, dict)
            i = int(str(meta["name"])[3:])
            spec["nodeName"] = f"node{i % nodes}"
            status["phase"] = "Running"
            if i % nodes == 0:
                local.append(doc)
        api.create(doc)  # a pod's status goes through /status, as the double does it
    return local


def wait(agent: AgentProcess, plural: str, rv: int, timeout: float = 60.0) -> float:
    """Seconds until the agent's watch of `plural` reached `rv` and the kernel enforces."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        st = agent.call("status")
        got = st["datastore"]["resources"][plural]["resourceVersion"]
        if st["inSync"] and int(got or 0) >= rv:
            return time.perf_counter() - t0
        time.sleep(0.002)
    raise SystemExit(f"not enforced within {timeout} s: {st}")


def measure(api: KubeAPI, agent: AgentProcess, local: list[dict[str, Any]],
            rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"NetworkPolicy created": [], "NetworkPolicy changed": [],
                                   "pod of this node gets its IP": [], "pod relabelled": []}

    def timed(plural: str, write: Any) -> float:
        t0 = time.perf_counter()
        write()
        rv = api.resource_version
        wait(agent, plural, rv)
        return time.perf_counter() - t0

    for i in range(rounds):
        target = local[i % len(local)]
        meta = target["metadata"]
        pol = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": f"bench{i}", "namespace": meta["namespace"]},
               "spec": {"podSelector": {"matchLabels": {"app": meta["labels"]["app"]}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {
                            "tier": "web"}}}], "ports": [{"port": 1000 + i}]}]}}
        out["NetworkPolicy created"].append(timed("networkpolicies", lambda p=pol: api.apply(
            p, field_manager="bench", force=True)))
        pol["spec"]["ingress"][0]["ports"][0]["port"] = 2000 + i  # type: ignore[index]
        out["NetworkPolicy changed"].append(timed("networkpolicies", lambda p=pol: api.apply(
            p, field_manager="bench", force=True)))
        name = f"new{i}"
        api.create({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "namespace": meta["namespace"],
                                 "labels": dict(meta["labels"])},
                    "spec": {"nodeName": NODE, "containers": [{"name": "c"}]}})
        ip = f"10.250.{i // 250}.{i % 250 + 1}"
        out["pod of this node gets its IP"].append(timed("pods", lambda n=name, ns=meta[
            "namespace"], a=ip: api.apply(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": n, "namespace": ns},
             "status": {"phase": "Running", "podIP": a}},
            field_manager="kubelet", force=True, subresource="status")))
        relabel = {"metadata": {"labels": {"round": str(i), "app": "other"}}}
        out["pod relabelled"].append(timed("pods", lambda n=name, ns=meta["namespace"],
                                           p=relabel: api.patch("pods", n, p, ns)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--policies", type=int, default=1_000)
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--json", metavar="FILE", help="also write the results for bench/report.py")
    args = ap.parse_args()
    exit_on_sigterm()
    tmp = Path(tempfile.mkdtemp(prefix="stockade-bench-"))
    host = f"bk{secrets.token_hex(2)}-host"
    rows: list[tuple[str, str, str]] = []
    create_netns(host)
    api = KubeAPI(bookmark_interval=1.0).start()
    agent: AgentProcess | None = None
    try:
        t0 = time.perf_counter()
        local = populate(api, args.pods, args.policies, args.nodes)
        rows.append((f"fill the API: {args.pods} pods, {args.policies} policies",
                     f"{time.perf_counter() - t0:.1f} s", "the double's Python API"))
        kubeconfig = api.write_kubeconfig(tmp / "kubeconfig")
        agent = AgentProcess(tmp, host, "--datastore", "kubernetes", "--kubeconfig",
                             str(kubeconfig), "--node", NODE)
        ready = agent.start()
        cpu = agent.cpu_seconds()
        st = agent.call("status")
        rows.append(("first sync: list, compile, program, ready", f"{ready:.1f} s",
                     f"{len(local)} pods of this node, {st['counts']['endpoints']} "
                     f"endpoints, {st['counts']['policies']} policies"))
        rows.append(("  the agent's CPU in it (user + system)", f"{cpu:.1f} s",
                     "the rest: the API double serving the lists (Python, this process)"))
        rows.append(("agent memory (RSS)", f"{agent.rss_mb():.0f} MB", ""))
        results = measure(api, agent, local, args.rounds)
        for name, values in results.items():
            ms = [v * 1000 for v in values]
            rows.append((f"{name} -> enforced", f"{statistics.median(ms):.0f} ms",
                         f"p99 {pct(ms, 99):.0f} ms over {len(ms)} writes"))
        # A relist at this size: every watch dropped, history compacted, 410, list again.
        # Resources the API serves: one it does not (the ClusterNetworkPolicy CRDs, not
        # installed in the double) has no watch to drop and is not listed again.
        lists = {p: r["lists"] for p, r in agent.call("status")["datastore"]["resources"]
                 .items() if r["lastError"] != NOT_SERVED}
        revision = agent.call("status")["revision"]
        api.fail_next(3, 503, verb="watch")  # keep the watches down for a moment,
        api.drop_watches()
        t0 = time.perf_counter()
        api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bump"}})
        api.compact()  # so that they come back behind the compaction: 410
        cpu = agent.cpu_seconds()
        while any(r["lists"] <= lists[p] for p, r in
                  agent.call("status")["datastore"]["resources"].items() if p in lists):
            time.sleep(0.01)
        st = agent.call("status")
        rows.append(("relist after 410 (drop + compact), all resources",
                     f"{time.perf_counter() - t0:.1f} s",
                     f"{st['revision'] - revision} commit(s) for 1 namespace added"))
        rows.append(("  the agent's CPU in it (user + system)",
                     f"{agent.cpu_seconds() - cpu:.1f} s", ""))
        rows.append(("agent memory (RSS) after the rounds", f"{agent.rss_mb():.0f} MB", ""))
    finally:
        if agent is not None:
            agent.stop()
        api.stop()
        remove_netns(host)
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(("measure", "value", "notes"), rows)
    out = Results("kube", " ".join(["bench/kube.py", *sys.argv[1:]]))
    out.table(f"a node of a cluster of {args.pods:,} pods on {args.nodes:,} nodes, "
              f"{args.policies:,} policies (the API: tests/support/kubeapi, in Python)",
              ("measure", "value", "notes"), rows)
    out.write(args.json)


if __name__ == "__main__":
    main()
