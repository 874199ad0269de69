"""The local API's unix socket: root only, one JSON line per request and answer."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import socketserver
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stockade.agent.protocol import (
    INTERNAL,
    INVALID,
    MAX_LINE,
    ApiError,
    decode_request,
    encode_error,
    encode_result,
)
from stockade.errors import AgentError, StockadeError

log = logging.getLogger("stockade.api")

Handler = Callable[[str, dict[str, Any]], Any]


class _Connection(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        while True:
            line = self.rfile.readline(MAX_LINE + 1)
            if not line:
                return
            if len(line) > MAX_LINE:
                self.wfile.write(encode_error(ApiError(INVALID, "request too large")))
                return
            self.wfile.write(self.server.answer(line))
            self.wfile.flush()


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False
    # A node starting its pods runs dozens of CNI plugins at once; the default
    # listen backlog of 5 would refuse most of their connects.
    request_queue_size = 128

    def __init__(self, path: str, handler: Handler) -> None:
        self.handler = handler
        super().__init__(path, _Connection)

    def answer(self, line: bytes) -> bytes:
        try:
            req = decode_request(line)
            return encode_result(self.handler(req.op, req.args))
        except ApiError as exc:
            return encode_error(exc)
        except StockadeError as exc:
            return encode_error(ApiError(INVALID, str(exc)))
        except Exception as exc:  # the agent must outlive one bad request
            log.exception("request failed")
            return encode_error(ApiError(INTERNAL, f"{type(exc).__name__}: {exc}"))


def prepare_socket_path(path: str) -> None:
    """A root-only directory for the socket; a stale socket is removed, a live one refused."""
    p = Path(path)
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if p.exists() or p.is_symlink():
        if not stat.S_ISSOCK(p.lstat().st_mode):
            raise AgentError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            p.unlink()  # nobody listens: left by a crashed agent
        else:
            raise AgentError(f"another agent is listening on {path}")
        finally:
            probe.close()


class ApiServer:
    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        prepare_socket_path(path)
        old = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            self._server = _Server(path, handler)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, name="api",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
