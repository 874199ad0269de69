"""`stockade matrix`: the reachability truth table between every pair of pods."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from stockade.cli.analysis import load, parse_port
from stockade.engine.matrix import compute_matrix
from stockade.engine.report import FORMATS, LEGEND, RENDERERS
from stockade.errors import InputError
from stockade.model.parse import Objects
from stockade.model.policy import PROTOCOLS

EPILOG = f"""\
Rows are sources, columns destinations:
  {LEGEND}.
A pod talking to itself is always allowed (the diagonal is '.').
Without --port: one table per (protocol, port) that some pod declares as a
container port, narrowed by --protocol (port 80 when no pod declares any).
With --port: each port with each --protocol (TCP by default); a named port is
resolved on each destination pod.
"""


def register(sub: Any) -> None:
    p = sub.add_parser("matrix", help="reachability truth table between all pods",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-f", "--file", dest="files", action="extend", nargs="+", required=True,
                   metavar="FILE", help="manifests: Pods, Namespaces, NetworkPolicies")
    add_options(p)
    p.set_defaults(run=run)


def add_options(p: argparse.ArgumentParser) -> None:
    """Everything but the source of the objects (files here, a cluster for kubectl)."""
    p.add_argument("--port", dest="ports", action="append", default=[], metavar="PORT|NAME",
                   help="port number or named port to probe (repeatable)")
    p.add_argument("--protocol", dest="protocols", action="append", default=[],
                   type=str.upper, choices=PROTOCOLS, help="protocol to probe (repeatable)")
    p.add_argument("-o", "--output", default="table", choices=FORMATS)


def run(args: argparse.Namespace) -> int:
    return report(args, load(args.files), "files", ", ".join(args.files))


def report(args: argparse.Namespace, objects: Objects, where: str, source: str) -> int:
    """The matrix of `objects` (checked as `analysis.load` checks them); `where` they
    come from ("files", "cluster") and `source` (their names) for messages."""
    cluster = objects.cluster()
    if not cluster.endpoints:
        raise InputError(f"no Pod in the {where}: the matrix needs pods (with their IPs)",
                         source=source)
    ports = list(dict.fromkeys(parse_port(p) for p in args.ports))
    protocols = list(dict.fromkeys(args.protocols))
    matrix = compute_matrix(cluster, ports, protocols)
    sys.stdout.write(RENDERERS[args.output](matrix))
    return 0
