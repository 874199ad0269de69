"""What an address set stands for, as data: the definition of its members.

A set's *spec* names the set (by a hash of its definition) and says which
endpoints belong to it and what each contributes (its addresses of one family,
or (address, protocol, port) triples for a named port). The full compiler
answers specs with the label index; the incremental compiler asks, endpoint by
endpoint, whether one belongs. Both read the same specs, so both build the
same sets.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from stockade.compile.ir import ADDR, ADDR_PORT, NET, Element, content_name
from stockade.engine.match import ip_block_matches
from stockade.model.cidr import is_canonical_ipv4, parse_cidr, parse_ip
from stockade.model.cluster import Endpoint
from stockade.model.labels import Labels
from stockade.model.policy import IPBlock, Peer
from stockade.model.selector import Selector

FAMILIES = (4, 6)


@dataclass(frozen=True)
class PeerMembers:
    """The pods a selector peer of a policy in `namespace` stands for."""

    namespace: str
    peer: Peer

    def selects(self, ep: Endpoint, namespace_labels: Mapping[str, Labels]) -> bool:
        if self.peer.namespace_selector is None:
            if ep.namespace != self.namespace:
                return False
        else:
            labels = namespace_labels.get(ep.namespace)
            if labels is None or not self.peer.namespace_selector.matches(labels):
                return False
        return self.peer.pod_selector is None or self.peer.pod_selector.matches(ep.labels)


@dataclass(frozen=True)
class PolicyTargets:
    """The pods a policy's podSelector selects (the destinations of its ingress)."""

    namespace: str
    selector: Selector

    def selects(self, ep: Endpoint, namespace_labels: Mapping[str, Labels]) -> bool:
        return ep.namespace == self.namespace and self.selector.matches(ep.labels)


@dataclass(frozen=True)
class AllEndpoints:
    def selects(self, ep: Endpoint, namespace_labels: Mapping[str, Labels]) -> bool:
        return True


@dataclass(frozen=True)
class BlockEndpoints:
    """The pods with an address inside an ipBlock; only those addresses count."""

    block: IPBlock

    def selects(self, ep: Endpoint, namespace_labels: Mapping[str, Labels]) -> bool:
        return any(ip_block_matches(self.block, ip) for ip in ep.ips)


Candidates = PeerMembers | PolicyTargets | AllEndpoints | BlockEndpoints


def peer_members(namespace: str, peer: Peer) -> PeerMembers:
    """The members of a selector peer of a policy in `namespace`.

    A peer with a namespaceSelector stands for the same pods whatever namespace
    its policy is in, so its set is one for the whole cluster (namespace "").
    DNS and monitoring peers recur in every namespace: one set each, not one per
    namespace (bench/realistic.py, 100,000 pods and 10,000 policies: 4.6 M set
    elements before, 0.33 M with it).
    """
    return PeerMembers("" if peer.namespace_selector is not None else namespace, peer)


@functools.lru_cache(maxsize=1 << 18)
def address(text: str) -> tuple[int, str] | None:
    """An endpoint IP as (family, canonical text); cached, as every set asks again.

    Canonical dotted IPv4 (what pods have) is itself (~1 µs); anything else
    goes through the legacy-lenient `parse_ip` (~5 µs, more past its cache).
    """
    if is_canonical_ipv4(text):
        return 4, text
    a = parse_ip(text)
    return (a.version, str(a)) if a is not None else None


@dataclass(frozen=True)
class SetSpec:
    name: str
    family: int
    kind: str
    comment: str
    candidates: Candidates | None = None  # None: a fixed set (an ipBlock)
    port: tuple[str, str] | None = None  # (name, protocol) of a named-port set
    fixed: frozenset[Element] = frozenset()

    def contributes(self, ep: Endpoint) -> list[Element]:
        """The elements an endpoint adds when it belongs to the set."""
        out: list[Element] = []
        number = None
        if self.port is not None:
            number = ep.resolve_port(*self.port)
            if number is None:
                return out
        for ip in ep.ips:
            a = address(ip)
            if a is None or a[0] != self.family:
                continue
            if isinstance(self.candidates, BlockEndpoints) and not ip_block_matches(
                    self.candidates.block, ip):
                continue
            if number is not None and self.port is not None:
                out.append((a[1], self.port[1].lower(), number))
            else:
                out.append(a[1])
        return out


def selector_specs(namespace: str, peer: Peer) -> dict[int, SetSpec]:
    """The sets of a selector peer of a policy in `namespace` (one per family).
    Callers must not change the dict."""
    return member_specs(peer_members(namespace, peer))


@functools.lru_cache(maxsize=1 << 16)
def member_specs(cand: PeerMembers) -> dict[int, SetSpec]:
    """`selector_specs`, cached by the members: peers recur in many rules, and a peer
    with a namespaceSelector stands for the same pods from every namespace (at
    Antrea's shape 114,000 asks from 25,000 namespaces are 45,000 sets' specs)."""
    peer = cand.peer
    text, shown = peer_text(peer)
    comment = f"{cand.namespace}: {shown}" if cand.namespace else shown
    inner = f"({cand.namespace!r}, {text})"  # repr((cand.namespace, peer))
    return {fam: SetSpec(_content_name(f"s{fam}-", ADDR, fam, inner), fam, ADDR, comment, cand)
            for fam in FAMILIES}


@functools.lru_cache(maxsize=1 << 14)
def peer_text(peer: Peer) -> tuple[str, str]:
    """A peer's repr and rendering, once: the same peer recurs in many namespaces
    (`app=web` in each of 25,000), each its own set."""
    return repr(peer), peer.render()


def _content_name(prefix: str, kind: str, family: int, inner_repr: str) -> str:
    """`content_name(prefix, kind, family, inner)` given `repr(inner)`: the same name."""
    text = f"({kind!r}, {family!r}, {inner_repr})"
    return f"{prefix}{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def block_spec(block: IPBlock, networks: list[str]) -> SetSpec | None:
    net = parse_cidr(block.cidr)
    if net is None:
        return None
    return SetSpec(content_name(f"c{net.version}-", NET, net.version,
                                (block.cidr, block.except_)),
                   net.version, NET, f"ipBlock {block.cidr}", None, None, frozenset(networks))


def named_specs(candidates: Candidates, name: str, protocol: str,
                comment: str) -> dict[int, SetSpec]:
    if isinstance(candidates, PolicyTargets):
        key: object = ("in", candidates.namespace, candidates.selector)
    elif isinstance(candidates, PeerMembers):
        key = ("peer", candidates.namespace, candidates.peer)
    elif isinstance(candidates, BlockEndpoints):
        key = ("block", candidates.block)
    else:
        key = ("all",)
    inner = repr((key, name, protocol))
    comment = f"{comment} port {name}/{protocol}"
    return {fam: SetSpec(_content_name(f"n{fam}-", ADDR_PORT, fam, inner), fam, ADDR_PORT,
                         comment, candidates, (name, protocol))
            for fam in FAMILIES}
