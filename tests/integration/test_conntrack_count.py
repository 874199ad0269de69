"""A namespace's conntrack count, against the kernel, and the revocation that trusts it.

The count is the namespace's own (nf_conntrack_count of its `struct net`), not
the host table's: 0 in a fresh namespace while another holds entries, N after
N connections there. `Visibility.revoke_now` skips the dump on a 0 only, and
still cuts a revoked connection.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from stockade.agent.metrics import agent_metrics
from stockade.agent.prometheus import Registry
from stockade.agent.visibility import Visibility
from stockade.compile.lower import compile_cluster
from stockade.datapath.conntrack import Arrivals, Conntrack
from stockade.model.cluster import Cluster
from stockade.net.namespace import create_netns, entered

from .netio import connect, echo, receive
from .test_agent_conntrack import PORT, _a_ingress_from, _cluster, _ours
from .test_agent_conntrack import held as held  # the fixture: a connection held open


def _kernel_count(netns: str) -> int:
    """The same counter as /proc shows it to a thread in the namespace."""
    with entered(netns), open("/proc/sys/net/netfilter/nf_conntrack_count") as f:
        return int(f.read())


@pytest.fixture
def fresh(netns_prefix: str) -> str:
    """A new namespace, its loopback up (removed with the test's prefix)."""
    name = f"{netns_prefix}-fresh"
    create_netns(name)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return name


@pytest.mark.privileged
def test_the_count_is_the_namespaces_own(trio, held, fresh: str) -> None:
    with Conntrack(fresh) as ct, Conntrack(trio.host_netns) as host:
        assert ct.count() == 0 and ct.entries() == []
        assert _ours(host.entries(), trio)  # the held connection, in the other namespace
        assert (host.count() or 0) >= 1
    # conntrack hooks in `fresh` (a ct expression), then N loopback connections there
    subprocess.run(["ip", "netns", "exec", fresh, "nft",
                    "add table inet t; add chain inet t o { type filter hook output priority 0; };"
                    " add rule inet t o ct state established accept"], check=True)
    n = 5
    held_sockets: list[socket.socket] = []
    try:
        with entered(fresh):
            server = socket.create_server(("127.0.0.1", 0))
        with server:
            for _ in range(n):
                with entered(fresh):
                    client = socket.create_connection(server.getsockname(), timeout=2)
                held_sockets += [client, server.accept()[0]]
        with Conntrack(fresh) as ct:
            assert ct.count() == n == _kernel_count(fresh)
            assert len(ct.entries()) == n
            assert {e.dst for e in ct.entries()} == {"127.0.0.1"}
    finally:
        for s in held_sockets:
            s.close()


def _visibility(cluster: Cluster, netns: str, tmp_path: Path) -> Visibility:
    return Visibility(lambda: cluster, agent_metrics(Registry()), netns, None, str(tmp_path),
                      revoke=False)


@pytest.mark.privileged
def test_an_empty_namespace_is_not_dumped(fresh: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Conntrack) -> list[object]:
        raise AssertionError("dumped a namespace the kernel counts empty")

    monkeypatch.setattr(Conntrack, "entries", refuse)
    assert _visibility(Cluster((), (), ()), fresh, tmp_path).revoke_now() == 0


@pytest.mark.privileged
@pytest.mark.parametrize("counted", [True, False], ids=["counted", "count-unanswered"])
def test_revoke_now_still_cuts_a_revoked_connection(trio, held, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    counted: bool) -> None:
    dp, server, conn = held
    if not counted:  # a kernel that does not answer the count: the pass dumps, as before
        monkeypatch.setattr(Conntrack, "count", lambda self: None)
    revoked = _cluster(trio, _a_ingress_from("c"))
    dp.apply(compile_cluster(revoked))
    assert echo(conn, b"two")  # established traffic outlives the policy that allowed it
    vis = _visibility(revoked, trio.host_netns, tmp_path)
    assert vis.revoke_now() == 1 and vis.cut_total == 1
    assert not echo(conn, b"three")
    server.push("pushed")
    assert receive(conn) is None
    with Conntrack(trio.host_netns) as ct:
        assert not _ours(ct.entries(), trio)


def _ctnetlink_ports(netns: str) -> set[int]:
    """Port ids of the namespace's NETLINK_NETFILTER sockets, as the kernel lists them."""
    with entered(netns), open("/proc/net/netlink") as f:
        rows = [line.split() for line in f.read().splitlines()[1:]]
    return {int(r[2]) for r in rows if r[1] == "12" and int(r[2]) > 0}


@pytest.mark.privileged
def test_passes_keep_one_socket_and_still_cut(trio, held, tmp_path: Path) -> None:
    """Closing a ctnetlink socket holds up the namespace's nf_tables commits (the
    kernel flushes pending destruction under the commit lock): the revoker keeps its
    sockets from pass to pass."""
    dp, _server, conn = held
    before = _ctnetlink_ports(trio.host_netns)
    vis = _visibility(_cluster(trio, _a_ingress_from("b")), trio.host_netns, tmp_path)
    try:
        assert vis.revoke_now() == 0  # b may still reach a: nothing to cut
        opened = _ctnetlink_ports(trio.host_netns) - before
        assert len(opened) == 2  # its requests, and its listener for new connections
        revoked = _cluster(trio, _a_ingress_from("c"))
        dp.apply(compile_cluster(revoked))
        vis.cluster_of = lambda: revoked
        assert vis.revoke_now() == 1  # the same socket cuts what is now denied
        assert _ctnetlink_ports(trio.host_netns) - before == opened
        assert not echo(conn, b"after")
    finally:
        vis.stop()
    assert not _ctnetlink_ports(trio.host_netns) & opened  # closed with the revoker



def _events_setting(netns: str, value: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw",
                    f"net.netfilter.nf_conntrack_events={value}"], check=True)


@pytest.mark.privileged
def test_arrivals_say_yes_to_a_new_connection_and_to_events_switched_off(fresh: str) -> None:
    subprocess.run(["ip", "netns", "exec", fresh, "nft",
                    "add table inet t; add chain inet t o { type filter hook output priority 0; };"
                    " add rule inet t o ct state established accept"], check=True)
    arrivals = Arrivals(fresh)
    held: list[socket.socket] = []
    try:
        assert not arrivals.seen()  # nothing tracked since it opened
        with entered(fresh):
            server = socket.create_server(("127.0.0.1", 0))
            held += [server, socket.create_connection(server.getsockname(), timeout=2)]
        held.append(server.accept()[0])
        assert arrivals.seen()  # the new connection's event
        assert not arrivals.seen()  # drained
        _events_setting(fresh, "0")  # no events: it cannot know, so it says yes
        assert arrivals.seen() and arrivals.seen()
        _events_setting(fresh, "2")
        assert arrivals.seen()  # connections made while off carry no event
        assert not arrivals.seen()
    finally:
        arrivals.close()
        for s in held:
            s.close()


@pytest.mark.privileged
def test_a_connection_made_after_a_pass_is_still_cut(trio, held, tmp_path: Path) -> None:
    """A pass with no new connection judges what the last dump listed; one made since
    arrives as an event, so the next pass lists the table again and cuts it too."""
    dp, _server, conn = held
    vis = _visibility(_cluster(trio, _a_ingress_from("b")), trio.host_netns, tmp_path)
    try:
        assert vis.revoke_now() == 0  # b may reach a: nothing to cut
        assert vis.revoke_now() == 0
        late = connect(trio.b.netns, trio.a.address4, PORT)
        try:
            assert echo(late, b"late")
            revoked = _cluster(trio, _a_ingress_from("c"))
            dp.apply(compile_cluster(revoked))
            vis.cluster_of = lambda: revoked
            assert vis.revoke_now() == 2  # the held connection and the late one
            assert not echo(late, b"after") and not echo(conn, b"after")
        finally:
            late.close()
    finally:
        vis.stop()
