"""Clusters over the `trio` fixture's endpoints x/a, x/b, x/c, and probing them.

Shared by the datapath tests (nftables, iptables, eBPF), which program the same
clusters into the kernel and expect the same verdicts from real packets. A test
module takes the probe servers with ``from .clusters import servers as servers``.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from stockade.compile.ir import Chain, ChainRule, Ruleset
from stockade.compile.lower import compile_cluster
from stockade.compile.plan import Plan
from stockade.datapath.base import Datapath
from stockade.model.cluster import Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.labels import Labels
from stockade.model.policy import EGRESS, INGRESS, IPBlock, NetworkPolicy, Peer, PolicyPort
from stockade.model.policy import Rule as PRule
from stockade.model.selector import Selector
from stockade.probe.client import Probe, run_probes
from stockade.probe.launcher import ProbeServer
from stockade.probe.protocol import Port, Protocol

from .netio import EchoServer, connect, echo

# What every endpoint serves (the `servers` fixture) and the probes try.
PORTS = [Port(80, Protocol.TCP), Port(81, Protocol.TCP), Port(80, Protocol.UDP),
         Port(80, Protocol.SCTP)]

# The pairs `allow_only("a", "b")` denies over `all_pairs()`: a is isolated for ingress,
# only b on TCP/80 gets in; nothing else is restricted.
A_ONLY_FROM_B = {("b", "a", "TCP/81"), ("b", "a", "UDP/80"), ("b", "a", "SCTP/80"),
                 ("c", "a", "TCP/80"), ("c", "a", "TCP/81"), ("c", "a", "UDP/80"),
                 ("c", "a", "SCTP/80")}


def namespace(name: str) -> Namespace:
    return Namespace(name, Labels({"kubernetes.io/metadata.name": name, "ns": name}))


def endpoint(trio: Any, name: str, **labels: str) -> Endpoint:
    """x/`name` at the trio's addresses, labelled pod=`name` and `labels`, serving TCP/80,
    bound to its bridge port and MAC (the datapath guards them)."""
    att = getattr(trio, name)
    return Endpoint("x", name, Labels({"pod": name, **labels}),
                    (att.address4, att.address6), (ContainerPort(80, "TCP", "http"),),
                    port=att.host_ifname, mac=att.mac)


def allow_only(target: str, source: str, port: int = 80) -> NetworkPolicy:
    """`target` isolated for ingress, admitting only `source` on TCP `port`."""
    return NetworkPolicy(
        "x", f"allow-{source}-to-{target}", Selector(Labels({"pod": target})),
        ingress=(PRule((PolicyPort("TCP", port),),
                       (Peer(pod_selector=Selector(Labels({"pod": source}))),)),),
        policy_types=(INGRESS,))


# c isolated both ways: a change that leaves connections between a and b alone.
ISOLATE_C = NetworkPolicy("x", "isolate-c", Selector(Labels({"pod": "c"})),
                          policy_types=(INGRESS, EGRESS))


def egress_to_block_except_c(trio: Any) -> NetworkPolicy:
    """a isolated for egress, admitted to TCP/80 of the trio's /24 except c's /32."""
    block = IPBlock(trio.b.address4.rsplit(".", 1)[0] + ".0/24", (f"{trio.c.address4}/32",))
    return NetworkPolicy("x", "egress-a", Selector(Labels({"pod": "a"})),
                         egress=(PRule((PolicyPort("TCP", 80),), (Peer(ip_block=block),)),),
                         policy_types=(EGRESS,))


# The probes that judge `egress_to_block_except_c`, and what they see: b on TCP/80 only.
EGRESS_PAIRS = [("a", "b", PORTS[0]), ("a", "c", PORTS[0]), ("a", "b", PORTS[1])]
EGRESS_SEEN = {("a", "b", "TCP/80"): True, ("a", "c", "TCP/80"): False,
               ("a", "b", "TCP/81"): False}


def cluster(trio: Any, *policies: NetworkPolicy, **relabel: dict[str, str]) -> Cluster:
    """Namespace x with a, b and c and `policies`; ``b={"role": "client"}`` adds labels."""
    eps = tuple(endpoint(trio, n, **relabel.get(n, {})) for n in "abc")
    return Cluster((namespace("x"),), eps, policies)


def refused(good: Ruleset, address: str) -> Ruleset:
    """`good` with `address`'s ingress judged by a chain that names a set it does not
    have: a ruleset the kernel refuses, after `good`'s sets and chains are in place."""
    return Ruleset(
        dict(good.sets),
        {**good.chains, "i-broken": Chain("i-broken", "ingress",
                                           (ChainRule(4, "s4-doesnotexist"),))},
        {**good.ingress, address: "i-broken"},
        dict(good.egress))


@pytest.fixture
def servers(trio: Any) -> Iterator[ProbeServer]:
    """Probe servers on every `PORTS` port of a, b and c."""
    with ProbeServer({a.netns: PORTS for a in trio.all}) as server:
        yield server


def probe(trio: Any, pairs: Iterable[tuple[str, str, Port]],
          family: int = 4) -> dict[tuple[str, str, str], bool]:
    """Each (source, destination, port) probed over IPv`family`: whether it got through."""
    atts = {a.key.split("/")[1]: a for a in trio.all}
    probes = []
    for s, d, port in pairs:
        dst = atts[d]
        addr = dst.address4 if family == 4 else dst.address6
        probes.append(Probe(s, atts[s].netns, d, addr, port))
    return {(v.probe.src, v.probe.dst, str(v.probe.port)): v.allowed
            for v in run_probes(probes, timeout=0.8)}


def all_pairs() -> list[tuple[str, str, Port]]:
    """Every port between every two of a, b and c."""
    return [(s, d, p) for s in "abc" for d in "abc" if s != d for p in PORTS]


def denied(trio: Any, family: int = 4) -> set[tuple[str, str, str]]:
    """What of `all_pairs()` does not get through over IPv`family`."""
    return {k for k, ok in probe(trio, all_pairs(), family).items() if not ok}


@contextmanager
def across_an_unrelated_change(trio: Any, datapath: Datapath,
                               port: int = 7777) -> Iterator[tuple[socket.socket, Plan]]:
    """b's connection to an echo server on a:`port`, a admitting only b there, kept
    open across a change that isolates only c: the connection (still echoing) and the
    change's delta. The connection is closed on leaving."""
    allow = allow_only("a", "b", port)
    datapath.apply(compile_cluster(cluster(trio, allow)))
    with EchoServer(trio.a.netns, port):
        conn = connect(trio.b.netns, trio.a.address4, port)
        try:
            assert echo(conn, b"one")
            delta = datapath.apply(compile_cluster(cluster(trio, allow, ISOLATE_C)))
            assert echo(conn, b"two")
            yield conn, delta
        finally:
            conn.close()
