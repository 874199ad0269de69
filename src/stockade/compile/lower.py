"""Lowering policies to the backend-neutral ruleset (pure).

Chains depend on policies only: the sets they name are specs (see
`membership`), not members. `lower_chain` is therefore shared by the full
compiler below, which fills sets through the label index, and the incremental
compiler, which keeps them up to date endpoint by endpoint.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from stockade.compile.ir import (
    EGRESS,
    INGRESS,
    NET,
    AddressSet,
    Chain,
    ChainRule,
    Element,
    Guard,
    Ruleset,
    content_name,
    guard_of,
)
from stockade.compile.membership import (
    AllEndpoints,
    BlockEndpoints,
    PeerMembers,
    PolicyTargets,
    SetSpec,
    address,
    block_spec,
    member_specs,
    named_specs,
    peer_members,
    peer_text,
    selector_specs,
)
from stockade.engine.resolve import PolicySet, Resolution, resolve
from stockade.model import policy as model
from stockade.model.cidr import Network, is_canonical_ipv4, parse_cidr
from stockade.model.cluster import Cluster, Endpoint
from stockade.model.cnp import ADMIN, BASELINE, NAMESPACES, PODS, ClusterNetworkPolicy
from stockade.model.selector import Selector

DIRECTION = {model.INGRESS: INGRESS, model.EGRESS: EGRESS}

# A policy annotated so asks that connections it would now deny be kept, not cut
# (the agent's revoker reads the same annotation: `agent.revoke.KEEP_ANNOTATION`).

# Registers a set spec with whoever builds the sets; returns the set's name, or None
# when the set is necessarily empty (see `absent`): a rule naming it never matches, so
# it is left out, with the set.
Need = Callable[[SetSpec], str | None]
# The (family, peer set) alternatives of a peer of a policy in a namespace (see
# `_peer_options`); the full compiler answers them from a memo.
PeerOptions = Callable[[str, "model.Peer | None"], list[tuple[int | None, str | None]]]


def absent(spec: SetSpec, families: frozenset[int]) -> bool:
    """A set of pods' addresses in a family no endpoint has an address in: empty, and
    empty until such an endpoint comes (the compiler then lowers every chain again).

    An IPv4 cluster would otherwise carry an IPv6 twin of every selector's set and
    rule, all empty: at 10,000 pods, 1,611 of its 3,223 sets, each one the kernel
    walks past whenever it looks a set up by name, and lists one by one on a read.
    An ipBlock's set (`candidates` None) is fixed and never absent.
    """
    return spec.candidates is not None and spec.family not in families


def families_of(endpoints: Iterable[Endpoint]) -> frozenset[int]:
    """The address families the endpoints have addresses in."""
    return frozenset(a[0] for ep in endpoints for ip in ep.ips
                     if (a := address(ip)) is not None)


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


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _ports(rule: model.Rule) -> tuple[dict[str, list[tuple[int, int]] | None],
                                      list[tuple[str, str]]]:
    """Numeric port entries by protocol (None: every port), and named ones."""
    numeric: dict[str, list[tuple[int, int]] | None] = {}
    named: list[tuple[str, str]] = []
    for p in rule.ports:
        if isinstance(p.port, str):
            named.append((p.port, p.protocol))
        elif p.port is None:
            numeric[p.protocol] = None
        else:
            ranges = numeric.setdefault(p.protocol, [])
            if ranges is not None:
                ranges.append((p.port, p.end_port if p.end_port is not None else p.port))
    return numeric, named


def lower_rules(direction: str, policy: model.NetworkPolicy, index: int, rule: model.Rule,
                need: Need, options: PeerOptions | None = None) -> list[ChainRule]:
    tag = f"{policy.key} {direction.lower()}[{index}]"
    numeric, named = _ports(rule)
    out: list[ChainRule] = []
    for peer in rule.peers or (None,):
        peer_opts = (options(policy.namespace, peer) if options is not None
                     else _peer_options(policy.namespace, peer, need))
        if not rule.ports:
            out.extend(ChainRule(f, s, comment=tag) for f, s in peer_opts)
            continue
        for proto, ranges in sorted(numeric.items()):
            merged = tuple(_merge(ranges)) if ranges is not None else ()
            out.extend(ChainRule(f, s, None, proto, merged, comment=tag) for f, s in peer_opts)
        for name, proto in named:
            out.extend(_named_rules(direction, policy, peer, peer_opts, name, proto, tag, need))
    return out


def _peer_options(namespace: str, peer: model.Peer | None, need: Need
                  ) -> list[tuple[int | None, str | None]]:
    """The (family, peer set) alternatives that stand for a peer (None: any peer)."""
    if peer is None:
        return [(None, None)]
    if peer.ip_block is not None:
        spec = _block_spec(peer.ip_block)
        name = need(spec) if spec is not None else None
        return [(spec.family, name)] if spec is not None and name is not None else []
    if peer.pod_selector is None and peer.namespace_selector is None:
        return []  # matches nothing (and never validates)
    return [(fam, name) for fam, s in selector_specs(namespace, peer).items()
            if (name := need(s)) is not None]


def named_rule_specs(direction: str, rule: model.Rule, name: str, tag: str,
                     need: Need) -> list[ChainRule]:
    """A ClusterNetworkPolicy's `destinationNamedPort`: the destination's container
    port of that name, on its own number and protocol, whatever the protocol.

    Egress: the triples of the peer's pods serving it (they express the peer too).
    Ingress: the triples of every pod serving it, with the peer matched on the
    source (the chain is the destination's own: its address decides).
    """
    out: list[ChainRule] = []
    for proto in model.PROTOCOLS:
        for peer in rule.peers or (None,):
            if direction == model.EGRESS:
                if not _peer_options("", peer, need):
                    continue
                specs = _peer_specs("", peer, name, proto)
                out += [ChainRule(fam, None, nset, proto, comment=tag)
                        for fam, s in specs.items() if (nset := need(s)) is not None]
                continue
            anyone = {fam: nset for fam, s in _peer_specs("", None, name, proto).items()
                      if (nset := need(s)) is not None}
            out += [ChainRule(nfam, pset, nset, proto, comment=tag)
                    for fam, pset in _peer_options("", peer, need)
                    for nfam, nset in anyone.items() if fam is None or fam == nfam]
    return out


def _named_rules(direction: str, policy: model.NetworkPolicy, peer: model.Peer | None,
                 peer_opts: list[tuple[int | None, str | None]], name: str, proto: str,
                 tag: str, need: Need) -> list[ChainRule]:
    """A named port is a set of (destination, protocol, port) triples.

    Ingress: the destinations are the pods the policy selects, and the peer is
    matched on the source. Egress: the destinations are the peer's own pods
    (or every pod), so the triples express the peer as well.
    """
    if direction == model.INGRESS:
        specs = _target_specs(policy.namespace, policy.pod_selector, name, proto)
        names = {fam: nset for fam, s in specs.items() if (nset := need(s)) is not None}
        return [ChainRule(nfam, pset, nset, proto, comment=tag)
                for fam, pset in peer_opts for nfam, nset in names.items()
                if fam is None or fam == nfam]
    if not peer_opts:
        return []
    specs = _peer_specs(policy.namespace, peer, name, proto)
    return [ChainRule(fam, None, nset, proto, comment=tag) for fam, s in specs.items()
            if (nset := need(s)) is not None]


@functools.lru_cache(maxsize=1 << 12)
def _block_spec(block: model.IPBlock) -> SetSpec | None:
    return block_spec(block, [str(n) for n in block_networks(block)])


# The specs of named-port sets, cached: every peer of a rule, and every policy
# with the same selector, asks again (callers must not change the dicts).

@functools.lru_cache(maxsize=1 << 16)
def _target_specs(namespace: str, selector: Selector, name: str, proto: str
                  ) -> dict[int, SetSpec]:
    return named_specs(PolicyTargets(namespace, selector), name, proto,
                       f"{namespace}: pods [{selector.render()}]")


@functools.lru_cache(maxsize=1 << 16)
def _peer_specs(namespace: str, peer: model.Peer | None, name: str, proto: str
                ) -> dict[int, SetSpec]:
    if peer is None:
        cand: AllEndpoints | BlockEndpoints | PeerMembers = AllEndpoints()
    elif peer.ip_block is not None:
        cand = BlockEndpoints(peer.ip_block)
    else:
        cand = peer_members(namespace, peer)
    return named_specs(cand, name, proto, peer.render() if peer else "any pod")


def lower_policy(direction: str, policy: model.NetworkPolicy, need: Need,
                 options: PeerOptions | None = None) -> list[ChainRule]:
    """The rules of one policy in one direction, in order."""
    rules: list[ChainRule] = []
    for i, rule in enumerate(policy.rules(direction)):
        rules.extend(lower_rules(direction, policy, i, rule, need, options))
    return rules


def lower_chain(direction: str, policies: Sequence[model.NetworkPolicy], need: Need,
                lowered: dict[int, list[ChainRule]] | None = None,
                options: PeerOptions | None = None) -> Chain:
    """The chain of one policy set (policies sorted by key), named by its rules.

    `lowered` keeps each policy's rules (by `id`, for one direction and one
    `need`) across the chains of a compile: a policy is in many policy sets.
    `options`: the peers' set alternatives, where the caller keeps them (`need` then
    has nothing to do for a set asked again but name it).
    """
    rules: list[ChainRule] = []
    for policy in policies:
        if lowered is None:
            rules.extend(lower_policy(direction, policy, need, options))
            continue
        mine = lowered.get(id(policy))
        if mine is None:
            mine = lowered[id(policy)] = lower_policy(direction, policy, need, options)
        rules.extend(mine)
    ir_dir = DIRECTION[direction]
    key = tuple((r.family, r.peer_set, r.named_set, r.protocol, r.ports) for r in rules)
    keep = any(model.keeps_connections(p) for p in policies)
    # A chain that keeps is another chain (its name says so): the same rules without
    # keep are shared by other policy sets. Without keep the name is what it always was.
    name = content_name(ir_dir[0] + "-", ir_dir, key, *(("keep",) if keep else ()))
    return Chain(name, ir_dir, tuple(rules), ", ".join(p.key for p in policies), keep)


def endpoint_addresses(ep: Endpoint) -> list[str]:
    return [a[1] for ip in ep.ips if (a := address(ip)) is not None]


# An entry: a direction and the ids of its policy set and its Admin and Baseline tuples.
EntryKey = tuple[str, int, int, int]
Selection = tuple[str, PolicySet | None, Sequence[ClusterNetworkPolicy],
                  Sequence[ClusterNetworkPolicy]]


@dataclass
class Work:
    """What `Lowering.ruleset` lowers: each distinct entry once, in order, and the local
    addresses mapped to each entry's first chain (direction, entry, addresses)."""

    keys: list[EntryKey] = field(default_factory=list)
    entries: dict[EntryKey, Selection] = field(default_factory=dict)
    maps: list[tuple[str, EntryKey, list[str]]] = field(default_factory=list)


class Lowering:
    """The full compiler: every set filled through the label index.

    A selector's set is the union of what its identities contribute, and what
    an identity contributes to a set depends only on the set's family and named
    port, so it is computed once per identity and (family, port), not once per
    set: the DNS peer of a thousand namespaces costs one pass over its pods.
    """

    def __init__(self, res: Resolution, *, reference: bool = False) -> None:
        """`reference`: fill every set endpoint by endpoint with `SetSpec.contributes`
        (the definition; tests compare the two)."""
        self.res = res
        self.index = res.index
        self.reference = reference
        self.sets: dict[str, AddressSet] = {}
        self.chains: dict[str, Chain] = {}
        self._ns_labels = self.index.namespace_labels
        self._of_identity: dict[tuple[int, int, tuple[str, str] | None], list[Element]] = {}
        self._addresses: dict[int, list[tuple[Endpoint, list[tuple[int, str]]]]] = {}
        self._lowered: dict[str, dict[int, list[ChainRule]]] = {}
        self._options: dict[tuple[str, int], list[tuple[int | None, str | None]]] = {}
        self.families = families_of(self.index.cluster.endpoints)
        self._tiers: dict[tuple[str, str, int], tuple[Sequence[ClusterNetworkPolicy], Chain]] = {}

    def need(self, spec: SetSpec) -> str | None:
        if absent(spec, self.families):
            return None
        if spec.name not in self.sets:
            self.sets[spec.name] = AddressSet(spec.name, spec.family, spec.kind,
                                              frozenset(self._elements(spec)), spec.comment)
        return spec.name

    def peer_options(self, namespace: str, peer: model.Peer | None
                     ) -> list[tuple[int | None, str | None]]:
        """`_peer_options`, once per peer and the namespace it depends on: decoding
        shares one object per distinct peer (policy specs are interned), and a peer
        with a namespaceSelector, or an ipBlock, is the same set from every namespace
        (the DNS peer of 25,000 namespaces is asked 25,000 times). By `id`: the peers
        live as long as the cluster this lowers. Callers must not change the list."""
        if peer is None:
            return [(None, None)]
        key = ("" if peer.namespace_selector is not None or peer.ip_block is not None
               else namespace, id(peer))
        found = self._options.get(key)
        if found is None:
            found = self._options[key] = _peer_options(namespace, peer, self.need)
        return found

    def members(self, spec: SetSpec) -> list[Endpoint]:
        """The endpoints a set's spec selects, through the index where it can."""
        cand = spec.candidates
        if isinstance(cand, PeerMembers):
            return self.index.endpoints(self.index.peer_identities(cand.namespace, cand.peer))
        if isinstance(cand, PolicyTargets):
            return self.index.endpoints(
                self.index.selected_by_policy(cand.namespace, cand.selector))
        return [ep for ep in self.index.cluster.endpoints
                if cand is not None and cand.selects(ep, self._ns_labels)]

    def _elements(self, spec: SetSpec) -> list[Element]:
        if spec.kind == NET:
            return list(spec.fixed)
        cand = spec.candidates
        if self.reference or not isinstance(cand, PeerMembers | PolicyTargets):
            return [e for ep in self.members(spec) for e in spec.contributes(ep)]
        if isinstance(cand, PeerMembers):
            idents: Iterable[int] = self.index.peer_identities(cand.namespace, cand.peer)
        else:
            idents = self.index.selected_by_policy(cand.namespace, cand.selector)
        out: list[Element] = []
        for ident in idents:
            key = (ident, spec.family, spec.port)
            found = self._of_identity.get(key)
            if found is None:
                found = self._of_identity[key] = self._contributed(ident, spec.family,
                                                                   spec.port)
            out.extend(found)
        return out

    def _contributed(self, ident: int, family: int, port: tuple[str, str] | None
                     ) -> list[Element]:
        """`SetSpec.contributes` of every pod of an identity to a selector's set of
        `family` (and named `port`), each pod's addresses parsed once."""
        pods = self._pods(ident)
        if port is None:
            return [text for _, addrs in pods for fam, text in addrs if fam == family]
        name, protocol = port
        proto = protocol.lower()
        out: list[Element] = []
        ports: object = None
        number = None
        for ep, addrs in pods:
            if ep.ports is not ports:  # replicas share one tuple of ports (decoding)
                ports, number = ep.ports, ep.resolve_port(name, protocol)
            if number is not None:
                out += [(text, proto, number) for fam, text in addrs if fam == family]
        return out

    def _pods(self, ident: int) -> list[tuple[Endpoint, list[tuple[int, str]]]]:
        """The pods of an identity with their addresses as (family, text), parsed once."""
        pods = self._addresses.get(ident)
        if pods is None:
            # A pod's usual address is told at once; the memo of `address` is for
            # the sets that ask again, and each pod's address is new to it here.
            pods = self._addresses[ident] = [
                (ep, [a for ip in ep.ips
                      if (a := (4, ip) if is_canonical_ipv4(ip) else address(ip)) is not None])
                for ep in self.index.members[ident]]
        return pods

    def ruleset(self) -> Ruleset:
        work = self.work()
        return self.assemble(work, self.lower(work, work.keys))

    def work(self) -> Work:
        """What the ruleset needs lowered: one entry per distinct selection (policy set,
        Admin and Baseline policies) of each direction, and each local identity's."""
        work = Work()
        local_of: dict[int, list[str] | None] = {}  # both directions ask
        tiers = self.tier_subjects()
        for mdir in DIRECTION:
            isolated = self.res.isolated[mdir]
            for ident in sorted(isolated.keys() | tiers[mdir].keys()):
                if ident not in local_of:
                    local_of[ident] = self._local_addresses(ident)
                local = local_of[ident]
                if local is None:
                    continue
                ps = isolated.get(ident)
                admin, baseline = tiers[mdir].get(ident, ((), ()))
                # by ids: resolve shares one PolicySet per set, tiers one tuple per set
                key = (mdir, id(ps), id(admin), id(baseline))
                if key not in work.entries:
                    work.entries[key] = (mdir, ps, admin, baseline)
                    work.keys.append(key)
                work.maps.append((mdir, key, local))
        return work

    def lower(self, work: Work, keys: Iterable[EntryKey]) -> dict[EntryKey, tuple[Chain, ...]]:
        """The chains of each entry (see `_entry`), the sets they name added to `sets`.
        Entries are independent: any share of them can be lowered apart (`compile
        --jobs` lowers shares in processes of their own) and `assemble`d."""
        return {key: self._entry(*work.entries[key]) for key in keys}

    def assemble(self, work: Work, lowered: Mapping[EntryKey, tuple[Chain, ...]]) -> Ruleset:
        """The ruleset of `work` from its entries' chains, however they were lowered: the
        chains in the entries' order (a chain's first policy set names it in its
        comment), each address mapped to its entry's first chain."""
        for key in work.keys:
            for chain in lowered[key]:
                self.chains.setdefault(chain.name, chain)
        maps = self.maps(work, {key: chains[0].name for key, chains in lowered.items()})
        # Sorted by name (names are unique: sorting the names alone is faster than items).
        return Ruleset({n: self.sets[n] for n in sorted(self.sets)},
                       {n: self.chains[n] for n in sorted(self.chains)},
                       maps.ingress, maps.egress, guards_of(self.index.cluster.endpoints))

    @staticmethod
    def maps(work: Work, first: Mapping[EntryKey, str]) -> Ruleset:
        """The verdict maps alone: each local address to its entry's first chain."""
        maps: dict[str, dict[str, str]] = {INGRESS: {}, EGRESS: {}}
        for mdir, key, local in work.maps:
            maps[DIRECTION[mdir]].update(dict.fromkeys(local, first[key]))
        return Ruleset({}, {}, maps[INGRESS], maps[EGRESS])

    def _local_addresses(self, ident: int) -> list[str] | None:
        """The addresses of an identity's local pods, in order; None when it has none
        (remote endpoints are peers only: their node enforces their policies)."""
        local = [addrs for ep, addrs in self._pods(ident) if not ep.remote]
        return [addr for addrs in local for _, addr in addrs] if local else None

    def _entry(self, direction: str, ps: PolicySet | None,
               admin: Sequence[ClusterNetworkPolicy],
               baseline: Sequence[ClusterNetworkPolicy]) -> tuple[Chain, ...]:
        """The chains of an endpoint-direction, its first chain (the map's) first:
        Admin, NetworkPolicy or Baseline, each continuing in the next (NetworkPolicy is
        final, so Baseline follows only an endpoint it does not isolate)."""
        # The tiers' lowering builds on this module's (peers, ports, named ports).
        from stockade.compile.tiers import link_chain

        chain: Chain | None = None
        if ps is not None:
            chain = lower_chain(direction, ps.policies, self.need,
                                self._lowered.setdefault(direction, {}), self.peer_options)
        elif baseline:
            chain = self._tier_chain(direction, BASELINE, baseline)
        if not admin:
            assert chain is not None
            return (chain,)
        tier = self._tier_chain(direction, ADMIN, admin)
        link = link_chain(tier, chain.name if chain else None)
        return (link, tier) if chain is None else (link, tier, chain)

    def _tier_chain(self, direction: str, tier: str,
                    policies: Sequence[ClusterNetworkPolicy]) -> Chain:
        """A tier's chain, lowered once per selection (an Admin chain is shared by every
        policy set under it; the key holds the sequence, so its id stays valid)."""
        from stockade.compile.tiers import lower_tier_chain

        key = (direction, tier, id(policies))
        found = self._tiers.get(key)
        if found is None:
            found = self._tiers[key] = (policies, lower_tier_chain(direction, tier, policies,
                                                                   None, self.need))
        return found[1]

    def tier_subjects(self) -> dict[str, dict[int, tuple[tuple[ClusterNetworkPolicy, ...],
                                                          tuple[ClusterNetworkPolicy, ...]]]]:
        """Per direction and identity, the Admin and the Baseline policies with rules of
        that direction whose subject selects it, in precedence order.

        Identities selected by the same policies share the same two tuples (one object
        each), so callers can key by their ids: a thousand policies over every namespace
        build one tuple per distinct selection, not one per identity.
        """
        ordered = sorted(self.index.cluster.cluster_policies, key=ClusterNetworkPolicy.order)
        selected: list[frozenset[int]] = []
        for policy in ordered:
            subject = policy.subject
            selected.append(frozenset() if subject.kind not in (NAMESPACES, PODS)
                            else self.index.peer_identities("", model.Peer(
                                pod_selector=subject.pod_selector,
                                namespace_selector=subject.namespace_selector)))
        out: dict[str, dict[int, tuple[tuple[ClusterNetworkPolicy, ...],
                                       tuple[ClusterNetworkPolicy, ...]]]] = {}
        for direction in model.DIRECTIONS:
            # A trie of selections: an identity's state is the policies selecting it so far.
            Lists = tuple[tuple[ClusterNetworkPolicy, ...], tuple[ClusterNetworkPolicy, ...]]
            lists: list[Lists] = [((), ())]
            step: dict[tuple[int, int], int] = {}
            state: dict[int, int] = {}
            for pi, policy in enumerate(ordered):
                if not policy.rules(direction):
                    continue
                for ident in selected[pi]:
                    here = state.get(ident, 0)
                    there = step.get((here, pi))
                    if there is None:
                        admin, baseline = lists[here]
                        lists.append(((*admin, policy), baseline) if policy.tier == ADMIN
                                     else (admin, (*baseline, policy)))
                        there = step[(here, pi)] = len(lists) - 1
                    state[ident] = there
            out[direction] = {ident: lists[s] for ident, s in state.items()}
        return out


def clear_caches() -> None:
    """Empty the compiler's module-level memos (set specs, parsed addresses).

    A one-shot command calls this before it exits: the memos are freed then,
    not by interpreter shutdown after a collection that walks them all (0.6 s
    of the 100,000-pod compile).
    """
    for cached in (_block_spec, _target_specs, _peer_specs, address, member_specs,
                   peer_text):
        cached.cache_clear()


def guards_of(endpoints: Iterable[Endpoint]) -> dict[str, Guard]:
    """Each bridge port of this node's endpoints, bound to its endpoint's addresses and MAC.

    A port two endpoints claim is bound to nothing: it passes no address of either
    (fail closed) and every datapath can hold it; so are two ports with one MAC, which
    could not both be told apart as a frame's destination. Admission refuses such
    pairs, so only records stored before it did get here, and those are held closed
    anyway.
    """
    return held_apart(port_guards(endpoints))


def port_guards(endpoints: Iterable[Endpoint]) -> dict[str, Guard]:
    """`guards_of` before two ports with one MAC are held (`held_apart`)."""
    out: dict[str, Guard] = {}
    for ep in endpoints:
        if ep.port and not ep.remote:
            out[ep.port] = guard_of(()) if ep.port in out else guard_of(ep.ips, ep.mac)
    return dict(sorted(out.items()))


def held_apart(guards: Mapping[str, Guard]) -> dict[str, Guard]:
    """Each guard, but those of ports that share a MAC: bound to nothing."""
    macs = Counter(g.mac for g in guards.values() if g.mac)
    return {port: guard_of(()) if macs[g.mac] > 1 else g for port, g in guards.items()}


def compile_cluster(cluster: Cluster) -> Ruleset:
    """The whole ruleset of a cluster."""
    return Lowering(resolve(cluster)).ruleset()
