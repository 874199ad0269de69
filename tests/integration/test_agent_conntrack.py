"""Cutting established connections when a policy change revokes them, against the kernel.

The codec tests at the top need no privileges; the rest build the trio (see
conftest), hold a real TCP connection from x/b to x/a across a policy change,
and run the revocation the agent runs: list conntrack, decide, delete.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator

import pytest

from stockade.agent.revoke import connections_to_cut
from stockade.compile.lower import compile_cluster
from stockade.datapath.conntrack import (
    Conntrack,
    decode_entry,
    delete_request,
    dump_request,
)
from stockade.datapath.nft import NftDatapath
from stockade.engine.evaluate import Evaluator
from stockade.model.cluster import Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.connection import ConnEntry
from stockade.model.labels import Labels
from stockade.model.policy import INGRESS, KEEP_ANNOTATION, NetworkPolicy, Peer, PolicyPort
from stockade.model.policy import Rule as PRule
from stockade.model.selector import Selector
from stockade.netlink import attr, iter_messages, nested

from .netio import EchoServer, connect, echo, receive

PORT = 7777

# ---- codec (no privileges) ---------------------------------------------------------------


def _tuple(kind: int, src: str, dst: str, proto: int, sport: int, dport: int) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    ip_kinds = (1, 2) if s.version == 4 else (3, 4)
    return nested(kind,
                  nested(1, attr(ip_kinds[0], s.packed), attr(ip_kinds[1], d.packed)),
                  nested(2, attr(1, bytes([proto])), attr(2, struct.pack("!H", sport)),
                         attr(3, struct.pack("!H", dport))))


def test_decode_entry_reads_both_tuples_state_zone_and_id() -> None:
    body = (struct.pack("=BBH", socket.AF_INET6, 0, 0)
            + _tuple(1, "fd00::b", "fd00::100", 6, 40000, 80)  # to a service address
            + _tuple(2, "fd00::a", "fd00::b", 6, 8080, 40000)  # answered by the pod
            + nested(4, nested(1, attr(1, bytes([3]))))  # TCP ESTABLISHED
            + attr(18, struct.pack("!H", 7)) + attr(12, struct.pack("!I", 99)))
    assert decode_entry(body) == ConnEntry("TCP", "fd00::b", "fd00::100", 40000, 80,
                                           "ESTABLISHED", 7, "fd00::a", 8080, 99)


def test_delete_request_names_the_original_tuple_id_and_zone() -> None:
    entry = ConnEntry("UDP", "10.0.0.2", "10.0.0.1", 5353, 53, zone=3, id=12)
    (msg,) = iter_messages(delete_request(entry, 41))
    assert (msg.kind, msg.seq, msg.flags) == ((1 << 8) | 2, 41, 0x1 | 0x4)
    assert msg.payload[0] == socket.AF_INET
    # what the kernel gets back decodes to the same tuple (no reply tuple, no state)
    assert decode_entry(msg.payload) == ConnEntry("UDP", "10.0.0.2", "10.0.0.1", 5353, 53,
                                                  zone=3, id=12)
    with pytest.raises(ValueError, match="ICMP"):
        delete_request(ConnEntry("ICMP", "10.0.0.2", "10.0.0.1"), 1)


def test_dump_request_asks_every_family() -> None:
    (msg,) = iter_messages(dump_request(5))
    assert msg.kind == (1 << 8) | 1 and msg.flags & 0x300 == 0x300
    assert msg.payload[:2] == bytes([socket.AF_UNSPEC, 0])


# ---- against the kernel ------------------------------------------------------------------


def _ep(trio, name: str) -> Endpoint:
    att = getattr(trio, name)
    return Endpoint("x", name, Labels({"pod": name}), (att.address4, att.address6),
                    (ContainerPort(PORT, "TCP", "echo"),))


def _cluster(trio, *policies: NetworkPolicy) -> Cluster:
    ns = Namespace("x", Labels({"kubernetes.io/metadata.name": "x"}))
    return Cluster((ns,), tuple(_ep(trio, n) for n in "abc"), policies)


def _a_ingress_from(source: str, keep: bool = False) -> NetworkPolicy:
    return NetworkPolicy(
        "x", "a-ingress", Selector(Labels({"pod": "a"})),
        ingress=(PRule((PolicyPort("TCP", PORT),),
                       (Peer(pod_selector=Selector(Labels({"pod": source}))),)),),
        policy_types=(INGRESS,),
        annotations=Labels({KEEP_ANNOTATION: "keep"} if keep else {}))


def _ours(entries: list[ConnEntry], trio) -> list[ConnEntry]:
    return [e for e in entries if e.protocol == "TCP" and e.dport == PORT
            and e.src == trio.b.address4 and e.dst == trio.a.address4]


@pytest.fixture
def held(trio) -> Iterator[tuple[NftDatapath, EchoServer, socket.socket]]:
    """a isolated for ingress, b allowed on TCP/7777, and a connection b -> a held open."""
    dp = NftDatapath(netns=trio.host_netns)
    dp.apply(compile_cluster(_cluster(trio, _a_ingress_from("b"))))
    with EchoServer(trio.a.netns, PORT) as server:
        conn = connect(trio.b.netns, trio.a.address4, PORT)
        try:
            assert echo(conn, b"one")
            yield dp, server, conn
        finally:
            conn.close()


def _revoke(trio, cluster: Cluster) -> tuple[list[ConnEntry], int]:
    """What the agent does after applying a cluster: list, decide, delete."""
    with Conntrack(trio.host_netns) as ct:
        cut = connections_to_cut(ct.entries(), Evaluator(cluster))
        return cut, ct.delete(cut)


@pytest.mark.privileged
def test_entries_are_those_of_the_namespace_and_delete_counts(trio, held) -> None:
    with Conntrack(trio.host_netns) as ct:
        (entry,) = _ours(ct.entries(), trio)
        assert entry.state == "ESTABLISHED" and entry.reply_src == trio.a.address4
        assert entry.reply_sport == PORT and entry.id is not None
        with Conntrack() as mine:  # this process's own namespace: another table
            assert not _ours(mine.entries(), trio)
        stale = ConnEntry(entry.protocol, entry.src, entry.dst, entry.sport, entry.dport,
                          id=(entry.id or 0) ^ 1)
        assert ct.delete([stale]) == 0  # the id no longer names this connection: refused
        assert ct.delete([entry]) == 1
        assert ct.delete([entry]) == 0  # gone already is not an error
        assert not _ours(ct.entries(), trio)


@pytest.mark.privileged
def test_revocation_cuts_an_established_connection(trio, held) -> None:
    dp, server, conn = held
    revoked = _cluster(trio, _a_ingress_from("c"))
    dp.apply(compile_cluster(revoked))
    assert echo(conn, b"two")  # established traffic outlives the policy that allowed it
    cut, deleted = _revoke(trio, revoked)
    assert [(e.src, e.dst, e.dport) for e in cut] == [(trio.b.address4, trio.a.address4, PORT)]
    assert deleted == 1
    assert not echo(conn, b"three")  # the client's next segment is new to conntrack: dropped
    server.push("pushed")
    assert receive(conn) is None  # and so is the server's
    assert not echo(conn, b"four")


@pytest.mark.privileged
def test_keep_annotation_keeps_the_connection(trio, held) -> None:
    dp, _server, conn = held
    revoked = _cluster(trio, _a_ingress_from("c", keep=True))
    dp.apply(compile_cluster(revoked))
    cut, deleted = _revoke(trio, revoked)
    assert cut == [] and deleted == 0
    assert echo(conn, b"two")
    with Conntrack(trio.host_netns) as ct:
        assert len(_ours(ct.entries(), trio)) == 1


@pytest.mark.privileged
def test_allowed_connections_are_left_alone(trio, held) -> None:
    dp, _server, conn = held
    still = _cluster(trio, _a_ingress_from("b"),
                     NetworkPolicy("x", "isolate-c", Selector(Labels({"pod": "c"})),
                                   policy_types=(INGRESS,)))
    dp.apply(compile_cluster(still))
    assert _revoke(trio, still) == ([], 0)
    assert echo(conn, b"two")
