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
and when it sees the files the call names as the caller does. The thin plugin
hands over (``SCM_RIGHTS``, see agent/server.py) its network namespace, its
mount namespace and its root directory: the plugin runs in the first, so an
agent in a container of its own (the DaemonSet's: no host PID namespace, no
ptrace capability) needs no /proc entry of the caller; the other two tell
whether the agent's mount namespace is the caller's, and if not, whether
CNI_NETNS and the data directory are the same files in both (resolved inside
the caller's root, ``openat2``). When they are not, or the configuration
delegates to an IPAM plugin (a program that would run in the agent's view of
the files), the answer hands the call back to the Python plugin, run where the
runtime runs it. A thin plugin from before sends only its pid: that one is
served only when the kernel's credentials of the connection (``SO_PEERCRED``)
show the same pid, i.e. when the agent shares the caller's PID namespace; in
another, a pid names another process.
Inside the agent the plugin's requests to the agent are the same request lines,
decoded and answered by the same functions as the socket's, but in the calling
thread (:class:`~stockade.agent.server.InProcess`): a second connection per
request cost the agent an accept, a read and a thread in the loop that many
ADDs at once queue for.

Args: ``env`` (the runtime's environment, name → value), ``stdin`` (the
network configuration, text), ``fds`` (``["net", "mnt", "root"]``: what the
descriptors the request carries are) and ``pid`` (the caller's, as it sees
itself). Result:
``{"code", "stdout", "stderr"}``, or ``{"fallback": reason}``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from stockade.agent.extension import Handler, Host
from stockade.agent.protocol import BAD_REQUEST, UNAVAILABLE, ApiError, Args
from stockade.agent.server import Caller, InProcess, caller
from stockade.cni.spec import DEFAULT_DATA_DIR, IPAM_AGENT
from stockade.errors import NetError

log = logging.getLogger("stockade.cni")

PASSED = ["net", "mnt", "root"]  # the descriptors a thin plugin sends, in order


class _Elsewhere(Exception):
    """The call is the Python plugin's, run where the runtime is: why."""


class ThinPlugin:
    """An agent extension serving ``cni.exec``."""

    def __init__(self) -> None:
        self.socket = ""
        self.within: InProcess | None = None
        self.calls = 0
        self.fallbacks = 0
        self._said: set[str] = set()  # fallback reasons logged (each once: one per ADD)
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
        pid = args.integer("pid", 0, lo=0, hi=2**22)
        passed = raw.get("fds")
        if passed is not None and passed != PASSED:
            raise ApiError(BAD_REQUEST, f"cni.exec: args.fds must be {json.dumps(PASSED)}")
        from stockade.cni.plugin import run

        out, err = io.StringIO(), io.StringIO()
        try:
            conf = _conf(stdin)
            other = self._other_agent(env, conf)
            if other:
                raise _Elsewhere(other)
            # Where the caller runs: the host side is plumbed in its namespace, as the
            # Python plugin started by the runtime would have done.
            with self._callers_netns(caller(), passed is not None, pid, env, conf):
                code = run(env, stdin.encode(), out, err, within=self.within)
        except _Elsewhere as exc:
            reason = str(exc)
            with self._lock:
                self.fallbacks += 1
                first = reason not in self._said and len(self._said) < 64
                if first:
                    self._said.add(reason)
            if first:
                log.warning("cni.exec: the Python plugin runs the call instead: %s", reason)
            return {"fallback": reason}
        with self._lock:
            self.calls += 1
        return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}

    @contextlib.contextmanager
    def _callers_netns(self, client: Caller | None, passed: bool, pid: int,
                       env: Mapping[str, str], conf: Mapping[str, Any]) -> Iterator[None]:
        """The calling thread in the caller's network namespace, once the agent is known
        to see what the call names as the caller does; else `_Elsewhere`."""
        from stockade.net.namespace import entered, entered_fd

        try:
            if passed:
                fds = client.fds if client is not None else ()
                if len(fds) != len(PASSED):
                    raise _Elsewhere("the request's descriptors did not arrive "
                                     f"({len(fds)} of {len(PASSED)})")
                net, mnt, root = fds
                kind = _link(net)
                if not kind.startswith("net:["):
                    raise _Elsewhere("the descriptor passed as the network namespace is "
                                     f"{kind!r}")
                self._same_view(mnt, root, env, conf)
                with entered_fd(net, "the caller's network namespace"):
                    yield
                return
            if client is not None and client.pid != pid:
                # In another PID namespace /proc/PID is another process, or none.
                raise _Elsewhere(f"the agent does not see the caller's process (pid {pid}; "
                                 f"the connection's: {client.pid or 'none visible'})")
            with entered(f"/proc/{pid}/ns/net" if pid else None):
                yield
        except NetError as exc:
            raise _Elsewhere(f"cannot enter the caller's network namespace: {exc}") from None

    def _same_view(self, mnt: int, root: int, env: Mapping[str, str],
                   conf: Mapping[str, Any]) -> None:
        """`_Elsewhere` unless CNI_NETNS and the data directory are, to the agent, the
        files the caller means (trivially so in the caller's own mount namespace)."""
        from stockade.net.namespace import stat_in_root

        kind = _link(mnt)
        if not kind.startswith("mnt:["):
            raise _Elsewhere(f"the descriptor passed as the mount namespace is {kind!r}")
        here = os.stat("/")
        top = os.fstat(root)
        if kind == _link_path("/proc/self/ns/mnt") and \
                (top.st_dev, top.st_ino) == (here.st_dev, here.st_ino):
            return
        ipam = conf.get("ipam")
        if isinstance(ipam, dict) and ipam and ipam.get("type") != IPAM_AGENT:
            raise _Elsewhere("the agent runs in another mount namespace than the caller, "
                             "and the configuration delegates to an IPAM plugin, which "
                             "must run where the runtime runs it")
        data_dir = conf.get("dataDir")
        paths = [env.get("CNI_NETNS", ""),
                 data_dir if isinstance(data_dir, str) and data_dir else DEFAULT_DATA_DIR]
        for path in filter(None, paths):
            if not path.startswith("/"):
                continue  # refused by the plugin, as it should be
            # A directory not made yet: the nearest one that is, alike in both.
            probe = path
            theirs = stat_in_root(root, probe)
            while theirs is None and probe != "/":
                probe = os.path.dirname(probe)
                theirs = stat_in_root(root, probe)
            try:
                mine = os.stat(probe)
            except OSError:
                mine = None
            if theirs is None or mine is None or \
                    (theirs.st_dev, theirs.st_ino) != (mine.st_dev, mine.st_ino):
                raise _Elsewhere(f"{probe} is not the same to the agent as to the caller "
                                 "(the agent runs in another mount namespace; mount it "
                                 "from the host)")

    def _other_agent(self, env: Mapping[str, str], conf: Mapping[str, Any]) -> str:
        """Why this agent is not the one the configuration names ("" when it is)."""
        named = ""
        if isinstance(conf.get("socket"), str):
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


def _conf(stdin: str) -> dict[str, Any]:
    """The configuration as far as it is an object (the plugin reports the rest)."""
    try:
        conf = json.loads(stdin)
    except ValueError:
        return {}
    return conf if isinstance(conf, dict) else {}


def _link(fd: int) -> str:
    return _link_path(f"/proc/self/fd/{fd}")


def _link_path(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""
