"""Field errors worded like the Kubernetes API server's."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

REQUIRED = "Required value"
INVALID = "Invalid value"
FORBIDDEN = "Forbidden"
UNSUPPORTED = "Unsupported value"
TOO_LONG = "Too long"

_NO_VALUE = object()


@dataclass(frozen=True)
class FieldError:
    """One error: `<path>: <reason>: <value>: <detail>` as the API server prints it."""

    path: str
    reason: str
    detail: str = ""
    value: Any = _NO_VALUE

    def render(self) -> str:
        parts = [self.path, self.reason]
        if self.value is not _NO_VALUE and self.reason not in (REQUIRED, FORBIDDEN, TOO_LONG):
            parts.append(_show(self.value))
        if self.detail:
            parts.append(self.detail)
        return ": ".join(parts)


def invalid_each(path: str, value: object, messages: Iterable[str]) -> list[FieldError]:
    """One Invalid error per message, as upstream's `for _, msg := range ...` loops."""
    return [FieldError(path, INVALID, msg, value) for msg in messages]


def _show(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)
