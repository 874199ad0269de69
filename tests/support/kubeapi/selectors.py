"""Label and field selectors, parsed as the API server parses them.

Label selectors: ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``,
``k`` (exists) and ``!k`` (does not exist), joined by commas (an AND). ``!=`` and
``notin`` also match objects without the label, as in the real server.

Field selectors: ``path=value``, ``path==value``, ``path!=value``, joined by commas.
Only the fields the real server supports for the resource may be used (every
resource: ``metadata.name`` and ``metadata.namespace``; more per resource, see
``resources.FIELD_LABELS``); any other is a 400 "field label not supported".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from .errors import bad_request

Predicate = Callable[[Mapping[str, Any]], bool]

_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"
_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_KEY_RE = re.compile(rf"^{_KEY}$")
_VALUE_RE = re.compile(rf"^{_VALUE}$")


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _check_key(key: str, text: str) -> None:
    if not _KEY_RE.match(key):
        raise bad_request(f"unable to parse requirement: invalid label key {key!r} in {text!r}")


def _check_value(value: str, text: str) -> None:
    if len(value) > 63 or not _VALUE_RE.match(value):
        raise bad_request(f"unable to parse requirement: invalid label value {value!r} in {text!r}")


_SET_RE = re.compile(r"^(?P<key>\S+)\s+(?P<op>in|notin)\s*\((?P<values>[^)]*)\)$")


def _label_requirement(req: str, text: str) -> Callable[[Mapping[str, str]], bool]:
    m = _SET_RE.match(req)
    if m:
        key, op = m["key"], m["op"]
        _check_key(key, text)
        values = frozenset(v.strip() for v in m["values"].split(",") if v.strip())
        for v in values:
            _check_value(v, text)
        if op == "in":
            return lambda labels: key in labels and labels[key] in values
        return lambda labels: key not in labels or labels[key] not in values
    for op in ("!=", "==", "="):
        if op in req:
            key, _, value = req.partition(op)
            key, value = key.strip(), value.strip()
            _check_key(key, text)
            _check_value(value, text)
            if op == "!=":
                return lambda labels: labels.get(key) != value
            return lambda labels: key in labels and labels[key] == value
    if req.startswith("!"):
        key = req[1:].strip()
        _check_key(key, text)
        return lambda labels: key not in labels
    _check_key(req, text)
    return lambda labels: req in labels


def parse_label_selector(text: str | None) -> Predicate | None:
    """A predicate over objects, or None when the selector selects everything."""
    if not text or not text.strip():
        return None
    reqs = [_label_requirement(r, text) for r in _split_top(text)]

    def match(obj: Mapping[str, Any]) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all(r(labels) for r in reqs)

    return match


def field_value(obj: Mapping[str, Any], path: str) -> str:
    """The string form of a dotted field path, as the server compares it ("" if absent)."""
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return ""
        cur = cur[part]
    if isinstance(cur, bool):
        return "true" if cur else "false"
    if cur is None:
        return ""
    return str(cur)


def parse_field_selector(text: str | None, supported: frozenset[str]) -> Predicate | None:
    """A predicate over objects, or None when the selector selects everything."""
    if not text or not text.strip():
        return None
    reqs: list[tuple[str, bool, str]] = []
    for req in _split_top(text):
        for op in ("!=", "==", "="):
            if op in req:
                path, _, value = req.partition(op)
                path, value = path.strip(), value.strip()
                break
        else:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{req}'")
        if path not in supported:
            raise bad_request(f"field label not supported: {path}")
        reqs.append((path, op != "!=", value))

    def match(obj: Mapping[str, Any]) -> bool:
        return all((field_value(obj, p) == v) == eq for p, eq, v in reqs)

    return match


def field_selector_names(text: str | None) -> dict[str, str]:
    """The ``path=value`` equalities of a field selector (for quick lookups by name)."""
    out: dict[str, str] = {}
    if not text:
        return out
    for req in _split_top(text):
        if "!=" in req:
            continue
        path, _, value = req.replace("==", "=").partition("=")
        out[path.strip()] = value.strip()
    return out
