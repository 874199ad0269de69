"""Syntax checks for names, label keys and values, and ports, worded as upstream.

Each `is_*` function mirrors a Kubernetes helper (apimachinery
`api/validate/content` and `util/validation`): it returns the list of reasons a
value is invalid, empty when it is valid. Lengths are counted in UTF-8 bytes and
patterns must match the whole string, as Go's `len` and anchored regexps do.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

DNS1123_LABEL_MAX = 63
DNS1123_SUBDOMAIN_MAX = 253
LABEL_KEY_NAME_MAX = 63
LABEL_VALUE_MAX = 63
PORT_NAME_MAX = 15
# What the API server appends to generateName (names.SimpleNameGenerator).
GENERATED_SUFFIX_LEN = 5
GENERATED_BASE_MAX = DNS1123_LABEL_MAX - GENERATED_SUFFIX_LEN

_DNS1123_LABEL_FMT = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN_FMT = _DNS1123_LABEL_FMT + "(\\." + _DNS1123_LABEL_FMT + ")*"
_LABEL_KEY_FMT = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_LABEL_VALUE_FMT = "(" + _LABEL_KEY_FMT + ")?"

# re.ASCII keeps the classes ASCII-only; fullmatch avoids `$` matching before "\n".
_DNS1123_LABEL = re.compile(_DNS1123_LABEL_FMT, re.ASCII)
_DNS1123_SUBDOMAIN = re.compile(_DNS1123_SUBDOMAIN_FMT, re.ASCII)
_LABEL_KEY = re.compile(_LABEL_KEY_FMT, re.ASCII)
_LABEL_VALUE = re.compile(_LABEL_VALUE_FMT, re.ASCII)
_PORT_NAME_CHARSET = re.compile("[-a-z0-9]+", re.ASCII)
_ONE_LETTER = re.compile("[a-z]", re.ASCII)

_DNS1123_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
    "and must start and end with an alphanumeric character"
)
_DNS1123_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
    "'-' or '.', and must start and end with an alphanumeric character"
)
_LABEL_KEY_MSG = (
    "must consist of alphanumeric characters, '-', '_' or '.', "
    "and must start and end with an alphanumeric character"
)
_LABEL_VALUE_MSG = (
    "a valid label must be an empty string or consist of alphanumeric characters, "
    "'-', '_' or '.', and must start and end with an alphanumeric character"
)


def _memo(check: Callable[[str], list[str]]) -> Callable[[str], list[str]]:
    """The check, remembered by value: a cluster repeats a few label keys, values and
    port names thousands of times (most of validating 10,000 pods, uncached)."""
    cached = functools.lru_cache(maxsize=1 << 16)(lambda value: tuple(check(value)))

    @functools.wraps(check)
    def remembered(value: str) -> list[str]:
        return list(cached(value))
    return remembered


def byte_len(value: str) -> int:
    """Length as Go's len(): UTF-8 bytes, not code points."""
    return len(value.encode("utf-8", "surrogatepass"))


def max_len_error(length: int) -> str:
    return f"must be no more than {length} bytes"


def regex_error(msg: str, fmt: str, *examples: str) -> str:
    if not examples:
        return f"{msg} (regex used for validation is '{fmt}')"
    shown = " or ".join(f"'{e}', " for e in examples)
    return f"{msg} (e.g. {shown}regex used for validation is '{fmt}')"


def inclusive_range_error(lo: int, hi: int) -> str:
    return f"must be between {lo} and {hi}, inclusive"


@_memo
def is_dns1123_label(value: str) -> list[str]:
    errs = []
    if byte_len(value) > DNS1123_LABEL_MAX:
        errs.append(max_len_error(DNS1123_LABEL_MAX))
    if not _DNS1123_LABEL.fullmatch(value):
        if _DNS1123_SUBDOMAIN.fullmatch(value):
            # A valid subdomain that is not a label: the length is checked above, so dots.
            errs.append("must not contain dots")
        else:
            errs.append(regex_error(_DNS1123_LABEL_MSG, _DNS1123_LABEL_FMT,
                                    "my-name", "123-abc"))
    return errs


@_memo
def is_dns1123_subdomain(value: str) -> list[str]:
    errs = []
    if byte_len(value) > DNS1123_SUBDOMAIN_MAX:
        errs.append(max_len_error(DNS1123_SUBDOMAIN_MAX))
    if not _DNS1123_SUBDOMAIN.fullmatch(value):
        errs.append(regex_error(_DNS1123_SUBDOMAIN_MSG, _DNS1123_SUBDOMAIN_FMT, "example.com"))
    return errs


@_memo
def is_qualified_name(value: str) -> list[str]:
    """A label key (IsQualifiedName / IsLabelKey): `[prefix/]name`."""
    parts = value.split("/")
    errs: list[str] = []
    if len(parts) == 1:
        name = parts[0]
    elif len(parts) == 2:
        prefix, name = parts
        if not prefix:
            errs.append("prefix part must be non-empty")
        else:
            errs.extend("prefix part " + m for m in is_dns1123_subdomain(prefix))
    else:
        # More than one '/': upstream gives a single message and stops there.
        return [
            "a valid label key "
            + regex_error(_LABEL_KEY_MSG, _LABEL_KEY_FMT, "MyName", "my.name", "123-abc")
            + " with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
        ]
    if not name:
        errs.append("name part must be non-empty")
    elif byte_len(name) > LABEL_KEY_NAME_MAX:
        errs.append("name part " + max_len_error(LABEL_KEY_NAME_MAX))
    if not _LABEL_KEY.fullmatch(name):
        errs.append("name part " + regex_error(_LABEL_KEY_MSG, _LABEL_KEY_FMT,
                                               "MyName", "my.name", "123-abc"))
    return errs


@_memo
def is_label_value(value: str) -> list[str]:
    errs = []
    if byte_len(value) > LABEL_VALUE_MAX:
        errs.append(max_len_error(LABEL_VALUE_MAX))
    if not _LABEL_VALUE.fullmatch(value):
        errs.append(regex_error(_LABEL_VALUE_MSG, _LABEL_VALUE_FMT,
                                "MyValue", "my_value", "12345"))
    return errs


def is_valid_port_num(port: int) -> list[str]:
    if 1 <= port <= 65535:
        return []
    return [inclusive_range_error(1, 65535)]


@_memo
def is_valid_port_name(port: str) -> list[str]:
    """An IANA_SVC_NAME (RFC 6335), lowercase only; every broken rule is reported."""
    errs = []
    if byte_len(port) > PORT_NAME_MAX:
        # util/validation's own MaxLenError, which counts "characters".
        errs.append(f"must be no more than {PORT_NAME_MAX} characters")
    if not _PORT_NAME_CHARSET.fullmatch(port):
        errs.append("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)")
    if not _ONE_LETTER.search(port):
        errs.append("must contain at least one letter (a-z)")
    if "--" in port:
        errs.append("must not contain consecutive hyphens")
    if port and (port[0] == "-" or port[-1] == "-"):
        errs.append("must not begin or end with a hyphen")
    return errs


def mask_trailing_dash(name: str) -> str:
    """Upstream's maskTrailingDash, quirk included: it drops two bytes and appends 'a'.

    A generateName may end with '-' since a suffix follows; the mask makes the
    prefix checkable as a whole name. Reproduced byte for byte because it decides
    which prefixes pass (e.g. 'a.-' becomes 'aa').
    """
    raw = name.encode("utf-8", "surrogatepass")
    if len(raw) > 1 and raw.endswith(b"-"):
        return (raw[:-2] + b"a").decode("utf-8", "replace")
    return name


def name_is_dns_subdomain(name: str, prefix: bool) -> list[str]:
    # A valid name is answered without the memo: every pod's name is its own, so
    # each would miss it and push out the values that recur. (The pattern is
    # ASCII: characters are bytes.)
    if not prefix and len(name) <= DNS1123_SUBDOMAIN_MAX and _DNS1123_SUBDOMAIN.fullmatch(name):
        return []
    return is_dns1123_subdomain(mask_trailing_dash(name) if prefix else name)


def name_is_dns_label(name: str, prefix: bool) -> list[str]:
    if not prefix and len(name) <= DNS1123_LABEL_MAX and _DNS1123_LABEL.fullmatch(name):
        return []  # as `name_is_dns_subdomain`
    return is_dns1123_label(mask_trailing_dash(name) if prefix else name)


def generated_name(generate_name: str) -> str:
    """The name the API server would generate before validating.

    The random suffix uses only lowercase consonants and digits, so a fixed
    stand-in of the same length validates exactly as any real one would.
    """
    raw = generate_name.encode("utf-8", "surrogatepass")
    if len(raw) > GENERATED_BASE_MAX:
        generate_name = raw[:GENERATED_BASE_MAX].decode("utf-8", "replace")
    return generate_name + "x" * GENERATED_SUFFIX_LEN


def go_lower(text: str) -> str:
    """strings.ToLower as Go does it, one rune to one rune.

    Python's str.lower maps 'İ' (U+0130) to two code points; Go maps it to 'i'.
    Every other rune lowers to a single code point in both.
    """
    return "".join(c.lower()[0] for c in text)
