"""The live operator's decisions (operator/reconcile.py), without a cluster.

What to apply, what to delete and what to leave alone; that a cluster already
in the desired state gives no write at all; status conditions and their
transition times; events reported once, across restarts.
"""

from __future__ import annotations

import copy
from typing import Any

from stockade.operator.reconcile import (
    DEPENDENCIES_RESOLVED,
    READY,
    VALID,
    Apply,
    Delete,
    Reported,
    ServiceState,
    plan_events,
    plan_status,
    plan_writes,
    read_service,
    read_services,
    same_policy,
)
from stockade.operator.render import (
    DEPENDENCY_NOT_FOUND,
    MANAGED_BY_LABEL,
    MANAGER,
    POLICY_NAME_TAKEN,
    PolicyKey,
    render_all,
)
from stockade.operator.service import API_VERSION

Obj = dict[str, Any]
NOW = "2026-12-02T20:00:00Z"
LATER = "2026-12-02T21:00:00Z"


def ms(name: str, namespace: str = "backend", *, depends: list[Obj] | None = None,
       ports: list[Obj] | None = None, isolation: Obj | None = None, generation: int = 1,
       status: Obj | None = None, rv: str = "1") -> Obj:
    spec: Obj = {"selector": {"matchLabels": {"app": name}},
                 "ports": ports if ports is not None else [{"name": "http", "port": 8080}]}
    if depends is not None:
        spec["dependsOn"] = depends
    if isolation is not None:
        spec["isolation"] = isolation
    obj: Obj = {"apiVersion": API_VERSION, "kind": "MicroService",
                "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}",
                             "generation": generation, "resourceVersion": rv,
                             "creationTimestamp": NOW},
                "spec": spec}
    if status is not None:
        obj["status"] = status
    return obj


def as_stored(manifest: Obj, rv: str = "7") -> Obj:
    """A policy as the API server returns it after our apply: server fields added,
    empty lists dropped."""
    obj = copy.deepcopy(manifest)
    obj["metadata"].update(uid="p-" + obj["metadata"]["name"], resourceVersion=rv,
                           generation=1, creationTimestamp=NOW,
                           managedFields=[{"manager": MANAGER, "operation": "Apply"}])
    for k in ("ingress", "egress"):
        if obj["spec"].get(k) == []:
            del obj["spec"][k]
    return obj


def graph() -> list[Obj]:
    """frontend/web -> backend/api -> backend/db; db and api ingress-isolated."""
    return [
        ms("web", "frontend", depends=[{"name": "api", "namespace": "backend"}],
           isolation={"ingress": False}),
        ms("api", depends=[{"name": "db"}]),
        ms("db", ports=[{"name": "pg", "port": 5432}]),
    ]


def settled(objs: list[Obj]) -> dict[PolicyKey, Obj]:
    services = read_services(objs)
    writes = plan_writes(services, {})
    return {a.key: as_stored(a.manifest) for a in writes.applies}


def k(ns: str, name: str) -> PolicyKey:
    return PolicyKey(ns, name)


# ---- policies ------------------------------------------------------------------------


def test_an_empty_cluster_gets_every_rendered_policy_applied_without_force() -> None:
    services = read_services(graph())
    writes = plan_writes(services, {})
    expected = render_all([s.service for s in services if s.service is not None])
    assert {a.key: a.manifest for a in writes.applies} == expected.policies
    assert all(not a.force for a in writes.applies)
    assert writes.deletes == ()
    assert writes.applies[0].summary  # what it allows, in words


def test_a_cluster_already_in_the_desired_state_gets_no_write() -> None:
    objs = graph()
    writes = plan_writes(read_services(objs), settled(objs))
    assert writes.empty
    assert writes.taken == () and writes.kept == ()


def test_a_new_dependency_changes_only_the_targets_policy_with_force() -> None:
    objs = graph()
    policies = settled(objs)
    objs[2] = ms("db", ports=[{"name": "pg", "port": 5432}])
    objs.append(ms("batch", depends=[{"name": "db", "ports": ["pg"]}],
                   isolation={"ingress": False}))
    writes = plan_writes(read_services(objs), policies)
    assert [a.key for a in writes.applies] == [k("backend", "db-ingress")]
    assert writes.applies[0].force
    assert writes.deletes == ()


def test_fields_of_others_do_not_make_a_difference() -> None:
    objs = graph()
    policies = settled(objs)
    p = policies[k("backend", "api-ingress")]
    p["metadata"]["labels"]["team"] = "payments"  # another manager's label
    p["metadata"]["annotations"] = {"note": "x"}
    assert plan_writes(read_services(objs), policies).empty


def test_a_managed_policy_edited_by_someone_is_applied_again() -> None:
    objs = graph()
    policies = settled(objs)
    policies[k("backend", "api-ingress")]["spec"]["ingress"] = []
    writes = plan_writes(read_services(objs), policies)
    assert [(a.key, a.force) for a in writes.applies] == [(k("backend", "api-ingress"), True)]


def test_a_stale_owner_reference_is_rewritten() -> None:
    objs = graph()
    policies = settled(objs)
    policies[k("backend", "db-ingress")]["metadata"]["ownerReferences"][0]["uid"] = "old"
    writes = plan_writes(read_services(objs), policies)
    assert [a.key for a in writes.applies] == [k("backend", "db-ingress")]


def test_a_policy_we_do_not_manage_is_never_written_and_is_a_finding() -> None:
    objs = graph()
    users = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "db-ingress", "namespace": "backend", "resourceVersion": "3"},
             "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    writes = plan_writes(read_services(objs), {k("backend", "db-ingress"): users})
    assert k("backend", "db-ingress") not in {a.key for a in writes.applies}
    assert writes.taken == (k("backend", "db-ingress"),)
    [finding] = writes.findings["backend/db"]
    assert finding.reason == POLICY_NAME_TAKEN
    assert writes.deletes == ()


def test_isolation_turned_off_deletes_that_policy_only() -> None:
    objs = graph()
    policies = settled(objs)
    objs[2] = ms("db", ports=[{"name": "pg", "port": 5432}], isolation={"ingress": False})
    writes = plan_writes(read_services(objs), policies)
    assert writes.applies == ()
    assert [d.key for d in writes.deletes] == [k("backend", "db-ingress")]
    assert "backend/db" in writes.deletes[0].why


def test_policies_of_a_deleted_service_are_left_to_the_garbage_collector() -> None:
    objs = graph()
    policies = settled(objs)
    del objs[2]  # db deleted: its ingress policy's owner is gone
    writes = plan_writes(read_services(objs), policies)
    assert writes.deletes == ()
    assert [key for key, _ in writes.kept] == [k("backend", "db-ingress")]
    assert "garbage collector" in writes.kept[0][1]


def test_an_orphaned_managed_policy_is_deleted_and_an_unmanaged_one_is_not() -> None:
    objs = graph()
    policies = settled(objs)
    orphan = copy.deepcopy(policies[k("backend", "db-ingress")])
    orphan["metadata"]["name"] = "old-ingress"
    del orphan["metadata"]["ownerReferences"]
    policies[k("backend", "old-ingress")] = orphan
    users = copy.deepcopy(orphan)
    users["metadata"]["name"] = "mine"
    users["metadata"]["labels"] = {"app": "mine"}
    policies[k("backend", "mine")] = users
    writes = plan_writes(read_services(objs), policies)
    assert [d.key for d in writes.deletes] == [k("backend", "old-ingress")]
    assert writes.applies == ()


def test_an_invalid_service_keeps_its_policies_and_is_left_out_of_the_graph() -> None:
    objs = graph()
    policies = settled(objs)
    objs[2]["spec"]["ports"] = [{"name": "pg", "port": 70000}]
    services = read_services(objs)
    db = next(s for s in services if s.key == "backend/db")
    assert not db.valid and db.errors[0].path == "spec.ports[0].port"
    writes = plan_writes(services, policies)
    assert writes.deletes == ()
    assert [key for key, _ in writes.kept] == [k("backend", "db-ingress")]
    assert writes.findings["backend/api"][0].reason == "DependencyInvalid"
    # api's egress is not isolated: nothing to change; db's ingress is kept as it was
    assert writes.applies == ()


def test_a_write_not_yet_seen_by_the_watch_is_not_sent_again() -> None:
    objs = graph()
    first = plan_writes(read_services(objs), {})
    memo = {a.key: ("", a.manifest) for a in first.applies}
    assert plan_writes(read_services(objs), {}, memo).empty
    policies = settled(objs)
    objs[2] = ms("db", ports=[{"name": "pg", "port": 5432}], isolation={"ingress": False})
    deleting = plan_writes(read_services(objs), policies)
    memo2 = {d.key: ("7", None) for d in deleting.deletes}
    assert plan_writes(read_services(objs), policies, memo2).empty
    # the watch brought a new version: the memo no longer applies
    policies[k("backend", "db-ingress")]["metadata"]["resourceVersion"] = "8"
    assert len(plan_writes(read_services(objs), policies, memo2).deletes) == 1


def test_same_policy_compares_what_we_write() -> None:
    objs = graph()
    [a, *_] = plan_writes(read_services(objs), {}).applies
    stored = as_stored(a.manifest)
    assert same_policy(a.manifest, stored)
    stored["metadata"]["labels"] = {}
    assert not same_policy(a.manifest, stored)
    stored = as_stored(a.manifest)
    stored["metadata"]["labels"][MANAGED_BY_LABEL] = "someone"
    assert not same_policy(a.manifest, stored)


def test_undecodable_service_is_invalid_with_its_field() -> None:
    obj = ms("x")
    obj["spec"]["colour"] = "blue"
    state = read_service(obj)
    assert not state.valid
    assert state.errors[0].path == "spec.colour"


# ---- status --------------------------------------------------------------------------


def statuses(objs: list[Obj], policies: dict[PolicyKey, Obj] | None = None,
             now: str = NOW) -> tuple[list[ServiceState], dict[str, Obj]]:
    services = read_services(objs)
    writes = plan_writes(services, policies if policies is not None else settled(objs))
    return services, plan_status(services, writes, {}, now)


def conditions(status: Obj) -> dict[str, Obj]:
    return {c["type"]: c for c in status["conditions"]}


def test_status_of_resolved_services() -> None:
    _, out = statuses(graph())
    assert set(out) == {"frontend/web", "backend/api", "backend/db"}
    api = out["backend/api"]
    assert api["observedGeneration"] == 1 and api["policies"] == ["api-ingress"]
    c = conditions(api)
    assert c[DEPENDENCIES_RESOLVED] == {
        "type": DEPENDENCIES_RESOLVED, "status": "True", "reason": "Resolved",
        "message": "every dependency resolves", "observedGeneration": 1,
        "lastTransitionTime": NOW}
    assert c[VALID]["status"] == "True" and c[READY]["status"] == "True"


def test_status_already_written_is_not_written_again() -> None:
    objs = graph()
    _, out = statuses(objs)
    for o in objs:
        key = f"{o['metadata']['namespace']}/{o['metadata']['name']}"
        o["status"] = out[key]
    assert statuses(objs, now=LATER)[1] == {}


def test_transition_time_changes_only_with_the_status() -> None:
    objs = graph()
    _, out = statuses(objs)
    objs[1]["status"] = out["backend/api"]
    objs[1]["spec"]["dependsOn"].append({"name": "cache"})
    objs[1]["metadata"]["generation"] = 2
    _, later = statuses(objs, now=LATER)
    c = conditions(later["backend/api"])
    assert c[DEPENDENCIES_RESOLVED]["status"] == "False"
    assert c[DEPENDENCIES_RESOLVED]["reason"] == DEPENDENCY_NOT_FOUND
    assert "spec.dependsOn[1]" in c[DEPENDENCIES_RESOLVED]["message"]
    assert c[DEPENDENCIES_RESOLVED]["lastTransitionTime"] == LATER
    assert c[VALID]["lastTransitionTime"] == NOW  # unchanged status, unchanged time
    assert c[VALID]["observedGeneration"] == 2
    assert later["backend/api"]["observedGeneration"] == 2


def test_status_of_an_invalid_service_names_its_fields() -> None:
    objs = graph()
    objs[2]["spec"]["ports"] = [{"name": "pg", "port": 70000}]
    _, out = statuses(objs, {})
    c = conditions(out["backend/db"])
    assert c[VALID]["status"] == "False" and c[VALID]["reason"] == "Invalid"
    assert c[VALID]["message"].startswith("spec.ports[0].port: Invalid value: 70000")


def test_a_taken_name_makes_the_service_not_ready() -> None:
    objs = graph()
    users = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "db-ingress", "namespace": "backend"},
             "spec": {"podSelector": {}}}
    _, out = statuses(objs, {k("backend", "db-ingress"): users})
    c = conditions(out["backend/db"])
    assert c[READY]["status"] == "False" and c[READY]["reason"] == POLICY_NAME_TAKEN
    assert c[DEPENDENCIES_RESOLVED]["status"] == "True"
    assert out["backend/db"]["policies"] == []


def test_a_failed_write_makes_the_service_not_ready() -> None:
    objs = graph()
    services = read_services(objs)
    writes = plan_writes(services, {})
    out = plan_status(services, writes, {k("backend", "db-ingress"): "500 boom"}, NOW)
    c = conditions(out["backend/db"])
    assert c[READY]["reason"] == "ApplyFailed" and "500 boom" in c[READY]["message"]


def test_a_status_written_and_not_yet_seen_is_not_written_again() -> None:
    objs = graph()
    services, out = statuses(objs)
    writes = plan_writes(services, settled(objs))
    memo = {key: ("1", status) for key, status in out.items()}
    assert plan_status(services, writes, {}, LATER, memo) == {}


# ---- events --------------------------------------------------------------------------


def missing() -> list[Obj]:
    objs = graph()
    objs[1]["spec"]["dependsOn"].append({"name": "cache"})
    return objs


def test_a_finding_is_reported_once() -> None:
    objs = missing()
    services = read_services(objs)
    writes = plan_writes(services, {})
    reports, memory = plan_events(services, writes, Reported())
    assert [(r.state.key, r.key.reason, r.key.path) for r in reports] == [
        ("backend/api", DEPENDENCY_NOT_FOUND, "spec.dependsOn[1]")]
    again, memory = plan_events(services, writes, memory)
    assert again == []
    # gone, then back: reported again
    fixed = read_services(graph())
    _, memory = plan_events(fixed, plan_writes(fixed, {}), memory)
    back, _ = plan_events(services, writes, memory)
    assert len(back) == 1


def test_after_a_restart_findings_in_the_stored_status_are_not_reported_again() -> None:
    objs = missing()
    services = read_services(objs)
    writes = plan_writes(services, {})
    out = plan_status(services, writes, {}, NOW)
    objs[1]["status"] = out["backend/api"]
    restarted = read_services(objs)
    reports, _ = plan_events(restarted, plan_writes(restarted, {}), Reported())
    assert reports == []


def test_invalid_services_and_taken_names_are_reported() -> None:
    objs = graph()
    objs[0]["spec"]["ports"] = [{"name": "http", "port": 0}]
    users = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "db-ingress", "namespace": "backend"},
             "spec": {"podSelector": {}}}
    services = read_services(objs)
    writes = plan_writes(services, {k("backend", "db-ingress"): users})
    reports, _ = plan_events(services, writes, Reported())
    assert sorted((r.state.key, r.key.reason) for r in reports) == [
        ("backend/db", POLICY_NAME_TAKEN), ("frontend/web", "Invalid")]


def test_apply_and_delete_are_data() -> None:
    a = Apply(k("n", "x-ingress"), {}, force=True, summary=("n/x: ingress denied",))
    d = Delete(k("n", "x-egress"), "why")
    from stockade.operator.reconcile import summary_line
    assert summary_line(a) == "NetworkPolicy n/x-ingress applied: n/x: ingress denied"
    assert summary_line(d) == "NetworkPolicy n/x-egress deleted: why"


def test_the_controllers_cache_tells_only_of_changes() -> None:
    from stockade.operator.controller import Cache, service_key

    calls: list[int] = []
    cache = Cache(service_key, lambda: calls.append(1))
    objs = graph()
    cache.replace(objs, "5")
    assert cache.listed and len(calls) == 1
    cache.replace(copy.deepcopy(objs), "9")  # a relist that finds the same objects
    assert len(calls) == 1
    cache.event("DELETED", objs[0])
    assert sorted(cache.snapshot()) == ["backend/api", "backend/db"] and len(calls) == 2
