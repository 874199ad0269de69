"""`stockade run`, `ps`, `rm`: containers for hosts without an orchestrator (an agent extension).

A container here is a process in a network namespace of its own, joined to the
agent's bridge, with an address from the agent's IPAM, registered as an
endpoint (owner ``run``) with labels and named ports, so NetworkPolicies select
it like a pod. Only the network is isolated: the process shares the host's
file systems, users and process table, and runs as the agent's user (root).

Why the order of `run` matters — *policy first, then the process*:

1. allocate the address (stored in the IPAM, owner ``run:NS/NAME``);
2. plumb the namespace and veth (a :class:`Plumber` with the agent's bridge
   prefix, working in the agent's namespace, where the bridge lives);
3. register the endpoint and wait until the kernel enforces it
   (``commit(..., sync=True)``): from here on, every rule that selects the
   endpoint is in force for its address;
4. only now start the command, in that namespace: the API thread enters it
   (``setns``, :func:`~stockade.net.namespace.entered`) just around the fork,
   which the child inherits; the child gets its own session, stdin from
   /dev/null, stdout and stderr to ``<state-dir>/containers/NS_NAME.log``;
5. record the pid in the endpoint record and supervise it.

Without step 3 first, a process could open connections in the window where
its address is unknown to the ruleset and so not isolated by any policy.

Supervision uses pidfds (``pidfd_open`` + ``poll`` in one thread), which also
work for processes that are not our children: when the agent restarts it
*adopts* the run-owned endpoints of its state. A pid that is alive and whose
``/proc/PID/ns/net`` is the endpoint's namespace is supervised again; a dead
one (or a pid reused by another process) is cleaned up. When a process exits,
its endpoint is deleted (and the kernel waited for), then its veth and
namespace are removed, its remaining process group is killed and its address
released — in that order, so that an address never goes to a new container
while a rule still names it. Stopping the agent leaves containers running.

The bridge carries the IPAM gateway address and every endpoint has a default
route via it. IP forwarding stays off: endpoints reach each other and the
agent's namespace, not the outside world.

Operations (an :class:`~stockade.agent.extension.Extension`, see
:mod:`stockade.agent.protocol`)::

    run {namespace, name, labels, ports, command, cwd?, env?} → {endpoint, pid, log}
    ps  {all?}                                                  → {items}
    rm  {key, grace?}                                           → {removed, exitCode}
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from stockade.agent.extension import Handler, Host
from stockade.agent.protocol import BAD_REQUEST, INVALID, NOT_FOUND, UNAVAILABLE, ApiError, Args
from stockade.agent.records import (
    OWNER_RUN,
    Change,
    DeleteEndpoint,
    EndpointRecord,
    PutEndpoint,
    decode_ports,
)
from stockade.agent.service import SYNC_TIMEOUT, Service, ipam_allocate, ipam_release
from stockade.errors import AgentError, DecodeError, NetError
from stockade.model.admit import validate_endpoint
from stockade.model.cluster import ContainerPort, Endpoint
from stockade.model.labels import Labels
from stockade.model.ports import parse_port_text
from stockade.net.namespace import entered
from stockade.net.plumber import Attachment, EndpointSpec, Plumber

log = logging.getLogger("stockade.containers")

GRACE = 5.0  # seconds between SIGTERM and SIGKILL for `rm`
KILL_WAIT = 5.0  # seconds to wait for the cleanup after SIGKILL
LOG_DIR = "containers"
IPAM_OWNER = "run:"
RECENT = 50  # exited containers `ps --all` remembers
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# ---- requests (pure) -------------------------------------------------------------------


@dataclass(frozen=True)
class RunRequest:
    """A validated `run` request."""

    namespace: str
    name: str
    labels: Labels
    ports: tuple[ContainerPort, ...]
    command: tuple[str, ...]
    cwd: str | None = None
    env: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse_port_spec(text: str) -> ContainerPort:
    """``80/tcp``, ``http=80/tcp``, ``53/udp`` or ``8080`` (TCP) → a container port.

    Raises ValueError with a message fit for the command line.
    """
    try:
        parsed = parse_port_text(text, named=True, numeric=True)
    except ValueError as exc:
        raise ValueError(f"port {text!r}: {exc}") from None
    assert isinstance(parsed.port, int)
    return ContainerPort(parsed.port, parsed.proto, parsed.name)


def _ports(raw: Any) -> tuple[ContainerPort, ...]:
    try:
        ports = decode_ports(raw, "ports")
    except DecodeError as exc:
        raise ApiError(BAD_REQUEST, f"run: args.{exc.message}") from None
    return tuple(replace(p, protocol=p.protocol.upper()) for p in ports)


def _strings(raw: Any, what: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise ApiError(INVALID, f"{what} must be a list of strings")
    if any("\0" in x for x in raw):
        raise ApiError(INVALID, f"{what} must not contain NUL characters")
    return tuple(raw)


def _env(raw: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise ApiError(BAD_REQUEST, "run: args.env must be an object of strings")
    out = tuple((str(k), v) for k, v in sorted(raw.items()))
    bad = [k for k, v in out if not k or "=" in k or "\0" in k + v]
    if bad:
        raise ApiError(INVALID, f"invalid environment variable name(s): {', '.join(bad)}")
    return out


def run_request(args: Mapping[str, Any]) -> RunRequest:
    """Decode and validate `run` arguments: every problem at once, or a RunRequest."""
    a = Args(args, "run")
    ns, name = a.text("namespace") or "default", a.text("name")
    labels = a.text_map("labels")
    ports = _ports(args.get("ports"))
    command = _strings(args.get("command") or [], "command")
    cwd = args.get("cwd")
    # The address comes from the pool later; everything else is checked as any Pod's.
    problems = [e.render() for e in validate_endpoint(Endpoint(ns, name, Labels(labels), (),
                                                               ports))
                if not e.path.startswith("status.podIPs")]
    if not command or not command[0]:
        problems.append("command: give the command to run")
    if cwd is not None and not (isinstance(cwd, str) and os.path.isabs(cwd)
                                and os.path.isdir(cwd)):
        problems.append(f"cwd: {cwd!r} is not an absolute path of a directory")
    if problems:
        raise ApiError(INVALID, f"cannot run {ns}/{name}", problems)
    return RunRequest(ns, name, Labels(labels), ports, command, cwd,
                      _env(args.get("env") or {}))


# ---- supervised processes --------------------------------------------------------------


@dataclass
class _Child:
    """A supervised process. `gone` is set once its endpoint is cleaned up."""

    key: str
    pid: int
    pidfd: int
    popen: subprocess.Popen[bytes] | None = None  # None when adopted
    exit_code: int | None = None
    exited: bool = False  # reaped; the cleanup may still be running
    gone: threading.Event = field(default_factory=threading.Event)


def _pidfd(pid: int) -> int | None:
    """A pidfd for `pid`, or None when there is no such process."""
    if pid <= 0:
        return None
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def _same_netns(pid: int, netns_path: str) -> bool:
    """True when process `pid` lives in the namespace pinned at `netns_path`."""
    try:
        mine, theirs = os.stat(f"/proc/{pid}/ns/net"), os.stat(netns_path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def _exited(pidfd: int) -> bool:
    return bool(select.select([pidfd], [], [], 0)[0])


def _reap(child: _Child) -> int | None:
    """Collect the exit status if the process was our child; None when unknown."""
    if child.popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return child.popen.wait(timeout=1.0)
        return None
    try:
        pid, status = os.waitpid(child.pid, os.WNOHANG)
    except ChildProcessError:  # adopted from an earlier agent: its parent is init
        return None
    return os.waitstatus_to_exitcode(status) if pid else None


def _signal_group(child: _Child, sig: signal.Signals) -> None:
    """Signal the process (through its pidfd: never a reused pid) and its process group."""
    with contextlib.suppress(ProcessLookupError, OSError):
        signal.pidfd_send_signal(child.pidfd, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, sig)


# ---- the manager ------------------------------------------------------------------------


class ContainerManager:
    """The agent extension: registers run/ps/rm, supervises, adopts after a restart."""

    def __init__(self, grace: float = GRACE) -> None:
        self.grace = grace
        self.service: Service | None = None
        self.plumber: Plumber | None = None
        self.log_dir = Path(".")
        self._lock = threading.Lock()  # _children, _starting, _recent
        self._plumb_lock = threading.Lock()  # a Plumber is not for two threads at once
        self._cleanup_lock = threading.RLock()
        self._children: dict[str, _Child] = {}
        self._starting: set[str] = set()
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT)
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._unavailable = ""  # why `run` cannot work here (no bridge)
        self.feed: Any = None  # the Kubernetes or etcd feed (pods of the datastore)

    # ---- extension life cycle -----------------------------------------------------------

    def operations(self) -> Mapping[str, Handler]:
        return {"run": self.op_run, "ps": self.op_ps, "rm": self.op_rm}

    def status(self) -> Mapping[str, Any]:
        return {"containers": self._status()}

    def start(self, agent: Host) -> None:
        """Bridge up, run-owned endpoints adopted, supervisor on."""
        service = agent.service
        if service.ipam is None:
            raise AgentError("the container manager needs the agent's address pool")
        cfg = agent.config
        self.service = service
        self.feed = getattr(agent, "kube_feed", None)
        # The pool in use (the store's, once allocated from), not only the configured one.
        self.plumber = Plumber(cfg.bridge_prefix, host_netns=cfg.netns,
                               subnet4=str(service.ipam.subnet))
        try:
            self.plumber.ensure_bridge(addresses=[service.ipam.gateway_interface])
        except NetError as exc:  # the agent still enforces policy; only `run` cannot work
            self._unavailable = str(exc)
            log.error("`stockade run` is unavailable: %s", exc)
        self.log_dir = Path(cfg.state_dir) / LOG_DIR
        self.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._adopt()
        self._sweep()
        self._thread = threading.Thread(target=self._supervise, name="containers", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop supervising; the containers keep running and the next agent adopts them."""
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=SYNC_TIMEOUT + 5)
        with self._lock:
            for child in self._children.values():
                os.close(child.pidfd)
            self._children.clear()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _svc(self) -> Service:
        if self.service is None:
            raise ApiError(UNAVAILABLE, "the container manager is not started")
        return self.service

    def _wake(self) -> None:
        if self._wake_w >= 0:
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"x")

    # ---- run -------------------------------------------------------------------------------

    def op_run(self, args: dict[str, Any]) -> dict[str, Any]:
        req = run_request(args)
        svc = self._svc()
        if self._unavailable:
            raise ApiError(UNAVAILABLE, f"`run` is unavailable on this agent: {self._unavailable}")
        with self._lock:
            if req.key in self._starting or req.key in svc.state.endpoints:
                raise ApiError(INVALID, f"endpoint {req.key} already exists "
                                        "(`stockade rm` it first, or pick another name)")
            self._starting.add(req.key)
        try:
            return self._run(req)
        finally:
            with self._lock:
                self._starting.discard(req.key)

    def _run(self, req: RunRequest) -> dict[str, Any]:
        svc = self._svc()
        owner = IPAM_OWNER + req.key
        try:
            address = ipam_allocate(svc, owner)
            attachment = self._plumb(req.key, address)
            record = self._register(req, attachment, address)
            child, log_path = self._spawn(req, record, attachment)
        except BaseException:
            self._discard(req.key)
            raise
        record = replace(record, pid=child.pid)
        svc.commit([PutEndpoint(record)], sync=False)  # the pid does not change the rules
        with self._lock:
            self._children[req.key] = child
        self._wake()
        log.info("container started", extra={"fields": {
            "endpoint": req.key, "ip": address, "pid": child.pid, "log": str(log_path)}})
        return {"endpoint": record.to_dict(), "pid": child.pid, "log": str(log_path)}

    def _plumb(self, key: str, address: str) -> Attachment:
        svc, plumber = self._svc(), self.plumber
        assert plumber is not None and svc.ipam is not None
        spec = EndpointSpec(key, ipv4=address, gateway4=str(svc.ipam.gateway))
        with self._plumb_lock:
            return plumber.ensure_endpoint(spec)

    def _register(self, req: RunRequest, att: Attachment, address: str) -> EndpointRecord:
        """Store the endpoint and return once the kernel enforces every rule about it."""
        svc = self._svc()
        ep = Endpoint(req.namespace, req.name, req.labels, (address.split("/")[0],), req.ports,
                      port=att.host_ifname, mac=att.mac.lower())
        record = EndpointRecord(ep, netns=att.netns_path, interface=att.ifname,
                                owner=OWNER_RUN,
                                command=req.command, created=time.time())
        with svc.lock:
            changes: list[Change] = svc.implicit_namespaces([req.namespace], {})
            evicted = self.feed.evictions(svc.state, record) if self.feed is not None else []
            changes += evicted
            changes.append(PutEndpoint(record))
            revision = svc.commit(changes, sync=False)
        if self.feed is not None:
            self.feed.examine([c.key for c in evicted])
        if not svc.reconciler.wait_for(revision, SYNC_TIMEOUT):
            raise ApiError(UNAVAILABLE, f"the kernel does not enforce revision {revision} after "
                                        f"{SYNC_TIMEOUT:.0f}s; {req.key} was not started")
        return record

    def _spawn(self, req: RunRequest, record: EndpointRecord,
               att: Attachment) -> tuple[_Child, Path]:
        """Start the command inside the endpoint's namespace (the fork inherits it)."""
        log_path = self.log_dir / f"{req.namespace}_{req.name}.log"
        env = {"PATH": os.environ.get("PATH", DEFAULT_PATH), "STOCKADE_ENDPOINT": req.key,
               "STOCKADE_IP": record.endpoint.ips[0], **dict(req.env)}
        with open(log_path, "wb") as out:
            os.chmod(log_path, 0o600)
            try:
                with entered(att.netns):
                    popen = subprocess.Popen(  # the caller's own command, never a shell
                        list(req.command), stdin=subprocess.DEVNULL, stdout=out,
                        stderr=subprocess.STDOUT, cwd=req.cwd, env=env,
                        start_new_session=True, close_fds=True)
            except OSError as exc:
                raise ApiError(INVALID, f"cannot start {req.command[0]!r}: "
                                        f"{exc.strerror or exc}") from None
        pidfd = os.pidfd_open(popen.pid)
        return _Child(req.key, popen.pid, pidfd, popen), log_path

    # ---- cleanup ---------------------------------------------------------------------------

    def _discard(self, key: str) -> None:
        """Endpoint out of the kernel first, then plumbing, then the address; best effort."""
        svc = self._svc()
        rec = svc.state.endpoints.get(key)
        if rec is not None and rec.owner == OWNER_RUN:
            try:
                svc.commit([DeleteEndpoint(key)], sync=True)
            except AgentError as exc:
                log.error("endpoint %s: removal not enforced yet: %s", key, exc)
        if self.plumber is not None:
            try:
                with self._plumb_lock:
                    self.plumber.remove_endpoint(key)
            except NetError as exc:
                log.error("endpoint %s: cannot remove its plumbing: %s", key, exc)
        ipam_release(svc, IPAM_OWNER + key)

    def _finish(self, child: _Child) -> None:
        """The process exited: reap it, kill what is left of its group, remove the endpoint."""
        with self._cleanup_lock:
            if child.gone.is_set():
                return
            child.exit_code = _reap(child)
            with self._lock:
                child.exited = True
                self._recent.append({"key": child.key, "pid": child.pid,
                                     "exitCode": child.exit_code, "exited": time.time()})
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
            self._discard(child.key)
            with self._lock:
                if self._children.get(child.key) is child:  # else stop() closed the pidfd
                    del self._children[child.key]
                    os.close(child.pidfd)
            child.gone.set()
        log.info("container exited; endpoint removed", extra={"fields": {
            "endpoint": child.key, "pid": child.pid, "exit_code": child.exit_code}})

    # ---- supervision -------------------------------------------------------------------------

    def _supervise(self) -> None:
        """One thread polls every pidfd (readable once the process exits) and the wake pipe."""
        while not self._stopping.is_set():
            with self._lock:
                watched = {c.pidfd: c for c in self._children.values()}
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            for fd in watched:
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll():
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                elif not self._stopping.is_set():
                    self._finish_logged(watched[fd])

    def _finish_logged(self, child: _Child) -> None:
        try:
            self._finish(child)
        except Exception:  # the supervisor must outlive one failed cleanup
            log.exception("cleanup of %s failed", child.key)

    def _adopt(self) -> None:
        """Supervise again what an earlier agent started; clean up what died meanwhile."""
        svc = self._svc()
        # The state is read under the service's lock: a feed (the API's lists, at start)
        # commits into it meanwhile, and a walk of it would see it change size.
        with svc.lock:
            runs = [(k, r) for k, r in sorted(svc.state.endpoints.items())
                    if r.owner == OWNER_RUN]
        for key, rec in runs:
            pidfd = _pidfd(rec.pid)
            if pidfd is not None and _same_netns(rec.pid, rec.netns) and not _exited(pidfd):
                self._children[key] = _Child(key, rec.pid, pidfd)
                log.info("container adopted", extra={"fields": {"endpoint": key,
                                                                "pid": rec.pid}})
                continue
            if pidfd is not None:
                if _exited(pidfd):  # a zombie of ours (the agent ran in-process): reap it
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(rec.pid, os.WNOHANG)
                os.close(pidfd)
            log.info("container gone while the agent was down; cleaning up",
                     extra={"fields": {"endpoint": key, "pid": rec.pid}})
            self._discard(key)

    def _sweep(self) -> None:
        """Undo what a crash between the steps of `run` left: an address without endpoint.

        The address is stored before anything is plumbed, so an address of
        owner ``run:KEY`` without a run-owned endpoint KEY marks exactly the
        runs that did not finish; their namespace and veth go with it. Nothing
        else with the bridge prefix is touched: the CNI plugin or another user
        of the same prefix may own it.
        """
        svc, plumber = self._svc(), self.plumber
        assert svc.ipam is not None and plumber is not None
        with svc.lock:  # as in `_adopt`: the feed commits meanwhile
            run_keys = {k for k, r in svc.state.endpoints.items() if r.owner == OWNER_RUN}
            owners = list(svc.ipam.to_dict()["allocated"].values())
        for owner in owners:
            key = owner[len(IPAM_OWNER):]
            if owner.startswith(IPAM_OWNER) and key not in run_keys:
                log.info("removing what an interrupted run left",
                         extra={"fields": {"endpoint": key}})
                self._discard(key)

    # ---- ps and rm ----------------------------------------------------------------------------

    def op_ps(self, args: dict[str, Any]) -> dict[str, Any]:
        svc = self._svc()
        with svc.lock:
            records = [r for _, r in sorted(svc.state.endpoints.items()) if r.owner == OWNER_RUN]
        with self._lock:
            items = [self._item(r, self._children.get(r.key)) for r in records]
            live = {(i["key"], i["pid"]) for i in items}
            recent = [e for e in self._recent if (e["key"], e["pid"]) not in live]
        return {"items": items,
                "exited": recent if Args(args, "ps").flag("all", False) else []}

    def _item(self, rec: EndpointRecord, child: _Child | None) -> dict[str, Any]:
        if rec.key in self._starting or rec.pid == 0:
            state = "starting"
        elif child is not None and not child.exited:
            state = "running"
        else:
            state = "exited"
        return {**rec.to_dict(), "key": rec.key, "state": state,
                "log": str(self.log_dir / f"{rec.endpoint.namespace}_{rec.endpoint.name}.log")}

    def op_rm(self, args: dict[str, Any]) -> dict[str, Any]:
        a = Args(args, "rm")
        key = a.text("key")
        grace = a.number("grace", self.grace, lo=0.0, hi=600.0)
        svc = self._svc()
        rec = svc.state.endpoints.get(key)
        if rec is None:
            raise ApiError(NOT_FOUND, f"no container {key}")
        if rec.owner != OWNER_RUN:
            raise ApiError(INVALID, f"endpoint {key} is managed by {rec.owner}, not `run`")
        with self._lock:
            if key in self._starting:
                raise ApiError(UNAVAILABLE, f"{key} is still starting; try again")
            child = self._children.get(key)
        if child is None:  # nothing to stop: a record whose process is already gone
            self._discard(key)
            return {"removed": True, "exitCode": None}
        return {"removed": True, "exitCode": self._stop_child(child, grace)}

    def _stop_child(self, child: _Child, grace: float) -> int | None:
        """SIGTERM, SIGKILL after `grace`; the supervisor cleans up (or we do, if it cannot)."""
        _signal_group(child, signal.SIGTERM)
        if not child.gone.wait(max(0.0, grace)):
            log.info("container ignored SIGTERM; killing it", extra={"fields": {
                "endpoint": child.key, "grace": grace}})
            _signal_group(child, signal.SIGKILL)
            if not child.gone.wait(KILL_WAIT):
                self._finish(child)
        return child.exit_code

    def _status(self) -> dict[str, int]:
        with self._lock:
            return {"running": len(self._children), "starting": len(self._starting)}
