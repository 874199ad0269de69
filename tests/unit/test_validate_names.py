"""The syntax helpers of model.names, checked against upstream's behaviour."""

from __future__ import annotations

import pytest

from stockade.model import names


@pytest.mark.parametrize(("name", "masked"), [
    ("api-", "apa"),      # upstream drops two bytes and appends 'a'
    ("a.-", "aa"),
    ("-", "-"),           # a lone dash is left alone (and then fails)
    ("api", "api"),
    ("", ""),
])
def test_mask_trailing_dash_keeps_upstream_quirk(name: str, masked: str) -> None:
    assert names.mask_trailing_dash(name) == masked


def test_generate_name_prefix_may_end_with_dash() -> None:
    assert names.name_is_dns_subdomain("web-", prefix=True) == []
    assert names.name_is_dns_subdomain("web-", prefix=False) != []
    assert names.name_is_dns_label("web-", prefix=True) == []


def test_generated_name_is_truncated_like_the_api_server() -> None:
    generated = names.generated_name("a" * 100)
    assert len(generated) == 63
    assert names.is_dns1123_subdomain(generated) == []
    assert names.generated_name("web-").startswith("web-")


@pytest.mark.parametrize(("value", "errors"), [
    ("app", 0),
    ("example.com/app", 0),
    ("Example.com/app", 1),
    ("/app", 1),
    ("app/", 2),           # empty name: "non-empty" and the pattern
    ("a/b/c", 1),
    ("a" * 63, 0),
    ("a" * 64, 1),
    ("x/" + "a" * 64, 1),
    ("a" * 254 + "/x", 1),  # prefix over 253 bytes
    ("app\n", 1),           # no end-of-string leniency before a newline
    ("\u00e9t\u00e9", 1),   # letters outside ASCII are not alphanumeric here
])
def test_qualified_name(value: str, errors: int) -> None:
    assert len(names.is_qualified_name(value)) == errors


def test_lengths_are_bytes_not_characters() -> None:
    # 32 two-byte characters: 64 bytes, over the limit even though 32 characters.
    assert names.max_len_error(63) in names.is_label_value("\u00e9" * 32)
    assert names.byte_len("\u00e9") == 2


def test_annotation_keys_lower_like_go() -> None:
    # Go lowers U+0130 to a plain 'i'; Python's str.lower would add a combining dot.
    assert names.go_lower("\u0130stanbul") == "istanbul"
    assert names.is_qualified_name(names.go_lower("EXAMPLE.COM/\u0130d")) == []


@pytest.mark.parametrize(("port", "messages"), [
    ("http", []),
    ("h", []),
    ("8080", ["must contain at least one letter (a-z)"]),
    ("a--b", ["must not contain consecutive hyphens"]),
    ("http-", ["must not begin or end with a hyphen"]),
    ("x" * 16, ["must be no more than 15 characters"]),
])
def test_port_name(port: str, messages: list[str]) -> None:
    assert names.is_valid_port_name(port) == messages


@pytest.mark.parametrize(("number", "valid"), [(0, False), (1, True), (65535, True),
                                                 (65536, False), (-80, False)])
def test_port_number(number: int, valid: bool) -> None:
    assert (names.is_valid_port_num(number) == []) is valid


def test_label_vs_subdomain_messages() -> None:
    assert names.is_dns1123_label("a.b") == ["must not contain dots"]
    assert names.is_dns1123_label("A")[0].startswith("a lowercase RFC 1123 label")
    assert names.is_dns1123_label("a" * 64) == ["must be no more than 63 bytes"]
    assert names.is_dns1123_subdomain("a" * 253) == []
