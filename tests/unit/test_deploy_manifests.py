"""Every manifest of deploy/ against the Kubernetes OpenAPI schemas, offline.

The schemas are those of Kubernetes 1.32 bundled by `kubernetes-validate` (PyPI, a
dev dependency), in their strict form: an unknown field is an error, as with
`kubectl apply --validate=strict`. Each file is checked alone, and so is what
`kubectl kustomize deploy/` renders (the ConfigMap of the CNI configuration comes
from the kustomization).

The CRD is checked three ways: against the apiextensions.k8s.io/v1 schema; as a
structural schema (the rules the API server applies before it accepts a CRD: a type
everywhere, no `properties` beside `additionalProperties`, defaults valid); and by
validating MicroService objects against its openAPIV3Schema with `jsonschema`:
valid ones accepted, malformed ones rejected. Like the API server, an unknown field
is an error under strict field validation; the CEL rules
(`x-kubernetes-validations`) are not evaluated here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

KUBERNETES = "1.32"
ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CRD = DEPLOY / "crd-microservice.yaml"
MANIFESTS = sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")
KUBECTL = shutil.which("kubectl")


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """What the strict 1.32 schema says of one object (nothing when it is valid)."""
    try:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        return [f"{doc['kind']} {doc['metadata'].get('name')}: {path}: {e.message}"]
    return []


# ---- every manifest, alone and as kustomize renders them -----------------------------------

def test_deploy_has_the_expected_manifests() -> None:
    names = {p.name for p in MANIFESTS}
    assert {"namespace.yaml", "rbac.yaml", "agent-daemonset.yaml",
            "operator-deployment.yaml"} <= names
    listed = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"]
    # The kustomization installs every manifest of the directory, the CRD included.
    assert sorted(listed) == sorted(names | {"crd-microservice.yaml"})


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_kubernetes_schema(path: Path) -> None:
    docs = documents(path.read_text())
    assert docs, f"{path.name} holds no object"
    errors = [e for doc in docs for e in schema_errors(doc)]
    assert errors == []


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
@pytest.mark.skipif(not CRD.exists(), reason="deploy/crd-microservice.yaml is not there yet")
def test_kustomize_output_matches_the_kubernetes_schema() -> None:
    out = subprocess.run([str(KUBECTL), "kustomize", str(DEPLOY)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    docs = documents(out)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("ClusterRole") == 3 and "DaemonSet" in kinds and "ConfigMap" in kinds
    assert [e for doc in docs for e in schema_errors(doc)] == []
    # The generated ConfigMap's name (with its hash) is the one the DaemonSet mounts,
    # and it holds the CNI configuration of deploy/cni/.
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    mounted = {v["configMap"]["name"] for v in ds["spec"]["template"]["spec"]["volumes"]
               if "configMap" in v}
    assert mounted == {cm["metadata"]["name"]}
    conflist = json.loads(cm["data"]["10-stockade.conflist"])
    assert conflist["plugins"][0]["type"] == "stockade-cni"


def test_the_schema_check_can_fail() -> None:
    ds = documents((DEPLOY / "agent-daemonset.yaml").read_text())[0]
    ds["spec"]["template"]["spec"]["hostNetwrok"] = True
    assert "hostNetwrok" in " ".join(schema_errors(ds))
    ds = documents((DEPLOY / "agent-daemonset.yaml").read_text())[0]
    ds["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "9641"
    assert schema_errors(ds)


# ---- what the manifests grant and run ---------------------------------------------------

def _objects() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d
            for p in MANIFESTS for d in documents(p.read_text())}


def _grants(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]}


def test_rbac_is_least_privilege() -> None:
    objs = _objects()
    agent = _grants(objs["ClusterRole", "stockade-agent"])
    read = {"get", "list", "watch"}
    assert agent == ({("", r, v) for r in ("pods", "namespaces") for v in read}
                     | {("networking.k8s.io", "networkpolicies", v) for v in read}
                     | {("policy.networking.k8s.io", "clusternetworkpolicies", v)
                        for v in read}
                     | {("", "nodes", "get")})
    operator = _grants(objs["ClusterRole", "stockade-operator"])
    assert {("stockade.io", "microservices", v) for v in
            ("get", "list", "watch", "patch", "update")} <= operator
    assert {("stockade.io", "microservices/status", v) for v in ("patch", "update")} <= operator
    assert {("networking.k8s.io", "networkpolicies", v) for v in
            ("create", "patch", "get", "list", "watch", "delete")} <= operator
    assert {("", "events", "create"), ("", "events", "patch")} <= operator
    viewer = _grants(objs["ClusterRole", "stockade-viewer"])
    everything = agent | operator | viewer | _grants(objs["Role", "stockade-status"])
    # No wildcard, no secrets, no write for the agent or the plugin's user.
    assert not any("*" in grant for grant in everything)
    assert not any(r == "secrets" for _, r, _ in everything)
    assert {v for _, _, v in agent | viewer} <= read
    # pods/proxy (reaching the agents' /status) only in stockade-system.
    assert objs["Role", "stockade-status"]["metadata"]["namespace"] == "stockade-system"
    assert not any(r.endswith("/proxy") for _, r, _ in viewer)
    for binding in ("stockade-agent", "stockade-operator"):
        b = objs["ClusterRoleBinding", binding]
        assert b["roleRef"]["name"] == binding
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": binding,
                                  "namespace": "stockade-system"}]


def test_agent_daemonset_runs_on_every_node_with_exact_capabilities() -> None:
    ds = _objects()["DaemonSet", "stockade-agent"]
    pod = ds["spec"]["template"]["spec"]
    assert ds["metadata"]["namespace"] == "stockade-system"
    assert ds["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] \
        == "stockade-agent"
    assert pod["hostNetwork"] is True
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["serviceAccountName"] == "stockade-agent"
    agent = pod["containers"][0]
    sc = agent["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"],
                                  "add": ["NET_ADMIN", "NET_RAW", "SYS_ADMIN", "BPF"]}
    # Not /healthz: not ready (no API yet) is not dead, and a restart would not help.
    assert agent["livenessProbe"]["tcpSocket"]["port"] == "metrics"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert {p["name"]: p["containerPort"] for p in agent["ports"]} == {"metrics": 9641}
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert {"/etc/cni/net.d", "/opt/cni/bin", "/run/stockade", "/var/lib/stockade"} \
        <= set(host.values())
    mounts = {m["mountPath"] for m in agent["volumeMounts"]}
    assert {"/run/stockade", "/var/lib/stockade"} <= mounts
    install = next(c for c in pod["initContainers"] if c["name"] == "install-cni")
    script = install["command"][-1]
    assert "/host/opt/cni/bin/stockade-cni" in script
    assert "/host/etc/cni/net.d/10-stockade.conflist" in script
    # The kubelet expands $(NAME) in commands: the init scripts must not use that form.
    for c in pod["initContainers"]:
        assert "$(" not in c["command"][-1]


def test_the_agent_sees_what_the_thin_plugin_names_as_the_host_does() -> None:
    """The init container installs the thin plugin, which hands each call to the agent
    in its container; the agent serves it only where the call's files are the host's
    to it too (cni/thin.py): the socket, the configuration's data directory and the
    pods' network namespaces must be host paths mounted at their own paths."""
    pod = _objects()["DaemonSet", "stockade-agent"]["spec"]["template"]["spec"]
    install = next(c for c in pod["initContainers"] if c["name"] == "install-cni")
    script = install["command"][-1]
    assert "cp /opt/stockade/bin/stockade-cni-thin /host/opt/cni/bin/.stockade-cni.tmp" \
        in script
    containerfile = (DEPLOY / "Containerfile").read_text()
    assert "-static -o /opt/stockade/bin/stockade-cni-thin" in containerfile
    # its fallback: the Python plugin of the runtime copy the same script installs
    assert """-DSTOCKADE_CNI_PYTHON='"/opt/stockade/current/bin/stockade-cni"'""" \
        in containerfile
    assert "ln -sfn \"$new\" /host/opt/stockade/.current" in script
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    agent = pod["containers"][0]
    same = [m["mountPath"] for m in agent["volumeMounts"]
            if host.get(m["name"]) == m["mountPath"]]
    (plugin,) = json.loads((DEPLOY / "cni" / "10-stockade.conflist").read_text())["plugins"]
    for path in (plugin["dataDir"], plugin["socket"], "/run/netns/cni-1234"):
        assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in same), path
    netns = next(m for m in agent["volumeMounts"] if m["mountPath"] == "/run/netns")
    assert netns["mountPropagation"] == "HostToContainer"  # namespaces made after the start


def test_every_container_uses_the_project_image() -> None:
    for (kind, _), obj in _objects().items():
        if kind not in ("DaemonSet", "Deployment"):
            continue
        spec = obj["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert c["image"].startswith("ghcr.io/stockade/stockade:"), c["name"]


# ---- the CRD: its own schema, a structural schema, and MicroServices against it ---------

crd_only = pytest.mark.skipif(not CRD.exists(), reason="deploy/crd-microservice.yaml not there")


def _crd() -> dict[str, Any]:
    (crd,) = documents(CRD.read_text())
    return crd


def _version_schema() -> dict[str, Any]:
    (version,) = [v for v in _crd()["spec"]["versions"] if v["storage"]]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def structural_errors(node: dict[str, Any], path: str = "") -> list[str]:
    """The API server's structural-schema rules that a CRD must follow (a subset: the
    ones a hand-written schema breaks)."""
    errors: list[str] = []
    here = path or "<root>"
    special = node.get("x-kubernetes-int-or-string") or \
        node.get("x-kubernetes-preserve-unknown-fields")
    if "type" not in node and not special:
        errors.append(f"{here}: type is required")
    if "properties" in node and "additionalProperties" in node:
        errors.append(f"{here}: properties and additionalProperties are exclusive")
    for key in ("$ref", "definitions", "dependencies", "patternProperties", "id"):
        if key in node:
            errors.append(f"{here}: {key} is not allowed")
    if "default" in node:
        try:
            jsonschema.Draft4Validator(_without_defaults(node)).validate(node["default"])
        except jsonschema.ValidationError as e:
            errors.append(f"{here}: default is invalid: {e.message}")
    for name, child in node.get("properties", {}).items():
        errors += structural_errors(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        errors += structural_errors(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        errors += structural_errors(node["additionalProperties"], f"{path}{{}}")
    return errors


def _without_defaults(node: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if k != "default"}


def strict(node: dict[str, Any]) -> dict[str, Any]:
    """The schema as strict field validation applies it: unknown fields are errors
    (where the schema does not preserve them); `x-kubernetes-int-or-string` is an
    integer or a string."""
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node:
        out["properties"] = {k: strict(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(node.get("items"), dict):
        out["items"] = strict(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(node["additionalProperties"])
    return out


def microservice_errors(obj: dict[str, Any]) -> list[str]:
    schema = strict(_version_schema())
    validator = jsonschema.Draft4Validator(schema, format_checker=jsonschema.FormatChecker())
    return sorted(f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
                  for e in validator.iter_errors(obj))


@crd_only
def test_crd_matches_the_apiextensions_schema() -> None:
    assert schema_errors(_crd()) == []


@crd_only
def test_crd_schema_is_structural() -> None:
    crd = _crd()
    assert crd["spec"]["group"] == "stockade.io"
    assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.stockade.io"
    assert [v["name"] for v in crd["spec"]["versions"] if v["storage"]] == ["v1alpha1"]
    assert structural_errors(_version_schema()) == []
    assert structural_errors({"properties": {"a": {"type": "string", "default": 3}}}) == [
        "<root>: type is required", ".a: default is invalid: 3 is not of type 'string'"]


EXAMPLES = ROOT / "examples" / "microservices" / "services.yaml"


def _valid_examples() -> list[dict[str, Any]]:
    return [d for d in documents(EXAMPLES.read_text()) if d.get("kind") == "MicroService"]


@crd_only
def test_example_microservices_are_accepted() -> None:
    examples = _valid_examples()
    assert examples
    for obj in examples:
        assert microservice_errors(obj) == [], obj["metadata"]["name"]


def _service(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"selector": {"matchLabels": {"app": "x"}}}
    return {"apiVersion": "stockade.io/v1alpha1", "kind": "MicroService",
            "metadata": {"name": "x", "namespace": "shop"}, "spec": {**base, **spec}}


MALFORMED: dict[str, tuple[dict[str, Any], str]] = {
    "no spec": ({"apiVersion": "stockade.io/v1alpha1", "kind": "MicroService",
                 "metadata": {"name": "x"}}, "'spec' is a required property"),
    "no selector": ({**_service(), "spec": {"ports": []}}, "'selector' is a required property"),
    "port out of range": (_service(ports=[{"name": "http", "port": 70000}]),
                          "70000 is greater than the maximum of 65535"),
    "port as text": (_service(ports=[{"name": "http", "port": "80"}]),
                     "'80' is not of type 'integer'"),
    "unknown protocol": (_service(ports=[{"name": "http", "port": 80, "protocol": "ICMP"}]),
                         "'ICMP' is not one of"),
    "port name too long": (_service(ports=[{"name": "a-very-long-port-name", "port": 80}]),
                           "is too long"),
    "port without name": (_service(ports=[{"port": 80}]), "'name' is a required property"),
    "bad operator": (_service(selector={"matchExpressions": [{"key": "a", "operator": "Is"}]}),
                     "'Is' is not one of"),
    "dependency name": (_service(dependsOn=[{"name": "Not_A_Name"}]), "does not match"),
    "dependency port": (_service(dependsOn=[{"name": "db", "ports": [1.5]}]),
                        "is not valid under any of the given schemas"),
    "empty dependency ports": (_service(dependsOn=[{"name": "db", "ports": []}]),
                               "should be non-empty"),
    "unknown field": (_service(isolaton={"ingress": True}),
                      "Additional properties are not allowed ('isolaton' was unexpected)"),
    "isolation not boolean": (_service(isolation={"egress": "yes"}),
                              "'yes' is not of type 'boolean'"),
}


@crd_only
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_microservices_are_rejected(case: str) -> None:
    obj, message = MALFORMED[case]
    errors = microservice_errors(obj)
    assert any(message in e for e in errors), errors


def _container_args(kind: str, name: str) -> list[str]:
    obj = _objects()[kind, name]
    args: list[str] = obj["spec"]["template"]["spec"]["containers"][0]["args"]
    return args


def test_the_agent_s_arguments_are_the_agent_s_options() -> None:
    """The DaemonSet's arguments parse as `stockade agent`'s (the image's entry point)."""
    from stockade.cli.main import build_parser

    args = build_parser().parse_args(_container_args("DaemonSet", "stockade-agent"))
    assert args.command == "agent"
    assert args.datastore == "kubernetes"
    assert args.metrics_address == "0.0.0.0:9641"
    assert (args.state_dir, args.socket) == ("/var/lib/stockade", "/run/stockade/agent.sock")


def test_the_operator_s_arguments_are_the_operator_s_options() -> None:
    from stockade.cli.main import build_parser

    argv = _container_args("Deployment", "stockade-operator")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.skip("`stockade operator run` is not there yet (the operator's live loop)")
    assert (args.command, args.verb) == ("operator", "run")
