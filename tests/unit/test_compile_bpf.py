"""The eBPF map contents on the public conformance corpus, without a kernel.

Every expected verdict of ../shared/conformance must come out of the program's
lookups as `compile.bpf.allows` models them, as it does out of the IR interpreter.
"""

from __future__ import annotations

import pytest
from tests.support import shared

from stockade.cli.conformance import load_cases
from stockade.compile import bpf
from stockade.compile.ir import ADDR, AddressSet, Chain, ChainRule, Ruleset
from stockade.compile.lower import compile_cluster
from stockade.engine.evaluate import Evaluator

CORPUS = shared("conformance")


def test_the_maps_give_every_expected_verdict_of_the_corpus() -> None:
    if not CORPUS.is_dir():
        pytest.skip(f"no conformance corpus at {CORPUS}")
    checked = 0
    for case in load_cases([str(CORPUS)]):
        state = bpf.compile_state(compile_cluster(case.cluster))
        ev = Evaluator(case.cluster)
        for group in case.probes:
            for src, dst in case.pairs():
                flow = ev.flow(src, dst, group.port, group.protocol)
                got = bpf.allows(state, flow.src_ip, flow.dst_ip, flow.protocol, flow.port)
                assert got == group.expected(src.key, dst.key), (case.id, group.render(),
                                                                  src.key, dst.key)
                checked += 1
    assert checked > 15_000


def test_identities_group_addresses_by_membership() -> None:
    rs = Ruleset(
        {"s4-a": AddressSet("s4-a", 4, ADDR, frozenset({"10.0.0.1", "10.0.0.2"})),
         "s4-b": AddressSet("s4-b", 4, ADDR, frozenset({"10.0.0.2"}))},
        {"i-x": Chain("i-x", "ingress", (ChainRule(4, "s4-a", None, "TCP", ((80, 81),)),))},
        {"10.0.0.3": "i-x"}, {})
    state = bpf.compile_state(rs)
    ids = {p: info[0] for p, info in state.ipcache.items()}
    assert ids[(4, "10.0.0.1/32")] != ids[(4, "10.0.0.2/32")]
    assert ids[(4, "10.0.0.3/32")] == bpf.WORLD4  # in no set, only isolated
    pid = state.ipcache[(4, "10.0.0.3/32")][1]
    # one port prefix covers 80-81; both members of s4-a are allowed, on TCP only
    assert {(k[1], k[3], k[4]) for k in state.policy if k[0] == pid} == {
        (ids[(4, "10.0.0.1/32")], 80, 87), (ids[(4, "10.0.0.2/32")], 80, 87)}
    assert bpf.allows(state, "10.0.0.2", "10.0.0.3", "TCP", 81)
    assert not bpf.allows(state, "10.0.0.2", "10.0.0.3", "UDP", 81)
    assert not bpf.allows(state, "10.0.0.9", "10.0.0.3", "TCP", 80)
