"""The eBPF datapath's connection tracking keyed in normal form, with real frames.

A connection's entry is keyed by its tuple in normal form (the side with the lower
address and port first), the entry saying which side opened it, so both directions
find it in one lookup. Frames are fed to `stockade_from_pod` (BPF_PROG_TEST_RUN) as
arriving on an unguarded port, so each tuple is the one wanted; real connections
show that entries an older build made, keyed by their original tuple, are turned
into the normal form when a new build replaces that program.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stockade.compile import bpf as bpfc
from stockade.compile.lower import compile_cluster
from stockade.datapath import libbpf
from stockade.datapath.ebpf import LAYOUT, SOURCE, EbpfDatapath, _cflags, normalize_connections
from stockade.model.cluster import Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.labels import Labels
from stockade.model.policy import NetworkPolicy
from stockade.net.namespace import entered

from .ebpf_pins import ebpf_datapath
from .frames import eth, tcp4
from .netio import EchoServer, connect, echo

pytestmark = pytest.mark.privileged

PASSED, SHOT = 0xFFFFFFFF, 2  # TC_ACT_UNSPEC, TC_ACT_SHOT
SYN, ACK = 0x02, 0x10
PORT = 7781
UNGUARDED = 1  # lo's ifindex: no guard binds it, so any source may be fed there


def _cluster(trio: Any, *policies: NetworkPolicy) -> Cluster:
    ns = Namespace("x", Labels({"kubernetes.io/metadata.name": "x"}))
    return Cluster((ns,), tuple(
        Endpoint("x", n, Labels({"pod": n}), (getattr(trio, n).address4,),
                 (ContainerPort(PORT, "TCP", "echo"),)) for n in "abc"), policies)


@pytest.fixture(params=["tcx"])
def datapath(trio: Any, request: Any) -> Iterator[EbpfDatapath]:
    """tcx links unless a test asks for clsact filters (`indirect`)."""
    with ebpf_datapath(trio, attach=request.param) as dp:
        yield dp


def _feed(trio: Any, datapath: EbpfDatapath, src: str, dst: str, sport: int, dport: int,
          flags: int) -> int:
    frame = eth(trio.c.mac, 0x0800, tcp4(src, dst, sport, dport, flags))
    with entered(trio.host_netns):
        return libbpf.test_run(datapath._progs["in"], frame, 1, ifindex=UNGUARDED)[0]


def _tracked(datapath: EbpfDatapath, name: str = "ct") -> dict[bytes, bytes]:
    return libbpf.dump(datapath._maps[name], *LAYOUT[name])


def _opened(datapath: EbpfDatapath, name: str = "ct") -> list[tuple[str, str, int, int]]:
    """Each tracked TCP connection as it was opened: source, destination and ports."""
    out = []
    for key, value in _tracked(datapath, name).items():
        family, proto, src, dst, sport, dport = bpfc.ct_original(key, value)
        if family == 4 and proto == 6:
            out.append((socket.inet_ntoa(src[:4]), socket.inet_ntoa(dst[:4]), sport, dport))
    return out


def test_a_connection_is_keyed_in_normal_form_whichever_side_opens_it(trio, datapath) -> None:
    """One connection each way between a and b: one of the two is opened from the side
    the normal form puts second. Both keys are what `ct_normal` says, and both read
    back as opened; a reply finds its connection, a stranger's packet does not."""
    datapath.apply(compile_cluster(_cluster(trio)))
    a, b = trio.a.address4, trio.b.address4
    assert _feed(trio, datapath, a, b, 40000, PORT, SYN) == PASSED
    assert _feed(trio, datapath, b, a, 40001, PORT, SYN) == PASSED
    assert sorted(_opened(datapath)) == sorted([(a, b, 40000, PORT), (b, a, 40001, PORT)])
    # only the two fed here: the trio's namespaces send frames of their own (IPv6
    # neighbour discovery) through the same program, which may track them too
    entries = {k: v for k, v in _tracked(datapath).items() if k[:2] == bytes((4, 6))}
    assert len(entries) == 2
    flipped = 0
    for key, value in entries.items():
        as_opened = bpfc.CT_KEY.pack(*_original_fields(key, value))
        seen, generation, flags, owner = bpfc.CT_VALUE.unpack(value)
        plain = bpfc.CT_VALUE.pack(seen, generation, flags & ~bpfc.CT_ORIG_B, owner)
        assert bpfc.ct_normal(as_opened, plain) == (key, value)
        flipped += key != as_opened
    assert flipped == 1
    # each answer is a reply (a SYN-ACK, then an ACK), found through the one key
    assert _feed(trio, datapath, b, a, PORT, 40000, SYN | ACK) == PASSED
    assert _feed(trio, datapath, a, b, PORT, 40001, SYN | ACK) == PASSED
    assert _feed(trio, datapath, a, b, 40000, PORT, ACK) == PASSED
    assert _feed(trio, datapath, b, a, 40001, PORT, ACK) == PASSED
    # mid-stream on a tuple nobody opened: dropped
    assert _feed(trio, datapath, b, a, PORT, 40002, ACK) == SHOT
    datapath.flush_connections()


def _original_fields(key: bytes, value: bytes) -> tuple[Any, ...]:
    family, proto, src, dst, sport, dport = bpfc.ct_original(key, value)
    return (family, proto, 0, sport.to_bytes(2, "big"), dport.to_bytes(2, "big"), src, dst)


def _older_form(datapath: EbpfDatapath) -> int:
    """Key every tracked connection by its original tuple, as a build from before the
    normal form did; returns how many keys changed."""
    changed = 0
    for name in ("ct", "ct_live"):
        ksize, vsize = LAYOUT[name]
        fd = datapath._maps[name]
        for key, value in _tracked(datapath, name).items():
            if key[:2] != bytes((4, 6)):
                continue  # IPv4 TCP: the connections made here
            old_key = bpfc.CT_KEY.pack(*_original_fields(key, value))
            seen, generation, flags, owner = bpfc.CT_VALUE.unpack(value)
            old_value = bpfc.CT_VALUE.pack(seen, generation, flags & ~bpfc.CT_ORIG_B, owner)
            if old_key != key:
                libbpf.delete_batch(fd, [key], ksize)
                changed += 1
            libbpf.update_batch(fd, [old_key], [old_value], ksize, vsize)
    return changed


@pytest.fixture
def two_ways(trio, datapath) -> Iterator[dict[str, socket.socket]]:
    """Echo servers on a and b, and an established connection each way."""
    datapath.apply(compile_cluster(_cluster(trio)))
    with EchoServer(trio.a.netns, PORT), EchoServer(trio.b.netns, PORT):
        conns = {"ab": connect(trio.a.netns, trio.b.address4, PORT),
                 "ba": connect(trio.b.netns, trio.a.address4, PORT)}
        try:
            assert all(echo(c, b"one") and echo(c, b"two") for c in conns.values())
            yield conns
        finally:
            for c in conns.values():
                c.close()
            datapath.flush_connections()


def _turned_one(trio, datapath, conns) -> socket.socket:
    """The connection opened from the side the normal form puts second (exactly one of
    the two ways), after every connection was keyed as an older build keyed it."""
    live = _tracked(datapath, "ct_live")
    assert len(_opened(datapath, "ct_live")) == 2
    (opened,) = [bpfc.ct_original(k, v) for k, v in live.items()
                 if bpfc.CT_VALUE.unpack(v)[2] & bpfc.CT_ORIG_B]
    assert _older_form(datapath) == 1
    return conns["ab"] if socket.inet_ntoa(opened[2][:4]) == trio.a.address4 else conns["ba"]


def test_connections_an_older_build_keyed_are_turned_into_normal_form(trio, datapath,
                                                                     two_ways) -> None:
    """Keyed by its original tuple, the turned connection's packets find nothing (the
    control: its echo is lost); turned, its retransmission gets through."""
    conn = _turned_one(trio, datapath, two_ways)
    assert not echo(conn, b"three")  # dropped: mid-stream without an entry
    assert normalize_connections(datapath._maps) == 1
    conn.settimeout(10)
    assert conn.recv(100) == b"three"  # the retransmission, echoed
    assert all(echo(c, b"four") for c in two_ways.values())
    assert normalize_connections(datapath._maps) == 0  # nothing left to turn


def _rebuilt(tmp: Path) -> Path:
    """The program built again with other instructions (the v2 instruction set): a new
    build, with its own tag, as an upgrade brings."""
    out = tmp / "rebuilt.o"
    subprocess.run(["clang", *_cflags(), "-mcpu=v2", "-c", str(SOURCE), "-o", str(out)],
                   check=True)
    return out


@pytest.mark.parametrize("datapath", ["tcx", "clsact"], indirect=True)
def test_a_new_build_replacing_the_program_keeps_an_older_builds_connections(
        trio, datapath, two_ways, tmp_path, monkeypatch) -> None:
    """The upgrade itself: the pinned program is replaced by a new build (a new process
    loads it), and the connections its maps hold in the older form carry on, without
    one lost packet (each echo answers at once). With clsact, the filters switch to the
    new build only when the apply finds them running the old one."""
    old_tag = libbpf.prog_id_tag(datapath._progs["in"])[1]
    _turned_one(trio, datapath, two_ways)
    monkeypatch.setenv("STOCKADE_BPF_OBJECT", str(_rebuilt(tmp_path)))
    upgraded = EbpfDatapath(netns=trio.host_netns)
    try:
        upgraded.apply(compile_cluster(_cluster(trio)), verify=True)
        assert libbpf.prog_id_tag(upgraded._progs["in"])[1] != old_tag
        assert all(echo(c, b"three") for c in two_ways.values())
        assert len(_opened(upgraded, "ct_live")) == 2
        assert normalize_connections(upgraded._maps) == 0
    finally:
        upgraded.close()


def test_a_link_found_running_another_program_is_switched_with_its_connections(
        trio, datapath, two_ways, tmp_path, monkeypatch) -> None:
    """The program's pins were lost while its links kept running it (an operator's
    cleanup, a bpffs remounted), then a new build comes: the loader finds no program
    to replace, and the apply repairs each link found running another program. The
    connections that program keyed the older way are turned there too."""
    _turned_one(trio, datapath, two_ways)
    for pin in ("prog_from_pod", "prog_to_pod"):
        (datapath.dir / pin).unlink()
    monkeypatch.setenv("STOCKADE_BPF_OBJECT", str(_rebuilt(tmp_path)))
    upgraded = EbpfDatapath(netns=trio.host_netns)
    try:
        upgraded.apply(compile_cluster(_cluster(trio)), verify=True)
        assert upgraded.last_drift_details  # the links were repaired, and said so
        assert all(echo(c, b"three") for c in two_ways.values())
        assert normalize_connections(upgraded._maps) == 0
    finally:
        upgraded.close()


def test_a_program_left_on_an_unpinned_connection_map_is_replaced_with_it(
        trio, datapath, two_ways) -> None:
    """ct_live's pin lost: the running program keeps its map, which no process reaches
    any more. A new process pins a new one, replaces the program (the same build) so
    that it runs on the pinned maps, and carries the connections over: each echo
    answers at once."""
    assert len(_opened(datapath, "ct_live")) == 2
    (datapath.dir / "ct_live").unlink()
    datapath.close()
    again = EbpfDatapath(netns=trio.host_netns)
    try:
        again.apply(compile_cluster(_cluster(trio)), verify=True)
        pinned = {libbpf.obj_id(fd) for fd in again._maps.values()}
        assert all(libbpf.prog_map_ids(fd) <= pinned for fd in again._progs.values())
        assert len(_opened(again, "ct_live")) == 2
        assert all(echo(c, b"three") for c in two_ways.values())
    finally:
        again.close()
