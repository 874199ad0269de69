"""Semantics of the eBPF datapath that the nftables one gets from netfilter, with real packets.

* `stockade.io/existing-connections: keep`: a connection the new policy denies is
  cut when the program judges it again, unless every denying side's policies
  keep connections (what the agent's revoker does through conntrack on
  nftables; see `agent.revoke.should_cut`).

Each test builds three endpoints in its own host namespace (see conftest: a
per-test prefix, every namespace removed whatever happens); the datapath's pins
are removed by the fixture, and checked gone.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from stockade.agent.revoke import KEEP_ANNOTATION
from stockade.compile.lower import compile_cluster
from stockade.datapath.ebpf import EbpfDatapath
from stockade.model.cluster import Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.labels import Labels
from stockade.model.policy import EGRESS, INGRESS, NetworkPolicy, Peer, PolicyPort
from stockade.model.policy import Rule as PRule
from stockade.model.selector import Selector

from .netio import EchoServer, connect, echo

pytestmark = pytest.mark.privileged

PORT = 7777


def _ep(trio, name: str) -> Endpoint:
    att = getattr(trio, name)
    return Endpoint("x", name, Labels({"pod": name}), (att.address4, att.address6),
                    (ContainerPort(PORT, "TCP", "echo"),))


def _cluster(trio, *policies: NetworkPolicy) -> Cluster:
    ns = Namespace("x", Labels({"kubernetes.io/metadata.name": "x"}))
    return Cluster((ns,), tuple(_ep(trio, n) for n in "abc"), policies)


def _keep(keep: bool) -> Labels:
    return Labels({KEEP_ANNOTATION: " Keep "} if keep else {})  # case and blanks ignored


def _a_ingress_from(source: str, keep: bool = False) -> NetworkPolicy:
    return NetworkPolicy(
        "x", "a-ingress", Selector(Labels({"pod": "a"})),
        ingress=(PRule((PolicyPort("TCP", PORT),),
                       (Peer(pod_selector=Selector(Labels({"pod": source}))),)),),
        policy_types=(INGRESS,), annotations=_keep(keep))


def _b_egress_to(dest: str, keep: bool = False) -> NetworkPolicy:
    return NetworkPolicy(
        "x", "b-egress", Selector(Labels({"pod": "b"})),
        egress=(PRule((PolicyPort("TCP", PORT),),
                      (Peer(pod_selector=Selector(Labels({"pod": dest}))),)),),
        policy_types=(EGRESS,), annotations=_keep(keep))


@pytest.fixture
def datapath(trio) -> Iterator[EbpfDatapath]:
    dp = EbpfDatapath(netns=trio.host_netns)
    try:
        dp.check()
        yield dp
    finally:
        EbpfDatapath(netns=trio.host_netns).remove()
        assert not dp.dir.exists()


@pytest.fixture
def held(trio, datapath) -> Iterator[socket.socket]:
    """a isolated for ingress (TCP/7777 from b), b for egress (TCP/7777 to a), and a
    connection b -> a held open across the test."""
    datapath.apply(compile_cluster(_cluster(trio, _a_ingress_from("b"), _b_egress_to("a"))))
    with EchoServer(trio.a.netns, PORT):
        conn = connect(trio.b.netns, trio.a.address4, PORT)
        try:
            assert echo(conn, b"one")
            yield conn
        finally:
            conn.close()


def test_a_revoked_connection_is_cut_without_keep(trio, datapath, held) -> None:
    datapath.apply(compile_cluster(_cluster(trio, _a_ingress_from("c"), _b_egress_to("a"))))
    assert not echo(held, b"two")
    assert datapath.stats()["cut"] >= 1


def test_keep_on_the_denying_side_keeps_the_connection(trio, datapath, held) -> None:
    kept = compile_cluster(_cluster(trio, _a_ingress_from("c", keep=True), _b_egress_to("a")))
    datapath.apply(kept)
    assert echo(held, b"two")
    assert echo(held, b"three")
    stats = datapath.stats()
    assert stats["rejudged"] >= 1 and stats["cut"] == 0
    # a new connection is still judged by the new policy: b may no longer open one
    with pytest.raises(OSError):
        connect(trio.b.netns, trio.a.address4, PORT).close()
    # the keep mark reads back: a new process adopts without writing
    again = EbpfDatapath(netns=trio.host_netns)
    assert again.diff(kept).empty and again.apply(kept).empty
    assert again.last_timing["entries"] == 0
    # once the policy no longer keeps, the next change cuts the connection
    datapath.apply(compile_cluster(_cluster(trio, _a_ingress_from("c"), _b_egress_to("a"))))
    assert not echo(held, b"four")
    assert datapath.stats()["cut"] >= 1


def test_both_sides_deny_and_only_one_keeps_cuts(trio, datapath, held) -> None:
    datapath.apply(compile_cluster(_cluster(trio, _a_ingress_from("c", keep=True),
                                            _b_egress_to("c"))))
    assert not echo(held, b"two")
    assert datapath.stats()["cut"] >= 1


def test_both_sides_deny_and_both_keep_keeps(trio, datapath, held) -> None:
    datapath.apply(compile_cluster(_cluster(trio, _a_ingress_from("c", keep=True),
                                            _b_egress_to("c", keep=True))))
    assert echo(held, b"two")
    assert datapath.stats()["cut"] == 0


def test_keep_on_a_side_that_allows_does_not_save_the_other(trio, datapath, held) -> None:
    # b's egress still allows (and keeps); a's ingress denies without keep: cut
    datapath.apply(compile_cluster(_cluster(trio, _a_ingress_from("c"),
                                            _b_egress_to("a", keep=True))))
    assert not echo(held, b"two")
