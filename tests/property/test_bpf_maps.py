"""The eBPF map contents against the IR interpreter, without a kernel.

`compile.bpf.allows` models the program's lookups (LPM on the ipcache, then the
policy trie with the peer's identity and with ANY) on the plain map contents.
On random clusters and policies it must agree with `compile.interpret.allows` on
every probed flow; the bytes written to the maps must read back to the same state
and the same ruleset; a delta between two states, applied to the first state's
bytes, must give exactly the second's. `compile.bpf.keeps_connection` models the
program judging a tracked connection again after a change: with some policies
annotated `stockade.io/existing-connections: keep`, it must keep exactly what the
agent's revoker keeps on nftables (`agent.revoke.should_cut`).
"""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.property.strategies import DEFAULT, Scenario, Universe, scenarios

from stockade.agent.revoke import keeping_policies, should_cut
from stockade.compile import bpf, interpret
from stockade.compile.lower import compile_cluster
from stockade.compile.plan import plan
from stockade.engine.evaluate import Evaluator
from stockade.model.labels import Labels
from stockade.model.policy import KEEP_ANNOTATION

UNIVERSE = Universe(max_pods=5, max_policies=4)


def _check(sc: Scenario, state: bpf.BpfState) -> None:
    rs = compile_cluster(sc.cluster)
    for flow in sc.flows():
        want = interpret.allows(rs, flow.src_ip, flow.dst_ip, flow.protocol, flow.port)
        got = bpf.allows(state, flow.src_ip, flow.dst_ip, flow.protocol, flow.port)
        assert got == want, (flow, want)


@settings(max_examples=150, deadline=None)
@given(sc=scenarios(DEFAULT.with_features(named_ports=True)))
def test_the_maps_decide_like_the_interpreter(sc: Scenario) -> None:
    rs = compile_cluster(sc.cluster)
    state = bpf.compile_state(rs)
    _check(sc, state)


@settings(max_examples=150, deadline=None)
@given(sc=scenarios(UNIVERSE), slot=st.sampled_from([0, 1]))
def test_the_bytes_read_back_to_the_same_state_and_ruleset(sc: Scenario, slot: int) -> None:
    rs = compile_cluster(sc.cluster)
    state = bpf.compile_state(rs)
    maps = bpf.encode_maps(state, slot)
    back = bpf.decode(maps, bpf.encode_meta(state), slot)
    assert back == state
    assert plan(bpf.ruleset_of(back), rs).empty
    # the other slot's entries are not this slot's
    assert bpf.decode(maps, bpf.encode_meta(state), 1 - slot).ipcache == {}


@settings(max_examples=100, deadline=None)
@given(a=scenarios(UNIVERSE), b=scenarios(UNIVERSE), slot=st.sampled_from([0, 1]))
def test_a_slot_reads_back_beside_the_other_slots_entries(a: Scenario, b: Scenario,
                                                          slot: int) -> None:
    # The kernel's maps hold both slots: one slot decodes to its own state whatever the
    # other holds (here another cluster's).
    state = bpf.compile_state(compile_cluster(a.cluster))
    other = bpf.compile_state(compile_cluster(b.cluster))
    mine, theirs = bpf.encode_slots(state)[slot], bpf.encode_slots(other)[1 - slot]
    both = {m: {**mine[m], **theirs[m]} for m in bpf.MAPS}
    assert bpf.decode(both, bpf.encode_meta(state), slot) == state


@settings(max_examples=300, deadline=None)
@given(value=st.integers(0, (1 << 32) - 1), length=st.integers(-1, 34))
def test_an_ipv4_prefix_read_from_the_kernel_is_the_networks_text(value: int,
                                                                  length: int) -> None:
    try:
        want: str | None = str(bpf._network(4, value, length))
    except ValueError:
        want = None
    try:
        got: str | None = bpf._prefix_text(4, value.to_bytes(4, "big"), length)
    except ValueError:
        got = None
    assert got == want


@settings(max_examples=100, deadline=None)
@given(a=scenarios(UNIVERSE), b=scenarios(UNIVERSE))
def test_a_delta_turns_one_state_into_the_next(a: Scenario, b: Scenario) -> None:
    first = bpf.compile_state(compile_cluster(a.cluster))
    second = bpf.compile_state(compile_cluster(b.cluster), first)
    _check(b, second)
    old = {**bpf.encode_maps(first, 0), "meta": bpf.encode_meta(first)}
    new = {**bpf.encode_maps(second, 0), "meta": bpf.encode_meta(second)}
    assert bpf.apply_delta(old, bpf.map_delta(old, new)) == new
    # the same batches, computed from the states without encoding everything
    for slot in (0, 1):
        full = bpf.map_delta(bpf.encode_maps(first, slot), bpf.encode_maps(second, slot))
        assert bpf.state_delta(first, second, slot) == full
    assert bpf.meta_delta(first, second) == bpf.map_delta({"meta": old["meta"]},
                                                          {"meta": new["meta"]})
    # ids survive: recompiling the same ruleset from the state read back changes nothing
    again = bpf.compile_state(bpf.ruleset_of(second), second)
    assert again == second


@settings(max_examples=150, deadline=None)
@given(sc=scenarios(UNIVERSE), data=st.data())
def test_a_tracked_connection_is_kept_as_the_revoker_keeps_it(sc: Scenario,
                                                             data: st.DataObject) -> None:
    policies = sc.cluster.policies
    marks = data.draw(st.lists(st.sampled_from(["keep", " KEEP ", "cut", ""]),
                               min_size=len(policies), max_size=len(policies)))
    annotated = [dataclasses.replace(p, annotations=Labels({**p.annotations,
                                                            KEEP_ANNOTATION: m}))
                 if m else p for p, m in zip(policies, marks, strict=True)]
    sc = sc.with_policies(annotated)
    rs = compile_cluster(sc.cluster)
    state = bpf.compile_state(rs)
    back = bpf.decode(bpf.encode_maps(state, 1), bpf.encode_meta(state), 1)
    assert back == state  # the keep marks and the chains' keep read back
    evaluator = Evaluator(sc.cluster)
    keep = keeping_policies(evaluator)
    for flow in sc.flows():
        want = not should_cut(evaluator.verdict(flow), keep)
        got = bpf.keeps_connection(state, flow.src_ip, flow.dst_ip, flow.protocol, flow.port)
        assert got == want, (flow, want)


def test_port_ranges_become_the_fewest_prefixes() -> None:
    assert bpf.port_prefixes(80, 80) == ((80, 16),)
    assert bpf.port_prefixes(0, 65535) == ((0, 0),)
    assert bpf.port_prefixes(1, 65535)[0] == (1, 16)
    blocks = bpf.port_prefixes(1000, 2000)
    covered = {p for base, bits in blocks for p in range(base, base + (1 << (16 - bits)))}
    assert covered == set(range(1000, 2001))
