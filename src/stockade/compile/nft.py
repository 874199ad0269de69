"""Rendering the ruleset to nftables JSON (libnftables' schema), and reading it back.

The table (one `inet` table that stockade owns and nothing else):

    chain forward   hook forward, policy accept
        ct state established,related accept        conntrack first
        icmpv6 neighbour discovery accept          or IPv6 breaks on isolated pods
        ip saddr vmap @egress4 / ip6 saddr vmap @egress6
        ip daddr vmap @ingress4 / ip6 daddr vmap @ingress6
    chain e-<hash>  egress rules of one set of policies: match -> return, else drop
    chain i-<hash>  ingress rules: match -> accept, else drop
    chain ai-/ae-/bi-/be-<hash>  a ClusterNetworkPolicy tier (named by its policies'
                    subjects): per family, `peer . l4proto . dport vmap @d4-<chain>-<n>`
                    (the first matching rule's verdict, resolved at compile time by
                    `compile.tiermap`), after a lookup in @x4-<chain>-<n> (its denials)
                    that logs and drops; li-/le- link chains call a shared Admin chain
    sets s4-/s6-<hash> selector members, c4-/c6- ipBlocks, n4-/n6- named ports

Per packet: two verdict-map lookups and the rules of the NetworkPolicies that
select the two endpoints, and a few lookups per tier, whatever the number of
endpoints and policies elsewhere.

A chain is shared by every policy set with the same rules, so nothing the kernel
holds names a policy: a rule's comment is its position and a digest of its
content ("ingress rule 3 #1a2b3c4d"). Reading back compares what the kernel
*does*: the base chain's type, hook, priority and policy, every rule's
expressions (normalised, since libnftables prints an expression differently
from how it was sent), the sets' and maps' definitions and elements, and
nothing else in the table. Whatever differs is drift, and `KernelTable.prelude`
holds the commands that clear it away in the repairing transaction.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

from stockade.compile import guard
from stockade.compile.ir import (
    ADDR,
    ADDR_PORT,
    DENY,
    EGRESS,
    INGRESS,
    NET,
    PASS,
    AddressSet,
    Chain,
    ChainRule,
    Element,
    Ruleset,
)
from stockade.compile.membership import address
from stockade.compile.plan import Plan, Touched
from stockade.compile.tiermap import decisions, segments
from stockade.model.cidr import parse_cidr
from stockade.model.cnp import ADMIN

FAMILY = "inet"
FORWARD = "forward"
JUDGE_INGRESS = "judge-ingress"
SKELETON_VERSION = "stockade-2"
# The sets of the connection limit (`limit_rules`), by family, and their size: the
# sources counted at once (a source beyond them is not limited until one leaves).
LIMIT_SETS = {4: "k4-ct", 6: "k6-ct"}
LIMIT_SET_SIZE = 65535
MAPS = {(EGRESS, 4): "egress4", (EGRESS, 6): "egress6",
        (INGRESS, 4): "ingress4", (INGRESS, 6): "ingress6"}
_ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
_IP = {4: "ip", 6: "ip6"}
_NFPROTO = {4: "ipv4", 6: "ipv6"}

Command = dict[str, Any]


LOG_PREFIX = "stockade-deny"


@dataclass(frozen=True)
class Table:
    name: str = "stockade"
    priority: int = 0
    # Dropped new connections are copied to this netfilter log group (NFLOG),
    # rate-limited, with the prefix "stockade-deny <chain>"; None: no logging.
    log_group: int | None = None
    log_rate: int = 50  # per second, per chain, beyond a burst of as many
    # A new connection from a source address that already holds this many in conntrack
    # is dropped (`limit_rules`); 0: no limit.
    conntrack_limit: int = 0

    def deny_rules(self, chain: Chain) -> list[tuple[list[dict[str, Any]], str]]:
        """The tail of a policy chain: log (if asked) and drop what no rule allowed."""
        out: list[tuple[list[dict[str, Any]], str]] = []
        if self.log_group is not None:
            out.append(([
                {"limit": {"rate": self.log_rate, "per": "second", "burst": self.log_rate}},
                {"log": {"group": self.log_group, "prefix": f"{LOG_PREFIX} {chain.name}"}},
            ], f"log denied #{chain.direction}"))
        out.append(([{"drop": None}], f"default deny #{chain.direction}"))
        return out

    def tier_rule(self, chain: Chain, index: int, rule: ChainRule
                  ) -> list[tuple[str, Any, Callable[[], list[dict[str, Any]]]]]:
        """A tier chain's rule as (comment, memo key, expressions) of its nftables rules.

        A Deny with logging is two: the first logs (rate-limited, the prefix naming the
        chain, as a NetworkPolicy chain's tail does) and drops; past the rate its limit
        does not match, so the second drops without logging. Never one that lets a
        packet through when the log is over its rate.
        """
        key = (rule, chain.direction, chain.tier, chain.next, chain.calls)

        def plain() -> list[dict[str, Any]]:
            return [*render_rule_expr(rule, chain.direction), rule_verdict(chain, rule)]

        drop = (rule_comment(chain.direction, index, rule), key, plain)
        if rule.action != DENY or self.log_group is None:
            return [drop]

        def logged() -> list[dict[str, Any]]:
            return [*render_rule_expr(rule, chain.direction),
                    {"limit": {"rate": self.log_rate, "per": "second", "burst": self.log_rate}},
                    {"log": {"group": self.log_group, "prefix": f"{LOG_PREFIX} {chain.name}"}},
                    {"drop": None}]

        return [(f"log denied #{chain.direction}", (self, chain.name, "log", index), logged),
                drop]

    def tier_rules(self, chain: Chain
                   ) -> list[tuple[str, Any, Callable[[], list[dict[str, Any]]]]]:
        """A tier chain's rules as (comment, memo key, expressions), before its tail.

        Each run of rules whose first match `compile.tiermap` resolves is, per family,
        one lookup in its verdict map (`peer . l4proto . dport`, intervals): the
        packet's first matching rule's verdict, or no element and it goes on. With
        logging, a lookup of the run's denials comes first and logs (rate-limited)
        and drops; past the rate it does not match and the map drops. A rule that
        cannot be folded (an ingress named port) stays itself, between the runs.
        """
        out: list[tuple[str, Any, Callable[[], list[dict[str, Any]]]]] = []
        peer = "saddr" if chain.direction == INGRESS else "daddr"
        for k, (start, stop, foldable, fams) in enumerate(tier_maps(chain)):
            if not foldable:
                for i in range(start, stop):
                    out += self.tier_rule(chain, i + 1, chain.rules[i])
                continue
            for fam, dmap, xset in fams:
                key = {"concat": [_payload(_IP[fam], peer), {"meta": {"key": "l4proto"}},
                                  _payload("th", "dport")]}
                if xset is not None and self.log_group is not None:
                    logged = [_match(key, "@" + xset),
                              {"limit": {"rate": self.log_rate, "per": "second",
                                         "burst": self.log_rate}},
                              {"log": {"group": self.log_group,
                                       "prefix": f"{LOG_PREFIX} {chain.name}"}},
                              {"drop": None}]
                    out.append((f"log denied {k} {_IP[fam]} #{chain.direction}",
                                (self, "log", chain.name, xset, chain.direction),
                                _constant(logged)))
                lookup = [{"vmap": {"key": key, "data": "@" + dmap}}]
                out.append((f"tier map {k} {_IP[fam]} #{chain.direction}",
                            ("vmap", dmap, chain.direction), _constant(lookup)))
        return out

    def tail_rules(self, chain: Chain) -> list[tuple[list[dict[str, Any]], str]]:
        """The end of a chain: a NetworkPolicy chain denies; a tier's goes on (a shared
        Admin chain returns to its link, which called it first)."""
        if chain.final:
            return self.deny_rules(chain)
        end = ([pass_verdict(chain)], f"end of tier #{chain.direction}")
        if chain.calls is not None:
            return [([{"jump": {"target": chain.calls}}], f"admin tier #{chain.direction}"), end]
        return [] if _called(chain) else [end]

    def ref(self, **kw: Any) -> dict[str, Any]:
        return {"family": FAMILY, "table": self.name, **kw}


def _constant(expr: list[dict[str, Any]]) -> Callable[[], list[dict[str, Any]]]:
    return lambda: expr


def _payload(proto: str, fld: str) -> dict[str, Any]:
    return {"payload": {"protocol": proto, "field": fld}}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


@functools.lru_cache(maxsize=1 << 16)
def rule_digest(rule: ChainRule) -> str:
    key = (rule.family, rule.peer_set, rule.named_set, rule.protocol, rule.ports)
    return hashlib.sha256(repr(key).encode()).hexdigest()[:8]


def _element(s: AddressSet, e: Element) -> Any:
    if s.kind == ADDR_PORT:
        assert isinstance(e, tuple)
        return {"concat": [e[0], e[1], e[2]]}
    assert isinstance(e, str)
    if s.kind == NET:
        addr, _, length = e.partition("/")
        return {"prefix": {"addr": addr, "len": int(length)}}
    return e


def render_set(table: Table, s: AddressSet) -> dict[str, Any]:
    body = table.ref(name=s.name)
    if s.kind in (DECISION, DENIED):
        body["type"] = [_ADDR_TYPE[s.family], "inet_proto", "inet_service"]
        if s.kind == DECISION:
            body["map"] = "verdict"
        body["flags"] = ["interval"]
        if s.elements:
            body["elem"] = set_elements(s, s.elements)
        return body
    if s.kind == ADDR_PORT:
        body["type"] = [_ADDR_TYPE[s.family], "inet_proto", "inet_service"]
    else:
        body["type"] = _ADDR_TYPE[s.family]
    if s.kind == NET:
        body["flags"] = ["interval"]
    if s.comment:
        body["comment"] = set_comment(s)
    if s.elements:
        body["elem"] = set_elements(s, s.elements)
    return body


def set_comment(s: AddressSet) -> str:
    """A set's comment as rendered: its first 120 characters."""
    return s.comment[:120]


def _sorted(elements: Iterable[Element]) -> list[Element]:
    return sorted(elements, key=lambda e: (str(type(e)), e))


def set_elements(s: AddressSet, elements: Iterable[Element]) -> list[Any]:
    """Elements of a set as libnftables takes them, sorted (as `_sorted` sorts them).

    A set holds one type of element, so plain `sorted` gives `_sorted`'s order
    without a key function (a set of 100,000 addresses: 0.2 s less).
    """
    if s.kind == ADDR:
        return sorted(cast(Iterable[str], elements))
    if s.kind in (DECISION, DENIED):
        return [_tier_element(s, e) for e in _sorted(elements)]
    if s.kind == ADDR_PORT:
        triples = cast(Iterable[tuple[str, str, int]], elements)
        return [{"concat": [a, p, n]} for a, p, n in sorted(triples)]
    return [_element(s, e) for e in _sorted(elements)]


def render_rule_expr(rule: ChainRule, direction: str) -> list[dict[str, Any]]:
    peer_field = "saddr" if direction == INGRESS else "daddr"
    expr: list[dict[str, Any]] = []
    if rule.family is not None and rule.peer_set is None and rule.named_set is None:
        expr.append(_match({"meta": {"key": "nfproto"}}, _NFPROTO[rule.family]))
    if rule.peer_set is not None:
        assert rule.family is not None
        expr.append(_match(_payload(_IP[rule.family], peer_field), "@" + rule.peer_set))
    if rule.named_set is not None:
        assert rule.family is not None
        key = {"concat": [_payload(_IP[rule.family], "daddr"), {"meta": {"key": "l4proto"}},
                          _payload("th", "dport")]}
        expr.append(_match(key, "@" + rule.named_set))
    if rule.protocol is not None and rule.named_set is None:
        expr.append(_match({"meta": {"key": "l4proto"}}, rule.protocol.lower()))
        if rule.ports:
            items: list[Any] = [lo if lo == hi else {"range": [lo, hi]} for lo, hi in rule.ports]
            right = items[0] if len(items) == 1 else {"set": items}
            expr.append(_match(_payload("th", "dport"), right))
    return expr


def rule_comment(direction: str, index: int, rule: ChainRule) -> str:
    """A rule's kernel comment: its place and a digest of its content, never a policy name.

    A chain is shared by every policy set with the same rules (it is named by
    their content), so a policy name here could name a policy that no longer
    uses the chain; which policies share a chain is the agent's to answer.
    """
    return digest_comment(direction, index, rule_digest(rule))


def digest_comment(direction: str, index: int, digest: str) -> str:
    """`rule_comment` given the rule's digest (a full load's text computes it once a rule)."""
    return f"{direction} rule {index} #{digest}"


def chain_rules(table: Table, chain: Chain,
                memo: dict[ChainRule, list[dict[str, Any]]] | None = None,
                ) -> list[tuple[list[dict[str, Any]], str]]:
    """Every rule of a policy chain as (expressions, comment), in order.

    `memo` shares the expressions of a rule between the chains of one
    rendering (a policy's rules recur in every chain of a policy set holding
    it): the lists are then shared, to be serialised, not changed.
    """
    out = []
    if _mapped(chain):  # a tier's first matches are looked up (see Table.tier_rules)
        out = [(render(), comment) for comment, _key, render in table.tier_rules(chain)]
        return out + table.tail_rules(chain)
    for i, rule in enumerate(chain.rules, 1):
        if chain.tier:  # a link has no rules of its own
            for comment, _key, render in table.tier_rule(chain, i, rule):
                out.append((render(), comment))
            continue
        if memo is None:
            expr = [*render_rule_expr(rule, chain.direction), rule_verdict(chain, rule)]
        else:
            found = memo.get(rule)
            if found is None:
                found = memo[rule] = [*render_rule_expr(rule, chain.direction),
                                      rule_verdict(chain, rule)]
            expr = found
        out.append((expr, rule_comment(chain.direction, i, rule)))
    return out + table.tail_rules(chain)


def rule_verdict(chain: Chain, rule: ChainRule) -> dict[str, Any]:
    """What a matching rule does: the side passes (ingress is judged last, so its pass
    is the packet's), the packet is dropped, or the next tier's chain goes on.

    An Admin chain is called (jumped to) by a link chain, so its pass returns there,
    and its egress accept cannot return (the link would go on): it goes to the
    skeleton's chain that judges the destination's ingress instead.
    """
    if rule.action == DENY:
        return {"drop": None}
    if _called(chain):
        if rule.action == PASS:
            return {"return": None}
        if chain.direction == EGRESS:
            return {"goto": {"target": JUDGE_INGRESS}}
        return {"accept": None}
    if rule.action == PASS:
        return pass_verdict(chain)
    return {"accept": None} if chain.direction == INGRESS else {"return": None}


def _called(chain: Chain) -> bool:
    """A shared Admin chain, jumped to by link chains (which have no rules of their own)."""
    return chain.tier == ADMIN and chain.calls is None


# ---- tier chains as verdict maps ---------------------------------------------------

# A tier chain's verdict map: (peer . l4proto . dport) intervals -> the first match's
# verdict; and the keys of its denials, which a logging rule looks up first. Their
# elements are text, "<addr lo>-<hi> <proto lo>-<hi> <port lo>-<hi>[ <verdict>]" with
# integer addresses, so that plans compare and diff them as any set's.
DECISION = "decision"
DENIED = "denied"
TierMaps = list[tuple[int, int, bool, list[tuple[int, str, str | None]]]]


def _mapped(chain: Chain) -> bool:
    """A tier chain with rules of its own (not a link): rendered as verdict maps."""
    return bool(chain.tier) and chain.calls is None


def tier_maps(chain: Chain) -> TierMaps:
    """The chain's runs of rules (start, stop, foldable) with, for a foldable run, per
    family its rules serve: (family, verdict map, denied set or None)."""
    out: TierMaps = []
    for k, (start, stop, foldable) in enumerate(segments(chain)):
        fams: list[tuple[int, str, str | None]] = []
        if foldable:
            for fam in (4, 6):
                mine = [r for r in chain.rules[start:stop] if r.family in (None, fam)]
                if mine:
                    fams.append((fam, f"d{fam}-{chain.name}-{k}",
                                 f"x{fam}-{chain.name}-{k}"
                                 if any(r.action == DENY for r in mine) else None))
        out.append((start, stop, foldable, fams))
    return out


def _verdict_text(v: dict[str, Any]) -> str:
    ((kind, body),) = v.items()
    return f"goto {body['target']}" if kind in ("goto", "jump") else kind


def _verdict_json(text: str) -> dict[str, Any]:
    kind, _, target = text.partition(" ")
    return {kind: {"target": target}} if target else {kind: None}


def tier_sets(chain: Chain, sets: Mapping[str, AddressSet]) -> dict[str, AddressSet]:
    """The verdict maps and denied sets of one tier chain, filled from `sets`."""
    out: dict[str, AddressSet] = {}
    for start, stop, foldable, fams in tier_maps(chain):
        if not foldable:
            continue
        for fam, dmap, xset in fams:
            found = decisions(chain, start, stop, fam, sets)
            keys = [f"{d.addr[0]}-{d.addr[1]} {d.proto[0]}-{d.proto[1]} "
                    f"{d.port[0]}-{d.port[1]}" for d in found]
            verdicts = [_verdict_text(rule_verdict(chain, chain.rules[d.rule])) for d in found]
            out[dmap] = AddressSet(dmap, fam, DECISION, frozenset(
                f"{k} {v}" for k, v in zip(keys, verdicts, strict=True)))
            if xset is not None:
                out[xset] = AddressSet(xset, fam, DENIED, frozenset(
                    k for k, d in zip(keys, found, strict=True)
                    if chain.rules[d.rule].action == DENY))
    return out


def nft_target(rs: Ruleset) -> Ruleset:
    """What the nftables table holds for `rs`: `canonical(rs)`, and every tier chain's
    verdict maps and denied sets."""
    rs = canonical(rs)
    sets = dict(rs.sets)
    for chain in rs.chains.values():
        if _mapped(chain):
            sets.update(tier_sets(chain, rs.sets))
    return replace(rs, sets=sets)


def mapped_chains(chains: Iterable[Chain]) -> set[str]:
    """The names of the tier chains rendered as verdict maps."""
    return {c.name for c in chains if _mapped(c)}


def refresh_tier_sets(sets: dict[str, AddressSet], old: Ruleset, new: Ruleset,
                      touched: Touched, mapped: Collection[str] | None = None) -> set[str]:
    """Bring the tier maps in `sets` (those of `old`) to `new`'s, when `new` differs from
    `old` at most in `touched`: the maps of the chains touched, and of the tier chains
    naming a set touched. `mapped`, when the caller keeps it, names `new`'s tier chains
    rendered as maps (`mapped_chains`), so that a set touched is looked for in those, not
    in every chain. Returns the names of the maps and sets that may differ."""
    out: set[str] = set()
    redo = {n for n in touched.chains if n in new.chains and _mapped(new.chains[n])}
    for name in touched.chains:
        before = old.chains.get(name)
        if before is not None and _mapped(before):
            for _start, _stop, _foldable, fams in tier_maps(before):
                for _fam, dmap, xset in fams:
                    for n in (dmap, xset):
                        if n is not None and sets.pop(n, None) is not None:
                            out.add(n)
    if touched.sets:
        candidates = (new.chains.values() if mapped is None
                      else [new.chains[n] for n in mapped if n in new.chains])
        redo |= {c.name for c in candidates if _mapped(c) and any(
            n in touched.sets for r in c.rules for n in (r.peer_set, r.named_set))}
    for name in redo:
        made = tier_sets(new.chains[name], sets)
        sets.update(made)
        out |= made.keys()
    return out


def _tier_element(s: AddressSet, e: Element) -> Any:
    assert isinstance(e, str)
    parts = e.split(" ")
    cls = ipaddress.IPv4Address if s.family == 4 else ipaddress.IPv6Address
    concat: list[Any] = []
    for i, piece in enumerate(parts[:3]):
        lo, hi = (int(x) for x in piece.split("-"))
        if i == 0:
            concat.append(str(cls(lo)) if lo == hi else {"range": [str(cls(lo)), str(cls(hi))]})
        else:
            concat.append(lo if lo == hi else {"range": [lo, hi]})
    if s.kind == DECISION:
        return [{"concat": concat}, _verdict_json(" ".join(parts[3:]))]
    return {"concat": concat}


# What libnftables prints for a lone protocol of a tier map's key (ranges come as
# numbers; a lone protocol there is one a rule names, or next to one).
_PROTO_NAMES = {"hopopt": 0, "icmp": 1, "igmp": 2, "tcp": 6, "udp": 17, "gre": 47,
                "esp": 50, "ah": 51, "ipv6-icmp": 58, "icmpv6": 58, "sctp": 132,
                "udplite": 136}


def _proto_number(value: Any) -> int:
    if isinstance(value, int):
        return value
    return _PROTO_NAMES[str(value)]  # KeyError: unreadable, so drift (rewritten)


def _read_range(value: Any, read: Callable[[Any], int]) -> tuple[int, int]:
    value = _unwrap(value)
    if isinstance(value, dict) and "range" in value:
        lo, hi = value["range"]
        return read(lo), read(hi)
    if isinstance(value, dict) and "prefix" in value:
        net = ipaddress.ip_network(f"{value['prefix']['addr']}/{value['prefix']['len']}")
        return int(net.network_address), int(net.broadcast_address)
    v = read(value)
    return v, v


def _read_tier_element(kind: str, family: int, raw: Any) -> Element | None:
    """A verdict map's or denied set's element as read back, in `tier_sets`' text."""
    verdict = None
    if kind == DECISION:
        if not isinstance(raw, list) or len(raw) != 2 or not isinstance(raw[1], dict):
            return None
        raw, verdict = raw[0], _verdict_text(raw[1])
    raw = _unwrap(raw)
    if not isinstance(raw, dict) or not isinstance(raw.get("concat"), list) or len(
            raw["concat"]) != 3:
        return None
    try:
        addr, proto, port = raw["concat"]
        a = _read_range(addr, lambda x: int(ipaddress.ip_address(x)))
        p = _read_range(proto, _proto_number)
        d = _read_range(port, int)
    except (ValueError, OSError, TypeError, KeyError):
        return None
    text = f"{a[0]}-{a[1]} {p[0]}-{p[1]} {d[0]}-{d[1]}"
    return f"{text} {verdict}" if verdict is not None else text


def pass_verdict(chain: Chain) -> dict[str, Any]:
    """Leaving a tier: into the next chain, or (none) the side passes."""
    if chain.next is not None:
        return {"goto": {"target": chain.next}}
    return {"accept": None} if chain.direction == INGRESS else {"return": None}


def render_chain(table: Table, chain: Chain,
                 memo: dict[ChainRule, list[dict[str, Any]]] | None = None) -> list[Command]:
    cmds: list[Command] = [{"add": {"chain": table.ref(name=chain.name)}}]
    for expr, comment in chain_rules(table, chain, memo):
        cmds.append({"add": {"rule": table.ref(chain=chain.name, expr=expr, comment=comment)}})
    return cmds


def base_chain(table: Table) -> dict[str, Any]:
    """The forward base chain's definition, as sent and as read back (less its handle)."""
    return table.ref(name=FORWARD, type="filter", hook="forward", prio=table.priority,
                     policy="accept")


def render_skeleton(table: Table, *, create_table: bool = True,
                    kept_sets: Collection[str] = ()) -> list[Command]:
    """The table, the four verdict maps and the forward base chain.

    `create_table=False` leaves the table out: a table created with the owner
    flag refuses libnftables' `add table` (it sends flags 0, which would drop
    ownership: EOPNOTSUPP), so an owned table is created over raw netlink first.
    `kept_sets`: the connection limit's sets that the kernel keeps (see
    `KernelTable.kept_sets`), left out.
    """
    cmds: list[Command] = []
    if create_table:
        cmds.append({"add": {"table": {"family": FAMILY, "name": table.name}}})
    for (_direction, fam), name in sorted(MAPS.items()):
        cmds.append({"add": {"map": table.ref(name=name, type=_ADDR_TYPE[fam], map="verdict")}})
    cmds.append({"add": {"chain": table.ref(name=JUDGE_INGRESS)}})
    for expr, comment in judge_rules():
        cmds.append({"add": {"rule": table.ref(chain=JUDGE_INGRESS, expr=expr,
                                               comment=comment)}})
    cmds += limit_sets(table, kept_sets)
    cmds.append({"add": {"chain": base_chain(table)}})
    for expr, comment in skeleton_rules(table):
        cmds.append({"add": {"rule": table.ref(chain=FORWARD, expr=expr, comment=comment)}})
    return cmds


def limit_sets(table: Table, kept: Collection[str] = ()) -> list[Command]:
    """The sets that count each source's connections, when the table limits them
    (less those in `kept`).

    No `dynamic` flag: libnftables 1.0.6 takes none in JSON (nor prints one); it sets
    the flag itself on a set that a rule of the same transaction adds to, and the
    skeleton sends the sets with their rules."""
    if not table.conntrack_limit:
        return []
    return [{"add": {"set": table.ref(name=LIMIT_SETS[fam], type=_ADDR_TYPE[fam],
                                      size=LIMIT_SET_SIZE)}} for fam in (4, 6)
            if LIMIT_SETS[fam] not in kept]


def limit_rules(table: Table | None) -> list[tuple[list[dict[str, Any]], str]]:
    """A new connection is dropped when its source already holds `conntrack_limit` in
    conntrack (nft_connlimit: `add @k4-ct { ip saddr ct count over N }`). One pod
    otherwise fills the node's table (`nf_conntrack_max`), and then no new connection
    of any pod gets through. A connection dropped here is never confirmed, so it
    takes no entry of the table; a source whose count falls to 0 leaves the set."""
    if table is None or not table.conntrack_limit:
        return []
    return [([_match({"ct": {"key": "state"}}, ["new"], "in"),
              {"set": {"op": "add", "elem": _payload(_IP[fam], "saddr"),
                       "set": "@" + LIMIT_SETS[fam],
                       "stmt": [{"ct count": {"val": table.conntrack_limit, "inv": True}}]}},
              {"drop": None}], f"conntrack limit {_IP[fam]}") for fam in (4, 6)]


def skeleton_rules(table: Table | None = None) -> list[tuple[list[dict[str, Any]], str]]:
    """The forward base chain's rules as (expressions, comment), in order (`table`: its
    connection limit's, if it has one)."""
    rules: list[tuple[list[dict[str, Any]], str]] = [
        ([_match({"ct": {"key": "state"}}, ["established", "related"], "in"),
          {"accept": None}], "conntrack"),
        # A TCP packet that would open a connection without SYN is a stream that
        # conntrack lost (or that stockade cut on purpose after revoking access);
        # picked up mid-stream it would pass as a new connection the other way.
        ([_match({"meta": {"key": "l4proto"}}, "tcp"),
          _match({"ct": {"key": "state"}}, ["new"], "in"),
          _match({"&": [_payload("tcp", "flags"), ["fin", "syn", "rst", "ack"]]}, "syn", "!="),
          {"drop": None}], "tcp without syn"),
        *limit_rules(table),
        ([_match(_payload("icmpv6", "type"),
                 {"set": ["nd-neighbor-solicit", "nd-neighbor-advert"]}),
          {"accept": None}], "neighbour discovery"),
    ]
    for direction, fld in ((EGRESS, "saddr"), (INGRESS, "daddr")):
        for fam in (4, 6):
            rules.append(([{"vmap": {"key": _payload(_IP[fam], fld),
                                     "data": "@" + MAPS[(direction, fam)]}}],
                          f"{direction} {_IP[fam]}"))
    return [(expr, f"{comment} #{SKELETON_VERSION}") for expr, comment in rules]


def judge_rules() -> list[tuple[list[dict[str, Any]], str]]:
    """The skeleton's chain that judges a packet's ingress and accepts what passes: where
    an Admin egress accept goes (the destination's ingress is still to be judged)."""
    rules: list[tuple[list[dict[str, Any]], str]] = [
        ([{"vmap": {"key": _payload(_IP[fam], "daddr"), "data": "@" + MAPS[(INGRESS, fam)]}}],
         f"{INGRESS} {_IP[fam]}") for fam in (4, 6)]
    rules.append(([{"accept": None}], "ingress unrestricted"))
    return [(expr, f"{comment} #{SKELETON_VERSION}") for expr, comment in rules]


def map_element(addr: str, chain: str | None) -> Any:
    return [addr, {"jump": {"target": chain}}] if chain else addr


def render_plan(table: Table, p: Plan, *, skeleton: bool = False,
                create_table: bool = True, kept_sets: Collection[str] = ()) -> list[Command]:
    """One transaction's commands, in an order that keeps every reference valid."""
    cmds: list[Command] = render_skeleton(table, create_table=create_table,
                                          kept_sets=kept_sets) if skeleton else []
    cmds += [{"add": {"map" if s.kind == DECISION else "set": render_set(table, s)}}
             for s in p.add_sets]
    # A tier map's intervals may not overlap: what goes, goes before what comes.
    for s, els in p.del_elements:
        if s.kind in (DECISION, DENIED) and els:
            cmds.append({"delete": {"element": table.ref(name=s.name,
                                                         elem=_tier_keys(s, els))}})
    for s, els in p.add_elements:
        if s.kind == NET:
            # Interval sets are rewritten whole: the kernel may split or join prefixes.
            cmds.append({"flush": {"set": table.ref(name=s.name)}})
            els = s.elements
        if els:
            cmds.append({"add": {"element": table.ref(name=s.name, elem=set_elements(s, els))}})
    # A rule's expressions depend on its direction (the verdict, the peer field).
    memo: dict[str, dict[ChainRule, list[dict[str, Any]]]] = {INGRESS: {}, EGRESS: {}}
    # Every new chain is declared before any rule: a tier's chain jumps to the next.
    cmds += [{"add": {"chain": table.ref(name=c.name)}} for c in p.add_chains]
    for c in p.add_chains:
        cmds += render_chain(table, c, memo[c.direction])[1:]
    for c in p.replace_chains:
        cmds.append({"flush": {"chain": table.ref(name=c.name)}})
        cmds += render_chain(table, c, memo[c.direction])[1:]
    by_map: dict[str, list[Any]] = {}
    for direction, fam, addr in p.del_map:
        by_map.setdefault(MAPS[(direction, fam)], []).append(map_element(addr, None))
    for name, elems in sorted(by_map.items()):
        cmds.append({"delete": {"element": table.ref(name=name, elem=elems)}})
    by_map = {}
    for (direction, fam, addr), chain in p.set_map:
        by_map.setdefault(MAPS[(direction, fam)], []).append(map_element(addr, chain))
    for name, elems in sorted(by_map.items()):
        cmds.append({"add": {"element": table.ref(name=name, elem=elems)}})
    # Flushed first: a tier's chain going away may be what another one jumps to.
    cmds += [{"flush": {"chain": table.ref(name=name)}} for name in p.del_chains]
    cmds += [{"delete": {"chain": table.ref(name=name)}} for name in p.del_chains]
    for s, els in p.del_elements:
        if s.kind in (ADDR, ADDR_PORT) and els:
            cmds.append({"delete": {"element": table.ref(name=s.name, elem=set_elements(s, els))}})
    cmds += [{"delete": {"map" if (_set_kind(n) or ("",))[0] == DECISION else "set":
                         table.ref(name=n)}} for n in p.del_sets]
    # The guard table's elements (its skeleton is made apart: see compile.guard).
    cmds += guard.element_commands(table.name, p.set_guards, p.old_guards)
    return cmds


def _tier_keys(s: AddressSet, elements: Iterable[Element]) -> list[Any]:
    """Elements to delete: a map's by key alone."""
    out = set_elements(s, elements)
    return [e[0] for e in out] if s.kind == DECISION else out


def render_full(table: Table, rs: Ruleset) -> list[Command]:
    """Every command of a full load into an empty kernel: what the datapath sends
    when the table is missing (skeleton, sets, chains, map entries), with interval
    sets in the collapsed form the kernel keeps.

    The plan is `plan(Ruleset(), canonical(rs))` (everything added), built here
    directly so that each address's family comes from the compiler's cache.
    """
    rs = nft_target(rs)
    set_map = []
    for direction in (INGRESS, EGRESS):
        for addr, chain in rs.verdict_map(direction).items():
            a = address(addr)
            set_map.append(((direction, a[0] if a is not None else 4, addr), chain))
    full = Plan(add_sets=tuple(rs.sets.values()), add_chains=tuple(rs.chains.values()),
                set_map=tuple(set_map))
    return render_plan(table, full, skeleton=True)


# ---- normalising expressions ---------------------------------------------------

# Transport protocols whose header `th` reads once `meta l4proto` names one.
_TRANSPORT = frozenset({"tcp", "udp", "sctp", "udplite", "dccp"})
_NETWORK = {"ipv4": "ip", "ipv6": "ip6"}
# Operators whose operands are in order (the others' lists are sets of flags).
_ORDERED = frozenset({"concat", "&", "|", "^", "<<", ">>", "range"})

Canon = Any  # a hashable, comparable canonical form


def _key_match(stmt: Any, key: str) -> str | None:
    """`x` when `stmt` is `meta <key> == x` with one symbolic value."""
    m = stmt.get("match") if isinstance(stmt, dict) and len(stmt) == 1 else None
    if (isinstance(m, dict) and m.get("op", "==") == "==" and m.get("left") == {
            "meta": {"key": key}}):
        right = m.get("right")
        if isinstance(right, list) and len(right) == 1:
            right = right[0]
        return right if isinstance(right, str) else None
    return None


def _retarget_th(value: Any, proto: str) -> Any:
    """`th` payloads read as `proto` payloads (what they are once l4proto is known)."""
    if isinstance(value, dict):
        pl = value.get("payload")
        if len(value) == 1 and isinstance(pl, dict) and pl.get("protocol") == "th":
            return {"payload": {**pl, "protocol": proto}}
        if "set" in value or "range" in value:
            return value  # constants: nothing reads a header there
        return {k: _retarget_th(v, proto) for k, v in value.items()}
    if isinstance(value, list):
        return [_retarget_th(v, proto) for v in value]
    return value


def _reads(value: Any, protocols: tuple[str, ...]) -> bool:
    """Whether an expression reads a header of one of `protocols`."""
    if isinstance(value, dict):
        pl = value.get("payload")
        if len(value) == 1 and isinstance(pl, dict):
            return pl.get("protocol") in protocols
        if "set" in value or "range" in value:
            return False
        return any(_reads(v, protocols) for v in value.values())
    if isinstance(value, list):
        return any(_reads(v, protocols) for v in value)
    return False


def _interval(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, dict) and len(value) == 1 and isinstance(value.get("range"), list):
        lo, hi = value["range"]
        if isinstance(lo, int) and isinstance(hi, int):
            return (lo, hi)
    return None


def _unwrap(value: Any) -> Any:
    """A set element without its decorations (comments): only its value matches."""
    if isinstance(value, dict) and len(value) == 1 and isinstance(value.get("elem"), dict):
        inner = value["elem"]
        if set(inner) <= {"val", "comment"}:
            return inner.get("val")
    return value


def _canon_set(items: list[Any]) -> Canon:
    """An anonymous set (or one value): numbers and ranges merged into intervals.

    `80`, `{80}`, `80-80` and `{80-80}` match the same packets, and so do
    `{80, 81-90}` and `{80-90}` (libnftables merges adjacent intervals).
    """
    items = [_unwrap(v) for v in items]
    intervals = [_interval(v) for v in items]
    if items and all(iv is not None for iv in intervals):
        merged: list[list[int]] = []
        for lo, hi in sorted(iv for iv in intervals if iv is not None):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        out: list[Canon] = [lo if lo == hi else ("range", lo, hi) for lo, hi in merged]
    else:
        out = sorted({_canon(v) for v in items}, key=repr)
    return out[0] if len(out) == 1 else ("set", tuple(out))


def _canon(value: Any) -> Canon:
    if isinstance(value, (str, int)) or value is None:
        return value
    if isinstance(value, dict):
        if len(value) == 1:
            ((key, inner),) = value.items()
            if inner is None:
                return (key,)  # a verdict: accept, drop, return
            if key in _SIMPLE and isinstance(inner, dict) and inner.keys() == _SIMPLE[key]:
                return (key, *(inner[k] for k in _SIMPLE_ORDER[key]))  # payload, meta, ct
            if key == "set" and isinstance(inner, list):
                return _canon_set(inner)
            if key == "range" or (key == "elem" and isinstance(inner, dict)):
                return _canon_set([value])
            if key == "prefix" and isinstance(inner, dict):
                addr, length = inner.get("addr"), inner.get("len")
                full = length == (128 if ":" in str(addr) else 32)
                return _canon(addr) if full else ("prefix", _canon(addr), length)
            if key in _ORDERED and isinstance(inner, list):
                return (key, tuple(_canon(v) for v in inner))
        return ("{", tuple(sorted((k, _canon(v)) for k, v in value.items())))
    if isinstance(value, list):
        # A list outside an ordered operator is a set of symbolic values (flags).
        return _canon_set(value)
    return value


# Expressions of one fixed shape, canonical as a flat tuple (the common case, fast).
_SIMPLE = {"payload": {"protocol", "field"}, "meta": {"key"}, "ct": {"key"}}
_SIMPLE_ORDER = {"payload": ("protocol", "field"), "meta": ("key",), "ct": ("key",)}


def _canon_stmt(stmt: Any) -> Canon:
    m = stmt.get("match") if isinstance(stmt, dict) and len(stmt) == 1 else None
    if isinstance(m, dict) and m.keys() == _MATCH_KEYS:
        return ("match", m["op"], _canon(m["left"]), _canon(m["right"]))
    return _canon(stmt)


_MATCH_KEYS = {"op", "left", "right"}


def canonical_expr(expr: Iterable[Any]) -> tuple[Canon, ...]:
    """A rule's expressions in one canonical form, whether rendered here or read back.

    libnftables prints what the kernel runs, not what was sent: `meta l4proto
    tcp; th dport 80` comes back as `tcp dport 80`, a protocol match that only
    guards a later header read disappears (the header read implies it), sets
    of one element become the element, adjacent ranges merge. Both sides are
    mapped here to one form; only equivalences that hold for every packet are
    used, so two expressions with the same canonical form match the same packets.
    """
    stmts = list(expr)
    l4 = [_key_match(s, "l4proto") for s in stmts]
    nf = [_key_match(s, "nfproto") for s in stmts]
    proto: str | None = None
    for i, stmt in enumerate(stmts):
        if l4[i] is not None:
            proto = l4[i]
        elif proto in _TRANSPORT:
            assert proto is not None
            stmts[i] = _retarget_th(stmt, proto)
    out: list[Canon] = []
    for i, stmt in enumerate(stmts):
        p = l4[i]
        if p is not None and any(_reads(s, (p,)) for s in stmts[i + 1:]):
            continue  # a dependency of a later header read
        n = nf[i]
        if n in _NETWORK and any(_reads(s, (_NETWORK[n],)) for s in stmts[i + 1:]):
            continue
        out.append(_canon_stmt(stmt))
    return tuple(out)


def canonical_rules(rules: Iterable[tuple[Iterable[Any], str]]) -> tuple[Canon, ...]:
    """A chain's rules as (comment, canonical expressions), for comparing."""
    return tuple((comment, canonical_expr(expr)) for expr, comment in rules)


class RuleComparator:
    """Compares the rules of chains read back with what stockade renders for them.

    Normalising is what costs, so it is remembered: the canonical form of each
    rule stockade renders is computed once, and the read-back (parsed JSON) of
    each rule once found equal to it; the same read-back again, in this chain
    or in another holding the same rule, is equal without normalising. At
    10,000 endpoints a verification compares thousands of rules, nearly all
    unchanged since the last one, many shared between chains.
    """

    LIMIT = 100_000

    def __init__(self) -> None:
        self._canon: dict[Any, tuple[Canon, ...]] = {}
        self._raw: dict[Any, Any] = {}
        self._chains: dict[tuple[Table, str], tuple[Chain, list[tuple[str, Any, Any]]]] = {}

    def _expected(self, table: Table, chain: Chain) -> list[tuple[str, Any, Any]]:
        """(comment, memo key, expressions) of every rule of `chain`, in order."""
        known = self._chains.get((table, chain.name))
        if known is not None and (known[0] is chain or known[0] == chain):
            return known[1]
        out: list[tuple[str, Any, Any]] = []
        if _mapped(chain):
            out += table.tier_rules(chain)
        for i, rule in enumerate(() if _mapped(chain) else chain.rules, 1):
            if chain.tier:
                out += table.tier_rule(chain, i, rule)
            else:
                out.append((rule_comment(chain.direction, i, rule), (rule, chain.direction),
                            lambda r=rule: [*render_rule_expr(r, chain.direction),
                                            rule_verdict(chain, r)]))
        for i, (expr, comment) in enumerate(table.tail_rules(chain)):
            out.append((comment, (table, chain.name, i), lambda e=expr: e))
        self._chains[(table, chain.name)] = (chain, out)
        return out

    def same(self, table: Table, chain: Chain, raw: list[Any]) -> bool:
        """Whether the kernel's rules of `chain` (`raw`: their JSON bodies) are what we render."""
        want = self._expected(table, chain)
        if len(raw) != len(want):
            return False
        if max(len(self._raw), len(self._canon), len(self._chains)) > self.LIMIT:
            self._raw.clear()
            self._canon.clear()
            self._chains.clear()
        for body, (comment, key, render) in zip(raw, want, strict=True):
            if body.get("comment", "") != comment or not body.keys() <= _RULE_KEYS:
                return False
            expr = body.get("expr", [])
            if self._raw.get(key) == expr:
                continue
            canon = self._canon.get(key)
            if canon is None:
                canon = self._canon[key] = canonical_expr(render())
            if canonical_expr(expr) != canon:
                return False
            self._raw[key] = expr
        return True


# ---- reading back ---------------------------------------------------------------

_RULE_KEYS = frozenset({"family", "table", "chain", "handle", "comment", "expr"})
# The policy chains' names: NetworkPolicy (i-, e-), Admin (ai-, ae-), Baseline (bi-,
# be-) and links (li-, le-), with the direction's letter before the dash.
_OUR_CHAIN = re.compile(r"[abl]?([ie])-.+")
_CHAIN_KEYS = frozenset({"family", "table", "name", "handle"})
_SET_KEYS = frozenset({"family", "table", "name", "handle", "type", "flags", "elem", "comment"})
_MAP_KEYS = frozenset({"family", "table", "name", "handle", "type", "map", "elem", "comment"})
# The table flag that turns every chain of it off. libnftables 1.0.6 prints a
# table's flags unreliably (a lone flag, dormant or persist alike, comes out as
# "inet"), so the kernel's own value is read over netlink and passed in.
NFT_TABLE_F_DORMANT = 0x1
# A verdict-map entry that does not jump to a chain (accept, goto, drop, ...): no
# chain has this name, so the entry always differs from what stockade wants.
NOT_A_JUMP = "<not a jump>"
# What a chain that is not what its name promises holds, as far as plans go:
# unequal to the rules of every real chain, even a chain with no rules.
TAMPERED = (ChainRule(protocol="<tampered>"),)


@dataclass
class KernelTable:
    """What the kernel holds, as far as stockade reads it.

    `ruleset` is what the kernel enforces in stockade's terms: verified chains,
    chains that are not what their name promises (rules `TAMPERED`), sets and
    map entries. Anything that is not stockade's or not as stockade makes it is
    described in `drift` (foreign objects also in `foreign`), and `prelude`
    holds the commands that remove it, to run first in the repairing transaction.
    """

    ruleset: Ruleset
    skeleton_ok: bool  # the base chain (definition and rules) and the four maps
    foreign: list[str] = field(default_factory=list)  # objects stockade did not make
    drift: list[str] = field(default_factory=list)  # every difference found, one line each
    prelude: list[Command] = field(default_factory=list)
    table_ok: bool = True  # not dormant (a dormant table enforces nothing)
    # Foreign stateful objects and flowtables as (kind, name, handle): removed
    # over raw netlink after the repairing transaction (nothing uses them then).
    objects: list[tuple[str, str, int]] = field(default_factory=list)
    # The guard table (compile.guard) is not there (made when a port is to be guarded:
    # a host with none pays nothing per frame), or there and not as made (made anew).
    guard_missing: bool = False
    guard_ok: bool = True
    # The connection limit's sets that stay when the skeleton is made again (their
    # counts with them): `render_plan(kept_sets=…)` leaves them out.
    kept_sets: tuple[str, ...] = ()

    @property
    def needs_repair(self) -> bool:
        """Whether a transaction must restore the skeleton or remove what is not ours.

        Chains of ours that are merely unknown to the reader (named like ours,
        not among the expected) are not drift: a plan deletes them if unwanted.
        """
        return (not self.skeleton_ok or not self.table_ok or bool(self.drift)
                or bool(self.objects) or not self.guard_ok)


def _read_element(kind: str, family: int, raw: Any) -> Element | None:
    raw = _unwrap(raw)
    if kind == ADDR_PORT:
        if not isinstance(raw, dict) or not isinstance(raw.get("concat"), list) or len(
                raw["concat"]) != 3:
            return None
        addr, proto, port = raw["concat"]
        return (str(addr), str(proto), int(port))
    if kind == NET:
        if isinstance(raw, dict) and "prefix" in raw:
            return f"{raw['prefix']['addr']}/{raw['prefix']['len']}"
        if isinstance(raw, dict) and "range" in raw:
            return f"{raw['range'][0]}-{raw['range'][1]}"
        return f"{raw}/{32 if family == 4 else 128}"
    return str(raw) if isinstance(raw, str) else None


def _set_kind(name: str) -> tuple[str, int] | None:
    """(kind, family) of a set stockade names (s4-, c6-, n4-, ...), else None."""
    if len(name) < 4 or name[2] != "-" or name[1] not in "46":
        return None
    kind = {"s": ADDR, "c": NET, "n": ADDR_PORT, "d": DECISION, "x": DENIED}.get(name[0])
    return (kind, int(name[1])) if kind else None


def _set_type(kind: str, family: int) -> Any:
    return ([_ADDR_TYPE[family], "inet_proto", "inet_service"]
            if kind in (ADDR_PORT, DECISION, DENIED) else _ADDR_TYPE[family])


def _canonical_net(elements: Iterable[Element]) -> frozenset[Element]:
    import ipaddress

    nets: list[Any] = []
    for e in elements:
        if isinstance(e, str) and "-" in e:
            lo, hi = e.split("-", 1)
            nets.extend(ipaddress.summarize_address_range(ipaddress.ip_address(lo),
                                                          ipaddress.ip_address(hi)))
        elif isinstance(e, str) and (n := parse_cidr(e)) is not None:
            nets.append(n)
    return frozenset(str(n) for n in ipaddress.collapse_addresses(nets))


def canonical(rs: Ruleset) -> Ruleset:
    """The ruleset with interval sets in collapsed form, as a read-back compares them."""
    sets = {n: (AddressSet(s.name, s.family, s.kind, _canonical_net(s.elements), s.comment)
                if s.kind == NET else s) for n, s in rs.sets.items()}
    return replace(rs, sets=sets)


def _sets_of(chain: Chain) -> set[str]:
    """The sets and maps the chain's rules, as rendered, look up."""
    out = {n for r in chain.rules for n in (r.peer_set, r.named_set) if n is not None}
    if _mapped(chain):
        out |= {n for *_, fams in tier_maps(chain) for _f, d, x in fams
                for n in (d, x) if n is not None}
    return out


def _table_flags(flags: Any) -> set[str]:
    if flags is None:
        return set()
    return {str(f) for f in flags} if isinstance(flags, list) else {str(flags)}


def parse_kernel(doc: Mapping[str, Any], table: Table, expected_chains: Mapping[str, Chain],
                 check: RuleComparator | None = None,
                 table_flags: int | None = None) -> KernelTable:
    """What `nft -j list table` shows, against what stockade would have put there.

    A policy chain is known by its name (a hash of its content) among
    `expected_chains`, and is that chain only if its rules, as the kernel runs
    them, are those stockade renders for it. Every other object is compared
    with its definition: the base chain (type, hook, priority, policy, rules),
    the four verdict maps, the sets (type, flags; elements are compared by the
    plan). Whatever is not stockade's is foreign, and the prelude removes it.
    `table_flags`: the table's flags as the kernel reports them (NFTA_TABLE_FLAGS);
    without them only a flag printed as "dormant" counts.
    """
    check = check or RuleComparator()
    ref = table.ref
    chain_bodies: dict[str, dict[str, Any]] = {}
    rules: dict[str, list[Any]] = {}
    set_bodies: list[dict[str, Any]] = []
    map_bodies: list[dict[str, Any]] = []
    others: list[tuple[str, dict[str, Any]]] = []
    table_ok = table_flags is None or not table_flags & NFT_TABLE_F_DORMANT
    drift: list[str] = [] if table_ok else ["table dormant (enforces nothing)"]
    for item in doc.get("nftables", []):
        if not isinstance(item, dict) or len(item) != 1:
            continue
        ((kind, body),) = item.items()
        if kind == "metainfo":
            continue
        if kind == "rule":
            rules.setdefault(body.get("chain", ""), []).append(body)
        elif kind == "chain":
            chain_bodies[body["name"]] = body
        elif kind == "set":
            set_bodies.append(body)
        elif kind == "map":
            map_bodies.append(body)
        elif kind == "table":
            if table_flags is None and "dormant" in _table_flags(body.get("flags")):
                table_ok = False
                drift.append("table dormant (enforces nothing)")
        else:
            others.append((kind, body))

    foreign: list[str] = []
    flush: list[str] = []  # chains to empty first (their rules may hold references)
    del_chains: list[str] = []  # chains to delete (after flushing)
    del_objects: list[Command] = []  # sets, maps and other objects to delete, last

    # Sets: stockade's names, types and flags; anything else goes.
    sets: dict[str, AddressSet] = {}
    bad_sets: set[str] = set()
    limit_ok = True
    limited = {LIMIT_SETS[f]: f for f in (4, 6)} if table.conntrack_limit else {}
    kept_limits: list[str] = []  # the limit's sets as made
    for s in set_bodies:
        name = s["name"]
        if name in limited:
            # Its elements are the kernel's (sources and their connections): not compared.
            if (s.get("type") != _ADDR_TYPE[limited.pop(name)]
                    or s.get("size") != LIMIT_SET_SIZE or "flags" in s
                    or not set(s) <= _SET_KEYS | {"size"}):
                drift.append(f"set {name}: definition differs")
                limit_ok = False
                del_objects.append({"delete": {"set": ref(name=name)}})
            else:
                kept_limits.append(name)
            continue
        sk = _set_kind(name)
        if sk is None:
            foreign.append(f"set {name}")
            del_objects.append({"delete": {"set": ref(name=name)}})
            continue
        kind, fam = sk
        flags = s.get("flags")
        want_flags = ["interval"] if kind in (NET, DENIED) else None
        if (kind == DECISION or s.get("type") != _set_type(kind, fam) or flags != want_flags
                or not set(s) <= _SET_KEYS):
            drift.append(f"set {name}: definition differs")
            bad_sets.add(name)
            del_objects.append({"delete": {"set": ref(name=name)}})
            continue
        raw = s.get("elem", [])
        if kind == DENIED:
            sets[name] = AddressSet(name, fam, kind, frozenset(
                e for r in raw if (e := _read_tier_element(kind, fam, r)) is not None))
            continue
        if kind == ADDR and all(isinstance(e, str) for e in raw):
            elements: frozenset[Element] = frozenset(raw)  # the common case, fast
        else:
            els = [_read_element(kind, fam, e) for e in raw]
            elements = frozenset(e for e in els if e is not None)
        if kind == NET:
            elements = _canonical_net(elements)
        sets[name] = AddressSet(name, fam, kind, elements, s.get("comment", ""))

    # Chains: the base chain, policy chains that are what their name promises,
    # chains of ours that are not (replaced), and foreign ones (deleted).
    chains: dict[str, Chain] = {}
    gone: set[str] = set()  # chains deleted by the prelude
    for name, body in chain_bodies.items():
        if name in (FORWARD, JUDGE_INGRESS):
            continue
        mine = _OUR_CHAIN.fullmatch(name)
        if not mine:
            foreign.append(f"chain {name}")
            gone.add(name)
            continue
        direction = INGRESS if mine[1] == "i" else EGRESS
        if not set(body) <= _CHAIN_KEYS:
            drift.append(f"chain {name}: definition differs")
            gone.add(name)
            continue
        chain = expected_chains.get(name)
        if chain is not None and chain.direction == direction and not (
                _sets_of(chain) & bad_sets) and check.same(table, chain, rules.get(name, [])):
            chains[name] = chain
            continue
        if chain is not None:
            drift.append(f"chain {name}: rules differ")
        flush.append(name)
        chains[name] = Chain(name, direction, TAMPERED, "tampered")
    for name in sorted(gone):
        flush.append(name)
        del_chains.append(name)

    # The verdict maps: definitions, and entries that jump to a chain.
    maps: dict[str, dict[str, str]] = {INGRESS: {}, EGRESS: {}}
    good_maps: set[str] = set()
    by_name = {n: (d, fam) for (d, fam), n in MAPS.items()}
    del_entries: list[Command] = []
    for m in map_bodies:
        name = m["name"]
        sk = _set_kind(name)
        if name not in by_name and sk is not None and sk[0] == DECISION:
            if (m.get("type") != _set_type(DECISION, sk[1]) or m.get("map") != "verdict"
                    or m.get("flags") != ["interval"] or not set(m) <= _MAP_KEYS | {"flags"}):
                drift.append(f"map {name}: definition differs")
                bad_sets.add(name)
                del_objects.append({"delete": {"map": ref(name=name)}})
                continue
            sets[name] = AddressSet(name, sk[1], DECISION, frozenset(
                e for r in m.get("elem", [])
                if (e := _read_tier_element(DECISION, sk[1], r)) is not None))
            continue
        if name not in by_name:
            foreign.append(f"map {name}")
            del_objects.append({"delete": {"map": ref(name=name)}})
            continue
        direction, fam = by_name[name]
        if (m.get("type") != _ADDR_TYPE[fam] or m.get("map") != "verdict"
                or not set(m) <= _MAP_KEYS):
            drift.append(f"map {name}: definition differs")
            del_objects.append({"delete": {"map": ref(name=name)}})
            continue
        good_maps.add(name)
        stale: list[str] = []
        for entry in m.get("elem", []):
            if not isinstance(entry, list) or len(entry) != 2:
                continue
            key, verdict = _unwrap(entry[0]), entry[1]
            if not isinstance(key, str):
                continue
            jump = verdict.get("jump") if isinstance(verdict, dict) and len(verdict) == 1 else None
            target = jump.get("target") if isinstance(jump, dict) else None
            if not isinstance(target, str):
                drift.append(f"map {name}: {key} does not jump to a chain")
                target = NOT_A_JUMP
            elif target in gone:
                stale.append(key)  # its chain goes in the prelude: the entry first
                continue
            maps[direction][key] = target
        if stale:
            del_entries.append({"delete": {"element": ref(name=name, elem=stale)}})

    # The base chain: definition, rules, and the maps its rules read.
    fwd = chain_bodies.get(FORWARD)
    kernel_fwd = canonical_rules((r.get("expr", []), r.get("comment", ""))
                                 for r in rules.get(FORWARD, []))
    fwd_def = {k: v for k, v in fwd.items() if k != "handle"} if fwd is not None else None
    fwd_ok = fwd_def == base_chain(table)
    if fwd is None:
        drift.append("base chain missing")
    elif not fwd_ok:
        drift.append("base chain definition differs")
    elif kernel_fwd != _skeleton_canon(table) or not all(
            set(r) <= _RULE_KEYS for r in rules.get(FORWARD, [])):
        drift.append("base chain rules differ")
        fwd_ok = False
    if limited:
        drift += [f"set {name} missing" for name in sorted(limited)]
        limit_ok = False
    fwd_ok = fwd_ok and limit_ok  # the skeleton makes them again, with their rules
    if good_maps != set(MAPS.values()):
        drift.append("verdict maps missing or altered")
    judge = chain_bodies.get(JUDGE_INGRESS)
    judge_ok = judge is not None and set(judge) <= _CHAIN_KEYS and canonical_rules(
        (r.get("expr", []), r.get("comment", "")) for r in rules.get(JUDGE_INGRESS, [])
    ) == canonical_rules(judge_rules()) and all(
        set(r) <= _RULE_KEYS for r in rules.get(JUDGE_INGRESS, []))
    if not judge_ok:
        drift.append("ingress judging chain missing or altered")
    skeleton_ok = fwd_ok and judge_ok and good_maps == set(MAPS.values())
    if not skeleton_ok and fwd is not None:
        flush.append(FORWARD)
        del_chains.append(FORWARD)
    kept_sets: tuple[str, ...] = ()
    if not skeleton_ok:
        # Each element of the limit's sets counts a source's connections with the N of
        # the rule that made it (nft_connlimit's state is the element's). When the
        # kernel still has both rules as wanted, the sets stay and the skeleton leaves
        # them out (re-adding one is refused: libnftables cannot give the `dynamic`
        # flag in JSON), so a repair does not start every count again from 0.
        # Otherwise (another N, a rule altered or gone) they are made again with
        # their rules, and the counts start from 0.
        wanted = {expr for _comment, expr in canonical_rules(limit_rules(table))}
        if (table.conntrack_limit and len(kept_limits) == len(LIMIT_SETS)
                and wanted <= {expr for _comment, expr in kernel_fwd}):
            kept_sets = tuple(sorted(kept_limits))
        else:
            del_objects += [{"delete": {"set": ref(name=name)}} for name in kept_limits]
    if not skeleton_ok and judge is not None:
        # Emptied, not deleted: Admin chains may jump to it; the skeleton refills it.
        flush.append(JUDGE_INGRESS)

    # Stateful objects and flowtables: libnftables 1.0.6 cannot delete them all
    # (a ct timeout aborts it), so they go over raw netlink, after the prelude's
    # transaction has removed every rule that could use them.
    objects: list[tuple[str, str, int]] = []
    for kind, body in others:
        foreign.append(f"{kind} {body.get('name', body.get('handle'))}")
        objects.append((kind, str(body.get("name", "")), int(body.get("handle", 0))))

    drift += [f"foreign {what}" for what in foreign]
    prelude: list[Command] = [{"flush": {"chain": ref(name=n)}} for n in dict.fromkeys(flush)]
    prelude += del_entries
    prelude += [{"delete": {"chain": ref(name=n)}} for n in del_chains]
    prelude += del_objects
    return KernelTable(Ruleset(sets, chains, maps[INGRESS], maps[EGRESS]), skeleton_ok,
                       foreign, drift, prelude, table_ok, objects, kept_sets=kept_sets)


_SKELETON_CANON: dict[int, tuple[Canon, ...]] = {}


def _skeleton_canon(table: Table) -> tuple[Canon, ...]:
    """The base chain's rules, canonical, by connection limit (computed once each)."""
    found = _SKELETON_CANON.get(table.conntrack_limit)
    if found is None:
        found = _SKELETON_CANON[table.conntrack_limit] = canonical_rules(skeleton_rules(table))
    return found
