"""The connections a policy change opens and closes, exactly, over every port.

A connection is (source pod, destination pod, protocol, port). The verdict on a
port depends only on which port entries cover it: numbers, ranges, and named
ports, which resolve to container port numbers of the destination. So the port
space of each protocol splits into intervals whose bounds are those numbers, and
every port of an interval has the same verdict for every pair. Judging one port
per interval, before and after, is exact, and the changes come out as ranges.

Addresses outside the cluster are judged the same way (the ranges of
`engine.connectivity`, as `stockade list` cuts them): the IPv4 and IPv6 spaces are cut at
every bound of every ipBlock (after its excepts) of both policy sets, so one
address stands for its whole range, and each range is paired with every pod
(from the range to the pod, and from the pod to the range; never a pod's own
address). Removing an `except` shows as connections opened to that range.

The workloads (pods, namespaces) are held fixed: the same cluster is judged with
the old and with the new policies, so the diff shows what the policies change.

ClusterNetworkPolicies are policies too: each side has its own tiers, the port
space is also cut at their port bounds and the address space at their `networks`
CIDRs, so a change of priority, of action or of rule order shows as exactly the
connections whose verdict it changes, with the tier rule that now decides (or
no longer does) as the reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from stockade.engine.connectivity import AddressRange, Sides, address_ranges
from stockade.engine.evaluate import Evaluator, Flow, Side, Verdict
from stockade.engine.matrix import pod_classes
from stockade.engine.tiers import TierDecision
from stockade.model.cluster import Cluster, Endpoint
from stockade.model.cnp import ACCEPT, ADMIN, BASELINE, DENY, ClusterNetworkPolicy
from stockade.model.policy import EGRESS, INGRESS, PROTOCOLS, NetworkPolicy

MAX_PORT = 65535
OPENED = "opened"
CLOSED = "closed"


@dataclass(frozen=True)
class PortRange:
    low: int
    high: int

    def render(self) -> str:
        if (self.low, self.high) == (1, MAX_PORT):
            return "*"
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


@dataclass(frozen=True)
class PortSet:
    protocol: str
    ranges: tuple[PortRange, ...]

    def render(self) -> str:
        return f"{self.protocol}/{','.join(r.render() for r in self.ranges)}"


@dataclass(frozen=True)
class Change:
    """Connections from one pod to another that open (or close) for one reason."""

    change: str  # OPENED or CLOSED
    src: str
    dst: str
    ports: tuple[PortSet, ...]
    reason: str

    def render(self) -> str:
        sign = "+" if self.change == OPENED else "-"
        ports = " ".join(p.render() for p in self.ports)
        why = f"{self.change} {self.reason}" if self.reason.startswith("by ") \
            else f"{self.change}: {self.reason}"
        return f"{sign} {self.src} -> {self.dst} {ports} ({why})"


@dataclass(frozen=True)
class PolicyDiff:
    changes: tuple[Change, ...]

    @property
    def opened(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.change == OPENED)

    @property
    def closed(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.change == CLOSED)


def port_intervals(policies: Iterable[NetworkPolicy], endpoints: Sequence[Endpoint],
                   protocol: str, cluster_policies: Iterable[ClusterNetworkPolicy] = ()
                   ) -> tuple[PortRange, ...]:
    """Intervals of one protocol's ports on which every verdict is constant."""
    starts = {1}
    for policy in policies:
        for rule in policy.ingress + policy.egress:
            for entry in rule.ports:
                if entry.protocol != protocol or not isinstance(entry.port, int):
                    continue
                starts.add(entry.port)
                starts.add((entry.end_port or entry.port) + 1)
    for cnp in cluster_policies:
        for cnp_rule in cnp.ingress + cnp.egress:
            for cnp_port in cnp_rule.ports or ():
                if not cnp_port.name and cnp_port.protocol == protocol:
                    starts.update((cnp_port.start, cnp_port.end + 1))
    # A named port can resolve to any container port number of the protocol.
    for ep in endpoints:
        for cp in ep.ports:
            if cp.protocol == protocol:
                starts.update((cp.port, cp.port + 1))
    bounds = sorted(s for s in starts if 1 <= s <= MAX_PORT)
    ends = [b - 1 for b in bounds[1:]] + [MAX_PORT]
    return tuple(PortRange(lo, hi) for lo, hi in zip(bounds, ends, strict=True))


@dataclass(frozen=True)
class Versions:
    """What the reasons name: the policies of each side, to mark one new, removed
    or changed."""

    old_keys: frozenset[str]
    new_keys: frozenset[str]
    old_tiers: Mapping[str, ClusterNetworkPolicy]
    new_tiers: Mapping[str, ClusterNetworkPolicy]


def diff_policies(cluster: Cluster, old: Sequence[NetworkPolicy],
                  new: Sequence[NetworkPolicy], *, external: bool = False,
                  old_tiers: Sequence[ClusterNetworkPolicy] | None = None,
                  new_tiers: Sequence[ClusterNetworkPolicy] | None = None) -> PolicyDiff:
    """Every connection whose verdict differs between the two policy sets: between
    two pods, and (`external`, as `stockade diff` does) between a pod and a range of
    external IPv4 addresses. `old_tiers` and `new_tiers` are each side's
    ClusterNetworkPolicies (None: the cluster's own, unchanged)."""
    old_cnps = tuple(cluster.cluster_policies if old_tiers is None else old_tiers)
    new_cnps = tuple(cluster.cluster_policies if new_tiers is None else new_tiers)
    old_cluster = Cluster(cluster.namespaces, cluster.endpoints, tuple(old), old_cnps)
    new_cluster = Cluster(cluster.namespaces, cluster.endpoints, tuple(new), new_cnps)
    before = Evaluator(old_cluster)
    after = Evaluator(new_cluster)
    versions = Versions(frozenset(p.key for p in old), frozenset(p.key for p in new),
                        {p.name: p for p in old_cnps}, {p.name: p for p in new_cnps})
    pods = sorted(cluster.endpoints, key=lambda e: (e.namespace, e.name))
    both = [*old, *new]
    both_cnps = [*old_cnps, *new_cnps]
    classes = pod_classes(Cluster(cluster.namespaces, cluster.endpoints, tuple(both),
                                  tuple(both_cnps)), pods)
    sources = tuple(r for v in (4, 6) for r in address_ranges(both, INGRESS, v, both_cnps)) \
        if external else ()
    destinations = tuple(r for v in (4, 6)
                         for r in address_ranges(both, EGRESS, v, both_cnps)) \
        if external else ()
    found: dict[tuple[str, str, str, str], dict[str, list[PortRange]]] = {}
    # The (pod, range) pairs whose connections differ at all: found on port intervals
    # (engine.connectivity), then judged port range by port range for the reasons.
    outbound, inbound_pairs = _changed_external(old_cluster, new_cluster, pods, sources,
                                                destinations)

    def judge(flows: tuple[Flow, Flow], src: str, dst: str, protocol: str,
              span: PortRange) -> None:
        hit = _change((before, after), versions, flows)
        ports = found.setdefault((hit[0], src, dst, hit[1]), {})
        ports.setdefault(protocol, []).append(span)

    for protocol in PROTOCOLS:
        for span in port_intervals(both, pods, protocol, both_cnps):
            # Pods of the same classes get the same verdicts (see matrix.pod_classes).
            seen: dict[object, tuple[bool, bool]] = {}
            for i, src in enumerate(pods):
                for j, dst in enumerate(pods):
                    if i == j:
                        continue  # always allowed, on both sides
                    pair = (classes[i], classes[j])
                    if pair not in seen:
                        seen[pair] = (_allowed(before, src, dst, span.low, protocol),
                                      _allowed(after, src, dst, span.low, protocol))
                    was, now = seen[pair]
                    if was != now:
                        judge((before.flow(src, dst, span.low, protocol),
                               after.flow(src, dst, span.low, protocol)),
                              src.key, dst.key, protocol, span)
            for i, rng in outbound:
                out = _to_address(pods[i], rng, span.low, protocol)
                key = ("to", classes[i], rng)
                if key not in seen:
                    seen[key] = (before.allowed(out), after.allowed(out))
                if seen[key][0] != seen[key][1]:
                    judge((out, out), pods[i].key, render_range(rng), protocol, span)
            for i, rng in inbound_pairs:
                inbound = _from_address(rng, pods[i], span.low, protocol)
                key = ("from", classes[i], rng)
                if key not in seen:
                    seen[key] = (before.allowed(inbound), after.allowed(inbound))
                if seen[key][0] != seen[key][1]:
                    judge((inbound, inbound), render_range(rng), pods[i].key, protocol, span)
    changes = [Change(kind, s, d, _port_sets(ports), reason)
               for (kind, s, d, reason), ports in found.items()]
    changes.sort(key=lambda c: (c.src, c.dst, c.change, c.ports[0].protocol,
                                c.ports[0].ranges[0].low))
    return PolicyDiff(tuple(changes))


def _changed_external(old: Cluster, new: Cluster, pods: Sequence[Endpoint],
                      sources: Sequence[AddressRange], destinations: Sequence[AddressRange]
                      ) -> tuple[list[tuple[int, AddressRange]], list[tuple[int, AddressRange]]]:
    """(pod index, range) pairs whose connections differ: to the range, from it."""
    if not sources and not destinations:
        return [], []
    before = Sides(old)
    after = Sides(new)
    outbound = [(i, rng) for i, pod in enumerate(pods) for rng in destinations
                if before.to_address(pod, rng.sample) != after.to_address(pod, rng.sample)]
    inbound = [(i, rng) for i, pod in enumerate(pods) for rng in sources
               if before.from_address(rng.sample, pod) != after.from_address(rng.sample, pod)]
    return outbound, inbound


def render_range(rng: AddressRange) -> str:
    """An external range as a CIDR when it is one (`192.168.0.0/16`), else `first-last`."""
    cidrs = rng.cidrs()
    if len(cidrs) == 1:
        return cidrs[0]
    return rng.render().removesuffix("[External]")


def _to_address(src: Endpoint, rng: AddressRange, port: int, protocol: str) -> Flow:
    """From a pod to an address of the range (one that is no pod's: never resolved)."""
    return Flow(src, src.ip_for_family(rng.version) or (src.ips[0] if src.ips else ""),
                None, rng.sample, port, protocol)


def _from_address(rng: AddressRange, dst: Endpoint, port: int, protocol: str) -> Flow:
    return Flow(None, rng.sample, dst,
                dst.ip_for_family(rng.version) or (dst.ips[0] if dst.ips else ""),
                port, protocol)


def _allowed(ev: Evaluator, src: Endpoint, dst: Endpoint, port: int, protocol: str) -> bool:
    return ev.allowed(ev.flow(src, dst, port, protocol))


def _change(evaluators: tuple[Evaluator, Evaluator], versions: Versions,
            flows: tuple[Flow, Flow]) -> tuple[str, str]:
    """(OPENED or CLOSED, reason) of a connection whose verdict changed."""
    before, after = evaluators
    old_v = before.verdict(flows[0])
    new_v = after.verdict(flows[1])
    if new_v.allowed:
        return OPENED, opened_reason(old_v, new_v, versions.old_keys, versions)
    return CLOSED, closed_reason(old_v, new_v, versions.new_keys, versions.old_keys, versions)


def _port_sets(ports: dict[str, list[PortRange]]) -> tuple[PortSet, ...]:
    return tuple(PortSet(proto, merge_ranges(ports[proto]))
                 for proto in PROTOCOLS if proto in ports)


def merge_ranges(ranges: Iterable[PortRange]) -> tuple[PortRange, ...]:
    """Adjacent or overlapping ranges joined, in order."""
    out: list[PortRange] = []
    for r in sorted(ranges, key=lambda r: r.low):
        if out and r.low <= out[-1].high + 1:
            out[-1] = PortRange(out[-1].low, max(out[-1].high, r.high))
        else:
            out.append(r)
    return tuple(out)


# ---- reasons ---------------------------------------------------------------------------
# Rules are named without their peer and port indexes so that one reason covers a
# whole range of ports and the range stays on one line. A policy present on one
# side only is marked (new) or (removed), which is what a reviewer looks for.


def _name(key: str, other_side: frozenset[str], mark: str) -> str:
    return f"NetworkPolicy {key}" + ("" if key in other_side else f" ({mark})")


def _rules(side: Side, other_side: frozenset[str], mark: str) -> list[str]:
    names = dict.fromkeys(
        f"{_name(r.policy, other_side, mark)} "
        f"{'ingress' if r.direction == INGRESS else 'egress'}[{r.rule}]"
        for r in side.allowed_by)
    return list(names)


def _sides(verdict: Verdict) -> tuple[tuple[Side, str], tuple[Side, str]]:
    f = verdict.flow
    return (verdict.egress, f.render_side("src")), (verdict.ingress, f.render_side("dst"))


def _tier_rule(decision: TierDecision, versions: Versions | None, new: bool) -> str:
    """`Admin ClusterNetworkPolicy x (priority 3) egress[1] (name)`, marked (new),
    (removed) or (changed) against the other side."""
    mark = ""
    if versions is not None:
        mine = (versions.new_tiers if new else versions.old_tiers).get(decision.policy)
        theirs = (versions.old_tiers if new else versions.new_tiers).get(decision.policy)
        if theirs is None:
            mark = " (new)" if new else " (removed)"
        elif theirs != mine:
            mark = " (changed)"
    key = "ingress" if decision.direction == INGRESS else "egress"
    named = f" ({decision.rule_name})" if decision.rule_name else ""
    return (f"{decision.tier} ClusterNetworkPolicy {decision.policy}{mark} "
            f"(priority {decision.priority}) {key}[{decision.rule}]{named}")


def _tier_decision(side: Side) -> TierDecision | None:
    """The tier rule that decided a side, if a tier did."""
    if side.decided_by == ADMIN:
        return side.admin
    if side.decided_by == BASELINE:
        return side.baseline
    return None


def _no_longer(was: Side, now: Side, versions: Versions | None) -> list[str]:
    """The tier rule that decided a side before and no longer does."""
    old = _tier_decision(was)
    if old is None or old == _tier_decision(now):
        return []
    verb = {ACCEPT: "accepts", DENY: "denies"}[old.action]
    return [f"{_tier_rule(old, versions, False)} no longer {verb} it"]


def opened_reason(old: Verdict, new: Verdict, old_keys: frozenset[str],
                  versions: Versions | None = None) -> str:
    """What now admits each side that refused before."""
    rules: list[str] = []
    freed: list[str] = []
    for (was, pod), (now, _) in zip(_sides(old), _sides(new), strict=True):
        if was.allowed:
            continue
        decision = _tier_decision(now)
        if decision is not None:
            rules.append(f"{_tier_rule(decision, versions, True)} (Accept)")
            freed += _no_longer(was, now, versions)
        elif now.isolated:
            rules += _rules(now, old_keys, "new")
            freed += _no_longer(was, now, versions)
        elif was.decided_by == "NetworkPolicy":
            freed.append(f"{pod} no longer isolated for {now.direction.lower()}")
        else:
            freed += _no_longer(was, now, versions)
    parts = ([f"by {' and '.join(rules)}"] if rules else []) + freed
    return "; ".join(parts)


def closed_reason(old: Verdict, new: Verdict, new_keys: frozenset[str],
                  old_keys: frozenset[str], versions: Versions | None = None) -> str:
    """What now refuses each side that admitted before."""
    parts = []
    for (was, pod), (now, _) in zip(_sides(old), _sides(new), strict=True):
        if now.allowed:
            continue
        d = now.direction.lower()
        decision = _tier_decision(now)
        if decision is not None:
            parts.append(f"{_tier_rule(decision, versions, True)} denies it")
            continue
        before = _no_longer(was, now, versions)
        if before:
            pols = ", ".join(_name(k, old_keys, "new") for k in now.isolating)
            parts.append(f"{before[0]}, and no rule of {pols} allows it")
        elif not was.isolated:
            pols = ", ".join(_name(k, old_keys, "new") for k in now.isolating)
            parts.append(f"{pod} now isolated for {d} by {pols}, and no rule allows it")
        else:
            gone = " and ".join(_rules(was, new_keys, "removed"))
            parts.append(f"{gone} no longer allows it")
    return "; ".join(parts)
