"""List-then-watch of one kind of the Kubernetes API, written for how the API behaves.

One :class:`Reflector` per resource, on a thread of its own::

    list (every page) ──▶ sink.replace(items, rv)     the whole truth, the sink diffs it
      │
      └▶ watch from rv, allowWatchBookmarks=true ──▶ sink.event(type, obj)
                                                     per ADDED, MODIFIED, DELETED
           BOOKMARK               → rv advances, nothing delivered
           server timeout (clean end of the stream)     → watch again from rv at once
           dropped connection, torn line, 5xx, refused   → watch again from rv after a backoff
           nothing at all for `stall_timeout` seconds    → the same (a silent stall: watchdog)
           410 Gone (HTTP, or an ERROR event of code 410) → list again (never "watch from now")
    an optional resource (a CRD's) answering 404 ──▶ sink.replace([], "")   none exist;
           listed again after a backoff, until its CRD is installed (never a failure)

Why these choices:

* **Relist on 410, never resume from "now".** A watch that restarts from the
  present after 410 misses every deletion made while it was behind (lightkube's
  ``watch`` does that). Listing again and letting the sink compute the
  difference with what it holds loses nothing and flushes nothing.
* **Resume from the last resourceVersion** after a dropped stream: no relist,
  so a flapping connection costs nothing at 10,000 pods. Bookmarks keep that
  version fresh on quiet resources, so a reconnect rarely meets 410.
* **Watchdog.** A TCP connection can stay up while the server sends nothing
  (a stuck proxy, an apiserver that lost its watch cache). The read timeout of
  the stream is the watchdog: no event and no bookmark for ``stall_timeout``
  seconds ends the watch, which is started again from the last version. The
  default (150 s) is above two bookmark periods of a real API server (~60 s).
* **Exponential backoff with jitter** (``Backoff``: base doubling to a cap, a
  random half of each step), reset by any success, so a restarted API server is
  not hit by every node at once. A server timeout is not a failure: the watch is
  started again at once, unless it ended almost at once without an event (then
  it counts as one, so a misbehaving server cannot make the loop spin).
* A sink that raises (a bug) must not stop the loop: it is logged, counted, and
  the resource is listed again after a backoff (level-triggered recovery).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

from stockade.kube.client import Gone, KubeClient, KubeError, Resource

log = logging.getLogger("stockade.kube")

ADDED, MODIFIED, DELETED, BOOKMARK = "ADDED", "MODIFIED", "DELETED", "BOOKMARK"
NOT_SERVED = "not served (its CustomResourceDefinition is not installed)"


class Sink(Protocol):
    """Where a reflector delivers. Called from the reflector's thread only."""

    def replace(self, items: list[dict[str, Any]], resource_version: str) -> None:
        """The whole list (first, or again after 410): the sink diffs it with what it has."""
        ...

    def event(self, type: str, obj: dict[str, Any]) -> None:
        """One ADDED, MODIFIED or DELETED object."""
        ...


@dataclass
class Backoff:
    """Exponential backoff with "equal jitter": step n waits between d/2 and d,
    d = min(cap, base * 2**n). :meth:`reset` after any success."""

    base: float = 0.5
    cap: float = 30.0
    rng: Callable[[], float] = random.random
    attempts: int = 0

    def next(self) -> float:
        d = min(self.cap, self.base * 2.0 ** min(self.attempts, 30))
        self.attempts += 1
        return float(d / 2 + self.rng() * d / 2)

    def reset(self) -> None:
        self.attempts = 0


@dataclass
class ReflectorStatus:
    """What `stockade status` shows of one resource's feed."""

    resource: str
    synced: bool = False  # a first list was delivered
    resource_version: str = ""
    lists: int = 0  # lists delivered (1 + relists)
    watches: int = 0  # watch requests started
    events: int = 0  # ADDED/MODIFIED/DELETED delivered
    bookmarks: int = 0
    gone: int = 0  # 410s met
    errors: int = 0  # failures (each followed by a backoff)
    stalls: int = 0  # watches ended by the watchdog
    last_error: str = ""
    last_event: float = 0.0  # wall clock of the last event or bookmark
    connected: bool = False  # a watch stream is open

    def to_dict(self) -> dict[str, Any]:
        return {"synced": self.synced, "resourceVersion": self.resource_version,
                "lists": self.lists, "watches": self.watches, "events": self.events,
                "bookmarks": self.bookmarks, "gone": self.gone, "errors": self.errors,
                "stalls": self.stalls, "lastError": self.last_error,
                "lastEvent": self.last_event, "connected": self.connected}


@dataclass
class ReflectorConfig:
    timeout_seconds: int = 300  # asked of the server for each watch (jittered up to 2x)
    stall_timeout: float = 150.0  # the watchdog: no event nor bookmark for this long
    page_size: int = 500
    min_watch: float = 1.0  # a watch shorter than this with no event counts as a failure
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    label_selector: str | None = None
    field_selector: str | None = None
    rng: Callable[[], float] = field(default=random.random)
    # What a whole list (its pages decoded, then delivered) runs inside: the agent gives
    # heap.listing, as the cyclic collector would otherwise walk the growing list
    # again and again (a list of 100,000 pods decodes four to five times slower).
    bulk: Callable[[], AbstractContextManager[object]] = field(default=nullcontext)
    # Applied to each object, listed (as its page arrives) or watched, before the sink
    # sees it: the agent gives client.without_managed_fields.
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None


class ReflectorLoop:
    """What every list-then-watch loop shares (this one and the etcd feed's): the
    resource, the sink, backoff, status, and the thread running :meth:`run`."""

    THREAD = "reflector"  # the thread is named <THREAD>-<plural>

    def __init__(self, res: Resource, sink: Sink, config: ReflectorConfig | None,
                 sleep: Callable[[float], bool] | None,
                 observe: Callable[[str], None] | None) -> None:
        self.res = res
        self.sink = sink
        self.config = config or ReflectorConfig()
        self.backoff = Backoff(self.config.backoff_base, self.config.backoff_cap,
                               self.config.rng)
        self.status = ReflectorStatus(res.plural)
        self._stop = threading.Event()
        # Waiting between attempts; returns True when stopped (tests replace it).
        self._sleep = sleep or self._stop.wait
        # Told "list", "event" or "error" as they happen (the agent's counters).
        self._observe = observe or (lambda what: None)
        self._thread: threading.Thread | None = None
        self.synced = threading.Event()  # set once the first list is delivered

    def run(self) -> None:
        raise NotImplementedError

    def _list(self) -> Any:
        """List and deliver; where to watch from (falsy: the list failed)."""
        raise NotImplementedError

    def _bulk_list(self) -> Any:
        """:meth:`_list` inside the configuration's ``bulk``."""
        with self.config.bulk():
            return self._list()

    # ---- thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run,
                                        name=f"{self.THREAD}-{self.res.plural}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the loop to end. A watch blocked in a read ends at its next event, its
        server timeout or the watchdog; the thread is a daemon and is not waited for
        longer than ``timeout``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()


class Reflector(ReflectorLoop):
    """List-then-watch of ``res`` into ``sink``; :meth:`run` until ``stop`` is set."""

    THREAD = "kube"

    def __init__(self, client: KubeClient, res: Resource, sink: Sink, *,
                 namespace: str | None = None, config: ReflectorConfig | None = None,
                 sleep: Callable[[float], bool] | None = None,
                 clock: Callable[[], float] = time.time,
                 observe: Callable[[str], None] | None = None) -> None:
        super().__init__(res, sink, config, sleep, observe)
        self.client = client
        self.namespace = namespace
        self._clock = clock

    # ---- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        rv = ""  # "" means: list first
        while not self._stop.is_set():
            if not rv:
                rv = self._bulk_list()
                if not rv:
                    if self._sleep(self.backoff.next()):
                        return
                    continue
            rv, wait = self._watch(rv)
            if wait is not None and self._sleep(wait):
                return

    def _list(self) -> str:
        """List and deliver; the resourceVersion to watch from, or "" on failure."""
        cfg = self.config
        try:
            page = self.client.list(self.res, self.namespace, limit=cfg.page_size,
                                    label_selector=cfg.label_selector,
                                    field_selector=cfg.field_selector,
                                    transform=cfg.transform)
        except Exception as e:  # KubeError; anything else (a closed client) alike
            if self._stop.is_set():
                return ""
            if self.res.optional and isinstance(e, KubeError) and e.code == 404:
                self._not_served(e)
            else:
                self._failed(f"list: {e}")
            return ""
        try:
            self.sink.replace(page.items, page.resource_version)
        except Exception as e:  # a sink bug must not end the loop: list again later
            log.exception("delivering the list of %s failed", self.res.plural)
            self._failed(f"sink: {type(e).__name__}: {e}")
            return ""
        st = self.status
        st.lists += 1
        self._observe("list")
        st.synced = True
        st.resource_version = page.resource_version
        st.last_event = self._clock()
        self.synced.set()
        if st.lists > 1:
            log.info("relisted", extra={"fields": {"resource": self.res.plural,
                                                   "items": len(page.items),
                                                   "resourceVersion": page.resource_version}})
        self.backoff.reset()
        return page.resource_version or "0"

    def _watch(self, rv: str) -> tuple[str, float | None]:
        """One watch from ``rv``: the version to go on from ("" = list again) and how
        long to wait before that (None: at once)."""
        cfg = self.config
        st = self.status
        timeout = int(cfg.timeout_seconds * (1 + cfg.rng()))
        started = time.monotonic()
        delivered = 0
        st.watches += 1
        try:
            st.connected = True
            for ev in self.client.watch(self.res, self.namespace, resource_version=rv,
                                        timeout_seconds=timeout, bookmarks=True,
                                        label_selector=cfg.label_selector,
                                        field_selector=cfg.field_selector,
                                        read_timeout=cfg.stall_timeout):
                if self._stop.is_set():
                    return rv, None
                st.last_event = self._clock()
                new_rv = ev.resource_version
                if ev.type == BOOKMARK:
                    st.bookmarks += 1
                elif ev.type in (ADDED, MODIFIED, DELETED):
                    obj = ev.object if cfg.transform is None else cfg.transform(ev.object)
                    self.sink.event(ev.type, obj)
                    st.events += 1
                    self._observe("event")
                    delivered += 1
                else:
                    log.warning("unknown watch event type %r", ev.type)
                if new_rv:
                    rv = st.resource_version = new_rv
                self.backoff.reset()
        except Gone as e:
            st.gone += 1
            log.info("resourceVersion too old; listing again", extra={"fields": {
                "resource": self.res.plural, "resourceVersion": rv, "error": str(e)}})
            return "", None
        except KubeError as e:
            if self._stop.is_set():
                return rv, None
            if e.reason == "Timeout":
                st.stalls += 1
            self._failed(f"watch: {e}")
            return rv, self.backoff.next()
        except Exception as e:  # a sink bug: list again after a backoff (see the docstring)
            if self._stop.is_set():
                return rv, None
            log.exception("delivering an event of %s failed", self.res.plural)
            self._failed(f"sink: {type(e).__name__}: {e}")
            return "", self.backoff.next()
        finally:
            st.connected = False
        if not delivered and time.monotonic() - started < cfg.min_watch:
            # Ended at once without anything: do not spin on a misbehaving server.
            return rv, self.backoff.next()
        return rv, None

    def _not_served(self, e: KubeError) -> None:
        """An optional resource the server does not serve (its CRD is not installed):
        there is none of it, which the sink hears as an empty list (so the feed is not
        held back waiting for it); the loop asks again after a backoff."""
        st = self.status
        if not st.synced or st.last_error != NOT_SERVED:
            try:
                self.sink.replace([], "")
            except Exception as exc:  # a sink bug: as in _list
                log.exception("delivering the empty list of %s failed", self.res.plural)
                self._failed(f"sink: {type(exc).__name__}: {exc}")
                return
            log.info("not served by the API (no CustomResourceDefinition); none exist",
                     extra={"fields": {"resource": self.res.plural, "error": str(e)}})
            st.lists += 1  # an empty list was delivered
            self._observe("list")
        st.synced = True
        st.last_error = NOT_SERVED
        st.last_event = self._clock()
        self.synced.set()
        # Every half a minute at most: a CRD installed later is noticed soon enough.
        self.backoff.attempts = min(self.backoff.attempts, 6)

    def _failed(self, error: str) -> None:
        st = self.status
        st.errors += 1
        self._observe("error")
        st.last_error = error
        log.warning("kubernetes feed: %s", error, extra={"fields": {
            "resource": self.res.plural, "attempt": self.backoff.attempts + 1}})
