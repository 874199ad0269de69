"""JSON text for commands that print millions of values: the C encoder without its
per-call set-up, and the text of a value with holes in it (pure).

`dumps(value)` is `json.dumps(value)` with its defaults (separators ", " and ": ",
ASCII), and so is every text built here: `cut` takes the text of a value holding
`hole(i)` strings and returns the text between them, so that a value which differs
only there is written by filling its own texts into the holes, without building it
and without encoding the rest again.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from typing import Any


def encoder() -> Callable[[Any], str]:
    """`json.dumps` with its defaults, but without the encoder's cycle bookkeeping and
    the set-up of each call (a few µs, for hundreds of thousands of items): rendered
    rules share their expression lists (nothing refers to itself), so the bookkeeping
    is pure cost; 1.6x faster without it."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - Python without the C accelerator
        return functools.partial(json.dumps, check_circular=False)
    encode = make(None, json.JSONEncoder().default, json.encoder.encode_basestring_ascii,
                  None, ": ", ", ", False, False, True)
    return lambda value: "".join(encode(value, 0))


dumps = encoder()

# The text of a str, as `dumps` writes it (quoted, escaped to ASCII).
string: Callable[[str], str] = json.encoder.encode_basestring_ascii


def array(texts: Iterable[str]) -> str:
    """The text of a list, given the texts of its items."""
    return "[" + ", ".join(texts) + "]"


def hole(i: int) -> str:
    """A string no rendered value holds (it is escaped as \\u0000, which no name has)."""
    return f"\x00hole {i}\x00"


def cut(value: Any, holes: int, *, inside: bool = False) -> tuple[str, ...]:
    """`dumps(value)` cut at `hole(0)`, ..., `hole(holes - 1)` (each once, in that order):
    the `holes + 1` texts around them.

    A hole is a whole value (filled with the text of a value: `string(name)`, an
    `array`), or with `inside`, part of a string (filled with a string's escaped
    text without its quotes: `string(name)[1:-1]`).
    """
    text = dumps(value)
    out: list[str] = []
    for i in range(holes):
        mark = string(hole(i))
        before, found, text = text.partition(mark[1:-1] if inside else mark)
        if not found:
            raise ValueError(f"hole {i} is not in {value!r} (or not after hole {i - 1})")
        out.append(before)
    out.append(text)
    if any(string(hole(i))[1:-1] in piece for piece in out for i in range(holes)):
        raise ValueError(f"a hole is in {value!r} more than once")
    return tuple(out)


def fill(pieces: tuple[str, ...], texts: Iterable[str]) -> str:
    """The text `cut` was cut from, with `texts` in its holes."""
    out = [pieces[0]]
    for text, piece in zip(texts, pieces[1:], strict=True):
        out += (text, piece)
    return "".join(out)
