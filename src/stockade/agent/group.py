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
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from stockade.agent.protocol import INVALID, ApiError
from stockade.agent.records import (
    Change,
    DeleteClusterPolicy,
    DeleteEndpoint,
    DeleteNamespace,
    DeletePolicy,
    PutClusterPolicy,
    PutEndpoint,
    PutNamespace,
    PutPolicy,
)

Build = Callable[[], Sequence[Change]]
Commit = Callable[[Sequence[Change]], int]


def change_key(change: Change) -> tuple[str, str]:
    """The object a change writes: (kind, key)."""
    if isinstance(change, PutNamespace):
        return "namespace", change.namespace.name
    if isinstance(change, DeleteNamespace):
        return "namespace", change.name
    if isinstance(change, PutEndpoint):
        return "endpoint", change.record.key
    if isinstance(change, DeleteEndpoint):
        return "endpoint", change.key
    if isinstance(change, PutPolicy):
        return "policy", change.record.key
    if isinstance(change, DeletePolicy):
        return "policy", change.key
    if isinstance(change, PutClusterPolicy):
        return "clusterpolicy", change.record.key
    if isinstance(change, DeleteClusterPolicy):
        return "clusterpolicy", change.name
    raise TypeError(f"not a change: {change!r}")


@dataclass(eq=False)
class _Waiting:
    build: Build
    revision: int | None = None
    error: Exception | None = None
    done: bool = False


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
        its revision, or None when it built no change. Whatever `build` raises, or the
        commit refuses, is raised here."""
        mine = _Waiting(build)
        with self._queue_lock:
            self._queue.append(mine)
        with self._lock:
            while not mine.done:  # left for the next batch: that is now
                self._run()
        if mine.error is not None:
            raise mine.error
        return mine.revision

    def _run(self) -> None:
        with self._queue_lock:
            if self.together:
                waiting, self._queue = self._queue, []
            else:  # built and committed in one go, as a caller alone would be
                waiting, self._queue = self._queue[:1], self._queue[1:]
        try:
            taken: list[tuple[_Waiting, Sequence[Change]]] = []
            touched: set[tuple[str, str]] = set()
            for w in waiting:
                try:
                    changes = w.build()
                except Exception as exc:  # its caller's error, raised in its thread
                    w.error, w.done = exc, True
                    continue
                keys = {change_key(c) for c in changes}
                if keys & touched:
                    continue  # for the next batch
                if not changes:
                    w.done = True
                    continue
                touched |= keys
                taken.append((w, changes))
            self._commit_all(taken)
        finally:
            # What this batch left (or an interrupt cut short) waits for the next, in order.
            rest = [w for w in waiting if not w.done]
            if rest:
                with self._queue_lock:
                    self._queue[:0] = rest

    def _commit_all(self, taken: list[tuple[_Waiting, Sequence[Change]]]) -> None:
        if len(taken) > 1:
            try:
                revision = self._commit([c for _, changes in taken for c in changes])
            except ApiError as exc:
                if exc.code != INVALID:
                    self._fail(taken, exc)
                    return
                # Refused together: one by one below, each with its own verdict.
            except Exception as exc:
                self._fail(taken, exc)
                return
            else:
                self.batches += 1
                self.grouped += len(taken)
                for w, _ in taken:
                    w.revision, w.done = revision, True
                return
        for w, changes in taken:
            try:
                w.revision = self._commit(changes)
            except Exception as exc:
                w.error = exc
            w.done = True

    @staticmethod
    def _fail(taken: list[tuple[_Waiting, Sequence[Change]]], exc: Exception) -> None:
        # A copy each: callers raise it in their own threads, each with its traceback.
        for w, _ in taken:
            w.error, w.done = copy.copy(exc), True
