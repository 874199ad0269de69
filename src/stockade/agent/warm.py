"""A warm start: what the agent computes from its store at start, kept ahead of time.

A cold start decodes every row of the store, checks every object again
(admission.quarantine) and compiles the whole state: at 10,000 endpoints and
1,000 policies about 1.1 s of the 1.8 s a restart takes on a quiet machine.
All three are a pure function of the rows, the code and the configuration, so
their result is kept in ``warm.pickle`` in the state directory: the state with
its quarantine, the compiler as `IncrementalCompiler.of` makes it from the
state, and the rows (their documents) that hold the state, under a key of the
code and the configuration.

It is kept at a clean stop (from the running agent's state, the rows encoded as
a commit encodes them), and while the agent runs by :class:`Keeper`: once the
state has changed and the agent has been idle for a while, a child process
(:func:`child_command`: the agent's interpreter in isolated mode, importing this
package by its path, then :func:`main`) reads the rows in one transaction and
computes it there, off the agent's interpreter. So a restart after a crash
finds a recent one too.

At start the rows are read as always. Rows equal to the kept ones take the kept
objects; when none differ, the kept result is taken whole. Rows that differ or
are gone become changes folded into the kept result the way the running agent
folds changes: admitted by the same `check_changes`, applied to the state, fed
to the compiler. That is only done from a kept state in which every object
would be admitted as it is (`Kept.spotless`): then nothing is held before the
changes or after them, as the cold start would find. Anything else (changes
admission refuses, a kept state with held endpoints or refused objects, an
upgrade, a torn or foreign file) falls back to the cold start, which stays the
reference.

The file is pickled Python objects: only a file owned by the agent's user and
writable by nobody else, in the private state directory, is ever read.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import pickle
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from stockade.agent.admission import check_changes, enforceable, quarantine
from stockade.agent.reconcile import Reconciler, feed
from stockade.agent.records import (
    AgentState,
)
from stockade.agent.snapshot import changes_to_restore
from stockade.agent.store import TABLES, Rows, Store, StoreError
from stockade.compile.incremental import IncrementalCompiler

log = logging.getLogger(__name__)
_V = TypeVar("_V")

FILE = "warm.pickle"
FORMAT = b"stockade-warm 2\n"


@dataclass(frozen=True)
class Kept:
    """The result of a cold start from `rows` (table -> key -> the row's document)."""

    state: AgentState
    compiler: IncrementalCompiler
    rows: Mapping[str, Mapping[str, str]]
    # Every object of the state would be admitted as it is (check_changes), so nothing
    # is held: changes admitted since can be folded in.
    spotless: bool


def code_key(strict_cidr: bool) -> str:
    """The code and configuration a start's result depends on: the interpreter, every
    source file of the package, and the admission's one option."""
    h = hashlib.sha256(f"{sys.version}\0{strict_cidr}\0".encode())
    root = Path(__file__).resolve().parent.parent
    for path in sorted(root.rglob("*.py")):
        data = path.read_bytes()
        h.update(b"%s\0%d\0" % (str(path.relative_to(root)).encode(), len(data)))
        h.update(data)
    return h.hexdigest()


def save(state_dir: Path | str, state: AgentState, *, strict_cidr: bool,
         rows: Rows | None = None) -> bool:
    """Keep what a start from the rows holding `state` would compute: `rows` as read
    from the store, else encoded from `state` as a commit encodes them. False when
    there is nothing to keep (the state's rows have no encoding); the file is then
    removed."""
    path = Path(state_dir) / FILE
    for stale in Path(state_dir).glob(".warm-*"):  # a save cut short
        stale.unlink(missing_ok=True)
    if rows is None:
        rows = Store.state_rows(state)
    if rows is None or state.refused_cluster_policies:
        path.unlink(missing_ok=True)
        return False
    # The state in key order, as the cold start decodes it.
    kept = AgentState(_sorted(state.namespaces), _sorted(state.endpoints),
                      _sorted(state.policies), _sorted(state.cluster_policies))
    spotless = not check_changes(AgentState(), changes_to_restore(AgentState(), kept),
                                 strict_cidr=strict_cidr)
    kept.quarantined = {} if spotless else quarantine(kept, strict_cidr=strict_cidr)
    compiler = IncrementalCompiler.of(enforceable(kept, kept.quarantined))
    docs = {table: dict(table_rows) for table, table_rows in rows.items()}
    header = f"{code_key(strict_cidr)}\n".encode()
    fd, tmp = tempfile.mkstemp(prefix=".warm-", dir=state_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(FORMAT + header)
            pickle.dump(Kept(kept, compiler, docs, spotless), f,
                        protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


class WarmStart:
    """The kept result, if any, offered to `Store.load` as `known`."""

    def __init__(self, state_dir: Path | str, *, strict_cidr: bool) -> None:
        self.path = Path(state_dir) / FILE
        self.kept: Kept | None = None  # the file's, when it was taken
        self.state: AgentState | None = None  # the state known() answered
        self.compiler: IncrementalCompiler | None = None  # compiled from that state
        self.folded = 0  # changes since the keep, folded in
        self._strict_cidr = strict_cidr

    def known(self, rows: Rows, decode: Callable[[Rows], AgentState]) -> AgentState | None:
        """The state `rows` decode to, from the kept result when it can stand for the
        cold start's (see the module doc); None: decode them all."""
        kept = self._read()
        if kept is None:
            return None
        changed = {table: [(k, d) for k, d in table_rows if kept.rows.get(table, {}).get(k) != d]
                   for table, table_rows in rows.items()}
        gone = {table: sorted(set(docs) - {k for k, _ in rows.get(table, ())})
                for table, docs in kept.rows.items()}
        if not any(changed.values()) and not any(gone.values()):
            self.kept, self.state, self.compiler = kept, kept.state, kept.compiler
            return kept.state
        if not kept.spotless:
            return None
        try:
            fresh = decode(changed)
        except StoreError:  # the cold start reports it
            return None
        if fresh.refused_cluster_policies:
            return None
        # The changes that turn the kept state into the rows' (only what differs).
        before, after = AgentState(), fresh
        for table, _ in TABLES:  # each table's records are the state's field of its name
            kept_records = getattr(kept.state, table)
            touched = [k for k, _ in changed.get(table, ())] + list(gone.get(table, ()))
            getattr(before, table).update(
                (k, kept_records[k]) for k in touched if k in kept_records)
        changes = changes_to_restore(before, after)
        if check_changes(kept.state, changes, strict_cidr=self._strict_cidr):
            return None  # rows no agent admitted: the cold start holds what it must
        state = AgentState(dict(kept.state.namespaces), dict(kept.state.endpoints),
                           dict(kept.state.policies), dict(kept.state.cluster_policies))
        state.apply(changes)
        state = AgentState(_sorted(state.namespaces), _sorted(state.endpoints),
                           _sorted(state.policies), _sorted(state.cluster_policies))
        if len(changes) > Reconciler.BULK:
            compiler = IncrementalCompiler.of(state.cluster())
        else:
            compiler = kept.compiler
            for change in changes:
                feed(compiler, change)
        self.kept, self.state, self.compiler = kept, state, compiler
        self.folded = len(changes)
        return state

    def _read(self) -> Kept | None:
        try:
            # Not through a link: the file itself must be the agent's.
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid()
                        or st.st_mode & 0o077):
                    log.warning("warm start file ignored: not private to the agent",
                                extra={"fields": {"path": str(self.path)}})
                    return None
                if f.readline() != FORMAT:
                    return None
                if f.readline().decode("ascii", "replace").split() != [
                        code_key(self._strict_cidr)]:
                    return None
                kept = pickle.load(f)  # noqa: S301 (a private file this agent wrote)
        except FileNotFoundError:
            return None
        except OSError as exc:  # a link (ELOOP), or unreadable: start cold, say why
            log.warning("warm start file ignored", extra={"fields": {
                "path": str(self.path), "error": str(exc)}})
            return None
        except Exception as exc:  # a torn or foreign file: start cold
            log.warning("warm start file unreadable; starting cold",
                        extra={"fields": {"path": str(self.path), "error": str(exc)}})
            return None
        if not (isinstance(kept, Kept) and isinstance(kept.state, AgentState)
                and isinstance(kept.compiler, IncrementalCompiler)
                and isinstance(kept.rows, dict) and isinstance(kept.spotless, bool)):
            return None
        return kept


def _sorted(d: Mapping[str, _V]) -> dict[str, _V]:
    return {k: d[k] for k in sorted(d)}


# ---- keeping it current while the agent runs ---------------------------------------------


def keep(state_dir: Path | str, *, strict_cidr: bool) -> int:
    """Keep the warm start of the rows the store holds now; their revision."""
    with Store(state_dir) as store:
        rows, revision, _ = store.read_rows()
        state = store.decode(rows)
    save(state_dir, state, strict_cidr=strict_cidr, rows=rows)
    return revision


class Keeper:
    """Keeps the warm start current while the agent runs.

    After the state changed (its revision moved), once no change came for `idle`
    seconds and at most every `interval` seconds, a child process keeps it from
    the store (:func:`keep`): the work (a cold start's, a second or two of CPU at
    10,000 endpoints) is done off the agent's interpreter, at a lower priority.
    """

    TIMEOUT = 300.0  # a child taking longer is killed; the next idle moment tries again

    def __init__(self, state_dir: Path | str, revision: Callable[[], int], *,
                 strict_cidr: bool, kept_revision: int | None,
                 idle: float = 10.0, interval: float = 60.0) -> None:
        self._dir = Path(state_dir)
        self._revision = revision
        self._strict_cidr = strict_cidr
        self.idle, self.interval = idle, interval
        self.kept_revision = kept_revision  # of the file kept last, as far as known
        self.keeps = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None

    def operations(self) -> Mapping[str, Any]:
        return {}  # none: it adds to `status` only

    def status(self) -> Mapping[str, Any]:
        return {"warmStart": {"keptRevision": self.kept_revision, "keeps": self.keeps}}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="warm-keeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop, killing a child at work (a save cut short leaves only a temporary file,
        which the next save removes)."""
        self._stop.set()
        with self._lock:
            if self._child is not None and self._child.poll() is None:
                self._child.kill()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        seen, since, last = self._revision(), time.monotonic(), 0.0
        tick = min(1.0, self.idle / 4)
        while not self._stop.wait(tick):
            now, revision = time.monotonic(), self._revision()
            if revision != seen:
                seen, since = revision, now
                continue
            if (revision == self.kept_revision or now - since < self.idle
                    or now - last < self.interval):
                continue
            last = now
            self._keep(revision)

    def _keep(self, revision: int) -> None:
        cmd = [*child_command(), "--state-dir", str(self._dir)]
        if self._strict_cidr:
            cmd.append("--strict-cidr")
        started = time.monotonic()
        with self._lock:
            if self._stop.is_set():
                return
            self._child = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
        child = self._child
        try:
            out, err = child.communicate(timeout=self.TIMEOUT)
        except subprocess.TimeoutExpired:
            child.kill()
            out, err = child.communicate()
        if self._stop.is_set():
            return
        kept = out.decode("ascii", "replace").strip()
        if child.returncode != 0 or not kept.isdigit():
            log.warning("warm start not kept", extra={"fields": {
                "rc": child.returncode,
                "error": err.decode("utf-8", "replace").strip()[-500:]}})
            return
        self.kept_revision = int(kept)
        self.keeps += 1
        log.info("warm start kept", extra={"fields": {
            "revision": int(kept), "seconds": round(time.monotonic() - started, 3),
            "since": revision}})


def child_command() -> list[str]:
    """The keeper's child: this interpreter, isolated (-I: neither the working directory
    nor PYTHON* variables choose what it imports, for it runs as root), importing this
    very package, wherever it lies."""
    root = str(Path(__file__).resolve().parent.parent.parent)
    code = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
            "from stockade.agent.warm import main; main()")
    return [sys.executable, "-I", "-c", code, root]


def main(argv: Sequence[str] | None = None) -> int:
    """The keeper's child: keep the warm start of the store's rows; print their revision."""
    parser = argparse.ArgumentParser(prog="stockade-warm-keeper")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--strict-cidr", action="store_true")
    args = parser.parse_args(argv)
    os.nice(10)  # the agent's own work comes first
    import gc

    gc.disable()  # a one-shot computation whose objects all live to the end
    revision = keep(args.state_dir, strict_cidr=args.strict_cidr)
    sys.stdout.write(f"{revision}\n")
    sys.stdout.flush()
    os._exit(0)  # freeing the state object by object would take longer than computing it

