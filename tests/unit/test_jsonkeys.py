"""model/jsonkeys.py: a text with a key twice in an object is never vouched for."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stockade.model import jsonkeys
from stockade.model.jsonkeys import unique_keys


@pytest.fixture(autouse=True, scope="module")
def _every_text_counted() -> Iterator[None]:
    """Texts of any size take the counting path (it is skipped below `SMALL`)."""
    small, jsonkeys.SMALL = jsonkeys.SMALL, 0
    yield
    jsonkeys.SMALL = small

# Keys and strings full of what could fool a count: colons, escaped colons, quotes,
# backslashes and the text of an escape.
TEXT = st.text(alphabet=st.sampled_from(['a', ':', '"', '\\', 'u', '0', '3', 'A', 'é']),
               max_size=8)
LEAF = st.none() | st.booleans() | st.integers(-10, 10) | TEXT
VALUE = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(TEXT, inner, max_size=4), max_leaves=20)


def _encode(value: Any, *, escape_colons: bool, twice: list[int]) -> str:
    """JSON text of `value`; `twice`: a countdown, the object at 0 gets a key again
    (then `twice[0]` is set to -100)."""
    if isinstance(value, dict):
        items = [_string(k, escape_colons) + ": "
                 + _encode(v, escape_colons=escape_colons, twice=twice) for k, v in value.items()]
        twice[0] -= 1
        if twice[0] == 0 and value:
            k, v = next(iter(value.items()))
            items.append(f"{_string(k, escape_colons)}: {json.dumps(v)}")
            twice[0] = -100
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_encode(v, escape_colons=escape_colons, twice=twice)
                               for v in value) + "]"
    return _string(value, escape_colons) if isinstance(value, str) else json.dumps(value)


def _string(s: str, escape_colons: bool) -> str:
    text = json.dumps(s, ensure_ascii=False)
    return text.replace(":", "\\u003a") if escape_colons else text


@given(VALUE, st.booleans())
def test_a_text_without_a_key_twice_is_vouched_for_unless_it_has_an_escape_text(
        value: Any, escape_colons: bool) -> None:
    """Only a text holding `\\u003a` or `\\u003A` (an escaped colon, or a backslash
    escaped before the text `u003a`) may be left to the hook."""
    text = _encode(value, escape_colons=escape_colons, twice=[-1])
    assert json.loads(text) == value
    assert unique_keys(text, value) or "\\u003" in text


@given(VALUE, st.integers(1, 6), st.booleans())
def test_a_key_twice_is_never_vouched_for(value: Any, which: int, escape_colons: bool) -> None:
    twice = [which]
    text = _encode(value, escape_colons=escape_colons, twice=twice)
    if twice[0] != -100:
        return  # no non-empty object where the countdown ended: nothing given twice
    duplicated = json.loads(text)
    assert not unique_keys(text, duplicated)


def test_escaped_colons_and_a_key_twice_do_not_cancel_out() -> None:
    # One key twice (one colon more in the text) and one colon written as an escape
    # (one colon fewer): the counts alone would agree.
    text = '{"a": 1, "a": 2, "b": "x\\u003ay"}'
    assert not unique_keys(text, json.loads(text))
    assert unique_keys('{"a": 1, "b": "x\\u003ay"}', {"a": 1, "b": "x:y"})


def test_what_orjson_cannot_encode_is_not_vouched_for() -> None:
    assert not unique_keys('{"a": 123456789012345678901234567890}',
                           {"a": 123456789012345678901234567890})
