"""What the agent keeps, as frozen data, and the changes that move it (pure).

Records serialise to JSON-able dicts (`to_dict`/`from_dict`): the store keeps
them that way, snapshots are made of them, and the local API speaks them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from stockade.errors import DecodeError, InputError, ValidationError
from stockade.model.admit import claims, validate_attachment
from stockade.model.cluster import Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.cnp import ADMIN, CNP_API, CNP_KIND, ClusterNetworkPolicy, CnpPeer
from stockade.model.cnp_decode import decode_cluster_network_policy
from stockade.model.decode import decode_network_policy
from stockade.model.labels import Labels
from stockade.model.policy import NetworkPolicy, Source

# Who manages an endpoint's lifecycle.
OWNER_API = "api"  # registered through the API; removed through it
OWNER_RUN = "run"  # started by `stockade run`; removed when its process exits
OWNER_CNI = "cni"  # added by the CNI plugin; removed by CNI DEL
OWNER_KUBE = "kube"  # a Pod of the Kubernetes API (--datastore kubernetes); kept in memory


@dataclass(frozen=True)
class EndpointRecord:
    endpoint: Endpoint
    netns: str = ""  # path of its network namespace
    interface: str = ""  # its interface inside that namespace
    owner: str = OWNER_API
    container_id: str = ""
    pid: int = 0  # the process `stockade run` started
    command: tuple[str, ...] = ()
    created: float = 0.0
    node: str = ""  # the Kubernetes node the pod runs on (--datastore kubernetes)

    @property
    def key(self) -> str:
        return self.endpoint.key

    @property
    def host_interface(self) -> str:
        """The host side of its veth: the bridge port its addresses are bound to."""
        return self.endpoint.port

    def to_dict(self) -> dict[str, Any]:
        ep = self.endpoint
        extra: dict[str, Any] = {}
        if self.node:
            extra["node"] = self.node
        if ep.remote:
            extra["remote"] = True
        return {
            "namespace": ep.namespace, "name": ep.name, "labels": ep.labels.as_dict(),
            "ips": list(ep.ips),
            "ports": [{"name": p.name, "port": p.port, "protocol": p.protocol}
                      for p in ep.ports],
            "netns": self.netns, "interface": self.interface,
            "hostInterface": self.host_interface, **({"mac": ep.mac} if ep.mac else {}),
            "owner": self.owner,
            "containerID": self.container_id, "pid": self.pid,
            "command": list(self.command), "created": self.created, **extra,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EndpointRecord:
        """Strictly typed: a wrong type is a DecodeError naming the field, never a guess."""
        if not isinstance(d, Mapping):
            raise DecodeError("an endpoint must be an object")
        remote = d.get("remote", False)
        if not isinstance(remote, bool):
            raise DecodeError("must be a boolean", path="remote")
        port, mac = _str(d, "hostInterface"), _str(d, "mac")
        if port or mac:
            for e in validate_attachment(port, mac):
                raise DecodeError(e.render())
        ep = Endpoint(_str(d, "namespace", required=True), _str(d, "name", required=True),
                      decode_labels(d.get("labels"), "labels"),
                      _strs(d.get("ips"), "ips"), decode_ports(d.get("ports"), "ports"),
                      remote=remote, port=port, mac=mac)
        pid = d.get("pid", 0)
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 <= pid < 2**31:
            raise DecodeError("must be a process id", path="pid")
        created = d.get("created", 0.0)
        if not isinstance(created, int | float) or isinstance(created, bool):
            raise DecodeError("must be a number", path="created")
        return cls(ep, _str(d, "netns"), _str(d, "interface"),
                   _str(d, "owner") or OWNER_API, _str(d, "containerID"), pid,
                   _strs(d.get("command"), "command"), float(created), _str(d, "node"))


P = TypeVar("P", NetworkPolicy, ClusterNetworkPolicy)


@dataclass(frozen=True)
class _Manifested(Generic[P]):
    """A policy with the manifest it was submitted as (what `get -o yaml` shows)."""

    policy: P
    manifest: Mapping[str, Any] = field(compare=False, hash=False, default_factory=dict)

    @property
    def key(self) -> str:
        return self.policy.key

    def to_dict(self) -> dict[str, Any]:
        return dict(self.manifest)


@dataclass(frozen=True)
class PolicyRecord(_Manifested[NetworkPolicy]):
    """A NetworkPolicy (keyed namespace/name) with its manifest."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PolicyRecord:
        return cls(decode_network_policy(dict(d), Source("store")), dict(d))


@dataclass(frozen=True)
class ClusterPolicyRecord(_Manifested[ClusterNetworkPolicy]):
    """A ClusterNetworkPolicy (cluster-scoped: keyed by its name) with its manifest."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClusterPolicyRecord:
        """Decoded and validated (a CRD's decoder does both): what fails never loads."""
        return cls(decode_cluster_network_policy(dict(d), Source("store")), dict(d))


@dataclass(frozen=True)
class RefusedClusterPolicy:
    """A stored or watched ClusterNetworkPolicy that does not validate.

    It is not enforced as written, nor dropped (its subject's traffic would be
    unrestricted): the endpoints its subject selects are held fail-closed, every
    endpoint when the subject cannot be read either (a cluster-scoped policy may
    select any pod).
    """

    name: str
    errors: tuple[str, ...]
    subject: CnpPeer | None
    manifest: Mapping[str, Any] = field(compare=False, hash=False, default_factory=dict)


def read_cluster_policy(doc: Mapping[str, Any], name: str,
                        source: str) -> ClusterPolicyRecord | RefusedClusterPolicy:
    """A ClusterNetworkPolicy as its record, or as refused with every error."""
    try:
        return ClusterPolicyRecord(decode_cluster_network_policy(dict(doc), Source(source)),
                                   dict(doc))
    except ValidationError as e:
        errors = tuple(f"clusternetworkpolicy {name}: {f.render()}" for f in e.errors)
    except DecodeError as e:
        errors = (f"clusternetworkpolicy {name}: {e.message}",)
    return RefusedClusterPolicy(name, errors, _subject_alone(doc), dict(doc))


def _subject_alone(doc: Mapping[str, Any]) -> CnpPeer | None:
    """The subject of a policy that does not validate, read by the same decoder as part
    of an otherwise empty policy (None: it does not decode either)."""
    spec = doc.get("spec")
    subject = spec.get("subject") if isinstance(spec, Mapping) else None
    if subject is None:
        return None
    try:
        return decode_cluster_network_policy(
            {"apiVersion": CNP_API, "kind": CNP_KIND, "metadata": {"name": "subject"},
             "spec": {"tier": ADMIN, "priority": 0, "subject": subject}}).subject
    except InputError:
        return None


def _str(d: Mapping[str, Any], key: str, *, required: bool = False) -> str:
    value = d.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DecodeError("must be a string", path=key)
    return value


def _strs(value: Any, path: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or not all(isinstance(x, str) for x in value):
        raise DecodeError("must be a list of strings", path=path)
    return tuple(value)


# Decoded label maps and port lists by their content: replicas share them, so a load of
# 10,000 endpoints makes each once (and the endpoints share one object, as decoding a
# file does). Bounded: cleared when full.
_INTERNED_MAX = 1 << 14
_labels_seen: dict[tuple[tuple[str, str], ...], Labels] = {}
_ports_seen: dict[tuple[str, tuple[tuple[int, str, str], ...]], tuple[ContainerPort, ...]] = {}


def decode_labels(value: Any, path: str) -> Labels:
    if value is None:
        return Labels({})
    if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise DecodeError("must be an object of strings", path=path)
    key = tuple(value.items())  # strings only (checked above): equal keys, equal maps
    found = _labels_seen.get(key)
    if found is None:
        if len(_labels_seen) >= _INTERNED_MAX:
            _labels_seen.clear()
        found = _labels_seen[key] = Labels(dict(value))
    return found


def decode_ports(value: Any, path: str) -> tuple[ContainerPort, ...]:
    """`[{name?, port, protocol?}]`, as records, the API and the CNI plugin give them.

    Types are checked here; ranges and names by `model.admit`, like every Pod's.
    """
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise DecodeError("must be a list", path=path)
    fields: list[tuple[int, str, str]] = []
    for i, p in enumerate(value):
        if not isinstance(p, Mapping):
            raise DecodeError("must be an object", path=f"{path}[{i}]")
        number = p.get("port")
        if not isinstance(number, int) or isinstance(number, bool):
            raise DecodeError("must be an integer", path=f"{path}[{i}].port")
        protocol, name = p.get("protocol", "TCP"), p.get("name", "")
        if not isinstance(protocol, str):
            raise DecodeError("must be a string", path=f"{path}[{i}].protocol")
        if not isinstance(name, str):
            raise DecodeError("must be a string", path=f"{path}[{i}].name")
        fields.append((number, protocol, name))
    # Exact types only reach the key (a bool is refused above), so equal keys are equal
    # lists, declared at the same path.
    key = (path, tuple(fields))
    found = _ports_seen.get(key)
    if found is None:
        if len(_ports_seen) >= _INTERNED_MAX:
            _ports_seen.clear()
        found = _ports_seen[key] = tuple(
            ContainerPort(number, protocol, name, path=f"{path}[{i}]")
            for i, (number, protocol, name) in enumerate(fields))
    return found


def namespace_to_dict(ns: Namespace) -> dict[str, Any]:
    return {"name": ns.name, "labels": ns.labels.as_dict()}


def namespace_from_dict(d: Mapping[str, Any]) -> Namespace:
    if not isinstance(d, Mapping):
        raise DecodeError("a namespace must be an object")
    return Namespace(_str(d, "name", required=True), decode_labels(d.get("labels"), "labels"))


# ---- changes --------------------------------------------------------------------------


@dataclass(frozen=True)
class PutNamespace:
    namespace: Namespace


@dataclass(frozen=True)
class DeleteNamespace:
    name: str


@dataclass(frozen=True)
class PutEndpoint:
    record: EndpointRecord


@dataclass(frozen=True)
class DeleteEndpoint:
    key: str


@dataclass(frozen=True)
class PutPolicy:
    record: PolicyRecord


@dataclass(frozen=True)
class DeletePolicy:
    key: str


@dataclass(frozen=True)
class PutClusterPolicy:
    record: ClusterPolicyRecord


@dataclass(frozen=True)
class DeleteClusterPolicy:
    name: str


Change = (PutNamespace | DeleteNamespace | PutEndpoint | DeleteEndpoint | PutPolicy
          | DeletePolicy | PutClusterPolicy | DeleteClusterPolicy)
Deletion = DeleteNamespace | DeleteEndpoint | DeletePolicy | DeleteClusterPolicy


def change_key(change: Change) -> tuple[str, str]:
    """The object a change writes: (its kind as the API names it, its key)."""
    if isinstance(change, PutEndpoint):
        return "endpoint", change.record.key
    if isinstance(change, DeleteEndpoint):
        return "endpoint", change.key
    if isinstance(change, PutNamespace):
        return "namespace", change.namespace.name
    if isinstance(change, DeleteNamespace):
        return "namespace", change.name
    if isinstance(change, PutPolicy):
        return "networkpolicy", change.record.key
    if isinstance(change, DeletePolicy):
        return "networkpolicy", change.key
    if isinstance(change, PutClusterPolicy):
        return "clusternetworkpolicy", change.record.key
    if isinstance(change, DeleteClusterPolicy):
        return "clusternetworkpolicy", change.name
    raise TypeError(f"not a change: {change!r}")


@dataclass
class AgentState:
    """Everything the agent knows; changes fold into it (and into the store alike)."""

    namespaces: dict[str, Namespace] = field(default_factory=dict)
    endpoints: dict[str, EndpointRecord] = field(default_factory=dict)
    policies: dict[str, PolicyRecord] = field(default_factory=dict)
    cluster_policies: dict[str, ClusterPolicyRecord] = field(default_factory=dict)
    # Stored ClusterNetworkPolicies that do not validate (written by hand, or by an
    # older agent): never compiled; admission.quarantine holds what they select.
    refused_cluster_policies: dict[str, RefusedClusterPolicy] = field(default_factory=dict)
    # Endpoints held fail-closed because what was stored cannot be enforced
    # (key -> reasons); see agent/admission.py. A valid new record releases one.
    quarantined: dict[str, list[str]] = field(default_factory=dict)
    _addresses: dict[str, str] | None = field(default=None, repr=False, compare=False)

    def addresses(self) -> dict[str, str]:
        """Address (canonical text) -> the key of the endpoint holding it; kept up to date.
        Bridge ports are among the keys too (``port NAME``: see `model.admit.claims`)."""
        if self._addresses is None:
            self._addresses = {}
            for key, rec in self.endpoints.items():
                self._index(rec, key)
        return self._addresses

    def reindex(self) -> None:
        """Forget the address index (rebuilt at the next use): after a batch that handed an
        address from one endpoint to another, which the incremental index cannot order."""
        self._addresses = None

    def _index(self, rec: EndpointRecord, key: str | None) -> None:
        assert self._addresses is not None
        for addr in claims(rec.endpoint):
            if key is not None:
                self._addresses.setdefault(addr, key)
            elif self._addresses.get(addr) == rec.key:
                del self._addresses[addr]

    def apply(self, changes: Iterable[Change]) -> None:
        for c in changes:
            if isinstance(c, PutNamespace):
                self.namespaces[c.namespace.name] = c.namespace
            elif isinstance(c, DeleteNamespace):
                self.namespaces.pop(c.name, None)
            elif isinstance(c, PutEndpoint):
                self._forget(c.record.key)
                self.endpoints[c.record.key] = c.record
                self.quarantined.pop(c.record.key, None)
                if self._addresses is not None:
                    self._index(c.record, c.record.key)
            elif isinstance(c, DeleteEndpoint):
                self._forget(c.key)
                self.endpoints.pop(c.key, None)
                self.quarantined.pop(c.key, None)
            elif isinstance(c, PutPolicy):
                self.policies[c.record.key] = c.record
            elif isinstance(c, DeletePolicy):
                self.policies.pop(c.key, None)
            elif isinstance(c, PutClusterPolicy):
                self.cluster_policies[c.record.key] = c.record
                self.refused_cluster_policies.pop(c.record.key, None)
            else:
                self.cluster_policies.pop(c.name, None)
                self.refused_cluster_policies.pop(c.name, None)

    def _forget(self, key: str) -> None:
        old = self.endpoints.get(key)
        if old is not None and self._addresses is not None:
            self._index(old, None)

    def cluster(self) -> Cluster:
        return Cluster(tuple(self.namespaces.values()),
                       tuple(r.endpoint for r in self.endpoints.values()),
                       tuple(r.policy for r in self.policies.values()),
                       tuple(r.policy for r in self.cluster_policies.values()))
