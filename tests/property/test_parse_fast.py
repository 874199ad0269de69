"""The fast loading paths against the reference loader.

`parse_documents` reads JSON with `json` and other YAML with libyaml's parser;
`parse_documents_reference` is PyYAML's pure-Python loader, whose behaviour
(YAML 1.1 scalars, a key twice refused, timestamps as strings, its error
messages) is the contract. Same documents or the same error, for manifests
written every usual way, for arbitrary JSON values, and for token soup.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from tests.property.strategies import DEFAULT, DENSE, cluster_manifests, clusters

from stockade.errors import InputError
from stockade.model import jsonkeys
from stockade.model.parse import parse_documents, parse_documents_reference


@pytest.fixture(autouse=True, scope="module")
def _every_text_counted() -> Iterator[None]:
    """Texts of any size take the counting path (it is skipped below `SMALL`)."""
    small, jsonkeys.SMALL = jsonkeys.SMALL, 0
    yield
    jsonkeys.SMALL = small


def outcome(parse: Any, text: str) -> Any:
    try:
        return ("ok", parse(text, "f"))
    except InputError as exc:
        return ("error", str(exc))


def same(text: str) -> None:
    fast, ref = outcome(parse_documents, text), outcome(parse_documents_reference, text)
    assert repr(fast) == repr(ref), text[:400]


@given(st.sampled_from([DEFAULT, DENSE]).flatmap(clusters).flatmap(cluster_manifests),
       st.sampled_from(["json", "json-indent", "json-list", "yaml", "yaml-flow", "yaml-list"]))
def test_manifests(docs: list[dict[str, Any]], style: str) -> None:
    if style == "json":
        texts = [json.dumps(d, ensure_ascii=False) for d in docs]
    elif style == "json-indent":
        texts = [json.dumps(d, indent=2) for d in docs]
    elif style == "json-list":
        texts = [json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})]
    elif style == "yaml":
        texts = [yaml.safe_dump_all(docs, allow_unicode=True)]
    elif style == "yaml-flow":
        texts = [yaml.safe_dump_all(docs, default_flow_style=True)]
    else:
        texts = [yaml.safe_dump({"kind": "List", "items": docs})]
    for text in texts:
        same(text)


scalars = (st.none() | st.booleans() | st.integers()
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
           | st.sampled_from(["1e5", "yes", "on", "2001-01-01", "0x1f", "017", "~", "<<"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                      max_leaves=20)


@given(st.dictionaries(st.text(max_size=6), values, max_size=5) | st.lists(values, max_size=4),
       st.booleans(), st.sampled_from([None, 1, "\t"]))
def test_json_values(value: Any, ascii_only: bool, indent: Any) -> None:
    same(json.dumps(value, ensure_ascii=ascii_only, indent=indent))


@given(st.lists(st.sampled_from(['{', '}', '[', ']', ':', ',', '"a"', '"a\\u00e9"', ' ', '\n',
                                 '\t', '1', '1e5', '-0', '1.5E+3', 'NaN', '-Infinity', 'true',
                                 'null', '"\\ud800"', '"\u0085"', '\x7f', '"a"\n', '---\n',
                                 '#', 'a', '- ', '&x ', '*x', '!!int ', '"x\\"y"',
                                 '"a\\u003a"', '"\\\\u003A"', '"a:"']),
                max_size=24).map("".join))
def test_token_soup(text: str) -> None:
    same(text)


def test_json_numbers_read_as_yaml_1_1() -> None:
    (doc,) = parse_documents('{"a": [1e5, 1.5e10, 1.5e+10, -0, 2, NaN, Infinity]}')
    assert doc["a"][:2] == ["1e5", "1.5e10"] and doc["a"][3:5] == [0, 2]
    assert math.isclose(doc["a"][2], 1.5e10) and doc["a"][5:] == ["NaN", "Infinity"]
