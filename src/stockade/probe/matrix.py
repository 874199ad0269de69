"""Reachability matrices: every peer to every other peer on every port.

:func:`probe_matrix` builds the probes for a set of peers (endpoints with a
namespace and addresses), runs them all at once (:func:`run_probes`) and
returns an :class:`ObservedMatrix` keyed by ``(src key, dst key, port, protocol)``,
printable as upstream-style truth tables (:mod:`stockade.probe.table`).

Public API::

    ProbeEndpoint(key, netns, addresses); ProbeEndpoint.of(attachment)
    probe_matrix(peers, ports, family=4, timeout=1.0, include_self=False) -> ObservedMatrix
    ObservedMatrix.allowed(src, dst, port, protocol) -> bool | None
    ObservedMatrix.as_bools() -> dict[(src, dst, port, protocol), bool]
    ObservedMatrix.render(port) -> str; ObservedMatrix.render_all() -> str
    ObservedMatrix.verdict(src, dst, port, protocol) -> ProbeResult | None
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stockade.errors import NetError
from stockade.probe.client import Probe, ProbeResult, run_probes
from stockade.probe.protocol import Port, Protocol
from stockade.probe.table import render_table

if TYPE_CHECKING:
    from stockade.net.plumber import Attachment

MatrixKey = tuple[str, str, int, Protocol]


@dataclass(frozen=True)
class ProbeEndpoint:
    """An endpoint as the prober sees it: a key (``ns/pod``), its namespace, its IPs."""

    key: str
    netns: str | None
    addresses: tuple[str, ...]

    def address(self, family: int) -> str:
        """The first address of IP ``family`` (4 or 6), without prefix length."""
        for text in self.addresses:
            value = ipaddress.ip_interface(text).ip
            if value.version == family:
                return str(value)
        raise NetError(f"peer {self.key!r} has no IPv{family} address")

    @classmethod
    def of(cls, attachment: Attachment) -> ProbeEndpoint:
        """The peer of an endpoint made by :class:`stockade.net.Plumber`."""
        addresses = (
            (attachment.ipv4,) if attachment.ipv6 is None else (attachment.ipv4, attachment.ipv6)
        )
        return cls(attachment.key, attachment.netns, addresses)


@dataclass(frozen=True)
class ObservedMatrix:
    """Observed reachability; pairs that were not probed are absent."""

    keys: tuple[str, ...]
    ports: tuple[Port, ...]
    verdicts: Mapping[MatrixKey, ProbeResult]

    def verdict(self, src: str, dst: str, port: int, protocol: Protocol) -> ProbeResult | None:
        return self.verdicts.get((src, dst, port, protocol))

    def allowed(self, src: str, dst: str, port: int, protocol: Protocol) -> bool | None:
        found = self.verdict(src, dst, port, protocol)
        return None if found is None else found.allowed

    def as_bools(self) -> dict[MatrixKey, bool]:
        return {key: v.allowed for key, v in self.verdicts.items()}

    def render(self, port: Port) -> str:
        """The truth table of one port, corner label ``TCP/80``."""
        return render_table(
            self.keys,
            self.keys,
            lambda s, d: self.allowed(s, d, port.number, port.protocol),
            title=str(port),
        )

    def render_all(self) -> str:
        return "\n\n".join(self.render(p) for p in self.ports)


def probe_matrix(
    peers: Sequence[ProbeEndpoint],
    ports: Sequence[Port],
    family: int = 4,
    timeout: float = 1.0,
    include_self: bool = False,
) -> ObservedMatrix:
    """Probe every ordered pair of ``peers`` (not a peer to itself unless asked)."""
    probes = [
        Probe(src.key, src.netns, dst.key, dst.address(family), port)
        for src in peers
        for dst in peers
        if include_self or src.key != dst.key
        for port in ports
    ]
    verdicts = run_probes(probes, timeout=timeout)
    table = {
        (v.probe.src, v.probe.dst, v.probe.port.number, v.probe.port.protocol): v for v in verdicts
    }
    return ObservedMatrix(tuple(p.key for p in peers), tuple(ports), table)
