"""A Python interpreter of the backend-neutral ruleset.

It states what every datapath must do with a packet, and lets tests check that
the compiled ruleset agrees with the reference evaluator on every flow without a
kernel in the loop.
"""

from __future__ import annotations

from functools import lru_cache

from stockade.compile.ir import (
    ADDR,
    ADDR_PORT,
    ALLOW,
    EGRESS,
    INGRESS,
    NET,
    PASS,
    AddressSet,
    ChainRule,
    Ruleset,
)
from stockade.model.cidr import parse_cidr, parse_ip


@lru_cache(maxsize=4096)
def _networks(s: AddressSet) -> tuple[object, ...]:
    return tuple(n for e in s.elements if isinstance(e, str) and (n := parse_cidr(e)))


def _in_set(rs: Ruleset, name: str, addr: str) -> bool:
    s = rs.sets[name]
    a = parse_ip(addr)
    if a is None or a.version != s.family:
        return False
    if s.kind == ADDR:
        return str(a) in s.elements
    if s.kind == NET:
        return any(a in n for n in _networks(s))  # type: ignore[operator]
    return False


def rule_matches(rs: Ruleset, rule: ChainRule, peer: str, dst: str, protocol: str,
                 port: int) -> bool:
    a = parse_ip(dst)
    if rule.family is not None and (a is None or a.version != rule.family):
        return False
    if rule.peer_set is not None and not _in_set(rs, rule.peer_set, peer):
        return False
    if rule.named_set is not None:
        s = rs.sets[rule.named_set]
        assert s.kind == ADDR_PORT
        if a is None or (str(a), protocol.lower(), port) not in s.elements:
            return False
    if rule.protocol is not None and rule.protocol != protocol:
        return False
    return not rule.ports or any(lo <= port <= hi for lo, hi in rule.ports)


def chain_allows(rs: Ruleset, chain: str, peer: str, dst: str, protocol: str,
                 port: int) -> bool:
    """Whether a side passes from `chain` on: a NetworkPolicy chain allows on a match
    and drops otherwise; a tier's chain acts on its first matching rule, and a `pass`
    or no match goes on in its `next` chain (none: the side passes)."""
    name: str | None = chain
    while name is not None:
        c = rs.chains[name]
        if c.calls is not None:  # a link: the shared Admin chain decides, or goes on here
            called = rs.chains[c.calls]
            hit = next((r for r in called.rules
                        if rule_matches(rs, r, peer, dst, protocol, port)), None)
            if hit is not None and hit.action != PASS:
                return hit.action == ALLOW
        hit = next((r for r in c.rules if rule_matches(rs, r, peer, dst, protocol, port)),
                   None)
        if c.final:
            return hit is not None
        if hit is not None and hit.action != PASS:
            return hit.action == ALLOW
        name = c.next
    return True


def allows(rs: Ruleset, src: str, dst: str, protocol: str, port: int) -> bool:
    """Whether a new connection passes: the source's egress, then the destination's ingress."""
    s, d = parse_ip(src), parse_ip(dst)
    src_key = str(s) if s else src
    dst_key = str(d) if d else dst
    if src_key == dst_key:
        return True
    egress = rs.egress.get(src_key)
    if egress is not None and not chain_allows(rs, egress, dst_key, dst_key, protocol, port):
        return False
    ingress = rs.ingress.get(dst_key)
    return ingress is None or chain_allows(rs, ingress, src_key, dst_key, protocol, port)


__all__ = ["EGRESS", "INGRESS", "allows", "chain_allows", "rule_matches"]
