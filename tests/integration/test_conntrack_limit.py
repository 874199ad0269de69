"""One pod cannot fill the node's conntrack table (nftables and iptables, `--conntrack-limit`).

With a limit of N, a source address holding N connections in conntrack gets no new
one; another source still connects; closing one lets the next through. The limit's
sets and rules are the skeleton's: verified, repaired, changed and removed with it.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from stockade.compile.iptables import Layout
from stockade.compile.lower import compile_cluster
from stockade.compile.nft import LIMIT_SETS, Table
from stockade.datapath import open_datapath
from stockade.datapath.iptables import IptablesDatapath
from stockade.datapath.nft import NftDatapath
from stockade.errors import DataplaneError
from stockade.model.cluster import Cluster, Endpoint, Namespace
from stockade.model.labels import Labels
from stockade.net.namespace import entered

pytestmark = pytest.mark.privileged

PORT = 8080
LIMIT = 3


def _cluster(trio) -> Cluster:
    """No policy: every connection is allowed, so only the limit refuses one."""
    ns = Namespace("x", Labels({"kubernetes.io/metadata.name": "x"}))
    eps = tuple(Endpoint("x", n, Labels({"pod": n}), (att.address4, att.address6))
                for n, att in (("a", trio.a), ("b", trio.b), ("c", trio.c)))
    return Cluster((ns,), eps, ())


@pytest.fixture
def listener(trio) -> Iterator[socket.socket]:
    """A listening socket in a's namespace: the kernel completes handshakes up to its
    backlog without an accept, so connections stay established as long as wanted."""
    with entered(trio.a.netns):
        srv = socket.socket(socket.AF_INET6)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind(("::", PORT))
    srv.listen(64)
    try:
        yield srv
    finally:
        srv.close()


def _connect(netns: str, address: str, timeout: float = 1.0) -> socket.socket | None:
    """An established connection from `netns`, or None when it does not get through."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with entered(netns):
        conn = socket.socket(family)
    conn.settimeout(timeout)
    try:
        conn.connect((address, PORT))
    except OSError:
        conn.close()
        return None
    return conn


def _fill(trio, a: str, held: list[socket.socket]) -> None:
    """b opens LIMIT connections to `a` (kept in `held`); its next one is refused."""
    for _ in range(LIMIT):
        conn = _connect(trio.b.netns, a)
        assert conn is not None
        held.append(conn)
    assert _connect(trio.b.netns, a, timeout=0.5) is None  # b holds LIMIT


def _others_connect(trio, a: str, held: list[socket.socket]) -> None:
    """c, which holds none, still connects."""
    other = _connect(trio.c.netns, a)
    assert other is not None
    held.append(other)


def _nft(netns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", netns, "nft", *args], capture_output=True,
                          text=True, check=False)


def _datapath(kind: str, netns: str, limit: int) -> Any:
    """`kind` as open_datapath makes it; `iptables-legacy`: on the legacy backend."""
    if kind == "iptables-legacy":
        return IptablesDatapath(Layout.of("stockade", None, limit), netns=netns,
                                backend="legacy")
    return open_datapath(kind, "stockade", netns=netns, conntrack_limit=limit)


@pytest.mark.parametrize(("kind", "family"), [
    ("nft", 4), ("nft", 6), ("iptables", 4), ("iptables", 6), ("iptables-legacy", 4),
    ("iptables-legacy", 6)])
def test_a_source_at_the_limit_gets_no_new_connection_and_others_do(
        trio, listener: socket.socket, kind: str, family: int) -> None:
    dp = _datapath(kind, trio.host_netns, LIMIT)
    dp.check()
    dp.apply(compile_cluster(_cluster(trio)))
    a = trio.a.address4 if family == 4 else trio.a.address6
    held: list[socket.socket] = []
    try:
        _fill(trio, a, held)
        _others_connect(trio, a, held)
        gone = held.pop(0)  # b resets one: it holds LIMIT - 1 live ones
        gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        gone.close()
        again = _connect(trio.b.netns, a)
        assert again is not None
        held.append(again)
    finally:
        for conn in held:
            conn.close()
        dp.remove()


def _tamper_and_repair(dp: NftDatapath, rs: Any, host: str, text: str) -> None:
    """The base chain's rule holding `text` deleted by hand (the table is not owned
    here), found by the verification and put back."""
    listing = _nft(host, "-a", "list", "chain", "inet", "stockade", "forward").stdout
    handle = next(line.rsplit("# handle ", 1)[1] for line in listing.splitlines()
                  if text in line)
    assert _nft(host, "delete", "rule", "inet", "stockade", "forward", "handle",
                handle).returncode == 0
    assert not dp.verify_quietly()
    dp.apply(rs, verify=True)
    assert dp.last_drift_details == ["base chain rules differ"]


def test_the_limit_is_verified_changed_and_removed_with_the_skeleton(trio) -> None:
    rs = compile_cluster(_cluster(trio))
    dp = NftDatapath(Table(conntrack_limit=LIMIT), netns=trio.host_netns)
    dp.apply(rs)
    try:
        kt = dp.read_table()
        assert kt is not None and not kt.needs_repair, kt and kt.drift
        host = trio.host_netns
        assert "ct count over 3" in _nft(host, "list", "chain", "inet", "stockade",
                                         "forward").stdout
        # tampered: the limit's rule deleted (the table is not owned here)
        _tamper_and_repair(dp, rs, host, "ct count over")
        assert _nft(host, "list", "chain", "inet", "stockade", "forward"
                    ).stdout.count("ct count over 3") == 2
        # another limit: the rules change, and the sets are made again with them (each
        # element counts with the N of the rule that made it)
        other = NftDatapath(Table(conntrack_limit=7), netns=host)
        other.apply(rs, verify=True)
        chain = _nft(host, "list", "chain", "inet", "stockade", "forward").stdout
        assert chain.count("ct count over 7") == 2 and "over 3" not in chain
        kt = other.read_table()
        assert kt is not None and not kt.needs_repair
        # no limit: the rules and the sets go
        none = NftDatapath(Table(), netns=host)
        none.apply(rs, verify=True)
        table = _nft(host, "list", "table", "inet", "stockade").stdout
        assert "ct count" not in table
        assert not any(name in table for name in LIMIT_SETS.values())
        kt = none.read_table()
        assert kt is not None and not kt.needs_repair
    finally:
        dp.remove()


def _set_handle(netns: str, name: str) -> int:
    doc = json.loads(_nft(netns, "-j", "list", "set", "inet", "stockade", name).stdout)
    return int(next(o["set"]["handle"] for o in doc["nftables"] if "set" in o))


def test_a_repair_keeps_what_the_limit_counts(trio, listener: socket.socket) -> None:
    """The skeleton made again (one of its rules deleted by hand) keeps the limit's
    sets while their rules are intact: a source at the limit stays at it. Made again
    with the skeleton, the sets would count from 0 and the source get LIMIT more."""
    rs = compile_cluster(_cluster(trio))
    host = trio.host_netns
    dp = NftDatapath(Table(conntrack_limit=LIMIT), netns=host)
    dp.apply(rs)
    held: list[socket.socket] = []
    try:
        _fill(trio, trio.a.address4, held)
        handles = {name: _set_handle(host, name) for name in LIMIT_SETS.values()}
        _tamper_and_repair(dp, rs, host, "neighbour discovery")
        kt = dp.read_table()
        assert kt is not None and not kt.needs_repair, kt and kt.drift
        assert "neighbour discovery" in _nft(host, "list", "chain", "inet", "stockade",
                                             "forward").stdout
        assert {name: _set_handle(host, name) for name in LIMIT_SETS.values()} == handles
        assert trio.b.address4 in _nft(host, "list", "set", "inet", "stockade",
                                       LIMIT_SETS[4]).stdout
        assert _connect(trio.b.netns, trio.a.address4, timeout=0.5) is None  # still full
        _others_connect(trio, trio.a.address4, held)
    finally:
        for conn in held:
            conn.close()
        dp.remove()


def _saved(netns: str, backend: str = "") -> str:
    suffix = f"-{backend}" if backend else ""
    return "".join(subprocess.run(["ip", "netns", "exec", netns, f"{tool}{suffix}-save"],
                                  capture_output=True, text=True, check=True).stdout
                   for tool in ("iptables", "ip6tables"))


@pytest.mark.parametrize("kind", ["iptables", "iptables-legacy"])
def test_iptables_verifies_changes_and_removes_the_limit(trio, kind: str) -> None:
    rs = compile_cluster(_cluster(trio))
    host = trio.host_netns
    backend = "legacy" if kind == "iptables-legacy" else ""
    dp = _datapath(kind, host, LIMIT)
    dp.apply(rs)
    try:
        assert _saved(host, backend).count("--connlimit-above 3 ") == 2
        line = next(x for x in _saved(host, backend).splitlines() if "--connlimit-above" in x)
        subprocess.run(["ip", "netns", "exec", host, f"iptables{'-' + backend if backend else ''}",
                        "-D", *line.split(" ", 1)[1].replace('"', "").split()], check=True)
        assert _saved(host, backend).count("--connlimit-above 3 ") == 1
        dp.apply(rs, verify=True)
        assert dp.last_drift is not None
        assert _saved(host, backend).count("--connlimit-above 3 ") == 2
        other = _datapath(kind, host, 7)
        other.apply(rs, verify=True)
        saved = _saved(host, backend)
        assert saved.count("--connlimit-above 7 ") == 2 and "--connlimit-above 3 " not in saved
        none = _datapath(kind, host, 0)
        none.apply(rs, verify=True)
        assert "connlimit" not in _saved(host, backend)
        none.apply(rs, verify=True)
        assert none.last_drift is None or not none.last_drift_details
    finally:
        dp.remove()


def test_a_datapath_without_the_limit_refuses_it(trio) -> None:
    with pytest.raises(DataplaneError, match="--conntrack-limit is for the nft and iptables"):
        open_datapath("ebpf", "stockade", netns=trio.host_netns, conntrack_limit=5)
    with pytest.raises(DataplaneError, match="a connection limit of -1"):
        open_datapath("nft", "stockade", netns=trio.host_netns, conntrack_limit=-1)


def test_the_agent_takes_the_limit_and_refuses_it_where_it_has_none(
        trio, tmp_path, netns_prefix: str) -> None:
    from .agent_harness import AgentProcess

    (tmp_path / "nft").mkdir()
    agent = AgentProcess(tmp_path / "nft", trio.host_netns, netns_prefix,
                         extra=("--conntrack-limit", "5"))
    try:
        agent.start()
        chain = _nft(trio.host_netns, "list", "chain", "inet", "stockade", "forward").stdout
        assert chain.count("ct count over 5") == 2
        assert agent.call("status")["conntrackLimit"] == 5
    finally:
        agent.stop()
        _nft(trio.host_netns, "delete", "table", "inet", "stockade")
    (tmp_path / "ebpf").mkdir()
    ebpf = AgentProcess(tmp_path / "ebpf", trio.host_netns, netns_prefix, datapath="ebpf",
                        table=f"{netns_prefix}ct", extra=("--conntrack-limit", "5"))
    out = subprocess.run(ebpf.cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--conntrack-limit is for the nft and iptables" in out.stderr
    assert "Traceback" not in out.stderr
