"""Truth tables, ports and the SCTP codec: pure logic, no privileges needed."""

from __future__ import annotations

import pytest

from stockade.errors import NetError
from stockade.probe import sctp
from stockade.probe.protocol import Port, Protocol
from stockade.probe.table import render_table


def test_table_layout_matches_upstream_form() -> None:
    keys = ["x/a", "x/b", "x/c"]
    denied = {("x/a", "x/c")}
    table = render_table(
        keys,
        keys,
        lambda s, d: None if s == d else (s, d) not in denied,
        title="TCP/80",
    )
    assert table == "\n".join(
        [
            "TCP/80  x/a x/b x/c",
            "x/a      -   .   X",
            "x/b      .   -   .",
            "x/c      .   .   -",
        ]
    )


def test_table_with_uneven_labels() -> None:
    table = render_table(["long/row", "r"], ["c", "colname"], lambda s, d: s == "r")
    assert table.splitlines() == [
        "          c colname",
        "long/row  X    X",
        "r         .    .",
    ]


def test_ports_parse_and_print() -> None:
    assert Port.parse("tcp:80") == Port(80, Protocol.TCP)
    assert Port.parse("SCTP/81") == Port(81, Protocol.SCTP)
    assert Port.parse("53") == Port(53)
    assert str(Port(53, Protocol.UDP)) == "UDP/53"
    assert Port.parse(Port(53, Protocol.UDP).spec) == Port(53, Protocol.UDP)
    for bad in ("icmp:1", "tcp:0", "tcp:x", "tcp:70000"):
        with pytest.raises(NetError):
            Port.parse(bad)


def test_sctp_codec_round_trip() -> None:
    assert sctp.crc32c(b"123456789") == 0xE3069283
    init = sctp.parse_packet(sctp.build_init(40000, 80, 0xDEADBEEF))
    assert init == sctp.Packet(40000, 80, 0, sctp.INIT, 0xDEADBEEF)
    ack = sctp.parse_packet(sctp.build_init_ack(80, 40000, 0xDEADBEEF, 7))
    assert ack == sctp.Packet(80, 40000, 0xDEADBEEF, sctp.INIT_ACK, 7)
    abort = sctp.parse_packet(sctp.build_abort(80, 40000, 0xDEADBEEF))
    assert abort is not None and abort.chunk == sctp.ABORT
    corrupted = bytearray(sctp.build_init(40000, 80, 1))
    corrupted[-1] ^= 1
    assert sctp.parse_packet(bytes(corrupted)) is None
