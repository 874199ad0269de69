"""The process's heap: the cyclic collector around bulk work, and memory given back.

At 10,000 endpoints and 1,000 policies the agent holds a few million objects
(the state, the compiled ruleset, the kernel's table as last applied), nearly
all of them for its whole life and none in a garbage cycle. The collector's
oldest generation is scanned whenever it has grown by a quarter, so while
they are built (start-up, a bulk apply) it walks them again and again
(0.1-0.35 s each, ~1.3 s of a full load), and later, now and then, in the
middle of a change (a p99 outlier). So bulk work runs with the collector
paused, and what it built is then frozen: moved out of the generations the
collector scans; later garbage is collected as before.
"""

from __future__ import annotations

import ctypes
import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_paused = 0  # bulk works under way (each thread's own; the collector is process-wide)
_freeze = False  # one of them built what lives on: freeze it at the end


@contextmanager
def collector_paused(freeze: bool = True) -> Iterator[None]:
    """No cyclic collection while the body runs (in any thread). Once the last such
    body ends the collector runs again, and what survived is frozen if any of them
    built to keep (``freeze``). A transient read (the kernel's table parsed, compared
    and dropped) passes ``freeze=False``.

    The one place that turns the collector off and on: a section of its own
    (``isenabled``, ``disable``, ``enable``) in another thread would turn it back on
    in the middle of this one."""
    global _paused, _freeze
    with _lock:
        _paused += 1
        _freeze = _freeze or freeze
        gc.disable()
    try:
        yield
    finally:
        with _lock:
            _paused -= 1
            if not _paused:
                if _freeze:
                    gc.freeze()
                _freeze = False
                gc.enable()


@contextmanager
def listing() -> Iterator[None]:
    """A whole list of the cluster's objects decoded and delivered: the collector
    paused (a list of 100,000 pods decodes four to five times faster), then the memory of
    the raw objects handed back."""
    with collector_paused():
        yield
    release_memory()


def release_memory() -> None:
    """Hand the heap that large transient work freed (a table read back, a full
    compile) back to the system: glibc keeps it otherwise, and the agent's
    resident size would stay at its peak."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)
