"""Benchmark of the node agent: from an API call to enforcement, at scale.

A real agent process runs in a private network namespace with 10,000
endpoints and 1,000 policies loaded. Each measured call is synchronous (it
returns once the kernel enforces the change), so its latency is the whole
path: socket, validation, store commit, incremental compile, plan, kernel.
Variants side by side: relabel an endpoint, add one, change one policy, on
the loaded agent and on an empty one. Also: the time to load everything,
a restart (adopting the table), and the agent's memory.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import AgentProcess, pct, print_table
from stockade.net.namespace import create_netns, remove_netns
from synthetic import make_cluster, manifests


def measure(agent: AgentProcess, n: int, big: bool, start: int = 0) -> dict[str, list[float]]:
    """`n` rounds of the three changes; `start` numbers them (for rounds taken in turns)."""
    out: dict[str, list[float]] = {"relabel endpoint": [], "add endpoint": [],
                                   "change policy": []}
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "probe", "namespace": "ns3",
                        "labels": {"app": "app7", "tier": "api", "env": "prod"}},
           "status": {"podIP": "10.250.0.1"}}
    pol = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "bench", "namespace": "ns3"},
           "spec": {"podSelector": {"matchLabels": {"app": "app7"}},
                    "ingress": [{"ports": [{"port": 1}]}]}}
    target = "ns0/pod0" if big else "ns3/probe"
    if not big and start == 0:
        agent.call("apply", documents=[pod], source="bench")
    for i in range(start, start + n):
        t0 = time.perf_counter()
        agent.call("label", kind="endpoint", name=target, set={"round": str(i)}, remove=[])
        out["relabel endpoint"].append(time.perf_counter() - t0)
        doc = {**pod, "metadata": {**pod["metadata"], "name": f"new{i}"},  # type: ignore[dict-item]
               "status": {"podIP": f"10.251.{i // 250}.{i % 250 + 1}"}}
        t0 = time.perf_counter()
        agent.call("apply", documents=[doc], source="bench")
        out["add endpoint"].append(time.perf_counter() - t0)
        pol["spec"]["ingress"][0]["ports"][0]["port"] = i + 1  # type: ignore[index]
        t0 = time.perf_counter()
        agent.call("apply", documents=[pol], source="bench")
        out["change policy"].append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--policies", type=int, default=1_000)
    ap.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args()
    tag = f"ba{secrets.token_hex(2)}"
    tmp = Path(tempfile.mkdtemp(prefix="stockade-bench-"))
    rows: list[tuple[str, str, str]] = []
    spaces: list[str] = []
    try:
        for big in (False, True):
            d = tmp / ("big" if big else "small")
            d.mkdir()
            # A namespace each: the empty agent's table outlives it (owned, persistent),
            # and an agent with a new, empty store refuses to replace a table in force.
            host = f"{tag}-{d.name}"
            create_netns(host)
            spaces.append(host)
            agent = AgentProcess(d, host)
            agent.start()
            try:
                size = "empty"
                if big:
                    docs = manifests(make_cluster(args.pods, args.policies))
                    t0 = time.perf_counter()
                    agent.call("apply", documents=docs, source="bench")
                    load = time.perf_counter() - t0
                    size = f"{args.pods} endpoints, {args.policies} policies"
                    rows.append((f"load {size} (one apply, enforced)", f"{load:.1f} s", ""))
                rss = agent.rss_mb()
                results = measure(agent, args.rounds, big)
                for name, values in results.items():
                    ms = [v * 1000 for v in values]
                    rows.append((f"{name}, {size}", f"{statistics.median(ms):.1f} ms",
                                 f"p99 {pct(ms, 99):.1f} ms over {len(ms)} calls"))
                rows.append((f"agent memory (RSS), {size}", f"{rss:.0f} MB", ""))
                if big:
                    agent.stop()
                    t = agent.start()
                    rows.append(("restart with all of it: load, compile, adopt the table",
                                 f"{t:.1f} s", f"RSS {agent.rss_mb():.0f} MB"))
            finally:
                agent.stop()
    finally:
        for host in spaces:
            remove_netns(host)
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(("measure", "value", "notes"), rows)


if __name__ == "__main__":
    main()
