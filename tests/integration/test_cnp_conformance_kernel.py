"""The shared ClusterNetworkPolicy cases on every datapath, with real packets: nftables,
iptables + ipset on both backends, and eBPF."""

from __future__ import annotations

import re
import secrets

import pytest
from tests.support import shared

from stockade.cli.main import main
from stockade.conformance import kernel
from stockade.datapath.iptables import BACKEND_ENV
from stockade.net.namespace import list_netns

pytestmark = pytest.mark.privileged

CORPUS = shared("conformance-cnp")
# (--datapath, the iptables backend when it is iptables)
DATAPATHS = [("nft", ""), ("iptables", "nft"), ("iptables", "legacy"), ("ebpf", "")]


@pytest.mark.parametrize(("datapath", "backend"), DATAPATHS,
                         ids=[f"{d}-{b}" if b else d for d, b in DATAPATHS])
def test_the_corpus_passes(datapath: str, backend: str, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    if not CORPUS.is_dir():
        pytest.fail(f"the ClusterNetworkPolicy corpus is missing at {CORPUS}")
    if backend:
        monkeypatch.setenv(BACKEND_ENV, backend)
    tag = secrets.token_hex(2)
    monkeypatch.setattr(kernel.secrets, "token_hex", lambda _n: tag)
    cases = len([p for p in CORPUS.glob("*.yaml") if p.name != "standard-cluster.yaml"])
    assert cases >= 32
    code = main(["conformance", str(CORPUS), "--datapath", datapath])
    out = capsys.readouterr().out
    assert re.fullmatch(rf"{cases} passed, 0 failed", out.strip().splitlines()[-1]), out[-3000:]
    assert code == 0
    assert [n for n in list_netns() if n.startswith(f"sc{tag}")] == []
