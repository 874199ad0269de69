"""The fast reading of the usual Pod gives what the field-by-field reading gives."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from stockade.errors import DecodeError
from stockade.model.decode import decode_network_policy, decode_pod, decode_pod_reference

Doc = dict[str, Any]


def _pod() -> Doc:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-0", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"containers": [
                {"name": "main", "ports": [{"name": "http", "containerPort": 8080,
                                            "protocol": "TCP"},
                                           {"containerPort": 9090}]},
                {"name": "side", "ports": [{"name": "dns", "containerPort": 53,
                                            "protocol": "UDP"}]}]},
            "status": {"podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}]}}


def _set(*path: Any, value: Any) -> Callable[[Doc], None]:
    def change(doc: Doc) -> None:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


def _drop(*path: Any) -> Callable[[Doc], None]:
    def change(doc: Doc) -> None:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return change


CHANGES: dict[str, Callable[[Doc], None]] = {
    "as is": lambda doc: None,
    "no podIPs": _drop("status", "podIPs"),
    "podIPs differ": _set("status", "podIPs", value=[{"ip": "10.0.0.6"}]),
    "dual stack": _set("status", "podIPs", value=[{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]),
    "podIPs not a list": _set("status", "podIPs", value={"ip": "10.0.0.5"}),
    "no podIP": _drop("status", "podIP"),
    "IPv6": _set("status", "podIP", value="fd00::5"),
    "leading zero": _set("status", "podIP", value="10.0.0.05"),
    "not an address": _set("status", "podIP", value="pod"),
    "podIP a number": _set("status", "podIP", value=5),
    "no namespace": _drop("metadata", "namespace"),
    "empty namespace": _set("metadata", "namespace", value=""),
    "no name": _drop("metadata", "name"),
    "name a number": _set("metadata", "name", value=7),
    "no labels": _drop("metadata", "labels"),
    "null labels": _set("metadata", "labels", value=None),
    "label a number": _set("metadata", "labels", value={"app": 1}),
    "labels a list": _set("metadata", "labels", value=["app"]),
    "no status": _drop("status"),
    "no spec": _drop("spec"),
    "no containers": _set("spec", "containers", value=None),
    "containers an object": _set("spec", "containers", value={}),
    "container a string": _set("spec", "containers", value=["main"]),
    "ports null": _set("spec", "containers", 0, "ports", value=None),
    "ports an object": _set("spec", "containers", 0, "ports", value={}),
    "port true": _set("spec", "containers", 0, "ports", 1, "containerPort", value=True),
    "port a float": _set("spec", "containers", 0, "ports", 1, "containerPort", value=9090.0),
    "port a string": _set("spec", "containers", 0, "ports", 1, "containerPort", value="x"),
    "port too large": _set("spec", "containers", 0, "ports", 1, "containerPort", value=2**40),
    "protocol a number": _set("spec", "containers", 1, "ports", 0, "protocol", value=17),
    "name null": _set("spec", "containers", 0, "ports", 0, "name", value=None),
    "ports moved": _set("spec", "containers", value=[{"name": "main"}, {
        "name": "side", "ports": [{"name": "http", "containerPort": 8080}]}]),
    "apiVersion": _set("apiVersion", value="v2"),
    "kind": _set("kind", value="Service"),
}


@pytest.mark.parametrize("change", list(CHANGES), ids=list(CHANGES))
@pytest.mark.parametrize("require_ip", [True, False])
def test_fast_reading_is_the_reference(change: str, require_ip: bool) -> None:
    doc = _pod()
    CHANGES[change](doc)

    def read(decode: Callable[..., Any]) -> Any:
        try:
            ep = decode(copy.deepcopy(doc), require_ip=require_ip)
        except DecodeError as exc:
            return str(exc)
        return ep, [p.path for p in ep.ports]

    assert read(decode_pod) == read(decode_pod_reference)


def test_replicas_share_their_ports() -> None:
    a, b = decode_pod(_pod()), decode_pod(_pod())
    assert a.ports is b.ports
    # The same declaration in another container is another port (its path differs).
    http = {"name": "http", "containerPort": 8080, "protocol": "TCP"}
    first, second = _pod(), _pod()
    first["spec"]["containers"] = [{"name": "main", "ports": [http]}]
    second["spec"]["containers"] = [{"name": "main"}, {"name": "side", "ports": [http]}]
    assert [p.path for p in decode_pod(first).ports] == ["spec.containers[0].ports[0]"]
    assert [p.path for p in decode_pod(second).ports] == ["spec.containers[1].ports[0]"]


@pytest.mark.parametrize("value", ["deep", "long"])
def test_a_spec_without_a_key_is_decoded_field_by_field(value: str) -> None:
    # Equal specs are found by their repr, which some values refuse: nested too
    # deeply, or an integer too long to print. Such a spec is decoded as any other
    # (here its unknown field is the error), never a crash.
    odd: Any = 10**5000
    if value == "deep":
        odd = []
        for _ in range(100_000):
            odd = [odd]
    doc = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "a", "namespace": "b"},
           "spec": {"podSelector": {}, "extra": odd}}
    with pytest.raises(DecodeError, match="unknown field"):
        decode_network_policy(doc)
