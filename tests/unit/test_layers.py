"""The layer contracts of pyproject.toml ([tool.importlinter]) hold, and can fail.

The real contracts are checked on the real package; then the same contracts are
checked on a copy of the package with two forbidden imports added, and must
report both, so a green `lint-imports` means something. Each run takes ~0.3 s.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support import REPO_ROOT

import stockade

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
CONFIG = REPO_ROOT / "pyproject.toml"


def lint_imports(cwd: Path, pythonpath: Path | None = None) -> tuple[int, str, set[str]]:
    """Exit code, output and the broken direct imports ("a -> b") of one run."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    proc = subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(CONFIG)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    broken = set(re.findall(r"^-\s+(\S+ -> \S+)(?: \(l\.\d+\))?$", out, re.MULTILINE))
    return proc.returncode, out, broken


def test_the_real_contracts_hold(tmp_path: Path) -> None:
    code, out, broken = lint_imports(tmp_path)
    assert "Contracts: " in out, out
    assert code == 0 and not broken, out


def test_a_violating_package_fails_the_same_contracts(tmp_path: Path) -> None:
    src = Path(stockade.__file__).resolve().parent
    copy = tmp_path / "pkgs" / "stockade"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "model" / "labels.py").open("a") as f:
        f.write("\nimport socket  # injected: I/O in the pure core\n")
    with (copy / "cli" / "validate.py").open("a") as f:
        f.write("\nfrom stockade.datapath import nfnetlink  # injected: a kernel adapter\n")
    code, out, broken = lint_imports(tmp_path, pythonpath=tmp_path / "pkgs")
    assert code != 0, out
    assert "stockade.model.labels -> socket" in broken, out
    assert "stockade.cli.validate -> stockade.datapath.nfnetlink" in broken, out
    assert re.search(r"model, engine and compile .* BROKEN", out), out
    assert re.search(r"the CLI imports no kernel adapter directly BROKEN", out), out


def test_tests_find_the_shared_corpora_one_way() -> None:
    """Only tests/support computes where ../shared is; no machine path anywhere."""
    tests = REPO_ROOT / "tests"
    offenders = []
    for path in tests.rglob("*.py"):
        if path.parent.name == "support" or path == Path(__file__):
            continue
        text = path.read_text()
        if "/work/" in text or re.search(r"""["']shared["']""", text):
            offenders.append(str(path.relative_to(REPO_ROOT)))
    assert not offenders, f"use tests.support.shared(...) instead: {offenders}"
