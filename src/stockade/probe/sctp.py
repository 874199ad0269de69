"""SCTP for probes: the kernel's, or a raw-socket stand-in where the kernel has none.

Probing SCTP policy needs an SCTP handshake between two namespaces. With a
kernel built with ``CONFIG_IP_SCTP`` the probes use real one-to-one sockets
(``SOCK_STREAM``, ``IPPROTO_SCTP``). Kernels without it (the reference VM's
6.18 is one: ``socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP)`` fails with
EPROTONOSUPPORT) still route, filter and conntrack SCTP packets — nftables'
``sctp dport`` and ``nf_conntrack_proto_sctp`` do not need the SCTP stack — so
the probes then speak the first half of the handshake themselves over raw IP
sockets (protocol 132):

* the client sends an ``INIT`` (verification tag 0, a random initiate tag);
* the server, holding a raw socket in the destination namespace, answers an
  ``INIT`` for one of its ports with an ``INIT ACK`` carrying the client's tag;
* the client counts the matching ``INIT ACK`` as "allowed".

Packets carry a correct CRC32c, because conntrack verifies it at prerouting.
A raw socket that takes a packet also stops the kernel from answering with
"protocol unreachable", so the stand-in is invisible on the wire.

Public API::

    sctp_mode() -> "native" | "raw" | "unavailable"
    crc32c(data) -> int
    Chunk type constants; build_init / build_init_ack / build_abort; parse_packet
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass
from functools import cache
from typing import Literal

IPPROTO_SCTP = 132
INIT = 1
INIT_ACK = 2
ABORT = 6

Mode = Literal["native", "raw", "unavailable"]


@cache
def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


def crc32c(data: bytes) -> int:
    """CRC32c (Castagnoli), the SCTP checksum; crc32c(b"123456789") == 0xE3069283."""
    table = _crc_table()
    crc = 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


@cache
def sctp_mode() -> Mode:
    """How this kernel lets us probe SCTP; the same answer in every namespace."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_SCTP).close()
        return "native"
    except OSError as exc:
        if exc.errno not in (errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT, errno.EAFNOSUPPORT):
            raise
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_SCTP).close()
        return "raw"
    except OSError:
        return "unavailable"


def _packet(sport: int, dport: int, vtag: int, chunk: bytes) -> bytes:
    header = struct.pack("!HHII", sport, dport, vtag, 0)
    checksum = crc32c(header + chunk)
    # The checksum field holds the CRC in little-endian byte order (RFC 9260 App. A).
    return header[:8] + struct.pack("<I", checksum) + chunk


def _init_body(tag: int) -> bytes:
    # initiate tag, a_rwnd, outbound streams, inbound streams, initial TSN
    return struct.pack("!IIHHI", tag, 65536, 1, 1, tag)


def build_init(sport: int, dport: int, tag: int) -> bytes:
    """An INIT chunk from ``sport`` to ``dport`` asking the peer to use ``tag``."""
    body = _init_body(tag)
    return _packet(sport, dport, 0, struct.pack("!BBH", INIT, 0, 4 + len(body)) + body)


def build_init_ack(sport: int, dport: int, peer_tag: int, tag: int) -> bytes:
    """The INIT ACK answering an INIT that carried ``peer_tag``; has a dummy state cookie."""
    cookie = struct.pack("!HH", 7, 8) + struct.pack("!I", tag)
    body = _init_body(tag) + cookie
    return _packet(sport, dport, peer_tag, struct.pack("!BBH", INIT_ACK, 0, 4 + len(body)) + body)


def build_abort(sport: int, dport: int, peer_tag: int) -> bytes:
    """An ABORT, the answer to an INIT for a port nobody serves."""
    return _packet(sport, dport, peer_tag, struct.pack("!BBH", ABORT, 0, 4))


@dataclass(frozen=True)
class Packet:
    """The fields of an SCTP packet's first chunk that probes need."""

    sport: int
    dport: int
    vtag: int
    chunk: int
    initiate_tag: int  # INIT / INIT ACK only, else 0


def parse_packet(data: bytes) -> Packet | None:
    """Decode an SCTP packet (no IP header); None if malformed or the CRC is wrong."""
    if len(data) < 16:
        return None
    sport, dport, vtag = struct.unpack_from("!HHI", data)
    (checksum,) = struct.unpack_from("<I", data, 8)
    if crc32c(data[:8] + b"\0\0\0\0" + data[12:]) != checksum:
        return None
    chunk, _flags, length = struct.unpack_from("!BBH", data, 12)
    tag = 0
    if chunk in (INIT, INIT_ACK) and length >= 20 and len(data) >= 20:
        (tag,) = struct.unpack_from("!I", data, 16)
    return Packet(sport, dport, vtag, chunk, tag)


def strip_ipv4_header(data: bytes) -> bytes:
    """Raw IPv4 sockets deliver the IP header too; raw IPv6 sockets do not."""
    if not data:
        return data
    return data[(data[0] & 0x0F) * 4 :]
