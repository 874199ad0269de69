"""A tracked connection as policy sees it (pure): what conntrack lists and revocation cuts.

`datapath.conntrack` reads these from the kernel and deletes them;
`agent.revoke` decides which to cut. Neither side's code is needed to name one.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True)
class ConnEntry:
    """A tracked connection by its original-direction tuple (who opened it, to where).

    `reply_src`/`reply_sport` are where the answers come from: the same as
    dst/dport unless the connection was DNATed (a service address), in which
    case they name the endpoint that policies actually see. `id` makes a delete
    exact: the kernel refuses it if the tuple now belongs to another connection.
    """

    protocol: str  # "TCP", "UDP", "SCTP", "ICMP", ... or the number
    src: str
    dst: str
    sport: int = 0
    dport: int = 0
    state: str | None = None  # TCP and SCTP only, e.g. "ESTABLISHED"
    zone: int = 0
    reply_src: str | None = None
    reply_sport: int | None = None
    id: int | None = None

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.src).version
