"""A bounded-frequency runner: coalesce bursts of requests into few runs.

Requests mark work as pending; the function runs at most once per
`min_interval` (so a burst of a thousand changes is one kernel transaction),
like the runner kube-proxy and kube-network-policies use; and the periodic run
(the full resync, which reads the kernel back) comes every `max_interval`
whatever ran between. kube-proxy's runner counts any run as the periodic one,
for each of its runs syncs everything; here a change's run writes only what
changed, so counting it would let a steady stream of changes (a pod every few
seconds) put off the check for tampering for ever. The clock is injectable so
tests need not sleep.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("stockade.runner")


class BoundedFrequencyRunner:
    def __init__(self, name: str, fn: Callable[[bool], None], min_interval: float,
                 max_interval: float, clock: Callable[[], float] = time.monotonic, *,
                 periodic_first: bool = True) -> None:
        """`fn(periodic)` is called with True when the run is the periodic one: at once,
        or with `periodic_first` False (the caller has just done what it does) only
        after `max_interval`."""
        if min_interval < 0 or max_interval <= 0 or min_interval > max_interval:
            raise ValueError("need 0 <= min_interval <= max_interval and max_interval > 0")
        self.name = name
        self.fn = fn
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.clock = clock
        self._cond = threading.Condition()
        self._pending = False
        self._retry_at: float | None = None
        self._stopped = False
        self.crashes = 0  # runs that raised: counted and survived
        self._last = float("-inf") if periodic_first else clock()
        self._last_periodic = self._last  # a change's run does not count as the periodic one
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """Ask for a run soon (no later than min_interval after the previous one)."""
        with self._cond:
            self._pending = True
            self._cond.notify()

    def retry_in(self, seconds: float) -> None:
        """Run again after `seconds` (a failed run's backoff), sooner if asked."""
        with self._cond:
            self._retry_at = self.clock() + seconds
            self._cond.notify()

    def _next(self) -> tuple[float, bool]:
        """Seconds to wait before the next run, and whether it is the periodic one."""
        now = self.clock()
        due = self._last_periodic + self.max_interval
        if self._retry_at is not None:
            # A failed run is retried on its backoff, not at min_interval: a change
            # arriving meanwhile waits for it rather than hammering the kernel.
            wait = self._retry_at - now
            return max(0.0, wait), due <= self._retry_at
        if self._pending:
            # Due: a change's run still goes first, but the next run is the periodic
            # one whether changes keep coming or not.
            return max(0.0, self._last + self.min_interval - now), self._last >= due
        return max(0.0, due - now), True

    def loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopped:
                        return
                    wait, periodic = self._next()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                self._pending = False
                self._retry_at = None
                self._last = self.clock()
                if periodic:
                    self._last_periodic = self._last
            try:
                self.fn(periodic)
            except Exception:  # the loop is the agent's heartbeat: it must not die
                self.crashes += 1
                log.exception("%s: run failed; retrying", self.name)
                with self._cond:
                    if self._retry_at is None:
                        self._retry_at = self.clock() + min(30.0, 0.1 * 2 ** min(
                            self.crashes, 8))

    def start(self) -> None:
        self._thread = threading.Thread(target=self.loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
