"""The heat-map of `stockade matrix -o heatmap` at scale: how long the PNG takes.

For clusters from `realistic.py` (1,000 and 5,000 pods by default, a policy per
ten pods): in this process, the matrix (every declared port) and then the PNG
from it, each timed; then the command as a user runs it, in its own process,
`stockade matrix -f FILE -o heatmap > FILE.png`, its wall time.

`--picture FILE` draws the README's heat-map instead (docs/img/heatmap.png): 1,000
pods in 12 namespaces from `realistic.py` (120 policies), the policies of four
namespaces taken away so that open namespaces stand beside locked ones.

    .venv/bin/python bench/heatmap.py [--pods 1000 5000] [--dir /tmp/stockade-bench]
    .venv/bin/python bench/heatmap.py --picture docs/img/heatmap.png
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import print_table
from realistic import generate
from stockade.engine.heatmap import heatmap
from stockade.engine.matrix import compute_matrix
from stockade.model.parse import decode_objects

STOCKADE = str(Path(sys.executable).parent / "stockade")
OPEN_NAMESPACES = ("tenant-00001", "tenant-00004", "tenant-00008", "tenant-00011")


def picture(out: Path, directory: Path) -> None:
    docs = [d for d in generate(1000, 120, 12)
            if d["kind"] != "NetworkPolicy" or d["metadata"]["namespace"] not in OPEN_NAMESPACES]
    path = directory / "heatmap-picture.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
    with out.open("wb") as sink:
        subprocess.run([STOCKADE, "matrix", "-f", str(path), "-o", "heatmap"], stdout=sink,
                       check=True)


def measure(pods: int, directory: Path) -> list[str]:
    docs = generate(pods, max(1, pods // 10))
    path = directory / f"heatmap-{pods}.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
    objects, errors = decode_objects(docs, str(path), workloads=True)
    assert not errors, errors[:3]
    cluster = objects.cluster()
    t0 = time.perf_counter()
    matrix = compute_matrix(cluster)
    t1 = time.perf_counter()
    data = heatmap(matrix)
    t2 = time.perf_counter()
    out = path.with_suffix(".png")
    with out.open("wb") as sink:
        t3 = time.perf_counter()
        subprocess.run([STOCKADE, "matrix", "-f", str(path), "-o", "heatmap"], stdout=sink,
                       check=True)
        t4 = time.perf_counter()
    assert out.read_bytes() == data, "the command wrote another picture"
    return [f"{len(matrix.pods):,}", str(len(matrix.tables)), f"{t1 - t0:.2f} s",
            f"{t2 - t1:.2f} s", f"{len(data) / 1e3:,.0f} kB", f"{t4 - t3:.2f} s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/stockade-bench"))
    ap.add_argument("--picture", type=Path, metavar="FILE",
                    help="write the README's heat-map to FILE instead of timing")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.picture:
        picture(args.picture, args.dir)
        return
    rows = [measure(n, args.dir) for n in args.pods]
    print_table(["pods", "tables", "matrix", "PNG from it", "PNG size",
                 "stockade matrix -o heatmap"], rows)


if __name__ == "__main__":
    main()
