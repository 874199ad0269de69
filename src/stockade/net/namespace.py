"""Named network namespaces, entered in-process.

A named network namespace is what ``ip netns add NAME`` makes: an empty file
``/run/netns/NAME`` onto which the namespace file of a task is bind-mounted, so
that the namespace outlives every process in it and can be found by name.
``/run/netns`` is made a shared mount first (bind-mounted onto itself if it is
not a mount point yet) so that the bind mounts propagate to other mount
namespaces, exactly as iproute2 does.

Why in-process: pyroute2 0.9 forks a helper process for every ``NetNS`` object
or ``pyroute2.netns.create`` call (about 20 ms each on the reference machine),
whereas ``setns(2)`` in the calling thread costs microseconds and an ``IPRoute``
opened there is bound to that namespace for its whole life.

Two kernel facts shape this module:

* ``setns(2)`` and ``unshare(CLONE_NEWNET)`` change the namespace of the
  calling *thread* only. The namespace to go back to is therefore read from
  ``/proc/thread-self/ns/net``, never ``/proc/self/ns/net`` (which names the
  main thread's namespace; that is the mistake in ``pyroute2.netns.pushns``).
* A socket belongs to the namespace it was created in, whichever namespace the
  thread is in later; ``/proc/sys/net`` shows the namespace of the thread that
  opens the file. Both make "enter, create or open, leave" a safe pattern.

Python 3.11 has no ``os.setns``, so the three system calls go through libc.

Public API::

    netns_path(name) -> str
    entered(name | None) -> ContextManager[None]   # None: stay where we are
    entered_fd(fd, name="") -> ContextManager[None] # an open namespace file
    create_netns(name) -> bool                     # True when it was created
    remove_netns(name) -> bool                     # True when it was removed
    list_netns(pattern=None) -> list[str]
    netns_exists(name) -> bool
    stat_in_root(root_fd, path) -> os.stat_result | None  # as another root sees it
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import cache

from stockade.errors import NetError

NETNS_DIR = "/run/netns"
THREAD_NETNS = "/proc/thread-self/ns/net"

_CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_MS_REC = 16384
_MS_SHARED = 1 << 20
_MNT_DETACH = 2
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$")
_SYS_OPENAT2 = 437  # the same number on every architecture (the unified syscall table)
_RESOLVE_IN_ROOT = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64))


@cache
def _libc() -> ctypes.CDLL:
    # The interpreter's own symbols include libc's: no ctypes.util.find_library, which
    # imports half the standard library and runs ldconfig (~25 ms of every CNI call).
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _setns(fd: int) -> None:
    _check(_libc().setns(fd, _CLONE_NEWNET), "setns")


def _mount(source: str, target: str, flags: int) -> None:
    _check(
        _libc().mount(source.encode(), target.encode(), b"none", flags, None),
        f"mount {source} on {target}",
    )


def _umount(target: str) -> None:
    _check(_libc().umount2(target.encode(), _MNT_DETACH), f"umount {target}")


def netns_path(name: str) -> str:
    """Path of the named namespace file; rejects names that could escape the dir."""
    if not _NAME.match(name) or name in (".", ".."):
        raise NetError(f"invalid network namespace name {name!r}")
    return os.path.join(NETNS_DIR, name)


def _is_nsfs(path: str) -> bool:
    """True when ``path`` is a namespace file (bind-mounted), not a plain file.

    The nsfs files of all namespaces share one device number, so comparing the
    device with our own namespace's file tells a mounted namespace from the
    empty placeholder file left behind by a crash between create and mount.
    """
    try:
        return os.stat(path).st_dev == os.stat(THREAD_NETNS).st_dev
    except FileNotFoundError:
        return False


def stat_in_root(root: int, path: str) -> os.stat_result | None:
    """``path`` as a process whose root directory is the descriptor ``root`` sees it,
    symbolic links and ``..`` resolved inside that root too (``openat2`` with
    ``RESOLVE_IN_ROOT``: through ``/proc/self/fd/N/...`` an absolute link such as
    ``/var/run -> /run`` would be followed in this process's own root instead).
    None when nothing is there; NetError when the kernel cannot tell (before 5.6)."""
    how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT)
    fd = _libc().syscall(_SYS_OPENAT2, root, path.encode(), ctypes.byref(how),
                         ctypes.sizeof(how))
    if fd < 0:
        code = ctypes.get_errno()
        if code in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise NetError(f"cannot resolve {path} in another root: {os.strerror(code)}")
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def netns_exists(name: str) -> bool:
    """True when the named namespace exists (its file is a mounted namespace)."""
    return _is_nsfs(netns_path(name))


@contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the block with the calling thread inside the named network namespace.

    ``None`` means "the namespace we are in", so callers can treat "the host"
    uniformly whether it is the current namespace or a named one. The previous
    namespace is restored on exit, also when the block raises. Only the calling
    thread moves; threads that already exist stay where they are, while a
    thread *started* inside the block inherits the namespace it is started in.
    """
    if name is None:
        yield
        return
    path = name if name.startswith("/") else netns_path(name)  # or a path: /proc/PID/ns/net
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetError(f"network namespace {name!r} does not exist") from None
    try:
        with entered_fd(target, name):
            yield
    finally:
        os.close(target)


@contextmanager
def entered_fd(target: int, name: str = "") -> Iterator[None]:
    """As `entered`, for a namespace file the caller has open (and keeps, e.g. to hand
    the kernel as a veth peer's namespace); ``name`` only words the errors."""
    name = name or f"fd {target}"
    previous = os.open(THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _setns(target)
        except OSError as exc:
            raise NetError(f"cannot enter network namespace {name!r}: {exc}") from exc
        try:
            yield
        finally:
            try:
                _setns(previous)
            except OSError as exc:  # pragma: no cover - the kernel never refuses this
                raise NetError(f"cannot leave network namespace {name!r}: {exc}") from exc
    finally:
        os.close(previous)


def _share_netns_dir() -> None:
    """Make /run/netns a shared mount point, as ``ip netns add`` does."""
    os.makedirs(NETNS_DIR, exist_ok=True)
    try:
        _mount("", NETNS_DIR, _MS_SHARED | _MS_REC)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: not a mount point yet
            raise
        _mount(NETNS_DIR, NETNS_DIR, _MS_BIND | _MS_REC)
        _mount("", NETNS_DIR, _MS_SHARED | _MS_REC)


def create_netns(name: str) -> bool:
    """Create the named network namespace unless it exists; True if created.

    The new namespace is made by ``unshare`` in the calling thread, pinned by a
    bind mount, and the thread goes back to where it was. Loopback is left down,
    as ``ip netns add`` leaves it.
    """
    path = netns_path(name)
    if _is_nsfs(path):
        return False
    try:
        _share_netns_dir()
        with suppress(FileExistsError):  # placeholder of an interrupted create: reuse it
            os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
        previous = os.open(THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check(_libc().unshare(_CLONE_NEWNET), "unshare")
            try:
                _mount(THREAD_NETNS, path, _MS_BIND)
            finally:
                _setns(previous)
        finally:
            os.close(previous)
    except OSError as exc:
        _unlink_quietly(path)
        raise NetError(f"cannot create network namespace {name!r}: {exc}") from exc
    return True


def _unlink_quietly(path: str) -> None:
    with suppress(OSError):
        os.unlink(path)


def remove_netns(name: str) -> bool:
    """Remove the named network namespace if it exists; True if something was removed.

    The namespace itself disappears once nothing else (process, socket, open
    file) holds it; links in it that were moved there are destroyed with it.
    """
    path = netns_path(name)
    if not os.path.lexists(path):
        return False
    try:
        if _is_nsfs(path):
            _umount(path)
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise NetError(f"cannot remove network namespace {name!r}: {exc}") from exc
    return True


def list_netns(pattern: re.Pattern[str] | None = None) -> list[str]:
    """Sorted names under /run/netns, optionally only those fully matching ``pattern``."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if pattern is None or pattern.fullmatch(n))
