"""Kernel parameters (sysctls) read and written inside a network namespace.

The ``net.*`` sysctls are per network namespace, and ``/proc/sys/net`` shows
the namespace of the thread that opens the file. So writing one for a named
namespace is: enter it in-process (see :mod:`stockade.net.namespace`), open,
write, leave. No ``sysctl`` or ``ip netns exec`` subprocess is needed.

Public API::

    sysctl_path(name) -> str
    read_sysctl(name, netns=None) -> str
    write_sysctl(name, value, netns=None) -> None   # no write if already equal
"""

from __future__ import annotations

import os
import re

from stockade.errors import NetError
from stockade.net.namespace import entered

_NAME = re.compile(r"^[a-z0-9_-]+(\.[A-Za-z0-9_-]+)+$")


def sysctl_path(name: str) -> str:
    """``net.bridge.bridge-nf-call-iptables`` -> ``/proc/sys/net/bridge/bridge-nf-call-iptables``.

    Dots separate levels; an interface name with a dot cannot be addressed
    this way (use the ``/`` form of the path directly if ever needed).
    """
    if not _NAME.match(name):
        raise NetError(f"invalid sysctl name {name!r}")
    return os.path.join("/proc/sys", *name.split("."))


def read_sysctl(name: str, netns: str | None = None) -> str:
    """Current value of sysctl ``name`` in ``netns`` (None: the current namespace)."""
    path = sysctl_path(name)
    with entered(netns):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError as exc:
            where = f" in network namespace {netns!r}" if netns else ""
            raise NetError(f"cannot read sysctl {name}{where}: {exc}") from exc


def write_sysctl(name: str, value: str | int, netns: str | None = None) -> None:
    """Set sysctl ``name`` to ``value`` in ``netns`` (None: the current namespace).

    Reads first and leaves an equal value alone, so that ensuring a setting
    costs no write and works where /proc/sys is read-only but already right.
    """
    path = sysctl_path(name)
    wanted = str(value)
    with entered(netns):
        try:
            with open(path) as f:
                if f.read().strip() == wanted:
                    return
            with open(path, "w") as f:
                f.write(wanted)
        except OSError as exc:
            where = f" in network namespace {netns!r}" if netns else ""
            raise NetError(f"cannot set sysctl {name}={wanted}{where}: {exc}") from exc
