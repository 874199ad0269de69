"""The kernel conformance runner's addressing (pure parts)."""

from __future__ import annotations


def test_on_link_prefix_keeps_every_address_off_network_and_broadcast() -> None:
    import ipaddress

    from stockade.conformance.kernel import on_link_prefix

    for addrs in (["10.77.0.1", "10.77.0.2", "10.77.0.3"], ["192.168.1.10", "192.168.3.30"],
                  ["10.0.0.255", "10.0.1.1"], ["10.0.0.1", "10.0.0.2"]):
        prefix = on_link_prefix(addrs)[4]
        for a in addrs:
            net = ipaddress.ip_interface(f"{a}/{prefix}").network
            assert all(ipaddress.ip_address(b) in net for b in addrs)
            assert ipaddress.ip_address(a) not in (net.network_address, net.broadcast_address)
