"""The public conformance corpus on the real kernel, on every datapath, with real packets.

Every case of ../shared/conformance is built in private namespaces, programmed
through the datapath and probed pair by pair; the runner compares each verdict
with the case's expectation. These are the slowest tests (about a minute each).
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

import pytest
from tests.support import shared

from stockade.cli.main import main
from stockade.conformance import kernel
from stockade.datapath.iptables import BACKEND_ENV
from stockade.net.namespace import list_netns

pytestmark = pytest.mark.privileged

CORPUS = shared("conformance")
PINS = Path("/sys/fs/bpf/stockade")

# (datapath, iptables backend or None)
DATAPATHS = [("nft", None), ("iptables", "nft"), ("iptables", "legacy"), ("ebpf", None)]


@pytest.mark.parametrize(("datapath", "backend"), DATAPATHS,
                         ids=["nft", "iptables-nft", "iptables-legacy", "ebpf"])
def test_public_corpus_passes_on_real_packets(datapath: str, backend: str | None,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    if not CORPUS.is_dir():
        pytest.fail(f"the conformance corpus is missing at {CORPUS}")
    if backend is not None:
        monkeypatch.setenv(BACKEND_ENV, backend)
    # The run's own tag, so that another run on the machine at the same time (its
    # namespaces and pins) is not taken for this one's leftovers.
    tag = secrets.token_hex(2)
    monkeypatch.setattr(kernel.secrets, "token_hex", lambda _n: tag)
    cases = len([p for p in CORPUS.glob("*.yaml") if p.name != "standard-cluster.yaml"])
    code = main(["conformance", str(CORPUS), "--datapath", datapath])
    out = capsys.readouterr().out
    summary = out.strip().splitlines()[-1]
    assert re.fullmatch(rf"{cases} passed, 0 failed", summary), out[-3000:]
    assert code == 0
    # every namespace it made is gone (the runner names them sc<tag>…), and every pin
    assert [n for n in list_netns() if n.startswith(f"sc{tag}")] == []
    pins = os.listdir(PINS) if PINS.exists() else []
    assert [p for p in pins if f"sc{tag}" in p] == []
