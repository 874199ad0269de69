"""A small client of etcd's v3 API through its JSON gateway (``/v3/...``), over httpx.

etcd serves every v3 RPC as JSON on its client port (grpc-gateway): keys and values
are base64, 64-bit integers are strings, a streaming RPC (Watch) is one JSON object
per line of a long response. That is all the agent needs (range, txn, put,
deleterange, watch, compaction, status), so it speaks that instead of depending on
gRPC and generated stubs: httpx is already a dependency, and the kube client uses
the same machinery.

Errors:

* :class:`Unavailable` -- no endpoint could be reached or the request timed out: the
  caller backs off and tries again (each failure moves on to the next endpoint);
* :class:`Compacted` -- a read at, or a watch from, a revision etcd has compacted
  away: the caller lists again;
* :class:`EtcdError` -- anything else etcd answered with (its gRPC code and message).
"""

from __future__ import annotations

import base64
import contextlib
import json
import ssl
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

MAX_TXN_OPS = 128  # etcd's default --max-txn-ops: operations of one side of a txn


class EtcdError(Exception):
    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class Unavailable(EtcdError):
    """etcd could not be reached, or did not answer in time."""


class Compacted(EtcdError):
    """The revision asked for is older than etcd's compacted history."""

    def __init__(self, message: str, revision: int = 0) -> None:
        super().__init__(message, 11)
        self.revision = revision


def b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def unb64(text: str | None) -> bytes:
    return base64.b64decode(text or "")


def prefix_end(prefix: str | bytes) -> bytes:
    """The range_end that makes [prefix, end) every key starting with prefix."""
    raw = bytearray(prefix.encode() if isinstance(prefix, str) else prefix)
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\0"  # every key


def _end_b64(prefix: str) -> str:
    return b64(prefix_end(prefix))


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int = 0
    version: int = 0
    lease: int = 0  # the lease the key lives under (0: none)

    @classmethod
    def of(cls, d: Mapping[str, Any]) -> KeyValue:
        return cls(unb64(d.get("key")).decode("utf-8", "replace"), unb64(d.get("value")),
                   int(d.get("mod_revision") or 0), int(d.get("create_revision") or 0),
                   int(d.get("version") or 0), int(d.get("lease") or 0))


@dataclass(frozen=True)
class Header:
    revision: int
    cluster_id: str

    @classmethod
    def of(cls, d: Any) -> Header:
        h = d if isinstance(d, Mapping) else {}
        return cls(int(h.get("revision") or 0), str(h.get("cluster_id") or ""))


@dataclass(frozen=True)
class Event:
    type: str  # "PUT" or "DELETE"
    kv: KeyValue


@dataclass(frozen=True)
class WatchResponse:
    header: Header
    events: tuple[Event, ...] = ()
    created: bool = False
    canceled: bool = False
    compact_revision: int = 0
    cancel_reason: str = ""

    @property
    def progress(self) -> bool:
        """A progress notification: every event up to header.revision was sent."""
        return not (self.events or self.created or self.canceled)


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TlsConfig:
    cert: str | None = None
    key: str | None = None
    ca: str | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca)
        if self.cert:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx


class EtcdClient:
    """etcd's v3 API over JSON; thread-safe (one httpx pool shared by the threads).

    ``endpoints`` are tried in turn: a connection failure moves on to the next one,
    so any member of a cluster serves.
    """

    def __init__(self, endpoints: Sequence[str], *, timeout: float = 5.0,
                 tls: TlsConfig | None = None) -> None:
        if not endpoints:
            raise EtcdError("no etcd endpoint given")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self._at = 0
        self._lock = threading.Lock()
        verify: ssl.SSLContext | bool = True
        if tls is not None or any(e.startswith("https:") for e in self.endpoints):
            verify = (tls or TlsConfig()).context()
        self._http = httpx.Client(timeout=httpx.Timeout(timeout), verify=verify)
        self._streams: set[httpx.Response] = set()
        self._closed = False

    @property
    def server(self) -> str:
        """The endpoint in use (for logs and status)."""
        return self.endpoints[self._at % len(self.endpoints)]

    def _failed_over(self, at: int) -> None:
        with self._lock:
            if self._at == at:
                self._at = (at + 1) % len(self.endpoints)

    def close(self) -> None:
        """Close the pool; a watch blocked in a read ends with it."""
        self._closed = True
        with self._lock:
            streams = list(self._streams)
        for r in streams:
            with contextlib.suppress(Exception):  # a stream another thread reads
                r.close()
        self._http.close()

    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- unary calls --------------------------------------------------------------------

    def call(self, path: str, body: Mapping[str, Any],
             timeout: float | None = None) -> dict[str, Any]:
        """POST one JSON request to the current endpoint, or the next ones if it cannot
        be reached; etcd's error answers raised as EtcdError (Compacted for code 11
        about a compacted revision)."""
        last = ""
        for _ in range(len(self.endpoints)):
            at = self._at
            base = self.endpoints[at % len(self.endpoints)]
            try:
                resp = self._http.post(base + path, json=dict(body),
                                       timeout=timeout or self.timeout)
            except httpx.TimeoutException as e:
                # The request may have been applied: say so, never retry a write blindly.
                self._failed_over(at)
                raise Unavailable(f"{base}: no answer in {timeout or self.timeout:g}s "
                                  f"({type(e).__name__})") from None
            except (httpx.TransportError, RuntimeError) as e:
                if self._closed:
                    raise Unavailable("client closed") from None
                last = f"{base}: {_describe(e)}"
                self._failed_over(at)
                continue
            return _answer(resp, base)
        raise Unavailable(last or "no endpoint")

    def range(self, key: str, end: str | bytes | None = None, *, prefix: bool = False,
              revision: int = 0, limit: int = 0) -> tuple[Header, list[KeyValue], bool]:
        body: dict[str, Any] = {"key": b64(key)}
        if prefix:
            body["range_end"] = _end_b64(key)
        elif end is not None:
            body["range_end"] = b64(end)
        if revision:
            body["revision"] = str(revision)
        if limit:
            body["limit"] = str(limit)
        out = self.call("/v3/kv/range", body)
        return (Header.of(out.get("header")), [KeyValue.of(kv) for kv in out.get("kvs") or ()],
                bool(out.get("more")))

    def list_prefix(self, prefix: str, page: int = 1000) -> tuple[Header, list[KeyValue]]:
        """Every key under ``prefix`` at one revision (pages read at the first page's
        revision: one consistent snapshot; Compacted if it is compacted meanwhile)."""
        header, kvs, more = self.range(prefix, prefix=True, limit=page)
        items = list(kvs)
        end = prefix_end(prefix)
        while more and kvs:
            start = kvs[-1].key + "\0"
            _, kvs, more = self.range(start, end, revision=header.revision, limit=page)
            items += kvs
        return header, items

    def get(self, key: str) -> KeyValue | None:
        _, kvs, _ = self.range(key)
        return kvs[0] if kvs else None

    def put(self, key: str, value: str | bytes) -> int:
        out = self.call("/v3/kv/put", {"key": b64(key), "value": b64(value)})
        return Header.of(out.get("header")).revision

    def delete(self, key: str, *, prefix: bool = False) -> int:
        body: dict[str, Any] = {"key": b64(key)}
        if prefix:
            body["range_end"] = _end_b64(key)
        out = self.call("/v3/kv/deleterange", body)
        return Header.of(out.get("header")).revision

    def txn(self, compare: Sequence[Mapping[str, Any]], success: Sequence[Mapping[str, Any]],
            failure: Sequence[Mapping[str, Any]] = ()) -> TxnResult:
        out = self.call("/v3/kv/txn", {"compare": list(compare), "success": list(success),
                                       "failure": list(failure)})
        return TxnResult(bool(out.get("succeeded")), Header.of(out.get("header")).revision,
                         list(out.get("responses") or ()))

    def compact(self, revision: int) -> None:
        self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    def status(self) -> dict[str, Any]:
        return self.call("/v3/maintenance/status", {})

    # ---- watch --------------------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int, *, read_timeout: float,
              progress_notify: bool = True) -> Iterator[WatchResponse]:
        """Watch every key under ``prefix`` from ``start_revision``, one WatchResponse at
        a time, until the stream ends (a clean end returns), breaks (Unavailable), is
        silent for ``read_timeout`` seconds (Unavailable, ``stalled``), or the server
        cancels it (a compacted start: Compacted; otherwise EtcdError)."""
        at = self._at
        base = self.endpoints[at % len(self.endpoints)]
        body = {"create_request": {"key": b64(prefix), "range_end": _end_b64(prefix),
                                   "start_revision": str(start_revision),
                                   "progress_notify": progress_notify}}
        timeout = httpx.Timeout(self.timeout, read=read_timeout)
        try:
            with self._http.stream("POST", base + "/v3/watch", json=body,
                                   timeout=timeout) as resp:
                if resp.status_code != 200:
                    resp.read()
                    _answer(resp, base)
                with self._lock:
                    self._streams.add(resp)
                try:
                    yield from _watch_lines(resp, base)
                finally:
                    with self._lock:
                        self._streams.discard(resp)
        except httpx.ReadTimeout:
            raise Stalled(f"{base}: watch silent for {read_timeout:g}s") from None
        except httpx.TimeoutException as e:
            self._failed_over(at)
            raise Unavailable(f"{base}: {type(e).__name__}") from None
        except (httpx.TransportError, RuntimeError) as e:
            if not self._closed:
                self._failed_over(at)
            raise Unavailable(f"{base}: {_describe(e)}") from None


class Stalled(Unavailable):
    """A watch that delivered nothing for its read timeout (the watchdog)."""


def _watch_lines(resp: httpx.Response, base: str) -> Iterator[WatchResponse]:
    for line in resp.iter_lines():
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
        except ValueError:
            raise Unavailable(f"{base}: a torn watch message") from None
        if not isinstance(msg, dict):
            raise Unavailable(f"{base}: a watch message that is not an object")
        if "error" in msg and "result" not in msg:
            err = msg["error"]
            text = err.get("message") if isinstance(err, dict) else str(err)
            raise EtcdError(f"{base}: watch: {text}")
        r = msg.get("result")
        if not isinstance(r, dict):
            continue
        events = tuple(Event(str(ev.get("type") or "PUT"), KeyValue.of(ev.get("kv") or {}))
                       for ev in r.get("events") or ())
        wr = WatchResponse(Header.of(r.get("header")), events, bool(r.get("created")),
                           bool(r.get("canceled")), int(r.get("compact_revision") or 0),
                           str(r.get("cancel_reason") or ""))
        if wr.compact_revision:
            raise Compacted(f"{base}: watch start compacted (history begins at "
                            f"{wr.compact_revision})", wr.compact_revision)
        if wr.canceled:
            raise EtcdError(f"{base}: watch canceled: {wr.cancel_reason or 'no reason'}")
        yield wr


def _answer(resp: httpx.Response, base: str) -> dict[str, Any]:
    try:
        out = resp.json()
    except ValueError:
        out = None
    if resp.status_code == 200 and isinstance(out, dict):
        return out
    msg = (out.get("message") or out.get("error")) if isinstance(out, dict) else None
    code = int(out.get("code") or 0) if isinstance(out, dict) else 0
    text = f"{base}: HTTP {resp.status_code}: {msg or resp.text[:200]}"
    if code == 11 and msg and "compacted" in msg:
        raise Compacted(text)
    if resp.status_code in (502, 503, 504) or code == 14:  # UNAVAILABLE: no leader, ...
        raise Unavailable(text, code)
    raise EtcdError(text, code)


def _describe(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) < 200 else text[:200] + "..."
