"""A minimal rtnetlink client: just what the plugin's plumbing needs (effects).

Why not pyroute2, which the rest of stockade uses: importing it costs about
190 ms, which is most of a main-mode ADD — the plugin is a process started
once per operation, and that time is a window in which a container waits for
its network. This module speaks the handful of messages the plugin needs
(links, addresses, routes) over one ``NETLINK_ROUTE`` socket, bound to the
network namespace of the thread that opens it, in about a millisecond.

Messages are ``nlmsghdr`` + a fixed header (``ifinfomsg``, ``ifaddrmsg``,
``rtmsg``) + attributes (``rtattr``, 4-byte aligned), as in rtnetlink(7).
A request asks for an ACK; an error answer raises :class:`NetlinkError` with
the kernel's errno. A dump is read until ``NLMSG_DONE``.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_ROUTE = 0
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER = 1, 3, 4, 10
IFLA_LINKINFO, IFLA_NET_NS_FD = 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_NODAD = 0x02
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_TABLE = 1, 4, 5, 6, 15
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
RTN_UNICAST = 1
IFF_UP = 0x1
_ANY4 = "0.0.0.0"  # noqa: S104 - the destination of a default route, not a bind address

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")
_U32 = struct.Struct("=I")


class NetlinkError(OSError):
    """The kernel refused a request; ``errno`` says why."""


def _align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    raw = _RTATTR.pack(_RTATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (_align(len(raw)) - len(raw))


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, _U32.pack(value))


def attr_str(kind: int, text: str) -> bytes:
    return attr(kind, text.encode() + b"\0")


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """Attributes by type (the last one wins; nested ones stay raw)."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, pos)
        if length < _RTATTR.size:
            break
        out[kind & 0x7FFF] = data[pos + _RTATTR.size:pos + length]
        pos += _align(length)
    return out


def _text(raw: bytes | None) -> str:
    return raw.split(b"\0", 1)[0].decode() if raw else ""


def _mac(raw: bytes | None) -> str:
    return ":".join(f"{b:02x}" for b in raw) if raw else ""


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    flags: int
    master: int = 0
    kind: str = ""
    mac: str = ""

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)


@dataclass(frozen=True)
class Address:
    index: int
    family: int
    address: str
    prefixlen: int


@dataclass(frozen=True)
class RouteEntry:
    family: int
    dst: str  # "0.0.0.0/0" for a default route
    gateway: str = ""
    oif: int = 0
    table: int = RT_TABLE_MAIN


def _link(body: bytes) -> Link:
    _, _, index, flags, _ = _IFINFOMSG.unpack_from(body)
    attrs = parse_attrs(body[_IFINFOMSG.size:])
    info = parse_attrs(attrs.get(IFLA_LINKINFO, b""))
    master = _U32.unpack(attrs[IFLA_MASTER])[0] if IFLA_MASTER in attrs else 0
    return Link(index, _text(attrs.get(IFLA_IFNAME)), flags, master,
                _text(info.get(IFLA_INFO_KIND)), _mac(attrs.get(IFLA_ADDRESS)))


def _family_of(text: str) -> int:
    return socket.AF_INET6 if ":" in text else socket.AF_INET


class Rtnl:
    """One socket in the namespace of the thread that made it; a context manager."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    # ---- transport --------------------------------------------------------------------

    def _send(self, kind: int, flags: int, body: bytes) -> int:
        self.seq += 1
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags | NLM_F_REQUEST,
                                self.seq, 0)
        self.sock.sendall(header + body)
        return self.seq

    def _replies(self, seq: int) -> Iterator[tuple[int, bytes]]:
        """Messages answering ``seq`` until the ACK or NLMSG_DONE; errors raise."""
        while True:
            data = self.sock.recv(1 << 17)
            pos = 0
            while pos + _NLMSGHDR.size <= len(data):
                length, kind, _flags, mseq, _ = _NLMSGHDR.unpack_from(data, pos)
                body = data[pos + _NLMSGHDR.size:pos + length]
                pos += _align(length)
                if mseq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0]
                    if code:
                        raise NetlinkError(code, os.strerror(code))
                    return
                yield kind, body

    def request(self, kind: int, flags: int, body: bytes) -> None:
        for _ in self._replies(self._send(kind, flags | NLM_F_ACK, body)):
            pass

    def dump(self, kind: int, body: bytes) -> list[bytes]:
        return [b for _, b in self._replies(self._send(kind, NLM_F_DUMP, body))]

    # ---- links ------------------------------------------------------------------------

    def link(self, name: str) -> Link | None:
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr_str(IFLA_IFNAME, name)
        try:  # with an ACK after the answer, so the reading knows where it ends
            replies = list(self._replies(self._send(RTM_GETLINK, NLM_F_ACK, body)))
        except NetlinkError as exc:
            if exc.errno in (2, 19):  # ENOENT, ENODEV
                return None
            raise
        return _link(replies[0][1]) if replies else None

    def link_by_index(self, index: int) -> Link | None:
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)
        try:
            replies = list(self._replies(self._send(RTM_GETLINK, NLM_F_ACK, body)))
        except NetlinkError as exc:
            if exc.errno in (2, 19):
                return None
            raise
        return _link(replies[0][1]) if replies else None

    def links(self) -> list[Link]:
        return [_link(b) for b in self.dump(RTM_GETLINK,
                                            _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0))]

    def add_bridge(self, name: str) -> None:
        info = attr(IFLA_LINKINFO, attr_str(IFLA_INFO_KIND, "bridge"))
        self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL,
                     _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
                     + attr_str(IFLA_IFNAME, name) + info)

    def add_veth(self, name: str, master: int, peer: str, peer_netns_fd: int,
                 mtu: int | None = None) -> None:
        """The host side up and enslaved to ``master``; the peer (down) in another netns."""
        mtu_attr = attr_u32(IFLA_MTU, mtu) if mtu else b""
        peer_msg = (_IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr_str(IFLA_IFNAME, peer)
                    + attr_u32(IFLA_NET_NS_FD, peer_netns_fd) + mtu_attr)
        info = attr(IFLA_LINKINFO, attr_str(IFLA_INFO_KIND, "veth")
                    + attr(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer_msg)))
        self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL,
                     _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, IFF_UP, IFF_UP)
                     + attr_str(IFLA_IFNAME, name) + attr_u32(IFLA_MASTER, master)
                     + mtu_attr + info)

    def set_up(self, index: int) -> None:
        self.request(RTM_NEWLINK, 0, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, IFF_UP,
                                                     IFF_UP))

    def delete_link(self, index: int) -> None:
        self.request(RTM_DELLINK, 0, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0))

    # ---- addresses --------------------------------------------------------------------

    def addresses(self, index: int) -> list[Address]:
        out = []
        for body in self.dump(RTM_GETADDR, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            family, prefixlen, _, _, ifindex = _IFADDRMSG.unpack_from(body)
            if ifindex != index:
                continue
            attrs = parse_attrs(body[_IFADDRMSG.size:])
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if raw:
                out.append(Address(ifindex, family, socket.inet_ntop(family, raw), prefixlen))
        return out

    def add_address(self, index: int, address: str, prefixlen: int) -> None:
        family = _family_of(address)
        packed = socket.inet_pton(family, address)
        flags = attr_u32(IFA_FLAGS, IFA_F_NODAD) if family == socket.AF_INET6 else b""
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL,
                     _IFADDRMSG.pack(family, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
                     + attr(IFA_LOCAL, packed) + attr(IFA_ADDRESS, packed) + flags)

    # ---- routes -----------------------------------------------------------------------

    def routes(self, family: int) -> list[RouteEntry]:
        out = []
        for body in self.dump(RTM_GETROUTE, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
            fam, dst_len, _, _, table, _, _, _, _ = _RTMSG.unpack_from(body)
            attrs = parse_attrs(body[_RTMSG.size:])
            if RTA_TABLE in attrs:
                table = _U32.unpack(attrs[RTA_TABLE])[0]
            dst = socket.inet_ntop(fam, attrs[RTA_DST]) if RTA_DST in attrs else (
                _ANY4 if fam == socket.AF_INET else "::")
            gw = socket.inet_ntop(fam, attrs[RTA_GATEWAY]) if RTA_GATEWAY in attrs else ""
            oif = _U32.unpack(attrs[RTA_OIF])[0] if RTA_OIF in attrs else 0
            out.append(RouteEntry(fam, f"{dst}/{dst_len}", gw, oif, table))
        return out

    def replace_route(self, dst: str, prefixlen: int, oif: int, gateway: str = "",
                      priority: int | None = None, table: int | None = None) -> None:
        family = _family_of(dst)
        scope = RT_SCOPE_UNIVERSE if gateway else RT_SCOPE_LINK
        body = _RTMSG.pack(family, prefixlen, 0, 0, RT_TABLE_MAIN if table is None or
                           table > 255 else table, RTPROT_BOOT, scope, RTN_UNICAST, 0)
        if prefixlen:
            body += attr(RTA_DST, socket.inet_pton(family, dst))
        if gateway:
            body += attr(RTA_GATEWAY, socket.inet_pton(family, gateway))
        body += attr_u32(RTA_OIF, oif)
        if priority is not None:
            body += attr_u32(RTA_PRIORITY, priority)
        if table is not None:
            body += attr_u32(RTA_TABLE, table)
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body)
