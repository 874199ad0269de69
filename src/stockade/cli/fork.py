"""Shares of a one-shot command's work computed in forked processes (`compile -j`).

A command like `stockade compile` holds a big input in memory and then does work
that splits into independent shares (lowering a share of the entries and rendering
what it names). A forked child starts with all of it already in memory, computes its
share and sends the result back pickled through a pipe; the parent computes the
first share meanwhile. Only a process that runs no other threads may fork.

A child that fails (killed, out of memory, an exception) sends nothing: its share
is then computed in the parent, so the result is the same as in one process, and
an exception is raised where one process would have raised it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
from collections.abc import Callable, Sequence
from typing import TypeVar, cast

S = TypeVar("S")
R = TypeVar("R")


def fork_map(fn: Callable[[S], R], shares: Sequence[S]) -> list[R]:
    """`[fn(s) for s in shares]`, the first share here and each other in a child."""
    children: list[tuple[int, int]] = []  # (pid, read end of its pipe)
    try:
        for share in shares[1:]:
            children.append(_spawn(fn, share))
        results = [fn(shares[0])] if shares else []
        for (pid, fd), share in zip(children, shares[1:], strict=True):
            data = _read_all(fd)
            os.close(fd)
            _, status = os.waitpid(pid, 0)
            result = _loaded(data) if os.waitstatus_to_exitcode(status) == 0 else None
            results.append(fn(share) if result is None else cast("R", result[0]))
        children.clear()
        return results
    finally:
        for pid, fd in children:  # the parent failed: no child outlives it
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _spawn(fn: Callable[[S], R], share: S) -> tuple[int, int]:
    read, write = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write)
        return pid, read
    # The child: nothing of the parent's exit path runs here (buffered output, atexit).
    code = 1
    try:
        os.close(read)
        data = pickle.dumps((fn(share),), protocol=pickle.HIGHEST_PROTOCOL)
        with os.fdopen(write, "wb") as out:
            out.write(data)
        code = 0
    except BaseException:  # noqa: S110 - the parent computes the share and raises
        pass
    finally:
        os._exit(code)


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _loaded(data: bytes) -> tuple[object] | None:
    """The child's result, None when it sent none whole."""
    try:
        result = pickle.loads(data)  # noqa: S301 - bytes our own forked child wrote
    except Exception:
        return None
    return result if isinstance(result, tuple) and len(result) == 1 else None
