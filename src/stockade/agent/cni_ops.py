"""The agent's side of the CNI plugin: attachments, kept in the same transactions as endpoints.

An *attachment* is the runtime's ``(network, containerID, ifname)``; it maps
to one endpoint (``namespace/name``, owner ``cni``) and, when the agent's pool
gave the address, to one IPAM owner ``<containerID>/<ifname>``. Each operation
below changes the endpoint, the address pool and the attachment table in ONE
store transaction (meta key ``cni``), under the service lock: two plugin
processes racing can never get one address twice, and a plugin killed midway
leaves either everything or nothing registered.

Why an extension rather than the plain ``endpoint.add``/``ipam.allocate``:

* atomicity (above), and one round trip per ADD instead of two or three;
* labels of a Kubernetes pod: when the plugin gives none, the endpoint keeps
  the labels (and named ports) of the record the agent already has under that
  name — a Pod applied through the API, or the pod's previous sandbox;
* DEL removes the endpoint only if it still belongs to *this* attachment: a
  pod whose sandbox was recreated keeps its new endpoint when the old one's
  DEL arrives late;
* GC needs to know which network an endpoint came from;
* CHECK compares the endpoint's footprint in the kernel with the ruleset last
  applied.

Operations (args → result)::

    cni.add   {network, containerID, ifname, endpoint: {namespace, name, ips?, ports?,
               netns, interface, hostInterface}, labels?, allocate, sync}
              → {revision, key, labels, inherited, address?, gateway?, subnet?}
    cni.del   {network, containerID, ifname, sync}  → {removed, released, revision}
    cni.check {network, containerID, ifname, ips?}  → {known, key, applied, inKernel,
                                                       problems, revision}
    cni.gc    {network, valid: [{containerID, ifname}], sync}
              → {removed: [ids], released: [addresses], revision, hostInterfaces}
    cni.status                                      → {ready, inSync, error, attachments}

``sync`` (default true) returns only once the kernel enforces the change.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from stockade.agent.cni_keys import attachment_id, ipam_owner
from stockade.agent.extension import Handler, Host
from stockade.agent.group import Part
from stockade.agent.protocol import BAD_REQUEST, INVALID, UNAVAILABLE, ApiError, Args
from stockade.agent.reconcile import ApplyReport
from stockade.agent.records import (
    OWNER_CNI,
    OWNER_RUN,
    Change,
    DeleteEndpoint,
    EndpointRecord,
    PutEndpoint,
    decode_labels,
    decode_ports,
)
from stockade.agent.service import Service, wait_enforced
from stockade.cni.spec import (
    CniError,
    validate_container_id,
    validate_ifname,
    validate_network_name,
)
from stockade.compile.ir import ADDR_PORT, Ruleset
from stockade.compile.nft import canonical
from stockade.errors import BlockNeeded, DecodeError, NetError
from stockade.model.admit import validate_endpoint
from stockade.model.cluster import ContainerPort, Endpoint
from stockade.model.labels import Labels

log = logging.getLogger("stockade.cni")

META = "cni"
CONVERGE = 2.0  # seconds CHECK allows the kernel to catch up (the spec asks for some)


@dataclass(frozen=True)
class CniAttachment:
    network: str
    container_id: str
    ifname: str
    key: str  # the endpoint, namespace/name
    ipam_owner: str = ""  # its address's owner in the agent's pool; "" when from elsewhere
    created: float = 0.0

    @property
    def id(self) -> str:
        return attachment_id(self.network, self.container_id, self.ifname)

    def to_dict(self) -> dict[str, Any]:
        return {"network": self.network, "containerID": self.container_id,
                "ifname": self.ifname, "key": self.key, "ipamOwner": self.ipam_owner,
                "created": self.created}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CniAttachment:
        return cls(str(d["network"]), str(d["containerID"]), str(d["ifname"]),
                   str(d["key"]), str(d.get("ipamOwner", "")), float(d.get("created", 0.0)))


# ---- pure helpers ------------------------------------------------------------------------


def _ident(args: Mapping[str, Any]) -> tuple[str, str, str]:
    """The attachment's identity, checked with the spec's rules (the plugin checks them
    too; the agent must not trust that: a `/` would make attachment ids ambiguous)."""
    values = tuple(args.get(k) for k in ("network", "containerID", "ifname"))
    if not all(isinstance(v, str) and v for v in values):
        raise ApiError(BAD_REQUEST, "network, containerID and ifname are required strings")
    network, cid, ifname = str(values[0]), str(values[1]), str(values[2])
    try:
        validate_network_name(network)
        validate_container_id(cid)
        validate_ifname(ifname)
    except CniError as exc:
        raise ApiError(BAD_REQUEST, str(exc)) from None
    return network, cid, ifname


def _labels(value: Any) -> Labels | None:
    if value is None:
        return None
    try:
        return decode_labels(value, "labels")
    except DecodeError as exc:
        raise ApiError(BAD_REQUEST, f"cni.add: args.{exc.message}") from None


def _ports(value: Any) -> tuple[ContainerPort, ...] | None:
    if value is None:
        return None
    try:
        return decode_ports(value, "ports")
    except DecodeError as exc:
        raise ApiError(BAD_REQUEST, f"cni.add: args.endpoint.{exc.message}") from None


def _spec_str(spec: Mapping[str, Any], key: str) -> str:
    value = spec.get(key, "")
    if not isinstance(value, str):
        raise ApiError(BAD_REQUEST, f"cni.add: args.endpoint.{key} must be a string")
    return value


def _alive(netns: str) -> bool:
    """Whether an attachment's network namespace still exists (its veth with it)."""
    return bool(netns) and os.path.exists(netns)


def _norm(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip


def footprint(rs: Ruleset, ips: Iterable[str]) -> dict[str, Any]:
    """Everything in a ruleset that concerns these addresses (compared in CHECK).

    Map entries (which chain isolates the address, each way), the chains
    those name (present or not), and the set elements that hold the address.
    An endpoint no policy selects and none names has an empty footprint, and
    "enforced" is then trivially true: an unselected pod is not isolated.
    """
    addrs = {_norm(ip) for ip in ips}
    norm_in = {_norm(k): v for k, v in rs.ingress.items()}
    norm_out = {_norm(k): v for k, v in rs.egress.items()}
    ingress = {a: norm_in[a] for a in addrs if a in norm_in}
    egress = {a: norm_out[a] for a in addrs if a in norm_out}
    chains = {c: c in rs.chains for c in (*ingress.values(), *egress.values())}
    sets: dict[str, list[str]] = {}
    for name, s in rs.sets.items():
        if s.kind == ADDR_PORT:
            hits = [repr(e) for e in s.elements
                    if isinstance(e, tuple) and _norm(e[0]) in addrs]
        else:
            hits = [str(e) for e in s.elements if isinstance(e, str) and _norm(e) in addrs]
        if hits:
            sets[name] = sorted(hits)
    return {"ingress": ingress, "egress": egress, "chains": chains, "sets": sets}


# ---- the extension -----------------------------------------------------------------------


class CniOps:
    """The ``cni.*`` operations, an agent :class:`~stockade.agent.extension.Extension`."""

    def __init__(self) -> None:
        self.service: Service | None = None
        # With --datastore kubernetes: the feed that knows the API's pods (labels and
        # named ports of a pod come from there), and how long ADD waits for one.
        self.pods: Any = None
        self.pod_wait = 10.0
        self.attachments: dict[str, CniAttachment] = {}
        self._revisions: dict[str, int] = {}  # in memory: after a restart, all is applied
        self._desired: Ruleset | None = None  # what the last successful apply put in
        self._applied: Ruleset | None = None  # the same, before made canonical
        self._canonical: tuple[Ruleset, Ruleset] | None = None  # (_applied, canonical)

    def operations(self) -> Mapping[str, Handler]:
        return {"cni.add": self.op_add, "cni.del": self.op_del, "cni.check": self.op_check,
                "cni.gc": self.op_gc, "cni.status": self.op_status,
                "cni.attached": self.op_attached}

    def status(self) -> Mapping[str, Any]:
        return {"cni": {"attachments": len(self.attachments)}}

    def start(self, agent: Host) -> None:
        self.pods = getattr(agent, "kube_feed", None)
        self.pod_wait = getattr(getattr(agent, "config", None), "pod_wait", self.pod_wait)
        self.service = agent.service
        raw = self.service.store.get_meta(META) or {}
        self.attachments = {a.id: a for a in (CniAttachment.from_dict(d) for d in
                                              (raw.get("attachments") or {}).values())}
        reconciler = self.service.reconciler
        previous = reconciler.hooks.applied

        def applied(report: ApplyReport, ruleset: Ruleset) -> None:
            if previous is not None:
                previous(report, ruleset)
            if not report.error:
                self._applied = ruleset  # made canonical when read (rarely; not per apply)
                self._desired = None  # the kernel as read at start: no longer needed

        reconciler.hooks.applied = applied
        if reconciler.healthy:
            # Started after the first reconciliation: the kernel holds what it applied
            # (reading the table back again would take seconds at scale).
            self._applied = reconciler.desired()
        else:
            self._desired = reconciler.datapath.read()  # the kernel, whatever it holds

    def stop(self) -> None:
        """Nothing runs in the background; the attachments live on in the store."""

    def _svc(self) -> Service:
        if self.service is None:
            raise ApiError(UNAVAILABLE, "the CNI operations are not started")
        return self.service

    def _meta(self, registry: Mapping[str, CniAttachment]) -> dict[str, Any]:
        return {META: {"attachments": {k: a.to_dict() for k, a in sorted(registry.items())}}}

    def _wait(self, revision: int) -> None:
        wait_enforced(self._svc().reconciler, revision)

    # ---- ADD -----------------------------------------------------------------------------

    def op_add(self, args: dict[str, Any]) -> dict[str, Any]:
        network, cid, ifname = _ident(args)
        spec = args.get("endpoint")
        if not isinstance(spec, Mapping):
            raise ApiError(BAD_REQUEST, "endpoint must be an object")
        labels = _labels(args.get("labels"))
        a = Args(args, "cni.add")
        allocate, sync = a.flag("allocate", False), a.flag("sync", True)
        svc = self._svc()
        api_ports: tuple[ContainerPort, ...] | None = None
        if labels is None and self.pods is not None:
            # Before the service lock: the feed commits under it while delivering the pod.
            labels, api_ports = self._api_pod(spec)
        made: dict[str, Any] = {}

        def build() -> Part:
            """Under the service's lock, with ADDs waiting alongside committed as one
            (agent/group.py): the address and the attachment taken here are given
            back by `undo` should the commit not happen."""
            known = self.attachments.get(attachment_id(network, cid, ifname))
            owner = ipam_owner(cid, ifname) if allocate else (known.ipam_owner if known
                                                                else "")
            address, fresh = self._allocate(owner) if allocate else ("", False)
            try:
                rec, inherited = self._record(spec, labels, cid, ifname, address, api_ports)
                att = CniAttachment(network, cid, ifname, rec.key, owner, time.time())
                changes = svc.implicit_namespaces([rec.endpoint.namespace], {})
                evicted = (self.pods.evictions(svc.state, rec) if self.pods is not None
                           else [])
                changes += evicted
                changes.append(PutEndpoint(rec))
            except BaseException:
                if fresh and svc.ipam is not None:
                    svc.ipam.release(owner)
                raise
            self.attachments = {**self.attachments, att.id: att}
            meta = self._meta(self.attachments)
            if fresh:
                assert svc.ipam is not None
                meta["ipam"] = svc.ipam.to_dict()
            made.update(rec=rec, inherited=inherited, address=address, att=att,
                        evicted=[c.key for c in evicted])

            def undo() -> None:
                if self.attachments.get(att.id) is att:
                    registry = dict(self.attachments)
                    if known is None:
                        del registry[att.id]
                    else:
                        registry[att.id] = known
                    self.attachments = registry
                if fresh and svc.ipam is not None:
                    svc.ipam.release(owner)

            return Part(changes, meta, undo)

        # A block needed (etcd's pool full) is claimed between tries, outside the lock.
        revision = svc.with_blocks(lambda: svc.group.submit(build))
        assert revision is not None  # an endpoint at least
        rec, inherited, address = made["rec"], made["inherited"], made["address"]
        # One assignment (atomic): the lock, which the other ADDs queue for, is not needed.
        self._revisions[made["att"].id] = revision
        # No fsync of the store for an ADD: what it commits outlives the agent (the log is
        # in the page cache: kill -9 loses nothing) but is of no use past the machine,
        # whose going down ends the attachment (its namespace, its veth); DEL finds by
        # name what outlives it. With 20 ADDs at once the fsync was among their longest waits.
        if made["evicted"]:
            self.pods.examine(made["evicted"])
        if sync:
            self._wait(revision)
        # bindsInterfaces: whether the plugin must say `cni.attached` once the veth exists.
        out: dict[str, Any] = {"revision": revision, "key": rec.key,
                               "labels": rec.endpoint.labels.as_dict(), "inherited": inherited,
                               "bindsInterfaces": self._binds_interfaces()}
        if allocate:
            assert svc.ipam is not None
            out.update(address=address, gateway=str(svc.ipam.gateway),
                       subnet=str(svc.ipam.subnet))
        return out

    def _api_pod(self, spec: Mapping[str, Any]) -> tuple[Labels, tuple[ContainerPort, ...]]:
        """Labels and named ports of the pod as the Kubernetes API shows it, waiting a
        bounded time for the watch to deliver a pod it has not seen yet; held pods
        (admission refused them or their namespace) get the fail-closed labels."""
        from stockade.agent.admission import held_endpoint

        namespace, name = _spec_str(spec, "namespace"), _spec_str(spec, "name")
        pod = self.pods.wait_pod(namespace, name, self.pod_wait)
        if pod is None:
            raise ApiError(UNAVAILABLE, f"pod {namespace}/{name} is not known to the "
                                        f"Kubernetes API after {self.pod_wait:g}s (or the "
                                        "agent has not listed it yet); try again")
        if self.pods.hold_reasons(pod.key):
            ep = held_endpoint(Endpoint(namespace, name, pod.labels, ()))
            return ep.labels, ()
        return pod.labels, pod.ports

    def _allocate(self, owner: str) -> tuple[str, bool]:
        """The owner's address and whether it is new (a retried ADD gets the same)."""
        svc = self._svc()
        if svc.ipam is None:
            raise ApiError(BAD_REQUEST, "this agent has no address pool (give the plugin "
                                        "an ipam section instead)")
        fresh = svc.ipam.address_of(owner) is None
        try:
            return svc.ipam.allocate(owner, claim=False), fresh
        except BlockNeeded:
            raise  # claimed by op_add outside the lock, then built again
        except NetError as exc:
            raise ApiError(UNAVAILABLE, str(exc)) from None

    def _record(self, spec: Mapping[str, Any], labels: Labels | None, cid: str, ifname: str,
                address: str, api_ports: tuple[ContainerPort, ...] | None = None,
                ) -> tuple[EndpointRecord, bool]:
        """The endpoint to store; labels and ports inherited when none are given."""
        svc = self._svc()
        namespace, name = _spec_str(spec, "namespace"), _spec_str(spec, "name")
        netns = _spec_str(spec, "netns")
        existing = svc.state.endpoints.get(f"{namespace}/{name}")
        if existing is not None and existing.owner == OWNER_RUN:
            raise ApiError(INVALID, f"endpoint {namespace}/{name} is managed by `stockade "
                                    "run`; a container of that name already runs")
        if (existing is not None and existing.owner == OWNER_CNI
                and (existing.container_id, existing.interface) != (cid, ifname)
                and _alive(existing.netns)):
            # Replacing the record would leave the first container's interface and
            # address up with nothing enforcing its policy.
            raise ApiError(INVALID, f"endpoint {namespace}/{name} is already attached to "
                                    f"container {existing.container_id} ({existing.interface}, "
                                    f"{', '.join(existing.endpoint.ips)}), whose network "
                                    f"namespace {existing.netns} still exists; container "
                                    f"{cid} ({ifname}) cannot take the name until that one "
                                    "is deleted (CNI DEL)")
        inherited = (labels is None and existing is not None) or api_ports is not None
        if labels is None:
            labels = existing.endpoint.labels if existing is not None else Labels({})
        ports = _ports(spec.get("ports"))
        if ports is None and api_ports is not None:
            ports = api_ports
        if ports is None:
            ports = existing.endpoint.ports if existing is not None else ()
        raw_ips = spec.get("ips")
        if raw_ips is not None and not (isinstance(raw_ips, list)
                                        and all(isinstance(ip, str) for ip in raw_ips)):
            raise ApiError(BAD_REQUEST, "cni.add: args.endpoint.ips must be a list of strings")
        ips = (address.split("/")[0],) if address else tuple(raw_ips or ())
        # Where the plugin attached it: the port and MAC the datapath binds its addresses to.
        ep = Endpoint(namespace, name, labels, ips, ports, port=_spec_str(spec, "hostInterface"),
                      mac=_spec_str(spec, "mac"))
        problems = [f"endpoint {ep.key}: {e.render()}" for e in validate_endpoint(ep)]
        if problems:
            raise ApiError(INVALID, f"endpoint {ep.key} is invalid", problems)
        return EndpointRecord(ep, netns, ifname, OWNER_CNI, cid,
                              created=time.time()), inherited

    def _binds_interfaces(self) -> bool:
        return bool(getattr(self._svc().reconciler.datapath, "binds_interfaces", False))

    def op_attached(self, args: dict[str, Any]) -> dict[str, Any]:
        """The plugin made the interface ADD registered: a datapath that binds to interfaces
        themselves (eBPF: programs and guards keyed by ifindex) is applied once more,
        before ADD returns, so that the port is guarded before the container runs. The
        others bind by name, in the apply ADD waited for: nothing to do."""
        _ident(args)
        reconciler = self._svc().reconciler
        if not self._binds_interfaces():
            return {"applied": False}
        if not reconciler.run(periodic=False):
            raise ApiError(UNAVAILABLE, "the datapath could not be applied to the new "
                                        "interface; try again")
        return {"applied": True}

    # ---- DEL and GC ----------------------------------------------------------------------

    def op_del(self, args: dict[str, Any]) -> dict[str, Any]:
        network, cid, ifname = _ident(args)
        sync = Args(args, "cni.del").flag("sync", True)
        aid = attachment_id(network, cid, ifname)
        with self._svc().lock:
            att = self.attachments.get(aid) or self._orphan(network, cid, ifname)
            revision, removed, released = self._detach([att])
        self._svc().durable()
        if sync and removed:
            self._wait(revision)
        return {"removed": bool(removed), "released": released[0] if released else None,
                "revision": revision}

    def op_gc(self, args: dict[str, Any]) -> dict[str, Any]:
        network = args.get("network")
        valid_raw = args.get("valid")
        if not isinstance(network, str) or not network or not isinstance(valid_raw, list):
            raise ApiError(BAD_REQUEST, "network and valid (a list) are required")
        sync = Args(args, "cni.gc").flag("sync", True)
        valid: set[tuple[str, str]] = set()
        for n, v in enumerate(valid_raw):
            # A bad entry must not be skipped: it would make a live attachment stale.
            cid, ifname = (v.get("containerID"), v.get("ifname", "")) if isinstance(
                v, Mapping) else (None, None)
            if not (isinstance(cid, str) and cid and isinstance(ifname, str)):
                raise ApiError(BAD_REQUEST, f"cni.gc: args.valid[{n}] must be an object with "
                                            "a containerID and an optional ifname (strings)")
            valid.add((cid, ifname))
        any_ifname = {cid for cid, ifname in valid if not ifname}
        with self._svc().lock:
            stale = [a for a in self.attachments.values() if a.network == network
                     and (a.container_id, a.ifname) not in valid
                     and a.container_id not in any_ifname]
            revision, removed, released = self._detach(stale)
            claimed = sorted({r.host_interface for r in self._svc().state.endpoints.values()
                              if r.host_interface})
        self._svc().durable()
        if sync and removed:
            self._wait(revision)
        if stale:
            log.info("cni gc", extra={"fields": {"network": network, "removed": len(stale)}})
        return {"removed": sorted(a.id for a in stale), "released": released,
                "revision": revision, "hostInterfaces": claimed}

    def _orphan(self, network: str, cid: str, ifname: str) -> CniAttachment:
        """An attachment the table does not know (e.g. made before it existed): by record."""
        for rec in self._svc().state.endpoints.values():
            if rec.owner == OWNER_CNI and rec.container_id == cid and rec.interface == ifname:
                return CniAttachment(network, cid, ifname, rec.key, ipam_owner(cid, ifname))
        return CniAttachment(network, cid, ifname, "", ipam_owner(cid, ifname))

    def _detach(self, atts: list[CniAttachment]) -> tuple[int, list[str], list[str]]:
        """Endpoints, addresses and table entries of ``atts`` gone in one transaction.

        Called under the service lock; the caller makes the commit durable once it
        has let go (Service.durable). An endpoint is removed only while it is
        still this attachment's (a recreated sandbox may own the name now).
        The pool is changed on a copy and swapped in after the commit, so a
        failed commit leaves memory as it was.
        """
        svc = self._svc()
        changes: list[Change] = []
        removed: list[str] = []
        released: list[str] = []
        registry = dict(self.attachments)
        pool = svc.ipam.copy() if svc.ipam is not None else None
        for att in atts:
            registry.pop(att.id, None)
            rec = svc.state.endpoints.get(att.key) if att.key else None
            if (rec is not None and rec.owner == OWNER_CNI and rec.container_id ==
                    att.container_id and rec.interface == att.ifname):
                changes.append(DeleteEndpoint(att.key))
                removed.append(att.key)
            if pool is not None and att.ipam_owner:
                address = pool.release(att.ipam_owner)
                if address is not None:
                    released.append(address)
        meta: dict[str, Any] = {}
        if registry != self.attachments:
            meta.update(self._meta(registry))
        if released and pool is not None:
            meta["ipam"] = pool.to_dict()
        if not changes and not meta:
            return svc.reconciler.desired_revision, [], []
        # Durable once the caller has let go of the service lock (it calls durable()).
        revision = svc.commit(changes, sync=False, meta=meta, durable=False)
        self.attachments = registry
        if released:
            svc.ipam = pool
        for att in atts:
            self._revisions.pop(att.id, None)
        return revision, removed, released

    # ---- CHECK and STATUS ----------------------------------------------------------------

    def op_check(self, args: dict[str, Any]) -> dict[str, Any]:
        network, cid, ifname = _ident(args)
        aid = attachment_id(network, cid, ifname)
        svc = self._svc()
        with svc.lock:
            att = self.attachments.get(aid)
            rec = svc.state.endpoints.get(att.key) if att is not None else None
        ips = args.get("ips")
        if ips is not None and not (isinstance(ips, list)
                                    and all(isinstance(ip, str) for ip in ips)):
            raise ApiError(BAD_REQUEST, "cni.check: args.ips must be a list of strings")
        problems = self._record_problems(att, rec, cid, ifname, ips)
        revision = self._revisions.get(aid, 0)
        reconciler = svc.reconciler
        applied = reconciler.in_sync or reconciler.applied_revision >= revision
        if not applied:
            problems.append(f"revision {revision} is not enforced yet (applied: "
                            f"{reconciler.applied_revision})")
        in_kernel = rec is not None and self._in_kernel(rec.endpoint.ips, problems)
        return {"known": rec is not None, "key": att.key if att else "",
                "revision": revision, "applied": applied, "inKernel": in_kernel,
                "problems": problems}

    def _record_problems(self, att: CniAttachment | None, rec: EndpointRecord | None,
                         cid: str, ifname: str, ips: Any) -> list[str]:
        if att is None:
            return [f"the agent has no attachment {cid}/{ifname}"]
        if rec is None:
            return [f"the agent has no endpoint {att.key}"]
        if rec.container_id != cid or rec.interface != ifname:
            return [f"endpoint {att.key} belongs to another attachment "
                    f"({rec.container_id}/{rec.interface})"]
        if isinstance(ips, list) and {_norm(str(i)) for i in ips} != {
                _norm(i) for i in rec.endpoint.ips}:
            return [f"endpoint {att.key} has addresses {list(rec.endpoint.ips)}, "
                    f"the attachment {ips}"]
        return []

    def _desired_ruleset(self) -> Ruleset:
        """What the last successful apply put in, as the kernel shows it (canonical)."""
        applied, memo = self._applied, self._canonical
        if applied is None:
            return self._desired or Ruleset()  # the kernel as adopted at start
        if memo is None or memo[0] is not applied:
            memo = self._canonical = (applied, canonical(applied))
        return memo[1]

    def _in_kernel(self, ips: tuple[str, ...], problems: list[str]) -> bool:
        """The endpoint's footprint in the kernel equals the last applied one (with retries)."""
        datapath = self._svc().reconciler.datapath
        deadline = time.monotonic() + CONVERGE
        while True:
            desired = self._desired_ruleset()
            want = footprint(desired, ips)
            have = footprint(datapath.read(), ips)
            # Sets no chain in force uses may stay a while (the nft datapath keeps
            # unused chains for reuse): they hold stale addresses and decide nothing.
            have["sets"] = {n: v for n, v in have["sets"].items() if n in desired.sets}
            if want == have and all(want["chains"].values()):
                return True
            if time.monotonic() >= deadline:
                problems.append(f"the kernel differs for {', '.join(ips)}: "
                                f"want {want}, have {have}")
                return False
            time.sleep(0.05)

    def op_status(self, args: dict[str, Any]) -> dict[str, Any]:
        reconciler = self._svc().reconciler
        last = reconciler.last
        return {"ready": reconciler.healthy, "inSync": reconciler.in_sync,
                "error": (last.error if last is not None else "") or "",
                "attachments": len(self.attachments)}
