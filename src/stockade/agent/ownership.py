"""One agent per state directory and per datapath, held from the agent's first step.

Two agents on one state directory would write one database and one warm start; two
on one datapath (the same table, or pinned eBPF directory, in the same network
namespace) would each program the kernel to their own state, the second replacing
the first's rules or programs. The socket's probe (agent/server.py) came too late to
stop either: by then the second agent had opened the datapath, read it back and,
for eBPF, loaded the pinned programs. So `stockade agent` takes two locks before
anything else and keeps them until it exits:

    <state dir>/agent.lock                              the state directory
    /run/stockade/locks/<host | netns-NAME>-<name>.lock   the datapath's kernel objects

The datapath's lock does not depend on the datapath's kind: two agents enforcing in
one namespace under one name conflict whatever their kinds (they share the pods'
links). The locks are flocks: the kernel drops them when the agent dies, so a
restart after kill -9 is never refused. An agent that finds either lock held stops
with an error naming the other agent's pid and changes nothing.

The datapath is held by a name too, ``stockade/datapath/<name>``, an abstract unix
socket bound in the datapath's network namespace (lockfile.hold_name): it holds when
the lock's file is removed, between agents that do not share /run (one in a
container, one on the host), and between an agent given ``--netns X`` and one started
inside X, whose lock files differ. A name held by a user other than root is said and
not obeyed (the file lock still holds): anyone in the namespace may bind one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from stockade.compile.owner import check_owner_name
from stockade.errors import AgentError, StockadeError
from stockade.lockfile import HeldName, give_back, hold, hold_name, holder, name_holder
from stockade.net.namespace import entered, netns_path

log = logging.getLogger(__name__)

LOCK_DIR = Path("/run/stockade/locks")
STATE_LOCK = "agent.lock"
DIR_MODE = 0o700


@dataclass
class Ownership:
    """The locks an agent holds (path -> descriptor), until `release`."""

    held: dict[Path, int] = field(default_factory=dict)
    names: list[HeldName] = field(default_factory=list)  # abstract names held
    # The state directory, when taking its lock made it: removed at release if still
    # empty (a refused or failed start leaves none behind; the lock directory stays, as
    # another agent may be about to lock in it).
    made: Path | None = None

    def release(self) -> None:
        while self.names:
            self.names.pop().close()
        while self.held:
            path, fd = self.held.popitem()
            give_back(fd, path)
        if self.made is not None:
            with contextlib.suppress(OSError):
                self.made.rmdir()
            self.made = None


def datapath_lock(table: str, netns: str | None, lock_dir: Path = LOCK_DIR) -> Path:
    """The lock of the datapath called `table` in `netns` (both names checked by the
    caller: neither can hold a slash)."""
    where = f"netns-{netns}" if netns else "host"
    return lock_dir / f"{where}-{table}.lock"


def datapath_name(table: str) -> str:
    """The abstract socket name that holds the datapath `table`, bound in the datapath's
    own network namespace (so it is the same for an agent given ``--netns X`` and one
    started inside X)."""
    return f"stockade/datapath/{table}"


def take_ownership(state_dir: str, table: str, netns: str | None, *,
                   lock_dir: Path = LOCK_DIR) -> Ownership:
    """Both locks, or an AgentError naming what another agent holds (and nothing held).
    The names are checked first: they become the lock's path."""
    check_owner_name(table)
    # A namespace that does not exist yet holds no datapath to protect: the agent refuses
    # it later, with the error that says what else is missing (an extra) first.
    here = netns is None or os.path.exists(netns_path(netns))
    place = f"network namespace {netns!r}" if netns else "the host's network namespace"
    wanted = (
        (Path(state_dir), STATE_LOCK, f"runs on the state directory {state_dir}",
         "--state-dir"),
        (lock_dir, datapath_lock(table, netns, lock_dir).name,
         f"enforces the datapath {table!r} in {place}", "--table or --netns"),
    )
    ownership = Ownership()
    try:
        for directory, name, what, option in wanted:
            path = directory / name
            # Private first: whoever could write in it could have left a link to another
            # file there for the lock to truncate.
            if ensure_private_dir(directory) and directory == wanted[0][0]:
                ownership.made = directory
            try:
                fd = hold(path)
            except OSError as exc:
                raise AgentError(f"cannot take the lock {path}: {exc}") from None
            if fd is None:
                pid = holder(path)
                who = f"another agent (pid {pid})" if pid else "another agent"
                raise AgentError(f"{who} {what}; stop it first, or give this one its own "
                                 f"{option}")
            ownership.held[path] = fd
        if here:
            with entered(netns):
                _hold_name(ownership, datapath_name(table), wanted[1][2], wanted[1][3])
    except BaseException:
        ownership.release()
        raise
    return ownership


def _hold_name(ownership: Ownership, name: str, what: str, option: str) -> None:
    """The datapath's abstract name, held; refused (AgentError) if an agent holds it.
    An agent's name always answers who holds it: one that does not (bound and not
    listening, or its queue kept full) is someone else's, and so is one of another
    user than root: said, not obeyed, as anyone in the namespace can bind one."""
    for attempt in range(3):
        try:
            sock = hold_name(name)
        except OSError as exc:
            raise AgentError(f"cannot hold the name @{name}: {exc}") from None
        if sock is not None:
            ownership.names.append(sock)
            return
        who = name_holder(name)
        if who is None:
            # an agent between its bind and its listen, or one exiting: ask again
            time.sleep(0.05 * (attempt + 1))
            continue
        pid, uid = who
        if uid not in (0, os.geteuid()):
            log.warning("the name @%s is held by pid %d of uid %d, not root: not obeyed "
                        "(the lock file still holds the datapath)", name, pid, uid)
            return
        raise AgentError(f"another agent (pid {pid}) {what}; stop it first, or give this "
                         f"one its own {option} (its lock file is gone or not shared: "
                         f"the name @{name} still holds it)")
    log.warning("the name @%s is held by a process that does not say who it is: not "
                "obeyed (the lock file still holds the datapath)", name)


def ensure_private_dir(path: Path, error: type[StockadeError] = AgentError) -> bool:
    """Create `path` 0700 (True if this made it); refuse one others can write to, since
    whoever can replace what is in it decides what the agent does (the state database,
    a lock's file)."""
    try:
        try:
            path.mkdir(mode=DIR_MODE, parents=True)
            made = True
        except FileExistsError:
            made = False
        st = path.stat()
    except OSError as exc:
        raise error(f"{path}: cannot create the directory: {exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise error(f"{path}: not a directory")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise error(f"{path}: the directory is writable by group or others"
                    f" (mode {stat.S_IMODE(st.st_mode):o}); chmod 700 it")
    if st.st_uid not in (os.geteuid(), 0):
        raise error(f"{path}: the directory belongs to uid {st.st_uid}, not to"
                    f" this user ({os.geteuid()}) or root")
    return made
