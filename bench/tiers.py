"""The per-packet cost of ClusterNetworkPolicy tiers on nftables, with real packets.

One run, the cluster of bench/datapaths.py (10,000 synthetic endpoints, 1,000
NetworkPolicies, a server isolated by one of them and a client it allows), and
variants that add `--cnps` ClusterNetworkPolicies:

- `np only`: no ClusterNetworkPolicy;
- `admin, one ns each`: that many Admin policies, each selecting one of the 50
  namespaces (round robin), with an ingress and an egress Deny whose peer is a pod
  label nobody has. An endpoint's Admin chain holds only the rules of the policies
  selecting it (a fiftieth of them here): the per-packet cost does not grow with
  the policies of other namespaces;
- `admin, every ns`: the same policies each selecting every namespace: every new
  connection meets the server's ingress and the client's egress Admin chain, with
  all 1,000 policies' rules in it, and goes on (to the server's NetworkPolicy chain;
  the client's egress is then unrestricted). Walked rule by rule that was the worst
  case; as verdict maps (compile/tiermap.py) it is a few lookups per chain;
- `baseline, every ns`: the same as Baseline policies: the server is isolated by a
  NetworkPolicy, so its ingress never reaches them, but the client's egress goes
  through the Baseline chain to its end;
- `both, every ns`: both tiers.

Each variant gets a fresh host namespace (bench/datapaths.py `Pair`): the packet
measures run with no ruleset, then with the variant's ruleset loaded, and the
ratios are to that baseline taken right before; the variants take turns,
`--rounds` times. With a variant's policies loaded, one policy's priority is
changed (the last one becomes the first of its tier): the time to compile the
whole cluster again and to apply the delta (one nft transaction), and the delta's
size, are measured too.

`--incremental` measures the agent's way instead, without a kernel (no root): one
priority change through `IncrementalCompiler.upsert_cluster_policy`, then `.ruleset()`,
beside the full compile of the changed cluster, and the plan's size.
"""

from __future__ import annotations

import argparse
import secrets
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from typing import Any

from common import print_markdown, timed
from datapaths import (
    Pair,
    add_cpu_argument,
    bench_cluster,
    cell,
    chosen_cpu,
    fmt_time,
    placement,
    release,
    take_turns,
)
from iptables import build_loadgen
from results import Results
from stockade.compile.incremental import IncrementalCompiler
from stockade.compile.lower import compile_cluster
from stockade.compile.nft import Table
from stockade.compile.plan import plan
from stockade.datapath.base import require_bridge_netfilter
from stockade.datapath.nft import NftDatapath
from stockade.model.cluster import NS_NAME_LABEL, Cluster
from stockade.model.cnp import (
    ADMIN,
    BASELINE,
    DENY,
    PODS,
    ClusterNetworkPolicy,
    CnpPeer,
    CnpPort,
    CnpRule,
)
from stockade.model.labels import Labels
from stockade.model.selector import ALL, Selector

VARIANTS = ("np only", "admin, one ns each", "admin, every ns", "baseline, every ns",
            "both, every ns")
NAMESPACES = 50  # bench/synthetic.py make_cluster's


def cluster_policies(tier: str, count: int, *, spread: bool = False
                     ) -> tuple[ClusterNetworkPolicy, ...]:
    """`count` policies of a tier whose rules match no bench pod, each over every
    namespace or (`spread`) over one, round robin."""
    out = []
    for i in range(count):
        nobody = CnpPeer(PODS, ALL, Selector(Labels({"app": f"nobody-{i}"})))
        ports = (CnpPort("TCP", 10_000 + i % 50_000, 10_000 + i % 50_000),)
        subject = CnpPeer("namespaces", Selector(Labels({NS_NAME_LABEL: f"ns{i % NAMESPACES}"}))
                          if spread else ALL)
        out.append(ClusterNetworkPolicy(
            name=f"{tier.lower()}-{i:04}", tier=tier, priority=i % 1001, subject=subject,
            ingress=(CnpRule(DENY, (nobody,), ports, "deny-nobody"),),
            egress=(CnpRule(DENY, (nobody,), None, "deny-nobody"),)))
    return tuple(out)


def variant_cluster(base: Cluster, name: str, count: int) -> Cluster:
    tiers: tuple[ClusterNetworkPolicy, ...] = ()
    if name.startswith(("admin", "both")):
        tiers += cluster_policies(ADMIN, count, spread="one ns" in name)
    if name.startswith(("baseline", "both")):
        tiers += cluster_policies(BASELINE, count)
    return replace(base, cluster_policies=tiers)


def reprioritised(cluster: Cluster) -> Cluster:
    """The last policy of the first tier becomes that tier's first."""
    tiers = list(cluster.cluster_policies)
    last = max(range(len(tiers)), key=lambda i: (tiers[i].tier == tiers[0].tier,
                                                  tiers[i].order()))
    tiers[last] = replace(tiers[last], priority=0, name="aaa-" + tiers[last].name)
    return replace(cluster, cluster_policies=tuple(tiers))


def incremental(clusters: dict[str, Cluster]) -> list[list[str]]:
    """The agent's way, no kernel: `IncrementalCompiler.upsert_cluster_policy` of one
    priority change (the same policy, made first of its tier), then `.ruleset()`, and
    the plan from the ruleset before; beside the full compile of the changed cluster."""
    rows = []
    for v, cluster in clusters.items():
        if not cluster.cluster_policies:
            continue
        inc = IncrementalCompiler.of(cluster)
        before = inc.ruleset()
        first = cluster.cluster_policies[0].tier
        tiers = [p for p in cluster.cluster_policies if p.tier == first]
        last = max(tiers, key=ClusterNetworkPolicy.order)
        moved = replace(last, priority=min(p.priority for p in tiers) - 1)
        t_inc, after = timed(lambda i=inc, m=moved: (i.upsert_cluster_policy(m),
                                                     i.ruleset())[1])
        changed = replace(cluster, cluster_policies=tuple(
            moved if p.name == moved.name else p for p in cluster.cluster_policies))
        t_full, full = timed(lambda c=changed: compile_cluster(c))
        assert after == full, f"{v}: the incremental ruleset is not the full compiler's"
        delta = plan(before, after)
        s = delta.summary()
        rows.append([v, fmt_time(t_inc), fmt_time(t_full),
                     f"{s['chains_added']} / {s['chains_replaced']} / {s['chains_removed']}",
                     f"{s['map_entries_set']}", f"{sum(s.values())}"])
        print(f"{v}: incremental {t_inc:.3f} s, full {t_full:.3f} s, {s}", file=sys.stderr)
    return rows


def one_variant(name: str, tag: str, index: int, loadgen: str, cluster: Cluster,
                rs: Any, secs: float, cpu: int | None = None
                ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    pair = Pair(tag, index, loadgen, cpu)
    dp: NftDatapath | None = None
    try:
        assert not pair.isolated(), "the server is unreachable without a ruleset"
        base = pair.measure(secs)
        require_bridge_netfilter(pair.host, "the FORWARD hook")
        dp = NftDatapath(Table(tag), netns=pair.host)
        dp.check()
        t_load, _ = timed(lambda: dp.apply(rs))  # type: ignore[union-attr]
        assert pair.isolated(), f"{name}: the server is not isolated"
        got = pair.measure(secs)
        prog = {"load": t_load}
        if cluster.cluster_policies:
            changed = reprioritised(cluster)
            t_compile, rs2 = timed(lambda: compile_cluster(changed))
            t_apply, delta = timed(lambda: dp.apply(rs2))  # type: ignore[union-attr]
            # (empty when the moved policy shares no endpoint with another of its tier)
            assert dp.diff(rs2).empty
            assert pair.isolated(), f"{name}: the server is not isolated after the change"
            prog.update(compile=t_compile, apply=t_apply,
                        delta=float(sum(delta.summary().values())))
        return base, got, prog
    finally:
        release(pair, dp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--policies", type=int, default=1_000)
    ap.add_argument("--cnps", type=int, default=1_000, help="ClusterNetworkPolicies per tier")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0, help="per packet test")
    ap.add_argument("--json", metavar="FILE", help="also write the results for bench/report.py")
    add_cpu_argument(ap)
    ap.add_argument("--incremental", action="store_true",
                    help="only the agent's incremental priority change, no kernel (no root)")
    args = ap.parse_args()
    cpu = chosen_cpu(ap, args)
    if args.incremental:
        base_cluster = bench_cluster(args.pods, args.policies)
        print_markdown(("variant", "incremental change + ruleset", "full compile",
                        "chains added / replaced / removed", "map entries set",
                        "delta (everything)"),
                       incremental({v: variant_cluster(base_cluster, v, args.cnps)
                                    for v in VARIANTS}))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on a kill too
    t_start = time.monotonic()
    tag = f"tr{secrets.token_hex(2)}"
    tmp = tempfile.TemporaryDirectory()
    loadgen = build_loadgen(tmp.name)
    base_cluster = bench_cluster(args.pods, args.policies)
    clusters = {v: variant_cluster(base_cluster, v, args.cnps) for v in VARIANTS}
    compiled: dict[str, Any] = {}
    compile_s: dict[str, float] = {}
    for v, c in clusters.items():
        compile_s[v], compiled[v] = timed(lambda c=c: compile_cluster(c))
        print(f"{v}: compiled in {compile_s[v]:.1f} s: {compiled[v].counts()}", file=sys.stderr)

    samples, failures = take_turns(VARIANTS, args.rounds, lambda v, index: one_variant(
        v, tag, index, loadgen, clusters[v], compiled[v], args.seconds, cpu))
    base = {v: [s[0] for s in samples[v]] for v in VARIANTS}
    got = {v: [s[1] for s in samples[v]] for v in VARIANTS}
    prog = {v: [s[2] for s in samples[v]] for v in VARIANTS}

    def ratios(v: str, key: str) -> list[float]:
        return [g[key] / b[key] if b[key] else float("nan")
                for b, g in zip(base[v], got[v], strict=True)]

    rows: list[list[str]] = []
    for key, label, fmt in (
            ("gbps", f"TCP throughput, iperf3 one stream {args.seconds:g} s (Gbit/s)",
             lambda x: f"{x:.1f}"),
            ("crr", "new TCP connections/s (connect, 64 B request, 64 B answer, close)",
             lambda x: f"{x:,.0f}"),
            ("p99", "connect-request-response latency p99 (µs)", lambda x: f"{x:.0f}"),
            ("pps", f"UDP packets/s received (64-byte frames, one flow, {args.seconds:g} s)",
             lambda x: f"{x / 1000:,.0f}k")):
        rows.append([label, *(cell([g[key] for g in got[v]], fmt) for v in VARIANTS)])
        rows.append(["  ratio to no ruleset, measured right before",
                     *(cell(ratios(v, key), lambda x: f"{x:.2f}") for v in VARIANTS)])
    rows.append(["compile everything", *(fmt_time(compile_s[v]) for v in VARIANTS)])
    rows.append(["load into an empty table (one transaction)",
                 *(cell([p["load"] for p in prog[v]], fmt_time) for v in VARIANTS)])
    for key, label in (("compile", "one priority change: compile everything again"),
                       ("apply", "one priority change: apply the delta (one transaction)")):
        rows.append([label, *(cell([p[key] for p in prog[v] if key in p], fmt_time)
                              if clusters[v].cluster_policies else "-" for v in VARIANTS)])
    rows.append(["one priority change: delta (chains, elements, map entries)",
                 *(f"{statistics.median([p['delta'] for p in prog[v]]):.0f}"
                   if prog[v] and "delta" in prog[v][0] else "-" for v in VARIANTS)])
    counts = {v: compiled[v].counts() for v in VARIANTS}
    rows.append(["compiled chains / rules",
                 *(f"{counts[v]['chains']:,} / {counts[v]['rules']:,}" for v in VARIANTS)])
    elapsed = time.monotonic() - t_start
    print(f"\n{len(base_cluster.endpoints):,} endpoints, {len(base_cluster.policies):,} "
          f"NetworkPolicies, {args.cnps:,} ClusterNetworkPolicies per tier in the variants "
          f"that have them (no rule matches the bench traffic: each new connection goes "
          f"through every tier chain of its ends); nftables; {args.rounds} rounds, the "
          f"variants in turn, each in a fresh namespace with its own no-ruleset baseline "
          f"right before; {placement(cpu)}; median (min-max). Run took "
          f"{elapsed / 60:.0f} min.\n")
    print_markdown(("measure", *VARIANTS), rows)
    out = Results("tiers", " ".join(["bench/tiers.py", *sys.argv[1:]]))
    out.table(f"{len(base_cluster.endpoints):,} endpoints, {len(base_cluster.policies):,} "
              f"NetworkPolicies, {args.cnps:,} ClusterNetworkPolicies per tier; nftables; "
              f"{args.rounds} rounds; {placement(cpu)}; median (min-max)",
              ("measure", *VARIANTS), rows)
    out.write(args.json)
    if failures:
        print(f"\nfailed, left out (see stderr): {', '.join(failures)}")


if __name__ == "__main__":
    main()
