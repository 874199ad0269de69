"""Advisory locks on files (flock), the one way processes of stockade exclude each other.

flock rather than a pid file: the kernel drops the lock when its holder dies, kill -9
included, so there is never a stale lock to judge or clear by hand. A descriptor
opened close-on-exec is not inherited by the processes the holder starts.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


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
