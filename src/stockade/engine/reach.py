"""Reachability of every pair at once, as bitsets (the fast path of `matrix` and `diff`).

For one port and protocol, each endpoint gets two bitsets over endpoint
indexes: the sources its ingress admits and the destinations its egress admits.
A rule's peers become bitsets once per peer (cached), policy sets are shared
by identities, so the cost is policy sets x rules x (N-bit operations), never
pods x pods x policies. `allowed(s, d)` is then two bit tests. It agrees with
the reference evaluator on every pair (a property test holds it to that).

With ClusterNetworkPolicies, each side walks its tiers as masks: the Admin rules
of the policies selecting the pod, in precedence order, each taking the
still-undecided part of its matches (accepted, denied, or passed on); then
NetworkPolicy for what the Admin tier left (if it isolates the pod), else the
Baseline rules likewise, and the default allows the rest. The walk is cached per
(identity, the policy sets), so it costs tiers x rules x (N-bit operations) per
distinct combination, never per pod pair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from stockade.engine.match import ip_block_matches, port_matches
from stockade.engine.resolve import PolicySet, Resolution, resolve
from stockade.engine.tiers import TierIndex
from stockade.engine.tiers import port_matches as cnp_port_matches
from stockade.model.cidr import parse_cidr, parse_ip
from stockade.model.cluster import Cluster, Endpoint
from stockade.model.cnp import (
    ACCEPT,
    ADMIN,
    BASELINE,
    DENY,
    NAMESPACES,
    NETWORKS,
    PODS,
    ClusterNetworkPolicy,
    CnpPeer,
    CnpRule,
)
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

    def identity_bits(self, ident: int) -> int:
        return self._of_identity[ident]

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


class _Tiers:
    """Each side's walk of the ClusterNetworkPolicy tiers, as bitsets of the other ends.

    A rule's bitset is the other ends its peers match (selectors by identity,
    `networks` by the address used towards them) intersected with its ports;
    walking the rules in precedence order, each takes only what is still
    undecided, so the first matching rule decides every other end.
    """

    def __init__(self, bits: _Bits, tiers: TierIndex) -> None:
        self.bits = bits
        self.tiers = tiers
        self._peer: dict[tuple[CnpPeer, str, int], int] = {}
        self._named: dict[tuple[str, str, int], int] = {}

    def peer(self, peer: CnpPeer, action: str, family: int | None) -> int:
        """The endpoints a peer matches; `networks` by the address used in `family`
        (None: each endpoint's first address, as a destination)."""
        key = (peer, action if peer.kind not in (NAMESPACES, PODS, NETWORKS) else "",
               family or 0 if peer.kind == NETWORKS else 0)
        found = self._peer.get(key)
        if found is None:
            found = 0
            index = self.bits.res.index
            if peer.kind in (NAMESPACES, PODS):
                namespaces = index.namespaces_matching(peer.namespace_selector)
                selector = peer.pod_selector if peer.kind == PODS else None
                for ident in index.pods_matching(namespaces, selector):
                    found |= self.bits.identity_bits(ident)
            elif peer.kind == NETWORKS:
                nets = [n for text in peer.networks if (n := parse_cidr(text)) is not None]
                for i, ep in enumerate(self.bits.eps):
                    ip = _source_ip(ep, family) if family else _first_ip(ep)
                    addr = parse_ip(ip) if ip else None
                    if addr is not None and any(n.version == addr.version and addr in n
                                                for n in nets):
                        found |= 1 << i
            elif action != ACCEPT:
                found = self.bits.all  # a peer stockade cannot read fails closed
            self._peer[key] = found
        return found

    def peers(self, rule: CnpRule, family: int | None) -> int:
        out = 0
        for peer in rule.peers:
            out |= self.peer(peer, rule.action, family)
        return out

    def serving(self, name: str, protocol: str, port: int) -> int:
        """Destinations whose container port `name` is `port` of `protocol`."""
        key = (name, protocol, port)
        found = self._named.get(key)
        if found is None:
            found = 0
            for i, ep in enumerate(self.bits.eps):
                if any(p.name == name and p.port == port and p.protocol == protocol
                       for p in ep.ports):
                    found |= 1 << i
            self._named[key] = found
        return found

    def egress_rule(self, rule: CnpRule, port: int, protocol: str) -> int:
        """The destinations an egress rule matches (a named port is the destination's)."""
        if rule.ports is None:
            ports = self.bits.all
        else:
            ports = 0
            for entry in rule.ports:
                if entry.name:
                    ports |= self.serving(entry.name, protocol, port)
                elif cnp_port_matches(entry, port, protocol, None):
                    ports = self.bits.all
                    break
        return self.peers(rule, None) & ports if ports else 0

    def ingress_rule(self, rule: CnpRule, dst: Endpoint, port: int, protocol: str) -> int:
        """The sources an ingress rule of `dst` matches."""
        if rule.ports is not None and not any(cnp_port_matches(e, port, protocol, dst)
                                              for e in rule.ports):
            return 0
        return self.peers(rule, _family(dst))

    def walk(self, policies: tuple[ClusterNetworkPolicy, ...], direction: str,
             matched: Callable[[CnpRule], int]) -> tuple[int, int]:
        """(accepted, denied) by the first matching rule of a tier; the rest is
        passed on or unmatched."""
        undecided = self.bits.all
        accepted = denied = 0
        for policy in policies:
            for rule in policy.rules(direction):
                hit = matched(rule) & undecided
                if not hit:
                    continue
                if rule.action == ACCEPT:
                    accepted |= hit
                elif rule.action == DENY:
                    denied |= hit
                undecided &= ~hit
                if not undecided:
                    return accepted, denied
        return accepted, denied

    def side(self, subject: Endpoint, direction: str, isolated: int | None,
             matched: Callable[[CnpRule], int]) -> int:
        """The other ends one side admits: Admin, then NetworkPolicy (`isolated`: what
        it admits, when it isolates the pod) or Baseline, then the default."""
        admin = self.tiers.selecting(ADMIN, subject, direction)
        accepted, denied = self.walk(admin, direction, matched) if admin else (0, 0)
        rest = self.bits.all & ~(accepted | denied)
        if isolated is not None:
            return accepted | (isolated & rest)
        baseline = self.tiers.selecting(BASELINE, subject, direction)
        _, refused = self.walk(baseline, direction, matched) if baseline else (0, 0)
        return accepted | (rest & ~refused)

    def key(self, subject: Endpoint, direction: str) -> tuple[int, ...]:
        """What the tiers of a side depend on besides the probe: the policies selecting it."""
        return tuple(id(p) for tier in (ADMIN, BASELINE)
                     for p in self.tiers.selecting(tier, subject, direction))


def reachability(cluster: Cluster, port: int, protocol: str,
                 res: Resolution | None = None) -> Reach:
    """Every pair's verdict for one numeric port and protocol."""
    res = res or resolve(cluster)
    bits = _Bits(res)
    if cluster.cluster_policies:
        return _tiered(cluster, bits, port, protocol)
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


def _tiered(cluster: Cluster, bits: _Bits, port: int, protocol: str) -> Reach:
    """`reachability` through the tiers of the cluster's ClusterNetworkPolicies."""
    res = bits.res
    tiers = _Tiers(bits, TierIndex(cluster.cluster_policies, res.index.namespace_labels))
    ingress: list[int] = []
    egress: list[int] = []
    in_cache: dict[object, int] = {}
    out_cache: dict[object, int] = {}
    for ep in bits.eps:
        ident = res.index.identity_of_existing(ep)
        ps = res.policy_set(ident, INGRESS)
        key: object = (ps, tiers.key(ep, INGRESS), _family(ep), ep.ports)
        found = in_cache.get(key)
        if found is None:
            found = tiers.side(ep, INGRESS,
                               None if ps is None else _ingress(bits, ps, ep, port, protocol),
                               partial(tiers.ingress_rule, dst=ep, port=port, protocol=protocol))
            in_cache[key] = found
        ingress.append(found)
        ps = res.policy_set(ident, EGRESS)
        key = (ps, tiers.key(ep, EGRESS))
        found = out_cache.get(key)
        if found is None:
            found = tiers.side(ep, EGRESS,
                               None if ps is None else _egress(bits, ps, port, protocol),
                               partial(tiers.egress_rule, port=port, protocol=protocol))
            out_cache[key] = found
        egress.append(found)
    return Reach(tuple(bits.eps), tuple(ingress), tuple(egress))
