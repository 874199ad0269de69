"""`stockade compile --jobs`: shares lowered and rendered in forked processes print
what one process prints, byte for byte, for nft and stats (on random clusters, every
cluster big enough to share: the threshold is set to none)."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.property.strategies import DEFAULT, DENSE, cluster_manifests, clusters

from stockade.cli import compile as compile_cmd
from stockade.cli.main import main


def _compile(path: Path, output: str, jobs: int) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["compile", "-f", str(path), "-o", output, "-j", str(jobs)]) == 0
    return out.getvalue()


@pytest.fixture(autouse=True, scope="module")
def _always_shared() -> object:
    # Any input is shared out, and into as many processes as asked on any machine.
    entries, compile_cmd.PARALLEL_ENTRIES = compile_cmd.PARALLEL_ENTRIES, 0
    cores, compile_cmd.usable_cores = compile_cmd.usable_cores, lambda: 64
    yield
    compile_cmd.PARALLEL_ENTRIES = entries
    compile_cmd.usable_cores = cores


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([DEFAULT, DENSE]).flatmap(lambda u: clusters(u, with_policies=True))
       .flatmap(cluster_manifests), st.sampled_from(["nft", "stats"]), st.integers(2, 3))
def test_shares_print_what_one_process_prints(docs: list[dict[str, object]], output: str,
                                              jobs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cluster.json"
        path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
        alone = _compile(path, output, 1)
        assert _compile(path, output, jobs) == alone


def test_examples_shared_print_what_one_process_prints() -> None:
    root = Path(__file__).resolve().parents[2] / "examples"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "all.yaml"
        path.write_text("\n---\n".join((root / f).read_text()
                                       for f in ("cluster.yaml", "policies.yaml")))
        for output in ("nft", "stats"):
            alone = _compile(path, output, 1)
            assert alone.count("\n") > 5
            assert _compile(path, output, 2) == alone
