"""NetworkPolicy (networking.k8s.io/v1) as frozen data, after API defaulting."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stockade.model.labels import EMPTY, Labels
from stockade.model.once import once
from stockade.model.selector import ALL, Selector

if TYPE_CHECKING:
    from stockade.model.cnp import ClusterNetworkPolicy

TCP = "TCP"
UDP = "UDP"
SCTP = "SCTP"
PROTOCOLS = (TCP, UDP, SCTP)

INGRESS = "Ingress"
EGRESS = "Egress"
DIRECTIONS = (INGRESS, EGRESS)


@dataclass(frozen=True)
class IPBlock:
    cidr: str
    except_: tuple[str, ...] = ()


@dataclass(frozen=True)
class Peer:
    """One entry of `from`/`to`: selectors ANDed, or an ipBlock."""

    pod_selector: Selector | None = None
    namespace_selector: Selector | None = None
    ip_block: IPBlock | None = None

    def render(self) -> str:
        if self.ip_block is not None:
            exc = f" except {','.join(self.ip_block.except_)}" if self.ip_block.except_ else ""
            return f"ipBlock {self.ip_block.cidr}{exc}"
        parts = []
        if self.namespace_selector is not None:
            parts.append(f"namespaces [{self.namespace_selector.render()}]")
        if self.pod_selector is not None:
            parts.append(f"pods [{self.pod_selector.render()}]")
        return " and ".join(parts) if parts else "no peer"


@dataclass(frozen=True)
class PolicyPort:
    """A port entry; `port` is a number, a name, or None (every port of the protocol)."""

    protocol: str = TCP
    port: int | str | None = None
    end_port: int | None = None

    def render(self) -> str:
        if self.port is None:
            return f"{self.protocol}/*"
        if self.end_port is not None:
            return f"{self.protocol}/{self.port}-{self.end_port}"
        return f"{self.protocol}/{self.port}"


@dataclass(frozen=True)
class Rule:
    """An ingress or egress rule; no peers means every peer, no ports every port."""

    ports: tuple[PolicyPort, ...] = ()
    peers: tuple[Peer, ...] = ()


@dataclass(frozen=True)
class Source:
    """Where an object came from, for error messages."""

    file: str = ""
    document: int = 0

    def render(self) -> str:
        return self.file or "<input>"


NO_SOURCE = Source()


@dataclass(frozen=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: Selector = ALL
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    policy_types: tuple[str, ...] = (INGRESS,)
    labels: Labels = EMPTY
    annotations: Labels = EMPTY
    generate_name: str = ""
    source: Source = field(default=NO_SOURCE, compare=False, hash=False)

    @once
    def key(self) -> str:
        # Cached (an attribute after the first read): a full load asks 150,000 times.
        return f"{self.namespace}/{self.name}"

    def affects(self, direction: str) -> bool:
        return direction in self.policy_types

    def rules(self, direction: str) -> tuple[Rule, ...]:
        return self.ingress if direction == INGRESS else self.egress


def default_policy_types(ingress: object, egress: object) -> tuple[str, ...]:
    """The API server's default when policyTypes is absent or empty.

    Ingress always; Egress only when the egress list has at least one rule, so an
    explicit `egress: []` does not add it.
    """
    del ingress
    if isinstance(egress, list | tuple) and len(egress) > 0:
        return (INGRESS, EGRESS)
    return (INGRESS,)


# A policy may ask that connections it would now deny are kept, not cut (a rolling change
# that drains them): honoured by the agent's revoker and by the eBPF program alike.
KEEP_ANNOTATION = "stockade.io/existing-connections"
KEEP = "keep"


def keeps_connections(policy: NetworkPolicy | ClusterNetworkPolicy,
                      key: str = KEEP_ANNOTATION) -> bool:
    """Whether `policy` is annotated `<key>: keep` (case and blanks ignored)."""
    return policy.annotations.get(key, "").strip().lower() == KEEP
