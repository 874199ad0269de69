"""model.cidr: Go's legacy CIDR grammar, the strict gate's findings, except containment."""

from __future__ import annotations

import ipaddress

import pytest

from stockade.model.cidr import (
    STRICT_HOST_BITS,
    STRICT_LEADING_ZEROS,
    STRICT_V4_MAPPED,
    is_canonical_ipv4,
    is_strict_subset,
    parse_cidr,
    parse_cidr_sloppy,
    parse_ip,
    strict_cidr_problems,
)


@pytest.mark.parametrize(("text", "network"), [
    ("10.0.0.0/8", "10.0.0.0/8"),
    ("10.1.2.3/16", "10.1.0.0/16"),           # host bits masked off
    ("010.001.002.003/32", "10.1.2.3/32"),    # leading zeros read as decimal, not octal
    ("0010.0.0.0/8", "10.0.0.0/8"),           # any number of them
    ("10.0.0.0/08", "10.0.0.0/8"),            # in the prefix length too
    ("0.0.0.0/0", "0.0.0.0/0"),
    ("2001:db8::/32", "2001:db8::/32"),
    ("2001:DB8:0:0:0:0:0:0/32", "2001:db8::/32"),
    ("00001::/64", "1::/64"),                 # five hex digits with a value under 2^16
    ("::/0", "::/0"),
    ("::1.2.3.4/128", "::102:304/128"),
    ("1:2:3:4:5:6:7:8/128", "1:2:3:4:5:6:7:8/128"),
    ("::ffff:10.0.0.0/104", "::ffff:a00:0/104"),
])
def test_accepted(text: str, network: str) -> None:
    assert parse_cidr(text) == ipaddress.ip_network(network)


@pytest.mark.parametrize("text", [
    "", "10.0.0.1", "10.0.0.0/", "10.0.0.0/33", "10.0.0.0/-1", "10.0.0.0/+8",
    "10.0.0.0/255.0.0.0", "10.0.0/8", "10.0.0.0.0/8", "10.0.0.256/32", " 10.0.0.0/8",
    "10.0.0.0/8 ", "10.0.0.0/\u0668", "\uff11\uff10.0.0.0/8", "2001:db8::/129",
    "fe80::1%eth0/64", "1::2::3/64", "1:2:3:4:5:6:7:8::/64", "1:2:3:4:5:6:7:8:9/128",
    ":1::/64", "1:/64", "1:2:3:4:5:6:7:1.2.3.4/128", "10000::/64", "x/8", "10.0.0.0/8/8",
])
def test_rejected(text: str) -> None:
    assert parse_cidr_sloppy(text) is None
    assert parse_cidr(text) is None


@pytest.mark.parametrize(("text", "problems"), [
    ("10.0.0.0/8", []),
    ("2001:db8::/32", []),
    ("2001:DB8::/32", []),                      # not canonical, but only a warning
    ("010.0.0.0/8", [STRICT_LEADING_ZEROS]),
    ("10.0.0.0/08", [STRICT_LEADING_ZEROS]),
    ("00001::/64", [STRICT_LEADING_ZEROS]),
    ("::ffff:10.0.0.0/104", [STRICT_V4_MAPPED]),
    ("::ffff:10.1.2.3/104", [STRICT_V4_MAPPED]),  # one finding per value, in upstream order
    ("10.1.2.3/16", [STRICT_HOST_BITS]),
    ("2001:db8::1/64", [STRICT_HOST_BITS]),
    ("010.1.2.3/8", [STRICT_LEADING_ZEROS]),
])
def test_strict_problems(text: str, problems: list[str]) -> None:
    assert strict_cidr_problems(text) == problems


@pytest.mark.parametrize(("outer", "inner", "subset"), [
    ("10.0.0.0/8", "10.1.0.0/16", True),
    ("10.0.0.0/8", "10.0.0.0/8", False),
    ("10.0.0.0/16", "10.0.0.0/8", False),
    ("10.0.0.0/8", "11.0.0.0/16", False),
    ("10.0.0.0/8", "10.1.2.3/16", True),          # judged on the masked network
    ("10.0.0.0/8", "2001:db8::/64", False),
    ("::/0", "10.0.0.0/8", False),
    ("0.0.0.0/0", "::/1", False),
    ("2001:db8::/32", "2001:db8:abcd::/48", True),
    # Go compares an IPv4-mapped network as IPv4, but prefix lengths as written.
    ("10.0.0.0/8", "::ffff:10.1.0.0/112", True),
    ("::ffff:10.0.0.0/104", "10.1.0.0/16", False),
    ("::ffff:10.0.0.0/104", "::ffff:10.1.0.0/112", True),
])
def test_strict_subset(outer: str, inner: str, subset: bool) -> None:
    a = parse_cidr_sloppy(outer)
    b = parse_cidr_sloppy(inner)
    assert a is not None and b is not None
    assert is_strict_subset(a, b) is subset


@pytest.mark.parametrize(("text", "address"), [
    ("10.0.0.1", "10.0.0.1"),
    ("010.000.000.001", "10.0.0.1"),
    ("2001:db8::1", "2001:db8::1"),
    ("::ffff:1.2.3.4", "::ffff:102:304"),
    ("10.0.0.1/32", None),
    ("fe80::1%eth0", None),
    ("", None),
])
def test_parse_ip(text: str, address: str | None) -> None:
    expected = None if address is None else ipaddress.ip_address(address)
    assert parse_ip(text) == expected


@pytest.mark.parametrize("text", [
    "10.0.0.1", "0.0.0.0", "255.255.255.255", "199.249.250.251", "10.128.3.40",
    "256.0.0.1", "1.2.3.260", "01.2.3.4", "1.2.3.00", "00.0.0.0", "1.2.3", "1.2.3.4.5",
    "1.2.3.4\n", " 1.2.3.4", "1..2.3", "1.2.3.", "\u0661.2.3.4", "::1", "::ffff:1.2.3.4",
    "a.b.c.d", "1.2.3.-4", "+1.2.3.4", "1.2.3.4/32", "",
])
def test_canonical_ipv4_is_its_definition(text: str) -> None:
    # The fast test of pod addresses: an IPv4 address that prints as it is written.
    ip = parse_ip(text)
    assert is_canonical_ipv4(text) == (ip is not None and ip.version == 4 and str(ip) == text)
