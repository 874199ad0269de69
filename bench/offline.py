"""Offline commands at scale: `stockade compile` and `stockade matrix`, end to end.

What a user runs, measured as a user runs it: the `stockade` command in its own
process, its wall time and its peak resident memory (`wait4`'s rusage of that
child), on clusters from `realistic.py` written as one JSON `kind: List` (as
`kubectl get -o json` gives them). Beside it, each stage in-process (in a fresh
interpreter per size, the collector off as the command runs it): read, parse,
decode, validate, resolve, lower, render (the nft commands of a full load).
Then how each stage grows with the size, and every goal of issue #11 in reach
of the offline half, marked met or not met.

    .venv/bin/python bench/offline.py             # 10k/1k, 100k/10k, Antrea's shape
    .venv/bin/python bench/offline.py --quick     # 2k/200 and 10k/1k only

Timings on a shared machine are noisy: read ratios and growth, not the last
digit. Generated files are kept in --dir and reused (same seed, same file).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import print_table

HERE = Path(__file__).resolve().parent
STOCKADE = str(Path(sys.executable).parent / "stockade")
STAGES = ("read", "parse", "decode", "validate", "resolve", "lower", "render")
COMPUTE = ("resolve", "lower", "render")

# name: (pods, policies, namespaces or None for one per 100 pods)
SIZES: dict[str, tuple[int, int, int | None]] = {
    "2k/200": (2_000, 200, None),
    "10k/1k": (10_000, 1_000, None),
    "20k/2k": (20_000, 2_000, None),
    "50k/5k": (50_000, 5_000, None),
    "100k/10k": (100_000, 10_000, None),
    "antrea 100k/75k/25k ns": (100_000, 75_000, 25_000),
}


def cluster_file(directory: Path, pods: int, policies: int, namespaces: int | None,
                 seed: int = 1) -> Path:
    """The generated cluster as a JSON List, written once per (size, seed)."""
    from realistic import generate, write

    path = directory / f"realistic-{pods}-{policies}-{namespaces or 'auto'}-{seed}.json"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            write(generate(pods, policies, namespaces, seed), f)
        tmp.rename(path)
    return path


def stages(path: str) -> dict[str, Any]:
    """Each stage of `stockade compile -o nft`, in this process (run in a child)."""
    gc.disable()  # as the command does
    from stockade.compile.lower import Lowering
    from stockade.compile.nft import Table, render_full
    from stockade.engine.resolve import resolve
    from stockade.load import read_text, validate_objects
    from stockade.model.parse import decode_objects, parse_documents

    t: dict[str, Any] = {}
    t0 = time.perf_counter()
    text = read_text(path)
    t1 = time.perf_counter()
    docs = parse_documents(text, path)
    t2 = time.perf_counter()
    objects, errors = decode_objects(docs, path)
    assert not errors
    del docs, text
    t3 = time.perf_counter()
    validate_objects(objects, duplicates=True)
    cluster = objects.cluster()
    t4 = time.perf_counter()
    res = resolve(cluster)
    t5 = time.perf_counter()
    rs = Lowering(res).ruleset()
    t6 = time.perf_counter()
    cmds = render_full(Table(), rs)
    t7 = time.perf_counter()
    for name, a, b in zip(STAGES, (t0, t1, t2, t3, t4, t5, t6), (t1, t2, t3, t4, t5, t6, t7),
                          strict=True):
        t[name] = b - a
    t["counts"] = rs.counts()
    t["identities"] = len(res.index.identities)
    t["commands"] = len(cmds)
    return t


def child_stages(path: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--stages", str(path)], check=True,
                         capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def run_command(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one command, its output discarded."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: exit {proc.returncode}: {err}")
    return wall, usage.ru_maxrss / 1024


def best(argv: list[str], repeat: int) -> tuple[float, float]:
    runs = [run_command(argv) for _ in range(repeat)]
    return min(r[0] for r in runs), max(r[1] for r in runs)


def matrix_file(directory: Path) -> Path:
    """The 1,000-pod cluster of bench/policy_core.py (10 namespaces, 60 apps)."""
    from synthetic import make_cluster, manifests

    path = directory / "matrix-1000.json"
    if not path.exists():
        docs = manifests(make_cluster(1_000, 100, namespaces=10, apps=60))
        path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2k/200 and 10k/1k only")
    ap.add_argument("--sizes", nargs="+", choices=tuple(SIZES), default=None)
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each command at 10k and below (best wall time)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/stockade-bench"))
    ap.add_argument("--stages", metavar="FILE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stages:
        print(json.dumps(stages(args.stages)))
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    names = args.sizes or (["2k/200", "10k/1k"] if args.quick else
                           ["10k/1k", "20k/2k", "50k/5k", "100k/10k",
                            "antrea 100k/75k/25k ns"])
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        pods, policies, namespaces = SIZES[name]
        path = cluster_file(args.dir, pods, policies, namespaces)
        print(f"# {name}: {path} ({path.stat().st_size / 1e6:.0f} MB)", file=sys.stderr)
        r = child_stages(path)
        repeat = args.repeat if pods <= 10_000 else 1
        r["cli_stats"] = best([STOCKADE, "compile", "-f", str(path), "-o", "stats"], repeat)
        r["cli_nft"] = best([STOCKADE, "compile", "-f", str(path), "-o", "nft"], repeat)
        r["pods"] = pods
        results[name] = r

    rows = []
    for name, r in results.items():
        c = r["counts"]
        rows.append((name, *(f"{r[s]:.2f}" for s in STAGES),
                     f"{sum(r[s] for s in COMPUTE):.2f}",
                     f"{r['cli_stats'][0]:.2f} s {r['cli_stats'][1]:.0f} MB",
                     f"{r['cli_nft'][0]:.2f} s {r['cli_nft'][1]:.0f} MB",
                     f"{r['identities']} identities, {c['sets']} sets, "
                     f"{c['set_elements']} elements, {c['chains']} chains, {c['rules']} rules"))
    print("stockade compile: stages in-process (s) and the command end to end")
    print_table(("size", *STAGES, "compute", "compile -o stats", "compile -o nft", "ruleset"),
                rows)

    sized = [(n, r) for n, r in results.items() if not n.startswith("antrea")]
    if len(sized) > 1:
        print("\ngrowth: seconds per 10,000 pods (and policies in proportion), per stage")
        rows = []
        for name, r in sized:
            per = 10_000 / r["pods"]
            rows.append((name, *(f"{r[s] * per:.3f}" for s in STAGES),
                         f"{r['cli_nft'][0] * per:.3f}", ""))
        print_table(("size", *STAGES, "compile -o nft", ""), rows)

    mpath = matrix_file(args.dir)
    m_wall, m_rss = best([STOCKADE, "matrix", "-f", str(mpath)], args.repeat)
    start_wall, _ = best([STOCKADE, "compile", "-f", str(HERE.parent / "examples" /
                                                          "cluster.yaml"), "-o", "stats"],
                         max(args.repeat, 5))
    print(f"\nstockade matrix, 1,000 pods, every declared port: {m_wall:.2f} s, {m_rss:.0f} MB")
    print(f"stockade compile of examples/cluster.yaml (start-up and a tiny file): "
          f"{start_wall * 1000:.0f} ms")

    print("\ngoals (issue #11, offline half)")
    goals: list[tuple[str, str, float, float]] = []

    def goal(text: str, value: float, limit: float, unit: str) -> None:
        goals.append((text, f"{value:.2f} {unit}" if unit == "s" else f"{value:.0f} {unit}",
                      value, limit))

    for name, limit_s, limit_mb in (("10k/1k", 1.0, None), ("100k/10k", 10.0, 1536.0),
                                    ("antrea 100k/75k/25k ns", 6.0, 1536.0)):
        if name in results:
            wall, rss = results[name]["cli_nft"]
            goal(f"compile -o nft {name} <= {limit_s:g} s", wall, limit_s, "s")
            if limit_mb is not None:
                goal(f"compile -o nft {name} <= 1.5 GB", rss, limit_mb, "MB")
    for name, limit in (("10k/1k", 0.3), ("100k/10k", 3.0)):
        if name in results:
            goal(f"in-process resolve+lower+render {name} <= {limit:g} s",
                 sum(results[name][s] for s in COMPUTE), limit, "s")
    goal("matrix 1,000 pods, every declared port <= 1 s", m_wall, 1.0, "s")
    goal("offline command start-up <= 150 ms (compile of a tiny file)", start_wall, 0.150, "s")
    print_table(("goal", "measured", "status"),
                [(text, shown, "met" if value <= limit else "NOT met")
                 for text, shown, value, limit in goals])
    print("\n(2 cores shared with other work: wall times vary by tens of percent between "
          "runs; stages are one run each, commands the best of the runs)")


if __name__ == "__main__":
    main()
