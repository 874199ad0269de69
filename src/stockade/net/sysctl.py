"""Kernel parameters (sysctls) read and written inside a network namespace.

The ``net.*`` sysctls are per network namespace, and ``/proc/sys/net`` shows
the namespace of the thread that opens the file. So writing one for a named
namespace is: enter it in-process (see :mod:`stockade.net.namespace`), open,
write, leave. No ``sysctl`` or ``ip netns exec`` subprocess is needed.

Public API::

    sysctl_path(name) -> str
    read_sysctl(name, netns=None) -> str
    write_sysctl(name, value, netns=None) -> None   # no write if already equal
    BRIDGE_NETFILTER                                # the two bridge-nf-call-* sysctls
    ensure_bridge_netfilter(netns=None, forward=False) -> None
    bridge_netfilter_on() -> bool                   # read only, in this namespace
    refuse_router_adverts(ifname, netns=None) -> bool  # IPv6 accept_ra = 0
    link_local_from_mac(ifname, netns=None) -> bool    # IPv6 addr_gen_mode = 0 (EUI-64)
    router_adverts_refused(ifname) -> bool          # read only, in this namespace

The bridge-netfilter sysctls are set here and nowhere else: by the Plumber
(`stockade run`, tests), the CNI plugin's bridge and the nftables datapath's
feature probe all call `ensure_bridge_netfilter`.
"""

from __future__ import annotations

import errno
import logging
import os
import re

from stockade.errors import NetError
from stockade.net.namespace import entered

log = logging.getLogger("stockade.net")
_READ_ONLY_TOLD: list[str] = []

_NAME = re.compile(r"^[a-z0-9_-]+(\.[A-Za-z0-9_-]+)+$")


def sysctl_path(name: str) -> str:
    """``net.bridge.bridge-nf-call-iptables`` -> ``/proc/sys/net/bridge/bridge-nf-call-iptables``.

    Dots separate levels; an interface name with a dot cannot be addressed
    this way (use the ``/`` form of the path directly if ever needed).
    """
    if not _NAME.match(name):
        raise NetError(f"invalid sysctl name {name!r}")
    return os.path.join("/proc/sys", *name.split("."))


def _read(path: str) -> str:
    # os-level: open() would add fstat, ioctl and lseek, each a GIL release that a busy
    # agent (the thin plugin runs in its threads) makes costly.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096).decode().strip()
    finally:
        os.close(fd)


def read_sysctl(name: str, netns: str | None = None) -> str:
    """Current value of sysctl ``name`` in ``netns`` (None: the current namespace)."""
    path = sysctl_path(name)
    with entered(netns):
        try:
            return _read(path)
        except OSError as exc:
            raise NetError(f"cannot read sysctl {name}{_where(netns)}: {exc}") from exc


def write_sysctl(name: str, value: str | int, netns: str | None = None) -> None:
    """Set sysctl ``name`` to ``value`` in ``netns`` (None: the current namespace).

    Reads first and leaves an equal value alone, so that ensuring a setting
    costs no write and works where /proc/sys is read-only but already right.
    """
    wanted = str(value)
    with entered(netns):
        try:
            _ensure(sysctl_path(name), wanted)
        except OSError as exc:
            raise NetError(f"cannot set sysctl {name}={wanted}{_where(netns)}: {exc}") from exc


def _ensure(path: str, wanted: str) -> None:
    """`wanted` in the file, here; read first, and an equal value left alone."""
    if _read(path) == wanted:
        return
    with open(path, "w") as f:
        f.write(wanted)


def _where(netns: str | None) -> str:
    return f" in network namespace {netns!r}" if netns else ""


def _conf_path(ifname: str, key: str) -> str:
    """``/proc/sys/net/ipv6/conf/IFNAME/KEY``: the interface's own directory (a dotted
    name could not say an interface name with a dot in it)."""
    if not ifname or "/" in ifname or ifname in (".", ".."):
        raise NetError(f"invalid interface name {ifname!r}")
    return f"/proc/sys/net/ipv6/conf/{ifname}/{key}"


def refuse_router_adverts(ifname: str, netns: str | None = None) -> bool:
    """``ifname`` in ``netns`` (None: here) ignores IPv6 router advertisements
    (``accept_ra`` = 0): an address's routes and prefixes are what stockade configured,
    not what a neighbour announces. A pod that could send them (a port without a
    guard) would otherwise route its neighbours, or the host, through itself
    (CVE-2020-10749). Nothing to do where IPv6 is off (no such directory).

    Defence in depth behind the port guard, which drops a pod's advertisements:
    where /proc/sys is read-only (an agent in a container without a writable one)
    it is left as it is, with a warning, and False returned.
    """
    return _set_conf(ifname, "accept_ra", "0", netns)


def link_local_from_mac(ifname: str, netns: str | None = None) -> bool:
    """``ifname`` in ``netns`` takes the link-local address its MAC gives (EUI-64,
    ``addr_gen_mode`` = 0), the one the port guard binds to the port (see
    compile/guard.py): set before the interface comes up, whatever the namespace's
    default. Where /proc/sys is read-only, left as it is (the kernel's default is
    EUI-64), with a warning, and False returned."""
    return _set_conf(ifname, "addr_gen_mode", "0", netns)


def _set_conf(ifname: str, key: str, value: str, netns: str | None) -> bool:
    """net.ipv6.conf.IFNAME.KEY = value in `netns`; nothing where IPv6 is off."""
    path = _conf_path(ifname, key)
    with entered(netns):
        try:
            _ensure(path, value)
            return True
        except FileNotFoundError:
            return True  # IPv6 is off here (the caller made the interface)
        except OSError as exc:
            if exc.errno == errno.EROFS:
                if key not in _READ_ONLY_TOLD:
                    _READ_ONLY_TOLD.append(key)  # once per process and key, not per pod
                    log.warning(f"{key} left as it is: /proc/sys is read-only here",
                                extra={"fields": {"interface": ifname}})
                return False
            raise NetError(f"cannot set {key}={value} on {ifname}{_where(netns)}: "
                           f"{exc}") from exc


def router_adverts_refused(ifname: str) -> bool:
    """Read only, here: whether `refuse_router_adverts` has nothing to do (or can do
    nothing: /proc/sys read-only)."""
    if os.statvfs("/proc/sys").f_flag & os.ST_RDONLY:
        return True
    try:
        return _read(_conf_path(ifname, "accept_ra")) == "0"
    except FileNotFoundError:
        return True  # no IPv6 here (or no such interface: the caller's check)
    except OSError:
        return False


BRIDGE_NETFILTER = ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables")
FORWARDING = ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding")


class BridgeNetfilterMissing(NetError):
    """``br_netfilter`` is not loaded: there is no /proc/sys/net/bridge."""


def ensure_bridge_netfilter(netns: str | None = None, forward: bool = False) -> None:
    """Bridged IPv4/IPv6 traffic of ``netns`` (None: here) through the inet forward hook.

    ``bridge-nf-call-iptables`` and ``-ip6tables`` exist per network namespace
    (kernel >= 5.3) once ``br_netfilter`` is loaded, and default to 1 in a new
    namespace; they are still set explicitly because a host may have turned
    them off. With ``forward`` the namespace also routes between subnets
    (``ip_forward`` and IPv6 ``forwarding``, a node-wide setting in the real
    host namespace). Raises BridgeNetfilterMissing without br_netfilter,
    NetError when a sysctl cannot be written.
    """
    settings = [*BRIDGE_NETFILTER, *(FORWARDING if forward else ())]
    with entered(netns):
        if not os.path.isdir("/proc/sys/net/bridge"):
            raise BridgeNetfilterMissing(
                "/proc/sys/net/bridge is missing: the br_netfilter module is not loaded "
                "(modprobe br_netfilter); without it the inet forward hook does not see "
                "bridged traffic"
            )
        for name in settings:
            write_sysctl(name, 1)


def bridge_netfilter_on() -> bool:
    """Whether ``ensure_bridge_netfilter()`` (here, without ``forward``) has nothing to do.

    Read only: the CNI plugin checks this on every ADD without taking the bridge's lock.
    """
    try:
        return all(_read(sysctl_path(name)) == "1" for name in BRIDGE_NETFILTER)
    except OSError:  # no br_netfilter: ensure_bridge_netfilter says so
        return False
