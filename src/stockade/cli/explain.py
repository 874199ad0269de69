"""`stockade explain`: the verdict of one connection and why."""

from __future__ import annotations

import argparse
from typing import Any

from stockade.engine.evaluate import Evaluator
from stockade.errors import InputError
from stockade.load import load_objects
from stockade.model.cidr import parse_ip
from stockade.model.cluster import Endpoint
from stockade.model.policy import PROTOCOLS


def register(sub: Any) -> None:
    p = sub.add_parser("explain", help="explain the verdict on one connection")
    p.add_argument("-f", "--file", dest="files", action="append", required=True, metavar="FILE")
    p.add_argument("--from", dest="src", required=True, metavar="NS/POD|IP")
    p.add_argument("--to", dest="dst", required=True, metavar="NS/POD|IP")
    p.add_argument("--port", required=True, metavar="PORT|NAME")
    p.add_argument("--protocol", default="TCP", type=str.upper, choices=PROTOCOLS)
    p.set_defaults(run=run)


def resolve_side(ev: Evaluator, text: str, flag: str) -> Endpoint | str:
    """A pod by `ns/name`, or an IP (a known pod's IP is that pod)."""
    if parse_ip(text) is not None:
        return text
    ep = ev.cluster.endpoint(text if "/" in text else f"default/{text}")
    if ep is None:
        raise InputError(f"{flag} {text}: no such pod (give NS/POD from the files, or an IP)")
    return ep


def parse_port(text: str) -> int | str:
    if text.isdigit():
        port = int(text)
        if not 1 <= port <= 65535:
            raise InputError(f"--port {text}: must be between 1 and 65535")
        return port
    return text


def run(args: argparse.Namespace) -> int:
    objects = load_objects(args.files)
    ev = Evaluator(objects.cluster())
    src = resolve_side(ev, args.src, "--from")
    dst = resolve_side(ev, args.dst, "--to")
    try:
        flow = ev.flow(src, dst, parse_port(args.port), args.protocol)
    except ValueError as exc:
        raise InputError(f"--port {args.port}: {exc}") from None
    verdict = ev.verdict(flow)
    print("\n".join(verdict.explain()))
    return 0 if verdict.allowed else 1
