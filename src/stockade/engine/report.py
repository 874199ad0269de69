"""Renderings of the analyses: the matrix, coverage, diff and lint (pure).

Every renderer is a pure function from an analysis' result to text (or, for
``-o json``, to a JSON-able dict); the CLI only prints. The verdict of one flow
renders in `engine/explain.py`, next to its trace.

The reachability matrix renders as table, json, csv, markdown or graphviz dot. The symbols are the
upstream e2e tests': `.` allowed, `X` denied; `-` marks a destination that serves
no port of the probed name, where there is no connection to judge. A pod talking
to itself is always allowed, so the diagonal shows `.`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from typing import Any

from stockade.engine import coverage as cov
from stockade.engine.diff import Change, PolicyDiff
from stockade.engine.lint import CHECKS, WARNING, Finding
from stockade.engine.matrix import Matrix, TruthTable

ALLOWED, DENIED, NO_PORT = ".", "X", "-"
LEGEND = f"{ALLOWED} allowed, {DENIED} denied, {NO_PORT} destination serves no such named port"
FORMATS = ("table", "json", "csv", "md", "dot")


def symbol(cell: bool | None) -> str:
    if cell is None:
        return NO_PORT
    return ALLOWED if cell else DENIED


def verdict_word(cell: bool | None) -> str:
    if cell is None:
        return "no-port"
    return "allow" if cell else "deny"


def render_table(matrix: Matrix) -> str:
    """One aligned table per probe, separated by a blank line."""
    return "\n\n".join(_text_table(matrix, t) for t in matrix.tables) + "\n"


def _text_table(matrix: Matrix, table: TruthTable) -> str:
    head = table.probe.render()
    first = max([len(head), *(len(p) for p in matrix.pods)])
    widths = [len(p) for p in matrix.pods]
    lines = [_row(head, first, list(matrix.pods), widths)]
    for pod, cells in zip(matrix.pods, table.cells, strict=True):
        lines.append(_row(pod, first, [symbol(c) for c in cells], widths))
    return "\n".join(lines)


def _row(label: str, first: int, cells: list[str], widths: list[int]) -> str:
    parts = [label.ljust(first)] + [c.ljust(w) for c, w in zip(cells, widths, strict=True)]
    return " ".join(parts).rstrip()


def render_json(matrix: Matrix) -> str:
    """`tables[].allowed[from][to]`: true, false, or null where the port is not served."""
    tables = []
    for t in matrix.tables:
        allowed = {src: dict(zip(matrix.pods, cells, strict=True))
                   for src, cells in zip(matrix.pods, t.cells, strict=True)}
        tables.append({"protocol": t.probe.protocol, "port": t.probe.port, "allowed": allowed})
    return json.dumps({"pods": list(matrix.pods), "tables": tables}, indent=2) + "\n"


def render_csv(matrix: Matrix) -> str:
    """One row per (probe, source, destination): easy to filter and to load anywhere."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["protocol", "port", "from", "to", "verdict"])
    for t in matrix.tables:
        for src, cells in zip(matrix.pods, t.cells, strict=True):
            for dst, cell in zip(matrix.pods, cells, strict=True):
                writer.writerow([t.probe.protocol, t.probe.port, src, dst, verdict_word(cell)])
    return out.getvalue()


def render_markdown(matrix: Matrix) -> str:
    """A heading and a table per probe (rows: from, columns: to), then the legend."""
    blocks = []
    for t in matrix.tables:
        lines = [f"### {t.probe.render()}", "",
                 "| from \\ to | " + " | ".join(matrix.pods) + " |",
                 "|---" * (len(matrix.pods) + 1) + "|"]
        for src, cells in zip(matrix.pods, t.cells, strict=True):
            lines.append(f"| **{src}** | " + " | ".join(_md_cell(c) for c in cells) + " |")
        blocks.append("\n".join(lines))
    blocks.append(f"Legend: {_md_escape(LEGEND)}.")
    return "\n\n".join(blocks) + "\n"


def _md_cell(cell: bool | None) -> str:
    # A bare `-` or `.` is fine inside a table cell; escape anyway for renderers that differ.
    return _md_escape(symbol(cell))


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("-", "\\-")


def render_dot(matrix: Matrix) -> str:
    """Pods as nodes clustered per namespace; an edge per allowed pair, labelled with probes."""
    lines = ["digraph reachability {", "  rankdir=LR;", "  node [shape=box];"]
    by_ns: dict[str, list[str]] = {}
    for pod in matrix.pods:
        by_ns.setdefault(pod.split("/", 1)[0], []).append(pod)
    for i, (ns, pods) in enumerate(sorted(by_ns.items())):
        lines.append(f"  subgraph cluster_{i} {{")
        lines.append(f"    label={_quote(ns)};")
        lines.extend(f"    {_quote(p)} [label={_quote(p.split('/', 1)[1])}];" for p in pods)
        lines.append("  }")
    for (src, dst), probes in _edges(matrix).items():
        lines.append(f"  {_quote(src)} -> {_quote(dst)} [label={_quote(', '.join(probes))}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _edges(matrix: Matrix) -> dict[tuple[str, str], list[str]]:
    """Allowed pairs (self pairs left out) with the probes that allow them, in order."""
    edges: dict[tuple[str, str], list[str]] = {}
    for t in matrix.tables:
        for src, cells in zip(matrix.pods, t.cells, strict=True):
            for dst, cell in zip(matrix.pods, cells, strict=True):
                if cell and src != dst:
                    edges.setdefault((src, dst), []).append(t.probe.render())
    return dict(sorted(edges.items()))


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


RENDERERS: dict[str, Callable[[Matrix], str]] = {
    "table": render_table,
    "json": render_json,
    "csv": render_csv,
    "md": render_markdown,
    "dot": render_dot,
}


# ---- coverage ----------------------------------------------------------------------------

SECTIONS = (
    ("Not isolated for ingress (any pod may connect to them):", (cov.UNISOLATED_INGRESS,)),
    ("Not isolated for egress (they may connect anywhere):", (cov.UNISOLATED_EGRESS,)),
    ("Policies that select no pod:", (cov.UNUSED_POLICY,)),
    ("Rules and rule entries that can never match:",
     (cov.IGNORED_RULES, cov.DEAD_RULE, cov.DEAD_PEER, cov.DEAD_PORT)),
)


def coverage_text(report: cov.Coverage) -> list[str]:
    lines: list[str] = []
    for title, kinds in SECTIONS:
        gaps = [g for g in report.gaps if g.kind in kinds]
        if not gaps:
            continue
        lines.append(title)
        lines += [f"  {_gap_text(g)}" for g in gaps]
    lines.append(coverage_summary(report))
    return lines


def _gap_text(gap: cov.Gap) -> str:
    if not gap.subject.startswith("NetworkPolicy "):
        return f"{gap.subject}: {gap.reason}"
    where = f" {gap.where}" if gap.where else ""
    src = f" ({gap.source})" if gap.source else ""
    return f"{gap.subject}{where}{src}: {gap.reason}"


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def coverage_summary(report: cov.Coverage) -> str:
    n = {k: len(report.of_kind(k)) for k in cov.KINDS}
    dead = sum(n[k] for k in SECTIONS[3][1])
    return (f"{_count(report.pods, 'pod', 'pods')}, "
            f"{_count(report.policies, 'policy', 'policies')}: "
            f"{n[cov.UNISOLATED_INGRESS]} not isolated for ingress, "
            f"{n[cov.UNISOLATED_EGRESS]} not isolated for egress, "
            f"{_count(n[cov.UNUSED_POLICY], 'policy', 'policies')} selecting no pod, "
            f"{_count(dead, 'rule or entry', 'rules or entries')} that can never match")


def coverage_json(report: cov.Coverage) -> dict[str, Any]:
    return {
        "pods": report.pods,
        "policies": report.policies,
        "gaps": [{"kind": g.kind, "subject": g.subject, "where": g.where,
                  "reason": g.reason, "source": g.source} for g in report.gaps],
        "counts": {k: len(report.of_kind(k)) for k in cov.KINDS},
    }


# ---- diff --------------------------------------------------------------------------------


def diff_text(result: PolicyDiff) -> list[str]:
    lines = [c.render() for c in result.changes]
    if not result.changes:
        return ["no connection opened or closed"]
    lines.append(f"{len(result.opened)} opened, {len(result.closed)} closed "
                 "(each line: one pod pair and its ports)")
    return lines


def _change_json(c: Change) -> dict[str, Any]:
    return {
        "from": c.src,
        "to": c.dst,
        "ports": [{"protocol": p.protocol, "ranges": [[r.low, r.high] for r in p.ranges]}
                  for p in c.ports],
        "reason": c.reason,
        "text": c.render(),
    }


def diff_json(result: PolicyDiff) -> dict[str, Any]:
    return {"opened": [_change_json(c) for c in result.opened],
            "closed": [_change_json(c) for c in result.closed]}


# ---- lint --------------------------------------------------------------------------------


def _finding_text(f: Finding) -> str:
    head = ": ".join(p for p in (f.source, f.subject, f.where) if p)
    return f"{head}: {f.code} {f.severity}: {f.message}"


def lint_text(findings: Sequence[Finding]) -> list[str]:
    warnings = sum(f.severity == WARNING for f in findings)
    lines = [_finding_text(f) for f in findings]
    lines.append(f"{_count(warnings, 'warning', 'warnings')}, "
                 f"{_count(len(findings) - warnings, 'note', 'notes')}")
    return lines


def lint_json(findings: Sequence[Finding]) -> dict[str, Any]:
    warnings = sum(f.severity == WARNING for f in findings)
    return {
        "findings": [{"code": f.code, "severity": f.severity, "title": CHECKS[f.code][1],
                      "subject": f.subject, "where": f.where, "message": f.message,
                      "source": f.source} for f in findings],
        "warnings": warnings,
        "notes": len(findings) - warnings,
    }
