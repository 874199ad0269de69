"""A small CNI runtime for the plugin's tests, and an agent with the CNI extension.

:class:`Runtime` does what libcni does with a network configuration list:
each plugin of the list is the executable of its ``type`` found in
``CNI_PATH``, run as a separate process with the ``CNI_*`` variables and its
configuration (the list's ``name`` and ``cniVersion`` merged in) on stdin;
ADD runs the list in order feeding each result to the next as
``prevResult``, DEL runs it backwards with the cached result, CHECK with it,
GC and STATUS run every plugin. Plugins run inside the test's "host" network
namespace (``nsenter --net``), where the bridge and the agent's table live.

:func:`cni_agent` starts a real agent process with the CNI extension
(:class:`stockade.agent.cni_ops.CniOps`) registered — what ``stockade
agent`` does once the extension is wired into the daemon, which this boot
script does by itself until then (and leaves alone afterwards).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from stockade.net.namespace import create_netns

from .agent_harness import AgentProcess

PLUGIN = str(Path(sys.executable).parent / "stockade-cni")
# The thin plugin (`make cni`): the same plugin run by the agent (cni.exec).
THIN = str(Path(__file__).resolve().parents[2] / "build" / "cni" / "stockade-cni")
REFERENCE = "/usr/lib/cni"

def cni_agent(tmp: Path, host_netns: str | None, prefix: str, *extra: str) -> AgentProcess:
    """An agent (not started); the daemon serves the ``cni.*`` operations."""
    agent = AgentProcess(tmp, host_netns or "unused", prefix)
    cmd = list(agent.cmd)
    if host_netns is None:  # enforce in our own namespace (podman's bridge is there)
        i = cmd.index("--netns")
        del cmd[i:i + 2]
    agent.cmd = cmd + list(extra)
    return agent


@dataclass(frozen=True)
class Outcome:
    code: int
    out: dict[str, Any] | None
    stderr: str = ""

    @property
    def error(self) -> int | None:
        """The error object's code, when the plugin failed."""
        return None if self.code == 0 or self.out is None else int(self.out.get("code", -1))


def run_plugin(executable: str, command: str, conf: Mapping[str, Any] | bytes, *,
               host_netns: str | None, container_id: str = "", netns: str = "",
               ifname: str = "", args: str = "", path: str = REFERENCE,
               env: Mapping[str, str | None] | None = None) -> Outcome:
    """One plugin process, exactly as a runtime starts it."""
    variables = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    variables.update({"CNI_COMMAND": command, "CNI_CONTAINERID": container_id,
                      "CNI_NETNS": netns, "CNI_IFNAME": ifname, "CNI_ARGS": args,
                      "CNI_PATH": path})
    for key, value in (env or {}).items():
        if value is None:
            variables.pop(key, None)
        else:
            variables[key] = value
    stdin = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    cmd = [executable]
    if host_netns is not None:
        cmd = ["nsenter", f"--net=/run/netns/{host_netns}", "--", executable]
    proc = subprocess.run(cmd, input=stdin, capture_output=True, env=variables,
                          timeout=120, check=False)
    text = proc.stdout.decode().strip()
    out = json.loads(text) if text else None
    return Outcome(proc.returncode, out, proc.stderr.decode())


@dataclass
class Runtime:
    """libcni's behaviour for one configuration list (see the module doc)."""

    conflist: Mapping[str, Any]
    host_netns: str | None
    plugin_dir: str
    cache: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    trail: list[dict[str, Any]] = field(default_factory=list)  # the last ADD's results

    def _path(self) -> str:
        return self.plugin_dir

    def _exe(self, ptype: str) -> str:
        return PLUGIN if ptype == "stockade-cni" else os.path.join(REFERENCE, ptype)

    def _conf(self, plugin: Mapping[str, Any], prev: Mapping[str, Any] | None,
              extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        conf = {**plugin, "name": self.conflist["name"],
                "cniVersion": self.conflist["cniVersion"], **(extra or {})}
        if prev is not None:
            conf["prevResult"] = prev
        return conf

    def _run(self, command: str, plugin: Mapping[str, Any], conf: Mapping[str, Any],
             **kw: Any) -> Outcome:
        return run_plugin(self._exe(plugin["type"]), command, conf,
                          host_netns=self.host_netns, path=self._path(), **kw)

    def add(self, cid: str, netns: str, ifname: str = "eth0", args: str = "",
            extra: Mapping[str, Any] | None = None) -> Outcome:
        prev: dict[str, Any] | None = None
        outcome = Outcome(0, None)
        self.trail = []
        for plugin in self.conflist["plugins"]:
            outcome = self._run("ADD", plugin, self._conf(plugin, prev, extra),
                                container_id=cid, netns=netns, ifname=ifname, args=args)
            if outcome.code != 0:
                return outcome
            prev = outcome.out
            assert prev is not None
            self.trail.append(prev)
        assert prev is not None
        self.cache[(cid, ifname)] = prev
        return outcome

    def delete(self, cid: str, netns: str, ifname: str = "eth0", args: str = "") -> Outcome:
        prev = self.cache.get((cid, ifname))
        last = Outcome(0, None)
        for plugin in reversed(self.conflist["plugins"]):
            last = self._run("DEL", plugin, self._conf(plugin, prev), container_id=cid,
                             netns=netns, ifname=ifname, args=args)
            if last.code != 0:
                return last
        self.cache.pop((cid, ifname), None)
        return last

    def check(self, cid: str, netns: str, ifname: str = "eth0") -> Outcome:
        prev = self.cache[(cid, ifname)]
        last = Outcome(0, None)
        for plugin in self.conflist["plugins"]:
            last = self._run("CHECK", plugin, self._conf(plugin, prev), container_id=cid,
                             netns=netns, ifname=ifname)
            if last.code != 0:
                return last
        return last

    def gc(self, valid: Sequence[tuple[str, str]]) -> Outcome:
        attachments = [{"containerID": c, "ifname": i} for c, i in valid]
        last = Outcome(0, None)
        for plugin in self.conflist["plugins"]:
            if plugin["type"] != "stockade-cni":
                continue  # the reference plugins (1.1.1) predate GC
            last = self._run("GC", plugin, self._conf(
                plugin, None, {"cni.dev/valid-attachments": attachments}))
            if last.code != 0:
                return last
        return last

    def status(self) -> Outcome:
        plugin = next(p for p in self.conflist["plugins"] if p["type"] == "stockade-cni")
        return self._run("STATUS", plugin, self._conf(plugin, None))


def netns_file(name: str) -> str:
    return f"/run/netns/{name}"


@dataclass
class World:
    """One test's node: host namespace, an agent with the extension, a network config."""

    prefix: str
    host: str
    tmp: Path
    agent: AgentProcess
    plugin: str = PLUGIN

    @property
    def network(self) -> str:
        return f"{self.prefix}net"

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br0"

    @property
    def data_dir(self) -> Path:
        return self.tmp / "cni"

    def conf(self, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
        """Main mode on the test's bridge, state and socket in the test's directory."""
        return {"cniVersion": version, "name": self.network, "type": "stockade-cni",
                "bridge": self.bridge, "vethPrefix": self.prefix,
                "dataDir": str(self.data_dir), "socket": self.agent.socket, **extra}

    def netns(self, name: str) -> str:
        create_netns(f"{self.prefix}-{name}")
        return netns_file(f"{self.prefix}-{name}")

    def run(self, command: str, conf: Mapping[str, Any] | bytes, cid: str = "",
            netns: str = "", ifname: str = "eth0", args: str = "",
            env: Mapping[str, str | None] | None = None) -> Outcome:
        return run_plugin(self.plugin, command, conf, host_netns=self.host, container_id=cid,
                          netns=netns, ifname=ifname, args=args, env=env)

    def links(self) -> list[str]:
        """The test's links in the host namespace (veths and bridge)."""
        out = subprocess.run(["ip", "-n", self.host, "-o", "link", "show"], check=True,
                             capture_output=True, text=True).stdout
        names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]
        return sorted(n for n in names if n.startswith(self.prefix))

    def veths(self) -> list[str]:
        return [n for n in self.links() if n != self.bridge]

    def states(self) -> list[str]:
        d = self.data_dir / self.network
        return sorted(p.name for p in d.glob("*.json")) if d.exists() else []

    def pool(self) -> dict[str, str]:
        """The agent's allocated addresses (address -> owner)."""
        meta = self.agent.call("snapshot.save")["snapshot"].get("meta") or {}
        return dict((meta.get("ipam") or {}).get("allocated") or {})

    def endpoints(self) -> dict[str, dict[str, Any]]:
        return {f"{e['namespace']}/{e['name']}": e
                for e in self.agent.call("get", kind="endpoints")["items"]}

    def table(self) -> str:
        return subprocess.run(["ip", "netns", "exec", self.host, "nft", "list", "table",
                               "inet", "stockade"], capture_output=True, text=True,
                              check=False).stdout


@pytest.fixture(params=["python", "thin"])
def world(request: pytest.FixtureRequest, tmp_path: Path, netns_prefix: str,
          host_netns: str) -> Iterator[World]:
    """A started agent with the CNI extension in the test's host namespace, driven by
    the Python plugin and by the thin one (each test runs with both)."""
    agent = cni_agent(tmp_path, host_netns, netns_prefix).start()
    try:
        yield World(netns_prefix, host_netns, tmp_path, agent,
                    THIN if request.param == "thin" else PLUGIN)
    finally:
        # SIGKILL: a graceful stop polls once a second, and nothing here outlives the
        # test (the host namespace, with bridge, veths and table, goes next).
        if agent.proc is not None and agent.proc.poll() is None:
            agent.kill9()


@pytest.mark.privileged
def test_the_harness_finds_its_executables() -> None:
    assert os.access(PLUGIN, os.X_OK), "pip install -e . (the stockade-cni entry point)"
    assert os.access(THIN, os.X_OK), "make cni (the thin plugin)"
    for name in ("bridge", "host-local", "loopback"):
        assert os.access(os.path.join(REFERENCE, name), os.X_OK), \
            "apt-get install containernetworking-plugins"
