"""logfmt lines: one record per line, values that cannot split or forge a line."""

from __future__ import annotations

import logging
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stockade.agent.logfmt import LogfmtFormatter, format_pairs, parse, quote, value

FORGED = 'x\n level=error msg="forged"'

HOSTILE = [
    FORGED,
    'a" level=error msg="forged',
    "a=b",
    "=",
    "a b",
    "",
    "back\\slash",
    "trailing\\",
    '\\"',
    "\r\n\t",
    "nul\x00bell\x07esc\x1b[31mred",
    "del\x7f c1\x85 nbsp\xa0",
    "line\u2028sep\u2029para",
    "bidi\u202eoverride",
    "astral\U0001f600 and unassigned \U000e0001",
    "\\u000a",
    "ünïcødé-ok",
]


def record(msg: str, fields: dict[str, object] | None = None,
           exc: bool = False) -> logging.LogRecord:
    rec = logging.LogRecord("stockade.agent", logging.WARNING, __file__, 1, msg, None, None)
    if fields is not None:
        rec.fields = fields
    if exc:
        try:
            raise RuntimeError(FORGED)
        except RuntimeError:
            rec.exc_info = sys.exc_info()
    return rec


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_values_stay_in_one_pair_and_parse_back(text: str) -> None:
    line = format_pairs([("name", text), ("after", "ok")])
    assert "\n" not in line and "\r" not in line
    assert len(line.splitlines()) == 1
    assert all(c == " " or c.isprintable() for c in line)
    assert parse(line) == [("name", text), ("after", "ok")]


def test_forged_message_and_fields_stay_inside_one_line() -> None:
    fmt = LogfmtFormatter()
    line = fmt.format(record(FORGED, {"pod": FORGED, "ns": "a=b", "n": 3}, exc=True))
    assert len(line.splitlines()) == 1
    pairs = parse(line)
    assert [k for k, _ in pairs] == ["time", "level", "logger", "msg", "pod", "ns", "n", "error"]
    d = dict(pairs)
    assert d["level"] == "warning" and d["logger"] == "stockade.agent"
    assert d["msg"] == FORGED and d["pod"] == FORGED and d["ns"] == "a=b" and d["n"] == "3"
    assert d["error"].startswith("Traceback") and d["error"].endswith("RuntimeError: " + FORGED)


def test_benign_values_are_written_as_before() -> None:
    line = LogfmtFormatter().format(record("applied", {"revision": 7, "ms": 1.25,
                                                       "table": "inet stockade", "e": ""}))
    assert line.split(" ", 1)[1] == ('level=warning logger=stockade.agent msg="applied"'
                                     ' revision=7 ms=1.25 table="inet stockade" e=""')


def test_keys_cannot_carry_separators() -> None:
    assert format_pairs([('a b="c', "v"), ("", "w"), ("ok.k-1_", "x")]) == \
        'a_b__c=v _=w ok.k-1_=x'


def test_quote_and_value() -> None:
    assert quote('a"b\\c\nd\x01') == '"a\\"b\\\\c\\nd\\u0001"'
    assert value("plain") == "plain"
    assert value("a=b") == '"a=b"'
    assert value("") == '""'


@pytest.mark.parametrize("line", ['k="unterminated', 'k="bad\\q"', 'k="\\u12"', "=v",
                                  'k="a"b', "no pair"])
def test_parse_rejects_malformed_lines(line: str) -> None:
    with pytest.raises(ValueError, match="logfmt"):
        parse(line)


@given(st.lists(st.tuples(st.from_regex(r"[a-z_][a-z0-9_.\-]{0,8}", fullmatch=True),
                          st.text()), max_size=5))
def test_any_text_round_trips(pairs: list[tuple[str, str]]) -> None:
    line = format_pairs(pairs)
    assert "\n" not in line and "\r" not in line and len(line.splitlines()) <= 1
    assert parse(line) == pairs
