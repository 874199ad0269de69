"""The nftables datapath against the real kernel, with real packets.

Each test builds endpoints in its own host namespace (see conftest), programs
policies compiled from the model, and checks the kernel: verdicts by probing,
deltas by their size, atomicity by a refused transaction, drift by tampering
(so without an owned table: `owner=False`; see test_nft_integrity.py for more).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from stockade.compile.ir import Chain, ChainRule, Ruleset
from stockade.compile.lower import compile_cluster
from stockade.datapath.nft import NftDatapath
from stockade.errors import DataplaneError
from stockade.model.cluster import Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.labels import Labels
from stockade.model.policy import EGRESS, INGRESS, IPBlock, NetworkPolicy, Peer, PolicyPort
from stockade.model.policy import Rule as PRule
from stockade.model.selector import Selector
from stockade.probe.client import Probe, run_probes
from stockade.probe.launcher import ProbeServer
from stockade.probe.protocol import Port, Protocol

from .netio import EchoServer, connect, echo

pytestmark = pytest.mark.privileged

PORTS = [Port(80, Protocol.TCP), Port(81, Protocol.TCP), Port(80, Protocol.UDP),
         Port(80, Protocol.SCTP)]


def _ns(name: str) -> Namespace:
    return Namespace(name, Labels({"kubernetes.io/metadata.name": name, "ns": name}))


def _ep(trio, name: str, **labels: str) -> Endpoint:
    att = getattr(trio, name)
    return Endpoint("x", name, Labels({"pod": name, **labels}),
                    (att.address4, att.address6), (ContainerPort(80, "TCP", "http"),))


def _deny_ingress_except(target: str, source: str, port: int = 80) -> NetworkPolicy:
    return NetworkPolicy(
        "x", f"allow-{source}-to-{target}", Selector(Labels({"pod": target})),
        ingress=(PRule((PolicyPort("TCP", port),),
                       (Peer(pod_selector=Selector(Labels({"pod": source}))),)),),
        policy_types=(INGRESS,))


def _cluster(trio, *policies: NetworkPolicy, **relabel: dict[str, str]) -> Cluster:
    eps = tuple(_ep(trio, n, **relabel.get(n, {})) for n in "abc")
    return Cluster((_ns("x"),), eps, policies)


@pytest.fixture
def datapath(trio) -> Iterator[NftDatapath]:
    dp = NftDatapath(netns=trio.host_netns, owner=False)
    dp.check()
    yield dp


@pytest.fixture
def servers(trio) -> Iterator[ProbeServer]:
    with ProbeServer({a.netns: PORTS for a in trio.all}) as server:
        yield server


def _probe(trio, pairs, family: int = 4) -> dict[tuple[str, str, str], bool]:
    atts = {a.key.split("/")[1]: a for a in trio.all}
    probes = []
    for s, d, port in pairs:
        dst = atts[d]
        addr = dst.address4 if family == 4 else dst.address6
        probes.append(Probe(s, atts[s].netns, d, addr, port))
    return {(v.probe.src, v.probe.dst, str(v.probe.port)): v.allowed
            for v in run_probes(probes, timeout=0.8)}


def _all_pairs():
    return [(s, d, p) for s in "abc" for d in "abc" if s != d for p in PORTS]


def test_policy_enforced_with_real_packets_v4_and_v6(trio, datapath, servers) -> None:
    rs = compile_cluster(_cluster(trio, _deny_ingress_except("a", "b")))
    datapath.apply(rs)
    for family in (4, 6):
        seen = _probe(trio, _all_pairs(), family)
        denied = {k for k, ok in seen.items() if not ok}
        # a is isolated for ingress: only b on TCP/80 gets in; nothing else is restricted
        assert denied == {("b", "a", "TCP/81"), ("b", "a", "UDP/80"), ("b", "a", "SCTP/80"),
                          ("c", "a", "TCP/80"), ("c", "a", "TCP/81"), ("c", "a", "UDP/80"),
                          ("c", "a", "SCTP/80")}, family


def test_restart_adopts_the_table_without_changes(trio, datapath) -> None:
    rs = compile_cluster(_cluster(trio, _deny_ingress_except("a", "b")))
    first = datapath.apply(rs)
    assert not first.empty
    again = NftDatapath(netns=trio.host_netns)  # a new process would start like this
    assert again.diff(rs).empty
    assert again.apply(rs).empty
    assert again.skeleton_intact()


def test_established_connection_survives_unrelated_change(trio, datapath) -> None:
    datapath.apply(compile_cluster(_cluster(trio, _deny_ingress_except("a", "b", 7777))))
    with EchoServer(trio.a.netns, 7777):
        conn = connect(trio.b.netns, trio.a.address4, 7777)
        try:
            assert echo(conn, b"one")
            unrelated = NetworkPolicy("x", "isolate-c", Selector(Labels({"pod": "c"})),
                                      policy_types=(INGRESS, EGRESS))
            delta = datapath.apply(compile_cluster(
                _cluster(trio, _deny_ingress_except("a", "b", 7777), unrelated)))
            assert not delta.empty and not delta.del_chains
            assert echo(conn, b"two")
        finally:
            conn.close()


def test_relabel_moves_an_endpoint_between_sets_only(trio, datapath, servers) -> None:
    pol = _deny_ingress_except("a", "b")
    pol = NetworkPolicy(pol.namespace, pol.name, pol.pod_selector, ingress=(
        PRule((PolicyPort("TCP", 80),), (Peer(pod_selector=Selector(Labels({"role": "client"}))),)),
    ))
    datapath.apply(compile_cluster(_cluster(trio, pol, b={"role": "client"})))
    assert _probe(trio, [("b", "a", PORTS[0]), ("c", "a", PORTS[0])]) == {
        ("b", "a", "TCP/80"): True, ("c", "a", "TCP/80"): False}
    delta = datapath.apply(compile_cluster(_cluster(trio, pol, c={"role": "client"})))
    # only set elements move: no chain, set or map entry is touched
    assert not delta.add_chains and not delta.del_chains and not delta.add_sets
    assert not delta.set_map and not delta.del_map
    moved = {e for _, els in delta.add_elements for e in els} | {
        e for _, els in delta.del_elements for e in els}
    assert moved == {trio.b.address4, trio.c.address4, trio.b.address6, trio.c.address6}
    assert _probe(trio, [("b", "a", PORTS[0]), ("c", "a", PORTS[0])]) == {
        ("b", "a", "TCP/80"): False, ("c", "a", "TCP/80"): True}


def test_refused_transaction_leaves_previous_ruleset(trio, datapath, servers) -> None:
    good = compile_cluster(_cluster(trio, _deny_ingress_except("a", "b")))
    datapath.apply(good)
    before = datapath.show()
    broken = Ruleset(
        dict(good.sets),
        {**good.chains, "i-broken": Chain("i-broken", "ingress",
                                           (ChainRule(4, "s4-doesnotexist"),))},
        {**good.ingress, trio.c.address4: "i-broken"},
        dict(good.egress))
    with pytest.raises(DataplaneError, match="nothing was changed"):
        datapath.apply(broken)
    assert datapath.show() == before
    assert datapath.diff(good).empty
    assert _probe(trio, [("c", "a", PORTS[0]), ("b", "a", PORTS[0]), ("a", "c", PORTS[0])]) == {
        ("c", "a", "TCP/80"): False, ("b", "a", "TCP/80"): True, ("a", "c", "TCP/80"): True}


def test_drift_is_seen_and_repaired(trio, datapath, servers) -> None:
    rs = compile_cluster(_cluster(trio, _deny_ingress_except("a", "b")))
    datapath.apply(rs)
    chain = next(iter(rs.chains))
    _nft(trio.host_netns, f"flush chain inet stockade {chain}")
    assert _probe(trio, [("c", "a", PORTS[0])]) == {("c", "a", "TCP/80"): True}  # hole
    drift = datapath.diff(rs)
    assert [c.name for c in drift.replace_chains] == [chain]
    assert datapath.apply(rs).empty  # without verify, the last apply is trusted
    assert [c.name for c in datapath.apply(rs, verify=True).replace_chains] == [chain]
    assert datapath.diff(rs).empty
    assert _probe(trio, [("c", "a", PORTS[0])]) == {("c", "a", "TCP/80"): False}
    _nft(trio.host_netns, "delete table inet stockade")
    assert not datapath.skeleton_intact()
    datapath.apply(rs, verify=True)
    assert datapath.skeleton_intact() and datapath.diff(rs).empty


def test_foreign_tables_are_left_alone(trio, datapath) -> None:
    _nft(trio.host_netns, "add table inet other")
    _nft(trio.host_netns, "add chain inet other c")
    datapath.apply(compile_cluster(_cluster(trio, _deny_ingress_except("a", "b"))))
    datapath.remove()
    out = _nft_out(trio.host_netns, "list tables")
    assert "table inet other" in out and "stockade" not in out


def test_ipblock_except_and_egress(trio, datapath, servers) -> None:
    block = IPBlock(trio.b.address4.rsplit(".", 1)[0] + ".0/24", (f"{trio.c.address4}/32",))
    pol = NetworkPolicy("x", "egress-a", Selector(Labels({"pod": "a"})),
                        egress=(PRule((PolicyPort("TCP", 80),), (Peer(ip_block=block),)),),
                        policy_types=(EGRESS,))
    datapath.apply(compile_cluster(_cluster(trio, pol)))
    assert _probe(trio, [("a", "b", PORTS[0]), ("a", "c", PORTS[0]), ("a", "b", PORTS[1])]) == {
        ("a", "b", "TCP/80"): True, ("a", "c", "TCP/80"): False, ("a", "b", "TCP/81"): False}


# ---- helpers ----------------------------------------------------------------------------

def _nft(netns: str, command: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "nft", command], check=True)


def _nft_out(netns: str, command: str) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, "nft", command], check=True,
                          capture_output=True, text=True).stdout
