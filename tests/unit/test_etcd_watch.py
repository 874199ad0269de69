"""List-then-watch of an etcd prefix (etcd/watch.py) against a real etcd: events
from the list's revision, a restart resumed without a relist, a compaction while the
watch was away relisted (a deletion made meanwhile not lost), a quiet watch kept
fresh by progress notifications, keys as the objects' identity."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tests.support.etcd import EtcdServer

from stockade.etcd.client import KeyValue
from stockade.etcd.watch import INVALID_FIELD, EtcdReflector, object_key_of, object_of
from stockade.kube.client import NAMESPACES, NETWORK_POLICIES, PODS
from stockade.kube.reflector import ReflectorConfig

PREFIX = "/stk"


class Recorder:
    """A sink holding what it was told, like the feed's view."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {}
        self.lists = 0
        self.events: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def replace(self, items: list[dict[str, Any]], resource_version: str) -> None:
        with self.lock:
            self.lists += 1
            self.items = {f"{o['metadata']['namespace']}/{o['metadata']['name']}": o
                          for o in items}

    def event(self, type: str, obj: dict[str, Any]) -> None:
        with self.lock:
            key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
            self.events.append((type, key))
            if type == "DELETED":
                self.items.pop(key, None)
            else:
                self.items[key] = obj


def until(pred: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError("not reached")


def pod(name: str, **labels: str) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": "ignored", "labels": labels},
                       "status": {"podIP": "10.0.0.1"}})


@pytest.fixture
def reflector(etcd: EtcdServer) -> Iterator[tuple[EtcdReflector, Recorder]]:
    sink = Recorder()
    client = etcd.client(timeout=2.0)
    r = EtcdReflector(client, PODS, sink, prefix=PREFIX, config=ReflectorConfig(
        stall_timeout=3.0, backoff_base=0.05, backoff_cap=0.5, min_watch=0.0))
    yield r, sink
    r.stop(timeout=0.5)
    client.close()
    r.stop(timeout=5)


def test_keys_name_the_objects() -> None:
    assert object_key_of(PREFIX, PODS, "/stk/pods/x/a") == "x/a"
    assert object_key_of(PREFIX, PODS, "/stk/pods/x") is None
    assert object_key_of(PREFIX, PODS, "/stk/pods/x/a/b") is None
    assert object_key_of(PREFIX, NAMESPACES, "/stk/namespaces/x") == "x"
    assert object_key_of(PREFIX, NETWORK_POLICIES, "/stk/pods/x/a") is None
    kv = KeyValue("/stk/pods/x/a", pod("a").encode(), 7)
    obj = object_of(PODS, "x/a", kv, 7)
    assert obj["metadata"]["name"] == "a" and obj["metadata"]["namespace"] == "x"
    assert obj["metadata"]["resourceVersion"] == "7"
    bad = object_of(NETWORK_POLICIES, "x/p", KeyValue("/stk/networkpolicies/x/p", b"[", 8), 8)
    assert INVALID_FIELD in bad  # strict decoding refuses it: held fail-closed


def test_list_then_watch_and_a_restart_resumes(
        etcd: EtcdServer, reflector: tuple[EtcdReflector, Recorder]) -> None:
    r, sink = reflector
    with etcd.client() as c:
        c.put("/stk/pods/x/a", pod("a", app="a"))
        c.put("/stk/namespaces/x", "{}")  # another resource: not this reflector's
        r.start()
        until(lambda: sink.lists == 1)
        assert set(sink.items) == {"x/a"}
        c.put("/stk/pods/x/b", pod("b"))
        c.put("/stk/pods/x/a", pod("a", app="changed"))
        c.delete("/stk/pods/x/b")
        until(lambda: len(sink.events) == 3)
        assert sink.events == [("ADDED", "x/b"), ("MODIFIED", "x/a"), ("DELETED", "x/b")]
        assert sink.items["x/a"]["metadata"]["labels"] == {"app": "changed"}
    etcd.kill()
    until(lambda: r.failing)
    etcd.start()
    with etcd.client() as c:
        c.put("/stk/pods/x/c", pod("c"))
    until(lambda: "x/c" in sink.items and not r.failing)
    assert sink.lists == 1  # resumed from its revision: no relist
    assert r.status.errors >= 1


def test_compaction_while_away_relists_and_loses_no_deletion(
        etcd: EtcdServer, reflector: tuple[EtcdReflector, Recorder]) -> None:
    r, sink = reflector
    with etcd.client() as c:
        c.put("/stk/pods/x/a", pod("a"))
        c.put("/stk/pods/x/b", pod("b"))
        r.start()
        until(lambda: sink.lists == 1 and len(sink.items) == 2)
    # Its backoff lasts until the test says so: away for what follows.
    gate = threading.Event()
    r._sleep = lambda seconds: gate.wait(30) and r.stopped
    etcd.stop()
    until(lambda: r.failing)
    etcd.start()
    # Before the reflector's next attempt: a deletion, then compaction.
    with etcd.client() as c:
        c.delete("/stk/pods/x/a")
        c.put("/stk/pods/x/c", pod("c"))
    etcd.compact()
    gate.set()
    until(lambda: sink.lists >= 2)
    assert r.status.gone >= 1  # the watch was told its revision is compacted
    assert set(sink.items) == {"x/b", "x/c"}
    until(lambda: not r.failing)


def test_a_quiet_watch_keeps_its_revision_fresh(
        etcd: EtcdServer, reflector: tuple[EtcdReflector, Recorder]) -> None:
    r, sink = reflector
    r.start()
    until(lambda: sink.lists == 1)
    with etcd.client() as c:
        for i in range(5):
            c.put(f"/stk/other/{i}", "x")  # the store's revision moves, not this prefix
        top = c.put("/stk/other/last", "x")
    # Progress notifications (every second here) carry the revision forward, so a
    # compaction of what this prefix never had needs no relist.
    until(lambda: r.revision >= top)
    etcd.compact()
    with etcd.client() as c:
        c.put("/stk/pods/x/z", pod("z"))
    until(lambda: "x/z" in sink.items)
    assert sink.lists == 1
