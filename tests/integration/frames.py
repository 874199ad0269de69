"""Frames built byte by byte, for feeding a program (BPF_PROG_TEST_RUN) or a raw socket."""

from __future__ import annotations

import socket
import struct


def mac_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def eth(src_mac: str, ethertype: int, payload: bytes, dst_mac: str = "02" * 6) -> bytes:
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + struct.pack("!H", ethertype) + payload


def tcp4(src: str, dst: str, sport: int, dport: int, flags: int) -> bytes:
    """An IPv4 packet holding a TCP header with `flags` (checksums left 0: the programs
    judge headers, nothing here checks them)."""
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + tcp
