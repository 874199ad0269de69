"""Address allocation from one subnet (IPAM), as a pure value-holding class.

No I/O: the node agent will persist the state, so the whole state is explicit
(subnet, gateway, owner of each allocated address) and round-trips through
:meth:`Ipam.to_dict` / :meth:`Ipam.from_dict`. Allocation is deterministic —
always the lowest free host address — so the same sequence of calls gives the
same addresses on every run, which keeps tests and truth tables reproducible.

Never handed out: the network address, the gateway (by default the first host
address, the one the bridge carries) and, for IPv4, the broadcast address.

Allocation is keyed by an owner (e.g. ``"ns/pod"``): allocating again for the
same owner returns the same address, so a retried "ensure" cannot leak one.

Public API::

    Ipam(subnet, gateway=None, allocated=None)
    Ipam.allocate(owner) -> str        # "10.244.0.2/16" (interface form)
    Ipam.block_claim() -> claim | None # a pool of blocks that needs one: how to claim it
    Ipam.adopt(block)                  # a block claimed by it, now this pool's
    Ipam.reserve(owner, address) -> str  # a given address, e.g. from a test case
    Ipam.release(owner) -> str | None
    Ipam.address_of(owner) -> str | None
    Ipam.gateway_interface -> str      # "10.244.0.1/16", what the bridge carries
    Ipam.to_dict() / Ipam.from_dict(d)
    Ipam.copy() -> Ipam                # to change apart, and keep only if a commit lands
    Ipam.restored(d) -> Ipam           # this pool with a snapshot's allocations
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from typing import Any

from stockade.errors import NetError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Ipam:
    """Lowest-free allocator over one IPv4 or IPv6 subnet."""

    def __init__(
        self,
        subnet: str,
        gateway: str | None = None,
        allocated: Mapping[str, str] | None = None,
    ) -> None:
        try:
            self.subnet: Network = ipaddress.ip_network(subnet, strict=True)
        except ValueError as exc:
            raise NetError(f"invalid subnet {subnet!r}: {exc}") from exc
        net = self.subnet
        self._first = int(net.network_address) + 1
        self._last = int(net.broadcast_address) - (1 if net.version == 4 else 0)
        if self._last - self._first < 1:
            raise NetError(f"subnet {subnet} is too small for a gateway and an endpoint")
        self.gateway: Address = (
            self._parse(gateway) if gateway is not None else ipaddress.ip_address(self._first)
        )
        self._by_address: dict[Address, str] = {}
        self._by_owner: dict[str, Address] = {}
        for address, owner in (allocated or {}).items():
            self.reserve(owner, address)

    def _parse(self, text: str) -> Address:
        try:
            address = ipaddress.ip_address(text.split("/", 1)[0])
        except ValueError as exc:
            raise NetError(f"invalid address {text!r}: {exc}") from exc
        if address not in self.subnet or not self._first <= int(address) <= self._last:
            raise NetError(f"address {address} is not a host address of {self.subnet}")
        return address

    def _interface(self, address: Address) -> str:
        return f"{address}/{self.subnet.prefixlen}"

    @property
    def gateway_interface(self) -> str:
        """The gateway with the subnet's prefix length, as the bridge carries it."""
        return self._interface(self.gateway)

    def address_of(self, owner: str) -> str | None:
        """The address allocated to ``owner`` (interface form), if any."""
        address = self._by_owner.get(owner)
        return None if address is None else self._interface(address)

    def allocate(self, owner: str, *, claim: bool = True) -> str:
        """The owner's address, allocating the lowest free one on first call.

        ``claim``: whether a pool of blocks (etcd/ipam.py) may claim a block here when
        its own are full; if not it raises :class:`BlockNeeded`. A plain pool has no
        blocks to claim."""
        known = self._by_owner.get(owner)
        if known is not None:
            return self._interface(known)
        for value in range(self._first, self._last + 1):
            candidate = ipaddress.ip_address(value)
            if candidate != self.gateway and candidate not in self._by_address:
                return self._take(owner, candidate)
        raise NetError(f"subnet {self.subnet} is exhausted ({len(self._by_address)} allocated)")

    def block_claim(self) -> Callable[[], Network] | None:
        """How to claim the block this pool needs before it can allocate, or None when
        it needs none (a plain pool never does). The claim may be slow (etcd's round
        trips): it is called without the agent's lock, the block then given to
        :meth:`adopt` under it."""
        return None

    def adopt(self, block: Network) -> None:
        """A block claimed for this pool (`block_claim`) is now one of its own."""
        raise NetError(f"the pool {self.subnet} does not hand out addresses by blocks")

    def reserve(self, owner: str, address: str) -> str:
        """Give ``owner`` exactly ``address``; fails if another owner holds it."""
        wanted = self._parse(address)
        if wanted == self.gateway:
            raise NetError(f"address {wanted} is the gateway of {self.subnet}")
        holder = self._by_address.get(wanted)
        if holder is not None and holder != owner:
            raise NetError(f"address {wanted} is already allocated to {holder!r}")
        known = self._by_owner.get(owner)
        if known is not None and known != wanted:
            raise NetError(f"{owner!r} already holds {known}, not {wanted}")
        return self._take(owner, wanted)

    def _take(self, owner: str, address: Address) -> str:
        self._by_address[address] = owner
        self._by_owner[owner] = address
        return self._interface(address)

    def release(self, owner: str) -> str | None:
        """Free the owner's address; returns it, or None if the owner had none."""
        address = self._by_owner.pop(owner, None)
        if address is None:
            return None
        del self._by_address[address]
        return self._interface(address)

    def __len__(self) -> int:
        return len(self._by_address)

    def allocated_addresses(self) -> list[Address]:
        """Every allocated address, in no particular order."""
        return list(self._by_address)

    def to_dict(self) -> dict[str, Any]:
        """The whole state, JSON-ready, with addresses in ascending order."""
        return {
            "subnet": str(self.subnet),
            "gateway": str(self.gateway),
            "allocated": {str(a): self._by_address[a] for a in sorted(self._by_address)},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Ipam:
        """Rebuild from :meth:`to_dict` output; validates every address again."""
        try:
            subnet = str(data["subnet"])
            gateway = data.get("gateway")
            allocated = {str(k): str(v) for k, v in dict(data.get("allocated") or {}).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise NetError(f"invalid IPAM state: {exc!r}") from exc
        return cls(subnet, None if gateway is None else str(gateway), allocated)

    def copy(self) -> Ipam:
        """The same pool, to change apart and swap in once a commit has landed.

        A subclass that holds more than its state (etcd's block pool: how to claim a
        block) keeps it here; `from_dict` alone would lose it."""
        return type(self).from_dict(self.to_dict())

    def restored(self, data: Mapping[str, Any]) -> Ipam:
        """The pool a snapshot's IPAM state (`to_dict`) restores: here, that state."""
        return Ipam.from_dict(data)
