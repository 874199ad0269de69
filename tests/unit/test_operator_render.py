"""The MicroService operator's pure core and `stockade operator render`.

Tables of small graphs with the exact manifests expected, the resolution of a
dependency's ports, egress with DNS, ownership, order independence, locality of
changes, findings, and validation errors worded as the API server words them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from stockade.cli.main import main
from stockade.errors import DecodeError
from stockade.model.decode import decode_network_policy
from stockade.model.validate import validate_policy
from stockade.operator.render import (
    DEPENDENCY_INVALID,
    DEPENDENCY_NOT_FOUND,
    MANAGED_BY_LABEL,
    MANAGER,
    POLICY_NAME_TAKEN,
    PORT_NOT_FOUND,
    PolicyKey,
    changed_policies,
    is_managed,
    name_conflict,
    render_all,
    resolved_condition,
)
from stockade.operator.service import (
    API_VERSION,
    Isolation,
    MicroService,
    ServicePort,
    admit_microservices,
    decode_microservice,
    validate_microservice,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "microservices"


def manifest(name: str, namespace: str = "backend", *, app: str | None = None,
             ports: list[dict[str, Any]] | None = None,
             depends: list[dict[str, Any]] | None = None,
             isolation: dict[str, Any] | None = None, uid: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"selector": {"matchLabels": {"app": app or name}}}
    if ports is not None:
        spec["ports"] = ports
    if depends is not None:
        spec["dependsOn"] = depends
    if isolation is not None:
        spec["isolation"] = isolation
    return {"apiVersion": API_VERSION, "kind": "MicroService",
            "metadata": {"name": name, "namespace": namespace,
                         "uid": uid or f"uid-{namespace}-{name}"},
            "spec": spec}


def svc(*args: Any, **kwargs: Any) -> MicroService:
    s = decode_microservice(manifest(*args, **kwargs))
    assert validate_microservice(s) == []
    return s


def owner(name: str, namespace: str) -> dict[str, Any]:
    return {"apiVersion": "stockade.io/v1alpha1", "kind": "MicroService", "name": name,
            "uid": f"uid-{namespace}-{name}", "controller": True, "blockOwnerDeletion": True}


def peer(namespace: str, app: str) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "podSelector": {"matchLabels": {"app": app}}}


DNS_RULE = {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name":
                                                            "kube-system"}},
                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}


# ---- exact manifests ------------------------------------------------------------------


def test_one_dependency_gives_the_targets_ingress_policy_exactly() -> None:
    web = svc("web", "frontend", ports=[{"name": "http", "port": 80}],
              depends=[{"name": "api", "namespace": "backend", "ports": ["http"]}],
              isolation={"ingress": False})
    api = svc("api", ports=[{"name": "http", "port": 8080}, {"name": "metrics", "port": 9090}])
    r = render_all([web, api])
    assert list(r.policies) == [PolicyKey("backend", "api-ingress")]
    assert r.policies[PolicyKey("backend", "api-ingress")] == {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": "api-ingress",
            "namespace": "backend",
            "labels": {"app.kubernetes.io/managed-by": "stockade-operator"},
            "ownerReferences": [owner("api", "backend")],
        },
        "spec": {
            "podSelector": {"matchLabels": {"app": "api"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [peer("frontend", "web")],
                         "ports": [{"protocol": "TCP", "port": 8080}]}],
        },
    }
    assert r.findings == ()
    assert r.summaries == {PolicyKey("backend", "api-ingress"): (
        "backend/api: ingress allowed from frontend/web on TCP/8080",)}
    assert r.owners == {PolicyKey("backend", "api-ingress"): "backend/api"}


def test_no_dependents_is_a_default_deny() -> None:
    r = render_all([svc("db", "data", ports=[{"name": "pg", "port": 5432}])])
    m = r.policies[PolicyKey("data", "db-ingress")]
    assert m["spec"] == {"podSelector": {"matchLabels": {"app": "db"}},
                         "policyTypes": ["Ingress"], "ingress": []}
    assert r.summaries[PolicyKey("data", "db-ingress")] == (
        "data/db: ingress denied from every pod (no MicroService depends on it)",)


def test_egress_lists_each_dependency_then_dns() -> None:
    api = svc("api", ports=[{"name": "http", "port": 8080}],
              depends=[{"name": "postgres", "namespace": "db"}, {"name": "cache"}],
              isolation={"ingress": False, "egress": True})
    pg = svc("postgres", "db", ports=[{"name": "postgres", "port": 5432}],
             isolation={"ingress": False})
    cache = svc("cache", ports=[{"name": "redis", "port": 6379},
                                {"name": "stats", "port": 6379, "protocol": "UDP"}],
                isolation={"ingress": False})
    r = render_all([pg, cache, api])
    assert list(r.policies) == [PolicyKey("backend", "api-egress")]
    m = r.policies[PolicyKey("backend", "api-egress")]
    assert m["metadata"]["ownerReferences"] == [owner("api", "backend")]
    assert m["spec"] == {
        "podSelector": {"matchLabels": {"app": "api"}},
        "policyTypes": ["Egress"],
        "egress": [
            # Sorted by the target's namespace, then name; same namespace is still named.
            {"to": [peer("backend", "cache")],
             "ports": [{"protocol": "TCP", "port": 6379}, {"protocol": "UDP", "port": 6379}]},
            {"to": [peer("db", "postgres")], "ports": [{"protocol": "TCP", "port": 5432}]},
            DNS_RULE,
        ],
    }
    assert r.summaries[PolicyKey("backend", "api-egress")] == (
        "backend/api: egress allowed to backend/cache on TCP/6379, UDP/6379",
        "backend/api: egress allowed to db/postgres on TCP/5432",
        "backend/api: egress allowed to DNS (kube-system pods k8s-app=kube-dns) "
        "on UDP/53, TCP/53",
    )


def test_egress_without_dependencies_allows_dns_only() -> None:
    r = render_all([svc("lonely", isolation={"ingress": False, "egress": True})])
    assert r.policies[PolicyKey("backend", "lonely-egress")]["spec"]["egress"] == [DNS_RULE]


def test_both_directions_and_the_isolation_defaults() -> None:
    s = decode_microservice(manifest("x"))
    assert s.isolation == Isolation(ingress=True, egress=False)
    both = svc("x", isolation={"egress": True})
    assert both.isolation == Isolation(ingress=True, egress=True)
    r = render_all([both])
    assert list(r.policies) == [PolicyKey("backend", "x-egress"), PolicyKey("backend", "x-ingress")]
    assert render_all([svc("y", isolation={"ingress": False})]).policies == {}


# ---- ports of a dependency -----------------------------------------------------------------

TARGET_PORTS = [{"name": "http", "port": 8080}, {"name": "grpc", "port": 9000},
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]


@pytest.mark.parametrize(("target_ports", "refs", "expected"), [
    # omitted: every declared port, sorted by number then protocol
    (TARGET_PORTS, None, [("TCP", 53), ("UDP", 53), ("TCP", 8080), ("TCP", 9000)]),
    # by name, each with its own protocol
    (TARGET_PORTS, ["grpc", "dns"], [("UDP", 53), ("TCP", 9000)]),
    # a number means every protocol the target declares it with
    (TARGET_PORTS, [53], [("TCP", 53), ("UDP", 53)]),
    # a name and a number meaning one port: written once
    (TARGET_PORTS, ["http", 8080], [("TCP", 8080)]),
    # a target declaring no port: every port, a rule with no `ports`
    (None, None, None),
])
def test_ports_resolution(target_ports: list[dict[str, Any]] | None,
                          refs: list[int | str] | None,
                          expected: list[tuple[str, int]] | None) -> None:
    dep: dict[str, Any] = {"name": "t"}
    if refs is not None:
        dep["ports"] = refs
    r = render_all([svc("t", ports=target_ports), svc("d", depends=[dep],
                                                      isolation={"ingress": False})])
    assert r.findings == ()
    (rule,) = r.policies[PolicyKey("backend", "t-ingress")]["spec"]["ingress"]
    if expected is None:
        assert "ports" not in rule
        assert r.summaries[PolicyKey("backend", "t-ingress")] == (
            "backend/t: ingress allowed from backend/d on all ports",)
    else:
        assert rule["ports"] == [{"protocol": p, "port": n} for p, n in expected]


@pytest.mark.parametrize(("target_ports", "refs", "path", "message"), [
    (TARGET_PORTS, ["http", "admin"], "spec.dependsOn[0].ports[1]",
     'MicroService backend/t declares no port named "admin"'),
    (TARGET_PORTS, [8443], "spec.dependsOn[0].ports[0]",
     "MicroService backend/t declares no port 8443"),
    # strict: a target that declares nothing serves no port a dependency can name
    (None, [5432], "spec.dependsOn[0].ports[0]", "MicroService backend/t declares no port 5432"),
])
def test_a_port_the_target_does_not_declare_is_a_finding_and_drops_the_edge(
        target_ports: list[dict[str, Any]] | None, refs: list[int | str], path: str,
        message: str) -> None:
    r = render_all([svc("t", ports=target_ports),
                    svc("d", depends=[{"name": "t", "ports": refs}],
                        isolation={"ingress": False, "egress": True})])
    (finding,) = r.findings
    assert (finding.service, finding.path, finding.reason) == ("backend/d", path, PORT_NOT_FOUND)
    assert finding.message.startswith(message)
    # Neither end allows anything for the edge: never half rendered.
    assert r.policies[PolicyKey("backend", "t-ingress")]["spec"]["ingress"] == []
    assert r.policies[PolicyKey("backend", "d-egress")]["spec"]["egress"] == [DNS_RULE]


def test_missing_dependency_is_a_finding_never_a_guess() -> None:
    d = svc("d", depends=[{"name": "ghost", "namespace": "elsewhere"}, {"name": "t"}],
            isolation={"ingress": False, "egress": True})
    r = render_all([d, svc("t")])
    (finding,) = r.findings
    assert finding.reason == DEPENDENCY_NOT_FOUND
    assert finding.render() == (
        "MicroService backend/d: spec.dependsOn[0]: depends on MicroService elsewhere/ghost, "
        "which does not exist; nothing is allowed for it until it does")
    assert r.findings_for("backend/d") == (finding,)
    assert r.findings_for("backend/t") == ()
    egress = r.policies[PolicyKey("backend", "d-egress")]["spec"]["egress"]
    assert egress == [{"to": [peer("backend", "t")]}, DNS_RULE]


def test_self_dependency_lets_replicas_talk() -> None:
    r = render_all([svc("etcd", ports=[{"name": "peer", "port": 2380}],
                        depends=[{"name": "etcd", "ports": ["peer"]}])])
    assert r.policies[PolicyKey("backend", "etcd-ingress")]["spec"]["ingress"] == [
        {"from": [peer("backend", "etcd")], "ports": [{"protocol": "TCP", "port": 2380}]}]


def test_dependents_are_sorted_and_selectors_kept_whole() -> None:
    t = svc("t", ports=[{"name": "http", "port": 80}])
    a = decode_microservice({
        **manifest("a", "zeta", depends=[{"name": "t", "namespace": "backend"}]),
        "spec": {"selector": {"matchLabels": {"app": "a", "tier": "x"},
                              "matchExpressions": [{"key": "track", "operator": "NotIn",
                                                    "values": ["canary"]},
                                                   {"key": "ready", "operator": "Exists"}]},
                 "dependsOn": [{"name": "t", "namespace": "backend"}]}})
    b = svc("b", "alpha", depends=[{"name": "t", "namespace": "backend"}])
    r = render_all([a, t, b])
    rules = r.policies[PolicyKey("backend", "t-ingress")]["spec"]["ingress"]
    assert [rule["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            for rule in rules] == ["alpha", "zeta"]
    assert rules[1]["from"][0]["podSelector"] == {
        "matchLabels": {"app": "a", "tier": "x"},
        "matchExpressions": [{"key": "track", "operator": "NotIn", "values": ["canary"]},
                             {"key": "ready", "operator": "Exists"}]}


# ---- determinism and locality ----------------------------------------------------------


def graph() -> list[MicroService]:
    return [
        svc("web", "frontend", ports=[{"name": "http", "port": 80}],
            depends=[{"name": "api", "namespace": "backend"}], isolation={"ingress": False}),
        svc("api", ports=[{"name": "http", "port": 8080}],
            depends=[{"name": "db", "namespace": "data"}], isolation={"egress": True}),
        svc("db", "data", ports=[{"name": "pg", "port": 5432}]),
        svc("cache", "data", ports=[{"name": "redis", "port": 6379}]),
    ]


def test_rendering_does_not_depend_on_input_order() -> None:
    services = graph()
    first = render_all(services)
    for order in (services[::-1], services[1:] + services[:1], services[2:] + services[:2]):
        again = render_all(order)
        assert json.dumps(again.manifests()) == json.dumps(first.manifests())
        assert again.summaries == first.summaries
    assert list(first.policies) == sorted(first.policies)


def test_a_new_dependency_changes_the_targets_policy_only() -> None:
    before = render_all(graph())
    services = graph()
    services[0] = svc("web", "frontend", ports=[{"name": "http", "port": 80}],
                      depends=[{"name": "api", "namespace": "backend"},
                               {"name": "cache", "namespace": "data"}],
                      isolation={"ingress": False})
    after = render_all(services)
    assert changed_policies(before, after) == ((PolicyKey("data", "cache-ingress"),), ())
    # an egress-isolated source changes its own egress policy too
    services[1] = svc("api", ports=[{"name": "http", "port": 8080}],
                      depends=[{"name": "db", "namespace": "data"},
                               {"name": "cache", "namespace": "data"}],
                      isolation={"egress": True})
    assert changed_policies(after, render_all(services)) == (
        (PolicyKey("backend", "api-egress"), PolicyKey("data", "cache-ingress")), ())
    # turning isolation off deletes the policy
    services[2] = svc("db", "data", ports=[{"name": "pg", "port": 5432}],
                      isolation={"ingress": False})
    write, delete = changed_policies(render_all(graph()), render_all(services))
    assert write == (PolicyKey("backend", "api-egress"), PolicyKey("data", "cache-ingress"))
    assert delete == (PolicyKey("data", "db-ingress"),)


def test_every_generated_policy_is_valid_and_managed() -> None:
    r = render_all(graph())
    assert len(r.policies) == 4
    for key, m in r.policies.items():
        policy = decode_network_policy(m)
        assert validate_policy(policy) == []
        assert (policy.namespace, policy.name) == (key.namespace, key.name)
        assert policy.labels == {MANAGED_BY_LABEL: MANAGER}
        assert is_managed(m)
        (ref,) = m["metadata"]["ownerReferences"]
        assert ref["controller"] is True and ref["blockOwnerDeletion"] is True
        assert r.owners[key] == f"{key.namespace}/{ref['name']}"
    assert r.policies_of("backend/api") == (PolicyKey("backend", "api-egress"),
                                            PolicyKey("backend", "api-ingress"))


def test_a_user_policy_of_the_same_name_is_not_the_operators() -> None:
    api = graph()[1]
    user = {"metadata": {"name": "api-ingress", "namespace": "backend",
                         "labels": {"team": "x"}}}
    assert not is_managed(user)
    finding = name_conflict(api, PolicyKey("backend", "api-ingress"))
    assert (finding.service, finding.path, finding.reason) == (
        "backend/api", "spec.isolation.ingress", POLICY_NAME_TAKEN)


def test_the_longest_service_name_gives_a_valid_policy_name() -> None:
    name = "a" * 63
    r = render_all([svc(name)])
    assert validate_policy(decode_network_policy(r.manifests()[0])) == []


# ---- decoding and validation ---------------------------------------------------------------


def errors_of(doc: dict[str, Any]) -> list[str]:
    return [e.render() for e in validate_microservice(decode_microservice(doc))]


def test_defaults() -> None:
    s = decode_microservice(manifest("api", ports=[{"name": "http", "port": 80}],
                                     depends=[{"name": "db"}]))
    assert s.ports == (ServicePort("http", 80, "TCP"),)
    assert s.depends_on[0].namespace == "backend"
    assert s.depends_on[0].ports is None
    no_ns = manifest("api")
    del no_ns["metadata"]["namespace"]
    assert decode_microservice(no_ns).namespace == "default"


def test_every_validation_error_with_its_path() -> None:
    doc = manifest("Api", ports=[{"name": "http", "port": 70000, "protocol": "tcp"},
                                 {"name": "http", "port": 8080}, {"port": 8080}],
                   depends=[{"name": "db", "namespace": "Bad", "ports": [0, "x_y", 5, 5]},
                            {"name": "db", "namespace": "Bad"}, {"ports": []}])
    doc["metadata"]["uid"] = ""
    doc["spec"]["selector"] = {}
    assert errors_of(doc) == [
        'metadata.name: Invalid value: "Api": a lowercase RFC 1123 label must consist of lower '
        "case alphanumeric characters or '-', and must start and end with an alphanumeric "
        "character (e.g. 'my-name',  or '123-abc', regex used for validation is "
        "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
        "metadata.uid: Required value: the ownerReference of every generated NetworkPolicy "
        "needs it (the API server sets it; give one when rendering offline)",
        'spec.selector: Invalid value: "{}": must not be empty: it would select every pod of '
        "the namespace",
        "spec.ports[0].port: Invalid value: 70000: must be between 1 and 65535, inclusive",
        'spec.ports[0].protocol: Unsupported value: "tcp": supported values: "TCP", "UDP", '
        '"SCTP"',
        'spec.ports[1].name: Duplicate value: "http": also the name of spec.ports[0]',
        "spec.ports[2].name: Required value",
        'spec.ports[2]: Duplicate value: "TCP/8080": also declared by spec.ports[1]',
        'spec.dependsOn[0].namespace: Invalid value: "Bad": a lowercase RFC 1123 label must '
        "consist of lower case alphanumeric characters or '-', and must start and end with an "
        "alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is "
        "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
        "spec.dependsOn[0].ports[0]: Invalid value: 0: must be between 1 and 65535, inclusive",
        'spec.dependsOn[0].ports[1]: Invalid value: "x_y": must contain only alpha-numeric '
        "characters (a-z, 0-9), and hyphens (-)",
        "spec.dependsOn[0].ports[3]: Duplicate value: 5: given twice",
        'spec.dependsOn[1].namespace: Invalid value: "Bad": a lowercase RFC 1123 label must '
        "consist of lower case alphanumeric characters or '-', and must start and end with an "
        "alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is "
        "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
        'spec.dependsOn[1]: Duplicate value: "Bad/db": also the target of spec.dependsOn[0]',
        "spec.dependsOn[2].name: Required value",
        "spec.dependsOn[2].ports: Required value: must name at least one port when given "
        "(omit it for every port the target declares)",
    ]


def test_selector_required_and_label_rules() -> None:
    doc = manifest("api")
    del doc["spec"]["selector"]
    assert errors_of(doc) == ["spec.selector: Required value: must select the service's pods"]
    doc["spec"]["selector"] = {"matchExpressions": [{"key": "app", "operator": "Near"}]}
    assert errors_of(doc) == [
        'spec.selector.matchExpressions[0].operator: Invalid value: "Near": '
        "not a valid selector operator"]


@pytest.mark.parametrize(("change", "path", "message"), [
    (lambda d: d["spec"].update(ports=[{"name": "http", "port": "80"}]),
     "spec.ports[0].port", "cannot decode string as an int32"),
    (lambda d: d["spec"].update(extra=True), "spec.extra", "unknown field"),
    (lambda d: d["spec"].update(isolation={"ingress": "yes"}),
     "spec.isolation.ingress", "cannot decode string as a boolean"),
    (lambda d: d["spec"].update(dependsOn={"name": "x"}),
     "spec.dependsOn", "cannot decode object as an array"),
    (lambda d: d["spec"].update(dependsOn=[{"name": "x", "ports": [None]}]),
     "spec.dependsOn[0].ports[0]", "cannot decode null as an int or a string"),
    (lambda d: d.update(apiVersion="v1"), "apiVersion",
     "'v1' does not serve MicroService; use stockade.io/v1alpha1"),
])
def test_decoding_is_strict(change: Any, path: str, message: str) -> None:
    doc = manifest("api")
    change(doc)
    with pytest.raises(DecodeError) as info:
        decode_microservice(doc)
    assert (info.value.path, info.value.message) == (path, f"{path}: {message}")


def test_status_and_server_metadata_are_read_over() -> None:
    doc = manifest("api")
    doc["metadata"].update(resourceVersion="12", generation=3, managedFields=[{}],
                           creationTimestamp="2026-01-01T00:00:00Z")
    doc["status"] = {"conditions": [{"type": "Ready", "status": "True"}]}
    assert validate_microservice(decode_microservice(doc)) == []


def test_a_service_given_twice_is_refused() -> None:
    bad = admit_microservices([svc("api"), svc("api")])
    assert [line for e in bad for line in e.lines()] == [
        'MicroService backend/api: metadata.name: Duplicate value: "api": '
        "MicroService backend/api is also given in <input>"]


# ---- the command ------------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_render_example_yaml_and_json_agree(capsys: pytest.CaptureFixture[str]) -> None:
    services = str(EXAMPLE / "services.yaml")
    code, out, err = run(capsys, "operator", "render", "-f", services)
    assert code == 0
    docs = list(yaml.safe_load_all(out))
    assert [(d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs] == [
        ("data", "cache-ingress"), ("data", "postgres-ingress"),
        ("shop", "api-egress"), ("shop", "api-ingress")]
    assert "shop/api: ingress allowed from shop/web on TCP/8000" in err.splitlines()
    code, out, err = run(capsys, "operator", "render", "-f", services, "-o", "json", "-q")
    assert code == 0 and err == ""
    listed = json.loads(out)
    assert listed["kind"] == "List" and listed["items"] == docs


def test_render_exits_1_on_findings_and_still_prints(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump_all([
        manifest("api", ports=[{"name": "http", "port": 8080}]),
        manifest("web", depends=[{"name": "api", "ports": ["grpc"]}, {"name": "gone"}]),
    ]))
    code, out, err = run(capsys, "operator", "render", "-f", str(f), "-q")
    assert code == 1
    assert len(list(yaml.safe_load_all(out))) == 2
    assert err.splitlines() == [
        f'{f}: MicroService backend/web: spec.dependsOn[0].ports[0]: MicroService backend/api '
        'declares no port named "grpc"; nothing is allowed for this dependency until it does',
        f"{f}: MicroService backend/web: spec.dependsOn[1]: depends on MicroService "
        "backend/gone, which does not exist; nothing is allowed for it until it does",
    ]


def test_render_exits_2_naming_object_and_field(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump_all([
        manifest("api", ports=[{"name": "http", "port": 70000}]),
        manifest("web", ports=[{"name": "http", "port": 80, "protocol": "ICMP"}]),
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}},
    ]))
    code, out, err = run(capsys, "operator", "render", "-f", str(f))
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"{f}: MicroService backend/api: spec.ports[0].port: Invalid value: 70000: "
        "must be between 1 and 65535, inclusive",
        f'{f}: MicroService backend/web: spec.ports[0].protocol: Unsupported value: "ICMP": '
        'supported values: "TCP", "UDP", "SCTP"',
    ]


def test_render_without_microservices_is_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "operator", "render", "-f", str(EXAMPLE / "pods.yaml"))
    assert code == 2
    assert "no MicroService" in err


# ---- the CRD ---------------------------------------------------------------------------------
# Without an API server, a small reader of the OpenAPI keywords the schema uses checks
# that it accepts the example and rejects malformed services; the CEL rules are checked
# for their shape only.

CRD = ROOT / "deploy" / "crd-microservice.yaml"
_TYPES: dict[str, Any] = {"object": dict, "array": list, "string": str, "boolean": bool,
                          "integer": int}


def crd() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(CRD.read_text())
    return doc


def schema() -> dict[str, Any]:
    (version,) = crd()["spec"]["versions"]
    s: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return s


def schema_errors(value: Any, s: dict[str, Any], path: str = "") -> list[str]:
    if s.get("x-kubernetes-int-or-string"):
        ok = isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
        return [] if ok else [f"{path}: not an int or a string"]
    want = _TYPES[s["type"]]
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        return [f"{path}: not {s['type']}"]
    errs = []
    if "enum" in s and value not in s["enum"]:
        errs.append(f"{path}: not one of {s['enum']}")
    if isinstance(value, int) and not s.get("minimum", value) <= value <= s.get("maximum", value):
        errs.append(f"{path}: out of range")
    if isinstance(value, str):
        if not s.get("minLength", 0) <= len(value) <= s.get("maxLength", 10**9):
            errs.append(f"{path}: bad length")
        if "pattern" in s and not re.search(s["pattern"], value):
            errs.append(f"{path}: does not match {s['pattern']}")
    if isinstance(value, list):
        if not s.get("minItems", 0) <= len(value) <= s.get("maxItems", 10**9):
            errs.append(f"{path}: bad number of items")
        keys = s.get("x-kubernetes-list-map-keys")
        if keys:
            seen = [tuple(v.get(k) for k in keys) for v in value]
            if len(set(seen)) != len(seen):
                errs.append(f"{path}: duplicate map key")
        for i, v in enumerate(value):
            errs += schema_errors(v, s["items"], f"{path}[{i}]")
    if isinstance(value, dict):
        errs += [f"{path}.{k}: required" for k in s.get("required", ()) if k not in value]
        for k, v in value.items():
            if k in s.get("properties", {}):
                errs += schema_errors(v, s["properties"][k], f"{path}.{k}".lstrip("."))
            elif "additionalProperties" in s:
                errs += schema_errors(v, s["additionalProperties"], f"{path}.{k}")
    return errs


def walk(s: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, s)]
    for k, sub in s.get("properties", {}).items():
        out += walk(sub, f"{path}.{k}")
    for key in ("items", "additionalProperties"):
        if isinstance(s.get(key), dict):
            out += walk(s[key], f"{path}[]" if key == "items" else f"{path}{{}}")
    return out


def test_the_crd_names_what_the_code_reads() -> None:
    doc = crd()
    assert (doc["apiVersion"], doc["kind"]) == ("apiextensions.k8s.io/v1",
                                                "CustomResourceDefinition")
    spec = doc["spec"]
    assert doc["metadata"]["name"] == "microservices.stockade.io"
    assert (spec["group"], spec["scope"], spec["names"]["kind"], spec["names"]["plural"]) == (
        "stockade.io", "Namespaced", "MicroService", "microservices")
    (version,) = spec["versions"]
    assert f"{spec['group']}/{version['name']}" == API_VERSION
    assert version["subresources"] == {"status": {}}
    assert {c["name"] for c in version["additionalPrinterColumns"]} >= {"Ready", "Age"}
    conditions = schema()["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_the_crd_schema_is_structural_and_its_rules_are_well_formed() -> None:
    for path, node in walk(schema()):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        assert not ("properties" in node and "additionalProperties" in node), path
        for rule in node.get("x-kubernetes-validations", ()):
            assert set(rule) == {"rule", "message"}, path
            # `namespace` is a CEL keyword: a field of that name is written __namespace__
            assert ".namespace" not in rule["rule"], path
            assert rule["rule"].count("(") == rule["rule"].count(")"), path
        if node.get("type") == "array":
            # bounded lists keep the CEL rules within the API server's cost budget
            assert "maxItems" in node or path.startswith(".status"), path
        keys = node.get("x-kubernetes-list-map-keys", ())
        for key in keys:
            item = node["items"]
            assert key in item.get("required", ()) or "default" in item["properties"][key]


def test_the_crd_accepts_the_example_and_the_operators_defaults_match() -> None:
    docs = list(yaml.safe_load_all((EXAMPLE / "services.yaml").read_text()))
    for doc in docs:
        assert schema_errors(doc, schema()) == []
    iso = schema()["properties"]["spec"]["properties"]["isolation"]["properties"]
    assert (iso["ingress"]["default"], iso["egress"]["default"]) == (
        Isolation().ingress, Isolation().egress)
    port = schema()["properties"]["spec"]["properties"]["ports"]["items"]["properties"]
    assert port["protocol"]["default"] == "TCP"


@pytest.mark.parametrize(("change", "error"), [
    (lambda s: s.pop("selector"), "spec.selector: required"),
    (lambda s: s.update(ports=[{"name": "http", "port": 70000}]), "spec.ports[0].port"),
    (lambda s: s.update(ports=[{"name": "http", "port": 0}]), "spec.ports[0].port"),
    (lambda s: s.update(ports=[{"name": "http", "port": 80, "protocol": "ICMP"}]),
     "spec.ports[0].protocol"),
    (lambda s: s.update(ports=[{"name": "http", "port": "80"}]), "spec.ports[0].port"),
    (lambda s: s.update(ports=[{"port": 80}]), "spec.ports[0].name: required"),
    (lambda s: s.update(ports=[{"name": "Http", "port": 80}]), "spec.ports[0].name"),
    (lambda s: s.update(ports=[{"name": "http", "port": 80}, {"name": "http", "port": 81}]),
     "spec.ports: duplicate map key"),
    (lambda s: s.update(dependsOn=[{"namespace": "db"}]), "spec.dependsOn[0].name: required"),
    (lambda s: s.update(dependsOn=[{"name": "Bad_Name"}]), "spec.dependsOn[0].name"),
    (lambda s: s.update(dependsOn=[{"name": "x", "namespace": "a" * 64}]),
     "spec.dependsOn[0].namespace"),
    (lambda s: s.update(dependsOn=[{"name": "x", "ports": [True]}]),
     "spec.dependsOn[0].ports[0]"),
    (lambda s: s.update(isolation={"ingress": "yes"}), "spec.isolation.ingress"),
    (lambda s: s["selector"].update(matchExpressions=[{"key": "a", "operator": "Near"}]),
     "spec.selector.matchExpressions[0].operator"),
])
def test_the_crd_rejects_a_malformed_service(change: Any, error: str) -> None:
    doc = manifest("api", ports=[{"name": "http", "port": 80}])
    change(doc["spec"])
    errs = schema_errors(doc, schema())
    assert any(e.startswith(error) for e in errs), errs


def test_a_dependency_on_an_invalid_service_says_so() -> None:
    r = render_all([svc("d", depends=[{"name": "broken"}, {"name": "gone"}])],
                   invalid=["backend/broken"])
    assert [(f.path, f.reason) for f in r.findings] == [
        ("spec.dependsOn[0]", DEPENDENCY_INVALID), ("spec.dependsOn[1]", DEPENDENCY_NOT_FOUND)]
    assert resolved_condition(r.findings_for("backend/d")) == (
        "False", "DependencyInvalid,DependencyNotFound",
        "spec.dependsOn[0]: depends on MicroService backend/broken, which is invalid; nothing "
        "is allowed for it until it is valid; spec.dependsOn[1]: depends on MicroService "
        "backend/gone, which does not exist; nothing is allowed for it until it does")
    assert resolved_condition(()) == ("True", "Resolved", "every dependency resolves")
