"""The denied-flow log fed by the eBPF datapath's ring buffer (EventFlowReader)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from stockade.agent.flowlog import DeniedFlow, EventFlowReader
from stockade.datapath.nflog import LoggedPacket


def _packet(prefix: str, src: str = "10.244.0.12") -> LoggedPacket:
    return LoggedPacket(prefix, 4, src, "10.244.0.10", "TCP", 40000, 81, None, None,
                        0x0800, 0x02)


class FakeEvents:
    def __init__(self, batches: list[list[LoggedPacket]]) -> None:
        self.batches = batches
        self.closed = threading.Event()

    def read(self, timeout: float = 0.0) -> list[LoggedPacket]:
        if self.batches:
            return self.batches.pop(0)
        time.sleep(min(timeout, 0.01))
        return []

    def close(self) -> None:
        self.closed.set()


def test_events_are_recorded_counted_and_written_like_nflog_packets(tmp_path: Path) -> None:
    events = FakeEvents([[_packet("stockade-deny i-aaa"), _packet("other")],
                         [_packet("stockade-deny e-bbb", "10.244.0.13")]])
    seen: list[DeniedFlow] = []
    path = tmp_path / "denied-flows.jsonl"
    reader = EventFlowReader(lambda: events, path=str(path), on_record=seen.append)
    reader.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(seen) < 2:
        time.sleep(0.01)
    reader.stop()
    assert events.closed.is_set() and not reader.running and reader.error is None
    items, nxt = reader.since(0, 10)
    assert [i.seq for i in items] == [1, 2] and nxt == 3
    assert [i.record["src"] for i in items] == ["10.244.0.12", "10.244.0.13"]
    assert all(i.record["time"] for i in items)  # stamped on receipt
    stats = reader.stats
    assert (stats.received, stats.recorded, stats.ignored) == (3, 2, 1)
    assert len(seen) == 2 and path.read_text().count("\n") == 2


def test_a_failing_source_stops_the_thread_and_says_why() -> None:
    class Broken(FakeEvents):
        def read(self, timeout: float = 0.0) -> list[LoggedPacket]:
            raise OSError("ring buffer gone")

    reader = EventFlowReader(lambda: Broken([])).start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and reader.running:
        time.sleep(0.01)
    assert reader.error == "reading the denied-connection events: ring buffer gone"
    reader.stop()
