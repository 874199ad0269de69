"""An endpoint's change on the eBPF datapath alone, this tree against an earlier commit.

Inside the agent an add's apply shares the machine with the store's fsync and the
agent's other threads, and on a small virtual machine that moves its time more than the
code does (README, twenty-sixth round). Here the datapath alone takes the agent's
change, in a process of its own: a pod with labels no other pod has (a new identity)
added, then deleted, `--changes` times at `--pods` endpoints and `--policies`
policies (bench/synthetic.py), each change given as the agent gives it (the
incremental compiler's next ruleset to `EbpfDatapath.apply`). The two trees take turns
`--runs` times; each run's p50 and p99 are printed, and the median over the runs.
Run as root: each run loads the program into a namespace of its own and removes it.
`--ports N` puts N veth ports on a bridge in that namespace first, as a node's pods
are (the programs are attached to each): what an apply pays for the ports it keeps.
Every tenth change two more are timed: a new port put on the bridge and the apply that
attaches the programs to it (what a pod's ADD waits for), and the link check the
agent polls every second (`skeleton_intact`). `--attach clsact` takes the fallback of
kernels without tcx links.

    .venv/bin/python bench/ebpf_change.py --baseline REV [--runs 3] [--changes 300] \
        [--ports N] [--attach tcx|clsact]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (
    ROOT,
    SRC,
    add_ports,
    baseline_tree,
    byte_compile,
    exit_on_sigterm,
    pct,
    print_table,
)

KINDS = ("add", "delete")
EVERY_TENTH = ("new port", "link check")


def child(pods: int, policies: int, changes: int, ports: int, attach: str) -> None:
    """One run in this process (whose `stockade` is the tree under test): JSON on stdout."""
    from stockade.compile.incremental import IncrementalCompiler
    from stockade.datapath.ebpf import EbpfDatapath
    from stockade.model.cluster import Endpoint
    from stockade.model.labels import Labels
    from stockade.net.namespace import create_netns, entered, netns_path, remove_netns
    from stockade.net.rtnl import Rtnl, ensure_bridge
    from synthetic import make_cluster

    host = f"ec{secrets.token_hex(2)}-host"
    create_netns(host)
    peers = None
    dp = EbpfDatapath("bench", netns=host, attach=attach)
    try:
        peers = add_ports(host, ports)
        if peers is None:  # for the new ports' other ends
            peers = f"{host}-peers"
            create_netns(peers)
        dp.check()
        inc = IncrementalCompiler.of(make_cluster(pods, policies))
        dp.apply(inc.ruleset())
        labels = Labels({"app": "app7", "tier": "api", "env": "prod"})  # in no pod of ns3
        times: dict[str, list[float]] = {k: [] for k in KINDS + EVERY_TENTH}
        peers_fd = os.open(netns_path(peers), os.O_RDONLY | os.O_CLOEXEC)
        for i in range(changes):
            # the pod network's addresses past its pods, as bench/agent.py adds them
            address = f"10.128.{250 + i // 250 % 6}.{i % 250 + 1}"
            inc.upsert_endpoint(Endpoint("ns3", f"new{i}", labels, (address,)))
            for kind in KINDS:
                rs = inc.ruleset()
                t0 = time.perf_counter()
                dp.apply(rs)
                times[kind].append((time.perf_counter() - t0) * 1000)
                if kind == "add":
                    inc.delete_endpoint(f"ns3/new{i}")
            if i % 10 == 0:
                with entered(host), Rtnl() as nl:
                    nl.add_veth(f"new{i}", ensure_bridge(nl, "br0").index, f"newpeer{i}",
                                peers_fd)
                t0 = time.perf_counter()
                dp.apply(rs)
                times["new port"].append((time.perf_counter() - t0) * 1000)
                t0 = time.perf_counter()
                intact = dp.skeleton_intact()
                times["link check"].append((time.perf_counter() - t0) * 1000)
                assert intact
        os.close(peers_fd)
        print(json.dumps(times))
    finally:
        dp.remove()
        remove_netns(host)
        if peers:
            remove_netns(peers)


def run(src: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(src), str(ROOT / "bench")))}
    out = subprocess.run([sys.executable, __file__, "--child", "--pods", str(args.pods),
                          "--policies", str(args.policies), "--changes", str(args.changes),
                          "--ports", str(args.ports), "--attach", args.attach],
                         env=env, check=True, capture_output=True, text=True)
    got: dict[str, list[float]] = json.loads(out.stdout.strip().splitlines()[-1])
    return got


def main() -> None:
    exit_on_sigterm()
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", help="an earlier commit, in turns with this tree")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--changes", type=int, default=300)
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--policies", type=int, default=1_000)
    ap.add_argument("--ports", type=int, default=0,
                    help="veth ports on a bridge in the namespace (a node's pods)")
    ap.add_argument("--attach", default="tcx", choices=("tcx", "clsact"),
                    help="tcx links, or clsact filters (kernels before 6.6)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.pods, args.policies, args.changes, args.ports, args.attach)
        return
    if not args.baseline:
        ap.error("--baseline REV is required")
    results: dict[str, list[dict[str, list[float]]]] = {}
    with baseline_tree(args.baseline) as base:
        byte_compile(SRC)
        trees = {"this tree": SRC, args.baseline: base}
        for i in range(args.runs):  # in turns, the order swapping each run
            for name, src in list(trees.items())[::1 if i % 2 else -1]:
                results.setdefault(name, []).append(run(src, args))
    rows = []
    for name, runs in results.items():
        for kind in KINDS + EVERY_TENTH:
            p50s = [statistics.median(r[kind]) for r in runs]
            p99s = [pct(r[kind], 99) for r in runs]
            rows.append((f"[{name}] {kind}, {args.pods} endpoints, {args.policies} policies"
                         + (f", {args.ports} ports" if args.ports else "")
                         + (", clsact" if args.attach == "clsact" else ""),
                         f"{statistics.median(p50s):.2f} ms",
                         f"p99 {statistics.median(p99s):.2f} ms; per run p50 "
                         + ", ".join(f"{v:.2f}" for v in p50s)
                         + "; p99 " + ", ".join(f"{v:.2f}" for v in p99s)))
    print_table(("measure (EbpfDatapath.apply, median of runs)", "p50", "notes"), rows)


if __name__ == "__main__":
    main()
