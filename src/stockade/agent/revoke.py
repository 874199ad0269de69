"""Which established connections a policy change revokes (pure).

The forward chain accepts `ct state established,related` before any policy
chain (see `compile.nft`): that is what makes replies work, but it also means
a connection opened while a policy allowed it outlives the policy. After a
change the agent lists the conntrack table (`datapath.conntrack`), asks this
module which entries the new cluster state would no longer admit as new
connections, and deletes those entries. The listing must come after the new
ruleset is in the kernel: a connection opened later was judged by it already.

A policy may opt out: `stockade.io/existing-connections: keep` on a policy
that isolates the denying side keeps what that side would now deny (a rolling
change that should drain connections rather than cut them). When both sides
deny, both must opt out.

With ClusterNetworkPolicy tiers the side's deciding tier says who may opt out:
a side a tier decided (an Admin or Baseline Deny, or a Pass on to a
NetworkPolicy that denies) is kept only when the deciding policy is annotated
so: an Admin Deny is not kept because some NetworkPolicy of the pod asks to keep.

Only TCP, UDP and SCTP entries are candidates: NetworkPolicy says nothing of
ICMP, and an entry between two addresses that belong to no endpoint is
traffic no policy governs (the host's own, say).

Public API::

    CANDIDATES, FINISHED   (the annotation: model.policy.KEEP_ANNOTATION)
    flow_of(entry, evaluator) -> Flow | None
    keeping_policies(evaluator, keep_key=KEEP_ANNOTATION) -> frozenset[str]
    should_cut(verdict, keep) -> bool
    connections_to_cut(entries, evaluator, keep_key=KEEP_ANNOTATION) -> list[ConnEntry]
"""

from __future__ import annotations

from collections.abc import Iterable

from stockade.engine.evaluate import Evaluator, Flow, Side, Verdict
from stockade.model.cnp import ADMIN, BASELINE, ClusterNetworkPolicy
from stockade.model.connection import ConnEntry
from stockade.model.policy import KEEP_ANNOTATION, NetworkPolicy, keeps_connections

CANDIDATES = frozenset({"TCP", "UDP", "SCTP"})
# Nothing flows on these any more: deleting them would only cost a message.
FINISHED = frozenset({"TIME_WAIT", "CLOSE", "CLOSED"})


def flow_of(entry: ConnEntry, evaluator: Evaluator) -> Flow | None:
    """The flow the policy chains saw when the connection opened, or None if not a candidate.

    The destination is where replies come from (the reply tuple's source):
    with DNAT (a service address) that is the endpoint the forward hook saw,
    the original destination being only the service's address.
    """
    if entry.protocol not in CANDIDATES or entry.state in FINISHED:
        return None
    dst = entry.reply_src or entry.dst
    port = entry.reply_sport if entry.reply_src and entry.reply_sport else entry.dport
    if evaluator.endpoint_at(entry.src) is None and evaluator.endpoint_at(dst) is None:
        return None
    return evaluator.flow(entry.src, dst, port, entry.protocol)


def keeping_policies(evaluator: Evaluator, keep_key: str = KEEP_ANNOTATION) -> frozenset[str]:
    """Keys of the policies annotated `<keep_key>: keep`: NetworkPolicies' (`ns/name`)
    and ClusterNetworkPolicies' (their names, which have no slash)."""
    cluster = evaluator.cluster
    policies: tuple[NetworkPolicy | ClusterNetworkPolicy, ...] = (
        *cluster.policies, *cluster.cluster_policies)
    return frozenset(p.key for p in policies if keeps_connections(p, keep_key))


def _kept(side: Side, keep: frozenset[str]) -> bool:
    """Whether what denies a side asks to keep connections: the deciding tier policy,
    or with NetworkPolicy deciding, one of those isolating the side."""
    decided = side.decided_by
    if decided == ADMIN and side.admin is not None:
        return side.admin.policy in keep
    if decided == BASELINE and side.baseline is not None:
        return side.baseline.policy in keep
    return any(key in keep for key in side.isolating)


def should_cut(verdict: Verdict, keep: frozenset[str]) -> bool:
    """Denied by the new state, and not every denying side opted out."""
    if verdict.allowed:
        return False
    denying = [s for s in (verdict.egress, verdict.ingress) if not s.allowed]
    return not all(_kept(s, keep) for s in denying)


def connections_to_cut(entries: Iterable[ConnEntry], evaluator: Evaluator,
                       keep_key: str = KEEP_ANNOTATION) -> list[ConnEntry]:
    """The entries the new cluster state (the evaluator's) denies, less those kept.

    Verdicts are cached per flow: a busy server has many entries that differ
    only in the client's port.
    """
    keep = keeping_policies(evaluator, keep_key)
    cache: dict[tuple[str, str, int, str], bool] = {}
    out: list[ConnEntry] = []
    for entry in entries:
        flow = flow_of(entry, evaluator)
        if flow is None:
            continue
        key = (flow.src_ip, flow.dst_ip, flow.port, flow.protocol)
        cut = cache.get(key)
        if cut is None:
            cut = cache[key] = should_cut(evaluator.verdict(flow), keep)
        if cut:
            out.append(entry)
    return out
