"""`stockade compile`: the ruleset of the nftables datapath, offline, from files.

The output must be what the datapath would program: the same compiler
(`compile_cluster`) and, for `-o nft`, the same commands a full load sends
(`render_plan` of the plan from an empty ruleset, skeleton included).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stockade.cli.main import main
from stockade.compile.ir import Ruleset
from stockade.compile.lower import compile_cluster
from stockade.compile.nft import Table, canonical, render_plan
from stockade.compile.plan import plan
from stockade.load import load_cluster

ROOT = Path(__file__).resolve().parents[2]
FILES = [str(ROOT / "examples" / f) for f in ("cluster.yaml", "policies.yaml")]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_stats_are_the_ruleset_counts(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "compile", "-f", *FILES, "-o", "stats")
    assert code == 0
    counts = {k: int(v) for k, v in (line.split() for line in out.splitlines())}
    assert counts == compile_cluster(load_cluster(FILES)).counts()
    assert counts["chains"] > 0 and counts["set_elements"] > 0


def test_nft_is_the_full_load_the_datapath_sends(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "compile", "-f", *FILES, "-o", "nft", "--table", "t")
    assert code == 0
    rs = compile_cluster(load_cluster(FILES))
    expected = render_plan(Table("t"), plan(Ruleset(), canonical(rs)), skeleton=True)
    assert json.loads(out) == {"nftables": json.loads(json.dumps(expected))}


def test_json_is_the_ruleset(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "compile", "-f", *FILES, "-o", "json")
    assert code == 0
    data = json.loads(out)
    rs = compile_cluster(load_cluster(FILES))
    assert data["counts"] == rs.counts()
    assert set(data["sets"]) == set(rs.sets) and set(data["chains"]) == set(rs.chains)
    assert data["ingress"] == dict(rs.ingress) and data["egress"] == dict(rs.egress)
    for name, s in rs.sets.items():
        assert sorted(map(str, data["sets"][name]["elements"])) == sorted(
            str(list(e)) if isinstance(e, tuple) else e for e in s.elements)
    for name, c in rs.chains.items():
        assert len(data["chains"][name]["rules"]) == len(c.rules)


def test_invalid_input_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
                   "metadata: {name: x, namespace: a}\nspec: {podSelector: {}, "
                   "policyTypes: [Sideways]}\n")
    code, out, err = run(capsys, "compile", "-f", str(bad))
    assert code == 2 and out == "" and "policyTypes" in err


def test_compile_imports_no_kernel_library() -> None:
    code = ("import sys; from stockade.cli.main import main; "
            "sys.stdout = open('/dev/null', 'w'); "
            f"rc = main(['compile', '-f', *{FILES!r}, '-o', 'nft']); "
            "sys.stdout = sys.__stdout__; "
            "print(rc, sorted(m for m in ('nftables', 'pyroute2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split(None, 1) == ["0", "[]\n"]


def test_compile_leaves_the_collector_as_it_found_it(capsys: pytest.CaptureFixture[str]) -> None:
    import gc

    assert gc.isenabled()
    run(capsys, "compile", "-f", *FILES)
    assert gc.isenabled()
    gc.disable()
    try:
        run(capsys, "compile", "-f", *FILES)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_only_a_process_that_exits_holds_what_it_built(
        capsys: pytest.CaptureFixture[str]) -> None:
    """main(argv) in-process frees the compile's objects and memos, as any call does;
    the console script (`exits`, ended by os._exit) holds them instead of freeing."""
    import stockade.cli.compile as compile_cmd
    from stockade.cli.main import build_parser
    from stockade.model import decode

    run(capsys, "compile", "-f", *FILES)
    assert compile_cmd._HELD == [] and decode._LABELS == {}
    args = build_parser("compile").parse_args(["compile", "-f", *FILES, "-o", "nft"])
    args.exits = True
    try:
        assert compile_cmd.run(args) == 0
        kinds = {type(o).__name__ for o in compile_cmd._HELD}
        assert {"Cluster", "Lowering", "Ruleset"} <= kinds, kinds
        assert decode._LABELS  # the memos are kept too
    finally:
        compile_cmd._HELD.clear()
        compile_cmd._forget()
    capsys.readouterr()


def _command(*argv: str, stdout: object = subprocess.PIPE) -> subprocess.CompletedProcess[bytes]:
    """The console script as a user runs it (main() without argv)."""
    code = "import sys; from stockade.cli.main import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *argv], stdout=stdout,
                          stderr=subprocess.PIPE, check=False)


def test_the_command_ends_at_once_with_its_whole_output(capsys: pytest.CaptureFixture[str]) -> None:
    """The console script leaves without freeing what it built (os._exit after a flush):
    every byte is still written, and the exit code is the command's."""
    code, out, _ = run(capsys, "compile", "-f", *FILES, "-o", "nft")
    done = _command("compile", "-f", *FILES, "-o", "nft")
    assert (done.returncode, done.stdout.decode()) == (code, out) == (0, out)
    assert len(out) > 1000
    bad = _command("compile", "-f", "/nonexistent/cluster.yaml")
    assert bad.returncode == 2 and b"/nonexistent/cluster.yaml" in bad.stderr


def test_an_output_that_cannot_be_written_is_exit_2_without_a_traceback() -> None:
    with open("/dev/full", "wb") as full:
        done = _command("compile", "-f", *FILES, "-o", "nft", stdout=full)
    assert done.returncode == 2
    assert done.stderr.decode().strip() == ("stockade: cannot write the output: "
                                            "No space left on device")


@pytest.mark.parametrize("jobs", ["0", "-1", "x", "65", "1.5"])
def test_a_bad_jobs_count_is_exit_2(jobs: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["compile", "-f", *FILES, "-j", jobs])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "-j/--jobs" in err and "whole number from 1 to 64" in err, err


@pytest.mark.parametrize(("cores", "asked", "shares"), [(2, 5, 2), (1, 8, None), (4, 3, 3)])
def test_processes_are_at_most_the_usable_cores(
        cores: int, asked: int, shares: int | None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Each process holds its own share: past the cores, more only take memory.
    import stockade.cli.compile as compile_cmd
    import stockade.cli.fork as fork

    seen: list[int] = []
    real = fork.fork_map

    def counting(task: object, parts: list[object]) -> object:
        seen.append(len(parts))
        return real(task, parts)  # type: ignore[arg-type]

    monkeypatch.setattr(compile_cmd, "PARALLEL_ENTRIES", 0)
    monkeypatch.setattr(compile_cmd, "usable_cores", lambda: cores)
    monkeypatch.setattr(fork, "fork_map", counting)
    assert main(["compile", "-f", *FILES, "-o", "stats", "-j", str(asked)]) == 0
    shared = capsys.readouterr().out
    assert seen == ([] if shares is None else [shares])
    assert main(["compile", "-f", *FILES, "-o", "stats"]) == 0
    assert capsys.readouterr().out == shared
