"""`stockade list`: every pair of peers with the exact protocols and ports allowed.

netpol-analyzer's `list`, line for line in `txt` (`src => dst : conns`); the
computation is `stockade.engine.connectivity`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from stockade.cli.analysis import load
from stockade.engine.connectivity import (
    LIST_FORMATS,
    LIST_RENDERERS,
    connectivity,
    workload_peers,
)
from stockade.model.parse import Objects

EPILOG = """\
Peers are workloads and external address ranges. A workload is a Deployment,
StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job or CronJob (from its
pod template: labels, container ports, namespace), a Pod's controller as its
ownerReference names it, or a Pod without one; written ns/name[Kind]. Pods are
read whatever their status (no IP needed). External peers are the pieces the
ipBlocks of the policies (after their excepts) cut the IPv4 space into, written
first-last[External]; an ipBlock never matches a workload.

For every ordered pair of different peers, what is allowed: 'All Connections', or
per protocol (SCTP, TCP, UDP) its exact ports as ranges, computed on port intervals
(a named port is resolved on each destination's container ports). A pair with
nothing allowed has no line; two external ranges are never paired.

Objects of other kinds (Service, ConfigMap, ...) are skipped with a note on stderr.
Exit status: 0, or 2 on bad input.
"""


def register(sub: Any) -> None:
    p = sub.add_parser("list", help="allowed connections between every pair of workloads",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-f", "--file", dest="files", action="extend", nargs="+", required=True,
                   metavar="FILE|DIR", help="manifests, or directories of them")
    p.add_argument("-R", "--recursive", action="store_true",
                   help="read the directories given with -f recursively")
    add_options(p)
    p.set_defaults(run=run)


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", default="txt", type=_output_format,
                   metavar="{txt,json,csv,md}", help="output format (default txt; text is txt)")


def _output_format(text: str) -> str:
    value = "txt" if text == "text" else text
    if value not in LIST_FORMATS:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {', '.join(LIST_FORMATS)})")
    return value


def run(args: argparse.Namespace) -> int:
    return report(args, load(args.files, recursive=args.recursive))


def report(args: argparse.Namespace, objects: Objects, prog: str = "stockade") -> int:
    """The list of `objects` (checked as `analysis.load` checks them)."""
    cluster = objects.cluster()
    workloads = {ep.key for ep in objects.workloads}
    peers, warnings = workload_peers(cluster.endpoints, objects.controllers, workloads)
    for warning in warnings:
        print(f"{prog}: warning: {warning}", file=sys.stderr)
    sys.stdout.write(LIST_RENDERERS[args.output](connectivity(cluster, peers)))
    return 0
