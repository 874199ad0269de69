"""Real packets between endpoints: the prober, the probe server, and nftables."""

from __future__ import annotations

import ctypes
import os
import subprocess
import time

import pytest

from stockade.errors import NetError
from stockade.net.namespace import netns_path
from stockade.net.sysctl import read_sysctl, write_sysctl
from stockade.probe.client import Outcome, Probe, run_probes
from stockade.probe.launcher import ProbeServer
from stockade.probe.matrix import ObservedMatrix, ProbeEndpoint, probe_matrix
from stockade.probe.protocol import Port, Protocol
from stockade.probe.sctp import sctp_mode

pytestmark = pytest.mark.privileged

CLONE_NEWNET = 0x40000000
PORTS = [Port(n, proto) for n in (80, 81) for proto in Protocol]


def _nft(netns: str, ruleset: str) -> None:
    """Load rules into ``netns`` with the nft command (tests only: the product uses libnftables)."""
    path = netns_path(netns)

    def enter() -> None:  # runs in the child between fork and exec
        fd = os.open(path, os.O_RDONLY)
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")

    subprocess.run(["nft", "-f", "-"], input=ruleset, text=True, check=True, preexec_fn=enter)


def _denied(matrix: ObservedMatrix) -> set[tuple[str, str, str]]:
    return {
        (s, d, f"{proto}/{port}") for (s, d, port, proto), ok in matrix.as_bools().items() if not ok
    }


def test_everything_allowed_v4_and_v6(trio) -> None:
    peers = [ProbeEndpoint.of(a) for a in trio.all]
    with ProbeServer({a.netns: PORTS for a in trio.all}) as server:
        assert server.sctp_mode == sctp_mode() != "unavailable"
        for family in (4, 6):
            started = time.monotonic()
            matrix = probe_matrix(peers, PORTS, family=family)
            assert time.monotonic() - started < 0.9  # all allowed: no probe waits
            assert len(matrix.verdicts) == 3 * 2 * len(PORTS)
            assert _denied(matrix) == set(), matrix.render_all()
            assert matrix.allowed("x/a", "x/a", 80, Protocol.TCP) is None
    table = matrix.render(Port(80, Protocol.TCP))
    assert table.splitlines() == [
        "TCP/80  x/a x/b x/c",
        "x/a      -   .   .",
        "x/b      .   -   .",
        "x/c      .   .   -",
    ]


def test_inet_forward_rules_see_bridged_traffic(trio) -> None:
    """Drops in an inet forward chain of the host namespace apply between bridge ports.

    This holds because the host namespace has bridge-nf-call-ip(6)tables=1,
    which the plumber ensures; conntrack (``ct state``) works for TCP, UDP
    and SCTP alike, the raw-socket SCTP included.
    """
    a, b, c = trio.a, trio.b, trio.c
    _nft(
        trio.host_netns,
        f"""
        table inet probetest {{
          chain filter_forward {{
            type filter hook forward priority 0; policy accept;
            ct state established,related accept
            ct state invalid counter drop
            ip saddr {a.address4} ip daddr {b.address4} tcp dport 81 drop
            ip6 saddr {a.address6} ip6 daddr {b.address6} tcp dport 81 drop
            ip saddr {a.address4} ip daddr {b.address4} sctp dport 81 drop
            ip saddr {a.address4} ip daddr {c.address4} udp dport 81 drop
            ip saddr {c.address4} ip daddr {a.address4} tcp dport 80 reject with tcp reset
          }}
        }}
        """,
    )
    peers = [ProbeEndpoint.of(x) for x in trio.all]
    with ProbeServer({x.netns: PORTS for x in trio.all}):
        v4 = probe_matrix(peers, PORTS, family=4, timeout=0.6)
        v6 = probe_matrix(peers, PORTS, family=6, timeout=0.6)
    assert _denied(v4) == {
        ("x/a", "x/b", "TCP/81"),
        ("x/a", "x/b", "SCTP/81"),
        ("x/a", "x/c", "UDP/81"),
        ("x/c", "x/a", "TCP/80"),
    }, v4.render_all()
    assert _denied(v6) == {("x/a", "x/b", "TCP/81")}, v6.render_all()
    dropped = v4.verdict("x/a", "x/b", 81, Protocol.TCP)
    rejected = v4.verdict("x/c", "x/a", 80, Protocol.TCP)
    assert dropped is not None and dropped.outcome is Outcome.DENIED
    assert rejected is not None and rejected.outcome is Outcome.REFUSED
    # The reverse direction of a dropped pair is untouched.
    assert v4.allowed("x/b", "x/a", 81, Protocol.TCP) is True


def test_closed_port_is_refused_not_denied(trio) -> None:
    """Nobody listening answers RST / ICMP port unreachable / ABORT: 'refused'."""
    a, b = trio.a, trio.b
    with ProbeServer({b.netns: [Port(80, p) for p in Protocol]}):
        probes = [
            Probe("x/a", a.netns, "x/b", address, Port(9, proto))
            for address in (b.address4, b.address6 or "")
            for proto in Protocol
        ]
        verdicts = run_probes(probes, timeout=0.6)
    assert [v.outcome for v in verdicts] == [Outcome.REFUSED] * len(probes), verdicts
    assert not any(v.allowed for v in verdicts)


def test_one_server_per_namespace_works_too(trio) -> None:
    peers = [ProbeEndpoint.of(x) for x in trio.all]
    ports = [Port(8080, Protocol.TCP), Port(5353, Protocol.UDP)]
    servers = [ProbeServer({x.netns: ports}).start() for x in trio.all]
    try:
        matrix = probe_matrix(peers, ports, include_self=True)
    finally:
        for server in servers:
            server.stop()
    assert all(matrix.as_bools().values())
    assert matrix.allowed("x/a", "x/a", 8080, Protocol.TCP) is True


def test_server_reports_bind_errors(trio) -> None:
    with ProbeServer({trio.a.netns: [Port(80)]}), pytest.raises(NetError, match="in use"):
        ProbeServer({trio.a.netns: [Port(80)]}).start()


def test_bridge_nf_call_is_what_makes_forward_rules_apply(trio) -> None:
    """With bridge-nf-call-iptables=0 bridged IPv4 bypasses the inet forward hook.

    ensure_bridge() turns it back on in the host namespace (and only there).
    """
    a, b = trio.a, trio.b
    _nft(
        trio.host_netns,
        f"""
        table inet probetest {{
          chain filter_forward {{
            type filter hook forward priority 0; policy accept;
            ip saddr {a.address4} ip daddr {b.address4} tcp dport 81 drop
          }}
        }}
        """,
    )
    port = Port(81, Protocol.TCP)
    probe = [Probe("x/a", a.netns, "x/b", b.address4, port)]
    root_value = read_sysctl("net.bridge.bridge-nf-call-iptables")
    with ProbeServer({b.netns: [port]}):
        write_sysctl("net.bridge.bridge-nf-call-iptables", 0, trio.host_netns)
        (bypassed,) = run_probes(probe, timeout=0.5)
        trio.plumber.ensure_bridge()
        (enforced,) = run_probes(probe, timeout=0.5)
    assert bypassed.outcome is Outcome.ALLOWED
    assert enforced.outcome is Outcome.DENIED
    assert read_sysctl("net.bridge.bridge-nf-call-iptables", trio.host_netns) == "1"
    assert read_sysctl("net.bridge.bridge-nf-call-iptables") == root_value
