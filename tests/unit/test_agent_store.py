"""The agent's SQLite state store: durability, atomicity, permissions, schema, threads.

The crash test forks a child that commits in a loop and SIGKILLs it at a random
moment; the child's revision N always holds endpoints e1..eN, so the state the
parent loads must be exactly what its revision says.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import stat
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.agent import store as store_mod
from stockade.agent.records import (
    AgentState,
    Change,
    DeleteEndpoint,
    DeleteNamespace,
    DeletePolicy,
    EndpointRecord,
    PolicyRecord,
    PutEndpoint,
    PutNamespace,
    PutPolicy,
)
from stockade.agent.store import SCHEMA_VERSION, Store, StoreError
from stockade.errors import AgentError
from stockade.model.cluster import ContainerPort, Endpoint, Namespace
from stockade.model.labels import Labels


def endpoint(name: str, ns: str = "default", **labels: str) -> EndpointRecord:
    return EndpointRecord(Endpoint(ns, name, Labels(labels or {"app": name}), ("10.244.0.2",),
                                   (ContainerPort(80, "TCP", "http"),)),
                          netns=f"/run/netns/{name}", owner="run", pid=42,
                          command=("sleep", "1"), created=1.5)


def policy(name: str, ns: str = "default") -> PolicyRecord:
    return PolicyRecord.from_dict({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{}]}})


def namespace(name: str, **labels: str) -> Namespace:
    return Namespace(name, Labels(labels))


def some_changes() -> list[Change]:
    return [PutNamespace(namespace("default", team="a")), PutNamespace(namespace("other")),
            PutEndpoint(endpoint("web")), PutEndpoint(endpoint("db")),
            PutPolicy(policy("allow-web"))]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state")
    yield s
    s.close()


# ---- basics ---------------------------------------------------------------------------


def test_fresh_store_is_empty_at_revision_zero(store: Store) -> None:
    state, revision = store.load()
    assert (state, revision) == (AgentState(), 0)
    assert store.revision() == 0
    assert store.get_meta("ipam") is None


def test_commits_fold_like_agent_state_and_persist(tmp_path: Path) -> None:
    expected = AgentState()
    with Store(tmp_path) as s:
        assert s.commit(some_changes()) == 1
        expected.apply(some_changes())
        second: list[Change] = [DeleteEndpoint("default/db"), DeleteNamespace("other"),
                                PutEndpoint(endpoint("web", app="web", tier="front")),
                                DeletePolicy("default/missing")]  # deleting nothing is fine
        assert s.commit(second) == 2
        expected.apply(second)
        assert s.load() == (expected, 2)
    with Store(tmp_path) as s:
        state, revision = s.load()
    assert (state, revision) == (expected, 2)
    # Policies keep the manifest they were submitted as (what `get -o yaml` shows).
    assert state.policies["default/allow-web"].to_dict() == policy("allow-web").to_dict()


def test_empty_commit_keeps_the_revision(store: Store) -> None:
    store.commit(some_changes())
    assert store.commit([]) == 1
    assert store.commit([], meta={}) == 1
    assert store.revision() == 1


def test_meta_blobs(store: Store) -> None:
    ipam = {"subnet": "10.244.0.0/16", "gateway": "10.244.0.1", "allocated": {}}
    assert store.put_meta("ipam", ipam) == 1
    assert store.get_meta("ipam") == ipam
    assert store.commit([PutEndpoint(endpoint("web"))], meta={"ipam": {"x": 1}, "n": 5}) == 2
    assert store.get_meta("ipam") == {"x": 1}
    assert store.get_meta("n") == 5  # JSON text "5" stays a JSON number, not a column int
    assert store.load_with_meta(["ipam", "absent"])[1:] == (2, {"ipam": {"x": 1}})
    assert store.put_meta("n", None) == 3  # None deletes
    assert store.get_meta("n") is None


@pytest.mark.parametrize("key", ["revision", "schema", ""])
def test_reserved_meta_keys_are_refused(store: Store, key: str) -> None:
    with pytest.raises(StoreError, match="meta key"):
        store.put_meta(key, 1)
    assert store.revision() == 0


# ---- all or nothing -------------------------------------------------------------------


def test_unencodable_commit_writes_nothing(store: Store) -> None:
    store.commit(some_changes())
    before = store.load()
    for meta in ({"bad": object()}, {"nan": float("nan")}):
        with pytest.raises(StoreError, match=r"cannot encode the change"):
            store.commit([DeleteEndpoint("default/web")], meta=meta)
    assert store.load() == before


def test_failure_inside_the_transaction_rolls_back(store: Store,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    store.commit(some_changes())
    before = store.load()
    real = store_mod._encode

    def broken(*args: object) -> list[store_mod._Write]:
        writes = real(*args)  # type: ignore[arg-type]
        return [*writes, store_mod._Write("INSERT INTO no_such_table VALUES (?)", ("x",))]

    monkeypatch.setattr(store_mod, "_encode", broken)
    with pytest.raises(AgentError, match="transaction failed, nothing was written"):
        store.commit([DeleteEndpoint("default/web"), PutEndpoint(endpoint("new"))])
    monkeypatch.undo()
    assert store.load() == before
    assert store.commit([PutEndpoint(endpoint("after"))]) == 2  # the store still works


# ---- files, schema, corruption ------------------------------------------------------


def test_permissions_and_journal_mode(tmp_path: Path) -> None:
    state_dir = tmp_path / "a" / "state"
    with Store(state_dir) as s:
        s.commit(some_changes())
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        for f in state_dir.iterdir():  # state.db, and SQLite's -wal/-shm
            assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f
        assert stat.S_IMODE(s.path.stat().st_mode) == 0o600
        conn = sqlite3.connect(s.path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()


def test_existing_loose_file_is_tightened(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    db = tmp_path / "state.db"
    db.touch(mode=0o644)
    db.chmod(0o644)
    Store(tmp_path).close()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_writable_state_dir_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    with pytest.raises(StoreError, match="writable by group or others"):
        Store(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_state_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    os.chown(tmp_path, 65534, 65534)
    with pytest.raises(StoreError, match="belongs to uid 65534"):
        Store(tmp_path)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    Store(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'",
                 (json.dumps(SCHEMA_VERSION + 1),))
    conn.commit()
    conn.close()
    newer = SCHEMA_VERSION + 1
    with pytest.raises(StoreError, match=rf"state\.db: .*schema version {newer}, newer"):
        Store(tmp_path)


def test_not_a_database_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=r"state\.db: cannot open"):
        Store(tmp_path)


def test_corrupt_row_names_table_and_key(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        s.commit(some_changes())
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.execute("UPDATE endpoints SET doc = '{\"name\": 1}' WHERE key = 'default/web'")
    conn.commit()
    conn.close()
    with Store(tmp_path) as s, pytest.raises(StoreError, match="endpoints row 'default/web'"):
        s.load()


def test_closed_store_refuses(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        s.load()


# ---- threads --------------------------------------------------------------------------


def test_concurrent_commits_are_serialised(store: Store) -> None:
    threads, per_thread = 8, 25
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(per_thread):
                store.commit([PutEndpoint(endpoint(f"t{t}-{i}"))], meta={f"t{t}": i})
                store.load()
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert not errors
    state, revision = store.load()
    assert revision == threads * per_thread
    assert len(state.endpoints) == threads * per_thread


# ---- crash safety -----------------------------------------------------------------------


def _crash_changes(n: int) -> list[Change]:
    """Revision n's transaction: the state at revision n is fully determined by n."""
    return [PutEndpoint(endpoint(f"e{n}", ns="crash")),
            PutNamespace(namespace("crash", rev=str(n)))]


def _child(state_dir: Path, wfd: int) -> None:
    s = Store(state_dir)
    _, revision = s.load()
    while True:
        n = revision + 1
        revision = s.commit(_crash_changes(n), meta={"last": n})
        if revision != n:
            os.write(wfd, b"bad\n")
            return
        os.write(wfd, f"{revision}\n".encode())


def _run_and_kill(state_dir: Path, rng: random.Random) -> list[int]:
    """Fork a committing child, SIGKILL it at a random moment; what it reported."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(rfd)
            _child(state_dir, wfd)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as pipe:
        want = rng.randint(1, 30)
        lines: list[bytes] = []
        while len(lines) < want:
            line = pipe.readline()
            assert line, "the child died before committing"
            lines.append(line)
        time.sleep(rng.uniform(0, 0.01))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        lines += pipe.read().splitlines(keepends=True)
    assert b"bad\n" not in lines
    return [int(x) for x in lines if x.endswith(b"\n")]  # a torn last line is not a report


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
# ---- group commit --------------------------------------------------------------------


def _fsync_log(store: Store, hold: float) -> list[tuple[float, float]]:
    """Record each fsync the store makes (start, end), each held `hold` seconds longer
    than the disk needs, so that concurrent writers meet one under way."""
    calls: list[tuple[float, float]] = []
    real = store._fsync

    def slow() -> None:
        start = time.monotonic()
        time.sleep(hold)
        real()
        calls.append((start, time.monotonic()))

    store._fsync = slow  # type: ignore[method-assign]
    return calls


def test_concurrent_writers_share_fsyncs_and_each_returns_only_after_its_own(
        store: Store) -> None:
    calls = _fsync_log(store, 0.02)
    committed: dict[int, float] = {}
    returned: dict[int, float] = {}
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            store.commit([PutEndpoint(endpoint(f"g{t}"))], durable=False)
            committed[t] = time.monotonic()
            store.sync()
            returned[t] = time.monotonic()
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(16)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert not errors
    assert 1 <= len(calls) < 16  # shared: 16 commits, fewer fsyncs
    for t in range(16):
        # Some fsync began after this writer's commit and ended before its sync returned.
        assert any(committed[t] <= start and end <= returned[t] for start, end in calls), t
    assert len(store.load()[0].endpoints) == 16


def test_a_durable_commit_returns_after_an_fsync_that_began_after_it(store: Store) -> None:
    calls = _fsync_log(store, 0.0)
    before = time.monotonic()
    store.commit([PutEndpoint(endpoint("one"))])
    assert len(calls) == 1 and calls[0][0] >= before
    store.commit([PutEndpoint(endpoint("two"))], durable=False)
    assert len(calls) == 1  # not yet on disk: the caller syncs before acknowledging
    store.sync()
    store.sync()  # nothing new since: no second fsync
    assert len(calls) == 2


def test_each_thread_hears_how_long_its_commits_took_to_reach_the_disk(store: Store) -> None:
    heard: list[float] = []
    store.on_durable = heard.append
    _fsync_log(store, 0.05)
    store.commit([PutEndpoint(endpoint("one"))], durable=False)
    store.commit([PutEndpoint(endpoint("two"))], durable=False)
    assert heard == []
    store.sync()  # both, from the first commit on
    assert len(heard) == 1 and heard[0] >= 0.05
    store.sync()  # nothing of this thread's since
    store.commit([PutEndpoint(endpoint("three"))])
    assert len(heard) == 2


def test_a_failed_fsync_is_a_store_error_and_the_next_sync_tries_again(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fsync
    monkeypatch.setattr(store_mod.os, "fsync", lambda fd: (_ for _ in ()).throw(
        OSError(5, "Input/output error")))
    store.commit([PutEndpoint(endpoint("one"))], durable=False)
    with pytest.raises(StoreError, match="fsync failed"):
        store.sync()
    monkeypatch.setattr(store_mod.os, "fsync", real)
    store.sync()
    assert store._synced == store._committed


def test_survives_sigkill_at_a_random_moment(tmp_path: Path) -> None:
    seed = int(os.environ.get("STORE_CRASH_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    reported_before = 0
    for round_ in range(5):
        reported = _run_and_kill(tmp_path, rng)
        context = f"seed={seed} round={round_}"
        # Reports are consecutive and continue from what the last round left.
        assert reported[0] >= reported_before + 1, context
        assert reported == list(range(reported[0], reported[0] + len(reported))), context
        with Store(tmp_path) as s:
            state, revision = s.load()
            # Every reported commit is there; at most one more committed unreported.
            assert reported[-1] <= revision <= reported[-1] + 1, context
            assert set(state.endpoints) == {f"crash/e{i}" for i in range(1, revision + 1)}, \
                context
            assert state.namespaces["crash"].labels["rev"] == str(revision), context
            assert s.get_meta("last") == revision, context
        reported_before = revision
    print(f"crash test: seed={seed}, final revision {reported_before}", file=sys.stderr)


def test_replicas_decode_to_shared_labels_and_ports_and_a_bool_port_is_still_refused(
        ) -> None:
    """Label maps and port lists are interned by content (a load of 10,000 endpoints makes
    each once); what is refused stays refused after an equal-looking value was seen."""
    from stockade.errors import DecodeError

    a = endpoint("a", app="web", tier="front").to_dict()
    b = {**endpoint("b", app="web", tier="front").to_dict(), "ips": ["10.244.0.3"]}
    ra, rb = EndpointRecord.from_dict(a), EndpointRecord.from_dict(b)
    assert ra.endpoint.labels is rb.endpoint.labels
    assert ra.endpoint.ports is rb.endpoint.ports
    assert ra.endpoint.ports[0].path == "ports[0]"
    # True == 1 and hashes alike: the type is checked before anything is looked up
    bad = {**a, "ports": [{"name": "http", "port": True, "protocol": "TCP"}]}
    EndpointRecord.from_dict({**a, "ports": [{"name": "http", "port": 1, "protocol": "TCP"}]})
    with pytest.raises(DecodeError, match="must be an integer"):
        EndpointRecord.from_dict(bad)
    # other labels, other map; and an interned map is not changed by a later decode
    other = EndpointRecord.from_dict({**a, "labels": {"app": "web", "tier": "back"}})
    assert other.endpoint.labels == Labels({"app": "web", "tier": "back"})
    assert ra.endpoint.labels == Labels({"app": "web", "tier": "front"})
