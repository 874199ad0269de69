"""Whether a JSON text's objects have each key once, without a Python call per object.

`json.loads` keeps the last of a key given twice; finding that out means a hook
called for every object (`object_pairs_hook`), which doubles the cost of parsing
(at 100,000 pods, 1.0 s of a 2.0 s parse). Counting does it at C speed instead:
every key of the text has one `:` after it, so the text's colons are its keys and
the colons inside its strings; encoded again (orjson, compact), the parsed value's
colons are its distinct keys and the colons of its decoded strings. A string's
colon is one in the text too, unless it was written `\\u003a`.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

# Below this the hook costs less than importing orjson (25-40 ms): small files and the
# agent's everyday requests parse as they always did.
SMALL = 1 << 16


@functools.cache
def _orjson() -> ModuleType | None:
    try:
        import orjson
    except ImportError:  # pragma: no cover - a base dependency; without it the hook decides
        return None
    return orjson


def unique_keys(text: str, value: Any) -> bool:
    """True: no object of `text` (which parsed to `value`) has a key twice. False: it
    may have (or `text` is small); the caller parses again with a hook that says where.

    With K keys in the text (D distinct), R colons inside its strings and E of them
    escaped: the text has K + R colons and the encoding D + R + E. Counting every
    `\\u003a` as an escaped colon (E' >= E: an escaped backslash before `u003a`
    counts too), equal counts mean K - D = E - E' <= 0, so K = D.
    """
    orjson = _orjson() if len(text) >= SMALL else None
    if orjson is None:
        return False
    try:
        encoded: bytes = orjson.dumps(value)
    except (TypeError, ValueError):  # an integer over 64 bits, nesting over 255 levels
        return False
    escaped = text.count("\\u003a") + text.count("\\u003A") if "\\u003" in text else 0
    return text.count(":") + escaped == encoded.count(b":")
