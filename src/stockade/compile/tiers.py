"""Lowering ClusterNetworkPolicy tiers to chains of the backend-neutral ruleset (pure).

A tier's rule becomes the same kinds of `ChainRule` a NetworkPolicy rule does
(peer sets, port ranges, named-port triples), with its action. Its peers are
written as NetworkPolicy peers with both selectors (`namespaces` selects every
pod of the namespaces matched; `pods` the pods matched in them), or one ipBlock
per CIDR of `networks`, so the sets are the ones `membership` already defines
and the full and incremental compilers already fill. A named port is matched
on the destination: for egress the peer's pods serving it, for ingress every
pod serving it (the chain is the destination's own, so its address is the one
that counts).
"""

from __future__ import annotations

from collections.abc import Sequence

from stockade.compile.ir import (
    ALLOW,
    DENY,
    PASS,
    Chain,
    ChainRule,
    content_name,
)
from stockade.compile.lower import DIRECTION, Need, lower_rules, named_rule_specs
from stockade.model import policy as model
from stockade.model.cnp import (
    ACCEPT,
    NAMESPACES,
    NETWORKS,
    PODS,
    ClusterNetworkPolicy,
    CnpPeer,
    CnpRule,
)
from stockade.model.selector import ALL

ACTION = {ACCEPT: ALLOW, "Deny": DENY, "Pass": PASS}


def as_peers(peer: CnpPeer) -> list[model.Peer]:
    """A tier's peer as NetworkPolicy peers matching the same pods or addresses."""
    if peer.kind == NAMESPACES:
        return [model.Peer(pod_selector=ALL, namespace_selector=peer.namespace_selector)]
    if peer.kind == PODS:
        return [model.Peer(pod_selector=peer.pod_selector,
                           namespace_selector=peer.namespace_selector)]
    if peer.kind == NETWORKS:
        return [model.Peer(ip_block=model.IPBlock(cidr)) for cidr in peer.networks]
    return []


def _as_rule(rule: CnpRule) -> tuple[model.Rule, bool] | None:
    """The NetworkPolicy rule that matches what a tier's rule matches, less named
    ports; and whether it has named ports. None: the rule matches nothing.

    A peer stockade cannot read fails closed: dropped from an Accept, and for a
    Deny or a Pass a rule of every peer.
    """
    peers: list[model.Peer] = []
    for p in rule.peers:
        if p.kind in (NAMESPACES, PODS, NETWORKS):
            peers.extend(as_peers(p))
        elif rule.action != ACCEPT:
            peers = []
            break
    else:
        if not peers:
            return None
    numeric: list[model.PolicyPort] = []
    named = False
    for port in rule.ports or ():
        if port.name:
            named = True
        else:
            numeric.append(model.PolicyPort(port.protocol, port.start,
                                            port.end if port.end > port.start else None))
    if rule.ports is not None and not numeric and not named:
        return None
    return model.Rule(ports=tuple(numeric), peers=tuple(peers)), named


def lower_tier_rule(direction: str, policy: ClusterNetworkPolicy, index: int, rule: CnpRule,
                    need: Need) -> list[ChainRule]:
    converted = _as_rule(rule)
    if converted is None:
        return []
    np_rule, named = converted
    holder = model.NetworkPolicy(namespace="", name=f"{policy.tier}/{policy.name}")
    action = ACTION[rule.action]
    out: list[ChainRule] = []
    if np_rule.ports or rule.ports is None:
        out += lower_rules(direction, holder, index, np_rule, need)
    if named:
        names = [p.name for p in rule.ports or () if p.name]
        tag = f"{holder.name} {direction.lower()}[{index}]"
        for name in dict.fromkeys(names):
            out += named_rule_specs(direction, np_rule, name, tag, need)
    keep = action == DENY and model.keeps_connections(policy)
    return [ChainRule(r.family, r.peer_set, r.named_set, r.protocol, r.ports, r.comment,
                      action, keep) for r in out]


def subject_key(subject: CnpPeer) -> str:
    """A subject as text: two subjects with the same text select the same pods."""
    return (f"{subject.kind}|{subject.namespace_selector.render()}|"
            f"{subject.pod_selector.render()}|{','.join(subject.networks)}")


def selection(policies: Sequence[ClusterNetworkPolicy]) -> tuple[str, ...]:
    """What names a tier's chain: the distinct subjects of the policies selecting its
    endpoints, not their rules or their order.

    The policies of a tier selecting a pod are exactly those whose subject is among
    these (a subject selects a pod or not, whichever policy holds it), so within one
    ruleset the subjects tell the chains apart as well as the rules would. Unlike the
    rules they survive a priority change, an edited rule, or a policy renamed or added
    beside another of the same subject: the chain keeps its name and only its rules
    are replaced, and no endpoint's map entry (nor the link chains before it) moves.
    """
    return tuple(sorted({subject_key(p.subject) for p in policies}))


def lower_tier_chain(direction: str, tier: str, policies: Sequence[ClusterNetworkPolicy],
                     next_chain: str | None, need: Need) -> Chain:
    """One tier's chain for endpoints those policies (in precedence order) select,
    named by their `selection` (so its rules may change under the same name)."""
    rules: list[ChainRule] = []
    for policy in policies:
        for i, rule in enumerate(policy.rules(direction)):
            rules += lower_tier_rule(direction, policy, i, rule, need)
    ir_dir = DIRECTION[direction]
    name = content_name(f"{tier[0].lower()}{ir_dir[0]}-", ir_dir, tier, selection(policies),
                        next_chain)
    return Chain(name, ir_dir, tuple(rules), ", ".join(p.name for p in policies),
                 tier=tier, next=next_chain)


def link_chain(admin: Chain, next_chain: str | None) -> Chain:
    """The chain that calls a shared Admin chain and then goes on in `next_chain`."""
    name = content_name(f"l{admin.direction[0]}-", admin.name, next_chain)
    return Chain(name, admin.direction, (), admin.comment, tier=admin.tier,
                 next=next_chain, calls=admin.name)
