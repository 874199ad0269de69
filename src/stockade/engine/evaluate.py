"""The reference evaluator: the semantics of NetworkPolicy, one flow at a time.

A connection from `src` to `dst` is allowed when the egress side of `src` and the
ingress side of `dst` both allow it. Each side is judged by tiers: the Admin
ClusterNetworkPolicies first (their first matching rule accepts or denies, or
passes to the next tier), then NetworkPolicy (a side is unrestricted until some
policy selects its pod for that direction; once isolated, the union of the rules
of every such policy is what it allows, and that is final), then the Baseline
ClusterNetworkPolicies, then the default: allowed. A pod talking to itself is
always allowed. Every verdict carries the trace that justifies it.
"""

from __future__ import annotations

from dataclasses import dataclass

from stockade.engine.match import matching_port, peer_matches
from stockade.engine.tiers import TierDecision, TierIndex
from stockade.model.cidr import parse_ip
from stockade.model.cluster import Cluster, Endpoint
from stockade.model.cnp import ACCEPT, ADMIN, BASELINE, PASS
from stockade.model.labels import Labels
from stockade.model.policy import EGRESS, INGRESS, NetworkPolicy


@dataclass(frozen=True)
class Flow:
    """A new connection: either side is a known endpoint or only an IP."""

    src: Endpoint | None
    src_ip: str
    dst: Endpoint | None
    dst_ip: str
    port: int
    protocol: str

    def render_side(self, side: str) -> str:
        ep, ip = (self.src, self.src_ip) if side == "src" else (self.dst, self.dst_ip)
        return ep.key if ep is not None else ip


@dataclass(frozen=True)
class RuleRef:
    """Which rule (and which of its peers and ports) allowed a flow."""

    policy: str
    direction: str
    rule: int
    peer: int  # -1: the rule has no peers, so it admits every peer
    port: int  # -1: the rule has no ports, so it admits every port

    def render(self) -> str:
        key = "ingress" if self.direction == INGRESS else "egress"
        peers = "from" if self.direction == INGRESS else "to"
        where = [f"{key}[{self.rule}]"]
        where.append("any peer" if self.peer < 0 else f"{peers}[{self.peer}]")
        where.append("any port" if self.port < 0 else f"ports[{self.port}]")
        return f"NetworkPolicy {self.policy} {where[0]} ({where[1]}, {where[2]})"


@dataclass(frozen=True)
class Side:
    """The verdict of one direction: egress of the source or ingress of the destination."""

    direction: str
    endpoint: str | None  # None: a bare IP, which no policy can isolate
    isolating: tuple[str, ...]
    allowed_by: tuple[RuleRef, ...]
    # The first matching ClusterNetworkPolicy rule of each tier, if any (a Baseline
    # one only when neither the Admin tier nor NetworkPolicy decided).
    admin: TierDecision | None = None
    baseline: TierDecision | None = None

    @property
    def isolated(self) -> bool:
        return bool(self.isolating)

    @property
    def decided_by(self) -> str:
        """Which tier decided: `Admin`, `NetworkPolicy`, `Baseline`, or `default`."""
        if self.admin is not None and self.admin.action != PASS:
            return ADMIN
        if self.isolating:
            return "NetworkPolicy"
        if self.baseline is not None and self.baseline.action != PASS:
            return BASELINE
        return "default"

    @property
    def allowed(self) -> bool:
        decided = self.decided_by
        if decided == ADMIN:
            return self.admin is not None and self.admin.action == ACCEPT
        if decided == "NetworkPolicy":
            return bool(self.allowed_by)
        if decided == BASELINE:
            return self.baseline is not None and self.baseline.action == ACCEPT
        return True


@dataclass(frozen=True)
class Verdict:
    flow: Flow
    allowed: bool
    egress: Side
    ingress: Side
    self_traffic: bool = False


class Evaluator:
    """Verdicts over one cluster, caching which policies select which labels."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.namespace_labels: dict[str, Labels] = {ns.name: ns.labels
                                                    for ns in cluster.namespaces}
        self._by_namespace: dict[str, list[NetworkPolicy]] = {}
        for p in cluster.policies:
            self._by_namespace.setdefault(p.namespace, []).append(p)
        self._by_ip: dict[str, Endpoint] = {}
        for ep in cluster.endpoints:
            for ip in ep.ips:
                addr = parse_ip(ip)
                if addr is not None:
                    self._by_ip.setdefault(str(addr), ep)
        self._selecting: dict[tuple[str, Labels, str], tuple[NetworkPolicy, ...]] = {}
        self.tiers = TierIndex(cluster.cluster_policies, self.namespace_labels)

    def endpoint_at(self, ip: str) -> Endpoint | None:
        addr = parse_ip(ip)
        return self._by_ip.get(str(addr)) if addr is not None else None

    def selecting(self, endpoint: Endpoint, direction: str) -> tuple[NetworkPolicy, ...]:
        """Policies that isolate an endpoint in a direction, in a stable order."""
        key = (endpoint.namespace, endpoint.labels, direction)
        found = self._selecting.get(key)
        if found is None:
            found = tuple(sorted(
                (p for p in self._by_namespace.get(endpoint.namespace, ())
                 if p.affects(direction) and p.pod_selector.matches(endpoint.labels)),
                key=lambda p: p.key))
            self._selecting[key] = found
        return found

    def side(self, flow: Flow, direction: str, *, first_only: bool = False) -> Side:
        """Egress of the source or ingress of the destination, with the rules that allow."""
        if direction == EGRESS:
            subject, other, other_ip = flow.src, flow.dst, flow.dst_ip
        else:
            subject, other, other_ip = flow.dst, flow.src, flow.src_ip
        if subject is None:
            return Side(direction, None, (), ())
        admin = baseline = None
        if self.tiers:
            admin = self.tiers.decide(ADMIN, direction, subject, other, other_ip, flow.port,
                                      flow.protocol, flow.dst)
            if admin is not None and admin.action != PASS and first_only:
                return Side(direction, subject.key, (), (), admin)
        policies = self.selecting(subject, direction)
        if self.tiers and not policies:
            baseline = self.tiers.decide(BASELINE, direction, subject, other, other_ip,
                                         flow.port, flow.protocol, flow.dst)
        allowed: list[RuleRef] = []
        for policy in policies:
            for ri, rule in enumerate(policy.rules(direction)):
                pi = matching_port(rule, flow.port, flow.protocol, flow.dst)
                if pi is None:
                    continue
                if not rule.peers:
                    allowed.append(RuleRef(policy.key, direction, ri, -1, pi))
                else:
                    for peer_i, peer in enumerate(rule.peers):
                        if peer_matches(peer, policy.namespace, other, other_ip,
                                        self.namespace_labels):
                            allowed.append(RuleRef(policy.key, direction, ri, peer_i, pi))
                            break
                if allowed and first_only:
                    break
            if allowed and first_only:
                break
        return Side(direction, subject.key, tuple(p.key for p in policies), tuple(allowed),
                    admin, baseline)

    def verdict(self, flow: Flow) -> Verdict:
        egress = self.side(flow, EGRESS)
        ingress = self.side(flow, INGRESS)
        if flow.src is not None and flow.dst is not None and flow.src.key == flow.dst.key:
            return Verdict(flow, True, egress, ingress, self_traffic=True)
        return Verdict(flow, egress.allowed and ingress.allowed, egress, ingress)

    def allowed(self, flow: Flow) -> bool:
        """The verdict alone, stopping at the first rule that allows."""
        if flow.src is not None and flow.dst is not None and flow.src.key == flow.dst.key:
            return True
        return (self.side(flow, EGRESS, first_only=True).allowed
                and self.side(flow, INGRESS, first_only=True).allowed)

    def flow(self, src: Endpoint | str, dst: Endpoint | str, port: int | str,
             protocol: str) -> Flow:
        """A flow between endpoints or IPs; a named port is resolved on the destination.

        An IP that belongs to a known endpoint is that endpoint. Raises ValueError
        for a named port the destination does not serve.
        """
        s_ep, s_ip = self._side_of(src)
        d_ep, d_ip = self._side_of(dst)
        if d_ep is not None and s_ep is not None and isinstance(src, Endpoint) \
                and isinstance(dst, Endpoint):
            version = parse_ip(d_ip)
            if version is not None:
                s_ip = s_ep.ip_for_family(version.version) or s_ip
        if isinstance(port, str):
            number = d_ep.resolve_port(port, protocol) if d_ep is not None else None
            if number is None:
                where = d_ep.key if d_ep is not None else d_ip
                raise ValueError(f"{where} serves no {protocol} port named {port!r}")
            port = number
        return Flow(s_ep, s_ip, d_ep, d_ip, port, protocol)

    def _side_of(self, who: Endpoint | str) -> tuple[Endpoint | None, str]:
        if isinstance(who, Endpoint):
            # A workload (or a Pod not yet given one) has no address: no ipBlock matches it.
            return who, who.ips[0] if who.ips else ""
        return self.endpoint_at(who), who
