"""`stockade matrix`: the reachability truth table between every pair of pods."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from stockade.cli.analysis import parse_port
from stockade.cli.inputs import View, add_files, add_filters, add_output, read
from stockade.cli.pictures import HEATMAP, PICTURE_FORMATS, add_group_by, emit_graph, write_binary
from stockade.engine.graph import matrix_graph
from stockade.engine.heatmap import COLOUR_NAMES, heatmap
from stockade.engine.matrix import Matrix, compute_matrix
from stockade.engine.report import FORMATS, LEGEND, RENDERERS, neighbours, sub_matrix
from stockade.errors import InputError
from stockade.model.parse import Objects
from stockade.model.policy import PROTOCOLS

COLOURS = ", ".join(COLOUR_NAMES)
EPILOG = f"""\
Rows are sources, columns destinations:
  {LEGEND}.
A pod talking to itself is always allowed (the diagonal is '.').
Without --port: one table per (protocol, port) that some pod declares as a
container port, narrowed by --protocol (port 80 when no pod declares any).
With --port: each port with each --protocol (TCP by default); a named port is
resolved on each destination pod.
-n and -l keep the rows and columns of the pods selected; --focus-workload keeps
those of its pods and of every pod they may connect to or be connected from (the
verdicts are computed on every object all the same).
-o dot|svg|png: a graph, an edge per allowed pair labelled with its probes ('all':
every probe); svg and png need graphviz's dot; --group-by namespace draws a node
per namespace. -o heatmap: a PNG for large clusters, a square per pair (row:
source, column: destination), pods by namespace, a line between namespaces;
{COLOURS}.
Redirect it to a file: stockade matrix -f ... -o heatmap > matrix.png
"""


def register(sub: Any) -> None:
    p = sub.add_parser("matrix", help="reachability truth table between all pods",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_files(p)
    add_filters(p, focus=True)
    add_options(p)
    p.set_defaults(run=run)


def add_options(p: argparse.ArgumentParser) -> None:
    """Everything but the source of the objects (files here, a cluster for kubectl)."""
    p.add_argument("--port", dest="ports", action="append", default=[], metavar="PORT|NAME",
                   help="port number or named port to probe (repeatable)")
    p.add_argument("--protocol", dest="protocols", action="append", default=[],
                   type=str.upper, choices=PROTOCOLS, help="protocol to probe (repeatable)")
    add_output(p, (*FORMATS, *PICTURE_FORMATS, HEATMAP),
               help="output format (default txt, the table; text and table are txt)")
    add_group_by(p)


def run(args: argparse.Namespace) -> int:
    return report(args, read(args), "files", ", ".join(args.files))


def report(args: argparse.Namespace, objects: Objects, where: str, source: str) -> int:
    """The matrix of `objects` (checked as `analysis.load` checks them); `where` they
    come from ("files", "cluster") and `source` (their names) for messages."""
    cluster = objects.cluster()
    if not cluster.endpoints:
        raise InputError(f"no Pod in the {where}: the matrix needs pods (with their IPs)",
                         source=source)
    ports = list(dict.fromkeys(parse_port(p) for p in args.ports))
    protocols = list(dict.fromkeys(args.protocols))
    matrix = shown(View.of(args), compute_matrix(cluster, ports, protocols), objects)
    if args.output in PICTURE_FORMATS:
        emit_graph(matrix_graph(matrix, args.group_by), args.output)
    elif args.output == HEATMAP:
        write_binary(heatmap(matrix), HEATMAP)
    else:
        sys.stdout.write(RENDERERS[args.output](matrix))
    return 0


def shown(view: View, matrix: Matrix, objects: Objects) -> Matrix:
    """The rows and columns the view shows (every verdict as computed on everything)."""
    if view.everything:
        return matrix
    endpoints = {ep.key: ep for ep in objects.cluster().endpoints}
    controllers = objects.controllers
    view.check_focus(endpoints.values(), controllers)
    pods = [p for p in matrix.pods if p in endpoints and view.selects(endpoints[p])]
    if view.focus is not None:
        focus = [p for p in pods if view.focused(endpoints[p], controllers.get(p))]
        pods = [p for p in pods if p in neighbours(sub_matrix(matrix, pods), focus)]
    return sub_matrix(matrix, pods)
