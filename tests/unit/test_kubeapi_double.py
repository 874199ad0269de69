"""The pure parts of the Kubernetes API test double (tests/support/kubeapi): selectors,
patches, field sets, the history behind consistent lists, watch filtering, protobuf."""

from __future__ import annotations

import base64
import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.support.kubeapi import ApiError
from tests.support.kubeapi import patch as P
from tests.support.kubeapi.protobuf import decode
from tests.support.kubeapi.resources import human_duration
from tests.support.kubeapi.selectors import parse_field_selector, parse_label_selector
from tests.support.kubeapi.store import Event, Store, WatchFilter

Obj = dict[str, Any]


def labelled(**labels: str) -> Obj:
    return {"metadata": {"labels": labels}}


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("app=web", {"app": "web"}, True),
        ("app==web", {"app": "web"}, True),
        ("app=web", {"app": "db"}, False),
        ("app!=web", {}, True),  # != matches objects without the label
        ("app!=web", {"app": "web"}, False),
        ("app in (web, db)", {"app": "db"}, True),
        ("app in (web,db)", {}, False),
        ("app notin (web,db)", {}, True),
        ("app notin (web,db)", {"app": "web"}, False),
        ("app", {"app": ""}, True),
        ("!app", {"app": ""}, False),
        ("!app", {"x": "y"}, True),
        ("app in (web,db),tier,!legacy", {"app": "web", "tier": "1"}, True),
        ("app in (web,db),tier,!legacy", {"app": "web", "tier": "1", "legacy": "y"}, False),
        ("example.com/role=a", {"example.com/role": "a"}, True),
        ("", {"x": "y"}, True),
    ],
)
def test_label_selectors(selector: str, labels: dict[str, str], expected: bool) -> None:
    pred = parse_label_selector(selector)
    assert (pred is None or pred(labelled(**labels))) is expected


@pytest.mark.parametrize("selector", ["app=we b", "a b c", "=x", "app in (a b)"])
def test_malformed_label_selectors_are_400(selector: str) -> None:
    with pytest.raises(ApiError) as e:
        parse_label_selector(selector)
    assert e.value.code == 400


def test_field_selectors() -> None:
    supported = frozenset({"metadata.name", "metadata.namespace", "spec.nodeName"})
    pred = parse_field_selector("spec.nodeName=n1,metadata.name!=a", supported)
    assert pred is not None
    assert pred({"metadata": {"name": "b"}, "spec": {"nodeName": "n1"}})
    assert not pred({"metadata": {"name": "a"}, "spec": {"nodeName": "n1"}})
    assert parse_field_selector("spec.nodeName=", supported)({"metadata": {}})  # type: ignore[misc]
    with pytest.raises(ApiError) as e:
        parse_field_selector("spec.bogus=1", supported)
    assert (e.value.code, e.value.message) == (400, "field label not supported: spec.bogus")


# --------------------------------------------------------------------------- patches


@pytest.mark.parametrize(
    ("target", "patch", "result"),
    [  # RFC 7386, appendix A
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
)
def test_merge_patch(target: Obj, patch: Obj, result: Obj) -> None:
    before = copy.deepcopy(target)
    assert P.merge_patch(target, patch) == result
    assert target == before


def test_json_patch() -> None:
    doc = {"a": {"b": [1, 2]}, "c": "x"}
    out = P.json_patch(
        doc,
        [
            {"op": "add", "path": "/a/b/1", "value": 9},
            {"op": "add", "path": "/a/b/-", "value": 3},
            {"op": "replace", "path": "/c", "value": "y"},
            {"op": "copy", "from": "/c", "path": "/d"},
            {"op": "move", "from": "/d", "path": "/e~1f"},
            {"op": "remove", "path": "/a/b/0"},
            {"op": "test", "path": "/e~1f", "value": "y"},
        ],
    )
    assert out == {"a": {"b": [9, 2, 3]}, "c": "y", "e/f": "y"}
    assert doc == {"a": {"b": [1, 2]}, "c": "x"}
    for bad in (
        [{"op": "test", "path": "/c", "value": "z"}],
        [{"op": "remove", "path": "/nope"}],
        [{"op": "replace", "path": "/nope", "value": 1}],
    ):
        with pytest.raises(ApiError) as e:
            P.json_patch(doc, bad)
        assert e.value.code == 422
    with pytest.raises(ApiError) as e:
        P.json_patch(doc, {"op": "add"})
    assert e.value.code == 400


def test_strategic_merge_patch() -> None:
    live = {
        "spec": {
            "containers": [
                {"name": "a", "image": "1", "env": [{"name": "X", "value": "1"}]},
                {"name": "b", "image": "1"},
            ],
            "tolerations": [{"key": "k"}],
        },
        "metadata": {"finalizers": ["f1"], "labels": {"x": "y"}},
    }
    patch = {
        "spec": {
            "$setElementOrder/containers": [{"name": "b"}, {"name": "a"}],
            "containers": [
                {"name": "a", "env": [{"name": "Y", "value": "2"}]},
                {"name": "b", "$patch": "delete"},
                {"name": "c", "image": "3"},
            ],
            "tolerations": [{"key": "other"}],
        },
        "metadata": {"finalizers": ["f2"], "labels": {"x": None}},
    }
    out = P.strategic_merge_patch(live, patch)
    assert out["spec"]["containers"] == [
        {
            "name": "a",
            "image": "1",
            "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}],
        },
        {"name": "c", "image": "3"},
    ]
    assert out["spec"]["tolerations"] == [{"key": "other"}]  # no merge key: replaced
    assert out["metadata"] == {"finalizers": ["f1", "f2"], "labels": {}}
    out = P.strategic_merge_patch(
        live,
        {
            "metadata": {"$deleteFromPrimitiveList/finalizers": ["f1"]},
            "spec": {"$patch": "replace", "x": 1},
        },
    )
    assert out["metadata"]["finalizers"] == [] and out["spec"] == {"x": 1}
    out = P.strategic_merge_patch(
        {"spec": {"a": 1, "b": 2}}, {"spec": {"$retainKeys": ["b"], "b": 3}}
    )
    assert out == {"spec": {"b": 3}}


# --------------------------------------------------------------------------- field sets


POD = {
    "metadata": {"name": "p", "labels": {"app": "web"}, "finalizers": ["x/y"]},
    "spec": {
        "containers": [
            {"name": "c", "image": "i", "ports": [{"containerPort": 80, "protocol": "TCP"}]}
        ],
        "nodeSelector": {},
        "tolerations": [{"key": "k"}],
    },
}


def test_fieldset_and_fields_v1() -> None:
    fields = P.fieldset(P.tracked(POD, ""))
    doc = P.render_fields_v1(fields)
    assert doc == {
        "f:metadata": {"f:finalizers": {'v:"x/y"': {}}, "f:labels": {"f:app": {}}},
        "f:spec": {
            "f:containers": {
                'k:{"name":"c"}': {
                    ".": {},
                    "f:image": {},
                    "f:name": {},
                    "f:ports": {
                        'k:{"containerPort":80,"protocol":"TCP"}': {
                            ".": {},
                            "f:containerPort": {},
                            "f:protocol": {},
                        }
                    },
                }
            },
            "f:nodeSelector": {},
            "f:tolerations": {},
        },
    }
    assert P.parse_fields_v1(doc) == fields
    path = ("f:spec", "f:containers", 'k:{"name":"c"}', "f:image")
    assert P.value_at(POD, path) == (True, "i")
    assert P.render_path(path) == '.spec.containers[name="c"].image'
    assert P.is_key_field(("f:spec", "f:containers", 'k:{"name":"c"}', "f:name"))
    assert not P.is_key_field(path)
    obj = copy.deepcopy(POD)
    P.remove_path(obj, ("f:spec", "f:containers", 'k:{"name":"c"}'))
    P.remove_path(obj, ("f:metadata", "f:finalizers", 'v:"x/y"'))
    assert obj["spec"]["containers"] == [] and obj["metadata"]["finalizers"] == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text("ab", max_size=2),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["a", "b", "containers", "name", "env"]), children, max_size=3
        )
    ),
    max_leaves=12,
)


@given(st.dictionaries(st.sampled_from(["a", "b", "spec", "data"]), json_values, max_size=4))
def test_fields_v1_round_trips(obj: Obj) -> None:
    fields = P.fieldset(obj)
    assert P.parse_fields_v1(P.render_fields_v1(fields)) == fields
    for path in fields:
        assert P.value_at(obj, path)[0]


@given(
    st.dictionaries(st.sampled_from(["a", "b"]), json_values, max_size=3),
    st.dictionaries(st.sampled_from(["a", "b"]), json_values, max_size=3),
)
def test_apply_merge_takes_every_applied_leaf(live: Obj, config: Obj) -> None:
    merged = P.apply_merge(copy.deepcopy(live), config)
    for path in P.leaves(P.fieldset(config)):
        value = P.value_at(config, path)
        if not path[-1].startswith(("k:", "v:")) and value[1] != {}:  # {} merges, as in SSA
            assert P.value_at(merged, path) == value


# --------------------------------------------------------------------------- history


ops = st.lists(
    st.tuples(
        st.sampled_from(["create", "update", "delete"]), st.sampled_from(["a", "b", "c", "d"])
    ),
    max_size=25,
)


@given(ops)
def test_state_at_any_resource_version_is_the_state_then(sequence: list[tuple[str, str]]) -> None:
    """What consistent pagination and resourceVersionMatch=Exact rest on."""
    store = Store()
    t = store.registry.resolve("configmaps")
    assert t is not None
    snapshots = {store.rv: {}}
    for op, name in sequence:
        try:
            if op == "create":
                store.create(
                    t, "default", {"metadata": {"name": name}, "data": {"n": "0"}}, manager="m"
                )
            elif op == "update":
                cur = store.get(t, "default", name)
                store.patch(
                    t,
                    "default",
                    name,
                    "merge",
                    {"data": {"n": str(int(cur["data"]["n"]) + 1)}},
                    manager="m",
                )
            else:
                store.delete(t, "default", name)
        except ApiError:
            continue
        snapshots[store.rv] = {k[1]: v["data"]["n"] for k, v in store.objects[t.storage].items()}
    for rv, want in snapshots.items():
        got = store.state_at(t.storage, rv)
        assert {k[1]: v["data"]["n"] for k, v in got.items()} == want


def test_watch_filter_turns_a_selection_change_into_added_and_deleted() -> None:
    flt = WatchFilter(("", "pods"), "default", parse_label_selector("app=web"))
    web = {"metadata": {"name": "p", "labels": {"app": "web"}, "resourceVersion": "1"}}
    db = {"metadata": {"name": "p", "labels": {"app": "db"}, "resourceVersion": "2"}}
    key = ("default", "p")
    left = flt.convert(Event(2, "MODIFIED", ("", "pods"), key, db, web))
    assert left is not None and left[0] == "DELETED"
    assert left[1]["metadata"] == {**web["metadata"], "resourceVersion": "2"}
    assert flt.convert(Event(3, "MODIFIED", ("", "pods"), key, web, db)) == ("ADDED", web)
    assert flt.convert(Event(3, "MODIFIED", ("", "pods"), key, web, web)) == ("MODIFIED", web)
    assert flt.convert(Event(3, "MODIFIED", ("", "pods"), key, db, db)) is None
    assert flt.convert(Event(3, "ADDED", ("", "configmaps"), key, web, None)) is None
    assert flt.convert(Event(3, "ADDED", ("", "pods"), ("other", "p"), web, None)) is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (119, "119s"),
        (150, "2m30s"),
        (600, "10m"),
        (3 * 3600 + 60, "3h1m"),
        (10 * 3600, "10h"),
        (3 * 86400 + 3600, "3d1h"),
        (30 * 86400, "30d"),
        (800 * 86400, "2y"),
    ],
)
def test_human_duration(seconds: int, text: str) -> None:
    assert human_duration(seconds) == text


# --------------------------------------------------------------------------- protobuf


def _field(number: int, payload: bytes) -> bytes:
    return bytes([(number << 3) | 2, len(payload)]) + payload


def _entry(key: bytes, value: bytes) -> bytes:
    return _field(1, key) + _field(2, value)


def test_protobuf_configmap() -> None:
    meta = _field(1, b"cfg") + _field(3, b"") + _field(11, _entry(b"app", b"web"))
    raw = _field(1, meta) + _field(2, _entry(b"a", b"1")) + _field(3, _entry(b"bin", b"\x00\x01"))
    body = b"k8s\x00" + _field(1, _field(1, b"v1") + _field(2, b"ConfigMap")) + _field(2, raw)
    assert decode(body) == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "cfg", "labels": {"app": "web"}},
        "data": {"a": "1"},
        "binaryData": {"bin": base64.b64encode(b"\x00\x01").decode()},
    }
    with pytest.raises(ApiError) as e:
        decode(
            b"k8s\x00"
            + _field(1, _field(1, b"v1") + _field(2, b"ConfigMap"))
            + _field(2, _field(9, b""))
        )
    assert e.value.code == 415 and "field 9 of ConfigMap" in e.value.message
    with pytest.raises(ApiError) as e:
        decode(b"k8s\x00" + _field(1, _field(1, b"v1") + _field(2, b"Endpoints")))
    assert e.value.code == 415


def test_history_limit_compacts_in_steps() -> None:
    store = Store(history_limit=100)
    t = store.registry.resolve("configmaps")
    assert t is not None
    store.create(t, "default", {"metadata": {"name": "c"}, "data": {"n": "0"}}, manager="m")
    for i in range(500):
        store.patch(t, "default", "c", "merge", {"data": {"n": str(i)}}, manager="m")
    assert 100 <= len(store.events) <= 110
    assert store.events[0].rv == store.compacted + 1
    with pytest.raises(ApiError) as e:
        store.events_after(store.compacted - 1)
    assert e.value.code == 410
    assert len(store.events_after(store.compacted)[0]) == len(store.events)
