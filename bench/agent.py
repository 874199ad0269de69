"""Benchmark of the node agent: from an API call to enforcement, at scale.

A real agent process runs in a private network namespace with 10,000
endpoints and 1,000 policies loaded. Each measured call is synchronous (it
returns once the kernel enforces the change), so its latency is the whole
path: socket, validation, store commit, incremental compile, plan, kernel.
Variants side by side: relabel an endpoint, add one, delete it, change one
policy, on the loaded agent and on an empty one. Also: the time to load
everything, endpoint changes per second from parallel clients, a restart
(adopting the table), and the agent's memory.

``--baseline REV`` runs the agent of an earlier commit (checked out with
`git worktree`) beside this tree's, both loaded, taking turns call by call,
so that a machine busy with other work weighs on both alike; the load is
timed `--loads` more times, into fresh agents, the trees taking turns.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import (
    AgentProcess,
    add_ports,
    baseline_tree,
    exit_on_sigterm,
    pct,
    print_table,
    remove_pins,
)
from results import Results
from stockade.agent.client import AgentClient
from stockade.net.namespace import create_netns, remove_netns
from synthetic import make_cluster, manifests

HERE = Path(__file__).resolve().parent.parent
POD = {"apiVersion": "v1", "kind": "Pod",
       "metadata": {"name": "probe", "namespace": "ns3",
                    "labels": {"app": "app7", "tier": "api", "env": "prod"}},
       "status": {"podIP": "10.250.0.1"}}


OUTSIDE = "add endpoint outside the pod network (in ipBlocks)"


def measure(agent: AgentProcess, n: int, big: bool, start: int = 0) -> dict[str, list[float]]:
    """`n` rounds of the four changes; `start` numbers them (for rounds taken in turns)."""
    out: dict[str, list[float]] = {"relabel endpoint": [], "add endpoint": [],
                                   "delete endpoint": [], "change policy": [],
                                   OUTSIDE: []}
    pol = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "bench", "namespace": "ns3"},
           "spec": {"podSelector": {"matchLabels": {"app": "app7"}},
                    "ingress": [{"ports": [{"port": 1}]}]}}
    target = "ns0/pod0" if big else "ns3/probe"
    if not big and start == 0:
        agent.call("apply", documents=[POD], source="bench")
    for i in range(start, start + n):
        t0 = time.perf_counter()
        agent.call("label", kind="endpoint", name=target, set={"round": str(i)}, remove=[])
        out["relabel endpoint"].append(time.perf_counter() - t0)
        # A new pod's address is the pod network's (synthetic.py's 10.128.0.0/16, past
        # its pods), as IPAM hands them out; one outside it (10.251.x) falls into the
        # ipBlocks ("10.0.0.0/8 except 10.128.0.0/16") of one peer in five, and on
        # eBPF its identity is a peer of about half the policies: timed apart.
        for into, address in (("add endpoint", f"10.128.{250 + i // 250 % 6}.{i % 250 + 1}"),
                              (OUTSIDE, f"10.251.{i // 250 % 250}.{i % 250 + 1}")):
            doc = {**POD, "metadata": {**POD["metadata"], "name": f"new{i}"},  # type: ignore[dict-item]
                   "status": {"podIP": address}}
            t0 = time.perf_counter()
            agent.call("apply", documents=[doc], source="bench")
            out[into].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            agent.call("delete", refs=[{"kind": "Pod", "namespace": "ns3", "name": f"new{i}"}])
            if into != OUTSIDE:
                out["delete endpoint"].append(time.perf_counter() - t0)
        pol["spec"]["ingress"][0]["ports"][0]["port"] = i % 60000 + 1  # type: ignore[index]
        t0 = time.perf_counter()
        agent.call("apply", documents=[pol], source="bench")
        out["change policy"].append(time.perf_counter() - t0)
    return out


def parallel(agent: AgentProcess, clients: int, seconds: float, pods: int) -> tuple[float,
                                                                                  list[float]]:
    """Endpoint changes per second (each synchronous) from `clients` threads, and their
    latencies: each client relabels endpoints of its own, one call after the other."""
    stop = time.monotonic() + seconds
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            with AgentClient(agent.socket, timeout=600) as c:
                n = 0
                while time.monotonic() < stop:
                    i = (k + clients * n) % pods
                    t0 = time.perf_counter()
                    c.call("label", kind="endpoint", name=f"ns{i % 50}/pod{i}",
                           set={"burst": str(n)}, remove=[])
                    latencies[k].append(time.perf_counter() - t0)
                    n += 1
        except BaseException as exc:  # reported after the others finish
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - t0
    if errors:
        raise errors[0]
    done = [v for vs in latencies for v in vs]
    return len(done) / took, done


def crash(agent: AgentProcess, n: int) -> None:
    """A change, then kill -9: the next start folds the change into what was kept
    before it (agent/warm.py)."""
    agent.call("label", kind="endpoint", name="ns0/pod0", set={"crashed": str(n)}, remove=[])
    agent.kill9()


def ms_row(name: str, values: list[float]) -> tuple[str, str, str]:
    ms = [v * 1000 for v in values]
    return (name, f"{statistics.median(ms):.1f} ms",
            f"p99 {pct(ms, 99):.1f} ms over {len(ms)} calls")


class TreeAgent(AgentProcess):
    """An agent run from a given source tree (PYTHONPATH), else this one."""

    def __init__(self, tmp: Path, netns: str, src: Path | None, *extra: str) -> None:
        super().__init__(tmp, netns, *extra)
        self.src = src

    def start(self, env: dict[str, str] | None = None) -> float:
        if self.src is None:
            return super().start(env)
        return super().start({**(env or os.environ), "PYTHONPATH": str(self.src)})


def side_by_side(args: argparse.Namespace, tmp: Path, tag: str,
                 spaces: list[str]) -> list[tuple[str, str, str]]:
    """This tree and `args.baseline`, both loaded, taking turns."""
    rows: list[tuple[str, str, str]] = []
    with baseline_tree(args.baseline) as src:
        trees: dict[str, Path | None] = {"this tree": HERE / "src", args.baseline: src}
        agents: dict[str, TreeAgent] = {}
        docs = manifests(make_cluster(args.pods, args.policies))
        results: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
        try:
            for j, (name, tree) in enumerate(trees.items()):
                host = f"{tag}-v{j}"
                node_namespace(args, host, spaces)
                d = tmp / f"v{j}"
                d.mkdir()
                agents[name] = TreeAgent(d, host, tree, *agent_args(args))
                agents[name].start()
            loads: dict[str, list[float]] = {name: [] for name in trees}
            for i in range(args.loads):
                # More loads, each into an agent of its own, the trees taking turns.
                for j, name in enumerate(list(trees) if i % 2 else list(trees)[::-1]):
                    host = f"{tag}-l{i}{j}"
                    node_namespace(args, host, spaces)
                    d = tmp / f"l{i}{j}"
                    d.mkdir()
                    extra = TreeAgent(d, host, trees[name], *agent_args(args))
                    extra.start()
                    try:
                        t0 = time.perf_counter()
                        extra.call("apply", documents=docs, source="bench")
                        loads[name].append(time.perf_counter() - t0)
                    finally:
                        extra.stop()
            for name, agent in agents.items():
                t0 = time.perf_counter()
                agent.call("apply", documents=docs, source="bench")
                loads[name].append(time.perf_counter() - t0)
            for i in range(args.rounds):
                order = list(agents) if i % 2 else list(agents)[::-1]
                for name in order:
                    for what, values in measure(agents[name], 1, True, start=i).items():
                        results[name].setdefault(what, []).extend(values)
            for i in range(2):
                order = list(agents) if i % 2 else list(agents)[::-1]
                for name in order:
                    rate, lat = parallel(agents[name], args.clients, args.seconds, args.pods)
                    results[name].setdefault("parallel rate", []).append(rate)
                    results[name].setdefault("parallel latency", []).extend(lat)
            for name, agent in agents.items():
                results[name]["rss"] = [agent.rss_mb()]
            for i in range(6):
                # A clean stop (the warm start, agent/warm.py), a change and kill -9, and
                # kill -9 with nothing kept (cold, as after an upgrade), in turns.
                order = list(agents) if i % 2 else list(agents)[::-1]
                for name in order:
                    if i < 2:
                        agents[name].stop()
                        results[name].setdefault("restart", []).append(agents[name].start())
                    elif i < 4:
                        crash(agents[name], i)
                        results[name].setdefault("restart after kill -9", []).append(
                            agents[name].start())
                    else:
                        crash(agents[name], i)
                        agents[name].forget_warm()
                        results[name].setdefault("restart with nothing kept", []).append(
                            agents[name].start())
        finally:
            for agent in agents.values():
                agent.stop()
        for name in trees:
            r = results[name]
            rows.append((f"[{name}] load everything", f"{statistics.median(loads[name]):.2f} s",
                         "runs: " + ", ".join(f"{x:.2f}" for x in loads[name])))
            for what in ("relabel endpoint", "add endpoint", "delete endpoint",
                         "change policy", OUTSIDE):
                rows.append(ms_row(f"[{name}] {what}", r[what]))
            rows.append((f"[{name}] endpoint changes/s, {args.clients} clients",
                         f"{statistics.median(r['parallel rate']):.0f}/s",
                         "runs: " + ", ".join(f"{x:.0f}" for x in r["parallel rate"])))
            rows.append(ms_row(f"[{name}] ... their latency", r["parallel latency"]))
            rows.append((f"[{name}] memory (RSS)", f"{r['rss'][0]:.0f} MB", ""))
            for what in ("restart", "restart after kill -9", "restart with nothing kept"):
                rows.append((f"[{name}] {what}", f"{min(r[what]):.1f} s",
                             "runs: " + ", ".join(f"{x:.1f}" for x in r[what])))
    return rows


Goal = tuple[str, str, bool]  # (goal, measured, met)


def node_namespace(args: argparse.Namespace, host: str, spaces: list[str]) -> None:
    """The agent's namespace, with `--ports` veth ports on a bridge as a node's pods
    (what the eBPF datapath attaches to); every namespace made is listed in `spaces`."""
    create_netns(host)
    spaces.append(host)
    peers = add_ports(host, args.ports)
    if peers:
        spaces.append(peers)


def agent_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The agent's arguments that choose its datapath (none: the default, nft), and with
    `--metrics` a metrics server on a free port, as the DaemonSet serves one."""
    return ((("--datapath", args.datapath) if args.datapath != "nft" else ())
            + (("--metrics-address", "127.0.0.1:0") if args.metrics else ()))


def alone(args: argparse.Namespace, tmp: Path, tag: str, spaces: list[str],
          goals: list[Goal] | None = None) -> list[tuple[str, str, str]]:
    """The rows of the table; `goals` gets issue #11's agent goals, each met or not."""
    rows: list[tuple[str, str, str]] = []
    goals = [] if goals is None else goals
    for big in (False, True):
        d = tmp / ("big" if big else "small")
        d.mkdir()
        # A namespace each: the empty agent's table outlives it (owned, persistent),
        # and an agent with a new, empty store refuses to replace a table in force.
        host = f"{tag}-{d.name}"
        node_namespace(args, host, spaces)
        agent = AgentProcess(d, host, *agent_args(args))
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
                goals.append(("load everything <= 2 s", f"{load:.1f} s", load <= 2.0))
            rss = agent.rss_mb()
            results = measure(agent, args.rounds, big)
            for name, values in results.items():
                rows.append(ms_row(f"{name}, {size}", values))
                if big and name != OUTSIDE:
                    p99 = pct([v * 1000 for v in values], 99)
                    goals.append((f"{name}: p99 <= 10 ms", f"{p99:.1f} ms", p99 <= 10.0))
            if big:
                before = agent.call("status").get("groupCommits", {})
                rate, lat = parallel(agent, args.clients, args.seconds, args.pods)
                after_ = agent.call("status").get("groupCommits", {})
                callers = after_.get("callers", 0) - before.get("callers", 0)
                batches = after_.get("batches", 0) - before.get("batches", 0)
                rows.append((f"endpoint changes/s, {args.clients} parallel clients, {size}",
                             f"{rate:.0f}/s",
                             f"{callers} of {len(lat)} calls in {batches} group commits"
                             f" (agent/group.py)" if batches else ""))
                rows.append(ms_row("... their latency", lat))
                goals.append((f"1,000 endpoint changes/s, {args.clients} parallel clients",
                              f"{rate:.0f}/s", rate >= 1000))
            rows.append((f"agent memory (RSS), {size}", f"{rss:.0f} MB", ""))
            if big:
                stopping = agent.stop()
                t = agent.start()
                after = agent.rss_mb()
                rows.append(("restart after a clean stop (warm: kept at the stop)",
                             f"{t:.1f} s", f"RSS {after:.0f} MB; the stop took "
                             f"{stopping:.1f} s"))
                crash(agent, 0)
                crashed = agent.start()
                after = max(after, agent.rss_mb())
                rows.append(("restart after a change and kill -9 (warm: the change folded in)",
                             f"{crashed:.1f} s", f"RSS {agent.rss_mb():.0f} MB"))
                crash(agent, 1)
                agent.forget_warm()
                cold = agent.start()
                after = max(after, agent.rss_mb())
                rows.append(("restart with nothing kept (cold, as after an upgrade: load, "
                             "check, compile, adopt)", f"{cold:.1f} s",
                             f"RSS {agent.rss_mb():.0f} MB"))
                goals.append(("restart in sync <= 2 s (after a clean stop; after kill -9)",
                              f"{t:.1f}; {crashed:.1f} s", max(t, crashed) <= 2.0))
                goals.append(("restart in sync <= 2 s with nothing kept (after an upgrade)",
                              f"{cold:.1f} s", cold <= 2.0))
                most = max(rss, after)
                goals.append(("<= 200 MB resident (loaded; after a restart)",
                              f"{rss:.0f}; {after:.0f} MB", most <= 200))
        finally:
            agent.stop()
    return rows


def main() -> None:
    exit_on_sigterm()
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--policies", type=int, default=1_000)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--clients", type=int, default=16, help="parallel clients")
    ap.add_argument("--seconds", type=float, default=5.0, help="of parallel changes")
    ap.add_argument("--baseline", help="an earlier commit, run side by side with this tree")
    ap.add_argument("--loads", type=int, default=4,
                    help="side by side: loads into fresh agents, in turns, besides the first")
    ap.add_argument("--datapath", default="nft", choices=("nft", "iptables", "ebpf"),
                    help="the agent's datapath (the goals are the same on each)")
    ap.add_argument("--ports", type=int, default=0,
                    help="veth ports on a bridge in each agent's namespace (a node's pods)")
    ap.add_argument("--metrics", action="store_true",
                    help="each agent serves /metrics (as deploy/agent-daemonset.yaml runs it)")
    ap.add_argument("--json", metavar="FILE", help="also write the results for bench/report.py")
    args = ap.parse_args()
    tag = f"ba{secrets.token_hex(2)}"
    tmp = Path(tempfile.mkdtemp(prefix="stockade-bench-"))
    spaces: list[str] = []
    goals: list[Goal] = []
    try:
        rows = (side_by_side(args, tmp, tag, spaces) if args.baseline
                else alone(args, tmp, tag, spaces, goals))
    finally:
        for host in spaces:
            remove_netns(host)
            remove_pins(host)  # an agent on eBPF pins under its namespace's name
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(("measure", "value", "notes"), rows)
    out = Results("agent", " ".join(["bench/agent.py", *sys.argv[1:]]))
    out.table(f"the agent with {args.pods:,} pods and {args.policies:,} policies",
              ("measure", "value", "notes"), rows)
    size = (f" ({args.pods:,} pods, {args.policies:,} policies"
            + (f", {args.datapath}" if args.datapath != "nft" else "")
            + (f", {args.ports} bridge ports" if args.ports else "") + ")")
    for text, measured, met in goals:
        out.goal(text + size, measured, met)
    out.write(args.json)


if __name__ == "__main__":
    main()
