"""The agent's local API: a small versioned JSON protocol over a unix socket (pure).

One request per line, one response per line, several per connection:

    → {"v": 1, "op": "apply", "args": {...}}
    ← {"v": 1, "ok": true, "result": {...}}
    ← {"v": 1, "ok": false, "error": {"code": "invalid", "message": "...", "lines": [...]}}

Operations (args → result):

    status                                    → {ready, inSync, revision, appliedRevision,
                                                 lastApply, counts, driftRepairs,
                                                 lastVerified, datapath}
    apply        {documents, source, sync}    → {created, configured, unchanged, revision}
    delete       {documents | refs, sync}     → {deleted, missing, revision}
    get          {kind}                       → {items}   kind: namespaces|endpoints|policies|chains
    label        {kind, name, set, remove}    → {revision}   kind: namespace|endpoint
    snapshot.save                             → {snapshot}
    snapshot.restore {snapshot, sync}         → {revision}
    endpoint.add {endpoint, sync}             → {revision}   (an EndpointRecord dict)
    endpoint.remove {key, sync}               → {removed, revision}
    ipam.allocate {owner}                     → {address, gateway, subnet}
    ipam.release {owner}                      → {address}
    run          {namespace, name, labels, ports, command, cwd, env}
                                              → {endpoint, pid, log}
    ps           {all}                        → {items, exited}
    rm           {key, grace}                 → {removed, exitCode}
    flows        {since, limit}               → {items, next}
    cni.add / cni.del / cni.check / cni.gc / cni.status   (stockade.agent.cni_ops)
    cni.exec   a whole plugin invocation, for the thin plugin (stockade.cni.thin)

`sync` (default true) makes a changing call return only once the kernel
enforces the change (or fail with code "timeout").

`OPS` names every operation; a request naming another is refused here. The
agent serves them from one table (`Service.table`); how to add an operation:
:mod:`stockade.agent.extension`. tests/unit/test_agent_operations.py checks
that OPS and the table of a fully wired agent agree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stockade.errors import AgentError
from stockade.model.jsonkeys import unique_keys

VERSION = 1
MAX_LINE = 64 * 1024 * 1024  # snapshots of large hosts travel in one line
MAX_DEPTH = 64  # nesting of a request's JSON; the deepest legitimate one is about 15
MAX_INT = 2**63 - 1  # integers beyond 64 bits fit no field (and no SQLite column)

# error codes
INVALID = "invalid"  # the request's content is wrong (validation errors in `lines`)
NOT_FOUND = "not_found"
BAD_REQUEST = "bad_request"  # unknown op, wrong arguments, wrong version
UNAVAILABLE = "unavailable"  # not ready yet, or shutting down: try again
TIMEOUT = "timeout"  # the change was stored but not yet enforced in time
INTERNAL = "internal"

# Every operation the agent serves (its one table; see agent/extension.py).
OPS = (
    "status", "apply", "delete", "get", "label", "snapshot.save", "snapshot.restore",
    "endpoint.add", "endpoint.remove", "ipam.allocate", "ipam.release", "run", "ps", "rm",
    "flows", "cni.add", "cni.del", "cni.check", "cni.gc", "cni.status", "cni.exec",
    "cni.attached",
)


@dataclass(frozen=True)
class Request:
    op: str
    args: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return (json.dumps({"v": VERSION, "op": self.op, "args": self.args},
                           separators=(",", ":")) + "\n").encode()


class ApiError(AgentError):
    """An error the agent answered with; `lines` carries one line per problem."""

    def __init__(self, code: str, message: str, lines: list[str] | None = None) -> None:
        self.code = code
        self.message = message
        self.lines = list(lines or [])
        super().__init__(message)

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "lines": self.lines}


class Args:
    """A request's arguments read with their types: a wrong type is the client's error.

    Every operation reads its arguments through this, so `{"sync": "no"}` or
    `{"name": 5}` answers `bad_request` naming the argument, never `internal`.
    """

    def __init__(self, raw: Mapping[str, Any], op: str = "") -> None:
        self.raw = raw
        self.op = op

    def _bad(self, key: str, want: str) -> ApiError:
        where = f"{self.op}: " if self.op else ""
        return ApiError(BAD_REQUEST, f"{where}args.{key} must be {want}")

    def _get(self, key: str, types: type | tuple[type, ...], want: str) -> Any:
        value = self.raw.get(key)
        if value is None:
            return None
        # bool is an int in Python; a JSON true is never a number here.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in (
                types if isinstance(types, tuple) else (types,))):
            raise self._bad(key, want)
        return value

    def text(self, key: str, default: str = "") -> str:
        value = self._get(key, str, "a string")
        return default if value is None else str(value)

    def flag(self, key: str, default: bool = False) -> bool:
        value = self._get(key, bool, "true or false")
        return default if value is None else bool(value)

    def integer(self, key: str, default: int = 0, *, lo: int = 0, hi: int = 2**31 - 1) -> int:
        value = self._get(key, int, "an integer")
        if value is None:
            return default
        if not lo <= value <= hi:
            raise self._bad(key, f"an integer from {lo} to {hi}")
        return int(value)

    def number(self, key: str, default: float = 0.0, *, lo: float = 0.0,
              hi: float = 86400.0) -> float:
        value = self._get(key, (int, float), "a number")
        if value is None:
            return default
        if not lo <= value <= hi:
            raise self._bad(key, f"a number from {lo:g} to {hi:g}")
        return float(value)

    def items(self, key: str) -> list[Any]:
        value = self._get(key, list, "a list")
        return [] if value is None else list(value)

    def mapping(self, key: str) -> dict[str, Any]:
        value = self._get(key, dict, "an object")
        return {} if value is None else dict(value)

    def texts(self, key: str) -> list[str]:
        items = self.items(key)
        if not all(isinstance(x, str) for x in items):
            raise self._bad(key, "a list of strings")
        return items

    def text_map(self, key: str) -> dict[str, str]:
        mapping = self.mapping(key)
        if not all(isinstance(v, str) for v in mapping.values()):
            raise self._bad(key, "an object of strings")
        return mapping


_BRACKETS_ONLY = bytes(b for b in range(256) if b not in b'"[]{}')


def _too_deep(line: bytes | bytearray, limit: int = MAX_DEPTH) -> bool:
    """True when the JSON text nests deeper than `limit` (every step at C speed).

    Escapes are removed first (a run of backslashes pairs off from the left, as
    JSON reads it), then everything but quotes and brackets; what lies between
    quotes is inside strings. Removing innermost pairs `[]` and `{}` once per
    level empties a text of depth `limit` in `limit` rounds. Unbalanced text is
    left to the JSON parser to refuse.
    """
    if line.count(b"[") + line.count(b"{") <= limit:
        return False
    text = line
    if b"\\\\" in text:
        text = text.replace(b"\\\\", b"")
    if b'\\"' in text:
        text = text.replace(b'\\"', b"")
    # Quotes alternate opening and closing, so two adjacent ones can go: either an
    # empty string, or the end of one and the start of the next, merged into one.
    marks = text.translate(None, _BRACKETS_ONLY).replace(b'""', b"")
    brackets = b"".join(marks.split(b'"')[::2]) if b'"' in marks else marks
    for _ in range(limit):
        shorter = brackets.replace(b"[]", b"").replace(b"{}", b"")
        if shorter == brackets:
            return False  # unbalanced: not JSON, which the parser says
        brackets = shorter
        if not brackets:
            return False
    return True


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        keys = [k for k, _ in pairs]
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ApiError(BAD_REQUEST, f"the request repeats the key {dup!r} in one object")
    return obj


def _int(text: str) -> int:
    if len(text) > 20 or not -MAX_INT - 1 <= (value := int(text)) <= MAX_INT:
        raise ApiError(BAD_REQUEST, f"the number {text[:24]}{'…' if len(text) > 24 else ''} "
                                    "is out of range (64-bit integers)")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ApiError(BAD_REQUEST, f"the number {text[:24]} is out of range")
    return value


def _constant(text: str) -> Any:
    raise ApiError(BAD_REQUEST, f"{text} is not JSON")


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def decode_request(line: bytes | bytearray) -> Request:
    """A request line, or ApiError(bad_request) saying what is wrong with it.

    Strict: UTF-8 only (no lone surrogates, even escaped), no NaN or Infinity,
    integers within 64 bits, no key twice in one object, nesting within
    MAX_DEPTH. What fits is what every operation can store and echo back.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(BAD_REQUEST, "the request is not UTF-8 text") from None
    if _too_deep(line):
        raise ApiError(BAD_REQUEST, f"the request nests deeper than {MAX_DEPTH} levels")
    try:
        raw = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
        if not unique_keys(text, raw):  # then the hook finds the key given twice
            raw = json.loads(text, object_pairs_hook=_object, parse_int=_int,
                             parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise ApiError(BAD_REQUEST, f"the request nests deeper than {MAX_DEPTH} levels") \
            from None
    except ValueError:
        raise ApiError(BAD_REQUEST, "the request is not JSON") from None
    if ("\\ud" in text or "\\uD" in text) and _has_lone_surrogate(raw):
        raise ApiError(BAD_REQUEST, "the request is not valid Unicode (a lone surrogate)")
    del text
    if not isinstance(raw, dict) or type(raw.get("v")) is not int or raw["v"] != VERSION:
        raise ApiError(BAD_REQUEST, f"unsupported protocol version (want {VERSION})")
    op, args = raw.get("op"), raw.get("args", {})
    if op not in OPS:
        raise ApiError(BAD_REQUEST, f"unknown operation {op!r}")
    if not isinstance(args, dict):
        raise ApiError(BAD_REQUEST, "args must be an object")
    return Request(op, args)


def encode_result(result: Any) -> bytes:
    return (json.dumps({"v": VERSION, "ok": True, "result": result},
                       separators=(",", ":")) + "\n").encode()


def encode_error(err: ApiError) -> bytes:
    return (json.dumps({"v": VERSION, "ok": False, "error": err.to_dict()},
                       separators=(",", ":")) + "\n").encode()


def decode_response(line: bytes) -> Any:
    """The result of a response line, or raise the ApiError it carries."""
    try:
        raw = json.loads(line)
    except ValueError:
        raise ApiError(INTERNAL, "the agent's answer is not JSON") from None
    if not isinstance(raw, dict) or raw.get("v") != VERSION:
        raise ApiError(BAD_REQUEST, "the agent speaks another protocol version")
    if raw.get("ok"):
        return raw.get("result")
    err = raw.get("error") or {}
    raise ApiError(str(err.get("code", INTERNAL)), str(err.get("message", "error")),
                   [str(x) for x in err.get("lines", [])])
