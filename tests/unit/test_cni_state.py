"""The plugin's state files: atomic records, in the page cache (see StateDir.write)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stockade.cni.state import AttachmentState, StateDir


def test_records_are_replaced_atomically_and_never_synced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A power failure ends the attachment with its record: no fsync waits on the disk."""
    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    states = StateDir(str(tmp_path / "data"), "net1")  # no directory yet
    first = AttachmentState("net1", "ctr1", "eth0", "/run/netns/x", "main", "", "stkh", "stockade")
    states.write(first)  # ADD's first record, before any resource
    assert states.read("ctr1", "eth0") == first
    done = first.done({"cniVersion": "1.1.0", "ips": []})
    states.write(done)
    assert synced == []
    assert states.read("ctr1", "eth0") == done and states.all() == [done]
    assert sorted(p.name for p in states.dir.iterdir()) == ["ctr1:eth0.json"]  # no temporary


def test_locks_make_their_directories(tmp_path: Path) -> None:
    states = StateDir(str(tmp_path / "data"), "net1")
    with states.locked():
        assert (states.dir / ".lock").exists()
    other = StateDir(str(tmp_path / "data2"), "net2")
    with other.bridge_lock("br0"):
        assert (tmp_path / "data2" / "bridge-br0.lock").exists()
