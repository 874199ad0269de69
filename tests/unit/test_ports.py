"""The one text form of a port, as every command reads it."""

from __future__ import annotations

import pytest

from stockade.model.ports import PortText, parse_port_text


@pytest.mark.parametrize(("text", "want"), [
    ("80", PortText(80)),
    ("80/udp", PortText(80, "UDP")),
    ("udp/80", PortText(80, "UDP")),
    ("tcp:80", PortText(80, "TCP")),
    ("SCTP:9000", PortText(9000, "SCTP")),
    ("http", PortText("http")),
    ("dns/udp", PortText("dns", "UDP")),
    ("65535", PortText(65535)),
])
def test_the_forms_every_command_reads(text: str, want: PortText) -> None:
    assert parse_port_text(text) == want


def test_a_declared_port_has_a_name_and_a_number() -> None:
    assert parse_port_text("http=8080/tcp", named=True, numeric=True) == PortText(
        8080, "TCP", "http")
    assert parse_port_text("8080", named=True, numeric=True).proto == "TCP"


@pytest.mark.parametrize(("text", "kw", "words"), [
    ("0", {}, "between 1 and 65535"),
    ("65536", {}, "between 1 and 65535"),
    ("70000/tcp", {}, "between 1 and 65535"),
    ("80/icmp", {}, "tcp, udp or sctp"),
    ("80/tcp/x", {}, "want"),
    ("", {}, "want"),
    ("HTTP", {}, "port name"),
    ("a--b", {}, "consecutive hyphens"),
    ("http=80", {}, "want"),
    ("=80", {"named": True}, "name"),
    ("Web=80", {"named": True}, "name"),
    ("http", {"numeric": True}, "NUMBER"),
    ("80/udp", {"protocol": False}, "--protocol"),
])
def test_what_is_refused_says_why(text: str, kw: dict[str, bool], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_port_text(text, **kw)
