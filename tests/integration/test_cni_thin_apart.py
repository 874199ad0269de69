"""The thin plugin with an agent in namespaces of its own, as the DaemonSet runs it.

The agent runs in a PID namespace and a mount namespace of its own (``unshare``;
the mount namespace a slave of the host's, as ``mountPropagation:
HostToContainer`` makes it): it cannot see the plugin's process, and paths are
the host's only where the host's mounts reach. And in a podman container shaped
as the DaemonSet's: host network, the DaemonSet's four capabilities and no
other, a read-only root of its own (the interpreter, the tree and /etc mounted
read-only), the test's directory (socket, state, data directory) and /run/netns
(``rslave``) from the host. The thin plugin hands it its
network namespace, its mount namespace and its root directory on the socket;
the agent serves the call when CNI_NETNS and the data directory are the same
files to it as to the plugin, and hands the call back otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.support.daemonset import Contained

from stockade.probe.client import Probe, run_probes
from stockade.probe.launcher import ProbeServer

from .test_cni import TCP80, WEB_POLICY
from .test_cni_harness import THIN, World, cni_agent

pytestmark = pytest.mark.privileged


def _apart(world_tmp: Path, host_netns: str, prefix: str, hide: Path | None = None,
           ) -> World:
    """A started agent in a PID and a mount namespace of its own; ``hide``: a directory
    the agent sees an empty tmpfs in place of (a volume the DaemonSet forgot)."""
    agent = cni_agent(world_tmp, host_netns, prefix)
    inner = shlex.join(agent.cmd)
    script = f"mount -t tmpfs stockade-test {shlex.quote(str(hide))} && " if hide else ""
    agent.cmd = ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc",
                 "--propagation", "slave", "sh", "-c", f"{script}exec {inner}"]
    agent.start()
    return World(prefix, host_netns, world_tmp, agent, THIN)


def _contained(tmp: Path, host_netns: str, prefix: str,
               ) -> tuple[World, Callable[[], None]]:
    """A started agent in a podman container shaped as the DaemonSet's; with what
    removes it."""
    agent = cni_agent(tmp, host_netns, prefix)
    (tmp / "run").mkdir(exist_ok=True)
    box = Contained(tmp, f"{prefix}-agent-{secrets.token_hex(2)}", [tmp])
    agent.cmd = box.command(agent.cmd)

    def remove() -> None:
        box.remove()
        if agent.proc is not None and agent.proc.poll() is None:
            agent.kill9()

    try:
        agent.start(timeout=60)
    except BaseException:
        remove()
        raise
    return World(prefix, host_netns, tmp, agent, THIN), remove


@pytest.fixture(params=["unshare", "podman"])
def apart(request: pytest.FixtureRequest, tmp_path: Path, netns_prefix: str,
          host_netns: str) -> Iterator[World]:
    if request.param == "unshare":
        world = _apart(tmp_path, host_netns, netns_prefix)
        try:
            yield world
        finally:
            world.agent.kill9()
        return
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed (scripts/setup.sh installs it)")
    world, remove = _contained(tmp_path, host_netns, netns_prefix)
    try:
        yield world
    finally:
        remove()


def _held(pid: int, fd: int) -> int:
    """Descriptors of process ``pid`` open on the file of this process's ``fd``, once
    connections just answered are closed (counted by what they refer to: the agent
    opens and closes its own files meanwhile)."""
    target = os.readlink(f"/proc/self/fd/{fd}")

    def count() -> int:
        n = 0
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                n += os.readlink(f"/proc/{pid}/fd/{name}") == target
        return n

    deadline = time.monotonic() + 5
    while count() and time.monotonic() < deadline:
        time.sleep(0.05)
    return count()


def _agent_pid(world: World) -> int:
    """The agent itself, as this PID namespace sees it (not `unshare`, not podman)."""
    sock = os.path.realpath(world.agent.socket)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            own = os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
        except OSError:
            continue
        if own and b"agent" in cmdline and sock.encode() in cmdline:
            return int(pid)
    raise AssertionError("the agent's process is not found")


def test_an_agent_apart_serves_the_thin_plugin_through_the_passed_namespaces(
        apart: World) -> None:
    world = apart
    assert os.readlink(f"/proc/{_agent_pid(world)}/ns/pid") != os.readlink("/proc/self/ns/pid")
    assert os.readlink(f"/proc/{_agent_pid(world)}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    world.agent.call("apply", documents=[WEB_POLICY])
    results = {}
    labels = {"web": {"app": "web"}, "client": {"role": "client"}, "other": {"role": "other"}}
    for name, lab in labels.items():
        got = world.run("ADD", world.conf(args={"labels": lab}), cid=f"c-{name}",
                        netns=world.netns(name), args=f"K8S_POD_NAMESPACE=x;K8S_POD_NAME={name}")
        assert got.code == 0 and got.out is not None, got
        results[name] = got.out
    # served by the agent (the namespace made after it started reached it: a slave mount)
    assert world.agent.call("status")["cniExec"] == {"calls": 3, "fallbacks": 0}
    # plumbed where the plugin runs (the test's host namespace), not where the agent is
    assert len(world.veths()) == 3
    web = str(results["web"]["ips"][0]["address"]).split("/")[0]
    with ProbeServer({f"{world.prefix}-web": [TCP80]}):
        verdicts = run_probes([Probe(src, f"{world.prefix}-{src}", "web", web, TCP80)
                               for src in ("client", "other")], timeout=0.6)
        assert [v.allowed for v in verdicts] == [True, False]
    for name in labels:
        got = world.run("DEL", world.conf(), cid=f"c-{name}", netns=f"/run/netns/"
                        f"{world.prefix}-{name}",
                        args=f"K8S_POD_NAMESPACE=x;K8S_POD_NAME={name}")
        assert got.code == 0, got
    assert world.veths() == [] and world.states() == []
    assert world.agent.call("status")["cniExec"] == {"calls": 6, "fallbacks": 0}


def test_a_thin_plugin_sending_only_its_pid_is_handed_back(apart: World) -> None:
    """Its pid names another process, or none, in the agent's PID namespace: the
    connection's credentials show that, and the call goes to the Python plugin."""
    answer = apart.agent.call("cni.exec", env={"CNI_COMMAND": "VERSION"},
                              stdin=json.dumps(apart.conf()), pid=os.getpid())
    assert answer == {"fallback": f"the agent does not see the caller's process (pid "
                                  f"{os.getpid()}; the connection's: none visible)"}


def _exec(world: World, args: dict[str, object], fds: list[int],
          op: str = "cni.exec") -> dict[str, object]:
    """One request carrying ``fds`` (SCM_RIGHTS), as the thin plugin sends its own."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(world.agent.socket)
        line = json.dumps({"v": 1, "op": op, "args": args}).encode() + b"\n"
        socket.send_fds(s, [line], fds)
        out = b""
        while not out.endswith(b"\n"):
            chunk = s.recv(65536)
            assert chunk, "the agent closed the connection"
            out += chunk
    reply: dict[str, object] = json.loads(out)
    assert reply["ok"], reply
    result = reply["result"]
    assert isinstance(result, dict)
    return result


def _own() -> list[int]:
    """This process's network and mount namespaces and root, as the thin plugin sends."""
    return [os.open("/proc/self/ns/net", os.O_RDONLY), os.open("/proc/self/ns/mnt", os.O_RDONLY),
            os.open("/", os.O_PATH | os.O_DIRECTORY)]


def test_descriptors_of_the_wrong_kind_are_handed_back_and_closed(apart: World) -> None:
    """A request carrying other descriptors than namespaces gets a fallback, and no
    request leaves a descriptor open in the agent: not one sent with the wrong
    operation, not more than the agent takes (the kernel closes those)."""
    pid = _agent_pid(apart)
    r, w = os.pipe()
    net, mnt, root = _own()
    args: dict[str, object] = {"env": {"CNI_COMMAND": "VERSION"},
                               "stdin": json.dumps(apart.conf()), "pid": 0,
                               "fds": ["net", "mnt", "root"]}
    try:
        wrong = _exec(apart, args, [r, w, root])
        assert str(wrong["fallback"]).startswith(
            "the descriptor passed as the network namespace is 'pipe:["), wrong
        assert _exec(apart, args, [net, net, root]) == {
            "fallback": "the descriptor passed as the mount namespace is "
                        f"{os.readlink('/proc/self/ns/net')!r}"}
        assert _exec(apart, args, [net]) == {
            "fallback": "the request's descriptors did not arrive (1 of 3)"}
        # the right ones: VERSION is answered by the agent's copy of the plugin
        served = _exec(apart, args, [net, mnt, root])
        assert served["code"] == 0 and "supportedVersions" in str(served["stdout"]), served
        # with another operation: ignored, and closed; more than four: the kernel closes
        # the rest
        assert "ready" in _exec(apart, {}, [net, r, w], op="status")
        assert "ready" in _exec(apart, {}, [r] * 12, op="status")
        assert _held(pid, r) == 0 and _held(pid, mnt) == 0
        assert apart.agent.call("status")["cniExec"] == {"calls": 1, "fallbacks": 3}
    finally:
        for fd in (r, w, net, mnt, root):
            os.close(fd)


def test_a_data_directory_the_agent_sees_otherwise_is_handed_back(
        tmp_path: Path, netns_prefix: str, host_netns: str) -> None:
    """The DaemonSet without the data directory's volume: the agent's view of it is
    another directory. The agent says so and the Python plugin does the ADD, whose
    state the next call (DEL) finds where the runtime's side keeps it."""
    data = tmp_path / "cni"
    data.mkdir()
    world = _apart(tmp_path, host_netns, netns_prefix, hide=data)
    own = _own()
    try:
        netns = world.netns("a")
        args: dict[str, object] = {
            "env": {"CNI_COMMAND": "ADD", "CNI_NETNS": netns, "CNI_CONTAINERID": "c-a",
                    "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni"},
            "stdin": json.dumps(world.conf()), "pid": 0, "fds": ["net", "mnt", "root"]}
        assert _exec(world, args, own) == {
            "fallback": f"{data} is not the same to the agent as to the caller (the agent "
                        "runs in another mount namespace; mount it from the host)"}
        # a delegated IPAM plugin would run in the agent's view of the files
        ipam = {**args, "stdin": json.dumps(world.conf(ipam={"type": "host-local"}))}
        assert "delegates to an IPAM plugin" in str(_exec(world, ipam, own)["fallback"])
        # the agent's own pool, named: not a plugin (the data directory is what differs)
        pool = {**args, "stdin": json.dumps(world.conf(ipam={"type": "stockade"}))}
        assert str(_exec(world, pool, own)["fallback"]).startswith(f"{data} is not the same")
        got = world.run("ADD", world.conf(args={"labels": {"app": "web"}}), cid="c-a",
                        netns=netns, args="K8S_POD_NAMESPACE=x;K8S_POD_NAME=a")
        assert got.code == 0, got
        assert world.agent.call("status")["cniExec"] == {"calls": 0, "fallbacks": 4}
        assert world.states() and len(world.veths()) == 1
        got = world.run("DEL", world.conf(), cid="c-a", netns=netns,
                        args="K8S_POD_NAMESPACE=x;K8S_POD_NAME=a")
        assert got.code == 0, got
        assert world.veths() == [] and world.states() == []
        assert world.agent.call("status")["cniExec"] == {"calls": 0, "fallbacks": 5}
        assert "is not the same to the agent as to the caller" in world.agent.logs()
    finally:
        for fd in own:
            os.close(fd)
        world.agent.kill9()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
