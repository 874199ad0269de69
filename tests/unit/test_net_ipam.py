"""IPAM and naming: pure logic, no privileges needed (they live here with their module's tests)."""

from __future__ import annotations

import json

import pytest

from stockade.errors import NetError
from stockade.net.ipam import Ipam
from stockade.net.naming import Naming


def test_allocation_is_lowest_free_and_skips_reserved() -> None:
    ipam = Ipam("10.0.0.0/29")  # .0 network, .1 gateway, .7 broadcast
    assert ipam.gateway_interface == "10.0.0.1/29"
    got = [ipam.allocate(f"p{i}") for i in range(5)]
    assert got == [f"10.0.0.{i}/29" for i in range(2, 7)]
    with pytest.raises(NetError, match="exhausted"):
        ipam.allocate("one-too-many")
    assert ipam.release("p1") == "10.0.0.3/29"
    assert ipam.release("p1") is None
    assert ipam.allocate("new") == "10.0.0.3/29"


def test_allocation_is_per_owner_and_deterministic() -> None:
    one, two = Ipam("10.244.0.0/16"), Ipam("10.244.0.0/16")
    for ipam in (one, two):
        ipam.allocate("x/a")
        ipam.allocate("x/b")
        ipam.release("x/a")
        ipam.allocate("x/c")
    assert one.to_dict() == two.to_dict()
    assert one.allocate("x/b") == one.address_of("x/b") == "10.244.0.3/16"
    assert len(one) == 2


def test_state_round_trips_through_json() -> None:
    ipam = Ipam("fd00:244::/64", gateway="fd00:244::1")
    ipam.allocate("x/a")
    ipam.reserve("x/b", "fd00:244::10")
    data = json.loads(json.dumps(ipam.to_dict()))
    assert data == {
        "subnet": "fd00:244::/64",
        "gateway": "fd00:244::1",
        "allocated": {"fd00:244::2": "x/a", "fd00:244::10": "x/b"},
    }
    again = Ipam.from_dict(data)
    assert again.to_dict() == data
    assert again.allocate("x/c") == "fd00:244::3/64"


def test_reserve_checks_conflicts() -> None:
    ipam = Ipam("192.168.0.0/16")
    assert ipam.reserve("x/a", "192.168.1.10/16") == "192.168.1.10/16"
    assert ipam.reserve("x/a", "192.168.1.10") == "192.168.1.10/16"  # idempotent
    with pytest.raises(NetError, match="already allocated"):
        ipam.reserve("x/b", "192.168.1.10")
    with pytest.raises(NetError, match="already holds"):
        ipam.reserve("x/a", "192.168.1.11")
    with pytest.raises(NetError, match="gateway"):
        ipam.reserve("x/c", "192.168.0.1")
    with pytest.raises(NetError, match="not a host address"):
        ipam.reserve("x/c", "192.168.255.255")
    with pytest.raises(NetError, match="not a host address"):
        ipam.reserve("x/c", "10.0.0.1")


@pytest.mark.parametrize(
    ("subnet", "message"), [("10.0.0.1/24", "invalid subnet"), ("10.0.0.0/31", "too small")]
)
def test_bad_subnets(subnet: str, message: str) -> None:
    with pytest.raises(NetError, match=message):
        Ipam(subnet)
    with pytest.raises(NetError, match="invalid IPAM state"):
        Ipam.from_dict({"allocated": {}})


def test_names_fit_and_belong_to_their_prefix() -> None:
    short, long = Naming("stk"), Naming("stkab1")
    for naming in (short, long):
        for key in ("x/a", "a-very-long-namespace/a-very-long-pod-name-0123456789"):
            assert len(naming.host_ifname(key)) <= 15
            assert naming.owns_link(naming.host_ifname(key))
            assert naming.owns_netns(naming.netns(key))
        assert naming.owns_link(naming.bridge)
    assert short.host_ifname("x/a") == "stk5356176bh" == Naming("stk").host_ifname("x/a")
    # Neither prefix claims the other's objects, although one extends the other.
    assert not short.owns_link(long.host_ifname("x/a"))
    assert not short.owns_netns(long.netns("x/a"))
    assert not long.owns_link(short.host_ifname("x/a"))
    assert not short.owns_link(long.bridge)
    assert not short.owns_netns("stk-host")


@pytest.mark.parametrize("prefix", ["", "STK", "1ab", "stk-1", "abcdefg"])
def test_bad_prefixes(prefix: str) -> None:
    with pytest.raises(NetError, match="invalid prefix"):
        Naming(prefix)
