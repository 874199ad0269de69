"""The agent's state from the Kubernetes API (``stockade agent --datastore kubernetes``).

Four reflectors (reflector.py) list-then-watch Namespaces, NetworkPolicies, Pods
and ClusterNetworkPolicies into a :class:`KubeFeed`, which translates each object with the same
decoders and admission functions as files and the socket (``model.decode``,
``model.admit``, ``model.validate``) and commits what changed to the agent's
``Service``: the same state, incremental compiler and reconciler as with the
local store.

Decisions, and why:

* **Nothing is programmed before the first list.** Until Namespaces,
  NetworkPolicies and Pods have each been listed once, the kernel keeps the
  table it has (the last agent's) and ``status``/``/healthz`` say not in sync.
  The first list is then committed as a whole and the first reconciliation
  reads the kernel back and applies only the difference (the restart path of
  the local store: nothing is flushed).
* **A relist never flushes.** After 410 Gone a resource is listed again; the
  feed computes, key by key, what the agent's state should be and commits only
  what differs from what it holds: unchanged objects cause no change, deleted
  ones are deleted, and nothing is ever emptied first.
* **Pods.** Every pod with an IP is an endpoint (labels, IPs, named ports), on
  any node: remote pods are the peers selectors pick. A pod without an IP yet
  is not an error: it is skipped until an event gives it one. hostNetwork pods
  are not endpoints (their address is the node's), nor are pods that finished
  (``Succeeded``/``Failed`` keep ``podIP`` although the address is free again).
* **One bad object never blocks the others; it is held fail-closed.** An
  object stockade's admission refuses (a NetworkPolicy with a field it cannot
  decode, a pod with two IPs of one family, ...) is handled like a bad record of
  the local store (agent/admission.py): the endpoints it could affect are held
  isolated both ways (a bad pod: that pod; a bad policy or namespace: the pods of
  that namespace), the reason is logged at error level, shown in ``status``
  (``quarantined`` and ``datastore.invalid``) and counted
  (``stockade_kube_invalid_objects``). Skipping a bad policy instead would
  silently open what it was written to close.
* **ClusterNetworkPolicy** (``policy.networking.k8s.io/v1alpha2``, cluster-scoped)
  is watched like NetworkPolicy once its CRD is installed; without it the list
  answers 404, which means none exist (asked again every half minute). One that
  stockade's decoder refuses is held like a bad NetworkPolicy, by its reach: the
  endpoints its subject selects (every endpoint when even the subject cannot be
  read) are held fail-closed, and so are they all when the agent's datapath does
  not enforce tiers (every datapath does today; see agent.service.enforces_tiers).
  Held endpoints are then also denied by an
  Admin policy before any other tier (agent/admission.py ``quarantine_tier``), so
  no Admin Accept reopens them.
* **Two pods claiming one address** (an address reused before the old pod's
  deletion arrived) cannot both be in the kernel's maps: the endpoint already
  holding it (or a CNI attachment of this node, the local truth) keeps it, the
  other waits (``datastore.waiting``) and is examined again at every change and
  every few seconds.
* **Local truth stays local.** Endpoints of the CNI plugin (``cni.add`` on this
  node) and of ``stockade run`` are kept in the local store as before; the API
  gives a CNI endpoint its labels and named ports, the CNI attachment its
  address. Endpoints, namespaces and policies from the API are held in memory
  only (:class:`KubeCacheStore`): the API is their durable store.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stockade.agent.admission import (
    QUARANTINE_POLICY,
    deny_all,
    held_endpoint,
    quarantine_tier,
    quarantine_tier_manifest,
)
from stockade.agent.extension import Handler
from stockade.agent.metrics import Registry
from stockade.agent.records import (
    OWNER_CNI,
    OWNER_KUBE,
    OWNER_RUN,
    AgentState,
    Change,
    ClusterPolicyRecord,
    DeleteClusterPolicy,
    DeleteEndpoint,
    DeleteNamespace,
    DeletePolicy,
    EndpointRecord,
    PolicyRecord,
    PutClusterPolicy,
    PutEndpoint,
    PutNamespace,
    PutPolicy,
    RefusedClusterPolicy,
    read_cluster_policy,
)
from stockade.agent.service import enforces_tiers
from stockade.agent.store import Store
from stockade.engine.tiers import subject_selects
from stockade.errors import DecodeError
from stockade.kube.client import (
    CLUSTER_NETWORK_POLICIES,
    NAMESPACES,
    NETWORK_POLICIES,
    PODS,
    KubeClient,
    Resource,
)
from stockade.kube.reflector import DELETED, Reflector, ReflectorConfig
from stockade.model.admit import canonical_ip, validate_endpoint, validate_namespace
from stockade.model.cidr import parse_ip
from stockade.model.cluster import ContainerPort, Endpoint, Namespace, implicit_namespace
from stockade.model.cnp import CnpPeer
from stockade.model.decode import decode_namespace, decode_network_policy, decode_pod
from stockade.model.labels import Labels
from stockade.model.policy import Source
from stockade.model.validate import validate_policy

log = logging.getLogger("stockade.kube")

FINISHED_PHASES = ("Succeeded", "Failed")
RETRY_WAITING = 5.0  # seconds between looks at pods waiting for an address
LOCAL_OWNERS = (OWNER_CNI, OWNER_RUN)  # endpoints that are this node's own truth
_PLACEHOLDER_IP = "192.0.2.1"  # TEST-NET-1: lets decode_pod read labels before the IP

# ---- translation (pure) ------------------------------------------------------------------


@dataclass(frozen=True)
class PodView:
    """What the feed knows of one Pod of the API."""

    key: str
    node: str
    labels: Labels
    ports: tuple[ContainerPort, ...]
    endpoint: Endpoint | None  # None: not an endpoint (see `skipped`)
    skipped: str = ""  # why not: "no IP yet", "hostNetwork", "phase Succeeded", ...
    errors: tuple[str, ...] = ()  # admission refused it: held fail-closed


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _version(obj: Mapping[str, Any]) -> str:
    return str(_meta(obj).get("resourceVersion") or "")


def object_key(res: Resource, obj: Mapping[str, Any]) -> str:
    meta = _meta(obj)
    name = str(meta.get("name") or "")
    if not res.namespaced:
        return name
    return f"{meta.get('namespace') or 'default'}/{name}"


def _typed(res: Resource, obj: Mapping[str, Any]) -> dict[str, Any]:
    """List items come without kind and apiVersion; the decoders want them."""
    return {**obj, "apiVersion": res.api_version, "kind": res.kind}


def translate_namespace(obj: Mapping[str, Any]) -> tuple[Namespace, list[str]]:
    """The namespace, and the reasons its pods must be held (empty: none)."""
    name = object_key(NAMESPACES, obj)
    try:
        ns = decode_namespace(_typed(NAMESPACES, obj), Source("kubernetes"))
    except DecodeError as e:
        return implicit_namespace(name), [f"namespace {name}: {e.render()}"]
    return ns, [f"namespace {name}: {e.render()}" for e in validate_namespace(ns)]


def translate_policy(obj: Mapping[str, Any]) -> tuple[str, PolicyRecord | None, list[str]]:
    """(key, the record or None, errors). ``status`` is the server's and is dropped
    (API servers 1.24-1.26 send an empty one), every other field is decoded strictly."""
    key = object_key(NETWORK_POLICIES, obj)
    doc = _typed(NETWORK_POLICIES, {k: v for k, v in obj.items() if k != "status"})
    try:
        policy = decode_network_policy(doc, Source("kubernetes"))
    except DecodeError as e:
        return key, None, [f"networkpolicy {key}: {e.render()}"]
    errors = [f"networkpolicy {key}: {e.render()}" for e in validate_policy(policy)]
    if errors:
        return key, None, errors
    return key, PolicyRecord(policy, doc), []


@dataclass(frozen=True)
class TierView:
    """What the feed knows of one ClusterNetworkPolicy of the API."""

    name: str
    record: ClusterPolicyRecord | None  # None: refused (see `errors`)
    errors: tuple[str, ...] = ()
    # The subject of a refused one, when it can be read alone (None: it cannot):
    # the endpoints it selects are held.
    subject: CnpPeer | None = None


def translate_cluster_policy(obj: Mapping[str, Any]) -> TierView:
    """Decoded and validated strictly (``status`` is the server's and is dropped)."""
    name = object_key(CLUSTER_NETWORK_POLICIES, obj)
    doc = _typed(CLUSTER_NETWORK_POLICIES, {k: v for k, v in obj.items() if k != "status"})
    read = read_cluster_policy(doc, name, "kubernetes")
    if isinstance(read, RefusedClusterPolicy):
        return TierView(name, None, read.errors, read.subject)
    return TierView(name, read)


def _pod_ips(status: Mapping[str, Any]) -> list[str]:
    ips: list[str] = []
    pod_ip = status.get("podIP")
    if isinstance(pod_ip, str) and pod_ip:
        ips.append(pod_ip)
    entries = status.get("podIPs")
    for entry in entries if isinstance(entries, list) else ():
        ip = entry.get("ip") if isinstance(entry, Mapping) else None
        if isinstance(ip, str) and ip and ip not in ips:
            ips.append(ip)
    return ips


def translate_pod(obj: Mapping[str, Any]) -> PodView:
    key = object_key(PODS, obj)
    spec = obj.get("spec") if isinstance(obj.get("spec"), Mapping) else {}
    status = obj.get("status") if isinstance(obj.get("status"), Mapping) else {}
    assert isinstance(spec, Mapping) and isinstance(status, Mapping)
    node = str(spec.get("nodeName") or "")
    ips = _pod_ips(status)
    # Labels and named ports are read even before the pod has an address: the CNI
    # plugin asks for them at ADD, before the kubelet reports the IP.
    try:
        base = decode_pod(_typed(PODS, {**obj, "status": {"podIP": _PLACEHOLDER_IP}}),
                          Source("kubernetes"))
    except DecodeError as e:
        ns, _, name = key.partition("/")
        err = f"pod {key}: {e.render()}"
        valid = tuple(ip for ip in ips if parse_ip(ip) is not None)
        if not valid or spec.get("hostNetwork") is True:
            return PodView(key, node, Labels({}), (), None, "undecodable", (err,))
        return PodView(key, node, Labels({}), (), Endpoint(ns, name, Labels({}), valid),
                       "", (err,))
    view = PodView(key, node, base.labels, base.ports, None)
    phase = status.get("phase")
    if spec.get("hostNetwork") is True:
        return replace(view, skipped="hostNetwork")
    if phase in FINISHED_PHASES:
        return replace(view, skipped=f"phase {phase}")
    if not ips:
        return replace(view, skipped="no IP yet")
    ep = replace(base, ips=tuple(ips))
    errors = tuple(f"pod {key}: {e.render()}" for e in validate_endpoint(ep))
    return replace(view, endpoint=ep, errors=errors)


# ---- the store in kubernetes mode ---------------------------------------------------------


class KubeCacheStore(Store):
    """The local store when the API is the datastore: only local truth is durable.

    Endpoints of this node's CNI attachments and of ``stockade run``, and the meta
    blobs (address pool, attachments), are written to SQLite as before; what comes
    from the API (endpoints owned ``kube``, namespaces, policies) is not: the API
    keeps it, and a restarted agent lists it again. Revisions still grow by one per
    commit (in memory beyond the database's), so waiting for enforcement works alike.
    """

    def __init__(self, state_dir: Path | str) -> None:
        super().__init__(state_dir)
        self._rev = super().revision()
        self._local: set[str] = set()

    def load_local(self) -> tuple[AgentState, int]:
        """The durable part: this node's CNI and `stockade run` endpoints only (what an
        earlier run with the local datastore kept besides, namespaces, policies and
        Pods applied through the socket, is left in the file, unused: the API says
        what the cluster holds)."""
        state, revision = super().load()
        local = {k: r for k, r in state.endpoints.items() if r.owner in LOCAL_OWNERS}
        self._local = set(local)
        return AgentState(endpoints=local), revision

    def revision(self) -> int:
        return self._rev

    def commit(self, changes: Sequence[Change], meta: Mapping[str, Any] | None = None, *,
               durable: bool = True) -> int:
        kept: list[Change] = []
        for c in changes:
            if isinstance(c, PutEndpoint):
                if c.record.owner in LOCAL_OWNERS:
                    kept.append(c)
                elif c.record.key in self._local:
                    kept.append(DeleteEndpoint(c.record.key))
            elif isinstance(c, DeleteEndpoint) and c.key in self._local:
                kept.append(c)
        with self.lock:
            if not changes and not meta:
                return self._rev
            if kept or meta:
                persisted = super().commit(kept, meta, durable=durable)
                self._rev = max(self._rev + 1, persisted)
            else:
                self._rev += 1
            for c in kept:
                if isinstance(c, PutEndpoint):
                    self._local.add(c.record.key)
                elif isinstance(c, DeleteEndpoint):
                    self._local.discard(c.key)
            return self._rev


# ---- the feed -------------------------------------------------------------------------------


class _Sink:
    def __init__(self, feed: KubeFeed, res: Resource) -> None:
        self.feed, self.res = feed, res

    def replace(self, items: list[dict[str, Any]], resource_version: str) -> None:
        self.feed.replace(self.res, items, resource_version)

    def event(self, type: str, obj: dict[str, Any]) -> None:
        self.feed.event(self.res, type, obj)

    def batch(self) -> contextlib.AbstractContextManager[object]:
        """Events delivered together (one etcd watch response): see EtcdFeed.batch."""
        return self.feed.batch()


class KubeFeed:
    """Namespaces, NetworkPolicies and Pods of the API into the agent's service.

    Wiring (agent/daemon.py): ``bind(service, registry)``, then ``start()``; the
    ``synced`` event is set once the first lists are committed. It is also an
    operations provider (``status`` gets a ``datastore`` field); it serves no
    operation of its own.

    The etcd datastore (etcd/datastore.py) is this feed with other reflectors: the
    class attributes below are what differs.
    """

    KIND = "kubernetes"  # `status`: datastore.kind
    SOURCE = "the Kubernetes API"  # in logs and metric help
    METRICS = "stockade_kube"  # the metrics' prefix
    OWNER = OWNER_KUBE  # the owner of the endpoints this feed makes
    RESOURCES = (NAMESPACES, NETWORK_POLICIES, PODS, CLUSTER_NETWORK_POLICIES)

    def __init__(self, client: KubeClient, node: str, *,
                 config: ReflectorConfig | None = None,
                 reflector_factory: Callable[..., Reflector] = Reflector) -> None:
        self.client = client
        self.node = node
        self.config = config or ReflectorConfig()
        self.service: Any = None  # stockade.agent.service.Service, once bound
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self.synced = threading.Event()
        self._stop = threading.Event()
        self.namespaces: dict[str, Namespace] = {}
        self.ns_errors: dict[str, list[str]] = {}
        self.policies: dict[str, PolicyRecord] = {}
        self.policy_errors: dict[str, list[str]] = {}
        self.pods: dict[str, PodView] = {}
        self.tiers: dict[str, TierView] = {}  # ClusterNetworkPolicies by name
        # Whether the datapath enforces tiers (set by `bind`); without, every one is held.
        self.tiers_enforced = True
        self._pods_in: dict[str, set[str]] = {}
        self._policies_in: dict[str, set[str]] = {}
        self._listed: set[str] = set()
        # Each object's resourceVersion as last translated, by plural: a list's object
        # with the same one is the same object (versions are unique in a cluster).
        self._versions: dict[str, dict[str, str]] = {}
        self._unsure = False  # a delivery failed half-way: the next list syncs everything
        self.held: dict[str, list[str]] = {}  # endpoint key -> reasons (fail-closed)
        self._tier_hold: tuple[tuple[str, tuple[str, ...], CnpPeer | None], ...] = ()
        self.waiting: dict[str, str] = {}  # endpoint key -> why it waits (an address)
        self._ns_hold: dict[str, tuple[str, ...]] = {}  # namespace -> why its pods are held
        self._reported: dict[str, tuple[str, ...]] = {}  # errors logged, by object
        self.commits = 0
        self.changes = 0
        # Which resourceVersion of each NetworkPolicy the kernel enforces (the agent's
        # /status, for `kubectl stockade status`): versions wait here with the revision
        # that carries them until the reconciler has applied it.
        self._enforced_rv: dict[str, str] = {}
        self._pending_rv: list[tuple[int, str, str | None]] = []
        self.reflectors = [reflector_factory(client, res, _Sink(self, res), config=self.config,
                                             observe=self._observer(res.plural))
                           for res in self.RESOURCES]
        self._retry: threading.Thread | None = None
        self._m_events: Any = None
        self._m_invalid: Any = None
        self._m_relists: Any = None
        self._m_errors: Any = None
        self._m_synced: Any = None

    # ---- wiring ----------------------------------------------------------------------------

    def bind(self, service: Any, registry: Registry | None = None) -> None:
        self.service = service
        reconciler = getattr(service, "reconciler", None)
        self.tiers_enforced = enforces_tiers(getattr(reconciler, "datapath", None)) \
            if reconciler is not None else True
        if registry is not None:
            self._m_events = registry.counter(
                f"{self.METRICS}_events_total",
                f"Watch events delivered by {self.SOURCE}, by resource.", ("resource",))
            self._m_relists = registry.counter(
                f"{self.METRICS}_lists_total",
                "Lists of a resource delivered (the first one and every relist).",
                ("resource",))
            self._m_errors = registry.counter(
                f"{self.METRICS}_watch_errors_total",
                "Failed lists and watches (dropped, refused, stalled), by resource.",
                ("resource",))
            self._m_invalid = registry.gauge(
                f"{self.METRICS}_invalid_objects",
                f"Objects of {self.SOURCE} that admission refuses (their endpoints are held "
                "fail-closed), by kind.", ("kind",))
            self._m_synced = registry.gauge(
                f"{self.METRICS}_synced", "1 once the first lists are enforced, else 0.")
            for kind in ("namespace", "networkpolicy", "pod", "clusternetworkpolicy"):
                self._m_invalid.set(0, kind=kind)
            self._m_synced.set(0)

    def start(self) -> None:
        for r in self.reflectors:
            r.start()
        self._retry = threading.Thread(target=self._retry_loop, name="kube-retry",
                                       daemon=True)
        self._retry.start()

    def stop(self) -> None:
        self._stop.set()
        for r in self.reflectors:
            r.stop(timeout=0.5)
        with self._cond:
            self._cond.notify_all()
        self.client.close()  # a watch still blocked in a read ends with it

    # ---- Operations (status only) -----------------------------------------------------------

    def operations(self) -> Mapping[str, Handler]:
        return {}

    def status(self) -> Mapping[str, Any]:
        with self._lock:  # cheap at any size: nothing here walks every pod
            out = {
                "kind": self.KIND, "server": self.client.server, "node": self.node,
                "synced": self.synced.is_set(),
                "resources": {r.res.plural: r.status.to_dict() for r in self.reflectors},
                "counts": {"namespaces": len(self.namespaces), "policies": len(self.policies),
                           "pods": len(self.pods), "clusterPolicies": len(self.tiers)},
                "invalid": {k: list(v) for k, v in sorted(self._reported.items())},
                "waiting": dict(sorted(self.waiting.items())),
            }
        return {"datastore": out}

    def _observer(self, plural: str) -> Callable[[str], None]:
        def observe(what: str) -> None:
            metric = {"event": self._m_events, "list": self._m_relists,
                      "error": self._m_errors}.get(what)
            if metric is not None:
                metric.inc(resource=plural)
        return observe

    # ---- what the CNI plugin asks -------------------------------------------------------------

    def wait_pod(self, namespace: str, name: str, timeout: float) -> PodView | None:
        """The pod as the API shows it, waiting up to ``timeout`` for the watch to
        deliver it (the kubelet creates the sandbox right after the pod is scheduled,
        so the plugin can ask before this node's watch has seen it)."""
        key = f"{namespace}/{name}"
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                pod = self.pods.get(key)
                if pod is not None and self.synced.is_set():
                    return pod
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return None
                self._cond.wait(left)

    def policy_versions(self, applied_revision: int) -> dict[str, str]:
        """NetworkPolicy key (ns/name) and ClusterNetworkPolicy name -> the resourceVersion
        the kernel enforces (what the reconciler has applied); a policy held fail-closed
        is not enforced as written: absent."""
        with self._lock:
            keep: list[tuple[int, str, str | None]] = []
            for revision, key, rv in self._pending_rv:
                if revision > applied_revision:
                    keep.append((revision, key, rv))
                elif rv is None:
                    self._enforced_rv.pop(key, None)
                else:
                    self._enforced_rv[key] = rv
            self._pending_rv = keep
            return dict(sorted(self._enforced_rv.items()))

    def hold_reasons(self, key: str) -> list[str]:
        """Why the pod ``key`` is held fail-closed (empty: it is not)."""
        with self._lock:
            pod = self.pods.get(key)
            ns, _, name = key.partition("/")
            tiers = self._tier_reasons(Endpoint(ns, name, pod.labels, ())) \
                if pod is not None else []
            return [*(pod.errors if pod is not None else ()), *self._ns_reasons(ns), *tiers]

    # ---- the sinks --------------------------------------------------------------------------

    def replace(self, res: Resource, items: list[dict[str, Any]],
                resource_version: str = "") -> None:
        """A whole list: the view of that resource is replaced, the state gets only
        the differences.

        An object whose resourceVersion the view already holds is not translated
        again, and after the first sync only the keys whose view changed are synced:
        a relist after 410 at 100,000 pods costs the decoding of the list, not a
        recomputation of every endpoint. A delivery that failed half-way (a bug: the
        reflector lists again) leaves ``_unsure`` set, and the next list syncs
        everything, as the first does."""
        with self._lock:
            full = self._unsure or not self.synced.is_set()
            self._unsure = True  # until this delivery is through
            before = {} if full else self._view_of(res)
            versions = self._versions.setdefault(res.plural, {})
            listed = {object_key(res, obj): obj for obj in items}
            for key in self._keys_of(res) - listed.keys():
                self._drop(res, key)
            for key, obj in listed.items():
                version = _version(obj)
                if not version or versions.get(key) != version:
                    self._put(res, obj)
            self._listed.add(res.plural)
            if self._lists_in():
                if full:
                    self._sync_all()
                else:
                    after = self._view_of(res)
                    changed = {k for k in before.keys() | after.keys()
                               if (a := before.get(k)) is not (b := after.get(k)) and a != b}
                    self._sync_keys(res, changed)
            self._unsure = False
            self._cond.notify_all()

    def _lists_in(self) -> bool:
        """Every resource listed once: the first sync may be committed."""
        return len(self._listed) == len(self.reflectors)

    def _keys_of(self, res: Resource) -> set[str]:
        if res is NAMESPACES:
            return set(self.namespaces)
        if res is NETWORK_POLICIES:
            return set(self.policies) | set(self.policy_errors)
        if res is CLUSTER_NETWORK_POLICIES:
            return set(self.tiers)
        return set(self.pods)

    def _view_of(self, res: Resource) -> dict[str, object]:
        """What the sync reads of each object of ``res`` (compared across a list)."""
        if res is NAMESPACES:
            return {k: (ns, tuple(self.ns_errors.get(k, ()))) for k, ns in
                    self.namespaces.items()}
        if res is NETWORK_POLICIES:
            return {k: (self.policies.get(k), tuple(self.policy_errors.get(k, ())))
                    for k in self._keys_of(res)}
        if res is CLUSTER_NETWORK_POLICIES:
            return dict(self.tiers)
        return dict(self.pods)

    def _sync_keys(self, res: Resource, keys: set[str]) -> None:
        none: set[str] = set()
        self._sync(keys if res is NAMESPACES else none,
                   keys if res is NETWORK_POLICIES else none,
                   keys if res is PODS else none,
                   keys if res is CLUSTER_NETWORK_POLICIES else none)

    def _put(self, res: Resource, obj: Mapping[str, Any]) -> None:
        if res is NAMESPACES:
            self._put_namespace(obj)
        elif res is NETWORK_POLICIES:
            self._put_policy(obj)
        elif res is CLUSTER_NETWORK_POLICIES:
            self._put_tier(obj)
        else:
            self._put_pod(obj)
        key, version = object_key(res, obj), _version(obj)
        if version:
            self._versions.setdefault(res.plural, {})[key] = version
        else:
            self._versions.get(res.plural, {}).pop(key, None)

    def _drop(self, res: Resource, key: str) -> None:
        """The object is gone from the API (deleted, or absent from a list)."""
        if res is NAMESPACES:
            self.namespaces.pop(key, None)
            self.ns_errors.pop(key, None)
        elif res is NETWORK_POLICIES:
            self._drop_policy(key)
        elif res is CLUSTER_NETWORK_POLICIES:
            self.tiers.pop(key, None)
        else:
            self.pods.pop(key, None)
            self._pods_in.get(key.partition("/")[0], set()).discard(key)
        self._report(f"{res.kind.lower()}/{key}", [], gone=True)
        self._versions.get(res.plural, {}).pop(key, None)

    def batch(self) -> contextlib.AbstractContextManager[object]:
        """Events that belong together; the API's events each stand alone."""
        return contextlib.nullcontext()

    def event(self, res: Resource, type: str, obj: dict[str, Any]) -> None:
        with self._lock:
            self._unsure = True  # until this event is through (see `replace`)
            key = object_key(res, obj)
            if type == DELETED:
                self._drop(res, key)
            else:
                self._put(res, obj)
            if self.synced.is_set():
                self._sync_keys(res, {key})
            self._unsure = False
            self._cond.notify_all()

    def _put_namespace(self, obj: Mapping[str, Any]) -> None:
        ns, errors = translate_namespace(obj)
        self.namespaces[ns.name] = ns
        if errors:
            self.ns_errors[ns.name] = errors
        else:
            self.ns_errors.pop(ns.name, None)
        self._report(f"namespace/{ns.name}", errors)

    def _put_policy(self, obj: Mapping[str, Any]) -> None:
        key, rec, errors = translate_policy(obj)
        self._drop_policy(key)
        if rec is not None:
            self.policies[key] = rec
        else:
            self.policy_errors[key] = errors
        self._policies_in.setdefault(key.partition("/")[0], set()).add(key)
        self._report(f"networkpolicy/{key}", errors)

    def _drop_policy(self, key: str) -> None:
        self.policies.pop(key, None)
        self.policy_errors.pop(key, None)
        self._policies_in.get(key.partition("/")[0], set()).discard(key)

    def _put_tier(self, obj: Mapping[str, Any]) -> None:
        view = translate_cluster_policy(obj)
        if view.record is not None and not self.tiers_enforced:
            view = TierView(view.name, None, (
                f"clusternetworkpolicy {view.name}: the {self._datapath_name()} datapath does "
                "not enforce ClusterNetworkPolicy tiers (run the agent with --datapath nft)",),
                view.record.policy.subject)
        self.tiers[view.name] = view
        self._report(f"clusternetworkpolicy/{view.name}", list(view.errors))

    def _datapath_name(self) -> str:
        reconciler = getattr(self.service, "reconciler", None)
        return str(getattr(getattr(reconciler, "datapath", None), "name", "?"))

    def _tier_reasons(self, ep: Endpoint) -> list[str]:
        """Why the ClusterNetworkPolicies stockade refuses hold `ep` (its labels as the
        API gives them): their subject selects it, or cannot be read."""
        if not self._tier_hold:
            return []
        out: list[str] = []
        labels = {n: ns.labels for n, ns in self.namespaces.items()}
        for name in sorted(self.tiers):
            view = self.tiers[name]
            if view.errors and (view.subject is None
                                or subject_selects(view.subject, ep, labels)):
                out += view.errors
        return out

    def _refused_tiers(self) -> tuple[tuple[str, tuple[str, ...], CnpPeer | None], ...]:
        return tuple((n, v.errors, v.subject) for n, v in sorted(self.tiers.items())
                     if v.errors)

    def _put_pod(self, obj: Mapping[str, Any]) -> None:
        pod = translate_pod(obj)
        self.pods[pod.key] = pod
        self._pods_in.setdefault(pod.key.partition("/")[0], set()).add(pod.key)
        self._report(f"pod/{pod.key}", list(pod.errors))

    def _report(self, what: str, errors: Sequence[str], gone: bool = False) -> None:
        """Log an object's errors once (and once when they are gone, or it is)."""
        before = self._reported.get(what, ())
        now = tuple(errors)
        if now == before:
            return
        if now:
            self._reported[what] = now
            log.error("object refused by admission; the endpoints it affects are held "
                      "fail-closed", extra={"fields": {"object": what,
                                                       "errors": "; ".join(now)}})
        else:
            self._reported.pop(what, None)
            log.info("refused object deleted" if gone else "object admitted again",
                     extra={"fields": {"object": what}})
        if self._m_invalid is not None:
            kind = what.partition("/")[0]
            self._m_invalid.set(sum(1 for k in self._reported if k.startswith(kind + "/")),
                                kind=kind)

    # ---- view → state -------------------------------------------------------------------------

    def _sync_all(self) -> None:
        """Everything the view or the state names (the first list, and each relist)."""
        svc = self.service
        with svc.lock:
            state = svc.state
            ns_keys = set(self.namespaces) | set(state.namespaces)
            policy_keys = set(self.policies) | set(self.policy_errors) | set(state.policies)
            pod_keys = set(self.pods) | {k for k, r in state.endpoints.items()
                                         if r.owner == self.OWNER}
            tier_keys = set(self.tiers) | set(state.cluster_policies)
        first = not self.synced.is_set()
        self._sync(ns_keys, policy_keys, pod_keys, tier_keys)
        if first:
            self.synced.set()
            if self._m_synced is not None:
                self._m_synced.set(1)
            log.info(f"first lists from {self.SOURCE} committed", extra={"fields": {
                "namespaces": len(self.namespaces), "policies": len(self.policies),
                "pods": len(self.pods), "server": self.client.server}})

    def _ns_reasons(self, ns: str) -> list[str]:
        out = list(self.ns_errors.get(ns, ()))
        if self.policy_errors:  # none refused, the usual case: no walk of the namespace's
            for key in sorted(self._policies_in.get(ns, ())):
                out += self.policy_errors.get(key, [])
        return out

    def _sync(self, ns_keys: set[str], policy_keys: set[str], pod_keys: set[str],
              tier_keys: set[str] | None = None) -> None:
        """Commit what the state must become for these keys (and what they imply)."""
        svc = self.service
        tier_keys = set(tier_keys or ()) - {QUARANTINE_POLICY}
        with svc.lock:
            state = svc.state
            pod_keys = set(pod_keys) | set(self.waiting)
            # Refused ClusterNetworkPolicies hold the endpoints their subject selects:
            # when they change, every endpoint is examined again; with some refused, a
            # namespace relabel re-examines that namespace's (a subject reads its labels).
            refused = self._refused_tiers()
            if refused != self._tier_hold:
                self._tier_hold = refused
                pod_keys |= set(self.pods) | set(state.endpoints)
            elif refused and ns_keys:
                for ns in ns_keys:
                    pod_keys |= self._pods_in.get(ns, set())
                pod_keys |= {k for k, r in state.endpoints.items()
                             if r.endpoint.namespace in ns_keys}
            touched_ns = set(ns_keys)
            touched_ns |= {k.partition("/")[0] for k in policy_keys}
            # A namespace whose hold changed (an invalid policy came or went, its object
            # became valid or not): every endpoint in it is examined again.
            rehold = {ns for ns in touched_ns
                      if tuple(self._ns_reasons(ns)) != self._ns_hold.get(ns, ())}
            for ns in rehold:
                reasons = tuple(self._ns_reasons(ns))
                if reasons:
                    self._ns_hold[ns] = reasons
                else:
                    self._ns_hold.pop(ns, None)
                pod_keys |= self._pods_in.get(ns, set())
            if rehold:
                pod_keys |= {k for k, r in state.endpoints.items()
                             if r.endpoint.namespace in rehold}
            desired_eps, held = self._desired_endpoints(state, pod_keys)
            touched_ns |= {k.partition("/")[0] for k in pod_keys}
            held_ns = {k.partition("/")[0] for k in held}
            held_ns |= {k.partition("/")[0] for k in self.held if k not in pod_keys}
            changes: list[Change] = []
            puts_ns: list[Change] = []
            dels_ns: list[Change] = []
            for ns in sorted(touched_ns):
                want = self._desired_namespace(state, ns, desired_eps)
                have = state.namespaces.get(ns)
                if want is not None and want != have:
                    puts_ns.append(PutNamespace(want))
                elif want is None and have is not None:
                    dels_ns.append(DeleteNamespace(ns))
            put_pol: list[Change] = []
            del_pol: list[Change] = []
            for key in sorted(policy_keys):
                if key.endswith(f"/{QUARANTINE_POLICY}"):
                    continue  # the synthetic deny-all of held endpoints: below
                want_p = self.policies.get(key)
                have_p = state.policies.get(key)
                if want_p is not None and (have_p is None or have_p != want_p):
                    put_pol.append(PutPolicy(want_p))
                elif want_p is None and have_p is not None:
                    del_pol.append(DeletePolicy(key))
            for ns in sorted(touched_ns):
                key = f"{ns}/{QUARANTINE_POLICY}"
                have_p = state.policies.get(key)
                if ns in held_ns and have_p is None:
                    put_pol.append(PutPolicy(_deny_all_record(ns)))
                elif ns not in held_ns and have_p is not None:
                    del_pol.append(DeletePolicy(key))
            put_ep: list[Change] = []
            del_ep: list[Change] = []
            handoff = False
            for key in sorted(pod_keys):
                want_e = desired_eps.get(key)
                have_e = state.endpoints.get(key)
                if want_e is not None and (have_e is None or have_e != want_e):
                    put_ep.append(PutEndpoint(want_e))
                    handoff = handoff or (have_e is not None and
                                          have_e.endpoint.ips != want_e.endpoint.ips)
                elif want_e is None and have_e is not None:
                    del_ep.append(DeleteEndpoint(key))
            put_tiers: list[Change] = []
            del_tiers: list[Change] = []
            for key in sorted(tier_keys):
                view = self.tiers.get(key)
                want_t = view.record if view is not None else None
                have_t = state.cluster_policies.get(key)
                if want_t is not None and (have_t is None or have_t != want_t):
                    put_tiers.append(PutClusterPolicy(want_t))
                elif want_t is None and have_t is not None:
                    del_tiers.append(DeleteClusterPolicy(key))
            for key in pod_keys:
                if key in held:
                    self.held[key] = held[key]
                else:
                    self.held.pop(key, None)
            # Held endpoints are denied before any other tier (no Admin Accept reopens
            # them) while there are tiers: see admission.quarantine_tier.
            want_q = bool(self.held) and any(v.record is not None
                                             for v in self.tiers.values())
            have_q = QUARANTINE_POLICY in state.cluster_policies
            if want_q and not have_q:
                put_tiers.append(PutClusterPolicy(ClusterPolicyRecord(
                    quarantine_tier(), quarantine_tier_manifest())))
            elif have_q and not want_q:
                del_tiers.append(DeleteClusterPolicy(QUARANTINE_POLICY))
            # Order: what others need first, what they stop needing last; endpoints
            # leaving before endpoints arriving, so an address can change hands.
            changes = [*puts_ns, *put_pol, *put_tiers, *del_ep, *put_ep, *del_pol,
                       *del_tiers, *dels_ns]
            revision = svc.reconciler.desired_revision
            if changes:
                revision = svc.commit(changes, sync=False, admitted=True)
                self.commits += 1
                self.changes += len(changes)
                if handoff or del_ep:
                    state.reindex()
            for key in policy_keys:
                rec = self.policies.get(key)
                rv = str(_meta(rec.manifest).get("resourceVersion") or "") if rec else None
                self._pending_rv.append((revision, key, rv))
            for key in tier_keys:  # cluster-scoped: the name alone (no slash) is the key
                view = self.tiers.get(key)
                tier = view.record if view is not None else None
                rv = str(_meta(tier.manifest).get("resourceVersion") or "") if tier else None
                self._pending_rv.append((revision, key, rv))
            for key in pod_keys:
                if key in self.held and key in state.endpoints:
                    state.quarantined[key] = list(self.held[key])
                else:
                    state.quarantined.pop(key, None)

    def _desired_namespace(self, state: AgentState, ns: str,
                           desired_eps: Mapping[str, EndpointRecord | None]) -> Namespace | None:
        known = self.namespaces.get(ns)
        if known is not None:
            return implicit_namespace(ns) if ns in self.ns_errors else known
        # Not (or no longer) in the API: kept while something in it remains.
        if self._pods_in.get(ns) or self._policies_in.get(ns):
            return implicit_namespace(ns)
        if any(r.endpoint.namespace == ns for k, r in state.endpoints.items()
               if desired_eps.get(k, r) is not None):
            return implicit_namespace(ns)
        if any(r is not None and r.endpoint.namespace == ns for r in desired_eps.values()):
            return implicit_namespace(ns)
        return None

    def _desired_endpoints(self, state: AgentState, keys: Iterable[str]) -> tuple[
            dict[str, EndpointRecord | None], dict[str, list[str]]]:
        """Each key's record (None: none), the held ones with their reasons, and
        ``self.waiting`` updated for addresses another endpoint holds."""
        want: dict[str, EndpointRecord | None] = {}
        held: dict[str, list[str]] = {}
        by_ns: dict[str, list[str]] = {}  # each namespace's reasons, once per call

        def ns_reasons(ns: str) -> list[str]:
            if ns not in by_ns:
                by_ns[ns] = self._ns_reasons(ns)
            return by_ns[ns]

        for key in keys:
            rec, reasons = self._desired_endpoint(state.endpoints.get(key), key, ns_reasons)
            want[key] = rec
            if reasons and rec is not None:
                held[key] = reasons
        # Addresses: the state's holders, minus what the touched keys give up.
        addresses = state.addresses()
        released: dict[str, str] = {}
        for key in want:
            cur = state.endpoints.get(key)
            for ip in cur.endpoint.ips if cur is not None else ():
                a = canonical_ip(ip)
                if addresses.get(a) == key:
                    released[a] = key
        claimed: dict[str, str] = {}

        def holder(a: str) -> str | None:
            if a in claimed:
                return claimed[a]
            h = addresses.get(a)
            return None if h is None or released.get(a) == h else h

        def rank(key: str) -> tuple[int, int, str]:
            rec = want[key]
            cur = state.endpoints.get(key)
            local = rec is not None and rec.owner in LOCAL_OWNERS
            keeps = cur is not None and rec is not None and bool(
                set(map(canonical_ip, cur.endpoint.ips)) & set(
                    map(canonical_ip, rec.endpoint.ips)))
            return (0 if local else 1, 0 if keeps else 1, key)

        for key in sorted(want, key=rank):
            rec = want[key]
            if rec is None:
                self.waiting.pop(key, None)
                continue
            addrs = [canonical_ip(ip) for ip in rec.endpoint.ips]
            taken = [(a, h) for a in addrs if (h := holder(a)) is not None and h != key]
            why = self._address_problem(rec) or (
                f"address {taken[0][0]} is held by {taken[0][1]}" if taken else "")
            if why:
                if self.waiting.get(key) != why:
                    log.warning("pod waits for its address", extra={"fields": {
                        "pod": key, "reason": why}})
                self.waiting[key] = why
                want[key] = None
                held.pop(key, None)
                continue
            self.waiting.pop(key, None)
            for a in addrs:
                claimed[a] = key
        return want, held

    def _address_problem(self, rec: EndpointRecord) -> str:
        """Why the datastore's pod may not have its addresses, whoever else holds them
        (empty: it may). The API's pods may: their node's kubelet set them."""
        return ""

    def _desired_endpoint(self, cur: EndpointRecord | None, key: str,
                          ns_reasons: Callable[[str], list[str]]) -> tuple[
                              EndpointRecord | None, list[str]]:
        pod = self.pods.get(key)
        ns = key.partition("/")[0]
        if cur is not None and cur.owner in LOCAL_OWNERS:
            # This node's CNI attachment (or `stockade run`): its address is local truth;
            # the API gives the labels and named ports.
            if pod is None:
                return cur, []  # as the CNI plugin gave it, until the API shows the pod
            ep = replace(cur.endpoint, labels=pod.labels, ports=pod.ports)
            reasons = [*pod.errors, *ns_reasons(ns), *self._tier_reasons(ep)]
            if reasons:
                ep = held_endpoint(ep)
            return replace(cur, endpoint=ep), reasons
        if pod is None or pod.endpoint is None:
            return None, []
        # A pod of another node is a peer only: no verdict chain of its own here.
        ep = replace(pod.endpoint, remote=pod.node != self.node)
        reasons = [*pod.errors, *ns_reasons(ns), *self._tier_reasons(ep)]
        if reasons:
            ep = held_endpoint(ep)
        rec = EndpointRecord(ep, owner=self.OWNER, node=pod.node,
                             created=cur.created if cur is not None else time.time())
        return rec, reasons

    def evictions(self, state: AgentState, rec: EndpointRecord) -> list[DeleteEndpoint]:
        """This node's attachment (CNI, `stockade run`) is the truth for its address (its
        own pool's, or a block etcd gave this host): a pod of the datastore still showing
        it (deleted, its deletion not seen yet; in etcd, the Pod a gone host published,
        its blocks since reclaimed and given to this one) gives it up here. Committed with
        the attachment's endpoint, on this host alone (nothing is written to the
        datastore); `examine` then has the pod wait for its address."""
        holders = {state.addresses().get(canonical_ip(ip)) for ip in rec.endpoint.ips}
        return [DeleteEndpoint(h) for h in sorted(k for k in holders if k and k != rec.key)
                if state.endpoints[h].owner == self.OWNER]

    def examine(self, pod_keys: Sequence[str]) -> None:
        """Examine these pods again now (an attachment of this node took an address one
        of them showed: it waits, and says so in `datastore.waiting`)."""
        if not pod_keys:
            return
        with self._lock:
            if self.synced.is_set():  # else the first lists examine every pod
                self._sync(set(), set(), set(pod_keys))

    def _retry_loop(self) -> None:
        while not self._stop.wait(RETRY_WAITING):
            with self._lock:
                if self.synced.is_set() and self.waiting:
                    self._sync(set(), set(), set(self.waiting))


def _deny_all_record(namespace: str) -> PolicyRecord:
    return PolicyRecord(deny_all(namespace), {})
