"""Simulated hosts on one machine, for the multi-host tests and bench/multihost.py.

Each host is a network namespace with its own bridge and its own agent, joined to
the others by a veth into a "fabric" namespace's bridge (see :class:`Hosts`). Every
namespace is named with the caller's prefix, so removing the namespaces carrying that
prefix removes everything (the tests' ``netns_prefix`` fixture does).
"""

from __future__ import annotations

import subprocess

from stockade.net.plumber import Plumber


def _ip(netns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True)


def _sysctl(netns: str, name: str, value: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw", f"{name}={value}"],
                   check=True, capture_output=True)


class Hosts:
    """Simulated hosts on one machine: each a network namespace with its own bridge
    (a Plumber), its endpoints and its agent, joined to the others by a veth into a
    "fabric" namespace's bridge. Hosts route each other's endpoints (a /32 per remote
    endpoint via its host's fabric address) and answer ARP for them on their bridge
    (proxy ARP), so endpoints of one on-link subnet reach each other across hosts."""

    UNDERLAY = "100.127.77"

    def __init__(self, prefix: str, count: int, *, plumb: bool = True) -> None:
        from stockade.net.namespace import create_netns

        self.prefix = prefix
        self.fabric = f"{prefix}-fab"
        create_netns(self.fabric)
        _ip(self.fabric, "link", "add", "fab0", "type", "bridge")
        _ip(self.fabric, "link", "set", "fab0", "up")
        self.names = [f"host-{i}" for i in range(1, count + 1)]
        self.netns: dict[str, str] = {}
        self.plumbers: dict[str, Plumber] = {}
        self.routes: dict[str, str] = {}  # address -> the host whose endpoint it is
        for i, host in enumerate(self.names, 1):
            ns = f"{prefix}-h{i}"
            create_netns(ns)
            self.netns[host] = ns
            _ip(ns, "link", "add", "up0", "type", "veth", "peer", "name", f"h{i}",
                "netns", self.fabric)
            _ip(self.fabric, "link", "set", f"h{i}", "master", "fab0", "up")
            _ip(ns, "addr", "add", f"{self.UNDERLAY}.{i}/24", "dev", "up0")
            _ip(ns, "link", "set", "up0", "up")
            if not plumb:
                continue  # the agents plumb and route themselves
            plumber = Plumber(prefix=prefix, host_netns=ns)
            plumber.ensure_bridge(addresses=[f"100.127.78.{i}/32"], forward=True)
            _sysctl(ns, f"net.ipv4.conf.{plumber.bridge}.proxy_arp", "1")
            _sysctl(ns, f"net.ipv4.neigh.{plumber.bridge}.proxy_delay", "0")
            self.plumbers[host] = plumber

    def address(self, host: str) -> str:
        return f"{self.UNDERLAY}.{self.names.index(host) + 1}"

    def route(self, ip: str, owner: str | None) -> None:
        """Where ``ip`` lives now (None: nowhere): every host's route to it."""
        before = self.routes.pop(ip, None)
        if owner is not None:
            self.routes[ip] = owner
        for host, ns in self.netns.items():
            if owner is None:
                if before is not None:
                    subprocess.run(["ip", "-n", ns, "route", "del", f"{ip}/32"],
                                   capture_output=True, check=False)
            elif host == owner:
                _ip(ns, "route", "replace", f"{ip}/32", "dev", self.plumbers[host].bridge)
            else:
                _ip(ns, "route", "replace", f"{ip}/32", "via", self.address(owner))

    def flush_conntrack(self) -> None:
        for ns in self.netns.values():
            subprocess.run(["ip", "netns", "exec", ns, "conntrack", "-F"],
                           capture_output=True, check=False)
