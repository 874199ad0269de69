"""`stockade list -o txt` on every scenario of ../shared/manifests, compared with its
expected.txt as ../shared/manifests/FORMAT.md says (lines as sets, white space
normalised, protocol groups in a canonical order, IPv6 ranges ignored)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tests.support import shared

from stockade.cli.main import main

MANIFESTS = shared("manifests")
SCENARIOS = sorted(p for p in MANIFESTS.iterdir() if (p / "expected.txt").is_file()) \
    if MANIFESTS.is_dir() else []
HEADER = re.compile(r"^Permitted connectivity analyzed in .*:$")


def canonical_connections(text: str) -> str:
    """Items grouped by protocol (a bare port belongs to the protocol before it),
    groups ordered by protocol name, ports by number; ranges kept as written."""
    if not re.fullmatch(r"[A-Z]+ [0-9][0-9,-]*(,[A-Z]+ [0-9][0-9,-]*)*", text):
        return text  # `All Connections`
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for item in text.split(","):
        if " " in item:
            protocol, port = item.split(" ", 1)
            current = groups.setdefault(protocol, [])
            current.append(port)
        elif current is not None:
            current.append(item)
    return ",".join(
        f"{protocol} " + ",".join(sorted(ports, key=lambda p: [int(x) for x in p.split("-")]))
        for protocol, ports in sorted(groups.items()))


def canonical_lines(text: str) -> set[str]:
    out = set()
    for raw in text.splitlines():
        line = " ".join(raw.split())
        if not line or HEADER.match(line):
            continue
        peers, sep, conns = line.rpartition(" : ")
        if not sep:
            out.add(line)
            continue
        src, _, dst = peers.partition(" => ")
        if any(":" in side.removesuffix("[External]") for side in (src, dst)
               if side.endswith("[External]")):
            continue  # IPv6 ranges: the expected lists cover IPv4 only
        out.add(f"{peers} : {canonical_connections(conns)}")
    return out


def test_canonical_form_follows_format_md() -> None:
    assert canonical_connections("UDP 53,TCP 80,8080") == "TCP 80,8080,UDP 53"
    assert canonical_connections("TCP 80,UDP 8080") != canonical_connections("TCP 80,8080")
    assert canonical_connections("TCP 81,80-81") == "TCP 80-81,81"
    assert canonical_lines("  a  =>  b : All Connections\n\n") == {"a => b : All Connections"}
    assert canonical_lines("a => ::-ffff::[External] : TCP 1") == set()


def test_there_are_scenarios() -> None:
    assert SCENARIOS, f"no scenario under {MANIFESTS}"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.name)
def test_list_prints_the_expected_lines(scenario: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    inputs = scenario / "in"
    argv = ["list", "-f", str(inputs), "-o", "txt"]
    if any(p.is_dir() for p in inputs.iterdir()):
        argv.append("-R")
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    got = canonical_lines(out)
    want = canonical_lines((scenario / "expected.txt").read_text(encoding="utf-8"))
    assert not want - got, f"missing: {sorted(want - got)}"
    assert not got - want, f"extra: {sorted(got - want)}"
