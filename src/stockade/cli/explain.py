"""`stockade explain`: the verdict on one connection, and why (see engine.explain)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from stockade.cli.analysis import parse_port
from stockade.cli.inputs import add_files, add_output, read
from stockade.engine.evaluate import Evaluator
from stockade.engine.explain import context_of, explain_json, explain_lines
from stockade.engine.report import json_text, yaml_text
from stockade.errors import InputError
from stockade.model.cidr import parse_ip
from stockade.model.cluster import Endpoint
from stockade.model.parse import Objects
from stockade.model.policy import PROTOCOLS

EPILOG = """\
Exit status: 0 when the connection is allowed, 1 when it is denied, 2 on bad input.
A pod is NS/POD, or POD in the namespace of -n (default: default); a workload is
NS/NAME[Kind] (as list names it); an IP that belongs to a pod is that pod.
JSON and YAML: a port or peer that is "any" is written as such (null numbers never
stand for "every port").
"""


def register(sub: Any) -> None:
    p = sub.add_parser("explain", help="explain the verdict on one connection",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_files(p)
    p.add_argument("-n", "--namespace", metavar="NS", default="default",
                   help="the namespace of a pod given without one (default: default)")
    add_options(p)
    p.set_defaults(run=run)


def add_options(p: argparse.ArgumentParser) -> None:
    """Everything but the source of the objects (files here, a cluster for kubectl)."""
    p.add_argument("--from", dest="src", required=True, metavar="NS/POD|IP")
    p.add_argument("--to", dest="dst", required=True, metavar="NS/POD|IP")
    p.add_argument("--port", required=True, metavar="PORT|NAME",
                   help="port number, or a port name resolved on the destination pod")
    p.add_argument("--protocol", default="TCP", type=str.upper, choices=PROTOCOLS)
    add_output(p, ("txt", "json", "yaml"))


def resolve_side(ev: Evaluator, text: str, flag: str, namespace: str = "default",
                 where: str = "files") -> Endpoint | str:
    """A pod by `ns/name` (`name`: in `namespace`), or an IP (a known pod's IP is that pod)."""
    if parse_ip(text) is not None:
        return text
    ep = ev.cluster.endpoint(text if "/" in text else f"{namespace}/{text}")
    if ep is None:
        raise InputError(f"{flag} {text}: no such pod (give NS/POD from the {where}, or an IP)")
    return ep



def run(args: argparse.Namespace) -> int:
    return report(args, read(args), args.namespace)


def report(args: argparse.Namespace, objects: Objects, namespace: str = "default",
           where: str = "files") -> int:
    """The verdict in `objects` (checked as `analysis.load` checks them); a pod named
    without its namespace is in `namespace`; `where` the objects come from."""
    cluster = objects.cluster()
    ev = Evaluator(cluster)
    src = resolve_side(ev, args.src, "--from", namespace, where)
    dst = resolve_side(ev, args.dst, "--to", namespace, where)
    port = parse_port(args.port)
    try:
        flow = ev.flow(src, dst, port, args.protocol)
    except ValueError as exc:
        raise InputError(f"--port {args.port}: {exc}") from None
    ctx = context_of(cluster, port if isinstance(port, str) else None)
    verdict = ev.verdict(flow)
    if args.output in ("json", "yaml"):
        data = explain_json(verdict, ctx)
        sys.stdout.write(json_text(data) if args.output == "json" else yaml_text(data))
    else:
        print("\n".join(explain_lines(verdict, ctx)))
    return 0 if verdict.allowed else 1
