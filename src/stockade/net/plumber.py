"""Endpoints on a bridge: namespaces, veth pairs, addresses and routes.

The layout a :class:`Plumber` maintains, all inside its *host* namespace (the
namespace the process runs in, or a named one for tests)::

    host netns:  bridge <prefix>br0 (gateway addresses) ── <prefix><hash>h ─┐ veth
    endpoint netns <prefix><hash>n:                        lo, eth0 <───────┘
                                                           addresses, default routes

Every operation is an *ensure*: creating what exists is a no-op and removing
what is gone is a no-op, so a retried or repeated call converges. Nothing is
remembered between calls: the kernel is the state, names are derived from the
endpoint key (see :mod:`stockade.net.naming`), and so a new Plumber with the
same prefix finds, lists and removes everything an earlier (crashed) one made.

All netlink work happens in-process, through :mod:`stockade.net.rtnl` (the
plumbing layer the CNI plugin uses too): the calling thread enters the
namespace (:func:`stockade.net.namespace.entered`), opens a netlink socket
there, works and leaves. Deleting an endpoint costs ~30 ms: the kernel waits
for an RCU grace period per veth, which is why :meth:`Plumber.teardown` lets
the kernel destroy namespaces in a batch instead (~4 ms per endpoint).
``bench/plumbing.py`` measures creation and deletion. A Plumber may be used
from any thread but not from two threads at once.

In the host namespace the bridge needs ``net.bridge.bridge-nf-call-iptables``
and ``-ip6tables`` set to 1, so that bridged IPv4/IPv6 packets traverse the
netfilter ``forward`` hook of the ``inet`` family, where policy is enforced;
:meth:`Plumber.ensure_bridge` sets both in that namespace
(:func:`stockade.net.sysctl.ensure_bridge_netfilter`).

Public API::

    EndpointSpec(key, ipv4, ipv6=None, gateway4=None, gateway6=None, ifname="eth0")
    Attachment(key, netns, netns_path, host_ifname, ifname, ipv4, ipv6, mac)
    Inventory(bridge, host_links, netns)
    Plumber(prefix="stk", host_netns=None, bridge=None,
            subnet4="10.244.0.0/16", subnet6=None)
    Plumber.ensure_bridge(addresses=None, forward=False) -> None
    Plumber.allocate_spec(key, ifname="eth0") -> EndpointSpec   # from ipam4/ipam6
    Plumber.ensure_endpoint(spec) -> Attachment
    Plumber.attachment(key, ifname="eth0") -> Attachment | None
    Plumber.remove_endpoint(key) -> bool
    Plumber.inventory() -> Inventory
    Plumber.teardown(settle=1.0) -> Inventory  # what was removed
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from stockade.errors import NetError
from stockade.net.announce import announce
from stockade.net.ipam import Ipam
from stockade.net.namespace import (
    create_netns,
    entered,
    list_netns,
    netns_exists,
    netns_path,
    remove_netns,
)
from stockade.net.naming import IFNAMSIZ, Naming
from stockade.net.rtnl import Rtnl, delete_link, ensure_addresses, ensure_bridge
from stockade.net.sysctl import (
    ensure_bridge_netfilter,
    link_local_from_mac,
    refuse_router_adverts,
)
from stockade.netlink import NetlinkError

LOOPBACK_IFINDEX = 1  # the kernel gives loopback index 1 in every namespace

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class EndpointSpec:
    """What one endpoint should look like. Addresses carry their prefix length.

    A gateway of None means no default route for that family: the endpoint
    then only reaches its own subnet, on the bridge.
    """

    key: str
    ipv4: str
    ipv6: str | None = None
    gateway4: str | None = None
    gateway6: str | None = None
    ifname: str = "eth0"


@dataclass(frozen=True)
class Attachment:
    """An endpoint as it exists: where it lives and how it is wired."""

    key: str
    netns: str
    netns_path: str
    host_ifname: str
    ifname: str
    ipv4: str
    ipv6: str | None
    mac: str

    @property
    def address4(self) -> str:
        """The IPv4 address without prefix length, as probes need it."""
        return self.ipv4.split("/", 1)[0]

    @property
    def address6(self) -> str | None:
        return None if self.ipv6 is None else self.ipv6.split("/", 1)[0]


@dataclass(frozen=True)
class Inventory:
    """Everything carrying a plumber's prefix, found in the kernel."""

    bridge: str | None
    host_links: tuple[str, ...]
    netns: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return self.bridge is None and not self.host_links and not self.netns


def _interface(text: str, family: int, what: str) -> Interface:
    try:
        value = ipaddress.ip_interface(text)
    except ValueError as exc:
        raise NetError(f"invalid {what} {text!r}: {exc}") from exc
    if value.version != family:
        raise NetError(f"{what} {text!r} is not an IPv{family} address")
    if "/" not in text:
        raise NetError(f"{what} {text!r} needs a prefix length, e.g. {text}/24")
    return value


def _address(text: str, family: int, what: str) -> str:
    try:
        value = ipaddress.ip_address(text)
    except ValueError as exc:
        raise NetError(f"invalid {what} {text!r}: {exc}") from exc
    if value.version != family:
        raise NetError(f"{what} {text!r} is not an IPv{family} address")
    return str(value)


@contextmanager
def _failing(what: str) -> Iterator[None]:
    """Turn netlink and OS errors into a NetError that says what was attempted."""
    try:
        yield
    except NetlinkError as exc:
        raise NetError(f"{what}: {os.strerror(exc.code)} (netlink error {exc.code})") from exc
    except OSError as exc:
        raise NetError(f"{what}: {exc}") from exc


@contextmanager
def _rtnl(netns: str | None) -> Iterator[Rtnl]:
    """A netlink socket bound to ``netns`` (None: the current namespace), used in place."""
    with entered(netns), _failing(f"netlink in network namespace {netns or '(current)'}"):
        nl = Rtnl()
        try:
            yield nl
        finally:
            nl.close()


class Plumber:
    """Creates, lists and removes a bridge and its endpoints in one host namespace."""

    def __init__(
        self,
        prefix: str = "stk",
        host_netns: str | None = None,
        bridge: str | None = None,
        subnet4: str = "10.244.0.0/16",
        subnet6: str | None = None,
    ) -> None:
        self.naming = Naming(prefix)
        self.host_netns = host_netns
        if host_netns is not None:
            netns_path(host_netns)  # validates the name
        self.bridge = bridge or self.naming.bridge
        if len(self.bridge.encode()) > IFNAMSIZ:
            raise NetError(f"bridge name {self.bridge!r} is longer than {IFNAMSIZ} bytes")
        self.ipam4 = Ipam(subnet4)
        self.ipam6 = Ipam(subnet6) if subnet6 is not None else None

    def __repr__(self) -> str:
        host = self.host_netns or "(current)"
        prefix = self.naming.prefix
        return f"Plumber(prefix={prefix!r}, host_netns={host!r}, bridge={self.bridge!r})"

    # -- bridge -------------------------------------------------------------

    def default_bridge_addresses(self) -> list[str]:
        """The gateway of each configured subnet, e.g. ``["10.244.0.1/16"]``."""
        ipams = [self.ipam4] if self.ipam6 is None else [self.ipam4, self.ipam6]
        return [ipam.gateway_interface for ipam in ipams]

    def ensure_bridge(self, addresses: Sequence[str] | None = None, forward: bool = False) -> None:
        """Make the bridge exist, be up and carry ``addresses`` (added, never removed).

        ``addresses`` are gateway addresses with prefix length, several subnets
        allowed; the default is the gateway of each configured subnet. With
        ``forward`` the host namespace also routes between subnets
        (``ip_forward`` and IPv6 ``forwarding``), which endpoints in different
        subnets need; it is off by default because in the real host namespace
        it is a node-wide setting.
        """
        wanted = [
            _interface(a, 6 if ":" in a else 4, "bridge address")
            for a in (self.default_bridge_addresses() if addresses is None else addresses)
        ]
        with _rtnl(self.host_netns) as nl:
            with _failing(f"cannot create bridge {self.bridge}"):
                index = ensure_bridge(nl, self.bridge).index
                loopback = nl.link("lo")
                if loopback is not None and not loopback.up:
                    nl.set_up(loopback.index)
            with _failing(f"cannot add bridge addresses {', '.join(map(str, wanted))}"):
                ensure_addresses(nl, index, wanted)
        # bridge-nf-call-*: bridged traffic visible to the inet forward hook.
        ensure_bridge_netfilter(self.host_netns, forward)
        refuse_router_adverts(self.bridge, self.host_netns)

    # -- endpoints ----------------------------------------------------------

    def allocate_spec(self, key: str, ifname: str = "eth0") -> EndpointSpec:
        """A spec for ``key`` with addresses from the plumber's subnets (lowest free).

        Allocation lives in :attr:`ipam4` / :attr:`ipam6` of this object only;
        keeping it across restarts (``Ipam.to_dict``) is the caller's job.
        """
        ipv6 = gateway6 = None
        if self.ipam6 is not None:
            ipv6, gateway6 = self.ipam6.allocate(key), str(self.ipam6.gateway)
        return EndpointSpec(
            key=key,
            ipv4=self.ipam4.allocate(key),
            ipv6=ipv6,
            gateway4=str(self.ipam4.gateway),
            gateway6=gateway6,
            ifname=ifname,
        )

    def _validate(self, spec: EndpointSpec) -> list[Interface]:
        if len(spec.ifname.encode()) > IFNAMSIZ or not spec.ifname or "/" in spec.ifname:
            raise NetError(f"invalid interface name {spec.ifname!r}")
        wanted: list[Interface] = [_interface(spec.ipv4, 4, "IPv4 address")]
        if spec.gateway4 is not None:
            _address(spec.gateway4, 4, "IPv4 gateway")
        if spec.ipv6 is not None:
            wanted.append(_interface(spec.ipv6, 6, "IPv6 address"))
        if spec.gateway6 is not None:
            if spec.ipv6 is None:
                raise NetError(f"endpoint {spec.key!r} has an IPv6 gateway but no IPv6 address")
            _address(spec.gateway6, 6, "IPv6 gateway")
        return wanted

    def ensure_endpoint(self, spec: EndpointSpec) -> Attachment:
        """Make the endpoint exist exactly as ``spec`` says and return it.

        Converges from any state: nothing, complete, or half made by a crashed
        run (e.g. a namespace without its veth). Addresses not in ``spec`` are
        removed from the endpoint's interface. On failure, whatever this call
        created is removed again before the NetError propagates.
        """
        wanted = self._validate(spec)
        ns = self.naming.netns(spec.key)
        host_if = self.naming.host_ifname(spec.key)
        created_ns = False
        created_link = False
        try:
            created_ns = create_netns(ns)
            created_link = self._ensure_veth(spec, ns, host_if, fresh_ns=created_ns)
            mac = self._configure_endpoint(spec, ns, wanted)
            # The address may have been someone else's a moment ago: tell the neighbours.
            announce(ns, spec.ifname, mac, str(wanted[0].ip))
        except BaseException as exc:
            self._undo(ns, host_if, created_ns, created_link)
            if isinstance(exc, NetError) or not isinstance(exc, Exception):
                raise
            raise NetError(f"cannot create endpoint {spec.key!r}: {exc}") from exc
        return Attachment(
            key=spec.key,
            netns=ns,
            netns_path=netns_path(ns),
            host_ifname=host_if,
            ifname=spec.ifname,
            ipv4=str(wanted[0]),
            ipv6=str(wanted[1]) if len(wanted) > 1 else None,
            mac=mac,
        )

    def _ensure_veth(self, spec: EndpointSpec, ns: str, host_if: str, fresh_ns: bool) -> bool:
        """Make the veth pair exist, host side on the bridge and up; True if created.

        A new pair is created in one request: peer already in the endpoint's
        namespace, host side already enslaved to the bridge and up. Netlink
        round trips are counted.
        """
        with _rtnl(self.host_netns) as nl:
            bridge = nl.link(self.bridge)
            if bridge is None:
                raise NetError(f"bridge {self.bridge} does not exist: call ensure_bridge() first")
            host = nl.link(host_if)
            if host is not None and (fresh_ns or not self._peer_present(ns, spec.ifname)):
                # A veth whose peer is not in the namespace (a crash, or the
                # namespace was removed and made anew): start the pair over.
                with _failing(f"cannot remove stale veth {host_if}"):
                    delete_link(nl, host_if)
                host = None
            if host is not None:
                if host.master != bridge.index or not host.up:
                    with _failing(f"cannot attach {host_if} to bridge {self.bridge}"):
                        nl.set_master(host.index, bridge.index)
                return False
            if not fresh_ns:
                self._delete_in_netns(ns, spec.ifname)
            fd = os.open(netns_path(ns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                with _failing(f"cannot create veth {host_if} <-> {ns}/{spec.ifname}"):
                    nl.add_veth(host_if, bridge.index, spec.ifname, fd)
            finally:
                os.close(fd)
            return True

    def _peer_present(self, ns: str, ifname: str) -> bool:
        with _rtnl(ns) as nl:
            link = nl.link(ifname)
            return link is not None and link.kind == "veth"

    def _delete_in_netns(self, ns: str, ifname: str) -> None:
        with _rtnl(ns) as nl, _failing(f"cannot remove stale {ifname} in {ns}"):
            delete_link(nl, ifname)

    def _configure_endpoint(self, spec: EndpointSpec, ns: str, wanted: list[Interface]) -> str:
        """Inside the endpoint: loopback and interface up, addresses, default routes."""
        with _rtnl(ns) as nl:
            link = nl.link(spec.ifname)
            if link is None:
                raise NetError(f"interface {spec.ifname} missing in network namespace {ns}")
            index = link.index
            with _failing(f"cannot bring up loopback in {ns}"):
                nl.set_up(LOOPBACK_IFINDEX)
            with _failing(f"cannot set the addresses of {spec.ifname} in {ns}"):
                ensure_addresses(nl, index, wanted, exclusive=True)
            refuse_router_adverts(spec.ifname, ns)  # before it is up to hear one
            link_local_from_mac(spec.ifname, ns)  # the link-local address its guard binds
            if not link.up:
                with _failing(f"cannot bring up {spec.ifname} in {ns}"):
                    nl.set_up(index)
            routes = [(spec.gateway4, "0.0.0.0")]  # noqa: S104 - a default route's destination
            if spec.gateway6 is not None:
                routes.append((spec.gateway6, "::"))
            for gateway, dst in routes:
                if gateway is None:
                    continue
                with _failing(f"cannot set default route via {gateway} in {ns}"):
                    nl.replace_route(dst, 0, index, gateway)
            return link.mac

    def _undo(self, ns: str, host_if: str, created_ns: bool, created_link: bool) -> None:
        """Best-effort removal of what a failed ensure_endpoint created."""
        try:
            if created_ns or created_link:
                with _rtnl(self.host_netns) as nl:
                    delete_link(nl, host_if)
            if created_ns:
                remove_netns(ns)
        except Exception:  # noqa: S110 - the original error is the one to report
            pass

    def attachment(self, key: str, ifname: str = "eth0") -> Attachment | None:
        """The endpoint for ``key`` as found in the kernel, or None if it is not (fully) there."""
        ns = self.naming.netns(key)
        host_if = self.naming.host_ifname(key)
        if not netns_exists(ns):
            return None
        with _rtnl(self.host_netns) as nl:
            if nl.link(host_if) is None:
                return None
        with _rtnl(ns) as nl:
            link = nl.link(ifname)
            if link is None:
                return None
            mac = link.mac
            found: dict[int, str] = {}
            for address in nl.addresses(link.index):
                value = address.interface
                if not value.ip.is_link_local:
                    found.setdefault(value.version, str(value))
        if 4 not in found:
            return None
        return Attachment(key, ns, netns_path(ns), host_if, ifname, found[4], found.get(6), mac)

    def remove_endpoint(self, key: str) -> bool:
        """Remove the endpoint's veth pair and namespace; True if anything existed.

        The host-side veth is deleted explicitly (which deletes its peer)
        rather than left to the namespace's destruction, because an open socket
        or a process in the namespace keeps it alive, and with it the veth.
        """
        ns = self.naming.netns(key)
        host_if = self.naming.host_ifname(key)
        with _rtnl(self.host_netns) as nl, _failing(f"cannot remove veth {host_if}"):
            removed = delete_link(nl, host_if)
        return remove_netns(ns) or removed

    # -- inventory ----------------------------------------------------------

    def inventory(self) -> Inventory:
        """Everything with this plumber's prefix, whether made by this object or not."""
        with _rtnl(self.host_netns) as nl, _failing("cannot list links"):
            names = [link.name for link in nl.links()]
        bridge = self.bridge if self.bridge in names else None
        host_links = tuple(
            sorted(n for n in names if self.naming.owns_link(n) and n != self.naming.bridge)
        )
        return Inventory(bridge, host_links, tuple(list_netns(self.naming.netns_pattern)))

    def teardown(self, settle: float = 1.0) -> Inventory:
        """Remove every endpoint and the bridge of this prefix; returns what was found.

        Works without any memory of what was created, so it also cleans up
        after a crashed run with the same prefix and host namespace.

        Deleting a veth costs ~20 ms of kernel time (an RCU grace period per
        request), whereas namespaces dropped together are destroyed by the
        kernel in one batch, veths included. So the namespaces go first, the
        host side waits up to ``settle`` seconds for their veths to vanish,
        and only the survivors (a namespace kept alive by an open socket or a
        process) are deleted one by one.
        """
        found = self.inventory()
        for ns in found.netns:
            remove_netns(ns)
        deadline = time.monotonic() + settle
        remaining = set(found.host_links)
        with _rtnl(self.host_netns) as nl:
            while remaining and time.monotonic() < deadline:
                time.sleep(0.01)
                with _failing("cannot list links"):
                    present = {link.name for link in nl.links()}
                remaining &= present
            for name in sorted(remaining):
                with _failing(f"cannot remove veth {name}"):
                    delete_link(nl, name)
            if found.bridge is not None:
                with _failing(f"cannot remove bridge {found.bridge}"):
                    delete_link(nl, found.bridge)
        return found
