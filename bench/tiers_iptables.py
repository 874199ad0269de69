"""The per-connection cost of ClusterNetworkPolicy tiers on iptables, beside nftables.

The clusters of bench/tiers.py (10,000 synthetic endpoints, 1,000 NetworkPolicies,
a server isolated by one of them and a client it allows, and `--cnps` policies per
tier whose rules match no bench pod, so that a new connection walks every rule of
the policies selecting its ends), on nftables and on both iptables backends. Each
(datapath, variant) sample takes a fresh host namespace (bench/datapaths.py `Pair`):
new TCP connections per second with no ruleset, then with the ruleset loaded; the
ratio is to that baseline taken right before. All samples take turns, `--rounds`
times, so that the noise of a shared machine falls on every variant alike.

Only packets conntrack has not seen answered meet the tiers: the first of a TCP
connection, and every datagram of a one-way UDP flood. So what is measured is new
TCP connections per second (and their p99 latency) and UDP datagrams per second.
"""

from __future__ import annotations

import argparse
import secrets
import signal
import statistics
import sys
import tempfile
import time
from typing import Any

from common import print_markdown, timed
from datapaths import (
    Pair,
    add_cpu_argument,
    bench_cluster,
    cell,
    chosen_cpu,
    fmt_time,
    open_datapath,
    placement,
    release,
    take_turns,
)
from iptables import build_loadgen
from stockade.compile.lower import compile_cluster
from stockade.datapath.base import require_bridge_netfilter
from tiers import variant_cluster

DATAPATHS = ("nft", "iptables (nf_tables)", "iptables (legacy)")
VARIANTS = ("np only", "admin, one ns each", "admin, every ns", "both, every ns")


def one_sample(datapath: str, tag: str, index: int, loadgen: str, rs: Any,
               secs: float, cpu: int | None = None) -> dict[str, float]:
    pair = Pair(tag, index, loadgen, cpu)
    dp: Any = None
    try:
        assert not pair.isolated(), "the server is unreachable without a ruleset"
        base_rate, _, base_p99, _ = pair.crr(secs)
        base_pps = pair.udp(secs)
        require_bridge_netfilter(pair.host, "the FORWARD hook")
        dp = open_datapath(datapath, tag, pair.host)
        dp.check()
        t_load, _ = timed(lambda: dp.apply(rs))
        assert pair.isolated(), f"{datapath}: the server is not isolated"
        rate, _, p99, failed = pair.crr(secs)
        pps = pair.udp(secs)
        return {"crr": rate / base_rate if base_rate else float("nan"), "p99": p99,
                "base_p99": base_p99, "pps": pps / base_pps if base_pps else float("nan"),
                "load": t_load, "failed": failed}
    finally:
        release(pair, dp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--policies", type=int, default=1_000)
    ap.add_argument("--cnps", type=int, default=1_000, help="ClusterNetworkPolicies per tier")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3.0, help="per connection-rate test")
    add_cpu_argument(ap)
    args = ap.parse_args()
    cpu = chosen_cpu(ap, args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on a kill too
    t_start = time.monotonic()
    tag = f"ti{secrets.token_hex(2)}"
    tmp = tempfile.TemporaryDirectory()
    loadgen = build_loadgen(tmp.name)
    base_cluster = bench_cluster(args.pods, args.policies)
    compiled = {}
    for v in VARIANTS:
        compiled[v] = compile_cluster(variant_cluster(base_cluster, v, args.cnps))
        print(f"{v}: {compiled[v].counts()}", file=sys.stderr)
    names = [f"{d} | {v}" for v in VARIANTS for d in DATAPATHS]
    samples, failures = take_turns(names, args.rounds, lambda name, index: one_sample(
        name.split(" | ")[0], tag, index, loadgen, compiled[name.split(" | ")[1]],
        args.seconds, cpu))

    rows = []
    for v in VARIANTS:
        for key, label, fmt in (
                ("crr", "new TCP connections/s, ratio", lambda x: f"{x:.2f}"),
                ("p99", "  their p99 latency (µs)", lambda x: f"{x:.0f}"),
                ("pps", "UDP datagrams/s, ratio", lambda x: f"{x:.2f}"),
                ("load", "load (one apply)", fmt_time)):
            rows.append([v if key == "crr" else "", label, *(
                cell([g[key] for g in samples[f"{d} | {v}"]], fmt) for d in DATAPATHS)])
    counts = {v: compiled[v].counts() for v in VARIANTS}
    print(f"\n{args.pods:,} endpoints, {args.policies:,} NetworkPolicies, {args.cnps:,} "
          f"ClusterNetworkPolicies per tier where there are any (compiled chains / rules: "
          + "; ".join(f"{v} {counts[v]['chains']:,} / {counts[v]['rules']:,}" for v in VARIANTS)
          + f"). Ratios to the same pair with no ruleset, measured right before (TCP: "
          f"connect, 64 B request, 64 B answer, close; UDP: 64-byte datagrams, one flow; "
          f"{args.seconds:g} s each); {args.rounds} rounds, every (datapath, variant) in "
          f"turn; {placement(cpu)}; median (min-max). Run took "
          f"{(time.monotonic() - t_start) / 60:.0f} min.\n")
    print_markdown(("variant", "measure", *DATAPATHS), rows)
    if failures:
        print(f"\nfailed samples: {', '.join(failures)}")
    med = {n: statistics.median([g["crr"] for g in s]) for n, s in samples.items() if s}
    print(f"\n{med}", file=sys.stderr)


if __name__ == "__main__":
    main()
