"""cli/fork.py: shares computed in forked children, and recomputed here when one fails."""

from __future__ import annotations

import os

import pytest

from stockade.cli.fork import fork_map

PARENT = os.getpid()


def test_each_share_is_computed_once_and_in_order() -> None:
    results = fork_map(lambda n: (n * n, os.getpid()), [1, 2, 3, 4])
    assert [r for r, _ in results] == [1, 4, 9, 16]
    pids = [pid for _, pid in results]
    assert pids[0] == PARENT and len(set(pids)) == 4  # the first here, each other apart


@pytest.mark.parametrize("failure", ["raises", "exits", "sends what cannot be pickled"])
def test_a_child_that_fails_has_its_share_computed_here(failure: str) -> None:
    def square(n: int) -> tuple[int, int]:
        if os.getpid() != PARENT and n == 3:
            if failure == "raises":
                raise RuntimeError("lost")
            if failure == "exits":
                os._exit(0)  # before anything is sent: nothing whole arrives
            return (n * n, lambda: None)  # type: ignore[return-value]
        return (n * n, os.getpid())

    results = fork_map(square, [1, 2, 3])
    assert [r for r, _ in results] == [1, 4, 9]
    assert results[2][1] == PARENT and results[1][1] != PARENT


def test_a_failure_here_leaves_no_child_behind() -> None:
    def fail_here(n: int) -> int:
        if os.getpid() == PARENT:
            raise ValueError("here")
        return n

    before = _children()
    with pytest.raises(ValueError, match="here"):
        fork_map(fail_here, [1, 2, 3])
    assert _children() == before


def test_an_exception_a_child_hit_is_raised_here_too() -> None:
    def always(n: int) -> int:
        if n == 2:
            raise KeyError(n)
        return n

    with pytest.raises(KeyError):
        fork_map(always, [1, 2])


def _children() -> set[int]:
    me = str(os.getpid())
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                out.add(int(entry))
    return out
