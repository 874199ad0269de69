"""`stockade run|ps|rm|probe`: containers on the agent's bridge, and proof with real packets.

`run`, `ps` and `rm` are thin clients of the agent's container manager
(:mod:`stockade.agent.containers`). `probe` checks the agent's work: it reads
the agent's state (endpoints with their namespaces, namespaces, policies) and
hands it to :mod:`stockade.probe.compare`, which computes the model's matrix,
measures the same pairs with real connections and puts both side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

from stockade.agent.client import AgentClient
from stockade.agent.containers import parse_port_spec
from stockade.agent.records import EndpointRecord, PolicyRecord, namespace_from_dict
from stockade.cli.agent import _call, _checked, _labels, _socket
from stockade.cli.inputs import add_output, positive_seconds, seconds
from stockade.errors import InputError
from stockade.model.cluster import Cluster
from stockade.model.ports import parse_port_text
from stockade.probe.compare import (
    LEGEND,
    NETNS_DIR,
    measure,
    model_matrix,
    report,
    scope,
    targets_of,
)

EXIT_OK = 0
EXIT_DISAGREE = 1

RUN_EPILOG = """\
The command runs in a new network namespace on the agent's bridge, with an
address from the agent's pool, registered as endpoint NS/NAME with the labels
and ports given. Policies that select it are enforced before the command
starts. The endpoint is removed when the command exits. Only the network is
isolated: the command runs as root with the host's files. Endpoints reach each
other and the agent's namespace, not the outside world (no IP forwarding).
"""


def register(sub: Any) -> None:
    r = sub.add_parser("run", help="start a command in a new network namespace on the bridge",
                       epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _socket(r)
    r.add_argument("-n", "--namespace", default="default")
    r.add_argument("--name", required=True)
    r.add_argument("-l", "--label", dest="labels", action="append", default=[],
                   metavar="KEY=VALUE")
    r.add_argument("-p", "--port", dest="ports", action="append", default=[],
                   metavar="[NAME=]PORT[/PROTO]", help="a container port, e.g. http=80/tcp")
    r.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    r.set_defaults(run=run_run)

    p = sub.add_parser("ps", help="containers started by `stockade run`")
    _socket(p)
    p.add_argument("-a", "--all", action="store_true", help="also recently exited ones")
    p.add_argument("-q", "--quiet", action="store_true", help="only NS/NAME")
    add_output(p, ("txt", "json"), help="output format (default txt, a table; text and "
               "table are txt)")
    p.set_defaults(run=run_ps)

    rm = sub.add_parser("rm", help="stop containers (SIGTERM, then SIGKILL) and remove them")
    _socket(rm)
    rm.add_argument("keys", nargs="+", metavar="NS/NAME")
    rm.add_argument("--grace", type=seconds, default=5.0, metavar="SECONDS",
                    help="time between SIGTERM and SIGKILL")
    rm.set_defaults(run=run_rm)

    pr = sub.add_parser("probe", help="the model's matrix beside one measured with real packets",
                        epilog=LEGEND, formatter_class=argparse.RawDescriptionHelpFormatter)
    _socket(pr)
    pr.add_argument("--port", dest="ports", action="append", default=[],
                    metavar="PORT[/PROTO]|NAME", help="what to probe, e.g. 80/tcp, 53/udp or "
                    "a port name (default: every port some endpoint declares)")
    pr.add_argument("--timeout", type=positive_seconds, default=1.0, metavar="SECONDS",
                    help="how long a connection may take before it counts as dropped")
    pr.set_defaults(run=run_probe)


# ---- run, ps, rm --------------------------------------------------------------------------


def _pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"{what} {item!r}: want KEY=VALUE")
        out[key] = value
    return out


def resolve_command(command: Sequence[str]) -> list[str]:
    """The command with its program made absolute here, where the user's PATH and cwd apply."""
    argv = list(command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise InputError("give the command to run after --, e.g. -- python3 -m http.server 80")
    if "/" in argv[0]:
        argv[0] = os.path.abspath(argv[0])
    else:
        argv[0] = shutil.which(argv[0]) or argv[0]
    return argv


def run_run(args: argparse.Namespace) -> int:
    try:
        ports = [parse_port_spec(p) for p in args.ports]
    except ValueError as exc:
        raise InputError(str(exc)) from None
    out = _call(args, "run", namespace=args.namespace, name=args.name,
                labels=_pairs(args.labels, "label"),
                ports=[{"name": p.name, "port": p.port, "protocol": p.protocol} for p in ports],
                command=resolve_command(args.command), cwd=os.getcwd(),
                env=_pairs(args.env, "env"))
    ep = out["endpoint"]
    print(f"{ep['namespace']}/{ep['name']} started: ip {','.join(ep['ips'])}, "
          f"pid {out['pid']}, log {out['log']}")
    return 0


def _command_text(argv: Sequence[str], width: int = 48) -> str:
    """The command as a table shows it: the program without its directory, shortened."""
    text = " ".join([os.path.basename(argv[0]), *argv[1:]] if argv else [])
    return text if len(text) <= width else text[: width - 3] + "..."


def _exit_text(code: int | None) -> str:
    """`exited (0)`, `killed (SIGTERM)`; `exited` alone for an adopted process (no status)."""
    if code is None:
        return "exited"
    if code >= 0:
        return f"exited ({code})"
    try:
        return f"killed ({signal.Signals(-code).name})"
    except ValueError:
        return f"killed (signal {-code})"


def ps_rows(result: dict[str, Any]) -> list[list[str]]:
    """The `ps` table: a header and a row per container (pure, for tests)."""
    rows = [["NAME", "IP", "PID", "STATE", "COMMAND", "LABELS"]]
    for i in result["items"]:
        rows.append([i["key"], ",".join(i["ips"]), str(i["pid"] or "-"), i["state"],
                     _command_text(i["command"]), _labels(i["labels"])])
    for e in result.get("exited") or []:
        rows.append([e["key"], "-", str(e["pid"]), _exit_text(e["exitCode"]), "", ""])
    return rows


def _columns(rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True))
                     .rstrip() for r in rows)


def run_ps(args: argparse.Namespace) -> int:
    result = _call(args, "ps", all=args.all)
    if args.output == "json":
        print(json.dumps(result, indent=2))
    elif args.quiet:
        for item in result["items"]:
            print(item["key"])
    else:
        print(_columns(ps_rows(result)))
    return 0


def run_rm(args: argparse.Namespace) -> int:
    failed = 0
    with AgentClient(args.socket) as client:
        for key in args.keys:
            try:
                out = _checked(partial(client.call, "rm", key=key, grace=args.grace))
            except InputError as exc:
                print(f"stockade: {key}: {exc}", file=sys.stderr)
                failed += 1
                continue
            print(f"{key} removed: {_exit_text(out['exitCode'])}")
    return 1 if failed else 0


# ---- probe --------------------------------------------------------------------------------


def parse_probe_port(text: str) -> tuple[int | str, str]:
    """``80/tcp``, ``tcp:80``, ``80``, ``http`` or ``dns/udp`` → (number or name, PROTOCOL)."""
    try:
        parsed = parse_port_text(text)
    except ValueError as exc:
        raise InputError(f"--port {text}: {exc}") from None
    return parsed.port, parsed.proto


def _cluster(client: AgentClient) -> tuple[Cluster, list[EndpointRecord]]:
    def get(kind: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = _checked(lambda: client.call("get", kind=kind))["items"]
        return items

    namespaces = tuple(namespace_from_dict(d) for d in get("namespaces"))
    records = [EndpointRecord.from_dict(d) for d in get("endpoints")]
    policies = tuple(PolicyRecord.from_dict(d).policy for d in get("policies"))
    return Cluster(namespaces, tuple(r.endpoint for r in records), policies), records


def run_probe(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise InputError("--timeout must be positive")
    ports = list(dict.fromkeys(parse_probe_port(p) for p in args.ports))
    with AgentClient(args.socket) as client:
        cluster, records = _cluster(client)
    targets, skipped = targets_of(records)
    if skipped:
        print(f"not probed (no namespace under {NETNS_DIR} or no address): "
              f"{', '.join(skipped)}\n")
    scoped = scope(cluster, targets)
    if len(targets) < 2:
        print("fewer than two endpoints to probe; nothing to compare")
        return EXIT_OK
    matrix = model_matrix(scoped, ports)
    measured = measure(matrix, {t.endpoint.key: t for t in targets}, args.timeout)
    text, agreed, probed = report(matrix, measured)
    sys.stdout.write(text)
    print(f"\nmodel and kernel agree on {agreed}/{probed} pairs")
    return EXIT_OK if agreed == probed else EXIT_DISAGREE
