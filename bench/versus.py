"""This tree against an earlier commit: the CNI path and the agent, interleaved in one run.

A machine shared with other work is too noisy to compare two runs of
`bench/cni.py` made minutes apart (the same tree's p50 moved from 3 to 17 ms
between runs here). So both versions run at once and take turns, call by
call, and only their ratio is read:

* the plugin process: `VERSION` (interpreter start and imports) and a
  main-mode `ADD` + `DEL` of a fresh network namespace, each version's
  plugin against the same agent (the socket protocol did not change);
* the agent's part (`cni.add` over the socket: validate, store, compile,
  kernel), each version's own agent in its own namespace, on an empty agent
  and on one loaded with synthetic endpoints and policies;
* the agent at scale (`--agent-pods`, default 10,000 with a tenth as many
  policies): the time to load everything, then `bench/agent.py`'s relabel,
  add-endpoint and change-policy calls, the two agents taking turns.

The baseline is checked out with `git worktree` into a temporary directory
and removed afterwards. Run as root:
``.venv/bin/python bench/versus.py --baseline 0dd0e77 [--rounds 60] [--pods 5000]
[--agent-pods 10000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent import measure
from cni import LABELS, POD, SELECTING
from common import AgentProcess, baseline_tree, exit_on_sigterm, pct, print_table
from stockade.agent.client import AgentClient
from stockade.net.namespace import create_netns, remove_netns
from synthetic import make_cluster, manifests

HERE = Path(__file__).resolve().parent.parent
NS3 = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns3"}}


def start_agent(src: Path, netns: str, pods: int) -> AgentProcess:
    agent = AgentProcess(Path(tempfile.mkdtemp(prefix="stockade-versus-")), netns)
    agent.start({**os.environ, "PYTHONPATH": str(src)})
    if pods:
        agent.call("apply", documents=manifests(make_cluster(pods, pods // 10)))
    agent.call("apply", documents=[NS3, SELECTING])
    return agent


def plugin(src: Path, host: str, command: str, conf: dict[str, Any], cid: str,
           netns: str) -> tuple[float, Any]:
    env = {**os.environ, "PYTHONPATH": str(src), "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
           "CNI_NETNS": netns, "CNI_IFNAME": "eth0", "CNI_ARGS": POD.format(name=cid),
           "CNI_PATH": "/usr/lib/cni"}
    t0 = time.perf_counter()
    proc = subprocess.run(["nsenter", f"--net=/run/netns/{host}", "--", sys.executable, "-c",
                           "from stockade.cni.plugin import main; main()"],
                          input=json.dumps(conf).encode(), capture_output=True, env=env,
                          check=False)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{command} with {src} failed: {proc.stdout!r} {proc.stderr!r}")
    return took, json.loads(proc.stdout) if proc.stdout.strip() else None


def plugin_rounds(trees: dict[str, Path], host: str, agent: AgentProcess,
                  rounds: int) -> dict[str, list[float]]:
    conf = {"cniVersion": "1.0.0", "name": "vsnet", "type": "stockade-cni", "bridge": "vsbr0",
            "vethPrefix": "vs", "dataDir": str(Path(agent.socket).parent / "cni"),
            "socket": agent.socket, "args": {"labels": LABELS}}
    out: dict[str, list[float]] = {}
    for i in range(rounds):
        for name in (list(trees) if i % 2 else list(trees)[::-1]):
            src = trees[name]
            took, _ = plugin(src, host, "VERSION", conf, "v", "")
            out.setdefault(f"VERSION ({name})", []).append(took)
            ns = f"{host}-{name[0]}{i}"
            create_netns(ns)
            try:
                cid = ns.replace("-", "x")
                took, result = plugin(src, host, "ADD", conf, cid, f"/run/netns/{ns}")
                out.setdefault(f"ADD main mode ({name})", []).append(took)
                plugin(src, host, "DEL", {**conf, "prevResult": result}, cid,
                       f"/run/netns/{ns}")
            finally:
                remove_netns(ns)
    return out


def agent_rounds(agents: dict[str, AgentProcess], rounds: int,
                 label: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    clients = {name: AgentClient(a.socket, timeout=600) for name, a in agents.items()}
    try:
        for i in range(rounds):
            for name in (list(clients) if i % 2 else list(clients)[::-1]):
                ident = {"network": "direct", "containerID": f"d{i}", "ifname": "eth0"}
                t0 = time.perf_counter()
                clients[name].call("cni.add", **ident, allocate=True, labels=LABELS, sync=True,
                                   endpoint={"namespace": "ns3", "name": f"d{i}"})
                out.setdefault(f"cni.add, agent only, {label} ({name})", []).append(
                    time.perf_counter() - t0)
                clients[name].call("cni.del", **ident, sync=True)
    finally:
        for c in clients.values():
            c.close()
    return out


def scale_rounds(trees: dict[str, Path], tag: str, pods: int,
                 rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    agents: dict[str, AgentProcess] = {}
    spaces = {name: f"{tag}-s{name[0]}" for name in trees}
    docs = manifests(make_cluster(pods, pods // 10))
    try:
        for name, src in trees.items():
            create_netns(spaces[name])
            agents[name] = start_agent(src, spaces[name], 0)
            t0 = time.perf_counter()
            agents[name].call("apply", documents=docs, source="bench")
            out[f"load {pods} endpoints, {pods // 10} policies ({name})"] = [
                time.perf_counter() - t0]
        for i in range(rounds):
            for name in (list(agents) if i % 2 else list(agents)[::-1]):
                for what, values in measure(agents[name], 1, True, start=i).items():
                    out.setdefault(f"{what}, {pods} endpoints ({name})", []).extend(values)
    finally:
        for agent in agents.values():
            agent.stop()
        for ns in spaces.values():
            remove_netns(ns)
    return out


def rows_of(results: dict[str, list[float]], warmup: int) -> list[tuple[str, str, str, str]]:
    rows = []
    for name, values in sorted(results.items()):
        ms = [v * 1000 for v in (values[warmup:] if len(values) > warmup else values)]
        rows.append((name, f"{statistics.median(ms):.1f}", f"{pct(ms, 90):.1f}",
                     f"{min(ms):.1f}"))
    return rows


def main() -> None:
    exit_on_sigterm()
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True, help="the commit to compare with")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--pods", type=int, default=5_000)
    ap.add_argument("--agent-pods", type=int, default=10_000)
    args = ap.parse_args()
    tag = f"vs{secrets.token_hex(2)}"
    results: dict[str, list[float]] = {}
    with baseline_tree(args.baseline) as old:
        trees = {"baseline": old, "this tree": HERE / "src"}
        for pods in (0, args.pods):
            spaces = {name: f"{tag}-{name[0]}{pods}" for name in trees}
            agents: dict[str, AgentProcess] = {}
            try:
                for name, src in trees.items():
                    create_netns(spaces[name])
                    agents[name] = start_agent(src, spaces[name], pods)
                size = f"{pods} endpoints" if pods else "empty"
                results |= agent_rounds(agents, args.rounds * 3, size)
                if not pods:
                    results |= plugin_rounds(trees, spaces["baseline"], agents["baseline"],
                                             args.rounds)
            finally:
                for agent in agents.values():
                    agent.stop()
                for ns in spaces.values():
                    remove_netns(ns)
        if args.agent_pods:
            results |= scale_rounds(trees, tag, args.agent_pods, args.rounds)
    print_table(("measure", "p50 ms", "p90 ms", "min ms"), rows_of(results, warmup=5))


if __name__ == "__main__":
    main()
