"""The backend-neutral ruleset every datapath renders (nftables, iptables+ipset, eBPF).

Shape (per packet, after conntrack has accepted established/related traffic):

1. the source address looks up the *egress* map; if present, that chain must
   allow the packet (a rule matches) or it is dropped;
2. the destination address looks up the *ingress* map; likewise.

An address in neither map belongs to no isolated endpoint and is unrestricted.

ClusterNetworkPolicy tiers live in the same chains. A chain of a tier (`tier`
set) holds the ordered rules of the policies of that tier selecting its
endpoints, each with an action: `allow` (this side passes), `deny` (dropped) or
`pass` (continue in `next`); a packet no rule matches continues in `next` too,
and with no `next` the side passes. A NetworkPolicy chain (no `tier`) allows
on a match and drops otherwise, as always. An endpoint's map entry is the first
of its chains: Admin, then NetworkPolicy (which is final), else Baseline.

Guards (`Ruleset.guards`) are not policy: each binds a pod's bridge port (the host
side of its veth) to its addresses and MAC, so that what leaves the port claims
only them (IP sources, ARP senders, neighbour advertisements' targets) and a pod
cannot be judged as another by forging its address. A datapath checks them before
anything else, conntrack included.

An Admin chain is shared by every endpoint the same Admin policies select,
whatever comes after it: it is not entered but *called* by a small link chain
(`calls`, no rules of its own) whose `next` is that endpoint's NetworkPolicy or
Baseline chain. So a thousand policy sets under one Admin tier cost one copy of
its rules, not a thousand.
Chains are shared by every endpoint whose selecting policies are the same. A
NetworkPolicy chain is named by a hash of its rules; a tier chain by its
policies' subjects, so a priority change or an edited rule rewrites it in place
and moves no endpoint (see compile/tiers.py). Address sets are named by a hash of what defines
them (a selector in a namespace, an ipBlock, a named port), not of their members,
so a membership change is a change of set elements and nothing else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

ADDR = "addr"  # addresses
NET = "net"  # CIDRs (interval set)
ADDR_PORT = "addr_port"  # (address, protocol, port) triples: named ports

INGRESS = "ingress"
EGRESS = "egress"

# What a matching rule does: the side passes, is dropped, or goes on in `Chain.next`.
ALLOW = "allow"
DENY = "deny"
PASS = "pass"  # noqa: S105 - an action, not a password

Element = str | tuple[str, str, int]


def content_name(prefix: str, *parts: object) -> str:
    """A deterministic short name from content: same content, same name."""
    digest = hashlib.sha256(repr(parts).encode()).hexdigest()[:12]
    return f"{prefix}{digest}"


@dataclass(frozen=True)
class AddressSet:
    name: str
    family: int  # 4 or 6
    kind: str  # ADDR, NET or ADDR_PORT
    elements: frozenset[Element]
    comment: str = field(default="", compare=False)


@dataclass(frozen=True)
class ChainRule:
    """Allow a packet when every given condition holds; None means no condition.

    `peer_set` holds the other side's address (the source for ingress, the
    destination for egress); `named_set` holds (destination, protocol, port)
    triples; `protocol` with empty `ports` is every port of that protocol.

    `keep`: a tier's Deny whose ClusterNetworkPolicy is annotated
    `stockade.io/existing-connections: keep`, so a connection it would now deny
    is not cut (a NetworkPolicy chain says so as a whole: `Chain.keep`). Part of
    the rule's identity; only datapaths that cut connections themselves (eBPF)
    render it.
    """

    family: int | None = None
    peer_set: str | None = None
    named_set: str | None = None
    protocol: str | None = None
    ports: tuple[tuple[int, int], ...] = ()
    comment: str = field(default="", compare=False)
    action: str = ALLOW
    keep: bool = False


@dataclass(frozen=True)
class Chain:
    """The rules of one endpoint-direction's policy set.

    `keep`: a policy of the set is annotated `stockade.io/existing-connections:
    keep`, so a connection this side would now deny is not cut when the policy
    changes (see `agent.revoke`). It is part of the chain's identity (and name),
    but only datapaths that cut connections themselves (eBPF) render it.
    """

    name: str
    direction: str
    rules: tuple[ChainRule, ...]
    comment: str = field(default="", compare=False)
    keep: bool = False
    # A ClusterNetworkPolicy tier's chain (`Admin`, `Baseline`), and where its
    # `pass` and its end go: another chain, or (None) the side passes.
    tier: str = ""
    next: str | None = None
    # A link chain: the Admin chain judged first (its allow or deny decides; a pass
    # or no match goes on in `next`).
    calls: str | None = None

    @property
    def final(self) -> bool:
        """A NetworkPolicy chain: what no rule allows is dropped."""
        return not self.tier


@dataclass(frozen=True)
class Guard:
    """What a pod's bridge port lets out: frames from `mac` (any, when empty), IP packets
    from `addresses`, ARP and neighbour advertisements claiming only those, and IPv6's
    link-local and unspecified-source neighbour discovery. Nothing else: no other
    ethertype, no VLAN tags."""

    addresses: tuple[str, ...]  # sorted; at most one per family
    mac: str = ""  # lowercase, colon-separated


@dataclass(frozen=True)
class Ruleset:
    sets: Mapping[str, AddressSet] = field(default_factory=dict)
    chains: Mapping[str, Chain] = field(default_factory=dict)
    # endpoint address -> chain name
    ingress: Mapping[str, str] = field(default_factory=dict)
    egress: Mapping[str, str] = field(default_factory=dict)
    # bridge port (host-side interface name) -> what may leave it
    guards: Mapping[str, Guard] = field(default_factory=dict)

    def verdict_map(self, direction: str) -> Mapping[str, str]:
        return self.ingress if direction == INGRESS else self.egress

    def counts(self) -> dict[str, int]:
        return {
            "sets": len(self.sets),
            "set_elements": sum(len(s.elements) for s in self.sets.values()),
            "chains": len(self.chains),
            "rules": sum(len(c.rules) for c in self.chains.values()),
            "ingress_entries": len(self.ingress),
            "egress_entries": len(self.egress),
            "guarded_ports": len(self.guards),
        }


def ruleset_data(rs: Ruleset) -> dict[str, object]:
    """The ruleset as plain JSON data (`stockade compile -o json`), in a stable order."""

    def element(e: Element) -> object:
        return e if isinstance(e, str) else list(e)

    return {
        "counts": rs.counts(),
        "sets": {n: {"family": s.family, "kind": s.kind, "comment": s.comment,
                     "elements": [element(e) for e in sorted(s.elements, key=_element_key)]}
                 for n, s in sorted(rs.sets.items())},
        "chains": {n: {"direction": c.direction, "policies": c.comment,
                       **({"keep": True} if c.keep else {}),
                       **({"tier": c.tier, "next": c.next} if c.tier else {}),
                       **({"calls": c.calls} if c.calls else {}),
                       "rules": [{k: v for k, v in (
                           ("family", r.family), ("peer_set", r.peer_set),
                           ("named_set", r.named_set), ("protocol", r.protocol),
                           ("ports", [list(p) for p in r.ports]), ("comment", r.comment),
                           ("action", r.action if c.tier else None),
                           ("keep", r.keep or None))
                                  if v not in (None, [], "")} for r in c.rules]}
                   for n, c in sorted(rs.chains.items())},
        "ingress": dict(sorted(rs.ingress.items())),
        "egress": dict(sorted(rs.egress.items())),
        "guards": {port: {"addresses": list(g.addresses), **({"mac": g.mac} if g.mac else {})}
                   for port, g in sorted(rs.guards.items())},
    }


def guard_of(addresses: Iterable[str], mac: str = "") -> Guard:
    return Guard(tuple(sorted(set(addresses))), mac)


def _element_key(e: Element) -> tuple[str, Element]:
    return (str(type(e)), e)
