"""The agent's last gate: no change reaches the store unless every object in it is valid (pure).

Every path that changes the state (`apply`, `label`, `endpoint.add`, the CNI
plugin, `stockade run`, snapshot restore) ends in `Service.commit`, and commit
calls `check_changes` first: the objects are checked with `model.admit` (the
same functions the files go through), a key given twice in one change and an
address held by two endpoints are refused naming both. So a path that forgets
to validate cannot let a bad object in, and one bad object never reaches the
kernel, where it would fail every transaction after it.

What was stored before these checks existed (or by hand) is found at start by
`quarantine`: such endpoints are enforced fail-closed (nothing in, nothing out)
instead of blocking the rest or being silently dropped, and `status` names them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from stockade.agent.records import (
    AgentState,
    Change,
    DeleteEndpoint,
    Deletion,
    PutEndpoint,
    PutNamespace,
    PutPolicy,
    change_key,
)
from stockade.engine.tiers import subject_selects
from stockade.model.admit import (
    Conflict,
    address_conflicts,
    canonical_ip,
    claim_name,
    claims,
    validate_endpoint,
    validate_namespace,
)
from stockade.model.cidr import parse_ip
from stockade.model.cluster import NS_NAME_LABEL, Cluster, Endpoint, Namespace
from stockade.model.cnp import (
    ADMIN,
    CNP_API,
    CNP_KIND,
    DENY,
    PODS,
    UNKNOWN,
    ClusterNetworkPolicy,
    CnpPeer,
    CnpRule,
)
from stockade.model.labels import Labels
from stockade.model.policy import NetworkPolicy
from stockade.model.selector import ALL, Selector
from stockade.model.validate import validate_policy

QUARANTINE_LABEL = "stockade.io/quarantined"
# Not a valid object name (the colon), so no policy of a user can ever share its key.
QUARANTINE_POLICY = "stockade:quarantine"


def check_changes(state: AgentState, changes: Sequence[Change], *,
                  strict_cidr: bool = False, validated: bool = False) -> list[str]:
    """Every reason to refuse `changes` against `state`, one line each (empty: admit).

    `validated`: the caller validated each object with `admit_objects` (and the
    same `strict_cidr`), so only what depends on the batch as a whole and on the
    state is checked here (a full load spends ~75 ms validating 11,000 objects).
    """
    lines: list[str] = []
    seen: dict[tuple[str, str], int] = {}
    for n, change in enumerate(changes):
        if not isinstance(change, Deletion):  # deleting twice asks for nothing more
            kind, key = change_key(change)
            if (kind, key) in seen:
                lines.append(f"{kind} {key} is given twice in one change "
                             f"(items {seen[(kind, key)] + 1} and {n + 1})")
            seen.setdefault((kind, key), n)
        if validated:
            continue
        if isinstance(change, PutEndpoint):
            ep = change.record.endpoint
            lines += [f"endpoint {ep.key}: {e.render()}" for e in validate_endpoint(ep)]
        elif isinstance(change, PutNamespace):
            ns = change.namespace
            lines += [f"namespace {ns.name}: {e.render()}" for e in validate_namespace(ns)]
        elif isinstance(change, PutPolicy):
            p = change.record.policy
            lines += [f"networkpolicy {p.key}: {e.render()}"
                      for e in validate_policy(p, strict_cidr=strict_cidr)]
    lines += [c.render() for c in _address_conflicts(state, changes)]
    return lines


def _address_conflicts(state: AgentState, changes: Sequence[Change]) -> list[Conflict]:
    put = [c.record.endpoint for c in changes if isinstance(c, PutEndpoint)]
    if not put:
        return []
    leaving = {c.key for c in changes if isinstance(c, DeleteEndpoint)}
    leaving |= {ep.key for ep in put}
    return address_conflicts(put, state.addresses(), leaving)


# ---- what was stored before ---------------------------------------------------------------


def quarantine(state: AgentState, *, strict_cidr: bool = False) -> dict[str, list[str]]:
    """Endpoints that cannot be enforced as stored, with the reasons (key -> lines).

    An invalid endpoint, one sharing an address, every endpoint of a namespace
    whose object is invalid, every endpoint a stored invalid policy could select
    (its namespace's) and every endpoint the subject of a stored invalid
    ClusterNetworkPolicy selects (all of them if the subject cannot be read) are
    held fail-closed rather than dropped: dropping them would leave their traffic
    unrestricted.
    """
    out: dict[str, list[str]] = {}

    def hold(key: str, line: str) -> None:
        out.setdefault(key, []).append(line)

    by_ns: dict[str, list[str]] = {}
    for key, rec in state.endpoints.items():
        by_ns.setdefault(rec.endpoint.namespace, []).append(key)
        for e in validate_endpoint(rec.endpoint):
            hold(key, e.render())
    for ns in state.namespaces.values():
        for e in validate_namespace(ns):
            for key in by_ns.get(ns.name, []):
                hold(key, f"namespace {ns.name}: {e.render()}")
    for prec in state.policies.values():
        for e in validate_policy(prec.policy, strict_cidr=strict_cidr):
            for key in by_ns.get(prec.policy.namespace, []):
                hold(key, f"networkpolicy {prec.key}: {e.render()}")
    ns_labels = {ns.name: ns.labels for ns in state.namespaces.values()}
    for refused in state.refused_cluster_policies.values():
        for key, rec in state.endpoints.items():
            if refused.subject is None or subject_selects(refused.subject, rec.endpoint,
                                                          ns_labels):
                for line in refused.errors:
                    hold(key, line)
    holders: dict[str, list[str]] = {}
    for key, rec in state.endpoints.items():
        for claim in claims(rec.endpoint):
            holders.setdefault(claim, []).append(key)
    for claim, keys in holders.items():
        if len(keys) > 1:
            for key in keys:
                hold(key, f"{claim_name(claim)} is held by {', '.join(sorted(keys))}")
    return out


def enforceable(state: AgentState, held: Mapping[str, Sequence[str]]) -> Cluster:
    """The cluster to compile: held endpoints isolated both ways, nothing else changed.

    A held endpoint keeps only its valid addresses, loses its labels and ports
    (so no selector picks it as a peer by what may be wrong) and is selected by
    a synthetic deny-all policy of its namespace; invalid stored policies and
    namespaces are left out, the endpoints they could touch being held.
    """
    if not held:
        return state.cluster()
    bad_ns = {n.name for n in state.namespaces.values() if validate_namespace(n)}
    namespaces = [n for n in state.namespaces.values() if n.name not in bad_ns]
    namespaces += [Namespace(name, Labels({NS_NAME_LABEL: name}))
                   for name in sorted(bad_ns)]
    endpoints: list[Endpoint] = []
    quarantined_ns: set[str] = set()
    for key, rec in state.endpoints.items():
        if key not in held:
            endpoints.append(rec.endpoint)
            continue
        quarantined_ns.add(rec.endpoint.namespace)
        endpoints.append(held_endpoint(rec.endpoint))
    policies = [p.policy for p in state.policies.values()
                if not validate_policy(p.policy)]
    policies += [deny_all(ns) for ns in sorted(quarantined_ns)]
    return Cluster(tuple(namespaces), tuple(endpoints), tuple(policies),
                   with_quarantine_tier([r.policy for r in state.cluster_policies.values()],
                                        bool(quarantined_ns)))


def cluster_near(state: AgentState, addresses: Iterable[str]) -> Cluster | None:
    """What `enforceable` gives, with only the endpoints holding `addresses` (None: none).

    A verdict on a flow reads its two endpoints, the policies and the namespaces,
    nothing else: this cluster judges flows between those addresses as the whole
    one does, at the cost of the addresses, not of the cluster (the revoker's).
    With endpoints held fail-closed (rare) it is the whole cluster.
    """
    if state.quarantined:
        return enforceable(state, state.quarantined)
    index = state.addresses()
    keys = {k for a in addresses if (k := index.get(canonical_ip(a))) is not None}
    if not keys:
        return None
    return Cluster(tuple(state.namespaces.values()),
                   tuple(state.endpoints[k].endpoint for k in sorted(keys)),
                   tuple(r.policy for r in state.policies.values()),
                   tuple(r.policy for r in state.cluster_policies.values()))


def quarantine_tier() -> ClusterNetworkPolicy:
    """The Admin policy that holds quarantined endpoints closed before any other tier.

    A subject selecting a held endpoint's namespace (or every pod) still selects it,
    and an Admin Accept would open it above its deny-all NetworkPolicy: this policy
    comes first (priority -1, below what any object may have) and denies everything
    both ways (a peer of no known field: a Deny of every peer and address).
    """
    deny = (CnpRule(DENY, (CnpPeer(UNKNOWN),), name="quarantined"),)
    return ClusterNetworkPolicy(
        QUARANTINE_POLICY, ADMIN, -1,
        CnpPeer(PODS, namespace_selector=ALL,
                pod_selector=Selector(Labels({QUARANTINE_LABEL: "true"}))),
        ingress=deny, egress=deny)


def quarantine_tier_manifest() -> dict[str, object]:
    """What `get clusternetworkpolicies` shows of :func:`quarantine_tier` where a state
    holds it (the Kubernetes feed's): the same policy as a manifest (its priority, -1,
    is one no object may have; its peers, of no field, deny everything)."""
    rule = {"name": "quarantined", "action": "Deny"}
    return {"apiVersion": CNP_API, "kind": CNP_KIND,
            "metadata": {"name": QUARANTINE_POLICY},
            "spec": {"tier": ADMIN, "priority": -1,
                     "subject": {"pods": {"namespaceSelector": {}, "podSelector": {
                         "matchLabels": {QUARANTINE_LABEL: "true"}}}},
                     "ingress": [{**rule, "from": [{}]}], "egress": [{**rule, "to": [{}]}]}}


def with_quarantine_tier(policies: Sequence[ClusterNetworkPolicy],
                         held: bool) -> tuple[ClusterNetworkPolicy, ...]:
    """The tiers to compile: with :func:`quarantine_tier` when endpoints are held and
    other tiers exist (without tiers, the deny-all NetworkPolicy suffices), unless the
    state holds it already (the Kubernetes feed stores it)."""
    if held and policies and all(p.name != QUARANTINE_POLICY for p in policies):
        return (*policies, quarantine_tier())
    return tuple(policies)


def held_endpoint(ep: Endpoint) -> Endpoint:
    """An endpoint held fail-closed: its valid addresses (one per family), no labels but
    the quarantine label, no ports; :func:`deny_all` of its namespace selects it."""
    ips = _one_per_family(canonical_ip(ip) for ip in ep.ips if parse_ip(ip) is not None)
    return replace(ep, labels=Labels({QUARANTINE_LABEL: "true"}), ips=ips, ports=())


def deny_all(namespace: str) -> NetworkPolicy:
    return NetworkPolicy(namespace, QUARANTINE_POLICY,
                         pod_selector=Selector(Labels({QUARANTINE_LABEL: "true"})),
                         policy_types=("Ingress", "Egress"))


def _one_per_family(ips: Iterable[str]) -> tuple[str, ...]:
    """At most one address per family. An address two endpoints share is kept: the
    deny-all chain it maps to is fail-closed whichever of them holds it."""
    out: dict[bool, str] = {}
    for ip in ips:
        out.setdefault(":" in ip, ip)
    return tuple(out.values())
