"""`stockade list`: every pair of peers with the exact protocols and ports allowed.

netpol-analyzer's `list`, line for line in `txt` (`src => dst : conns`); the
computation is `stockade.engine.connectivity`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from stockade.cli.inputs import View, add_files, add_filters, add_output, read
from stockade.cli.pictures import PICTURE_FORMATS, add_group_by, emit_graph
from stockade.engine.connectivity import (
    LIST_FORMATS,
    LIST_RENDERERS,
    ConnList,
    Workload,
    connectivity,
    workload_peers,
)
from stockade.engine.graph import list_graph
from stockade.engine.report import yaml_text
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

-n, -l and --focus-workload show the connections from or to the workloads selected
(the connections are computed on every object all the same). A kubectl dump works
as it is: kubectl get ns,pods,deploy,netpol -A -o yaml | stockade list -f -
-o dot|svg|png: a graph of the workloads (a box per namespace) and the ranges, an
edge per line labelled with its connections ('all' for All Connections); svg and
png need graphviz's dot. --group-by namespace draws a node per namespace, each
edge the union of its pairs' connections, marked '(k of n pairs)' when not every
pair of workloads allows exactly that.
Objects of other kinds (Service, ConfigMap, ...) are skipped with a note on stderr.
Exit status: 0, or 2 on bad input.
"""


def register(sub: Any) -> None:
    p = sub.add_parser("list", help="allowed connections between every pair of workloads",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_files(p)
    add_filters(p, focus=True)
    add_options(p)
    p.set_defaults(run=run)


FORMATS = (*LIST_FORMATS, "yaml", *PICTURE_FORMATS)


def add_options(p: argparse.ArgumentParser) -> None:
    add_output(p, FORMATS)
    add_group_by(p)


def run(args: argparse.Namespace) -> int:
    return report(args, read(args))


def report(args: argparse.Namespace, objects: Objects, prog: str = "stockade") -> int:
    """The list of `objects` (checked as `analysis.load` checks them)."""
    cluster = objects.cluster()
    workloads = {ep.key for ep in objects.workloads}
    peers, warnings = workload_peers(cluster.endpoints, objects.controllers, workloads)
    for warning in warnings:
        print(f"{prog}: warning: {warning}", file=sys.stderr)
    view = View.of(args)
    result = shown(view, connectivity(cluster, peers), peers)
    if args.output in PICTURE_FORMATS:
        selected = None if view.everything else [
            p.name for p in peers if view.selects(p.endpoint) and view.focused(p.endpoint)]
        emit_graph(list_graph(result, [p.name for p in peers], args.group_by, selected),
                   args.output, prog)
    elif args.output == "yaml":
        sys.stdout.write(yaml_text(json.loads(LIST_RENDERERS["json"](result))))
    else:
        sys.stdout.write(LIST_RENDERERS[args.output](result))
    return 0


def shown(view: View, result: ConnList, peers: Sequence[Workload]) -> ConnList:
    """The connections the view shows: from or to a selected workload (and from or to
    the focus, if any). A workload made of Pods is selected by its first Pod."""
    if view.everything:
        return result
    by_name = {p.name: p.endpoint for p in peers}
    # A peer's endpoint is renamed after its workload: match the focus by that name.
    view.check_focus(by_name.values())
    return replace(result, connections=tuple(
        c for c in result.connections
        if view.shown_pair(by_name.get(c.src), by_name.get(c.dst))))
