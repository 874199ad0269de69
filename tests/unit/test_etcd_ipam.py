"""Addresses across hosts (etcd/ipam.py): blocks of one pool claimed with
compare-and-swap, so hosts racing for blocks never share one; addresses only from a
host's own blocks; reclaiming a gone host's blocks."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.etcd import EtcdServer, etcd_binary

from stockade.errors import NetError
from stockade.etcd.ipam import BlockIpam, Blocks, open_ipam, reclaim


def test_addresses_come_from_the_claimed_blocks_only() -> None:
    claimed: list[str] = []
    blocks = iter(["10.244.0.0/30", "10.244.0.8/30"])

    def claim() -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        claimed.append(next(blocks))
        return ipaddress.ip_network(claimed[-1])

    ipam = BlockIpam("10.244.0.0/16", claim=claim)
    assert ipam.gateway_interface == "10.244.0.1/16"  # the pool's, on every host
    got = [ipam.allocate(f"o{i}") for i in range(4)]
    # 10.244.0.0 (network) and .1 (gateway) are never handed out; .2, .3, then a block.
    assert got == ["10.244.0.2/16", "10.244.0.3/16", "10.244.0.8/16", "10.244.0.9/16"]
    assert claimed == ["10.244.0.0/30", "10.244.0.8/30"]
    assert ipam.allocate("o1") == "10.244.0.3/16"  # the same owner, the same address
    copy = BlockIpam.from_dict(ipam.to_dict())
    assert copy.blocks == ipam.blocks and copy.address_of("o2") == "10.244.0.8/16"
    # A block's every address is usable (the pool's network and gateway excepted).
    assert [copy.allocate("o4"), copy.allocate("o5")] == ["10.244.0.10/16", "10.244.0.11/16"]
    with pytest.raises(NetError):
        copy.allocate("more")  # full, and a copy claims nothing


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    if etcd_binary() is None:
        pytest.skip("etcd is not installed")
    with EtcdServer(tmp_path) as server:
        yield server


def test_hosts_racing_for_blocks_never_share_one(etcd: EtcdServer) -> None:
    with etcd.client() as c:
        first = open_ipam(Blocks(c, "/s", "h0"), "10.200.0.0/20", None)
        assert str(first.subnet) == "10.200.0.0/20"
        # A later host with another --subnet uses the cluster's.
        assert str(open_ipam(Blocks(c, "/s", "hx"), "10.9.0.0/16", None).subnet) == \
            "10.200.0.0/20"
        got: dict[str, list[str]] = {}

        def host(name: str) -> None:
            ipam = open_ipam(Blocks(c, "/s", name), "10.200.0.0/20", None)
            got[name] = [ipam.allocate(f"{name}-{i}") for i in range(100)]

        threads = [threading.Thread(target=host, args=(f"h{i}",)) for i in range(1, 5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        every = [a for addrs in got.values() for a in addrs]
        assert len(every) == 400 and len(set(every)) == 400  # never one address twice
        owned = Blocks(c, "/s", "").owned()
        assert sorted(set(owned.values())) == ["h1", "h2", "h3", "h4"]
        for name, addrs in got.items():
            mine = [b for b, h in owned.items() if h == name]
            assert all(any(ipaddress.ip_address(a.split("/")[0]) in b for b in mine)
                       for a in addrs)
        # A restarted host finds its blocks again.
        again = open_ipam(Blocks(c, "/s", "h1"), "10.200.0.0/20", None)
        assert {str(b) for b in again.blocks} == {str(b) for b, h in owned.items()
                                                  if h == "h1"}
        # Reclaiming a gone host frees its blocks, and only its.
        c.put("/s/hosts/h2", '{"address": "192.0.2.2"}')
        freed = reclaim(c, "/s", "h2")
        assert len(freed) == sum(1 for h in owned.values() if h == "h2") and freed
        after = Blocks(c, "/s", "").owned()
        assert "h2" not in after.values() and len(after) == len(owned) - len(freed)
        assert c.get("/s/hosts/h2") is None
