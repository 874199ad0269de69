"""A real runtime: podman (CNI backend, runc) runs two containers through stockade-cni.

Both containers serve HTTP with busybox; a policy isolates namespace ``pa``
(the first container's), so ``b`` cannot reach ``a`` while ``a`` reaches ``b``.
Podman creates the namespaces and calls the plugin from the machine's own
network namespace, so the agent runs there too — isolated by unique names:
its own nft table, bridge, subnet, socket, state and podman storage, all
removed afterwards. Nothing touches the default route or forwarding (bridged
traffic needs neither).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stockade.net.namespace import list_netns, remove_netns

from .agent_harness import AgentProcess
from .test_cni_harness import PLUGIN, REFERENCE, cni_agent

pytestmark = pytest.mark.privileged

NEEDED = ("podman", "runc", "busybox", "nft")


def _missing() -> str | None:
    for tool in NEEDED:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup.sh installs it)"
    return None


@dataclass
class Podman:
    tmp: Path
    network: str
    conf_dir: Path
    storage: Path  # short: podman refuses a runroot longer than 50 characters

    def cmd(self, *args: str) -> list[str]:
        return ["podman", "--root", str(self.storage / "root"), "--runroot",
                str(self.storage / "run"), "--runtime", "runc", "--network-backend", "cni",
                "--cni-config-dir", str(self.conf_dir), "--cgroup-manager", "cgroupfs",
                "--events-backend", "none", *args]

    def run(self, *args: str, env: dict[str, str] | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        full = {**os.environ, "CONTAINERS_CONF": str(self.tmp / "containers.conf"),
                **(env or {})}
        got = subprocess.run(self.cmd(*args), capture_output=True, text=True, env=full,
                             check=False, timeout=timeout)
        if check and got.returncode != 0:
            raise AssertionError(f"podman {' '.join(args[:2])} failed: {got.stderr[-2000:]}")
        return got

    def start(self, name: str, namespace: str) -> None:
        """A container serving HTTP on port 80, attached through stockade-cni.

        ``--rootfs`` is a flag: the first argument after the options is then the
        root directory, so every option goes before it. Low explicit ulimits:
        root here lacks CAP_SYS_RESOURCE to raise podman's defaults.
        """
        self.run("run", "-d", "--name", name, "--network", self.network, "--ulimit",
                 "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--rootfs",
                 str(self.tmp / "rootfs"), "/bin/busybox", "httpd", "-f", "-p", "80",
                 "-h", "/www", env={"CNI_ARGS": f"K8S_POD_NAMESPACE={namespace}"})

    def fetch(self, name: str, address: str) -> bool:
        """An HTTP request from inside container ``name`` (busybox nc; its static wget
        crashes resolving even a literal address)."""
        request = "printf 'GET / HTTP/1.0\\r\\n\\r\\n'"
        got = self.run("exec", name, "/bin/busybox", "sh", "-c",
                       f"{request} | /bin/busybox nc -w 2 {address} 80", check=False,
                       timeout=30)
        return got.returncode == 0 and "stockade" in got.stdout


@pytest.fixture
def podman_node(tmp_path: Path,
                netns_prefix: str) -> Iterator[tuple[Podman, AgentProcess, str]]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    prefix, table = netns_prefix, f"{netns_prefix}t"
    subnet = f"10.251.{random.randint(16, 250)}.0/24"  # random: parallel runs differ
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    for name in os.listdir(REFERENCE):
        (plugins / name).symlink_to(os.path.join(REFERENCE, name))
    (plugins / "stockade-cni").symlink_to(PLUGIN)
    (tmp_path / "containers.conf").write_text(
        f'[network]\ncni_plugin_dirs = ["{plugins}"]\n')
    rootfs = tmp_path / "rootfs"
    for d in ("bin", "proc", "sys", "dev", "etc", "tmp", "www"):
        (rootfs / d).mkdir(parents=True)
    shutil.copy2(shutil.which("busybox") or "", rootfs / "bin" / "busybox")
    (rootfs / "www" / "index.html").write_text("stockade\n")
    agent = cni_agent(tmp_path / "agent", None, prefix, "--table", table, "--subnet", subnet)
    (tmp_path / "agent").mkdir()
    conf_dir = tmp_path / "net"
    conf_dir.mkdir()
    network = f"{prefix}net"
    (conf_dir / f"{network}.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": network, "plugins": [{
            "type": "stockade-cni", "bridge": f"{prefix}br0", "vethPrefix": prefix,
            "dataDir": str(tmp_path / "cni"), "socket": agent.socket}]}))
    pm = Podman(tmp_path, network, conf_dir, Path(tempfile.mkdtemp(prefix=f"{prefix}-")))
    agent.start()
    try:
        yield pm, agent, prefix
    finally:
        _cleanup(pm, agent, prefix, table)


def _cleanup(pm: Podman, agent: AgentProcess, prefix: str, table: str) -> None:
    """Everything the test made in the machine's namespace, even after a failure."""
    names = pm.run("ps", "-aq", check=False).stdout.split()
    if names:
        pm.run("rm", "-f", "-t", "0", *names, check=False)
    agent.stop()
    for family in ("inet", "bridge"):  # the policy table and the port guard's
        subprocess.run(["nft", "delete", "table", family, table], capture_output=True,
                       check=False)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                           check=False).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(prefix):
            subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)
    for ns in list_netns():
        if ns.startswith(prefix):
            remove_netns(ns)
    for part in ("root", "run"):
        subprocess.run(["umount", "-R", str(pm.storage / part)], capture_output=True,
                       check=False)
    shutil.rmtree(pm.storage, ignore_errors=True)


def test_podman_containers_under_a_policy(
        podman_node: tuple[Podman, AgentProcess, str]) -> None:
    pm, agent, prefix = podman_node
    call = agent.call
    call("apply", documents=[{
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "isolate", "namespace": "pa"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}])
    a, b = f"{prefix}-a", f"{prefix}-b"
    pm.start(a, "pa")
    pm.start(b, "pb")
    eps = {f"{e['namespace']}/{e['name']}": e for e in call("get", kind="endpoints")["items"]}
    assert set(eps) == {f"pa/{a}", f"pb/{b}"}
    assert {e["owner"] for e in eps.values()} == {"cni"}
    addr_a, addr_b = eps[f"pa/{a}"]["ips"][0], eps[f"pb/{b}"]["ips"][0]
    assert pm.fetch(a, addr_b) is True  # b is not isolated
    assert pm.fetch(b, addr_a) is False  # a's namespace admits no one
    pm.run("rm", "-f", "-t", "0", a, b)
    assert call("get", kind="endpoints")["items"] == []
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                           check=True).stdout
    assert [ln for ln in links.splitlines() if f"{prefix}" in ln and "br0" not in ln] == []
