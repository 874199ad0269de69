"""Hypothesis strategies for random valid ClusterNetworkPolicies over a `Universe`.

Priorities are drawn from a few values so that ties (broken by name) and
interleavings of tiers happen often; peers are namespaces, pods, networks
(egress only, as the CRD allows) and now and then a peer stockade cannot read
(`nodes`), which fails closed. A rule with a `networks` peer never names a port
(the CRD's rule). `networks` CIDRs are drawn around the universe's ranges, /0
included, so that pods' and external addresses fall inside and outside them.

    from tests.property.tier_strategies import cnp_scenarios

    @given(cnp_scenarios(DENSE))
    def test_something(sc: Scenario) -> None:
        sc.cluster.cluster_policies  # 0..max_cluster_policies of them
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

from hypothesis import strategies as st
from tests.property.strategies import (
    Scenario,
    Universe,
    clusters,
    external_ips,
    ip_blocks,
    namespace_selectors,
    pod_selectors,
    probes,
)

from stockade.model.cluster import Cluster
from stockade.model.cnp import (
    ACTIONS,
    ADMIN,
    BASELINE,
    NAMESPACES,
    NETWORKS,
    PODS,
    UNKNOWN,
    ClusterNetworkPolicy,
    CnpPeer,
    CnpPort,
    CnpRule,
)
from stockade.model.policy import EGRESS, INGRESS
from stockade.model.selector import ALL

PRIORITIES = (0, 1, 2, 1000)


@cache
def subjects(u: Universe) -> st.SearchStrategy[CnpPeer]:
    """Half the time every namespace, so that tiers meet on the same pods often."""
    return st.one_of(
        st.just(CnpPeer(NAMESPACES)),
        st.one_of(st.builds(CnpPeer, st.just(NAMESPACES), namespace_selectors(u)),
                  st.builds(CnpPeer, st.just(PODS), namespace_selectors(u), pod_selectors(u)),
                  st.builds(CnpPeer, st.just(PODS), st.just(ALL), pod_selectors(u))))


@cache
def networks(u: Universe) -> st.SearchStrategy[tuple[str, ...]]:
    return st.lists(ip_blocks(u).map(lambda b: b.cidr), min_size=1, max_size=2,
                    unique=True).map(tuple)


@cache
def cnp_peers(u: Universe, direction: str) -> st.SearchStrategy[CnpPeer]:
    options = [subjects(u),
               st.just(CnpPeer(UNKNOWN, written=("nodes",)))]
    if direction == EGRESS:
        options.append(st.builds(lambda n: CnpPeer(NETWORKS, networks=n), networks(u)))
    return st.one_of(*options)


@cache
def cnp_ports(u: Universe) -> st.SearchStrategy[CnpPort]:
    protos = st.sampled_from(u.protocols)
    ranges = sorted({(p, e) for p in u.ports for e in (*u.ports, p + 1) if p <= e <= 65535})
    return st.one_of(
        st.builds(lambda proto, p: CnpPort(proto, p, p), protos, st.sampled_from(u.ports)),
        st.builds(lambda proto, r: CnpPort(proto, r[0], r[1]), protos, st.sampled_from(ranges)),
        st.builds(lambda name: CnpPort(name=name), st.sampled_from(u.port_names)))


@st.composite
def cnp_rules(draw: st.DrawFn, u: Universe, direction: str) -> CnpRule:
    peers = tuple(draw(st.lists(cnp_peers(u, direction), min_size=1, max_size=u.max_peers)))
    ports: tuple[CnpPort, ...] | None = None
    if draw(st.booleans()):
        entries = draw(st.lists(cnp_ports(u), min_size=1, max_size=u.max_ports))
        if any(p.kind == NETWORKS for p in peers):
            entries = [e for e in entries if not e.name] or [CnpPort(u.protocols[0], 1, 1024)]
        ports = tuple(entries)
    return CnpRule(draw(st.sampled_from(ACTIONS)), peers, ports,
                   draw(st.sampled_from(("", "r"))))


@st.composite
def cluster_network_policies(draw: st.DrawFn, u: Universe, name: str = "cnp"
                             ) -> ClusterNetworkPolicy:
    return ClusterNetworkPolicy(
        name=name,
        tier=draw(st.sampled_from((ADMIN, BASELINE))),
        priority=draw(st.sampled_from(PRIORITIES)),
        subject=draw(subjects(u)),
        ingress=tuple(draw(st.lists(cnp_rules(u, INGRESS), max_size=u.max_rules))),
        egress=tuple(draw(st.lists(cnp_rules(u, EGRESS), max_size=u.max_rules))))


@st.composite
def cnp_sets(draw: st.DrawFn, u: Universe, *, min_size: int = 0, max_size: int = 3,
             prefix: str = "cnp") -> tuple[ClusterNetworkPolicy, ...]:
    """Policies with unique names (`cnp-0`, `cnp-1`, ...)."""
    n = draw(st.integers(min_size, max_size))
    return tuple(draw(cluster_network_policies(u, f"{prefix}-{i}")) for i in range(n))


@st.composite
def cnp_clusters(draw: st.DrawFn, u: Universe, *, min_cnps: int = 1, max_cnps: int = 3,
                 min_policies: int = 0) -> Cluster:
    """A cluster with NetworkPolicies and ClusterNetworkPolicies."""
    base = draw(clusters(u, with_policies=True, min_policies=min_policies))
    cnps = draw(cnp_sets(u, min_size=min_cnps, max_size=max_cnps))
    return Cluster(base.namespaces, base.endpoints, base.policies, cnps)


@st.composite
def cnp_scenarios(draw: st.DrawFn, u: Universe, *, min_cnps: int = 1, max_cnps: int = 3,
                  max_probes: int = 4) -> Scenario:
    cluster = draw(cnp_clusters(u, min_cnps=min_cnps, max_cnps=max_cnps))
    return Scenario(cluster, draw(external_ips(u, cluster)), draw(probes(u, max_probes)))


def cnp_cidrs(policies: Sequence[ClusterNetworkPolicy]) -> list[str]:
    """Every `networks` CIDR of the policies."""
    return [text for p in policies for r in p.ingress + p.egress for peer in r.peers
            for text in peer.networks]
