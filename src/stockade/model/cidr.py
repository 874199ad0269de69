"""CIDR and IP parsing as Kubernetes reads them.

Without StrictIPCIDRValidation the API server uses Go's legacy parser: it accepts
IPv4 octets with leading zeros (read as decimal) and host bits past the prefix
(masked off). Matching always uses the masked network.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _strip_leading_zeros(text: str) -> str:
    if ":" in text:
        return text
    return ".".join(str(int(o)) if o.isdigit() else o for o in text.split("."))


@lru_cache(maxsize=65536)
def parse_cidr(text: str) -> Network | None:
    """The network a CIDR denotes (legacy-lenient), or None if it is not a CIDR."""
    if "/" not in text:
        return None
    addr, _, prefix = text.partition("/")
    if not prefix.isdigit() or (len(prefix) > 1 and prefix.startswith("0")):
        return None
    if ":" not in addr and not all(o.isdigit() and len(o) <= 3 for o in addr.split(".")):
        return None
    try:
        net = ipaddress.ip_network(f"{_strip_leading_zeros(addr)}/{int(prefix)}", strict=False)
    except ValueError:
        return None
    return net


@lru_cache(maxsize=65536)
def parse_ip(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(_strip_leading_zeros(text))
    except ValueError:
        return None
