"""Per-packet cost of ClusterNetworkPolicy tiers in the eBPF program (BPF_PROG_TEST_RUN).

A denied new connection is judged in full on every run (nothing enters conntrack),
so its cost is the judgement's. Variants, on one background of synthetic pods and
policies, the same client -> server TCP packet denied by the server's NetworkPolicy:

- `np`: NetworkPolicy alone (one stage, one lookup: the client's identity misses,
  and with no rule without a peer there is no ANY to look at: denied);
- `admin-pass`: an Admin tier on the server passing the client on (two stages, one
  lookup each);
- `admin-50`: the same with 49 Admin Deny rules ahead of the Pass (the first match
  is resolved when the maps are compiled: the count should not show).

The variants take turns in one run (rotating order, the best of three timings per
turn, the median of the turns). The machine is shared: read the ratios to `np`.

    sudo .venv/bin/python bench/ebpf_tiers.py [--turns 5] [--pods 2000] [--policies 200]
"""

from __future__ import annotations

import argparse
import secrets
import statistics

from common import exit_on_sigterm, print_table
from ebpf import ns_per_packet, tcp_packet
from stockade.compile import bpf as bpfc
from stockade.compile.ir import Ruleset
from stockade.compile.lower import compile_cluster
from stockade.datapath.ebpf import EbpfDatapath
from stockade.model.cluster import Cluster, ContainerPort, Endpoint
from stockade.model.cnp import (
    ADMIN,
    DENY,
    PASS,
    PODS,
    ClusterNetworkPolicy,
    CnpPeer,
    CnpPort,
    CnpRule,
)
from stockade.model.labels import Labels
from stockade.model.policy import INGRESS, NetworkPolicy, Peer, PolicyPort, Rule
from stockade.model.selector import Selector
from stockade.net.namespace import create_netns, remove_netns
from synthetic import make_cluster


def _app(name: str) -> CnpPeer:
    return CnpPeer(PODS, pod_selector=Selector(Labels({"app": name})))


def variants(pods: int, policies: int) -> tuple[dict[str, Ruleset], str, str]:
    base = make_cluster(pods, policies)
    client = Endpoint("ns0", "client", Labels({"app": "bench-client"}), ("10.200.0.11",))
    server = Endpoint("ns0", "server", Labels({"app": "bench-server"}), ("10.200.0.10",),
                      (ContainerPort(5001, "TCP", "bench"),))
    allow = NetworkPolicy("ns0", "bench-allow", Selector(Labels({"app": "bench-server"})),
                          ingress=(Rule((PolicyPort("TCP", 5001),), (Peer(
                              pod_selector=Selector(Labels({"app": "bench-client"}))),)),),
                          policy_types=(INGRESS,))
    np = Cluster(base.namespaces, (*base.endpoints, client, server), (*base.policies, allow))
    passing = CnpRule(PASS, (_app("bench-client"),))
    denies = tuple(CnpRule(DENY, (_app(f"app{i}"),), (CnpPort("TCP", 1000 + i, 1000 + i),))
                   for i in range(49))

    def admin(*rules: CnpRule) -> Cluster:
        cnp = ClusterNetworkPolicy("bench-admin", ADMIN, 10, _app("bench-server"),
                                   ingress=rules)
        return Cluster(np.namespaces, np.endpoints, np.policies, (cnp,))

    out = {"np": compile_cluster(np), "admin-pass": compile_cluster(admin(passing)),
           "admin-50": compile_cluster(admin(*denies, passing))}
    return out, str(client.ips[0]), str(server.ips[0])


def main() -> None:
    exit_on_sigterm()
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--pods", type=int, default=2000)
    ap.add_argument("--policies", type=int, default=200)
    args = ap.parse_args()
    rulesets, client, server = variants(args.pods, args.policies)
    packet = tcp_packet(client, server, 40001, 5002)
    host = f"bt{secrets.token_hex(2)}-host"
    create_netns(host)
    dp = EbpfDatapath("bench-tiers", netns=host)
    times: dict[str, list[float]] = {name: [] for name in rulesets}
    entries: dict[str, int] = {}
    try:
        dp.check()
        names = list(rulesets)
        for turn in range(args.turns):
            for name in names[turn % len(names):] + names[:turn % len(names)]:
                dp.apply(rulesets[name])
                entries[name] = len(bpfc.compile_state(rulesets[name]).policy)
                rc, ns = ns_per_packet(dp._progs["in"], packet, 100_000)
                assert rc == 2, (name, rc)  # TC_ACT_SHOT: denied, judged in full each run
                times[name].append(ns)
    finally:
        dp.remove()
        remove_netns(host)
    ref = statistics.median(times["np"])
    rows = [(name, f"{statistics.median(t):.0f} ns", f"{statistics.median(t) / ref:.2f}",
             f"{min(t):.0f}-{max(t):.0f} ns", str(entries[name]))
            for name, t in times.items()]
    print_table(("variant (denied new TCP connection)", "median", "vs np", "turns",
                 "policy entries"), rows)


if __name__ == "__main__":
    main()
