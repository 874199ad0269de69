"""The iptables + ipset datapath against nftables, and the naive iptables baseline.

In private network namespaces, one run, side by side:

1. programming time with 10,000 endpoints and 1,000 policies (bench/synthetic.py
   make_cluster): the full load, one endpoint added, one policy changed, and a
   verifying read-back, for nft, iptables (nf_tables backend) and iptables
   (legacy backend); the datapaths take turns, `--rounds` times;
2. new TCP connections per second between two real endpoints (the server
   isolated and allowed by a policy), with each datapath's full ruleset loaded
   and with none right before, measured with a compiled client (bench/loadgen.c:
   connect, close, repeat); the variants take turns, `--rounds` times, medians.
   A fourth variant is the iptables dispatch of the first version (one set
   match per chain in one chain: `BUCKETS = 1`), to show what the two-level
   dispatch buys;
3. the naive baseline a user would otherwise write: one `iptables -A FORWARD
   -s SRC -d DST -p tcp --dport P -j ACCEPT` per allowed pair in one linear
   chain, one process per rule. The number of allowed pairs is counted on a
   sample of sources (the IR interpreter) and scaled to all of them; the time
   per process is measured at several chain lengths and the total extrapolated
   (sum of a line fitted through those). Both are labelled as extrapolations.
"""

from __future__ import annotations

import argparse
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from common import exit_on_sigterm, print_table, timed
from stockade.compile import interpret
from stockade.compile import iptables as ipt
from stockade.compile.iptables import Layout
from stockade.compile.lower import compile_cluster
from stockade.compile.nft import Table
from stockade.datapath.iptables import IptablesDatapath
from stockade.datapath.nft import NftDatapath
from stockade.model.cluster import Cluster, ContainerPort, Endpoint
from stockade.model.labels import Labels
from stockade.model.policy import INGRESS, NetworkPolicy, Peer, PolicyPort, Rule
from stockade.model.selector import Selector
from stockade.net.namespace import create_netns, remove_netns
from stockade.net.plumber import EndpointSpec, Plumber
from synthetic import make_cluster

HERE = Path(__file__).resolve().parent


def build_loadgen(tmp: str) -> str:
    out = str(Path(tmp, "loadgen"))
    subprocess.run(["gcc", "-O2", "-o", out, str(HERE / "loadgen.c")], check=True)
    return out


def conn_rate(loadgen: str, netns: str, addr: str, secs: float) -> float:
    out = subprocess.run(["ip", "netns", "exec", netns, loadgen, "client", addr, "5001",
                          str(secs)], capture_output=True, text=True, check=True).stdout
    rate, failed = out.split()
    assert failed == "0", f"{failed} connections failed"
    return float(rate)


FLAT = "iptables (nf_tables), one set match per chain"


def datapaths(host: str) -> dict[str, Any]:
    return {
        "nft": NftDatapath(Table("stockade"), netns=host),
        "iptables (nf_tables)": IptablesDatapath(Layout.of("stockade"), netns=host,
                                                 backend="nft"),
        "iptables (legacy)": IptablesDatapath(Layout.of("stockade"), netns=host,
                                              backend="legacy"),
        # the dispatch of the first version: every chain's set match in one chain
        # (one bucket), so a new connection meets up to one rule per chain
        FLAT: IptablesDatapath(Layout.of("stockade"), netns=host, backend="nft"),
    }


def buckets(n: int) -> None:
    """Set the number of dispatch buckets of compile.iptables (1: the flat dispatch)."""
    ipt.BUCKETS = n
    ipt.bucket_of.cache_clear()


def program(dp: Any, cluster: Cluster, rs: Any) -> dict[str, float]:
    """Full load, one endpoint, one policy, a verifying read-back: seconds each."""
    t_full, _ = timed(lambda: dp.apply(rs))
    new_ep = Endpoint("ns3", "newpod", Labels({"app": "app7", "tier": "api", "env": "prod"}),
                      ("10.129.0.1",), (ContainerPort(8080, "TCP", "http"),))
    one_more = replace(cluster, endpoints=(*cluster.endpoints, new_ep))
    rs1 = compile_cluster(one_more)
    t_ep, d1 = timed(lambda: dp.apply(rs1))
    changed = list(one_more.policies)
    changed[0] = replace(changed[0], ingress=(*changed[0].ingress,
                                              Rule((PolicyPort("TCP", 9999),))))
    rs2 = compile_cluster(replace(one_more, policies=tuple(changed)))
    t_pol, d2 = timed(lambda: dp.apply(rs2))
    t_read, d3 = timed(lambda: dp.diff(rs2))
    assert d3.empty
    dp.apply(rs)  # back to the full load, for the packets
    return {"full": t_full, "endpoint": t_ep, "policy": t_pol, "read": t_read,
            "ep_delta": sum(d1.summary().values()), "pol_delta": sum(d2.summary().values())}


def naive(host: str, cluster: Cluster, rs: Any, sample: int, tool: str) -> dict[str, float]:
    """The naive baseline: allowed pairs (sampled) and per-process insert cost by length."""
    rnd = random.Random(1)
    eps = [e for e in cluster.endpoints if e.ips]
    sources = rnd.sample(eps, sample)
    allowed = 0
    for src in sources:
        for dst in eps:
            if src is dst:
                continue
            restricted = src.ips[0] in rs.egress or dst.ips[0] in rs.ingress
            if restricted and interpret.allows(rs, src.ips[0], dst.ips[0], "TCP", 8080):
                allowed += 1
    pairs = allowed / sample * len(eps)
    per: list[tuple[int, float]] = []
    done = 0
    for length in (0, 2_000, 10_000, 20_000):
        fill = length - done
        if fill > 0:  # one restore to reach the length (not what is measured)
            lines = [f"-A FORWARD -s 10.{(done + i) // 65536 % 256}.{(done + i) // 256 % 256}."
                     f"{(done + i) % 256} -d 10.1.0.1 -p tcp --dport 8080 -j ACCEPT"
                     for i in range(fill)]
            subprocess.run(["ip", "netns", "exec", host, f"{tool}-restore", "--noflush",
                            "-w"], input="\n".join(["*filter", *lines, "COMMIT", ""]),
                           text=True, check=True)
            done = length
        n = 30
        t, _ = timed(lambda: [subprocess.run(
            ["ip", "netns", "exec", host, tool, "-w", "-A", "FORWARD", "-s",
             f"192.168.{i // 256}.{i % 256}", "-d", "10.2.0.1", "-p", "tcp", "--dport", "8080",
             "-j", "ACCEPT"], check=True) for i in range(30)])
        per.append((length, t / n))
        done += n
    # a line through the measured points; the sum of it over 0..pairs rules
    xs, ys = [p[0] for p in per], [p[1] for p in per]
    slope, icept = statistics.linear_regression(xs, ys)
    total = icept * pairs + slope * pairs * pairs / 2
    subprocess.run(["ip", "netns", "exec", host, tool, "-w", "-F", "FORWARD"], check=True)
    return {"pairs": pairs, "total": total, **{f"at{x}": y for x, y in per}}


def main() -> None:
    exit_on_sigterm()
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--policies", type=int, default=1_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--sample", type=int, default=50, help="sources sampled for pairs")
    args = ap.parse_args()
    tag = f"bi{secrets.token_hex(2)}"
    host, scratch = f"{tag}-host", f"{tag}-naive"
    create_netns(host)
    create_netns(scratch)
    plumber = Plumber(prefix=tag, host_netns=host, subnet4="10.200.0.0/16")
    rows: list[tuple[str, ...]] = []
    tmp = tempfile.mkdtemp()
    try:
        loadgen = build_loadgen(tmp)
        plumber.ensure_bridge()
        srv = plumber.ensure_endpoint(EndpointSpec("bench/server", "10.200.0.10/16"))
        cli = plumber.ensure_endpoint(EndpointSpec("bench/client", "10.200.0.11/16"))
        base = make_cluster(args.pods, args.policies)
        real = (Endpoint("ns0", "server", Labels({"app": "bench-server"}), (srv.address4,),
                         (ContainerPort(5001, "TCP", "bench"),)),
                Endpoint("ns0", "client", Labels({"app": "bench-client"}), (cli.address4,)))
        allow = NetworkPolicy("ns0", "bench-allow", Selector(Labels({"app": "bench-server"})),
                              ingress=(Rule((PolicyPort("TCP", "bench"),), (Peer(
                                  pod_selector=Selector(Labels({"app": "bench-client"}))),)),),
                              policy_types=(INGRESS,))
        cluster = Cluster(base.namespaces, base.endpoints + real, (*base.policies, allow))
        t_compile, rs = timed(lambda: compile_cluster(cluster))
        c = rs.counts()
        print(f"compiled in {t_compile:.1f} s: {c}", file=sys.stderr)
        dps = datapaths(host)
        for dp in dps.values():
            dp.check()

        server = subprocess.Popen(["ip", "netns", "exec", srv.netns, loadgen, "server",
                                   "5001"], stdout=subprocess.PIPE, text=True)
        prog: dict[str, list[dict[str, float]]] = {k: [] for k in dps}
        rates: dict[str, list[float]] = {k: [] for k in dps}
        ratios: dict[str, list[float]] = {k: [] for k in dps}
        nones: list[float] = []
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            for r in range(args.rounds):
                order = list(dps)[r % len(dps):] + list(dps)[:r % len(dps)]
                for name in order:
                    dp = dps[name]
                    none = conn_rate(loadgen, cli.netns, srv.address4, args.seconds)
                    buckets(1 if name == FLAT else 32)
                    try:
                        prog[name].append(program(dp, cluster, rs))
                        rates[name].append(conn_rate(loadgen, cli.netns, srv.address4,
                                                     args.seconds))
                        dp.remove()
                    finally:
                        buckets(32)
                    nones.append(none)
                    ratios[name].append(rates[name][-1] / none)
                    print(f"round {r + 1} {name}: {prog[name][-1]} none {none:.0f}, with "
                          f"{rates[name][-1]:.0f} conn/s", file=sys.stderr)
        finally:
            server.kill()
            server.wait()

        def med(name: str, key: str) -> float:
            return statistics.median(p[key] for p in prog[name])

        def spread(name: str, key: str) -> str:
            vals = [p[key] for p in prog[name]]
            return f"{min(vals) * 1000:.0f}-{max(vals) * 1000:.0f}"

        rows.append(("ruleset", f"{len(cluster.endpoints)} endpoints, "
                     f"{len(cluster.policies)} policies: {c['chains']} chains, {c['rules']} "
                     f"rules, {c['sets']} sets, {c['set_elements']} elements",
                     *([""] * (len(dps) - 1))))
        for key, label in (("full", "full load (from nothing)"),
                           ("endpoint", "one endpoint added"),
                           ("policy", "one policy changed"),
                           ("read", "verifying read-back (whole kernel state)")):
            rows.append((label, *(f"{med(n, key) * 1000:.0f} ms ({spread(n, key)})"
                                  for n in dps)))
        rows.append((f"new TCP connections/s (no ruleset: {statistics.median(nones):.0f})",
                     *(f"{statistics.median(rates[n]):.0f}" for n in dps)))
        rows.append(("  ratio to no ruleset, measured right before (median, range)",
                     *(f"{statistics.median(ratios[n]):.2f} ({min(ratios[n]):.2f}-"
                       f"{max(ratios[n]):.2f})" for n in dps)))
        print_table(("measure (median of rounds; range in brackets)", *dps), rows)

        # the naive baseline, in a namespace of its own
        rows = []
        for tool in ("iptables-nft", "iptables-legacy"):
            nv = naive(scratch, cluster, rs, args.sample, tool)
            rows.append((tool, f"{nv['pairs']:,.0f}",
                         " / ".join(f"{nv[f'at{x}'] * 1000:.1f}" for x in
                                    (0, 2_000, 10_000, 20_000)),
                         f"{nv['total'] / 3600:,.1f} h" if nv["total"] > 3600
                         else f"{nv['total']:,.0f} s"))
        print_table(("naive: one rule per allowed pair, one process per rule",
                     f"allowed pairs (TCP/8080, {args.sample} sources sampled, scaled)",
                     "ms per process at 0 / 2k / 10k / 20k rules",
                     "full load, extrapolated"), rows)
    finally:
        plumber.teardown()
        remove_netns(host)
        remove_netns(scratch)


if __name__ == "__main__":
    main()
