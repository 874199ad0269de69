"""The one small interface every datapath implements (nftables now; iptables, eBPF later)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from stockade.compile.ir import Chain, Ruleset
from stockade.compile.plan import Plan
from stockade.errors import DataplaneError, NetError
from stockade.net.sysctl import BridgeNetfilterMissing, ensure_bridge_netfilter


@dataclass(frozen=True)
class KernelSnapshot:
    """The kernel as read back, and how many transactions had been made before."""

    generation: int
    table: Any


class Datapath(Protocol):
    name: str
    # Set by a verifying apply when the kernel differed from the previous apply
    # (or held anything that is not stockade's: then the plan may be empty).
    last_drift: Plan | None
    # Every difference that apply found, one line each ("chain i-…: rules differ",
    # "foreign set x", "base chain definition differs", "table missing").
    last_drift_details: list[str]

    def check(self) -> None:
        """Detect the kernel features this datapath needs; raise DataplaneError if absent."""

    def read(self) -> Ruleset:
        """What the kernel enforces now (empty when stockade has programmed nothing)."""

    def snapshot(self, known: Mapping[str, Chain] | None = None) -> KernelSnapshot:
        """Read the kernel back (slow at scale) without holding up applies."""

    def apply(self, desired: Ruleset, *, verify: bool | KernelSnapshot = False) -> Plan:
        """Make the kernel enforce `desired` in one atomic transaction; return the delta.

        The delta is taken against the previous apply, or against the kernel as
        read back when `verify` is set (drift repair) or nothing was applied yet.
        A snapshot taken before is used if no transaction came in between;
        otherwise the kernel is read again.
        """

    def diff(self, desired: Ruleset) -> Plan:
        """The delta `apply` would make, without making it."""

    def show(self) -> str:
        """The kernel's objects, as the native tool prints them."""

    def remove(self) -> None:
        """Remove everything this datapath created."""


def require_bridge_netfilter(netns: str | None, hook: str) -> None:
    """Bridged traffic of `netns` through netfilter, or a DataplaneError naming `hook`.

    Every datapath that judges packets in netfilter (nft's forward hook, iptables'
    FORWARD chain) sees bridged container traffic only through br_netfilter.
    """
    try:
        ensure_bridge_netfilter(netns)
    except BridgeNetfilterMissing:
        raise DataplaneError(
            "br_netfilter is not available (no /proc/sys/net/bridge): bridged "
            f"container traffic would bypass {hook}") from None
    except NetError as exc:
        raise DataplaneError(str(exc)) from None
