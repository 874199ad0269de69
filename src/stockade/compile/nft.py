"""Rendering the ruleset to nftables JSON (libnftables' schema), and reading it back.

The table (one `inet` table that stockade owns and nothing else):

    chain forward   hook forward, policy accept
        ct state established,related accept        conntrack first
        icmpv6 neighbour discovery accept          or IPv6 breaks on isolated pods
        ip saddr vmap @egress4 / ip6 saddr vmap @egress6
        ip daddr vmap @ingress4 / ip6 daddr vmap @ingress6
    chain e-<hash>  egress rules of one set of policies: match -> return, else drop
    chain i-<hash>  ingress rules: match -> accept, else drop
    sets s4-/s6-<hash> selector members, c4-/c6- ipBlocks, n4-/n6- named ports

Per packet: two verdict-map lookups and the rules of the policies that select
the two endpoints, whatever the number of endpoints and policies elsewhere.
Every rule carries a comment ending in a hash of its content, which is how a
read-back recognises a chain whose rules were edited behind stockade's back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from stockade.compile.ir import (
    ADDR,
    ADDR_PORT,
    EGRESS,
    INGRESS,
    NET,
    AddressSet,
    Chain,
    Element,
    Rule,
    Ruleset,
)
from stockade.compile.plan import Plan
from stockade.model.cidr import parse_cidr

FAMILY = "inet"
FORWARD = "forward"
SKELETON_VERSION = "stockade-2"
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

    def ref(self, **kw: Any) -> dict[str, Any]:
        return {"family": FAMILY, "table": self.name, **kw}


def _payload(proto: str, fld: str) -> dict[str, Any]:
    return {"payload": {"protocol": proto, "field": fld}}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def rule_digest(rule: Rule) -> str:
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
    if s.kind == ADDR_PORT:
        body["type"] = [_ADDR_TYPE[s.family], "inet_proto", "inet_service"]
    else:
        body["type"] = _ADDR_TYPE[s.family]
    if s.kind == NET:
        body["flags"] = ["interval"]
    if s.comment:
        body["comment"] = s.comment[:120]
    if s.elements:
        body["elem"] = [_element(s, e) for e in _sorted(s.elements)]
    return body


def _sorted(elements: Iterable[Element]) -> list[Element]:
    return sorted(elements, key=lambda e: (str(type(e)), e))


def render_rule_expr(rule: Rule, direction: str) -> list[dict[str, Any]]:
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


def render_chain(table: Table, chain: Chain) -> list[Command]:
    verdict = {"accept": None} if chain.direction == INGRESS else {"return": None}
    cmds: list[Command] = [{"add": {"chain": table.ref(name=chain.name)}}]
    for rule in chain.rules:
        tag = f"{rule.comment} #{rule_digest(rule)}"[-120:]
        cmds.append({"add": {"rule": table.ref(
            chain=chain.name, expr=[*render_rule_expr(rule, chain.direction), verdict],
            comment=tag)}})
    for expr, comment in table.deny_rules(chain):
        cmds.append({"add": {"rule": table.ref(chain=chain.name, expr=expr, comment=comment)}})
    return cmds


def render_skeleton(table: Table) -> list[Command]:
    """The table, the four verdict maps and the forward base chain."""
    cmds: list[Command] = [
        {"add": {"table": {"family": FAMILY, "name": table.name}}},
    ]
    for (_direction, fam), name in sorted(MAPS.items()):
        cmds.append({"add": {"map": table.ref(name=name, type=_ADDR_TYPE[fam], map="verdict")}})
    cmds.append({"add": {"chain": table.ref(name=FORWARD, type="filter", hook="forward",
                                            prio=table.priority, policy="accept")}})
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
        ([_match(_payload("icmpv6", "type"),
                 {"set": ["nd-neighbor-solicit", "nd-neighbor-advert"]}),
          {"accept": None}], "neighbour discovery"),
    ]
    for direction, fld in ((EGRESS, "saddr"), (INGRESS, "daddr")):
        for fam in (4, 6):
            rules.append(([{"vmap": {"key": _payload(_IP[fam], fld),
                                     "data": "@" + MAPS[(direction, fam)]}}],
                          f"{direction} {_IP[fam]}"))
    for expr, comment in rules:
        cmds.append({"add": {"rule": table.ref(chain=FORWARD, expr=expr,
                                               comment=f"{comment} #{SKELETON_VERSION}")}})
    return cmds


def _map_elem(addr: str, chain: str | None) -> Any:
    return [addr, {"jump": {"target": chain}}] if chain else addr


def render_plan(table: Table, p: Plan, *, skeleton: bool = False) -> list[Command]:
    """One transaction's commands, in an order that keeps every reference valid."""
    cmds: list[Command] = render_skeleton(table) if skeleton else []
    cmds += [{"add": {"set": render_set(table, s)}} for s in p.add_sets]
    for s, els in p.add_elements:
        if s.kind == NET:
            # Interval sets are rewritten whole: the kernel may split or join prefixes.
            cmds.append({"flush": {"set": table.ref(name=s.name)}})
            els = s.elements
        if els:
            cmds.append({"add": {"element": table.ref(
                name=s.name, elem=[_element(s, e) for e in _sorted(els)])}})
    for c in p.add_chains:
        cmds += render_chain(table, c)
    for c in p.replace_chains:
        cmds.append({"flush": {"chain": table.ref(name=c.name)}})
        cmds += render_chain(table, c)
    by_map: dict[str, list[Any]] = {}
    for direction, fam, addr in p.del_map:
        by_map.setdefault(MAPS[(direction, fam)], []).append(_map_elem(addr, None))
    for name, elems in sorted(by_map.items()):
        cmds.append({"delete": {"element": table.ref(name=name, elem=elems)}})
    by_map = {}
    for (direction, fam, addr), chain in p.set_map:
        by_map.setdefault(MAPS[(direction, fam)], []).append(_map_elem(addr, chain))
    for name, elems in sorted(by_map.items()):
        cmds.append({"add": {"element": table.ref(name=name, elem=elems)}})
    for name in p.del_chains:
        cmds.append({"flush": {"chain": table.ref(name=name)}})
        cmds.append({"delete": {"chain": table.ref(name=name)}})
    for s, els in p.del_elements:
        if s.kind != NET and els:
            cmds.append({"delete": {"element": table.ref(
                name=s.name, elem=[_element(s, e) for e in _sorted(els)])}})
    cmds += [{"delete": {"set": table.ref(name=n)}} for n in p.del_sets]
    return cmds


# ---- reading back ---------------------------------------------------------------


@dataclass
class KernelTable:
    """What the kernel holds, as far as stockade reads it."""

    ruleset: Ruleset
    skeleton_ok: bool
    # chain name -> comments of its rules, in order (content digests)
    rule_tags: dict[str, list[str]] = field(default_factory=dict)
    foreign: list[str] = field(default_factory=list)


def _read_element(kind: str, family: int, raw: Any) -> Element | None:
    if isinstance(raw, dict) and "elem" in raw:
        raw = raw["elem"]["val"] if isinstance(raw["elem"], dict) else raw["elem"]
    if kind == ADDR_PORT:
        if not isinstance(raw, dict) or "concat" not in raw:
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


def _kind_of(name: str) -> str:
    return {"s": ADDR, "c": NET, "n": ADDR_PORT}.get(name[:1], "")


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
    return Ruleset(sets, rs.chains, rs.ingress, rs.egress)


def parse_kernel(doc: Mapping[str, Any], table: Table,
                 expected_chains: Mapping[str, Chain]) -> KernelTable:
    """A Ruleset from `nft -j list table`; chains are known by name (content hash).

    A chain's rules are not parsed back into the IR: a chain whose name is in
    `expected_chains` and whose rule comments carry the expected digests is that
    chain. Anything else in the table is reported as foreign.
    """
    sets: dict[str, AddressSet] = {}
    chains: dict[str, Chain] = {}
    maps: dict[str, dict[str, str]] = {INGRESS: {}, EGRESS: {}}
    tags: dict[str, list[str]] = {}
    forward_tags: list[str] = []
    foreign: list[str] = []
    have_maps: set[str] = set()
    for item in doc.get("nftables", []):
        if "set" in item:
            s = item["set"]
            name = s["name"]
            kind = _kind_of(name)
            fam = 6 if "ipv6_addr" in str(s.get("type")) else 4
            if not kind:
                foreign.append(f"set {name}")
                continue
            els = [_read_element(kind, fam, e) for e in s.get("elem", [])]
            elements = frozenset(e for e in els if e is not None)
            if kind == NET:
                elements = _canonical_net(elements)
            sets[name] = AddressSet(name, fam, kind, elements, s.get("comment", ""))
        elif "map" in item:
            m = item["map"]
            direction = next((d for (d, _), n in MAPS.items() if n == m["name"]), None)
            if direction is None:
                foreign.append(f"map {m['name']}")
                continue
            have_maps.add(m["name"])
            for key, verdict in m.get("elem", []):
                target = verdict.get("jump", {}).get("target") if isinstance(verdict,
                                                                              dict) else None
                if isinstance(key, str) and target:
                    maps[direction][key] = target
        elif "chain" in item:
            c = item["chain"]
            name = c["name"]
            if name == FORWARD:
                continue
            if name in expected_chains:
                chains[name] = expected_chains[name]
            elif name[:2] in ("i-", "e-"):
                chains[name] = Chain(name, INGRESS if name[0] == "i" else EGRESS, ())
            else:
                foreign.append(f"chain {name}")
            tags.setdefault(name, [])
        elif "rule" in item:
            r = item["rule"]
            comment = r.get("comment", "")
            if r["chain"] == FORWARD:
                forward_tags.append(comment)
            else:
                tags.setdefault(r["chain"], []).append(comment)
    expected_forward = [r["add"]["rule"].get("comment", "") for r in render_skeleton(table)
                        if "rule" in r["add"]]
    skeleton_ok = forward_tags == expected_forward and have_maps == set(MAPS.values())
    # A chain whose rules differ from what its name promises is not that chain.
    for name, chain in list(chains.items()):
        want = [f"{r.comment} #{rule_digest(r)}"[-120:] for r in chain.rules]
        want += [comment for _, comment in table.deny_rules(chain)]
        if not chain.rules or tags.get(name) != want:
            chains[name] = Chain(name, chain.direction, (), "tampered")
    return KernelTable(Ruleset(sets, chains, maps[INGRESS], maps[EGRESS]), skeleton_ok,
                       tags, foreign)
