"""A ClusterNetworkPolicy's priority change rewrites the tier chains that hold it and
nothing else: the chains keep their names (their policies' subjects), so no endpoint's
map entry and no link chain moves, however many endpoints the policies select."""

from __future__ import annotations

from dataclasses import replace

from stockade.compile.incremental import IncrementalCompiler
from stockade.compile.lower import compile_cluster
from stockade.compile.plan import full_plan
from stockade.model.cluster import Cluster, Endpoint, Namespace
from stockade.model.cnp import (
    ADMIN,
    BASELINE,
    DENY,
    NAMESPACES,
    PODS,
    ClusterNetworkPolicy,
    CnpPeer,
    CnpPort,
    CnpRule,
)
from stockade.model.labels import Labels
from stockade.model.selector import ALL, Selector


def _cluster(endpoints: int, policies: int) -> Cluster:
    namespaces = tuple(Namespace(f"ns{i}", Labels({"kubernetes.io/metadata.name": f"ns{i}"}))
                       for i in range(5))
    eps = tuple(Endpoint(f"ns{i % 5}", f"pod{i}", Labels({"app": f"a{i % 7}"}),
                         (f"10.1.{i // 250}.{i % 250 + 1}",)) for i in range(endpoints))
    cnps = []
    for i in range(policies):
        nobody = CnpPeer(PODS, ALL, Selector(Labels({"app": f"nobody-{i}"})))
        cnps.append(ClusterNetworkPolicy(
            name=f"p{i:03}", tier=ADMIN if i % 2 else BASELINE, priority=i,
            subject=CnpPeer(NAMESPACES, ALL),
            ingress=(CnpRule(DENY, (nobody,), (CnpPort("TCP", 1000 + i, 1000 + i),), "r"),),
            egress=(CnpRule(DENY, (nobody,), None, "r"),)))
    return Cluster(namespaces, eps, (), tuple(cnps))


def _moved(c: Cluster) -> Cluster:
    """The last Admin policy becomes the first."""
    admins = [p for p in c.cluster_policies if p.tier == ADMIN]
    last = max(admins, key=ClusterNetworkPolicy.order)
    return replace(c, cluster_policies=tuple(
        replace(p, priority=-1) if p is last else p for p in c.cluster_policies))


def test_the_full_compilers_delta_is_the_admin_chains_only() -> None:
    c = _cluster(300, 20)
    before, after = compile_cluster(c), compile_cluster(_moved(c))
    delta = full_plan(before, after)
    assert before.ingress and before.egress  # every endpoint has an entry
    assert after.ingress == before.ingress and after.egress == before.egress
    assert not (delta.set_map or delta.del_map or delta.add_chains or delta.del_chains)
    assert {ch.name for ch in delta.replace_chains} == {
        n for n, ch in after.chains.items() if ch.tier == ADMIN and ch.calls is None}
    assert len(delta.replace_chains) == 2  # one per direction
    assert sum(delta.summary().values()) == 2


def test_the_delta_does_not_grow_with_the_endpoints() -> None:
    sizes = []
    for endpoints in (50, 500):
        c = _cluster(endpoints, 10)
        sizes.append(sum(full_plan(compile_cluster(c),
                                   compile_cluster(_moved(c))).summary().values()))
    assert sizes[0] == sizes[1] == 2


def test_the_incremental_compiler_rewrites_the_chains_in_place() -> None:
    c = _cluster(300, 20)
    inc = IncrementalCompiler.of(c)
    before = inc.ruleset()
    moved = _moved(c)
    changed = next(p for p in moved.cluster_policies if p.priority == -1)
    inc.upsert_cluster_policy(changed)
    after = inc.ruleset()
    assert after == compile_cluster(moved)
    assert after.ingress == before.ingress and after.egress == before.egress
    delta = full_plan(before, after)
    assert len(delta.replace_chains) == 2 and not delta.set_map


def test_a_new_policy_of_a_known_subject_keeps_the_names_too() -> None:
    """Added beside policies of the same subject, a policy changes what their chains
    hold, not which chain an endpoint enters."""
    c = _cluster(100, 4)
    extra = replace(c.cluster_policies[1], name="zz-new", priority=500)
    grown = replace(c, cluster_policies=(*c.cluster_policies, extra))
    before, after = compile_cluster(c), compile_cluster(grown)
    assert after.chains.keys() == before.chains.keys()
    assert after.ingress == before.ingress
