"""Benchmark: the matrix (every declared port) with and without ClusterNetworkPolicy tiers.

`stockade matrix`'s computation (`compute_matrix` on bitsets) for a synthetic
cluster of 1,000 pods and 100 NetworkPolicies, then with 100 ClusterNetworkPolicies
(both tiers, namespaces and pods subjects, Accept, Deny and Pass rules on
namespace, pod and networks peers, numeric, ranged and named ports), and the
per-pair evaluator on a sample of rows, scaled, for comparison. Prints a table;
`--check` also holds the sampled rows to the evaluator's verdicts.
"""

from __future__ import annotations

import argparse
import random

from common import print_table, timed
from stockade.engine.evaluate import Evaluator
from stockade.engine.matrix import compute_matrix
from stockade.model.cluster import Cluster
from stockade.model.cnp import (
    ACCEPT,
    ADMIN,
    BASELINE,
    DENY,
    NAMESPACES,
    NETWORKS,
    PASS,
    PODS,
    ClusterNetworkPolicy,
    CnpPeer,
    CnpPort,
    CnpRule,
)
from stockade.model.labels import Labels
from stockade.model.selector import Selector
from synthetic import ENVS, TIERS, make_cluster


def _peer(rnd: random.Random, apps: int, egress: bool) -> CnpPeer:
    kind = rnd.random()
    if kind < 0.4:
        return CnpPeer(NAMESPACES, Selector(Labels({"team": f"t{rnd.randrange(10)}"})))
    if kind < 0.8 or not egress:
        return CnpPeer(PODS, Selector(Labels({"env": rnd.choice(ENVS)})),
                       Selector(Labels({"app": f"app{rnd.randrange(apps)}"})))
    return CnpPeer(NETWORKS, networks=(rnd.choice(("10.128.0.0/22", "10.0.0.0/8",
                                                   "192.168.0.0/16")),))


def _rule(rnd: random.Random, apps: int, egress: bool) -> CnpRule:
    peers = tuple(_peer(rnd, apps, egress) for _ in range(rnd.randint(1, 3)))
    ports = rnd.choice([None, (CnpPort("TCP", 8080, 8080),), (CnpPort("TCP", 8000, 9000),),
                        (CnpPort(name="metrics"), CnpPort("UDP", 53, 53))])
    if ports is not None and any(p.kind == NETWORKS for p in peers):
        ports = (CnpPort("TCP", 1, 1024),)
    return CnpRule(rnd.choice((ACCEPT, DENY, PASS)), peers, ports)


def make_cnps(n: int, apps: int = 60, seed: int = 2) -> tuple[ClusterNetworkPolicy, ...]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        if rnd.random() < 0.5:
            subject = CnpPeer(NAMESPACES, Selector(Labels({"team": f"t{rnd.randrange(10)}"})))
        else:
            subject = CnpPeer(PODS, Selector(), Selector(Labels({"tier": rnd.choice(TIERS)})))
        out.append(ClusterNetworkPolicy(
            f"cnp{i}", ADMIN if i % 2 else BASELINE, rnd.randrange(20), subject,
            ingress=tuple(_rule(rnd, apps, False) for _ in range(rnd.randint(1, 4))),
            egress=tuple(_rule(rnd, apps, True) for _ in range(rnd.randint(0, 3)))))
    return tuple(out)


def measure(label: str, cluster: Cluster, sample_rows: int, check: bool
            ) -> list[tuple[str, str, str]]:
    t_fast, m = timed(lambda: compute_matrix(cluster))
    n = len(m.pods)
    probes = ", ".join(t.probe.render() for t in m.tables)
    allowed = sum(c is True for t in m.tables for r in t.cells for c in r)
    ev = Evaluator(cluster)
    pods = sorted(cluster.endpoints, key=lambda e: (e.namespace, e.name))
    table = m.tables[0]
    number = table.probe.port
    assert isinstance(number, int)
    t_naive, verdicts = timed(lambda: [
        [s.key == d.key or ev.allowed(ev.flow(s, d, number, table.probe.protocol))
         for d in pods] for s in pods[:sample_rows]])
    scaled = t_naive * n / sample_rows * len(m.tables)
    wrong = sum(verdicts[i][j] != table.cells[i][j]
                for i in range(sample_rows) for j in range(n))
    return [(f"matrix {n}x{n}, {label}", f"{t_fast:.3f} s",
             f"{probes}; {allowed} cells allowed"),
            (f"  per-pair evaluator, {label}", f"{scaled:.3f} s",
             f"scaled from {sample_rows} rows of one table"
             + (f"; {wrong} disagreements" if check else ""))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=1_000)
    ap.add_argument("--policies", type=int, default=100)
    ap.add_argument("--cnps", type=int, default=100)
    ap.add_argument("--sample-rows", type=int, default=5)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()

    base = make_cluster(args.pods, args.policies, namespaces=10, apps=60)
    tiered = Cluster(base.namespaces, base.endpoints, base.policies, make_cnps(args.cnps))
    rows: list[tuple[str, str, str]] = []
    for label, cluster in (("no ClusterNetworkPolicy", base),
                           (f"{args.cnps} ClusterNetworkPolicies", tiered)):
        rows += measure(label, cluster, args.sample_rows, args.check)
    print_table(("measure", "time", "notes"), rows)


if __name__ == "__main__":
    main()
