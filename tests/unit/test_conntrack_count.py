"""The conntrack stats request (a namespace's entry count) and what revocation does with it.

Byte by byte for the codec; a scripted socket for `Conntrack.count`'s fallbacks;
a fake `Conntrack` for `Visibility.revoke_now`, which must dump whenever the
count is not a certain 0 (an error never passes for an empty table).
"""

from __future__ import annotations

import errno
import itertools
import socket
import struct
from pathlib import Path

import pytest

from stockade.agent import visibility
from stockade.agent.metrics import agent_metrics
from stockade.agent.prometheus import Registry
from stockade.agent.visibility import Visibility
from stockade.datapath.conntrack import (
    CTA_STATS_GLOBAL_ENTRIES,
    STATS_KIND,
    Conntrack,
    decode_count,
    stats_request,
)
from stockade.errors import DataplaneError
from stockade.model.cluster import Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.connection import ConnEntry
from stockade.model.labels import Labels
from stockade.model.policy import INGRESS, NetworkPolicy
from stockade.model.selector import Selector
from stockade.netlink import (
    NLM_F_ACK,
    NLM_F_MULTI,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    MalformedMessage,
    attr,
    iter_messages,
    message,
    nfgenmsg,
)

# What kernel 6.18 answered in a namespace holding one entry (nf_conntrack_max 262,144):
# nfgenmsg (AF_UNSPEC, v0, res_id 0), CTA_STATS_GLOBAL_ENTRIES 1, CTA_STATS_GLOBAL_MAX_ENTRIES.
KERNEL_ANSWER = bytes.fromhex("00000000" "0800010000000001" "0800020000040000")


def _stats(count: int) -> bytes:
    return nfgenmsg(socket.AF_UNSPEC) + attr(CTA_STATS_GLOBAL_ENTRIES, struct.pack("!I", count))


# ---- codec ------------------------------------------------------------------------------


def test_stats_request_is_one_acknowledged_request_for_every_family() -> None:
    (msg,) = iter_messages(stats_request(41))
    assert (msg.kind, msg.seq) == ((1 << 8) | 5, 41)  # NFNL_SUBSYS_CTNETLINK, GET_STATS
    # the ack, not NLMSG_DONE, ends the answer; and it is not a dump (no NLM_F_DUMP bits)
    assert msg.flags == NLM_F_REQUEST | NLM_F_ACK
    assert msg.payload == bytes([socket.AF_UNSPEC, 0, 0, 0])  # no attributes


def test_decode_count_reads_the_entries_attribute_big_endian() -> None:
    assert decode_count(KERNEL_ANSWER) == 1
    assert decode_count(_stats(0)) == 0
    assert decode_count(_stats(2**32 - 1)) == 2**32 - 1
    # the count may come after other attributes
    assert decode_count(nfgenmsg(0) + attr(2, b"\0\4\0\0") + attr(1, b"\0\0\1\0")) == 256


@pytest.mark.parametrize("body", [
    nfgenmsg(socket.AF_UNSPEC),                                      # no attribute
    nfgenmsg(socket.AF_UNSPEC) + attr(2, b"\0\4\0\0"),                # only the maximum
    nfgenmsg(socket.AF_UNSPEC) + attr(CTA_STATS_GLOBAL_ENTRIES, b"\0\1"),  # short
    nfgenmsg(socket.AF_UNSPEC) + struct.pack("=HH", 40, 1) + b"\0" * 4,    # truncated
])
def test_decode_count_refuses_what_is_not_a_count(body: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_count(body)


# ---- Conntrack.count over a scripted socket --------------------------------------------------


class ScriptedSocket:
    """Answers each request with the datagrams a function of its sequence number makes."""

    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)
        self.queue: list[bytes] = []
        self.sent: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sent.append(data)
        (msg,) = iter_messages(data)
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        assert callable(answer)
        self.queue.extend(answer(msg.seq))

    def recv(self, size: int) -> bytes:
        if not self.queue:
            raise TimeoutError
        return self.queue.pop(0)

    def close(self) -> None:
        pass


def _conntrack(sock: ScriptedSocket) -> Conntrack:
    ct = Conntrack.__new__(Conntrack)  # no kernel socket: the scripted one
    ct.netns = None
    ct._seq = itertools.count(100)
    ct.sock = sock  # type: ignore[assignment]
    return ct


def _ack(seq: int, code: int = 0) -> bytes:
    return message(NLMSG_ERROR, 0, seq, struct.pack("=i", -code) + b"\0" * 16)


def test_count_reads_the_answer_until_the_ack() -> None:
    sock = ScriptedSocket(
        # another request's late answer first: skipped by its sequence number
        lambda seq: [message(STATS_KIND, NLM_F_MULTI, seq - 1, _stats(9)),
                     message(STATS_KIND, NLM_F_MULTI, seq, _stats(3)) + _ack(seq)],
        lambda seq: [message(STATS_KIND, NLM_F_MULTI, seq, KERNEL_ANSWER), _ack(seq)],
    )
    ct = _conntrack(sock)
    assert ct.count() == 3
    assert ct.count() == 1
    assert [next(iter_messages(s)).seq for s in sock.sent] == [100, 101]


@pytest.mark.parametrize("answer", [
    lambda seq: [_ack(seq, errno.EOPNOTSUPP)],                      # a kernel without stats
    lambda seq: [_ack(seq, errno.EPERM)],                           # no CAP_NET_ADMIN
    lambda seq: [_ack(seq)],                                        # acked, but no count
    lambda seq: [message(NLMSG_DONE, 0, seq, b"\0" * 4)],           # done, but no count
    lambda seq: [],                                                 # no answer at all
    lambda seq: [message(STATS_KIND, NLM_F_MULTI, seq, nfgenmsg(0)), _ack(seq)],  # no count
    lambda seq: [message(STATS_KIND, NLM_F_MULTI, seq, KERNEL_ANSWER)[:-3]],      # cut short
    OSError(errno.ENOBUFS, "no buffer space"),                      # the send itself fails
], ids=["EOPNOTSUPP", "EPERM", "ack-only", "done-only", "silence", "no-count", "truncated",
        "send-fails"])
def test_count_is_none_whenever_the_kernel_does_not_say(answer: object) -> None:
    assert _conntrack(ScriptedSocket(answer)).count() is None


# ---- revoke_now: skip the dump on a certain 0, and only then --------------------------------


class FakeConntrack:
    """Stands for `Conntrack` in `stockade.agent.visibility`; records what the pass asked."""

    count_answer: int | None = 0
    table: list[ConnEntry] = []
    calls: list[str] = []

    def __init__(self, netns: str | None = None) -> None:
        self.calls.append(f"open {netns}")

    def __enter__(self) -> FakeConntrack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.calls.append("close")

    def count(self) -> int | None:
        self.calls.append("count")
        if self.count_answer == -1:
            raise DataplaneError("the kernel did not answer a conntrack request")
        return self.count_answer

    def entries(self) -> list[ConnEntry]:
        self.calls.append("entries")
        return list(self.table)

    def delete(self, entries: list[ConnEntry]) -> int:
        self.calls.append(f"delete {len(entries)}")
        return len(entries)


class FakeArrivals:
    """Stands for `Arrivals`: answers `seen()` from `answers` (then True), in `looks`."""

    answers: list[bool] = []
    looks: list[str] = []

    def __init__(self, netns: str | None = None) -> None:
        self.looks.append("open")

    def seen(self) -> bool:
        self.looks.append("seen")
        return self.answers.pop(0) if self.answers else True

    def close(self) -> None:
        self.looks.append("close")


# x/a at 10.0.0.1, isolated for ingress: every connection to it is revoked
ISOLATED = Cluster((Namespace("x", Labels({"kubernetes.io/metadata.name": "x"})),),
                   (Endpoint("x", "a", Labels({"pod": "a"}), ("10.0.0.1",),
                             (ContainerPort(80, "TCP", "web"),)),),
                   (NetworkPolicy("x", "deny", Selector(Labels({"pod": "a"})),
                                  policy_types=(INGRESS,)),))


def _visibility(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int | None,
                table: list[ConnEntry], cluster: Cluster = ISOLATED) -> Visibility:
    monkeypatch.setattr(visibility, "Conntrack", FakeConntrack)
    monkeypatch.setattr(visibility, "Arrivals", FakeArrivals)
    monkeypatch.setattr(FakeArrivals, "answers", [])
    monkeypatch.setattr(FakeArrivals, "looks", [])
    monkeypatch.setattr(FakeConntrack, "count_answer", count)
    monkeypatch.setattr(FakeConntrack, "table", table)
    monkeypatch.setattr(FakeConntrack, "calls", [])
    return Visibility(lambda: cluster, agent_metrics(Registry()), "ns1", None,
                      str(tmp_path), revoke=False)


ENTRY = ConnEntry("TCP", "10.0.0.2", "10.0.0.1", 40000, 80, "ESTABLISHED")


def test_an_empty_namespace_is_not_dumped(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    vis = _visibility(tmp_path, monkeypatch, 0, [ENTRY])  # a table the count says is empty
    assert vis.revoke_now() == 0
    assert FakeConntrack.calls == ["open ns1", "count"]


@pytest.mark.parametrize("count", [None, 1, 5])
def test_an_unknown_or_positive_count_dumps_as_before(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      count: int | None) -> None:
    vis = _visibility(tmp_path, monkeypatch, count, [ENTRY])
    assert vis.revoke_now() == 1  # None (no answer) included: the revocation still cuts
    assert FakeConntrack.calls == ["open ns1", "count", "entries", "delete 1"]
    assert vis.cut_total == 1


# ---- the revoker's socket: one for every pass --------------------------------------------------
# Closing a ctnetlink socket makes nf_tables take the namespace's commit lock and wait
# out the last transaction's grace period, so a socket per pass held up the agent's
# own commits (see Visibility._drop_conntrack).


def test_passes_share_one_socket_until_stop(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    vis = _visibility(tmp_path, monkeypatch, 1, [ENTRY])
    assert vis.revoke_now() == 1
    assert vis.revoke_now() == 1
    assert FakeConntrack.calls == ["open ns1", "count", "entries", "delete 1",
                                   "count", "entries", "delete 1"]
    vis.stop()
    assert FakeConntrack.calls[-1] == "close"
    vis.stop()  # twice: nothing left to close
    assert FakeConntrack.calls.count("close") == 1


def test_a_failed_pass_drops_its_socket_and_the_next_opens_another(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vis = _visibility(tmp_path, monkeypatch, -1, [ENTRY])  # -1: the count raises
    with pytest.raises(DataplaneError):
        vis.revoke_now()
    assert FakeConntrack.calls == ["open ns1", "count", "close"]
    monkeypatch.setattr(FakeConntrack, "count_answer", 1)
    assert vis.revoke_now() == 1  # a fresh socket: no reply of the failed request in it
    assert FakeConntrack.calls[3:] == ["open ns1", "count", "entries", "delete 1"]



# ---- no new connection since the last dump: its candidates, judged again --------------------


def test_with_no_arrival_the_last_dumps_candidates_are_judged_without_a_dump(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vis = _visibility(tmp_path, monkeypatch, 1, [ENTRY])
    FakeArrivals.answers[:] = [False, False]  # nothing came, twice
    assert vis.revoke_now() == 1  # the first pass dumps whatever the events say
    assert vis.revoke_now() == 1  # the entry the dump listed is cut again (gone: harmless)
    assert FakeConntrack.calls == ["open ns1", "count", "entries", "delete 1",
                                   "count", "delete 1"]
    assert FakeArrivals.looks == ["open", "seen", "seen"]  # opened before the dump


def test_an_arrival_or_the_periodic_check_dumps_again(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    vis = _visibility(tmp_path, monkeypatch, 1, [ENTRY])
    FakeArrivals.answers[:] = [False, True, False, False]
    for _ in range(2):
        vis.revoke_now()
    assert FakeConntrack.calls.count("entries") == 2  # the first pass, then an arrival
    vis.revoke_soon()  # the periodic check's pass lists the table whatever came
    vis.revoke_now()
    assert FakeConntrack.calls.count("entries") == 3
    vis.revoke_now()  # and the next one, with nothing new, does not
    assert FakeConntrack.calls.count("entries") == 3


def test_without_a_listener_every_pass_dumps(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    vis = _visibility(tmp_path, monkeypatch, 1, [ENTRY])

    def refuse(netns: str | None = None) -> None:
        raise OSError(errno.EPERM, "no")

    monkeypatch.setattr(visibility, "Arrivals", refuse)
    for _ in range(3):
        assert vis.revoke_now() == 1
    assert FakeConntrack.calls.count("entries") == 3


def test_a_failed_pass_forgets_what_the_last_dump_listed(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    vis = _visibility(tmp_path, monkeypatch, 1, [ENTRY])
    FakeArrivals.answers[:] = [False, False, False]
    vis.revoke_now()
    monkeypatch.setattr(FakeConntrack, "count_answer", -1)
    with pytest.raises(DataplaneError):
        vis.revoke_now()
    monkeypatch.setattr(FakeConntrack, "count_answer", 1)
    vis.revoke_now()  # a new socket and a new listener: the table is listed again
    assert FakeConntrack.calls.count("entries") == 2
    assert FakeArrivals.looks.count("open") == 2 and "close" in FakeArrivals.looks
