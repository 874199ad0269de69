"""Unused chains stay in the kernel a while and are used again (NftDatapath._spare)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from stockade.compile.ir import ADDR, INGRESS, AddressSet, Chain, ChainRule, Ruleset
from stockade.compile.plan import full_plan
from stockade.datapath.nft import NftDatapath, elements_only

PEERS = AddressSet("a4-p", 4, ADDR, frozenset({"10.0.0.2"}))
CHAIN = Chain("i-1", INGRESS, (ChainRule(4, peer_set="a4-p"),))
BASE = Chain("i-0", INGRESS, ())


def _rs(isolated: bool, peers: AddressSet = PEERS) -> Ruleset:
    if not isolated:
        return Ruleset({}, {"i-0": BASE}, {"10.0.0.9": "i-0"}, {})
    return Ruleset({peers.name: peers}, {"i-0": BASE, "i-1": CHAIN},
                   {"10.0.0.9": "i-0", "10.0.0.1": "i-1"}, {})


def _dp(applied: Ruleset) -> Any:
    return SimpleNamespace(_applied=applied, _spare_chains={}, _spare_sets={},
                           _spare_since=0.0, keep_unused=True, SPARE_MAX=NftDatapath.SPARE_MAX,
                           SPARE_AGE=NftDatapath.SPARE_AGE)


def _step(dp: Any, target: Ruleset) -> Any:
    delta, (chains, sets) = NftDatapath._spare(dp, full_plan(dp._applied, target))
    dp._applied, dp._spare_chains, dp._spare_sets = target, chains, sets
    return delta


def test_a_chain_left_unused_stays_and_is_used_again_by_elements_alone() -> None:
    dp = _dp(_rs(True))
    gone = _step(dp, _rs(False))
    assert not gone.del_chains and not gone.del_sets and elements_only(gone)
    assert set(dp._spare_chains) == {"i-1"} and set(dp._spare_sets) == {"a4-p"}
    held = NftDatapath._held(dp)
    assert "i-1" in held.chains and "a4-p" in held.sets and "10.0.0.1" not in held.ingress
    # back, with one more peer: the chain is there, the set gets the difference
    back = _step(dp, _rs(True, AddressSet("a4-p", 4, ADDR, frozenset({"10.0.0.2",
                                                                       "10.0.0.3"}))))
    assert not back.add_chains and not back.add_sets and elements_only(back)
    assert [(s.name, e) for s, e in back.add_elements] == [("a4-p", frozenset({"10.0.0.3"}))]
    assert back.set_map and not dp._spare_chains and not dp._spare_sets


def test_unused_chains_go_with_a_libnftables_transaction_or_when_old() -> None:
    dp = _dp(_rs(True))
    _step(dp, _rs(False))
    other = Chain("i-2", INGRESS, (ChainRule(4, protocol="tcp"),))
    target = Ruleset({}, {"i-0": BASE, "i-2": other}, {"10.0.0.9": "i-2"}, {})
    delta = _step(dp, target)
    assert delta.del_chains == ("i-1",) and delta.del_sets == ("a4-p",)
    assert not dp._spare_chains and not dp._spare_sets
    dp = _dp(_rs(True))
    _step(dp, _rs(False))
    assert _step(dp, _rs(False)).empty  # young: kept
    dp._spare_since -= NftDatapath.SPARE_AGE + 1
    idle = _step(dp, _rs(False))
    assert idle.del_chains == ("i-1",) and not dp._spare_chains


def test_an_unused_chain_asked_for_again_with_other_rules_is_replaced() -> None:
    """A tier's chain is named by its policies' subjects: the same name may come back
    with other rules (a priority changed meanwhile), and must not be used as it was."""
    dp = _dp(_rs(True))
    _step(dp, _rs(False))
    assert set(dp._spare_chains) == {"i-1"}
    other = Chain("i-1", INGRESS, (ChainRule(4, protocol="udp"),))
    target = Ruleset({}, {"i-0": BASE, "i-1": other}, {"10.0.0.9": "i-0", "10.0.0.1": "i-1"},
                     {})
    back = _step(dp, target)
    assert back.replace_chains == (other,) and not back.add_chains
    assert not elements_only(back)  # a libnftables transaction rewrites its rules
