"""The shared ClusterNetworkPolicy cases on the model: every case passes, and the cases
do depend on the tiers (without them, some fail)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from tests.support import shared

from stockade.cli.main import main
from stockade.conformance.case import parse_case
from stockade.conformance.runner import ModelDatapath, check_case

CORPUS = shared("conformance-cnp")


def cases() -> list[str]:
    return sorted(str(p) for p in CORPUS.glob("*.yaml") if p.name != "standard-cluster.yaml")


def test_the_corpus_passes_on_the_model(capsys: pytest.CaptureFixture[str]) -> None:
    if not CORPUS.is_dir():
        pytest.fail(f"the ClusterNetworkPolicy corpus is missing at {CORPUS}")
    code = main(["conformance", str(CORPUS)])
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"{len(cases())} passed, 0 failed", out[-2000:]
    assert code == 0


def test_the_cases_need_the_tiers() -> None:
    failing = 0
    for path in cases():
        with open(path) as f:
            case = parse_case(f.read(), path, None)
        assert case.cluster.cluster_policies, path
        assert any(g.listed for g in case.probes), path
        bare = replace(case, cluster=replace(case.cluster, cluster_policies=()))
        failing += not check_case(bare, ModelDatapath()).passed
    assert failing > len(cases()) // 3
