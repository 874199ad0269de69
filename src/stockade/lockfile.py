"""Advisory locks on files (flock), the one way processes of stockade exclude each other.

flock rather than a pid file: the kernel drops the lock when its holder dies, kill -9
included, so there is never a stale lock to judge or clear by hand. A descriptor
opened close-on-exec is not inherited by the processes the holder starts.

A file lock holds only while its file stays and everyone sees the same file: root
removing /run/stockade (or a tmpfiles clean-up), or a second agent with its own /run
(a container's), takes a lock of the same name beside it. `hold_name` adds a name no
file system holds: an abstract unix socket, bound in the network namespace the caller
is in, gone when its holder dies. Any process of that namespace may bind any abstract
name, so a name held by another user than root is said, not obeyed: one who could
squat it would otherwise keep the agent from starting.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct
import threading
from pathlib import Path

_UCRED = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid


def open_locked(path: Path, *, exclusive: bool = True, block: bool = True,
                mode: int = 0o600) -> int | None:
    """A descriptor on `path` (created `mode` if missing) holding its flock, or None
    when `block` is false and another holds it. Closing the descriptor releases it.

    OSError when the file cannot be opened (e.g. its directory is missing)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        how = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        fcntl.flock(fd, how if block else how | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def hold(path: Path) -> int | None:
    """`path` locked exclusively without waiting, its holder's pid written in it; None
    when another holds it. Give it back with `give_back`, which removes the file.

    A file removed by its holder's `give_back` may still be open here, waiting: the
    lock taken on it would be on a name no longer in the directory, beside another
    process's on the new file. So the lock counts only if `path` is still the file
    locked."""
    while True:
        fd = open_locked(path, block=False)
        if fd is None:
            return None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def holder(path: Path) -> int | None:
    """The pid written by the lock's holder, if one can be read."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return int(text) if text.strip().isdigit() else None


def give_back(fd: int, path: Path) -> None:
    """Remove the lock's file, then release it (in this order: see `hold`)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


class HeldName:
    """An abstract name held (`hold_name`) until `close`. It listens, so that a process
    refused can ask whose it is (`name_holder`), and a thread of its own accepts and
    closes each connection at once: connections left in the queue would fill it, and
    from then on nobody could ask (a second agent restarted in a loop fills it by
    itself)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._thread = threading.Thread(target=self._answer, name="name-lock", daemon=True)
        self._thread.start()

    def _answer(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed (shutdown wakes the accept)
                return
            conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(1.0)


def hold_name(name: str) -> HeldName | None:
    """An abstract unix socket bound to `name` in the caller's network namespace, held
    until closed (or its holder dies); None when another process holds the name."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind("\0" + name)
        sock.listen(8)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            return None
        raise
    return HeldName(sock)


def name_holder(name: str) -> tuple[int, int] | None:
    """(pid, uid) of the process holding the abstract name, as the kernel says it
    (SO_PEERCRED: not what the holder claims); None if nobody answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(1.0)
    try:
        sock.connect("\0" + name)
        pid, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                     _UCRED.size))
    except OSError:
        return None
    finally:
        sock.close()
    return pid, uid
