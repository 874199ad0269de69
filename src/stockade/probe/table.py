"""Truth tables in the form of the upstream Kubernetes network policy e2e tests.

Rows are sources, columns destinations; ``.`` is allowed, ``X`` denied and
``-`` a pair that was not probed (a pod to itself). The corner names what the
table is about, e.g. ``TCP/80``::

    TCP/80  x/a x/b x/c
    x/a      -   .   X
    x/b      .   -   .

A pure function of its inputs, so ``stockade matrix`` (expected tables) and
the prober (observed tables) print the same thing and can be diffed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

ALLOWED = "."
DENIED = "X"
UNKNOWN = "-"


def cell(value: bool | None) -> str:
    """The symbol for one pair."""
    if value is None:
        return UNKNOWN
    return ALLOWED if value else DENIED


def render_table(
    rows: Sequence[str],
    cols: Sequence[str],
    allowed: Callable[[str, str], bool | None],
    title: str = "",
) -> str:
    """Render ``allowed(row, col)`` for every pair; no trailing newline.

    Each symbol sits under the middle of its column's label, the first column
    is as wide as the widest of ``title`` and the row labels, and trailing
    spaces are stripped so the output diffs cleanly.
    """
    first = max([len(title), *(len(r) for r in rows)])
    widths = [max(1, len(c)) for c in cols]
    header = (c.ljust(w) for c, w in zip(cols, widths, strict=True))
    lines = [" ".join([title.ljust(first + 1), *header])]
    for row in rows:
        cells = []
        for col, width in zip(cols, widths, strict=True):
            left = (width - 1) // 2
            cells.append((" " * left + cell(allowed(row, col))).ljust(width))
        lines.append(" ".join([row.ljust(first + 1), *cells]))
    return "\n".join(line.rstrip() for line in lines)
