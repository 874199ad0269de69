"""A reader of the PNGs stockade writes (8-bit palette, no interlace), every chunk's
CRC checked: for tests of the heat-map."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Picture:
    width: int
    height: int
    palette: list[tuple[int, int, int]]
    rows: list[bytes]  # a palette index per pixel

    def at(self, x: int, y: int) -> int:
        return self.rows[y][x]


def read_png(data: bytes) -> Picture:
    assert data[:8] == SIGNATURE, data[:8]
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body), f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data)
    kinds = [k for k, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"PLTE" in kinds, kinds
    width, height, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB",
                                                                        chunks[0][1])
    assert (depth, colour, comp, filt, interlace) == (8, 3, 0, 0, 0)
    plte = dict(chunks)[b"PLTE"]
    palette = [(plte[i], plte[i + 1], plte[i + 2]) for i in range(0, len(plte), 3)]
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(raw) == height * (width + 1)
    rows = [raw[r * (width + 1):(r + 1) * (width + 1)] for r in range(height)]
    assert all(row[0] == 0 for row in rows)  # filter type: none
    return Picture(width, height, palette, [row[1:] for row in rows])
