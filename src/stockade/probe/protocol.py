"""Protocols and ports that probes speak, and their text form (``tcp:80``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from stockade.errors import NetError
from stockade.model.ports import parse_port_text


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
        """``tcp:80``, ``UDP/53``, ``80/udp`` or ``80`` (TCP) -> Port (model/ports.py)."""
        try:
            parsed = parse_port_text(text, numeric=True)
        except ValueError as exc:
            raise NetError(f"invalid port {text!r}: {exc}; e.g. tcp:80, udp:53, sctp:80") from None
        assert isinstance(parsed.port, int)
        return cls(parsed.port, Protocol(parsed.proto))
