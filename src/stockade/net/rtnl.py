"""Bridge, veth, addresses and routes over rtnetlink: the one plumbing layer (effects).

Both the container manager (:class:`stockade.net.plumber.Plumber`, behind
``stockade run``) and the CNI plugin (:mod:`stockade.cni.attach`) plumb
through this module: a :class:`Rtnl` socket (links, addresses, routes) and
the ensure steps they share (:func:`ensure_bridge`, :func:`ensure_addresses`,
:func:`delete_link`). The bridge-netfilter sysctls enforcement needs are set
by :func:`stockade.net.sysctl.ensure_bridge_netfilter`.

Why not pyroute2 (which the Plumber used before): measured on this project's
2-core CI machine (pyroute2 0.9.7, ``python -X importtime``, best of 10, fresh
interpreters), importing ``pyroute2`` costs ~150 ms, and
``stockade.net.plumber`` went from ~144 ms over pyroute2 to ~52 ms over this
module (~28 ms of it stdlib modules the plugin imports anyway); for the CNI
plugin, a process started once per ADD while the container waits for its
network, that would be most of an ADD. Nor is pyroute2 faster at the work
itself: ``bench/plumbing.py``-style A/B of the Plumber (30 endpoints x 6
rounds, alternating, ms per endpoint, best / median)::

                        create        ensure again   remove
    over this module    27.4 / 29.1   25.9 / 27.5    32.2 / 32.9
    over pyroute2       35.3 / 37.0   30.7 / 33.5    31.6 / 32.2

(removal is the kernel's RCU grace period per veth either way). So pyroute2
is no longer a dependency.

One socket is bound to the network namespace of the thread that opens it
(enter the namespace with :func:`stockade.net.namespace.entered` first).
Messages are ``nlmsghdr`` + a fixed header (``ifinfomsg``, ``ifaddrmsg``,
``rtmsg``) + attributes, as in rtnetlink(7), framed by :mod:`stockade.netlink`.
A request asks for an ACK; an error answer raises
:class:`stockade.netlink.NetlinkError` (an OSError) with the kernel's errno.
A dump is read until ``NLMSG_DONE``.

Public API::

    Link(index, name, flags, master=0, kind="", mac="", peer=0)   .up
    Address(index, family, address, prefixlen)            .interface
    RouteEntry(family, dst, gateway="", oif=0, table=254)
    Rtnl()  (context manager): .link(name) .link_by_index(i) .links()  .batch(tolerate=())
        .add_bridge(name) .add_veth(name, master, peer, peer_netns_fd, mtu=None)
        .set_up(i) .set_master(i, master) .delete_link(i)
        .addresses(i) .add_address(i, address, prefixlen) .delete_address(i, address, prefixlen)
        .routes(family) .replace_route(dst, prefixlen, oif, gateway="", priority=None, table=None)
        .filters(i, parent) -> [TcFilter(pref, kind, handle, program)]   (tc filter show)
        .add_clsact(i) .replace_bpf_filter(i, parent, pref, handle, program_fd, name)
        .delete_filters(i, parent, pref)
    KeptRtnl(netns)  .links()  .call(fn of an Rtnl)  .close()    (kept open in a namespace)
    ensure_bridge(nl, name) -> Link                       (made if missing, up)
    ensure_addresses(nl, index, wanted, exclusive=False)  (ipaddress interfaces)
    delete_link(nl, name) -> bool                         (False: it was gone)
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from stockade.errors import NetError
from stockade.net.namespace import entered, netns_path
from stockade.netlink import (
    NETLINK_ROUTE,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    NetlinkError,
    NetlinkMessage,
    attr,
    attr_map,
    attr_str,
    attr_u32,
    drained,
    error_code,
    iter_messages,
    message,
    replies,
    text,
    u32,
)

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
RTM_NEWQDISC = 36
RTM_NEWTFILTER, RTM_DELTFILTER, RTM_GETTFILTER = 44, 45, 46

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_MASTER = 1, 3, 4, 5, 10
IFLA_LINKINFO, IFLA_NET_NS_FD = 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_BR_VLAN_FILTERING = 7
VETH_INFO_PEER = 1
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_NODAD = 0x02
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_TABLE = 1, 4, 5, 6, 15
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS, TCA_BPF_ID = 6, 7, 8, 11
TCA_BPF_FLAG_ACT_DIRECT = 1
# the clsact qdisc (TC_H_CLSACT) and its handle, and its two hooks as a filter's parent:
# TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS / TC_H_MIN_EGRESS)
TC_H_CLSACT, CLSACT_HANDLE = 0xFFFFFFF1, 0xFFFF0000
CLSACT_INGRESS, CLSACT_EGRESS = 0xFFFFFFF2, 0xFFFFFFF3
# a filter of every protocol (tc's default): ETH_P_ALL in network order, in the low
# half of tcm_info
ETH_P_ALL_NET = socket.htons(0x0003)
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
RTN_UNICAST = 1
IFF_UP = 0x1
_ANY4 = "0.0.0.0"  # noqa: S104 - the destination of a default route, not a bind address
_GONE = (errno.ENOENT, errno.ENODEV)

_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_TCMSG = struct.Struct("=BxHiIII")  # family, pads, ifindex, handle, parent, info

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
T = TypeVar("T")

def parse_attrs(data: bytes) -> dict[int, bytes]:
    """Attributes by type (the last one wins; nested ones stay raw; a truncated one ends)."""
    return attr_map(data, strict=False)


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
    peer: int = 0  # IFLA_LINK: a veth's other end (an index in the namespace it is in)
    vlan_filtering: bool = False  # a bridge's: it forwards by VLAN as well as by MAC

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)


@dataclass(frozen=True)
class Address:
    index: int
    family: int
    address: str
    prefixlen: int

    @property
    def interface(self) -> Interface:
        return ipaddress.ip_interface(f"{self.address}/{self.prefixlen}")


@dataclass(frozen=True)
class RouteEntry:
    family: int
    dst: str  # "0.0.0.0/0" for a default route
    gateway: str = ""
    oif: int = 0
    table: int = RT_TABLE_MAIN


@dataclass(frozen=True)
class TcFilter:
    """A tc filter as a dump gives it: one message per filter, and one per list of
    filters of a priority (their head: no handle, no options)."""

    pref: int
    kind: str
    handle: int = 0
    program: int = 0  # a bpf filter's program id


def _tc_filter(body: bytes) -> TcFilter:
    _, _, _, handle, _, info = _TCMSG.unpack_from(body)
    attrs = parse_attrs(body[_TCMSG.size:])
    kind = text(attrs.get(TCA_KIND))
    options = parse_attrs(attrs.get(TCA_OPTIONS, b"")) if kind == "bpf" else {}
    program = u32(options[TCA_BPF_ID]) if TCA_BPF_ID in options else 0
    return TcFilter(info >> 16, kind, handle, program)


def _link(body: bytes) -> Link:
    _, _, index, flags, _ = _IFINFOMSG.unpack_from(body)
    attrs = parse_attrs(body[_IFINFOMSG.size:])
    info = parse_attrs(attrs.get(IFLA_LINKINFO, b""))
    master = u32(attrs[IFLA_MASTER]) if IFLA_MASTER in attrs else 0
    peer = u32(attrs[IFLA_LINK]) if IFLA_LINK in attrs else 0
    kind = text(info.get(IFLA_INFO_KIND))
    filtering = kind == "bridge" and parse_attrs(info.get(IFLA_INFO_DATA, b"")).get(
        IFLA_BR_VLAN_FILTERING, b"\0")[:1] != b"\0"
    return Link(index, text(attrs.get(IFLA_IFNAME)), flags, master, kind,
                _mac(attrs.get(IFLA_ADDRESS)), peer if peer != index else 0, filtering)


def _family_of(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)


class Rtnl:
    """One socket in the namespace of the thread that made it; a context manager."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0
        self._queued: list[tuple[int, int, bytes]] | None = None  # inside batch()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    # ---- transport --------------------------------------------------------------------

    def _recv(self) -> bytes:
        return self.sock.recv(1 << 17)

    def _send(self, kind: int, flags: int, body: bytes) -> int:
        self.seq += 1
        self.sock.sendall(message(kind, flags | NLM_F_REQUEST, self.seq, body))
        return self.seq

    def _replies(self, seq: int) -> Iterator[NetlinkMessage]:
        """Messages answering ``seq`` until the ACK or NLMSG_DONE; errors raise."""
        return replies(self._recv, seq)

    def request(self, kind: int, flags: int, body: bytes) -> None:
        if self._queued is not None:
            self._queued.append((kind, flags, body))
            return
        for _ in self._replies(self._send(kind, flags | NLM_F_ACK, body)):
            pass

    @contextlib.contextmanager
    def batch(self, tolerate: Collection[int] = ()) -> Iterator[None]:
        """The requests made inside go to the kernel in one write when the block ends.

        Only the last asks for an ACK (a failing one is answered all the same), so
        the answers take one read, not one each. The kernel carries out every request
        of the batch, in order, whichever fails: batch only what may all be done.
        The first error not in ``tolerate`` (errnos) raises once all are answered.
        """
        self._queued = []
        try:
            yield
            queued = self._queued
        finally:
            self._queued = None
        if not queued:
            return
        data = b""
        for i, (kind, flags, body) in enumerate(queued):
            self.seq += 1
            ack = NLM_F_ACK if i == len(queued) - 1 else 0
            data += message(kind, flags | ack | NLM_F_REQUEST, self.seq, body)
        first, last = self.seq - len(queued) + 1, self.seq
        self.sock.sendall(data)
        failed = 0
        while True:
            for msg in iter_messages(self._recv()):
                if msg.kind != NLMSG_ERROR or not first <= msg.seq <= last:
                    continue
                code = error_code(msg)
                if code and code not in tolerate and not failed:
                    failed = code
                if msg.seq == last:
                    if failed:
                        raise NetlinkError(failed)
                    return

    def dump(self, kind: int, body: bytes) -> list[bytes]:
        return [m.payload for m in self._replies(self._send(kind, NLM_F_DUMP, body))]

    # ---- links ------------------------------------------------------------------------

    def _get_link(self, body: bytes) -> Link | None:
        # No ACK asked: the kernel answers a GETLINK with exactly one message, the link or
        # an error, so one read suffices (an ACK would cost a second one).
        seq = self._send(RTM_GETLINK, 0, body)
        while True:
            for msg in iter_messages(self._recv()):
                if msg.seq != seq:
                    continue
                if msg.kind == NLMSG_ERROR:
                    code = error_code(msg)
                    if code in _GONE or not code:
                        return None
                    raise NetlinkError(code)
                return _link(msg.payload)

    def link(self, name: str) -> Link | None:
        return self._get_link(_ifinfo() + attr_str(IFLA_IFNAME, name))

    def link_by_index(self, index: int) -> Link | None:
        return self._get_link(_ifinfo(index))

    def links(self) -> list[Link]:
        return [_link(b) for b in self.dump(RTM_GETLINK, _ifinfo())]

    def filters(self, index: int, parent: int) -> list[TcFilter]:
        """The tc filters of a link's hook (`CLSACT_INGRESS`, `CLSACT_EGRESS`): what
        `tc filter show dev DEV ingress` lists, without a process per question (none
        when the link has no clsact qdisc)."""
        body = _TCMSG.pack(socket.AF_UNSPEC, 0, index, 0, parent, 0)
        return [_tc_filter(b) for b in self.dump(RTM_GETTFILTER, body)]

    def add_clsact(self, index: int) -> None:
        """`tc qdisc add dev DEV clsact` (EEXIST when it is there)."""
        body = (_TCMSG.pack(socket.AF_UNSPEC, 0, index, CLSACT_HANDLE, TC_H_CLSACT, 0)
                + attr_str(TCA_KIND, "clsact"))
        self.request(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL, body)

    def replace_bpf_filter(self, index: int, parent: int, pref: int, handle: int,
                           program_fd: int, name: str) -> None:
        """`tc filter replace dev DEV ingress|egress pref P handle H bpf direct-action
        fd F`: made, or switched to the program in one step when it is there."""
        options = (attr_u32(TCA_BPF_FD, program_fd) + attr_str(TCA_BPF_NAME, name)
                   + attr_u32(TCA_BPF_FLAGS, TCA_BPF_FLAG_ACT_DIRECT))
        body = (_TCMSG.pack(socket.AF_UNSPEC, 0, index, handle, parent,
                            (pref << 16) | ETH_P_ALL_NET)
                + attr_str(TCA_KIND, "bpf") + attr(TCA_OPTIONS, options))
        self.request(RTM_NEWTFILTER, NLM_F_CREATE, body)

    def delete_filters(self, index: int, parent: int, pref: int) -> None:
        """`tc filter del dev DEV ingress|egress pref P`: every filter of that priority."""
        self.request(RTM_DELTFILTER, 0,
                     _TCMSG.pack(socket.AF_UNSPEC, 0, index, 0, parent, pref << 16))

    def add_bridge(self, name: str) -> None:
        info = attr(IFLA_LINKINFO, attr_str(IFLA_INFO_KIND, "bridge"))
        self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL,
                     _ifinfo() + attr_str(IFLA_IFNAME, name) + info)

    def add_veth(self, name: str, master: int, peer: str, peer_netns_fd: int,
                 mtu: int | None = None, peer_mac: str = "") -> None:
        """The host side up and enslaved to ``master``; the peer (down) in another netns,
        with ``peer_mac`` when given (the MAC its port is bound to, chosen before)."""
        mtu_attr = attr_u32(IFLA_MTU, mtu) if mtu else b""
        mac_attr = attr(IFLA_ADDRESS, bytes.fromhex(peer_mac.replace(":", ""))) \
            if peer_mac else b""
        peer_msg = (_ifinfo() + attr_str(IFLA_IFNAME, peer)
                    + attr_u32(IFLA_NET_NS_FD, peer_netns_fd) + mtu_attr + mac_attr)
        info = attr(IFLA_LINKINFO, attr_str(IFLA_INFO_KIND, "veth")
                    + attr(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer_msg)))
        self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL,
                     _ifinfo(0, IFF_UP, IFF_UP) + attr_str(IFLA_IFNAME, name)
                     + attr_u32(IFLA_MASTER, master) + mtu_attr + info)

    def set_up(self, index: int) -> None:
        self.request(RTM_NEWLINK, 0, _ifinfo(index, IFF_UP, IFF_UP))

    def set_master(self, index: int, master: int) -> None:
        """Enslave the link to ``master`` and bring it up."""
        self.request(RTM_NEWLINK, 0, _ifinfo(index, IFF_UP, IFF_UP)
                     + attr_u32(IFLA_MASTER, master))

    def delete_link(self, index: int) -> None:
        self.request(RTM_DELLINK, 0, _ifinfo(index))

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

    def _address(self, kind: int, flags: int, index: int, address: str,
                 prefixlen: int) -> None:
        family = _family_of(address)
        packed = socket.inet_pton(family, address)
        nodad = attr_u32(IFA_FLAGS, IFA_F_NODAD) if (
            family == socket.AF_INET6 and kind == RTM_NEWADDR) else b""
        self.request(kind, flags,
                     _IFADDRMSG.pack(family, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
                     + attr(IFA_LOCAL, packed) + attr(IFA_ADDRESS, packed) + nodad)

    def add_address(self, index: int, address: str, prefixlen: int) -> None:
        """Add an address; IPv6 ones without duplicate address detection (usable at once)."""
        self._address(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, index, address, prefixlen)

    def delete_address(self, index: int, address: str, prefixlen: int) -> None:
        self._address(RTM_DELADDR, 0, index, address, prefixlen)

    # ---- routes -----------------------------------------------------------------------

    def routes(self, family: int) -> list[RouteEntry]:
        out = []
        for body in self.dump(RTM_GETROUTE, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
            fam, dst_len, _, _, table, _, _, _, _ = _RTMSG.unpack_from(body)
            attrs = parse_attrs(body[_RTMSG.size:])
            if RTA_TABLE in attrs:
                table = u32(attrs[RTA_TABLE])
            dst = socket.inet_ntop(fam, attrs[RTA_DST]) if RTA_DST in attrs else (
                _ANY4 if fam == socket.AF_INET else "::")
            gw = socket.inet_ntop(fam, attrs[RTA_GATEWAY]) if RTA_GATEWAY in attrs else ""
            oif = u32(attrs[RTA_OIF]) if RTA_OIF in attrs else 0
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


# ---- the ensure steps both plumbers take ----------------------------------------------------


def ensure_bridge(nl: Rtnl, name: str) -> Link:
    """The bridge ``name`` exists and is up; made if missing (another maker's EEXIST is fine)."""
    link = nl.link(name)
    if link is None:
        try:
            nl.add_bridge(name)
        except NetlinkError as exc:
            if exc.errno != errno.EEXIST:  # made meanwhile by another process
                raise
        link = nl.link(name)
        if link is None:
            raise NetError(f"bridge {name} vanished after creation")
    if not link.up:
        nl.set_up(link.index)
    return link


def ensure_addresses(nl: Rtnl, index: int, wanted: Sequence[Interface],
                     exclusive: bool = False) -> None:
    """Add the missing addresses; with ``exclusive`` also drop global ones not wanted.

    Stale addresses go first: deleting a primary IPv4 address also deletes the
    secondaries of its subnet, which would take a just-added replacement along.
    Link-local addresses are never touched: the kernel owns them. IPv6 ones are
    added with ``nodad`` so they are usable at once instead of after the ~1 s of
    duplicate address detection. An address added meanwhile (EEXIST) is fine.
    """
    present = {a.interface for a in nl.addresses(index)}
    present = {p for p in present if not p.ip.is_link_local}
    if exclusive:
        for item in present - set(wanted):
            nl.delete_address(index, str(item.ip), item.network.prefixlen)
    for item in wanted:
        if item in present:
            continue
        try:
            nl.add_address(index, str(item.ip), item.network.prefixlen)
        except NetlinkError as exc:
            if exc.errno != errno.EEXIST:
                raise


def delete_link(nl: Rtnl, name: str) -> bool:
    """Delete the link called ``name``; False when it was not there (or went meanwhile)."""
    link = nl.link(name)
    if link is None:
        return False
    try:
        nl.delete_link(link.index)
    except NetlinkError as exc:
        if exc.errno not in _GONE:
            raise
        return False
    return True


# rtnetlink's multicast group of link changes, as the mask `bind` takes (RTMGRP_LINK)
RTMGRP_LINK = 1


class KeptRtnl:
    """The links of a network namespace, for a caller that asks again and again (the
    eBPF datapath lists its bridge ports at every apply). Listed again only when the
    kernel has said a link changed since (a socket on rtnetlink's group of link
    changes, drained without decoding): a listing decodes every attribute of every
    link, 4.6 ms at 100 bridge ports. The sockets are kept open in the namespace
    (entering it and opening one cost more than a dump: 111 against 31 µs), and made
    again when its name comes to stand for another namespace (its file's inode), and
    after a request that failed (half an answer must not meet the next request).
    Thread-safe."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns  # None: the namespace of the thread that first asks
        self._lock = threading.Lock()
        self._nl: Rtnl | None = None
        self._events: socket.socket | None = None  # the group of link changes
        self._listed: tuple[Link, ...] | None = None  # the last listing, until a change
        self._made_in: tuple[int, int] | None = None

    def _namespace(self) -> tuple[int, int] | None:
        if self.netns is None:
            return None
        path = self.netns if self.netns.startswith("/") else netns_path(self.netns)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise NetError(f"network namespace {self.netns!r} does not exist") from None
        return st.st_dev, st.st_ino

    def links(self) -> tuple[Link, ...]:
        """The namespace's links: the same tuple while none changed (a caller may keep
        what it works out from them until it gets another)."""
        where = self._namespace()
        with self._lock:
            if self._nl is None or self._events is None or where != self._made_in:
                self._open()
                self._made_in = where
            # drained before the dump: a change during it is read at the next call
            elif not drained(self._event) and self._listed is not None:
                return self._listed
            assert self._nl is not None
            try:
                self._listed = tuple(self._nl.links())
            except BaseException:
                self._drop()
                raise
            return self._listed

    def call(self, fn: Callable[[Rtnl], T]) -> T:
        """`fn` of the kept socket, in the namespace (tc's filters: never cached, as a
        filter's change says nothing on the link group). The kernel's refusal leaves
        the socket as it was; anything else makes it anew at the next call."""
        where = self._namespace()
        with self._lock:
            if self._nl is None or where != self._made_in:
                self._open()
                self._made_in = where
            assert self._nl is not None
            try:
                return fn(self._nl)
            except NetlinkError:
                raise
            except BaseException:
                self._drop()
                raise

    def _event(self) -> bytes:
        assert self._events is not None
        return self._events.recv(1 << 16)

    def _open(self) -> None:
        """Both sockets in the namespace, the group's bound before the first dump."""
        self._drop()
        with entered(self.netns):
            events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   NETLINK_ROUTE)
            try:
                events.bind((0, RTMGRP_LINK))
                events.setblocking(False)
                self._nl = Rtnl()
            except BaseException:
                events.close()
                raise
        self._events = events

    def _drop(self) -> None:
        if self._nl is not None:
            self._nl.close()
            self._nl = None
        if self._events is not None:
            self._events.close()
            self._events = None
        self._listed = None

    def close(self) -> None:
        with self._lock:
            self._drop()
