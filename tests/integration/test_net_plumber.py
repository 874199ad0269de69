"""The plumber against a real kernel, inside a dedicated host namespace."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import threading
from collections.abc import Callable

import pytest

from stockade.errors import NetError
from stockade.net.namespace import (
    THREAD_NETNS,
    create_netns,
    entered,
    list_netns,
    netns_exists,
    remove_netns,
)
from stockade.net.plumber import EndpointSpec, Plumber
from stockade.net.rtnl import KeptRtnl, Rtnl
from stockade.net.sysctl import read_sysctl, write_sysctl
from stockade.netlink import NetlinkError

pytestmark = pytest.mark.privileged

Spec = Callable[[str, int], EndpointSpec]


def _links(netns: str) -> dict[str, dict[str, object]]:
    """name -> {state, master, addresses} of every link in ``netns``."""
    out: dict[str, dict[str, object]] = {}
    with entered(netns), Rtnl() as nl:
        links = nl.links()
        names = {link.index: link.name for link in links}
        for link in links:
            addrs = [
                f"{a.address}/{a.prefixlen}"
                for a in nl.addresses(link.index)
                if not ipaddress.ip_address(a.address).is_link_local
            ]
            out[link.name] = {
                "up": link.up,
                "master": names.get(link.master),
                "addresses": sorted(addrs),
            }
    return out


def _default_routes(netns: str) -> set[str]:
    with entered(netns), Rtnl() as nl:
        return {
            r.gateway
            for family in (socket.AF_INET, socket.AF_INET6)
            for r in nl.routes(family)
            if r.dst.endswith("/0") and r.gateway and r.table == 254
        }


def test_bridge_and_three_endpoints(trio, host_netns: str) -> None:
    p = trio.plumber
    host = _links(host_netns)
    assert host[p.bridge]["up"]
    assert host[p.bridge]["addresses"] == ["10.244.0.1/16", "fd00:244::1/64"]
    for att in trio.all:
        assert host[att.host_ifname] == {"up": True, "master": p.bridge, "addresses": []}
        inside = _links(att.netns)
        assert set(inside) == {"lo", "eth0"}
        assert inside["lo"]["up"] and inside["eth0"]["up"]
        assert inside["eth0"]["addresses"] == sorted([att.ipv4, att.ipv6])
        assert _default_routes(att.netns) == {"10.244.0.1", "fd00:244::1"}
        assert att.netns_path == f"/run/netns/{att.netns}"
        assert len(att.host_ifname) <= 15 and att.host_ifname.startswith(p.naming.prefix)
    inv = p.inventory()
    assert inv.bridge == p.bridge
    assert set(inv.host_links) == {a.host_ifname for a in trio.all}
    assert set(inv.netns) == {a.netns for a in trio.all}
    # The bridge's sysctls are set in the host namespace, where the bridge is.
    for name in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables"):
        assert read_sysctl(f"net.bridge.{name}", host_netns) == "1"
    # Neither the bridge nor a pod takes a route or a prefix from a router advertisement.
    assert read_sysctl(f"net.ipv6.conf.{p.bridge}.accept_ra", host_netns) == "0"
    for att in trio.all:
        assert read_sysctl("net.ipv6.conf.eth0.accept_ra", att.netns) == "0"


def test_ensure_is_idempotent(plumber: Plumber, spec_for: Spec) -> None:
    first = plumber.ensure_endpoint(spec_for("x/a", 10))
    before = plumber.inventory()
    plumber.ensure_bridge()
    again = plumber.ensure_endpoint(spec_for("x/a", 10))
    assert again == first  # same names, same MAC: nothing was recreated
    assert plumber.inventory() == before
    assert plumber.attachment("x/a") == first
    assert plumber.remove_endpoint("x/a") is True
    assert plumber.remove_endpoint("x/a") is False
    assert plumber.attachment("x/a") is None


def test_ensure_converges(plumber: Plumber, spec_for: Spec) -> None:
    # A crash right after creating the namespace leaves it without its veth.
    create_netns(plumber.naming.netns("x/a"))
    att = plumber.ensure_endpoint(spec_for("x/a", 10))
    assert _links(att.netns)["eth0"]["addresses"] == sorted([att.ipv4, att.ipv6])
    # A changed address replaces the old one instead of adding a second.
    moved = plumber.ensure_endpoint(spec_for("x/a", 20))
    assert moved.mac == att.mac
    assert _links(att.netns)["eth0"]["addresses"] == ["10.244.0.20/16", "fd00:244::14/64"]
    # A veth whose peer vanished (namespace replaced) is recreated.
    remove_netns(att.netns)
    again = plumber.ensure_endpoint(spec_for("x/a", 20))
    assert _links(again.netns)["eth0"]["up"]
    assert plumber.inventory().host_links == (again.host_ifname,)


def test_failure_leaves_nothing_behind(plumber: Plumber) -> None:
    bad = EndpointSpec("x/bad", "10.244.0.9/16", gateway4="10.99.0.1")  # not on-link
    with pytest.raises(NetError, match=r"default route via 10\.99\.0\.1"):
        plumber.ensure_endpoint(bad)
    inv = plumber.inventory()
    assert inv.host_links == () and inv.netns == ()
    assert not netns_exists(plumber.naming.netns("x/bad"))


def test_invalid_specs_are_refused_before_touching_anything(plumber: Plumber) -> None:
    for bad, message in [
        (EndpointSpec("x/a", "10.244.0.9"), "needs a prefix length"),
        (EndpointSpec("x/a", "fd00::9/64"), "not an IPv4 address"),
        (EndpointSpec("x/a", "10.244.0.9/16", gateway6="fd00::1"), "no IPv6 address"),
        (EndpointSpec("x/a", "10.244.0.9/16", ifname="x" * 16), "invalid interface name"),
        (EndpointSpec("", "10.244.0.9/16"), "must not be empty"),
    ]:
        with pytest.raises(NetError, match=message):
            plumber.ensure_endpoint(bad)
    assert plumber.inventory().netns == ()
    with pytest.raises(NetError, match="invalid prefix"):
        Plumber(prefix="toolong7")


def test_endpoint_needs_the_bridge(netns_prefix: str, host_netns: str, spec_for: Spec) -> None:
    p = Plumber(prefix=netns_prefix, host_netns=host_netns)
    with pytest.raises(NetError, match="call ensure_bridge"):
        p.ensure_endpoint(spec_for("x/a", 10))
    assert p.inventory().empty


def test_crash_recovery(netns_prefix: str, host_netns: str, spec_for: Spec) -> None:
    crashed = Plumber(prefix=netns_prefix, host_netns=host_netns, subnet6="fd00:244::/64")
    crashed.ensure_bridge()
    made = [crashed.ensure_endpoint(spec_for(f"x/{n}", 10 + i)) for i, n in enumerate("abc")]
    del crashed  # nothing is remembered in the object: the kernel is the state

    fresh = Plumber(prefix=netns_prefix, host_netns=host_netns)
    inv = fresh.inventory()
    assert inv.bridge == fresh.bridge
    assert set(inv.host_links) == {a.host_ifname for a in made}
    assert set(inv.netns) == {a.netns for a in made}
    assert fresh.teardown() == inv
    assert fresh.inventory().empty
    assert [n for n in list_netns() if n.startswith(netns_prefix)] == [host_netns]
    assert set(_links(host_netns)) == {"lo"}


def test_prefixes_do_not_collide(netns_prefix: str, host_netns: str, spec_for: Spec) -> None:
    one = Plumber(prefix=netns_prefix, host_netns=host_netns)
    # Same host namespace, same keys, and a prefix that is a prefix of the first.
    two = Plumber(prefix=netns_prefix[:5], host_netns=host_netns, subnet4="10.245.0.0/16")
    try:
        one.ensure_bridge()
        two.ensure_bridge()
        a1 = one.ensure_endpoint(EndpointSpec("x/a", "10.244.0.10/16", gateway4="10.244.0.1"))
        a2 = two.ensure_endpoint(EndpointSpec("x/a", "10.245.0.10/16", gateway4="10.245.0.1"))
        assert {a1.netns, a1.host_ifname}.isdisjoint({a2.netns, a2.host_ifname})
        assert one.inventory().host_links == (a1.host_ifname,)
        assert two.inventory().host_links == (a2.host_ifname,)
        one.teardown()
        assert two.attachment("x/a") == a2
        assert two.inventory().bridge == two.bridge
    finally:
        two.teardown()
        one.teardown()


def test_explicit_addresses_on_extra_subnets(plumber: Plumber) -> None:
    """The conformance runner gives pods fixed IPs such as 192.168.1.10."""
    plumber.ensure_bridge(addresses=["192.168.0.1/16"])
    att = plumber.ensure_endpoint(
        EndpointSpec("x/a", "192.168.1.10/16", gateway4="192.168.0.1", ifname="net0")
    )
    assert att.ifname == "net0"
    assert _links(att.netns)["net0"]["addresses"] == ["192.168.1.10/16"]
    bridge = _links(plumber.host_netns or "")[plumber.bridge]
    assert "192.168.0.1/16" in bridge["addresses"] and "10.244.0.1/16" in bridge["addresses"]


def test_namespaces_are_idempotent_and_entered_per_thread(netns_prefix: str) -> None:
    name = f"{netns_prefix}-t"
    assert create_netns(name) is True
    assert create_netns(name) is False
    here = os.readlink(THREAD_NETNS)
    seen: list[str] = []
    go, looked = threading.Event(), threading.Event()

    def other_thread() -> None:
        go.wait(5)
        seen.append(os.readlink(THREAD_NETNS))
        looked.set()

    worker = threading.Thread(target=other_thread)
    worker.start()  # before entering: a thread started inside would inherit the namespace
    with entered(name):
        inside = os.readlink(THREAD_NETNS)
        go.set()
        looked.wait(5)
    worker.join()
    assert inside != here
    assert seen == [here]  # setns moved this thread only
    with pytest.raises(RuntimeError), entered(name):
        raise RuntimeError("boom")
    assert os.readlink(THREAD_NETNS) == here  # restored after an exception too
    with pytest.raises(NetError, match="does not exist"), entered(f"{netns_prefix}-none"):
        pass
    assert remove_netns(name) is True
    assert remove_netns(name) is False


def test_kept_links_follow_the_kernel_and_the_namespaces_name(netns_prefix: str) -> None:
    """`KeptRtnl` lists the links of the namespace its name stands for now: again only
    after the kernel said a link changed, made again when the name is given to another
    namespace, an error when it is gone, and after a failed request with sockets of
    its own again."""
    name = f"{netns_prefix}-k"
    create_netns(name)
    kept = KeptRtnl(name)

    def names() -> set[str]:
        return {lk.name for lk in kept.links()}

    def add_bridge(bridge: str) -> None:
        with entered(name), Rtnl() as nl:
            nl.add_bridge(bridge)

    try:
        add_bridge(f"{netns_prefix}br1")
        assert f"{netns_prefix}br1" in names()
        first = kept._nl
        assert first is not None
        listed = kept.links()
        first.sock.close()  # no change since: the last listing, no request made
        assert kept.links() is listed  # the same tuple: callers key what they derive on it
        add_bridge(f"{netns_prefix}br3")  # a change: listed again, on the closed socket
        with pytest.raises(OSError):
            kept.links()
        assert {f"{netns_prefix}br1", f"{netns_prefix}br3"} <= names()  # sockets anew
        assert kept.links() is not listed
        with entered(name), Rtnl() as nl:  # a change of a link's state is one too
            link = nl.link(f"{netns_prefix}br1")
            assert link is not None and not link.up
            nl.set_up(link.index)
        assert next(lk for lk in kept.links() if lk.name == f"{netns_prefix}br1").up
        remove_netns(name)
        with pytest.raises(NetError, match="does not exist"):
            kept.links()
        create_netns(name)  # another namespace by the same name
        add_bridge(f"{netns_prefix}br2")
        now = names()
        assert f"{netns_prefix}br2" in now and f"{netns_prefix}br1" not in now
    finally:
        kept.close()
        remove_netns(name)


def test_a_kept_socket_serves_requests_in_its_namespace(netns_prefix: str) -> None:
    """`KeptRtnl.call`: in the namespace, not the caller's; the kernel's refusal keeps
    the socket (its answer was read whole), anything else makes it anew."""
    name = f"{netns_prefix}-c"
    create_netns(name)
    kept = KeptRtnl(name)
    try:
        kept.call(lambda nl: nl.add_bridge(f"{netns_prefix}brc"))
        with entered(name), Rtnl() as nl:
            assert nl.link(f"{netns_prefix}brc") is not None
        with Rtnl() as nl:
            assert nl.link(f"{netns_prefix}brc") is None  # not in this one
        first = kept._nl
        with pytest.raises(NetlinkError) as refused:
            kept.call(lambda nl: nl.add_bridge(f"{netns_prefix}brc"))
        assert refused.value.errno == errno.EEXIST and kept._nl is first

        def broken(nl: Rtnl) -> None:
            raise ValueError("half an answer")

        with pytest.raises(ValueError):
            kept.call(broken)
        assert kept._nl is None
        assert kept.call(lambda nl: nl.link(f"{netns_prefix}brc")) is not None
    finally:
        kept.close()
        remove_netns(name)


def test_sysctl_is_per_namespace(host_netns: str) -> None:
    root_value = read_sysctl("net.ipv4.ip_forward")
    write_sysctl("net.ipv4.ip_forward", 1, host_netns)
    assert read_sysctl("net.ipv4.ip_forward", host_netns) == "1"
    assert read_sysctl("net.ipv4.ip_forward") == root_value
    with pytest.raises(NetError, match="invalid sysctl"):
        read_sysctl("../../etc/passwd")


def test_allocated_specs_come_from_the_plumber_subnets(plumber: Plumber) -> None:
    first = plumber.allocate_spec("x/a")
    assert first == EndpointSpec(
        "x/a", "10.244.0.2/16", "fd00:244::2/64", "10.244.0.1", "fd00:244::1"
    )
    assert plumber.allocate_spec("x/a") == first
    att = plumber.ensure_endpoint(plumber.allocate_spec("x/b"))
    assert (att.ipv4, att.ipv6) == ("10.244.0.3/16", "fd00:244::3/64")
