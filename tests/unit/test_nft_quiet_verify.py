"""The periodic read-back that does not hold up transactions (NftDatapath.verify_quietly).

The table is read while changes go on, so what is read may be any state between
what was applied when the read began and what is applied when it ends; only an
object that is as neither left it is drift.
"""

from __future__ import annotations

from stockade.compile.ir import ADDR, EGRESS, INGRESS, NET, AddressSet, Chain, ChainRule, Ruleset
from stockade.compile.plan import plan
from stockade.datapath.nft import plan_objects, read_while_applying

CHAIN = Chain("i-1", INGRESS, (ChainRule(4, peer_set="a4-x"),))
OTHER = Chain("e-2", EGRESS, ())


def _rs(elements: set[str], ingress: dict[str, str] | None = None,
        chains: tuple[Chain, ...] = (CHAIN,), nets: frozenset[str] = frozenset()) -> Ruleset:
    sets = {"a4-x": AddressSet("a4-x", 4, ADDR, frozenset(elements)),
            "c4-y": AddressSet("c4-y", 4, NET, nets)}
    return Ruleset(sets, {c.name: c for c in chains},
                   ingress if ingress is not None else {"10.0.0.1": "i-1"}, {})


def test_nothing_applied_meanwhile_is_the_usual_check() -> None:
    before = _rs({"10.0.0.2"})
    assert read_while_applying(_rs({"10.0.0.2"}), before, before)
    assert not read_while_applying(_rs({"10.0.0.2", "10.6.6.6"}), before, before)
    assert not read_while_applying(_rs({"10.0.0.2"}, {}), before, before)


def test_a_read_of_either_end_or_of_a_mix_is_not_drift() -> None:
    before = _rs({"10.0.0.2"})
    after = _rs({"10.0.0.3"}, {"10.0.0.1": "i-1", "10.0.0.9": "e-2"}, (CHAIN, OTHER),
                frozenset({"10.1.0.0/16"}))
    assert read_while_applying(before, before, after)
    assert read_while_applying(after, before, after)
    # read half-way: the element added, the old one not yet removed, the map entry not in
    mixed = _rs({"10.0.0.2", "10.0.0.3"}, {"10.0.0.1": "i-1"}, (CHAIN, OTHER))
    assert read_while_applying(mixed, before, after)


def test_what_neither_end_holds_is_drift() -> None:
    before = _rs({"10.0.0.2"})
    after = _rs({"10.0.0.3"})
    assert not read_while_applying(_rs({"10.0.0.2", "10.6.6.6"}), before, after)
    assert not read_while_applying(_rs({"10.0.0.2"}, {"10.0.0.1": "e-2"}), before, after)
    assert not read_while_applying(_rs({"10.0.0.2"}, chains=()), before, after)
    assert not read_while_applying(_rs({"10.0.0.2"}, nets=frozenset({"0.0.0.0/0"})),
                                   before, after)


def test_plan_objects_names_each_object_once() -> None:
    before = _rs({"10.0.0.2"})
    after = _rs({"10.0.0.3"}, {"10.0.0.9": "i-1"}, (CHAIN, OTHER), frozenset({"10.1.0.0/16"}))
    assert plan_objects(plan(before, after)) == {
        ("element", "a4-x", "10.0.0.3"), ("element", "a4-x", "10.0.0.2"),
        ("set", "c4-y"), ("chain", "e-2"),
        ("map", INGRESS, 4, "10.0.0.1"), ("map", INGRESS, 4, "10.0.0.9")}
