"""bench/multihost.py at a tiny size: it runs end to end (three hosts, etcd, agents, real
packets), its --json has the figures bench/report.py renders, and it leaves nothing
behind, also when it is interrupted midway."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.support.etcd import etcd_binary

from stockade.net.namespace import list_netns

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(etcd_binary() is None, reason="etcd is not installed")]

BENCH = Path(__file__).resolve().parents[2] / "bench"
TINY = ["--endpoints", "30", "--policies", "5", "--changes", "3"]


def leftovers() -> set[str]:
    """The bench's namespaces and temporary directories (``bm`` + a per-run tag)."""
    import tempfile

    tmp = Path(tempfile.gettempdir())
    return ({n for n in list_netns() if n.startswith("bm")}
            | {p.name for p in tmp.glob("stockade-bench-multihost-*")})


def test_the_multihost_bench_runs_at_a_tiny_size(tmp_path: Path) -> None:
    before = leftovers()
    out = tmp_path / "multihost.json"
    proc = subprocess.run([sys.executable, "multihost.py", *TINY, "--json", str(out)],
                          cwd=BENCH, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["name"] == "multihost" and res["command"].startswith("bench/multihost.py")
    latency, load, memory = res["tables"]
    header = latency["header"]
    rows = {r[0]: dict(zip(header, r, strict=True)) for r in latency["rows"]}
    assert set(rows) == {"policy", "label", "endpoint"}
    for kind, row in rows.items():
        assert row["n"] == "3", row
        p50, p99, top = (float(row[f"start {x}"]) for x in ("p50", "p99", "max"))
        assert 0 < p50 <= p99 <= top < 60_000, (kind, row)
        # From the return is never longer than from the start.
        assert 0 <= float(row["return p50"]) <= p50, (kind, row)
        assert 0 < float(row["apply call p50"]) <= top, (kind, row)
        assert row["kernel-checked"] == "1", row  # the first of each kind, in every kernel
    (loaded,) = load["rows"]
    assert loaded[0].startswith("30 pods, 6 policies")
    assert 0 <= float(loaded[2]) <= float(loaded[3]) < 60  # tenths of a second: 0.0 at this size
    who = [r[0] for r in memory["rows"]]
    assert who == ["host-1", "host-2", "host-3", "etcd"]
    assert all(float(r[1]) > 10 and float(r[2]) > 10 for r in memory["rows"]), memory
    assert [r[3] for r in memory["rows"][:3]] == ["30", "30", "30"]  # every pod, everywhere
    assert set(res["series"]["multihost"]["bars"]) == {"policy", "label", "endpoint"}
    assert leftovers() == before


def test_an_interrupted_multihost_bench_leaves_nothing_behind() -> None:
    before = leftovers()
    proc = subprocess.Popen([sys.executable, "multihost.py", *TINY], cwd=BENCH,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:  # hosts, etcd and agents up, loading
            line = proc.stderr.readline()
            if line.startswith("# applied") or not line:
                break
        assert leftovers() != before, "nothing was running yet"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert leftovers() == before
