"""Renderings of the analyses: the matrix, coverage, diff and lint (pure).

Every renderer is a pure function from an analysis' result to text (or, for
``-o json``, to a JSON-able dict); the CLI only prints. The verdict of one flow
renders in `engine/explain.py`, next to its trace.

The reachability matrix renders as table, json, csv or markdown (its pictures are
`engine/graph.py` and `engine/heatmap.py`). The symbols are the upstream e2e
tests': `.` allowed, `X` denied; `-` marks a destination that serves no port of the
probed name, where there is no connection to judge. A pod talking to itself is
always allowed, so the diagonal shows `.`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any
from urllib.parse import quote

import yaml

from stockade.engine import coverage as cov
from stockade.engine.diff import Change, PolicyDiff
from stockade.engine.lint import CHECKS, WARNING, Finding
from stockade.engine.matrix import Matrix, TruthTable

ALLOWED, DENIED, NO_PORT = ".", "X", "-"
LEGEND = f"{ALLOWED} allowed, {DENIED} denied, {NO_PORT} destination serves no such named port"
FORMATS = ("txt", "json", "yaml", "csv", "md")


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


def matrix_data(matrix: Matrix) -> dict[str, Any]:
    """`render_json`'s data, for the other structured formats (yaml)."""
    data: dict[str, Any] = json.loads(render_json(matrix))
    return data


def sub_matrix(matrix: Matrix, pods: Iterable[str]) -> Matrix:
    """The rows and columns of `pods` only (in the matrix's order), every verdict kept."""
    keep = set(pods)
    index = [i for i, p in enumerate(matrix.pods) if p in keep]
    tables = tuple(TruthTable(t.probe, tuple(tuple(t.cells[i][j] for j in index)
                                             for i in index)) for t in matrix.tables)
    return Matrix(tuple(matrix.pods[i] for i in index), tables)


def neighbours(matrix: Matrix, pods: Iterable[str]) -> set[str]:
    """`pods` and every pod they may connect to, or that may connect to them, on some probe."""
    focus = set(pods)
    found = set(focus)
    for t in matrix.tables:
        for i, src in enumerate(matrix.pods):
            for j, dst in enumerate(matrix.pods):
                if t.cells[i][j] and (src in focus or dst in focus):
                    found.update((src, dst))
    return found


RENDERERS: dict[str, Callable[[Matrix], str]] = {
    "txt": render_table,
    "table": render_table,
    "json": render_json,
    "yaml": lambda m: yaml_text(matrix_data(m)),
    "csv": render_csv,
    "md": render_markdown,
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
    if report.selections:
        lines.append("ClusterNetworkPolicies and the pods they select:")
        lines += [f"  {sel.tier} priority {sel.priority} {sel.policy}: "
                  f"{', '.join(sel.pods) or 'no pod'}" for sel in report.selections]
    lines.append(coverage_summary(report))
    return lines


def _gap_text(gap: cov.Gap) -> str:
    if not gap.subject.startswith(("NetworkPolicy ", "ClusterNetworkPolicy ")):
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
        **({"selections": [{"policy": sel.policy, "tier": sel.tier, "priority": sel.priority,
                            "pods": list(sel.pods)} for sel in report.selections]}
           if report.selections else {}),
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


def _finding_text(f: Finding, line: int = 0) -> str:
    where = f"{f.source}:{line}" if f.source and line else f.source
    head = ": ".join(p for p in (where, f.subject, f.where) if p)
    return f"{head}: {f.code} {f.severity}: {f.message}"


def _lines_for(findings: Sequence[Finding], lines: Sequence[int]) -> Sequence[int]:
    return lines if lines else [0] * len(findings)


def lint_text(findings: Sequence[Finding], lines: Sequence[int] = ()) -> list[str]:
    """One line per finding, `file:line: subject: field: CODE severity: message` (the
    line where the policy starts, when known), then the counts."""
    warnings = sum(f.severity == WARNING for f in findings)
    out = [_finding_text(f, n) for f, n in zip(findings, _lines_for(findings, lines),
                                                strict=True)]
    out.append(f"{_count(warnings, 'warning', 'warnings')}, "
               f"{_count(len(findings) - warnings, 'note', 'notes')}")
    return out


def lint_json(findings: Sequence[Finding], lines: Sequence[int] = ()) -> dict[str, Any]:
    """`line`: where the policy starts in `source`, or null when unknown."""
    warnings = sum(f.severity == WARNING for f in findings)
    return {
        "findings": [{"code": f.code, "severity": f.severity, "title": CHECKS[f.code][1],
                      "subject": f.subject, "where": f.where, "message": f.message,
                      "source": f.source, "line": n or None}
                     for f, n in zip(findings, _lines_for(findings, lines), strict=True)],
        "warnings": warnings,
        "notes": len(findings) - warnings,
    }


# ---- the structured formats every command shares ---------------------------------------


def json_text(data: Any) -> str:
    return json.dumps(data, indent=2) + "\n"


def yaml_text(data: Any) -> str:
    text: str = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000)
    return text


def rows_text(columns: Sequence[str], rows: Iterable[Sequence[object]], fmt: str) -> str:
    """A table as CSV (one header row) or as a Markdown table."""
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(["" if v is None else v for v in row] for row in rows)
        return out.getvalue()
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_md_text("" if v is None else str(v)) for v in row) + " |"
              for row in rows]
    return "\n".join(lines) + "\n"


def _md_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


COVERAGE_COLUMNS = ("kind", "subject", "where", "reason", "source")


def coverage_rows(report: cov.Coverage) -> list[tuple[str, ...]]:
    return [(g.kind, g.subject, g.where, g.reason, g.source) for g in report.gaps]


DIFF_COLUMNS = ("change", "from", "to", "ports", "reason")


def diff_rows(result: PolicyDiff) -> list[tuple[str, ...]]:
    return [(c.change, c.src, c.dst, " ".join(p.render() for p in c.ports), c.reason)
            for c in result.changes]


LINT_COLUMNS = ("code", "severity", "subject", "where", "message", "source", "line")


def lint_rows(findings: Sequence[Finding], lines: Sequence[int]) -> list[tuple[object, ...]]:
    return [(f.code, f.severity, f.subject, f.where, f.message, f.source, line or None)
            for f, line in zip(findings, lines, strict=True)]


# ---- SARIF 2.1.0 (code-scanning annotations) -------------------------------------------

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
SARIF_LEVELS = ("error", "warning", "note", "none")


@dataclass(frozen=True)
class SarifResult:
    """One finding: its rule, level, message and where it is (line 0: unknown)."""

    rule: str
    level: str
    message: str
    file: str
    line: int = 0
    subject: str = ""


def artifact_uri(path: str) -> str:
    """A file as a SARIF artifact URI: relative paths stay relative (to the checkout, as
    code scanning resolves them), absolute ones become file: URIs."""
    if path in ("", "-"):
        return "stdin"
    if PureWindowsPath(path).is_absolute() and not path.startswith("/"):
        return PureWindowsPath(path).as_uri()
    posix = PurePosixPath(path.replace("\\", "/"))
    if posix.is_absolute():
        return posix.as_uri()
    return quote(str(posix).removeprefix("./"))


def sarif_log(tool: str, version: str, rules: Mapping[str, tuple[str, str]],
              results: Sequence[SarifResult]) -> dict[str, Any]:
    """A SARIF log of one run: `rules` by id as (default level, title)."""
    ids = list(rules)
    out_results = []
    for r in results:
        location: dict[str, Any] = {"artifactLocation": {"uri": artifact_uri(r.file)}}
        if r.line > 0:
            location["region"] = {"startLine": r.line}
        result: dict[str, Any] = {
            "ruleId": r.rule, "ruleIndex": ids.index(r.rule), "level": r.level,
            "message": {"text": r.message},
            "locations": [{"physicalLocation": location}],
        }
        if r.subject:
            result["locations"][0]["logicalLocations"] = [{"fullyQualifiedName": r.subject}]
        out_results.append(result)
    return {
        "$schema": SARIF_SCHEMA,
        "version": SARIF_VERSION,
        "runs": [{
            "tool": {"driver": {
                "name": tool, "version": version,
                "rules": [{"id": rid, "name": rid,
                           "shortDescription": {"text": title},
                           "defaultConfiguration": {"level": level}}
                          for rid, (level, title) in rules.items()],
            }},
            "results": out_results,
        }],
    }


def lint_sarif_results(findings: Sequence[Finding], lines: Sequence[int]) -> list[SarifResult]:
    return [SarifResult(f.code, f.severity, f"{f.subject}" + (f" {f.where}" if f.where else "")
                        + f": {f.message}", f.source, line, f.subject)
            for f, line in zip(findings, lines, strict=True)]


LINT_RULES = {code: (sev, title) for code, (sev, title) in CHECKS.items()}
