"""engine.heatmap: the PNG is valid (signature, chunks, CRCs, size) and its pixels are
the matrix's verdicts, with a line between namespaces."""

from __future__ import annotations

import pytest
from tests.support.png import read_png

from stockade.engine.heatmap import (
    ALLOWED,
    DENIED,
    LINE,
    MIXED,
    NOT_SERVED,
    PALETTE,
    heatmap,
    layout,
    png,
)
from stockade.engine.matrix import Matrix, MatrixPort, TruthTable

T, F, N = True, False, None
PODS = ("a/p", "a/q", "b/r", "c/s")
TABLES = (
    TruthTable(MatrixPort("TCP", 80), ((T, F, T, F), (T, T, F, F), (F, F, T, T), (T, T, T, T))),
    TruthTable(MatrixPort("TCP", "http"),
               ((T, N, F, F), (T, N, F, F), (F, N, T, T), (T, N, T, T))),
)
# a/p -> b/r: allowed on 80, denied on http: mixed; column a/q serves no http: 80 decides.
EXPECTED = ((ALLOWED, DENIED, MIXED, DENIED), (ALLOWED, ALLOWED, DENIED, DENIED),
            (DENIED, DENIED, ALLOWED, ALLOWED), (ALLOWED, ALLOWED, ALLOWED, ALLOWED))


@pytest.mark.parametrize("block", [1, 3, None])
def test_pixels_are_the_verdicts_with_lines_between_namespaces(block: int | None) -> None:
    picture = read_png(heatmap(Matrix(PODS, TABLES), block))
    rows = picture.rows
    place = layout(PODS, block)
    assert place.boundaries == (2, 3)  # b/r and c/s start new namespaces
    assert picture.width == picture.height == place.side == 4 * place.block + 2
    assert picture.palette == list(PALETTE)
    for i, start_i in enumerate(place.starts):
        for j, start_j in enumerate(place.starts):
            square = {rows[y][x] for y in range(start_i, start_i + place.block)
                      for x in range(start_j, start_j + place.block)}
            assert square == {EXPECTED[i][j]}, (PODS[i], PODS[j])
    for line in (place.starts[2] - 1, place.starts[3] - 1):
        assert set(rows[line]) == {LINE}  # across the picture
        assert {row[line] for row in rows} == {LINE}


def test_one_table_gives_allowed_denied_and_not_served() -> None:
    pods = ("a/p", "a/q")
    table = TruthTable(MatrixPort("TCP", "http"), ((T, N), (F, N)))
    assert read_png(heatmap(Matrix(pods, (table,)), 1)).rows == \
        [bytes([ALLOWED, NOT_SERVED]), bytes([DENIED, NOT_SERVED])]


def test_an_empty_matrix_is_one_pixel() -> None:
    picture = read_png(heatmap(Matrix((), ())))
    assert (picture.width, picture.height) == (1, 1)


def test_png_refuses_rows_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="2x2"):
        png(2, 2, PALETTE, [b"\x00\x01", b"\x00"])


def test_large_clusters_get_one_pixel_per_pair() -> None:
    pods = tuple(f"ns{i // 400}/p{i:04d}" for i in range(2000))
    place = layout(pods)
    assert place.block == 1 and place.side == 2000 + 4
    assert layout(pods[:10]).block == 16  # a small one is scaled up
