"""The one small interface every datapath implements (nftables now; iptables, eBPF later)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from stockade.compile.ir import Chain, Ruleset
from stockade.compile.plan import Plan
from stockade.errors import DataplaneError, NetError
from stockade.net.sysctl import BridgeNetfilterMissing, ensure_bridge_netfilter

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class KernelSnapshot:
    """The kernel as read back, and how many transactions had been made before."""

    generation: int
    table: Any


class ReadAhead(Generic[T]):
    """A read of the kernel begun on a thread of its own at start (while the agent loads
    its store and compiles), taken by the first snapshot.

    `read` returns (the datapath's generation when it read, what it read), or None
    when there is nothing to read. What was read is taken once; the snapshot uses it
    only as of the generation it was read at (nftables: the generation its snapshot
    carries; eBPF: its own, compared under its lock), so an apply since makes it
    stale, and the snapshot reads again, as it does when the read failed (and says
    why, if it fails too).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._read: tuple[int, T] | None = None

    def start(self, read: Callable[[], tuple[int, T] | None]) -> None:
        if self._thread is not None or self._read is not None:
            return  # already under way (opened ahead: agent/early.py)

        def run() -> None:
            try:
                self._read = read()
            except Exception as exc:
                log.debug("reading the kernel ahead failed: %s", exc)

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()

    def take(self) -> tuple[int, T] | None:
        """(the generation it read at, what it read) once the read is over; None when
        nothing was read. The caller holds the generation against its own."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        got, self._read = self._read, None
        return got


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
