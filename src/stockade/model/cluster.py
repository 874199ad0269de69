"""The workloads that policies apply to: namespaces and endpoints (pods)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from stockade.model.cnp import ClusterNetworkPolicy
from stockade.model.labels import Labels
from stockade.model.once import once
from stockade.model.policy import NO_SOURCE, NetworkPolicy, Source

NS_NAME_LABEL = "kubernetes.io/metadata.name"


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Labels
    source: Source = field(default=NO_SOURCE, compare=False, hash=False)


@dataclass(frozen=True)
class ContainerPort:
    port: int
    protocol: str = "TCP"
    name: str = ""
    # Where it was declared (`spec.containers[0].ports[1]`), for error messages.
    path: str = field(default="", compare=False, hash=False)


@dataclass(frozen=True)
class Endpoint:
    """A pod or container: what a policy selects and what a peer can be."""

    namespace: str
    name: str
    labels: Labels
    ips: tuple[str, ...]
    ports: tuple[ContainerPort, ...] = ()
    source: Source = field(default=NO_SOURCE, compare=False, hash=False)
    # A pod of another node (the Kubernetes datastore): a peer that selectors pick,
    # whose own policies that node enforces, so it gets no verdict chain here.
    remote: bool = False
    # Where this node attached it: the host side of its veth (a bridge port) and its
    # MAC as plumbed, both from the plumber or the CNI plugin, never from the pod's own
    # namespace (a pod with CAP_NET_ADMIN could claim anything there). The datapath binds
    # its addresses to that port (`compile.ir.Guard`); empty: not attached here.
    port: str = ""
    mac: str = ""

    @once
    def key(self) -> str:
        # Cached (an attribute after the first read): a full load asks 150,000 times.
        return f"{self.namespace}/{self.name}"

    def resolve_port(self, name: str, protocol: str) -> int | None:
        """The number of a named container port with that protocol, if served."""
        for p in self.ports:
            if p.name == name and p.protocol == protocol:
                return p.port
        return None

    def ip_for_family(self, version: int) -> str | None:
        for ip in self.ips:
            if ipaddress.ip_address(ip).version == version:
                return ip
        return None


@dataclass(frozen=True)
class Cluster:
    """Everything the semantics depend on: namespaces, endpoints, policies."""

    namespaces: tuple[Namespace, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    policies: tuple[NetworkPolicy, ...] = ()
    # The administrator's tiers, judged before (Admin) and after (Baseline) `policies`.
    cluster_policies: tuple[ClusterNetworkPolicy, ...] = ()

    def namespace(self, name: str) -> Namespace | None:
        for ns in self.namespaces:
            if ns.name == name:
                return ns
        return None

    def endpoint(self, key: str) -> Endpoint | None:
        for ep in self.endpoints:
            if ep.key == key:
                return ep
        return None

    def with_policies(self, policies: Iterable[NetworkPolicy]) -> Cluster:
        return Cluster(self.namespaces, self.endpoints, tuple(policies), self.cluster_policies)


def implicit_namespace(name: str) -> Namespace:
    """A namespace known only by name carries the label the API server sets on every one."""
    return Namespace(name, Labels({NS_NAME_LABEL: name}))
