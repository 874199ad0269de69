"""Chains and rules as raw nf_tables messages (datapath/nfrules.py), without a kernel.

The kernel test (tests/integration/test_nft_datapath.py) checks that the kernel
lists what these messages write exactly as what libnftables writes; here, the
bytecode's details that listing depends on, and what is left to libnftables.
"""

from __future__ import annotations

import struct

from stockade.compile.ir import (
    ADDR,
    ADDR_PORT,
    EGRESS,
    INGRESS,
    NET,
    AddressSet,
    Chain,
    ChainRule,
    Ruleset,
)
from stockade.compile.nft import Table, chain_rules
from stockade.compile.plan import plan
from stockade.datapath.nfnetlink import (
    NFTA_DATA_VALUE,
    NFTA_SET_ELEM_FLAGS,
    NFTA_SET_ELEM_KEY,
    NFTA_SET_ELEM_USERDATA,
)
from stockade.datapath.nfrules import (
    NFT_MSG_DELCHAIN,
    NFT_MSG_DELRULE,
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE,
    NFT_MSG_NEWSET,
    NFT_SET_ELEM_INTERVAL_END,
    NFTA_RULE_EXPRESSIONS,
    encode_plan,
    interval_items,
    rule_message,
)
from stockade.netlink import attr_map, iter_attrs, text

TABLE = Table("t", log_group=7)


def _exprs(msg: tuple[int, int, bytes]) -> list[tuple[str, dict[int, bytes]]]:
    """(name, attributes) of each expression of a NEWRULE message."""
    out = []
    for _kind, item in iter_attrs(attr_map(msg[2])[NFTA_RULE_EXPRESSIONS]):
        fields = attr_map(item)
        out.append((text(fields[1]), attr_map(fields[2])))
    return out


def _reg(data: bytes) -> int:
    return int(struct.unpack("!I", data)[0])


def test_an_ipv6_named_port_rule_uses_libnftables_registers_and_one_dependency() -> None:
    # ip6 saddr @s6-a ip6 daddr . meta l4proto . th dport @n6-b accept: libnftables puts
    # the 16-byte address in register 1, the protocol in 2 (the 32-bit register 12) and
    # the port in 13, after one nfproto dependency shared by both addresses.
    rule = ChainRule(6, peer_set="s6-a", named_set="n6-b")
    (expr, comment), *_tail = chain_rules(TABLE, Chain("i-x", INGRESS, (rule,)))
    msg = rule_message("t", "i-x", expr, comment)
    names = [n for n, _ in _exprs(msg)]
    assert names == ["meta", "cmp", "payload", "lookup", "payload", "meta", "payload",
                     "lookup", "immediate"]
    ex = _exprs(msg)
    assert b"\x0a" in ex[1][1][3]  # the dependency: nfproto ipv6 (10)
    assert [_reg(ex[i][1][1]) for i in (4, 5, 6)] == [1, 2, 13]
    assert _reg(ex[2][1][3]) == 8 and _reg(ex[2][1][4]) == 16  # saddr: offset 8, 16 bytes
    assert _reg(ex[4][1][3]) == 24  # daddr


def test_an_ipv4_concatenation_takes_registers_1_9_10() -> None:
    rule = ChainRule(4, named_set="n4-b")
    (expr, comment), *_ = chain_rules(TABLE, Chain("e-x", EGRESS, (rule,)))
    ex = _exprs(rule_message("t", "e-x", expr, comment))
    assert [n for n, _ in ex][:2] == ["meta", "cmp"]  # the dependency, before the loads
    assert [_reg(ex[i][1][1]) for i in (2, 3, 4)] == [1, 9, 10]


def test_a_port_range_is_two_comparisons_and_the_comment_is_user_data() -> None:
    rule = ChainRule(4, peer_set="s4-a", protocol="TCP", ports=((80, 90),))
    (expr, comment), *_ = chain_rules(TABLE, Chain("i-x", INGRESS, (rule,)))
    msg = rule_message("t", "i-x", expr, comment)
    cmps = [d for n, d in _exprs(msg) if n == "cmp"]
    assert [_reg(d[2]) for d in cmps] == [0, 0, 5, 3]  # nfproto ==, l4proto ==, >=, <=
    assert comment and (b"\x00" + bytes([len(comment) + 1]) + comment.encode() + b"\x00"
                        ) in msg[2]


def test_a_plan_of_chains_sets_and_entries_is_one_batch_in_a_valid_order() -> None:
    peers = AddressSet("s4-a", 4, ADDR, frozenset({"10.0.0.2"}))
    named = AddressSet("n4-b", 4, ADDR_PORT, frozenset({("10.0.0.1", "tcp", 80)}))
    old = Chain("i-old", INGRESS, (ChainRule(4, protocol="UDP"),))
    new = Chain("i-new", INGRESS, (ChainRule(4, peer_set="s4-a", named_set="n4-b"),))
    before = Ruleset({}, {"i-old": old}, {"10.0.0.1": "i-old"}, {})
    after = Ruleset({"s4-a": peers, "n4-b": named}, {"i-new": new}, {"10.0.0.1": "i-new"}, {})
    msgs = encode_plan(TABLE, plan(before, after))
    assert msgs is not None
    kinds = [k for k, _, _ in msgs]
    assert kinds.index(NFT_MSG_NEWSET) < kinds.index(NFT_MSG_NEWCHAIN) < kinds.index(
        NFT_MSG_NEWRULE)
    # the old chain goes after the map entry left it: flushed, then deleted
    assert kinds[-2:] == [NFT_MSG_DELRULE, NFT_MSG_DELCHAIN]
    # a rule, the log (rate-limited) and the drop of the new chain
    assert kinds.count(NFT_MSG_NEWRULE) == 3


def test_what_only_libnftables_writes_is_left_to_it() -> None:
    base = Ruleset({}, {}, {}, {})
    several = Chain("i-p", INGRESS, (ChainRule(4, protocol="TCP", ports=((80, 80), (443, 443))),))
    # several ports are an anonymous set
    assert encode_plan(TABLE, plan(base, Ruleset({}, {"i-p": several}, {}, {}))) is None
    # an interval set is raw too (see the next test)
    cidr = AddressSet("c4-x", 4, NET, frozenset({"10.0.0.0/8"}))
    assert encode_plan(TABLE, plan(base, Ruleset({"c4-x": cidr}, {}, {}, {}))) is not None
    one = Chain("i-q", INGRESS, (ChainRule(4, protocol="TCP", ports=((443, 443),)),))
    assert encode_plan(TABLE, plan(base, Ruleset({}, {"i-q": one}, {}, {}))) is not None


def test_interval_elements_are_ranges_as_libnftables_sends_them() -> None:
    """Each range is its start and the address after it flagged as an end, after an end
    at zero; adjacent ranges stay apart; a range to the last address is open."""
    s = AddressSet("c4-x", 4, NET, frozenset({"10.0.0.0/7", "12.0.0.0/8",
                                              "255.255.255.0/24"}))
    keys = [(attr_map(attr_map(item)[NFTA_SET_ELEM_KEY])[NFTA_DATA_VALUE],
             attr_map(item).get(NFTA_SET_ELEM_FLAGS), NFTA_SET_ELEM_USERDATA in attr_map(item))
            for item in (i[4:] for i in interval_items(s))]
    end = struct.pack("!I", NFT_SET_ELEM_INTERVAL_END)
    assert keys == [(bytes(4), end, False), (bytes([10, 0, 0, 0]), None, False),
                    (bytes([12, 0, 0, 0]), end, False), (bytes([12, 0, 0, 0]), None, False),
                    (bytes([13, 0, 0, 0]), end, False),
                    (bytes([255, 255, 255, 0]), None, True)]
    everything = AddressSet("c4-y", 4, NET, frozenset({"0.0.0.0/0"}))
    assert len(interval_items(everything)) == 1  # no end at zero: the range starts there


def test_each_guard_elements_key_is_as_long_as_its_sets_key() -> None:
    """The kernel refuses an element whose key is not the set's key length: a field alone
    is its own length, a field in a concatenation is padded to whole 32-bit registers (a
    refused guard change falls back to libnftables on every ADD and DEL)."""
    from stockade.compile import guard
    from stockade.compile.ir import guard_of
    from stockade.datapath.nfrules import _guard_key

    alone = {"ifname": 16, "ether_addr": 6, "ipv4_addr": 4, "ipv6_addr": 16, "integer": 16}

    def key_len(kind: str | list[str]) -> int:
        if isinstance(kind, str):
            return alone[kind]
        return sum(-(-alone[k] // 4) * 4 for k in kind)

    g = guard_of(["10.0.0.1", "fd00::1"], "02:00:00:00:00:0a")
    seen = set()
    for set_name, e in guard.port_elements("vetha", g):
        assert len(_guard_key(set_name, e)) == key_len(guard.SET_TYPES[set_name]), set_name
        seen.add(set_name)
    assert seen == set(guard.SETS)
