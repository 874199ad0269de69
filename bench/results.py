"""What a benchmark hands to `bench/report.py`: its tables, its goals and the series
to plot, as one JSON file (`--json FILE` on each benchmark that feeds the report)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Goal:
    goal: str
    measured: str
    met: bool


@dataclass
class Results:
    name: str
    command: str = ""
    tables: list[Table] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    # plot name -> {"x": label, "y": label, "lines": {name: [[x, y], ...]}} or
    # {"y": label, "bars": {group: {name: value}}}
    series: dict[str, dict[str, Any]] = field(default_factory=dict)

    def table(self, title: str, header: Sequence[str], rows: Sequence[Sequence[str]],
              note: str = "") -> None:
        self.tables.append(Table(title, list(header), [list(r) for r in rows], note))

    def goal(self, text: str, measured: str, met: bool) -> None:
        self.goals.append(Goal(text, measured, met))

    def write(self, path: str | Path | None) -> None:
        if path:
            Path(path).write_text(json.dumps(asdict(self), indent=1), encoding="utf-8")


def read(path: str | Path) -> Results:
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    return Results(raw["name"], raw.get("command", ""),
                   [Table(**t) for t in raw.get("tables", [])],
                   [Goal(**g) for g in raw.get("goals", [])], raw.get("series", {}))
