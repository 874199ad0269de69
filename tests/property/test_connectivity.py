"""`stockade list`'s exact connectivity against the reference evaluator.

For random clusters and policies, the connections `engine.connectivity` computes
on port intervals for every ordered pair of peers must be what the evaluator says
about sampled ports of every protocol (the edges of every policy port and range,
their neighbours, container ports, 1 and 65535), and, for the external ranges,
about addresses inside and outside every ipBlock and every except (each falls in
one range, which must answer as the evaluator does for that address).
"""

from __future__ import annotations

import ipaddress
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.property.strategies import DEFAULT, DENSE, Universe, clusters, policy_sets

from stockade.engine.connectivity import (
    IPV4_LAST,
    AddressRange,
    Connections,
    address_ranges,
    connectivity,
    workload_peers,
)
from stockade.engine.diff import diff_policies, render_range
from stockade.engine.evaluate import Evaluator, Flow
from stockade.model.cidr import parse_cidr
from stockade.model.cluster import Cluster, Endpoint
from stockade.model.policy import EGRESS, INGRESS, PROTOCOLS, IPBlock, NetworkPolicy


def sample_ports(cluster: Cluster, u: Universe) -> list[int]:
    ports = {1, 2, 65534, 65535, *u.probe_ports()}
    for ep in cluster.endpoints:
        ports |= {p.port for p in ep.ports}
    for policy in cluster.policies:
        for rule in policy.ingress + policy.egress:
            for entry in rule.ports:
                for edge in (entry.port, entry.end_port):
                    if isinstance(edge, int):
                        ports |= {edge - 1, edge, edge + 1}
    return sorted(p for p in ports if 1 <= p <= 65535)


def _blocks(policies: tuple[NetworkPolicy, ...]) -> list[IPBlock]:
    return [peer.ip_block for p in policies for r in p.ingress + p.egress for peer in r.peers
            if peer.ip_block is not None]


def sample_addresses(cluster: Cluster) -> list[str]:
    """Inside and just outside every ipBlock and every except (IPv4), and the ends."""
    return addresses_of(cluster.policies)


def addresses_of(policies: tuple[NetworkPolicy, ...], version: int = 4) -> list[str]:
    last = IPV4_LAST if version == 4 else 2**128 - 1
    make = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    numbers = {0, 1, last - 1, last}
    if version == 4:
        numbers.add(int(ipaddress.IPv4Address("10.1.0.7")))
    for block in _blocks(policies):
        for text in (block.cidr, *block.except_):
            net = parse_cidr(text)
            if net is None or net.version != version:
                continue
            lo, hi = int(net.network_address), int(net.broadcast_address)
            numbers |= {lo - 1, lo, lo + 1, (lo + hi) // 2, hi - 1, hi, hi + 1}
    return [str(make(n)) for n in sorted(numbers) if 0 <= n <= last]


def _range_of(ranges: tuple[AddressRange, ...], address: str) -> AddressRange:
    ip = ipaddress.ip_address(address)
    n = int(ip)
    found = [r for r in ranges if r.version == ip.version and r.first <= n <= r.last]
    assert len(found) == 1, (address, ranges)
    return found[0]


def _check(conns: Connections, ev: Evaluator, flow: Flow, ports: list[int], what: str) -> None:
    for protocol in PROTOCOLS:
        for port in ports:
            f = Flow(flow.src, flow.src_ip, flow.dst, flow.dst_ip, port, protocol)
            assert conns.allows(protocol, port) == ev.allowed(f), \
                f"{what} {protocol}/{port}: list says {conns.render()}"


def _partition(ranges: tuple[AddressRange, ...]) -> None:
    assert ranges[0].first == 0
    assert ranges[-1].last == IPV4_LAST
    for a, b in itertools.pairwise(ranges):
        assert a.last + 1 == b.first


@settings(max_examples=80, deadline=None)
@given(cluster=clusters(DEFAULT, with_policies=True))
def test_list_equals_the_evaluator(cluster: Cluster) -> None:
    _compare(cluster, DEFAULT)


@settings(max_examples=80, deadline=None)
@given(cluster=clusters(DENSE, with_policies=True))
def test_list_equals_the_evaluator_dense(cluster: Cluster) -> None:
    _compare(cluster, DENSE)


def _compare(cluster: Cluster, u: Universe) -> None:
    peers, warnings = workload_peers(cluster.endpoints, {}, ())
    assert not warnings
    result = connectivity(cluster, peers)
    _partition(result.sources)
    _partition(result.destinations)
    lines = {(c.src, c.dst): c.connections for c in result.connections}
    assert all(not c.empty for c in lines.values())
    judged = Cluster(cluster.namespaces, tuple(p.endpoint for p in peers), cluster.policies)
    ev = Evaluator(judged)
    ports = sample_ports(cluster, u)
    none = Connections()
    for s in peers:
        assert (s.name, s.name) not in lines
        for d in peers:
            if s is d:
                continue
            flow = Flow(s.endpoint, "", d.endpoint, "", 0, "TCP")
            _check(lines.get((s.name, d.name), none), ev, flow, ports, f"{s.name} => {d.name}")
    for address in sample_addresses(cluster):
        src_range = _range_of(result.sources, address).render()
        dst_range = _range_of(result.destinations, address).render()
        for p in peers:
            _check(lines.get((src_range, p.name), none), ev,
                   Flow(None, address, p.endpoint, "", 0, "TCP"), ports,
                   f"{address} in {src_range} => {p.name}")
            _check(lines.get((p.name, dst_range), none), ev,
                   Flow(p.endpoint, "", None, address, 0, "TCP"), ports,
                   f"{p.name} => {address} in {dst_range}")


def test_every_line_names_a_peer_or_a_range() -> None:
    """A smoke check of the shape on one hand-made cluster (the properties above
    hold the contents)."""
    from stockade.model.cluster import Namespace
    from stockade.model.labels import Labels
    from stockade.model.policy import Peer, PolicyPort, Rule
    from stockade.model.selector import ALL

    ns = Namespace("x", Labels({"kubernetes.io/metadata.name": "x"}))
    a = Endpoint("x", "a", Labels({"app": "a"}), ())
    b = Endpoint("x", "b", Labels({"app": "b"}), ())
    policy = NetworkPolicy("x", "p", ALL, ingress=(Rule(
        (PolicyPort("TCP", 80),),
        (Peer(ip_block=IPBlock("0.0.0.0/0", ("10.0.0.0/8",))),)),), policy_types=(INGRESS,))
    cluster = Cluster((ns,), (a, b), (policy,))
    peers, _ = workload_peers(cluster.endpoints, {}, ())
    text = [c.render() for c in connectivity(cluster, peers).connections]
    assert text == [
        "0.0.0.0-9.255.255.255[External] => x/a[Pod] : TCP 80",
        "0.0.0.0-9.255.255.255[External] => x/b[Pod] : TCP 80",
        "11.0.0.0-255.255.255.255[External] => x/a[Pod] : TCP 80",
        "11.0.0.0-255.255.255.255[External] => x/b[Pod] : TCP 80",
        "x/a[Pod] => 0.0.0.0-255.255.255.255[External] : All Connections",
        "x/b[Pod] => 0.0.0.0-255.255.255.255[External] : All Connections",
    ]


@settings(max_examples=60, deadline=None)
@given(cluster=clusters(DEFAULT), data=st.data())
def test_diff_covers_external_addresses_exactly(cluster: Cluster, data: st.DataObject) -> None:
    """`diff` between two random policy sets, towards and from external addresses:
    a (pod, address, protocol, port) is in a change line (of the range holding the
    address) exactly when the evaluator's verdict on it differs."""
    names = tuple(ns.name for ns in cluster.namespaces)
    old = data.draw(policy_sets(DEFAULT, names, prefix="old"))
    new = data.draw(policy_sets(DEFAULT, names, prefix="new"))
    result = diff_policies(cluster, old, new, external=True)
    before = Evaluator(cluster.with_policies(old))
    after = Evaluator(cluster.with_policies(new))
    ports = sample_ports(cluster.with_policies(old + new), DEFAULT)
    changed: dict[tuple[str, str], list[tuple[str, int, int]]] = {}
    for c in result.changes:
        for ps in c.ports:
            changed.setdefault((c.src, c.dst), []).extend(
                (ps.protocol, r.low, r.high) for r in ps.ranges)

    def listed(src: str, dst: str, protocol: str, port: int) -> bool:
        return any(p == protocol and lo <= port <= hi
                   for p, lo, hi in changed.get((src, dst), ()))

    sources = address_ranges(old + new, INGRESS) + address_ranges(old + new, INGRESS, 6)
    destinations = address_ranges(old + new, EGRESS) + address_ranges(old + new, EGRESS, 6)
    for address in addresses_of(old + new) + addresses_of(old + new, 6):
        inbound = render_range(_range_of(sources, address))
        outbound = render_range(_range_of(destinations, address))
        for pod in cluster.endpoints:
            for protocol in PROTOCOLS:
                for port in ports:
                    into = Flow(None, address, pod, pod.ips[0], port, protocol)
                    assert listed(inbound, pod.key, protocol, port) == \
                        (before.allowed(into) != after.allowed(into)), (address, pod.key)
                    out = Flow(pod, pod.ips[0], None, address, port, protocol)
                    assert listed(pod.key, outbound, protocol, port) == \
                        (before.allowed(out) != after.allowed(out)), (pod.key, address)
