"""ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2) as frozen data.

The cluster administrator's tiers: Admin policies are judged before every
NetworkPolicy, Baseline policies after them, each tier by ascending priority and,
within a policy, rule by rule in written order. The first rule that matches decides
(`Accept`, `Deny`) or leaves the tier (`Pass`). Stored objects carry no defaults, so
the model is what was written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stockade.model.labels import EMPTY, Labels
from stockade.model.policy import EGRESS, INGRESS, NO_SOURCE, Source
from stockade.model.selector import ALL, Selector

CNP_API = "policy.networking.k8s.io/v1alpha2"
CNP_KIND = "ClusterNetworkPolicy"

ADMIN = "Admin"
BASELINE = "Baseline"
TIERS = (ADMIN, BASELINE)

ACCEPT = "Accept"
DENY = "Deny"
PASS = "Pass"  # noqa: S105 - an action, not a password
ACTIONS = (ACCEPT, DENY, PASS)

MIN_PRIORITY = 0
MAX_PRIORITY = 1000
MAX_RULES = 25
MAX_PEERS = 25
MAX_PROTOCOLS = 25
MAX_NETWORKS = 25
MAX_RULE_NAME = 100

# The kinds of a subject or a peer; `unknown` is a peer written with only
# fields stockade does not implement (`nodes`, `domainNames`) or none at all,
# which fails closed: an Accept matches nothing, a Deny or Pass everything.
NAMESPACES = "namespaces"
PODS = "pods"
NETWORKS = "networks"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class CnpPeer:
    """A subject or a peer: `namespaces` (every pod of the namespaces matched),
    `pods` (pods matched in namespaces matched), or `networks` (CIDRs)."""

    kind: str
    namespace_selector: Selector = ALL
    pod_selector: Selector = ALL
    networks: tuple[str, ...] = ()
    # The fields written, for a peer of kind `unknown` (messages and lint).
    written: tuple[str, ...] = ()

    def render(self) -> str:
        if self.kind == NAMESPACES:
            return f"namespaces [{self.namespace_selector.render()}]"
        if self.kind == PODS:
            return (f"pods [{self.pod_selector.render()}] in namespaces "
                    f"[{self.namespace_selector.render()}]")
        if self.kind == NETWORKS:
            return f"networks {','.join(self.networks)}"
        return f"unknown peer ({', '.join(self.written) or 'no field'})"


@dataclass(frozen=True)
class CnpPort:
    """One entry of `protocols`: a protocol with a port or a range, or a named port.

    `name` set: `destinationNamedPort` (matched on the destination's container
    port of that name, its number and protocol); otherwise `protocol` with
    `start..end` (both included; a single number has start == end).
    """

    protocol: str = ""
    start: int = 0
    end: int = 0
    name: str = ""

    def render(self) -> str:
        if self.name:
            return f"named port {self.name}"
        if self.start == self.end:
            return f"{self.protocol}/{self.start}"
        return f"{self.protocol}/{self.start}-{self.end}"


@dataclass(frozen=True)
class CnpRule:
    """An ingress or egress rule; `ports` None means every protocol and port."""

    action: str
    peers: tuple[CnpPeer, ...]
    ports: tuple[CnpPort, ...] | None = None
    name: str = ""


@dataclass(frozen=True)
class ClusterNetworkPolicy:
    name: str
    tier: str
    priority: int
    subject: CnpPeer
    ingress: tuple[CnpRule, ...] = ()
    egress: tuple[CnpRule, ...] = ()
    labels: Labels = EMPTY
    annotations: Labels = EMPTY
    source: Source = field(default=NO_SOURCE, compare=False, hash=False)

    @property
    def key(self) -> str:
        """Cluster-scoped: the name alone identifies it."""
        return self.name

    def rules(self, direction: str) -> tuple[CnpRule, ...]:
        return self.ingress if direction == INGRESS else self.egress

    def order(self) -> tuple[int, str]:
        """Precedence within a tier: priority, then name.

        Two policies of one priority that both match a connection leave the result
        to the implementation; stockade breaks the tie by name, the same in the
        evaluator and every datapath, and `lint` reports such overlaps.
        """
        return (self.priority, self.name)


def rule_label(policy: ClusterNetworkPolicy, direction: str, index: int) -> str:
    """`tier/policy ingress[2] (name)` for traces and messages."""
    rule = policy.rules(direction)[index]
    key = "ingress" if direction == INGRESS else "egress"
    named = f" ({rule.name})" if rule.name else ""
    return f"{policy.tier} ClusterNetworkPolicy {policy.name} (priority {policy.priority}) " \
           f"{key}[{index}]{named}"


DIRECTIONS = (INGRESS, EGRESS)
