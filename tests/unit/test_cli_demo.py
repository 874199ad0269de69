"""scripts/demo.sh (what `make demo` runs) goes through and shows every analysis."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_every_analysis_and_exits_0() -> None:
    stockade = Path(sys.executable).parent / "stockade"
    env = {**os.environ, "STOCKADE": str(stockade)}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], cwd="/", env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for command in ("validate", "lint", "coverage", "matrix", "explain", "diff"):
        assert f"$ stockade {command} " in out
    assert "SK001 warning" in out
    assert "ALLOWED: frontend/web -> backend/api" in out
    assert "DENIED: frontend/admin -> backend/api" in out
    assert "+ frontend/admin -> backend/api TCP/8000" in out
    assert out.rstrip().endswith("demo: done")
