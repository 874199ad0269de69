"""A tier chain's first match, resolved at compile time (pure).

A chain of a ClusterNetworkPolicy tier is an ordered list of rules, each a peer
set and a port range with an action. Walked rule by rule, a new connection costs
a set lookup per rule of every policy selecting its end. Here the walk is done
once, over the contents of the sets the rules name: the peer's address space is
cut into pieces no set boundary crosses (an address of a pod, a CIDR's remainder,
the gaps between), the protocols and ports likewise, and each piece gets the
action of its first matching rule. What no rule matches is left out: the packet
goes on past the chain's lookups, as it went past its rules.

The result is a list of disjoint `Decision`s, keyed exactly as an nftables
verdict map with `flags interval` keys on `peer address . l4proto . dport`; a
packet is one lookup. A rule whose match depends on the *destination* address
while the key holds the source (an ingress named port: the triples name the
endpoint's own ports) cannot be folded into that key: it stays a rule of its own,
between the decisions of the rules before it and of those after (`segments`).
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from stockade.compile.ir import ADDR, ADDR_PORT, INGRESS, NET, AddressSet, Chain, ChainRule

PROTO_NUMBER = {"tcp": 6, "udp": 17, "sctp": 132}
MAX_ADDR = {4: (1 << 32) - 1, 6: (1 << 128) - 1}
MAX_PORT = 65535
MAX_PROTO = 255

Range = tuple[int, int]  # inclusive


@dataclass(frozen=True, order=True)
class Decision:
    """Packets whose peer address, protocol and destination port fall in these ranges
    meet `rule` (the index in the chain of the first rule they match) first."""

    addr: Range
    proto: Range
    port: Range
    rule: int


def segments(chain: Chain) -> list[tuple[int, int, bool]]:
    """The chain's rules as runs (start, stop, foldable): foldable runs go into one
    lookup each; a rule that is not (an ingress named port) stays a rule."""
    out: list[tuple[int, int, bool]] = []
    start = 0
    for i, rule in enumerate(chain.rules):
        if chain.direction == INGRESS and rule.named_set is not None:
            if i > start:
                out.append((start, i, True))
            out.append((i, i + 1, False))
            start = i + 1
    if start < len(chain.rules) or not out:
        out.append((start, len(chain.rules), True))
    return out


def _addr(family: int, text: str) -> int:
    return int(ipaddress.ip_address(text)) if family == 4 or ":" in text else -1


def _ranges_of(s: AddressSet) -> list[Range]:
    if s.kind == ADDR:
        return [(v, v) for e in s.elements if isinstance(e, str)
                and (v := _addr(s.family, e)) >= 0]
    if s.kind == NET:
        out = []
        for e in s.elements:
            if isinstance(e, str):
                net = ipaddress.ip_network(e, strict=False)
                out.append((int(net.network_address), int(net.broadcast_address)))
        return out
    return []


def _ports_of(rule: ChainRule) -> list[tuple[Range, Range]]:
    """(protocol, port) ranges a rule's own protocol and ports match."""
    if rule.protocol is None:
        return [((0, MAX_PROTO), (0, MAX_PORT))]
    number = PROTO_NUMBER[rule.protocol.lower()]
    return [((number, number), p) for p in (rule.ports or ((0, MAX_PORT),))]


def _subtract(have: list[Range], cut: Range) -> tuple[list[Range], list[Range]]:
    """`have` (disjoint, sorted) without `cut`, and the parts of it `cut` took."""
    left: list[Range] = []
    taken: list[Range] = []
    lo, hi = cut
    for a, b in have:
        if b < lo or a > hi:
            left.append((a, b))
            continue
        if a < lo:
            left.append((a, lo - 1))
        if b > hi:
            left.append((hi + 1, b))
        taken.append((max(a, lo), min(b, hi)))
    return left, taken


def _first_match(hits: Sequence[tuple[int, Sequence[tuple[Range, Range]]]]
                 ) -> list[tuple[Range, Range, int]]:
    """(protocol range, port range, rule) pieces of the first rule matching, given each
    matching rule's (protocol, port) ranges in chain order."""
    # Protocols cut at every protocol a rule names, so each piece is one protocol or a
    # run of protocols no rule names apart.
    cuts = {0, MAX_PROTO + 1}
    for _, ranges in hits:
        for (plo, phi), _ports in ranges:
            cuts.update((plo, phi + 1))
    bounds = sorted(cuts)
    free: dict[Range, list[Range]] = {(a, b - 1): [(0, MAX_PORT)]
                                      for a, b in itertools.pairwise(bounds)}
    out: list[tuple[Range, Range, int]] = []
    for index, ranges in hits:
        for (plo, phi), port in ranges:
            for proto, have in free.items():
                if proto[0] < plo or proto[1] > phi or not have:
                    continue
                free[proto], taken = _subtract(have, port)
                out.extend((proto, t, index) for t in taken)
    return out


def decisions(chain: Chain, start: int, stop: int, family: int,
              sets: Mapping[str, AddressSet]) -> list[Decision]:
    """The first-match pieces of `chain.rules[start:stop]` for peers of `family`,
    adjacent address pieces with the same outcome merged."""
    # Each rule's address condition: None (any peer), or the ranges of its set; an
    # egress named port ties protocol and port to each address (its triples).
    rules: list[tuple[int, ChainRule]] = [
        (i, r) for i, r in enumerate(chain.rules[start:stop], start)
        if r.family in (None, family)]
    events: dict[int, list[tuple[int, int]]] = {}  # boundary -> (rule, +1/-1)
    named: dict[int, dict[int, list[tuple[Range, Range]]]] = {}  # rule -> addr -> ports
    anywhere: list[int] = []
    for i, r in rules:
        if r.named_set is not None:
            s = sets.get(r.named_set)
            per: dict[int, list[tuple[Range, Range]]] = {}
            for e in s.elements if s is not None and s.kind == ADDR_PORT else ():
                if isinstance(e, tuple) and (v := _addr(family, e[0])) >= 0:
                    number = PROTO_NUMBER[e[1].lower()]
                    per.setdefault(v, []).append(((number, number), (e[2], e[2])))
            named[i] = per
            spans: Iterable[Range] = ((v, v) for v in per)
        elif r.peer_set is not None:
            s = sets.get(r.peer_set)
            spans = _ranges_of(s) if s is not None and s.family == family else ()
        else:
            anywhere.append(i)
            continue
        for lo, hi in spans:
            events.setdefault(lo, []).append((i, 1))
            events.setdefault(hi + 1, []).append((i, -1))
    bounds = sorted({0, *events} - {MAX_ADDR[family] + 1})
    active: dict[int, int] = {}
    outcome_of: dict[tuple[int, ...], list[tuple[Range, Range, int]]] = {}
    out: list[Decision] = []
    previous: tuple[Range, list[tuple[Range, Range, int]]] | None = None
    for n, lo in enumerate(bounds):
        for i, step in events.get(lo, ()):
            active[i] = active.get(i, 0) + step
            if not active[i]:
                del active[i]
        hi = bounds[n + 1] - 1 if n + 1 < len(bounds) else MAX_ADDR[family]
        here = tuple(sorted((*active, *anywhere)))
        # A named port's protocol and port depend on the address (its own piece).
        key = here if not any(i in named for i in here) else (*here, -1 - lo)
        outcome = outcome_of.get(key)
        if outcome is None:
            outcome = outcome_of[key] = _first_match(
                [(i, named[i].get(lo, []) if i in named else _ports_of(chain.rules[i]))
                 for i in here])
        if previous is not None and previous[1] == outcome and previous[0][1] == lo - 1:
            previous = ((previous[0][0], hi), outcome)
            continue
        if previous is not None:
            out += [Decision(previous[0], p, q, i) for p, q, i in previous[1]]
        previous = ((lo, hi), outcome)
    if previous is not None:
        out += [Decision(previous[0], p, q, i) for p, q, i in previous[1]]
    return out


def first_rule(found: Sequence[Decision], peer: int, proto: int, port: int) -> int | None:
    """The rule a packet meets first among `found` (None: none matches): the lookup the
    kernel makes, for tests."""
    for d in found:
        if (d.addr[0] <= peer <= d.addr[1] and d.proto[0] <= proto <= d.proto[1]
                and d.port[0] <= port <= d.port[1]):
            return d.rule
    return None
