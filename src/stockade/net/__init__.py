"""Network plumbing: namespaces, a bridge, veth endpoints, addresses (via pyroute2).

Modules:

* :mod:`~stockade.net.namespace` — named network namespaces, entered in-process
* :mod:`~stockade.net.sysctl` — sysctls read/written inside a namespace
* :mod:`~stockade.net.naming` — deterministic, prefix-owned interface/netns names
* :mod:`~stockade.net.plumber` — bridge + endpoints with ensure semantics
* :mod:`~stockade.net.ipam` — pure, serializable address allocation

No ``ip`` subprocess anywhere: netlink through pyroute2, namespaces through
``setns``/``unshare``/``mount`` in the calling thread.

The names below are loaded lazily: importing pyroute2 costs ~100 ms, and the
probe server, which only needs :mod:`~stockade.net.namespace`, should start
without paying it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stockade.net.ipam import Ipam
    from stockade.net.namespace import (
        create_netns,
        entered,
        list_netns,
        netns_exists,
        netns_path,
        remove_netns,
    )
    from stockade.net.naming import Naming
    from stockade.net.plumber import Attachment, EndpointSpec, Inventory, Plumber
    from stockade.net.sysctl import read_sysctl, write_sysctl

_HOMES = {
    "Ipam": "ipam",
    "create_netns": "namespace",
    "entered": "namespace",
    "list_netns": "namespace",
    "netns_exists": "namespace",
    "netns_path": "namespace",
    "remove_netns": "namespace",
    "Naming": "naming",
    "Attachment": "plumber",
    "EndpointSpec": "plumber",
    "Inventory": "plumber",
    "Plumber": "plumber",
    "read_sysctl": "sysctl",
    "write_sysctl": "sysctl",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)


__all__ = [
    "Attachment",
    "EndpointSpec",
    "Inventory",
    "Ipam",
    "Naming",
    "Plumber",
    "create_netns",
    "entered",
    "list_netns",
    "netns_exists",
    "netns_path",
    "read_sysctl",
    "remove_netns",
    "write_sysctl",
]
