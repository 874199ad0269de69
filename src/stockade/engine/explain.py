"""Explanations: why a connection is allowed or denied, rule by rule (pure).

For each side (egress of the source, ingress of the destination) it says
whether the pod is isolated and by which policies, which rules allow the
connection, and for a side that refuses it why each rule of each isolating
policy does not match: the port is not listed, the namespace or the pod labels
are not selected, the address is outside the block or in its except.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stockade.engine.evaluate import Flow, RuleRef, Side, Verdict
from stockade.engine.match import ip_block_matches, matching_port
from stockade.engine.tiers import TierDecision
from stockade.model.cluster import Cluster, Endpoint
from stockade.model.cnp import ADMIN, BASELINE, PASS
from stockade.model.labels import Labels
from stockade.model.policy import (
    EGRESS,
    INGRESS,
    IPBlock,
    NetworkPolicy,
    Peer,
    PolicyPort,
    Rule,
)


@dataclass(frozen=True)
class RuleCheck:
    """One rule of an isolating policy and whether it admits the connection."""

    policy: str
    direction: str
    rule: int
    matches: bool
    reason: str

    def render(self) -> str:
        if self.rule < 0:
            return f"{self.policy}: {self.reason}"
        return f"{self.policy} {_rule_name(self.direction, self.rule)}: {self.reason}"


@dataclass(frozen=True)
class Context:
    """What the wording needs besides the verdict: policies by key, namespace labels."""

    policies: Mapping[str, NetworkPolicy]
    namespace_labels: Mapping[str, Labels]
    port_name: str | None
    tiers: bool = False  # the cluster has ClusterNetworkPolicies: say what they decided


def context_of(cluster: Cluster, port_name: str | None = None) -> Context:
    return Context({p.key: p for p in cluster.policies},
                   {n.name: n.labels for n in cluster.namespaces}, port_name,
                   bool(cluster.cluster_policies))


# ---- why a rule does or does not match -------------------------------------------------


def check_rules(side: Side, flow: Flow, ctx: Context) -> tuple[RuleCheck, ...]:
    """Every rule of every policy isolating this side, with the reason it (mis)matches."""
    if side.endpoint is None:
        return ()
    other, other_ip = (flow.dst, flow.dst_ip) if side.direction == EGRESS \
        else (flow.src, flow.src_ip)
    checks = []
    for key in side.isolating:
        policy = ctx.policies[key]
        rules = policy.rules(side.direction)
        if not rules:
            word = side.direction.lower()
            checks.append(RuleCheck(key, side.direction, -1, False,
                                    f"no {word} rules: it allows no {word} at all"))
        for i, rule in enumerate(rules):
            ok, reason = rule_reason(rule, side.direction, policy, flow, (other, other_ip), ctx)
            checks.append(RuleCheck(key, side.direction, i, ok, reason))
    return tuple(checks)


def rule_reason(rule: Rule, direction: str, policy: NetworkPolicy, flow: Flow,
                other: tuple[Endpoint | None, str], ctx: Context) -> tuple[bool, str]:
    """Whether a rule admits the flow, and the words for why (not)."""
    other_ep, other_ip = other
    port_i = matching_port(rule, flow.port, flow.protocol, flow.dst)
    peer_misses = [peer_reason(p, policy.namespace, other_ep, other_ip, ctx)
                   for p in rule.peers]
    peer_ok = not rule.peers or any(m is None for m in peer_misses)
    port_text = _port_text(rule, port_i, flow)
    if port_i is not None and peer_ok:
        return True, f"matches ({port_text})"
    problems = []
    if port_i is None:
        problems.append(port_text)
    if not peer_ok:
        who = flow.render_side("dst" if direction == EGRESS else "src")
        verb = "to" if direction == EGRESS else "from"
        details = "; ".join(f"{verb}[{i}] {m}" for i, m in enumerate(peer_misses))
        problems.append(f"{who} is none of its peers ({details})")
    return False, "does not match: " + " and ".join(problems)


def _port_text(rule: Rule, port_i: int | None, flow: Flow) -> str:
    what = f"{flow.protocol}/{flow.port}"
    if not rule.ports:
        return "any port"
    if port_i is not None:
        return f"ports[{port_i}] {rule.ports[port_i].render()} covers {what}"
    listed = ", ".join(_entry_text(p, flow.dst) for p in rule.ports)
    return f"{what} is not in its ports ({listed})"


def _entry_text(entry: PolicyPort, dst: Endpoint | None) -> str:
    """A port entry; a named one with what it resolves to on the destination."""
    if not isinstance(entry.port, str) or dst is None:
        return entry.render()
    number = dst.resolve_port(entry.port, entry.protocol)
    if number is None:
        return f"{entry.render()}, which {dst.key} does not serve"
    return f"{entry.render()}={number}"


def peer_reason(peer: Peer, policy_ns: str, endpoint: Endpoint | None, ip: str,
                ctx: Context) -> str | None:
    """None when the peer is the other side; otherwise why it is not, briefly."""
    if peer.ip_block is not None:
        if ip_block_matches(peer.ip_block, ip):
            return None
        if ip_block_matches(IPBlock(peer.ip_block.cidr), ip):
            return f"{peer.render()}: {ip} is in an except"
        return f"{peer.render()}: {ip} is outside it"
    if peer.pod_selector is None and peer.namespace_selector is None:
        return "is empty and matches nothing"
    if endpoint is None:
        return f"{peer.render()}: selectors only match pods, and {ip} is no known pod"
    if peer.namespace_selector is None:
        if endpoint.namespace != policy_ns:
            return f"{peer.render()}: only pods of namespace {policy_ns}"
    else:
        labels = ctx.namespace_labels.get(endpoint.namespace, Labels())
        if not peer.namespace_selector.matches(labels):
            return (f"{peer.render()}: namespace {endpoint.namespace} "
                    f"({labels.render() or 'no labels'}) is not selected")
    if peer.pod_selector is not None and not peer.pod_selector.matches(endpoint.labels):
        return (f"{peer.render()}: pod labels "
                f"({endpoint.labels.render() or 'none'}) are not selected")
    return None


# ---- wording ---------------------------------------------------------------------------


def _rule_name(direction: str, index: int) -> str:
    return f"{'ingress' if direction == INGRESS else 'egress'}[{index}]"


def describe_ref(ref: RuleRef, ctx: Context) -> str:
    """`NetworkPolicy ns/name ingress[0] from[1] (pods [app=web]) ports[0] (TCP/api)`."""
    rules = ctx.policies[ref.policy].rules(ref.direction)
    if ref.rule >= len(rules):  # two policies with one name: fall back to the plain form
        return ref.render()
    rule = rules[ref.rule]
    peers = "from" if ref.direction == INGRESS else "to"
    parts = [f"NetworkPolicy {ref.policy} {_rule_name(ref.direction, ref.rule)}"]
    parts.append("(any peer)" if ref.peer < 0
                 else f"{peers}[{ref.peer}] ({rule.peers[ref.peer].render()})")
    parts.append("(any port)" if ref.port < 0
                 else f"ports[{ref.port}] ({rule.ports[ref.port].render()})")
    return " ".join(parts)


def flow_text(flow: Flow, ctx: Context) -> str:
    named = f" (port {ctx.port_name!r} of {flow.render_side('dst')})" if ctx.port_name else ""
    return f"{flow.render_side('src')} -> {flow.render_side('dst')} " \
           f"{flow.protocol}/{flow.port}{named}"


def side_lines(side: Side, flow: Flow, ctx: Context) -> list[str]:
    d = side.direction.lower()
    pod = flow.render_side("src" if side.direction == EGRESS else "dst")
    other = flow.render_side("dst" if side.direction == EGRESS else "src")
    verdict = "allowed" if side.allowed else "denied"
    if side.endpoint is None:
        return [f"{d}: {verdict}: {pod} is not a pod of the files, so no policy applies to it"]
    decided = side.decided_by
    if decided == ADMIN and side.admin is not None:
        return [f"{d}: {verdict}: by {side.admin.render()}"]
    # A Pass says where the decision went on from, in the first line.
    passes = [t for t in (side.admin, side.baseline) if t is not None and t.action == PASS]
    via = "".join(f"passed on by {t.render()}; " for t in passes)
    if decided == BASELINE and side.baseline is not None:
        return [f"{d}: {verdict}: {via}{pod} is not isolated for {d} (no NetworkPolicy "
                f"selects it); by {side.baseline.render()}"]
    if not side.isolating:
        tail = "; no ClusterNetworkPolicy rule decided: default allow" if ctx.tiers else ""
        return [f"{d}: {verdict}: {via}{pod} is not isolated for {d} (no NetworkPolicy "
                f"selects it){tail}"]
    head, *rules = _isolated_lines(side, flow, ctx, pod, other)
    return [head.replace(f"{d}: {verdict}: ", f"{d}: {verdict}: {via}", 1), *rules]


def _isolated_lines(side: Side, flow: Flow, ctx: Context, pod: str, other: str) -> list[str]:
    d = side.direction.lower()
    verdict = "allowed" if side.allowed else "denied"
    pols = ", ".join(side.isolating)
    head = f"{d}: {verdict}: {pod} is isolated for {d} by {_plural(side.isolating)} {pols}"
    if side.allowed_by:
        lines = [f"{head}; allowed by:"]
        lines += [f"  {describe_ref(r, ctx)}" for r in side.allowed_by]
        return lines
    what = f"{flow.protocol}/{flow.port}"
    verb = "to" if side.direction == EGRESS else "from"
    lines = [f"{head}; none allows {what} {verb} {other}:"]
    lines += [f"  {c.render()}" for c in check_rules(side, flow, ctx)]
    return lines


def _plural(keys: tuple[str, ...]) -> str:
    return "policy" if len(keys) == 1 else "policies"


def explain_lines(verdict: Verdict, ctx: Context) -> list[str]:
    flow = verdict.flow
    lines = [f"{'ALLOWED' if verdict.allowed else 'DENIED'}: {flow_text(flow, ctx)}"]
    if verdict.self_traffic:
        return [*lines, f"  {flow.render_side('src')} talking to itself is always allowed"]
    for side in (verdict.egress, verdict.ingress):
        lines += ["  " + line for line in side_lines(side, flow, ctx)]
    return lines


def explain_json(verdict: Verdict, ctx: Context) -> dict[str, Any]:
    """The verdict as data. No number stands for "any": a rule that admits any peer or
    any port has `"any_peer"`/`"any_port": true` and a null index."""
    flow = verdict.flow
    return {
        "allowed": verdict.allowed,
        "self": verdict.self_traffic,
        "flow": {"from": flow.render_side("src"), "from_ip": flow.src_ip,
                 "to": flow.render_side("dst"), "to_ip": flow.dst_ip,
                 "protocol": flow.protocol, "port": flow.port, "port_name": ctx.port_name},
        "egress": _side_json(verdict.egress, flow, ctx),
        "ingress": _side_json(verdict.ingress, flow, ctx),
    }


def _decision_json(decision: TierDecision | None) -> dict[str, Any] | None:
    if decision is None:
        return None
    return {"tier": decision.tier, "policy": decision.policy, "priority": decision.priority,
            "rule": decision.rule, "rule_name": decision.rule_name or None,
            "action": decision.action, "peer": None if decision.peer < 0 else decision.peer,
            "text": decision.render()}


def _side_json(side: Side, flow: Flow, ctx: Context) -> dict[str, Any]:
    return {
        "pod": side.endpoint,
        # Which tier decided: Admin, NetworkPolicy, Baseline, or default (allowed).
        "decided_by": side.decided_by if side.endpoint is not None else "default",
        "admin": _decision_json(side.admin),
        "baseline": _decision_json(side.baseline),
        "isolated": side.isolated,
        "allowed": side.allowed,
        "policies": list(side.isolating),
        # A rule without peers (ports) admits any peer (port): said so, with no index.
        "allowed_by": [{"policy": r.policy, "rule": r.rule,
                        "peer": None if r.peer < 0 else r.peer, "any_peer": r.peer < 0,
                        "port": None if r.port < 0 else r.port, "any_port": r.port < 0,
                        "text": describe_ref(r, ctx)} for r in side.allowed_by],
        # A policy with no rule for the direction: one entry, its rule null.
        "rules": [] if side.allowed or side.decided_by != "NetworkPolicy" else [
            {"policy": c.policy, "rule": None if c.rule < 0 else c.rule,
             "matches": c.matches, "reason": c.reason}
            for c in check_rules(side, flow, ctx)],
    }
