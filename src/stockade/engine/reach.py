"""Reachability of every pair at once, as bitsets (the fast path of `matrix` and `diff`).

For one port and protocol, each endpoint gets two bitsets over endpoint
indexes: the sources its ingress admits and the destinations its egress admits.
A rule's peers become bitsets once per peer (cached), policy sets are shared
by identities, so the cost is policy sets x rules x (N-bit operations), never
pods x pods x policies. `allowed(s, d)` is then two bit tests. It agrees with
the reference evaluator on every pair (a property test holds it to that).
"""

from __future__ import annotations

from dataclasses import dataclass

from stockade.engine.match import ip_block_matches, port_matches
from stockade.engine.resolve import PolicySet, Resolution, resolve
from stockade.model.cidr import parse_ip
from stockade.model.cluster import Cluster, Endpoint
from stockade.model.policy import EGRESS, INGRESS, IPBlock, NetworkPolicy, Peer, Rule


def _family(ep: Endpoint) -> int | None:
    """The family of a destination's address; None for one without (a workload, a Pod
    without an IP): a source then connects from its first address, as the evaluator
    takes it."""
    if not ep.ips:
        return None
    a = parse_ip(ep.ips[0])
    return a.version if a is not None else 4


def _first_ip(ep: Endpoint) -> str:
    """A pod's first address; "" for a workload, which has none (no ipBlock matches it)."""
    return ep.ips[0] if ep.ips else ""


def _source_ip(ep: Endpoint, family: int) -> str:
    """The address a pod connects from towards a destination of that family."""
    return ep.ip_for_family(family) or _first_ip(ep)


@dataclass(frozen=True)
class Reach:
    endpoints: tuple[Endpoint, ...]
    ingress_ok: tuple[int, ...]  # per destination: bitset of admitted sources
    egress_ok: tuple[int, ...]  # per source: bitset of admitted destinations

    def allowed(self, s: int, d: int) -> bool:
        if s == d:
            return True
        return bool((self.ingress_ok[d] >> s) & 1 and (self.egress_ok[s] >> d) & 1)

    def row(self, s: int) -> list[bool]:
        return [self.allowed(s, d) for d in range(len(self.endpoints))]


class _Bits:
    """Bitsets of endpoints, cached per peer and per port question."""

    def __init__(self, res: Resolution) -> None:
        self.res = res
        self.eps = res.index.cluster.endpoints
        self.position = {id(ep): i for i, ep in enumerate(self.eps)}
        self.all = (1 << len(self.eps)) - 1
        self._of_identity: list[int] = []
        for members in res.index.members:
            bits = 0
            for ep in members:
                bits |= 1 << self.position[id(ep)]
            self._of_identity.append(bits)
        self._peer: dict[tuple[str, Peer, int], int] = {}
        self._named: dict[tuple[str, str, int], int] = {}

    def peer(self, policy: NetworkPolicy, peer: Peer, family: int | None) -> int:
        """Endpoints a peer admits; for an ipBlock, by the address used in `family`."""
        key = (policy.namespace, peer, family or 0)
        bits = self._peer.get(key)
        if bits is None:
            bits = 0
            if peer.ip_block is not None:
                bits = self._block(peer.ip_block, family)
            else:
                for ident in self.res.index.peer_identities(policy.namespace, peer):
                    bits |= self._of_identity[ident]
            self._peer[key] = bits
        return bits

    def _block(self, block: IPBlock, family: int | None) -> int:
        bits = 0
        for i, ep in enumerate(self.eps):
            ip = _source_ip(ep, family) if family else _first_ip(ep)
            if ip_block_matches(block, ip):
                bits |= 1 << i
        return bits

    def serving(self, name: str, protocol: str, port: int) -> int:
        key = (name, protocol, port)
        bits = self._named.get(key)
        if bits is None:
            bits = 0
            for i, ep in enumerate(self.eps):
                if ep.resolve_port(name, protocol) == port:
                    bits |= 1 << i
            self._named[key] = bits
        return bits


def _rule_peers(bits: _Bits, policy: NetworkPolicy, rule: Rule, family: int | None) -> int:
    if not rule.peers:
        return bits.all
    out = 0
    for peer in rule.peers:
        out |= bits.peer(policy, peer, family)
    return out


def _ingress(bits: _Bits, ps: PolicySet, dst: Endpoint, port: int, protocol: str) -> int:
    family = _family(dst)
    out = 0
    for policy, _, rule in ps.rules():
        if rule.ports and not any(port_matches(p, port, protocol, dst) for p in rule.ports):
            continue
        out |= _rule_peers(bits, policy, rule, family)
        if out == bits.all:
            break
    return out


def _egress(bits: _Bits, ps: PolicySet, port: int, protocol: str) -> int:
    out = 0
    for policy, _, rule in ps.rules():
        ports = bits.all if not rule.ports else 0
        for p in rule.ports:
            if isinstance(p.port, str):
                if p.protocol == protocol:
                    ports |= bits.serving(p.port, p.protocol, port)
            elif port_matches(p, port, protocol, None):
                ports = bits.all
                break
        if ports:
            out |= _rule_peers(bits, policy, rule, None) & ports
    return out


def reachability(cluster: Cluster, port: int, protocol: str,
                 res: Resolution | None = None) -> Reach:
    """Every pair's verdict for one numeric port and protocol."""
    res = res or resolve(cluster)
    bits = _Bits(res)
    index = res.index
    ingress: list[int] = []
    egress: list[int] = []
    in_cache: dict[tuple[PolicySet, int | None, tuple[object, ...]], int] = {}
    out_cache: dict[PolicySet, int] = {}
    for ep in bits.eps:
        ident = index.identity_of_existing(ep)
        ps = res.policy_set(ident, INGRESS)
        if ps is None:
            ingress.append(bits.all)
        else:
            key = (ps, _family(ep), ep.ports)
            if key not in in_cache:
                in_cache[key] = _ingress(bits, ps, ep, port, protocol)
            ingress.append(in_cache[key])
        ps = res.policy_set(ident, EGRESS)
        if ps is None:
            egress.append(bits.all)
        else:
            if ps not in out_cache:
                out_cache[ps] = _egress(bits, ps, port, protocol)
            egress.append(out_cache[ps])
    return Reach(tuple(bits.eps), tuple(ingress), tuple(egress))
