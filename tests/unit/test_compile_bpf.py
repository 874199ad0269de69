"""The eBPF map contents on the public conformance corpus, without a kernel.

Every expected verdict of ../shared/conformance must come out of the program's
lookups as `compile.bpf.allows` models them, as it does out of the IR interpreter.
"""

from __future__ import annotations

import socket

import pytest
from tests.support import shared

from stockade.cli.conformance import load_cases
from stockade.compile import bpf, bpf_change
from stockade.compile.ir import ADDR, EGRESS, AddressSet, Chain, ChainRule, Guard, Ruleset
from stockade.compile.lower import compile_cluster
from stockade.engine.evaluate import Evaluator

CORPUS = shared("conformance")


def test_the_maps_give_every_expected_verdict_of_the_corpus() -> None:
    if not CORPUS.is_dir():
        pytest.skip(f"no conformance corpus at {CORPUS}")
    checked = 0
    for case in load_cases([str(CORPUS)]):
        judge = bpf.Judge(bpf.compile_state(compile_cluster(case.cluster)))
        ev = Evaluator(case.cluster)
        for group in case.probes:
            for src, dst in case.pairs():
                flow = ev.flow(src, dst, group.port, group.protocol)
                got = judge.allows(flow.src_ip, flow.dst_ip, flow.protocol, flow.port)
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


def _ct(src: str, dst: str, sport: int, dport: int, flags: int = 0) -> tuple[bytes, bytes]:
    fam = 4 if "." in src else 6
    pack = (lambda a: socket.inet_aton(a) + bytes(12)) if fam == 4 else (
        lambda a: socket.inet_pton(socket.AF_INET6, a))
    return (bpf.CT_KEY.pack(fam, 6, 0, sport.to_bytes(2, "big"), dport.to_bytes(2, "big"),
                             pack(src), pack(dst)),
            bpf.CT_VALUE.pack(5, 1, flags, 9))


@pytest.mark.parametrize(("src", "dst", "sport", "dport"), [
    ("10.0.0.1", "10.0.0.2", 40000, 80), ("10.0.0.2", "10.0.0.1", 40000, 80),
    ("10.0.1.1", "10.0.0.2", 80, 40000), ("10.0.0.1", "10.0.0.1", 80, 40000),
    ("10.0.0.1", "10.0.0.1", 40000, 80), ("fd00::2", "fd00::1", 1, 2),
    ("fe80::1", "ff02::16", 0, 0)])
def test_a_connection_has_one_normal_form_and_keeps_its_direction(src, dst, sport,
                                                                  dport) -> None:
    """Both directions of a tuple come to one key; the flag says which side opened it,
    so the original tuple is read back whichever form the key is in."""
    there, back = _ct(src, dst, sport, dport), _ct(dst, src, dport, sport)
    key, value = bpf.ct_normal(*there)
    assert bpf.ct_normal(key, value) == (key, value)  # normal already
    assert bpf.ct_normal(*back)[0] == key
    opened = bpf.ct_original(*there)
    assert bpf.ct_original(key, value) == opened
    assert opened[2:] == (there[0][8:24], there[0][24:40], sport, dport)
    swapped = key != there[0]
    assert bool(bpf.CT_VALUE.unpack(value)[2] & bpf.CT_ORIG_B) == swapped
    if (src, sport) != (dst, dport):
        assert swapped != (bpf.ct_normal(*back)[0] != back[0])  # one of the two turns


def test_mac_ports_from_the_guard_map() -> None:
    """Each MAC one port is bound to, on a bridge that may deliver; not one two claim,
    not a port outside `bridge_of`, not a guard without MAC."""
    def guard(mac: str) -> bytes:
        return bpf.encode_guard("p", Guard(("10.0.0.1",), mac))

    guards = {bpf.GUARD_KEY.pack(1): guard("02:00:00:00:00:01"),
              bpf.GUARD_KEY.pack(2): guard("02:00:00:00:00:02"),
              bpf.GUARD_KEY.pack(3): guard("02:00:00:00:00:02"),
              bpf.GUARD_KEY.pack(4): guard("02:00:00:00:00:04"),
              bpf.GUARD_KEY.pack(5): guard(""),
              bpf.GUARD_KEY.pack(6): guard("02:00:00:00:00:06")}
    got = bpf.mac_ports(guards, {1: 10, 2: 10, 3: 10, 5: 10, 6: 11})
    assert {bpf.MAC_PORT_KEY.unpack(k)[0].hex(":"): bpf.MAC_PORT_VALUE.unpack(v)
            for k, v in got.items()} == {"02:00:00:00:00:01": (1, 10),
                                         "02:00:00:00:00:06": (6, 11)}


def test_the_chains_names_remembered_are_let_go_with_their_rulesets() -> None:
    """`bpf_change` remembers each chain's set names by the chain object (the incremental
    compiler hands over unchanged chains as they are); chains of rulesets gone are let
    go, not kept for the agent's life."""
    bpf_change._NAMES.clear()
    for n in range(3000):  # what many policy changes leave behind
        bpf_change.names_of(Chain(f"e-{n}", EGRESS, (ChainRule(4, f"set-{n}"),)))
    assert len(bpf_change._NAMES) == 3000
    kept = Chain("e-kept", EGRESS, (ChainRule(4, "set-kept"),))
    assert bpf_change.names_of(kept) == {"set-kept"}
    first = Ruleset(chains={"e-kept": kept})
    second = Ruleset(chains={"e-kept": kept}, egress={"10.0.0.1": "e-kept"})
    assert bpf_change.changed_state(second, bpf.compile_state(first), first) is not None
    assert len(bpf_change._NAMES) <= 2 + 1024  # the change's ruleset has one chain


def test_policy_entries_are_a_mapping_by_policy() -> None:
    """Kept by policy, read as one mapping: a missing key or anything that is not a
    key is a KeyError (or the default, or not in it), never another error; a change
    copies only the touched policies' entries and leaves the original as it was."""
    entries = bpf.PolicyEntries.of({(1, 10, 6, 80, 32): 1, (1, 11, 6, 80, 32): 2,
                                    (2, 10, 17, 53, 32): 3})
    assert len(entries) == 3 and entries[(1, 11, 6, 80, 32)] == 2
    for missing in ((3, 10, 6, 80, 32), (1, 12, 6, 80, 32), (), "x", 7):
        with pytest.raises(KeyError):
            entries[missing]  # type: ignore[index]
        assert entries.get(missing, "none") == "none"  # type: ignore[arg-type]
        assert missing not in entries
    changed = entries.changed({(1, 10, 6, 80, 32): None, (3, 12, 6, 443, 32): 4})
    assert dict(changed.items()) == {(1, 11, 6, 80, 32): 2, (2, 10, 17, 53, 32): 3,
                                     (3, 12, 6, 443, 32): 4}
    assert len(changed) == 3 and changed.by_policy[2] is entries.by_policy[2]
    assert dict(entries.items()) == {(1, 10, 6, 80, 32): 1, (1, 11, 6, 80, 32): 2,
                                     (2, 10, 17, 53, 32): 3}
    assert len(entries.changed({(2, 10, 17, 53, 32): None})) == 2
