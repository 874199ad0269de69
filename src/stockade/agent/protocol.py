"""The agent's local API: a small versioned JSON protocol over a unix socket (pure).

One request per line, one response per line, several per connection:

    → {"v": 1, "op": "apply", "args": {...}}
    ← {"v": 1, "ok": true, "result": {...}}
    ← {"v": 1, "ok": false, "error": {"code": "invalid", "message": "...", "lines": [...]}}

Operations (args → result):

    status                                    → {ready, inSync, revision, appliedRevision,
                                                 lastApply, counts, driftRepairs, datapath}
    apply        {documents, source, sync}    → {created, configured, unchanged, revision}
    delete       {documents | refs, sync}     → {deleted, missing, revision}
    get          {kind}                       → {items}      kind: namespaces|endpoints|policies
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

`sync` (default true) makes a changing call return only once the kernel
enforces the change (or fail with code "timeout").
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stockade.errors import AgentError

VERSION = 1
MAX_LINE = 64 * 1024 * 1024  # snapshots of large hosts travel in one line

# error codes
INVALID = "invalid"  # the request's content is wrong (validation errors in `lines`)
NOT_FOUND = "not_found"
BAD_REQUEST = "bad_request"  # unknown op, wrong arguments, wrong version
UNAVAILABLE = "unavailable"  # not ready yet, or shutting down: try again
TIMEOUT = "timeout"  # the change was stored but not yet enforced in time
INTERNAL = "internal"

OPS = (
    "status", "apply", "delete", "get", "label", "snapshot.save", "snapshot.restore",
    "endpoint.add", "endpoint.remove", "ipam.allocate", "ipam.release", "run", "ps", "rm",
    "flows", "cni.add", "cni.del", "cni.check", "cni.gc", "cni.status",
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

    def str(self, key: str, default: str = "") -> str:
        value = self._get(key, str, "a string")
        return default if value is None else str(value)

    def bool(self, key: str, default: bool = False) -> bool:
        value = self._get(key, bool, "true or false")
        return default if value is None else bool(value)

    def int(self, key: str, default: int = 0, *, lo: int = 0, hi: int = 2**31 - 1) -> int:
        value = self._get(key, int, "an integer")
        if value is None:
            return default
        if not lo <= value <= hi:
            raise self._bad(key, f"an integer from {lo} to {hi}")
        return int(value)

    def float(self, key: str, default: float = 0.0, *, lo: float = 0.0,
              hi: float = 86400.0) -> float:
        value = self._get(key, (int, float), "a number")
        if value is None:
            return default
        if not lo <= value <= hi:
            raise self._bad(key, f"a number from {lo:g} to {hi:g}")
        return float(value)

    def list(self, key: str) -> list[Any]:
        value = self._get(key, list, "a list")
        return [] if value is None else list(value)

    def dict(self, key: str) -> dict[str, Any]:
        value = self._get(key, dict, "an object")
        return {} if value is None else dict(value)

    def str_list(self, key: str) -> list[str]:
        items = self.list(key)
        if not all(isinstance(x, str) for x in items):
            raise self._bad(key, "a list of strings")
        return items

    def str_map(self, key: str) -> dict[str, str]:
        items = self.dict(key)
        if not all(isinstance(v, str) for v in items.values()):
            raise self._bad(key, "an object of strings")
        return items


def decode_request(line: bytes) -> Request:
    try:
        raw = json.loads(line)
    except ValueError:
        raise ApiError(BAD_REQUEST, "the request is not JSON") from None
    if not isinstance(raw, dict) or raw.get("v") != VERSION:
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
