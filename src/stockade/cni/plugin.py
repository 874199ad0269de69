"""``stockade-cni``: the CNI plugin executable (the shell around :mod:`stockade.cni.spec`).

A runtime runs it once per operation: ``CNI_*`` variables in the
environment, the network configuration on stdin, the result or an error
object on stdout, exit 0 or 1. Two modes (``"mode"`` in the configuration;
without it ADD picks chained when a previous plugin made an interface):

* **main** — the veth into ``CNI_NETNS``, the host side on stockade's bridge,
  an address from the agent's pool (or from the IPAM plugin the ``ipam``
  section names, run from ``CNI_PATH``), routes via the gateway;
* **chained** — after e.g. the reference ``bridge`` + ``host-local``: the
  endpoint is taken from ``prevResult`` and the result passed on unchanged.

Either way ADD hands the endpoint, with its labels, to the agent
(``cni.add``, see :mod:`stockade.agent.cni_ops`) and returns only once the
kernel enforces its policy. In main mode the endpoint is registered *before*
its interface exists, so the container can never send a packet its policy
does not govern. If the agent cannot be reached ADD fails with code 11 and
leaves nothing behind: every step pushes its undo, and a failure runs them
backwards (see :class:`Undo`).

DEL is idempotent and best-effort: the veth goes, then the endpoint (the
agent releases its pool's address in the same transaction), then a
delegated IPAM's address — in that order, so an address never goes to a new
container while a rule still names it. A missing namespace, veth or record
is fine; an unreachable agent is not (code 11: the runtime retries), because
the address it holds must not be forgotten.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import IO, TYPE_CHECKING, Any

from stockade.agent.cni_keys import attachment_id
from stockade.cni.spec import (
    AGENT_OUTDATED,
    AGENT_REFUSED,
    CHECK_FAILED,
    INTERNAL,
    INVALID_CONFIG,
    INVALID_ENVIRONMENT,
    LATEST,
    LIMITED_CONNECTIVITY,
    MODE_CHAINED,
    MODE_MAIN,
    NOT_AVAILABLE,
    NOT_ENFORCED,
    TRY_AGAIN,
    CniError,
    Env,
    IPConfig,
    NetConf,
    Result,
    convert_result,
    default_routes,
    effective_mode,
    effective_routes,
    endpoint_identity,
    error_version,
    main_result,
    parse_conf,
    parse_env,
    parse_result,
    requested_version,
    require_prev_result,
    version_report,
)
from stockade.cni.state import AttachmentState, StateDir

if TYPE_CHECKING:  # attach (netlink) is imported only where a command needs it
    from stockade.cni.attach import InterfaceView, Plumbing, Veth


@dataclass(frozen=True)
class Call:
    """One invocation: what the runtime said, and where the agent is."""

    conf: NetConf
    env: Env

    @property
    def id(self) -> str:
        return attachment_id(self.conf.name, self.env.container_id, self.env.ifname)

    @property
    def state(self) -> StateDir:
        return StateDir(self.conf.data_dir, self.conf.name)

    def socket(self) -> str:
        from stockade.agent.client import socket_path

        # The invocation's environment, not this process's: inside the agent (cni.exec)
        # they differ.
        return socket_path(self.conf.socket or self.env.inherited.get("STOCKADE_SOCKET")
                           or None)

    def agent(self, op: str, **args: Any) -> Any:
        return agent_call(self.socket(), op, args)

    def ident(self) -> dict[str, str]:
        return {"network": self.conf.name, "containerID": self.env.container_id,
                "ifname": self.env.ifname}


# ---- talking to the agent ----------------------------------------------------------------


BUSY = os.strerror(errno.EAGAIN)  # how a unix socket says its listen backlog is full
BUSY_PATIENCE = 10.0  # seconds a plugin keeps knocking on a busy agent


def agent_call(path: str, op: str, args: Mapping[str, Any]) -> Any:
    """One request; the agent's failures as CNI errors a runtime knows how to treat.

    A full listen backlog (many plugin processes at once: a node starting its
    pods) is not an unreachable agent: the connection is tried again, with
    growing pauses, before the runtime is told to try again later.
    """
    from stockade.agent.client import AgentClient
    from stockade.agent.protocol import ApiError
    from stockade.errors import AgentError

    deadline = time.monotonic() + BUSY_PATIENCE
    pause = 0.005
    while True:
        try:
            with _connection(path, AgentClient) as client:
                return client.call(op, **args)
        except ApiError as exc:
            # The agent's connection cap or in-flight memory cap: busy, not broken.
            if exc.code == "unavailable" and "try again" in exc.message \
                    and time.monotonic() < deadline:
                time.sleep(pause)
                pause = min(pause * 2, 0.2)
                continue
            raise _api_error(op, exc.code, exc.message, exc.lines) from None
        except AgentError as exc:
            if BUSY in str(exc) and time.monotonic() < deadline:
                time.sleep(pause)
                pause = min(pause * 2, 0.2)
                continue
            raise CniError(TRY_AGAIN, "the stockade agent is not reachable",
                           str(exc)) from None


# `clients`: the connections of this thread's invocation; `within`: inside the agent
# (cni.exec), the client that calls it in-process
_invocation = threading.local()


@contextlib.contextmanager
def _connection(path: str, client: Callable[..., Any]) -> Iterator[Any]:
    """The invocation's connection to the agent, kept for its next request (see `run`).

    A new connection costs the agent an accept in its one thread that reads every
    request, which many ADDs at once queue for. Outside `run`: one per request.
    Inside the agent (`run`'s ``within``) there is no connection: the requests are
    the same lines, answered by the same functions, without the socket.
    """
    within = getattr(_invocation, "within", None)
    if within is not None:
        yield within
        return
    kept: dict[str, Any] | None = getattr(_invocation, "clients", None)
    if kept is None:
        with client(path, timeout=90.0) as fresh:
            yield fresh
        return
    if path not in kept:
        kept[path] = client(path, timeout=90.0)
    yield kept[path]  # a failed call closes it, and the next one connects anew


def _api_error(op: str, code: str, message: str, lines: list[str]) -> CniError:
    details = "; ".join([message, *lines])
    if code == "bad_request" and ("unknown operation" in message
                                  or "is not served" in message):
        return CniError(AGENT_OUTDATED, f"the agent does not serve {op}",
                        "run an agent with the CNI extension (stockade.agent.cni_ops)")
    if code in ("unavailable", "timeout"):
        return CniError(TRY_AGAIN, f"the agent could not complete {op} now", details)
    if code == "invalid":
        return CniError(AGENT_REFUSED, "the agent refused the endpoint", details)
    return CniError(INTERNAL, f"the agent failed {op}", details)


def agent_ready(call: Call) -> None:
    """Fail fast (code 11) before anything is taken when the agent cannot serve ADD."""
    st = call.agent("cni.status")
    if not st.get("ready"):
        raise CniError(TRY_AGAIN, "the stockade agent is not ready yet")


# ---- undo --------------------------------------------------------------------------------


@dataclass
class Undo:
    """Undo actions of the steps done so far; a failed ADD runs them backwards.

    The first action that fails stops the undo, because earlier steps depend
    on later ones being undone first: a delegated address is released only
    once the endpoint naming it is gone. Then the attachment's state file
    stays, marked incomplete, and the runtime's DEL (or GC) finishes the job.
    """

    steps: list[Callable[[], object]] = field(default_factory=list)

    def push(self, step: Callable[[], object]) -> None:
        self.steps.append(step)

    def run(self) -> bool:
        """True when every step was undone."""
        while self.steps:
            step = self.steps.pop()
            try:
                step()
            except Exception:  # the ADD's own error is the one to report
                self.steps.clear()
                return False
        return True


@contextlib.contextmanager
def undoing(call: Call) -> Iterator[Undo]:
    """Undo on failure; then drop the state file if everything was undone."""
    undo = Undo()
    try:
        yield undo
    except BaseException:
        if undo.run():
            call.state.remove(call.env.container_id, call.env.ifname)
        raise


# ---- ADD ---------------------------------------------------------------------------------


def cmd_add(call: Call) -> dict[str, Any]:
    mode = effective_mode(call.conf)
    agent_ready(call)  # before anything is taken, even a lock file
    with call.state.locked():
        prior = call.state.read(call.env.container_id, call.env.ifname)
        if mode == MODE_CHAINED and (prior is None or prior.mode == MODE_CHAINED):
            # Also a repeat: the agent replaces the record in one transaction, so the
            # address the previous plugin configured is never without its policy.
            return _add_chained(call)
        if prior is not None and prior.complete and _still_there(call, prior):
            return _again(call, prior)
        if prior is not None:
            _release(call, prior)  # a failed or stale ADD: start from nothing
        return _add_chained(call) if mode == MODE_CHAINED else _add_main(call)


def _register(call: Call, undo: Undo, ips: list[str], host_if: str,
              allocate: bool, mac: str = "") -> dict[str, Any]:
    """The endpoint (and maybe its address) at the agent, enforced, with its undo; in main
    mode with the port and MAC its addresses are bound to (the datapath's guard)."""
    namespace, name = endpoint_identity(call.conf, call.env)
    undo.push(lambda: call.agent("cni.del", **call.ident()))
    attached = {"hostInterface": host_if, "mac": mac} if mac else {"hostInterface": host_if}
    return dict(call.agent(
        "cni.add", **call.ident(), allocate=allocate, labels=call.conf.labels,
        endpoint={"namespace": namespace, "name": name, "ips": ips, "netns": call.env.netns,
                  "interface": call.env.ifname, **attached}, sync=True))


def _attached(call: Call, registered: Mapping[str, Any]) -> None:
    """Tell the agent the interface exists when its datapath binds interfaces themselves
    (eBPF binds the new port now); the others bound it by name in the apply ADD waited
    for, and say so in their answer, which spares them this round trip."""
    if not registered.get("bindsInterfaces", True):
        return
    try:
        call.agent("cni.attached", **call.ident())
    except CniError as exc:
        if exc.code != AGENT_OUTDATED:
            raise
        # an agent from before guards: it has nothing to bind to the interface


def new_mac() -> str:
    """A random unicast, locally administered MAC: chosen before the veth exists, so that
    the agent binds the port to it before the container can send a frame."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


def _add_chained(call: Call) -> dict[str, Any]:
    conf, env = call.conf, call.env
    prev = require_prev_result(conf, "ADD")
    raw = conf.prev_result
    assert raw is not None  # require_prev_result saw it
    ips = prev.container_ips(env.ifname, env.netns)
    if not ips:
        raise CniError(INVALID_CONFIG, f"prevResult has no address for {env.ifname}",
                       "a chained stockade needs a plugin before it that assigns one")
    state = AttachmentState(conf.name, env.container_id, env.ifname, env.netns,
                            MODE_CHAINED)
    host_if, mac = _chained_port(call, prev)
    if mac:
        from stockade.cni import attach

        attach.own_link_local(env.netns, env.ifname, mac)  # the one its guard binds
    with undoing(call) as undo:
        call.state.write(state)
        reg = _register(call, undo, [ip.ip for ip in ips], host_if, allocate=False, mac=mac)
        call.state.write(replace(state, key=reg["key"]).done(convert_result(raw, LATEST)))
    return convert_result(raw, conf.cni_version)


def _chained_port(call: Call, prev: Result) -> tuple[str, str]:
    """The port the previous plugin made, and the container's MAC, for the guard: the host
    side of the container's veth, as the kernel pairs them, and listed by the previous
    plugin outside the sandbox; ("", "") when they do not agree (not a veth, another
    plugin's shape): the endpoint is then enforced unguarded, as before. Read before
    the container runs, so nothing in it has had a chance to change its side."""
    from stockade.cni import attach
    from stockade.model.admit import validate_attachment

    if not attach.is_netns(call.env.netns):
        return "", ""
    host_if, mac = attach.host_peer(call.env.netns, call.env.ifname)
    if not host_if or host_if not in {i.name for i in prev.interfaces if not i.sandbox}:
        return "", ""
    fields = {e.path for e in validate_attachment(host_if, mac)}
    if "hostInterface" in fields:
        return "", ""
    return host_if, "" if "mac" in fields else mac  # a multicast MAC: bound to addresses


def _add_main(call: Call) -> dict[str, Any]:
    """Address, endpoint enforced, then the veth: see the module doc for why this order."""
    from stockade.cni import attach

    conf, env = call.conf, call.env
    if not attach.is_netns(env.netns):
        raise CniError(INVALID_ENVIRONMENT, "CNI_NETNS is not a network namespace", env.netns)
    host_if = attach.host_ifname(conf.veth_prefix, call.id)
    ipam = str(conf.ipam["type"]) if conf.ipam is not None else "stockade"
    state = AttachmentState(conf.name, env.container_id, env.ifname, env.netns, MODE_MAIN,
                            "", host_if, ipam)
    # The namespace entered and the interface name checked before anything is taken;
    # what is left of the plumbing after the agent's answer is all an ADD waits for.
    with attach.Plumbing(env.netns, env.ifname) as plumbing, undoing(call) as undo:
        plumbing.check_free()
        call.state.write(state)
        mac = new_mac()
        reg, got = _address(call, undo, host_if, mac)
        state = replace(state, key=reg["key"])
        veth = _plumb(call, undo, plumbing, host_if, got, mac)
        _attached(call, reg)
        result = main_result(env.ifname, env.netns, veth.mac, host_if, veth.host_mac, got.ips,
                             got.routes, got.dns, conf.mtu)
        call.state.write(state.done(result.render(LATEST)))
    return result.render(conf.cni_version)


def _address(call: Call, undo: Undo, host_if: str, mac: str,
             ) -> tuple[Mapping[str, Any], Result]:
    """The address (the IPAM plugin's or the pool's) and the endpoint, enforced.

    Returns the agent's answer (the endpoint's key among it) and what to configure:
    addresses, routes, DNS.
    """
    from stockade.cni.delegate import Delegate

    conf = call.conf
    if conf.ipam is not None:
        delegate = Delegate(conf, call.env)
        got = delegate.add()  # a failed ADD holds nothing: the IPAM plugin's contract
        undo.push(delegate.delete)
        reg = _register(call, undo, [ip.ip for ip in got.ips], host_if, allocate=False,
                        mac=mac)
        routes = got.routes or default_routes(got.ips)
        return reg, Result((), got.ips, routes, got.dns)
    reg = _register(call, undo, [], host_if, allocate=True, mac=mac)
    gateway = reg["gateway"] if conf.is_gateway else ""  # else there is no way out
    ips = (IPConfig(reg["address"], gateway),)
    return reg, Result((), ips, default_routes(ips))


def _plumb(call: Call, undo: Undo, plumbing: Plumbing, host_if: str, got: Result,
           mac: str) -> Veth:
    """Bridge, veth, addresses (interface down), interface up, routes."""
    from stockade.cni import attach

    conf = call.conf
    gateways = _gateways(got.ips) if conf.is_gateway else []
    # The bridge is made once and then only read: ADDs at once would queue on its lock
    # for nothing, so the lock is taken only to create or mend it (ensure_bridge reads
    # again under it: another ADD may have done the work meanwhile).
    if not plumbing.bridge_ready(conf.bridge, gateways):
        with call.state.bridge_lock(conf.bridge):
            attach.ensure_bridge(conf.bridge, gateways)
    undo.push(lambda: attach.remove_veth(host_if))
    host_mac = plumbing.create_veth(host_if, conf.bridge, conf.mtu, mac)
    mac = plumbing.configure(got.ips, effective_routes(got.routes, got.ips))
    return attach.Veth(host_if, host_mac, mac)


def _gateways(ips: Sequence[IPConfig]) -> list[str]:
    """What the bridge carries: each gateway with its subnet's prefix length."""
    out = []
    for ip in ips:
        if ip.gateway:
            prefix = ipaddress.ip_interface(ip.address).network.prefixlen
            out.append(f"{ip.gateway}/{prefix}")
    return out


def _still_there(call: Call, prior: AttachmentState) -> bool:
    """A completed main-mode ADD whose veth still exists (a repeated ADD converges on it)."""
    from stockade.cni import attach

    if prior.netns != call.env.netns or not attach.is_netns(call.env.netns):
        return False
    return attach.inspect(call.env.netns, call.env.ifname).exists and \
        attach.inspect(None, prior.host_interface).exists


def _again(call: Call, prior: AttachmentState) -> dict[str, Any]:
    """ADD once more for a complete attachment: re-assert the endpoint, same result."""
    result = parse_result(prior.result, "stored result")
    ips = result.container_ips(call.env.ifname, call.env.netns)
    pooled = prior.mode == MODE_MAIN and prior.ipam == "stockade"  # the same address again
    inner = [i.mac.lower() for i in result.interfaces
             if i.name == call.env.ifname and i.sandbox == call.env.netns and i.mac]
    _register(call, Undo(), [] if pooled else [ip.ip for ip in ips], prior.host_interface,
              allocate=pooled, mac=inner[0] if inner and prior.host_interface else "")
    return convert_result(prior.result, call.conf.cni_version)


# ---- DEL ---------------------------------------------------------------------------------


def cmd_del(call: Call) -> None:
    with call.state.locked():
        prior = call.state.read(call.env.container_id, call.env.ifname)
        _release(call, prior)


def _release(call: Call, prior: AttachmentState | None) -> None:
    """Everything an attachment holds, gone, in the order the module doc gives."""
    from stockade.cni.delegate import Delegate

    conf = call.conf
    mode = prior.mode if prior is not None else conf.mode
    if mode != MODE_CHAINED:
        from stockade.cni import attach

        host_if = prior.host_interface if prior is not None and prior.host_interface \
            else attach.host_ifname(conf.veth_prefix, call.id)
        attach.remove_veth(host_if)
    call.agent("cni.del", **call.ident(), sync=True)
    delegated = prior.ipam if prior is not None else (
        str(conf.ipam["type"]) if conf.ipam is not None else "")
    if mode != MODE_CHAINED and delegated not in ("", "stockade") and conf.ipam is not None:
        Delegate(conf, replace(call.env, command="DEL")).delete()
    call.state.remove(call.env.container_id, call.env.ifname)


# ---- CHECK -------------------------------------------------------------------------------


def cmd_check(call: Call) -> None:
    from stockade.cni import attach

    conf, env = call.conf, call.env
    prev = require_prev_result(conf, "CHECK")
    with call.state.locked():
        prior = call.state.read(env.container_id, env.ifname)
    mode = prior.mode if prior is not None else effective_mode(conf)
    ips = prev.container_ips(env.ifname, env.netns)
    if not attach.is_netns(env.netns):
        raise CniError(CHECK_FAILED, "CNI_NETNS is not a network namespace", env.netns)
    inner = attach.inspect(env.netns, env.ifname)
    problems = _interface_problems(inner, env.ifname, ips)
    if mode == MODE_MAIN and prior is not None:
        problems += _main_problems(call, prior, prev, inner)
    if problems:
        raise CniError(CHECK_FAILED, "the attachment is not as ADD left it",
                       "; ".join(problems))
    if mode == MODE_MAIN and conf.ipam is not None:
        from stockade.cni.delegate import Delegate

        Delegate(conf, env).check()
    seen = call.agent("cni.check", **call.ident(), ips=[ip.ip for ip in ips])
    if not (seen.get("known") and seen.get("applied") and seen.get("inKernel")):
        raise CniError(NOT_ENFORCED, "the agent does not enforce this endpoint",
                       "; ".join(seen.get("problems") or []))


def _interface_problems(view: InterfaceView, ifname: str,
                        ips: tuple[IPConfig, ...]) -> list[str]:
    if not view.exists:
        return [f"{ifname} is missing"]
    out = [] if view.up else [f"{ifname} is down"]
    out += [f"{ifname} lacks {ip.address}" for ip in ips
            if str(ipaddress.ip_interface(ip.address)) not in view.addresses]
    return out


def _main_problems(call: Call, prior: AttachmentState, prev: Result,
                   inner: InterfaceView) -> list[str]:
    """Our own resources: the veth's kind and MAC, its host side, the routes we made."""
    from stockade.cni import attach

    out: list[str] = []
    index = prev.sandbox_interface(call.env.ifname, call.env.netns)
    if index is not None and prev.interfaces[index].mac and \
            prev.interfaces[index].mac.lower() != inner.mac.lower():
        out.append(f"{call.env.ifname} has MAC {inner.mac}, not {prev.interfaces[index].mac}")
    if inner.kind != "veth":
        out.append(f"{call.env.ifname} is a {inner.kind or 'device'}, not a veth")
    host = attach.inspect(None, prior.host_interface)
    if not host.exists:
        out.append(f"host veth {prior.host_interface} is missing")
    elif host.master != call.conf.bridge or not host.up:
        out.append(f"host veth {prior.host_interface} is not up on {call.conf.bridge}")
    stored = parse_result(prior.result, "stored result")
    ours = {(r.dst, r.gw) for r in effective_routes(stored.routes, stored.ips)}
    listed = {(r.dst, r.gw) for r in effective_routes(prev.routes, prev.ips)}
    for dst, gw in sorted(ours & listed):
        if (str(ipaddress.ip_network(dst, strict=False)), gw) not in inner.routes:
            out.append(f"route {dst} via {gw} is missing")
    return out


# ---- GC and STATUS -----------------------------------------------------------------------


def cmd_gc(call: Call) -> None:
    conf = call.conf
    valid = conf.valid_attachments
    if valid is None:
        raise CniError(INVALID_CONFIG, "GC needs cni.dev/valid-attachments")
    keep = set(valid)
    any_ifname = {cid for cid, ifname in valid if not ifname}
    with call.state.locked(exclusive=True):
        stale = [s for s in call.state.all() if (s.container_id, s.ifname) not in keep
                 and s.container_id not in any_ifname]
        for st in stale:
            if st.mode != MODE_CHAINED and st.host_interface:
                from stockade.cni import attach

                attach.remove_veth(st.host_interface)
        seen = call.agent("cni.gc", network=conf.name, sync=True,
                          valid=[{"containerID": c, "ifname": i} for c, i in sorted(keep)])
        for st in stale:
            _gc_delegate(call, st)
            call.state.remove(st.container_id, st.ifname)
        # Veth names hash the interface: without it, or on someone else's bridge (chained),
        # every port stays.
        if not any_ifname and conf.mode != MODE_CHAINED:
            _gc_orphan_veths(call, keep, set(seen.get("hostInterfaces") or ()))
        if conf.ipam is not None:
            from stockade.cni.delegate import Delegate

            Delegate(conf, call.env).gc()


def _gc_delegate(call: Call, st: AttachmentState) -> None:
    if st.mode == MODE_CHAINED or st.ipam in ("", "stockade") or call.conf.ipam is None:
        return
    from stockade.cni.delegate import Delegate

    env = replace(call.env, command="DEL", container_id=st.container_id, ifname=st.ifname,
                  netns="")
    Delegate(call.conf, env).delete()


def _gc_orphan_veths(call: Call, keep: set[tuple[str, str]], claimed: set[str]) -> None:
    """Our veths on the bridge that nothing accounts for: no valid attachment, no state
    file of any network (a bridge may be shared), no endpoint of the agent's.

    The ports are listed *before* the state files are read: an ADD writes its
    state before it creates its veth, so a veth in the list has its state on
    disk by the time the files are read, whichever network's ADD made it.
    """
    from stockade.cni import attach
    from stockade.net.naming import Naming

    conf = call.conf
    naming = Naming(conf.veth_prefix)
    ports = [p for p in attach.bridge_ports(conf.bridge)
             if naming.owns_link(p) and p != naming.bridge]
    wanted = {attach.host_ifname(conf.veth_prefix, attachment_id(conf.name, c, i))
              for c, i in keep} | claimed
    wanted |= {st.host_interface for st in _all_states(conf.data_dir)}
    for port in ports:
        if port not in wanted:
            attach.remove_veth(port)


def _all_states(data_dir: str) -> list[AttachmentState]:
    """Every network's attachments: a shared bridge must not lose another network's veths."""
    try:
        networks = sorted(os.listdir(data_dir))
    except FileNotFoundError:
        return []
    out: list[AttachmentState] = []
    for name in networks:
        if os.path.isdir(os.path.join(data_dir, name)):
            out += StateDir(data_dir, name).all()
    return out


def cmd_status(call: Call) -> None:
    try:
        st = call.agent("cni.status")
    except CniError as exc:
        if exc.code == TRY_AGAIN:
            raise CniError(NOT_AVAILABLE, "the stockade agent is not reachable",
                           exc.details) from None
        raise
    if not st.get("ready"):
        raise CniError(NOT_AVAILABLE, "the stockade agent is not ready yet")
    if st.get("error"):
        raise CniError(LIMITED_CONNECTIVITY, "the agent cannot program the kernel",
                       str(st["error"]))
    if call.conf.ipam is not None:
        from stockade.cni.delegate import Delegate

        Delegate(call.conf, call.env).status()


# ---- the executable ----------------------------------------------------------------------

HANDLERS: dict[str, Callable[[Call], dict[str, Any] | None]] = {
    "ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "GC": cmd_gc, "STATUS": cmd_status,
}


def run(environ: Mapping[str, str], stdin: bytes, out: IO[str], err: IO[str], *,
        within: Any = None) -> int:
    """One invocation, start to finish; returns the exit status.

    ``within``: the invocation runs inside the agent the configuration names
    (cni.exec); its requests go to this client (``call``, ``close``) instead of
    a connection to the agent's socket.
    """
    requested = requested_version(stdin)
    try:
        env = parse_env(environ)
        if env.command == "VERSION":
            _write(out, version_report(requested))
            return 0
        conf = parse_conf(stdin, env)
        _invocation.clients = {}
        _invocation.within = within
        try:
            result = HANDLERS[env.command](Call(conf, env))
        finally:
            for client in _invocation.clients.values():
                client.close()
            _invocation.clients = None
            _invocation.within = None
        if result is not None:
            _write(out, result)
        return 0
    except CniError as exc:
        _write(out, exc.to_dict(error_version(requested)))
        return 1
    except Exception as exc:  # a bug; the runtime still gets the spec's error shape
        import traceback

        traceback.print_exc(file=err)
        _write(out, CniError(INTERNAL, "unexpected failure",
                             f"{type(exc).__name__}: {exc}").to_dict(error_version(requested)))
        return 1


def _write(out: IO[str], doc: Mapping[str, Any]) -> None:
    out.write(json.dumps(doc, separators=(",", ":")) + "\n")
    out.flush()


def main() -> None:
    stdin = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    sys.exit(run(os.environ, stdin, sys.stdout, sys.stderr))


if __name__ == "__main__":
    main()
