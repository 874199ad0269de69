"""The plugin's bridge: read without its lock when ready, made or mended under it.

ADDs at once would queue on the bridge's lock (a file lock, between processes
and inside the agent between the thin plugin's calls) for a bridge that exists
long since; so an ADD reads the bridge first (``Plumbing.bridge_ready``) and
takes the lock only to create or mend it. These tests hold the lock from
outside to show which ADDs need it, and start ADDs at once on a fresh bridge.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from stockade.cni import attach
from stockade.cni.spec import ATTACHMENT_EXISTS
from stockade.net.namespace import create_netns, entered

from .test_cni_harness import Outcome, World, world  # noqa: F401

pytestmark = pytest.mark.privileged

GATEWAY = "10.244.0.1/16"  # the agent's default pool


def _pod(name: str) -> str:
    return f"IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME={name}"


@contextmanager
def _bridge_lock(w: World) -> Iterator[None]:
    """The lock ADD takes to make or mend the bridge, held by the test."""
    w.data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(w.data_dir / f"bridge-{w.bridge}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _ip(w: World, *args: str) -> str:
    return subprocess.run(["ip", "-n", w.host, *args], capture_output=True, text=True,
                          check=True).stdout


def _bridge_addresses(w: World) -> list[str]:
    return [line.split()[3] for line in _ip(w, "-o", "-4", "addr", "show", "dev",
                                             w.bridge).splitlines()]


def _add(w: World, name: str) -> Outcome:
    return w.run("ADD", w.conf(), cid=f"c-{name}", netns=w.netns(name), args=_pod(name))


def _in_thread(fn: object) -> tuple[threading.Thread, list[Outcome]]:
    out: list[Outcome] = []
    t = threading.Thread(target=lambda: out.append(fn()))  # type: ignore[operator]
    t.start()
    return t, out


def test_an_add_on_a_ready_bridge_takes_no_lock_one_that_mends_it_does(
        world: World) -> None:  # noqa: F811
    first = _add(world, "a")
    assert first.code == 0, first
    assert _bridge_addresses(world) == [GATEWAY]
    with _bridge_lock(world):  # ready: the ADD never asks for the lock
        t, out = _in_thread(lambda: _add(world, "b"))
        t.join(60)
        assert not t.is_alive() and out[0].code == 0, out
    # The gateway lost (an operator, a network manager): the next ADD mends it, under
    # the lock, so it waits for the test to let go.
    _ip(world, "addr", "del", GATEWAY, "dev", world.bridge)
    assert _bridge_addresses(world) == []
    with _bridge_lock(world):
        t, out = _in_thread(lambda: _add(world, "c"))
        t.join(1.5)
        assert t.is_alive(), "an ADD mended the bridge without its lock"
    t.join(60)
    assert not t.is_alive() and out[0].code == 0, out
    assert _bridge_addresses(world) == [GATEWAY]
    # and a bridge set down comes up again
    _ip(world, "link", "set", world.bridge, "down")
    assert _add(world, "d").code == 0
    assert "state DOWN" not in _ip(world, "link", "show", world.bridge)
    assert len(world.veths()) == 4


@pytest.mark.parametrize("world", ["thin"], indirect=True)
def test_adds_at_once_on_a_fresh_bridge(world: World) -> None:  # noqa: F811
    """Eight ADDs at once, no bridge yet: one bridge, one gateway, every veth on it."""
    names = [f"p{i}" for i in range(8)]
    spaces = {n: world.netns(n) for n in names}
    outs: dict[str, Outcome] = {}

    def add(n: str) -> None:
        outs[n] = world.run("ADD", world.conf(), cid=f"c-{n}", netns=spaces[n], args=_pod(n))

    threads = [threading.Thread(target=add, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(o.code == 0 for o in outs.values()), outs
    assert _bridge_addresses(world) == [GATEWAY]
    ports = _ip(world, "-o", "link", "show", "master", world.bridge)
    assert sorted(line.split(":")[1].strip().split("@")[0] for line in ports.splitlines()) \
        == world.veths() and len(world.veths()) == len(names)
    addresses = {str(o.out["ips"][0]["address"]) for o in outs.values() if o.out}
    assert len(addresses) == len(names)


def test_bridge_ready_reads_what_ensure_bridge_makes(netns_prefix: str, host_netns: str,
                                                     tmp_path: Path) -> None:
    bridge = f"{netns_prefix}br0"
    create_netns(f"{netns_prefix}-c")
    container = f"/run/netns/{netns_prefix}-c"
    gateways = ["10.250.0.1/24", "fd00:250::1/64"]

    def ready() -> bool:
        with attach.Plumbing(container, "eth0") as p:
            return p.bridge_ready(bridge, gateways)

    with entered(host_netns):
        assert not ready()  # no bridge
        attach.ensure_bridge(bridge, gateways)
        assert ready()
        subprocess.run(["ip", "addr", "del", gateways[1], "dev", bridge], check=True)
        assert not ready()  # one gateway missing
        attach.ensure_bridge(bridge, gateways)
        assert ready()
        subprocess.run(["ip", "link", "set", bridge, "down"], check=True)
        assert not ready()
        attach.ensure_bridge(bridge, gateways)
        assert ready()
        with open("/proc/sys/net/bridge/bridge-nf-call-iptables", "w") as f:
            f.write("0")
        assert not ready()  # bridged traffic would bypass the forward hook
        attach.ensure_bridge(bridge, gateways)
        assert ready()


def test_a_veth_left_by_a_dead_add_is_replaced(world: World) -> None:  # noqa: F811
    """A host veth of the attachment's name, from an ADD that died before it recorded
    anything: the next ADD replaces it (found when the kernel refuses the name)."""
    from stockade.agent.cni_keys import attachment_id

    assert _add(world, "a").code == 0  # the bridge
    host_if = attach.host_ifname(world.prefix, attachment_id(world.network, "c-b", "eth0"))
    _ip(world, "link", "add", host_if, "type", "veth", "peer", "name", f"{world.prefix}x")
    stale = _ip(world, "-o", "link", "show", host_if).split(":")[0]
    got = _add(world, "b")
    assert got.code == 0, got
    assert _ip(world, "-o", "link", "show", host_if).split(":")[0] != stale
    assert f"master {world.bridge}" in _ip(world, "link", "show", host_if)
    assert f"{world.prefix}x" not in world.links()  # its peer went with it


def test_an_interface_name_in_use_fails_the_add_and_leaves_nothing(
        world: World) -> None:  # noqa: F811
    netns = world.netns("a")
    subprocess.run(["ip", "-n", f"{world.prefix}-a", "link", "add", "eth0", "type", "veth",
                    "peer", "name", "eth9"],
                   check=True)
    got = world.run("ADD", world.conf(), cid="c-a", netns=netns, args=_pod("a"))
    assert got.code == 1 and got.error == ATTACHMENT_EXISTS, got
    assert world.veths() == [] and world.endpoints() == {} and world.states() == []
    assert world.pool() == {}


def test_a_netlink_batch_is_one_write_and_reports_its_first_error(
        netns_prefix: str) -> None:
    """`Rtnl.batch`, as configure uses it: every request carried out in order, tolerated
    errors ignored, the first other one raised once all are answered, the socket in step."""
    import errno

    from stockade.net.rtnl import Rtnl
    from stockade.netlink import NetlinkError

    create_netns(f"{netns_prefix}-b")
    with entered(f"{netns_prefix}-b"):
        nl = Rtnl()
    with nl:
        with nl.batch(tolerate=(errno.EEXIST,)):
            nl.add_address(1, "10.9.0.1", 24)
            nl.add_address(1, "10.9.0.1", 24)  # EEXIST: tolerated
            nl.add_address(1, "10.9.0.2", 24)
        assert {a.address for a in nl.addresses(1)} >= {"10.9.0.1", "10.9.0.2"}
        with pytest.raises(NetlinkError) as err, nl.batch():
            nl.set_up(999)  # no such link
            nl.set_up(1)  # still done: the kernel carries out the whole batch
        assert err.value.errno == errno.ENODEV
        lo = nl.link("lo")  # the answers were all read: the next request gets its own
        assert lo is not None and lo.up
