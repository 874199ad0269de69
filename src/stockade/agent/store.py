"""The agent's embedded state store: one SQLite database in the state directory.

Why SQLite: the agent must survive ``kill -9`` at any instant and come back
with exactly what it had acknowledged, because the kernel may already enforce a
change the agent accepted. SQLite in WAL mode gives that: a committed
transaction is in the write-ahead log (in the page cache: it survives the
process), and a torn write is rolled back on the next open. It is in the
standard library, so the agent needs no server and no extra package.

Durability against the machine going down is an fsync of the log, and it is
grouped (*group commit*): SQLite runs with ``synchronous=NORMAL`` (no fsync in
``COMMIT``) and :meth:`Store.sync` fsyncs the log once for every transaction
committed before it, so concurrent writers share one fsync and none holds the
agent's locks while the disk works. :meth:`Store.commit` returns only once
its transaction is on disk unless asked not to (``durable=False``); the caller
then calls :meth:`Store.sync` before acknowledging anything. A change may meet
the kernel a moment before the disk, which loses nothing: what the machine
going down takes from the disk, it takes from the kernel too, and nothing was
acknowledged that is not on the disk.

Layout (every ``doc``/``value`` is JSON text; the columns are declared TEXT
because a declared type such as ``JSON`` has NUMERIC affinity in SQLite, which
would silently turn the JSON text ``5`` into the integer 5)::

    namespaces(name TEXT PRIMARY KEY, doc TEXT)   namespace_to_dict
    endpoints (key  TEXT PRIMARY KEY, doc TEXT)   EndpointRecord.to_dict
    policies  (key  TEXT PRIMARY KEY, doc TEXT)   PolicyRecord.to_dict (the manifest)
    cluster_policies (name TEXT PRIMARY KEY, doc TEXT)  ClusterPolicyRecord.to_dict
    meta      (key  TEXT PRIMARY KEY, value TEXT) "schema", "revision", named blobs

Schema 2 added ``cluster_policies``; a schema-1 database gets the table when an
agent of schema 2 opens it (an older agent then refuses the file rather than
silently dropping the ClusterNetworkPolicies it cannot read).

``revision`` counts committed transactions: every :meth:`Store.commit` that
changes something (records or meta) increments it in the same transaction, so
a revision always names one exact state.

Threads: one connection (``check_same_thread=False``) guarded by one reentrant
lock, :attr:`Store.lock`. SQLite serialises writers anyway; one connection
avoids ``SQLITE_BUSY`` between the agent's own threads and keeps reads cheap.
Hold :attr:`Store.lock` around a load-compute-commit sequence to make it
atomic against the agent's other threads.

Public API::

    Store(state_dir)                      # creates <state_dir>/state.db (0600, dir 0700)
    Store.path -> Path
    Store.lock -> threading.RLock
    Store.load(known=None) -> (AgentState, revision)
    Store.load_with_meta(keys, known=None) -> (AgentState, revision, {key: value})
    Store.read_rows(keys=()) -> (rows, revision, {key: value})   # as stored, undecoded
    Store.decode(rows) -> AgentState
    Store.state_rows(state) -> rows | None                      # as a commit writes them
    Store.revision() -> int
    Store.commit(changes, meta=None, *, durable=True) -> revision
                                          # one transaction, all or nothing
    Store.sync()                          # what was committed is on disk (one fsync
                                          # serves every thread waiting)
    Store.get_meta(key) -> Any | None
    Store.put_meta(key, value) -> revision         # value None deletes the key
    Store.close()                                  # also a context manager

Snapshots through the store (the pure part is :mod:`stockade.agent.snapshot`)::

    save_snapshot(store, meta_keys=SNAPSHOT_META_KEYS) -> dict
    restore_snapshot(store, data, meta_keys=SNAPSHOT_META_KEYS, *, strict_cidr=False)
        -> Restored
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from stockade.agent.ownership import ensure_private_dir
from stockade.agent.records import (
    AgentState,
    Change,
    ClusterPolicyRecord,
    DeleteClusterPolicy,
    DeleteEndpoint,
    DeleteNamespace,
    DeletePolicy,
    EndpointRecord,
    PolicyRecord,
    PutClusterPolicy,
    PutEndpoint,
    PutNamespace,
    PutPolicy,
    RefusedClusterPolicy,
    namespace_from_dict,
    namespace_to_dict,
    read_cluster_policy,
)
from stockade.agent.snapshot import (
    SNAPSHOT_META_KEYS,
    changes_to_restore,
    parse_snapshot,
    snapshot_of,
)
from stockade.errors import AgentError, StockadeError

SCHEMA_VERSION = 2
DB_NAME = "state.db"
FILE_MODE = 0o600
BUSY_TIMEOUT_MS = 10_000  # another process (a second agent, a backup) holding the lock

# Meta keys the store owns; callers may not write them.
META_SCHEMA = "schema"
META_REVISION = "revision"
RESERVED_META = frozenset({META_SCHEMA, META_REVISION})

_T = TypeVar("_T")

# The records' rows as read: table -> (key, doc) pairs in key order.
Rows = Mapping[str, Sequence[tuple[str, str]]]
# A warm start's offer (agent/warm.py): given the rows and the decoder of any subset of
# them, the state they hold, or None to have them all decoded.
Known = Callable[[Rows, Callable[[Rows], AgentState]], "AgentState | None"]

# The records' tables and their key columns, in the order a load reads them.
TABLES = (("namespaces", "name"), ("endpoints", "key"), ("policies", "key"),
          ("cluster_policies", "name"))

_TABLES = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS namespaces (name TEXT PRIMARY KEY, doc TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS endpoints (key TEXT PRIMARY KEY, doc TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS policies (key TEXT PRIMARY KEY, doc TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS cluster_policies (name TEXT PRIMARY KEY, doc TEXT NOT NULL)",
)


class StoreError(AgentError):
    """The state store cannot be opened, read or written; names the database file."""


@dataclass(frozen=True)
class _Write:
    """One encoded statement, prepared before the transaction so that an
    unencodable change fails before anything is written."""

    sql: str
    params: tuple[str, ...]


class Store:
    """The agent's durable state; see the module docstring for the guarantees."""

    def __init__(self, state_dir: Path | str) -> None:
        self._dir = Path(state_dir)
        self.path = self._dir / DB_NAME
        self.lock = threading.RLock()
        # Group commit (see the module doc): transactions committed and known to be on
        # disk, counted (not revisions: a subclass may number those its own way), and
        # whether some thread's fsync is under way.
        self._committed = 0
        self._synced = 0
        self._syncing = False
        self._sync_cond = threading.Condition()
        # Seconds from a thread's first unsynced commit to its sync (the metric
        # stockade_store_commit_duration_seconds), when someone listens.
        self.on_durable: Callable[[float], None] | None = None
        self._since = threading.local()
        ensure_private_dir(self._dir, StoreError)
        _ensure_private_file(self.path)
        self._conn: sqlite3.Connection | None = self._connect()
        try:
            self._init_schema()
            self._fsync()  # the schema, and whatever an earlier process left unsynced
        except BaseException:
            self.close()
            raise

    # ---- lifecycle ------------------------------------------------------------------

    def close(self) -> None:
        with self.lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reads ----------------------------------------------------------------------

    def load(self, known: Known | None = None) -> tuple[AgentState, int]:
        """The whole state and its revision, read in one transaction.

        `known`, given every row read and :meth:`decode`, may answer the state those
        rows decode to without decoding them all (a warm start's, see agent/warm.py)."""
        state, revision, _ = self.load_with_meta((), known)
        return state, revision

    def load_with_meta(self, keys: Iterable[str], known: Known | None = None,
                       ) -> tuple[AgentState, int, dict[str, Any]]:
        """The state, its revision and the named meta blobs present, all consistent."""
        rows, revision, meta = self.read_rows(keys)
        found = known(rows, self.decode) if known is not None else None
        return (found if found is not None else self.decode(rows)), revision, meta

    def read_rows(self, keys: Iterable[str] = ()) -> tuple[Rows, int, dict[str, Any]]:
        """Every record's row as stored (table -> (key, doc) in key order), the revision
        and the named meta blobs present, in one transaction."""
        wanted = list(keys)
        with self._transaction("BEGIN") as conn:
            rows = {table: conn.execute(
                f"SELECT {column}, doc FROM {table} ORDER BY {column}").fetchall()  # noqa: S608
                for table, column in TABLES}
            revision = self._revision(conn)
            meta = {k: v for k in wanted if (v := self._meta(conn, k)) is not None}
        return rows, revision, meta

    def decode(self, rows: Rows) -> AgentState:
        """The state `rows` hold (any subset of the tables), every row checked."""
        state = AgentState(
            namespaces=self._rows(rows, "namespaces", namespace_from_dict,
                                  lambda ns: ns.name),
            endpoints=self._rows(rows, "endpoints", EndpointRecord.from_dict,
                                 lambda r: r.key),
            policies=self._rows(rows, "policies", PolicyRecord.from_dict, lambda r: r.key),
        )
        tiers = self._rows(rows, "cluster_policies",
                           lambda d: read_cluster_policy(d, _name_in(d), "store"),
                           lambda r: r.key if isinstance(r, ClusterPolicyRecord) else r.name)
        state.cluster_policies = {k: r for k, r in tiers.items()
                                  if isinstance(r, ClusterPolicyRecord)}
        state.refused_cluster_policies = {k: r for k, r in tiers.items()
                                          if isinstance(r, RefusedClusterPolicy)}
        return state

    @staticmethod
    def state_rows(state: AgentState) -> dict[str, list[tuple[str, str]]] | None:
        """The rows that hold `state`, as a commit writes them, in key order; None when
        a stored ClusterNetworkPolicy was refused (its row is not the record's)."""
        if state.refused_cluster_policies:
            return None
        docs: dict[str, Mapping[str, Any]] = {
            "namespaces": {k: namespace_to_dict(v) for k, v in state.namespaces.items()},
            "endpoints": {k: v.to_dict() for k, v in state.endpoints.items()},
            "policies": {k: v.to_dict() for k, v in state.policies.items()},
            "cluster_policies": {k: v.to_dict() for k, v in state.cluster_policies.items()},
        }
        return {table: [(key, _dumps(doc[key])) for key in sorted(doc)]
                for table, doc in docs.items()}

    def revision(self) -> int:
        with self._transaction("BEGIN") as conn:
            return self._revision(conn)

    def get_meta(self, key: str) -> Any | None:
        """A named blob, or None when absent."""
        with self._transaction("BEGIN") as conn:
            return self._meta(conn, key)

    # ---- writes ---------------------------------------------------------------------

    def put_meta(self, key: str, value: Any) -> int:
        """Store one named blob (None deletes it) in its own transaction."""
        return self.commit((), meta={key: value})

    def commit(self, changes: Sequence[Change], meta: Mapping[str, Any] | None = None, *,
               durable: bool = True) -> int:
        """Apply the changes and meta updates in ONE transaction; the new revision.

        All or nothing: on any error nothing is written and StoreError is raised.
        Nothing to do returns the current revision without a transaction, so an
        idle reconcile loop does not grow the revision. A meta value of None
        deletes that key. ``durable=False`` returns before the fsync: the caller
        must :meth:`sync` the revision before acknowledging it to anyone.
        """
        writes = _encode(changes, meta or {}, self.path)
        if not writes:
            return self.revision()
        started = time.monotonic()
        with self._transaction("BEGIN IMMEDIATE") as conn:
            for w in writes:
                conn.execute(w.sql, w.params)
            revision = self._revision(conn) + 1
            conn.execute("UPDATE meta SET value = ? WHERE key = ?",
                         (json.dumps(revision), META_REVISION))
        with self._sync_cond:
            self._committed += 1
        if getattr(self._since, "at", None) is None:
            self._since.at = started
        if durable:
            self.sync()
        return revision

    def sync(self) -> None:
        """Return once every transaction committed before this call is on disk.

        One fsync of the log makes every transaction committed before it durable,
        so a thread finding one under way waits for it (and, if its own transaction
        came too late for that one, the next thread to need it starts another).
        """
        with self._sync_cond:
            mine = self._committed
            while self._synced < mine:
                if not self._syncing:
                    self._syncing = True
                    target = self._committed
                    break
                self._sync_cond.wait()
            else:
                self._synced_now()
                return
        done = False
        try:
            self._fsync()
            done = True
        finally:
            with self._sync_cond:
                self._syncing = False
                if done:
                    self._synced = max(self._synced, target)
                self._sync_cond.notify_all()
        self._synced_now()

    def _synced_now(self) -> None:
        """This thread's commits are on disk: report how long since the first of them."""
        since = getattr(self._since, "at", None)
        self._since.at = None
        if since is not None and self.on_durable is not None:
            self.on_durable(time.monotonic() - since)

    def _fsync(self) -> None:
        """fsync the write-ahead log (the database file when a checkpoint has removed
        the log: then the checkpoint, which syncs the database, has put it there)."""
        for path in (self.path.with_name(self.path.name + "-wal"), self.path):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StoreError(f"{path}: cannot open to make the state durable: "
                                 f"{exc}") from exc
            try:
                os.fsync(fd)
            except OSError as exc:
                raise StoreError(f"{path}: fsync failed; the last changes are stored but "
                                 f"may not survive the machine going down: {exc}") from exc
            finally:
                os.close(fd)
            return
        raise StoreError(f"{self.path}: the state database is gone")

    # ---- internals ------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: no implicit transactions; every one is explicit.
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=BUSY_TIMEOUT_MS / 1000)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the state database: {exc}") from exc
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            # No fsync in COMMIT: Store.sync makes transactions durable, a group at a
            # time (see the module doc).
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"journal mode is {mode}, WAL was refused")
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"{self.path}: cannot open the state database: {exc}") from exc
        return conn

    def _init_schema(self) -> None:
        """Create the tables on first use; refuse a database from a newer agent."""
        with self._transaction("BEGIN IMMEDIATE") as conn:
            has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'"
                                    " AND name = 'meta'").fetchone() is not None
            found = self._meta(conn, META_SCHEMA) if has_meta else None
            if found is None:
                for sql in _TABLES:
                    conn.execute(sql)
                conn.execute("INSERT INTO meta VALUES (?, ?)",
                             (META_SCHEMA, json.dumps(SCHEMA_VERSION)))
                conn.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)",
                             (META_REVISION, json.dumps(0)))
            elif not isinstance(found, int) or isinstance(found, bool) or found < 1:
                raise StoreError(f"{self.path}: invalid schema version {found!r}")
            elif found > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: the state database has schema version {found}, newer than"
                    f" this agent's {SCHEMA_VERSION}; run the newer agent or move the file away")
            elif found < SCHEMA_VERSION:
                # Every change from an older schema adds tables: creating the missing
                # ones is the whole migration, in the same transaction as the new number.
                for sql in _TABLES:
                    conn.execute(sql)
                conn.execute("UPDATE meta SET value = ? WHERE key = ?",
                             (json.dumps(SCHEMA_VERSION), META_SCHEMA))

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        """Under the lock: begin, yield, commit; roll back and raise StoreError on error."""
        with self.lock:
            conn = self._conn
            if conn is None:
                raise StoreError(f"{self.path}: the store is closed")
            try:
                conn.execute(begin)
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot begin a transaction: {exc}") from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                _rollback(conn)
                if isinstance(exc, StockadeError) or not isinstance(exc, Exception):
                    raise
                raise StoreError(f"{self.path}: transaction failed, nothing was written:"
                                 f" {exc}") from exc

    def _revision(self, conn: sqlite3.Connection) -> int:
        value = self._meta(conn, META_REVISION)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise StoreError(f"{self.path}: invalid revision {value!r}")
        return value

    def _meta(self, conn: sqlite3.Connection, key: str) -> Any | None:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else self._json(row[0], f"meta {key!r}")

    def _rows(self, rows: Rows, table: str,
              decode: Callable[[Mapping[str, Any]], _T], key_of: Callable[[_T], str],
              ) -> dict[str, _T]:
        """Every row of a table, decoded and checked to sit under its own key."""
        out: dict[str, _T] = {}
        for key, doc in rows.get(table, ()):
            where = f"{table} row {key!r}"
            try:
                value = decode(self._json(doc, where))
            except StoreError:
                raise
            except (StockadeError, KeyError, TypeError, ValueError, AttributeError) as exc:
                raise StoreError(f"{self.path}: {where} does not decode: {exc}") from exc
            if key_of(value) != key:
                raise StoreError(f"{self.path}: {where} holds {key_of(value)!r}")
            out[key] = value
        return out

    def _json(self, text: Any, where: str) -> Any:
        try:
            return json.loads(text)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"{self.path}: {where} is not JSON: {exc}") from exc


# ---- encoding (pure) ----------------------------------------------------------------


def _encode(changes: Sequence[Change], meta: Mapping[str, Any], path: Path) -> list[_Write]:
    """Every statement of a commit, or StoreError before anything is written."""
    try:
        writes = [_encode_change(c) for c in changes]
        writes += [_encode_meta(k, v) for k, v in meta.items()]
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{path}: cannot encode the change: {exc}") from exc
    return writes


def _encode_change(c: Change) -> _Write:
    if isinstance(c, PutNamespace):
        return _put("namespaces", "name", c.namespace.name, namespace_to_dict(c.namespace))
    if isinstance(c, DeleteNamespace):
        return _Write("DELETE FROM namespaces WHERE name = ?", (c.name,))
    if isinstance(c, PutEndpoint):
        return _put("endpoints", "key", c.record.key, c.record.to_dict())
    if isinstance(c, DeleteEndpoint):
        return _Write("DELETE FROM endpoints WHERE key = ?", (c.key,))
    if isinstance(c, PutPolicy):
        return _put("policies", "key", c.record.key, c.record.to_dict())
    if isinstance(c, DeletePolicy):
        return _Write("DELETE FROM policies WHERE key = ?", (c.key,))
    if isinstance(c, PutClusterPolicy):
        return _put("cluster_policies", "name", c.record.key, c.record.to_dict())
    if isinstance(c, DeleteClusterPolicy):
        return _Write("DELETE FROM cluster_policies WHERE name = ?", (c.name,))
    raise TypeError(f"not a change: {c!r}")


def _put(table: str, column: str, key: str, doc: Any) -> _Write:
    return _Write(f"INSERT OR REPLACE INTO {table} ({column}, doc) VALUES (?, ?)",  # noqa: S608
                  (key, _dumps(doc)))


def _encode_meta(key: str, value: Any) -> _Write:
    if not isinstance(key, str) or not key:
        raise ValueError(f"meta key must be a non-empty string, not {key!r}")
    if key in RESERVED_META:
        raise ValueError(f"meta key {key!r} is reserved for the store")
    if value is None:
        return _Write("DELETE FROM meta WHERE key = ?", (key,))
    return _Write("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, _dumps(value)))


# allow_nan=False: NaN/Infinity are not JSON and would not load elsewhere. One encoder
# for every row (json.dumps with options builds one per call).
_dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False).encode


def _rollback(conn: sqlite3.Connection) -> None:
    # An error may have ended the transaction already (SQLite rolled it back).
    with suppress(sqlite3.Error):
        conn.execute("ROLLBACK")


# ---- files --------------------------------------------------------------------------


def _ensure_private_file(path: Path) -> None:
    """Create state.db 0600 before SQLite writes anything (SQLite gives its -wal
    and -shm files the database's mode); tighten an existing looser file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
                os.fchmod(fd, FILE_MODE)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StoreError(f"{path}: cannot create the state database: {exc}") from exc


# ---- snapshots through the store --------------------------------------------------------


@dataclass(frozen=True)
class Restored:
    """What a restore committed: the new revision (the old one when nothing
    differed), the changes for the reconciler, and the meta blobs written."""

    revision: int
    changes: tuple[Change, ...]
    meta: Mapping[str, Any]


def save_snapshot(store: Store, meta_keys: Collection[str] = SNAPSHOT_META_KEYS,
                  ) -> dict[str, Any]:
    """The snapshot of what the store holds, read in one transaction."""
    state, revision, meta = store.load_with_meta(_unreserved(meta_keys))
    return snapshot_of(state, revision, meta)


def restore_snapshot(store: Store, data: Any, meta_keys: Collection[str] = SNAPSHOT_META_KEYS,
                     *, strict_cidr: bool = False) -> Restored:
    """Check a snapshot, then commit the difference in one transaction.

    Meta blobs the snapshot lacks are left as they are. The diff and the commit
    happen under the store's lock, so no other thread's commit slips between.
    An agent that mirrors the state in memory should rather call
    :func:`parse_snapshot` and :func:`changes_to_restore` under its own lock and
    commit through its usual path. The store's own meta keys (schema,
    revision) never travel in a snapshot.
    """
    target, meta = parse_snapshot(data, _unreserved(meta_keys), strict_cidr=strict_cidr)
    with store.lock:
        current, revision, current_meta = store.load_with_meta(meta.keys())
        changes = changes_to_restore(current, target)
        written = {k: v for k, v in meta.items() if current_meta.get(k) != v}
        if changes or written:
            revision = store.commit(changes, meta=written)
    return Restored(revision, tuple(changes), written)


def _unreserved(meta_keys: Collection[str]) -> list[str]:
    return [k for k in meta_keys if k not in RESERVED_META]


def _name_in(doc: Mapping[str, Any]) -> str:
    """The name a stored manifest gives itself ("" if none): a refused policy is still
    keyed by it, so a row holding another object's manifest is found out."""
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    return name if isinstance(name, str) else ""
