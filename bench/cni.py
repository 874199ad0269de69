"""Benchmark of the CNI plugin: the time from ADD to an enforced policy.

ADD returns only once the kernel enforces the new endpoint's policy, so the
latency of an ADD *is* the time from the runtime's call to enforcement
(each run also checks, once, that the address is in the kernel's table when
ADD returns). Measured as a runtime sees it: a plugin process started with
``CNI_*`` variables and JSON on stdin, in a private "host" network namespace,
against a real agent with the CNI extension.

Variants, side by side, on an empty agent and on one loaded with thousands
of endpoints and hundreds of policies (the new endpoint is labelled like the
synthetic pods, and one policy always selects it, so every ADD changes the
kernel's verdict maps and sets):

* main mode, address from the agent's pool, with the Python plugin and with the
  thin one (`cni/stockade-cni.c`, `make cni`: the agent runs the plugin), taking turns;
* the thin plugin with an agent in a podman container shaped as the DaemonSet's
  (`tests/support/daemonset.py`: its own PID and mount namespaces, four capabilities),
  loaded alike, taking turns with the agent on the host;
* main mode, address from ``host-local`` (a second process per ADD);
* chained after the reference ``bridge`` + ``host-local``: stockade's part
  alone and the whole chain;
* the agent's part alone (``cni.add`` over the socket: allocate, store,
  compile, kernel), i.e. without process start-up and netlink plumbing;
* DEL in main mode;
* 50 ADDs at once (wall time and per-ADD latency), the thin plugin's taking turns
  with the reference ``bridge`` + ``host-local`` alone (no agent, no policy): what
  creating that many veth pairs at once costs this machine, the floor of any plugin.

``--datapath ebpf`` runs the agent on eBPF; ``--attach-turns`` compares, loaded, the
thin plugin's measures with the eBPF programs on tcx links and on clsact filters.

Run as root: ``.venv/bin/python bench/cni.py [--rounds 100] [--pods 5000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.daemonset import Contained

from common import AgentProcess, byte_compile, exit_on_sigterm, pct, remove_pins
from results import Results
from stockade.agent.client import AgentClient
from stockade.datapath import ATTACH_MODES
from stockade.net.namespace import create_netns, remove_netns
from synthetic import make_cluster, manifests

PLUGIN = str(Path(sys.executable).parent / "stockade-cni")
HERE = Path(__file__).resolve().parent.parent
THIN = str(HERE / "build" / "cni" / "stockade-cni")
REFERENCE = "/usr/lib/cni"
POD = "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns3;K8S_POD_NAME={name}"
LABELS = {"app": "app7", "tier": "api", "env": "prod"}
# Selects every new endpoint, so each ADD changes the kernel's maps, not just nothing.
SELECTING = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "bench-app7", "namespace": "ns3"},
             "spec": {"podSelector": {"matchLabels": {"app": "app7"}},
                      "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "web"}}}],
                                   "ports": [{"port": 8080}]}]}}

def plugin(exe: str, command: str, conf: dict[str, Any], host: str, cid: str, netns: str,
           args: str = "") -> tuple[float, dict[str, Any] | None]:
    env = {**os.environ, "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns,
           "CNI_IFNAME": "eth0", "CNI_ARGS": args, "CNI_PATH": REFERENCE}
    t0 = time.perf_counter()
    proc = subprocess.run(["nsenter", f"--net=/run/netns/{host}", "--", exe],
                          input=json.dumps(conf).encode(), capture_output=True, env=env,
                          check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{command} failed: {proc.stdout.decode()} {proc.stderr.decode()}")
    text = proc.stdout.decode().strip()
    return elapsed, json.loads(text) if text else None


class Bench:
    def __init__(self, tag: str, tmp: Path, host: str, agent: AgentProcess) -> None:
        self.tag, self.tmp, self.host, self.agent = tag, tmp, host, agent
        self.seq = 0
        self.checked = False
        cmd = agent.cmd
        self.datapath = cmd[cmd.index("--datapath") + 1] if "--datapath" in cmd else "nft"

    def conf(self, **extra: Any) -> dict[str, Any]:
        return {"cniVersion": "1.0.0", "name": "benchnet", "type": "stockade-cni",
                "bridge": "bcbr0", "vethPrefix": "bc", "dataDir": str(self.tmp / "cni"),
                "socket": self.agent.socket, "args": {"labels": LABELS}, **extra}

    def host_local(self, subnet: str) -> dict[str, Any]:
        return {"type": "host-local", "subnet": subnet, "dataDir": str(self.tmp / "hl"),
                "routes": [{"dst": "0.0.0.0/0"}]}

    def netns(self) -> tuple[str, str]:
        self.seq += 1
        name = f"{self.tag}-{self.seq}"
        create_netns(name)
        return name, f"/run/netns/{name}"

    def enforced(self, result: dict[str, Any] | None) -> None:
        """Once per run: the address is in the kernel's table the moment ADD returned."""
        if self.checked or result is None:
            return
        address = result["ips"][0]["address"].split("/")[0]
        show = (["ip", "netns", "exec", self.host, "nft", "list", "table", "inet", "stockade"]
                if self.datapath == "nft" else
                [sys.executable, "-m", "stockade.cli.main", "dataplane", "show", "--datapath",
                 "ebpf", "--netns", self.host])
        table = subprocess.run(show, capture_output=True, text=True, check=True).stdout
        if address not in table:
            raise SystemExit(f"{address} is not in the kernel's table after ADD")
        self.checked = True

    def main_mode(self, rounds: int, conf: dict[str, Any],
                  exe: str = PLUGIN) -> tuple[list[float], list[float]]:
        adds, dels = [], []
        for _ in range(rounds):
            name, path = self.netns()
            cid = name.replace("-", "x")
            took, out = plugin(exe, "ADD", conf, self.host, cid, path, POD.format(name=cid))
            self.enforced(out)
            adds.append(took)
            took, _ = plugin(exe, "DEL", {**conf, "prevResult": out}, self.host, cid, path,
                             POD.format(name=cid))
            dels.append(took)
            remove_netns(name)
        return adds, dels

    def bridge(self) -> dict[str, Any]:
        """The reference bridge plugin's configuration, with host-local addresses."""
        return {"cniVersion": "1.0.0", "name": "benchchain", "type": "bridge",
                "bridge": "bcchain0", "isGateway": True,
                "ipam": self.host_local("10.253.0.0/16")}

    def chained(self, rounds: int) -> tuple[list[float], list[float]]:
        bridge = self.bridge()
        ours = self.conf(name="benchchain", mode="chained")
        ours_only, whole = [], []
        for _ in range(rounds):
            name, path = self.netns()
            cid = name.replace("-", "x")
            args = POD.format(name=cid)
            t1, prev = plugin(os.path.join(REFERENCE, "bridge"), "ADD", bridge, self.host, cid,
                              path, args)
            t2, out = plugin(PLUGIN, "ADD", {**ours, "prevResult": prev}, self.host, cid, path,
                             args)
            ours_only.append(t2)
            whole.append(t1 + t2)
            plugin(PLUGIN, "DEL", {**ours, "prevResult": out}, self.host, cid, path, args)
            plugin(os.path.join(REFERENCE, "bridge"), "DEL", {**bridge, "prevResult": out},
                   self.host, cid, path, args)
            remove_netns(name)
        return ours_only, whole

    def agent_only(self, rounds: int) -> list[float]:
        out = []
        with AgentClient(self.agent.socket, timeout=600) as c:
            for i in range(rounds):
                ident = {"network": "direct", "containerID": f"direct{i}", "ifname": "eth0"}
                t0 = time.perf_counter()
                c.call("cni.add", **ident, allocate=True, labels=LABELS, sync=True,
                       endpoint={"namespace": "ns3", "name": f"direct{i}"})
                out.append(time.perf_counter() - t0)
                c.call("cni.del", **ident, sync=True)
        return out

    def parallel(self, n: int, exe: str = PLUGIN,
                 conf: dict[str, Any] | None = None) -> tuple[float, list[float]]:
        spaces = [self.netns() for _ in range(n)]
        conf = conf or self.conf()

        def add(i: int) -> tuple[float, dict[str, Any] | None]:
            cid = spaces[i][0].replace("-", "x")
            return plugin(exe, "ADD", conf, self.host, cid, spaces[i][1],
                          POD.format(name=cid))

        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(add, range(n)))
        wall = time.perf_counter() - t0

        def delete(i: int) -> None:
            cid = spaces[i][0].replace("-", "x")
            plugin(exe, "DEL", {**conf, "prevResult": results[i][1]}, self.host, cid,
                   spaces[i][1], POD.format(name=cid))

        with ThreadPoolExecutor(n) as pool:
            list(pool.map(delete, range(n)))
        for name, _ in spaces:
            remove_netns(name)
        return wall, [r[0] for r in results]


def row(rows: list[tuple[str, str, str, str]], name: str, size: str,
        values: list[float]) -> None:
    ms = [v * 1000 for v in values]
    rows.append((name, size, f"{statistics.median(ms):.1f}", f"{pct(ms, 99):.1f}"))


def run_size(bench: Bench, rounds: int, size: str,
             rows: list[tuple[str, str, str, str]], parallel: int) -> None:
    # the Python plugin and the thin one take turns, a few ADDs at a time
    adds, dels, thin_adds, thin_dels = [], [], [], []
    for _ in range(max(1, rounds // 5)):
        a, d = bench.main_mode(5, bench.conf())
        adds += a
        dels += d
        a, d = bench.main_mode(5, bench.conf(), THIN)
        thin_adds += a
        thin_dels += d
    row(rows, "ADD main mode, agent's pool", size, adds)
    row(rows, "DEL main mode, agent's pool", size, dels)
    row(rows, "ADD main mode, thin plugin", size, thin_adds)
    row(rows, "DEL main mode, thin plugin", size, thin_dels)
    adds, _ = bench.main_mode(rounds, bench.conf(ipam=bench.host_local("10.252.0.0/16")))
    row(rows, "ADD main mode, host-local", size, adds)
    ours, whole = bench.chained(rounds)
    row(rows, "ADD chained: stockade-cni alone", size, ours)
    row(rows, "ADD chained: bridge + stockade-cni", size, whole)
    row(rows, "cni.add over the socket (agent only)", size, bench.agent_only(rounds))
    wall, each = bench.parallel(parallel)
    row(rows, f"ADD, {parallel} at once (each)", size, each)
    rows.append((f"ADD, {parallel} at once (wall time)", size, f"{wall * 1000:.0f}", ""))
    # Three turns each: the thin plugin, and the reference bridge plugin alone.
    thin: list[float] = []
    reference: list[float] = []
    thin_walls: list[float] = []
    for _ in range(3):
        wall, each = bench.parallel(parallel, THIN)
        thin += each
        thin_walls.append(wall)
        reference += bench.parallel(parallel, os.path.join(REFERENCE, "bridge"),
                                    bench.bridge())[1]
    row(rows, f"ADD, thin plugin, {parallel} at once (each)", size, thin)
    rows.append((f"ADD, thin plugin, {parallel} at once (wall time)", size,
                 f"{statistics.median(thin_walls) * 1000:.0f}", ""))
    row(rows, f"ADD, reference bridge + host-local alone, {parallel} at once (each)", size,
        reference)


def contained_turns(bench: Bench, docs: list[dict[str, Any]], rounds: int, size: str,
                    rows: list[tuple[str, str, str, str]]) -> None:
    """The thin plugin with an agent in a container shaped as the DaemonSet's, loaded as
    `bench`'s, and with `bench`'s agent on the host, taking turns."""
    d = bench.tmp / "contained"
    d.mkdir()
    host = f"{bench.tag}-hostc-{bench.tmp.name}"
    create_netns(host)
    agent = AgentProcess(d, host, "--bridge-prefix", "bc")
    (d / "state").mkdir()
    with Contained(d, f"{bench.tag}-agent-{bench.tmp.name}", [d]) as box:
        agent.cmd = box.command(agent.cmd)
        agent.start()
        try:
            for batch in docs:
                agent.call("apply", documents=batch)
            there = Bench(f"{bench.tag}c", d, host, agent)
            here_adds, here_dels, adds, dels = [], [], [], []
            for _ in range(max(1, rounds // 5)):
                a, dl = bench.main_mode(5, bench.conf(), THIN)
                here_adds += a
                here_dels += dl
                a, dl = there.main_mode(5, there.conf(), THIN)
                adds += a
                dels += dl
            served = agent.call("status")["cniExec"]
            if served["fallbacks"] or not served["calls"]:
                raise SystemExit(f"the contained agent did not serve the calls: {served}")
        finally:
            agent.stop()
    row(rows, "ADD main mode, thin plugin, agent on the host (in turns)", size, here_adds)
    row(rows, "ADD main mode, thin plugin, agent in a container (DaemonSet's shape)", size,
        adds)
    row(rows, "DEL main mode, thin plugin, agent in a container (DaemonSet's shape)", size,
        dels)


def side_by_side(args: argparse.Namespace, tag: str, tmp: Path) -> None:
    """The thin plugin's goal measures (an ADD alone, `--parallel` at once) with this tree's
    agent and `--baseline`'s, both loaded, taking turns: a busy machine weighs on both."""
    from common import baseline_tree

    with baseline_tree(args.baseline) as src:
        turns(args, tag, tmp, {"this tree": (HERE / "src", agent_args(args)),
                               args.baseline: (src, agent_args(args))})


def attach_turns(args: argparse.Namespace, tag: str, tmp: Path) -> None:
    """The same measures with this tree's agent on eBPF, its programs on tcx links and on
    clsact filters (`--ebpf-attach`), taking turns: what a new pod's port costs each."""
    turns(args, tag, tmp, {f"ebpf {mode}": (HERE / "src", ["--datapath", "ebpf",
                                                            "--ebpf-attach", mode])
                           for mode in ("tcx", "clsact")})


def turns(args: argparse.Namespace, tag: str, tmp: Path,
          variants: dict[str, tuple[Path, list[str]]]) -> None:
    """Each variant's agent (a source tree and its arguments), loaded, taking turns."""
    from agent import TreeAgent

    docs = manifests(make_cluster(args.pods, args.policies))
    benches: dict[str, Bench] = {}
    alone: dict[str, list[float]] = {name: [] for name in variants}
    each: dict[str, list[float]] = {name: [] for name in variants}
    walls: dict[str, list[float]] = {name: [] for name in variants}
    reference: list[float] = []  # the reference bridge plugin alone, in turns
    try:
        for j, (name, (tree, extra)) in enumerate(variants.items()):
            d = tmp / f"v{j}"
            d.mkdir()
            host = f"{tag}-host-v{j}"
            create_netns(host)
            agent = TreeAgent(d, host, tree)
            agent.cmd += ["--bridge-prefix", "bc", *extra]
            benches[name] = Bench(f"{tag}-v{j}", d, host, agent)
            agent.start()
            agent.call("apply", documents=[SELECTING])
            agent.call("apply", documents=docs)
        first = next(iter(variants))
        for i in range(max(1, args.rounds // 5)):
            for name in (list(variants) if i % 2 else list(variants)[::-1]):
                bench = benches[name]
                adds, _ = bench.main_mode(5, bench.conf(), THIN)
                alone[name] += adds
                wall, took = bench.parallel(args.parallel, THIN)
                each[name] += took
                walls[name].append(wall)
            bench = benches[first]
            reference += bench.parallel(args.parallel, os.path.join(REFERENCE, "bridge"),
                                        bench.bridge())[1]
    finally:
        for bench in benches.values():
            bench.agent.stop()
        for j in range(len(variants)):
            remove_pins(f"{tag}-host-v{j}")
    size = f"{args.pods} eps/{args.policies + 1} pols"
    print(f"thin plugin, {size}, {' and '.join(variants)} taking turns (p50 / p99 ms):")
    for name in variants:
        ms = [v * 1000 for v in alone[name]]
        par = [v * 1000 for v in each[name]]
        print(f"  [{name}] ADD {statistics.median(ms):.0f} / {pct(ms, 99):.0f} "
              f"({len(ms)} calls); {args.parallel} at once, each "
              f"{statistics.median(par):.0f} / {pct(par, 99):.0f} ({len(par)} calls), wall "
              + ", ".join(f"{w * 1000:.0f}" for w in walls[name]))
    ms = [v * 1000 for v in reference]
    print(f"  [reference bridge + host-local alone, no policy] {args.parallel} at once, each "
          f"{statistics.median(ms):.0f} / {pct(ms, 99):.0f} ({len(ms)} calls)")


def agent_args(args: argparse.Namespace) -> list[str]:
    return ["--datapath", args.datapath, *(["--ebpf-attach", args.ebpf_attach]
                                           if args.datapath == "ebpf" else [])]


def main() -> None:
    exit_on_sigterm()
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--pods", type=int, default=5_000)
    ap.add_argument("--policies", type=int, default=500)
    ap.add_argument("--parallel", type=int, default=50)
    ap.add_argument("--json", metavar="FILE", help="also write the results for bench/report.py")
    ap.add_argument("--no-contained", dest="contained", action="store_false",
                    help="without the agent in a container (podman)")
    ap.add_argument("--baseline", help="an earlier commit: only the thin plugin's goal "
                    "measures, loaded, this tree and that one taking turns")
    ap.add_argument("--datapath", default="nft", choices=("nft", "ebpf"),
                    help="the agent's datapath")
    ap.add_argument("--ebpf-attach", default="auto", choices=ATTACH_MODES,
                    help="with --datapath ebpf: how the programs go on the ports")
    ap.add_argument("--attach-turns", action="store_true",
                    help="only the thin plugin's goal measures, loaded, the agent on eBPF "
                    "with tcx links and with clsact filters taking turns")
    args = ap.parse_args()
    if args.datapath != "nft":
        args.contained = False  # the container's agent is the DaemonSet's, on nftables
    byte_compile()  # the Python plugin is a process per ADD
    tag = f"bc{secrets.token_hex(2)}"
    tmp = Path(tempfile.mkdtemp(prefix="stockade-bench-cni-"))
    rows: list[tuple[str, str, str, str]] = []
    if args.baseline or args.attach_turns:
        try:
            (side_by_side if args.baseline else attach_turns)(args, tag, tmp)
        finally:
            for name in os.listdir("/run/netns"):
                if name.startswith(f"{tag}-"):
                    remove_netns(name)
            shutil.rmtree(tmp, ignore_errors=True)
        return
    try:
        for big in (False, True):
            d = tmp / ("big" if big else "empty")
            d.mkdir()
            # A host of its own per size: the first agent's table outlives it, and a new
            # agent with an empty store refuses to replace a table that enforces something.
            host = f"{tag}-host-{d.name}"
            create_netns(host)
            agent = AgentProcess(d, host, "--bridge-prefix", "bc", *agent_args(args))
            agent.start()
            try:
                size = "1 policy"
                docs = [[SELECTING]]
                if big:
                    docs.append(manifests(make_cluster(args.pods, args.policies)))
                    size = f"{args.pods} eps/{args.policies + 1} pols"
                for batch in docs:
                    agent.call("apply", documents=batch)
                bench = Bench(tag, d, host, agent)
                run_size(bench, args.rounds, size, rows, args.parallel)
                if args.contained:
                    contained_turns(bench, docs, args.rounds, size, rows)
            finally:
                agent.stop()
    finally:
        # the hosts (bridges, veths and the tables go with them) and the containers
        for name in os.listdir("/run/netns"):
            if name.startswith(f"{tag}-"):
                remove_netns(name)
        shutil.rmtree(tmp, ignore_errors=True)
        for name in ("empty", "big"):
            remove_pins(f"{tag}-host-{name}")
    width = max(len(r[0]) for r in rows)
    swidth = max(len(r[1]) for r in rows)
    print(f"{'measure'.ljust(width)}  {'agent'.ljust(swidth)}  {'p50 ms':>8}  {'p99 ms':>8}")
    for name, size, p50, p99 in rows:
        print(f"{name.ljust(width)}  {size.ljust(swidth)}  {p50:>8}  {p99:>8}")
    out = Results("cni", " ".join(["bench/cni.py", *sys.argv[1:]]))
    out.table("CNI ADD to enforced (a plugin process as a runtime starts it)",
              ("measure", "agent", "p50 ms", "p99 ms"), rows)
    loaded = rows[len(rows) // 2:]  # the second half: the agent with the cluster loaded
    size = loaded[0][1]
    by = {name: (p50, p99) for name, _, p50, p99 in loaded}
    for kind, label in (("ADD main mode, agent's pool", "Python plugin"),
                        ("ADD main mode, thin plugin", "thin plugin"),
                        ("ADD main mode, thin plugin, agent in a container (DaemonSet's "
                         "shape)", "thin plugin, agent in a container")):
        if kind not in by:
            continue
        worst = float(by[kind][1])
        out.goal(f"ADD to enforced p99 <= 50 ms ({size}, {label})", f"{worst:.0f} ms",
                 worst <= 50)
    floor = float(by[f"ADD, reference bridge + host-local alone, {args.parallel} at once "
                     "(each)"][1])
    for kind, label in ((f"ADD, {args.parallel} at once (each)", "Python plugin"),
                        (f"ADD, thin plugin, {args.parallel} at once (each)", "thin plugin")):
        each = float(by[kind][1])
        out.goal(f"ADD <= 100 ms each with {args.parallel} at once ({size}, {label}; p99)",
                 f"{each:.0f} ms (the reference bridge plugin alone, no policy, in turns: "
                 f"{floor:.0f} ms)", each <= 100)
    out.series["cni"] = {"y": "ms (p50, p99)", "bars": {
        name: {"p50": float(p50), "p99": float(p99 or 0)} for name, _, p50, p99 in loaded
        if "wall time" not in name}}
    out.write(args.json)


if __name__ == "__main__":
    main()
