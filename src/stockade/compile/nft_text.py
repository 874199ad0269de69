"""The commands of `nft.render_full` as JSON text, each built from pieces encoded once
(what `stockade compile -o nft` prints).

At Antrea's shape (100,000 pods, 75,000 policies) a full load is 250,000 rules,
148 MB of JSON; rendering each rule as nested dicts and encoding them again was
40% of the command. Rules differ in little but their set names: here the rules of
one shape (direction, protocol, ports, action, which sets) are rendered once by
`nft` itself, with holes where the names go (`jsontext.cut`), and each rule's text
is that text with its names filled in; so is the command around it, and a verdict
map's entry. Nothing is formatted here but the holes: every command's text is,
byte for byte, `json.dumps` of the command `render_full` gives, in the same order
(tests compare the two on random clusters).
"""

from __future__ import annotations

from collections.abc import Iterator

from stockade.compile.ir import ADDR, EGRESS, INGRESS, AddressSet, Chain, ChainRule, Ruleset
from stockade.compile.jsontext import array, cut, dumps, fill, hole, string
from stockade.compile.membership import address
from stockade.compile.nft import (
    DECISION,
    MAPS,
    Table,
    chain_rules,
    digest_comment,
    map_element,
    nft_target,
    render_rule_expr,
    render_set,
    render_skeleton,
    rule_digest,
    rule_verdict,
    set_comment,
    set_elements,
)


def full_load(table: Table, rs: Ruleset) -> Iterator[str]:
    """The JSON text of each command of `render_full(table, rs)`, in order, as
    `render_plan` orders a full plan: the skeleton, the sets, every chain, their
    rules, the verdict maps' entries."""
    rs = nft_target(rs)
    texts = Texts(table)
    yield from texts.head()
    yield from map(texts.set, rs.sets.values())
    yield from (texts.chain(c.name) for c in rs.chains.values())
    for c in rs.chains.values():
        yield from texts.rules(c)
    yield from texts.entries(rs)


class Texts:
    """The texts of a full load's commands, object by object: `full_load` puts them in
    order; `compile --jobs` renders the sets and chains of a share in each process
    (of `nft_target` of that share) and puts every process's texts in that order."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self._sets = _Sets(table)
        self._rules = _Rules(table)

    def head(self) -> Iterator[str]:
        """The skeleton's commands (`render_skeleton`)."""
        return map(dumps, render_skeleton(self.table))

    def set(self, s: AddressSet) -> str:
        return self._sets.of(s)

    def chain(self, name: str) -> str:
        return dumps({"add": {"chain": self.table.ref(name=name)}})

    def rules(self, chain: Chain) -> Iterator[str]:
        return self._rules.of(chain)

    def entries(self, rs: Ruleset) -> Iterator[str]:
        """The verdict maps' entries (`rs`'s maps; its sets and chains are not read)."""
        return _map_entries(self.table, rs)


class _Sets:
    """The texts of `add set` (and, for a tier's verdict map, `add map`) commands.

    A selector's set (addresses: nearly every set) is the text of its shape (family,
    with a comment or not, elements or not) with its name, comment and elements
    filled in; other sets are few, encoded whole.
    """

    def __init__(self, table: Table) -> None:
        self.table = table
        self.shapes: dict[tuple[int, bool, bool], tuple[str, ...]] = {}

    def of(self, s: AddressSet) -> str:
        if s.kind != ADDR:
            return dumps({"add": {"map" if s.kind == DECISION else "set":
                                  render_set(self.table, s)}})
        key = (s.family, bool(s.comment), bool(s.elements))
        pieces = self.shapes.get(key)
        if pieces is None:
            holes = iter(range(3))  # numbered in the order render_set writes them
            name = hole(next(holes))
            comment = hole(next(holes)) if s.comment else ""
            elements = frozenset([hole(next(holes))]) if s.elements else frozenset()
            holed = AddressSet(name, s.family, ADDR, elements, comment)
            pieces = self.shapes[key] = cut({"add": {"set": render_set(self.table, holed)}},
                                            1 + bool(s.comment) + bool(s.elements))
        texts = [string(s.name)]
        if s.comment:
            texts.append(string(set_comment(s)))
        if s.elements:
            texts.append(", ".join(map(string, set_elements(s, s.elements))))
        return fill(pieces, texts)


class _Rules:
    """The texts of `add rule` commands, a chain at a time."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.line = cut({"add": {"rule": table.ref(chain=hole(0), expr=hole(1),
                                                   comment=hole(2))}}, 3)
        # A rule's expressions (verdict included) with holes for its set names, by
        # everything else that renders them: the chain's direction and next, and the
        # rule's fields but its names (`comment` is not rendered).
        self.shapes: dict[tuple[object, ...], tuple[str, ...]] = {}
        # A policy's rules recur in every chain of a policy set holding it: each rule's
        # expressions once per direction, as `render_plan` renders them, and its digest
        # once (not once per chain: at Antrea's shape, 200,000 rules, the digests'
        # cache would not hold them).
        self.rules: dict[str, dict[ChainRule, tuple[str, str]]] = {INGRESS: {}, EGRESS: {}}

    def of(self, chain: Chain) -> Iterator[str]:
        before, in_expr, in_comment, after = self.line
        name = string(chain.name)
        if chain.tier:  # tier chains and links: few, rendered as `render_chain` does
            for expr, comment in chain_rules(self.table, chain):
                yield f"{before}{name}{in_expr}{dumps(expr)}{in_comment}{string(comment)}{after}"
            return
        known = self.rules[chain.direction]
        for i, rule in enumerate(chain.rules, 1):
            found = known.get(rule)
            if found is None:
                found = known[rule] = (self._expr(chain, rule), rule_digest(rule))
            text, digest = found
            comment = string(digest_comment(chain.direction, i, digest))
            yield f"{before}{name}{in_expr}{text}{in_comment}{comment}{after}"
        for expr, comment in self.table.tail_rules(chain):
            yield f"{before}{name}{in_expr}{dumps(expr)}{in_comment}{string(comment)}{after}"

    def _expr(self, chain: Chain, rule: ChainRule) -> str:
        """The text of `[*render_rule_expr(rule, ...), rule_verdict(chain, rule)]`."""
        names = [n for n in (rule.peer_set, rule.named_set) if n is not None]
        key = (chain.direction, chain.next, rule.family, rule.peer_set is None,
               rule.named_set is None, rule.protocol, rule.ports, rule.action, rule.keep)
        pieces = self.shapes.get(key)
        if pieces is None:
            holes = iter(range(2))
            holed = ChainRule(rule.family,
                              None if rule.peer_set is None else hole(next(holes)),
                              None if rule.named_set is None else hole(next(holes)),
                              rule.protocol, rule.ports, action=rule.action, keep=rule.keep)
            pieces = self.shapes[key] = cut(
                [*render_rule_expr(holed, chain.direction), rule_verdict(chain, holed)],
                len(names), inside=True)
        if len(names) == 1:
            return f"{pieces[0]}{string(names[0])[1:-1]}{pieces[1]}"
        return fill(pieces, (string(n)[1:-1] for n in names))


def _map_entries(table: Table, rs: Ruleset) -> Iterator[str]:
    """The verdict maps' entries: one `add element` per map, as `render_plan` groups them
    (by map name), each entry in the order of `render_full`'s plan."""
    entry = cut(map_element(hole(0), hole(1)), 2)
    jumps: dict[str, str] = {}  # a chain's text: thousands of entries jump to each

    def text(addr: str, chain: str) -> str:
        target = jumps.get(chain)
        if target is None:
            target = jumps[chain] = string(chain)
        return f"{entry[0]}{string(addr)}{entry[1]}{target}{entry[2]}"

    by_map: dict[str, list[str]] = {}
    for direction in (INGRESS, EGRESS):
        for addr, chain in rs.verdict_map(direction).items():
            a = address(addr)
            by_map.setdefault(MAPS[(direction, a[0] if a is not None else 4)], []).append(
                text(addr, chain))
    command = cut({"add": {"element": table.ref(name=hole(0), elem=hole(1))}}, 2)
    for name, entries in sorted(by_map.items()):
        yield f"{command[0]}{string(name)}{command[1]}{array(entries)}{command[2]}"
