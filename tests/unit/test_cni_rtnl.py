"""The pure parts of the plugin's netlink and ARP encoding, and a read of the real kernel."""

from __future__ import annotations

import socket
import struct

from stockade import netlink
from stockade.net import rtnl
from stockade.net.announce import gratuitous_arp


def test_attributes_are_padded_and_parse_back() -> None:
    raw = netlink.attr_str(rtnl.IFLA_IFNAME, "eth0") + netlink.attr_u32(rtnl.IFLA_MTU, 1500) + \
        netlink.attr(rtnl.IFLA_LINKINFO, netlink.attr_str(rtnl.IFLA_INFO_KIND, "veth"))
    assert len(raw) % 4 == 0
    attrs = rtnl.parse_attrs(raw)
    assert attrs[rtnl.IFLA_IFNAME] == b"eth0\0"
    assert struct.unpack("=I", attrs[rtnl.IFLA_MTU]) == (1500,)
    assert rtnl.parse_attrs(attrs[rtnl.IFLA_LINKINFO])[rtnl.IFLA_INFO_KIND] == b"veth\0"
    assert rtnl.parse_attrs(b"\x02\x00") == {}  # a truncated attribute is ignored


def test_gratuitous_arp_frame() -> None:
    frame = gratuitous_arp("02:00:00:00:00:01", "10.244.0.5")
    assert len(frame) == 42
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == bytes.fromhex("020000000001")
    assert frame[12:14] == b"\x08\x06"
    sender_ip, target_ip = frame[28:32], frame[38:42]
    assert sender_ip == target_ip == socket.inet_aton("10.244.0.5")


def test_reading_links_addresses_and_routes_of_this_namespace() -> None:
    with rtnl.Rtnl() as nl:
        lo = nl.link("lo")
        assert lo is not None and lo.index == 1 and lo.up
        assert nl.link("no-such-link0") is None
        assert any(link.name == "lo" for link in nl.links())
        assert nl.link_by_index(lo.index) == lo
        assert any(a.address == "127.0.0.1" for a in nl.addresses(lo.index))
        assert isinstance(nl.routes(socket.AF_INET), list)


def _bridge_message(data: bytes) -> bytes:
    info = netlink.attr_str(rtnl.IFLA_INFO_KIND, "bridge") + data
    return (rtnl._IFINFOMSG.pack(socket.AF_UNSPEC, 0, 7, 0, 0)
            + netlink.attr_str(rtnl.IFLA_IFNAME, "br0")
            + netlink.attr(rtnl.IFLA_LINKINFO, info))


def test_a_bridge_says_whether_it_filters_vlans() -> None:
    """IFLA_BR_VLAN_FILTERING in the bridge's link info (this kernel may lack the option,
    so the message is made here): on, off, or not said (off)."""
    def data(value: bytes) -> bytes:
        return netlink.attr(rtnl.IFLA_INFO_DATA,
                            netlink.attr(rtnl.IFLA_BR_VLAN_FILTERING, value))

    assert rtnl._link(_bridge_message(data(b"\x01"))).vlan_filtering
    assert not rtnl._link(_bridge_message(data(b"\x00"))).vlan_filtering
    link = rtnl._link(_bridge_message(b""))
    assert link.kind == "bridge" and link.name == "br0" and not link.vlan_filtering
