"""Structured log lines on stderr (logfmt), as systemd's journal likes them.

One record is one line of ``key=value`` pairs, whatever the values hold: a
label value, a pod name or an exception text can neither split the line nor
forge a pair. A value is written bare only when it is non-empty printable text
without a space, ``"``, ``=`` or ``\\``; anything else is quoted, with ``\\`` and
``"`` escaped, ``\\n``, ``\\r``, ``\\t`` as such, and every other character that
is not printable (C0/C1 controls, DEL, line and paragraph separators, format
characters such as bidi overrides, unusual spaces) as ``\\uXXXX`` (``\\UXXXXXXXX``
beyond the BMP). Keys are reduced to ``[A-Za-z0-9_.-]``. :func:`parse` reads a
line back into its pairs (the inverse of :func:`format_pairs`).
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterable

_SIMPLE_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNESCAPES = {"\\": "\\", '"': '"', "n": "\n", "r": "\r", "t": "\t"}
_BAD_KEY = re.compile(r"[^A-Za-z0-9_.\-]")


def quote(text: str) -> str:
    """``text`` as a quoted logfmt value: one line, no bare ``"``, reversible."""
    out = ['"']
    for ch in text:
        esc = _SIMPLE_ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
        elif ch == " " or ch.isprintable():
            out.append(ch)
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def value(text: str) -> str:
    """``text`` bare when that is unambiguous, else :func:`quote`-d."""
    if text and text.isprintable() and not any(c in text for c in ' "=\\'):
        return text
    return quote(text)


def key(name: object) -> str:
    """A key that cannot contain a space, ``=`` or a quote (never empty)."""
    return _BAD_KEY.sub("_", str(name)) or "_"


def format_pairs(pairs: Iterable[tuple[object, object]]) -> str:
    """``k=v k=v ...`` with every key and value made safe."""
    return " ".join(f"{key(k)}={value(str(v))}" for k, v in pairs)


def parse(line: str) -> list[tuple[str, str]]:
    """The pairs of one line written by this module (ValueError if malformed)."""
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(line)
    while i < n:
        eq = line.find("=", i)
        if eq <= i or " " in line[i:eq]:
            raise ValueError(f"logfmt: expected key= at column {i}: {line!r}")
        name = line[i:eq]
        i = eq + 1
        if i < n and line[i] == '"':
            text, i = _unquote(line, i + 1)
        else:
            end = line.find(" ", i)
            end = n if end < 0 else end
            text, i = line[i:end], end
        pairs.append((name, text))
        if i < n:
            if line[i] != " ":
                raise ValueError(f"logfmt: expected a space at column {i}: {line!r}")
            i += 1
    return pairs


def _unquote(line: str, i: int) -> tuple[str, int]:
    """Read a quoted value whose opening quote ends before ``i``; (text, index after)."""
    out: list[str] = []
    n = len(line)
    while i < n:
        ch = line[i]
        if ch == '"':
            return "".join(out), i + 1
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        if i + 1 >= n:
            break
        esc = line[i + 1]
        if esc in _UNESCAPES:
            out.append(_UNESCAPES[esc])
            i += 2
        elif esc in "uU":
            width = 4 if esc == "u" else 8
            digits = line[i + 2:i + 2 + width]
            if len(digits) != width or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise ValueError(f"logfmt: bad \\{esc} escape at column {i}: {line!r}")
            out.append(chr(int(digits, 16)))
            i += 2 + width
        else:
            raise ValueError(f"logfmt: unknown escape \\{esc} at column {i}: {line!r}")
    raise ValueError(f"logfmt: unterminated quoted value: {line!r}")


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ms = int(record.msecs)
        line = (f"time={ts}.{ms:03d}Z level={value(record.levelname.lower())}"
                f" logger={value(record.name)} msg={quote(record.getMessage())}")
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            line += " " + format_pairs(fields.items())
        if record.exc_info:
            line += " error=" + quote(self.formatException(record.exc_info))
        return line


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger("stockade")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
