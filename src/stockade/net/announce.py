"""Gratuitous ARP: tell the link that an address now lives at this MAC.

Addresses are reused: IPAM hands a released address to the next container, and
a test or a restart re-addresses an endpoint. Neighbours keep the old MAC in
their ARP caches for tens of seconds, so until then their packets go to the
wrong place. An ARP request for one's own address ("gratuitous") makes every
host on the bridge that knows the address update its entry at once, as the
reference CNI bridge plugin does.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from stockade.errors import NetError
from stockade.net.namespace import entered

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6


def gratuitous_arp(mac: str, address: str) -> bytes:
    """The Ethernet frame of a gratuitous ARP request for `address` at `mac` (pure)."""
    hw = bytes.fromhex(mac.replace(":", ""))
    ip = ipaddress.IPv4Address(address).packed
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + hw + ip + b"\0" * 6 + ip
    return BROADCAST + hw + struct.pack("!H", ETH_P_ARP) + arp


def announce(netns: str | None, ifname: str, mac: str, address: str, count: int = 2) -> None:
    """Send gratuitous ARP for an IPv4 address from an interface inside `netns`."""
    frame = gratuitous_arp(mac, address)
    try:
        with entered(netns):
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        with sock:
            sock.bind((ifname, 0))
            for _ in range(count):
                sock.send(frame)
    except OSError as exc:
        raise NetError(f"cannot announce {address} on {ifname} in {netns}: {exc}") from exc
