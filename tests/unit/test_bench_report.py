"""bench/report.py --only: the sections (and goals) of the benchmarks not run are kept from
the report already written, each saying when it was measured."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

EARLIER = """# Benchmarks

Written by `make bench`.

## The machine

|  |  |
| --- | --- |
| date (UTC) | 2026-12-01 10:00 |
| commit | abc1234 |

## Goals

| benchmark | goal | measured | status |
| --- | --- | --- | --- |
| offline | compile <= 1 s | 1.50 s | **not met** |
| cni | ADD p99 <= 50 ms (a \\| b) | 42 ms | met |

## offline

`.venv/bin/python bench/offline.py --repeat 2 --json /tmp/r/offline.json` (15 s)

**stages**

| size | s |
| --- | --- |
| 10k/1k | 0.41 |

![offline-stages](img/offline-stages.png)


## cni

`.venv/bin/python bench/cni.py --rounds 4 --json /tmp/c` (72 s; 2026-12-02 09:00 UTC, commit d5)

**ADD**

| measure | p99 ms |
| --- | --- |
| ADD | 42 |
"""


@pytest.fixture
def report() -> Any:
    sys.path.insert(0, str(BENCH))
    try:
        import report as module

        yield module
    finally:
        sys.path.remove(str(BENCH))


def test_only_keeps_the_other_sections_and_their_goals(report: Any, tmp_path: Path) -> None:
    from results import Results

    kept = report.kept_sections(EARLIER, ["multihost"])
    assert list(kept) == ["offline", "cni"]
    # A section without its own date gets the earlier report's; --json FILE is dropped.
    assert kept["offline"].lines[0] == ("`.venv/bin/python bench/offline.py --repeat 2` "
                                        "(15 s; 2026-12-01 10:00 UTC, commit abc1234)")
    assert kept["cni"].lines[0] == ("`.venv/bin/python bench/cni.py --rounds 4` "
                                    "(72 s; 2026-12-02 09:00 UTC, commit d5)")
    assert kept["cni"].goals == [["cni", "ADD p99 <= 50 ms (a | b)", "42 ms", "met"]]
    new = Results("multihost", "bench/multihost.py --changes 3 --json /tmp/x.json")
    new.table("latency", ["change", "p50"], [["policy", "134"]])
    text = report.render({"multihost": (new, 12.0, "", "load average 1.5 at the start, 2.0 at "
                                                    "the end")}, tmp_path, kept)
    assert [line for line in text.splitlines() if line.startswith("## ")] == [
        "## The machine", "## Goals", "## offline", "## cni", "## multihost"]
    assert "| cni | ADD p99 <= 50 ms (a \\| b) | 42 ms | met |" in text
    assert "`.venv/bin/python bench/multihost.py --changes 3` (12 s; " in text
    assert "; load average 1.5 at the start, 2.0 at the end)" in text
    assert "| policy | 134 |" in text
    # Written again with --only multihost, nothing of the others drifts; with --only
    # offline, the multihost section is kept in turn.
    assert report.kept_sections(text, ["multihost"]) == kept
    again = report.kept_sections(text, ["offline"])
    assert list(again) == ["cni", "multihost"] and again["cni"] == kept["cni"]
    assert "| policy | 134 |" in again["multihost"].lines


def test_a_missing_plotting_package_stops_the_report_before_any_step(
        report: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plots are drawn after the steps: without matplotlib, say so before measuring
    for half an hour, not after."""
    import importlib.util
    import os

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    ran: list[str] = []
    monkeypatch.setattr(report, "run_step", lambda name, *a: ran.append(name))
    monkeypatch.setattr(sys, "argv", ["report.py", "--only", "agent", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        report.main()
    assert "matplotlib is missing" in str(stop.value)
    assert ran == [] and not (tmp_path / "benchmarks.md").exists()
