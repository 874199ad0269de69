"""The client side of the local API (used by the CLI and the CNI plugin)."""

from __future__ import annotations

import os
import select
import socket
from typing import Any

from stockade.agent.protocol import MAX_LINE, Request, decode_response
from stockade.errors import AgentError

DEFAULT_SOCKET = "/run/stockade/agent.sock"


def socket_path(explicit: str | None = None) -> str:
    return explicit or os.environ.get("STOCKADE_SOCKET") or DEFAULT_SOCKET


class AgentClient:
    def __init__(self, path: str | None = None, timeout: float = 60.0) -> None:
        self.path = socket_path(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._file: Any = None

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            sock.close()
            raise AgentError(f"no agent at {self.path} (start one with `stockade agent`, "
                             "or give --socket / STOCKADE_SOCKET)") from None
        except OSError as exc:
            sock.close()
            raise AgentError(f"cannot reach the agent at {self.path}: {exc.strerror}") from None
        self._sock = sock
        self._file = sock.makefile("rb")

    def call(self, op: str, **args: Any) -> Any:
        if self._sock is not None and self._dropped():
            self.close()  # the agent closed it while idle: the request was never sent
        if self._sock is None:
            self._connect()
        assert self._sock is not None
        try:
            try:
                self._sock.sendall(Request(op, args).encode())
            except (BrokenPipeError, ConnectionResetError):
                # The agent may have answered before reading (too many connections,
                # request too large): that answer is the one to report.
                line = self._file.readline(MAX_LINE + 1)
                if not line:
                    raise
            else:
                line = self._file.readline(MAX_LINE + 1)
        except TimeoutError:
            self.close()
            raise AgentError(f"the agent did not answer {op!r} within {self.timeout:.0f}s") \
                from None
        except OSError as exc:
            self.close()
            raise AgentError(f"lost the agent at {self.path}: {exc}") from None
        if not line:
            self.close()
            raise AgentError(f"the agent at {self.path} closed the connection")
        if not line.endswith(b"\n"):
            self.close()
            raise AgentError(f"the agent at {self.path} sent an incomplete answer")
        return decode_response(line)

    def _dropped(self) -> bool:
        """True when the agent has closed this (idle) connection: end of file is waiting."""
        assert self._sock is not None
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
            return bool(readable) and not self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        if self._sock is not None:
            self._file.close()
            self._sock.close()
            self._sock = None

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
