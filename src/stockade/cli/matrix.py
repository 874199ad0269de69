"""`stockade matrix`: the reachability truth table."""

from __future__ import annotations

import argparse
from typing import Any

from stockade.engine.evaluate import Evaluator
from stockade.load import load_objects
from stockade.model.policy import PROTOCOLS


def register(sub: Any) -> None:
    p = sub.add_parser("matrix", help="reachability truth table between all pods")
    p.add_argument("-f", "--file", dest="files", action="append", required=True, metavar="FILE")
    p.add_argument("--port", action="append", metavar="PORT|NAME")
    p.add_argument("--protocol", action="append", type=str.upper, choices=PROTOCOLS)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cluster = load_objects(args.files).cluster()
    ev = Evaluator(cluster)
    eps = cluster.endpoints
    for proto in args.protocol or ["TCP"]:
        for port in args.port or ["80"]:
            p: int | str = int(port) if port.isdigit() else port
            print(f"{proto}/{port}\t" + "\t".join(e.key for e in eps))
            for s in eps:
                cells = []
                for d in eps:
                    if s.key == d.key:
                        cells.append("-")
                        continue
                    cells.append("." if ev.allowed(ev.flow(s, d, p, proto)) else "X")
                print(s.key + "\t" + "\t".join(cells))
    return 0
