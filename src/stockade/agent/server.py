"""The local API's unix socket: root only, one JSON line per request and answer.

Bounded, whatever the clients do:

* **Connections.** At most ``max_connections`` (256) at once. The one beyond
  is accepted, answered ``unavailable`` ("too many connections; try again")
  and closed at once, without a thread. The listen backlog is 1024 (or
  ``net.core.somaxconn`` if smaller), so a burst of plugin processes does not
  find the door shut.
* **Threads.** One thread (``api``) waits on every socket (epoll) and reads
  the requests; a worker thread answers a request and then waits up to
  ``WORKER_IDLE`` (2 s) for the next one before it ends, so a stream of
  requests does not start a thread per request (the reading thread waited for
  each new thread to get the interpreter's lock). There are never more workers
  than requests being answered plus those idle. An idle connection costs a
  file descriptor and a few hundred bytes, never a thread.
* **Time.** A connection that sends nothing for ``idle_timeout`` (60 s) is
  closed; a request line must arrive whole within ``line_timeout`` (30 s) of
  its first byte (no slowloris); an answer the client does not read within
  ``write_timeout`` (60 s) closes the connection.
* **Memory.** A line is at most ``max_line`` bytes (MAX_LINE, 64 MB: snapshots
  of big hosts travel in one line); larger, it is answered ``invalid``
  ("request too large") and the connection closed. The bytes of every request
  being read or answered count against ``max_memory`` (256 MB). A request
  whose next bytes would go beyond it is *not read* for now (the kernel's
  socket buffer pushes back on the client) and waits up to ``memory_wait``
  (5 s) for others to finish; if they have not, the rest of its line is read
  and thrown away (no memory) and it is answered ``unavailable`` ("the agent
  is busy with other large requests; try again"), the connection kept. Waiting
  first lets a burst of legitimate large requests (snapshot restores) pass one
  after another; the bound on the wait resolves the case where every partly
  read request waits for another's memory.
* **Bad frames.** Whatever a line holds, the answer is a JSON line: bad frames
  are ``bad_request`` (see :func:`~stockade.agent.protocol.decode_request`),
  an exception in an operation ``internal`` (a bug, logged with its
  traceback). A client gone mid-answer is dropped quietly. No thread dies.

Requests of one connection are answered in order, one at a time; lines sent
ahead (pipelined) wait in the buffer, and count against the memory bound. A
client that shuts down its side after a last line without a newline gets that
line answered too, then the connection closes.

**Who asks.** An operation may ask who sent the request it answers
(:func:`caller`): the peer's credentials as the kernel gives them (``SO_PEERCRED``,
its pid as this agent's PID namespace sees it) and the file descriptors the
request carried (``SCM_RIGHTS``, at most ``MAX_FDS``; more are closed by the
kernel, and a request's descriptors are closed once it is answered, or when its
connection closes before). The thin CNI plugin hands over its namespaces so.
"""

from __future__ import annotations

import array
import contextlib
import errno
import functools
import logging
import os
import queue
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stockade.agent.protocol import (
    BAD_REQUEST,
    INTERNAL,
    INVALID,
    MAX_LINE,
    UNAVAILABLE,
    ApiError,
    Request,
    decode_request,
    decode_response,
    encode_error,
    encode_result,
)
from stockade.errors import AgentError, StockadeError
from stockade.heap import collector_paused

log = logging.getLogger("stockade.api")

Handler = Callable[[str, dict[str, Any]], Any]

MAX_CONNECTIONS = 256
IDLE_TIMEOUT = 60.0
LINE_TIMEOUT = 30.0
WRITE_TIMEOUT = 60.0
MAX_MEMORY = 256 * 1024 * 1024
MEMORY_WAIT = 5.0
BACKLOG = 1024
CHUNK = 256 * 1024  # bytes read from a socket at once
ACCEPT_BATCH = 128  # connections accepted per turn of the loop, so timers still run
ACCEPT_PAUSE = 0.2  # seconds without accepting after EMFILE and the like
# A request this long is bulk work (a load: 11,000 objects are ~4 MB): the cyclic
# collector waits while it is decoded and answered (see heap.py).
BULK_LINE = 1 << 20
WORKER_IDLE = 2.0  # seconds a worker waits for the next request before it ends
MAX_FDS = 4  # descriptors one request may carry (the thin CNI plugin sends three)
_FD_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

# connection states
IDLE, READING, PAUSED, DRAINING, BUSY, CLOSED = (
    "idle", "reading", "paused", "draining", "busy", "closed")


def somaxconn(default: int = 4096) -> int:
    """The kernel's cap on a listen backlog (in this network namespace)."""
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text().strip())
    except (OSError, ValueError):
        return default


@dataclass(frozen=True)
class Caller:
    """The client of the request a thread answers: its credentials as the kernel gives
    them (``pid`` 0: a process this agent's PID namespace does not see) and the file
    descriptors its request carried, open while the request is answered."""

    pid: int
    uid: int
    gid: int
    fds: tuple[int, ...] = ()


_answering = threading.local()  # sock, fds: the request this worker thread answers


def caller() -> Caller | None:
    """Who sent the request this thread answers; None outside a socket's request."""
    sock: socket.socket | None = getattr(_answering, "sock", None)
    if sock is None:
        return None
    pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                 _CRED.size))
    return Caller(pid, uid, gid, _answering.fds)


def _close_fds(fds: list[int] | tuple[int, ...]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return list(fds)


def decode(line: bytearray | bytes) -> Request | bytes:
    """The request, or the answer refusing it."""
    try:
        return decode_request(line)
    except ApiError as exc:
        return encode_error(exc)
    except Exception as exc:  # a frame decode_request did not foresee
        log.exception("a request could not be decoded")
        return encode_error(ApiError(BAD_REQUEST, f"the request cannot be read: "
                                                  f"{type(exc).__name__}"))


def handle(handler: Handler, req: Request) -> bytes:
    """The answer to a decoded request; never raises."""
    try:
        return encode_result(handler(req.op, req.args))
    except ApiError as exc:
        return encode_error(exc)
    except StockadeError as exc:
        return encode_error(ApiError(INVALID, str(exc)))
    except Exception as exc:  # the agent must outlive one bad request
        log.exception("request %s failed", req.op)
        try:
            return encode_error(ApiError(INTERNAL, f"{type(exc).__name__}: {exc}"))
        except Exception:  # an exception whose text cannot be shown
            return encode_error(ApiError(INTERNAL, type(exc).__name__))


class _Workers:
    """Threads that answer requests, each kept ``idle`` seconds for the next one.

    A request is handed to an idle worker when there is one, else to a new
    thread, so no request ever waits for another to finish. `_idle` counts the
    waiting workers no queued request has claimed: a worker whose wait ends
    leaves only while that count is above zero, so every queued request keeps
    a worker waiting for it.
    """

    def __init__(self, name: str, idle: float | None = None) -> None:
        self.name = name
        self.idle = WORKER_IDLE if idle is None else idle
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._stopped = False
        self._local = threading.local()  # `counted`: this worker counted itself idle

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            claimed = self._idle > 0
            if claimed:
                self._idle -= 1
        self._jobs.put(job)
        if not claimed:
            threading.Thread(target=self._run, name=self.name, daemon=True).start()

    def stop(self) -> None:
        """Idle workers end now; busy ones when their request is answered."""
        with self._lock:
            self._stopped = True
            idle, self._idle = self._idle, 0
        for _ in range(idle):
            self._jobs.put(None)

    def finishing(self) -> None:
        """Called by a job on its worker once nothing it still does can block: the worker
        counts as idle from now. The job's last step lets the client's next request in,
        which would otherwise find no idle worker and start a thread."""
        with self._lock:
            if self._stopped:
                return
            self._idle += 1
        self._local.counted = True

    def _run(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self.idle)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:
                        self._idle -= 1
                        return
                continue  # every waiting worker is claimed: one request is ours
            if job is None:
                return
            job()
            del job  # nothing of the request is kept while idle
            if getattr(self._local, "counted", False):
                self._local.counted = False
                continue
            with self._lock:
                if self._stopped:
                    return
                self._idle += 1


class InProcess:
    """A client of the agent's API inside the agent itself: the request is the line a
    socket would carry, decoded and answered by the same functions as the socket's
    (``decode``, ``handle``), without a connection, a read or a thread. The caller
    was admitted by the socket already (cni.exec runs the CNI plugin this way)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    def call(self, op: str, **args: Any) -> Any:
        req = decode(Request(op, args).encode())
        return decode_response(req if isinstance(req, bytes) else handle(self.handler, req))

    def close(self) -> None:
        """Nothing is held."""


class _Conn:
    """One client connection; owned by the loop thread, or by its worker while BUSY."""

    __slots__ = ("buf", "charged", "deadline", "eof", "fd", "fds", "line", "line_fds",
                 "line_size", "line_start", "pause_start", "registered", "scanned", "sock",
                 "state")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = bytearray()
        self.scanned = 0  # bytes of buf known to hold no newline
        self.charged = 0  # bytes counted against the memory bound
        self.line: bytearray | None = None  # the request a worker answers
        self.fds: list[int] = []  # received with the line being read
        self.line_fds: list[int] = []  # received with `line`: closed once it is answered
        self.line_size = 0  # its bytes charged, newline included
        self.eof = False  # the client has shut down its side: answer, then close
        self.state = IDLE
        self.registered = False
        self.deadline = 0.0
        self.line_start = 0.0
        self.pause_start = 0.0


class _Loop:
    """The socket, its connections and the thread that reads them (see the module doc)."""

    def __init__(self, listener: socket.socket, handler: Handler, *, max_connections: int,
                 idle_timeout: float, line_timeout: float, write_timeout: float,
                 max_line: int, max_memory: int, memory_wait: float) -> None:
        self.listener = listener
        self.handler = handler
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.line_timeout = line_timeout
        self.write_timeout = write_timeout
        self.max_line = max_line
        self.max_memory = max_memory
        self.memory_wait = memory_wait
        self.conns: dict[int, _Conn] = {}
        self.in_flight = 0  # bytes charged, over all connections
        self.refused = 0  # connections turned away at the cap (for tests and logs)
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._done: queue.SimpleQueue[tuple[_Conn, bool]] = queue.SimpleQueue()
        self._lock = threading.Lock()  # _closed, against workers finishing late
        self._closed = False
        self._stop = threading.Event()
        self._accept_resume = 0.0
        self._next_check = float("inf")
        self._paused: set[_Conn] = set()
        self._workers = _Workers("api-request")
        listener.setblocking(False)
        self.sel.register(listener, selectors.EVENT_READ, "listen")
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")

    # ---- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                timeout = max(0.0, min(self._next_check, self._accept_resume or now + 1.0,
                                       now + 1.0) - now)
                for key, _ in self.sel.select(timeout):
                    self._event(key.data)
                self._finished()
                now = time.monotonic()
                if self._accept_resume and now >= self._accept_resume:
                    self._accept_resume = 0.0
                    self.sel.register(self.listener, selectors.EVENT_READ, "listen")
                if now >= self._next_check:
                    self._timers(now)
        finally:
            self.close_all()

    def _event(self, data: Any) -> None:
        if data == "listen":
            self._accept()
        elif data == "wake":
            with contextlib.suppress(BlockingIOError):
                while self._wake_r.recv(4096):
                    pass
        else:
            conn: _Conn = data
            try:
                self._readable(conn)
            except Exception:  # one connection's trouble never stops the loop
                log.exception("api connection failed")
                self._close(conn)

    def stop(self) -> None:
        self._stop.set()
        self.wake()

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe already wakes the loop
            self._wake_w.send(b"\0")

    # ---- accepting --------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("api: cannot accept connections now: %s", exc.strerror)
                    self.sel.unregister(self.listener)
                    self._accept_resume = time.monotonic() + ACCEPT_PAUSE
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EINTR):
                    continue
                raise
            sock.setblocking(False)
            if len(self.conns) >= self.max_connections:
                self.refused += 1
                if self.refused == 1 or self.refused % 1000 == 0:
                    log.warning("api: too many connections (%d); refusing (%d so far)",
                                self.max_connections, self.refused)
                _send_quietly(sock, encode_error(ApiError(
                    UNAVAILABLE, "too many connections; try again")))
                sock.close()
                continue
            conn = _Conn(sock)
            self.conns[conn.fd] = conn
            self._idle(conn, time.monotonic())

    # ---- reading ---------------------------------------------------------------------------

    def _register(self, conn: _Conn) -> None:
        if not conn.registered:
            self.sel.register(conn.sock, selectors.EVENT_READ, conn)
            conn.registered = True

    def _unregister(self, conn: _Conn) -> None:
        if conn.registered:
            self.sel.unregister(conn.sock)
            conn.registered = False

    def _set_deadline(self, conn: _Conn, deadline: float) -> None:
        conn.deadline = deadline
        self._next_check = min(self._next_check, deadline)

    def _line_starts(self, conn: _Conn, now: float) -> None:
        conn.state = READING
        conn.line_start = now
        conn.pause_start = 0.0
        self._set_deadline(conn, now + self.line_timeout)

    def _idle(self, conn: _Conn, now: float) -> None:
        conn.state = IDLE
        self._set_deadline(conn, now + self.idle_timeout)
        self._register(conn)

    def _charge(self, conn: _Conn, size: int) -> None:
        conn.charged += size
        self.in_flight += size

    def _release(self, conn: _Conn, size: int | None = None) -> None:
        size = conn.charged if size is None else size
        conn.charged -= size
        self.in_flight -= size
        if size and self._paused:
            for waiting in list(self._paused):  # memory freed: let them read again
                self._paused.discard(waiting)
                if waiting.state == PAUSED:
                    waiting.state = READING
                    self._set_deadline(waiting, waiting.line_start + self.line_timeout)
                    self._register(waiting)

    def _readable(self, conn: _Conn) -> None:
        if conn.state == DRAINING:
            self._drain(conn)
            return
        room = self.max_memory - self.in_flight
        if room <= 0:
            self._pause(conn)
            return
        try:
            chunk, ancillary, _, _ = conn.sock.recvmsg(min(CHUNK, room), _FD_SPACE,
                                                       socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return
        except OSError:  # reset by the client
            self._close(conn)
            return
        if ancillary:
            # One line's worth: descriptors sent again before the line ends replace
            # those sent before (a client cannot pile them up).
            _close_fds(conn.fds)
            conn.fds = _received_fds(ancillary)
        if not chunk:  # the client is done writing
            if conn.state == READING and conn.buf:  # its last line lacks the newline
                conn.eof = True
                self._scan(conn, time.monotonic())
            else:
                self._close(conn)
            return
        now = time.monotonic()
        if conn.state == IDLE:
            self._line_starts(conn, now)
        conn.buf += chunk
        self._charge(conn, len(chunk))
        del chunk
        self._scan(conn, now)

    def _scan(self, conn: _Conn, now: float) -> None:
        """Hand a complete line to a worker, or refuse a line grown too long."""
        end = conn.buf.find(b"\n", conn.scanned)
        if end < 0 and conn.eof:
            end = len(conn.buf)
        if end < 0:
            conn.scanned = len(conn.buf)
            if conn.scanned > self.max_line:
                self._too_large(conn)
            return
        if end > self.max_line:
            self._too_large(conn)
            return
        line = conn.buf
        conn.line_size = min(end + 1, len(line))  # with its newline, if it has one
        conn.buf = line[end + 1:]  # what was sent ahead: stays charged
        del line[end:]
        conn.scanned = 0
        conn.line = line  # its bytes stay charged until it is answered
        conn.line_fds, conn.fds = conn.fds, []
        conn.state = BUSY
        self._unregister(conn)
        self._workers.submit(functools.partial(self._work, conn))

    def _too_large(self, conn: _Conn) -> None:
        _send_quietly(conn.sock, encode_error(ApiError(
            INVALID, f"request too large (the limit is {self.max_line} bytes)")))
        self._close(conn)

    def _pause(self, conn: _Conn) -> None:
        """Stop reading this connection until memory frees (or memory_wait passes)."""
        now = time.monotonic()
        if conn.state == IDLE:  # not a byte of a line yet: a line starts waiting now
            self._line_starts(conn, now)
        conn.state = PAUSED
        conn.pause_start = conn.pause_start or now  # the wait is bounded per line
        self._unregister(conn)
        self._paused.add(conn)
        self._set_deadline(conn, min(conn.line_start + self.line_timeout,
                                     conn.pause_start + self.memory_wait))

    def _start_draining(self, conn: _Conn) -> None:
        """Out of memory for this line: throw its bytes away up to the newline, then answer."""
        self._paused.discard(conn)
        conn.buf = bytearray()
        conn.scanned = 0
        self._release(conn)
        conn.state = DRAINING
        self._set_deadline(conn, conn.line_start + self.line_timeout)
        self._register(conn)

    def _drain(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        if not chunk:
            self._close(conn)
            return
        end = chunk.find(b"\n")
        if end < 0:
            return
        busy = encode_error(ApiError(
            UNAVAILABLE, "the agent is busy with other large requests; try again"))
        if not _send_quietly(conn.sock, busy):
            self._close(conn)
            return
        rest = chunk[end + 1:]
        now = time.monotonic()
        if rest:
            self._line_starts(conn, now)
            conn.buf += rest
            self._charge(conn, len(rest))
            self._scan(conn, now)
        else:
            self._idle(conn, now)

    # ---- answering -------------------------------------------------------------------------

    def _work(self, conn: _Conn) -> None:
        """A worker thread: answer one line, write the answer, hand the connection back."""
        keep = False
        try:
            line, conn.line = conn.line, None
            assert line is not None
            fds, conn.line_fds = conn.line_fds, []
            _answering.sock, _answering.fds = conn.sock, tuple(fds)
            try:
                with collector_paused() if len(line) > BULK_LINE else \
                        contextlib.nullcontext():
                    req = decode(line)
                    del line  # the parsed request is all that is needed now
                    out = req if isinstance(req, bytes) else handle(self.handler, req)
                    del req
            finally:
                _answering.sock, _answering.fds = None, ()
                _close_fds(fds)
            conn.sock.settimeout(self.write_timeout)
            conn.sock.sendall(out)
            keep = True
        except (BrokenPipeError, ConnectionResetError):
            log.debug("api: the client left before its answer")
        except TimeoutError:
            log.info("api: a client did not read its answer within %.0fs; closing",
                     self.write_timeout)
        except OSError as exc:
            log.debug("api: writing an answer failed: %s", exc)
        except Exception:  # never expected: answer() does not raise
            log.exception("api: answering failed")
        finally:
            self._workers.finishing()
            with self._lock:
                closed = self._closed
                if not closed:
                    self._done.put((conn, keep))
            if closed:
                with contextlib.suppress(OSError):
                    conn.sock.close()
            else:
                self.wake()

    def _finished(self) -> None:
        """Connections whose answer is written: read on (a pipelined line first), or close."""
        while True:
            try:
                conn, keep = self._done.get_nowait()
            except queue.Empty:
                return
            try:
                self._release(conn, conn.line_size)
                conn.line, conn.line_size = None, 0
                if not keep or conn.state == CLOSED or (conn.eof and not conn.buf):
                    self._close(conn)
                    continue
                conn.sock.setblocking(False)
                now = time.monotonic()
                if conn.buf:
                    self._line_starts(conn, now)
                    self._register(conn)
                    self._scan(conn, now)
                else:
                    self._idle(conn, now)
            except Exception:
                log.exception("api connection failed")
                self._close(conn)

    # ---- timers and closing ----------------------------------------------------------------

    def _timers(self, now: float) -> None:
        nxt = float("inf")
        for conn in list(self.conns.values()):
            if conn.state == BUSY:
                continue
            if conn.deadline > now:
                nxt = min(nxt, conn.deadline)
                continue
            if conn.state == IDLE:
                log.debug("api: closing an idle connection")
                self._close(conn)
            elif conn.state == PAUSED and now < conn.line_start + self.line_timeout:
                self._start_draining(conn)
                nxt = min(nxt, conn.deadline)
            else:  # READING, DRAINING, PAUSED: the line did not come in time
                _send_quietly(conn.sock, encode_error(ApiError(
                    BAD_REQUEST, f"the request did not arrive whole within "
                                 f"{self.line_timeout:g}s")))
                self._close(conn)
        self._next_check = nxt

    def _close(self, conn: _Conn) -> None:
        if conn.state == CLOSED:
            return
        self._unregister(conn)
        self._paused.discard(conn)
        conn.state = CLOSED
        conn.buf = bytearray()
        _close_fds(conn.fds)
        conn.fds = []
        self._release(conn)
        self.conns.pop(conn.fd, None)
        with contextlib.suppress(OSError):
            conn.sock.close()

    def close_all(self) -> None:
        with self._lock:
            self._closed = True
        self._workers.stop()
        self._finished_closing()
        for conn in list(self.conns.values()):
            if conn.state != BUSY:  # a busy one is closed by its worker
                self._close(conn)
        self.sel.close()
        for s in (self._wake_r, self._wake_w):
            s.close()

    def _finished_closing(self) -> None:
        while True:
            try:
                conn, _ = self._done.get_nowait()
            except queue.Empty:
                return
            with contextlib.suppress(OSError):
                conn.sock.close()
            self.conns.pop(conn.fd, None)


def _send_quietly(sock: socket.socket, data: bytes) -> bool:
    """A short line on a socket whose buffer is empty: sent whole, or False."""
    try:
        return sock.send(data) == len(data)
    except OSError:
        return False


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
    """The agent's API on a unix socket; every limit is a keyword (see the module doc)."""

    def __init__(self, path: str, handler: Handler, *,
                 max_connections: int = MAX_CONNECTIONS,
                 idle_timeout: float = IDLE_TIMEOUT,
                 line_timeout: float = LINE_TIMEOUT,
                 write_timeout: float = WRITE_TIMEOUT,
                 max_line: int = MAX_LINE,
                 max_memory: int = MAX_MEMORY,
                 memory_wait: float = MEMORY_WAIT,
                 backlog: int = BACKLOG) -> None:
        if max_connections < 1 or max_line < 1 or max_memory < max_line:
            raise ValueError("want max_connections >= 1 and max_memory >= max_line >= 1")
        if min(idle_timeout, line_timeout, write_timeout) <= 0 or memory_wait < 0:
            raise ValueError("timeouts must be positive")
        self.path = path
        self.backlog = max(1, min(backlog, somaxconn()))
        prepare_socket_path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            sock.bind(path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(self.backlog)
        self._loop = _Loop(sock, handler, max_connections=max_connections,
                           idle_timeout=idle_timeout, line_timeout=line_timeout,
                           write_timeout=write_timeout, max_line=max_line,
                           max_memory=max_memory, memory_wait=memory_wait)
        self._sock = sock
        self._thread: threading.Thread | None = None

    @property
    def connections(self) -> int:
        """Connections open now (a snapshot, for tests and status)."""
        return len(self._loop.conns)

    @property
    def in_flight(self) -> int:
        """Bytes of requests being read or answered now."""
        return self._loop.in_flight

    @property
    def refused(self) -> int:
        """Connections turned away at the connection cap so far."""
        return self._loop.refused

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop.run, name="api", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._loop.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
        else:
            self._loop.close_all()
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
