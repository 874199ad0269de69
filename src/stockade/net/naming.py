"""Deterministic names for everything the plumber creates.

Kernel interface names are limited to 15 bytes, and the names must be found
again after a crash without any saved state. So every name is derived from a
per-run *prefix* and a stable key (``"ns/pod"``)::

    <prefix><8 hex of sha256(key)><role>

with role ``h`` for the host side of a veth and ``n`` for the endpoint's
network namespace, and ``<prefix>br0`` for the bridge. A prefix is 1 to 6
lowercase letters or digits starting with a letter, so a name is at most
6 + 8 + 1 = 15 bytes.

Ownership is the prefix: matching uses the full pattern (prefix, exactly eight
hex digits, role), so the names of prefix ``stk`` can never match those of
``stkab1`` (they differ in length) and two runs with different prefixes never
list or remove each other's objects.

Public API::

    Naming(prefix="stk")
    Naming.bridge -> str
    Naming.host_ifname(key) -> str
    Naming.netns(key) -> str
    Naming.owns_link(name) / Naming.owns_netns(name) -> bool
    Naming.netns_pattern -> re.Pattern[str]
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from stockade.errors import NetError

IFNAMSIZ = 15
_PREFIX = re.compile(r"^[a-z][a-z0-9]{0,5}$")
HOST_ROLE = "h"
NETNS_ROLE = "n"


def digest(key: str) -> str:
    """Eight hex digits of sha256(key): 32 bits, collision-free for a node's pods in practice."""
    if not key:
        raise NetError("an endpoint key must not be empty")
    return hashlib.sha256(key.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Naming:
    """The names under one prefix; see the module docstring for the scheme."""

    prefix: str = "stk"
    _links: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _netns: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _PREFIX.match(self.prefix):
            raise NetError(
                f"invalid prefix {self.prefix!r}: 1 to 6 lowercase letters or digits, "
                "starting with a letter"
            )
        p = re.escape(self.prefix)
        object.__setattr__(self, "_links", re.compile(rf"{p}(?:[0-9a-f]{{8}}{HOST_ROLE}|br0)"))
        object.__setattr__(self, "_netns", re.compile(rf"{p}[0-9a-f]{{8}}{NETNS_ROLE}"))

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br0"

    def host_ifname(self, key: str) -> str:
        return f"{self.prefix}{digest(key)}{HOST_ROLE}"

    def netns(self, key: str) -> str:
        return f"{self.prefix}{digest(key)}{NETNS_ROLE}"

    @property
    def netns_pattern(self) -> re.Pattern[str]:
        return self._netns

    def owns_link(self, name: str) -> bool:
        """True for the bridge and the host-side veths of this prefix."""
        return self._links.fullmatch(name) is not None

    def owns_netns(self, name: str) -> bool:
        return self._netns.fullmatch(name) is not None
