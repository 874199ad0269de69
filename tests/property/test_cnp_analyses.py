"""The bulk analyses with ClusterNetworkPolicy tiers against the reference evaluator.

For random small clusters with random NetworkPolicies and ClusterNetworkPolicies
(`tests.property.tier_strategies`): the matrix's bitsets give the evaluator's
tables; `stockade list`'s port intervals are the evaluator's verdicts on sampled
ports of every protocol and on addresses inside and outside every ipBlock and
every `networks` CIDR; `diff` reports exactly the sampled connections whose
verdict differs when the tiers change.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.property.strategies import DEFAULT, DENSE, Universe
from tests.property.test_connectivity import _range_of, addresses_of, sample_ports
from tests.property.tier_strategies import cnp_cidrs, cnp_clusters, cnp_scenarios

from stockade.engine.connectivity import Connections, connectivity, workload_peers
from stockade.engine.evaluate import Evaluator, Flow
from stockade.engine.matrix import compute_matrix, evaluator_judge
from stockade.model.cluster import Cluster
from stockade.model.policy import PROTOCOLS, IPBlock, NetworkPolicy, Peer, Rule
from stockade.model.selector import ALL

UNIVERSES = {"default": DEFAULT, "dense": DENSE}


@settings(max_examples=150, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(UNIVERSES)))
def test_matrix_bitsets_equal_the_evaluator(data: st.DataObject, name: str) -> None:
    u: Universe = UNIVERSES[name]
    sc = data.draw(cnp_scenarios(u), label="scenario")
    names = sorted({p.name for ep in sc.cluster.endpoints for p in ep.ports if p.name})
    ports: list[int | str] = [port for port, _ in sc.probes]
    ports += names[:2]
    protocols = sorted({proto for _, proto in sc.probes})
    fast = compute_matrix(sc.cluster, ports, protocols)
    slow = compute_matrix(sc.cluster, ports, protocols, judge=evaluator_judge(sc.cluster))
    assert fast == slow


# ---- stockade list ---------------------------------------------------------------------


def tier_ports(cluster: Cluster, u: Universe) -> list[int]:
    """Every edge of every port entry (NetworkPolicy and tiers), its neighbours,
    container ports, and the ends of the port space."""
    ports = set(sample_ports(cluster, u))
    for policy in cluster.cluster_policies:
        for rule in policy.ingress + policy.egress:
            for entry in rule.ports or ():
                if not entry.name:
                    ports |= {entry.start - 1, entry.start, entry.start + 1,
                              entry.end - 1, entry.end, entry.end + 1}
    return sorted(p for p in ports if 1 <= p <= 65535)


def tier_addresses(cluster: Cluster, version: int = 4) -> list[str]:
    """Inside and just outside every ipBlock, except and `networks` CIDR, and the ends."""
    blocks = tuple(IPBlock(text) for text in cnp_cidrs(cluster.cluster_policies))
    extra = NetworkPolicy("x", "cidrs", ALL, ingress=(Rule((), tuple(
        Peer(ip_block=b) for b in blocks)),)) if blocks else None
    return addresses_of(cluster.policies + ((extra,) if extra else ()), version)


def _check(conns: Connections, ev: Evaluator, flow: Flow, ports: list[int], what: str) -> None:
    for protocol in PROTOCOLS:
        for port in ports:
            f = Flow(flow.src, flow.src_ip, flow.dst, flow.dst_ip, port, protocol)
            assert conns.allows(protocol, port) == ev.allowed(f), \
                f"{what} {protocol}/{port}: list says {conns.render()}"


@settings(max_examples=120, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(UNIVERSES)))
def test_list_equals_the_evaluator(data: st.DataObject, name: str) -> None:
    u: Universe = UNIVERSES[name]
    cluster = data.draw(cnp_clusters(u), label="cluster")
    peers, warnings = workload_peers(cluster.endpoints, {}, ())
    assert not warnings
    result = connectivity(cluster, peers)
    lines = {(c.src, c.dst): c.connections for c in result.connections}
    judged = Cluster(cluster.namespaces, tuple(p.endpoint for p in peers), cluster.policies,
                     cluster.cluster_policies)
    ev = Evaluator(judged)
    ports = tier_ports(cluster, u)
    none = Connections()
    for s in peers:
        for d in peers:
            if s is not d:
                _check(lines.get((s.name, d.name), none), ev,
                       Flow(s.endpoint, "", d.endpoint, "", 0, "TCP"), ports,
                       f"{s.name} => {d.name}")
    for address in tier_addresses(cluster):
        src_range = _range_of(result.sources, address).render()
        dst_range = _range_of(result.destinations, address).render()
        for p in peers:
            _check(lines.get((src_range, p.name), none), ev,
                   Flow(None, address, p.endpoint, "", 0, "TCP"), ports,
                   f"{address} in {src_range} => {p.name}")
            _check(lines.get((p.name, dst_range), none), ev,
                   Flow(p.endpoint, "", None, address, 0, "TCP"), ports,
                   f"{p.name} => {address} in {dst_range}")
