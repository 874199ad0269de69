"""The guard map's bytes (compile.bpf): a `Guard` as `struct guard`, and back by ifindex."""

from __future__ import annotations

import ipaddress

import pytest

from stockade.compile import bpf
from stockade.compile.bpf_change import changed_state
from stockade.compile.ir import Guard, Ruleset
from stockade.compile.plan import plan
from stockade.errors import DataplaneError

B = Guard(("10.244.0.11", "fd00:244::b"), "0a:1b:2c:3d:4e:5f")


def test_a_guard_is_the_programs_struct() -> None:
    raw = bpf.encode_guard("vethb", B)
    assert len(raw) == bpf.GUARD_VALUE.size == 28
    mac, flags, addr4, addr6 = bpf.GUARD_VALUE.unpack(raw)
    assert mac == bytes.fromhex("0a1b2c3d4e5f")
    assert flags == bpf.GUARD_MAC | bpf.GUARD_V4 | bpf.GUARD_V6
    assert addr4 == bytes([10, 244, 0, 11])  # network order, as the packet's
    assert addr6 == ipaddress.IPv6Address("fd00:244::b").packed
    assert raw[8:12] == addr4  # where the C struct has addr4 (after mac[6], flags, pad)
    assert bpf.decode_guard(raw) == B


@pytest.mark.parametrize("guard", [Guard(("10.0.0.1",)),
                                   Guard(("fd00::1",), "02:00:00:00:00:01"),
                                   Guard(()), Guard((), "02:00:00:00:00:02")])
def test_what_a_guard_leaves_out_reads_back_left_out(guard: Guard) -> None:
    raw = bpf.encode_guard("p", guard)
    flags = bpf.GUARD_VALUE.unpack(raw)[1]
    assert bool(flags & bpf.GUARD_MAC) == bool(guard.mac)
    assert bpf.decode_guard(raw) == guard


def test_more_than_one_address_of_a_family_names_the_port() -> None:
    with pytest.raises(DataplaneError, match=r"vethq.*more than one IPv4"):
        bpf.encode_guard("vethq", Guard(("10.0.0.1", "10.0.0.2")))
    with pytest.raises(DataplaneError, match=r"vethq.*more than one IPv6"):
        bpf.encode_guard("vethq", Guard(("fd00::1", "fd00::2")))
    with pytest.raises(DataplaneError, match=r"vethq.*not a MAC"):
        bpf.encode_guard("vethq", Guard((), "zz:00:00:00:00:00"))


def test_only_ports_that_exist_are_written() -> None:
    guards = {"vetha": Guard(("10.0.0.1",)), "vethb": B}
    out = bpf.encode_guards(guards, {"vethb": 7, "lo": 1})
    assert out == {bpf.GUARD_KEY.pack(7): bpf.encode_guard("vethb", B)}
    # a guard the program cannot hold fails even while its port is missing
    with pytest.raises(DataplaneError, match="vethz"):
        bpf.encode_guards({"vethz": Guard(("10.0.0.1", "10.0.0.2"))}, {})


def test_decode_names_entries_by_the_ports_there_and_skips_the_rest() -> None:
    raw = {bpf.GUARD_KEY.pack(7): bpf.encode_guard("vethb", B),
           bpf.GUARD_KEY.pack(99): bpf.encode_guard("gone", Guard(("10.0.0.9",)))}
    state = bpf.decode({}, {}, 0, raw, {7: "vethb", 8: "vethc"})
    assert state.guards == {"vethb": B}
    assert bpf.ruleset_of(state).guards == {"vethb": B}
    assert bpf.decode({}, {}, 0).guards == {}


def test_the_state_carries_the_rulesets_guards_whole_and_changed() -> None:
    first = Ruleset(guards={"vethb": B})
    state = bpf.compile_state(first)
    assert state.guards == first.guards
    assert plan(bpf.ruleset_of(state), first).empty
    second = Ruleset(guards={"vethb": Guard(("10.244.0.11",), B.mac), "vethc": Guard(())})
    changed = changed_state(second, state, first)
    assert changed is not None and changed == bpf.compile_state(second, state)
    assert changed.guards == second.guards
    assert state.counts()["guards"] == 1
