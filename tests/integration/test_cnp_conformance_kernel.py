"""The shared ClusterNetworkPolicy cases on the nftables datapath, with real packets."""

from __future__ import annotations

import re
import secrets

import pytest
from tests.support import shared

from stockade.cli.main import main
from stockade.conformance import kernel
from stockade.net.namespace import list_netns

pytestmark = pytest.mark.privileged

CORPUS = shared("conformance-cnp")


def test_the_corpus_passes_on_nftables(capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    if not CORPUS.is_dir():
        pytest.fail(f"the ClusterNetworkPolicy corpus is missing at {CORPUS}")
    tag = secrets.token_hex(2)
    monkeypatch.setattr(kernel.secrets, "token_hex", lambda _n: tag)
    cases = len([p for p in CORPUS.glob("*.yaml") if p.name != "standard-cluster.yaml"])
    code = main(["conformance", str(CORPUS), "--datapath", "nft"])
    out = capsys.readouterr().out
    assert re.fullmatch(rf"{cases} passed, 0 failed", out.strip().splitlines()[-1]), out[-3000:]
    assert code == 0
    assert [n for n in list_netns() if n.startswith(f"sc{tag}")] == []
