"""bench/datapaths.py --interleave: each of the variant's extra measures is taken between two
of the twin pair (no ruleset) and compared with their mean."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def datapaths() -> Iterator[Any]:
    sys.path.insert(0, str(BENCH))
    try:
        import datapaths as module

        yield module
    finally:
        sys.path.remove(str(BENCH))


class Scripted:
    """A pair whose measures are given in advance; every call is logged."""

    def __init__(self, name: str, rates: list[float], log: list[str]) -> None:
        self.name, self.rates, self.log = name, rates, log

    def measure(self, secs: float) -> dict[str, float]:
        self.log.append(self.name)
        rate = self.rates.pop(0)
        return {"gbps": rate, "crr": rate * 1000}


def test_each_measure_is_taken_between_two_of_the_twins_and_against_their_mean(
        datapaths: Any) -> None:
    log: list[str] = []
    twin = Scripted("twin", [10.0, 12.0, 8.0], log)
    pair = Scripted("pair", [11.0, 9.0], log)
    got = datapaths.interleaved(pair, twin, 2, 3.0)
    assert log == ["twin", "pair", "twin", "pair", "twin"]
    assert got == [({"gbps": 11.0, "crr": 11000.0}, {"gbps": 11.0, "crr": 11000.0}),
                   ({"gbps": 10.0, "crr": 10000.0}, {"gbps": 9.0, "crr": 9000.0})]


def test_nothing_is_measured_without_a_twin_or_a_count(datapaths: Any) -> None:
    log: list[str] = []
    pair = Scripted("pair", [1.0], log)
    assert datapaths.interleaved(pair, None, 2, 3.0) == []
    assert datapaths.interleaved(pair, Scripted("twin", [1.0], log), 0, 3.0) == []
    assert log == []
