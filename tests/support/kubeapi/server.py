"""The HTTP front of the test double (:class:`KubeAPI`), its fault injection and Python API."""

from __future__ import annotations

import contextlib
import copy
import json
import select
import socket
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from . import protobuf
from .errors import (
    ApiError,
    bad_request,
    injected,
    method_not_allowed,
    not_found_path,
    unsupported_media_type,
)
from .resources import (
    CRD_STORAGE,
    REVIEWS,
    ResourceType,
    api_group,
    api_resource_list,
    openapi_v3_document,
    to_table,
)
from .selectors import field_selector_names, parse_field_selector, parse_label_selector
from .store import ListResult, Obj, Store, WatchFilter, iter_initial

VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0",
    "gitCommit": "kubeapi-test-double",
    "gitTreeState": "clean",
    "buildDate": "2024-12-11T00:00:00Z",
    "goVersion": "go1.23.4",
    "compiler": "gc",
    "platform": "linux/amd64",
}


def _pb_field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (payloads here are < 128 bytes)."""
    return bytes([(number << 3) | 2, len(payload)]) + payload


# An OpenAPI v2 document with no definitions, in the protobuf kubectl asks for
# (gnostic's openapi_v2.Document: swagger = 1, info = 2 {title = 1, version = 2}).
# kubectl skips client-side validation of kinds a schema does not define, and
# computes strategic merge patches from its compiled-in types; older kubectl
# (Debian's 1.20) needs the document to exist at all.
OPENAPI_V2 = _pb_field(1, b"2.0") + _pb_field(
    2, _pb_field(1, b"Kubernetes") + _pb_field(2, b"v1.32.0")
)
OPENAPI_V2_TYPE = "application/octet-stream"  # Go's mime parser rejects the "@v1.0+protobuf" name

PATCH_TYPES = {
    "application/json-patch+json": "json",
    "application/merge-patch+json": "merge",
    "application/strategic-merge-patch+json": "strategic",
    "application/apply-patch+yaml": "apply",
    "application/apply-patch+json": "apply",
}

_TRUE = ("1", "true", "True")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass
class _Failure:
    remaining: int
    code: int
    verb: str | None
    resource: str | None


@dataclass
class _Route:
    verb: str  # get list watch create update patch delete deletecollection, or "discovery"
    resource: str  # plural (with /subresource), or the discovery path
    t: ResourceType | None = None
    namespace: str = ""
    name: str = ""
    subresource: str = ""


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, api: KubeAPI) -> None:
        self.api = api
        self.connections: set[socket.socket] = set()
        self.conn_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.conn_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.conn_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def wake_all(self) -> None:
        """Unblock every handler waiting on a keep-alive connection (used at stop)."""
        with self.conn_lock:
            conns = list(self.connections)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without this, Nagle's algorithm and
        # the client's delayed ACK cost 40 ms a request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.api.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # ------------------------------------------------------------------ plumbing

    def _send(self, code: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, code: int, obj: Any) -> None:
        self._send(code, _dumps(obj))

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            return self.rfile.read(length)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return b""

    def _decode(self, raw: bytes, content_type: str) -> Any:
        if not raw:
            return None
        media = content_type.split(";")[0].strip().lower()
        if media == "application/vnd.kubernetes.protobuf":
            return protobuf.decode(raw)
        if (
            media not in ("", "json", "application/json", "application/yaml", "*/*")
            and media not in PATCH_TYPES
        ):
            raise unsupported_media_type(media)
        try:
            if "yaml" in content_type:
                return yaml.safe_load(raw)
            return json.loads(raw)
        except (ValueError, yaml.YAMLError) as e:
            raise bad_request(f"the body of the request could not be decoded: {e}") from None

    def _handle(self, method: str) -> None:
        api = self.server.api
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        raw = self._read_body()
        try:
            route = self._route(method, [unquote(s) for s in url.path.split("/") if s], query)
            api._record(route.verb, route.resource)
            delay = api._delay
            if delay:
                time.sleep(delay)
            failure = api._take_failure(route.verb, route.resource)
            if failure:
                raise injected(failure)
            self._serve(method, route, query, raw)
        except ApiError as e:
            self._send_json(e.code, e.status())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # a bug of the double: answer 500, keep the traceback for tests
            text = traceback.format_exc()
            api.internal_errors.append(text)
            sys.stderr.write(f"kubeapi double: internal error on {method} {self.path}\n{text}")
            if self._streaming:
                self.close_connection = True
            else:
                err = ApiError(
                    500,
                    "InternalError",
                    f"internal error in the API test double: {text.strip().splitlines()[-1]}",
                    {},
                )
                self._send_json(500, err.status())

    _streaming = False

    def _route(self, method: str, segs: list[str], query: dict[str, str]) -> _Route:
        api = self.server.api
        reg = api.store.registry
        if not segs or segs[0] not in ("api", "apis"):
            return _Route("discovery", "/" + "/".join(segs))
        if segs[0] == "api":
            if len(segs) < 2:
                return _Route("discovery", "/api")
            group, version, rest = "", segs[1], segs[2:]
        else:
            if len(segs) < 3:
                return _Route("discovery", "/" + "/".join(segs))
            group, version, rest = segs[1], segs[2], segs[3:]
        if not rest:
            return _Route("discovery", "/" + "/".join(segs))
        namespace = ""
        if (
            rest[0] == "namespaces"
            and len(rest) >= 3
            and not (len(rest) == 3 and rest[2] in ("status", "finalize"))
        ):
            namespace, rest = rest[1], rest[2:]
        if len(rest) > 3:
            raise not_found_path()
        with api.store.lock:
            t = reg.lookup(group, version, rest[0])
        if t is None or (namespace and not t.namespaced):
            raise not_found_path()
        name = rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        if sub and sub not in t.subresources:
            raise not_found_path()
        resource = t.plural + (f"/{sub}" if sub else "")
        if name:
            verb = {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method)
        else:
            if method == "GET":
                verb = "watch" if query.get("watch") in _TRUE else "list"
            else:
                verb = {"POST": "create", "DELETE": "deletecollection"}.get(method)
        if verb is None or (sub and verb not in ("get", "update", "patch")):
            raise method_not_allowed()
        if t.storage in REVIEWS and verb != "create":
            raise method_not_allowed()
        return _Route(verb, resource, t, namespace, name, sub)

    # ------------------------------------------------------------------ serving

    def _wants_table(self) -> bool:
        return "as=Table" in (self.headers.get("Accept") or "")

    def _manager(self, query: dict[str, str]) -> str:
        if query.get("fieldManager"):
            return query["fieldManager"]
        agent = self.headers.get("User-Agent") or "unknown"
        return agent.split("/", 1)[0]

    def _serve(self, method: str, route: _Route, query: dict[str, str], raw: bytes) -> None:
        api = self.server.api
        store = api.store
        if route.verb == "discovery":
            code, doc = api._discovery(route.resource, self.headers.get("Host", ""))
            if doc is OPENAPI_V2:
                self._send(code, doc, OPENAPI_V2_TYPE)
            elif isinstance(doc, bytes):
                self._send(code, doc, "text/plain; charset=utf-8")
            else:
                self._send_json(code, doc)
            return
        t = route.t
        assert t is not None
        ns = route.namespace
        dry_run = query.get("dryRun") == "All"
        if route.verb == "get":
            obj = store.get(t, ns, route.name)
            self._send_json(200, self._present(t, obj, single=True))
        elif route.verb == "list":
            label = parse_label_selector(query.get("labelSelector"))
            field = parse_field_selector(query.get("fieldSelector"), t.field_labels())
            limit = self._int(query.get("limit"), "limit")
            result = store.list(
                t,
                ns,
                label,
                field,
                limit,
                query.get("continue", ""),
                query.get("resourceVersion", ""),
                query.get("resourceVersionMatch", ""),
            )
            self._send(200, self._list_body(t, result))
        elif route.verb == "watch":
            self._watch(t, ns, query)
        elif route.verb == "create":
            if t.namespaced and not ns:
                raise not_found_path()
            body = self._decode(raw, self.headers.get("Content-Type", ""))
            if not isinstance(body, dict):
                raise bad_request("the body of the request is not an object")
            if t.storage in REVIEWS:
                self._send_json(201, _review(t, body))
                return
            obj = store.create(t, ns, body, manager=self._manager(query), dry_run=dry_run)
            self._send_json(201, self._present(t, obj, single=True))
        elif route.verb == "update":
            body = self._decode(raw, self.headers.get("Content-Type", ""))
            if not isinstance(body, dict):
                raise bad_request("the body of the request is not an object")
            obj = store.update(
                t,
                ns,
                route.name,
                body,
                manager=self._manager(query),
                subresource=route.subresource,
                dry_run=dry_run,
            )
            self._send_json(200, self._present(t, obj, single=True))
        elif route.verb == "patch":
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            kind = PATCH_TYPES.get(ctype)
            if kind is None:
                raise unsupported_media_type(ctype)
            body = self._decode(raw, ctype)
            manager = query.get("fieldManager", "") if kind == "apply" else self._manager(query)
            force = query.get("force") in _TRUE
            if force and kind != "apply":
                raise bad_request("force is only supported for apply requests")
            with store.lock:
                key = (ns if t.namespaced else "", route.name)
                existed = key in store.objects[t.storage]
                obj = store.patch(
                    t,
                    ns,
                    route.name,
                    kind,
                    body,
                    manager=manager,
                    subresource=route.subresource,
                    force=force,
                    dry_run=dry_run,
                )
            self._send_json(200 if existed else 201, self._present(t, obj, single=True))
        elif route.verb == "delete":
            opts = self._decode(raw, "json") or {}
            propagation = query.get("propagationPolicy") or opts.get("propagationPolicy") or ""
            if opts.get("orphanDependents") is True or query.get("orphanDependents") in _TRUE:
                propagation = "Orphan"
            obj = store.delete(
                t,
                ns,
                route.name,
                propagation=propagation,
                preconditions=opts.get("preconditions"),
                dry_run=dry_run,
            )
            self._send_json(200, self._present(t, obj, single=True))
        elif route.verb == "deletecollection":
            opts = self._decode(raw, "json") or {}
            label = parse_label_selector(query.get("labelSelector"))
            field = parse_field_selector(query.get("fieldSelector"), t.field_labels())
            items = store.delete_collection(
                t,
                ns,
                label,
                field,
                query.get("propagationPolicy") or opts.get("propagationPolicy") or "",
            )
            self._send(200, self._list_body(t, ListResult(items, store.rv)))
        else:  # pragma: no cover (the router only makes the verbs above)
            raise method_not_allowed()

    @staticmethod
    def _int(text: str | None, name: str) -> int:
        if not text:
            return 0
        try:
            return max(0, int(text))
        except ValueError:
            raise bad_request(f"invalid {name}: {text!r}") from None

    def _present(self, t: ResourceType, obj: Obj, *, single: bool) -> Obj:
        if obj.get("apiVersion") not in (None, t.api_version):
            obj = {**obj, "apiVersion": t.api_version}
        if single and self._wants_table():
            return to_table(
                t,
                [obj],
                self._include(),
                {"resourceVersion": obj["metadata"].get("resourceVersion", "")},
            )
        if self._wants_metadata():
            return _partial(obj)
        return obj

    def _wants_metadata(self) -> bool:
        """``Accept: ...;as=PartialObjectMetadata[List]`` (metadata-only clients)."""
        return "as=PartialObjectMetadata" in (self.headers.get("Accept") or "")

    def _include(self) -> str:
        return parse_qs(urlsplit(self.path).query).get("includeObject", ["Metadata"])[-1]

    def _list_body(self, t: ResourceType, result: ListResult) -> bytes:
        meta: Obj = {"resourceVersion": str(result.resource_version)}
        if result.continue_token:
            meta["continue"] = result.continue_token
        if result.remaining is not None:
            meta["remainingItemCount"] = result.remaining
        if self._wants_table():
            return _dumps(
                to_table(
                    t,
                    [self._present(t, o, single=False) for o in result.items],
                    self._include(),
                    meta,
                )
            )
        if self._wants_metadata():
            return _dumps(
                {
                    "kind": "PartialObjectMetadataList",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": meta,
                    "items": [_partial(o) for o in result.items],
                }
            )
        head = _dumps({"kind": t.list_kind, "apiVersion": t.api_version, "metadata": meta})
        items = b",".join(self.server.api._item_json(t, o) for o in result.items)
        return head[:-1] + b',"items":[' + items + b"]}"

    # ------------------------------------------------------------------ watch

    def _chunk(self, data: bytes) -> bool:
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            return True
        except OSError:
            return False

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if readable:
                return bool(self.connection.recv(1, socket.MSG_PEEK) == b"")
        except (OSError, ValueError):
            return True
        return False

    def _event_bytes(self, t: ResourceType, type_: str, obj: Obj) -> bytes:
        if type_ in ("ADDED", "MODIFIED", "DELETED"):
            obj = self._present(t, obj, single=True)
        return _dumps({"type": type_, "object": obj}) + b"\n"

    def _send_events(self, t: ResourceType, events: list[tuple[str, Obj]]) -> bool:
        """Encode (outside the store's lock: stored objects are immutable) and send, a few
        events per chunk, as the real server flushes when its queue is empty."""
        batch: list[bytes] = []
        size = 0
        for type_, obj in events:
            data = self._event_bytes(t, type_, obj)
            batch.append(data)
            size += len(data)
            if size >= 1 << 16:
                if not self._chunk(b"".join(batch)):
                    return False
                batch, size = [], 0
        return not batch or self._chunk(b"".join(batch))

    def _watch(self, t: ResourceType, ns: str, query: dict[str, str]) -> None:
        api = self.server.api
        store = api.store
        label = parse_label_selector(query.get("labelSelector"))
        field = parse_field_selector(query.get("fieldSelector"), t.field_labels())
        names = field_selector_names(query.get("fieldSelector"))
        flt = WatchFilter(
            t.storage, ns if t.namespaced else "", label, field, names.get("metadata.name", "")
        )
        rv_text = query.get("resourceVersion", "")
        bookmarks = query.get("allowWatchBookmarks") in _TRUE
        initial_events = query.get("sendInitialEvents") in _TRUE
        timeout = self._int(query.get("timeoutSeconds"), "timeoutSeconds")
        deadline = time.monotonic() + (timeout if timeout else api.watch_timeout)
        pending: list[tuple[str, Obj]] = []
        error: ApiError | None = None
        with store.lock:
            drop_gen = store.faults.drop_generation
            if rv_text in ("", "0") or initial_events:
                pending = [("ADDED", obj) for obj in iter_initial(store, flt)]
                cursor = store.rv
                if initial_events:
                    pending.append(("BOOKMARK", _bookmark(t, cursor, initial_end=True)))
            else:
                cursor = Store._parse_rv(rv_text)
                if cursor < store.compacted:
                    error = ApiError(
                        410, "Expired", f"too old resource version: {cursor} ({store.compacted})"
                    )
        if error is not None and api.watch_gone == "http":
            raise error
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self._streaming = True
        api._watch_opened()
        try:
            if error is not None:
                self._chunk(_dumps({"type": "ERROR", "object": error.status()}) + b"\n")
                self._chunk(b"")
                return
            if not self._send_events(t, pending):
                return
            self._stream(t, flt, cursor, bookmarks, deadline, drop_gen)
        finally:
            api._watch_closed()

    def _stream(
        self,
        t: ResourceType,
        flt: WatchFilter,
        cursor: int,
        bookmarks: bool,
        deadline: float,
        drop_gen: int,
    ) -> None:
        api = self.server.api
        store = api.store
        interval = api.bookmark_interval
        next_bookmark = time.monotonic() + interval
        while True:
            out: list[tuple[str, Obj]] = []
            end = ""
            with store.lock:
                while True:
                    now = time.monotonic()
                    faults = store.faults
                    if faults.drop_generation != drop_gen:
                        end = "drop"
                        break
                    if faults.stopping or now >= deadline:
                        end = "end"
                        break
                    if now < faults.stall_until:
                        store.cond.wait(min(faults.stall_until - now, 1.0))
                        next_bookmark = max(next_bookmark, faults.stall_until + interval)
                        continue
                    if cursor < store.compacted:
                        err = ApiError(
                            410,
                            "Expired",
                            f"too old resource version: {cursor} ({store.compacted})",
                        )
                        out.append(("ERROR", err.status()))
                        end = "end"
                        break
                    if store.rv > cursor:
                        events, current = store.events_after(cursor)
                        cursor = current
                        for ev in events:
                            converted = flt.convert(ev)
                            if converted is not None:
                                out.append(converted)
                        if out:
                            break
                    if store.registry.lookup(t.group, t.version, t.plural) is None:
                        end = "end"  # its CRD was deleted: the real server ends the watch too
                        break
                    if bookmarks and now >= next_bookmark:
                        next_bookmark = now + interval
                        out.append(("BOOKMARK", _bookmark(t, cursor)))
                        break
                    wake = min(deadline, next_bookmark if bookmarks else deadline, now + 0.5)
                    store.cond.wait(max(0.0, wake - now))
                    if self._client_gone():
                        end = "gone"
                        break
            if not self._send_events(t, out):
                return
            if end == "drop":
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            if end == "gone":
                self.close_connection = True
                return
            if end:
                self._chunk(b"")
                return


def _review(t: ResourceType, body: Obj) -> Obj:
    """The answer to an access review: there is no authorization, so everything is allowed."""
    if t.plural == "selfsubjectaccessreviews":
        status: Obj = {"allowed": True, "reason": "the API test double authorizes every request"}
    else:
        status = {
            "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}],
            "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
            "incomplete": False,
        }
    meta = body.get("metadata") or {}
    return {
        "kind": t.kind,
        "apiVersion": t.api_version,
        "metadata": {"creationTimestamp": None, **meta},
        "spec": body.get("spec") or {},
        "status": status,
    }


def _partial(obj: Obj) -> Obj:
    return {
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj["metadata"],
    }


def _bookmark(t: ResourceType, rv: int, initial_end: bool = False) -> Obj:
    meta: Obj = {"resourceVersion": str(rv)}
    if initial_end:
        meta["annotations"] = {"k8s.io/initial-events-end": "true"}
    return {"kind": t.kind, "apiVersion": t.api_version, "metadata": meta}


class KubeAPI:
    """A Kubernetes API server test double on 127.0.0.1 (ephemeral port); see the package doc."""

    def __init__(
        self,
        *,
        bookmark_interval: float = 1.0,
        watch_gone: str = "event",
        watch_timeout: float = 1800.0,
        history_limit: int | None = 100_000,
        gc_delay: float = 0.0,
        verbose: bool = False,
    ) -> None:
        if watch_gone not in ("event", "http"):
            raise ValueError("watch_gone is 'event' (the real server's way) or 'http'")
        self.store = Store(history_limit=history_limit)
        self.store.gc_delay = gc_delay
        self.bookmark_interval = bookmark_interval
        self.watch_gone = watch_gone
        self.watch_timeout = watch_timeout
        self.verbose = verbose
        self.requests: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._delay = 0.0
        self._failures: list[_Failure] = []
        self._open_watches = 0
        self.internal_errors: list[str] = []  # tracebacks of the double's own bugs (500s)
        self._json_cache: dict[tuple[Any, ...], tuple[tuple[str, str], bytes]] = {}
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._gc_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> KubeAPI:
        if self._httpd is not None:
            return self
        self._httpd = _HTTPServer(self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="kubeapi-double",
            daemon=True,
        )
        self._thread.start()
        if self.store.gc_delay > 0:
            self._gc_thread = threading.Thread(
                target=self._gc_loop, name="kubeapi-double-gc", daemon=True
            )
            self._gc_thread.start()
        return self

    def _gc_loop(self) -> None:
        store = self.store
        while True:
            due = store.collect_garbage(time.monotonic())
            with store.lock:
                if store.faults.stopping:
                    return
                wait = 0.5 if due is None else max(0.0, due - time.monotonic())
                store.cond.wait(min(wait, 0.5))

    def stop(self) -> None:
        """Stop serving, end every watch and join every thread."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        with self.store.lock:
            self.store.faults.stopping = True
            self.store.cond.notify_all()
        httpd.shutdown()
        thread.join()
        if self._gc_thread is not None:
            self._gc_thread.join()
            self._gc_thread = None
        httpd.wake_all()
        httpd.server_close()  # joins the handler threads (block_on_close)
        self._httpd = self._thread = None

    def __enter__(self) -> KubeAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "the server is not started"
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(
        self,
        path: str | Path,
        namespace: str = "default",
        context: str = "kubeapi-double",
        token: str = "test-token",
    ) -> Path:
        """A kubeconfig for this server: plain HTTP, a token user (accepted, never checked)."""
        path = Path(path)
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": context, "cluster": {"server": self.url}}],
            "users": [{"name": context, "user": {"token": token}}],
            "contexts": [
                {
                    "name": context,
                    "context": {"cluster": context, "user": context, "namespace": namespace},
                }
            ],
            "current-context": context,
            "preferences": {},
        }
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    # ------------------------------------------------------------------ faults and counters

    def compact(self) -> int:
        """Forget the event history: watches and continue tokens from before now get 410 Gone."""
        return self.store.compact()

    def collect_garbage(self) -> None:
        """Run the garbage collector now for every owner deleted so far (with ``gc_delay``)."""
        self.store.collect_garbage(None)

    def drop_watches(self) -> None:
        """Abort every open watch connection mid-stream (no final chunk)."""
        with self.store.lock:
            self.store.faults.drop_generation += 1
            self.store.cond.notify_all()

    def stall_watches(self, seconds: float) -> None:
        """Open watches send nothing, not even bookmarks, for ``seconds`` (events follow)."""
        with self.store.lock:
            self.store.faults.stall_until = time.monotonic() + seconds
            self.store.cond.notify_all()

    def delay(self, seconds: float) -> None:
        """Every request waits ``seconds`` before being served (0 turns it off)."""
        self._delay = max(0.0, seconds)

    def fail_next(
        self, n: int, code: int = 500, *, verb: str | None = None, resource: str | None = None
    ) -> None:
        """The next ``n`` requests (of that verb/resource, if given) fail: ``code``, a Status."""
        with self._lock:
            self._failures.append(_Failure(n, code, verb, resource))

    def count(self, verb: str | None = None, resource: str | None = None) -> int:
        """Requests served so far, by Kubernetes verb (get, list, watch, create, update, patch,
        delete, deletecollection, discovery) and resource (plural, e.g. "pods" or "pods/status")."""
        with self._lock:
            return sum(
                n
                for (v, r), n in self.requests.items()
                if (verb is None or v == verb) and (resource is None or r == resource)
            )

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()

    @property
    def open_watches(self) -> int:
        with self._lock:
            return self._open_watches

    def wait_for_watches(self, n: int, timeout: float = 10.0) -> None:
        """Wait until at least ``n`` watches are open (raises TimeoutError)."""
        end = time.monotonic() + timeout
        while self.open_watches < n:
            if time.monotonic() > end:
                raise TimeoutError(f"{self.open_watches} watches open, wanted {n}")
            time.sleep(0.01)

    def _item_json(self, t: ResourceType, obj: Obj) -> bytes:
        """A list item's JSON, cached per object version (stored objects never change).

        Typed lists carry no kind/apiVersion on their items, as the real server's;
        custom resources' items do (with the version asked for)."""
        meta = obj["metadata"]
        key = (t.storage, meta.get("namespace", ""), meta["name"])
        stamp = (meta.get("resourceVersion", ""), t.version)
        hit = self._json_cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        if t.crd:
            item = (
                obj
                if obj.get("apiVersion") == t.api_version
                else {**obj, "apiVersion": t.api_version}
            )
        else:
            item = {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}
        data = _dumps(item)
        if len(self._json_cache) > 100_000:  # entries of deleted objects are never reused
            self._json_cache.clear()
        self._json_cache[key] = (stamp, data)
        return data

    def _record(self, verb: str, resource: str) -> None:
        with self._lock:
            self.requests[(verb, resource)] += 1

    def _take_failure(self, verb: str, resource: str) -> int:
        with self._lock:
            for f in self._failures:
                if (f.verb is None or f.verb == verb) and (
                    f.resource is None or f.resource == resource
                ):
                    f.remaining -= 1
                    if f.remaining <= 0:
                        self._failures.remove(f)
                    return f.code
        return 0

    def _watch_opened(self) -> None:
        with self._lock:
            self._open_watches += 1

    def _watch_closed(self) -> None:
        with self._lock:
            self._open_watches -= 1

    # ------------------------------------------------------------------ discovery

    def _discovery(self, path: str, host: str) -> tuple[int, Any]:
        reg = self.store.registry
        with self.store.lock:
            gvs = reg.group_versions()
            if path == "/version":
                return 200, VERSION
            if path in ("/healthz", "/livez", "/readyz"):
                return 200, b"ok"
            if path == "/api":
                return 200, {
                    "kind": "APIVersions",
                    "versions": gvs.get("", ["v1"]),
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": host}
                    ],
                }
            if path == "/apis":
                groups = [api_group(g, vs) for g, vs in gvs.items() if g]
                return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
            parts = [p for p in path.split("/") if p]
            if len(parts) == 2 and parts[0] == "api":
                if parts[1] not in gvs.get("", []):
                    raise not_found_path()
                return 200, api_resource_list(parts[1], reg.in_group_version("", parts[1]))
            if len(parts) == 2 and parts[0] == "apis":
                if parts[1] not in gvs:
                    raise not_found_path()
                return 200, api_group(parts[1], gvs[parts[1]])
            if len(parts) == 3 and parts[0] == "apis":
                types = reg.in_group_version(parts[1], parts[2])
                if not types:
                    raise not_found_path()
                return 200, api_resource_list(f"{parts[1]}/{parts[2]}", types)
            if parts == ["openapi", "v2"]:
                return 200, OPENAPI_V2
            if parts == ["openapi", "v3"]:
                h = reg.hash()
                paths = {}
                for g, vs in gvs.items():
                    for v in vs:
                        p = f"api/{v}" if not g else f"apis/{g}/{v}"
                        paths[p] = {"serverRelativeURL": f"/openapi/v3/{p}?hash={h}"}
                return 200, {"paths": paths}
            if parts[:2] == ["openapi", "v3"] and len(parts) >= 4:
                if parts[2] == "api":
                    types = reg.in_group_version("", parts[3])
                elif len(parts) == 5:
                    types = reg.in_group_version(parts[3], parts[4])
                else:
                    types = []
                if not types:
                    raise not_found_path()
                return 200, openapi_v3_document(types)
        raise not_found_path()

    # ------------------------------------------------------------------ the Python API

    def resource(self, ref: str) -> ResourceType:
        """A resource type by plural, singular, kind, short name or ``plural.group``."""
        with self.store.lock:
            t = self.store.registry.resolve(ref)
        if t is None:
            raise KeyError(f"no resource {ref!r}")
        return t

    def _type_of(self, obj: Obj) -> ResourceType:
        with self.store.lock:
            t = self.store.registry.by_kind(
                str(obj.get("apiVersion", "")), str(obj.get("kind", ""))
            )
        if t is None:
            raise KeyError(f"no resource for {obj.get('apiVersion')} {obj.get('kind')}")
        return t

    @staticmethod
    def _ns(t: ResourceType, obj: Obj | None, namespace: str | None) -> str:
        if not t.namespaced:
            return ""
        if namespace:
            return namespace
        return str(((obj or {}).get("metadata") or {}).get("namespace") or "default")

    @property
    def resource_version(self) -> int:
        """The current global resourceVersion."""
        with self.store.lock:
            return self.store.rv

    def create(
        self, obj: Obj, namespace: str | None = None, *, field_manager: str = "kubeapi-test"
    ) -> Obj:
        """POST the object (kind from apiVersion/kind). A ``status`` given for a resource with a
        status subresource (which create ignores, as the real server does) is then written through
        ``/status``, as a second write (two events)."""
        t = self._type_of(obj)
        ns = self._ns(t, obj, namespace)
        body = copy.deepcopy(obj)
        status = body.get("status") if "status" in t.subresources else None
        out = self.store.create(t, ns, body, manager=field_manager)
        if status is not None:
            out = self.store.update(
                t,
                ns,
                out["metadata"]["name"],
                {**copy.deepcopy(out), "status": copy.deepcopy(status)},
                manager=field_manager,
                subresource="status",
            )
        return copy.deepcopy(out)

    def get(self, resource: str, name: str, namespace: str | None = None) -> Obj:
        t = self.resource(resource)
        return copy.deepcopy(self.store.get(t, self._ns(t, None, namespace), name))

    def list(
        self,
        resource: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[Obj]:
        """Objects (all namespaces when ``namespace`` is None), sorted by namespace/name."""
        t = self.resource(resource)
        result = self.store.list(
            t,
            namespace or "",
            parse_label_selector(label_selector),
            parse_field_selector(field_selector, t.field_labels()),
        )
        return copy.deepcopy(result.items)

    def update(
        self, obj: Obj, *, subresource: str = "", field_manager: str = "kubeapi-test"
    ) -> Obj:
        """PUT (a resourceVersion in the object is checked: 409 Conflict when stale)."""
        t = self._type_of(obj)
        ns = self._ns(t, obj, None)
        return copy.deepcopy(
            self.store.update(
                t,
                ns,
                obj["metadata"]["name"],
                copy.deepcopy(obj),
                manager=field_manager,
                subresource=subresource,
            )
        )

    def update_status(self, obj: Obj, *, field_manager: str = "kubeapi-test") -> Obj:
        return self.update(obj, subresource="status", field_manager=field_manager)

    def patch(
        self,
        resource: str,
        name: str,
        patch: Any,
        namespace: str | None = None,
        *,
        patch_type: str = "merge",
        subresource: str = "",
        field_manager: str = "kubeapi-test",
    ) -> Obj:
        """PATCH; ``patch_type`` is merge, json or strategic."""
        t = self.resource(resource)
        return copy.deepcopy(
            self.store.patch(
                t,
                self._ns(t, None, namespace),
                name,
                patch_type,
                copy.deepcopy(patch),
                manager=field_manager,
                subresource=subresource,
            )
        )

    def apply(
        self, obj: Obj, *, field_manager: str, force: bool = False, subresource: str = ""
    ) -> Obj:
        """Server-side apply of ``obj`` (creates it when absent)."""
        t = self._type_of(obj)
        ns = self._ns(t, obj, None)
        return copy.deepcopy(
            self.store.apply(
                t,
                ns,
                obj["metadata"]["name"],
                copy.deepcopy(obj),
                manager=field_manager,
                subresource=subresource,
                force=force,
            )
        )

    def delete(
        self,
        resource: str,
        name: str,
        namespace: str | None = None,
        *,
        propagation_policy: str | None = None,
    ) -> Obj:
        t = self.resource(resource)
        return copy.deepcopy(
            self.store.delete(
                t, self._ns(t, None, namespace), name, propagation=propagation_policy or ""
            )
        )

    def exists(self, resource: str, name: str, namespace: str | None = None) -> bool:
        try:
            self.get(resource, name, namespace)
        except ApiError as e:
            if e.code == 404:
                return False
            raise
        return True

    def crd_registered(self, plural_group: str) -> bool:
        with self.store.lock:
            return any(
                t.qualified == plural_group
                for t in self.store.registry.types.values()
                if t.storage != CRD_STORAGE
            )


def kube_api_fixture_gen(**options: Any) -> Iterator[KubeAPI]:
    with KubeAPI(**options) as api:
        yield api
