"""`stockade run|ps|rm|probe`: containers on the agent's bridge, and proof with real packets.

`run`, `ps` and `rm` are thin clients of the agent's container manager
(:mod:`stockade.agent.containers`). `probe` checks the agent's work: it reads
the agent's state (endpoints with their namespaces, namespaces, policies),
computes the model's matrix from it (:mod:`stockade.engine.matrix`, the same
tables `stockade matrix` prints) and measures the same pairs with real
connections from each endpoint's namespace, then prints both side by side.

The endpoints' own processes are the servers. A destination that nobody
listens on answers a TCP SYN with a RST: the packet crossed the datapath and
was not dropped, so *refused counts as reachable*, shown as ``R`` rather than
``.`` to say that nothing listened. Policy denies by dropping, so a denied
connection times out (``X``). Unreachable (``U``) and errors (``E``) match
neither verdict and always count as disagreement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from stockade.agent.client import AgentClient
from stockade.agent.containers import parse_port_spec
from stockade.agent.records import EndpointRecord, PolicyRecord, namespace_from_dict
from stockade.cli.agent import _call, _checked, _labels, _socket
from stockade.engine.matrix import Matrix, Table, compute_matrix
from stockade.engine.report import render_table
from stockade.errors import InputError
from stockade.model.cluster import Cluster, Endpoint
from stockade.model.policy import PROTOCOLS, TCP
from stockade.net.namespace import NETNS_DIR
from stockade.probe.client import Outcome, Probe, Verdict, run_probes
from stockade.probe.protocol import Port, Protocol

EXIT_OK = 0
EXIT_DISAGREE = 1

SYMBOLS = {Outcome.ALLOWED: ".", Outcome.REFUSED: "R", Outcome.DENIED: "X",
           Outcome.UNREACHABLE: "U", Outcome.ERROR: "E"}
REACHED = (Outcome.ALLOWED, Outcome.REFUSED)
NOT_PROBED = "-"
MISMATCH = "!"
LEGEND = ("model: . allowed, X denied, - no such named port\n"
          "kernel: . connected, R refused (a RST: reachable, nothing listening; counts as "
          "allowed), X dropped (timeout),\n"
          "        U unreachable, E error, - not probed (itself, or no such named port); "
          "! disagrees with the model")

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
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(run=run_ps)

    rm = sub.add_parser("rm", help="stop containers (SIGTERM, then SIGKILL) and remove them")
    _socket(rm)
    rm.add_argument("keys", nargs="+", metavar="NS/NAME")
    rm.add_argument("--grace", type=float, default=5.0, metavar="SECONDS",
                    help="time between SIGTERM and SIGKILL")
    rm.set_defaults(run=run_rm)

    pr = sub.add_parser("probe", help="the model's matrix beside one measured with real packets",
                        epilog=LEGEND, formatter_class=argparse.RawDescriptionHelpFormatter)
    _socket(pr)
    pr.add_argument("--port", dest="ports", action="append", default=[],
                    metavar="PORT[/PROTO]|NAME", help="what to probe, e.g. 80/tcp, 53/udp or "
                    "a port name (default: every port some endpoint declares)")
    pr.add_argument("--timeout", type=float, default=1.0, metavar="SECONDS",
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
    parts = text.replace(":", "/").split("/")
    if len(parts) > 2 or not all(parts):
        raise InputError(f"--port {text!r}: want PORT[/PROTO], e.g. 80/tcp, 53/udp or http")
    protocol = TCP
    if len(parts) == 2:
        a, b = parts
        port, proto = (b, a) if a.upper() in PROTOCOLS else (a, b)
        protocol = proto.upper()
        if protocol not in PROTOCOLS:
            raise InputError(f"--port {text!r}: protocol must be tcp, udp or sctp")
    else:
        port = parts[0]
    if port.isdigit():
        if not 1 <= int(port) <= 65535:
            raise InputError(f"--port {text!r}: must be between 1 and 65535")
        return int(port), protocol
    return port, protocol


@dataclass(frozen=True)
class Target:
    """An endpoint that can be probed: where its sockets are made, where it is reached."""

    endpoint: Endpoint
    netns: str  # a name under /run/netns
    address: str


def netns_name(path: str) -> str | None:
    """The name under /run/netns for a namespace path, or None (e.g. /proc/PID/ns/net)."""
    if not path or path.startswith("/proc/"):
        return None
    real = os.path.realpath(path)
    if os.path.dirname(real) != NETNS_DIR:
        return None
    return os.path.basename(real)


def targets_of(records: Sequence[EndpointRecord]) -> tuple[list[Target], list[str]]:
    """The probeable endpoints, and the keys of the others (no named namespace, no IP)."""
    found: list[Target] = []
    skipped: list[str] = []
    for rec in records:
        name = netns_name(rec.netns)
        ep = rec.endpoint
        address = ep.ip_for_family(4) or (ep.ips[0] if ep.ips else None)
        if name is None or address is None:
            skipped.append(rec.key)
        else:
            found.append(Target(ep, name, address))
    return found, skipped


def model_matrix(cluster: Cluster, ports: Sequence[tuple[int | str, str]]) -> Matrix:
    """The model's tables, in the order the ports were asked for (every served one if none)."""
    if not ports:
        return compute_matrix(cluster)
    tables: list[Table] = []
    pods: tuple[str, ...] = ()
    for port, protocol in ports:
        part = compute_matrix(cluster, [port], [protocol])
        pods, tables = part.pods, tables + list(part.tables)
    return Matrix(pods, tuple(tables))


@dataclass(frozen=True)
class Measured:
    """What the kernel did for every probed pair: (table index, row, column) → verdict."""

    verdicts: dict[tuple[int, int, int], Verdict]

    def outcome(self, t: int, i: int, j: int) -> Outcome | None:
        v = self.verdicts.get((t, i, j))
        return None if v is None else v.outcome


def plan_probes(matrix: Matrix, targets: dict[str, Target]) -> dict[tuple[int, int, int], Probe]:
    """One probe per ordered pair of different endpoints, for every destination that has
    the port: all of them for a number, those declaring it for a name."""
    out: dict[tuple[int, int, int], Probe] = {}
    for t, table in enumerate(matrix.tables):
        proto = table.probe.protocol
        for j, dst_key in enumerate(matrix.pods):
            dst = targets[dst_key]
            port = table.probe.port
            number = port if isinstance(port, int) else dst.endpoint.resolve_port(port, proto)
            if number is None:
                continue
            for i, src_key in enumerate(matrix.pods):
                if i != j:
                    out[(t, i, j)] = Probe(src_key, targets[src_key].netns, dst_key,
                                           dst.address, Port(number, Protocol(proto)))
    return out


def measure(matrix: Matrix, targets: dict[str, Target], timeout: float) -> Measured:
    plan = plan_probes(matrix, targets)
    keys = list(plan)
    verdicts = run_probes([plan[k] for k in keys], timeout=timeout)
    return Measured(dict(zip(keys, verdicts, strict=True)))


def agrees(model: bool | None, outcome: Outcome) -> bool:
    """Refused counts as reachable; unreachable and errors never agree."""
    if model is None or outcome in (Outcome.UNREACHABLE, Outcome.ERROR):
        return False
    return model == (outcome in REACHED)


def _measured_cells(matrix: Matrix, measured: Measured, t: int) -> list[list[str]]:
    rows: list[list[str]] = []
    for i, cells in enumerate(matrix.tables[t].cells):
        row = []
        for j, model in enumerate(cells):
            outcome = measured.outcome(t, i, j)
            if outcome is None:
                row.append(NOT_PROBED)
            else:
                row.append(SYMBOLS[outcome] + ("" if agrees(model, outcome) else MISMATCH))
        rows.append(row)
    return rows


def _grid(title: str, pods: Sequence[str], cells: list[list[str]]) -> list[str]:
    """The layout of `engine.report.render_table`, with cells of any symbol."""
    first = max([len(title), *(len(p) for p in pods)])
    widths = [len(p) for p in pods]

    def line(label: str, row: Sequence[str]) -> str:
        parts = [label.ljust(first)] + [c.ljust(w) for c, w in zip(row, widths, strict=True)]
        return " ".join(parts).rstrip()

    return [line(title, pods)] + [line(p, r) for p, r in zip(pods, cells, strict=True)]


def side_by_side(left: Sequence[str], right: Sequence[str], gap: int = 5) -> str:
    width = max(len(x) for x in left) + gap
    return "\n".join((a.ljust(width) + b).rstrip() for a, b in zip(left, right, strict=True))


def report(matrix: Matrix, measured: Measured) -> tuple[str, int, int]:
    """Both matrices side by side, the disagreements spelled out; (text, agreed, probed)."""
    blocks: list[str] = []
    for t, table in enumerate(matrix.tables):
        left = render_table(Matrix(matrix.pods, (table,))).rstrip("\n").split("\n")
        right = _grid(table.probe.render(), matrix.pods, _measured_cells(matrix, measured, t))
        if not blocks:
            left, right = ["model (policies)", *left], ["kernel (real packets)", *right]
        blocks.append(side_by_side(left, right))
    lines: list[str] = []
    agreed = 0
    for (t, i, j), verdict in sorted(measured.verdicts.items()):
        model = matrix.tables[t].cells[i][j]
        if agrees(model, verdict.outcome):
            agreed += 1
            continue
        said = {True: "allows", False: "denies", None: "has no such port"}[model]
        lines.append(f"  {matrix.pods[i]} -> {matrix.pods[j]} {verdict.probe.port}: model "
                     f"{said}, kernel: {verdict.outcome.value}"
                     + (f" ({verdict.detail})" if verdict.detail else ""))
    text = "\n\n".join(blocks) + "\n\n" + LEGEND + "\n"
    if lines:
        text += "\ndisagreements:\n" + "\n".join(lines) + "\n"
    return text, agreed, len(measured.verdicts)


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
    scoped = Cluster(cluster.namespaces, tuple(t.endpoint for t in targets), cluster.policies)
    if len(targets) < 2:
        print("fewer than two endpoints to probe; nothing to compare")
        return EXIT_OK
    matrix = model_matrix(scoped, ports)
    measured = measure(matrix, {t.endpoint.key: t for t in targets}, args.timeout)
    text, agreed, probed = report(matrix, measured)
    sys.stdout.write(text)
    print(f"\nmodel and kernel agree on {agreed}/{probed} pairs")
    return EXIT_OK if agreed == probed else EXIT_DISAGREE
