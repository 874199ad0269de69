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


def test_a_tc_filter_dump_message_decodes_to_its_priority_and_program() -> None:
    # as the kernel writes them (tcf_fill_node): a list's head, then each filter of it
    def message(handle: int, kind: str, options: bytes = b"") -> bytes:
        head = struct.pack("=BxHiIII", socket.AF_UNSPEC, 0, 7, handle,
                           rtnl.CLSACT_EGRESS, (49152 << 16) | 0x0300)
        return head + netlink.attr_str(rtnl.TCA_KIND, kind) + (
            netlink.attr(rtnl.TCA_OPTIONS, options) if options else b"")

    bpf_options = (netlink.attr_str(7, "stockade_egress")  # TCA_BPF_NAME
                   + netlink.attr_u32(rtnl.TCA_BPF_ID, 4242))
    assert rtnl._tc_filter(message(0, "bpf")) == rtnl.TcFilter(49152, "bpf")
    assert rtnl._tc_filter(message(1, "bpf", bpf_options)) == rtnl.TcFilter(
        49152, "bpf", 1, 4242)
    # another classifier's options are not a bpf filter's (its attribute 11 is not an id)
    assert rtnl._tc_filter(message(1, "u32", netlink.attr_u32(rtnl.TCA_BPF_ID, 9))) == \
        rtnl.TcFilter(49152, "u32", 1)


def test_filters_of_a_link_without_clsact_are_none() -> None:
    with rtnl.Rtnl() as nl:
        assert nl.filters(1, rtnl.CLSACT_INGRESS) == []
