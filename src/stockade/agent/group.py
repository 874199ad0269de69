"""Group commit: changes that arrive together are committed together.

Under many parallel callers the service's lock is the agent's narrowest point.
Each commit holds it for the admission check, a store transaction and the fold
into the state and the compiler: about a millisecond, more when other threads
take the interpreter between the store's calls, which release it. With sixteen
callers relabelling endpoints, each waited about 25 ms for the lock to do 1 ms
of work under it.

A caller here hands over a function that builds its changes from the state.
Whoever holds the lock next builds the changes of every caller waiting and
commits them as one: one admission check, one store transaction, one fold,
one revision for all. Each caller's outcome stays its own:

* a build that raises fails its own caller only;
* a build touching an object an earlier one in the batch touches is left for
  the next batch: it read a state that the batch changes;
* changes refused together (two endpoints claiming one address) are committed
  again one caller at a time, so that each gets its own verdict;
* any other failure (the store's) fails every caller of the batch, and the
  commit being all or nothing, nothing of the batch was written.

A build may also change shared state of its own (the CNI operations allocate an
address and register the attachment) and give the store's meta blobs: it
returns a :class:`Part` with what undoes its effects. A build left for the next
batch, and every build of a batch that fails, is undone (the latest first);
changes refused together are then built again one caller at a time. Meta blobs
are merged, the later build's over the earlier's: each is built from the shared
state as the builds before it left it, so the last holds them all.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from stockade.agent.protocol import INVALID, ApiError
from stockade.agent.records import Change, change_key


@dataclass(frozen=True)
class Part:
    """A build's result beyond plain changes: meta blobs for the store, and what undoes
    the build's own changes to shared state should its commit not happen."""

    changes: Sequence[Change]
    meta: Mapping[str, Any] | None = None
    undo: Callable[[], None] | None = None


Build = Callable[[], Sequence[Change] | Part]
Commit = Callable[[Sequence[Change], Mapping[str, Any] | None], int]


@dataclass(eq=False)
class _Waiting:
    build: Build
    revision: int | None = None
    error: Exception | None = None
    done: bool = False
    part: Part | None = None  # built, not committed yet
    taken: bool = False  # out of the queue, in a batch under way
    settled: threading.Event = field(default_factory=threading.Event)  # done, or queued again


class GroupCommit:
    """Commits the changes of callers that wait together as one (see the module)."""

    def __init__(self, lock: AbstractContextManager[Any], commit: Commit) -> None:
        self._lock = lock  # the service's: it orders every commit
        self._commit = commit
        self._queue: list[_Waiting] = []
        self._queue_lock = threading.Lock()
        # False: each caller's changes built and committed alone, in turn: for a commit
        # that routes changes by what they are, which one batch of several callers'
        # changes could mix (the etcd datastore's), and which may let go of the lock
        # while it waits (a change built before it could then be stale).
        self.together = True
        self.batches = 0  # commits of more than one caller's changes
        self.grouped = 0  # callers served by them

    def submit(self, build: Build) -> int | None:
        """Commit what `build` returns, built under the lock from the state as it is then;
        its revision, or None when it built nothing to commit. Whatever `build` raises,
        or the commit refuses, is raised here. Not with the lock held: a caller whose
        change is in another thread's commit waits for it, which needs the lock."""
        mine = _Waiting(build)
        with self._queue_lock:
            self._queue.append(mine)
        while True:
            with self._lock:
                if not mine.done and not mine.taken:
                    self._run()  # (left for the next batch, it is queued again: loop)
                if mine.done:
                    break
                elsewhere = mine.taken
            if elsewhere:
                # In a batch of another thread whose commit let go of the lock while it
                # waits (the etcd datastore's, for its watch): wait for that, not the lock.
                mine.settled.wait()
        if mine.error is not None:
            raise mine.error
        return mine.revision

    def _run(self) -> None:
        with self._queue_lock:
            if self.together:
                waiting, self._queue = self._queue, []
            else:  # built and committed in one go, as a caller alone would be
                waiting, self._queue = self._queue[:1], self._queue[1:]
            for w in waiting:
                w.taken = True
                w.settled.clear()
        try:
            taken: list[_Waiting] = []
            touched: set[tuple[str, str]] = set()
            for w in waiting:
                part = self._build(w)
                if part is None:
                    continue
                keys = {change_key(c) for c in part.changes}
                if keys & touched:
                    _undo(part)  # built again in the next batch, from what this one left
                    continue
                touched |= keys
                w.part = part
                taken.append(w)
            self._commit_all(taken)
        finally:
            # What this batch left (or an interrupt cut short) waits for the next, in order.
            rest = [w for w in waiting if not w.done]
            for w in reversed(rest):
                if w.part is not None:
                    _undo(w.part)
                    w.part = None
            with self._queue_lock:
                self._queue[:0] = rest
                for w in waiting:
                    w.taken = False
                    w.settled.set()

    @staticmethod
    def _build(w: _Waiting) -> Part | None:
        """The caller's part, or None when it is done already (its build raised, or it
        built nothing to commit)."""
        try:
            built = w.build()
        except Exception as exc:  # its caller's error, raised in its thread
            w.error, w.done = exc, True
            return None
        part = built if isinstance(built, Part) else Part(built)
        if not part.changes and not part.meta:
            _undo(part)
            w.done = True
            return None
        return part

    def _commit_all(self, taken: list[_Waiting]) -> None:
        if len(taken) > 1:
            meta: dict[str, Any] = {}
            for w in taken:
                assert w.part is not None
                meta.update(w.part.meta or {})
            try:
                revision = self._commit([c for w in taken if w.part
                                         for c in w.part.changes], meta or None)
            except Exception as exc:
                for w in reversed(taken):
                    assert w.part is not None
                    _undo(w.part)
                    w.part = None
                if not (isinstance(exc, ApiError) and exc.code == INVALID):
                    for w in taken:
                        # A copy each: each caller raises it in its own thread.
                        w.error, w.done = copy.copy(exc), True
                    return
                # Refused together: each caller built and committed alone, for its
                # own verdict.
                for w in taken:
                    part = self._build(w)
                    if part is not None:
                        w.part = part
                        self._commit_one(w)
                return
            self.batches += 1
            self.grouped += len(taken)
            for w in taken:
                w.revision, w.done, w.part = revision, True, None
            return
        for w in taken:
            self._commit_one(w)

    def _commit_one(self, w: _Waiting) -> None:
        part = w.part
        assert part is not None
        try:
            w.revision = self._commit(part.changes, part.meta)
        except Exception as exc:
            _undo(part)
            w.error = exc
        w.done, w.part = True, None


def _undo(part: Part) -> None:
    if part.undo is not None:
        part.undo()
