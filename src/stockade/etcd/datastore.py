"""etcd as the agent's datastore (``stockade agent --datastore etcd``).

Namespaces, NetworkPolicies and Pods live in etcd under one key prefix as the
documents a file or the Kubernetes API gives (watch.py says where). The agent
reads them exactly as it reads the Kubernetes API: :class:`EtcdFeed` is the
Kubernetes feed (kube/datastore.py: translation, admission, objects held
fail-closed, only the differences committed, nothing programmed before the first
lists, relists that never flush) with etcd reflectors. What etcd adds is writes:

* **Writes go to etcd, in transactions.** ``apply``, ``delete`` and ``label`` through
  any agent decode and validate as always, then :class:`EtcdService` writes the
  changed objects in one etcd transaction that compares each key's ``mod_revision``
  with the one this agent last saw (absent: 0). Another writer in between makes the
  comparison fail: nothing is written, the agent waits until its watch shows the
  other write, and the operation runs again on the new state (for up to
  ``CONFLICT_WINDOW`` seconds, after a short random pause). Two hosts never clobber
  each other's writes.
* **Acknowledged once etcd has them, and read-your-writes.** The transaction's
  revision is then awaited on the agent's own watch, so the state (``get``) shows the
  write when the call returns, and (unless ``--no-wait``) the kernel enforces it. The
  local state follows from the watch only, one way for every writer.
* **etcd lost: enforce, read, refuse writes.** Reads are answered from the agent's
  state; a write fails with ``unavailable`` naming etcd and nothing is written; the
  kernel keeps what it enforces, ``status`` says ``degraded`` until every watch is
  established again, then the watches resume from their revision (or relist after a
  compaction) and only the differences are applied.
* **Local truth stays local.** CNI attachments and ``stockade run`` containers are
  this host's (the local store keeps them, as in Kubernetes mode); publishing them to
  etcd for the other hosts is the multi-host step.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from stockade.agent.admission import QUARANTINE_POLICY, check_changes
from stockade.agent.protocol import INVALID, TIMEOUT, UNAVAILABLE, ApiError
from stockade.agent.records import (
    OWNER_API,
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
)
from stockade.agent.service import LOCAL_WRITES, Service
from stockade.etcd.client import MAX_TXN_OPS, EtcdClient, EtcdError, Unavailable, b64, unb64
from stockade.etcd.watch import EtcdReflector, etcd_key, resource_prefix
from stockade.kube.client import (
    CLUSTER_NETWORK_POLICIES,
    NAMESPACES,
    NETWORK_POLICIES,
    PODS,
    Resource,
)
from stockade.kube.datastore import LOCAL_OWNERS, KubeFeed
from stockade.kube.reflector import ReflectorConfig
from stockade.model.cluster import Namespace
from stockade.model.parse import expand_lists

log = logging.getLogger("stockade.etcd")

DEFAULT_PREFIX = "/stockade"
# On a Pod an agent published for its own CNI or `run` endpoint: which of the two.
OWNER_ANNOTATION = "stockade.io/owner"
PUBLISH_RETRY = 2.0  # seconds between attempts to publish while etcd is away
CONFLICT_WINDOW = 10.0  # seconds an operation is run again after conflicts
SEEN_TIMEOUT = 30.0  # a write waits this long for the agent's watch to deliver it


class Conflict(Exception):
    """A transaction's comparison failed: another writer changed these keys."""

    def __init__(self, current: Mapping[str, int], revision: int) -> None:
        super().__init__(", ".join(sorted(current)))
        self.current = dict(current)  # etcd key -> its mod_revision now (0: absent)
        self.revision = revision


def normalize_prefix(prefix: str) -> str:
    p = "/" + prefix.strip("/")
    return p if p != "/" else ""


# ---- documents (what the agent writes) ---------------------------------------------------


def namespace_doc(ns: Namespace) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns.name, "labels": ns.labels.as_dict()}}


def policy_doc(rec: PolicyRecord) -> dict[str, Any]:
    doc = dict(rec.manifest)
    meta = dict(doc.get("metadata") or {})
    meta.pop("resourceVersion", None)
    meta["name"], meta["namespace"] = rec.policy.name, rec.policy.namespace
    doc["metadata"] = meta
    doc.setdefault("apiVersion", "networking.k8s.io/v1")
    doc.setdefault("kind", "NetworkPolicy")
    return doc


def cluster_policy_doc(rec: ClusterPolicyRecord) -> dict[str, Any]:
    doc = dict(rec.manifest)
    meta = dict(doc.get("metadata") or {})
    meta.pop("resourceVersion", None)
    meta["name"] = rec.policy.name
    doc["metadata"] = meta
    doc.setdefault("apiVersion", CLUSTER_NETWORK_POLICIES.api_version)
    doc.setdefault("kind", CLUSTER_NETWORK_POLICIES.kind)
    return doc


def pod_doc(rec: EndpointRecord, node: str) -> dict[str, Any]:
    """An endpoint as a Pod: labels, named ports, addresses and the node it runs on."""
    ep = rec.endpoint
    ports = []
    for p in ep.ports:
        port: dict[str, Any] = {"containerPort": p.port, "protocol": p.protocol}
        if p.name:
            port["name"] = p.name
        ports.append(port)
    container: dict[str, Any] = {"name": "main"}
    if ports:
        container["ports"] = ports
    doc: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": ep.name, "namespace": ep.namespace, "labels": ep.labels.as_dict()},
        "spec": {"nodeName": rec.node or node, "containers": [container]}}
    if ep.ips:
        doc["status"] = {"phase": "Running", "podIP": ep.ips[0],
                         "podIPs": [{"ip": ip} for ip in ep.ips]}
    return doc


def _json(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def _same_doc(raw: bytes, doc: Mapping[str, Any]) -> bool:
    try:
        return bool(json.loads(raw) == json.loads(_json(doc)))
    except ValueError:
        return False


# ---- the feed ----------------------------------------------------------------------------


class EtcdFeed(KubeFeed):
    """The Kubernetes feed, fed by etcd watches; also the agent's writer to etcd."""

    KIND = "etcd"
    SOURCE = "etcd"
    METRICS = "stockade_etcd"
    OWNER = OWNER_API  # applied through an agent's API (any host's), removed through it

    def __init__(self, client: EtcdClient, node: str, *, prefix: str = DEFAULT_PREFIX,
                 config: ReflectorConfig | None = None) -> None:
        self.prefix = normalize_prefix(prefix)
        # What the state knows of etcd, kept under the service's lock: each key's
        # mod_revision (what a write compares with) and, by resource, the revision
        # up to which the watch has delivered (what a write waits for).
        self.revs: dict[str, int] = {}
        self.seen: dict[str, int] = {}
        self.conflicts = 0  # writes run again because another writer was first
        self._m_degraded: Any = None
        factory: Any = functools.partial(EtcdReflector, prefix=self.prefix)
        super().__init__(client, node, config=config,  # type: ignore[arg-type]
                         reflector_factory=factory)
        self.etcd: EtcdClient = client
        self.routes: Any = None  # etcd/hosts.py HostRoutes, with --host-address
        self.block_returns: Any = None  # etcd/ipam.py BlockReturns: empty blocks given back
        self.node_claim: Any = None  # etcd/nodes.py NodeClaim: this node's name, held
        # Pods in etcd that an agent of this node published for its CNI and `run`
        # endpoints (what its publisher may have to delete).
        self.published: set[str] = set()

    def start(self) -> None:
        super().start()
        if self.node_claim is not None:
            self.node_claim.start()
        if self.routes is not None:
            self.routes.on_blocks = self._blocks_changed
            self.routes.start()
        if self.block_returns is not None:
            self.block_returns.start()

    def stop(self) -> None:
        if self.block_returns is not None:
            self.block_returns.stop()
        if self.routes is not None:
            self.routes.stop()
        if self.node_claim is not None:
            self.node_claim.release()  # while the client is open; claimed never again
        super().stop()

    # ---- wiring -----------------------------------------------------------------------

    def bind(self, service: Any, registry: Any = None) -> None:
        super().bind(service, registry)
        if self.block_returns is not None:
            self.block_returns.service = service
        if registry is not None:
            self._m_degraded = registry.gauge(
                "stockade_etcd_degraded",
                "1 while a watch of etcd is not established (the agent enforces its last "
                "state and refuses writes), else 0.")
            self._m_degraded.set(0)

    @property
    def degraded(self) -> bool:
        return any(getattr(r, "failing", False) for r in self.reflectors)

    def _observer(self, plural: str) -> Callable[[str], None]:
        inner = super()._observer(plural)

        def observe(what: str) -> None:
            inner(what)
            if what in ("error", "connected") and self._m_degraded is not None:
                self._m_degraded.set(1 if self.degraded else 0)
        return observe

    def status(self) -> Mapping[str, Any]:
        out = dict(super().status())
        ds = dict(out["datastore"])
        with self._lock:
            ds.update({"server": self.etcd.server, "endpoints": list(self.etcd.endpoints),
                       "prefix": self.prefix or "/", "degraded": self.degraded,
                       "conflicts": self.conflicts,
                       **({"hosts": self.routes.status()} if self.routes is not None
                          else {}),
                       **({"blocks": self.block_returns.status()}
                          if self.block_returns is not None else {}),
                       **({"node": self.node_claim.status()}
                          if self.node_claim is not None else {}),
                       "revision": max(self.seen.values(), default=0)})
        out["datastore"] = ds
        return out

    # ---- the sinks: the state's view of etcd, under the service's lock -------------------

    def replace(self, res: Resource, items: list[dict[str, Any]],
                resource_version: str = "") -> None:
        svc = self.service
        with self._lock, svc.lock:
            head = resource_prefix(self.prefix, res)
            for k in [k for k in self.revs if k.startswith(head)]:
                del self.revs[k]
            if res is PODS:
                self.published.clear()
            for obj in items:
                key = etcd_key(self.prefix, res, _ident(res, obj))
                self.revs[key] = _rv(obj)
                self._note_published(res, obj, False)
            super().replace(res, [o for o in items if not self._ours(res, o)],
                            resource_version)
            self._saw(res, int(resource_version or 0))

    @contextlib.contextmanager
    def batch(self) -> Iterator[object]:
        """The events of one watch response (whole revisions) under the service's lock
        at once: a write waiting for its revision (`commit`) wakes only when every event
        of its transaction is in the state, not after the first of them."""
        with self._lock, self.service.lock:
            yield None

    def event(self, res: Resource, type: str, obj: dict[str, Any]) -> None:
        svc = self.service
        with self._lock, svc.lock:
            key = etcd_key(self.prefix, res, _ident(res, obj))
            if type == "DELETED":
                self.revs.pop(key, None)
            else:
                self.revs[key] = _rv(obj)
            self._note_published(res, obj, type == "DELETED")
            # This host's own Pods are its local store's to say: the published copy of
            # an endpoint deleted here may come back on the watch after the delete (the
            # publisher put it just before), and would stand as an endpoint of the API,
            # holding the freed address, until the publisher's delete came round too.
            ours = self._ours(res, obj)
            super().event(res, "DELETED" if ours else type, obj)
            if ours and type != "DELETED":
                name = _ident(res, obj)
                rec = svc.state.endpoints.get(name)
                if rec is None or rec.owner not in LOCAL_OWNERS:
                    svc.republish(name)  # gone here: the publisher deletes it in etcd
            self._saw(res, _rv(obj))

    # ---- addresses of the pool: a Pod of another host is believed in its own blocks ------

    def _lists_in(self) -> bool:
        # The first sync knows which host holds each block, or it would believe a Pod
        # of another host that it would stop believing moments later (or the reverse).
        return super()._lists_in() and (self.routes is None or self.routes.blocks_listed)

    def _address_problem(self, rec: EndpointRecord) -> str:
        """An address of the pool is the host's whose block it is in (etcd/ipam.py hands
        it out nowhere else): a Pod of another host (or of none) showing one of another
        host's block, or of no host's, is not believed here (a gone host's Pod after its
        blocks were reclaimed, two Pods given one address, a Pod written by hand), or any
        traffic from that address would be judged by its labels. This host's own Pods
        are checked against its attachments instead (`evictions`)."""
        if self.routes is None or rec.owner in LOCAL_OWNERS or rec.node == self.node:
            return ""
        for ip in rec.endpoint.ips:
            found = self.routes.block_of(ip)
            if found is None:
                continue
            block, host = found
            if block and rec.node and host == rec.node:
                continue
            node = f"host {rec.node!r}" if rec.node else "no host (spec.nodeName is empty)"
            if not block:
                return (f"address {ip} is in the pool {self.routes.pool} but in no block "
                        f"a host holds; the Pod is of {node}")
            return f"address {ip} is in block {block} of host {host!r}; the Pod is of {node}"
        return ""

    def _blocks_changed(self, changed: set[str]) -> None:
        """Blocks came, went or moved (routes' watch): the Pods showing an address in them,
        and those waiting, are examined again now; the first sync, if it waited for the
        blocks' list, is made."""
        svc = self.service
        if svc is None:
            return
        with self._lock:
            if not self.synced.is_set():
                if self._lists_in():
                    self._sync_all()
                return
            with svc.lock:
                keys = {k for k in _holders_in(svc.state.addresses(), changed)
                        if k in self.pods}
            if keys or self.waiting:
                self._sync(set(), set(), keys)

    def _ours(self, res: Resource, obj: Mapping[str, Any]) -> bool:
        """A Pod an agent of this host published for its own CNI or `run` endpoint."""
        if res is not PODS:
            return False
        meta = obj.get("metadata") or {}
        notes = meta.get("annotations") if isinstance(meta, Mapping) else None
        spec = obj.get("spec") if isinstance(obj.get("spec"), Mapping) else {}
        return (isinstance(notes, Mapping) and notes.get(OWNER_ANNOTATION) in LOCAL_OWNERS
                and isinstance(spec, Mapping) and spec.get("nodeName") == self.node)

    def _note_published(self, res: Resource, obj: Mapping[str, Any], deleted: bool) -> None:
        if res is not PODS:
            return
        if not deleted and self._ours(res, obj):
            self.published.add(_ident(res, obj))
        else:
            self.published.discard(_ident(res, obj))

    def _saw(self, res: Resource, revision: int) -> None:
        self.seen[res.plural] = max(self.seen.get(res.plural, 0), revision)
        self.service.caught_up.notify_all()

    # ---- writes -----------------------------------------------------------------------

    def write(self, changes: Sequence[Change]) -> tuple[int, dict[str, int]]:
        """Write ``changes`` to etcd in transactions comparing each key's mod_revision
        with what the state knows (the caller holds the service's lock). Returns the
        last transaction's revision and, per resource touched, the revision of the last
        transaction that wrote it (the one its watch reaches: a later transaction of
        other resources only is no event of it); Conflict when another writer got there
        first (nothing of that transaction is written)."""
        ops: dict[str, tuple[Resource, str | None]] = {}
        for c in changes:
            res, key, doc = self._op(c)
            if key.endswith(f"/{QUARANTINE_POLICY}"):
                continue  # the synthetic deny-all of held endpoints is never stored
            ops.pop(etcd_key(self.prefix, res, key), None)  # the last change of a key wins
            ops[etcd_key(self.prefix, res, key)] = (res, None if doc is None else _json(doc))
        if not ops:
            return 0, {}
        revision = 0
        touched: dict[str, int] = {}
        items = list(ops.items())
        # etcd refuses a transaction of more than --max-txn-ops (128) operations; a
        # larger change is written in several, in order (see the README).
        for at in range(0, len(items), MAX_TXN_OPS):
            chunk = items[at:at + MAX_TXN_OPS]
            compare = [{"key": b64(k), "target": "MOD", "result": "EQUAL",
                        "mod_revision": str(self.revs.get(k, 0))} for k, _ in chunk]
            success = [{"request_put": {"key": b64(k), "value": b64(v)}} if v is not None
                       else {"request_delete_range": {"key": b64(k)}} for k, (_, v) in chunk]
            failure = [{"request_range": {"key": b64(k), "keys_only": True}} for k, _ in chunk]
            try:
                result = self.etcd.txn(compare, success, failure)
            except Unavailable as e:
                raise ApiError(UNAVAILABLE, f"etcd is unreachable ({e}); nothing more was "
                                            "written. This agent keeps enforcing the last "
                                            "state it has and catches up when etcd returns"
                                            + (f" (revision {revision} was written before)"
                                               if revision else "")) from None
            except EtcdError as e:
                raise ApiError(UNAVAILABLE, f"etcd refused the write: {e}") from None
            if not result.succeeded:
                current = {k: 0 for k, _ in chunk}
                for resp in result.responses:
                    for kv in (resp.get("response_range") or {}).get("kvs") or ():
                        key_ = unb64(kv.get("key")).decode("utf-8", "replace")
                        current[key_] = int(kv.get("mod_revision") or 0)
                stale = {k: v for k, v in current.items() if v != self.revs.get(k, 0)}
                raise Conflict(stale or current, result.revision)
            revision = result.revision
            touched.update((res.plural, revision) for _, (res, _) in chunk)
        return revision, touched

    def _op(self, c: Change) -> tuple[Resource, str, dict[str, Any] | None]:
        if isinstance(c, PutNamespace):
            return NAMESPACES, c.namespace.name, namespace_doc(c.namespace)
        if isinstance(c, DeleteNamespace):
            return NAMESPACES, c.name, None
        if isinstance(c, PutPolicy):
            return NETWORK_POLICIES, c.record.key, policy_doc(c.record)
        if isinstance(c, DeletePolicy):
            return NETWORK_POLICIES, c.key, None
        if isinstance(c, PutClusterPolicy):
            return CLUSTER_NETWORK_POLICIES, c.record.key, cluster_policy_doc(c.record)
        if isinstance(c, DeleteClusterPolicy):
            return CLUSTER_NETWORK_POLICIES, c.name, None
        if isinstance(c, PutEndpoint):
            if c.record.key in self.held:
                raise ApiError(INVALID, f"endpoint {c.record.key} is held fail-closed "
                                        f"({'; '.join(self.held[c.record.key])}); fix its "
                                        "object in etcd")
            return PODS, c.record.key, pod_doc(c.record, self.node)
        if isinstance(c, DeleteEndpoint):
            return PODS, c.key, None
        raise TypeError(f"not a change: {c!r}")

    def fresh(self, current: Mapping[str, int], revision: int) -> bool:
        """Whether the state has caught up with these keys as etcd showed them (the
        caller holds the service's lock)."""
        for key, mod in current.items():
            have = self.revs.get(key, 0)
            if mod and have < mod:
                return False
            if not mod and have and have <= revision:
                return False
        return True


def _holders_in(holders: Mapping[str, str], blocks: set[str]) -> set[str]:
    """The keys holding an address of these blocks (`holders`: address -> key), by
    walking the smaller of the two."""
    nets = []
    for cidr in blocks:
        try:
            nets.append(ipaddress.ip_network(cidr))
        except ValueError:
            continue
    if sum(n.num_addresses for n in nets) <= len(holders):
        return {k for n in nets for a in n if (k := holders.get(str(a))) is not None}
    out = set()
    for address, key in holders.items():
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            continue
        if any(ip in n for n in nets):
            out.add(key)
    return out


def _ident(res: Resource, obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    if res.namespaced:
        return f"{meta.get('namespace')}/{meta.get('name')}"
    return str(meta.get("name"))


def _rv(obj: Mapping[str, Any]) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0


# ---- the service: the operations write to etcd --------------------------------------------


class EtcdService(Service):
    """The agent's operations with etcd as the truth: ``apply``, ``delete``, ``label``,
    ``snapshot.restore`` and ``endpoint.add/remove`` of API endpoints write to etcd
    (:meth:`EtcdFeed.write`); this host's CNI and ``run`` endpoints and the address
    pool stay in the local store; reads are the state's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A commit goes to etcd or to the local store by what its changes are: one of
        # several callers' changes together could send an etcd object's to the store.
        self.group.together = False
        self.feed: EtcdFeed | None = None
        self.node = ""
        # Notified (under the service's lock) whenever the feed has delivered more.
        self.caught_up = threading.Condition(self.lock)

    def attach(self, feed: EtcdFeed) -> None:
        self.feed = feed
        self.node = feed.node
        self._pending: set[str] = set()
        self._publish_wake = threading.Event()
        threading.Thread(target=self._publisher, name="etcd-publish", daemon=True).start()

    # ---- this host's CNI and `run` endpoints, published for the other hosts -------------

    def _publish(self, keys: set[str]) -> None:
        if keys:
            with self.lock:
                self._pending |= keys
            self._publish_wake.set()

    def republish(self, key: str) -> None:
        """Have the publisher bring etcd's Pod ``key`` in line with this host's endpoint
        (put it, or delete it when the endpoint is gone)."""
        if self.feed is not None:
            self._publish({key})

    def _publisher(self) -> None:
        """Puts a Pod in etcd for each of this host's CNI and `run` endpoints (so other
        hosts see them as peers) and deletes those that are gone; asynchronous, so a
        container never waits for etcd, and retried while etcd is away."""
        feed = self.feed
        assert feed is not None
        while not feed.synced.wait(0.2):
            if feed._stop.is_set():
                return
        with self.lock:  # everything once: what an earlier run left or missed
            self._pending |= {k for k, r in self.state.endpoints.items()
                              if r.owner in LOCAL_OWNERS} | set(feed.published)
        while not feed._stop.is_set():
            with self.lock:
                keys, self._pending = self._pending, set()
            failed: set[str] = set()
            for key in sorted(keys):
                try:
                    self._publish_one(feed, key)
                except EtcdError as e:
                    failed.add(key)
                    log.info("publishing an endpoint to etcd failed; retrying",
                             extra={"fields": {"endpoint": key, "error": str(e)}})
            if failed:
                with self.lock:
                    self._pending |= failed
            self._publish_wake.wait(PUBLISH_RETRY if failed else None)
            self._publish_wake.clear()

    def _publish_one(self, feed: EtcdFeed, key: str) -> None:
        ekey = etcd_key(feed.prefix, PODS, key)
        if feed.node_claim is not None:
            feed.node_claim.ensure()  # another agent's node: its Pods are not ours
        with self.lock:
            rec = self.state.endpoints.get(key)
            local = rec is not None and rec.owner in LOCAL_OWNERS
        if local:
            assert rec is not None
            doc = pod_doc(rec, self.node)
            doc["metadata"]["annotations"] = {OWNER_ANNOTATION: rec.owner}
            kv = feed.etcd.get(ekey)
            if kv is None or not _same_doc(kv.value, doc):
                feed.etcd.put(ekey, _json(doc))
            return
        kv = feed.etcd.get(ekey)
        if kv is None:
            return
        try:
            have = json.loads(kv.value)
        except ValueError:
            return
        notes = (have.get("metadata") or {}).get("annotations") or {}
        if notes.get(OWNER_ANNOTATION) in LOCAL_OWNERS and (
                have.get("spec") or {}).get("nodeName") == self.node:
            feed.etcd.txn([{"key": b64(ekey), "target": "MOD", "result": "EQUAL",
                            "mod_revision": str(kv.mod_revision)}],
                          [{"request_delete_range": {"key": b64(ekey)}}])

    def handle(self, op: str, args: dict[str, Any]) -> Any:
        if op not in LOCAL_WRITES or self.feed is None:
            return super().handle(op, args)
        feed = self.feed
        deadline = time.monotonic() + CONFLICT_WINDOW
        attempt = 0
        while True:
            try:
                return super().handle(op, args)
            except Conflict as c:
                attempt += 1
                feed.conflicts += 1
                log.info("write conflict: another writer changed the keys first; running "
                         "the operation again on the newer state", extra={"fields": {
                             "op": op, "keys": str(c), "attempt": attempt}})
                if time.monotonic() > deadline:
                    raise ApiError(UNAVAILABLE, f"{op}: etcd keys kept changing under this "
                                                f"write ({c}); nothing of the last attempt "
                                                "was written, try again") from None
                with self.lock:  # until the watch shows the other writer's change
                    self.caught_up.wait_for(functools.partial(feed.fresh, c.current,
                                                              c.revision), SEEN_TIMEOUT)
                # Writers that lost together do not all come back at once.
                time.sleep(random.random() * min(0.05, 0.002 * 2 ** attempt))  # noqa: S311

    def _decode(self, docs: list[Any], source: str) -> tuple[
            list[PolicyRecord], dict[str, Namespace], list[EndpointRecord],
            list[ClusterPolicyRecord]]:
        """As always, and each Pod keeps its ``spec.nodeName`` (default: this host)."""
        policies, namespaces, endpoints, tiers = super()._decode(docs, source)
        if self.feed is None:
            return policies, namespaces, endpoints, tiers
        nodes: dict[str, str] = {}
        for _, doc in expand_lists(docs):
            if isinstance(doc, dict) and doc.get("kind") == "Pod":
                meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
                spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
                assert isinstance(meta, dict) and isinstance(spec, dict)
                key = f"{meta.get('namespace') or 'default'}/{meta.get('name')}"
                node = spec.get("nodeName")
                nodes[key] = node if isinstance(node, str) and node else self.node
        return policies, namespaces, [replace(r, node=nodes.get(r.key) or self.node)
                                      for r in endpoints], tiers

    def _local_keys(self, changes: Sequence[Change]) -> set[str]:
        """The keys of this host's CNI and `run` endpoints these changes touch."""
        out: set[str] = set()
        for c in changes:
            if isinstance(c, PutEndpoint) and c.record.owner in LOCAL_OWNERS:
                out.add(c.record.key)
            elif isinstance(c, DeleteEndpoint):
                cur = self.state.endpoints.get(c.key)
                if cur is not None and cur.owner in LOCAL_OWNERS:
                    out.add(c.key)
        return out

    def _to_etcd(self, changes: Sequence[Change]) -> bool:
        """Changes of etcd's objects (not of this host's CNI or `run` endpoints)."""
        if not changes:
            return False
        for c in changes:
            if isinstance(c, PutEndpoint) and c.record.owner in LOCAL_OWNERS:
                return False
            if isinstance(c, DeleteEndpoint):
                cur = self.state.endpoints.get(c.key)
                if cur is not None and cur.owner in LOCAL_OWNERS:
                    return False
        return True

    def commit(self, changes: Sequence[Change], *, sync: bool = True,
               meta: Mapping[str, Any] | None = None, admitted: bool = False,
               validated: bool = False, durable: bool = True) -> int:
        feed = self.feed
        if admitted or feed is None or not self._to_etcd(changes):
            publish = self._local_keys(changes) if feed is not None and not admitted else set()
            revision = super().commit(changes, sync=sync, meta=meta, admitted=admitted,
                                      validated=validated, durable=durable)
            self._publish(publish)
            return revision
        with self.lock:
            if not feed.synced.is_set():
                raise ApiError(UNAVAILABLE, "not in sync with etcd yet (the first lists "
                                            "are not in); try again")
            problems = check_changes(self.state, changes, strict_cidr=self.strict_cidr,
                                     validated=validated)
            if problems:
                raise ApiError(INVALID, f"{len(problems)} error(s); nothing was applied",
                               problems)
            if meta:
                super().commit([], sync=False, meta=meta)
            revision, touched = feed.write(changes)
            # Acknowledged by etcd; now until this agent's watch has delivered it (the
            # wait releases the lock, so the feed can commit it meanwhile).
            # A large write behind a busy watch may take longer than SEEN_TIMEOUT to come
            # back: the wait goes on while the watch makes progress, and gives up only
            # after SEEN_TIMEOUT without any.
            progress = sum(feed.seen.get(p, 0) for p in touched)
            while True:
                seen = self.caught_up.wait_for(
                    lambda: all(feed.seen.get(p, 0) >= r for p, r in touched.items()),
                    SEEN_TIMEOUT)
                now = sum(feed.seen.get(p, 0) for p in touched)
                if seen or now == progress:
                    break
                progress = now
            if not seen:
                raise ApiError(TIMEOUT, f"written to etcd at revision {revision}, but this "
                                        f"agent's watch has not delivered it, with no "
                                        f"progress for {SEEN_TIMEOUT:.0f}s; it is enforced "
                                        "once it does (see `stockade status`)")
            local = self.reconciler.desired_revision
        if sync:
            self._wait(local)
        return local


def open_feed(endpoints: Sequence[str], node: str, *, prefix: str = DEFAULT_PREFIX,
              config: ReflectorConfig | None = None, cert: str | None = None,
              key: str | None = None, ca: str | None = None,
              timeout: float = 5.0) -> EtcdFeed:
    """The agent's feed for ``--datastore etcd``: no I/O until it is started."""
    from stockade.etcd.client import TlsConfig

    tls = TlsConfig(cert, key, ca) if (cert or key or ca) else None
    return EtcdFeed(EtcdClient(endpoints, timeout=timeout, tls=tls), node, prefix=prefix,
                    config=config)



def open_hosts(feed: EtcdFeed, subnet: str, saved: Mapping[str, Any] | None, *,
               netns: str | None, bridge_prefix: str, host_address: str | None,
               config: ReflectorConfig | None = None,
               empty_block_grace: float = 600.0) -> Any:
    """The address pool across hosts (etcd/ipam.py) and the routes between hosts
    (etcd/hosts.py) of an agent: its IPAM, claiming blocks in etcd; the routes start
    with the feed."""
    from stockade.errors import NetError
    from stockade.etcd.hosts import HostRoutes
    from stockade.etcd.ipam import BlockReturns, Blocks, open_ipam
    from stockade.net.naming import Naming

    blocks = Blocks(feed.etcd, feed.prefix, feed.node, feed.node_claim)
    ipam = open_ipam(blocks, subnet, saved)
    feed.block_returns = BlockReturns(blocks, empty_block_grace)
    try:
        bridge = Naming(bridge_prefix).bridge
    except NetError:  # `stockade run` says so; the routes need no bridge
        bridge = ""
    feed.routes = HostRoutes(feed.etcd, feed.prefix, feed.node, address=host_address,
                             netns=netns, bridge=bridge, pool=str(ipam.subnet),
                             config=config, node_claim=feed.node_claim)
    return ipam
