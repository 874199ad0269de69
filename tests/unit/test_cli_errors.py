"""Bad input gives one line on stderr naming the file (and object), exit 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from stockade.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = str(ROOT / "examples" / "cluster.yaml")
POLICIES = str(ROOT / "examples" / "policies.yaml")

POD = """\
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: shop}}
{status}
"""

# How each command takes the file under test (BAD), with a good file beside it.
COMMANDS = {
    "matrix": ["matrix", "-f", CLUSTER, "BAD"],
    "explain": ["explain", "-f", CLUSTER, "BAD", "--from", "frontend/web",
                "--to", "backend/api", "--port", "8000"],
    "coverage": ["coverage", "-f", "BAD", POLICIES],
    "lint": ["lint", "-f", "BAD"],
    "diff-old": ["diff", "-f", "BAD", "--against", POLICIES],
    "diff-new": ["diff", "-f", CLUSTER, POLICIES, "--against", "BAD"],
}


def bad_files(tmp: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (path, what the one line must mention besides the path)."""
    broken = tmp / "broken.yaml"
    broken.write_text("kind: Pod\nmetadata:\n\tname: tabbed\n")  # YAML forbids tabs there
    bad_ip = tmp / "bad-ip.yaml"
    bad_ip.write_text(POD.format(name="odd", status="status: {podIP: 10.0.0.300}"))
    return {
        "missing": (str(tmp / "nope.yaml"), ["no such file"]),
        "broken-yaml": (str(broken), ["not valid YAML", "line 3"]),
        "pod-bad-ip": (str(bad_ip), ["Pod shop/odd", "'10.0.0.300' is not an IP address"]),
    }


@pytest.mark.parametrize("command", sorted(COMMANDS))
# A Pod without an IP (Pending) is not bad input for the analyses: they read it
# whatever its status (tests/unit/test_workloads.py).
@pytest.mark.parametrize("problem", ["missing", "broken-yaml", "pod-bad-ip"])
def test_bad_input_is_one_line_and_exit_2(command: str, problem: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path, words = bad_files(tmp_path)[problem]
    argv = [path if a == "BAD" else a for a in COMMANDS[command]]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"stockade: {path}: ")
    for word in words:
        assert word in lines[0]
    assert "Traceback" not in err


def test_bad_named_port_and_unknown_pod(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["explain", "-f", CLUSTER, POLICIES, "--to", "backend/api"]
    assert main([*base, "--from", "frontend/web", "--port", "http"]) == 2
    assert capsys.readouterr().err == (
        "stockade: --port http: backend/api serves no TCP port named 'http'\n")
    assert main([*base, "--from", "frontend/nobody", "--port", "80"]) == 2
    assert "--from frontend/nobody: no such pod" in capsys.readouterr().err


def test_matrix_and_diff_need_pods(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["matrix", "-f", POLICIES]) == 2
    assert "no Pod in the files" in capsys.readouterr().err
    assert main(["diff", "-f", POLICIES, "--against", POLICIES]) == 2
    assert "no Pod in the files" in capsys.readouterr().err


def test_invalid_policy_lists_its_errors(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
                   "metadata: {name: bad, namespace: backend}\n"
                   "spec: {podSelector: {}, ingress: [{ports: [{port: 70000}]}]}\n")
    for command in (["lint", "-f", str(bad)], ["matrix", "-f", CLUSTER, str(bad)],
                    ["coverage", "-f", str(bad)],
                    ["diff", "-f", CLUSTER, POLICIES, "--against", str(bad)]):
        assert main(command) == 2
        out, err = capsys.readouterr()
        assert out == ""
        assert err == (f"{bad}: NetworkPolicy backend/bad: spec.ingress[0].ports[0].port: "
                       "Invalid value: 70000: must be between 1 and 65535, inclusive\n")


@pytest.mark.parametrize(("argv", "flag"), [
    (["agent", "--resync-interval", "0"], "--resync-interval"),
    (["agent", "--warm-idle", "-1"], "--warm-idle"),
    (["agent", "--warm-interval", "nan"], "--warm-interval"),
    (["agent", "--watch-stall-timeout", "inf"], "--watch-stall-timeout"),
    (["agent", "--pod-wait", "soon"], "--pod-wait"),
    (["rm", "--grace", "-5", "x"], "--grace"),
    (["operator", "run", "--resync", "0"], "--resync"),
])
def test_a_duration_flag_takes_finite_seconds(argv: list[str], flag: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Every SECONDS flag refuses a negative, non-finite or non-numeric value (and 0 where
    it is an interval or a timeout), naming the flag, before anything starts."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and "seconds" in err, err
