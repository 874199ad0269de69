"""`stockade run|ps|rm|probe` against a real agent, real namespaces and real packets.

The agent runs in-process (its own host namespace, bridge prefix and state
directory per test) with the container manager as its extension; containers
are real processes serving real TCP ports. Whatever happens, every container
process is killed and every namespace of the test's prefix removed afterwards.
The pure helpers (request parsing, probe verdicts, tables) are tested first,
without privileges.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stockade.agent.client import AgentClient
from stockade.agent.containers import ContainerManager, parse_port_spec, run_request
from stockade.agent.daemon import Agent, AgentConfig
from stockade.agent.protocol import INVALID, ApiError
from stockade.cli import containers as cli
from stockade.engine.matrix import Matrix, MatrixPort, TruthTable
from stockade.model.cluster import ContainerPort
from stockade.net.namespace import list_netns, netns_exists
from stockade.probe import compare
from stockade.probe.client import Outcome, Probe, ProbeResult, run_probes
from stockade.probe.protocol import Port

ROOT = Path(__file__).resolve().parents[2]
SERVER = str(ROOT / "examples" / "agent" / "server.py")
CONNECT = str(ROOT / "examples" / "agent" / "connect.py")
privileged = pytest.mark.privileged


# ---- pure helpers --------------------------------------------------------------------------


def test_port_specs() -> None:
    assert parse_port_spec("80/tcp") == ContainerPort(80, "TCP", "")
    assert parse_port_spec("http=8080/TCP") == ContainerPort(8080, "TCP", "http")
    assert parse_port_spec("dns=53/udp") == ContainerPort(53, "UDP", "dns")
    assert parse_port_spec("9000") == ContainerPort(9000, "TCP", "")
    for bad in ("http", "80/icmp", "x=/tcp", "=80"):
        with pytest.raises(ValueError):
            parse_port_spec(bad)


def test_run_request_lists_every_problem() -> None:
    with pytest.raises(ApiError) as err:
        run_request({"namespace": "Bad_NS", "name": "", "labels": {"a": "b c"},
                     "ports": [{"name": "http", "port": 70000},
                               {"name": "http", "port": 80}], "command": []})
    assert err.value.code == INVALID
    text = "\n".join(err.value.lines)
    for where in ("metadata.namespace:", "metadata.name:", "metadata.labels",
                  "ports[0].containerPort", "ports[1].name: Duplicate value", "command:"):
        assert where in text
    ok = run_request({"name": "web", "labels": {"app": "web"}, "command": ["/bin/true"],
                      "ports": [{"name": "http", "port": 80, "protocol": "tcp"}],
                      "cwd": "/", "env": {"A": "1"}})
    assert (ok.key, ok.ports, ok.env) == ("default/web", (ContainerPort(80, "TCP", "http"),),
                                          (("A", "1"),))


def test_probe_ports_and_verdicts() -> None:
    assert cli.parse_probe_port("80/tcp") == (80, "TCP")
    assert cli.parse_probe_port("udp:53") == (53, "UDP")
    assert cli.parse_probe_port("api") == ("api", "TCP")
    assert cli.parse_probe_port("dns/udp") == ("dns", "UDP")
    # refused is a RST: the datapath let the SYN through
    assert compare.agrees(True, Outcome.ALLOWED) and compare.agrees(True, Outcome.REFUSED)
    assert compare.agrees(False, Outcome.DENIED)
    assert not compare.agrees(False, Outcome.REFUSED)
    assert not compare.agrees(True, Outcome.DENIED)
    assert not compare.agrees(False, Outcome.UNREACHABLE)
    assert not compare.agrees(True, Outcome.ERROR)
    assert compare.netns_name("/run/netns/abc") == "abc"
    assert compare.netns_name("/proc/1/ns/net") is None and compare.netns_name("") is None


def test_report_marks_disagreements() -> None:
    pods = ("a/x", "b/y")
    matrix = Matrix(pods, (TruthTable(MatrixPort("TCP", 80), ((True, False), (True, True))),))

    def verdict(outcome: Outcome) -> ProbeResult:
        return ProbeResult(Probe("a/x", "n", "b/y", "10.0.0.2", Port(80)), outcome)

    measured = compare.Measured({(0, 0, 1): verdict(Outcome.ALLOWED),
                                 (0, 1, 0): verdict(Outcome.REFUSED)})
    text, agreed, probed = compare.report(matrix, measured)
    assert (agreed, probed) == (1, 2)
    lines = text.splitlines()
    assert lines[2] == "a/x    .   X         a/x    -   .!"  # model | kernel, a mismatch marked
    assert lines[3] == "b/y    .   .         b/y    R   -"
    assert "a/x -> b/y TCP/80: model denies, kernel: allowed" in text


def test_ps_rows() -> None:
    rows = cli.ps_rows({"items": [{"key": "a/x", "ips": ["10.0.0.2"], "pid": 7,
                                   "state": "running", "command": ["sleep", "9"],
                                   "labels": {"app": "x"}}],
                        "exited": [{"key": "a/y", "pid": 8, "exitCode": -15}]})
    assert rows[1] == ["a/x", "10.0.0.2", "7", "running", "sleep 9", "app=x"]
    assert rows[2][3] == "killed (SIGTERM)"


# ---- a real agent --------------------------------------------------------------------------


def _processes_in(prefix: str) -> list[int]:
    """Pids whose network namespace is one of the test's (named after its prefix)."""
    inodes = set()
    for name in list_netns():
        if name.startswith(prefix):
            with contextlib.suppress(OSError):
                inodes.add(os.stat(f"/run/netns/{name}").st_ino)
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                    pids.append(int(entry))
    return pids


class Harness:
    """In-process agents sharing one state directory, socket and host namespace."""

    def __init__(self, tmp: Path, host_netns: str, prefix: str) -> None:
        self.prefix = prefix
        self.socket = tempfile.mktemp(prefix=f"{prefix}-", suffix=".sock", dir="/tmp")
        self.config = AgentConfig(state_dir=str(tmp / "state"), socket=self.socket,
                                  netns=host_netns, bridge_prefix=prefix, table="stockade",
                                  log_group=None, metrics_address=None, resync_interval=5.0)
        self.agent: Agent | None = None

    def start(self) -> Agent:
        agent = Agent(self.config)
        if not any(isinstance(e, ContainerManager) for e in agent.extensions):
            agent.extensions.append(ContainerManager(grace=2.0))
        self.agent = agent
        agent.start()
        return agent

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None

    def call(self, op: str, **args: Any) -> Any:
        with AgentClient(self.socket, timeout=60) as c:
            return c.call(op, **args)

    def run(self, key: str, command: list[str], labels: dict[str, str] | None = None,
            ports: tuple[int, ...] = ()) -> dict[str, Any]:
        ns, name = key.split("/")
        out: dict[str, Any] = self.call(
            "run", namespace=ns, name=name, labels=labels or {}, command=command,
            ports=[{"name": f"p{p}", "port": p, "protocol": "TCP"} for p in ports])
        return out

    def serve(self, key: str, port: int = 8080, **labels: str) -> dict[str, Any]:
        out = self.run(key, [sys.executable, SERVER, str(port)], labels, (port,))
        log = Path(out["log"])
        _until(lambda: "listening" in log.read_text(), what=f"{key} listening")
        return out

    def endpoints(self) -> dict[str, dict[str, Any]]:
        return {f"{e['namespace']}/{e['name']}": e
                for e in self.call("get", kind="endpoints")["items"]}

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            if self.agent is not None:
                for item in self.call("ps")["items"]:
                    self.call("rm", key=item["key"], grace=0.5)
        self.stop()
        for pid in _processes_in(self.prefix):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)


@pytest.fixture
def harness(tmp_path: Path, host_netns: str, netns_prefix: str) -> Iterator[Harness]:
    h = Harness(tmp_path, host_netns, netns_prefix)
    h.start()
    try:
        yield h
    finally:
        h.cleanup()


def _until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if cond():
                return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _connect(src: dict[str, Any], dst: dict[str, Any], port: int = 8080) -> Outcome:
    """One real TCP connection from src's namespace to dst's address."""
    ep_src, ep_dst = src["endpoint"], dst["endpoint"]
    probe = Probe(ep_src["name"], os.path.basename(ep_src["netns"]), ep_dst["name"],
                  ep_dst["ips"][0], Port(port))
    return run_probes([probe], timeout=1.0)[0].outcome


def _deny_ingress(ns: str) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny-ingress", "namespace": ns},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}


def _deny_egress(ns: str) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny-egress", "namespace": ns},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"]}}


@privileged
def test_run_policy_one_direction_probe_and_rm(harness: Harness, capsys: Any) -> None:
    one = harness.serve("x/one", app="one")
    two = harness.serve("y/two", app="two")
    assert one["endpoint"]["owner"] == "run" and one["pid"] > 0
    assert _connect(one, two) is Outcome.ALLOWED
    assert _connect(two, one) is Outcome.ALLOWED
    harness.call("apply", documents=[_deny_ingress("y")], source="test")
    assert _connect(one, two) is Outcome.DENIED  # y isolated for ingress: dropped
    assert _connect(two, one) is Outcome.ALLOWED

    code = cli.run_probe(argparse.Namespace(socket=harness.socket, ports=[], timeout=1.0))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "model and kernel agree on 2/2 pairs" in out

    ps = harness.call("ps")["items"]
    assert [(i["key"], i["state"], i["pid"]) for i in ps] == [
        ("x/one", "running", one["pid"]), ("y/two", "running", two["pid"])]
    removed = harness.call("rm", key="x/one")
    assert removed == {"removed": True, "exitCode": -signal.SIGTERM}
    assert "x/one" not in harness.endpoints()
    assert not netns_exists(os.path.basename(one["endpoint"]["netns"]))
    with pytest.raises(ProcessLookupError):
        os.kill(one["pid"], 0)
    assert "run:x/one" not in str(harness.call("snapshot.save"))  # the address is free


@privileged
def test_policy_is_in_force_before_the_command_starts(harness: Harness) -> None:
    srv = harness.serve("srv/web")
    address = srv["endpoint"]["ips"][0]
    harness.call("apply", documents=[_deny_egress("locked")], source="test")
    logs = {}
    for key in ("locked/early", "open/early"):  # the same command, with and without policy
        out = harness.run(key, [sys.executable, CONNECT, address, "8080", "1"])
        logs[key] = Path(out["log"])
    # Each command exits after its one attempt, and its endpoint goes with it.
    _until(lambda: not {"locked/early", "open/early"} & set(harness.endpoints()),
           what="the endpoints of exited containers to disappear")
    assert "no connection" in logs["locked/early"].read_text()
    assert "connected" in logs["open/early"].read_text()
    exited = {e["key"]: e["exitCode"] for e in harness.call("ps", all=True)["exited"]}
    assert exited == {"locked/early": 1, "open/early": 0}
    # The endpoint leaves the ruleset first, then its veth and namespace go.
    _until(lambda: [n for n in list_netns() if n.startswith(harness.prefix)
                    and n != harness.config.netns] == [
        os.path.basename(srv["endpoint"]["netns"])], what="the namespaces to be removed")


@privileged
def test_rm_kills_a_process_that_ignores_sigterm(harness: Harness) -> None:
    stubborn = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('ready', flush=True); time.sleep(120)")
    out = harness.run("x/stubborn", [sys.executable, "-c", stubborn])
    _until(lambda: "ready" in Path(out["log"]).read_text(), what="the process to start")
    started = time.monotonic()
    assert harness.call("rm", key="x/stubborn", grace=0.5)["exitCode"] == -signal.SIGKILL
    assert time.monotonic() - started < 5
    assert harness.endpoints() == {}


@privileged
def test_bad_runs_leave_nothing_behind(harness: Harness) -> None:
    with pytest.raises(ApiError) as err:
        harness.run("x/missing", ["/nonexistent/program"])
    assert err.value.code == INVALID and "cannot start" in err.value.message
    with pytest.raises(ApiError):
        harness.run("X/bad", ["/bin/true"])
    harness.serve("x/dup")
    with pytest.raises(ApiError) as err:
        harness.serve("x/dup")
    assert "already exists" in err.value.message
    assert list(harness.endpoints()) == ["x/dup"]
    assert "run:x/missing" not in str(harness.call("snapshot.save"))  # no address kept
    with pytest.raises(ApiError) as err:
        harness.call("rm", key="x/nothing")
    assert err.value.code == "not_found"


@privileged
def test_restart_adopts_running_containers_and_cleans_dead_ones(harness: Harness) -> None:
    keep = harness.serve("x/keep")
    die = harness.serve("x/die")
    client = harness.serve("y/client")
    harness.stop()  # the containers keep running without the agent
    os.kill(die["pid"], signal.SIGKILL)
    assert _connect(client, keep) is Outcome.ALLOWED
    harness.start()
    ps = {i["key"]: i for i in harness.call("ps")["items"]}
    assert set(ps) == {"x/keep", "y/client"}
    assert (ps["x/keep"]["pid"], ps["x/keep"]["state"]) == (keep["pid"], "running")
    assert not netns_exists(os.path.basename(die["endpoint"]["netns"]))
    assert _connect(client, keep) is Outcome.ALLOWED
    # Supervised again: its exit removes the endpoint, though it is not the agent's child.
    os.kill(keep["pid"], signal.SIGTERM)
    _until(lambda: "x/keep" not in harness.endpoints(), what="x/keep to be removed")
    # The address of the dead one is free again: the next container gets it.
    again = harness.serve("x/again")
    assert again["endpoint"]["ips"][0] in (die["endpoint"]["ips"][0],
                                           keep["endpoint"]["ips"][0])


@privileged
def test_demo_script(tmp_path: Path) -> None:
    """scripts/demo.sh end to end: the live agent, the probes, the teardown, the analysis."""
    wrapper = tmp_path / "stockade"
    # The CLI and the agent are wired (cli/main.py, agent/daemon.py's default_extensions):
    # the wrapper only runs this interpreter's stockade. (It used to add a second
    # container manager, which the one table of operations now refuses.)
    wrapper.write_text(f"""#!{sys.executable}
import sys
import stockade.cli.main as m
sys.exit(m.main())
""")
    wrapper.chmod(0o755)
    env = {**os.environ, "STOCKADE": str(wrapper),
           "PYTHON": sys.executable, "STOCKADE_SOCKET": ""}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], cwd="/", env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert out.count("model and kernel agree on 18/18 pairs") == 2
    assert "db/early: no connection" in out
    assert "exited (1)" in out
    assert out.rstrip().endswith("demo: done")
    assert not [n for n in list_netns() if n.startswith("stkdemo-")]
