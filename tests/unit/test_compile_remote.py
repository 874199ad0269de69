"""Pods of other nodes (``Endpoint.remote``): peers in the sets, no verdict chain here.

At 10,000 pods on many nodes, a node enforces its own pods' policies; the others'
addresses are only needed in the sets that selectors pick. The full and the
incremental compilers agree on that, whatever order the changes come in.
"""

from __future__ import annotations

from dataclasses import replace

from stockade.compile.incremental import IncrementalCompiler
from stockade.compile.interpret import allows
from stockade.compile.lower import compile_cluster
from stockade.model.cluster import Cluster, Endpoint, Namespace
from stockade.model.labels import Labels
from stockade.model.policy import NetworkPolicy, Peer, Rule
from stockade.model.selector import Selector

NS = Namespace("x", Labels({"kubernetes.io/metadata.name": "x"}))
DB = Endpoint("x", "db", Labels({"app": "db"}), ("10.0.0.1",))
WEB_LOCAL = Endpoint("x", "web1", Labels({"app": "web"}), ("10.0.0.2",))
WEB_REMOTE = Endpoint("x", "web2", Labels({"app": "web"}), ("10.0.1.2",), remote=True)
DB_REMOTE = Endpoint("x", "db2", Labels({"app": "db"}), ("10.0.1.1",), remote=True)
POLICY = NetworkPolicy(
    "x", "db", pod_selector=Selector(Labels({"app": "db"})),
    ingress=(Rule(peers=(Peer(pod_selector=Selector(Labels({"app": "web"}))),)),),
    policy_types=("Ingress",))


def _cluster(*eps: Endpoint) -> Cluster:
    return Cluster((NS,), eps, (POLICY,))


def test_remote_pods_are_in_peer_sets_but_not_in_the_maps() -> None:
    c = _cluster(DB, WEB_LOCAL, WEB_REMOTE, DB_REMOTE)
    rs = compile_cluster(c)
    assert set(rs.ingress) == {"10.0.0.1"}  # the local db only
    peers = [s for s in rs.sets.values() if "10.0.0.2" in s.elements]
    assert peers and all("10.0.1.2" in s.elements for s in peers)  # the remote web too
    assert IncrementalCompiler.of(c).ruleset() == rs


def test_incremental_agrees_in_any_order() -> None:
    c = _cluster(DB, WEB_LOCAL, WEB_REMOTE, DB_REMOTE)
    inc = IncrementalCompiler.of(Cluster((NS,), (), ()))
    inc.upsert_endpoint(WEB_REMOTE)
    inc.upsert_endpoint(DB_REMOTE)
    inc.upsert_policy(POLICY)
    inc.upsert_endpoint(DB)
    inc.upsert_endpoint(WEB_LOCAL)
    assert inc.ruleset() == compile_cluster(c)
    # A pod moving to this node gets its chain; moving away, loses it.
    inc.upsert_endpoint(replace(DB_REMOTE, remote=False))
    assert set(inc.ruleset().ingress) == {"10.0.0.1", "10.0.1.1"}
    inc.upsert_endpoint(DB_REMOTE)
    assert set(inc.ruleset().ingress) == {"10.0.0.1"}
    assert inc.ruleset() == compile_cluster(c)


def test_a_remote_only_policy_set_makes_no_chain() -> None:
    rs = compile_cluster(_cluster(DB_REMOTE, WEB_LOCAL))
    assert rs.chains == {} and rs.ingress == {}


def test_local_verdicts_are_unchanged_by_remote_peers() -> None:
    """What this node enforces for its own pods is the evaluator's verdict."""
    rs = compile_cluster(_cluster(DB, WEB_LOCAL, WEB_REMOTE))
    assert allows(rs, "10.0.1.2", "10.0.0.1", "TCP", 80)  # remote web -> local db
    assert not allows(rs, "10.0.0.9", "10.0.0.1", "TCP", 80)  # anyone else: denied
