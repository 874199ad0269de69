"""deploy/systemd/stockade-agent.service: the unit is valid, and the agent does its job
the way the unit runs it.

This machine's PID 1 is not systemd, so the unit is not started by systemd here:
`systemd-analyze verify` checks the file, and the agent is run as the unit would
run it: with $NOTIFY_SOCKET set to a datagram socket the test listens on (it must
say READY=1 once it serves), within the unit's capability bounding set and with
no_new_privs (setpriv, as systemd applies CapabilityBoundingSet= and
NoNewPrivileges=), then it must enforce a policy on real packets and stop cleanly
on SIGTERM.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.datapath.ebpf import EbpfDatapath
from stockade.datapath.iptables import BACKEND_ENV
from stockade.probe.client import Probe, run_probes
from stockade.probe.launcher import ProbeServer
from stockade.probe.protocol import Port, Protocol

from .agent_harness import AgentProcess

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "stockade-agent.service"
MODULES = REPO / "deploy" / "systemd" / "stockade-modules.conf"
VENV_STOCKADE = Path(sys.executable).parent / "stockade"


def _settings(path: Path) -> dict[str, list[str]]:
    """The unit's `Key=value` lines, each key with its values in order."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_the_unit_runs_the_agent_as_it_expects() -> None:
    unit = _settings(UNIT)
    assert unit["Type"] == ["notify"]  # the agent sends READY=1 (agent/daemon.py)
    assert "WatchdogSec" not in unit  # and no WATCHDOG=1
    [exec_start] = unit["ExecStart"]
    assert exec_start.split()[1:2] == ["agent"]
    # The directories systemd makes are the agent's defaults, root only.
    from stockade.agent.client import DEFAULT_SOCKET
    from stockade.agent.daemon import AgentConfig

    assert Path(DEFAULT_SOCKET).parent == Path("/run") / unit["RuntimeDirectory"][0]
    assert Path(AgentConfig.state_dir) == Path("/var/lib") / unit["StateDirectory"][0]
    assert unit["RuntimeDirectoryMode"] == unit["StateDirectoryMode"] == ["0700"]
    # No mount namespace: the namespaces mounted under /run/netns are the host's.
    assert not {"ProtectSystem", "PrivateTmp", "ProtectHome", "ReadWritePaths",
                "PrivateMounts", "ProtectKernelTunables"} & set(unit)
    assert unit["KillMode"] == ["process"]  # `stockade run` containers outlive it
    assert "br_netfilter" in MODULES.read_text().split()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: this venv's stands for /opt's.
    [exec_start] = _settings(UNIT)["ExecStart"]
    text = UNIT.read_text().replace(exec_start.split()[0], str(VENV_STOCKADE))
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True)
    assert (out.returncode, out.stderr) == (0, "")


def _bounding_set() -> list[str]:
    [caps] = _settings(UNIT)["CapabilityBoundingSet"]
    return caps.split()


def _cap_mask(names: list[str]) -> int:
    numbers = {"CAP_KILL": 5, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_SYS_ADMIN": 21,
               "CAP_PERFMON": 38, "CAP_BPF": 39}
    return sum(1 << numbers[n] for n in names)


def _proc_status(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(field)


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(1)
    yield sock
    sock.close()


POLICY = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
          "metadata": {"name": "web", "namespace": "x"},
          "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}],
                                "ports": [{"port": 80}]}]}}
TCP80 = Port(80, Protocol.TCP)


@pytest.mark.privileged
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv is not installed")
@pytest.mark.parametrize(("datapath", "backend"), [
    ("nft", None), ("ebpf", None), ("iptables", "nft"), ("iptables", "legacy")])
def test_the_agent_says_ready_and_enforces_within_the_units_capabilities(
        datapath: str, backend: str | None, tmp_path: Path, notify: socket.socket, trio,
        netns_prefix: str) -> None:
    caps = _bounding_set()
    setpriv = ["setpriv", "--no-new-privs", "--inh-caps=-all", "--bounding-set",
               ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in caps)])]
    table = f"{netns_prefix}agent" if datapath == "ebpf" else "stockade"
    agent = AgentProcess(tmp_path, trio.host_netns, netns_prefix, datapath=datapath,
                         table=table, env={"NOTIFY_SOCKET": str(tmp_path / "notify"),
                                           **({BACKEND_ENV: backend} if backend else {})})
    try:
        with open(agent.log, "ab") as log:
            agent.proc = subprocess.Popen([*setpriv, *agent.cmd], stdout=log, stderr=log,
                                          env=agent.env)
        deadline = time.monotonic() + 60
        while True:
            try:
                message = notify.recv(4096)
                break
            except TimeoutError:
                if agent.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"no READY=1: {agent.logs()[-3000:]}") from None
        assert message == b"READY=1"
        # READY=1 comes once the socket serves and the kernel holds the state.
        assert agent.call("status")["ready"]
        pid = agent.proc.pid
        assert int(_proc_status(pid, "CapBnd"), 16) == _cap_mask(caps)
        assert _proc_status(pid, "NoNewPrivs") == "1"

        for att in trio.all:
            ns, name = att.key.split("/")
            agent.call("endpoint.add", endpoint={
                "namespace": ns, "name": name, "labels": {"pod": name},
                "ips": [att.address4, att.address6], "netns": att.netns_path,
                "interface": att.ifname, "hostInterface": att.host_ifname})
        agent.call("apply", documents=[POLICY], source="test")
        atts = {a.key.split("/")[1]: a for a in trio.all}
        with ProbeServer({a.netns: [TCP80] for a in trio.all}):
            verdicts = {(v.probe.src, v.probe.dst): v.allowed for v in run_probes(
                [Probe(s, atts[s].netns, d, atts[d].address4, TCP80)
                 for s, d in [("b", "a"), ("c", "a"), ("a", "c")]], timeout=0.6)}
        assert verdicts == {("b", "a"): True, ("c", "a"): False, ("a", "c"): True}

        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(timeout=30) == 0, agent.logs()[-3000:]
    finally:
        agent.stop()
        # The table and chains go with the test's namespace; eBPF pins are global.
        if datapath == "ebpf":
            EbpfDatapath(table, netns=trio.host_netns).remove()


@pytest.mark.privileged
def test_an_abstract_notify_socket_is_used_too(tmp_path: Path, trio,
                                               netns_prefix: str) -> None:
    name = f"stockade-test-{netns_prefix}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(60)
        agent = AgentProcess(tmp_path, trio.host_netns, netns_prefix,
                             env={"NOTIFY_SOCKET": "@" + name})
        try:
            agent.start()
            assert sock.recv(4096) == b"READY=1"
        finally:
            agent.stop()
