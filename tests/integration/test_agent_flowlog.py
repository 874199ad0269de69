"""The denied-flow log: the reader's bookkeeping, and real denied packets from the kernel.

The first tests feed hand-built NFLOG datagrams to a reader (no privileges);
the privileged ones program the trio (see conftest) with a logging table,
probe, and read what the kernel logged.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stockade.agent.flowlog import DeniedFlow, FlowLogReader, chain_policies_of, describe_packet
from stockade.compile.lower import compile_cluster
from stockade.compile.nft import Table
from stockade.datapath.nflog import LoggedPacket
from stockade.datapath.nft import NftDatapath
from stockade.errors import AgentError
from stockade.model.cluster import Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.labels import Labels
from stockade.model.policy import INGRESS, NetworkPolicy, Peer, PolicyPort
from stockade.model.policy import Rule as PRule
from stockade.model.selector import Selector
from stockade.net.namespace import entered
from stockade.probe.client import Probe, run_probes
from stockade.probe.launcher import ProbeServer
from stockade.probe.protocol import Port, Protocol

# ---- hand-built datagrams (no privileges) ------------------------------------------------


def _nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _logged(src: str, dst: str, dport: int, prefix: str = "stockade-deny i-aaa") -> bytes:
    l4 = struct.pack("!HHIIBBHHH", 40000, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, 6, 0,
                     ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    body = (struct.pack("=BBH", socket.AF_INET, 0, socket.htons(7))
            + _nla(10, prefix.encode() + b"\0") + _nla(9, ip + l4))
    return struct.pack("=IHHII", 16 + len(body), (4 << 8) | 0, 0, 0, 0) + body


IPS = {"10.0.0.1": "x/a", "10.0.0.2": "x/b"}


def _describe(packet: LoggedPacket) -> dict[str, Any]:
    return describe_packet(packet, {"i-aaa": ("x/p",)}, IPS.get)


def test_records_are_numbered_kept_paged_and_written(tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    seen: list[DeniedFlow] = []
    reader = FlowLogReader(7, describe=_describe, capacity=3, path=str(path),
                           on_record=seen.append)
    reader._file = path.open("a", encoding="utf-8")  # what start() opens
    batch = b"".join(_logged("10.0.0.2", "10.0.0.1", port) for port in (80, 81))
    flows = reader.handle(batch, received_at=1_700_000_000.0)
    assert [f.seq for f in flows] == [1, 2] and seen == flows
    assert flows[0].to_dict() == {
        "seq": 1, "time": "2023-11-14T22:13:20.000Z", "src": "x/b", "dst": "x/a",
        "srcIP": "10.0.0.2", "dstIP": "10.0.0.1", "protocol": "TCP", "port": 80,
        "direction": "ingress", "policies": ["x/p"], "chain": "i-aaa",
        "reason": "x/a is isolated for ingress by x/p; no rule allows TCP/80 from x/b"}
    reader.handle(_logged("10.0.0.2", "10.0.0.1", 82) + _logged("10.0.0.2", "10.0.0.1", 83),
                  received_at=1_700_000_001.0)
    # the ring keeps the last 3; a stale cursor starts at the oldest kept
    items, nxt = reader.since(0, limit=2)
    assert [i.seq for i in items] == [2, 3] and nxt == 4
    items, nxt = reader.since(nxt)
    assert [i.seq for i in items] == [4] and nxt == 5
    assert reader.since(nxt) == ([], 5)
    assert reader.since(1000) == ([], 5)  # a cursor from another life: back to "next"
    reader._file.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["port"] for line in lines] == [80, 81, 82, 83]
    assert "seq" not in lines[0] and lines[0]["src"] == "x/b"
    assert reader.stats.recorded == 4 and reader.stats.received == 4


def test_foreign_prefixes_failing_resolvers_and_garbage_are_counted() -> None:
    def broken(packet: LoggedPacket) -> dict[str, Any]:
        raise KeyError("resolver bug")

    reader = FlowLogReader(7, describe=broken)
    flows = reader.handle(_logged("10.0.0.2", "10.0.0.1", 80)
                          + _logged("10.0.0.2", "10.0.0.1", 80, prefix="other-tool")
                          + b"\x10\0\0\0" + b"\0" * 12,  # a header that claims 16 bytes
                          received_at=0.0)
    (flow,) = flows  # recorded anyway, with what the packet alone says
    assert flow.record["src"] == "10.0.0.2" and flow.record["direction"] == "ingress"
    stats = reader.stats
    assert (stats.received, stats.recorded, stats.ignored, stats.failed) == (2, 1, 1, 1)


class _FakeNetlink:
    """Stands in for the netlink socket: a scripted series of datagrams and errors."""

    def __init__(self) -> None:
        self.r, self.w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.script: list[bytes | OSError] = []

    def feed(self, item: bytes | OSError) -> None:
        self.script.append(item)
        self.w.send(b".")  # readable now

    def fileno(self) -> int:
        return self.r.fileno()

    def recv(self, size: int) -> bytes:
        self.r.recv(1)
        item = self.script.pop(0)
        if isinstance(item, OSError):
            raise item
        return item

    def setblocking(self, flag: bool) -> None:
        pass

    def settimeout(self, value: float) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        self.r.close()
        self.w.close()


class _FakeReader(FlowLogReader):
    def __init__(self, fake: _FakeNetlink, **kw: Any) -> None:
        super().__init__(7, **kw)
        self.fake = fake

    def _open(self) -> Any:
        return self.fake

    def _configure(self, sock: Any) -> None:
        pass


def _wait(predicate: Any, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_the_thread_survives_enobufs_and_stops_promptly() -> None:
    fake = _FakeNetlink()
    with _FakeReader(fake, describe=_describe) as reader:
        fake.feed(_logged("10.0.0.2", "10.0.0.1", 80))
        fake.feed(OSError(errno.ENOBUFS, "No buffer space available"))
        fake.feed(OSError(errno.ENOBUFS, "No buffer space available"))
        fake.feed(_logged("10.0.0.2", "10.0.0.1", 81))
        assert _wait(lambda: reader.stats.recorded == 2)
        assert reader.stats.dropped == 2 and reader.running
        started = time.monotonic()
    assert time.monotonic() - started < 1.0 and not reader.running
    assert [f.record["port"] for f in reader.since()[0]] == [80, 81]


def test_an_unexpected_socket_error_stops_the_thread_and_says_why() -> None:
    fake = _FakeNetlink()
    reader = _FakeReader(fake).start()
    try:
        fake.feed(OSError(errno.EBADF, "Bad file descriptor"))
        assert _wait(lambda: not reader.running)
        assert reader.error is not None and "Bad file descriptor" in reader.error
    finally:
        reader.stop()


# ---- against the kernel ------------------------------------------------------------------

PORTS = [Port(80, Protocol.TCP), Port(81, Protocol.TCP), Port(80, Protocol.UDP)]


def _cluster(trio) -> Cluster:
    ns = Namespace("x", Labels({"kubernetes.io/metadata.name": "x"}))
    eps = tuple(Endpoint("x", n, Labels({"pod": n}),
                         (getattr(trio, n).address4, getattr(trio, n).address6),
                         (ContainerPort(80, "TCP", "http"),)) for n in "abc")
    policy = NetworkPolicy(
        "x", "allow-b-to-a", Selector(Labels({"pod": "a"})),
        ingress=(PRule((PolicyPort("TCP", 80),),
                       (Peer(pod_selector=Selector(Labels({"pod": "b"}))),)),),
        policy_types=(INGRESS,))
    return Cluster((ns,), eps, (policy,))


@pytest.fixture
def logging_trio(trio, tmp_path: Path) -> Iterator[tuple[Any, FlowLogReader, Path]]:
    """The trio with a logging ruleset applied and a reader on its log group."""
    group = random.randint(1000, 60000)
    cluster = _cluster(trio)
    ruleset = compile_cluster(cluster)
    NftDatapath(Table(log_group=group), netns=trio.host_netns).apply(ruleset)
    names = {ip: att.key for att in trio.all for ip in (att.address4, att.address6)}
    chains = chain_policies_of(ruleset)
    path = tmp_path / "flows.jsonl"

    def describe(packet: LoggedPacket) -> dict[str, Any]:
        return describe_packet(packet, chains, names.get)

    with FlowLogReader(group, trio.host_netns, describe=describe, path=str(path)) as reader:
        yield trio, reader, path


def _settle(reader: FlowLogReader, quiet: float = 0.4, timeout: float = 5.0) -> list[DeniedFlow]:
    """All records, once none has arrived for `quiet` seconds (the kernel batches)."""
    deadline = time.monotonic() + timeout
    count, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = reader.stats.recorded
        if now != count:
            count, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
        time.sleep(0.05)
    return reader.since(0, limit=10_000)[0]


@pytest.mark.privileged
def test_denied_flows_are_logged_and_allowed_ones_are_not(logging_trio) -> None:
    trio, reader, path = logging_trio
    atts = {"a": trio.a, "b": trio.b, "c": trio.c}
    pairs = [("c", "a", PORTS[0]), ("c", "a", PORTS[1]), ("c", "a", PORTS[2]),
             ("b", "a", PORTS[0]), ("b", "a", PORTS[1])]
    with ProbeServer({trio.a.netns: PORTS}):
        probes = [Probe(s, atts[s].netns, d, atts[d].address4, port) for s, d, port in pairs]
        probes.append(Probe("c", trio.c.netns, "a", trio.a.address6, PORTS[0]))
        verdicts = {(v.probe.src, str(v.probe.port), v.probe.address): v.allowed
                    for v in run_probes(probes, timeout=0.8)}
    assert [k for k, ok in verdicts.items() if ok] == [("b", "TCP/80", trio.a.address4)]
    records = [f.record for f in _settle(reader)]
    seen = {(r["src"], r["dst"], r["dstIP"], r["protocol"], r["port"]) for r in records}
    a4, a6 = trio.a.address4, trio.a.address6
    assert seen == {("x/c", "x/a", a4, "TCP", 80), ("x/c", "x/a", a4, "TCP", 81),
                    ("x/c", "x/a", a4, "UDP", 80), ("x/b", "x/a", a4, "TCP", 81),
                    ("x/c", "x/a", a6, "TCP", 80)}
    for r in records:
        assert r["direction"] == "ingress" and r["policies"] == ["x/allow-b-to-a"]
        assert r["srcIP"] in (trio.b.address4, trio.c.address4, trio.c.address6)
        assert r["time"].endswith("Z")
    c81 = next(r for r in records if r["src"] == "x/c" and r["port"] == 81)
    assert c81["reason"] == ("x/a is isolated for ingress by x/allow-b-to-a; "
                             "no rule allows TCP/81 from x/c")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == records
    stats = reader.stats
    assert stats.recorded == len(records) and stats.malformed == stats.dropped == 0


@pytest.mark.privileged
def test_the_rate_limit_holds_a_flood_back(logging_trio) -> None:
    trio, reader, _path = logging_trio
    socks: list[socket.socket] = []
    with entered(trio.c.netns):
        for _ in range(200):
            socks.append(socket.socket())
    started = time.monotonic()
    try:
        for s in socks:  # 200 SYNs to a port nothing allows, as fast as we can
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect((trio.a.address4, 81))
        elapsed = time.monotonic() - started
        time.sleep(0.3)  # short of the first SYN retransmission (1 s)
    finally:
        for s in socks:
            s.close()
    records = _settle(reader)
    # Table.log_rate is 50/s with a burst of 50: the bucket starts full
    assert 40 <= len(records) <= 50 + 50 * (elapsed + 0.3) + 2, (len(records), elapsed)
    assert {(f.record["src"], f.record["port"]) for f in records} == {("x/c", 81)}


@pytest.mark.privileged
def test_a_group_bound_twice_is_refused(logging_trio) -> None:
    trio, reader, _path = logging_trio
    with pytest.raises(AgentError, match="already bound"):
        FlowLogReader(reader.group, trio.host_netns).start()


@pytest.mark.privileged
def test_a_tier_deny_is_logged_and_past_the_rate_still_drops(trio, tmp_path: Path) -> None:
    """An Admin Deny of c's egress to a: logged with the tier and the policy, and a flood
    past the log's rate is dropped all the same (the log rule's limit never lets one by)."""
    from dataclasses import replace

    from stockade.model.cnp import (
        ADMIN,
        DENY,
        NAMESPACES,
        PODS,
        ClusterNetworkPolicy,
        CnpPeer,
        CnpRule,
    )
    from stockade.model.selector import ALL

    deny = ClusterNetworkPolicy(
        "no-c-to-a", ADMIN, 5,
        subject=CnpPeer(PODS, ALL, Selector(Labels({"pod": "c"}))),
        egress=(CnpRule(DENY, (CnpPeer(PODS, ALL, Selector(Labels({"pod": "a"}))),),
                        name="deny-a"),))
    cluster = replace(_cluster(trio), policies=(), cluster_policies=(deny,))
    assert cluster.cluster_policies[0].subject.kind == PODS != NAMESPACES
    group = random.randint(1000, 60000)
    ruleset = compile_cluster(cluster)
    NftDatapath(Table(log_group=group), netns=trio.host_netns).apply(ruleset)
    names = {ip: att.key for att in trio.all for ip in (att.address4, att.address6)}
    chains = chain_policies_of(ruleset)
    with FlowLogReader(group, trio.host_netns, path=str(tmp_path / "f.jsonl"),
                       describe=lambda p: describe_packet(p, chains, names.get)) as reader:
        with ProbeServer({trio.a.netns: PORTS}):
            pairs = [("c", PORTS[0]), ("c", PORTS[1]), ("b", PORTS[0])]
            atts = {"b": trio.b, "c": trio.c}
            probes = [Probe(s, atts[s].netns, "a", trio.a.address4, p) for s, p in pairs]
            got = {(v.probe.src, str(v.probe.port)): v.allowed
                   for v in run_probes(probes, timeout=0.8)}
        assert got == {("c", "TCP/80"): False, ("c", "TCP/81"): False, ("b", "TCP/80"): True}
        records = [f.record for f in _settle(reader)]
        assert {(r["src"], r["dst"], r["port"]) for r in records} >= {("x/c", "x/a", 80),
                                                                       ("x/c", "x/a", 81)}
        r = next(r for r in records if r["port"] == 81)
        assert r["direction"] == "egress" and r["policies"] == ["no-c-to-a"]
        assert r["chain"].startswith("ae-")
        assert r["reason"] == ("TCP/81 to x/a denied for the egress of x/c by a Deny rule "
                               "of the Admin ClusterNetworkPolicies no-c-to-a")
    # a flood far past the rate: every SYN dropped (none reaches a's listener)
    with ProbeServer({trio.a.netns: PORTS}):
        socks: list[socket.socket] = []
        with entered(trio.c.netns):
            socks = [socket.socket() for _ in range(300)]
        try:
            for s in socks:
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect((trio.a.address4, 80))
            time.sleep(0.5)
            connected = 0
            for s in socks:
                with contextlib.suppress(OSError):
                    s.getpeername()
                    connected += 1
        finally:
            for s in socks:
                s.close()
    assert connected == 0
