"""Which deltas may take access away (Plan.narrows): only those need a revocation pass."""

from __future__ import annotations

from stockade.compile.ir import ADDR, INGRESS, NET, AddressSet, Chain, ChainRule, Ruleset
from stockade.compile.plan import plan

ALLOW = Chain("i-1", INGRESS, (ChainRule(4, peer_set="a4-x"),))
OTHER = Chain("i-2", INGRESS, ())


def _rs(peers: set[str], ingress: dict[str, str], nets: frozenset[str] = frozenset(),
        chains: tuple[Chain, ...] = (ALLOW, OTHER)) -> Ruleset:
    return Ruleset({"a4-x": AddressSet("a4-x", 4, ADDR, frozenset(peers)),
                    "c4-y": AddressSet("c4-y", 4, NET, nets)},
                   {c.name: c for c in chains}, ingress, {})


def test_what_only_allows_more_does_not_narrow() -> None:
    old = _rs({"10.0.0.2"}, {"10.0.0.1": "i-1"})
    assert not plan(old, old).narrows
    assert not plan(old, _rs({"10.0.0.2", "10.0.0.3"}, {"10.0.0.1": "i-1"})).narrows
    assert not plan(old, _rs({"10.0.0.2"}, {})).narrows  # no longer isolated
    assert not plan(old, _rs({"10.0.0.2"}, {"10.0.0.1": "i-1"}, chains=(ALLOW,))).narrows


def test_what_may_deny_narrows() -> None:
    old = _rs({"10.0.0.2"}, {"10.0.0.1": "i-1"})
    assert plan(old, _rs(set(), {"10.0.0.1": "i-1"})).narrows  # a peer leaves
    assert plan(old, _rs({"10.0.0.2"}, {"10.0.0.1": "i-2"})).narrows  # another chain
    assert plan(old, _rs({"10.0.0.2"}, {"10.0.0.1": "i-1", "10.0.0.5": "i-2"})).narrows
    assert plan(old, _rs({"10.0.0.2"}, {"10.0.0.1": "i-1"},
                         frozenset({"10.1.0.0/16"}))).narrows  # interval sets: rewritten


def test_an_element_joining_a_tier_deny_or_pass_set_narrows() -> None:
    """In a tier's chain a rule may deny, or pass on to a chain that denies: a peer
    joining its set may lose access; joining an Accept's set only allows more."""
    for action, narrows in (("deny", True), ("pass", True), ("allow", False)):
        tier = Chain("ai-1", INGRESS, (ChainRule(4, peer_set="a4-x", action=action),),
                     tier="Admin")
        old = _rs({"10.0.0.2"}, {"10.0.0.1": "ai-1"}, chains=(tier,))
        new = _rs({"10.0.0.2", "10.0.0.3"}, {"10.0.0.1": "ai-1"}, chains=(tier,))
        assert plan(old, new).narrows is narrows, action
        assert plan(new, old).narrows  # an element leaving any set may narrow
