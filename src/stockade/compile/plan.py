"""The delta between two rulesets, as an ordered, backend-neutral plan.

Everything a plan does goes to the kernel in one transaction; the order only
keeps references valid inside it: sets before the rules that use them, chains
before the map entries that jump to them, and removals in reverse. A large plan
may first send what nothing reaches yet in parts of their own (see `staged`).
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from stockade.compile.ir import (
    ADDR,
    ADDR_PORT,
    ALLOW,
    EGRESS,
    INGRESS,
    NET,
    AddressSet,
    Chain,
    Element,
    Guard,
    Ruleset,
)
from stockade.model.cidr import parse_ip

MapEntry = tuple[str, int, str]  # (direction, family, address)
_T = TypeVar("_T")


@dataclass(frozen=True)
class Plan:
    add_sets: tuple[AddressSet, ...] = ()
    add_elements: tuple[tuple[AddressSet, frozenset[Element]], ...] = ()
    add_chains: tuple[Chain, ...] = ()
    # chains whose rules in the kernel are not what their name promises
    replace_chains: tuple[Chain, ...] = ()
    del_map: tuple[MapEntry, ...] = ()
    set_map: tuple[tuple[MapEntry, str], ...] = ()
    del_chains: tuple[str, ...] = ()
    del_elements: tuple[tuple[AddressSet, frozenset[Element]], ...] = ()
    del_sets: tuple[str, ...] = ()
    # Sets gaining elements that a tier's `deny` or `pass` rule names: a packet that
    # went on to an allow may now be dropped (see `narrows`).
    denying: frozenset[str] = frozenset()
    # Bridge ports whose guard comes or changes, ports no longer guarded, and the guards
    # both replace (what a datapath removes first).
    set_guards: tuple[tuple[str, Guard], ...] = ()
    del_guards: tuple[str, ...] = ()
    old_guards: tuple[tuple[str, Guard], ...] = ()

    @property
    def empty(self) -> bool:
        return not any((self.add_sets, self.add_elements, self.add_chains,
                        self.replace_chains, self.del_map,
                        self.set_map, self.del_chains, self.del_elements, self.del_sets,
                        self.set_guards, self.del_guards))

    @property
    def narrows(self) -> bool:
        """Whether the new ruleset may deny something the old one allowed.

        A NetworkPolicy rule allows (the drop is the chain's end), so only these take
        access away: an element leaving a set, an interval set rewritten, an address
        mapped to another chain or newly isolated, a chain's rules restored, and an
        element joining a set a tier's `deny` or `pass` rule names (`denying`).
        Adding other elements, un-isolating an address (its map entry removed), and
        adding or removing chains and sets no entry names only allow more.
        """
        return bool(self.del_elements or self.set_map or self.replace_chains
                    or any(s.kind == NET or s.name in self.denying
                           for s, _ in self.add_elements)
                    or any(s.kind == NET for s in self.add_sets))

    def summary(self) -> dict[str, int]:
        return {
            "sets_added": len(self.add_sets),
            "sets_removed": len(self.del_sets),
            "elements_added": sum(len(e) for _, e in self.add_elements)
            + sum(len(s.elements) for s in self.add_sets),
            "elements_removed": sum(len(e) for _, e in self.del_elements),
            "chains_added": len(self.add_chains),
            "chains_replaced": len(self.replace_chains),
            "chains_removed": len(self.del_chains),
            "map_entries_set": len(self.set_map),
            "map_entries_removed": len(self.del_map) - len(
                {e for e, _ in self.set_map} & set(self.del_map)),
            "guards_set": len(self.set_guards),
            "guards_removed": len(self.del_guards),
        }

    def describe(self) -> list[str]:
        """One line per change, for `dataplane diff` and logs."""
        out = [f"+ set {s.name} ({len(s.elements)} elements)" for s in self.add_sets]
        out += [f"+ {s.name} {_show(e)}" for s, els in self.add_elements for e in sorted(
            els, key=str)]
        out += [f"+ chain {c.name} ({len(c.rules)} rules; {c.comment})" for c in self.add_chains]
        out += [f"~ chain {c.name} (rules restored; {c.comment})" for c in self.replace_chains]
        replaced = {e for e, _ in self.set_map}
        out += [f"- {d} map {addr}" for (d, _, addr) in self.del_map
                if (d, _, addr) not in replaced]
        out += [f"= {d} map {addr} -> {chain}" for (d, _, addr), chain in self.set_map]
        out += [f"- chain {c}" for c in self.del_chains]
        out += [f"- {s.name} {_show(e)}" for s, els in self.del_elements for e in sorted(
            els, key=str)]
        out += [f"- set {s}" for s in self.del_sets]
        out += [f"= guard {port}: {', '.join(g.addresses)}{f' at {g.mac}' if g.mac else ''}"
                for port, g in self.set_guards]
        out += [f"- guard {port}" for port in self.del_guards]
        return out


def _show(e: Element) -> str:
    return e if isinstance(e, str) else f"{e[0]} . {e[1]} . {e[2]}"


def family_of(address: str) -> int:
    a = parse_ip(address)
    return a.version if a is not None else 4


@dataclass(frozen=True)
class Touched:
    """What may differ between a ruleset and the one it was derived from: set and
    chain names, and addresses of the ingress and egress maps."""

    sets: frozenset[str] = frozenset()
    chains: frozenset[str] = frozenset()
    ingress: frozenset[str] = frozenset()
    egress: frozenset[str] = frozenset()
    guards: frozenset[str] = frozenset()  # bridge ports


# On a derived ruleset, outside its dataclass fields (equality and repr ignore it): the
# ruleset it came from (weakly: a chain of them must not stay alive) and what may differ.
_ORIGIN = "_derived_from"


def derive(new: Ruleset, old: Ruleset, touched: Touched) -> None:
    """Record that `new` equals `old` but for `touched`: `plan(old, new)` examines
    only those (everything else is assumed the same objects)."""
    # Kept on `new` itself. A module table keyed by id() needed a weakref callback to
    # forget the dead, and the collector ran that callback inside the table's lock
    # whenever it struck during an insertion: the reconciler deadlocked.
    object.__setattr__(new, _ORIGIN, (weakref.ref(old), touched))


def derived(new: Ruleset, old: Ruleset) -> Touched | None:
    """What may differ from `old`, if `new` was recorded as derived from it."""
    entry: tuple[weakref.ref[Ruleset], Touched] | None = getattr(new, _ORIGIN, None)
    if entry is None or entry[0]() is not old:
        return None
    return entry[1]


def plan(old: Ruleset, new: Ruleset) -> Plan:
    """What turns `old` into `new`: added and removed sets, elements, chains, map entries.

    A NetworkPolicy chain is named by its content, so one present in both is the
    same chain; a tier chain (named by its policies' subjects) present in both with
    other rules is replaced in place. A set present in both differs at most in its
    elements. When `new` was
    derived from `old` (see `derive`), only what may differ is examined.
    """
    if old is new:
        return Plan()  # the same ruleset: an incremental compile that changed nothing
    touched = derived(new, old)
    if touched is not None:
        return _plan_touched(old, new, touched)
    return full_plan(old, new)


def set_delta(o: AddressSet, s: AddressSet, add_el: list[tuple[AddressSet, frozenset[Element]]],
              del_el: list[tuple[AddressSet, frozenset[Element]]]) -> None:
    """Append what turns set `o` into `s` (an interval set: all of it, rewritten)."""
    if o is s or o.elements is s.elements:
        return
    if s.kind == NET:
        # An interval set is rewritten whole when it differs at all.
        if s.elements != o.elements:
            add_el.append((s, s.elements))
        return
    if plus := s.elements - o.elements:
        add_el.append((s, plus))
    if minus := o.elements - s.elements:
        del_el.append((s, minus))


def _plan_touched(old: Ruleset, new: Ruleset, touched: Touched) -> Plan:
    """`full_plan(old, new)` when they differ at most in `touched` (in name order)."""
    add_sets: list[AddressSet] = []
    del_sets: list[str] = []
    add_el: list[tuple[AddressSet, frozenset[Element]]] = []
    del_el: list[tuple[AddressSet, frozenset[Element]]] = []
    for name in sorted(touched.sets):
        o, s = old.sets.get(name), new.sets.get(name)
        if s is None:
            if o is not None:
                del_sets.append(name)
        elif o is None:
            add_sets.append(s)
        else:
            set_delta(o, s, add_el, del_el)
    add_chains: list[Chain] = []
    replace_chains: list[Chain] = []
    del_chains: list[str] = []
    for name in sorted(touched.chains):
        oc, c = old.chains.get(name), new.chains.get(name)
        if c is None:
            if oc is not None:
                del_chains.append(name)
        elif oc is None:
            add_chains.append(c)
        elif oc is not c and oc.rules != c.rules:
            replace_chains.append(c)
    del_map: list[MapEntry] = []
    set_map: list[tuple[MapEntry, str]] = []
    for direction, addrs in ((INGRESS, touched.ingress), (EGRESS, touched.egress)):
        o_map, n_map = old.verdict_map(direction), new.verdict_map(direction)
        for addr in sorted(addrs):
            was, now = o_map.get(addr), n_map.get(addr)
            if was == now:
                continue
            if was is not None:
                del_map.append((direction, family_of(addr), addr))
            if now is not None:
                set_map.append(((direction, family_of(addr), addr), now))
    return Plan(tuple(add_sets), tuple(add_el), tuple(add_chains), tuple(replace_chains),
                tuple(del_map), tuple(set_map), tuple(del_chains), tuple(del_el),
                tuple(del_sets), denying_sets(new, add_el),
                *guard_delta(old.guards, new.guards, sorted(touched.guards)))


def full_plan(old: Ruleset, new: Ruleset) -> Plan:
    """`plan` comparing every set, chain and map entry."""
    add_sets = tuple(s for n, s in new.sets.items() if n not in old.sets)
    del_sets = tuple(n for n in old.sets if n not in new.sets)
    add_el: list[tuple[AddressSet, frozenset[Element]]] = []
    del_el: list[tuple[AddressSet, frozenset[Element]]] = []
    for name, s in new.sets.items():
        o = old.sets.get(name)
        if o is not None:
            set_delta(o, s, add_el, del_el)
    add_chains = tuple(c for n, c in new.chains.items() if n not in old.chains)
    replace_chains = tuple(c for n, c in new.chains.items() if n in old.chains
                           and old.chains[n] is not c and old.chains[n].rules != c.rules)
    del_chains = tuple(n for n in old.chains if n not in new.chains)
    del_map: list[MapEntry] = []
    set_map: list[tuple[MapEntry, str]] = []
    for direction in (INGRESS, EGRESS):
        o_map, n_map = old.verdict_map(direction), new.verdict_map(direction)
        for addr, chain in o_map.items():
            if n_map.get(addr) != chain:
                del_map.append((direction, family_of(addr), addr))
        for addr, chain in n_map.items():
            if o_map.get(addr) != chain:
                set_map.append(((direction, family_of(addr), addr), chain))
    return Plan(add_sets, tuple(add_el), add_chains, replace_chains, tuple(del_map),
                tuple(set_map), del_chains, tuple(del_el), del_sets,
                denying_sets(new, add_el),
                *guard_delta(old.guards, new.guards, sorted(old.guards.keys() | new.guards.keys())))


def with_guards(delta: Plan, before: Mapping[str, Guard], target: Ruleset) -> Plan:
    """`delta` with the guard changes from `before` to `target`'s: what a datapath that made
    its guards anew, apart from the plan, reports."""
    put, gone, old = guard_delta(before, target.guards, sorted(before.keys() | target.guards))
    return replace(delta, set_guards=put, del_guards=gone, old_guards=old)


def guard_delta(old: Mapping[str, Guard], new: Mapping[str, Guard], ports: Iterable[str]
                ) -> tuple[tuple[tuple[str, Guard], ...], tuple[str, ...],
                           tuple[tuple[str, Guard], ...]]:
    """(guards to set, ports to unguard, the old guards of both) among `ports`, turning
    `old` into `new`."""
    put: list[tuple[str, Guard]] = []
    gone: list[str] = []
    replaced: list[tuple[str, Guard]] = []
    for port in ports:
        was, now = old.get(port), new.get(port)
        if was == now:
            continue
        if now is None:
            gone.append(port)
        else:
            put.append((port, now))
        if was is not None:
            replaced.append((port, was))
    return tuple(put), tuple(gone), tuple(replaced)


def denying_sets(rs: Ruleset, grown: list[tuple[AddressSet, frozenset[Element]]]
                 ) -> frozenset[str]:
    """Which of the `grown` sets a rule of a tier that does not allow names."""
    names = {s.name for s, _ in grown}
    if not names:
        return frozenset()
    out: set[str] = set()
    for chain in rs.chains.values():
        if chain.tier:
            for r in chain.rules:
                if r.action != ALLOW:
                    out.update(n for n in (r.peer_set, r.named_set) if n in names)
    return frozenset(out)


# The size of one part of a staged plan, in set elements: a rule (or a chain) costs
# the encoder and the kernel about what RULE_COST elements do (~30 µs against ~1.3 µs
# each, at 10,000 endpoints), so a part takes ~15-20 ms to encode and as long to
# commit.
STAGE_PART = 16384
RULE_COST = 25


def staged(p: Plan, part: int = STAGE_PART) -> tuple[tuple[Plan, ...], Plan]:
    """`p` as parts to apply first, each its own transaction, and the rest.

    The parts only add what nothing reaches yet: new sets with their elements, and
    new NetworkPolicy chains with their rules. A set is reached through a rule,
    and a chain through a map entry or a tier chain's jump, which are all in the
    rest; so until the rest is applied, packets meet the old ruleset whole, and
    parts left by a failure or a crash are unused objects that the next plan read
    from the kernel removes. Why: the kernel handles a transaction while it is
    sent, without the interpreter, so a part goes in while the next is encoded
    and a large load uses both cores. Each part weighs about `part` (a set element
    weighs 1, a chain or a rule RULE_COST); a set or a chain is never split. A
    plan adding less than `part` is all rest.

    Sets come most used first: the kernel looks each rule's set up by name in a
    list of the table's sets in the order they came, so a set many rules name
    costs least at the front.
    """
    chains = [c for c in p.add_chains if c.final and c.next is None and c.calls is None]
    sets = [s for s in p.add_sets if s.kind in (ADDR, ADDR_PORT, NET)]  # not tier maps
    size = sum(1 + len(s.elements) for s in sets) + sum(
        RULE_COST * (1 + len(c.rules)) for c in chains)
    if size < part:
        return (), p
    uses = Counter(n for c in (*p.add_chains, *p.replace_chains) for r in c.rules
                   for n in (r.peer_set, r.named_set) if n)
    sets.sort(key=lambda s: -uses[s.name])  # stable: ties keep the plan's order
    parts = [Plan(add_sets=b) for b in _batches(sets, lambda s: 1 + len(s.elements), part)]
    parts += [Plan(add_chains=b) for b in _batches(
        chains, lambda c: RULE_COST * (1 + len(c.rules)), part)]
    first_sets, first_chains = {s.name for s in sets}, {c.name for c in chains}
    rest = replace(p, add_sets=tuple(s for s in p.add_sets if s.name not in first_sets),
                   add_chains=tuple(c for c in p.add_chains if c.name not in first_chains))
    return tuple(parts), rest


def _batches(items: Sequence[_T], weight: Callable[[_T], int],
             part: int) -> list[tuple[_T, ...]]:
    """`items` in order, cut where a batch's weight reaches `part`."""
    out: list[tuple[_T, ...]] = []
    batch: list[_T] = []
    total = 0
    for item in items:
        batch.append(item)
        total += weight(item)
        if total >= part:
            out.append(tuple(batch))
            batch, total = [], 0
    if batch:
        out.append(tuple(batch))
    return out
