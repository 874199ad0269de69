"""The connection sets of `stockade list`: interval algebra and netpol-analyzer's words."""

from __future__ import annotations

import pytest

from stockade.engine.connectivity import (
    ALL_CONNECTIONS,
    NO_CONNECTIONS,
    AddressRange,
    Connections,
    address_ranges,
    block_ranges,
    rule_connections,
)
from stockade.model.cluster import ContainerPort, Endpoint
from stockade.model.labels import Labels
from stockade.model.policy import EGRESS, INGRESS, IPBlock, NetworkPolicy, Peer, PolicyPort, Rule


def conns(**ports: list[tuple[int, int]]) -> Connections:
    return Connections.of(ports)


@pytest.mark.parametrize(("value", "text"), [
    (ALL_CONNECTIONS, "All Connections"),
    (conns(TCP=[(1, 65535)], UDP=[(1, 65535)], SCTP=[(1, 65535)]), "All Connections"),
    (conns(TCP=[(8080, 8080)]), "TCP 8080"),
    (conns(UDP=[(53, 53)]), "UDP 53"),
    (conns(TCP=[(10053, 10053)], UDP=[(10053, 10053)]), "TCP 10053,UDP 10053"),
    (conns(SCTP=[(9090, 9090), (8956, 8956)]), "SCTP 8956,9090"),
    (conns(TCP=[(8080, 8080), (9090, 9090)], UDP=[(8080, 8080)]), "TCP 8080,9090,UDP 8080"),
    (conns(SCTP=[(1, 9002), (9004, 65535)], TCP=[(1, 65535)], UDP=[(1, 65535)]),
     "SCTP 1-9002,9004-65535,TCP 1-65535,UDP 1-65535"),
    (conns(TCP=[(80, 80), (81, 90), (443, 443)], UDP=[(53, 53)], SCTP=[(1, 9002)]),
     "SCTP 1-9002,TCP 80-90,443,UDP 53"),
])
def test_render(value: Connections, text: str) -> None:
    assert value.render() == text


def test_union_and_intersection_are_on_intervals() -> None:
    a = conns(TCP=[(1, 100), (200, 300)])
    b = conns(TCP=[(50, 250)], UDP=[(53, 53)])
    assert a.union(b) == conns(TCP=[(1, 300)], UDP=[(53, 53)])
    assert a.intersection(b) == conns(TCP=[(50, 100), (200, 250)])
    assert a.intersection(NO_CONNECTIONS).empty
    assert a.union(NO_CONNECTIONS) == a
    assert ALL_CONNECTIONS.intersection(a) == a
    assert a.allows("TCP", 250) and not a.allows("TCP", 150) and not a.allows("UDP", 100)


def test_rule_ports_resolve_named_ports_on_the_destination() -> None:
    dst = Endpoint("x", "d", Labels(), (), (ContainerPort(8080, "TCP", "http"),
                                            ContainerPort(53, "UDP", "dns")))
    rule = Rule((PolicyPort("TCP", "http"), PolicyPort("TCP", "dns"),
                 PolicyPort("UDP", None), PolicyPort("SCTP", 100, 200)))
    assert rule_connections(rule, dst) == conns(TCP=[(8080, 8080)], UDP=[(1, 65535)],
                                                SCTP=[(100, 200)])
    assert rule_connections(rule, None) == conns(UDP=[(1, 65535)], SCTP=[(100, 200)])
    assert rule_connections(Rule(), None) == ALL_CONNECTIONS


def test_block_ranges_after_excepts() -> None:
    assert block_ranges(IPBlock("10.0.0.0/8", ("10.0.0.0/9", "10.128.0.0/9"))) == []
    assert block_ranges(IPBlock("0.0.0.0/0", ("10.0.0.0/8",))) == [
        (0, 0x09FFFFFF), (0x0B000000, 2**32 - 1)]
    assert block_ranges(IPBlock("fd00::/8")) == []


def _ranges(policy: NetworkPolicy, direction: str) -> list[str]:
    return [r.render() for r in address_ranges([policy], direction)]


def test_ranges_follow_format_md() -> None:
    for excepts in (("10.0.0.0/8",), ("10.0.0.0/9", "10.128.0.0/9")):
        policy = NetworkPolicy("x", "p", ingress=(Rule(peers=(
            Peer(ip_block=IPBlock("0.0.0.0/0", excepts)),)),))
        assert _ranges(policy, INGRESS) == [
            "0.0.0.0-9.255.255.255[External]", "10.0.0.0-10.255.255.255[External]",
            "11.0.0.0-255.255.255.255[External]"]
        assert _ranges(policy, EGRESS) == ["0.0.0.0-255.255.255.255[External]"]
    single = NetworkPolicy("x", "p", egress=(Rule(peers=(
        Peer(ip_block=IPBlock("49.50.1.2/32")),)),), policy_types=(EGRESS,))
    assert "49.50.1.2-49.50.1.2[External]" in _ranges(single, EGRESS)
    assert AddressRange(0, 0).sample == "0.0.0.0"
