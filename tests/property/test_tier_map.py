"""A tier chain's decisions (compile/tiermap.py) give every packet the rule the chain's
walk meets first (compile/interpret.py's `rule_matches`, in order), on random clusters
with ClusterNetworkPolicies: pods' and external addresses, every probed port and
protocol, the pieces' edges."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from tests.property.strategies import DENSE, Scenario
from tests.property.tier_strategies import cnp_scenarios

from stockade.compile.interpret import rule_matches
from stockade.compile.ir import EGRESS, Chain, Ruleset
from stockade.compile.lower import compile_cluster
from stockade.compile.tiermap import PROTO_NUMBER, decisions, first_rule, segments


def _walk(rs: Ruleset, chain: Chain, start: int, stop: int, peer: str, dst: str,
          proto: str, port: int) -> int | None:
    return next((i for i in range(start, stop)
                 if rule_matches(rs, chain.rules[i], peer, dst, proto, port)), None)


def _addresses(sc: Scenario, rs: Ruleset) -> set[str]:
    out = {a for ep in sc.cluster.endpoints for a in ep.ips} | set(sc.external_ips)
    for s in rs.sets.values():
        for e in s.elements:
            if isinstance(e, str) and "/" in e:
                net = ipaddress.ip_network(e, strict=False)
                for a in (net.network_address, net.broadcast_address):
                    out |= {str(a)} | {str(a + d) for d in (-1, 1) if 0 <= int(a) + d
                                       <= (1 << net.max_prefixlen) - 1}
    return out


@settings(max_examples=200, deadline=None)
@given(cnp_scenarios(DENSE, max_cnps=4))
def test_the_decisions_are_the_walk(sc: Scenario) -> None:
    rs = compile_cluster(sc.cluster)
    probes = {(p, proto) for p, proto in sc.probes} | {(80, "TCP"), (53, "UDP"), (1, "SCTP")}
    peers = _addresses(sc, rs)
    # an ingress chain's own endpoint: only its family counts (named ports stay rules)
    dst = {4: "10.255.255.254", 6: "fd00:ffff::fe"}
    for chain in rs.chains.values():
        if not chain.tier or chain.calls is not None:
            continue
        for start, stop, foldable in segments(chain):
            if not foldable:
                continue
            for family in (4, 6):
                found = decisions(chain, start, stop, family, rs.sets)
                # disjoint pieces: at most one holds a packet
                for peer in peers:
                    a = ipaddress.ip_address(peer)
                    if a.version != family:
                        continue
                    target = peer if chain.direction == EGRESS else dst[family]
                    for port, proto in probes:
                        want = _walk(rs, chain, start, stop, peer, target, proto, port)
                        hits = [d for d in found if d.addr[0] <= int(a) <= d.addr[1]
                                and d.proto[0] <= PROTO_NUMBER[proto.lower()] <= d.proto[1]
                                and d.port[0] <= port <= d.port[1]]
                        assert len(hits) <= 1, hits
                        got = first_rule(found, int(a), PROTO_NUMBER[proto.lower()], port)
                        assert got == want, (chain.name, peer, proto, port)
