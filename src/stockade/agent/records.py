"""What the agent keeps, as frozen data, and the changes that move it (pure).

Records serialise to JSON-able dicts (`to_dict`/`from_dict`): the store keeps
them that way, snapshots are made of them, and the local API speaks them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from stockade.model.cluster import Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.decode import decode_network_policy
from stockade.model.labels import Labels
from stockade.model.policy import NetworkPolicy, Source

# Who manages an endpoint's lifecycle.
OWNER_API = "api"  # registered through the API; removed through it
OWNER_RUN = "run"  # started by `stockade run`; removed when its process exits
OWNER_CNI = "cni"  # added by the CNI plugin; removed by CNI DEL


@dataclass(frozen=True)
class EndpointRecord:
    endpoint: Endpoint
    netns: str = ""  # path of its network namespace
    interface: str = ""  # its interface inside that namespace
    host_interface: str = ""  # the host side of its veth
    owner: str = OWNER_API
    container_id: str = ""
    pid: int = 0  # the process `stockade run` started
    command: tuple[str, ...] = ()
    created: float = 0.0

    @property
    def key(self) -> str:
        return self.endpoint.key

    def to_dict(self) -> dict[str, Any]:
        ep = self.endpoint
        return {
            "namespace": ep.namespace, "name": ep.name, "labels": dict(ep.labels),
            "ips": list(ep.ips),
            "ports": [{"name": p.name, "port": p.port, "protocol": p.protocol}
                      for p in ep.ports],
            "netns": self.netns, "interface": self.interface,
            "hostInterface": self.host_interface, "owner": self.owner,
            "containerID": self.container_id, "pid": self.pid,
            "command": list(self.command), "created": self.created,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EndpointRecord:
        ports = tuple(ContainerPort(int(p["port"]), str(p.get("protocol", "TCP")),
                                    str(p.get("name", ""))) for p in d.get("ports", ()))
        ep = Endpoint(str(d["namespace"]), str(d["name"]),
                      Labels({str(k): str(v) for k, v in (d.get("labels") or {}).items()}),
                      tuple(str(ip) for ip in d.get("ips", ())), ports)
        return cls(ep, str(d.get("netns", "")), str(d.get("interface", "")),
                   str(d.get("hostInterface", "")), str(d.get("owner", OWNER_API)),
                   str(d.get("containerID", "")), int(d.get("pid", 0)),
                   tuple(str(c) for c in d.get("command", ())), float(d.get("created", 0.0)))


@dataclass(frozen=True)
class PolicyRecord:
    """A policy with the manifest it was submitted as (what `get -o yaml` shows)."""

    policy: NetworkPolicy
    manifest: Mapping[str, Any] = field(compare=False, hash=False, default_factory=dict)

    @property
    def key(self) -> str:
        return self.policy.key

    def to_dict(self) -> dict[str, Any]:
        return dict(self.manifest)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PolicyRecord:
        return cls(decode_network_policy(dict(d), Source("store")), dict(d))


def namespace_to_dict(ns: Namespace) -> dict[str, Any]:
    return {"name": ns.name, "labels": dict(ns.labels)}


def namespace_from_dict(d: Mapping[str, Any]) -> Namespace:
    return Namespace(str(d["name"]), Labels({str(k): str(v)
                                             for k, v in (d.get("labels") or {}).items()}))


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


Change = PutNamespace | DeleteNamespace | PutEndpoint | DeleteEndpoint | PutPolicy | DeletePolicy


@dataclass
class AgentState:
    """Everything the agent knows; changes fold into it (and into the store alike)."""

    namespaces: dict[str, Namespace] = field(default_factory=dict)
    endpoints: dict[str, EndpointRecord] = field(default_factory=dict)
    policies: dict[str, PolicyRecord] = field(default_factory=dict)

    def apply(self, changes: Iterable[Change]) -> None:
        for c in changes:
            if isinstance(c, PutNamespace):
                self.namespaces[c.namespace.name] = c.namespace
            elif isinstance(c, DeleteNamespace):
                self.namespaces.pop(c.name, None)
            elif isinstance(c, PutEndpoint):
                self.endpoints[c.record.key] = c.record
            elif isinstance(c, DeleteEndpoint):
                self.endpoints.pop(c.key, None)
            elif isinstance(c, PutPolicy):
                self.policies[c.record.key] = c.record
            else:
                self.policies.pop(c.key, None)

    def cluster(self) -> Cluster:
        return Cluster(tuple(self.namespaces.values()),
                       tuple(r.endpoint for r in self.endpoints.values()),
                       tuple(r.policy for r in self.policies.values()))
