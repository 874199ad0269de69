"""Benchmark of drift repair: from another process changing the table to repaired.

Where the table cannot be owned (a kernel without persistent tables), any root
process can change it, and the datapath's own loop repairs it: the table
monitor hears the foreign transaction, and a verifying apply restores the
ruleset. This measures, side by side in one run, at 2,000 endpoints by
default, in a private network namespace:

- `nft delete table`, restored from the event (the kernel holds nothing of the
  table: the last ruleset is written back whole, without reading first);
- `nft delete table`, restored after a verifying read-back (what happens
  without the event's account, e.g. a monitor not wired to the datapath);
- `nft flush chain` of a policy chain, and of the base chain (read back, then
  the chain rewritten).

Each time runs from launching `nft` (its own start-up, a few milliseconds, is
included) to the repairing transaction committed; also shown: when the
monitor heard it. The loop is the agent's: the monitor's callback wakes a
worker that takes a snapshot and applies with it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import threading
import time

from common import exit_on_sigterm, pct, print_table
from stockade.compile.ir import Ruleset
from stockade.compile.lower import compile_cluster
from stockade.compile.nft import Table
from stockade.datapath.monitor import TableEvent, TableMonitor
from stockade.datapath.nft import NftDatapath
from stockade.net.namespace import create_netns, remove_netns
from synthetic import make_cluster


class RepairLoop:
    """The agent's loop in small: monitor -> verifying apply, timed."""

    def __init__(self, dp: NftDatapath, rs: Ruleset, events: bool) -> None:
        self.dp, self.rs = dp, rs
        self.wake = threading.Event()
        self.heard: list[float] = []
        self.done: list[float] = []
        self.errors: list[str] = []
        self.monitor = (dp.monitor(self._foreign) if events
                        else TableMonitor(dp.table.name, self._foreign, netns=dp.netns))
        self._stop = False
        self._worker = threading.Thread(target=self._run, daemon=True)

    def _foreign(self) -> None:
        self.heard.append(time.perf_counter())
        self.wake.set()

    def _run(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            if self._stop:
                return
            try:
                snap = self.dp.snapshot(self.rs.chains)
                self.dp.apply(self.rs, verify=snap)
            except Exception as exc:  # a benchmark reports, it does not hide
                self.errors.append(str(exc))
            self.done.append(time.perf_counter())

    def __enter__(self) -> RepairLoop:
        self.monitor.start()
        self._worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self.wake.set()
        self._worker.join()
        self.monitor.stop()


def trial(loop: RepairLoop, host: str, command: str) -> tuple[float, float]:
    """Seconds from launching `nft command` to the monitor hearing it, and to repaired."""
    loop.heard.clear()
    loop.done.clear()
    t0 = time.perf_counter()
    subprocess.run(["ip", "netns", "exec", host, "nft", *command.split()], check=True)
    deadline = time.monotonic() + 30
    while not loop.done and time.monotonic() < deadline:
        time.sleep(0.0005)
    if not loop.done or loop.errors:
        raise SystemExit(f"not repaired after {command!r}: {loop.errors}")
    time.sleep(0.05)  # a straggling second run (events of one batch) settles
    return loop.heard[0] - t0, loop.done[0] - t0


def main() -> None:
    exit_on_sigterm()
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=2_000)
    ap.add_argument("--policies", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    host = f"stkbench-{os.getpid()}"
    create_netns(host)
    rows: list[tuple[str, str, str, str, str]] = []
    try:
        rs = compile_cluster(make_cluster(args.pods, args.policies))
        dp = NftDatapath(Table("stockade"), netns=host, owner=False)
        dp.apply(rs)
        counts = rs.counts()
        chain = max(rs.chains.values(), key=lambda c: len(c.rules)).name
        t_read = min(timed_read(dp, rs) for _ in range(5))
        t_full = min(timed_full(dp, rs, host) for _ in range(3))
        cases: list[tuple[str, bool, str]] = [
            ("delete table, restored from the event (no read)", True,
             "delete table inet stockade"),
            ("delete table, read back first", False, "delete table inet stockade"),
            (f"flush chain {chain[:8]}… ({len(rs.chains[chain].rules)} rules)", True,
             f"flush chain inet stockade {chain}"),
            ("flush chain forward (base chain)", True, "flush chain inet stockade forward"),
        ]
        for name, events, command in cases:
            heard, done = [], []
            with RepairLoop(dp, rs, events) as loop:
                for _ in range(args.rounds):
                    h, d = trial(loop, host, command)
                    heard.append(h)
                    done.append(d)
                    check_repaired(dp, rs)
            rows.append((name, ms(statistics.median(done)), ms(pct(done, 90)),
                         ms(statistics.median(heard)), ""))
        rows.append(("(a verifying read-back of the table alone)", ms(t_read), "", "", ""))
        rows.append(("(the whole ruleset written into an empty table)", ms(t_full), "", "",
                     ""))
    finally:
        remove_netns(host)
    print(f"{args.pods} endpoints, {args.policies} policies: {counts['chains']} chains, "
          f"{counts['rules']} rules, {counts['sets']} sets, {counts['set_elements']} "
          f"elements, {counts['ingress_entries'] + counts['egress_entries']} map entries; "
          f"{args.rounds} rounds each")
    print_table(("from `nft …` to repaired", "median", "p90", "heard (median)", ""), rows)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def timed_read(dp: NftDatapath, rs: Ruleset) -> float:
    t0 = time.perf_counter()
    dp.read_table(rs.chains)
    return time.perf_counter() - t0


def timed_full(dp: NftDatapath, rs: Ruleset, host: str) -> float:
    subprocess.run(["ip", "netns", "exec", host, "nft", "delete", "table", "inet", "stockade"],
                   check=True)
    dp.foreign_change(TableEvent(0, deleted=True))  # as the monitor would say
    t0 = time.perf_counter()
    dp.apply(rs, verify=True)
    return time.perf_counter() - t0


def check_repaired(dp: NftDatapath, rs: Ruleset) -> None:
    kt = dp.read_table(rs.chains)
    if kt is None or kt.needs_repair or not dp.diff(rs).empty:
        raise SystemExit(f"the table was not repaired: {kt.drift if kt else 'missing'}")

if __name__ == "__main__":
    main()
