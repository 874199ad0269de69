"""ClusterNetworkPolicy from the Kubernetes API (`--datastore kubernetes`): watched like
NetworkPolicy, enforced through the same service and compiler (a kernel in memory),
an object stockade refuses held by its reach, a datapath without tiers holding them all,
and a server without the CRD meaning none (no root needed)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_kube_reflector import Fixture, MemoryDatapath, Script, ns, pod, status
from test_kube_reflector import listing as listing_of
from tests.support.cnp import CNP_CRD
from tests.support.kubeapi import KubeAPI

from stockade.agent.admission import QUARANTINE_LABEL, QUARANTINE_POLICY
from stockade.compile.interpret import allows
from stockade.compile.lower import compile_cluster
from stockade.compile.nft import canonical
from stockade.kube.client import CLUSTER_NETWORK_POLICIES, KubeClient
from stockade.kube.client import NAMESPACES as NAMESPACE_RESOURCE
from stockade.kube.live import policy_differences, policy_versions, read_cluster
from stockade.kube.reflector import NOT_SERVED, Reflector, ReflectorConfig
from stockade.model.labels import Labels
from stockade.model.parse import decode_objects


class TieredMemory(MemoryDatapath):
    enforces_tiers = True


@pytest.fixture
def fx(tmp_path: Path) -> Iterator[Fixture]:
    f = Fixture(tmp_path)
    f.datapath.__class__ = TieredMemory  # the kernel in memory enforces tiers (as nft)
    f.feed.bind(f.service)
    yield f
    f.store.close()


def cnp(name: str, priority: int, action: str, rv: str = "1", *,
        subject: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """As the API lists it: without kind and apiVersion, with a status."""
    return {"metadata": {"name": name, "resourceVersion": rv},
            "spec": {"tier": "Admin", "priority": priority,
                     "subject": subject or {"namespaces": {"matchLabels": {"team": "db"}}},
                     "ingress": [{"name": "r", "action": action,
                                  "from": [{"namespaces": {}}]}], **extra},
            "status": {"conditions": []}}


PODS = [pod("web", "2", ip="10.0.0.1", labels={"app": "web"}),
        {**pod("db", "3", ip="10.0.0.2", labels={"app": "db"}),
         "metadata": {"name": "db", "namespace": "db", "labels": {"app": "db"},
                      "resourceVersion": "3"}}]
NAMESPACES = [ns("ns", team="web"), ns("db", team="db")]


def allowed(fx: Fixture, src: str = "10.0.0.1", dst: str = "10.0.0.2") -> bool:
    kernel = fx.enforce()
    assert kernel == canonical(compile_cluster(fx.service.state.cluster()))
    return allows(kernel, src, dst, "TCP", 80)


def test_listed_changed_and_deleted_like_networkpolicies(fx: Fixture) -> None:
    fx.lists(NAMESPACES, [], PODS, [cnp("deny-db", 10, "Deny")])
    st = fx.service.state
    assert list(st.cluster_policies) == ["deny-db"]
    assert st.cluster_policies["deny-db"].manifest["kind"] == "ClusterNetworkPolicy"
    assert not allowed(fx)
    fx.feed.event(CLUSTER_NETWORK_POLICIES, "ADDED", cnp("accept-db", 5, "Accept", "4"))
    assert allowed(fx)
    fx.feed.event(CLUSTER_NETWORK_POLICIES, "MODIFIED", cnp("accept-db", 50, "Accept", "5"))
    assert not allowed(fx)  # the priority change flips the verdict
    fx.feed.event(CLUSTER_NETWORK_POLICIES, "DELETED", cnp("deny-db", 10, "Deny", "6"))
    assert allowed(fx)
    assert fx.feed.status()["datastore"]["counts"]["clusterPolicies"] == 1
    # A relist of the same objects commits nothing.
    fx.commits.clear()
    fx.feed.replace(CLUSTER_NETWORK_POLICIES, [cnp("accept-db", 50, "Accept", "5")])
    assert fx.commits == []
    fx.feed.replace(CLUSTER_NETWORK_POLICIES, [])  # deleted while the watch was down
    assert fx.service.state.cluster_policies == {}


def test_a_refused_one_holds_the_endpoints_its_subject_selects(fx: Fixture) -> None:
    """A field stockade does not know (an API server with a newer CRD would take it):
    the subject's endpoints are held fail-closed, the others untouched, and an Admin
    Accept of another policy does not reopen them; fixed, they are released."""
    bad = cnp("bad", 1, "Deny", sideways=True)
    accept_all = cnp("accept-all", 0, "Accept", subject={"namespaces": {}})
    fx.lists(NAMESPACES, [], PODS, [bad, accept_all])
    st = fx.service.state
    assert "bad" not in st.cluster_policies and "accept-all" in st.cluster_policies
    assert "db/db" in st.quarantined and "ns/web" not in st.quarantined
    assert st.endpoints["db/db"].endpoint.labels == Labels({QUARANTINE_LABEL: "true"})
    assert QUARANTINE_POLICY in st.cluster_policies
    assert fx.feed.status()["datastore"]["invalid"]["clusternetworkpolicy/bad"]
    assert not allowed(fx) and not allowed(fx, "10.0.0.2", "10.0.0.1")
    assert allowed(fx, "10.0.0.1", "192.0.2.1")  # web is not held
    fx.feed.event(CLUSTER_NETWORK_POLICIES, "MODIFIED", cnp("bad", 1, "Deny", "9"))
    assert "db/db" not in st.quarantined and QUARANTINE_POLICY not in st.cluster_policies
    assert st.endpoints["db/db"].endpoint.labels == Labels({"app": "db"})
    assert allowed(fx)  # accept-all (priority 0) decides before bad's Deny (1)
    fx.feed.event(CLUSTER_NETWORK_POLICIES, "DELETED", accept_all)
    assert not allowed(fx)


def test_a_subject_that_cannot_be_read_holds_every_endpoint(fx: Fixture) -> None:
    bad = cnp("bad", 1, "Deny", subject={"nodes": {}})
    fx.lists(NAMESPACES, [], PODS, [bad])
    assert set(fx.service.state.quarantined) == {"db/db", "ns/web"}
    fx.feed.event(CLUSTER_NETWORK_POLICIES, "DELETED", bad)
    assert fx.service.state.quarantined == {}


def test_a_namespace_relabel_moves_the_hold(fx: Fixture) -> None:
    fx.lists(NAMESPACES, [], PODS, [cnp("bad", 1, "Deny", sideways=True)])
    assert set(fx.service.state.quarantined) == {"db/db"}
    fx.feed.event(NAMESPACE_RESOURCE, "MODIFIED", ns("ns", team="db"))
    assert set(fx.service.state.quarantined) == {"db/db", "ns/web"}


def test_a_datapath_without_tiers_holds_what_they_select(tmp_path: Path) -> None:
    f = Fixture(tmp_path)  # a kernel in memory without tiers (as iptables, eBPF)
    try:
        f.lists(NAMESPACES, [], PODS, [cnp("deny-db", 10, "Deny")])
        st = f.service.state
        assert st.cluster_policies == {} and set(st.quarantined) == {"db/db"}
        assert any("does not enforce ClusterNetworkPolicy" in r
                   for r in st.quarantined["db/db"])
        f.enforce()  # the kernel takes it: no tier reaches the datapath
        assert not any(c.tier for c in f.datapath.kernel.chains.values())
    finally:
        f.store.close()


def test_without_the_crd_there_are_none_and_the_list_is_asked_again() -> None:
    """404 on the list: an empty list delivered (the feed syncs), listed again after a
    backoff (no watch on a resource the server does not serve), then the CRD arrives."""
    script = Script(status(404, "NotFound"), status(404, "NotFound"),
                    listing_of([cnp("a", 1, "Deny")], "7"))
    client = KubeClient.for_transport(httpx.MockTransport(script))
    calls: list[tuple[str, Any]] = []
    sleeps: list[float] = []

    class Sink:
        def replace(self, items: list[dict[str, Any]], rv: str) -> None:
            calls.append(("replace", [i["metadata"]["name"] for i in items]))

        def event(self, type: str, obj: dict[str, Any]) -> None:
            calls.append((type, obj["metadata"]["name"]))

    def sleep(seconds: float) -> bool:
        sleeps.append(seconds)
        return False

    r = Reflector(client, CLUSTER_NETWORK_POLICIES, Sink(),
                  config=ReflectorConfig(rng=lambda: 0.5, min_watch=0.0), sleep=sleep)
    script.reflector = r
    r.run()
    assert calls == [("replace", []), ("replace", ["a"])]  # the second 404 is no news
    assert r.status.errors == 0 and r.status.lists == 2 and r.synced.is_set()
    assert len(sleeps) >= 2
    assert all("watch" not in dict(q.url.params) for q in script.requests[:3])
    assert r.status.last_error == NOT_SERVED  # what status showed while not served


def test_the_quarantine_tier_shows_as_a_manifest(fx: Fixture) -> None:
    fx.lists(NAMESPACES, [], PODS, [cnp("bad", 1, "Deny", sideways=True),
                                   cnp("ok", 2, "Deny")])
    items = fx.service.handle("get", {"kind": "clusternetworkpolicies"})["items"]
    assert [i["metadata"]["name"] for i in items] == ["ok", QUARANTINE_POLICY]
    assert items[1]["spec"]["tier"] == "Admin" and items[1]["spec"]["priority"] == -1


def test_against_the_api_double_without_then_with_the_crd(tmp_path: Path) -> None:
    """The double answers a list of a resource it does not serve as the API server does
    (404): the reflector delivers an empty list and keeps asking; once the CRD is
    created, the objects are listed and then watched."""

    delivered: list[list[str]] = []
    events: list[tuple[str, str]] = []
    got = threading.Event()

    class Sink:
        def replace(self, items: list[dict[str, Any]], rv: str) -> None:
            delivered.append([i["metadata"]["name"] for i in items])
            got.set()

        def event(self, type: str, obj: dict[str, Any]) -> None:
            events.append((type, obj["metadata"]["name"]))
            got.set()

    def wait(pred: Any) -> None:
        deadline = time.monotonic() + 10
        while not pred():
            assert time.monotonic() < deadline, (delivered, events)
            got.wait(0.05)
            got.clear()

    with KubeAPI() as api:
        client = KubeClient.connect(str(api.write_kubeconfig(tmp_path / "kubeconfig")))
        r = Reflector(client, CLUSTER_NETWORK_POLICIES, Sink(), config=ReflectorConfig(
            backoff_base=0.05, backoff_cap=0.2, min_watch=0.0))
        r.start()
        try:
            # synced is set after the sink's replace returns: wait for both
            wait(lambda: delivered == [[]] and r.synced.is_set())
            assert r.status.last_error == NOT_SERVED
            api.create(CNP_CRD)
            api.create({"apiVersion": "policy.networking.k8s.io/v1alpha2",
                        "kind": "ClusterNetworkPolicy", **cnp("a", 1, "Deny")})
            wait(lambda: delivered[-1] == ["a"])
            api.create({"apiVersion": "policy.networking.k8s.io/v1alpha2",
                        "kind": "ClusterNetworkPolicy", **cnp("b", 2, "Deny")})
            wait(lambda: ("ADDED", "b") in events)
            assert r.status.errors == 0
        finally:
            r.stop(timeout=1)
            client.close()


def test_kubectl_stockade_reads_them_from_a_live_cluster(tmp_path: Path) -> None:
    """`kubectl stockade`'s reading of a cluster (kube/live.py): every
    ClusterNetworkPolicy, whatever the namespace read; none without the CRD."""

    with KubeAPI() as api:
        client = KubeClient.connect(str(api.write_kubeconfig(tmp_path / "kubeconfig")))
        try:
            assert read_cluster(client, "default").cluster_policies == []
            api.create(CNP_CRD)
            api.create({"apiVersion": "policy.networking.k8s.io/v1alpha2",
                        "kind": "ClusterNetworkPolicy", **cnp("a", 1, "Deny")})
            found = read_cluster(client, "default")
            objects, errors = decode_objects(found.documents(), "cluster")
            assert errors == [] and [p.name for p in objects.cluster_policies] == ["a"]
        finally:
            client.close()


def test_the_cni_plugin_hears_why_a_pod_is_held(fx: Fixture) -> None:
    fx.lists(NAMESPACES, [], PODS, [cnp("bad", 1, "Deny", sideways=True)])
    assert fx.feed.hold_reasons("db/db") and not fx.feed.hold_reasons("ns/web")


def test_the_versions_the_kernel_enforces_name_them_too(fx: Fixture) -> None:
    """What `kubectl stockade status` compares: a ClusterNetworkPolicy by its name."""
    fx.lists(NAMESPACES, [], PODS, [cnp("deny-db", 10, "Deny", "4")])
    fx.enforce()
    versions = fx.feed.policy_versions(fx.reconciler.applied_revision)
    assert versions == {"deny-db": "4"}
    assert policy_differences(policy_versions([cnp("deny-db", 10, "Deny", "5")]),
                              versions) == [
        "ClusterNetworkPolicy deny-db: enforces resourceVersion 4, the cluster has 5"]
    fx.feed.event(CLUSTER_NETWORK_POLICIES, "DELETED", cnp("deny-db", 10, "Deny", "6"))
    fx.enforce()
    assert fx.feed.policy_versions(fx.reconciler.applied_revision) == {}
