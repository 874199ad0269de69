"""A heat-map of the reachability matrix as a PNG (pure: returns the file's bytes).

For clusters too large for a graph: one square block of pixels per ordered pair
of pods (row: source, column: destination), pods in the matrix's order (by
namespace, then name), a one-pixel line between namespaces. With several probes
(ports) a pair is coloured by what they say together:

* allowed: allowed on every probe the destination serves;
* denied: denied on every probe the destination serves;
* mixed: allowed on some, denied on others;
* not served: the destination serves none of the probed (named) ports.

The PNG is written by `png` below (palette colour, zlib, standard library only):
a row of pixels is built once per source pod from the table's rows as bytes, so
thousands of pods take a few seconds at most.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from stockade.engine.matrix import Matrix

# Palette indexes; a cell's index is the OR of its probes' (ALLOWED | DENIED = MIXED).
NOT_SERVED, ALLOWED, DENIED, MIXED, LINE = 0, 1, 2, 3, 4
# Blue for allowed, near white for denied (a sparse picture reads like a spy plot),
# light blue for mixed, grey where there is nothing to judge: readable without
# telling red from green.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0xBD, 0xBD, 0xBD),  # not served
    (0x21, 0x66, 0xAC),  # allowed
    (0xF7, 0xF7, 0xF7),  # denied
    (0x92, 0xC5, 0xDE),  # mixed
    (0x40, 0x40, 0x40),  # namespace boundary
)
COLOUR_NAMES = ("blue: allowed", "light blue: on some probes only", "white: denied",
                "grey: port not served")
# Blocks are scaled up to about this many pixels a side (a pixel per pair beyond).
TARGET_SIDE = 1024
MAX_BLOCK = 16

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Layout:
    """Where each pod's block starts (the same on both axes) and the picture's side."""

    block: int
    starts: tuple[int, ...]
    boundaries: tuple[int, ...]  # pod indexes starting a new namespace (after the first)
    side: int


def layout(pods: Sequence[str], block: int | None = None) -> Layout:
    n = len(pods)
    if block is None:
        block = max(1, min(MAX_BLOCK, TARGET_SIDE // max(n, 1)))
    namespaces = [p.partition("/")[0] for p in pods]
    boundaries = tuple(i for i in range(1, n) if namespaces[i] != namespaces[i - 1])
    starts = []
    offset = 0
    cut = set(boundaries)
    for i in range(n):
        if i in cut:
            offset += 1  # the line
        starts.append(offset)
        offset += block
    return Layout(block, tuple(starts), boundaries, max(offset, 1))


def cell_codes(matrix: Matrix) -> list[bytes]:
    """Per source pod, a palette index per destination (the probes OR-ed)."""
    n = len(matrix.pods)
    rows = [0] * n
    for table in matrix.tables:
        for i, cells in enumerate(table.cells):
            rows[i] |= int.from_bytes(_codes(cells), "big")
    return [row.to_bytes(n, "big") for row in rows]


# True -> ALLOWED, False -> DENIED: applied to bytes(cells) (bools are 0 and 1).
_BOOL_CODES = bytes([DENIED, ALLOWED]) + bytes(254)
_CELL_CODES: dict[bool | None, int] = {True: ALLOWED, False: DENIED, None: NOT_SERVED}


def _codes(cells: Sequence[bool | None]) -> bytes:
    try:
        return bytes(cells).translate(_BOOL_CODES)  # type: ignore[arg-type]
    except TypeError:  # a None: the destination does not serve the port
        return bytes(map(_CELL_CODES.__getitem__, cells))


def heatmap(matrix: Matrix, block: int | None = None) -> bytes:
    """The PNG of the matrix (an empty matrix gives one grey pixel)."""
    place = layout(matrix.pods, block)
    if not matrix.pods:
        return png(1, 1, PALETTE, [bytes([NOT_SERVED])])
    line_pixel = bytes([LINE])
    segments = list(zip((0, *place.boundaries), (*place.boundaries, len(matrix.pods)),
                        strict=True))
    widen = [bytes([code]) * place.block for code in range(len(PALETTE))]
    line_row = line_pixel * place.side
    cut = set(place.boundaries)
    rows: list[bytes] = []
    for i, codes in enumerate(cell_codes(matrix)):
        if place.block > 1:
            codes = b"".join(map(widen.__getitem__, codes))
        b = place.block
        pixels = line_pixel.join(codes[lo * b:hi * b] for lo, hi in segments)
        if i in cut:
            rows.append(line_row)
        rows.extend([pixels] * place.block)
    return png(place.side, place.side, PALETTE, rows)


def png(width: int, height: int, palette: Sequence[tuple[int, int, int]],
        rows: Iterable[bytes]) -> bytes:
    """An 8-bit palette PNG: `rows` are `height` rows of `width` palette indexes."""
    raw = b"".join(b"\x00" + row for row in rows)  # filter type 0 (none) on every row
    if len(raw) != height * (width + 1):
        raise ValueError(f"png: {len(raw)} bytes of rows for {width}x{height} pixels")
    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)
    plte = b"".join(bytes(rgb) for rgb in palette)
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"PLTE", plte) \
        + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data \
        + struct.pack(">I", zlib.crc32(kind + data))
