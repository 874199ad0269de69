"""Diff: the connections a policy change opens and closes, exact over every port."""

from __future__ import annotations

import random
from typing import Any

from stockade.engine.diff import (
    CLOSED,
    OPENED,
    Change,
    PortRange,
    diff_policies,
    merge_ranges,
    port_intervals,
)
from stockade.engine.evaluate import Evaluator
from stockade.model.cluster import NS_NAME_LABEL, Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.decode import decode_network_policy
from stockade.model.labels import Labels
from stockade.model.policy import PROTOCOLS, NetworkPolicy

EVERY = (1, 65535)


def policy(ns: str, name: str, spec: dict[str, Any]) -> NetworkPolicy:
    return decode_network_policy({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                                  "metadata": {"namespace": ns, "name": name}, "spec": spec})


def standard() -> Cluster:
    """x, y, z by a, b, c, serving 80 and 81 on every protocol (named serve-N-proto)."""
    nss = tuple(Namespace(n, Labels({"ns": n, NS_NAME_LABEL: n})) for n in "xyz")
    ports = tuple(ContainerPort(p, proto, f"serve-{p}-{proto.lower()}")
                  for p in (80, 81) for proto in PROTOCOLS)
    eps = tuple(Endpoint(n, p, Labels({"pod": p}), (f"192.168.{i + 1}.{(j + 1) * 10}",), ports)
                for i, n in enumerate("xyz") for j, p in enumerate("abc"))
    return Cluster(nss, eps, ())


def ranges(change: Change) -> dict[str, list[tuple[int, int]]]:
    return {p.protocol: [(r.low, r.high) for r in p.ranges] for p in change.ports}


DENY_X = policy("x", "deny", {"podSelector": {}})
ALLOW_Z_UDP_81 = policy("x", "allow-z", {"podSelector": {}, "ingress": [{
    "from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}],
    "ports": [{"protocol": "UDP", "port": "serve-81-udp"}]}]})


def test_port_intervals_split_on_every_bound() -> None:
    pol = policy("x", "p", {"podSelector": {}, "ingress": [{"ports": [
        {"port": 80}, {"port": 1000, "endPort": 2000}, {"port": "web"},
        {"protocol": "UDP", "port": 53}]}]})
    pods = [Endpoint("x", "a", Labels(), ("10.0.0.1",), (ContainerPort(8080, name="web"),))]
    got = [(r.low, r.high) for r in port_intervals([pol], pods, "TCP")]
    assert got == [(1, 79), (80, 80), (81, 999), (1000, 2000), (2001, 8079), (8080, 8080),
                   (8081, 65535)]
    assert [(r.low, r.high) for r in port_intervals([pol], pods, "SCTP")] == [EVERY]


def test_merge_ranges() -> None:
    got = merge_ranges([PortRange(81, 90), PortRange(1, 79), PortRange(91, 100),
                        PortRange(95, 120)])
    assert got == (PortRange(1, 79), PortRange(81, 120))


def test_same_policies_no_change() -> None:
    c = standard()
    assert diff_policies(c, [DENY_X, ALLOW_Z_UDP_81], [ALLOW_Z_UDP_81, DENY_X]).changes == ()


def test_new_default_deny_closes_everything_into_x() -> None:
    result = diff_policies(standard(), [], [DENY_X])
    assert result.opened == ()
    # 9 sources, 3 destinations in x, minus the 3 self pairs.
    assert len(result.closed) == 24
    first = result.closed[0]
    assert (first.src, first.dst) == ("x/a", "x/b")
    assert ranges(first) == {"TCP": [EVERY], "UDP": [EVERY], "SCTP": [EVERY]}
    assert first.reason == "x/b now isolated for ingress by NetworkPolicy x/deny (new), " \
                           "and no rule allows it"
    assert first.render() == ("- x/a -> x/b TCP/* UDP/* SCTP/* (closed: x/b now isolated for "
                              "ingress by NetworkPolicy x/deny (new), and no rule allows it)")


def test_allow_on_a_named_port_opens_exactly_that_port() -> None:
    result = diff_policies(standard(), [DENY_X], [DENY_X, ALLOW_Z_UDP_81])
    assert result.closed == ()
    assert {(c.src, c.dst) for c in result.opened} == {
        (f"z/{s}", f"x/{d}") for s in "abc" for d in "abc"}
    for change in result.opened:
        assert ranges(change) == {"UDP": [(81, 81)]}
        assert change.reason == "by NetworkPolicy x/allow-z (new) ingress[0]"
    assert result.opened[0].render() == \
        "+ z/a -> x/a UDP/81 (opened by NetworkPolicy x/allow-z (new) ingress[0])"


def test_narrowing_a_rule_closes_the_rest_of_the_ports() -> None:
    wide = policy("x", "web", {"podSelector": {"matchLabels": {"pod": "a"}},
                               "ingress": [{"ports": [{"port": 80, "endPort": 90}]}]})
    narrow = policy("x", "web", {"podSelector": {"matchLabels": {"pod": "a"}},
                                 "ingress": [{"ports": [{"port": 80}]}]})
    result = diff_policies(standard(), [wide], [narrow])
    assert len(result.closed) == 8 and result.opened == ()
    for change in result.closed:
        assert change.dst == "x/a"
        assert ranges(change) == {"TCP": [(81, 90)]}
        assert change.reason == "NetworkPolicy x/web ingress[0] no longer allows it"


def test_removing_isolation_says_so() -> None:
    egress = policy("y", "lock", {"podSelector": {"matchLabels": {"pod": "b"}},
                                  "policyTypes": ["Egress"]})
    result = diff_policies(standard(), [egress], [])
    assert len(result.opened) == 8
    assert {c.reason for c in result.opened} == {"y/b no longer isolated for egress"}
    assert result.opened[0].render().endswith("(opened: y/b no longer isolated for egress)")


def test_diff_is_exact_on_sampled_ports() -> None:
    """Each claimed change is a real change, and every real change is claimed."""
    old = [DENY_X, policy("x", "r", {"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [
        {"ports": [{"port": 70, "endPort": 85}, {"protocol": "SCTP", "port": "serve-80-sctp"}]}]})]
    new = [DENY_X, ALLOW_Z_UDP_81, policy("x", "r", {
        "podSelector": {"matchLabels": {"pod": "b"}},
        "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": 79, "endPort": 100}]}]})]
    cluster = standard()
    result = diff_policies(cluster, old, new)
    claimed: dict[tuple[str, str, str, int], str] = {}
    for change in result.changes:
        for ps in change.ports:
            for r in ps.ranges:
                for port in (r.low, r.high, (r.low + r.high) // 2):
                    claimed[(change.src, change.dst, ps.protocol, port)] = change.change
    before, after = Evaluator(cluster.with_policies(old)), Evaluator(cluster.with_policies(new))
    rng = random.Random(7)
    ports = {1, 53, 69, 70, 78, 79, 80, 81, 85, 86, 100, 101, 65535} | \
        {rng.randint(1, 65535) for _ in range(20)}
    for src in cluster.endpoints:
        for dst in cluster.endpoints:
            if src.key == dst.key:
                continue
            for proto in PROTOCOLS:
                for port in ports:
                    was = before.allowed(before.flow(src, dst, port, proto))
                    now = after.allowed(after.flow(src, dst, port, proto))
                    in_diff = any(
                        c.src == src.key and c.dst == dst.key and any(
                            ps.protocol == proto and any(r.low <= port <= r.high
                                                         for r in ps.ranges)
                            for ps in c.ports)
                        for c in result.changes)
                    assert in_diff == (was != now), (src.key, dst.key, proto, port)
    pods = {ep.key: ep for ep in cluster.endpoints}
    for (s, d, proto, port), kind in claimed.items():
        ev = after if kind == OPENED else before  # the side on which it is allowed
        assert ev.allowed(ev.flow(pods[s], pods[d], port, proto))
    assert {c.change for c in result.changes} == {OPENED, CLOSED}
