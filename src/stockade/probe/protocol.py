"""Protocols and ports that probes speak, and their text form (``tcp:80``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from stockade.errors import NetError


class Protocol(enum.StrEnum):
    """The transport protocols of Kubernetes NetworkPolicy ports."""

    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


@dataclass(frozen=True, order=True)
class Port:
    """One probed service: a port number and a protocol."""

    number: int
    protocol: Protocol = Protocol.TCP

    def __post_init__(self) -> None:
        if not 1 <= self.number <= 65535:
            raise NetError(f"port {self.number} is out of range 1-65535")

    def __str__(self) -> str:
        """``TCP/80``, the column-corner label of upstream truth tables."""
        return f"{self.protocol.value}/{self.number}"

    @property
    def spec(self) -> str:
        """``tcp:80``, the command-line form :meth:`parse` reads back."""
        return f"{self.protocol.value.lower()}:{self.number}"

    @classmethod
    def parse(cls, text: str) -> Port:
        """``tcp:80``, ``UDP/53`` or ``80`` (TCP) -> Port."""
        proto, sep, number = text.replace("/", ":").rpartition(":")
        try:
            protocol = Protocol(proto.upper()) if sep else Protocol.TCP
            return cls(int(number), protocol)
        except ValueError as exc:
            raise NetError(f"invalid port {text!r}: want e.g. tcp:80, udp:53, sctp:80") from exc
