"""The offline compile with its pure core compiled by mypyc, beside the pure-Python tree.

Issue #11 allows a compiled hot path where a profile shows the pure core cannot
reach a goal otherwise. This measures what compiling would buy before anything is
built that way: a copy of `src/` in a temporary directory, the modules the
profile of `stockade compile` spends its time in compiled there with mypyc (which
ships with mypy), then `bench/offline.py --against` that copy: every stage and the
command, both trees in turns.

    .venv/bin/python bench/compiled.py                        # Antrea's shape
    .venv/bin/python bench/compiled.py --sizes 100k/10k --keep

`policy.py` and `cluster.py` stay interpreted: their `once` properties keep values
in the instance's `__dict__`, which mypyc's native classes do not have.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
MODULES = (
    "stockade/model/selector.py", "stockade/model/labels.py", "stockade/model/decode.py",
    "stockade/model/cidr.py", "stockade/model/validate.py",
    "stockade/engine/index.py", "stockade/engine/resolve.py",
    "stockade/compile/ir.py", "stockade/compile/lower.py", "stockade/compile/membership.py",
    "stockade/compile/nft.py", "stockade/compile/nft_text.py",
)


def build(where: Path) -> Path:
    """A copy of the tree with MODULES compiled in place; its `src`."""
    src = where / "src"
    shutil.copytree(SRC, src, ignore=shutil.ignore_patterns("__pycache__"))
    mypyc = Path(sys.executable).parent / "mypyc"
    subprocess.run([str(mypyc), *MODULES], cwd=src, check=True, stdout=subprocess.DEVNULL)
    built = sorted(p.relative_to(src) for p in src.rglob("*.so"))
    print(f"# compiled {len(built)} extension modules in {src}", file=sys.stderr)
    return src


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["antrea 100k/75k/25k ns"],
                    help="sizes of bench/offline.py (default: Antrea's shape)")
    ap.add_argument("--keep", action="store_true", help="keep the compiled copy")
    args = ap.parse_args()
    where = Path(tempfile.mkdtemp(prefix="stockade-mypyc-"))
    try:
        src = build(where)
        subprocess.run([sys.executable, str(HERE / "offline.py"), "--sizes", *args.sizes,
                        "--against", str(src)], check=True)
    finally:
        if not args.keep:
            shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
