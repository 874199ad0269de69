"""The collector is paused around bulk work and what it built is frozen (heap.py)."""

from __future__ import annotations

import gc
import threading

from stockade.heap import collector_paused, listing


def test_paused_in_every_thread_until_the_last_bulk_work_ends_then_frozen() -> None:
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    inside = threading.Event()
    release = threading.Event()

    def other() -> None:
        with collector_paused():
            inside.set()
            release.wait(5)

    t = threading.Thread(target=other)
    try:
        with collector_paused():
            built = [[i] for i in range(1000)]  # survivors of the bulk work
            t.start()
            assert inside.wait(5)
        assert not gc.isenabled()  # the other thread's work goes on: still paused
        release.set()
        t.join(5)
        assert gc.isenabled()
        assert gc.get_freeze_count() >= frozen + len(built)
    finally:
        release.set()
        gc.unfreeze()
        gc.enable()


def test_a_failure_inside_still_turns_the_collector_back_on() -> None:
    try:
        with collector_paused():
            raise ValueError("bulk work failed")
    except ValueError:
        pass
    try:
        assert gc.isenabled()
    finally:
        gc.unfreeze()


def test_a_transient_read_freezes_nothing_unless_bulk_work_overlapped_it() -> None:
    frozen = gc.get_freeze_count()
    try:
        with collector_paused(freeze=False):
            read = [[i] for i in range(1000)]
            assert not gc.isenabled()
        assert gc.isenabled() and gc.get_freeze_count() == frozen
        with collector_paused(freeze=False):
            with collector_paused():  # bulk work in the middle of the read
                read = [[i] for i in range(1000)]
            assert not gc.isenabled()  # the read's section still holds it off
        assert gc.isenabled() and gc.get_freeze_count() >= frozen + len(read)
    finally:
        gc.unfreeze()
        gc.enable()


def test_a_list_runs_with_the_collector_paused_and_leaves_it_running() -> None:
    try:
        with listing():
            assert not gc.isenabled()
        assert gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()
