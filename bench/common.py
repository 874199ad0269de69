"""What the benchmarks share: timing, percentiles, a table, an agent process."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from stockade.agent.client import AgentClient
from stockade.errors import AgentError

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
_COMPILED: set[Path] = set()


def byte_compile(src: Path = SRC) -> None:
    """Write the .pyc files of a source tree (once per tree and process), as `make setup`
    does for the installed one.

    With PYTHONDONTWRITEBYTECODE set (this machine's environment, and the DaemonSet's
    image) nothing writes them at run time: a module edited since setup, and every
    module of a tree checked out for `--baseline`, would be compiled again by each
    process measured, and every start-up figure (an agent's restart, a CNI plugin's
    ADD, a command's run) would carry that compile.
    """
    src = src.resolve()
    if src in _COMPILED:
        return
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(src)], check=True,
                   stdout=subprocess.DEVNULL)
    _COMPILED.add(src)


@contextmanager
def baseline_tree(rev: str) -> Iterator[Path]:
    """An earlier commit checked out (`git worktree`) and byte-compiled: its `src`."""
    where = Path(tempfile.mkdtemp(prefix="stockade-baseline-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f",
                    str(where / "tree"), rev], check=True, capture_output=True)
    try:
        byte_compile(where / "tree" / "src")
        yield where / "tree" / "src"
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                        str(where / "tree")], check=False, capture_output=True)
        shutil.rmtree(where, ignore_errors=True)


def add_ports(host: str, count: int) -> str | None:
    """`count` veth ports on a bridge `br0` in the namespace `host`, as a node's pods
    are (each port's other end in a namespace of its own, whose name is returned for
    `remove_netns`; None when `count` is 0). The eBPF datapath attaches its programs to
    every port, and what an agent pays for them is part of a node's figures."""
    if not count:
        return None
    from stockade.net.namespace import create_netns, entered, netns_path, remove_netns
    from stockade.net.rtnl import Rtnl, ensure_bridge

    peers = f"{host}-peers"
    create_netns(peers)
    try:
        fd = os.open(netns_path(peers), os.O_RDONLY | os.O_CLOEXEC)
        try:
            with entered(host), Rtnl() as nl:
                bridge = ensure_bridge(nl, "br0").index
                for i in range(count):
                    nl.add_veth(f"port{i}", bridge, f"peer{i}", fd)
        finally:
            os.close(fd)
    except BaseException:  # the caller never hears the name: remove it here
        remove_netns(peers)
        raise
    return peers


PINS = Path("/sys/fs/bpf/stockade")  # an eBPF agent's pins, by its namespace


def remove_pins(host: str) -> None:
    """What an eBPF agent in the namespace `host` pinned (its links go with the pins),
    and the pins' root once nothing else is pinned there."""
    shutil.rmtree(PINS / f"netns-{host}", ignore_errors=True)
    with contextlib.suppress(OSError):
        PINS.rmdir()


def exit_on_sigterm() -> None:
    """SIGTERM (as `timeout` sends) unwinds like Ctrl-C, so that a benchmark's `finally`
    stops its agent and removes its namespaces instead of leaving them behind. Only
    the first: `timeout` signals the process and then its group, and a second
    SystemExit in the middle of the `finally` would cut the cleanup short."""
    def unwind(*_: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(143)

    signal.signal(signal.SIGTERM, unwind)


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def pct(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Left-aligned first column, the others right-aligned but the last (notes)."""
    table = [list(header), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        cells = [r[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(r[1:-1], widths[1:-1], strict=True)]
        cells.append(r[-1])
        print("  ".join(cells).rstrip())


def print_markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """The same table as markdown (for the README)."""
    for r in (header, ["---"] * len(header), *rows):
        print("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")


class AgentProcess:
    """`stockade agent` in a network namespace, with its own state and socket."""

    def __init__(self, tmp: Path, netns: str, *extra: str) -> None:
        self.socket = str(tmp / "agent.sock")
        self.state_dir = tmp / "state"
        self.cmd = [sys.executable, "-m", "stockade.cli.main", "agent", "--netns", netns,
                    "--state-dir", str(tmp / "state"), "--socket", self.socket,
                    "--log-group", "0", "--log-level", "warning", *extra]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> float:
        """Start it (``env``: another tree's PYTHONPATH, say); the seconds until it
        reports ready."""
        tree = (env or {}).get("PYTHONPATH")
        byte_compile(Path(tree.split(os.pathsep)[0]) if tree else SRC)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, env=env)
        while True:
            try:
                if self.call("status")["ready"]:
                    return time.perf_counter() - t0
                time.sleep(0.01)  # not a busy loop: it would load the agent it measures
            except AgentError:
                time.sleep(0.05)
            if self.proc.poll() is not None:
                raise SystemExit("the agent exited")

    def call(self, op: str, **args: Any) -> Any:
        with AgentClient(self.socket, timeout=600) as c:
            return c.call(op, **args)

    def rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cpu_seconds(self) -> float:
        """User plus system CPU the agent used so far (what a wall time owes to it, when
        another process, such as an API double, shares the machine)."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> float:
        """A clean stop (SIGTERM); the seconds it took."""
        t0 = time.perf_counter()
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
        return time.perf_counter() - t0

    def kill9(self) -> None:
        """A crash: the next start finds what was kept before it, if anything."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def forget_warm(self) -> None:
        """Remove the kept warm start (agent/warm.py), as an upgrade makes it useless:
        the next start is cold."""
        (self.state_dir / "warm.pickle").unlink(missing_ok=True)
