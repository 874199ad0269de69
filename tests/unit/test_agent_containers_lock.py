"""The container manager reads the agent's state under the service's lock.

At start (`ContainerManager.start`: `_adopt`, then `_sweep`) a feed may be
committing the API's lists into the same state from its own thread. A walk of
the endpoints without the lock raised "dictionary changed size during iteration"
at 100,000 pods (`bench/kube.py`), and the extensions after it never started.
Each test holds the lock, checks that the read waits for it, changes the state
meanwhile, and checks that the read saw the change.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

from stockade.agent.containers import IPAM_OWNER, ContainerManager
from stockade.agent.records import OWNER_RUN, EndpointRecord
from stockade.model.cluster import Endpoint
from stockade.model.labels import Labels


def _record(key: str, *, owner: str = OWNER_RUN) -> EndpointRecord:
    namespace, name = key.split("/")
    return EndpointRecord(Endpoint(namespace, name, Labels({}), ("10.0.0.9",)), owner=owner)


def _manager(endpoints: dict[str, EndpointRecord], allocated: dict[str, str]
             ) -> tuple[ContainerManager, Any, list[str]]:
    svc: Any = SimpleNamespace(lock=threading.RLock(), state=SimpleNamespace(endpoints=endpoints),
                               ipam=SimpleNamespace(to_dict=lambda: {"allocated": allocated}))
    manager = ContainerManager()
    manager.service = svc
    manager.plumber = SimpleNamespace()  # type: ignore[assignment]
    discarded: list[str] = []
    manager._discard = discarded.append  # type: ignore[assignment,method-assign]
    return manager, svc, discarded


def _waits_for_the_lock(svc: Any, read: Any, change: Any) -> None:
    """`read` in a thread while this one holds the lock: it must still be waiting
    when `change` is made, and finish once the lock is let go."""
    done = threading.Event()
    with svc.lock:
        def run() -> None:
            read()
            done.set()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        assert not done.wait(0.3), "the state was read without the service's lock"
        change()
    worker.join(5)
    assert done.is_set()


def test_the_sweep_reads_endpoints_and_addresses_under_the_lock() -> None:
    endpoints = {"a/one": _record("a/one")}
    allocated = {"10.0.0.2": IPAM_OWNER + "a/one", "10.0.0.3": IPAM_OWNER + "a/two",
                 "10.0.0.4": "cni:other"}
    manager, svc, discarded = _manager(endpoints, allocated)

    def change() -> None:  # a run that finished meanwhile: its address is no leftover
        endpoints["a/two"] = _record("a/two")
        allocated["10.0.0.5"] = IPAM_OWNER + "a/three"

    _waits_for_the_lock(svc, manager._sweep, change)
    assert discarded == ["a/three"]


def test_adopting_reads_the_endpoints_under_the_lock() -> None:
    endpoints = {"a/one": _record("a/one"), "a/api": _record("a/api", owner="api")}
    manager, svc, discarded = _manager(endpoints, {})

    def change() -> None:
        endpoints["a/two"] = _record("a/two")
        del endpoints["a/one"]

    _waits_for_the_lock(svc, manager._adopt, change)
    # No process behind either (pid 0): what the read saw is cleaned up, and only that.
    assert discarded == ["a/two"]
