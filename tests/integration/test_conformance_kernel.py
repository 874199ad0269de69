"""The public conformance corpus on the real kernel: nftables and real packets.

Every case of ../shared/conformance is built in private namespaces, programmed
through the nftables datapath and probed pair by pair; the runner compares each
verdict with the case's expectation. This is the slowest test (about a minute).
"""

from __future__ import annotations

import re

import pytest
from tests.support import shared

from stockade.cli.main import main
from stockade.net.namespace import list_netns

pytestmark = pytest.mark.privileged

CORPUS = shared("conformance")


def test_public_corpus_passes_on_real_packets(capsys: pytest.CaptureFixture[str]) -> None:
    if not CORPUS.is_dir():
        pytest.fail(f"the conformance corpus is missing at {CORPUS}")
    cases = len([p for p in CORPUS.glob("*.yaml") if p.name != "standard-cluster.yaml"])
    before = set(list_netns())
    code = main(["conformance", str(CORPUS), "--datapath", "nft"])
    out = capsys.readouterr().out
    summary = out.strip().splitlines()[-1]
    assert re.fullmatch(rf"{cases} passed, 0 failed", summary), out[-3000:]
    assert code == 0
    # every namespace it made is gone (the runner names them sc<4 hex>-…)
    left = {n for n in set(list_netns()) - before if re.match(r"sc[0-9a-f]{4}", n)}
    assert left == set()
