"""The eBPF datapath against the real kernel, with real packets.

Each test builds three endpoints in its own host namespace (see conftest); the
datapath pins its maps, programs and links under a directory named after that
namespace, and the fixture removes them (and checks they are gone) whatever
happens in the test.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.compile import bpf as bpfc
from stockade.compile.lower import compile_cluster
from stockade.datapath import ebpf, libbpf, open_datapath
from stockade.datapath.ebpf import LAYOUT, EbpfDatapath
from stockade.errors import NetError
from stockade.model.cluster import Cluster, Endpoint
from stockade.model.labels import Labels
from stockade.model.policy import INGRESS, NetworkPolicy, Peer
from stockade.model.policy import Rule as PRule
from stockade.model.selector import Selector
from stockade.net.namespace import entered
from stockade.net.sysctl import write_sysctl
from stockade.probe.client import Probe, run_probes
from stockade.probe.launcher import ProbeServer

from . import clusters
from .clusters import A_ONLY_FROM_B, PORTS, allow_only, cluster, denied, probe
from .clusters import servers as servers  # the fixture
from .ebpf_pins import ebpf_datapath
from .netio import echo

pytestmark = pytest.mark.privileged

@pytest.fixture
def datapath(trio) -> Iterator[EbpfDatapath]:
    with ebpf_datapath(trio, log_group=1) as dp:
        yield dp


def test_loads_attaches_and_enforces_v4_and_v6(trio, datapath, servers) -> None:
    assert probe(trio, [("c", "a", PORTS[0])]) == {("c", "a", "TCP/80"): True}
    rs = compile_cluster(cluster(trio, allow_only("a", "b")))
    delta = datapath.apply(rs)
    assert not delta.empty
    pins = set(os.listdir(datapath.dir))
    assert {"ipcache4", "ipcache6", "policy", "ct", "events", "meta", "config",
            "prog_from_pod", "prog_to_pod"} <= pins
    assert len([p for p in pins if p.startswith("link-")]) == 6  # 3 veths x 2 hooks
    for family in (4, 6):
        assert denied(trio, family) == A_ONLY_FROM_B, family
    assert datapath.stats()["denied"] > 0


def test_an_apply_switches_slots_and_leaves_both_equal(trio, datapath) -> None:
    """The atomic switch: the new policy is written to the other slot, then flipped to."""
    kernel = datapath.snapshot().table
    slot = kernel.slot
    datapath.apply(compile_cluster(cluster(trio, allow_only("a", "b"))))
    kernel = datapath.snapshot().table
    assert kernel.slot == 1 - slot and kernel.generation >= 1
    state0 = bpfc.decode(kernel.slots[0], kernel.meta, 0)
    state1 = bpfc.decode(kernel.slots[1], kernel.meta, 1)
    assert state0 == state1 and state0.policy
    gen = kernel.generation
    datapath.apply(compile_cluster(cluster(trio, allow_only("a", "b"))))  # no change
    assert datapath.snapshot().table.generation == gen  # no switch, no re-judging


def _runs(dp: EbpfDatapath) -> list[int]:
    """Each CPU's count of runs started and ended (`inflight`)."""
    return list(dp._runs(ebpf._possible_cpus()))


def _set_runs(dp: EbpfDatapath, counts: list[int]) -> None:
    libbpf.update(dp._maps["inflight"], struct.pack("=I", 0),
                  struct.pack(f"={len(counts)}Q", *counts))


def _slots_equal(dp: EbpfDatapath) -> bool:
    """Whether both slots hold the same policy, read from the maps directly (an apply
    in another thread holds the datapath's lock)."""
    slots = ebpf._split({m: libbpf.dump(dp._maps[m], *LAYOUT[m]) for m in bpfc.MAPS})
    meta = libbpf.dump(dp._maps["meta"], *LAYOUT["meta"])
    return bpfc.decode(slots[0], meta, 0) == bpfc.decode(slots[1], meta, 1)


def test_judgements_are_counted_as_they_start_and_end(trio, datapath, servers) -> None:
    datapath.apply(compile_cluster(cluster(trio, allow_only("a", "b"))))
    before = _runs(datapath)
    assert probe(trio, [("b", "a", PORTS[0]), ("c", "a", PORTS[0])]) == {
        ("b", "a", "TCP/80"): True, ("c", "a", "TCP/80"): False}
    after = _runs(datapath)
    # each new connection was judged (its first packet, both ends' programs): two bumps
    # a judgement, none left odd
    assert sum(after) - sum(before) >= 2 * 3
    assert all(n % 2 == 0 for n in after), after


def _quiet(trio, dp: EbpfDatapath, settle: float = 1.0, limit: float = 20.0) -> float:
    """Wait until no program has run for `settle` seconds; the seconds it took.

    Fresh namespaces talk for their first seconds (IPv6 duplicate address detection,
    router solicitations every four seconds, MLD reports), and every frame runs a
    program: the solicitations are turned off on every interface so that this ends
    sooner. Never quiet within `limit`: the test fails, saying so.
    """
    for ep in trio.all:
        write_sysctl(f"net.ipv6.conf.{ep.ifname}.router_solicitations", 0, ep.netns)
        write_sysctl(f"net.ipv6.conf.{ep.host_ifname}.router_solicitations", 0,
                     trio.host_netns)
    write_sysctl(f"net.ipv6.conf.{trio.plumber.bridge}.router_solicitations", 0,
                 trio.host_netns)
    t0 = last = time.monotonic()
    counts = _runs(dp)
    while time.monotonic() - last < settle:
        if time.monotonic() - t0 > limit:
            pytest.fail(f"the programs never stopped running for {settle} s in {limit} s")
        time.sleep(0.05)
        now = _runs(dp)
        if now != counts:
            counts, last = now, time.monotonic()
    return time.monotonic() - t0


def test_a_switch_waits_for_a_run_in_flight_and_for_no_other(trio, datapath, monkeypatch
                                                             ) -> None:
    """A CPU's count left odd is a run that may still read the old slot: the apply has
    flipped but does not bring the old slot up to date until that count moves.

    The namespaces are let fall quiet first: a real packet on that CPU would move the
    count and end the wait before it is seen (it did in a full run, on every attempt,
    when the change came right after the namespaces were made)."""
    datapath.apply(compile_cluster(cluster(trio, allow_only("a", "b"))))
    assert datapath.waits["runs"] == 1  # the first apply's switch waited for none
    monkeypatch.setattr(ebpf, "RUN_WAIT", 30.0)
    _quiet(trio, datapath)
    counts = _runs(datapath)
    cpu = counts.index(min(counts))
    counts[cpu] += 1  # a run that has started and not ended
    _set_runs(datapath, counts)
    slot = datapath._config()[0]
    done = threading.Event()
    failed: list[BaseException] = []

    def change() -> None:
        try:
            datapath.apply(compile_cluster(cluster(trio, allow_only("a", "c"))))
        except BaseException as exc:
            failed.append(exc)
        done.set()

    worker = threading.Thread(target=change)
    worker.start()
    try:
        deadline = time.monotonic() + 5
        while datapath._config()[0] == slot and time.monotonic() < deadline:
            time.sleep(0.005)
        assert datapath._config()[0] == 1 - slot  # flipped
        # waiting, the old slot still the old policy, until the count moves
        assert not done.wait(0.3), f"the wait ended: counts {counts} -> {_runs(datapath)}"
        assert _runs(datapath)[cpu] == counts[cpu]
        assert not _slots_equal(datapath)
    finally:
        counts = _runs(datapath)
        counts[cpu] += 1  # the run ends
        _set_runs(datapath, counts)
        worker.join(10)
    assert not worker.is_alive() and not failed, failed
    assert datapath.waits == {"runs": 2, "grace": 0}
    assert _slots_equal(datapath)


def test_a_count_that_does_not_move_falls_back_to_a_grace_period(trio, datapath,
                                                                 monkeypatch) -> None:
    datapath.apply(compile_cluster(cluster(trio, allow_only("a", "b"))))
    monkeypatch.setattr(ebpf, "RUN_WAIT", 0.05)
    counts = _runs(datapath)
    _set_runs(datapath, [n | 1 for n in counts])  # every CPU odd, for good
    try:
        t0 = time.monotonic()
        datapath.apply(compile_cluster(cluster(trio, allow_only("a", "c"))))
        assert time.monotonic() - t0 >= 0.05
        assert datapath.waits["grace"] == 1
        assert _slots_equal(datapath)
    finally:
        _set_runs(datapath, [(n | 1) + 1 for n in counts])


def test_a_new_object_adopts_the_pins_with_an_empty_delta(trio, datapath, servers) -> None:
    rs = compile_cluster(cluster(trio, allow_only("a", "b")))
    datapath.apply(rs)
    datapath.close()
    again = EbpfDatapath(netns=trio.host_netns, log_group=1)
    assert again.diff(rs).empty
    assert again.apply(rs).empty
    assert again.last_timing["entries"] == 0
    assert again.last_drift is None
    assert denied(trio) == A_ONLY_FROM_B


def _no_load(*_: object) -> None:
    raise AssertionError("the object was loaded again")


def test_a_new_object_takes_this_builds_pins_without_loading(trio, datapath, servers,
                                                             monkeypatch) -> None:
    """The pins say which build the programs are (`built-<digest>-<tags>`): a new process
    of the same build takes them as they are, without the verifier's third of a second."""
    rs = compile_cluster(cluster(trio, allow_only("a", "b")))
    datapath.apply(rs)
    datapath.close()
    assert len([e for e in os.listdir(datapath.dir) if e.startswith("built-")]) == 1
    monkeypatch.setattr(libbpf, "load_object", _no_load)
    again = EbpfDatapath(netns=trio.host_netns, log_group=1)
    assert again.apply(rs, verify=True).empty and again.last_drift is None
    assert again._prog_ids == datapath._prog_ids
    assert denied(trio) == A_ONLY_FROM_B


def test_the_maps_are_read_ahead_once_and_read_again_after_an_apply(trio, datapath, servers,
                                                                   monkeypatch) -> None:
    """`prefetch` reads the pinned maps on a thread of its own (the agent starts it before
    it loads its store); the next snapshot takes that read, once. An apply in between
    makes the snapshot read again."""
    rs = compile_cluster(cluster(trio, allow_only("a", "b")))
    datapath.apply(rs)
    datapath.close()
    again = EbpfDatapath(netns=trio.host_netns, log_group=1)
    reads: list[ebpf.EbpfKernel] = []
    read_kernel = again._read_kernel

    def counted() -> ebpf.EbpfKernel:
        reads.append(read_kernel())
        return reads[-1]

    monkeypatch.setattr(again, "_read_kernel", counted)
    again.prefetch()
    thread = again._ahead._thread
    assert thread is not None
    again.prefetch()  # under way: no second read
    assert again._ahead._thread is thread
    taken = again.snapshot()
    assert len(reads) == 1 and taken.table is reads[0]
    assert again.snapshot().table == taken.table and len(reads) == 2  # taken once
    assert again.apply(rs, verify=taken).empty and again.last_drift is None
    again.prefetch()
    assert again._ahead._thread is not None
    again._ahead._thread.join()
    assert len(reads) == 3
    again.apply(compile_cluster(cluster(trio, allow_only("b", "a"))))
    fresh = again.snapshot()
    assert len(reads) == 4 and fresh.table is reads[3] and fresh.table != reads[2]
    assert again.apply(rs, verify=fresh).empty is False and again.last_drift is None
    assert denied(trio) == A_ONLY_FROM_B


@pytest.mark.parametrize("damage", ["swapped", "unmarked", "map unpinned"])
def test_pins_that_are_not_this_build_are_loaded_again(trio, datapath, servers, monkeypatch,
                                                       damage: str) -> None:
    """A program pin holding another program (its tag is not the marked one), a lost
    marker, a map pin gone: the object is loaded, the programs put right and relinked,
    and the marker written again."""
    rs = compile_cluster(cluster(trio, allow_only("a", "b")))
    datapath.apply(rs)
    right = {h: libbpf.prog_id_tag(fd)[1] for h, fd in datapath._progs.items()}
    if damage == "swapped":  # the egress program pinned under the ingress name
        os.unlink(datapath.dir / "prog_from_pod")
        libbpf.obj_pin(datapath._progs["out"], str(datapath.dir / "prog_from_pod"))
    elif damage == "unmarked":
        for e in os.listdir(datapath.dir):
            if e.startswith("built-"):
                os.rmdir(datapath.dir / e)
    else:
        os.unlink(datapath.dir / "stats")
    datapath.close()
    loads = []
    real = libbpf.load_object
    monkeypatch.setattr(libbpf, "load_object", lambda *a: loads.append(a) or real(*a))
    again = EbpfDatapath(netns=trio.host_netns, log_group=1)
    again.apply(rs, verify=True)
    assert len(loads) == 1
    assert {h: libbpf.prog_id_tag(fd)[1] for h, fd in again._progs.items()} == right
    assert again.skeleton_intact()
    assert len([e for e in os.listdir(again.dir) if e.startswith("built-")]) == 1
    assert denied(trio) == A_ONLY_FROM_B
    again.close()


@pytest.mark.parametrize("batch", [1, 3, 8192])
def test_maps_are_read_back_in_batches_entry_for_entry(trio, datapath, monkeypatch,
                                                       batch: int) -> None:
    """The read-back takes BPF_MAP_LOOKUP_BATCH (tries and hash), across batch
    boundaries and hash buckets larger than a batch, and reads what key by key reads."""
    datapath.apply(compile_cluster(cluster(trio, allow_only("a", "b"))))
    # 2,000 made-up connections: in 131,072 buckets, some bucket holds two (a batch of
    # one must then grow instead of ending the read)
    ksize, vsize = LAYOUT["ct"]
    fake = [os.urandom(ksize) for _ in range(2000)]
    made_up = set(fake)
    libbpf.update_batch(datapath._maps["ct"], fake, [bytes(vsize)] * len(fake), ksize, vsize)
    by_key: dict[str, dict[bytes, bytes]] = {}
    for m in (*bpfc.MAPS, "meta", "ct"):
        fd = datapath._maps[m]
        by_key[m] = {k: v for k in libbpf.keys(fd, LAYOUT[m][0])
                     if (v := libbpf.lookup(fd, k, LAYOUT[m][1])) is not None}
    assert sum(map(len, by_key.values())) > 3 * batch or batch > 3

    def key_by_key(*_: object) -> None:
        raise AssertionError("read key by key")

    monkeypatch.setattr(libbpf, "_BATCH", batch)
    monkeypatch.setattr(libbpf, "keys", key_by_key)
    for m in (*bpfc.MAPS, "meta", "ct"):
        got = libbpf.dump(datapath._maps[m], *LAYOUT[m])
        if m == "ct":
            # the namespaces' own packets (MLD reports to ff02::16, router solicitations)
            # add connections between the two reads: compare the made-up ones
            got, by_key[m] = ({k: v for k, v in d.items() if k in made_up}
                              for d in (got, by_key[m]))
        assert got == by_key[m], m
    assert by_key["policy"] and by_key["ipcache4"] and by_key["ipcache6"] and by_key["meta"]
    assert len(by_key["ct"]) == len(made_up)  # the pins go with the fixture


def test_enforcement_survives_kill_9_and_is_adopted(trio, datapath, servers) -> None:
    script = (
        "import os, sys\n"
        "from stockade.compile.lower import compile_cluster\n"
        "from stockade.datapath.ebpf import EbpfDatapath\n"
        "from stockade.model.cluster import Cluster\n"
        "import pickle\n"
        "rs = pickle.loads(sys.stdin.buffer.read())\n"
        f"EbpfDatapath(netns={trio.host_netns!r}, log_group=1).apply(rs)\n"
        "os.kill(os.getpid(), 9)\n")
    import pickle

    rs = compile_cluster(cluster(trio, allow_only("a", "b")))
    run = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(rs),
                         capture_output=True, check=False)
    assert run.returncode == -9, run.stderr.decode()
    assert denied(trio) == A_ONLY_FROM_B
    again = EbpfDatapath(netns=trio.host_netns)
    assert again.diff(rs).empty
    assert again.apply(rs, verify=True).empty and again.last_drift is None


def test_a_deleted_map_entry_is_drift_and_repaired(trio, datapath, servers) -> None:
    rs = compile_cluster(cluster(trio, allow_only("a", "b")))
    datapath.apply(rs)
    assert datapath.verify_quietly()  # the agent's periodic check: nothing to repair
    # an outsider deletes a's ipcache entry from both slots: a is no longer isolated
    fd = libbpf.obj_get(str(datapath.dir / "ipcache4"))
    try:
        for slot in (0, 1):
            key = bpfc.IP4_KEY.pack(40, slot, bytes(map(int, trio.a.address4.split("."))))
            libbpf.delete(fd, key)
    finally:
        os.close(fd)
    assert probe(trio, [("c", "a", PORTS[0])]) == {("c", "a", "TCP/80"): True}  # a hole
    assert not datapath.verify_quietly()
    assert not datapath.diff(rs).empty
    assert datapath.apply(rs).empty  # without verify, the last apply is trusted
    assert not datapath.apply(rs, verify=True).empty
    assert datapath.last_drift is not None
    assert any("ipcache4" in d for d in datapath.last_drift_details)
    assert datapath.diff(rs).empty and datapath.verify_quietly()
    assert probe(trio, [("c", "a", PORTS[0])]) == {("c", "a", "TCP/80"): False}
    # a deleted policy entry: seen by the byte comparison, repaired
    fd = libbpf.obj_get(str(datapath.dir / "policy"))
    try:
        for key in list(libbpf.keys(fd, LAYOUT["policy"][0])):
            libbpf.delete(fd, key)
    finally:
        os.close(fd)
    assert probe(trio, [("b", "a", PORTS[0])]) == {("b", "a", "TCP/80"): False}
    assert not datapath.verify_quietly()
    datapath.apply(rs, verify=True)
    assert any(d.startswith("policy slot") for d in datapath.last_drift_details)
    assert probe(trio, [("b", "a", PORTS[0])]) == {("b", "a", "TCP/80"): True}
    # foreign entries, even of no slot, and a damaged meta map: removed, rewritten
    fd = libbpf.obj_get(str(datapath.dir / "ipcache4"))
    try:
        libbpf.update(fd, bpfc.IP4_KEY.pack(40, 7, bytes([10, 9, 9, 9])), bytes(12))
    finally:
        os.close(fd)
    fd = libbpf.obj_get(str(datapath.dir / "meta"))
    try:
        key = next(iter(libbpf.keys(fd, LAYOUT["meta"][0])))
        libbpf.update(fd, key, bpfc.META_VALUE.pack(3, b"{{{"))
    finally:
        os.close(fd)
    assert not datapath.verify_quietly()
    assert not datapath.apply(rs, verify=True).empty  # the meta could not be read back
    assert any("meta" in d for d in datapath.last_drift_details)
    assert any("foreign" in d for d in datapath.last_drift_details)
    assert datapath.apply(rs, verify=True).empty and datapath.last_drift is None
    assert datapath.verify_quietly()
    assert probe(trio, [("b", "a", PORTS[0]), ("c", "a", PORTS[0])]) == {
        ("b", "a", "TCP/80"): True, ("c", "a", "TCP/80"): False}


def test_the_quiet_check_reads_while_changes_go_on_and_judges_all_they_did_not_write(
        trio, datapath, servers, monkeypatch) -> None:
    """The agent's periodic check reads the maps without the datapath's lock: an apply
    that lands in the middle of the read is no drift, and the keys it did not write are
    still judged (an outsider's entry is found)."""
    ab = compile_cluster(cluster(trio, allow_only("a", "b")))
    ac = compile_cluster(cluster(trio, allow_only("a", "c")))
    datapath.apply(ab)
    real = libbpf.dump
    changes = [ac]  # applied by the next read, once it has read its first map

    def dump(fd: int, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = real(fd, *args, **kwargs)
        if changes:  # ipcache4 read as it was; the change lands before the rest
            change = threading.Thread(target=datapath.apply, args=(changes.pop(),))
            change.start()
            change.join(timeout=30)
            assert not change.is_alive(), "the check held the apply back"
        return out

    monkeypatch.setattr(libbpf, "dump", dump)
    assert datapath.verify_quietly() and not changes
    assert probe(trio, [("c", "a", PORTS[0]), ("b", "a", PORTS[0])]) == {
        ("c", "a", "TCP/80"): True, ("b", "a", "TCP/80"): False}  # the change is in force
    fd = libbpf.obj_get(str(datapath.dir / "ipcache4"))
    try:  # an outsider's entry, of a key no apply writes
        libbpf.update(fd, bpfc.IP4_KEY.pack(40, 0, bytes([10, 9, 9, 9])), bytes(12))
    finally:
        os.close(fd)
    changes.append(ab)
    assert not datapath.verify_quietly() and not changes
    datapath.apply(ab, verify=True)
    assert any("ipcache4 slot 0" in d and "1 foreign" in d
               for d in datapath.last_drift_details), datapath.last_drift_details
    monkeypatch.setattr(libbpf, "dump", real)
    assert datapath.verify_quietly()


def test_a_detached_program_is_drift_and_reattached(trio, datapath, servers) -> None:
    rs = compile_cluster(cluster(trio, allow_only("a", "b")))
    datapath.apply(rs)
    # both hooks judge both sides: only with every link gone is there a hole
    links = [p for p in os.listdir(datapath.dir) if p.startswith("link-")]
    for pin in links:
        fd = libbpf.obj_get(str(datapath.dir / pin))
        try:
            libbpf.link_detach(fd)  # what `bpftool link detach` does
        finally:
            os.close(fd)
    assert probe(trio, [("c", "a", PORTS[0])]) == {("c", "a", "TCP/80"): True}  # a hole
    # An apply asks the kernel only about ports come or gone (at 100 ports, asking about
    # each link took 4.7 ms an apply); the check the agent polls every second sees it,
    # and the verifying apply it then runs repairs it.
    assert datapath.apply(rs).empty and datapath.last_drift is None
    assert not datapath.skeleton_intact() and not datapath.verify_quietly()
    assert datapath.apply(rs, verify=True).empty
    assert datapath.last_drift is not None
    assert len([d for d in datapath.last_drift_details if "detached" in d]) == 6
    assert probe(trio, [("c", "a", PORTS[0])]) == {("c", "a", "TCP/80"): False}
    # an unpinned link goes away with its last reference: missing, attached again
    for pin in links:
        os.unlink(datapath.dir / pin)
    assert not datapath.verify_quietly()
    datapath.apply(rs, verify=True)
    assert len([d for d in datapath.last_drift_details if "no link" in d]) == 6
    assert datapath.skeleton_intact()
    assert probe(trio, [("c", "a", PORTS[0])]) == {("c", "a", "TCP/80"): False}
    assert len([p for p in os.listdir(datapath.dir) if p.startswith("link-")]) == 6


def test_the_link_check_holds_no_change_back_unless_something_looks_wrong(
        trio, datapath) -> None:
    # The agent polls the check every second; under the datapath's lock it would
    # hold every change back for as long as it asks about each port's links.
    datapath.apply(compile_cluster(cluster(trio, allow_only("a", "b"))))
    answers: list[bool] = []

    def check() -> None:
        answers.append(datapath.skeleton_intact())

    with datapath._lock:  # an apply under way
        asked = threading.Thread(target=check)
        asked.start()
        asked.join(10)
        assert answers == [True]
        pin = next(p for p in os.listdir(datapath.dir) if p.startswith("link-"))
        fd = libbpf.obj_get(str(datapath.dir / pin))
        try:
            libbpf.link_detach(fd)
        finally:
            os.close(fd)
        # what looks wrong is asked again once the apply is done (it may have been
        # halfway through that port)
        asked = threading.Thread(target=check)
        asked.start()
        asked.join(0.5)
        assert asked.is_alive() and answers == [True]
    asked.join(10)
    assert answers == [True, False]


def test_the_pin_directory_removed_is_made_again_and_everything_pinned(
        trio, datapath, servers) -> None:
    # `rm -rf` of the pins under a running process: the links, held by their pins
    # alone, go once the kernel releases them (every port open), and the next apply
    # must put everything back, not fail on the missing directory.
    rs = compile_cluster(cluster(trio, allow_only("a", "b")))
    datapath.apply(rs)
    names = sorted(os.listdir(datapath.dir))
    shutil.rmtree(datapath.dir)
    assert not datapath.skeleton_intact()
    datapath.apply(rs)
    assert any("directory" in d for d in datapath.last_drift_details)
    assert probe(trio, [("b", "a", PORTS[0]), ("c", "a", PORTS[0])]) == {
        ("b", "a", "TCP/80"): True, ("c", "a", "TCP/80"): False}
    assert datapath.skeleton_intact()
    assert sorted(os.listdir(datapath.dir)) == names
    assert datapath.apply(rs, verify=True).empty and datapath.last_drift is None
    # the same found by a reading apply (the periodic resync, a foreign change)
    shutil.rmtree(datapath.dir)
    datapath.apply(rs, verify=True)
    assert any("directory" in d for d in datapath.last_drift_details)
    assert probe(trio, [("b", "a", PORTS[0]), ("c", "a", PORTS[0])]) == {
        ("b", "a", "TCP/80"): True, ("c", "a", "TCP/80"): False}
    assert sorted(os.listdir(datapath.dir)) == names
    assert datapath.apply(rs, verify=True).empty and datapath.last_drift is None


def test_bpffs_unmounted_under_a_running_process_is_mounted_and_pinned_again(
        tmp_path: Path, host_netns: str) -> None:
    # A bpffs of the test's own (the machine's stays mounted): unmounted, the pins go
    # with it and the directory's path lies on the file system below, where nothing
    # can be pinned; the next apply mounts bpffs again and pins everything there.
    root = tmp_path / "bpf"
    root.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(root)], check=True)
    dp = EbpfDatapath("pins", netns=host_netns, pin_root=root)
    try:
        a, b = (Endpoint("x", n, Labels({"pod": n}), (f"10.9.0.{i}",))
                for i, n in ((1, "a"), (2, "b")))
        rs = compile_cluster(Cluster((clusters.namespace("x"),), (a, b),
                                     (allow_only("a", "b"),)))
        dp.apply(rs)
        names = sorted(os.listdir(dp.dir))
        subprocess.run(["umount", "-l", str(root)], check=True)
        assert not dp.dir.exists()
        dp.apply(rs)
        assert any("directory" in d for d in dp.last_drift_details)
        assert sorted(os.listdir(dp.dir)) == names and dp.skeleton_intact()
        assert dp.apply(rs, verify=True).empty and dp.last_drift is None
    finally:
        dp.remove()
        subprocess.run(["umount", "-l", str(root)], check=False)


def test_new_ports_are_attached_on_the_next_apply(trio, datapath, servers, spec_for) -> None:
    rs = compile_cluster(cluster(trio, allow_only("a", "b")))
    datapath.apply(rs)
    d = trio.plumber.ensure_endpoint(spec_for("x/d", 20))
    datapath.apply(rs)
    assert len([p for p in os.listdir(datapath.dir) if p.startswith("link-")]) == 8
    with ProbeServer({d.netns: PORTS[:1]}):
        probes = [Probe("d", d.netns, "a", trio.a.address4, PORTS[0]),
                  Probe("d", d.netns, "b", trio.b.address4, PORTS[0])]
        got = {v.probe.dst: v.allowed for v in run_probes(probes, timeout=0.8)}
    assert got == {"a": False, "b": True}
    trio.plumber.remove_endpoint("x/d")
    datapath.apply(rs)
    assert len([p for p in os.listdir(datapath.dir) if p.startswith("link-")]) == 6


def test_established_connections_survive_unrelated_changes_and_revoked_ones_are_cut(
        trio, datapath) -> None:
    with clusters.across_an_unrelated_change(trio, datapath) as (conn, _):
        deny = NetworkPolicy("x", "deny-a", Selector(Labels({"pod": "a"})),
                             policy_types=(INGRESS,))
        datapath.apply(compile_cluster(cluster(trio, deny)))
        assert not echo(conn, b"three")
        assert datapath.stats()["cut"] >= 1


def test_ipblock_except_and_egress(trio, datapath, servers) -> None:
    datapath.apply(compile_cluster(cluster(trio, clusters.egress_to_block_except_c(trio))))
    assert probe(trio, clusters.EGRESS_PAIRS) == clusters.EGRESS_SEEN


def test_denied_connections_reach_the_ring_buffer(trio, datapath, servers) -> None:
    rs = compile_cluster(cluster(trio, allow_only("a", "b")))
    datapath.apply(rs)
    events = datapath.events()
    try:
        events.read()  # whatever came before
        probe(trio, [("c", "a", PORTS[0])])
        got = []
        deadline = time.monotonic() + 2
        while not got and time.monotonic() < deadline:
            got = [p for p in events.read(0.2) if p.dport == 80 and p.protocol == "TCP"]
    finally:
        events.close()
    assert got
    packet = got[0]
    assert (packet.src, packet.dst, packet.family) == (trio.c.address4, trio.a.address4, 4)
    assert packet.direction == "ingress" and packet.chain == rs.ingress[trio.a.address4]
    assert packet.sport is not None and packet.timestamp is not None
    assert abs(packet.timestamp - time.time()) < 60


def test_remove_detaches_and_unpins_everything(trio, datapath, servers) -> None:
    datapath.apply(compile_cluster(cluster(trio, allow_only("a", "b"))))
    datapath.remove()
    assert not datapath.dir.exists()
    assert denied(trio) == set()
    assert not Path("/sys/fs/bpf/stockade", f"netns-{trio.host_netns}").exists()


def test_open_datapath_names_it_and_reading_nothing_creates_nothing() -> None:
    dp = open_datapath("ebpf", "other", netns="nowhere")
    assert isinstance(dp, EbpfDatapath)
    assert dp.dir.name == "other" and dp.dir.parent.name == "netns-nowhere"
    assert dp.read() == bpfc.ruleset_of(bpfc.BpfState()) and dp.show() == ""
    dp.prefetch()  # nothing pinned: nothing read ahead, nothing made
    assert dp._ahead.take() is None
    assert not dp.dir.exists()
    with pytest.raises(NetError, match="'nowhere' does not exist"):
        dp.check()  # it would pin maps for it: refused before anything is made
    assert not dp.dir.parent.exists()


def test_the_clsact_fallback_enforces_and_is_removed(trio, servers) -> None:
    """Where tcx is missing (Linux < 6.6) the program goes on clsact filters (over rtnetlink)."""
    dp = EbpfDatapath("fallback", netns=trio.host_netns, attach="clsact")
    try:
        dp.check()
        rs = compile_cluster(cluster(trio, allow_only("a", "b")))
        dp.apply(rs)
        assert not [p for p in os.listdir(dp.dir) if p.startswith("link-")]
        assert denied(trio) == A_ONLY_FROM_B
        assert dp.skeleton_intact()
        # another filter on the hook, at a priority not stockade's, is not stockade's
        # to judge (the check reads only its own priority)
        with entered(trio.host_netns):  # `ip netns exec` would hide bpffs
            out = subprocess.run(["tc", "filter", "add", "dev", trio.b.host_ifname, "ingress",
                                  "pref", "7", "bpf", "direct-action", "object-pinned",
                                  str(dp.dir / "prog_from_pod")],
                                 capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr
        try:
            assert dp.skeleton_intact()
        finally:
            with entered(trio.host_netns):
                subprocess.run(["tc", "filter", "del", "dev", trio.b.host_ifname, "ingress",
                                "pref", "7"], capture_output=True, check=True)
        # a deleted filter is found by the check the agent polls (the filters read over
        # netlink) and by a verifying apply, which puts it back
        out = subprocess.run(["ip", "netns", "exec", trio.host_netns, "tc", "filter", "del",
                              "dev", trio.a.host_ifname, "egress", "pref", str(dp._pref)],
                             capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr
        assert not dp.skeleton_intact()
        dp.apply(rs, verify=True)
        assert dp.skeleton_intact()
        assert dp.last_drift is not None
        assert denied(trio) == A_ONLY_FROM_B
        # a new process finds the mode among the pins and adopts
        again = EbpfDatapath("fallback", netns=trio.host_netns)
        assert again.apply(rs, verify=True).empty and again.last_drift is None
        # the pins removed under it: made again with the mode, which the next finds
        names = sorted(os.listdir(dp.dir))
        shutil.rmtree(dp.dir)
        again.apply(rs)
        assert sorted(os.listdir(dp.dir)) == names
        assert denied(trio) == A_ONLY_FROM_B
        third = EbpfDatapath("fallback", netns=trio.host_netns)
        assert third.apply(rs, verify=True).empty and third.last_drift is None
        assert not [p for p in os.listdir(dp.dir) if p.startswith("link-")]
    finally:
        EbpfDatapath("fallback", netns=trio.host_netns).remove()
    assert not dp.dir.exists()
    assert denied(trio) == set()


def _ping(netns: str, dst: str, ident: int) -> bool:
    """One ICMP echo over a raw socket in `netns`; whether its reply came back."""
    with entered(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        sock.settimeout(0.5)
        body = struct.pack(">BBHHH", 8, 0, 0, ident, 1) + b"stockade"
        total = sum(struct.unpack(f">{len(body) // 2}H", body))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        body = body[:2] + struct.pack(">H", ~total & 0xFFFF) + body[4:]
        sock.sendto(body, (dst, 0))
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            try:
                data, (src, _) = sock.recvfrom(1500)
            except OSError:
                return False
            icmp = data[(data[0] & 0xF) * 4:]
            if src == dst and icmp[0] == 0 and struct.unpack(">H", icmp[4:6])[0] == ident:
                return True
        return False
    finally:
        sock.close()


def test_icmp_is_judged_like_nftables(trio, datapath) -> None:
    """Echo requests are new flows (a rule without protocol matches them, a TCP rule
    does not); replies pass through conntrack."""
    datapath.apply(compile_cluster(cluster(trio, allow_only("a", "b"))))
    assert not _ping(trio.c.netns, trio.a.address4, 7)  # a admits only TCP/80 from b
    assert _ping(trio.a.netns, trio.c.address4, 8)  # c is not isolated; the reply passes
    anything = NetworkPolicy("x", "from-c", Selector(Labels({"pod": "a"})),
                             ingress=(PRule((), (Peer(pod_selector=Selector(
                                 Labels({"pod": "c"}))),)),), policy_types=(INGRESS,))
    datapath.apply(compile_cluster(cluster(trio, allow_only("a", "b"), anything)))
    assert _ping(trio.c.netns, trio.a.address4, 9)


def test_maps_of_another_layout_are_refused_and_left_alone(host_netns: str) -> None:
    """Maps an older version pinned (a 12-byte ipcache value, before tiers' stages)
    cannot be reused: a clear error names them, nothing is touched, and `dataplane
    remove` clears the way."""
    from stockade.cli.main import main
    from stockade.errors import DataplaneError

    dp = EbpfDatapath("old", netns=host_netns)
    try:
        dp.dir.mkdir(parents=True, mode=0o700)
        old = dp.dir / "ipcache4"
        subprocess.run(["bpftool", "map", "create", str(old), "type", "lpm_trie", "key", "12",
                        "value", "12", "entries", "16", "name", "ipcache4", "flags", "1"],
                       check=True, capture_output=True)
        with pytest.raises(DataplaneError, match=r"another version.*ipcache4 has 12-byte keys "
                           r"and 12-byte values, this version needs 12 and 28"):
            dp.check()
        fd = libbpf.obj_get(str(old))
        assert libbpf.map_layout(fd) == (12, 12)  # still the old map
        os.close(fd)
        assert sorted(os.listdir(dp.dir)) == ["ipcache4"]  # nothing else loaded or pinned
        assert main(["dataplane", "remove", "--datapath", "ebpf", "--table", "old",
                     "--netns", host_netns]) == 0
        assert not dp.dir.exists()
        EbpfDatapath("old", netns=host_netns).check()  # then a fresh start works
    finally:
        EbpfDatapath("old", netns=host_netns).remove()
        assert not dp.dir.exists()
