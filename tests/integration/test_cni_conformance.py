"""Conformance table: every operation and error code, the plugin run as a runtime runs it.

Each row is one plugin process: ``CNI_*`` variables, JSON on stdin, and the
exit status and error code it must answer with. Rows that need state (a
duplicate ADD, CHECK after a change behind the plugin's back, GC) are the
sequences further down; the 50-way parallel run is at the end.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest

from stockade.net.namespace import list_netns, remove_netns

from .test_cni_harness import World, world  # noqa: F401  (the fixture)

pytestmark = pytest.mark.privileged


@dataclass(frozen=True)
class Row:
    """One invocation and what it must answer."""

    id: str
    command: str
    code: int | None  # the error object's code; None: success
    conf: dict[str, Any] = field(default_factory=dict)  # merged into the world's config
    env: dict[str, str | None] = field(default_factory=dict)  # None removes the variable
    stdin: bytes | None = None  # instead of the configuration
    netns: bool = True  # pass a fresh namespace as CNI_NETNS
    check: Callable[[World, dict[str, Any] | None], None] | None = None


def _version_answer(version: str) -> Callable[[World, dict[str, Any] | None], None]:
    def check(w: World, out: dict[str, Any] | None) -> None:
        assert out == {"cniVersion": version, "supportedVersions": ["0.4.0", "1.0.0",
                                                                    "1.1.0"]}
    return check


def _nothing_left(w: World, out: dict[str, Any] | None) -> None:
    assert w.veths() == [] and w.states() == [] and w.pool() == {} and w.endpoints() == {}


def _silent(w: World, out: dict[str, Any] | None) -> None:
    assert out is None


NO_AGENT = {"socket": "/nonexistent/agent.sock"}
GC_VALID: dict[str, Any] = {"cni.dev/valid-attachments": []}

ROWS = [
    Row("version", "VERSION", None, stdin=b'{"cniVersion":"1.1.0"}',
        check=_version_answer("1.1.0")),
    Row("version-0.4.0", "VERSION", None, stdin=b'{"cniVersion":"0.4.0"}',
        check=_version_answer("0.4.0")),
    Row("version-no-stdin", "VERSION", None, stdin=b"", check=_version_answer("1.1.0")),
    Row("no-command", "", 4, env={"CNI_COMMAND": None}),
    Row("unknown-command", "FROB", 4),
    Row("malformed-json", "ADD", 6, stdin=b'{"cniVersion": "1.0.0", "name": '),
    Row("json-not-an-object", "ADD", 6, stdin=b'["cniVersion"]'),
    Row("unknown-version", "ADD", 1, conf={"cniVersion": "0.3.1"}),
    Row("future-version", "ADD", 1, conf={"cniVersion": "2.0.0"}),
    Row("missing-netns", "ADD", 4, env={"CNI_NETNS": None}),
    Row("missing-ifname", "ADD", 4, env={"CNI_IFNAME": None}),
    Row("missing-containerid", "ADD", 4, env={"CNI_CONTAINERID": None}),
    Row("missing-path", "ADD", 4, env={"CNI_PATH": None}),
    Row("missing-path-del", "DEL", 4, env={"CNI_PATH": None}),
    Row("bad-cni-args", "ADD", 4, env={"CNI_ARGS": "K8S_POD_NAME"}),
    Row("bad-containerid", "ADD", 4, env={"CNI_CONTAINERID": "-oops"}),
    Row("ifname-too-long", "ADD", 4, env={"CNI_IFNAME": "a-much-too-long-name"}),
    Row("ifname-with-slash", "ADD", 4, env={"CNI_IFNAME": "eth/0"}),
    Row("bad-network-name", "ADD", 7, conf={"name": "my network"}),
    Row("missing-network-name", "ADD", 7, conf={"name": None}),
    Row("bad-config-field", "ADD", 7, conf={"mode": "sideways"}),
    Row("ipam-plugin-missing", "ADD", 7, conf={"ipam": {"type": "no-such-ipam"}}),
    Row("ipam-error-passed-on", "ADD", 999, conf={"ipam": {"type": "host-local",
                                                           "subnet": "nonsense"}},
        check=_nothing_left),
    Row("netns-not-a-namespace", "ADD", 4, env={"CNI_NETNS": "/etc/hostname"},
        check=_nothing_left),
    Row("agent-unreachable-add", "ADD", 11, conf=NO_AGENT, check=_nothing_left),
    Row("agent-unreachable-del", "DEL", 11, conf=NO_AGENT),
    Row("invalid-labels", "ADD", 104, conf={"args": {"labels": {"bad key!": "x"}}},
        check=_nothing_left),
    Row("invalid-namespace", "ADD", 104, env={"CNI_ARGS": "K8S_POD_NAMESPACE=Not_DNS"},
        check=_nothing_left),
    Row("del-never-added", "DEL", None, check=_silent),
    Row("del-without-netns", "DEL", None, env={"CNI_NETNS": None}, check=_silent),
    Row("check-without-prevresult", "CHECK", 7),
    Row("check-on-0.4.0-of-nothing", "CHECK", 102, conf={
        "cniVersion": "0.4.0", "prevResult": {"cniVersion": "0.4.0", "interfaces": [
            {"name": "eth0", "sandbox": "/x"}], "ips": [{"version": "4", "address":
                                                         "10.9.9.9/24", "interface": 0}]}}),
    Row("gc-on-1.0.0", "GC", 1, conf=GC_VALID, netns=False),
    Row("status-on-1.0.0", "STATUS", 1, netns=False),
    Row("gc-without-valid-attachments", "GC", 7, conf={"cniVersion": "1.1.0"}, netns=False),
    Row("gc-nothing-to-do", "GC", None, conf={"cniVersion": "1.1.0", **GC_VALID},
        netns=False, check=_silent),
    Row("gc-agent-unreachable", "GC", 11, conf={"cniVersion": "1.1.0", **GC_VALID,
                                                **NO_AGENT}, netns=False),
    Row("status-ready", "STATUS", None, conf={"cniVersion": "1.1.0"}, netns=False,
        check=_silent),
    Row("status-agent-unreachable", "STATUS", 50, conf={"cniVersion": "1.1.0", **NO_AGENT},
        netns=False),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_row(world: World, row: Row) -> None:  # noqa: F811
    conf = {k: v for k, v in {**world.conf(), **row.conf}.items() if v is not None}
    netns = world.netns("c") if row.netns else ""
    got = world.run(row.command, row.stdin if row.stdin is not None else conf, cid="ctr1",
                    netns=netns, env=row.env)
    if row.code is None:
        assert got.code == 0, (got.out, got.stderr)
    else:
        assert got.code != 0 and got.out is not None, got
        assert got.out["code"] == row.code, got.out
        assert isinstance(got.out["msg"], str) and got.out["msg"]
        wanted = conf.get("cniVersion") if row.stdin is None else None
        if wanted in ("0.4.0", "1.0.0", "1.1.0"):
            assert got.out["cniVersion"] == wanted
    if row.check is not None:
        row.check(world, got.out)
    assert "Traceback" not in got.stderr


# ---- sequences ------------------------------------------------------------------------------


def test_add_check_del_lifecycle_in_each_version(world: World) -> None:  # noqa: F811
    for n, version in enumerate(("0.4.0", "1.0.0", "1.1.0")):
        netns = world.netns(f"v{n}")
        conf = world.conf(version, args={"labels": {"app": "web"}})
        added = world.run("ADD", conf, cid=f"ctr{n}", netns=netns)
        assert added.code == 0, added
        assert added.out is not None and added.out["cniVersion"] == version
        ip = added.out["ips"][0]
        assert ("version" in ip) == (version == "0.4.0")
        checked = world.run("CHECK", {**conf, "prevResult": added.out}, cid=f"ctr{n}",
                            netns=netns)
        assert checked.code == 0 and checked.out is None, checked
        gone = world.run("DEL", {**conf, "prevResult": added.out}, cid=f"ctr{n}",
                         netns=netns)
        assert gone.code == 0 and gone.out is None, gone
    assert world.veths() == [] and world.states() == [] and world.pool() == {}


def test_duplicate_add_returns_the_same_result_and_holds_one_address(
        world: World) -> None:  # noqa: F811
    netns = world.netns("dup")
    conf = world.conf()
    first = world.run("ADD", conf, cid="dup", netns=netns)
    second = world.run("ADD", conf, cid="dup", netns=netns)
    assert first.code == second.code == 0, (first, second)
    assert first.out == second.out
    assert len(world.pool()) == 1 and len(world.veths()) == 1
    assert world.run("DEL", conf, cid="dup", netns=netns).code == 0
    assert world.run("DEL", conf, cid="dup", netns=netns).code == 0  # idempotent
    assert world.pool() == {} and world.veths() == []


def test_a_second_attachment_with_a_taken_name_is_refused_cleanly(
        world: World) -> None:  # noqa: F811
    netns = world.netns("taken")
    subprocess.run(["ip", "-n", os.path.basename(netns), "link", "add", "eth0", "type",
                    "veth", "peer", "name", "other0"], check=True)
    got = world.run("ADD", world.conf(), cid="other", netns=netns)
    assert got.error == 106, got
    assert world.veths() == [] and world.states() == [] and world.pool() == {}


def test_del_after_the_namespace_is_gone(world: World) -> None:  # noqa: F811
    netns = world.netns("gone")
    conf = world.conf()
    added = world.run("ADD", conf, cid="gone", netns=netns)
    assert added.code == 0
    remove_netns(os.path.basename(netns))
    got = world.run("DEL", {**conf, "prevResult": added.out}, cid="gone", netns="",
                    env={"CNI_NETNS": None})
    assert got.code == 0, got
    assert world.pool() == {} and world.endpoints() == {} and world.states() == []
    assert world.veths() == []


def test_check_notices_changes_behind_its_back(world: World) -> None:  # noqa: F811
    netns = world.netns("chk")
    conf = world.conf()
    added = world.run("ADD", conf, cid="chk", netns=netns)
    assert added.out is not None
    prev = {**conf, "prevResult": added.out}
    name = os.path.basename(netns)
    subprocess.run(["ip", "-n", name, "route", "del", "default"], check=True)
    assert world.run("CHECK", prev, cid="chk", netns=netns).error == 102
    subprocess.run(["ip", "-n", name, "route", "add", "default", "via",
                    added.out["ips"][0]["gateway"]], check=True)
    assert world.run("CHECK", prev, cid="chk", netns=netns).code == 0
    subprocess.run(["ip", "-n", name, "addr", "flush", "dev", "eth0"], check=True)
    assert world.run("CHECK", prev, cid="chk", netns=netns).error == 102
    subprocess.run(["ip", "-n", name, "addr", "add", added.out["ips"][0]["address"], "dev",
                    "eth0"], check=True)
    subprocess.run(["ip", "-n", name, "route", "add", "default", "via",
                    added.out["ips"][0]["gateway"]], check=True)
    assert world.run("CHECK", prev, cid="chk", netns=netns).code == 0
    key = next(iter(world.endpoints()))
    world.agent.call("endpoint.remove", key=key)
    assert world.run("CHECK", prev, cid="chk", netns=netns).error == 103


def test_gc_removes_every_attachment_not_listed(world: World) -> None:  # noqa: F811
    conf = world.conf("1.1.0")
    results = {}
    for cid in ("keep", "drop1", "drop2"):
        results[cid] = world.run("ADD", conf, cid=cid, netns=world.netns(cid))
        assert results[cid].code == 0
    got = world.run("GC", {**conf, "cni.dev/valid-attachments": [
        {"containerID": "keep", "ifname": "eth0"}]})
    assert got.code == 0 and got.out is None, got
    assert len(world.veths()) == 1 and len(world.pool()) == 1
    assert world.states() == ["keep:eth0.json"]
    assert [e["containerID"] for e in world.endpoints().values()] == ["keep"]
    kept = world.run("CHECK", {**conf, "prevResult": results["keep"].out}, cid="keep",
                     netns=world.netns("keep"))
    assert kept.code == 0, kept


def test_gc_removes_a_veth_no_one_knows(world: World) -> None:  # noqa: F811
    conf = world.conf("1.1.0")
    assert world.run("ADD", conf, cid="a", netns=world.netns("a")).code == 0
    stray = f"{world.prefix}0123abcdh"
    subprocess.run(["ip", "-n", world.host, "link", "add", stray, "type", "veth", "peer",
                    "name", f"{world.prefix}peer"], check=True)
    subprocess.run(["ip", "-n", world.host, "link", "set", stray, "master", world.bridge],
                   check=True)
    got = world.run("GC", {**conf, "cni.dev/valid-attachments": [
        {"containerID": "a", "ifname": "eth0"}]})
    assert got.code == 0, got
    assert stray not in world.veths() and len(world.pool()) == 1


def test_parallel_adds_and_dels_leave_nothing_behind(world: World) -> None:  # noqa: F811
    """50 ADDs at once, then 50 DELs at once: distinct addresses, then no trace."""
    n = 50
    world.agent.call("apply", documents=[{
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "all", "namespace": "default"},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}}])
    conf = world.conf(args={"labels": {"app": "par"}})
    spaces = [world.netns(f"p{i}") for i in range(n)]

    def add(i: int) -> Any:
        return world.run("ADD", conf, cid=f"par{i}", netns=spaces[i])

    with ThreadPoolExecutor(n) as pool:
        added = list(pool.map(add, range(n)))
    assert [a.code for a in added] == [0] * n, [a for a in added if a.code][:2]
    addresses = {a.out["ips"][0]["address"] for a in added if a.out}
    assert len(addresses) == n
    assert len(world.pool()) == n and len(world.endpoints()) == n
    assert len(world.veths()) == n and len(world.states()) == n
    table = world.table()
    assert all(addr.split("/")[0] in table for addr in addresses)

    def delete(i: int) -> Any:
        return world.run("DEL", {**conf, "prevResult": added[i].out}, cid=f"par{i}",
                         netns=spaces[i])

    with ThreadPoolExecutor(n) as pool:
        deleted = list(pool.map(delete, range(n)))
    assert [d.code for d in deleted] == [0] * n, [d for d in deleted if d.code][:2]
    for space in spaces:
        remove_netns(os.path.basename(space))
    assert world.pool() == {} and world.endpoints() == {}
    assert world.veths() == [] and world.states() == []
    assert [ns for ns in list_netns() if ns.startswith(world.prefix)] == [world.host]
    # Chains and sets no longer used stay, unreferenced (they decide nothing), up to
    # 10 s in case they are wanted again (datapath/nft.py): then they go too.
    deadline = time.monotonic() + 20
    while any(addr.split("/")[0] in (table := world.table()) for addr in addresses) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(addr.split("/")[0] in table for addr in addresses)
