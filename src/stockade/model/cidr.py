"""CIDR and IP parsing as Kubernetes reads them.

The API server parses ipBlock CIDRs with k8s.io/utils' ParseCIDRSloppy, a copy of
Go 1.16's net.ParseCIDR kept for compatibility: IPv4 octets may have leading
zeros (read as decimal), the prefix length may too, IPv6 groups may have more
than four hex digits if their value fits, and host bits past the prefix are
masked off. This module ports that parser byte for byte rather than leaning on
`ipaddress`, whose grammar differs (zone ids, netmask prefixes, Unicode digits),
so that what validates here is exactly what the API server accepts.

StrictIPCIDRValidation adds netip.ParsePrefix's stricter reading on top
(`strict_cidr_problems`); without the gate the same findings are only warnings
(`cidr_warnings`). Matching always uses the masked network (`parse_cidr`).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

IPV4_LEN = 4
IPV6_LEN = 16
# Go's parsers give up on numbers this large, so absurdly long digit runs fail fast.
_BIG = 0xFFFFFF
_V4_IN_V6_PREFIX = bytes(10) + b"\xff\xff"

INVALID_CIDR = "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"
STRICT_LEADING_ZEROS = "must not have leading 0s in IP or prefix length"
STRICT_V4_MAPPED = "must not have an IPv4-mapped IPv6 address"
STRICT_HOST_BITS = "must not have bits set beyond the prefix length"


def _dtoi(s: str) -> tuple[int, int, bool]:
    """Decimal prefix of s: (number, characters used, ok), as Go's net.dtoi."""
    n = 0
    i = 0
    while i < len(s) and "0" <= s[i] <= "9":
        n = n * 10 + ord(s[i]) - ord("0")
        if n >= _BIG:
            return _BIG, i, False
        i += 1
    return (n, i, i > 0)


def _xtoi(s: str) -> tuple[int, int, bool]:
    """Hexadecimal prefix of s, as Go's net.xtoi."""
    n = 0
    i = 0
    while i < len(s):
        c = s[i]
        if "0" <= c <= "9":
            n = n * 16 + ord(c) - ord("0")
        elif "a" <= c <= "f":
            n = n * 16 + ord(c) - ord("a") + 10
        elif "A" <= c <= "F":
            n = n * 16 + ord(c) - ord("A") + 10
        else:
            break
        if n >= _BIG:
            return 0, i, False
        i += 1
    return (n, i, i > 0)


def _parse_ipv4(s: str) -> bytes | None:
    """Dotted quad with Go 1.16 leniency: leading zeros allowed, read as decimal."""
    out = bytearray()
    for i in range(IPV4_LEN):
        if not s:
            return None
        if i > 0:
            if s[0] != ".":
                return None
            s = s[1:]
        n, c, ok = _dtoi(s)
        if not ok or n > 0xFF:
            return None
        s = s[c:]
        out.append(n)
    return bytes(out) if not s else None


def _parse_ipv6(s: str) -> bytes | None:
    """Go 1.16 parseIPv6, line by line (RFC 4291 text, optional trailing dotted quad)."""
    ip = bytearray(IPV6_LEN)
    ellipsis = -1
    if len(s) >= 2 and s[0] == ":" and s[1] == ":":
        ellipsis = 0
        s = s[2:]
        if not s:
            return bytes(ip)
    i = 0
    while i < IPV6_LEN:
        n, c, ok = _xtoi(s)
        if not ok or n > 0xFFFF:
            return None
        if c < len(s) and s[c] == ".":
            # A trailing dotted quad takes the last four bytes.
            if (ellipsis < 0 and i != IPV6_LEN - IPV4_LEN) or i + IPV4_LEN > IPV6_LEN:
                return None
            ip4 = _parse_ipv4(s)
            if ip4 is None:
                return None
            ip[i:i + IPV4_LEN] = ip4
            s = ""
            i += IPV4_LEN
            break
        ip[i] = n >> 8
        ip[i + 1] = n & 0xFF
        i += 2
        s = s[c:]
        if not s:
            break
        if s[0] != ":" or len(s) == 1:
            return None
        s = s[1:]
        if s[0] == ":":
            if ellipsis >= 0:
                return None
            ellipsis = i
            s = s[1:]
            if not s:
                break
    if s:
        return None
    if i < IPV6_LEN:
        if ellipsis < 0:
            return None
        gap = IPV6_LEN - i
        ip[ellipsis + gap:] = ip[ellipsis:i]
        ip[ellipsis:ellipsis + gap] = bytes(gap)
    elif ellipsis >= 0:
        # An ellipsis must stand for at least one zero group.
        return None
    return bytes(ip)


def parse_ip_sloppy(text: str) -> bytes | None:
    """Go's legacy net.ParseIP: 4 bytes for dotted text, 16 for colon text."""
    for ch in text:
        if ch == ".":
            return _parse_ipv4(text)
        if ch == ":":
            return _parse_ipv6(text)
    return None


def _mask(prefix: int, length: int) -> bytes:
    bits = 8 * length
    return ((1 << bits) - (1 << (bits - prefix))).to_bytes(length, "big")


def _to4(ip: bytes) -> bytes | None:
    """Go's IP.To4: the IPv4 form of a 4-byte or IPv4-mapped 16-byte address."""
    if len(ip) == IPV4_LEN:
        return ip
    if len(ip) == IPV6_LEN and ip[:12] == _V4_IN_V6_PREFIX:
        return ip[12:]
    return None


def go_ip_string(ip: bytes) -> str:
    """Go's IP.String(): dotted for IPv4 and IPv4-mapped, RFC 5952 otherwise."""
    v4 = _to4(ip)
    if v4 is not None:
        return ".".join(str(b) for b in v4)
    return ipaddress.IPv6Address(ip).compressed


@dataclass(frozen=True)
class SloppyCIDR:
    """A CIDR as ParseCIDRSloppy reads it: the address as written and the prefix."""

    address: bytes
    prefix: int

    @property
    def mask(self) -> bytes:
        return _mask(self.prefix, len(self.address))

    @property
    def network(self) -> bytes:
        return bytes(a & m for a, m in zip(self.address, self.mask, strict=True))

    def _number_and_mask(self) -> tuple[bytes, bytes]:
        # Go's networkNumberAndMask: an IPv4-mapped network behaves as IPv4.
        net = self.network
        v4 = _to4(net)
        if v4 is None:
            return net, self.mask
        return v4, self.mask[-IPV4_LEN:]

    def contains(self, ip: bytes) -> bool:
        """Go's IPNet.Contains, including its IPv4-mapped equivalences."""
        number, mask = self._number_and_mask()
        ip = _to4(ip) or ip
        if len(ip) != len(number):
            return False
        return all(n & m == a & m for n, m, a in zip(number, mask, ip, strict=True))

    def go_string(self) -> str:
        """Go's IPNet.String() of the masked network."""
        number, mask = self._number_and_mask()
        ones = int.from_bytes(mask, "big").bit_count()
        return f"{go_ip_string(number)}/{ones}"


@lru_cache(maxsize=65536)
def parse_cidr_sloppy(text: str) -> SloppyCIDR | None:
    """ParseCIDRSloppy: None when the API server would say INVALID_CIDR."""
    addr, slash, prefix_text = text.partition("/")
    if not slash:
        return None
    ip = _parse_ipv4(addr)
    if ip is None:
        ip = _parse_ipv6(addr)
    n, used, ok = _dtoi(prefix_text)
    if ip is None or not ok or used != len(prefix_text) or n > 8 * len(ip):
        return None
    return SloppyCIDR(ip, n)


def _has_leading_zeros(text: str) -> bool:
    """What netip.ParsePrefix rejects among ParseCIDRSloppy's inputs.

    Only numbers written with superfluous zeros differ: a prefix length or IPv4
    octet with a leading 0, or an IPv6 group of more than four hex digits.
    """
    addr, _, prefix = text.partition("/")
    if len(prefix) > 1 and prefix[0] == "0":
        return True
    for group in addr.split(":"):
        if "." in group:
            if any(len(o) > 1 and o[0] == "0" for o in group.split(".")):
                return True
        elif len(group) > 4:
            return True
    return False


def _is_v4_mapped(cidr: SloppyCIDR) -> bool:
    return len(cidr.address) == IPV6_LEN and cidr.address[:12] == _V4_IN_V6_PREFIX


def strict_cidr_problems(text: str) -> list[str]:
    """StrictIPCIDRValidation's extra finding for a parsable CIDR (at most one)."""
    cidr = parse_cidr_sloppy(text)
    if cidr is None:
        return [INVALID_CIDR]
    if _has_leading_zeros(text):
        return [STRICT_LEADING_ZEROS]
    if _is_v4_mapped(cidr):
        return [STRICT_V4_MAPPED]
    if cidr.address != cidr.network:
        return [STRICT_HOST_BITS]
    return []


def cidr_warnings(text: str) -> list[str]:
    """GetWarningsForCIDR's messages (without the leading field path)."""
    cidr = parse_cidr_sloppy(text)
    if cidr is None:
        return []
    out = []
    if cidr.address != cidr.network:
        single = f"{go_ip_string(cidr.address)}/{8 * len(cidr.address)}"
        out.append(f'CIDR value "{text}" is ambiguous in this context '
                   f'(should be "{cidr.go_string()}" or "{single}"?)')
    if _has_leading_zeros(text) or _is_v4_mapped(cidr):
        out.append(f'non-standard CIDR value "{text}" will be considered invalid in a '
                   f'future Kubernetes release: use "{cidr.go_string()}"')
    if not out and len(cidr.address) == IPV6_LEN:
        canonical = f"{go_ip_string(cidr.address)}/{cidr.prefix}"
        if canonical != text:
            out.append(f'IPv6 CIDR value "{text}" should be in RFC 5952 canonical '
                       f'format ("{canonical}")')
    return out


def is_strict_subset(outer: SloppyCIDR, inner: SloppyCIDR) -> bool:
    """ValidateIPBlock's test for an except entry: inside cidr and narrower."""
    return outer.contains(inner.network) and outer.prefix < inner.prefix


@lru_cache(maxsize=65536)
def parse_cidr(text: str) -> Network | None:
    """The network a CIDR denotes (legacy-lenient), or None if it is not a CIDR."""
    cidr = parse_cidr_sloppy(text)
    if cidr is None:
        return None
    number = int.from_bytes(cidr.network, "big")
    if len(cidr.address) == IPV4_LEN:
        return ipaddress.IPv4Network((number, cidr.prefix))
    return ipaddress.IPv6Network((number, cidr.prefix))


def is_canonical_ipv4(text: str) -> bool:
    """Four decimal octets 0-255 without leading zeros: then `str(parse_ip(text)) == text`.

    ~0.4 µs where the legacy-lenient `parse_ip` takes ~5 µs past its cache (which
    100,000 pods overflow); anything else is for `parse_ip` to judge.
    """
    return _CANONICAL_IPV4(text) is not None


_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_IPV4 = re.compile(f"{_OCTET}(?:\\.{_OCTET}){{3}}", re.ASCII).fullmatch


def ip_version(text: str) -> int | None:
    """4 or 6 for an IP address as `parse_ip` reads it, None for anything else."""
    if is_canonical_ipv4(text):
        return 4
    ip = parse_ip(text)
    return None if ip is None else ip.version


@lru_cache(maxsize=65536)
def parse_ip(text: str) -> Address | None:
    """An IP address (legacy-lenient, as ParseIPSloppy), or None."""
    ip = parse_ip_sloppy(text)
    if ip is None:
        return None
    if len(ip) == IPV4_LEN:
        return ipaddress.IPv4Address(ip)
    return ipaddress.IPv6Address(ip)


def next_hop_problem(text: str) -> str:
    """Why ``text`` cannot be a host's address that other hosts route its pods to ("" if
    it can): a unicast IPv4 address in its plain form (`--host-address`, and the host
    records of etcd/hosts.py, which anything may write)."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return f"{text!r} is not an IP address"
    if ip.version != 4 or ip.is_unspecified or ip.is_loopback or ip.is_multicast or \
            ip.is_link_local or ip == ipaddress.IPv4Address("255.255.255.255"):
        return (f"{text!r}: give this host's unicast IPv4 address that the other hosts "
                "reach (routes between hosts are IPv4)")
    return ""
