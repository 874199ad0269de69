"""List-then-watch against a scripted API (httpx.MockTransport), and the feed that turns
what it delivers into the agent's state: paging, 410 and relist, bookmarks, dropped and
stalled streams, backoff, and a relist that commits only what differs."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from stockade.agent.admission import QUARANTINE_LABEL, QUARANTINE_POLICY
from stockade.agent.reconcile import Reconciler
from stockade.agent.records import (
    OWNER_CNI,
    OWNER_KUBE,
    Change,
    DeleteEndpoint,
    EndpointRecord,
    PutEndpoint,
    PutPolicy,
)
from stockade.agent.service import Service
from stockade.compile.incremental import IncrementalCompiler
from stockade.compile.ir import Chain, Ruleset
from stockade.compile.nft import canonical
from stockade.compile.plan import Plan, plan
from stockade.datapath.base import KernelSnapshot
from stockade.kube.client import (
    CLUSTER_NETWORK_POLICIES,
    NAMESPACES,
    NETWORK_POLICIES,
    PODS,
    KubeClient,
    without_managed_fields,
)
from stockade.kube.datastore import KubeCacheStore, KubeFeed, translate_pod
from stockade.kube.reflector import Backoff, Reflector, ReflectorConfig
from stockade.model.cluster import Endpoint
from stockade.model.labels import Labels

# ---- a scripted API ---------------------------------------------------------------------

Step = Callable[[httpx.Request], httpx.Response]


def lines(*events: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(e).encode() + b"\n" for e in events)


def listing(items: list[dict[str, Any]], rv: str, cont: str = "") -> Step:
    meta: dict[str, Any] = {"resourceVersion": rv}
    if cont:
        meta["continue"] = cont
    return lambda req: httpx.Response(200, json={"kind": "PodList", "metadata": meta,
                                                 "items": items})


def watching(*events: dict[str, Any]) -> Step:
    return lambda req: httpx.Response(200, content=lines(*events))


def status(code: int, reason: str = "Expired") -> Step:
    return lambda req: httpx.Response(code, json={"kind": "Status", "code": code,
                                                  "reason": reason, "message": "m"})


def pod(name: str, rv: str, ip: str = "", labels: dict[str, str] | None = None,
        **spec: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {"name": name, "namespace": "ns", "resourceVersion": rv,
                                        "labels": labels or {}},
                           "spec": {"nodeName": "n1", "containers": [], **spec},
                           "status": {"phase": "Running"}}
    if ip:
        obj["status"]["podIP"] = ip
    return obj


def ev(type_: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"type": type_, "object": obj}


def bookmark(rv: str) -> dict[str, Any]:
    return {"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
                                           "metadata": {"resourceVersion": rv}}}


class Recorder:
    """The sink: what was delivered, in order."""

    def __init__(self, fail_on: str = "") -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail_on = fail_on

    def replace(self, items: list[dict[str, Any]], resource_version: str) -> None:
        names = [i["metadata"]["name"] for i in items]
        self.calls.append(("replace", (names, resource_version)))

    def event(self, type: str, obj: dict[str, Any]) -> None:
        if obj["metadata"]["name"] == self.fail_on:
            self.fail_on = ""
            raise RuntimeError("sink bug")
        self.calls.append((type, obj["metadata"]["name"]))


class Script:
    """Answers requests with the next step; stops the reflector when they run out."""

    def __init__(self, *steps: Step) -> None:
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []
        self.reflector: Reflector | None = None

    def __call__(self, req: httpx.Request) -> httpx.Response:
        self.requests.append(req)
        if not self.steps:
            assert self.reflector is not None
            self.reflector._stop.set()
            return httpx.Response(200, content=b"")
        return self.steps.pop(0)(req)

    def params(self) -> list[dict[str, str]]:
        return [dict(r.url.params) for r in self.requests]


def run(script: Script, sink: Recorder | None = None,
        **cfg: Any) -> tuple[Reflector, Recorder, list[float]]:
    sink = sink or Recorder()
    sleeps: list[float] = []

    def sleep(seconds: float) -> bool:
        sleeps.append(seconds)
        return False

    client = KubeClient.for_transport(httpx.MockTransport(script))
    config = ReflectorConfig(**{"rng": lambda: 0.5, "min_watch": 0.0, **cfg})
    r = Reflector(client, PODS, sink, config=config, sleep=sleep)
    script.reflector = r
    r.run()
    return r, sink, sleeps


def is_list(p: Mapping[str, str]) -> bool:
    return "watch" not in p


# ---- the reflector --------------------------------------------------------------------------


def test_list_pages_then_watch_from_the_lists_version() -> None:
    script = Script(listing([pod("a", "3")], "10", cont="c1"),
                    listing([pod("b", "5")], "10"),
                    watching(ev("ADDED", pod("c", "11"))))
    r, sink, sleeps = run(script, page_size=1)
    assert sink.calls == [("replace", (["a", "b"], "10")), ("ADDED", "c")]
    p = script.params()
    assert p[0]["limit"] == "1" and p[1]["continue"] == "c1"
    assert p[2]["watch"] == "true" and p[2]["resourceVersion"] == "10"
    assert p[2]["allowWatchBookmarks"] == "true"
    assert p[3]["resourceVersion"] == "11"  # after the clean end: from the last event
    assert r.status.lists == 1 and r.status.events == 1 and sleeps == []


def test_a_list_is_decoded_and_delivered_inside_the_configs_bulk() -> None:
    inside: list[str] = []

    @contextlib.contextmanager
    def bulk() -> Iterator[None]:
        inside.append("enter")
        yield
        inside.append("exit")

    class Watching(Recorder):
        def replace(self, items: list[dict[str, Any]], resource_version: str) -> None:
            inside.append("replace")
            super().replace(items, resource_version)

        def event(self, type: str, obj: dict[str, Any]) -> None:
            inside.append("event")
            super().event(type, obj)

    def page(step: Step) -> Step:
        def serve(req: httpx.Request) -> httpx.Response:
            inside.append("page")
            return step(req)
        return serve

    script = Script(page(listing([pod("a", "3")], "10", cont="c1")),
                    page(listing([pod("b", "5")], "10")), watching(ev("ADDED", pod("c", "11"))))
    run(script, Watching(), page_size=1, bulk=bulk)
    # both pages (fetched and decoded) and their delivery inside it; a watch's events not
    assert inside == ["enter", "page", "page", "replace", "exit", "event"]


def test_the_configs_transform_sees_every_object_listed_and_watched() -> None:
    def managed(o: dict[str, Any]) -> dict[str, Any]:
        o["metadata"]["managedFields"] = [{"manager": "kubelet", "operation": "Update"}]
        return o

    class Keeping(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.objects: list[dict[str, Any]] = []

        def replace(self, items: list[dict[str, Any]], resource_version: str) -> None:
            self.objects += items
            super().replace(items, resource_version)

        def event(self, type: str, obj: dict[str, Any]) -> None:
            self.objects.append(obj)
            super().event(type, obj)

    sink = Keeping()
    script = Script(listing([managed(pod("a", "3"))], "10", cont="c1"),
                    listing([managed(pod("b", "5"))], "10"),
                    watching(ev("ADDED", managed(pod("c", "11")))))
    run(script, sink, page_size=1, transform=without_managed_fields)
    assert [o["metadata"]["name"] for o in sink.objects] == ["a", "b", "c"]
    assert all("managedFields" not in o["metadata"] for o in sink.objects)
    assert sink.calls == [("replace", (["a", "b"], "10")), ("ADDED", "c")]


def test_http_410_relists() -> None:
    script = Script(listing([pod("a", "3")], "10"), status(410),
                    listing([pod("b", "30")], "30"), watching())
    r, sink, _ = run(script)
    assert sink.calls == [("replace", (["a"], "10")), ("replace", (["b"], "30"))]
    assert r.status.gone == 1 and r.status.lists == 2
    assert script.params()[3]["resourceVersion"] == "30"


def test_error_event_410_relists() -> None:
    gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                        "message": "too old resource version: 10 (25)"}}
    script = Script(listing([], "10"), watching(ev("ADDED", pod("a", "11")), gone),
                    listing([pod("a", "11"), pod("b", "26")], "26"), watching())
    r, sink, _ = run(script)
    assert sink.calls == [("replace", ([], "10")), ("ADDED", "a"),
                          ("replace", (["a", "b"], "26"))]
    assert r.status.gone == 1


def test_bookmarks_advance_the_version_without_delivering() -> None:
    script = Script(listing([], "10"), watching(bookmark("20"), bookmark("25")), watching())
    r, sink, _ = run(script)
    assert sink.calls == [("replace", ([], "10"))]
    p = script.params()
    assert p[2]["resourceVersion"] == "25" and not any(is_list(x) for x in p[2:])
    assert r.status.bookmarks == 2 and r.status.resource_version == "25"


def test_dropped_stream_resumes_from_the_last_version_without_relisting() -> None:
    def torn(req: httpx.Request) -> httpx.Response:
        class Broken(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                yield lines(ev("ADDED", pod("a", "11")))
                raise httpx.RemoteProtocolError("peer closed connection", request=req)
        return httpx.Response(200, stream=Broken())

    script = Script(listing([], "10"), torn, watching(ev("MODIFIED", pod("a", "12"))))
    r, sink, sleeps = run(script)
    assert sink.calls == [("replace", ([], "10")), ("ADDED", "a"), ("MODIFIED", "a")]
    p = script.params()
    assert [is_list(x) for x in p] == [True, False, False, False]
    assert p[2]["resourceVersion"] == "11"
    assert r.status.errors == 1 and len(sleeps) == 1  # one backoff, no relist


def test_server_timeout_reconnects_at_once() -> None:
    script = Script(listing([], "10"), watching(), watching(), watching())
    r, _, sleeps = run(script, min_watch=0.0)
    assert r.status.watches >= 3 and sleeps == [] and r.status.errors == 0
    assert all(p["resourceVersion"] == "10" for p in script.params()[1:])
    assert all(int(p["timeoutSeconds"]) == 450 for p in script.params()[1:])  # 300 * 1.5


def test_watch_that_ends_at_once_backs_off() -> None:
    script = Script(listing([], "10"), watching(), watching())
    sink = Recorder()
    sleeps: list[float] = []
    client = KubeClient.for_transport(httpx.MockTransport(script))
    r = Reflector(client, PODS, sink, config=ReflectorConfig(rng=lambda: 0.0, min_watch=60),
                  sleep=lambda s: sleeps.append(s) or False)
    script.reflector = r
    r.run()
    assert sleeps[:2] == [0.25, 0.5]  # half of 0.5 s, then of 1 s: no spinning


def test_stall_watchdog_reconnects() -> None:
    def silent(req: httpx.Request) -> httpx.Response:
        # What httpx raises when the read timeout (the watchdog) expires mid-stream.
        raise httpx.ReadTimeout("timed out", request=req)

    script = Script(listing([], "10"), silent, watching(ev("ADDED", pod("a", "11"))))
    r, sink, sleeps = run(script, stall_timeout=7.0)
    assert r.status.stalls == 1 and len(sleeps) == 1
    assert sink.calls[-1] == ("ADDED", "a")
    assert script.params()[2]["resourceVersion"] == "10"


def test_stall_timeout_is_the_streams_read_timeout() -> None:
    seen: list[Any] = []

    def capture(req: httpx.Request) -> httpx.Response:
        seen.append(req.extensions.get("timeout"))
        return httpx.Response(200, content=b"")

    run(Script(listing([], "1"), capture), stall_timeout=7.0)
    assert seen[0]["read"] == 7.0


def test_failures_back_off_with_jitter_and_reset() -> None:
    script = Script(status(500, "InternalError"), status(503, "ServiceUnavailable"),
                    listing([], "10"), status(500, "InternalError"), watching())
    r, sink, sleeps = run(script)
    # 0.5 s then 1 s (half fixed, half jittered: rng 0.5 -> 3/4 of each), then reset by the
    # list, so the watch failure starts again at the base.
    assert sleeps == [0.375, 0.75, 0.375]
    assert r.status.errors == 3 and sink.calls == [("replace", ([], "10"))]


def test_backoff_bounds() -> None:
    for value in (0.0, 0.3, 0.999):
        b = Backoff(base=0.5, cap=30.0, rng=lambda v=value: v)
        steps = [b.next() for _ in range(20)]
        for n, s in enumerate(steps):
            d = min(30.0, 0.5 * 2 ** n)
            assert d / 2 <= s <= d
        assert max(steps) <= 30.0
        b.reset()
        assert b.next() <= 0.5


def test_a_sink_bug_relists_after_a_backoff() -> None:
    script = Script(listing([], "10"), watching(ev("ADDED", pod("bad", "11"))),
                    listing([pod("bad", "11")], "11"), watching())
    r, sink, sleeps = run(script, sink=Recorder(fail_on="bad"))
    assert sink.calls == [("replace", ([], "10")), ("replace", (["bad"], "11"))]
    assert len(sleeps) == 1 and r.status.errors == 1


# ---- translation ----------------------------------------------------------------------------


def test_pods_that_are_not_endpoints() -> None:
    assert translate_pod(pod("a", "1")).skipped == "no IP yet"
    assert translate_pod(pod("a", "1", ip="10.0.0.1", hostNetwork=True)).skipped == \
        "hostNetwork"
    done = pod("a", "1", ip="10.0.0.1")
    done["status"]["phase"] = "Succeeded"
    assert translate_pod(done).endpoint is None
    ok = translate_pod(pod("a", "1", ip="10.0.0.1", labels={"app": "w"}))
    assert ok.endpoint is not None and ok.endpoint.ips == ("10.0.0.1",) and not ok.errors
    assert translate_pod(pod("a", "1", labels={"app": "w"})).labels == Labels({"app": "w"})
    two = pod("a", "1", ip="10.0.0.1")
    two["status"]["podIPs"] = [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}]
    bad = translate_pod(two)
    assert bad.endpoint is not None and bad.errors  # held fail-closed, not dropped


# ---- the feed, against a real service and compiler with a kernel in memory --------------------


class MemoryDatapath:
    name = "memory"

    def __init__(self) -> None:
        self.kernel = Ruleset()
        self.last_drift: Plan | None = None

    def read(self) -> Ruleset:
        return self.kernel

    def snapshot(self, known: Mapping[str, Chain] | None = None) -> KernelSnapshot:
        return KernelSnapshot(0, self.kernel)

    def apply(self, desired: Ruleset, *, verify: bool | KernelSnapshot = False) -> Plan:
        delta = plan(self.kernel, canonical(desired))
        self.kernel = canonical(desired)
        return delta


class Fixture:
    def __init__(self, tmp: Path) -> None:
        self.store = KubeCacheStore(tmp)
        state, revision = self.store.load_local()
        self.datapath = MemoryDatapath()
        self.reconciler = Reconciler(IncrementalCompiler.of(state.cluster()), self.datapath,
                                     revision)
        self.service = Service(self.store, state, self.reconciler)
        self.commits: list[list[Change]] = []
        original = self.service.commit

        def commit(changes: Any, **kw: Any) -> int:
            self.commits.append(list(changes))
            return original(changes, **kw)

        self.service.commit = commit  # type: ignore[method-assign]
        client = KubeClient.for_transport(httpx.MockTransport(lambda r: httpx.Response(500)))
        self.feed = KubeFeed(client, "n1")
        self.feed.bind(self.service)

    def lists(self, namespaces: list[dict[str, Any]], policies: list[dict[str, Any]],
              pods: list[dict[str, Any]], tiers: list[dict[str, Any]] | None = None) -> None:
        self.feed.replace(CLUSTER_NETWORK_POLICIES, tiers or [])
        self.feed.replace(NAMESPACES, namespaces)
        self.feed.replace(NETWORK_POLICIES, policies)
        self.feed.replace(PODS, pods)

    def enforce(self) -> Ruleset:
        assert self.reconciler.run(True)
        return self.datapath.kernel


@pytest.fixture
def fx(tmp_path: Path) -> Iterator[Fixture]:
    f = Fixture(tmp_path)
    yield f
    f.store.close()


def ns(name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels, "resourceVersion": "1"}}


def netpol(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": "1"}, "spec": spec}


DENY = netpol("deny", {"podSelector": {"matchLabels": {"app": "db"}},
                       "policyTypes": ["Ingress"]})
ALLOW = netpol("allow", {"podSelector": {"matchLabels": {"app": "db"}},
                         "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]})


def test_nothing_is_committed_before_every_resource_is_listed(fx: Fixture) -> None:
    fx.feed.replace(NAMESPACES, [ns("ns")])
    fx.feed.replace(PODS, [pod("db", "2", ip="10.0.0.1", labels={"app": "db"})])
    fx.feed.event(PODS, "ADDED", pod("web", "3", ip="10.0.0.2", labels={"app": "web"}))
    fx.feed.replace(CLUSTER_NETWORK_POLICIES, [])
    assert fx.commits == [] and not fx.feed.synced.is_set()
    fx.feed.replace(NETWORK_POLICIES, [DENY])
    assert fx.feed.synced.is_set() and len(fx.commits) == 1
    assert set(fx.service.state.endpoints) == {"ns/db", "ns/web"}
    kernel = fx.enforce()
    assert "10.0.0.1" in kernel.ingress and "10.0.0.2" not in kernel.ingress


def test_relist_commits_only_the_differences(fx: Fixture) -> None:
    pods = [pod(f"p{i}", str(i), ip=f"10.0.1.{i}", labels={"app": "web"}) for i in range(1, 50)]
    fx.lists([ns("ns")], [DENY, ALLOW], [*pods, pod("db", "2", ip="10.0.0.1",
                                                     labels={"app": "db"})])
    before = fx.enforce()
    fx.commits.clear()
    # The same list again: nothing at all is committed (nothing flushed, nothing re-put).
    fx.feed.replace(PODS, [*pods, pod("db", "2", ip="10.0.0.1", labels={"app": "db"})])
    fx.feed.replace(NETWORK_POLICIES, [DENY, ALLOW])
    fx.feed.replace(NAMESPACES, [ns("ns")])
    assert fx.commits == []
    # A relist after 410 in which p1 was deleted, p2 relabelled, p50 added meanwhile.
    new = [p for p in pods if p["metadata"]["name"] not in ("p1", "p2")]
    new += [pod("p2", "60", ip="10.0.1.2", labels={"app": "other"}),
            pod("p50", "61", ip="10.0.1.50", labels={"app": "web"}),
            pod("db", "2", ip="10.0.0.1", labels={"app": "db"})]
    fx.feed.replace(PODS, new)
    assert len(fx.commits) == 1
    changes = fx.commits[0]
    assert {type(c).__name__ + ":" + (c.key if isinstance(c, DeleteEndpoint)
                                      else c.record.key) for c in changes
            if isinstance(c, PutEndpoint | DeleteEndpoint)} == {
        "DeleteEndpoint:ns/p1", "PutEndpoint:ns/p2", "PutEndpoint:ns/p50"}
    assert len(changes) == 3
    after = fx.enforce()
    assert after.ingress == before.ingress  # db's chain is what it was
    assert len(after.sets) == len(before.sets)


def test_relist_translates_only_objects_of_a_new_version(
        fx: Fixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import stockade.kube.datastore as datastore

    pods = [pod(f"p{i}", str(i), ip=f"10.0.1.{i}", labels={"app": "web"}) for i in range(1, 30)]
    fx.lists([ns("ns")], [DENY], pods)
    seen: list[str] = []

    def counting(obj: Mapping[str, Any]) -> Any:
        seen.append(obj["metadata"]["name"])
        return translate_pod(obj)

    monkeypatch.setattr(datastore, "translate_pod", counting)
    fx.commits.clear()
    # p3 changed while the watch was down (a new resourceVersion); the rest did not.
    relisted = [p if p["metadata"]["name"] != "p3" else
                pod("p3", "40", ip="10.0.1.3", labels={"app": "db"}) for p in pods]
    fx.feed.replace(PODS, relisted)
    assert seen == ["p3"]
    assert [[c.record.key for c in cs if isinstance(c, PutEndpoint)]
            for cs in fx.commits] == [["ns/p3"]]
    assert fx.service.state.endpoints["ns/p3"].endpoint.labels == Labels({"app": "db"})


def test_a_delivery_that_failed_half_way_makes_the_next_list_sync_everything(
        fx: Fixture) -> None:
    fx.lists([ns("ns")], [DENY], [pod("db", "2", ip="10.0.0.1", labels={"app": "db"})])
    original = fx.service.commit

    def broken(changes: Any, **kw: Any) -> int:
        raise RuntimeError("a bug")

    fx.service.commit = broken  # type: ignore[method-assign]
    relabelled = pod("db", "3", ip="10.0.0.1", labels={"app": "web"})
    with pytest.raises(RuntimeError):
        fx.feed.event(PODS, "MODIFIED", relabelled)
    fx.service.commit = original  # type: ignore[method-assign]
    # The view took the event, the state did not: the reflector lists again, and the
    # same list (nothing new in the view) must still bring the state up to it.
    assert fx.service.state.endpoints["ns/db"].endpoint.labels == Labels({"app": "db"})
    fx.feed.replace(PODS, [relabelled])
    assert fx.service.state.endpoints["ns/db"].endpoint.labels == Labels({"app": "web"})
    # And then back to the differences only.
    fx.commits.clear()
    fx.feed.replace(PODS, [relabelled])
    assert fx.commits == []


def test_a_refused_object_deleted_is_no_longer_reported(fx: Fixture) -> None:
    bad = netpol("bad", {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {
        "cidr": "10.0.0.0/8", "except": ["11.0.0.0/8"]}}]}]})
    fx.lists([ns("ns")], [bad], [pod("db", "2", ip="10.0.0.1", labels={"app": "db"})])
    assert "networkpolicy/ns/bad" in fx.feed.status()["datastore"]["invalid"]
    fx.feed.event(NETWORK_POLICIES, "DELETED", bad)
    assert fx.feed.status()["datastore"]["invalid"] == {}
    assert "ns/db" not in fx.service.state.quarantined


def test_pod_without_ip_then_with_ip(fx: Fixture) -> None:
    fx.lists([ns("ns")], [DENY], [pod("db", "2", labels={"app": "db"})])
    assert "ns/db" not in fx.service.state.endpoints
    fx.feed.event(PODS, "MODIFIED", pod("db", "3", ip="10.0.0.9", labels={"app": "db"}))
    assert fx.service.state.endpoints["ns/db"].owner == OWNER_KUBE
    assert "10.0.0.9" in fx.enforce().ingress
    fx.feed.event(PODS, "DELETED", pod("db", "4", ip="10.0.0.9", labels={"app": "db"}))
    assert "ns/db" not in fx.service.state.endpoints
    assert "10.0.0.9" not in fx.enforce().ingress


def test_host_network_pods_are_not_endpoints(fx: Fixture) -> None:
    fx.lists([ns("ns")], [], [pod("h", "2", ip="192.168.1.5", hostNetwork=True)])
    assert fx.service.state.endpoints == {}


def test_a_bad_policy_holds_its_namespace_closed_and_blocks_nothing_else(
        fx: Fixture) -> None:
    bad = netpol("bad", {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {
        "cidr": "10.0.0.0/8", "except": ["11.0.0.0/8"]}}]}]})
    other = {**ALLOW, "metadata": {**ALLOW["metadata"], "namespace": "other"}}
    fx.lists([ns("ns"), ns("other")], [bad, DENY, other],
             [pod("db", "2", ip="10.0.0.1", labels={"app": "db"}),
              {**pod("db", "3", ip="10.0.0.2", labels={"app": "db"}),
               "metadata": {"name": "db", "namespace": "other", "labels": {"app": "db"}}}])
    st = fx.service.state
    assert "ns/bad" not in st.policies and "other/allow" in st.policies
    assert st.endpoints["ns/db"].endpoint.labels == Labels({QUARANTINE_LABEL: "true"})
    assert f"ns/{QUARANTINE_POLICY}" in st.policies
    assert "ns/db" in st.quarantined and "other/db" not in st.quarantined
    assert fx.feed.status()["datastore"]["invalid"]["networkpolicy/ns/bad"]
    kernel = fx.enforce()
    assert "10.0.0.1" in kernel.ingress and "10.0.0.1" in kernel.egress  # closed both ways
    # A relist of every resource keeps it held: the synthetic deny-all is not "a policy
    # the API no longer has".
    fx.commits.clear()
    fx.feed.replace(NETWORK_POLICIES, [bad, DENY, other])
    fx.feed.replace(PODS, [pod("db", "2", ip="10.0.0.1", labels={"app": "db"}),
                           {**pod("db", "3", ip="10.0.0.2", labels={"app": "db"}),
                            "metadata": {"name": "db", "namespace": "other",
                                         "labels": {"app": "db"}}}])
    fx.feed.replace(NAMESPACES, [ns("ns"), ns("other")])
    assert fx.commits == [] and f"ns/{QUARANTINE_POLICY}" in st.policies
    assert fx.enforce() == kernel
    # The policy fixed: released, the synthetic deny-all gone, labels back.
    fx.feed.event(NETWORK_POLICIES, "MODIFIED", netpol("bad", {"podSelector": {}}))
    assert st.endpoints["ns/db"].endpoint.labels == Labels({"app": "db"})
    assert f"ns/{QUARANTINE_POLICY}" not in st.policies and "ns/db" not in st.quarantined


def test_two_pods_claiming_one_address(fx: Fixture) -> None:
    fx.lists([ns("ns")], [], [pod("old", "2", ip="10.0.0.7")])
    fx.feed.event(PODS, "ADDED", pod("new", "3", ip="10.0.0.7"))
    assert "ns/new" not in fx.service.state.endpoints
    assert "ns/new" in fx.feed.status()["datastore"]["waiting"]
    fx.feed.event(PODS, "DELETED", pod("old", "4", ip="10.0.0.7"))
    assert fx.service.state.endpoints["ns/new"].endpoint.ips == ("10.0.0.7",)
    assert fx.feed.waiting == {}


def test_cni_endpoints_keep_their_address_and_take_the_apis_labels(fx: Fixture) -> None:
    rec = EndpointRecord(Endpoint("ns", "c", Labels({}), ("10.0.0.3",)), netns="/run/netns/c",
                         owner=OWNER_CNI, container_id="abc")
    fx.service.commit([PutEndpoint(rec)], sync=False)
    fx.lists([ns("ns")], [], [pod("c", "2", ip="10.0.0.3", labels={"app": "web"})])
    got = fx.service.state.endpoints["ns/c"]
    assert got.owner == OWNER_CNI and got.container_id == "abc"
    assert got.endpoint.labels == Labels({"app": "web"})
    fx.feed.event(PODS, "DELETED", pod("c", "3", ip="10.0.0.3"))
    assert "ns/c" in fx.service.state.endpoints  # CNI DEL removes it, not the API


def test_a_cni_attachment_takes_its_address_from_a_pod_of_the_api(fx: Fixture) -> None:
    """A pod of the API still showing an address (its deletion not seen yet) gives it up
    to this node's attachment, and waits for it, said at once."""
    fx.lists([ns("ns")], [], [pod("old", "2", ip="10.0.0.7")])
    rec = EndpointRecord(Endpoint("ns", "c", Labels({}), ("10.0.0.7",)), owner=OWNER_CNI)
    evicted = fx.feed.evictions(fx.service.state, rec)
    assert evicted == [DeleteEndpoint("ns/old")]
    fx.service.commit([*evicted, PutEndpoint(rec)], sync=False)
    fx.feed.examine([c.key for c in evicted])
    assert fx.feed.status()["datastore"]["waiting"] == {
        "ns/old": "address 10.0.0.7 is held by ns/c"}
    assert fx.service.state.endpoints["ns/c"].owner == OWNER_CNI
    assert "ns/old" not in fx.service.state.endpoints
    # An endpoint of this node (not the feed's) is never evicted.
    other = EndpointRecord(Endpoint("ns", "d", Labels({}), ("10.0.0.7",)), owner=OWNER_CNI)
    assert fx.feed.evictions(fx.service.state, other) == []


def test_only_local_truth_is_durable(fx: Fixture, tmp_path: Path) -> None:
    rec = EndpointRecord(Endpoint("ns", "c", Labels({}), ("10.0.0.3",)), owner=OWNER_CNI)
    fx.service.commit([PutEndpoint(rec)], sync=False)
    fx.lists([ns("ns")], [DENY], [pod("db", "2", ip="10.0.0.1", labels={"app": "db"})])
    assert fx.service.state.policies and fx.service.reconciler.desired_revision >= 2
    fx.store.close()
    again = KubeCacheStore(tmp_path)
    state, _ = again.load_local()
    assert set(state.endpoints) == {"ns/c"} and not state.policies and not state.namespaces
    again.close()


def test_what_a_local_datastore_stored_is_not_loaded(tmp_path: Path) -> None:
    from stockade.agent.records import OWNER_API
    from stockade.agent.store import Store

    with Store(tmp_path) as local:
        local.commit([PutEndpoint(EndpointRecord(Endpoint("ns", "applied", Labels({}),
                                                          ("10.0.0.5",)), owner=OWNER_API)),
                      PutEndpoint(EndpointRecord(Endpoint("ns", "c", Labels({}),
                                                          ("10.0.0.3",)), owner=OWNER_CNI))])
    store = KubeCacheStore(tmp_path)
    state, _ = store.load_local()
    assert set(state.endpoints) == {"ns/c"}
    store.close()


def test_policy_events_are_incremental(fx: Fixture) -> None:
    fx.lists([ns("ns")], [], [pod("db", "2", ip="10.0.0.1", labels={"app": "db"})])
    fx.commits.clear()
    fx.feed.event(NETWORK_POLICIES, "ADDED", DENY)
    assert [type(c) for c in fx.commits[0]] == [PutPolicy]
    assert "10.0.0.1" in fx.enforce().ingress


def test_wait_pod_waits_for_the_watch(fx: Fixture) -> None:
    import threading

    fx.lists([ns("ns")], [], [])
    assert fx.feed.wait_pod("ns", "late", 0.05) is None
    t = threading.Timer(0.1, lambda: fx.feed.event(PODS, "ADDED",
                                                   pod("late", "5", labels={"a": "b"})))
    t.start()
    got = fx.feed.wait_pod("ns", "late", 5.0)
    t.join()
    assert got is not None and got.labels == Labels({"a": "b"}) and got.endpoint is None


def test_local_writes_are_refused(fx: Fixture) -> None:
    from stockade.agent.protocol import ApiError

    fx.service.read_only = "kubernetes (http://kube.test)"
    for op, args in (("apply", {"documents": []}), ("delete", {"refs": []}),
                     ("label", {"kind": "namespace", "name": "ns", "set": {"a": "b"}})):
        with pytest.raises(ApiError) as e:
            fx.service.handle(op, args)
        assert "kubernetes (http://kube.test)" in e.value.message
    assert "items" in fx.service.handle("get", {"kind": "endpoints"})


def test_pods_of_other_nodes_are_peers_only(fx: Fixture) -> None:
    remote_web = {**pod("web2", "3", ip="10.0.9.2", labels={"app": "web"}),
                  "spec": {"nodeName": "n2", "containers": []}}
    remote_db = {**pod("db2", "4", ip="10.0.9.1", labels={"app": "db"}),
                 "spec": {"nodeName": "n2", "containers": []}}
    fx.lists([ns("ns")], [ALLOW], [pod("db", "2", ip="10.0.0.1", labels={"app": "db"}),
                                   remote_web, remote_db])
    rec = fx.service.state.endpoints["ns/web2"]
    assert rec.node == "n2" and rec.endpoint.remote and rec.to_dict()["remote"] is True
    assert not fx.service.state.endpoints["ns/db"].endpoint.remote
    kernel = fx.enforce()
    assert set(kernel.ingress) == {"10.0.0.1"}  # db2 is enforced by its own node
    assert any("10.0.9.2" in s.elements for s in kernel.sets.values())  # web2: a peer
    # The pod rescheduled here (a new pod, same name): enforced here now.
    fx.feed.event(PODS, "MODIFIED", pod("db2", "5", ip="10.0.9.1", labels={"app": "db"}))
    assert set(fx.enforce().ingress) == {"10.0.0.1", "10.0.9.1"}


def test_metrics(tmp_path: Path) -> None:
    from stockade.agent.metrics import Registry

    f = Fixture(tmp_path)
    registry = Registry()
    f.feed.bind(f.service, registry)
    f.feed._observer("pods")("event")
    bad = netpol("bad", {"podSelector": {}, "policyTypes": ["Sideways"]})
    f.lists([ns("ns")], [bad], [])
    text = registry.render()
    assert 'stockade_kube_events_total{resource="pods"} 1\n' in text
    assert 'stockade_kube_invalid_objects{kind="networkpolicy"} 1\n' in text
    assert "stockade_kube_synced 1\n" in text
    f.store.close()


def test_policy_versions_follow_what_the_kernel_enforces(fx: Fixture) -> None:
    fx.lists([ns("ns")], [DENY], [])
    assert fx.feed.policy_versions(fx.reconciler.applied_revision) == {}  # not applied
    fx.enforce()
    assert fx.feed.policy_versions(fx.reconciler.applied_revision) == {"ns/deny": "1"}
    changed = {**DENY, "metadata": {**DENY["metadata"], "resourceVersion": "7"},
               "spec": {**DENY["spec"], "policyTypes": ["Ingress", "Egress"]}}
    fx.feed.event(NETWORK_POLICIES, "MODIFIED", changed)
    assert fx.feed.policy_versions(fx.reconciler.applied_revision) == {"ns/deny": "1"}
    fx.enforce()
    assert fx.feed.policy_versions(fx.reconciler.applied_revision) == {"ns/deny": "7"}
    # The same content at a new version (an annotation-free metadata change): no kernel
    # change, and the new version is what is enforced.
    fx.feed.event(NETWORK_POLICIES, "MODIFIED",
                  {**changed, "metadata": {**changed["metadata"], "resourceVersion": "9"}})
    assert fx.feed.policy_versions(fx.reconciler.applied_revision) == {"ns/deny": "9"}
    fx.feed.event(NETWORK_POLICIES, "DELETED", changed)
    fx.enforce()
    assert fx.feed.policy_versions(fx.reconciler.applied_revision) == {}


def test_cni_config_as_the_runtime_reads_it(tmp_path: Path) -> None:
    from stockade.agent.daemon import cni_config

    (tmp_path / "10-stockade.conflist").write_text(json.dumps(
        {"name": "stockade", "plugins": [{"type": "stockade-cni"}, {"type": "portmap"}]}))
    (tmp_path / "20-bridge.conf").write_text(json.dumps({"name": "b", "type": "bridge"}))
    (tmp_path / "30-bad.json").write_text("{")
    (tmp_path / "README").write_text("not a config")
    got = cni_config(str(tmp_path))
    assert got[:2] == [
        {"file": "10-stockade.conflist", "name": "stockade",
         "plugins": ["stockade-cni", "portmap"]},
        {"file": "20-bridge.conf", "name": "b", "plugins": ["bridge"]}]
    assert got[2]["file"] == "30-bad.json" and "error" in got[2]
    assert cni_config(str(tmp_path / "missing")) == []
