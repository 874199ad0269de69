"""`stockade probe`'s logic: the model's matrix of the agent's state against the kernel's.

The model's matrix is computed from the agent's state (:mod:`stockade.engine.matrix`,
the same tables `stockade matrix` prints); the same pairs are measured with real
connections from each endpoint's network namespace (:mod:`stockade.probe.client`);
:func:`report` puts both side by side and spells out every disagreement. The
CLI (`cli/containers.py`) fetches the state, parses arguments and prints.

The endpoints' own processes are the servers. A destination that nobody
listens on answers a TCP SYN with a RST: the packet crossed the datapath and
was not dropped, so *refused counts as reachable*, shown as ``R`` rather than
``.`` to say that nothing listened. Policy denies by dropping, so a denied
connection times out (``X``). Unreachable (``U``) and errors (``E``) match
neither verdict and always count as disagreement.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from stockade.agent.records import EndpointRecord
from stockade.engine.matrix import Matrix, TruthTable, compute_matrix
from stockade.engine.report import render_table
from stockade.model.cluster import Cluster, Endpoint
from stockade.net.namespace import NETNS_DIR
from stockade.probe.client import Outcome, Probe, ProbeResult, run_probes
from stockade.probe.protocol import Port, Protocol

__all__ = ["LEGEND", "NETNS_DIR", "Measured", "Target", "agrees", "measure", "model_matrix",
           "netns_name", "plan_probes", "report", "scope", "targets_of"]

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
    tables: list[TruthTable] = []
    pods: tuple[str, ...] = ()
    for port, protocol in ports:
        part = compute_matrix(cluster, [port], [protocol])
        pods, tables = part.pods, tables + list(part.tables)
    return Matrix(pods, tuple(tables))


@dataclass(frozen=True)
class Measured:
    """What the kernel did for every probed pair: (table index, row, column) → verdict."""

    verdicts: dict[tuple[int, int, int], ProbeResult]

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


def scope(cluster: Cluster, targets: Sequence[Target]) -> Cluster:
    """The cluster with only the probeable endpoints: the pairs both sides can judge."""
    return Cluster(cluster.namespaces, tuple(t.endpoint for t in targets), cluster.policies)
