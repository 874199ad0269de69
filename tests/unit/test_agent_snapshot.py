"""Snapshots: round trip through JSON, minimal restore diffs, strict parsing, store glue."""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stockade.agent.records import (
    AgentState,
    Change,
    DeleteEndpoint,
    DeleteNamespace,
    DeletePolicy,
    EndpointRecord,
    PolicyRecord,
    PutEndpoint,
    PutNamespace,
    PutPolicy,
)
from stockade.agent.snapshot import (
    KIND,
    VERSION,
    changes_to_restore,
    parse_snapshot,
    snapshot_of,
)
from stockade.agent.store import Store, restore_snapshot, save_snapshot
from stockade.errors import DecodeError, InputError, ValidationError
from stockade.model.cluster import ContainerPort, Endpoint, Namespace
from stockade.model.labels import Labels
from stockade.net.ipam import Ipam


def endpoint(name: str, ns: str = "default", ip: str = "10.244.0.2", **labels: str,
             ) -> EndpointRecord:
    return EndpointRecord(Endpoint(ns, name, Labels(labels or {"app": name}), (ip, "fd00::2"),
                                   (ContainerPort(80, "TCP", "http"),
                                    ContainerPort(53, "UDP")), port="stk0"),
                          netns=f"/proc/1/ns/{name}", interface="eth0",
                          owner="cni", container_id="abc", pid=7, command=("sh", "-c", "x"),
                          created=1700000000.25)


def manifest(name: str, ns: str = "default", app: str = "web") -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns, "labels": {"team": "a"}},
            "spec": {"podSelector": {"matchLabels": {"app": app}},
                     "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
                                  "ports": [{"port": 80}]}]}}


def namespace(name: str, **labels: str) -> Namespace:
    return Namespace(name, Labels(labels or {"kubernetes.io/metadata.name": name}))


def sample_state() -> AgentState:
    state = AgentState()
    state.apply([PutNamespace(namespace("default")), PutNamespace(namespace("prod", env="p")),
                 PutEndpoint(endpoint("web")), PutEndpoint(endpoint("db", ns="prod")),
                 PutPolicy(PolicyRecord.from_dict(manifest("allow-web"))),
                 PutPolicy(PolicyRecord.from_dict(manifest("deny", ns="prod")))])
    return state


def sample_meta() -> dict[str, Any]:
    ipam = Ipam("10.244.0.0/16")
    ipam.allocate("default/web")
    return {"ipam": ipam.to_dict()}


def assert_same_state(a: AgentState, b: AgentState) -> None:
    assert a == b
    assert {k: r.to_dict() for k, r in a.policies.items()} == \
           {k: r.to_dict() for k, r in b.policies.items()}


def describe(c: Change) -> tuple[str, str]:
    if isinstance(c, PutNamespace):
        return "PutNamespace", c.namespace.name
    if isinstance(c, PutEndpoint | PutPolicy):
        return type(c).__name__, c.record.key
    return type(c).__name__, c.name if isinstance(c, DeleteNamespace) else c.key


# ---- round trip -------------------------------------------------------------------------


def test_round_trip_through_json_text() -> None:
    state, meta = sample_state(), sample_meta()
    snap = snapshot_of(state, 7, meta)
    assert (snap["kind"], snap["version"], snap["revision"]) == (KIND, VERSION, 7)
    back, back_meta = parse_snapshot(json.loads(json.dumps(snap)))
    assert_same_state(back, state)
    assert back_meta == meta
    assert Ipam.from_dict(back_meta["ipam"]).address_of("default/web") == "10.244.0.2/16"


def test_snapshot_is_sorted_and_does_not_alias_the_state() -> None:
    state = sample_state()
    snap = snapshot_of(state, 1, {})
    assert [e["name"] for e in snap["endpoints"]] == ["web", "db"]  # default/web < prod/db
    assert [n["name"] for n in snap["namespaces"]] == ["default", "prod"]
    assert snapshot_of(state, 1, {}) == snap
    snap["policies"][0]["metadata"]["name"] = "changed"
    assert state.policies["default/allow-web"].to_dict()["metadata"]["name"] == "allow-web"


def test_empty_state_round_trips() -> None:
    assert parse_snapshot(snapshot_of(AgentState(), 0, {})) == (AgentState(), {})


# ---- restore diffs --------------------------------------------------------------------------


def test_identical_states_need_no_change() -> None:
    assert changes_to_restore(sample_state(), sample_state()) == []


def test_restore_diff_is_minimal_and_ordered() -> None:
    current, target = sample_state(), sample_state()
    relabelled = endpoint("web", app="web", tier="front")
    target.apply([
        PutEndpoint(relabelled),  # different
        DeleteEndpoint("prod/db"), DeleteNamespace("prod"), DeletePolicy("prod/deny"),  # gone
        PutNamespace(namespace("new")), PutEndpoint(endpoint("cache", ns="new")),  # new
        PutPolicy(PolicyRecord.from_dict(manifest("allow-web", app="other"))),  # different
    ])
    assert changes_to_restore(current, target) == [
        DeletePolicy("prod/deny"), DeleteEndpoint("prod/db"), DeleteNamespace("prod"),
        PutNamespace(namespace("new")),
        PutEndpoint(relabelled), PutEndpoint(endpoint("cache", ns="new")),  # by key
        PutPolicy(PolicyRecord.from_dict(manifest("allow-web", app="other"))),
    ]


def test_a_manifest_only_difference_is_restored() -> None:
    """PolicyRecord equality ignores the manifest; the restore must not."""
    current, target = sample_state(), sample_state()
    doc = manifest("allow-web")
    doc["spec"]["policyTypes"] = ["Ingress"]  # the default: same policy, other manifest
    record = PolicyRecord.from_dict(doc)
    assert record == current.policies["default/allow-web"]
    target.apply([PutPolicy(record)])
    assert changes_to_restore(current, target) == [PutPolicy(record)]


def test_applying_the_diff_reaches_the_target() -> None:
    rng = random.Random(5)
    pool_eps = [endpoint(f"e{i}", ns=rng.choice(["a", "b"]), app=rng.choice("xyz"))
                for i in range(12)]
    pool_ns = [namespace(n, k=rng.choice("pq")) for n in ("a", "b", "c")]
    pool_pol = [PolicyRecord.from_dict(manifest(f"p{i}", ns=rng.choice("ab"), app=a))
                for i in range(6) for a in ("x", "y")]

    def random_state() -> AgentState:
        s = AgentState()
        s.apply([PutNamespace(n) for n in rng.sample(pool_ns, rng.randint(0, 3))])
        s.apply([PutEndpoint(e) for e in rng.sample(pool_eps, rng.randint(0, 12))])
        s.apply([PutPolicy(p) for p in rng.sample(pool_pol, rng.randint(0, 12))])
        return s

    for _ in range(100):
        current, target = random_state(), random_state()
        changes = changes_to_restore(current, target)
        current.apply(changes)
        assert_same_state(current, target)
        assert changes_to_restore(current, target) == []


# ---- rejection --------------------------------------------------------------------------

Mutate = Callable[[dict[str, Any]], Any]


def _set(path: str, value: Any) -> Mutate:
    def mutate(snap: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = snap
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        if value is _DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return mutate


_DELETE = object()


def _duplicate_endpoint(snap: dict[str, Any]) -> None:
    snap["endpoints"][1] = copy.deepcopy(snap["endpoints"][0])


REJECTED: list[tuple[str, Mutate, str]] = [
    ("not an object", lambda s: [s], r"^snapshot: must be an object, not list$"),
    ("kind", _set("kind", "Other"), r"kind: must be 'StockadeSnapshot', not 'Other'"),
    ("no kind", _set("kind", _DELETE), r"kind: must be 'StockadeSnapshot', not None"),
    ("version", _set("version", 2), r"version: snapshot format version 2 is not supported"),
    ("version type", _set("version", True), r"version: must be an integer, not bool"),
    ("no revision", _set("revision", _DELETE), r"revision: required field is missing"),
    ("negative revision", _set("revision", -1), r"revision: must be at least 0, not -1"),
    ("unknown field", _set("extra", 1), r"extra: unknown field"),
    ("missing list", _set("endpoints", _DELETE), r"endpoints: required field is missing"),
    ("list type", _set("policies", {}), r"policies: must be a list, not dict"),
    ("namespace name", _set("namespaces.0.name", ""), r"namespaces\[0\]\.name: must be a non-"),
    ("namespace field", _set("namespaces.0.uid", "x"), r"namespaces\[0\]\.uid: unknown field"),
    ("namespace labels", _set("namespaces.1.labels", {"env": 1}),
     r"namespaces\[1\]\.labels\.env: must be a string, not int"),
    ("duplicate namespace", _set("namespaces.1.name", "default"),
     r"default: namespaces\[1\]: duplicate 'default' \(also namespaces\[0\]\)"),
    ("endpoint ip", _set("endpoints.0.ips", ["10.0.0.300"]),
     r"default/web: endpoints\[0\]\.ips\[0\]: '10\.0\.0\.300' is not an IP address"),
    ("endpoint name slash", _set("endpoints.0.name", "a/b"),
     r"^snapshot: endpoints\[0\]\.name: must be a non-empty name without '/'"),
    ("endpoint missing name", _set("endpoints.0.name", _DELETE),
     r"^snapshot: endpoints\[0\]\.name: required field is missing"),
    ("endpoint port", _set("endpoints.0.ports.0.port", 70000),
     r"endpoints\[0\]\.ports\[0\]\.port: must be between 1 and 65535, not 70000"),
    ("endpoint protocol", _set("endpoints.0.ports.1.protocol", "ICMP"),
     r"endpoints\[0\]\.ports\[1\]\.protocol: must be one of TCP, UDP, SCTP, not 'ICMP'"),
    ("endpoint owner", _set("endpoints.1.owner", "me"),
     r"prod/db: endpoints\[1\]\.owner: must be one of api, run, cni, not 'me'"),
    ("endpoint pid", _set("endpoints.0.pid", "7"), r"endpoints\[0\]\.pid: must be an integer"),
    ("endpoint created", _set("endpoints.0.created", float("inf")),
     r"endpoints\[0\]\.created: must be a finite number"),
    ("endpoint command", _set("endpoints.0.command", ["sh", 1]),
     r"endpoints\[0\]\.command\[1\]: must be a string"),
    ("endpoint field", _set("endpoints.0.nodeName", "n"),
     r"endpoints\[0\]\.nodeName: unknown field"),
    ("duplicate endpoint", _duplicate_endpoint,
     r"default/web: endpoints\[1\]: duplicate 'default/web' \(also endpoints\[0\]\)"),
    ("policy decode", _set("policies.0.spec.ingres", []),
     r"snapshot: default/allow-web: policies\[0\]\.spec\.ingres: unknown field"),
    ("policy type", _set("policies.1.spec.ingress", "all"),
     r"prod/deny: policies\[1\]\.spec\.ingress"),
    ("policy kind", _set("policies.0.kind", "Pod"), r"policies\[0\]"),
    ("endpoint namespace", _set("endpoints.1.namespace", "gone"),
     r"gone/db: endpoints\[1\]: namespace 'gone' is not among the snapshot's namespaces"),
    ("renamed namespace", _set("namespaces.1.name", "renamed"),
     r"prod/db: endpoints\[1\]: namespace 'prod' is not"),
    ("meta type", _set("meta", []), r"meta: must be an object, not list"),
    ("meta key", _set("meta.other", 1), r"meta\.other: unknown meta key \(known: ipam\)"),
    ("meta reserved", _set("meta.revision", 1), r"meta\.revision: unknown meta key"),
    ("meta ipam", _set("meta.ipam.subnet", "10.0.0.0/33"), r"meta\.ipam: invalid subnet"),
]


@pytest.mark.parametrize(("mutate", "message"), [(m, msg) for _, m, msg in REJECTED],
                         ids=[name for name, _, _ in REJECTED])
def test_malformed_snapshots_are_rejected_naming_the_field(mutate: Mutate,
                                                           message: str) -> None:
    snap = json.loads(json.dumps(snapshot_of(sample_state(), 3, sample_meta())))
    data = mutate(snap)
    with pytest.raises(DecodeError, match=message) as info:
        parse_snapshot(snap if data is None else data)
    assert str(info.value).startswith("snapshot: ")


def test_a_policy_without_its_namespace_is_rejected() -> None:
    snap = snapshot_of(sample_state(), 3, {})
    del snap["endpoints"][1]
    del snap["namespaces"][1]
    with pytest.raises(DecodeError, match=r"prod/deny: policies\[1\]: namespace 'prod'"):
        parse_snapshot(snap)


def test_strict_cidr_is_the_agents_choice() -> None:
    snap = snapshot_of(sample_state(), 3, {})
    snap["policies"][0]["spec"]["ingress"][0]["from"][0]["ipBlock"]["cidr"] = "010.0.0.0/8"
    parse_snapshot(snap)
    with pytest.raises(ValidationError, match=r"policies\[0\] default/allow-web: .*cidr"):
        parse_snapshot(snap, strict_cidr=True)


def test_a_policy_the_api_would_refuse_is_rejected() -> None:
    snap = snapshot_of(sample_state(), 3, {})
    snap["policies"][0]["metadata"]["name"] = "Not_A_Name"
    with pytest.raises(ValidationError, match=r"snapshot: policies\[0\] default/Not_A_Name: "
                                              r"metadata\.name: Invalid value") as info:
        parse_snapshot(snap)
    assert isinstance(info.value, InputError)


# ---- store glue -----------------------------------------------------------------------------


def test_save_and_restore_through_the_store(tmp_path: Path) -> None:
    source, meta = sample_state(), sample_meta()
    with Store(tmp_path / "a") as a:
        a.commit(changes_to_restore(AgentState(), source), meta=meta)
        a.put_meta("private", {"not": "exported"})
        snap = save_snapshot(a)
    assert snap["revision"] == 2
    assert "private" not in snap["meta"]
    text = json.dumps(snap)

    with Store(tmp_path / "b") as b:
        b.commit([PutNamespace(namespace("old")), PutEndpoint(endpoint("old", ns="old")),
                  PutEndpoint(endpoint("web", app="stale"))])
        restored = restore_snapshot(b, json.loads(text))
        assert restored.revision == 2  # one transaction on top of b's revision 1
        assert [describe(c) for c in restored.changes] == [
            ("DeleteEndpoint", "old/old"), ("DeleteNamespace", "old"),
            ("PutNamespace", "default"), ("PutNamespace", "prod"),
            ("PutEndpoint", "default/web"), ("PutEndpoint", "prod/db"),
            ("PutPolicy", "default/allow-web"), ("PutPolicy", "prod/deny")]
        state, _ = b.load()
        assert_same_state(state, source)
        assert b.get_meta("ipam") == meta["ipam"]
        again = restore_snapshot(b, json.loads(text))  # nothing differs now
        assert (again.revision, again.changes, dict(again.meta)) == (2, (), {})
        assert b.revision() == 2


def test_restore_rejects_before_touching_the_store(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        s.commit([PutEndpoint(endpoint("web"))])
        bad = snapshot_of(sample_state(), 1, {})
        bad["endpoints"][0]["ips"] = ["nope"]
        with pytest.raises(InputError):
            restore_snapshot(s, bad)
        assert s.revision() == 1
