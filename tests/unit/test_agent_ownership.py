"""One agent per state directory and per datapath (agent/ownership.py, lockfile.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade import lockfile
from stockade.agent.ownership import STATE_LOCK, datapath_lock, take_ownership
from stockade.errors import AgentError, InputError, NetError
from stockade.net.namespace import entered

# The datapath's name is an abstract socket of the network namespace: two runs of the
# tests at once on one machine must not share one.
T1, T2 = f"t{os.getpid()}a", f"t{os.getpid()}b"


def test_a_second_owner_is_refused_and_told_who_holds_what(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    first = take_ownership(str(tmp_path / "a"), T1, None, lock_dir=locks)
    try:
        with pytest.raises(AgentError) as same_dir:
            take_ownership(str(tmp_path / "a"), T2, None, lock_dir=locks)
        assert f"pid {os.getpid()}" in same_dir.value.args[0]
        assert f"state directory {tmp_path / 'a'}" in same_dir.value.args[0]
        assert "--state-dir" in same_dir.value.args[0]
        with pytest.raises(AgentError) as same_table:
            take_ownership(str(tmp_path / "b"), T1, None, lock_dir=locks)
        assert f"'{T1}' in the host's network namespace" in same_table.value.args[0]
        assert "--table or --netns" in same_table.value.args[0]
        # refused on the datapath: its state lock was given back, its new directory removed
        assert not (tmp_path / "b").exists()
        # another name is another datapath (another namespace: below)
        other = take_ownership(str(tmp_path / "c"), T2, None, lock_dir=locks)
        other.release()
    finally:
        first.release()
    assert not (tmp_path / "a" / STATE_LOCK).exists()
    assert not datapath_lock(T1, None, locks).exists()
    again = take_ownership(str(tmp_path / "a"), T1, None, lock_dir=locks)
    again.release()


def test_a_dead_holder_holds_nothing(tmp_path: Path) -> None:
    """The lock of an agent killed -9 (its file left behind) is free."""
    code = ("import sys, os; from pathlib import Path; from stockade.agent.ownership import "
            "take_ownership; take_ownership(sys.argv[1], sys.argv[3], None,"
            " lock_dir=Path(sys.argv[2]));"
            " print('held', flush=True); os.kill(os.getpid(), 9)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a"), str(tmp_path / "l"), T1],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout == "held\n" and out.returncode == -9, out.stderr
    assert (tmp_path / "a" / STATE_LOCK).exists()  # kill -9: nobody removed it
    take_ownership(str(tmp_path / "a"), T1, None, lock_dir=tmp_path / "l").release()


def test_names_that_would_leave_the_lock_directory_are_refused(tmp_path: Path) -> None:
    for table in ("../x", "a/b", "", "x y", "1abc", "a" * 65, "t\n-A INPUT -j ACCEPT"):
        with pytest.raises(InputError):
            take_ownership(str(tmp_path / "s"), table, None, lock_dir=tmp_path / "l")
    with pytest.raises(NetError):
        take_ownership(str(tmp_path / "s"), T1, "../../x", lock_dir=tmp_path / "l")
    assert not (tmp_path / "l").exists() and not (tmp_path / "s").exists()


def test_a_lock_whose_file_was_given_back_while_waiting_does_not_count(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between opening the file and locking it, the holder gives it back (removes the
    file) and a third process takes a new file of that name: the lock taken on the
    removed file is not a lock on the name."""
    path = tmp_path / "x.lock"
    real = lockfile.open_locked
    third: list[int] = []

    def racing(p: Path, **kw: bool) -> int | None:
        fd = real(p, **kw)
        if not third:
            os.unlink(p)
            third.append(real(p) or -1)  # the new file, held by another
        return fd

    monkeypatch.setattr(lockfile, "open_locked", racing)
    try:
        assert lockfile.hold(path) is None
    finally:
        os.close(third[0])


def test_a_directory_others_can_write_to_is_refused_before_a_lock_is_made(
        tmp_path: Path) -> None:
    """Whoever can write in the state directory could leave `agent.lock` as a hard link
    to a file of root's for the lock to truncate: refused before anything is opened."""
    state = tmp_path / "s"
    state.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.link(victim, state / STATE_LOCK)
    state.chmod(0o777)
    with pytest.raises(AgentError, match="writable by group or others"):
        take_ownership(str(state), T1, None, lock_dir=tmp_path / "l")
    assert victim.read_text() == "precious\n" and (state / STATE_LOCK).exists()


@pytest.mark.parametrize("argv", [
    ["compile", "-f", "examples/cluster.yaml", "-o", "nft"],
    ["agent", "--state-dir", "{tmp}/s", "--socket", "{tmp}/sock"],
    ["dataplane", "show"],
])
def test_every_command_checks_the_datapath_name(argv: list[str], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`--table` becomes text in nft and iptables-restore input and a bpffs path."""
    from stockade.cli.main import main

    args = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as info:
        main([*args, "--table", "x; flush ruleset"])
    assert info.value.code == 2
    assert "argument --table: invalid datapath name 'x; flush ruleset'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_open_datapath_checks_the_name_before_anything() -> None:
    from stockade.datapath import open_datapath

    with pytest.raises(InputError, match=r"invalid datapath name '\.\./x'"):
        open_datapath("ebpf", "../x", netns="nowhere")


def test_the_datapath_stays_held_when_its_lock_file_is_not_shared(tmp_path: Path) -> None:
    """The lock's file removed (root cleaning /run), or a second agent with a /run of its
    own: the datapath's abstract name still refuses it, naming the holder's pid."""
    first = take_ownership(str(tmp_path / "a"), T1, None, lock_dir=tmp_path / "l1")
    try:
        datapath_lock(T1, None, tmp_path / "l1").unlink()
        # Refused again and again (a second agent restarted in a loop): each asks who
        # holds the name; the holder answers every time (its queue holds 8).
        for locks in [tmp_path / "l1", *[tmp_path / "l2"] * 20]:
            with pytest.raises(AgentError) as refused:
                take_ownership(str(tmp_path / "b"), T1, None, lock_dir=locks)
            assert f"another agent (pid {os.getpid()})" in refused.value.args[0]
            assert f"@stockade/datapath/{T1}" in refused.value.args[0]
            assert not (tmp_path / "b").exists()
    finally:
        first.release()
    take_ownership(str(tmp_path / "b"), T1, None, lock_dir=tmp_path / "l2").release()


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"stkown{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.mark.privileged
def test_the_datapath_of_a_namespace_is_one_whichever_way_the_agent_names_it(
        tmp_path: Path, netns: str) -> None:
    """An agent given --netns X and one started inside X (no --netns) enforce one table:
    their lock files differ, the name bound in X does not. The same table in the host's
    namespace is another datapath."""
    outside = take_ownership(str(tmp_path / "a"), T1, netns, lock_dir=tmp_path / "l")
    try:
        with entered(netns), pytest.raises(AgentError) as refused:
            take_ownership(str(tmp_path / "b"), T1, None, lock_dir=tmp_path / "l")
        assert f"another agent (pid {os.getpid()})" in refused.value.args[0]
        take_ownership(str(tmp_path / "c"), T1, None, lock_dir=tmp_path / "l2").release()
    finally:
        outside.release()
    with entered(netns):
        take_ownership(str(tmp_path / "b"), T1, None, lock_dir=tmp_path / "l").release()


@pytest.mark.privileged
@pytest.mark.parametrize("listen", ["listening", "bound only"])
def test_a_name_squatted_by_another_user_is_said_and_not_obeyed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, listen: str) -> None:
    """Any process of the namespace may bind an abstract name: one of another user than
    root holding the datapath's, or one that does not say who holds it, would keep
    every agent from starting. It is warned about; the lock file still holds."""
    code = ("import os, socket, sys, time; os.setgid(65534); os.setuid(65534);"
            " s = socket.socket(socket.AF_UNIX); s.bind('\\0' + sys.argv[1]);"
            " sys.argv[2] == 'listening' and s.listen(1);"
            " print('bound', flush=True); time.sleep(60)")
    squatter = subprocess.Popen([sys.executable, "-c", code, f"stockade/datapath/{T1}", listen],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == "bound\n"
        held = take_ownership(str(tmp_path / "a"), T1, None, lock_dir=tmp_path / "l")
        try:
            assert not held.names
            assert (f"held by pid {squatter.pid} of uid 65534, not root" if listen ==
                    "listening" else "does not say who it is") in caplog.text
            with pytest.raises(AgentError, match=f"pid {os.getpid()}"):
                take_ownership(str(tmp_path / "b"), T1, None, lock_dir=tmp_path / "l")
        finally:
            held.release()
    finally:
        squatter.kill()
        squatter.wait()

