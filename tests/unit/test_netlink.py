"""The netlink codec shared by every family, byte by byte."""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable

import pytest

from stockade import netlink as nl


def test_attributes_are_padded_and_flagged() -> None:
    assert nl.attr(1, b"ab") == struct.pack("=HH", 6, 1) + b"ab\0\0"
    assert nl.attr_str(3, "eth0") == struct.pack("=HH", 9, 3) + b"eth0\0\0\0\0"
    assert nl.attr_u8(2, 7) == struct.pack("=HHB3x", 5, 2, 7)
    assert nl.attr_u16(2, 0x1234, big=True) == struct.pack("=HH", 6, 2) + b"\x12\x34\0\0"
    assert nl.attr_u32(2, 1500) == struct.pack("=HHI", 8, 2, 1500)
    assert nl.attr_u32(2, 1, big=True) == struct.pack("=HH", 8, 2) + b"\0\0\0\1"
    assert nl.attr_u64(2, 1) == struct.pack("=HH", 12, 2) + b"\0" * 7 + b"\1"
    inner = nl.attr_u32(1, 5)
    outer = nl.nested(4, inner, inner)
    length, kind = struct.unpack_from("=HH", outer)
    assert kind == 4 | nl.NLA_F_NESTED and length == 4 + 2 * len(inner)


def test_attributes_parse_back_with_flags_masked() -> None:
    raw = nl.attr_str(3, "eth0") + nl.nested(18, nl.attr_str(1, "veth")) + nl.attr_u32(4, 9)
    attrs = nl.attr_map(raw)
    assert nl.text(attrs[3]) == "eth0"
    assert nl.text(nl.attr_map(attrs[18])[1]) == "veth"
    assert nl.u32(attrs[4]) == 9
    assert nl.find_attr(raw, 4) == attrs[4] and nl.find_attr(raw, 99) is None
    assert nl.attr_map(raw + nl.attr_u8(4, 1))[4] == b"\1"  # the last one wins
    assert next(nl.iter_attrs(raw, len(nl.attr_str(3, "eth0"))))[0] == 18


def test_truncated_attributes_raise_or_end_the_walk() -> None:
    raw = nl.attr_u32(1, 5) + struct.pack("=HH", 40, 2) + b"x"
    with pytest.raises(nl.MalformedMessage):
        nl.attr_map(raw)
    assert nl.attr_map(raw, strict=False) == {1: struct.pack("=I", 5)}
    assert nl.attr_map(b"\x02\x00", strict=False) == {}
    assert nl.attr_map(raw, end=8) == {1: struct.pack("=I", 5)}  # a bound stops before it


def test_messages_and_nfnetlink_headers() -> None:
    msg = nl.message(16, nl.NLM_F_REQUEST | nl.NLM_F_ACK, 7, b"body", pid=3)
    assert msg == struct.pack("=IHHII", 20, 16, 5, 7, 3) + b"body"
    nf = nl.nfnl_message(4, 1, nl.NLM_F_REQUEST, 9, socket.AF_UNSPEC, 0x0102, b"")
    assert nf[16:] == bytes([0, 0, 0x01, 0x02])  # res_id in network order
    assert struct.unpack_from("=H", nf, 4)[0] == (4 << 8) | 1
    (parsed,) = nl.iter_messages(msg + b"\0" * 4)
    assert (parsed.kind, parsed.flags, parsed.seq, parsed.pid, parsed.payload) == (
        16, 5, 7, 3, b"body")
    with pytest.raises(nl.MalformedMessage):
        list(nl.iter_messages(msg[:-1]))
    with pytest.raises(nl.MalformedMessage):
        list(nl.iter_messages(msg + b"stray"))


def _error(seq: int, code: int) -> bytes:
    return nl.message(nl.NLMSG_ERROR, 0, seq, struct.pack("=i", -code) + b"\0" * 16)


def _feed(*datagrams: bytes) -> Callable[[], bytes]:
    queue = list(datagrams)
    return lambda: queue.pop(0)


def test_replies_until_the_ack_and_errors_raise() -> None:
    answers = nl.message(16, nl.NLM_F_MULTI, 5, b"aaaa") + nl.message(16, 0, 4, b"else")
    recv = _feed(answers, nl.message(16, 0, 5, b"bbbb") + nl.message(nl.NLMSG_DONE, 0, 5, b""))
    assert [m.payload for m in nl.replies(recv, 5)] == [b"aaaa", b"bbbb"]
    assert list(nl.replies(_feed(_error(5, 0)), 5)) == []
    with pytest.raises(nl.NetlinkError) as info:
        list(nl.replies(_feed(_error(5, errno.EEXIST)), 5))
    assert info.value.errno == info.value.code == errno.EEXIST
    assert isinstance(info.value, OSError) and info.value.strerror


def test_read_acks_waits_for_every_sequence_number() -> None:
    recv = _feed(_error(1, 0) + _error(9, errno.EPERM), _error(2, errno.ENOENT))
    assert nl.read_acks(recv, {1, 2}) == {1: 0, 2: errno.ENOENT}


def test_sequences_start_apart() -> None:
    seq = nl.sequence()
    first = next(seq)
    assert next(seq) == first + 1 and first % 256 == 0


@pytest.mark.parametrize(("answers", "seen", "left"), [
    ([BlockingIOError()], False, 0),  # nothing came: the one certain "no"
    ([b"\x10", b"\x10", BlockingIOError()], True, 0),  # drained to the end
    ([OSError(errno.ENOBUFS, "lost"), BlockingIOError()], True, 0),  # lost: maybe anything
    ([b""], True, 0),  # the socket closed under us
    ([OSError(errno.EBADF, "bad"), b"\x10"], True, 1),  # failed: said yes, stops
])
def test_drained_says_no_only_when_certainly_nothing_came(answers: list[object], seen: bool,
                                                          left: int) -> None:
    queue = list(answers)

    def recv() -> bytes:
        item = queue.pop(0)
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, bytes)
        return item

    assert nl.drained(recv) is seen
    assert len(queue) == left
