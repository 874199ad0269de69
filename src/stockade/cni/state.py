"""What ADD did, on disk, per attachment; and the locks that order plugin processes.

Layout under the configuration's ``dataDir`` (default /var/lib/stockade/cni)::

    <dataDir>/<network>/.lock                 flock: ADD/DEL/CHECK shared, GC exclusive
    <dataDir>/<network>/<containerID>:<ifname>.json   one attachment (":" is in neither)
    <dataDir>/bridge-<name>.lock              flock: creating a bridge and its address

Why files at all, when the agent keeps the endpoints: DEL and GC must find the
host-side veth, the IPAM that holds the address and the mode of an ADD even
if the agent lost its state or the runtime lost the cached result; and CHECK
compares the kernel with what ADD returned. The state is written *before* a
resource is taken (then updated), so a plugin killed halfway leaves a record
that DEL or GC can clean up after.

Parallel plugin processes for different containers run side by side (shared
lock); GC, which lists and removes attachments, runs alone (exclusive lock),
so it never removes an attachment an ADD is making. A state file is replaced
atomically (write a temporary file, rename), so a reader sees the old or the
new record, never half of one. The completed record is fsynced before the
rename, so it survives a power failure; ADD's first one, written before any
resource is taken, is not (see :meth:`StateDir.write`): what a power failure
leaves of it, nothing or an empty file, reads as no record, and DEL cleans up
by name as it does without one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from stockade.cni.spec import INTERNAL, CniError
from stockade.lockfile import open_locked

SUFFIX = ".json"


@dataclass(frozen=True)
class AttachmentState:
    """One attachment as its ADD made it (``result`` in the latest spec version)."""

    network: str
    container_id: str
    ifname: str
    netns: str = ""
    mode: str = ""
    key: str = ""  # the agent's endpoint key, namespace/name
    host_interface: str = ""  # main mode: the host side of the veth
    ipam: str = ""  # "stockade" (the agent), an IPAM plugin's type, or "" (chained)
    complete: bool = False  # ADD finished; False: a crashed or failed ADD
    result: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"network": self.network, "containerID": self.container_id,
                "ifname": self.ifname, "netns": self.netns, "mode": self.mode,
                "key": self.key, "hostInterface": self.host_interface, "ipam": self.ipam,
                "complete": self.complete, "result": dict(self.result)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AttachmentState:
        return cls(str(d["network"]), str(d["containerID"]), str(d["ifname"]),
                   str(d.get("netns", "")), str(d.get("mode", "")), str(d.get("key", "")),
                   str(d.get("hostInterface", "")), str(d.get("ipam", "")),
                   bool(d.get("complete", False)), dict(d.get("result") or {}))

    def done(self, result: Mapping[str, Any]) -> AttachmentState:
        return replace(self, complete=True, result=dict(result))


class StateDir:
    """The attachments of one network under ``<data_dir>/<network>``."""

    def __init__(self, data_dir: str, network: str) -> None:
        self.root = Path(data_dir)
        self.dir = self.root / network

    def _ensure(self) -> None:
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise CniError(INTERNAL, f"cannot create the state directory {self.dir}",
                           str(exc)) from None

    @contextlib.contextmanager
    def locked(self, exclusive: bool = False) -> Iterator[None]:
        """The network's lock: shared for one attachment's work, exclusive for GC."""
        with _flock(self.dir / ".lock", exclusive, self._ensure):
            yield

    @contextlib.contextmanager
    def bridge_lock(self, bridge: str) -> Iterator[None]:
        """Serialises bridge creation between networks and processes."""
        with _flock(self.root / f"bridge-{bridge}.lock", True, self._ensure):
            yield

    def path(self, container_id: str, ifname: str) -> Path:
        return self.dir / f"{container_id}:{ifname}{SUFFIX}"

    def read(self, container_id: str, ifname: str) -> AttachmentState | None:
        return _load(self.path(container_id, ifname))

    def write(self, state: AttachmentState) -> None:
        """Replace the attachment's record (atomically), in the page cache: every reader
        sees it and a killed plugin (or agent) leaves it, but a power failure may lose it
        or leave an empty file (read as absent). No fsync: a power failure ends the
        attachment with its record (its network namespace and veth do not outlive the
        machine), and what outlives it (the agent's endpoint, a delegated address) DEL
        finds by name, as without a record. The fsyncs (this one and the agent's store's,
        see agent/cni_ops.py) were among the longest waits of ADDs made at once.
        """
        target = self.path(state.container_id, state.ifname)
        # Unique while this process lives (no tempfile: its import is a tenth of a
        # plugin's start); one left by a dead process of the same pid is overwritten.
        tmp = self.dir / f".tmp-{os.getpid()}-{target.name}"
        data = json.dumps(state.to_dict(), separators=(",", ":")).encode()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            try:
                fd = os.open(tmp, flags, 0o600)
            except FileNotFoundError:  # the first record of the network
                self._ensure()
                fd = os.open(tmp, flags, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise CniError(INTERNAL, f"cannot write {target}", str(exc)) from None

    def remove(self, container_id: str, ifname: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(container_id, ifname).unlink()

    def all(self) -> list[AttachmentState]:
        """Every attachment recorded for the network (unreadable files are skipped)."""
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []
        found = (_load(self.dir / n) for n in names
                 if n.endswith(SUFFIX) and not n.startswith("."))
        return [s for s in found if s is not None]


def _load(path: Path) -> AttachmentState | None:
    try:
        return AttachmentState.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a torn or foreign file: treated as absent, DEL still cleans by name


@contextlib.contextmanager
def _flock(path: Path, exclusive: bool, ensure: Callable[[], None]) -> Iterator[None]:
    """``ensure`` makes the directory, when it is missing (not on every call: a syscall)."""
    try:
        try:
            fd = open_locked(path, exclusive=exclusive)
        except FileNotFoundError:
            ensure()
            fd = open_locked(path, exclusive=exclusive)
    except OSError as exc:
        raise CniError(INTERNAL, f"cannot open the lock {path}", str(exc)) from None
    assert fd is not None  # blocking: held
    try:
        yield
    finally:
        os.close(fd)  # closing releases the lock
