"""Group commit (agent/group.py): callers that wait together are committed as one, each
keeping its own outcome; through the service, parallel relabels lose nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from test_cni_ops import Node

from stockade.agent.group import GroupCommit
from stockade.agent.protocol import INVALID, NOT_FOUND, ApiError
from stockade.agent.records import (
    Change,
    DeleteEndpoint,
    DeleteNamespace,
    PutNamespace,
    change_key,
)
from stockade.agent.store import StoreError
from stockade.compile.incremental import IncrementalCompiler
from stockade.compile.nft import canonical
from stockade.model.cluster import Namespace
from stockade.model.labels import Labels


class Ledger:
    """A commit function over a dict of namespaces, recording each commit."""

    def __init__(self) -> None:
        self.state: dict[str, Labels] = {}
        self.commits: list[list[Change]] = []
        self.refuse: Callable[[Sequence[Change]], Exception | None] = lambda changes: None

    def commit(self, changes: Sequence[Change], meta: Mapping[str, Any] | None = None) -> int:
        exc = self.refuse(changes)
        if exc is not None:
            raise exc
        for c in changes:
            if isinstance(c, PutNamespace):
                self.state[c.namespace.name] = c.namespace.labels
            elif isinstance(c, DeleteNamespace):
                self.state.pop(c.name, None)
        self.commits.append(list(changes))
        return len(self.commits)


def put(name: str, **labels: str) -> PutNamespace:
    return PutNamespace(Namespace(name, Labels(labels)))


def together(group: GroupCommit, lock: threading.RLock,
             builds: list[Callable[[], Sequence[Change]]]) -> list[int | Exception | None]:
    """Each build submitted from its own thread while the lock is held, so that all of
    them wait together; their outcomes, in order."""
    out: list[int | Exception | None] = [None] * len(builds)

    def run(i: int) -> None:
        try:
            out[i] = group.submit(builds[i])
        except Exception as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(builds))]
    with lock:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(group._queue) < len(builds):  # every caller is waiting
            assert time.monotonic() < deadline, "the callers never queued"
            time.sleep(0.001)
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    return out


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
def lock() -> threading.RLock:
    return threading.RLock()


@pytest.fixture
def group(ledger: Ledger, lock: threading.RLock) -> GroupCommit:
    return GroupCommit(lock, ledger.commit)


def test_callers_waiting_together_are_one_commit_with_one_revision(
        group: GroupCommit, ledger: Ledger, lock: threading.RLock) -> None:
    builds: list[Callable[[], Sequence[Change]]] = [
        (lambda i=i: [put(f"ns{i}", n=str(i))]) for i in range(8)]
    out = together(group, lock, builds)
    assert len(ledger.commits) == 1 and len(ledger.commits[0]) == 8
    assert out == [1] * 8
    assert ledger.state == {f"ns{i}": Labels({"n": str(i)}) for i in range(8)}
    assert (group.batches, group.grouped) == (1, 8)


def test_a_caller_alone_commits_alone(group: GroupCommit, ledger: Ledger) -> None:
    assert group.submit(lambda: [put("a")]) == 1
    assert group.submit(lambda: []) is None  # nothing to do: no commit
    assert ledger.commits == [[put("a")]]
    assert group.batches == 0


def test_a_build_that_raises_fails_its_caller_only(
        group: GroupCommit, ledger: Ledger, lock: threading.RLock) -> None:
    def missing() -> Sequence[Change]:
        raise ApiError(NOT_FOUND, "no namespace gone")

    out = together(group, lock, [lambda: [put("a")], missing, lambda: [put("b")]])
    assert out[0] == out[2] == 1
    assert isinstance(out[1], ApiError) and out[1].code == NOT_FOUND
    assert ledger.commits == [[put("a"), put("b")]]


def test_a_build_touching_what_an_earlier_one_touches_reads_the_state_after_it(
        group: GroupCommit, ledger: Ledger, lock: threading.RLock) -> None:
    """Two relabels of one object: the second is built from the first's result, not
    from the state both started from (no lost update)."""
    ledger.state["a"] = Labels({})

    def relabel(key: str, value: str) -> Callable[[], Sequence[Change]]:
        return lambda: [PutNamespace(Namespace("a", Labels({**ledger.state["a"],
                                                             key: value})))]

    out = together(group, lock, [relabel("x", "1"), lambda: [put("b")], relabel("y", "2")])
    assert ledger.state["a"] == Labels({"x": "1", "y": "2"})
    assert len(ledger.commits) == 2  # the second relabel waited for the next batch
    assert out == [1, 1, 2]


def test_changes_refused_together_are_committed_one_by_one_each_with_its_verdict(
        group: GroupCommit, ledger: Ledger, lock: threading.RLock) -> None:
    # "b" and "c" may not both exist (as two endpoints may not share an address).
    def refuse(changes: Sequence[Change]) -> Exception | None:
        names = {c.namespace.name for c in changes if isinstance(c, PutNamespace)}
        if {"b", "c"} <= names | set(ledger.state):
            return ApiError(INVALID, "1 error(s); nothing was applied", ["b and c clash"])
        return None

    ledger.refuse = refuse
    out = together(group, lock, [lambda: [put("a")], lambda: [put("b")], lambda: [put("c")]])
    assert out[0] == 1 and out[1] == 2
    assert isinstance(out[2], ApiError) and out[2].code == INVALID
    assert set(ledger.state) == {"a", "b"}


def test_a_store_failure_fails_every_caller_of_the_batch_and_writes_nothing(
        group: GroupCommit, ledger: Ledger, lock: threading.RLock) -> None:
    ledger.refuse = lambda changes: StoreError("disk full")
    out = together(group, lock, [lambda: [put("a")], lambda: [put("b")]])
    assert all(isinstance(o, StoreError) and str(o) == "disk full" for o in out)
    assert out[0] is not out[1]  # each caller raises its own
    assert ledger.state == {} and ledger.commits == []
    ledger.refuse = lambda changes: None
    assert group.submit(lambda: [put("c")]) == 1  # nothing left waiting


def test_an_interrupted_batch_leaves_its_callers_waiting_for_the_next(
        group: GroupCommit, ledger: Ledger) -> None:
    first = True

    def interrupted() -> Sequence[Change]:
        nonlocal first
        if first:
            first = False
            raise KeyboardInterrupt
        return [put("a")]

    with pytest.raises(KeyboardInterrupt):
        group.submit(interrupted)
    assert group._queue and ledger.commits == []
    assert group.submit(lambda: [put("b")]) == 1  # the one left behind comes first
    assert ledger.commits == [[put("a"), put("b")]]


def test_every_change_names_the_object_it_writes() -> None:
    assert change_key(put("a")) == change_key(DeleteNamespace("a")) == ("namespace", "a")
    assert change_key(DeleteEndpoint("x/p")) == ("endpoint", "x/p")
    with pytest.raises(TypeError):
        change_key("nope")  # type: ignore[arg-type]


def test_a_commit_that_lets_go_of_the_lock_while_it_waits_holds_nobody_up(
        group: GroupCommit, ledger: Ledger, lock: threading.RLock) -> None:
    """The etcd datastore's commit waits for its watch with the lock let go: a caller
    whose change is in that commit waits for it, not spinning on the lock it would
    take from the waiting commit."""
    group.together = False
    watch = threading.Condition(lock)
    original = ledger.commit

    def commit(changes: Sequence[Change], meta: Mapping[str, Any] | None = None) -> int:
        with lock:
            revision = original(changes, meta)
            watch.wait(0.05)  # as the etcd commit waits for its watch to deliver
            return revision

    group._commit = commit
    out = together(group, lock, [(lambda i=i: [put(f"ns{i}")]) for i in range(6)])
    assert sorted(o for o in out if isinstance(o, int)) == [1, 2, 3, 4, 5, 6]
    assert set(ledger.state) == {f"ns{i}" for i in range(6)}


# ---- through the service ------------------------------------------------------------------


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    yield n
    n.close()


def test_parallel_relabels_through_the_service_lose_nothing(node: Node) -> None:
    """Sixteen threads relabel eight endpoints, two threads each, twenty times each: every
    label set arrives, the store holds what the state holds, and the kernel agrees."""
    for i in range(8):
        node.call("apply", documents=[{
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"p{i}", "namespace": "x", "labels": {"app": "web"}},
            "status": {"podIP": f"10.9.0.{10 + i}"}}], source="test")
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            for n in range(20):
                node.call("label", kind="endpoint", name=f"x/p{k % 8}",
                          set={f"c{k}": str(n)}, remove=[])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for i in range(8):
        labels = node.service.state.endpoints[f"x/p{i}"].endpoint.labels
        assert labels == Labels({"app": "web", f"c{i}": "19", f"c{i + 8}": "19"})
    stored, revision = node.store.load()
    assert stored.endpoints == node.service.state.endpoints
    assert revision == node.reconciler.desired_revision
    assert node.datapath.kernel == canonical(
        IncrementalCompiler.of(node.service.state.cluster()).ruleset())
    with pytest.raises(ApiError) as err:
        node.call("label", kind="endpoint", name="x/none", set={"a": "b"}, remove=[])
    assert err.value.code == NOT_FOUND and err.value.message == "no endpoint x/none"


def test_apart_each_caller_is_built_and_committed_alone_in_turn(
        group: GroupCommit, ledger: Ledger, lock: threading.RLock) -> None:
    """The etcd datastore's commit routes by what the changes are and may let go of the
    lock while it waits: there each caller is built right before its own commit."""
    group.together = False
    built: list[int] = []

    def build(i: int) -> Callable[[], Sequence[Change]]:
        def run() -> Sequence[Change]:
            built.append(len(ledger.commits))  # the commits before this build
            return [put(f"ns{i}")]
        return run

    out = together(group, lock, [build(i) for i in range(4)])
    assert sorted(o for o in out if isinstance(o, int)) == [1, 2, 3, 4]
    assert [len(c) for c in ledger.commits] == [1, 1, 1, 1]
    assert built == [0, 1, 2, 3] and group.batches == 0


def test_parallel_cni_adds_are_committed_together_each_with_its_own_address(
        node: Node) -> None:
    """Sixteen ADDs at once (as a node starting many pods): sixteen addresses, every
    attachment registered, the store's meta holding them all and the pool as in memory."""
    out: dict[int, Any] = {}
    errors: list[BaseException] = []

    def add(k: int) -> None:
        try:
            out[k] = node.add(f"c{k}", labels={"app": "web"})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(k,)) for k in range(16)]
    with node.service.lock:  # all sixteen wait together
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(node.service.group._queue) < 16:
            assert time.monotonic() < deadline
            time.sleep(0.001)
    for t in threads:
        t.join(60)
    assert not errors
    addresses = {o["address"] for o in out.values()}
    assert len(addresses) == 16
    assert {a.key for a in node.ops.attachments.values()} == {f"x/c{k}" for k in range(16)}
    stored = node.store.get_meta("cni")["attachments"]
    assert set(stored) == set(node.ops.attachments)
    assert node.store.get_meta("ipam") == node.service.ipam.to_dict()
    state, _ = node.store.load()
    assert {ep.endpoint.ips[0] + "/24" for ep in state.endpoints.values()} == addresses
    # The first creates namespace x; the others would create it too, so they wait for
    # the next batch, which finds it there.
    assert (node.service.group.batches, node.service.group.grouped) == (1, 15)


def test_cni_adds_refused_together_each_get_their_own_verdict_and_leave_nothing(
        node: Node, lock: threading.RLock) -> None:
    """Two ADDs claiming one static address and a third with its own, waiting together:
    the batch is refused as a whole, then each is built and committed alone: the first
    and the third are attached, the second is refused and registers nothing."""
    group = node.service.group
    results: dict[str, Any] = {}

    def add(cid: str, ip: str) -> None:
        try:
            results[cid] = node.add(cid, allocate=False, endpoint={"ips": [ip]})
        except Exception as exc:
            results[cid] = exc

    threads = [threading.Thread(target=add, args=a) for a in
               (("s1", "10.9.0.77"), ("s2", "10.9.0.77"), ("s3", "10.9.0.78"))]
    with node.service.lock:
        for t in threads:
            t.start()
            deadline = time.monotonic() + 10
            while len(group._queue) < threads.index(t) + 1:  # queued in this order
                assert time.monotonic() < deadline
                time.sleep(0.001)
    for t in threads:
        t.join(30)
    assert isinstance(results["s2"], ApiError) and results["s2"].code == INVALID
    assert not isinstance(results["s1"], Exception) and not isinstance(results["s3"],
                                                                        Exception)
    assert {a.key for a in node.ops.attachments.values()} == {"x/s1", "x/s3"}
    assert set(node.store.get_meta("cni")["attachments"]) == set(node.ops.attachments)
    assert group.batches == 0  # refused together, then committed one by one
