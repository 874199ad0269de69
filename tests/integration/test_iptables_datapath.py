"""The iptables + ipset datapath against the real kernel, with real packets.

Each test builds three endpoints in its own host namespace (see conftest) and
programs them through `IptablesDatapath`, on both iptables backends (nf_tables
and legacy; both work per network namespace on this kernel). Removing the
namespace removes its iptables rules and ipsets, so nothing outlives a test
even when it fails.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.compile.iptables import Layout
from stockade.compile.ir import Chain, ChainRule, Ruleset
from stockade.compile.lower import compile_cluster
from stockade.datapath import open_datapath
from stockade.datapath.iptables import BACKEND_ENV, IptablesDatapath
from stockade.errors import DataplaneError
from stockade.model.cluster import Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.labels import Labels
from stockade.model.policy import EGRESS, INGRESS, IPBlock, NetworkPolicy, Peer, PolicyPort
from stockade.model.policy import Rule as PRule
from stockade.model.selector import Selector
from stockade.net.namespace import entered
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


@pytest.fixture(params=["nft", "legacy"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def datapath(trio, backend: str) -> Iterator[IptablesDatapath]:
    dp = IptablesDatapath(Layout.of(trio.host_netns.split("-")[0], log_group=100),
                          netns=trio.host_netns, backend=backend)
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


def _run(netns: str, *argv: str, check: bool = True) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], check=check,
                          capture_output=True, text=True).stdout


def _ipt(dp: IptablesDatapath, family: int, *args: str) -> str:
    tool = f"{'iptables' if family == 4 else 'ip6tables'}-{dp.backend}"
    assert dp.netns is not None
    return _run(dp.netns, tool, "-w", *args)


# ---- enforcement ---------------------------------------------------------------------------

def test_policy_enforced_with_real_packets_v4_and_v6(trio, datapath, servers) -> None:
    rs = compile_cluster(_cluster(trio, _deny_ingress_except("a", "b")))
    datapath.apply(rs)
    for family in (4, 6):
        seen = _probe(trio, _all_pairs(), family)
        denied = {k for k, ok in seen.items() if not ok}
        assert denied == {("b", "a", "TCP/81"), ("b", "a", "UDP/80"), ("b", "a", "SCTP/80"),
                          ("c", "a", "TCP/80"), ("c", "a", "TCP/81"), ("c", "a", "UDP/80"),
                          ("c", "a", "SCTP/80")}, family


def test_ipblock_except_and_egress(trio, datapath, servers) -> None:
    block = IPBlock(trio.b.address4.rsplit(".", 1)[0] + ".0/24", (f"{trio.c.address4}/32",))
    pol = NetworkPolicy("x", "egress-a", Selector(Labels({"pod": "a"})),
                        egress=(PRule((PolicyPort("TCP", 80),), (Peer(ip_block=block),)),),
                        policy_types=(EGRESS,))
    datapath.apply(compile_cluster(_cluster(trio, pol)))
    assert "nomatch" in datapath.show()  # the except is a hole, not 24 networks
    assert _probe(trio, [("a", "b", PORTS[0]), ("a", "c", PORTS[0]), ("a", "b", PORTS[1])]) == {
        ("a", "b", "TCP/80"): True, ("a", "c", "TCP/80"): False, ("a", "b", "TCP/81"): False}


def test_restart_adopts_what_the_kernel_holds(trio, datapath, backend) -> None:
    rs = compile_cluster(_cluster(trio, _deny_ingress_except("a", "b")))
    assert not datapath.apply(rs).empty
    again = IptablesDatapath(datapath.layout, netns=trio.host_netns, backend=backend)
    assert again.diff(rs).empty
    assert again.apply(rs).empty
    assert again.last_drift is None
    assert again.processes == 6  # two read-backs (diff, apply), three tools each
    assert again.skeleton_intact()


def test_an_endpoint_change_is_one_ipset_session(trio, datapath, servers) -> None:
    pol = NetworkPolicy("x", "clients", Selector(Labels({"pod": "a"})), ingress=(
        PRule((PolicyPort("TCP", 80),), (Peer(pod_selector=Selector(Labels({"role": "client"}))),)),
    ))
    datapath.apply(compile_cluster(_cluster(trio, pol, b={"role": "client"})))
    assert _probe(trio, [("b", "a", PORTS[0]), ("c", "a", PORTS[0])]) == {
        ("b", "a", "TCP/80"): True, ("c", "a", "TCP/80"): False}
    before = datapath.processes
    delta = datapath.apply(compile_cluster(_cluster(trio, pol, c={"role": "client"})))
    assert not delta.add_chains and not delta.del_chains and not delta.add_sets
    assert datapath.processes == before + 1
    assert _probe(trio, [("b", "a", PORTS[0]), ("c", "a", PORTS[0])]) == {
        ("b", "a", "TCP/80"): False, ("c", "a", "TCP/80"): True}
    assert datapath.diff(compile_cluster(_cluster(trio, pol, c={"role": "client"}))).empty


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
            assert delta.add_chains and not delta.del_chains
            assert echo(conn, b"two")
        finally:
            conn.close()


def test_a_refused_restore_leaves_the_previous_rules(trio, datapath, servers) -> None:
    good = compile_cluster(_cluster(trio, _deny_ingress_except("a", "b")))
    datapath.apply(good)
    saved = {fam: _ipt(datapath, fam, "-S") for fam in (4, 6)}
    broken = Ruleset(
        dict(good.sets),
        {**good.chains, "i-broken": Chain("i-broken", "ingress",
                                           (ChainRule(4, "s4-doesnotexist"),))},
        {**good.ingress, trio.c.address4: "i-broken"},
        dict(good.egress))
    with pytest.raises(DataplaneError, match="refused"):
        datapath.apply(broken)
    assert {fam: _ipt(datapath, fam, "-S") for fam in (4, 6)} == saved  # atomic per table
    assert _probe(trio, [("c", "a", PORTS[0]), ("b", "a", PORTS[0]), ("a", "c", PORTS[0])]) == {
        ("c", "a", "TCP/80"): False, ("b", "a", "TCP/80"): True, ("a", "c", "TCP/80"): True}
    # the sets the refused apply made first are cleared away by the next one
    datapath.apply(good)
    assert datapath.diff(good).empty and datapath.skeleton_intact()
    assert "i4-broken" not in datapath.show()


# ---- drift ------------------------------------------------------------------------------------

def test_drift_is_seen_and_repaired(trio, datapath, servers) -> None:
    rs = compile_cluster(_cluster(trio, _deny_ingress_except("a", "b")))
    datapath.apply(rs)
    prefix = datapath.layout.names.prefix
    chain = next(c for c in rs.chains if c.startswith("i-"))
    kchain = prefix + chain
    blocked = [("c", "a", PORTS[0])]
    closed = {("c", "a", "TCP/80"): False}

    # a flushed chain: a hole, seen only by a verifying apply, repaired
    _ipt(datapath, 4, "-F", kchain)
    assert _probe(trio, blocked) == {("c", "a", "TCP/80"): True}
    assert [c.name for c in datapath.diff(rs).replace_chains] == [chain]
    assert datapath.apply(rs).empty  # without verify, the last apply is trusted
    assert [c.name for c in datapath.apply(rs, verify=True).replace_chains] == [chain]
    assert datapath.last_drift is not None
    assert any("rules differ" in d for d in datapath.last_drift_details)
    assert _probe(trio, blocked) == closed

    # a foreign rule inserted into our chain
    _ipt(datapath, 4, "-I", kchain, "1", "-j", "RETURN")
    assert _probe(trio, blocked) == {("c", "a", "TCP/80"): True}
    datapath.apply(rs, verify=True)
    assert any("rules differ" in d for d in datapath.last_drift_details)
    assert _probe(trio, blocked) == closed

    # a member deleted from a set: b loses access, and gets it back
    peer = next(s for s in rs.sets.values() if s.name.startswith("s4-")
                and trio.b.address4 in s.elements)
    _run(trio.host_netns, "ipset", "del", prefix + peer.name, trio.b.address4)
    assert _probe(trio, [("b", "a", PORTS[0])]) == {("b", "a", "TCP/80"): False}
    delta = datapath.apply(rs, verify=True)
    assert [(s.name, set(e)) for s, e in delta.add_elements] == [(peer.name,
                                                                 {trio.b.address4})]
    assert datapath.last_drift is not None and not datapath.last_drift.empty
    assert _probe(trio, [("b", "a", PORTS[0])]) == {("b", "a", "TCP/80"): True}

    # the jump from FORWARD deleted: nothing enforced, then everything again
    jump = next(line for line in _ipt(datapath, 4, "-S", "FORWARD").splitlines()
                if f"-j {prefix}forward" in line)
    _ipt(datapath, 4, *_words(jump.replace("-A FORWARD", "-D FORWARD", 1)))
    assert _probe(trio, blocked) == {("c", "a", "TCP/80"): True}
    assert not datapath.skeleton_intact()
    datapath.apply(rs, verify=True)
    assert any("jump from FORWARD" in d for d in datapath.last_drift_details)
    assert _probe(trio, blocked) == closed

    # a foreign chain in our namespace and a flushed dispatch chain
    _ipt(datapath, 6, "-N", prefix + "intruder")
    _ipt(datapath, 4, "-F", prefix + "ingress")
    assert _probe(trio, blocked) == {("c", "a", "TCP/80"): True}
    datapath.apply(rs, verify=True)
    assert any("foreign chain" in d for d in datapath.last_drift_details)
    assert any("dispatch chain" in d for d in datapath.last_drift_details)
    assert prefix + "intruder" not in _ipt(datapath, 6, "-S")
    assert _probe(trio, blocked) == closed
    assert datapath.skeleton_intact() and datapath.diff(rs).empty

    # everything wiped by another process: the jump, every chain of ours, every set
    IptablesDatapath(datapath.layout, netns=trio.host_netns, backend=datapath.backend).remove()
    assert _probe(trio, blocked) == {("c", "a", "TCP/80"): True}
    datapath.apply(rs, verify=True)
    assert datapath.last_drift is not None and datapath.last_drift_details
    assert _probe(trio, blocked) == closed

    # after all that, a new reader is in sync
    again = IptablesDatapath(datapath.layout, netns=trio.host_netns, backend=datapath.backend)
    assert again.apply(rs).empty and again.last_drift is None


def _words(line: str) -> list[str]:
    import shlex
    return shlex.split(line)


# ---- what is not ours --------------------------------------------------------------------------

def test_nothing_foreign_is_flushed(trio, datapath) -> None:
    _ipt(datapath, 4, "-A", "FORWARD", "-s", "192.0.2.1", "-j", "ACCEPT")
    _ipt(datapath, 6, "-A", "FORWARD", "-s", "2001:db8::1", "-j", "DROP")
    _ipt(datapath, 4, "-N", "USER-CHAIN")
    _ipt(datapath, 4, "-A", "USER-CHAIN", "-j", "RETURN")
    _run(trio.host_netns, "ipset", "create", "user-set", "hash:ip")
    _run(trio.host_netns, "ipset", "add", "user-set", "192.0.2.7")
    before = {fam: _ipt(datapath, fam, "-S") for fam in (4, 6)}
    datapath.apply(compile_cluster(_cluster(trio, _deny_ingress_except("a", "b"))))
    forward = _ipt(datapath, 4, "-S", "FORWARD").splitlines()
    assert f"-j {datapath.layout.names.prefix}forward" in forward[1]  # ours first
    assert forward[2] == "-A FORWARD -s 192.0.2.1/32 -j ACCEPT"
    assert "-A USER-CHAIN -j RETURN" in _ipt(datapath, 4, "-S")
    datapath.apply(compile_cluster(_cluster(trio)), verify=True)
    datapath.remove()
    assert {fam: _ipt(datapath, fam, "-S") for fam in (4, 6)} == before
    assert _run(trio.host_netns, "ipset", "list", "-n").split() == ["user-set"]
    assert "192.0.2.7" in _run(trio.host_netns, "ipset", "list", "user-set")


# ---- backends ------------------------------------------------------------------------------------

def _legacy_tables(netns: str) -> str:
    with entered(netns):
        return Path("/proc/thread-self/net/ip_tables_names").read_text()


def test_the_backend_is_the_one_holding_rules(host_netns: str) -> None:
    dp = IptablesDatapath(netns=host_netns)
    assert dp.detect_backend() == "nft"
    assert _legacy_tables(host_netns) == ""  # detection loaded no legacy table
    _run(host_netns, "iptables-legacy", "-w", "-A", "FORWARD", "-j", "ACCEPT")
    assert dp.detect_backend() == "legacy"
    seen: list[str] = []  # the agent's threads see the namespace's tables too
    worker = threading.Thread(target=lambda: seen.append(dp.detect_backend()))
    worker.start()
    worker.join()
    assert seen == ["legacy"]
    _run(host_netns, "iptables-nft", "-w", "-A", "FORWARD", "-j", "ACCEPT")
    assert dp.detect_backend() == "nft"  # a tie
    _run(host_netns, "iptables-nft", "-w", "-A", "FORWARD", "-j", "ACCEPT")
    assert dp.detect_backend() == "nft"


def test_open_datapath_and_the_backend_override(host_netns: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    dp = open_datapath("iptables", "stktest", netns=host_netns, owner=True, log_group=5)
    assert isinstance(dp, IptablesDatapath)
    assert dp.layout.log_group == 5 and "no table ownership" in dp.owner_status
    monkeypatch.setenv(BACKEND_ENV, "legacy")
    dp = open_datapath("iptables", "stktest", netns=host_netns)
    assert isinstance(dp, IptablesDatapath) and dp.backend == "legacy"
    monkeypatch.setenv(BACKEND_ENV, "bogus")
    with pytest.raises(DataplaneError, match="no iptables backend"):
        open_datapath("iptables", "stktest", netns=host_netns)


# ---- the conformance corpus ----------------------------------------------------------------------
