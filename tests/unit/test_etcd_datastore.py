"""The etcd datastore's documents and writes (etcd/datastore.py): what the agent
writes reads back as the same objects through the Kubernetes feed's translation, and
a write compares every key's mod revision with what the agent knows, so a writer that
did not see another's change never clobbers it."""

from __future__ import annotations

import json

import pytest
from tests.support.etcd import EtcdServer

from stockade.agent.records import (
    DeleteNamespace,
    EndpointRecord,
    PolicyRecord,
    PutEndpoint,
    PutNamespace,
    PutPolicy,
)
from stockade.etcd.datastore import (
    Conflict,
    EtcdFeed,
    namespace_doc,
    normalize_prefix,
    pod_doc,
    policy_doc,
)
from stockade.etcd.watch import object_of
from stockade.kube.client import NAMESPACES, NETWORK_POLICIES, PODS
from stockade.kube.datastore import translate_namespace, translate_pod, translate_policy
from stockade.model.cluster import ContainerPort, Endpoint, Namespace
from stockade.model.decode import decode_network_policy
from stockade.model.labels import Labels
from stockade.model.policy import Source

POLICY = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
          "metadata": {"name": "web", "namespace": "x", "resourceVersion": "3"},
          "spec": {"podSelector": {"matchLabels": {"app": "a"}},
                   "ingress": [{"ports": [{"port": "http"}]}]}}


def endpoint(name: str = "a", **labels: str) -> EndpointRecord:
    ep = Endpoint("x", name, Labels(labels or {"app": name}), ("10.244.0.10", "fd00::a"),
                  (ContainerPort(80, "TCP", "http"), ContainerPort(53, "UDP")))
    return EndpointRecord(ep, node="n2")


def roundtrip(res, key, doc):  # type: ignore[no-untyped-def]
    """As the feed receives it: through etcd's bytes and watch.object_of."""
    from stockade.etcd.client import KeyValue

    return object_of(res, key, KeyValue("k", json.dumps(doc).encode(), 5), 5)


def test_documents_read_back_as_the_same_objects() -> None:
    rec = endpoint()
    view = translate_pod(roundtrip(PODS, "x/a", pod_doc(rec, "n1")))
    assert view.node == "n2" and not view.errors
    assert view.endpoint is not None
    assert (view.endpoint.labels, view.endpoint.ips, view.endpoint.ports) == (
        rec.endpoint.labels, rec.endpoint.ips, rec.endpoint.ports)
    assert translate_pod(roundtrip(PODS, "x/a", pod_doc(
        EndpointRecord(rec.endpoint), "n1"))).node == "n1"  # no node: the writer's
    ns = Namespace("x", Labels({"team": "t", "kubernetes.io/metadata.name": "x"}))
    assert translate_namespace(roundtrip(NAMESPACES, "x", namespace_doc(ns))) == (ns, [])
    prec = PolicyRecord(decode_network_policy(POLICY, Source("t")), POLICY)
    doc = policy_doc(prec)
    assert "resourceVersion" not in doc["metadata"]
    key, back, errors = translate_policy(roundtrip(NETWORK_POLICIES, "x/web", doc))
    assert (key, errors) == ("x/web", []) and back is not None
    assert back.policy == prec.policy


def test_prefixes() -> None:
    assert normalize_prefix("/stockade/") == "/stockade"
    assert normalize_prefix("stockade") == "/stockade"
    assert normalize_prefix("/") == ""


def test_a_write_compares_what_the_writer_knows(etcd: EtcdServer) -> None:
    with etcd.client() as c:
        one = EtcdFeed(c, "n1", prefix="/s")
        two = EtcdFeed(c, "n2", prefix="/s")
        ns = Namespace("x", Labels({}))
        rev, touched = one.write([PutNamespace(ns), PutEndpoint(endpoint())])
        assert touched == {"namespaces": rev, "pods": rev}
        kv = c.get("/s/pods/x/a")
        assert kv is not None and kv.mod_revision == rev
        assert json.loads(kv.value)["spec"]["nodeName"] == "n2"
        # `two` has not seen that write: its put of the same key must not clobber it.
        with pytest.raises(Conflict) as e:
            two.write([PutEndpoint(endpoint(app="other"))])
        assert e.value.current == {"/s/pods/x/a": rev}
        assert not two.fresh(e.value.current, e.value.revision)
        two.revs["/s/pods/x/a"] = rev  # what its watch would deliver
        assert two.fresh(e.value.current, e.value.revision)
        rev2, _ = two.write([PutEndpoint(endpoint(app="other"))])
        assert json.loads(c.get("/s/pods/x/a").value)["metadata"]["labels"] == {  # type: ignore[union-attr]
            "app": "other"}
        # A deletion compares too, and creating a key that exists is a conflict.
        with pytest.raises(Conflict):
            one.write([DeleteNamespace("x"), PutNamespace(Namespace("y", Labels({})))])
        assert c.get("/s/namespaces/y") is None  # nothing of a failed transaction
        one.revs["/s/namespaces/x"] = rev
        assert one.write([DeleteNamespace("x")])[0] > rev2
        assert c.get("/s/namespaces/x") is None


def test_a_large_change_is_written_in_transactions_etcd_accepts(etcd: EtcdServer) -> None:
    with etcd.client() as c:
        feed = EtcdFeed(c, "n1", prefix="/s")
        prec = PolicyRecord(decode_network_policy(POLICY, Source("t")), POLICY)
        changes = [PutPolicy(PolicyRecord(
            decode_network_policy({**POLICY, "metadata": {"name": f"p{i}", "namespace": "x"}},
                                  Source("t")), {**POLICY, "metadata": {
                                      "name": f"p{i}", "namespace": "x"}}))
            for i in range(300)]
        assert prec.key == "x/web"
        first, _ = feed.write([PutNamespace(Namespace("x", Labels({})))])
        last, touched = feed.write([PutNamespace(Namespace("z", Labels({}))), *changes])
        _, kvs = c.list_prefix("/s/networkpolicies/")
        assert len(kvs) == 300
        # The namespace went in the first of three transactions: its watch reaches that
        # revision, not the last one (what a write through the agent waits for).
        assert touched == {"namespaces": first + 1, "networkpolicies": last}
        assert last == first + 3
