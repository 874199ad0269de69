"""The port guard in the pure core: lowering, the incremental compiler, plans, the nft text.

The kernel side (real frames against every datapath) is in
tests/integration/test_forged_source.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from stockade.compile import guard
from stockade.compile.incremental import IncrementalCompiler
from stockade.compile.ir import Guard, Ruleset, guard_of
from stockade.compile.lower import compile_cluster, guards_of
from stockade.compile.plan import full_plan, plan
from stockade.model.admit import validate_attachment, validate_endpoint
from stockade.model.cluster import Cluster, Endpoint, Namespace
from stockade.model.labels import Labels

MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def ep(name: str, *ips: str, port: str = "", mac: str = "", remote: bool = False) -> Endpoint:
    return Endpoint("x", name, Labels({"pod": name}), ips, port=port, mac=mac, remote=remote)


def cluster(*eps: Endpoint) -> Cluster:
    return Cluster((Namespace("x", Labels({"kubernetes.io/metadata.name": "x"})),), eps)


def test_each_local_port_is_bound_to_its_endpoints_addresses_and_mac() -> None:
    rs = compile_cluster(cluster(
        ep("a", "10.0.0.1", "fd00::1", port="vetha", mac=MAC_A),
        ep("b", "10.0.0.2", port="vethb"),
        ep("declared", "10.0.0.3"),  # not attached here: unguarded
        ep("far", "10.0.1.4", port="vethf", remote=True)))  # another node's
    assert rs.guards == {"vetha": Guard(("10.0.0.1", "fd00::1"), MAC_A),
                         "vethb": Guard(("10.0.0.2",), "")}
    assert rs.counts()["guarded_ports"] == 2


def test_a_port_two_endpoints_claim_is_bound_to_nothing() -> None:
    """Admission refuses the pair; records stored before it did are held closed, and
    their port passes no address of either (whichever order they come in)."""
    a, b = ep("a", "10.0.0.1", port="p", mac=MAC_A), ep("b", "10.0.0.2", port="p", mac=MAC_B)
    assert guards_of([a, b]) == guards_of([b, a]) == {"p": Guard((), "")}
    assert guards_of([a, ep("c", "10.0.0.3", port="q")])["p"] == Guard(("10.0.0.1",), MAC_A)


def test_two_ports_with_one_mac_are_bound_to_nothing() -> None:
    """A frame to a pod's MAC is held to that pod's addresses: two ports with one MAC
    could not be told apart, so both pass nothing (admission refuses the pair). The
    incremental compiler agrees with the bulk one as the MAC is taken and let go."""
    a, b = ep("a", "10.0.0.1", port="p", mac=MAC_A), ep("b", "10.0.0.2", port="q", mac=MAC_A)
    c = ep("c", "10.0.0.3", port="r", mac=MAC_B)
    assert guards_of([a, b, c]) == {"p": Guard((), ""), "q": Guard((), ""),
                                     "r": Guard(("10.0.0.3",), MAC_B)}
    inc = IncrementalCompiler.of(cluster(a, c))
    assert inc.ruleset().guards["p"] == Guard(("10.0.0.1",), MAC_A)
    for change in (lambda: inc.upsert_endpoint(b),
                   lambda: inc.upsert_endpoint(replace(b, mac=MAC_B)),  # c's now
                   lambda: inc.upsert_endpoint(replace(c, mac="02:00:00:00:00:0c")),
                   lambda: inc.delete_endpoint(b.key),
                   lambda: inc.upsert_endpoint(replace(b, port="p"))):
        change()
        assert inc.ruleset().guards == guards_of(inc.endpoints.values())
        assert inc.ruleset() == compile_cluster(cluster(*inc.endpoints.values()))


def test_the_incremental_compiler_keeps_the_guards_and_plans_only_their_change() -> None:
    a = ep("a", "10.0.0.1", port="vetha", mac=MAC_A)
    b = ep("b", "10.0.0.2", port="vethb")
    inc = IncrementalCompiler.of(cluster(a))
    first = inc.ruleset()
    assert first.guards == {"vetha": guard_of(["10.0.0.1"], MAC_A)}
    inc.upsert_endpoint(b)
    second = inc.ruleset()
    assert second == compile_cluster(cluster(a, b))
    p = plan(first, second)
    assert p.set_guards == (("vethb", guard_of(["10.0.0.2"])),)
    assert p.del_guards == () and p.old_guards == () and not p.empty
    assert p == full_plan(first, second)
    # a new address on the same port: the old guard is what goes first
    moved = replace(b, ips=("10.0.0.9",))
    inc.upsert_endpoint(moved)
    third = inc.ruleset()
    p = plan(second, third)
    assert p.set_guards == (("vethb", guard_of(["10.0.0.9"])),)
    assert p.old_guards == (("vethb", guard_of(["10.0.0.2"])),)
    assert p.describe()[-1] == "= guard vethb: 10.0.0.9"
    inc.delete_endpoint(a.key)
    fourth = inc.ruleset()
    p = plan(third, fourth)
    assert p.del_guards == ("vetha",) and p.old_guards == (("vetha", first.guards["vetha"]),)
    assert p.summary()["guards_removed"] == 1
    assert fourth == compile_cluster(cluster(moved))
    # a relabel no selector reads changes nothing, guards included
    inc.upsert_endpoint(replace(moved, labels=Labels({"pod": "b", "new": "1"})))
    assert inc.ruleset() is fourth


def test_a_changed_mac_is_a_changed_guard() -> None:
    old = Ruleset(guards={"p": guard_of(["10.0.0.1"], MAC_A)})
    new = Ruleset(guards={"p": guard_of(["10.0.0.1"], MAC_B)})
    p = plan(old, new)
    assert p.set_guards == (("p", new.guards["p"]),) and p.old_guards == (("p", old.guards["p"]),)
    assert plan(new, new).empty


@pytest.mark.parametrize(("port", "mac", "fields"), [
    ("vetha", MAC_A, []),
    ("vetha", "", []),
    ("", MAC_A, ["hostInterface"]),
    ("a" * 16, "", ["hostInterface"]),
    ('veth"; drop', "", ["hostInterface"]),
    ("veth a", "", ["hostInterface"]),
    ("-veth", "", ["hostInterface"]),
    ("vetha", "02:00:00:00:00:0A", ["mac"]),  # not lowercase
    ("vetha", "01:00:5e:00:00:01", ["mac"]),  # multicast
    ("vetha", "00:00:00:00:00:00", ["mac"]),
    ("vetha", "02:00:00:00:00", ["mac"]),
])
def test_an_attachment_is_an_interface_name_and_a_unicast_mac(port: str, mac: str,
                                                              fields: list[str]) -> None:
    assert [e.path for e in validate_attachment(port, mac)] == fields
    assert [e.path for e in validate_endpoint(ep("a", "10.0.0.1", port=port, mac=mac))] == (
        fields)


def test_the_table_text_checks_every_name_it_formats() -> None:
    text = guard.skeleton_text("stk", {"vetha": guard_of(["10.0.0.1", "fd00::1"], MAC_A)})
    assert 'add element bridge stk a4 { "vetha" . 10.0.0.1 }' in text
    assert '"vetha" . 0xfd000000000000000000000000000001' in text
    # the port's link-local address (its MAC's), as a source and as a target
    assert 'add element bridge stk l6 { "vetha" . fe80::ff:fe00:a }' in text
    assert '"vetha" . 0xfe80000000000000000000fffe00000a' in text
    assert text.count("add rule bridge stk guard") == len(guard.RULES)
    with pytest.raises(ValueError, match="not an interface name"):
        guard.skeleton_text("stk", {'x" } ; flush ruleset ; #': guard_of(["10.0.0.1"])})


def _listed(name: str, elements: dict[str, list[object]], *, rules: int | None = None,
            extra: list[dict[str, object]] | None = None) -> dict[str, object]:
    """What `nft -j list table bridge NAME` prints for a table `skeleton_text` made."""
    items: list[dict[str, object]] = [{"table": {"family": "bridge", "name": name}}]
    for s in guard.SETS:
        body: dict[str, object] = {"family": "bridge", "table": name, "name": s,
                                   "type": guard.SET_TYPES[s]}
        if elements.get(s):
            body["elem"] = elements[s]
        items.append({"set": body})
    items.append({"chain": {**guard.base_chain(name), "handle": 1}})
    for expr, (_, text) in list(zip(guard.LISTED, guard.RULES, strict=True))[:rules]:
        items.append({"rule": {"family": "bridge", "table": name, "chain": guard.CHAIN,
                               "comment": guard.comment(text), "expr": expr}})
    return {"nftables": items + (extra or [])}


def test_reading_the_table_back_finds_the_guards_and_any_difference() -> None:
    elements: dict[str, list[object]] = {
        "ports": ["vetha", "vethb"], "macports": ["vetha"],
        "macs": [{"concat": ["vetha", MAC_A]}], "a4": [{"concat": ["vetha", "10.0.0.1"]}],
        "a6": [{"concat": ["vetha", "fd00::1"]}, {"concat": ["vethb", "::1"]}],
        "l6": [{"concat": ["vetha", "fe80::ff:fe00:a"]}],
        "t6": [{"concat": ["vetha", "0xfd000000000000000000000000000001"]},
               {"concat": ["vetha", "0xfe80000000000000000000fffe00000a"]},
               {"concat": ["vethb", 1]}],
        "m4": [{"concat": ["vetha", MAC_A, "10.0.0.1"]}],
        "m6": [{"concat": ["vetha", MAC_A, "fd00::1"]}],
        "dmacs": [MAC_A], "d4": [{"concat": [MAC_A, "10.0.0.1"]}],
        "d6": [{"concat": [MAC_A, "fd00::1"]}]}
    kg = guard.parse_guard(_listed("stk", elements), "stk")
    assert kg.intact, kg.drift
    assert kg.guards == {"vetha": guard_of(["10.0.0.1", "fd00::1"], MAC_A),
                         "vethb": guard_of(["::1"])}
    # an address in a6 without its advert twin: that port is left out, and it is drift
    torn = {**elements, "t6": elements["t6"][:2]}
    kg = guard.parse_guard(_listed("stk", torn), "stk")
    assert set(kg.guards) == {"vetha"} and kg.drift == ["guard of vethb: its elements disagree"]
    # a link-local address not the MAC's, or none, or the target without it: disagree
    for tampered in ({**elements, "l6": [{"concat": ["vetha", "fe80::1"]}]},
                     {**elements, "l6": []},
                     {**elements, "t6": [elements["t6"][0], elements["t6"][2]]}):
        kg = guard.parse_guard(_listed("stk", tampered), "stk")
        assert set(kg.guards) == {"vethb"} and kg.drift == [
            "guard of vetha: its elements disagree"]
    # the fast path's binding without the MAC the port has: the port's elements disagree
    kg = guard.parse_guard(_listed("stk", {**elements, "m4": []}), "stk")
    assert set(kg.guards) == {"vethb"} and not kg.intact
    # a pod's MAC as a destination without its address, or with another: drift
    for tampered in ({**elements, "d4": []}, {**elements, "dmacs": []},
                     {**elements, "d6": [{"concat": [MAC_A, "fd00::2"]}]}):
        kg = guard.parse_guard(_listed("stk", tampered), "stk")
        assert kg.drift == ["guard sets dmacs, d4, d6: not their ports' MACs and addresses"]
    assert not guard.parse_guard(_listed("stk", elements, rules=len(guard.RULES) - 1),
                                 "stk").intact
    foreign = [{"chain": {"family": "bridge", "table": "stk", "name": "evil"}}]
    assert not guard.parse_guard(_listed("stk", elements, extra=foreign), "stk").intact
