"""Exact connectivity: the allowed protocols and ports between every pair of peers.

The peers are workloads (a Deployment, a StatefulSet..., a Pod's controller, a Pod
without one), and the pieces the policies cut the IPv4 address space into. The
connections of a pair are computed on port intervals, never by sampling ports:
each rule contributes the intervals of its port entries (a named port resolved on
the destination's container ports), a side is the union over the rules whose
peers match, a pair the intersection of the source's egress and the
destination's ingress. Addresses are cut at every boundary of every ipBlock
(after its excepts) of the direction, so one address of a piece stands for all
of it.

ClusterNetworkPolicy tiers use the same algebra, per side: the Admin rules of the
policies selecting the subject, in precedence order, each taking from what is
still undecided the connections its peers and ports match (Accept to the allowed
set, Deny out, Pass on to NetworkPolicy); then, of what the Admin tier left,
NetworkPolicy's union if it isolates the subject, else all but what the first
matching Baseline rule denies. Addresses are also cut at every `networks` CIDR.
The semantics are those of the reference evaluator (`engine.evaluate`),
with which a property test holds it to agree; as netpol-analyzer, an ipBlock
never matches a workload (the workloads here have no address).

This is netpol-analyzer's `list`: `render_txt` prints its lines exactly
(`src => dst : conns`).
"""

from __future__ import annotations

import csv
import io
import ipaddress
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from stockade.engine.evaluate import Evaluator
from stockade.engine.match import peer_matches
from stockade.engine.tiers import peer_matches as cnp_peer_matches
from stockade.model.cidr import parse_cidr
from stockade.model.cluster import Cluster, Endpoint
from stockade.model.cnp import ACCEPT, ADMIN, BASELINE, DENY, ClusterNetworkPolicy, CnpRule
from stockade.model.labels import Labels
from stockade.model.policy import (
    EGRESS,
    INGRESS,
    PROTOCOLS,
    SCTP,
    TCP,
    UDP,
    IPBlock,
    NetworkPolicy,
    Rule,
)

MIN_PORT = 1
MAX_PORT = 65535
IPV4_LAST = 2**32 - 1
IPV6_LAST = 2**128 - 1
# The order netpol-analyzer writes protocols in.
PROTOCOL_ORDER = (SCTP, TCP, UDP)

Intervals = tuple[tuple[int, int], ...]


def _merge(intervals: Iterable[tuple[int, int]]) -> Intervals:
    """Sorted, disjoint, non-adjacent intervals covering the same ports."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return tuple(out)


def _intersect(a: Intervals, b: Intervals) -> Intervals:
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo = max(a[i][0], b[j][0])
        hi = min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tuple(out)


def _subtract(a: Intervals, b: Intervals) -> Intervals:
    """The ports of `a` not in `b`."""
    out: list[tuple[int, int]] = []
    j = 0
    for lo, hi in a:
        while j < len(b) and b[j][1] < lo:
            j += 1
        k = j
        while lo <= hi and k < len(b) and b[k][0] <= hi:
            if b[k][0] > lo:
                out.append((lo, b[k][0] - 1))
            lo = max(lo, b[k][1] + 1)
            k += 1
        if lo <= hi:
            out.append((lo, hi))
    return tuple(out)


@dataclass(frozen=True)
class Connections:
    """A set of (protocol, port): per protocol, disjoint ascending port intervals."""

    ports: tuple[tuple[str, Intervals], ...] = ()  # protocols in PROTOCOLS order, none empty

    @staticmethod
    def of(by_protocol: Mapping[str, Iterable[tuple[int, int]]]) -> Connections:
        return Connections(tuple((p, merged) for p in PROTOCOLS
                                 if (merged := _merge(by_protocol.get(p, ())))))

    def intervals(self, protocol: str) -> Intervals:
        for p, ranges in self.ports:
            if p == protocol:
                return ranges
        return ()

    def union(self, other: Connections) -> Connections:
        if not other.ports:
            return self
        if not self.ports:
            return other
        return Connections.of({p: self.intervals(p) + other.intervals(p) for p in PROTOCOLS})

    def intersection(self, other: Connections) -> Connections:
        return Connections(tuple((p, both) for p in PROTOCOLS
                                 if (both := _intersect(self.intervals(p),
                                                        other.intervals(p)))))

    def difference(self, other: Connections) -> Connections:
        if not other.ports or not self.ports:
            return self
        return Connections(tuple((p, left) for p in PROTOCOLS
                                 if (left := _subtract(self.intervals(p), other.intervals(p)))))

    def allows(self, protocol: str, port: int) -> bool:
        return any(lo <= port <= hi for lo, hi in self.intervals(protocol))

    @property
    def empty(self) -> bool:
        return not self.ports

    @property
    def everything(self) -> bool:
        return self == ALL_CONNECTIONS

    def render(self) -> str:
        """netpol-analyzer's words: `All Connections`, or `SCTP 1-9002,TCP 80,443,UDP 53`."""
        if self.everything:
            return "All Connections"
        if self.empty:
            return "No Connections"
        groups = []
        for protocol in PROTOCOL_ORDER:
            ranges = self.intervals(protocol)
            if ranges:
                groups.append(f"{protocol} " + ",".join(
                    str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges))
        return ",".join(groups)


NO_CONNECTIONS = Connections()
ALL_CONNECTIONS = Connections(tuple((p, ((MIN_PORT, MAX_PORT),)) for p in PROTOCOLS))


def rule_connections(rule: Rule, destination: Endpoint | None) -> Connections:
    """What a rule's ports admit towards a destination (a named port is resolved on
    it; towards an address, a named port admits nothing)."""
    if not rule.ports:
        return ALL_CONNECTIONS
    found: dict[str, list[tuple[int, int]]] = {}
    for entry in rule.ports:
        if entry.protocol not in PROTOCOLS:
            continue
        if entry.port is None:
            span = (MIN_PORT, MAX_PORT)
        elif isinstance(entry.port, str):
            number = destination.resolve_port(entry.port, entry.protocol) \
                if destination is not None else None
            if number is None:
                continue
            span = (number, number)
        else:
            span = (entry.port, entry.end_port if entry.end_port is not None else entry.port)
        found.setdefault(entry.protocol, []).append(span)
    return Connections.of(found)


def cnp_rule_connections(rule: CnpRule, destination: Endpoint | None) -> Connections:
    """What a ClusterNetworkPolicy rule's `protocols` match towards a destination (a
    named port is the destination's container port of that name, whatever its
    protocol; towards an address it matches nothing)."""
    if rule.ports is None:
        return ALL_CONNECTIONS
    found: dict[str, list[tuple[int, int]]] = {}
    for entry in rule.ports:
        if entry.name:
            for cp in destination.ports if destination is not None else ():
                if cp.name == entry.name:
                    found.setdefault(cp.protocol, []).append((cp.port, cp.port))
        else:
            found.setdefault(entry.protocol, []).append((entry.start, entry.end))
    return Connections.of(found)


# ---- peers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddressRange:
    """A contiguous piece of the IPv4 (or, `version` 6, the IPv6) space, outside the
    cluster."""

    first: int
    last: int
    version: int = 4

    def _address(self, n: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.IPv4Address(n) if self.version == 4 else ipaddress.IPv6Address(n)

    @property
    def sample(self) -> str:
        """One address of the piece: every address of it is judged alike."""
        return str(self._address(self.first))

    def render(self) -> str:
        return f"{self._address(self.first)}-{self._address(self.last)}[External]"

    def cidrs(self) -> list[str]:
        """The piece as the fewest CIDRs."""
        return [str(n) for n in ipaddress.summarize_address_range(
            self._address(self.first), self._address(self.last))]


@dataclass(frozen=True)
class Workload:
    """A workload peer: its name as netpol-analyzer writes it and the endpoint that
    stands for its pods (no address: an ipBlock never matches it)."""

    name: str  # ns/name[Kind]
    endpoint: Endpoint


def block_ranges(block: IPBlock, version: int = 4) -> list[tuple[int, int]]:
    """An ipBlock of the family after its excepts, as contiguous ranges (none when the
    block is of the other family)."""
    net = parse_cidr(block.cidr)
    if net is None or net.version != version:
        return []
    ranges = [(int(net.network_address), int(net.broadcast_address))]
    for text in block.except_:
        exc = parse_cidr(text)
        if exc is None or exc.version != version:
            continue
        lo, hi = int(exc.network_address), int(exc.broadcast_address)
        cut: list[tuple[int, int]] = []
        for a, b in ranges:
            if hi < a or lo > b:
                cut.append((a, b))
                continue
            if a < lo:
                cut.append((a, lo - 1))
            if hi < b:
                cut.append((hi + 1, b))
        ranges = cut
    return ranges


def address_ranges(policies: Iterable[NetworkPolicy], direction: str,
                   version: int = 4, cluster_policies: Iterable[ClusterNetworkPolicy] = ()
                   ) -> tuple[AddressRange, ...]:
    """The pieces of the IPv4 (or IPv6) space cut at the bounds of every ipBlock of the
    direction's rules (`from` of ingress rules, `to` of egress rules), of every policy,
    and of every `networks` CIDR of the direction's ClusterNetworkPolicy rules."""
    cuts = {0, (IPV4_LAST if version == 4 else IPV6_LAST) + 1}
    blocks = [peer.ip_block for policy in policies for rule in policy.rules(direction)
              for peer in rule.peers if peer.ip_block is not None]
    blocks += [IPBlock(text) for policy in cluster_policies for rule in policy.rules(direction)
               for peer in rule.peers for text in peer.networks]
    for block in blocks:
        for lo, hi in block_ranges(block, version):
            cuts.add(lo)
            cuts.add(hi + 1)
    bounds = sorted(cuts)
    return tuple(AddressRange(a, b - 1, version) for a, b in itertools.pairwise(bounds))


def workload_peers(endpoints: Sequence[Endpoint], controllers: Mapping[str, tuple[str, str]],
                   workloads: Iterable[str]) -> tuple[list[Workload], list[str]]:
    """The workload peers of a cluster's endpoints, and a warning per inconsistency.

    `workloads`: keys of the endpoints that are workloads (named `name[Kind]`);
    `controllers`: the (kind, name) of each Pod's controller, by Pod key. Pods of
    one controller are one peer, named after it as written (`ns/name[Kind]`); a Pod
    without one is `ns/name[Pod]`. The first Pod of a peer stands for it; another
    with other labels or ports is reported.
    """
    is_workload = set(workloads)
    found: dict[str, Workload] = {}
    warnings: list[str] = []
    for ep in endpoints:
        if ep.key in is_workload:
            name = ep.key
        elif (owner := controllers.get(ep.key)) is not None:
            name = f"{ep.namespace}/{owner[1]}[{owner[0]}]"
        else:
            name = f"{ep.namespace}/{ep.name}[Pod]"
        first = found.get(name)
        if first is None:
            short = name.split("/", 1)[1]
            found[name] = Workload(name, replace(ep, name=short, ips=()))
        elif (first.endpoint.labels, first.endpoint.ports) != (ep.labels, ep.ports):
            warnings.append(f"{ep.key} is part of {name} but its labels or ports differ "
                            f"from its first pod's: {name} is analysed with the first one's")
    return list(found.values()), warnings


# ---- the computation --------------------------------------------------------------------


@dataclass(frozen=True)
class Connection:
    src: str
    dst: str
    connections: Connections

    def render(self) -> str:
        return f"{self.src} => {self.dst} : {self.connections.render()}"


@dataclass(frozen=True)
class ConnList:
    """Every pair with something allowed, sorted by source then destination."""

    connections: tuple[Connection, ...]
    sources: tuple[AddressRange, ...] = field(default=())
    destinations: tuple[AddressRange, ...] = field(default=())


def _class_key(ep: Endpoint) -> tuple[str, Labels]:
    return ep.namespace, ep.labels


def _has_named_port(rule: Rule) -> bool:
    return any(isinstance(p.port, str) for p in rule.ports)


class Sides:
    """Each side of a pair's connections.

    What a side admits is the union of the connections of the rules whose peers
    match the other end; so per subject it is computed once per set of matching
    rules (a bitmask over the subject's rules), and peer matches are remembered
    per (peer, namespace and labels of the other end, or its address).
    """

    def __init__(self, cluster: Cluster) -> None:
        self.ev = Evaluator(cluster)
        # By the identity of the evaluator's (cached) tuple of selecting policies:
        # hashing policies is deep.
        self._rules: dict[int, tuple[tuple[tuple[str, Rule], ...], bool]] = {}
        self._ports: dict[int, int] = {}  # id(endpoint) -> number of its container ports
        self._port_numbers: dict[object, int] = {}
        self._matches: dict[tuple[int, str, object], bool] = {}
        self._unions: dict[tuple[int, int, int | None], Connections] = {}
        self._rule_conns: dict[tuple[int, int | None], Connections] = {}
        self.tiers = self.ev.tiers
        # Per ClusterNetworkPolicy rule (by identity) a bit; signatures of other ends,
        # rule masks of tuples of policies, and tier walks, as `side` explains.
        self._rule_bits: dict[int, int] = {}
        self._signatures: dict[tuple[str, object, str], int] = {}
        self._masks: dict[tuple[int, str], int] = {}
        self._walks: dict[tuple[int, int, int], tuple[Connections, Connections]] = {}
        self._cnp_conns: dict[tuple[int, int], Connections] = {}

    def _rules_of(self, policies: tuple[NetworkPolicy, ...], direction: str
                  ) -> tuple[tuple[tuple[str, Rule], ...], bool]:
        """The (policy namespace, rule) pairs of the policies, and whether any rule
        names a port (then the destination's ports matter)."""
        found = self._rules.get(id(policies))
        if found is None:
            rules = tuple((p.namespace, r) for p in policies for r in p.rules(direction))
            found = (rules, any(_has_named_port(r) for _, r in rules))
            self._rules[id(policies)] = found
        return found

    def _ports_of(self, destination: Endpoint | None) -> int:
        """A number per distinct set of container ports (endpoints live as long as this)."""
        if destination is None:
            return -1
        found = self._ports.get(id(destination))
        if found is None:
            found = self._port_numbers.setdefault(destination.ports, len(self._port_numbers))
            self._ports[id(destination)] = found
        return found

    def _matches_peer(self, namespace: str, rule: Rule, other: Endpoint | None,
                      other_ip: str) -> bool:
        if not rule.peers:
            return True
        who: object = _class_key(other) if other is not None else other_ip
        key = (id(rule), namespace, who)
        found = self._matches.get(key)
        if found is None:
            labels = self.ev.namespace_labels
            found = any(peer_matches(peer, namespace, other, other_ip, labels)
                        for peer in rule.peers)
            self._matches[key] = found
        return found

    def _connections(self, rule: Rule, destination: Endpoint | None) -> Connections:
        key = (id(rule), self._ports_of(destination) if _has_named_port(rule) else None)
        found = self._rule_conns.get(key)
        if found is None:
            found = rule_connections(rule, destination)
            self._rule_conns[key] = found
        return found

    def side(self, subject: Endpoint, direction: str, other: Endpoint | None,
             other_ip: str, destination: Endpoint | None) -> Connections:
        """What `subject`'s side of `direction` admits to or from `other` (an endpoint,
        or the address `other_ip`) through the tiers; named ports resolve on
        `destination`.

        Admin, then NetworkPolicy (if it isolates the subject) or Baseline, then the
        default, each deciding only what the tiers before it left. A tier's walk
        depends on the other end only through which of its rules' peers match it (the
        end's signature), so walks are shared by every end with the same one.
        """
        if not self.tiers:
            return self.policy_side(subject, direction, other, other_ip, destination)
        admin = self.tiers.selecting(ADMIN, subject, direction)
        signature = self._signature(direction, other, other_ip)
        ports = self._ports_of(destination)
        accepted, denied = self._walk(admin, direction, signature, ports, destination)
        if self.ev.selecting(subject, direction):
            isolated = self.policy_side(subject, direction, other, other_ip, destination)
            if isolated.everything:
                return ALL_CONNECTIONS.difference(denied)
            return accepted.union(isolated.difference(accepted.union(denied)))
        baseline = self.tiers.selecting(BASELINE, subject, direction)
        _, refused = self._walk(baseline, direction, signature, ports, destination)
        return ALL_CONNECTIONS.difference(denied.union(refused.difference(accepted)))

    def _signature(self, direction: str, other: Endpoint | None, other_ip: str) -> int:
        """The ClusterNetworkPolicy rules of a direction whose peers match the other end,
        as bits."""
        key = (direction, _class_key(other) if other is not None else None, other_ip)
        found = self._signatures.get(key)
        if found is None:
            found = 0
            labels = self.ev.namespace_labels
            for policy in self.ev.cluster.cluster_policies:
                for rule in policy.rules(direction):
                    if any(cnp_peer_matches(peer, rule.action, other, other_ip, labels)
                           for peer in rule.peers):
                        found |= self._rule_bit(rule)
            self._signatures[key] = found
        return found

    def _rule_bit(self, rule: CnpRule) -> int:
        return self._rule_bits.setdefault(id(rule), 1 << len(self._rule_bits))

    def _mask(self, policies: tuple[ClusterNetworkPolicy, ...], direction: str) -> int:
        found = self._masks.get((id(policies), direction))
        if found is None:
            found = 0
            for policy in policies:
                for rule in policy.rules(direction):
                    found |= self._rule_bit(rule)
            self._masks[(id(policies), direction)] = found
        return found

    def _walk(self, policies: tuple[ClusterNetworkPolicy, ...], direction: str,
              signature: int, ports: int, destination: Endpoint | None
              ) -> tuple[Connections, Connections]:
        """(accepted, denied) by the first matching rule of one tier, connection by
        connection; the rest is passed on or matched by no rule."""
        if not policies:
            return NO_CONNECTIONS, NO_CONNECTIONS
        matching = signature & self._mask(policies, direction)
        key = (id(policies), matching, ports)
        found = self._walks.get(key)
        if found is not None:
            return found
        undecided = ALL_CONNECTIONS
        accepted = denied = NO_CONNECTIONS
        for policy in policies:
            for rule in policy.rules(direction):
                if not matching & self._rule_bit(rule):
                    continue
                hit = self.cnp_connections(rule, destination).intersection(undecided)
                if hit.empty:
                    continue
                if rule.action == ACCEPT:
                    accepted = accepted.union(hit)
                elif rule.action == DENY:
                    denied = denied.union(hit)
                undecided = undecided.difference(hit)
                if undecided.empty:
                    break
            if undecided.empty:
                break
        self._walks[key] = (accepted, denied)
        return accepted, denied

    def cnp_connections(self, rule: CnpRule, destination: Endpoint | None) -> Connections:
        key = (id(rule), self._ports_of(destination))
        found = self._cnp_conns.get(key)
        if found is None:
            found = cnp_rule_connections(rule, destination)
            self._cnp_conns[key] = found
        return found

    def policy_side(self, subject: Endpoint, direction: str, other: Endpoint | None,
                    other_ip: str, destination: Endpoint | None) -> Connections:
        """What `subject`'s NetworkPolicies of `direction` admit (everything when none
        isolates it)."""
        policies = self.ev.selecting(subject, direction)
        if not policies:
            return ALL_CONNECTIONS
        rules, named = self._rules_of(policies, direction)
        mask = 0
        for i, (namespace, rule) in enumerate(rules):
            if self._matches_peer(namespace, rule, other, other_ip):
                mask |= 1 << i
        if not mask:
            return NO_CONNECTIONS
        key = (id(rules), mask, self._ports_of(destination) if named else None)
        found = self._unions.get(key)
        if found is None:
            found = NO_CONNECTIONS
            for i, (_, rule) in enumerate(rules):
                if mask >> i & 1:
                    found = found.union(self._connections(rule, destination))
                    if found.everything:
                        break
            self._unions[key] = found
        return found

    def between(self, src: Endpoint, dst: Endpoint) -> Connections:
        egress = self.side(src, EGRESS, dst, "", dst)
        if egress.empty:
            return egress
        return egress.intersection(self.side(dst, INGRESS, src, "", dst))

    def to_address(self, src: Endpoint, address: str) -> Connections:
        return self.side(src, EGRESS, None, address, None)

    def from_address(self, address: str, dst: Endpoint) -> Connections:
        return self.side(dst, INGRESS, None, address, dst)


def connectivity(cluster: Cluster, peers: Sequence[Workload]) -> ConnList:
    """Every ordered pair of peers with what it allows (nothing allowed: no entry).

    `cluster` gives the namespaces and the policies; its endpoints are not used
    (the peers' endpoints stand for them). A workload is never paired with itself,
    an address range never with another.
    """
    judged = Cluster(cluster.namespaces, tuple(p.endpoint for p in peers), cluster.policies,
                     cluster.cluster_policies)
    sides = Sides(judged)
    sources = address_ranges(cluster.policies, INGRESS,
                             cluster_policies=cluster.cluster_policies)
    destinations = address_ranges(cluster.policies, EGRESS,
                                  cluster_policies=cluster.cluster_policies)
    out: list[Connection] = []
    for src in peers:
        for dst in peers:
            if src.name != dst.name:
                out.append(Connection(src.name, dst.name,
                                      sides.between(src.endpoint, dst.endpoint)))
        for rng in destinations:
            out.append(Connection(src.name, rng.render(),
                                  sides.to_address(src.endpoint, rng.sample)))
    for rng in sources:
        for dst in peers:
            out.append(Connection(rng.render(), dst.name,
                                  sides.from_address(rng.sample, dst.endpoint)))
    kept = sorted((c for c in out if not c.connections.empty), key=lambda c: (c.src, c.dst))
    return ConnList(tuple(kept), sources, destinations)


# ---- renderings (netpol-analyzer's formats) --------------------------------------------

LIST_FORMATS = ("txt", "json", "csv", "md")


def render_txt(result: ConnList) -> str:
    return "".join(c.render() + "\n" for c in result.connections)


def render_json(result: ConnList) -> str:
    rows = [{"src": c.src, "dst": c.dst, "conn": c.connections.render()}
            for c in result.connections]
    return json.dumps(rows, indent=2) + "\n"


def render_csv(result: ConnList) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["src", "dst", "conn"])
    for c in result.connections:
        writer.writerow([c.src, c.dst, c.connections.render()])
    return buf.getvalue()


def render_md(result: ConnList) -> str:
    lines = ["| src | dst | conn |", "|-----|-----|------|"]
    lines += [f"| {c.src} | {c.dst} | {c.connections.render()} |" for c in result.connections]
    return "\n".join(lines) + "\n"


LIST_RENDERERS = {"txt": render_txt, "json": render_json, "csv": render_csv, "md": render_md}
