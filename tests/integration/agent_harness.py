"""A real agent process for integration tests: start, kill -9, restart, talk to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from stockade.agent.client import AgentClient
from stockade.errors import AgentError


class AgentProcess:
    def __init__(self, tmp: Path, host_netns: str, prefix: str, *, log_group: int = 0,
                 resync: float = 1.0, extra: tuple[str, ...] = (), datapath: str = "nft",
                 table: str = "stockade", env: dict[str, str] | None = None) -> None:
        self.datapath = datapath
        self.table = table
        self.netns = host_netns
        # e.g. STOCKADE_IPTABLES_BACKEND for the legacy iptables backend
        self.env = {**os.environ, **env} if env else None
        self.state = tmp / "state"
        self.socket = str(tmp / "run" / "agent.sock")
        self.log = tmp / "agent.log"
        self.cmd = [sys.executable, "-m", "stockade.cli.main", "agent",
                    "--state-dir", str(self.state), "--socket", self.socket,
                    "--netns", host_netns, "--bridge-prefix", prefix,
                    "--resync-interval", str(resync), "--log-group", str(log_group),
                    "--datapath", datapath, "--table", table, *extra]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> AgentProcess:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=out, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the agent exited: {self.log.read_text()[-3000:]}")
            try:
                if self.call("status")["ready"]:
                    return self
            except AgentError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the agent did not get ready: {self.log.read_text()[-3000:]}")

    def call(self, op: str, **args: Any) -> Any:
        with AgentClient(self.socket, timeout=60) as c:
            return c.call(op, **args)

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def logs(self) -> str:
        return self.log.read_text()
