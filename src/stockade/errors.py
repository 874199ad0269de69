"""The one exception tree of stockade.

    StockadeError
     ├── InputError            bad input from a user: files, documents, objects
     │    ├── DecodeError       a document that is not a well-typed object
     │    ├── ValidationError   an object that breaks the API server's rules
     │    └── InvalidObjects    several of those: a set that is applied all or nothing
     ├── DataplaneError         the kernel refused or failed a change (command + stderr)
     ├── NetError               network plumbing (namespaces, links, addresses)
     └── AgentError             talking to or running the node agent

Every error renders as one line that names the file and object concerned; the
command line prints that line and exits 2, never a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stockade.model.field import FieldError


class StockadeError(Exception):
    """Base of every error stockade raises on purpose."""


class InputError(StockadeError):
    """Bad input: names where it came from (file, object) and what is wrong."""

    def __init__(self, message: str, *, source: str = "", obj: str = "") -> None:
        self.message = message
        self.source = source
        self.obj = obj
        super().__init__(self.render())

    def render(self) -> str:
        parts = [p for p in (self.source, self.obj) if p]
        return ": ".join([*parts, self.message])

    def lines(self) -> list[str]:
        """One line per problem, each naming the file and the object."""
        return [self.render()]


class DecodeError(InputError):
    """A document that cannot be decoded into an object (unknown field, wrong type)."""

    def __init__(self, message: str, *, path: str = "", source: str = "", obj: str = "") -> None:
        self.path = path
        full = f"{path}: {message}" if path else message
        super().__init__(full, source=source, obj=obj)


class ValidationError(InputError):
    """An object that breaks validation rules; carries every error found."""

    def __init__(self, errors: Sequence[FieldError], *, source: str = "", obj: str = "") -> None:
        self.errors = tuple(errors)
        super().__init__("; ".join(e.render() for e in self.errors), source=source, obj=obj)

    def lines(self) -> list[str]:
        prefix = ": ".join(p for p in (self.source, self.obj) if p)
        return [f"{prefix}: {e.render()}" if prefix else e.render() for e in self.errors]


class InvalidObjects(InputError):
    """Several objects failed decoding or validation; nothing of the set may be applied."""

    def __init__(self, errors: Sequence[InputError]) -> None:
        self.errors = tuple(errors)
        count = sum(len(e.lines()) for e in self.errors)
        super().__init__(f"{count} error(s) in {len(self.errors)} object(s); "
                         "nothing was applied")

    def lines(self) -> list[str]:
        return [line for e in self.errors for line in e.lines()]


class DataplaneError(StockadeError):
    """The kernel datapath failed; carries the command and what it said."""

    def __init__(self, message: str, *, command: str = "", stderr: str = "") -> None:
        self.command = command
        self.stderr = stderr
        detail = f" ({command}: {stderr.strip()})" if command or stderr else ""
        super().__init__(message + detail)


class NetError(StockadeError):
    """Network plumbing failed: namespaces, links, addresses, routes."""


class BlockNeeded(NetError):
    """An address pool's claimed blocks are full and the caller asked not to claim one
    where it stands (under the agent's lock): claim it (`Ipam.block_claim`) and retry."""


class AgentError(StockadeError):
    """The node agent failed or could not be reached."""
