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
from stockade.compile.lower import compile_cluster
from stockade.datapath import open_datapath
from stockade.datapath.iptables import BACKEND_ENV, IptablesDatapath
from stockade.errors import DataplaneError
from stockade.model.labels import Labels
from stockade.model.policy import NetworkPolicy, Peer, PolicyPort
from stockade.model.policy import Rule as PRule
from stockade.model.selector import Selector
from stockade.net.namespace import entered

from . import clusters
from .clusters import A_ONLY_FROM_B, PORTS, allow_only, cluster, denied, probe
from .clusters import servers as servers  # the fixture

pytestmark = pytest.mark.privileged

@pytest.fixture(params=["nft", "legacy"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def datapath(trio, backend: str) -> Iterator[IptablesDatapath]:
    dp = IptablesDatapath(Layout.of(trio.host_netns.split("-")[0], log_group=100),
                          netns=trio.host_netns, backend=backend)
    dp.check()
    yield dp


def _run(netns: str, *argv: str, check: bool = True) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], check=check,
                          capture_output=True, text=True).stdout


def _ipt(dp: IptablesDatapath, family: int, *args: str) -> str:
    tool = f"{'iptables' if family == 4 else 'ip6tables'}-{dp.backend}"
    assert dp.netns is not None
    return _run(dp.netns, tool, "-w", *args)


# ---- enforcement ---------------------------------------------------------------------------

def test_policy_enforced_with_real_packets_v4_and_v6(trio, datapath, servers) -> None:
    rs = compile_cluster(cluster(trio, allow_only("a", "b")))
    datapath.apply(rs)
    for family in (4, 6):
        assert denied(trio, family) == A_ONLY_FROM_B, family


def test_ipblock_except_and_egress(trio, datapath, servers) -> None:
    datapath.apply(compile_cluster(cluster(trio, clusters.egress_to_block_except_c(trio))))
    assert "nomatch" in datapath.show()  # the except is a hole, not 24 networks
    assert probe(trio, clusters.EGRESS_PAIRS) == clusters.EGRESS_SEEN


def test_restart_adopts_what_the_kernel_holds(trio, datapath, backend) -> None:
    rs = compile_cluster(cluster(trio, allow_only("a", "b")))
    assert not datapath.apply(rs).empty
    again = IptablesDatapath(datapath.layout, netns=trio.host_netns, backend=backend)
    assert again.diff(rs).empty
    assert again.apply(rs).empty
    assert again.last_drift is None
    assert again.processes == 8  # two read-backs (diff, apply), four tools each
    assert again.skeleton_intact()


def test_an_endpoint_change_is_one_ipset_session(trio, datapath, servers) -> None:
    pol = NetworkPolicy("x", "clients", Selector(Labels({"pod": "a"})), ingress=(
        PRule((PolicyPort("TCP", 80),), (Peer(pod_selector=Selector(Labels({"role": "client"}))),)),
    ))
    datapath.apply(compile_cluster(cluster(trio, pol, b={"role": "client"})))
    assert probe(trio, [("b", "a", PORTS[0]), ("c", "a", PORTS[0])]) == {
        ("b", "a", "TCP/80"): True, ("c", "a", "TCP/80"): False}
    before = datapath.processes
    delta = datapath.apply(compile_cluster(cluster(trio, pol, c={"role": "client"})))
    assert not delta.add_chains and not delta.del_chains and not delta.add_sets
    assert datapath.processes == before + 1
    assert probe(trio, [("b", "a", PORTS[0]), ("c", "a", PORTS[0])]) == {
        ("b", "a", "TCP/80"): False, ("c", "a", "TCP/80"): True}
    assert datapath.diff(compile_cluster(cluster(trio, pol, c={"role": "client"}))).empty


def test_established_connection_survives_unrelated_change(trio, datapath) -> None:
    with clusters.across_an_unrelated_change(trio, datapath) as (_, delta):
        assert delta.add_chains and not delta.del_chains


def test_a_refused_restore_leaves_the_previous_rules(trio, datapath, servers) -> None:
    good = compile_cluster(cluster(trio, allow_only("a", "b")))
    datapath.apply(good)
    saved = {fam: _ipt(datapath, fam, "-S") for fam in (4, 6)}
    broken = clusters.refused(good, trio.c.address4)
    with pytest.raises(DataplaneError, match="refused"):
        datapath.apply(broken)
    assert {fam: _ipt(datapath, fam, "-S") for fam in (4, 6)} == saved  # atomic per table
    assert probe(trio, [("c", "a", PORTS[0]), ("b", "a", PORTS[0]), ("a", "c", PORTS[0])]) == {
        ("c", "a", "TCP/80"): False, ("b", "a", "TCP/80"): True, ("a", "c", "TCP/80"): True}
    # the sets the refused apply made first are cleared away by the next one
    datapath.apply(good)
    assert datapath.diff(good).empty and datapath.skeleton_intact()
    assert "i4-broken" not in datapath.show()


# ---- drift ------------------------------------------------------------------------------------

def test_drift_is_seen_and_repaired(trio, datapath, servers) -> None:
    rs = compile_cluster(cluster(trio, allow_only("a", "b")))
    datapath.apply(rs)
    prefix = datapath.layout.names.prefix
    chain = next(c for c in rs.chains if c.startswith("i-"))
    kchain = prefix + chain
    blocked = [("c", "a", PORTS[0])]
    closed = {("c", "a", "TCP/80"): False}

    # a flushed chain: a hole, seen only by a verifying apply, repaired
    _ipt(datapath, 4, "-F", kchain)
    assert probe(trio, blocked) == {("c", "a", "TCP/80"): True}
    assert [c.name for c in datapath.diff(rs).replace_chains] == [chain]
    assert datapath.apply(rs).empty  # without verify, the last apply is trusted
    assert [c.name for c in datapath.apply(rs, verify=True).replace_chains] == [chain]
    assert datapath.last_drift is not None
    assert any("rules differ" in d for d in datapath.last_drift_details)
    assert probe(trio, blocked) == closed

    # a foreign rule inserted into our chain
    _ipt(datapath, 4, "-I", kchain, "1", "-j", "RETURN")
    assert probe(trio, blocked) == {("c", "a", "TCP/80"): True}
    datapath.apply(rs, verify=True)
    assert any("rules differ" in d for d in datapath.last_drift_details)
    assert probe(trio, blocked) == closed

    # a member deleted from a set: b loses access, and gets it back
    peer = next(s for s in rs.sets.values() if s.name.startswith("s4-")
                and trio.b.address4 in s.elements)
    _run(trio.host_netns, "ipset", "del", prefix + peer.name, trio.b.address4)
    assert probe(trio, [("b", "a", PORTS[0])]) == {("b", "a", "TCP/80"): False}
    delta = datapath.apply(rs, verify=True)
    assert [(s.name, set(e)) for s, e in delta.add_elements] == [(peer.name,
                                                                 {trio.b.address4})]
    assert datapath.last_drift is not None and not datapath.last_drift.empty
    assert probe(trio, [("b", "a", PORTS[0])]) == {("b", "a", "TCP/80"): True}

    # the jump from FORWARD deleted: nothing enforced, then everything again
    jump = next(line for line in _ipt(datapath, 4, "-S", "FORWARD").splitlines()
                if f"-j {prefix}forward" in line)
    _ipt(datapath, 4, *_words(jump.replace("-A FORWARD", "-D FORWARD", 1)))
    assert probe(trio, blocked) == {("c", "a", "TCP/80"): True}
    assert not datapath.skeleton_intact()
    datapath.apply(rs, verify=True)
    assert any("jump from FORWARD" in d for d in datapath.last_drift_details)
    assert probe(trio, blocked) == closed

    # a foreign chain in our namespace and a flushed dispatch chain
    _ipt(datapath, 6, "-N", prefix + "intruder")
    _ipt(datapath, 4, "-F", prefix + "ingress")
    assert probe(trio, blocked) == {("c", "a", "TCP/80"): True}
    datapath.apply(rs, verify=True)
    assert any("foreign chain" in d for d in datapath.last_drift_details)
    assert any("dispatch chain" in d for d in datapath.last_drift_details)
    assert prefix + "intruder" not in _ipt(datapath, 6, "-S")
    assert probe(trio, blocked) == closed
    assert datapath.skeleton_intact() and datapath.diff(rs).empty

    # everything wiped by another process: the jump, every chain of ours, every set
    IptablesDatapath(datapath.layout, netns=trio.host_netns, backend=datapath.backend).remove()
    assert probe(trio, blocked) == {("c", "a", "TCP/80"): True}
    datapath.apply(rs, verify=True)
    assert datapath.last_drift is not None and datapath.last_drift_details
    assert probe(trio, blocked) == closed

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
    datapath.apply(compile_cluster(cluster(trio, allow_only("a", "b"))))
    forward = _ipt(datapath, 4, "-S", "FORWARD").splitlines()
    assert f"-j {datapath.layout.names.prefix}forward" in forward[1]  # ours first
    assert forward[2] == "-A FORWARD -s 192.0.2.1/32 -j ACCEPT"
    assert "-A USER-CHAIN -j RETURN" in _ipt(datapath, 4, "-S")
    datapath.apply(compile_cluster(cluster(trio)), verify=True)
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
