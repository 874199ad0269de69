"""`stockade agent`: the node agent, wired together and run in the foreground.

Start-up order matters for "fail closed, lose nothing": the store is loaded,
the kernel is checked, then the first reconciliation *reads the kernel back*
and applies only the difference (a restart adopts the table; nothing is
flushed, so traffic keeps flowing). Only then does the API socket open and
the agent report readiness. SIGTERM closes the socket and stops the loops;
the kernel keeps enforcing the last ruleset.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

from stockade.agent import warm
from stockade.agent.admission import (
    QUARANTINE_POLICY,
    cluster_near,
    enforceable,
    quarantine,
)
from stockade.agent.client import DEFAULT_SOCKET
from stockade.agent.cni_ops import CniOps
from stockade.agent.containers import ContainerManager
from stockade.agent.early import open_agent_datapath
from stockade.agent.extension import Extension, Handler, Operations
from stockade.agent.metrics import MetricsServer, Registry, agent_metrics
from stockade.agent.ownership import Ownership, take_ownership
from stockade.agent.protocol import Args
from stockade.agent.reconcile import ApplyReport, Hooks, Reconciler
from stockade.agent.records import AgentState, ClusterPolicyRecord, PolicyRecord
from stockade.agent.runner import BoundedFrequencyRunner
from stockade.agent.server import ApiServer
from stockade.agent.service import Service
from stockade.agent.snapshot import changes_to_restore, parse_snapshot
from stockade.agent.store import Store
from stockade.agent.visibility import Visibility
from stockade.agent.warm import Keeper, WarmStart
from stockade.compile.incremental import IncrementalCompiler
from stockade.compile.ir import Ruleset
from stockade.compile.plan import Plan
from stockade.datapath import DATAPATHS
from stockade.datapath.base import Datapath
from stockade.datapath.monitor import TableMonitor
from stockade.errors import AgentError, InputError, NetError
from stockade.heap import collector_paused, listing, release_memory
from stockade.model.cluster import Cluster
from stockade.net.ipam import Ipam

DEFAULT_SUBNET = "10.244.0.0/16"  # the bridge's pool on a single host
LARGE = 10_000  # objects in one apply beyond which freed memory is handed back
log = logging.getLogger("stockade.agent")


@dataclass(frozen=True)
class AgentConfig:
    state_dir: str = "/var/lib/stockade"
    socket: str = DEFAULT_SOCKET
    datapath: str = "nft"
    netns: str | None = None
    table: str = "stockade"
    metrics_address: str | None = None
    log_group: int | None = 100
    conntrack_limit: int = 0  # a source's connections in conntrack (nft, iptables; 0: any)
    ebpf_attach: str = "auto"  # eBPF: tcx links or clsact filters (datapath/ebpf.py)
    min_interval: float = 0.002
    resync_interval: float = 30.0
    # The warm start kept while running (agent/warm.py): after this many seconds without
    # a change, at most every warm_interval seconds; 0 keeps it at a clean stop only.
    warm_idle: float = 10.0
    warm_interval: float = 60.0
    # The address pool of the bridge; None: on a cluster this node's spec.podCIDR
    # (every node its own block, as the cluster assigned it), else DEFAULT_SUBNET.
    subnet: str | None = None
    bridge_prefix: str = "stk"
    strict_cidr: bool = False
    # An empty store facing a kernel table that enforces something: refuse to
    # start unless one of these says how to proceed (see `_guard_empty_store`).
    restore_snapshot: str | None = None
    accept_empty_store: bool = False
    # An owned, persistent table: no other process can change it (see the README).
    table_owner: bool = True
    # Where namespaces, policies and pods come from: "local" (the store, through the
    # socket) or "kubernetes" (list and watch of the API; see kube/datastore.py).
    datastore: str = "local"
    kubeconfig: str | None = None  # None: in-cluster, else $KUBECONFIG, ~/.kube/config
    kube_context: str | None = None
    node: str = ""  # this node's name; "" = $NODE_NAME, else the host name
    watch_stall_timeout: float = 150.0
    watch_timeout: int = 300
    pod_wait: float = 10.0  # a CNI ADD waits this long for the API to show its pod
    # --datastore etcd (see etcd/datastore.py): its members, the key prefix, TLS files.
    etcd_endpoints: tuple[str, ...] = ()
    etcd_prefix: str = "/stockade"
    etcd_cert: str | None = None
    etcd_key: str | None = None
    etcd_cacert: str | None = None
    # The address other hosts route this host's address blocks to (etcd/hosts.py).
    host_address: str | None = None
    # An address block left empty this long goes back to the pool (etcd/ipam.py); 0: never.
    empty_block_grace: float = 600.0
    # How long the node's name outlives a killed agent in etcd (etcd/nodes.py).
    node_claim_ttl: int = 15
    cni_conf_dir: str = "/etc/cni/net.d"  # reported on GET /status (the runtime's view)


class Agent:
    def __init__(self, config: AgentConfig, datapath: Datapath | None = None) -> None:
        """`datapath`: opened by the caller (agent/early.py); else start opens it."""
        self.config = config
        self._opened = datapath
        self.registry = Registry()
        self.metrics = agent_metrics(self.registry)
        self.registry.refresh_with(self._count_datapath)
        self._stopping = threading.Event()
        self._verify_wanted = threading.Event()
        self._ruleset = Ruleset()
        self._counted: Ruleset | None = None  # the ruleset the datapath gauges count
        self.store: Store | None = None
        self.api: ApiServer | None = None
        self.runner: BoundedFrequencyRunner | None = None
        self.monitor: TableMonitor | None = None
        self._link_poll: threading.Thread | None = None  # the eBPF datapath's
        self.metrics_server: MetricsServer | None = None
        self.kube_feed: Any = None  # stockade.kube.datastore.KubeFeed with that datastore
        self._started: list[Extension] = []
        self._ready = False  # started and serving (what a clean stop may keep: warm.py)
        self.keeper: Keeper | None = None  # keeps the warm start current (local store)
        # Started in this order after the first reconciliation, stopped in reverse;
        # their operations join the service's table (see agent/extension.py).
        self.extensions: list[Extension] = []

    # ---- start and stop ----------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        if cfg.datapath not in DATAPATHS:
            raise AgentError(f"datapath {cfg.datapath!r} is not available "
                             f"({', '.join(DATAPATHS)})")
        if cfg.datastore not in ("local", "kubernetes", "etcd"):
            raise AgentError(f"datastore {cfg.datastore!r} is not available "
                             "(local, kubernetes, etcd)")
        etcd = cfg.datastore == "etcd"
        # etcd is fed as the Kubernetes API is: the same feed, other reflectors.
        kube = cfg.datastore in ("kubernetes", "etcd")
        service_class: type[Service] = Service
        offer: WarmStart | None = None  # a warm start's (local datastore only)
        if kube:
            # Imported here: httpx and lightkube only on this path.
            from stockade.kube.datastore import KubeCacheStore

            if etcd:
                from stockade.etcd.datastore import EtcdService

                self.kube_feed = self._etcd_feed()
                service_class = EtcdService
            else:
                self.kube_feed = self._kube_feed()
            if cfg.subnet is None:
                cfg = self.config = replace(
                    cfg, subnet=DEFAULT_SUBNET if etcd else self._node_pod_cidr())
            store = KubeCacheStore(cfg.state_dir)
            self.store = store
            state, revision = store.load_local()
            datapath = self._open_datapath()
        else:
            datapath = self._open_datapath()
            # Read the table back while the state loads, is checked and compiled (the
            # read is libnftables' work, outside the interpreter, and at 10,000
            # endpoints takes as long as all of those): the adoption below uses it.
            prefetch = getattr(datapath, "prefetch", None)
            if prefetch is not None:
                prefetch()
            self.store = Store(cfg.state_dir)
            offer = WarmStart(cfg.state_dir, strict_cidr=cfg.strict_cidr)
            state, revision = self.store.load(offer.known)
            if cfg.subnet is None:
                cfg = self.config = replace(cfg, subnet=DEFAULT_SUBNET)
            # With the API as the datastore an empty local store is normal: nothing is
            # programmed before the first lists, so the kernel's table stays as it is.
            state, revision = self._guard_empty_store(state, revision, datapath)
        self.store.on_durable = self.metrics.store_commit_duration.observe
        log.info("state loaded", extra={"fields": {
            "revision": revision, "endpoints": len(state.endpoints),
            "policies": len(state.policies), "namespaces": len(state.namespaces)}})
        # A warm start's compiler, when the state is the one it answered (agent/warm.py).
        kept = offer.compiler if offer is not None and offer.state is state else None
        folded = offer.folded if kept is not None and offer is not None else 0
        warmed = kept is not None
        if not warmed:
            state.quarantined = quarantine(state, strict_cidr=cfg.strict_cidr)
        for key, reasons in sorted(state.quarantined.items()):
            log.error("endpoint held fail-closed: its stored state cannot be enforced",
                      extra={"fields": {"endpoint": key, "reasons": "; ".join(reasons)}})
        started = time.monotonic()
        # What the cold start computes from these rows, if kept.
        compiler = (kept if kept is not None
                    else IncrementalCompiler.of(enforceable(state, state.quarantined)))
        log.info("state compiled", extra={"fields": {
            "seconds": round(time.monotonic() - started, 3), "warm": warmed,
            "folded": folded}})
        if not kube and cfg.warm_idle > 0:
            # The file is current when the start took it whole.
            self.keeper = Keeper(cfg.state_dir, lambda: self.reconciler.desired_revision,
                                 strict_cidr=cfg.strict_cidr, idle=cfg.warm_idle,
                                 interval=cfg.warm_interval,
                                 kept_revision=revision if warmed and not folded else None)
        self.reconciler = Reconciler(compiler, datapath, revision, Hooks(
            applied=self._applied, drift=self._drift, enforced=self._enforced,
            revoked=self._revoked),
            cluster_of=self._cluster)
        ipam_state = self.store.get_meta("ipam")
        if cfg.datastore == "etcd":
            # Blocks of the cluster's pool claimed in etcd; routes to the other hosts'.
            from stockade.etcd.datastore import open_hosts

            try:
                ipam = open_hosts(self.kube_feed, cfg.subnet or DEFAULT_SUBNET, ipam_state,
                                  netns=cfg.netns, bridge_prefix=cfg.bridge_prefix,
                                  host_address=cfg.host_address,
                                  empty_block_grace=cfg.empty_block_grace)
            except NetError as exc:
                raise AgentError(f"--datastore etcd: {exc}") from None
        else:
            ipam = (Ipam.from_dict(ipam_state) if ipam_state
                    else Ipam(cfg.subnet or DEFAULT_SUBNET))
        self.service = service_class(self.store, state, self.reconciler, ipam=ipam,
                                     strict_cidr=cfg.strict_cidr)
        ebpf = cfg.datapath == "ebpf"
        # nft and iptables log denied packets to the same NFLOG group and prefix; the eBPF
        # program to its ring buffer. It also cuts revoked connections itself (it tracks
        # them in its own map), so the kernel's conntrack is left alone there.
        self.visibility = Visibility(self._cluster, self.metrics, cfg.netns, cfg.log_group,
                                     cfg.state_dir,
                                     events=getattr(datapath, "events", None) if ebpf else None,
                                     revoke=not ebpf, cluster_near=self._cluster_near)
        for provider in self.operation_providers():
            self.service.register(provider)
        self.visibility.start()
        if kube:
            self._start_kube()
            return
        # Adopt: read the kernel back and apply only the difference, before serving.
        self.reconciler.run(periodic=True)
        if self.reconciler.last is not None and self.reconciler.last.error:
            raise AgentError(f"cannot program the kernel: {self.reconciler.last.error}")
        self._enforce()
        self._start_extensions()
        self._serve()
        self._update_gauges()
        release_memory()
        log.info("ready", extra={"fields": {"socket": cfg.socket, "revision": revision,
                                            "table": self._where()}})
        self._ready = True
        if self.keeper is not None:
            self.keeper.start()
        notify_ready()

    def _enforce(self) -> None:
        """The reconcile loop and the datapath's monitor, after the first reconciliation."""
        cfg = self.config
        # The adoption that came just before read the whole table back: the periodic
        # check is due a resync interval later, not at once (at scale a read-back takes
        # a CPU for seconds and its transient memory would double the agent's).
        last = self.reconciler.last
        adopted = last is not None and last.verified and not last.error
        self.runner = BoundedFrequencyRunner("reconcile", self._run, cfg.min_interval,
                                             cfg.resync_interval, periodic_first=not adopted)
        self.reconciler.attach(self.runner.run)
        self.runner.start()
        datapath: Any = self.reconciler.datapath
        if hasattr(datapath, "verify_quietly"):
            # The periodic read-back on a thread of its own: changes go on meanwhile.
            self._verifier = threading.Thread(target=self._verify_loop, name="verify",
                                              daemon=True)
            self._verifier.start()
        if cfg.datapath == "nft" and getattr(datapath, "owned", False):
            # The kernel refuses every other process's change to an owned table, so its
            # events could only be our own: listening would have nf_tables build a
            # message for each object we change (~100,000 in a full load, 5-17 % of it)
            # for a thread to read and drop. The periodic read-back stays.
            log.info("the table is owned: no other process can change it, so its events "
                     "are not followed")
        elif cfg.datapath == "nft":
            # The table's events: a deleted table is rewritten without reading first;
            # lost events (our own large transactions overflow the socket) are checked
            # for by the read-back, without holding up changes.
            self.monitor = datapath.monitor(self._foreign_change, on_lost=self._events_lost)
            self.monitor.start()
        elif cfg.datapath == "ebpf":
            # No events for a detached program: poll the links (no map is read).
            self._link_poll = threading.Thread(target=self._poll_links, args=(datapath,),
                                               name="ebpf-links", daemon=True)
            self._link_poll.start()
        else:
            log.info("iptables offers no change events: drift is found by the verifying "
                     "resync", extra={"fields": {"seconds": cfg.resync_interval}})

    LINK_POLL = 1.0

    def _poll_links(self, datapath: Any) -> None:
        """Every LINK_POLL seconds: a detached program or a missing pin is repaired the
        way the nft monitor's foreign change is (a verifying reconciliation at once)."""
        while not self._stopping.wait(self.LINK_POLL):
            try:
                intact = datapath.skeleton_intact()
            except Exception as exc:  # the next poll tries again
                log.warning("could not check the eBPF links: %s", exc)
                continue
            if not intact:
                self._foreign_change()

    def _start_extensions(self, *, apart: bool = False) -> None:
        """`apart`: one that fails is logged and the others start all the same (an agent
        already serving must not lose the CNI operations to `stockade run`'s failure);
        otherwise the first failure is the start's."""
        for ext in self.extensions:
            try:
                ext.start(self)
            except Exception:
                if not apart:
                    raise
                log.exception("extension %s did not start", type(ext).__name__)
                continue
            self._started.append(ext)

    def _serve(self) -> None:
        cfg = self.config
        if cfg.metrics_address:
            self.metrics_server = MetricsServer(self.registry, cfg.metrics_address,
                                                health=self._healthy, status=self.node_report)
            self.metrics_server.start()
        self.api = ApiServer(cfg.socket, self.service.handle)
        self.api.start()

    # ---- the Kubernetes datastore ----------------------------------------------------------

    def _kube_feed(self) -> Any:
        from stockade.kube.client import (
            KubeClient,
            KubeError,
            in_cluster_available,
            without_managed_fields,
        )
        from stockade.kube.datastore import KubeFeed
        from stockade.kube.reflector import ReflectorConfig

        cfg = self.config
        # In a pod, the service account by default; else as kubectl finds a kubeconfig.
        in_cluster = False if cfg.kubeconfig else (
            True if in_cluster_available() and not cfg.kube_context else None)
        try:
            client = KubeClient.connect(cfg.kubeconfig, cfg.kube_context,
                                        in_cluster=in_cluster)
        except KubeError as exc:
            raise AgentError(f"--datastore kubernetes: {exc}") from None
        node = self.node_name()
        return KubeFeed(client, node, config=ReflectorConfig(
            timeout_seconds=cfg.watch_timeout, stall_timeout=cfg.watch_stall_timeout,
            bulk=listing, transform=without_managed_fields))

    def node_name(self) -> str:
        """This node's name: --node, else $NODE_NAME, else the host name lowercased (as
        the kubelet names its node). Checked, whichever it came from: it goes into etcd
        keys and the API's queries (AgentError if it is no DNS subdomain)."""
        from stockade.model.names import name_is_dns_subdomain

        env = os.environ.get("NODE_NAME")
        name, source = ((self.config.node, "--node") if self.config.node else
                        (env, "$NODE_NAME") if env else
                        (socket.gethostname().lower(), "the host name"))
        problems = name_is_dns_subdomain(name, False)
        if problems:
            raise AgentError(f"node name {name!r} ({source}): {'; '.join(problems)}; "
                             "give this node's name with --node")
        return name

    def _etcd_feed(self) -> Any:
        from stockade.etcd.datastore import open_feed
        from stockade.kube.reflector import ReflectorConfig

        cfg = self.config
        if not cfg.etcd_endpoints:
            raise AgentError("--datastore etcd needs --etcd-endpoints URL...")
        node = self.node_name()
        feed = open_feed(cfg.etcd_endpoints, node, prefix=cfg.etcd_prefix,
                         cert=cfg.etcd_cert, key=cfg.etcd_key, ca=cfg.etcd_cacert,
                         config=ReflectorConfig(stall_timeout=cfg.watch_stall_timeout,
                                                bulk=listing))
        feed.node_claim = self._claim_node(feed)
        return feed

    def _claim_node(self, feed: Any) -> Any:
        """The node's name held in etcd before anything is written for it (etcd/nodes.py):
        another agent's name stops this one here; with etcd out of reach it is claimed
        once etcd answers, before the first write for the node."""
        from stockade.etcd.client import EtcdError
        from stockade.etcd.nodes import NodeClaim, NodeTaken, instance_id

        claim = NodeClaim(feed.etcd, feed.prefix, feed.node,
                          instance_id(self.config.state_dir), ttl=self.config.node_claim_ttl)
        # A killed agent's claim (its state directory lost: another instance) runs out
        # within its lease's TTL; another live agent of this name keeps its own alive.
        # Waited for a minute at most (a holder given a TTL of an hour: the service
        # manager starts this one again), not at all for a key put with no lease.
        started = time.monotonic()
        while True:
            try:
                claim.claim()
                return claim
            except NodeTaken as exc:
                wait = min(exc.ttl, 60) + 2 if exc.ttl else 0
                if time.monotonic() >= started + wait or self._stopping.is_set():
                    feed.etcd.close()
                    raise AgentError(str(exc)) from None
                if claim.taken_by is None:
                    claim.taken_by = exc.holder
                    log.warning("node name held in etcd by another agent; waiting for its "
                                "claim to run out", extra={"fields": {
                                    "node": feed.node, "seconds": wait,
                                    "holder": json.dumps(exc.holder)}})
                time.sleep(1.0)
            except EtcdError as exc:
                log.warning("etcd unreachable at start: the node's name is claimed once "
                            "it answers", extra={"fields": {"node": feed.node,
                                                            "error": str(exc)}})
                return claim

    def _node_pod_cidr(self) -> str:
        """This node's IPv4 pod CIDR as the cluster assigned it, or DEFAULT_SUBNET.

        Without it every node would hand out the same addresses. A cluster that
        assigns none (no --allocate-node-cidrs) needs --subnet on each agent.
        """
        from stockade.kube.client import NODES, KubeError

        feed = self.kube_feed
        try:
            node = feed.client.get(NODES, feed.node)
        except KubeError as exc:
            raise AgentError(f"--datastore kubernetes: cannot read node {feed.node}: {exc}; "
                             "give its address pool with --subnet") from None
        spec = (node or {}).get("spec") or {}
        cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
        for cidr in cidrs:
            if isinstance(cidr, str) and "." in cidr:
                log.info("address pool from node %s: %s", feed.node, cidr)
                return cidr
        log.warning("node %s has no IPv4 podCIDR; using %s (give --subnet on a cluster "
                    "of several nodes)", feed.node, DEFAULT_SUBNET)
        return DEFAULT_SUBNET

    def _start_kube(self) -> None:
        """Serve reads at once; enforce nothing until the first lists are committed.

        Until then the kernel keeps the table it has, `status` and `/healthz` say not
        in sync, local writes are refused (the API is the truth), and the CNI and
        container operations answer unavailable (the runtime retries).
        """
        cfg = self.config
        feed = self.kube_feed
        if self.config.datastore == "etcd":
            self.service.attach(feed)  # type: ignore[attr-defined]  # writes go to etcd
        else:
            self.service.read_only = f"kubernetes ({feed.client.server})"
        feed.bind(self.service, self.registry)
        self.service.register(feed)
        self.service.extensions_ready = False  # until the first lists: see _await_kube
        self._serve()
        feed.start()
        log.info(f"serving; enforcing once the first lists of {feed.SOURCE} are in",
                 extra={"fields": {"socket": cfg.socket, "server": feed.client.server,
                                   "node": feed.node, "table": self._where()}})
        threading.Thread(target=self._await_kube, name="kube-sync", daemon=True).start()

    def _await_kube(self) -> None:
        feed = self.kube_feed
        while not feed.synced.wait(0.2):
            if self._stopping.is_set():
                return
        if self._stopping.is_set():
            return
        # Adopt: read the kernel back and apply only the difference from the lists.
        if not self.reconciler.run(periodic=True):
            log.error("the first lists could not be programmed; retrying")
        try:
            self._enforce()
            self._start_extensions(apart=True)
            self.service.extensions_ready = True
        except Exception:  # the agent goes on enforcing; status says what is missing
            log.exception("starting after the first lists failed")
        if self.runner is not None and not self.reconciler.healthy:
            self.runner.retry_in(self.reconciler.backoff())
        self._update_gauges()
        log.info("ready", extra={"fields": {"revision": self.reconciler.desired_revision,
                                            "table": self._where()}})
        notify_ready()

    def _open_datapath(self) -> Datapath:
        opened, self._opened = self._opened, None
        if opened is not None:
            return opened
        cfg = self.config
        return open_agent_datapath(cfg.datapath, cfg.table, netns=cfg.netns,
                                   owner=cfg.table_owner, log_group=cfg.log_group,
                                   conntrack_limit=cfg.conntrack_limit,
                                   ebpf_attach=cfg.ebpf_attach)

    def _guard_empty_store(self, state: AgentState, revision: int,
                           datapath: Datapath) -> tuple[AgentState, int]:
        """Losing the store must never open enforcement.

        An empty store (emptied, removed, or a mistyped --state-dir) facing a
        table that enforces something would reconcile the kernel to nothing.
        Refuse, unless told to restore a snapshot or to accept the empty state.
        """
        assert self.store is not None
        cfg = self.config
        if state.namespaces or state.endpoints or state.policies or state.cluster_policies:
            if cfg.restore_snapshot:
                raise AgentError("--restore-snapshot is for an empty store; this one holds "
                                 f"state (revision {revision}): use `stockade snapshot "
                                 "restore` against the running agent instead")
            return state, revision
        kernel = datapath.read()
        enforcing = bool(kernel.chains or kernel.ingress or kernel.egress)
        if cfg.restore_snapshot:
            target, meta = _read_snapshot(cfg.restore_snapshot, cfg.strict_cidr)
            changes = changes_to_restore(state, target)
            revision = self.store.commit(changes, {k: v for k, v in meta.items()
                                                   if k == "ipam"} or None)
            state, revision = self.store.load()
            log.warning("store restored from a snapshot", extra={"fields": {
                "file": cfg.restore_snapshot, "revision": revision,
                "endpoints": len(state.endpoints), "policies": len(state.policies)}})
            return state, revision
        if not enforcing:
            return state, revision
        where = str(self.store.path)
        if cfg.accept_empty_store:
            log.warning("the store is empty and the kernel enforces a ruleset: replacing "
                        "it by the empty state, as --accept-empty-store asks",
                        extra={"fields": {"store": where, "table": self._where(),
                                          "chains": len(kernel.chains)}})
            return state, revision
        raise AgentError(
            f"the store {where} is empty (revision {revision}), but {self._objects()} "
            f"in the kernel enforces {len(kernel.chains)} policy chain(s) for "
            f"{len(set(kernel.ingress) | set(kernel.egress))} address(es); starting would "
            "remove that enforcement, so the agent refuses. If --state-dir is mistyped, fix "
            "it. Otherwise restore the state: `stockade agent --restore-snapshot FILE ...` "
            "(a file from `stockade snapshot save`), or start with --accept-empty-store to "
            "replace the kernel's rules by the empty state on purpose. Until then the "
            "kernel keeps enforcing the table as it is.")

    def _where(self) -> str:
        """What the datapath owns in the kernel, for logs."""
        cfg = self.config
        return f"inet {cfg.table}" if cfg.datapath == "nft" else f"{cfg.datapath} {cfg.table}"

    def _objects(self) -> str:
        cfg = self.config
        return {"nft": f"table inet {cfg.table}",
                "iptables": f"the iptables chains and ipsets of {cfg.table}",
                "ebpf": f"the pinned eBPF programs and maps of {cfg.table}",
                }.get(cfg.datapath, f"{cfg.datapath} {cfg.table}")

    def stop(self) -> None:
        self._stopping.set()
        if self.kube_feed is not None:
            self.kube_feed.stop()
        for part in (self.api, self.metrics_server):
            if part is not None:
                part.stop()
        for ext in reversed(self._started):
            ext.stop()
        if self.monitor is not None:
            self.monitor.stop()
        if self._link_poll is not None:
            self._link_poll.join()
        if self._verifier is not None:
            self._verify_wanted.set()
            self._verifier.join()
        if getattr(self, "visibility", None) is not None:
            self.visibility.stop()
        if self.runner is not None:
            self.runner.stop()
        if self.keeper is not None:
            self.keeper.stop()
        self._keep_warm()
        reconciler = getattr(self, "reconciler", None)
        if reconciler is not None and hasattr(reconciler.datapath, "close"):
            reconciler.datapath.close()  # the table stays, as an orphan the next agent claims
        if self.store is not None:
            self.store.close()
        log.info("stopped; the kernel keeps enforcing the last ruleset")

    def _keep_warm(self) -> None:
        """At a clean stop with the local datastore: what the next start would compute
        from the store, for it to take instead (agent/warm.py)."""
        service = getattr(self, "service", None)
        if (self.config.datastore != "local" or service is None or self.store is None
                or not self._ready):
            return
        self._ready = False
        reconciler = getattr(self, "reconciler", None)
        if (self.keeper is not None and reconciler is not None
                and self.keeper.kept_revision == reconciler.desired_revision
                and (Path(self.config.state_dir) / warm.FILE).exists()):
            log.info("warm start kept already", extra={"fields": {
                "revision": self.keeper.kept_revision}})
            return
        started = time.monotonic()
        try:
            with self.store.lock, collector_paused():
                kept = warm.save(self.config.state_dir, service.state,
                                 strict_cidr=self.config.strict_cidr)
        except Exception as exc:  # a cache: whatever fails, the next start is cold
            log.warning("warm start not kept", extra={"fields": {"error": str(exc)}})
            return
        log.info("warm start kept" if kept else "warm start not kept: refused records",
                 extra={"fields": {"seconds": round(time.monotonic() - started, 3)}})

    def wait(self) -> None:
        while not self._stopping.wait(1.0):
            pass

    # ---- reconciliation hooks -----------------------------------------------------------

    _verify_next = False
    _verifier: threading.Thread | None = None

    def _run(self, periodic: bool) -> None:
        verify = self._verify_next
        if periodic and not verify:
            if self._verifier is not None:
                self._check_soon()  # read back on the verifier's thread
            else:
                verify = True
        self._verify_next = False
        if not self.reconciler.run(verify):
            # Read the kernel back on the retry: the failed transaction may have
            # been refused for what is there now.
            self._verify_next = True
            if self.runner is not None:
                self.runner.retry_in(self.reconciler.backoff())

    def _events_lost(self) -> None:
        """The monitor's socket overflowed (our own large transactions do that): a foreign
        change may have gone unheard. Not to an owned table, which no other process can
        change; so that one waits for the periodic check. A read-back at scale takes one
        of the two CPUs for seconds, and after a large apply, changes are coming."""
        if getattr(self.reconciler.datapath, "owned", False):
            log.debug("nftables events lost; the table is owned, so none was foreign")
            return
        self._check_soon()

    def _check_soon(self) -> None:
        """Ask the verifier thread for a read-back (the periodic one, or lost events)."""
        self._verify_wanted.set()

    def _verify_loop(self) -> None:
        """Reads the kernel back when asked; drift goes to the runner's verifying run."""
        while True:
            self._verify_wanted.wait()
            self._verify_wanted.clear()
            if self._stopping.is_set():
                return
            clean = self.reconciler.verify_quietly()
            release_memory()  # what the read took
            if clean is False:
                log.info("the kernel differs from what was applied; repairing")
                self._verify_next = True
                if self.runner is not None:
                    self.runner.run()
            elif clean:
                self.visibility.revoke_soon()  # cuts are also looked for periodically

    def _foreign_change(self) -> None:
        log.info("another process changed the datapath's kernel objects; checking them")
        self._verify_next = True
        if self.runner is not None:
            self.runner.run()

    def _applied(self, report: ApplyReport, ruleset: Ruleset) -> None:
        m = self.metrics
        if report.error:
            m.apply_errors.inc()
            return
        self._ruleset = ruleset
        self.visibility.refresh(ruleset)  # names for the flow log; cuts come by _revoked
        m.applies.inc()
        m.apply_duration.observe(report.duration)
        if sum(report.summary.values()) > LARGE:
            release_memory()  # a large delta: its commands and the compile that made it
        if report.summary:
            log.info("applied", extra={"fields": {
                "revision": report.revision, "ms": round(report.duration * 1000, 2),
                **report.summary}})
        self._update_gauges()

    def operation_providers(self) -> list[Operations]:
        """What serves operations besides the service's core, in `status` order."""
        keeper = [self.keeper] if self.keeper is not None else []
        return [FlowOps(self), *keeper, *self.extensions]

    def _cluster(self) -> Cluster:
        with self.service.lock:
            state = self.service.state
            return enforceable(state, state.quarantined)

    def _cluster_near(self, addresses: set[str]) -> Cluster | None:
        """The revoker's cluster: only the endpoints at `addresses` (admission.cluster_near)."""
        with self.service.lock:
            return cluster_near(self.service.state, addresses)

    def _healthy(self) -> bool:
        runner = self.runner
        alive = runner is not None and runner._thread is not None and runner._thread.is_alive()
        return alive and self.reconciler.healthy

    def node_report(self) -> dict[str, Any]:
        """GET /status on the metrics port: what `kubectl stockade status` compares with
        the cluster (the format is kube/live.py's). Policies are those the kernel
        enforces, each with the resourceVersion it enforces ("" for local ones)."""
        r = self.reconciler
        feed = self.kube_feed
        last = r.last
        if feed is not None:
            node = feed.node
            policies = feed.policy_versions(r.applied_revision)
            synced = bool(feed.synced.is_set())
        else:
            try:
                node = self.node_name()
            except AgentError:  # on one host the name only labels the report
                node = socket.gethostname()
            with self.service.lock:
                state = self.service.state
                records: list[tuple[str, PolicyRecord | ClusterPolicyRecord]] = [
                    *state.policies.items(), *state.cluster_policies.items()]
                policies = {k: str((p.manifest.get("metadata") or {}).get("resourceVersion")
                                   or "") for k, p in records
                            if k != QUARANTINE_POLICY
                            and not k.endswith(f"/{QUARANTINE_POLICY}")}
            synced = True
        return {"node": node, "ready": r.healthy and self.service.extensions_ready,
                "inSync": synced and r.in_sync,
                "error": (last.error if last is not None else "") or "",
                "cniConfig": cni_config(self.config.cni_conf_dir),
                # Start-up refuses a kernel that fails the probe: here, all present.
                "features": {name: True for name in
                             KERNEL_FEATURES.get(self.config.datapath, ())},
                "policies": policies}

    def _revoked(self, ruleset: Ruleset) -> None:
        """The kernel changed (an apply, or a repair): cut what it no longer allows."""
        self.visibility.applied(ruleset)

    def _drift(self, delta: Plan) -> None:
        self.metrics.drift_repairs.inc()

    def _enforced(self, seconds: float) -> None:
        self.metrics.enforcement_latency.observe(seconds)

    def _update_gauges(self) -> None:
        st = self.service.state
        self.metrics.endpoints.set(len(st.endpoints))
        self.metrics.policies.set(len(st.policies))
        self.metrics.cluster_policies.set(len(st.cluster_policies))
        self.metrics.namespaces.set(len(st.namespaces))

    def _count_datapath(self) -> None:
        """The datapath's objects by kind, set when the metrics are read (the registry's
        refresh): counting every set element and rule takes 0.3 ms at 10,000 endpoints
        and 1,000 policies and 3 ms at 50,000 and 5,000, too much for every change."""
        ruleset = self._ruleset
        if ruleset is self._counted:
            return
        counts = ruleset.counts()
        for kind, value in (("sets", counts["sets"]), ("set_elements", counts["set_elements"]),
                            ("chains", counts["chains"]), ("rules", counts["rules"]),
                            ("map_entries", counts["ingress_entries"]
                             + counts["egress_entries"])):
            self.metrics.datapath_objects.set(value, kind=kind)
        self._counted = ruleset


class FlowOps:
    """The denied-flow log (``flows``) and the connections cut, read from the
    agent's visibility (agent/visibility.py), which the agent itself starts."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def operations(self) -> Mapping[str, Handler]:
        return {"flows": self.op_flows}

    def status(self) -> Mapping[str, Any]:
        return {"connectionsCut": self.agent.visibility.cut_total}

    def op_flows(self, args: dict[str, Any]) -> Any:
        a = Args(args, "flows")
        return self.agent.visibility.flows(a.integer("since", 0, hi=2**62),
                                           a.integer("limit", 100, lo=1, hi=100_000),
                                           a.flag("tail", False))


def default_extensions() -> list[Extension]:
    """The extensions `stockade agent` runs with."""
    from stockade.cni.thin import ThinPlugin

    return [ContainerManager(),  # `stockade run`, `ps`, `rm`
            CniOps(),  # the CNI plugin's cni.* operations
            ThinPlugin()]  # cni.exec: the thin plugin's invocations, run here


def _read_snapshot(path: str, strict_cidr: bool) -> tuple[AgentState, dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return parse_snapshot(data, strict_cidr=strict_cidr)
    except OSError as exc:
        raise AgentError(f"{path}: cannot read the snapshot: {exc}") from None
    except ValueError as exc:
        raise AgentError(f"{path}: not a JSON snapshot: {exc}") from None
    except InputError as exc:
        raise AgentError(f"{path}: not a valid snapshot: {exc}") from None


# What each datapath's check() probes at start (the agent does not start without them).
KERNEL_FEATURES: dict[str, tuple[str, ...]] = {
    "nft": ("inetForwardHook", "conntrack", "verdictMaps", "intervalSets",
            "concatenatedSets", "bridgeNetfilter"),
    "iptables": ("ipsetHashIp", "ipsetHashNet", "ipsetHashIpPort", "setMatch",
                 "multiportMatch", "conntrackMatch", "commentMatch", "limitMatch",
                 "nflogTarget", "bridgeNetfilter"),
    "ebpf": ("bpffs", "bpfVerifier", "tcAttach", "ringBuffer"),
}


def cni_config(directory: str) -> list[dict[str, Any]]:
    """The CNI configurations as a container runtime reads them: every *.conflist,
    *.conf and *.json file of `directory`, by name (the runtime takes the first),
    each with its network name and its plugins' types in order."""
    out: list[dict[str, Any]] = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return out
    for name in names:
        if not name.endswith((".conflist", ".conf", ".json")):
            continue
        entry: dict[str, Any] = {"file": name}
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                doc = json.load(f)
            plugins = doc.get("plugins") if isinstance(doc.get("plugins"), list) else [doc]
            entry["name"] = str(doc.get("name") or "")
            entry["plugins"] = [str(p.get("type") or "") for p in plugins
                                if isinstance(p, dict)]
        except (OSError, ValueError, AttributeError) as exc:
            entry["error"] = str(exc) or type(exc).__name__
        out.append(entry)
    return out


def notify_ready() -> None:
    """Tell systemd (Type=notify) that the agent serves, if it is listening."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    addr = "\0" + target[1:] if target.startswith("@") else target
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(addr)
            s.sendall(b"READY=1")
        except OSError as exc:
            log.warning("could not notify systemd: %s", exc)


# How long a thread holding the interpreter keeps it while another waits (CPython's
# default: 5 ms). A change passes the interpreter between threads a dozen times
# (socket, store, reconciler, kernel); while the verifier parses the table read back
# (a second or more at scale) each pass cost up to 5 ms: the p99 of a change.
SWITCH_INTERVAL = 0.0005


def run_agent(config: AgentConfig, datapath: Datapath | None = None,
              ownership: Ownership | None = None) -> int:
    """`datapath`: opened ahead by the caller (agent/early.py), else here; `ownership`:
    the locks the caller took before opening it (agent/ownership.py), else taken here."""
    if ownership is None:
        ownership = take_ownership(config.state_dir, config.table, config.netns)
    try:
        return _run_agent(config, datapath)
    finally:
        ownership.release()


def _run_agent(config: AgentConfig, datapath: Datapath | None) -> int:
    sys.setswitchinterval(SWITCH_INTERVAL)
    agent = Agent(config, datapath)
    agent.extensions.extend(default_extensions())

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("signal received", extra={"fields": {"signal": signal.Signals(signum).name}})
        agent._stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        with collector_paused():  # load, compile, adopt: see heap.py
            agent.start()
    except Exception:
        agent.stop()
        raise
    agent.wait()
    agent.stop()
    return 0



