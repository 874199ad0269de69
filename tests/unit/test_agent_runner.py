"""The bounded-frequency runner and the nftables event parser."""

from __future__ import annotations

import struct
import threading
import time

import pytest

from stockade.agent.runner import BoundedFrequencyRunner
from stockade.datapath.monitor import NFT_MSG_NEWGEN, parse_events
from stockade.datapath.nfnetlink import NFNL_SUBSYS_NFTABLES, NFPROTO_INET


def test_bursts_coalesce_and_the_periodic_run_happens() -> None:
    calls: list[bool] = []
    done = threading.Event()

    def fn(periodic: bool) -> None:
        calls.append(periodic)
        time.sleep(0.02)
        if len(calls) >= 3:
            done.set()

    r = BoundedFrequencyRunner("t", fn, min_interval=0.2, max_interval=0.6)
    r.start()
    try:
        time.sleep(0.05)  # the first run is the periodic one, at once
        for _ in range(100):
            r.run()  # a burst: one run, not a hundred
        time.sleep(0.35)
        assert calls[:2] == [True, False]
        assert len(calls) == 2
        assert done.wait(2.0)  # then the periodic one comes back by itself
        assert calls[2] is True
    finally:
        r.stop()


def test_a_runner_told_the_work_was_just_done_waits_a_period_for_the_periodic_run() -> None:
    now = [100.0]
    calls: list[bool] = []
    r = BoundedFrequencyRunner("t", calls.append, 0.1, 30.0, clock=lambda: now[0],
                               periodic_first=False)
    assert r._next() == (30.0, True)  # not at once
    now[0] += 30.0
    assert r._next() == (0.0, True)
    r.run()
    assert r._next() == (0.0, False)  # a request is not held back by it
    assert BoundedFrequencyRunner("t", calls.append, 0.1, 30.0,
                                  clock=lambda: now[0])._next() == (0.0, True)


def test_a_steady_stream_of_changes_does_not_put_the_periodic_run_off() -> None:
    """A change's run writes only what changed; the periodic one reads the kernel back
    (tampering is found there). A change every 10 s must not hold the check back."""
    now = [100.0]
    calls: list[bool] = []
    r = BoundedFrequencyRunner("t", calls.append, 0.1, 30.0, clock=lambda: now[0],
                               periodic_first=False)

    def step() -> None:  # one turn of `loop`, with the clock moved to the run
        wait, periodic = r._next()
        now[0] += wait
        r._pending, r._retry_at, r._last = False, None, now[0]
        if periodic:
            r._last_periodic = now[0]
        calls.append(periodic)

    for _ in range(10):  # changes at 110, 120, ... 200
        now[0] += 10.0
        r.run()
        step()
    # due at 130: that change's run goes first, the next is the periodic one
    assert calls == [False, False, False, True, False, False, False, True, False, False]
    # with nothing pending the next is the periodic one, a period after the last
    assert r._next() == (10.0, True)


def test_the_loop_runs_the_periodic_check_under_a_stream_of_changes() -> None:
    calls: list[bool] = []
    r = BoundedFrequencyRunner("t", calls.append, 0.0, 0.3, periodic_first=False)
    r.start()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            r.run()  # a change every 20 ms: far more often than the period
            time.sleep(0.02)
    finally:
        r.stop()
    assert calls.count(True) >= 2, calls.count(True)
    assert calls.count(False) > 10


def test_bad_intervals_are_refused() -> None:
    with pytest.raises(ValueError):
        BoundedFrequencyRunner("t", lambda p: None, min_interval=2, max_interval=1)


def _msg(msg_type: int, family: int, attrs: list[tuple[int, bytes]]) -> bytes:
    body = b""
    for kind, payload in attrs:
        length = 4 + len(payload)
        body += struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)
    nfgen = struct.pack("=BBH", family, 0, 0)
    header = struct.pack("=IHHII", 16 + 4 + len(body), (NFNL_SUBSYS_NFTABLES << 8) | msg_type,
                         0, 0, 0)
    return header + nfgen + body


def test_events_name_the_committing_pid_only_for_batches_touching_our_table() -> None:
    ours = _msg(6, NFPROTO_INET, [(1, b"stockade\0"), (2, b"i-abc\0")])  # NEWRULE
    theirs = _msg(6, NFPROTO_INET, [(1, b"other\0")])
    gen = _msg(NFT_MSG_NEWGEN, 0, [(1, struct.pack("!I", 9)), (2, struct.pack("!I", 4242))])
    assert parse_events(ours + gen, "stockade", False) == (False, [4242])
    assert parse_events(theirs + gen, "stockade", False) == (False, [])
    # a batch split over two datagrams
    touched, pids = parse_events(ours, "stockade", False)
    assert (touched, pids) == (True, [])
    assert parse_events(gen, "stockade", touched) == (False, [4242])
