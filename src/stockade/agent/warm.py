"""A warm start: what the agent computes from its store at start, kept across a clean stop.

A cold start decodes every row of the store, checks every object again
(admission.quarantine) and compiles the whole state: at 10,000 endpoints and
1,000 policies about 1.1 s of the 1.8 s a restart takes on a quiet machine.
All three are a pure function of the rows, the code and the configuration. So
a clean stop writes their result (the state with its quarantine, and the
compiler as `IncrementalCompiler.of` makes it from the state, not the running
one) to ``warm.pickle`` in the state directory, under the digest of the rows
that hold that state (`Store.state_digest`: the records encoded as a commit
encodes them) and a key of the code and the configuration. The next start
reads the rows as always and takes the kept result only when their digest and
the key are equal; anything else (a crash after changes, a row written by
hand, an upgrade, a torn or foreign file) falls back to the cold start, which
stays the reference.

The file is pickled Python objects: only a file owned by the agent's user and
writable by nobody else, in the private state directory, is ever read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stockade.agent.admission import enforceable, quarantine
from stockade.agent.records import AgentState
from stockade.agent.store import Store
from stockade.compile.incremental import IncrementalCompiler

log = logging.getLogger(__name__)

FILE = "warm.pickle"
FORMAT = b"stockade-warm 1\n"


@dataclass(frozen=True)
class Kept:
    """The result of a cold start from the rows with `digest`."""

    state: AgentState
    compiler: IncrementalCompiler


def code_key(strict_cidr: bool) -> str:
    """The code and configuration a start's result depends on: the interpreter, every
    source file of the package, and the admission's one option."""
    h = hashlib.sha256(f"{sys.version}\0{strict_cidr}\0".encode())
    root = Path(__file__).resolve().parent.parent
    for path in sorted(root.rglob("*.py")):
        data = path.read_bytes()
        h.update(b"%s\0%d\0" % (str(path.relative_to(root)).encode(), len(data)))
        h.update(data)
    return h.hexdigest()


def save(state_dir: Path | str, state: AgentState, *, strict_cidr: bool) -> bool:
    """Keep what a start from the rows holding `state` would compute. False when there
    is nothing to keep (the state's rows have no digest); the file is then removed."""
    path = Path(state_dir) / FILE
    for stale in Path(state_dir).glob(".warm-*"):  # a stop killed while writing
        stale.unlink(missing_ok=True)
    digest = Store.state_digest(state)
    if digest is None:
        path.unlink(missing_ok=True)
        return False
    kept = AgentState(state.namespaces, state.endpoints, state.policies,
                      state.cluster_policies)
    kept.quarantined = quarantine(kept, strict_cidr=strict_cidr)
    compiler = IncrementalCompiler.of(enforceable(kept, kept.quarantined))
    header = f"{code_key(strict_cidr)} {digest}\n".encode()
    fd, tmp = tempfile.mkstemp(prefix=".warm-", dir=state_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(FORMAT + header)
            pickle.dump(Kept(kept, compiler), f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


class WarmStart:
    """The kept result, if any, offered to `Store.load` as `known`."""

    def __init__(self, state_dir: Path | str, *, strict_cidr: bool) -> None:
        self.path = Path(state_dir) / FILE
        self.kept: Kept | None = None
        self._strict_cidr = strict_cidr

    def known(self, digest: str) -> AgentState | None:
        """The kept state when it was computed from rows of `digest` by this code."""
        try:
            # Not through a link: the file itself must be the agent's.
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid()
                        or st.st_mode & 0o077):
                    log.warning("warm start file ignored: not private to the agent",
                                extra={"fields": {"path": str(self.path)}})
                    return None
                if f.readline() != FORMAT:
                    return None
                line = f.readline().decode("ascii", "replace").split()
                if line != [code_key(self._strict_cidr), digest]:
                    return None
                kept = pickle.load(f)  # noqa: S301 (a private file this agent wrote)
        except FileNotFoundError:
            return None
        except OSError as exc:  # a link (ELOOP), or unreadable: start cold, say why
            log.warning("warm start file ignored", extra={"fields": {
                "path": str(self.path), "error": str(exc)}})
            return None
        except Exception as exc:  # a torn or foreign file: start cold
            log.warning("warm start file unreadable; starting cold",
                        extra={"fields": {"path": str(self.path), "error": str(exc)}})
            return None
        if not (isinstance(kept, Kept) and isinstance(kept.state, AgentState)
                and isinstance(kept.compiler, IncrementalCompiler)):
            return None
        self.kept = kept
        return kept.state
