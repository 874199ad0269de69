"""A host's record in etcd (etcd/hosts.py): one address, one host. Registration is
driven by hand here (no loop, no routes): a real etcd on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from tests.support.etcd import EtcdServer

from stockade.etcd.client import EtcdClient
from stockade.etcd.hosts import HostRoutes


@pytest.fixture
def client(etcd: EtcdServer) -> Iterator[EtcdClient]:
    with etcd.client() as c:
        yield c


def routes(client: EtcdClient, node: str, address: str) -> HostRoutes:
    return HostRoutes(client, "/s", node, address=address, netns=None, bridge="",
                      pool="10.244.0.0/16")


def record(client: EtcdClient, host: str) -> Any:
    kv = client.get(f"/s/hosts/{host}")
    return None if kv is None else json.loads(kv.value)


def test_an_address_another_host_has_is_not_registered(client: EtcdClient) -> None:
    a = routes(client, "a", "192.0.2.1")
    a._register()
    assert a.registered and record(client, "a") == {"address": "192.0.2.1"}
    b = routes(client, "b", "192.0.2.1")
    b._register()
    st = b.status()
    assert not b.registered and record(client, "b") is None
    assert st["addressOf"] == "a"
    assert "its address 192.0.2.1 is in the record of host 'a' in etcd" in st["error"], st
    assert "python -m stockade.etcd.ipam reclaim a" in st["error"]
    # Written otherwise (another spelling of one address), still one address.
    client.put("/s/hosts/c", json.dumps({"address": "2001:db8:0::1"}))
    d = routes(client, "d", "2001:db8::1")
    d._register()
    assert not d.registered and d.status()["addressOf"] == "c"
    # The host gone (its record reclaimed), the address is free.
    client.delete("/s/hosts/a")
    b._register()
    assert b.registered and record(client, "b") == {"address": "192.0.2.1"}
    assert b.status()["addressOf"] == "" and b.status()["error"] == ""
    # The same host again (a restart) finds its own record, not another's.
    again = routes(client, "b", "192.0.2.1")
    again._register()
    assert again.registered
    # Started again with an address another host has: its record of the address it had
    # goes (its blocks would be routed there), and it is not registered.
    client.put("/s/hosts/e", json.dumps({"address": "192.0.2.5"}))
    moved = routes(client, "b", "192.0.2.5")
    moved._register()
    assert not moved.registered and moved.status()["addressOf"] == "e"
    assert record(client, "b") is None


def test_a_record_with_the_address_put_between_list_and_write_wins(
        client: EtcdClient) -> None:
    """Two hosts registering one address at once: the put is conditional on no host
    record having changed since the list, so the later one sees the other's."""
    class Racing(EtcdClient):
        def list_prefix(self, prefix: str, page: int = 1000) -> Any:
            out = super().list_prefix(prefix, page)
            if not raced:
                raced.append(True)
                client.put("/s/hosts/a", json.dumps({"address": "192.0.2.1"}))
            return out

    raced: list[bool] = []
    with Racing(client.endpoints) as racing:
        b = routes(racing, "b", "192.0.2.1")
        b._register()
        assert raced and not b.registered and record(client, "b") is None
        b._register()  # the next round
        assert not b.registered and b.status()["addressOf"] == "a"
