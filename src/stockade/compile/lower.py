"""Lowering a resolved cluster to the backend-neutral ruleset (pure)."""

from __future__ import annotations

from collections.abc import Iterable

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
    content_name,
)
from stockade.engine.resolve import PolicySet, Resolution, ResolvedPeer, resolve
from stockade.model import policy as model
from stockade.model.cidr import Network, parse_cidr, parse_ip
from stockade.model.cluster import Cluster, Endpoint

FAMILIES = (4, 6)
_DIRECTION = {model.INGRESS: INGRESS, model.EGRESS: EGRESS}


def block_networks(block: model.IPBlock) -> list[Network]:
    """An ipBlock as disjoint networks: its CIDR with every `except` cut out."""
    net = parse_cidr(block.cidr)
    if net is None:
        return []
    nets: list[Network] = [net]
    for text in block.except_:
        exc = parse_cidr(text)
        if exc is None or exc.version != net.version:
            continue
        out: list[Network] = []
        for n in nets:
            if exc.version == n.version and exc.subnet_of(n):  # type: ignore[arg-type]
                out.extend(n.address_exclude(exc))  # type: ignore[arg-type]
            elif n.version == exc.version and n.subnet_of(exc):  # type: ignore[arg-type]
                continue
            else:
                out.append(n)
        nets = out
    return sorted(nets, key=lambda n: (n.network_address, n.prefixlen))


def _addr(ip: str) -> tuple[int, str] | None:
    a = parse_ip(ip)
    return (a.version, str(a)) if a is not None else None


class Lowering:
    """Builds the ruleset; sets are created on first use and shared by name."""

    def __init__(self, res: Resolution) -> None:
        self.res = res
        self.index = res.index
        self.sets: dict[str, AddressSet] = {}
        self.chains: dict[str, Chain] = {}

    def _set(self, prefix: str, family: int, kind: str, key: object,
             elements: Iterable[Element], comment: str) -> str:
        name = content_name(f"{prefix}{family}-", kind, family, key)
        if name not in self.sets:
            self.sets[name] = AddressSet(name, family, kind, frozenset(elements), comment)
        return name

    def selector_sets(self, policy: model.NetworkPolicy, rp: ResolvedPeer) -> dict[int, str]:
        assert rp.peer is not None
        addrs = [a for ep in self.index.endpoints(rp.identities) for ip in ep.ips
                 if (a := _addr(ip)) is not None]
        return {
            fam: self._set("s", fam, ADDR, (policy.namespace, rp.peer),
                           (a for f, a in addrs if f == fam),
                           f"{policy.namespace}: {rp.peer.render()}")
            for fam in FAMILIES
        }

    def block_set(self, block: model.IPBlock) -> tuple[int, str] | None:
        nets = block_networks(block)
        net = parse_cidr(block.cidr)
        if net is None:
            return None
        name = self._set("c", net.version, NET, (block.cidr, block.except_),
                         (str(n) for n in nets), f"ipBlock {block.cidr}")
        return net.version, name

    def named_sets(self, key: object, candidates: Iterable[Endpoint], name: str,
                   protocol: str, comment: str) -> dict[int, str]:
        triples: dict[int, list[Element]] = {4: [], 6: []}
        for ep in candidates:
            number = ep.resolve_port(name, protocol)
            if number is None:
                continue
            for ip in ep.ips:
                a = _addr(ip)
                if a is not None:
                    triples[a[0]].append((a[1], protocol.lower(), number))
        return {fam: self._set("n", fam, ADDR_PORT, (key, name, protocol), triples[fam],
                               f"{comment} port {name}/{protocol}")
                for fam in FAMILIES}

    def rules_of(self, direction: str, policy: model.NetworkPolicy, index: int,
                 rule: model.Rule) -> list[Rule]:
        tag = f"{policy.key} {direction.lower()}[{index}]"
        numeric: dict[str, list[tuple[int, int]] | None] = {}
        named: list[tuple[str, str]] = []
        for p in rule.ports:
            if isinstance(p.port, str):
                named.append((p.port, p.protocol))
            elif p.port is None:
                numeric[p.protocol] = None
            elif numeric.get(p.protocol, []) is not None:
                high = p.end_port if p.end_port is not None else p.port
                numeric.setdefault(p.protocol, []).append((p.port, high))  # type: ignore[union-attr]
        out: list[Rule] = []
        for rp in self.res.peers(policy, rule):
            # (family, peer set) alternatives that stand for this peer
            if rp.peer is None:
                peer_opts: list[tuple[int | None, str | None]] = [(None, None)]
            elif rp.peer.ip_block is not None:
                found = self.block_set(rp.peer.ip_block)
                peer_opts = [found] if found is not None else []
            else:
                peer_opts = list(self.selector_sets(policy, rp).items())
            if not rule.ports:
                out.extend(Rule(f, s, comment=tag) for f, s in peer_opts)
                continue
            for proto, ranges in sorted(numeric.items()):
                merged = tuple(_merge(ranges)) if ranges is not None else ()
                out.extend(Rule(f, s, None, proto, merged, comment=tag) for f, s in peer_opts)
            for name, proto in named:
                out.extend(self._named_rules(direction, policy, rp, peer_opts, name, proto, tag))
        return out

    def _named_rules(self, direction: str, policy: model.NetworkPolicy, rp: ResolvedPeer,
                     peer_opts: list[tuple[int | None, str | None]], name: str, proto: str,
                     tag: str) -> list[Rule]:
        """A named port is a set of (destination, protocol, port) triples.

        Ingress: the destinations are the pods the policy selects, and the peer is
        matched on the source. Egress: the destinations are the peer's own pods
        (or every pod), so the triples express the peer as well.
        """
        if direction == model.INGRESS:
            dests = self.index.endpoints(
                self.index.selected_by_policy(policy.namespace, policy.pod_selector))
            nsets = self.named_sets(("in", policy.namespace, policy.pod_selector), dests,
                                    name, proto, f"{policy.namespace}: pods "
                                    f"[{policy.pod_selector.render()}]")
            rules = []
            for fam, pset in peer_opts:
                for nfam, nset in nsets.items():
                    if fam is None or fam == nfam:
                        rules.append(Rule(nfam, pset, nset, proto, comment=tag))
            return rules
        if rp.peer is None:
            dests = list(self.index.cluster.endpoints)
            key: object = ("all",)
        elif rp.peer.ip_block is not None:
            nets = block_networks(rp.peer.ip_block)
            dests = [ep for ep in self.index.cluster.endpoints
                     if any(_in_nets(ip, nets) for ip in ep.ips)]
            dests = [_only_ips_in(ep, nets) for ep in dests]
            key = ("block", rp.peer.ip_block)
        else:
            dests = self.index.endpoints(rp.identities)
            key = ("peer", policy.namespace, rp.peer)
        nsets = self.named_sets(key, dests, name, proto,
                                rp.peer.render() if rp.peer else "any pod")
        return [Rule(fam, None, nset, proto, comment=tag) for fam, nset in nsets.items()]

    def chain_for(self, ps: PolicySet) -> str:
        direction = _DIRECTION[ps.direction]
        rules: list[Rule] = []
        for policy, i, rule in ps.rules():
            rules.extend(self.rules_of(ps.direction, policy, i, rule))
        key = tuple((r.family, r.peer_set, r.named_set, r.protocol, r.ports) for r in rules)
        name = content_name(direction[0] + "-", direction, key)
        if name not in self.chains:
            self.chains[name] = Chain(name, direction, tuple(rules), ", ".join(ps.keys))
        return name

    def ruleset(self) -> Ruleset:
        maps: dict[str, dict[str, str]] = {INGRESS: {}, EGRESS: {}}
        chain_of: dict[PolicySet, str] = {}
        for mdir, direction in _DIRECTION.items():
            for ident, ps in sorted(self.res.isolated[mdir].items()):
                chain = chain_of.get(ps)
                if chain is None:
                    chain = chain_of[ps] = self.chain_for(ps)
                for ep in self.index.members[ident]:
                    for ip in ep.ips:
                        a = _addr(ip)
                        if a is not None:
                            maps[direction][a[1]] = chain
        return Ruleset(dict(sorted(self.sets.items())), dict(sorted(self.chains.items())),
                       maps[INGRESS], maps[EGRESS])


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _in_nets(ip: str, nets: list[Network]) -> bool:
    a = parse_ip(ip)
    return a is not None and any(a.version == n.version and a in n for n in nets)


def _only_ips_in(ep: Endpoint, nets: list[Network]) -> Endpoint:
    return Endpoint(ep.namespace, ep.name, ep.labels,
                    tuple(ip for ip in ep.ips if _in_nets(ip, nets)), ep.ports)


def compile_cluster(cluster: Cluster) -> Ruleset:
    """The whole ruleset of a cluster."""
    return Lowering(resolve(cluster)).ruleset()

