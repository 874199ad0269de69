"""The demo scripts: the analysis part runs anywhere; demo.sh's live part needs root.

scripts/demo.sh (what `make demo` runs) starts a real agent and containers; it
is run end to end by tests/integration/test_agent_containers.py. Its analysis
part lives in scripts/analysis-demo.sh, which needs no privileges and is run
here; demo.sh with STOCKADE_DEMO_LIVE=0 runs only that part.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, **env: str) -> subprocess.CompletedProcess[str]:
    stockade = Path(sys.executable).parent / "stockade"
    full = {**os.environ, "STOCKADE": str(stockade), **env}
    return subprocess.run(["bash", str(ROOT / "scripts" / script)], cwd="/", env=full,
                          capture_output=True, text=True, timeout=120, check=False)


def _assert_every_analysis(out: str) -> None:
    for command in ("validate", "lint", "coverage", "matrix", "explain", "diff"):
        assert f"$ stockade {command} " in out
    assert "SK001 warning" in out
    assert "ALLOWED: frontend/web -> backend/api" in out
    assert "DENIED: frontend/admin -> backend/api" in out
    assert "+ frontend/admin -> backend/api TCP/8000" in out


def test_analysis_demo_runs_every_analysis_and_exits_0() -> None:
    done = _run("analysis-demo.sh")
    assert done.returncode == 0, done.stderr
    _assert_every_analysis(done.stdout)
    assert done.stdout.rstrip().endswith("analysis: done")


def test_demo_without_the_live_part_runs_the_analysis() -> None:
    done = _run("demo.sh", STOCKADE_DEMO_LIVE="0")
    assert done.returncode == 0, done.stderr
    _assert_every_analysis(done.stdout)
    assert "$ stockade run " not in done.stdout
    assert done.stdout.rstrip().endswith("demo: done")
