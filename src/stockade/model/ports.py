"""The one text form of a port on the command line (pure).

    [NAME=]PORT[/PROTOCOL]      80, 80/udp, http, dns/udp, http=8080/tcp
    PROTOCOL:PORT               tcp:80 (the probe wire form; also accepted)

PORT is a number from 1 to 65535 or a port name (an IANA service name, as
container ports are named); PROTOCOL is tcp, udp or sctp in any case. `NAME=`
names a port being declared (`stockade run -p http=8080/tcp`). Every command
that reads a port reads it here, then says which parts it allows.
"""

from __future__ import annotations

from dataclasses import dataclass

from stockade.model.names import is_valid_port_name
from stockade.model.policy import PROTOCOLS, TCP


@dataclass(frozen=True)
class PortText:
    port: int | str  # a number, or a port name
    protocol: str | None = None  # TCP, UDP or SCTP when given
    name: str = ""  # NAME= when given

    @property
    def proto(self) -> str:
        """The protocol, TCP when none was given."""
        return self.protocol or TCP


def parse_port_text(text: str, *, named: bool = False, numeric: bool = False,
                    protocol: bool = True) -> PortText:
    """Read a port; ValueError saying what is wrong (the caller names the flag).

    `named`: `NAME=` may be given; `numeric`: PORT must be a number;
    `protocol`: a protocol may be given.
    """
    want = ("[NAME=]" if named else "") + ("NUMBER" if numeric else "PORT|NAME") + (
        "[/PROTOCOL]" if protocol else "")
    name, sep, rest = text.partition("=")
    if not sep:
        name, rest = "", text
    elif not named:
        raise ValueError(f"want {want}")
    elif problems := is_valid_port_name(name):
        raise ValueError(f"name {name!r} {problems[0]}")
    parts = rest.replace(":", "/").split("/")
    if len(parts) > 2 or not all(parts):
        raise ValueError(f"want {want}, e.g. 80/tcp")
    proto: str | None = None
    if len(parts) == 2:
        first, second = parts
        # tcp:80 or 80/tcp: the protocol is whichever part names one
        port, proto = (second, first) if first.upper() in PROTOCOLS else (first, second)
        proto = proto.upper()
        if proto not in PROTOCOLS:
            raise ValueError("the protocol must be tcp, udp or sctp")
        if not protocol:
            raise ValueError("give the protocol on its own (--protocol)")
    else:
        port = parts[0]
    if port.isdigit():
        number = int(port)
        if not 1 <= number <= 65535:
            raise ValueError("must be between 1 and 65535")
        return PortText(number, proto, name)
    if numeric:
        raise ValueError(f"want {want}, e.g. 8080/tcp")
    if problems := is_valid_port_name(port):
        raise ValueError(f"not a port number, and as a port name it "
                         f"{problems[0]}")
    return PortText(port, proto, name)
