"""The agent's side of the thin CNI plugin (`cni/stockade-cni.c`): operation ``cni.exec``.

A runtime starts one plugin process per container and waits for it; a Python
process spends most of an ADD starting and importing itself. The thin plugin
is a small C program that sends the invocation, its environment and its stdin,
to the agent, which runs the same plugin code (:func:`stockade.cni.plugin.run`)
in one of its request threads and answers with what the plugin would have
printed and its exit status. The two are one plugin: same code, same results,
same errors; only where it runs differs.

The agent serves the call only when the configuration names this agent's
socket (a configuration naming another agent must reach that one: the answer
asks the thin plugin to run the Python plugin, which connects where it is told)
and when it sees the caller's processes and files as the caller does (the
caller's /proc entry, CNI_NETNS): an agent in a container of its own must leave
the call to the Python plugin, run where the runtime runs it.
Inside the agent the plugin's requests to the agent are the same request lines,
decoded and answered by the same functions as the socket's, but in the calling
thread (:class:`~stockade.agent.server.InProcess`): a second connection per
request cost the agent an accept, a read and a thread in the loop that many
ADDs at once queue for.

Args: ``env`` (the runtime's environment, name → value), ``stdin`` (the
network configuration, text) and ``pid`` (the caller's: the plugin runs in that
process's network namespace, where the runtime started it). Result:
``{"code", "stdout", "stderr"}``, or ``{"fallback": reason}``.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Mapping
from typing import Any

from stockade.agent.extension import Handler, Host
from stockade.agent.protocol import BAD_REQUEST, UNAVAILABLE, ApiError, Args
from stockade.agent.server import InProcess


class ThinPlugin:
    """An agent extension serving ``cni.exec``."""

    def __init__(self) -> None:
        self.socket = ""
        self.within: InProcess | None = None
        self.calls = 0
        self.fallbacks = 0
        self._lock = threading.Lock()

    def operations(self) -> Mapping[str, Handler]:
        return {"cni.exec": self.op_exec}

    def status(self) -> Mapping[str, Any]:
        return {"cniExec": {"calls": self.calls, "fallbacks": self.fallbacks}}

    def start(self, agent: Host) -> None:
        self.socket = os.path.realpath(agent.config.socket)
        # The plugin's own requests (cni.status, cni.add...) are this agent's: answered
        # in this thread, not over a second connection to the socket.
        self.within = InProcess(agent.service.handle)

    def stop(self) -> None:
        """Nothing runs in the background."""

    def op_exec(self, raw: dict[str, Any]) -> dict[str, Any]:
        args = Args(raw, "cni.exec")
        for key in ("env", "stdin"):
            if raw.get(key) is None:
                raise ApiError(BAD_REQUEST, f"cni.exec: args.{key} is required")
        env = args.text_map("env")
        stdin = args.text("stdin")
        if not self.socket or self.within is None:
            raise ApiError(UNAVAILABLE, "cni.exec is not started")
        other = self._other_agent(env, stdin)
        if other:
            with self._lock:
                self.fallbacks += 1
            return {"fallback": other}
        from stockade.cni.plugin import run
        from stockade.errors import NetError
        from stockade.net.namespace import entered

        pid = args.integer("pid", 0, lo=0, hi=2**22)
        out, err = io.StringIO(), io.StringIO()
        try:
            # Where the caller runs: the host side is plumbed in its namespace, as the
            # Python plugin started by the runtime would have done.
            with entered(f"/proc/{pid}/ns/net" if pid else None):
                code = run(env, stdin.encode(), out, err, within=self.within)
        except NetError as exc:
            with self._lock:
                self.fallbacks += 1
            return {"fallback": f"cannot enter the caller's network namespace: {exc}"}
        with self._lock:
            self.calls += 1
        return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}

    def _other_agent(self, env: Mapping[str, str], stdin: str) -> str:
        """Why this agent is not the one the configuration names ("" when it is)."""
        named = ""
        try:
            conf = json.loads(stdin)
        except ValueError:
            return ""  # the plugin reports a malformed configuration as it should
        if isinstance(conf, dict) and isinstance(conf.get("socket"), str):
            named = conf["socket"]
        named = named or env.get("STOCKADE_SOCKET", "")  # as plugin.Call.socket chooses
        if named and os.path.realpath(named) != self.socket:
            return f"the configuration names another agent's socket ({named})"
        netns = env.get("CNI_NETNS", "")
        if netns and not os.path.exists(netns):
            # An agent that does not share the runtime's mount namespace: the Python
            # plugin, run where the runtime is, sees what the runtime means.
            return f"CNI_NETNS {netns} is not visible to the agent"
        return ""
