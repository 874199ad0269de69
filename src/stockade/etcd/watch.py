"""List-then-watch of one kind of object under the agent's etcd prefix.

The same contract as the Kubernetes reflector (kube/reflector.py), so the same feed
consumes both: ``sink.replace(items, revision)`` with the whole list, then
``sink.event(type, obj)`` per change. Objects are Kubernetes-shaped JSON documents
(a Namespace, a NetworkPolicy, a Pod), one per key::

    <prefix>/namespaces/NAME
    <prefix>/networkpolicies/NAMESPACE/NAME
    <prefix>/pods/NAMESPACE/NAME

The key is the object's identity (``metadata.name``/``namespace`` are taken from
it) and the key's ``mod_revision`` is its ``metadata.resourceVersion``.

How etcd behaves, and what the loop does::

    range of the prefix (paged, one revision R) ─▶ sink.replace(items, R)
      └▶ watch from R+1 ─▶ a PUT or DELETE event ─▶ sink.event(...)
           progress notification            → R advances, nothing delivered
           dropped connection, refused, 5xx → watch again from the last revision seen,
                                              after a backoff (next endpoint)
           silent for the stall timeout     → watch again from there, at once
           compact_revision (history gone)  → list again (never "watch from now")
           another cluster (cluster_id) or a
           revision behind ours (etcd restored
           from an older backup)            → list again

A relist is diffed by the feed against what it holds: nothing is flushed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from stockade.etcd.client import Compacted, EtcdClient, EtcdError, KeyValue, Stalled
from stockade.kube.client import Resource
from stockade.kube.reflector import (
    ADDED,
    DELETED,
    MODIFIED,
    ReflectorConfig,
    ReflectorLoop,
    Sink,
)

log = logging.getLogger("stockade.etcd")

INVALID_FIELD = "stockade.io/unreadable"  # an unknown field: strict decoding refuses it


def resource_prefix(prefix: str, res: Resource) -> str:
    return f"{prefix.rstrip('/')}/{res.plural}/"


def object_key_of(prefix: str, res: Resource, key: str) -> str | None:
    """``ns/name`` (or ``name``) of an etcd key, None if it is not one of ``res``."""
    head = resource_prefix(prefix, res)
    if not key.startswith(head):
        return None
    rest = key[len(head):]
    parts = rest.split("/")
    if not all(parts) or len(parts) != (2 if res.namespaced else 1):
        return None
    return rest


def etcd_key(prefix: str, res: Resource, object_key: str) -> str:
    return resource_prefix(prefix, res) + object_key


def object_of(res: Resource, object_key: str, kv: KeyValue | None,
              revision: int) -> dict[str, Any]:
    """The document of a key (a deletion: its identity only), named by the key."""
    ident: dict[str, Any] = {"resourceVersion": str(revision)}
    if res.namespaced:
        ident["namespace"], _, ident["name"] = object_key.partition("/")
    else:
        ident["name"] = object_key
    doc: Any = None
    if kv is not None:
        try:
            doc = json.loads(kv.value)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            # Refused by admission (the unknown field), so held fail-closed by the feed.
            return {"metadata": ident, INVALID_FIELD: "the value is not a JSON object"}
    else:
        doc = {}
    meta = doc.get("metadata")
    meta = dict(meta) if isinstance(meta, dict) else {}
    meta.update(ident)
    return {**doc, "metadata": meta}


class EtcdReflector(ReflectorLoop):
    """List-then-watch of ``res`` under the client's prefix into ``sink``; the same
    interface as kube.reflector.Reflector (start, stop, status, synced, res)."""

    THREAD = "etcd"

    def __init__(self, client: EtcdClient, res: Resource, sink: Sink, *, prefix: str,
                 config: ReflectorConfig | None = None,
                 sleep: Callable[[float], bool] | None = None,
                 observe: Callable[[str], None] | None = None) -> None:
        super().__init__(res, sink, config, sleep, observe)
        self.client = client
        self.prefix = prefix
        self.head = resource_prefix(prefix, res)
        self.cluster_id = ""
        self.revision = 0  # every event up to here was delivered
        # True from a failed attempt until a watch is established again: the agent
        # reports itself degraded meanwhile.
        self.failing = False
        self._bad_keys: set[str] = set()

    # ---- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        rev = 0  # 0: list first
        while not self._stop.is_set():
            if not rev:
                rev = self._bulk_list()
                if not rev:
                    if self._sleep(self.backoff.next()):
                        return
                    continue
            rev, wait = self._watch(rev)
            if wait is not None and self._sleep(wait):
                return

    def _key(self, kv: KeyValue) -> str | None:
        key = object_key_of(self.prefix, self.res, kv.key)
        if key is None and kv.key not in self._bad_keys:
            self._bad_keys.add(kv.key)
            log.warning("a key under the prefix that names no object; ignored",
                        extra={"fields": {"key": kv.key}})
        return key

    def _list(self) -> int:
        try:
            header, kvs = self.client.list_prefix(self.head, self.config.page_size)
        except EtcdError as e:
            if not self._stop.is_set():
                self._failed(f"list: {e}")
            return 0
        items = []
        for kv in kvs:
            key = self._key(kv)
            if key is not None:
                items.append(object_of(self.res, key, kv, kv.mod_revision))
        try:
            self.sink.replace(items, str(header.revision))
        except Exception as e:  # a sink bug must not end the loop: list again later
            log.exception("delivering the list of %s failed", self.res.plural)
            self._failed(f"sink: {type(e).__name__}: {e}")
            return 0
        st = self.status
        st.lists += 1
        self._observe("list")
        st.synced = True
        st.resource_version = str(header.revision)
        st.last_event = time.time()
        self.cluster_id = header.cluster_id
        self.revision = header.revision
        self.synced.set()
        if st.lists > 1:
            log.info("relisted", extra={"fields": {"resource": self.res.plural,
                                                   "items": len(items),
                                                   "revision": header.revision}})
        self.backoff.reset()
        return max(header.revision, 1)

    def _watch(self, rev: int) -> tuple[int, float | None]:
        """One watch from ``rev + 1``: the revision to go on from (0: list again) and how
        long to wait first (None: at once)."""
        st = self.status
        st.watches += 1
        started = time.monotonic()
        delivered = 0
        try:
            for wr in self.client.watch(self.head, rev + 1,
                                        read_timeout=self.config.stall_timeout):
                if self._stop.is_set():
                    return rev, None
                st.last_event = time.time()
                if wr.created:
                    if self.cluster_id and wr.header.cluster_id != self.cluster_id:
                        log.warning("etcd is another cluster now; listing again",
                                    extra={"fields": {"resource": self.res.plural,
                                                      "was": self.cluster_id,
                                                      "now": wr.header.cluster_id}})
                        return 0, None
                    if wr.header.revision < rev:
                        log.warning("etcd's revision is behind the agent's (restored from "
                                    "a backup?); listing again", extra={"fields": {
                                        "resource": self.res.plural, "seen": rev,
                                        "etcd": wr.header.revision}})
                        return 0, None
                    st.connected = True
                    if self.failing:
                        log.info("etcd watch established again", extra={"fields": {
                            "resource": self.res.plural, "server": self.client.server,
                            "revision": rev}})
                    self.failing = False
                    self._observe("connected")
                    self.backoff.reset()
                    continue
                if wr.progress:
                    rev = max(rev, wr.header.revision)
                    st.bookmarks += 1
                    st.resource_version = str(rev)
                    self.revision = rev
                    continue
                top = rev
                # One response holds whole revisions (a transaction's events are never
                # split): a sink that can take them as one batch (`batch`) shows none of
                # a revision until it has all of it, so a writer waiting for a revision
                # never wakes halfway through its transaction.
                batch = getattr(self.sink, "batch", contextlib.nullcontext)
                with batch():
                    for ev in wr.events:
                        key = self._key(ev.kv)
                        top = max(top, ev.kv.mod_revision)
                        if key is None:
                            continue
                        if ev.type == "DELETE":
                            self.sink.event(DELETED, object_of(self.res, key, None,
                                                               ev.kv.mod_revision))
                        else:
                            self.sink.event(ADDED if ev.kv.version == 1 else MODIFIED,
                                            object_of(self.res, key, ev.kv,
                                                      ev.kv.mod_revision))
                        st.events += 1
                        self._observe("event")
                        delivered += 1
                rev = top
                st.resource_version = str(rev)
                self.revision = rev
        except Compacted as e:
            st.gone += 1
            log.info("revision compacted; listing again", extra={"fields": {
                "resource": self.res.plural, "revision": rev, "error": str(e)}})
            return 0, None
        except Stalled:
            # A quiet prefix or a silent server: watch again from where we are. A dead
            # server then fails to connect, which counts as a failure.
            st.stalls += 1
            return rev, None
        except EtcdError as e:
            if self._stop.is_set():
                return rev, None
            self._failed(f"watch: {e}")
            return rev, self.backoff.next()
        except Exception as e:  # a sink bug: list again after a backoff
            if self._stop.is_set():
                return rev, None
            log.exception("delivering an event of %s failed", self.res.plural)
            self._failed(f"sink: {type(e).__name__}: {e}")
            return 0, self.backoff.next()
        finally:
            st.connected = False
        if self._stop.is_set():
            return rev, None
        if not delivered and time.monotonic() - started < self.config.min_watch:
            return rev, self.backoff.next()  # ended at once: do not spin
        return rev, None

    def _failed(self, error: str) -> None:
        st = self.status
        st.errors += 1
        st.last_error = error
        first = not self.failing
        self.failing = True
        self._observe("error")
        (log.warning if first else log.info)("etcd feed: %s", error, extra={"fields": {
            "resource": self.res.plural, "attempt": self.backoff.attempts + 1}})
