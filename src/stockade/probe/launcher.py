"""Starting and stopping probe server processes (see :mod:`stockade.probe.server`).

A separate module from the server itself so that importing the launcher never
imports the server: ``python -m stockade.probe.server`` must find its module
unimported (runpy warns otherwise).

Public API::

    ProbeServer(bindings).start() -> ProbeServer; .stop(); context manager
    ProbeServer.sctp_mode  # "native" | "raw", as the server reported
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from types import TracebackType

from stockade.errors import NetError
from stockade.probe.protocol import Port

READY_TIMEOUT = 10.0


class ProbeServer:
    """A running server process; a context manager that stops it on exit.

    ``bindings`` maps a namespace name (None: the caller's current one) to the
    ports to serve there. :meth:`start` returns once every socket is bound, so
    probes may start right away.
    """

    def __init__(self, bindings: Mapping[str | None, Sequence[Port]]) -> None:
        self.bindings = {ns: tuple(ports) for ns, ports in bindings.items()}
        self.sctp_mode = ""
        self._proc: subprocess.Popen[str] | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "stockade.probe.server"]
        for ns, ports in self.bindings.items():
            cmd.append(f"--bind={ns or '-'}=" + ",".join(p.spec for p in ports))
        return cmd

    def start(self, timeout: float = READY_TIMEOUT) -> ProbeServer:
        env = dict(os.environ)
        src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self._proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + timeout
            if not sel.select(max(0.0, deadline - time.monotonic())):
                self.stop()
                raise NetError(f"probe server did not get ready within {timeout:.0f} s")
        line = self._proc.stdout.readline()
        try:
            status = json.loads(line)
        except ValueError:
            status = {"ready": False, "error": f"unexpected output {line!r}"}
        if not status.get("ready"):
            self.stop()
            raise NetError(f"probe server failed: {status.get('error', 'exited')}")
        self.sctp_mode = str(status.get("sctp", ""))
        return self

    def stop(self) -> None:
        """Close its stdin (it exits on EOF), then make sure it is gone."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> ProbeServer:
        return self.start() if self._proc is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
