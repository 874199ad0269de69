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
from stockade.net.namespace import THREAD_NETNS, entered, entered_fd
from stockade.net.naming import Naming
from stockade.net.rtnl import Link, Rtnl, delete_link, ensure_addresses
from stockade.net.rtnl import ensure_bridge as ensure_bridge_link
from stockade.net.sysctl import (
    BridgeNetfilterMissing,
    bridge_netfilter_on,
    ensure_bridge_netfilter,
    link_local_from_mac,
    refuse_router_adverts,
    router_adverts_refused,
)
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
def _failing(what: str) -> Iterator[None]:
    """Kernel refusals as code 101, saying what was attempted."""
    try:
        yield
    except NetlinkError as exc:
        raise CniError(PLUMBING, what, f"{exc.strerror} (errno {exc.errno})") from None
    except NetError as exc:
        raise CniError(PLUMBING, what, str(exc)) from None


def _open(netns: str | None, what: str) -> Rtnl:
    """A netlink socket in ``netns`` (None: here)."""
    with entered_path(netns):
        try:
            return Rtnl()
        except OSError as exc:
            raise CniError(PLUMBING, what, str(exc)) from None


@contextlib.contextmanager
def _rtnl(netns: str | None, what: str) -> Iterator[Rtnl]:
    """A netlink socket in ``netns`` (None: here); kernel refusals become code 101."""
    with _open(netns, what) as sock, _failing(what):
        yield sock


def host_ifname(prefix: str, attachment: str) -> str:
    """The host side's name, derived from the attachment id (15 bytes at most)."""
    return Naming(prefix).host_ifname(attachment)


def ensure_bridge(bridge: str, gateways: Sequence[str]) -> None:
    """The bridge exists, is up and carries the gateways (with prefix length).

    The bridge-netfilter sysctls are set in this namespace too: without them
    bridged packets never reach the inet forward hook where policy is enforced.
    Run under the bridge's lock (:meth:`stockade.cni.state.StateDir.bridge_lock`);
    :meth:`Plumbing.bridge_ready` tells, without it, when there is nothing to do.
    """
    with _rtnl(None, f"cannot set up bridge {bridge}") as nl:
        link = ensure_bridge_link(nl, bridge)
        ensure_addresses(nl, link.index, [ipaddress.ip_interface(g) for g in gateways])
    try:
        ensure_bridge_netfilter()
        refuse_router_adverts(bridge)  # a pod's advertisement must not route the host
    except BridgeNetfilterMissing:
        raise CniError(PLUMBING, "br_netfilter is not loaded (no /proc/sys/net/bridge)",
                       "bridged traffic would bypass the inet forward hook") from None
    except NetError as exc:
        raise CniError(PLUMBING, "cannot enable bridge netfilter", str(exc)) from None


@dataclass(frozen=True)
class Veth:
    host_ifname: str
    host_mac: str
    mac: str


class Plumbing:
    """One main-mode ADD's netlink work: a socket here and one in ``netns``, opened once.

    Inside the agent (the thin plugin) every system call lets go of the GIL and
    waits to take it back behind the agent's busy threads, so an ADD opens each
    namespace once (the namespace file also names the veth peer's namespace) and
    asks the kernel only what it does not know yet: ~10 netlink round trips.
    """

    def __init__(self, netns: str, ifname: str) -> None:
        self.netns, self.ifname = netns, ifname
        self._bridge: Link | None = None  # as bridge_ready() saw it ready
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Plumbing:
        with contextlib.ExitStack() as stack:
            try:
                fd = os.open(self.netns, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise CniError(INVALID_ENVIRONMENT, f"cannot enter CNI_NETNS {self.netns}",
                               str(exc)) from None
            stack.callback(os.close, fd)
            self.fd = fd
            self.host = stack.enter_context(_open(None, "cannot open netlink"))
            try:
                with entered_fd(fd, self.netns):
                    self.inner = stack.enter_context(Rtnl())
            except (NetError, OSError) as exc:
                raise CniError(INVALID_ENVIRONMENT, f"cannot enter CNI_NETNS {self.netns}",
                               str(exc)) from None
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def bridge_ready(self, bridge: str, gateways: Sequence[str]) -> bool:
        """Read only: `ensure_bridge` would change nothing (no lock needed to know)."""
        with _failing(f"cannot inspect bridge {bridge}"):
            link = self.host.link(bridge)
            if link is None or not link.up:
                return False
            present = {a.interface for a in self.host.addresses(link.index)}
        if not all(ipaddress.ip_interface(g) in present for g in gateways) or \
                not bridge_netfilter_on() or not router_adverts_refused(bridge):
            return False
        self._bridge = link
        return True

    def check_free(self) -> None:
        """The runtime's interface name is free in ``netns`` (before anything is taken)."""
        with _failing(f"cannot inspect {self.ifname} in {self.netns}"):
            if self.inner.link(self.ifname) is not None:
                raise self._taken()

    def _taken(self) -> CniError:
        return CniError(ATTACHMENT_EXISTS,
                        f"interface {self.ifname} already exists in {self.netns}",
                        "a second ADD for another attachment, or a name the runtime "
                        "already used")

    def create_veth(self, host_if: str, bridge: str, mtu: int | None, mac: str = "") -> str:
        """A new pair: host side up on the bridge, the container's side in ``netns``, down,
        with ``mac`` when given.

        Returns the host side's MAC.
        """
        with _failing(f"cannot create veth {host_if} <-> {self.ifname}"):
            br = self._bridge if self._bridge is not None and self._bridge.name == bridge \
                else self.host.link(bridge)
            if br is None:
                raise CniError(PLUMBING, f"bridge {bridge} does not exist")
            try:
                self.host.add_veth(host_if, br.index, self.ifname, self.fd, mtu, mac)
            except NetlinkError as exc:
                if exc.errno != _EEXIST:
                    raise
                stale = self.host.link(host_if)
                if stale is None:  # the container's name, taken since check_free
                    raise self._taken() from None
                # Left by an ADD that died before it recorded anything.
                self.host.delete_link(stale.index)
                self.host.add_veth(host_if, br.index, self.ifname, self.fd, mtu, mac)
            host = self.host.link(host_if)
        if host is None:
            raise CniError(PLUMBING, f"veth {host_if} <-> {self.ifname} vanished after creation")
        return host.mac

    def configure(self, ips: Sequence[IPConfig], routes: Sequence[Route]) -> str:
        """Addresses while down, then loopback and the interface up, then the routes;
        then the IPv4 addresses announced. Returns the interface's MAC.

        Two batches (one write and one read each): nothing comes up unless every
        address is in place.
        """
        ifname, netns = self.ifname, self.netns
        with _failing(f"cannot configure {ifname} in {netns}"):
            link = self.inner.link(ifname)
            if link is None:
                raise CniError(PLUMBING, f"{ifname} is missing in {netns}")
            with self.inner.batch(tolerate=(_EEXIST,)):
                for ip in ips:
                    value = ipaddress.ip_interface(ip.address)
                    self.inner.add_address(link.index, str(value.ip), value.network.prefixlen)
            with entered_fd(self.fd, netns):  # the namespace this ADD holds open
                refuse_router_adverts(ifname)  # before it is up to hear one
                link_local_from_mac(ifname)  # the link-local address its guard binds
            with self.inner.batch():
                self.inner.set_up(_LOOPBACK)
                self.inner.set_up(link.index)
                for r in routes:
                    dst = ipaddress.ip_network(r.dst, strict=False)
                    self.inner.replace_route(str(dst.network_address), dst.prefixlen,
                                             link.index, r.gw, r.priority, r.table)
        for ip in ips:
            value = ipaddress.ip_interface(ip.address)
            if value.version == 4:
                announce(netns, ifname, link.mac, str(value.ip))
        return link.mac


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


def host_peer(netns: str, ifname: str) -> tuple[str, str]:
    """The host side of the veth whose other end is ``ifname`` in ``netns``, and that end's
    MAC; ("", "") unless both ends are veths naming each other (the host's in this
    namespace). Read while the container has not run yet, as ADD is."""
    with _rtnl(netns, f"cannot inspect {ifname}") as nl:
        inner = nl.link(ifname)
    if inner is None or inner.kind != "veth" or not inner.peer:
        return "", ""
    with _rtnl(None, f"cannot inspect the peer of {ifname}") as nl:
        outer = nl.link_by_index(inner.peer)
    if outer is None or outer.kind != "veth" or outer.peer != inner.index:
        return "", ""
    return outer.name, inner.mac.lower()


def own_link_local(netns: str, ifname: str, mac: str) -> None:
    """``ifname`` in ``netns`` (another plugin's, in chained mode) takes its MAC's
    link-local address (EUI-64) in place of any other: the one its port guard binds.
    A namespace whose default `addr_gen_mode` is not the kernel's gave it another, from
    which its neighbour discovery would be dropped. Done while the container has not run
    yet, as ADD is; nothing where the interface has no IPv6."""
    from stockade.compile.guard import link_local

    want = str(link_local(mac))
    link_local_from_mac(ifname, netns)
    with _rtnl(netns, f"cannot set the link-local address of {ifname}") as nl:
        link = nl.link(ifname)
        if link is None:
            return
        have = [a for a in nl.addresses(link.index) if a.family == socket.AF_INET6
                and ipaddress.ip_address(a.address).is_link_local]
        if not have:
            return  # IPv6 off, or not up yet: it comes up with the mode set above
        for a in have:
            if a.address != want:
                nl.delete_address(link.index, a.address, a.prefixlen)
        if want not in {a.address for a in have}:
            nl.add_address(link.index, want, 64)


def bridge_ports(bridge: str) -> list[str]:
    """The names of the links enslaved to ``bridge`` here (empty if it is absent)."""
    with _rtnl(None, f"cannot list the ports of {bridge}") as nl:
        br = nl.link(bridge)
        if br is None:
            return []
        return sorted(link.name for link in nl.links() if link.master == br.index)
