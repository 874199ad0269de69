"""The thin Kubernetes client over httpx.MockTransport: paths, paging, watch streams,
errors as the API sends them, writes, kubeconfig loading and authentication."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from stockade.kube.client import (
    MICROSERVICES,
    NAMESPACES,
    NETWORK_POLICIES,
    PODS,
    Conflict,
    Gone,
    KubeClient,
    KubeError,
    NotFound,
    Unavailable,
)

Handler = Callable[[httpx.Request], httpx.Response]


def client(handler: Handler) -> KubeClient:
    return KubeClient.for_transport(httpx.MockTransport(handler))


def status(code: int, reason: str, message: str) -> httpx.Response:
    return httpx.Response(code, json={"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                      "code": code, "reason": reason, "message": message})


def stream(*events: dict[str, Any]) -> httpx.Response:
    body = b"".join(json.dumps(e).encode() + b"\n" for e in events)
    return httpx.Response(200, content=body)


def test_paths() -> None:
    assert PODS.path() == "/api/v1/pods"
    assert PODS.path("ns") == "/api/v1/namespaces/ns/pods"
    assert PODS.path("ns", "p") == "/api/v1/namespaces/ns/pods/p"
    assert NAMESPACES.path(name="ns") == "/api/v1/namespaces/ns"
    assert NETWORK_POLICIES.path("a", "b") == \
        "/apis/networking.k8s.io/v1/namespaces/a/networkpolicies/b"
    assert MICROSERVICES.api_version == "stockade.io/v1alpha1"
    with pytest.raises(ValueError):
        NAMESPACES.path("ns")


def test_list_follows_continue() -> None:
    seen: list[dict[str, str]] = []

    def handler(req: httpx.Request) -> httpx.Response:
        params = dict(req.url.params)
        seen.append(params)
        if "continue" not in params:
            return httpx.Response(200, json={"metadata": {"continue": "t1", "resourceVersion": "7"},
                                             "items": [{"metadata": {"name": "a"}}]})
        return httpx.Response(200, json={"metadata": {"resourceVersion": "7"},
                                         "items": [{"metadata": {"name": "b"}}]})

    page = client(handler).list(PODS, label_selector="x=y", limit=1)
    assert [i["metadata"]["name"] for i in page.items] == ["a", "b"]
    assert page.resource_version == "7"
    assert seen[0] == {"labelSelector": "x=y", "limit": "1"}
    assert seen[1]["continue"] == "t1"


def test_list_expired_continue_is_gone() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        if "continue" in req.url.params:
            return status(410, "Expired", "The provided continue parameter is too old")
        return httpx.Response(200, json={"metadata": {"continue": "t", "resourceVersion": "1"},
                                         "items": []})

    with pytest.raises(Gone) as e:
        client(handler).list(PODS)
    assert e.value.code == 410 and e.value.reason == "Expired"


def test_watch_params_and_events() -> None:
    captured: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        captured.append(req)
        return stream({"type": "ADDED", "object": {"metadata": {"name": "a",
                                                                "resourceVersion": "8"}}},
                      {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}})

    events = list(client(handler).watch(PODS, resource_version="7", timeout_seconds=5))
    assert [(e.type, e.resource_version) for e in events] == [("ADDED", "8"), ("BOOKMARK", "9")]
    params = dict(captured[0].url.params)
    assert params == {"watch": "true", "resourceVersion": "7", "timeoutSeconds": "5",
                      "allowWatchBookmarks": "true"}


def test_watch_error_event_410_is_gone() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        return stream({"type": "ADDED", "object": {"metadata": {"name": "a"}}},
                      {"type": "ERROR", "object": {"kind": "Status", "code": 410,
                                                   "reason": "Expired", "message": "too old"}})

    it = client(handler).watch(PODS, resource_version="1")
    assert next(it).type == "ADDED"
    with pytest.raises(Gone):
        next(it)


def test_watch_http_410_is_gone() -> None:
    with pytest.raises(Gone):
        list(client(lambda r: status(410, "Gone", "too old")).watch(PODS, resource_version="1"))


def test_watch_other_error_event() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        return stream({"type": "ERROR", "object": {"kind": "Status", "code": 500,
                                                   "reason": "InternalError", "message": "x"}})

    with pytest.raises(KubeError) as e:
        list(client(handler).watch(PODS, resource_version="1"))
    assert e.value.code == 500 and not isinstance(e.value, Gone)


def test_watch_torn_line_is_unavailable() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b'{"type": "ADDED", "obj')

    with pytest.raises(Unavailable):
        list(client(handler).watch(PODS, resource_version="1"))


def test_connection_errors_are_unavailable() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=req)

    with pytest.raises(Unavailable) as e:
        client(handler).list(PODS)
    assert e.value.code == 0

    def slow(req: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=req)

    with pytest.raises(Unavailable):
        list(client(slow).watch(PODS, resource_version="1"))


def test_errors_are_distinguishable() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        if req.method == "POST":
            return status(409, "AlreadyExists", 'pods "a" already exists')
        if req.method == "GET":
            return status(404, "NotFound", "nope")
        return httpx.Response(502, content=b"<html>bad gateway</html>")

    c = client(handler)
    with pytest.raises(Conflict) as e:
        c.create(PODS, {"metadata": {"name": "a", "namespace": "n"}})
    assert e.value.reason == "AlreadyExists" and "already exists" in str(e.value)
    assert c.get(PODS, "a", "n") is None
    with pytest.raises(KubeError) as e2:
        c.patch_status(PODS, "a", "n", {}, field_manager="m")
    assert e2.value.code == 502 and "bad gateway" in e2.value.message
    assert not isinstance(NotFound(404, "", ""), Gone)


def test_writes() -> None:
    captured: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        captured.append(req)
        if req.method == "DELETE":
            return status(404, "NotFound", "gone already")
        return httpx.Response(200, json=json.loads(req.content))

    c = client(handler)
    obj = {"metadata": {"name": "p", "namespace": "n"}, "spec": {}}
    created = c.create(NETWORK_POLICIES, obj)
    assert created["kind"] == "NetworkPolicy"
    assert created["apiVersion"] == "networking.k8s.io/v1"
    c.apply(MICROSERVICES, obj, field_manager="stockade", force=True)
    c.patch_status(MICROSERVICES, "p", "n", {"ready": True}, field_manager="stockade")
    c.delete(PODS, "p", "n")
    post, apply, patch, delete = captured
    assert post.method == "POST" and post.url.path.endswith("/namespaces/n/networkpolicies")
    assert apply.method == "PATCH"
    assert apply.headers["content-type"] == "application/apply-patch+yaml"
    assert dict(apply.url.params) == {"fieldManager": "stockade", "force": "true"}
    assert apply.url.path == "/apis/stockade.io/v1alpha1/namespaces/n/microservices/p"
    assert patch.headers["content-type"] == "application/merge-patch+json"
    assert patch.url.path.endswith("/microservices/p/status")
    assert json.loads(patch.content) == {"status": {"ready": True}}
    assert delete.method == "DELETE"


def kubeconfig(tmp_path: Path, server: str, user: dict[str, Any]) -> Path:
    path = tmp_path / "config"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": server}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "users": [{"name": "u", "user": user}],
    }))
    return path


def test_connect_token_kubeconfig(tmp_path: Path) -> None:
    c = KubeClient.connect(str(kubeconfig(tmp_path, "http://127.0.0.1:1", {"token": "T"})))
    assert c.server == "http://127.0.0.1:1"
    auth = c._http.auth
    req = httpx.Request("GET", "http://127.0.0.1:1/api")
    flow = auth.sync_auth_flow(req)
    assert next(flow).headers["Authorization"] == "Bearer T"
    c.close()


def test_connect_exec_credentials(tmp_path: Path) -> None:
    script = tmp_path / "cred"
    script.write_text("#!/bin/sh\necho '{\"status\": {\"token\": \"EXEC\"}}'\n")
    script.chmod(0o755)
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1",
                     "command": str(script)}}
    c = KubeClient.connect(str(kubeconfig(tmp_path, "http://127.0.0.1:1", user)))
    flow = c._http.auth.sync_auth_flow(httpx.Request("GET", "http://127.0.0.1:1/api"))
    assert next(flow).headers["Authorization"] == "Bearer EXEC"


def test_connect_in_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("SA\n")
    (tmp_path / "namespace").write_text("kube-system")
    ca = tmp_path / "ca.crt"
    ca.write_text("")  # not read: verification context built lazily below is patched
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    import lightkube.config.client_adapter as adapter

    monkeypatch.setattr(adapter, "verify_cluster", lambda *a, **k: False)
    c = KubeClient.connect(in_cluster=True, service_account=str(tmp_path))
    assert c.server == "https://10.0.0.1:443"
    flow = c._http.auth.sync_auth_flow(httpx.Request("GET", "https://10.0.0.1/api"))
    assert next(flow).headers["Authorization"] == "Bearer SA"


def test_connect_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KubeError) as e:
        KubeClient.connect(str(tmp_path / "missing"))
    assert e.value.reason == "ConfigError"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeError):
        KubeClient.connect(in_cluster=True, service_account=str(tmp_path))
    bad = tmp_path / "bad"
    bad.write_text("clusters: 3\n")
    with pytest.raises(KubeError):
        KubeClient.connect(str(bad))


def test_client_certificate_kubeconfig(tmp_path: Path) -> None:
    import subprocess

    key, crt = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj",
                    "/CN=stockade", "-days", "1", "-keyout", str(key), "-out", str(crt)],
                   check=True, capture_output=True)
    user = {"client-certificate-data": base64.b64encode(crt.read_bytes()).decode(),
            "client-key-data": base64.b64encode(key.read_bytes()).decode()}
    cluster_ca = base64.b64encode(crt.read_bytes()).decode()
    path = tmp_path / "config"
    path.write_text(json.dumps({
        "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:1",
                                               "certificate-authority-data": cluster_ca}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "users": [{"name": "u", "user": user}],
    }))
    c = KubeClient.connect(str(path))
    assert c.server == "https://127.0.0.1:1"
    c.close()
    # A key that does not load is a configuration error, not a traceback.
    user["client-key-data"] = base64.b64encode(b"garbage").decode()
    path.write_text(json.dumps({
        "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:1"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "users": [{"name": "u", "user": user}],
    }))
    with pytest.raises(KubeError) as e:
        KubeClient.connect(str(path))
    assert e.value.reason == "ConfigError"


def test_the_cli_the_plugin_and_the_agent_do_not_import_the_kubernetes_client() -> None:
    """httpx and lightkube cost ~100 ms each: only the kubernetes path loads them."""
    import subprocess
    import sys

    code = ("import sys, stockade.cli.main, stockade.cni.plugin, stockade.agent.daemon; "
            "print(sorted(m for m in ('httpx', 'httpx2', 'lightkube') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def _cert(tmp: Path, name: str, san: str = "") -> tuple[Path, Path]:
    import subprocess

    key, crt = tmp / f"{name}.key", tmp / f"{name}.crt"
    cmd = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
           "-nodes", "-subj", f"/CN={name}", "-days", "1", "-keyout", str(key), "-out", str(crt)]
    if san:
        cmd += ["-addext", f"subjectAltName={san}"]
    subprocess.run(cmd, check=True, capture_output=True)
    return crt, key


def _https_server(tmp: Path, client_ca: Path | None) -> tuple[Any, list[dict[str, str]]]:
    """A tiny HTTPS API on 127.0.0.1 answering a pod list; records request headers."""
    import http.server
    import ssl
    import threading

    crt, key = _cert(tmp, "server", "IP:127.0.0.1")
    seen: list[dict[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(dict(self.headers))
            body = json.dumps({"kind": "PodList", "metadata": {"resourceVersion": "5"},
                               "items": [{"metadata": {"name": "a"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.ca = crt  # type: ignore[attr-defined]
    return server, seen


def _config(tmp: Path, server: Any, user: dict[str, Any]) -> str:
    path = tmp / "kubeconfig"
    path.write_text(json.dumps({
        "current-context": "c",
        "clusters": [{"name": "k", "cluster": {
            "server": f"https://127.0.0.1:{server.server_address[1]}",
            "certificate-authority-data": base64.b64encode(server.ca.read_bytes()).decode()}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "users": [{"name": "u", "user": user}],
    }))
    return str(path)


def test_https_with_a_token(tmp_path: Path) -> None:
    server, seen = _https_server(tmp_path, None)
    try:
        with KubeClient.connect(_config(tmp_path, server, {"token": "T0K"})) as c:
            assert [i["metadata"]["name"] for i in c.list(PODS).items] == ["a"]
        assert seen[0]["Authorization"] == "Bearer T0K"
    finally:
        server.shutdown()


def test_https_with_client_certificates(tmp_path: Path) -> None:
    crt, key = _cert(tmp_path, "client")
    server, seen = _https_server(tmp_path, crt)
    try:
        user = {"client-certificate-data": base64.b64encode(crt.read_bytes()).decode(),
                "client-key-data": base64.b64encode(key.read_bytes()).decode()}
        with KubeClient.connect(_config(tmp_path, server, user)) as c:
            assert c.list(PODS).resource_version == "5"
        assert "Authorization" not in seen[0]
        # Without the certificate the server refuses the handshake: Unavailable.
        with KubeClient.connect(_config(tmp_path, server, {"token": "x"})) as c, \
                pytest.raises(Unavailable):
            c.list(PODS)
    finally:
        server.shutdown()
