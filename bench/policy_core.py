"""Benchmark of the policy core: resolution and the matrix at scale.

Prints a table. The variants compared side by side in one run:
- resolve + lower (the indexed path) for 10,000 pods and 1,000 policies;
- the 1,000-pod matrix by bitsets vs the per-pair reference evaluator
  (the latter on a sample of rows, scaled; the ratio is what matters).
"""

from __future__ import annotations

import argparse

from common import print_table, timed
from stockade.compile.lower import Lowering
from stockade.engine.evaluate import Evaluator
from stockade.engine.reach import reachability
from stockade.engine.resolve import resolve
from synthetic import make_cluster


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--policies", type=int, default=1_000)
    ap.add_argument("--matrix-pods", type=int, default=1_000)
    ap.add_argument("--sample-rows", type=int, default=20)
    args = ap.parse_args()

    rows: list[tuple[str, str, str]] = []
    big = make_cluster(args.pods, args.policies)
    t_res, res = timed(lambda: resolve(big))
    rows.append((f"resolve {args.pods} pods x {args.policies} policies", f"{t_res:.3f} s",
                 f"{len(res.index.identities)} identities, "
                 f"{len(res.policy_sets('Ingress'))}+{len(res.policy_sets('Egress'))} "
                 "policy sets"))
    t_low, rs = timed(lambda: Lowering(res).ruleset())
    c = rs.counts()
    rows.append(("lower to ruleset (peers and ports per pod)", f"{t_low:.3f} s",
                 f"{c['chains']} chains, {c['rules']} rules, {c['sets']} sets, "
                 f"{c['set_elements']} elements"))

    small = make_cluster(args.matrix_pods, args.policies // 10, namespaces=10, apps=60)
    n = len(small.endpoints)
    t_fast, reach = timed(lambda: reachability(small, 8080, "TCP"))
    t_rows, _ = timed(lambda: [reach.row(i) for i in range(n)])
    ev = Evaluator(small)
    eps = small.endpoints
    sample = eps[: args.sample_rows]
    t_naive, verdicts = timed(lambda: [[ev.allowed(ev.flow(s, d, 8080, "TCP")) for d in eps]
                                       for s in sample])
    t_naive_full = t_naive * n / len(sample)
    mismatches = sum(verdicts[i][j] != reach.allowed(i, j)
                     for i in range(len(sample)) for j in range(n))
    rows.append((f"matrix {n}x{n} TCP/8080, bitsets", f"{t_fast + t_rows:.3f} s",
                 f"{len(small.policies)} policies"))
    rows.append((f"matrix {n}x{n} TCP/8080, per-pair evaluator", f"{t_naive_full:.3f} s",
                 f"scaled from {len(sample)} rows; ratio "
                 f"{t_naive_full / (t_fast + t_rows):.1f}x; {mismatches} disagreements"))

    print_table(("measure", "time", "notes"), rows)


if __name__ == "__main__":
    main()
