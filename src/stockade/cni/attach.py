"""Main mode's plumbing: a veth from the runtime's namespace to stockade's bridge (effects).

The runtime names the namespace by *path* (``CNI_NETNS``: a bind mount under
/run/netns or /proc/PID/ns/net) and the interface (``CNI_IFNAME``), so this
module enters namespaces by path, unlike :mod:`stockade.net.namespace` which
works with names under /run/netns; the technique is the same (``setns`` in the
calling thread; a netlink socket opened inside stays bound to that namespace).
Netlink goes through :mod:`stockade.net.rtnl`, the plumbing layer the
:class:`stockade.net.plumber.Plumber` uses too (no pyroute2: its import alone
would double the time of an ADD); the bridge is made by the same
`ensure_bridge`, with the bridge-netfilter sysctls enforcement depends on
(:func:`stockade.net.sysctl.ensure_bridge_netfilter`).

The host side of a veth is named ``<vethPrefix><8 hex of the attachment
id><h>`` (:class:`stockade.net.naming.Naming`), so DEL and GC find it from
``(network, containerID, ifname)`` alone, without any saved state.

Why the container's interface comes up last: the agent enforces by address,
and an address unknown to the ruleset is unrestricted. So ADD registers the
endpoint first (and waits for the kernel), then creates the veth, addresses
it while it is down, and only then brings it up and adds its routes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from stockade.cni.spec import (
    ATTACHMENT_EXISTS,
    INVALID_ENVIRONMENT,
    PLUMBING,
    CniError,
    IPConfig,
    Route,
)
from stockade.errors import NetError
from stockade.net.announce import announce as net_announce
from stockade.net.namespace import THREAD_NETNS, entered
from stockade.net.naming import Naming
from stockade.net.rtnl import Link, Rtnl, delete_link, ensure_addresses
from stockade.net.rtnl import ensure_bridge as ensure_bridge_link
from stockade.net.sysctl import BridgeNetfilterMissing, ensure_bridge_netfilter
from stockade.netlink import NetlinkError

_LOOPBACK = 1
_EEXIST = 17


def is_netns(path: str) -> bool:
    """True for a network namespace file: nsfs shares one device with our own."""
    try:
        return os.stat(path).st_dev == os.stat(THREAD_NETNS).st_dev
    except OSError:
        return False


@contextlib.contextmanager
def entered_path(path: str | None) -> Iterator[None]:
    """The calling thread inside the namespace at ``path`` (None: stay), and back.

    As `stockade.net.namespace.entered`, with failures worded as CNI errors.
    """
    try:
        ctx = entered(path)
        ctx.__enter__()
    except NetError as exc:
        raise CniError(INVALID_ENVIRONMENT, f"cannot enter CNI_NETNS {path}", str(exc)) from None
    try:
        yield
    finally:
        ctx.__exit__(None, None, None)


@contextlib.contextmanager
def _rtnl(netns: str | None, what: str) -> Iterator[Rtnl]:
    """A netlink socket in ``netns`` (None: here); kernel refusals become code 101."""
    with entered_path(netns):
        try:
            sock = Rtnl()
        except OSError as exc:
            raise CniError(PLUMBING, what, str(exc)) from None
    with sock:
        try:
            yield sock
        except NetlinkError as exc:
            raise CniError(PLUMBING, what, f"{exc.strerror} (errno {exc.errno})") from None
        except NetError as exc:
            raise CniError(PLUMBING, what, str(exc)) from None


def host_ifname(prefix: str, attachment: str) -> str:
    """The host side's name, derived from the attachment id (15 bytes at most)."""
    return Naming(prefix).host_ifname(attachment)


def ensure_bridge(bridge: str, gateways: Sequence[str]) -> None:
    """The bridge exists, is up and carries the gateways (with prefix length).

    The bridge-netfilter sysctls are set in this namespace too: without them
    bridged packets never reach the inet forward hook where policy is enforced.
    """
    with _rtnl(None, f"cannot set up bridge {bridge}") as nl:
        link = ensure_bridge_link(nl, bridge)
        ensure_addresses(nl, link.index, [ipaddress.ip_interface(g) for g in gateways])
    try:
        ensure_bridge_netfilter()
    except BridgeNetfilterMissing:
        raise CniError(PLUMBING, "br_netfilter is not loaded (no /proc/sys/net/bridge)",
                       "bridged traffic would bypass the inet forward hook") from None
    except NetError as exc:
        raise CniError(PLUMBING, "cannot enable bridge netfilter", str(exc)) from None


def _add_address(nl: Rtnl, index: int, value: ipaddress.IPv4Interface |
                 ipaddress.IPv6Interface) -> None:
    try:
        nl.add_address(index, str(value.ip), value.network.prefixlen)
    except NetlinkError as exc:
        if exc.errno != _EEXIST:
            raise


@dataclass(frozen=True)
class Veth:
    host_ifname: str
    host_mac: str
    mac: str


def create_veth(host_if: str, bridge: str, netns: str, ifname: str,
                mtu: int | None) -> Veth:
    """A new pair: host side up on the bridge, ``ifname`` in ``netns``, down."""
    with _rtnl(netns, f"cannot inspect {ifname} in {netns}") as inner:
        if inner.link(ifname) is not None:
            raise CniError(ATTACHMENT_EXISTS, f"interface {ifname} already exists in {netns}",
                           "a second ADD for another attachment, or a name the runtime "
                           "already used")
    with _rtnl(None, f"cannot create veth {host_if} <-> {ifname}") as nl:
        br = nl.link(bridge)
        if br is None:
            raise CniError(PLUMBING, f"bridge {bridge} does not exist")
        stale = nl.link(host_if)
        if stale is not None:  # left by an ADD that died before it recorded anything
            nl.delete_link(stale.index)
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            nl.add_veth(host_if, br.index, ifname, fd, mtu)
        finally:
            os.close(fd)
        host = nl.link(host_if)
    with _rtnl(netns, f"cannot read {ifname} in {netns}") as inner:
        peer = inner.link(ifname)
    if host is None or peer is None:
        raise CniError(PLUMBING, f"veth {host_if} <-> {ifname} vanished after creation")
    return Veth(host_if, host.mac, peer.mac)


def configure(netns: str, ifname: str, ips: Sequence[IPConfig],
              routes: Sequence[Route]) -> None:
    """Addresses while down, then loopback and the interface up, then the routes."""
    with _rtnl(netns, f"cannot configure {ifname} in {netns}") as nl:
        link = nl.link(ifname)
        if link is None:
            raise CniError(PLUMBING, f"{ifname} is missing in {netns}")
        for ip in ips:
            _add_address(nl, link.index, ipaddress.ip_interface(ip.address))
        nl.set_up(_LOOPBACK)
        nl.set_up(link.index)
        for r in routes:
            dst = ipaddress.ip_network(r.dst, strict=False)
            nl.replace_route(str(dst.network_address), dst.prefixlen, link.index, r.gw,
                             r.priority, r.table)
    for ip in ips:
        value = ipaddress.ip_interface(ip.address)
        if value.version == 4:
            announce(netns, ifname, link.mac, str(value.ip))


def announce(netns: str, ifname: str, mac: str, address: str) -> None:
    """Gratuitous ARP (see `stockade.net.announce`) from a detached child process.

    Best-effort: a lost announcement only delays the first packets to a reused
    address. Closing a packet socket waits for an RCU grace period (8-16 ms on a
    quiet machine, a tenth of an ADD), which the runtime need not wait for; the
    kernel's own `arp_notify` is no substitute, it fires while the bridge port is
    still coming up and the bridge drops it.
    """
    if threading.active_count() > 1:
        # A long-lived process with threads (the agent serving cni.exec): forking
        # one is unsafe, and a thread of its own outlives this call.
        threading.Thread(target=_announce_quietly, args=(netns, ifname, mac, address),
                         name="announce", daemon=True).start()
        return
    try:
        pid = os.fork()
    except OSError:  # no child to be had: announce here, and wait for it
        _announce_quietly(netns, ifname, mac, address)
        return
    if pid:
        return
    try:
        # The runtime reads the plugin's output to its end: the child holds none of it.
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        net_announce(netns, ifname, mac, address)
    finally:
        os._exit(0)


def _announce_quietly(netns: str, ifname: str, mac: str, address: str) -> None:
    with contextlib.suppress(NetError):
        net_announce(netns, ifname, mac, address)


def remove_veth(host_if: str) -> bool:
    """Delete the host side (its peer goes with it); False when it was gone."""
    with _rtnl(None, f"cannot remove veth {host_if}") as nl:
        return delete_link(nl, host_if)


@dataclass(frozen=True)
class InterfaceView:
    """An interface as the kernel has it (what CHECK compares)."""

    exists: bool
    up: bool = False
    kind: str = ""
    mac: str = ""
    addresses: frozenset[str] = frozenset()  # "10.244.0.5/16", link-local left out
    routes: frozenset[tuple[str, str]] = frozenset()  # (dst, gateway) via this interface
    master: str = ""


def inspect(netns: str | None, ifname: str) -> InterfaceView:
    """What ``ifname`` looks like in ``netns`` (None: here), with its routes."""
    with _rtnl(netns, f"cannot inspect {ifname}") as nl:
        link = nl.link(ifname)
        if link is None:
            return InterfaceView(False)
        addresses = frozenset(
            f"{a.address}/{a.prefixlen}" for a in nl.addresses(link.index)
            if not ipaddress.ip_address(a.address).is_link_local)
        routes = frozenset((r.dst, r.gateway) for family in (socket.AF_INET, socket.AF_INET6)
                           for r in nl.routes(family) if r.oif == link.index)
        master: Link | None = nl.link_by_index(link.master) if link.master else None
        return InterfaceView(True, link.up, link.kind, link.mac, addresses, routes,
                             master.name if master is not None else "")


def bridge_ports(bridge: str) -> list[str]:
    """The names of the links enslaved to ``bridge`` here (empty if it is absent)."""
    with _rtnl(None, f"cannot list the ports of {bridge}") as nl:
        br = nl.link(bridge)
        if br is None:
            return []
        return sorted(link.name for link in nl.links() if link.master == br.index)
