"""A thin client of the Kubernetes API: list, watch, get, create, apply, delete on raw JSON.

Why our own, over httpx, rather than a client library's:

* **Relist on 410.** lightkube's ``watch`` answers ``410 Gone`` by restarting
  the watch from "now" (``wd.reset_version()`` in its generic_client.py) without
  listing again, so every deletion that happened while the watch was behind is
  lost. A policy engine cannot lose a deletion (a deleted pod's address would stay
  in a peer set), so ``watch`` here raises :class:`Gone` and the caller relists
  (``reflector.py``).
* **Raw dicts.** Objects stay the API's JSON (``dict``); no typed model is built,
  so 10,000 pods decode at the speed of ``json.loads``.
* **Import cost.** Measured here: lightkube 102 ms, kubernetes 173 ms, kr8s 175 ms,
  kopf 372 ms. lightkube is used only for what it does well, reading a kubeconfig
  (file, ``KUBECONFIG``, in-cluster service account) and authentication (token,
  token file re-read on 401, client certificates, exec credentials, basic), and
  it is imported lazily in :meth:`KubeClient.connect`, so the CLI and the CNI
  plugin never load it.

lightkube's own HTTP client is httpx2; its authentication flows are driven here
from an ``httpx.Auth`` (they only set headers and look at the status code), and
its TLS context (CA, client certificate) is passed as ``verify``.

Errors: every failure is a :class:`KubeError` with the HTTP status code, the
API's ``reason`` and ``message``; :class:`Gone` (410), :class:`Conflict` (409),
:class:`NotFound` (404) are subclasses, and a connection that fails or times
out is :class:`Unavailable` (code 0).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from stockade.errors import StockadeError

__all__ = [
    "DAEMONSETS",
    "EVENTS",
    "MICROSERVICES",
    "NAMESPACES",
    "NETWORK_POLICIES",
    "NODES",
    "PODS",
    "Conflict",
    "Gone",
    "KubeClient",
    "KubeError",
    "NotFound",
    "Page",
    "Resource",
    "Unavailable",
    "WatchEvent",
]

SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
USER_AGENT = "stockade/0.1"


@dataclass(frozen=True)
class Resource:
    """One kind of the API: where it lives (group "" is the core group)."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    # Served only once its CustomResourceDefinition is installed: a list answered 404
    # is an empty list (and is asked again), not a failure (see kube/reflector.py).
    optional: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        """The URL path: of the collection (all namespaces without ``namespace``), or one object."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace is not None:
            base = f"{base}/namespaces/{namespace}"
        elif not self.namespaced and namespace is not None:
            raise ValueError(f"{self.kind} is not namespaced")
        base = f"{base}/{self.plural}"
        return f"{base}/{name}" if name is not None else base


NAMESPACES = Resource("", "v1", "namespaces", "Namespace", False)
PODS = Resource("", "v1", "pods", "Pod", True)
NODES = Resource("", "v1", "nodes", "Node", False)
EVENTS = Resource("", "v1", "events", "Event", True)
NETWORK_POLICIES = Resource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True)
DAEMONSETS = Resource("apps", "v1", "daemonsets", "DaemonSet", True)
MICROSERVICES = Resource("stockade.io", "v1alpha1", "microservices", "MicroService", True)
CLUSTER_NETWORK_POLICIES = Resource("policy.networking.k8s.io", "v1alpha2",
                                    "clusternetworkpolicies", "ClusterNetworkPolicy", False,
                                    optional=True)


class KubeError(StockadeError):
    """The API refused or failed a request: HTTP status ``code``, the API's ``reason``
    (``NotFound``, ``Conflict``, ``Expired``, …) and its ``message``."""

    def __init__(self, code: int, reason: str, message: str, *, request: str = "") -> None:
        self.code = code
        self.reason = reason
        self.message = message
        self.request = request
        where = f"{request}: " if request else ""
        super().__init__(f"{where}{code} {reason}: {message}" if code else
                         f"{where}{reason}: {message}")


class Gone(KubeError):
    """410: the resourceVersion asked for is too old (compacted); list again."""


class Conflict(KubeError):
    """409: already exists, or a write lost a race (resourceVersion, SSA field owners)."""


class NotFound(KubeError):
    """404: no such object (or no such resource on this server)."""


class Unavailable(KubeError):
    """The API could not be reached, or did not answer in time (code 0)."""


_BY_CODE: dict[int, type[KubeError]] = {404: NotFound, 409: Conflict, 410: Gone}


def error_from_status(status: dict[str, Any], *, code: int = 0, request: str = "") -> KubeError:
    """The KubeError a ``Status`` object stands for (HTTP error bodies, watch ERROR events)."""
    code = int(status.get("code") or code)
    reason = str(status.get("reason") or "")
    message = str(status.get("message") or "")
    return _BY_CODE.get(code, KubeError)(code, reason or "Error", message, request=request)


def without_managed_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` without ``metadata.managedFields`` (changed in place): the field owners
    server-side apply records, about half of a pod's JSON, which nothing here reads
    (client-go's informers drop them the same way, with a transform)."""
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)
    return obj


@dataclass(frozen=True)
class Page:
    """A whole list (every page followed) and the resourceVersion to watch from."""

    items: list[dict[str, Any]]
    resource_version: str


@dataclass(frozen=True)
class WatchEvent:
    """ADDED, MODIFIED, DELETED or BOOKMARK, with the object (for BOOKMARK only its
    ``metadata.resourceVersion`` means something)."""

    type: str
    object: dict[str, Any]

    @property
    def resource_version(self) -> str:
        return str(self.object.get("metadata", {}).get("resourceVersion") or "")


class _AuthAdapter(httpx.Auth):
    """Drives an authentication flow of lightkube (an ``httpx2.Auth``) from httpx.

    The flows only set the Authorization header and look at the status code of the
    response (re-reading a token file or re-running an exec plugin on 401), which
    both libraries' Request and Response objects do alike.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        yield from self._inner.sync_auth_flow(request)


def in_cluster_available(service_account: str = SERVICE_ACCOUNT) -> bool:
    """Whether this process runs in a pod with a service account (in-cluster config)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and \
        Path(service_account, "token").is_file()


class KubeClient:
    """The API server at ``base_url``, over an ``httpx.Client`` (authentication and
    TLS included). Thread-safe: the reflector runs one watch per thread on it."""

    def __init__(self, http: httpx.Client, *, server: str = "") -> None:
        self._http = http
        self.server = server or str(http.base_url)

    # ----- construction

    @classmethod
    def connect(cls, kubeconfig: str | None = None, context: str | None = None, *,
                in_cluster: bool | None = None,
                service_account: str = SERVICE_ACCOUNT) -> KubeClient:
        """Connect like kubectl: ``kubeconfig`` if given, else ``$KUBECONFIG``, else
        ``~/.kube/config`` if it exists, else the in-cluster service account (token and
        CA in ``service_account``, ``KUBERNETES_SERVICE_HOST``/``_PORT``).

        ``in_cluster=True`` takes the service account first (what an agent running in
        a pod wants), ``False`` never takes it. Raises :class:`KubeError` (code 0,
        reason ``ConfigError``) when no configuration can be found or read.
        """
        # Lazy: lightkube costs ~100 ms of import; only this path pays for it.
        from lightkube.config.kubeconfig import KubeConfig
        from lightkube.core.exceptions import ConfigError

        try:
            if kubeconfig is None and in_cluster is not False and (
                    in_cluster or (not os.environ.get("KUBECONFIG")
                                   and not Path("~/.kube/config").expanduser().is_file())):
                if not in_cluster_available(service_account):
                    raise ConfigError(
                        "no kubeconfig (--kubeconfig, $KUBECONFIG, ~/.kube/config) and not "
                        f"in a cluster (KUBERNETES_SERVICE_HOST and {service_account}/token)")
                config = KubeConfig.from_service_account(service_account)
            else:
                path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] \
                    or "~/.kube/config"
                config = KubeConfig.from_file(path)
            single = config.get(context)
            if single is None:
                raise ConfigError("no context in the kubeconfig")
            http = _http_client(single)
        except (ConfigError, KeyError, TypeError, ValueError, OSError) as e:
            # KeyError/TypeError/ValueError: a kubeconfig of the wrong shape (lightkube
            # converts it without wrapping those); OSError: unreadable files, and
            # ssl.SSLError (a subclass) for certificates and keys that do not load.
            raise KubeError(0, "ConfigError", str(e) or type(e).__name__) from e
        return cls(http, server=single.cluster.server)

    @classmethod
    def for_transport(cls, transport: httpx.BaseTransport,
                      base_url: str = "http://kube.test") -> KubeClient:
        """A client over any transport (tests: ``httpx.MockTransport``)."""
        return cls(httpx.Client(base_url=base_url, transport=transport,
                                headers={"User-Agent": USER_AGENT}, timeout=_TIMEOUT))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KubeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- reads

    def list(self, res: Resource, namespace: str | None = None, *,
             label_selector: str | None = None, field_selector: str | None = None,
             limit: int = 500,
             transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Page:
        """Every object, following ``continue`` page by page (one consistent snapshot);
        the Page's resourceVersion is where a watch starts. An expired ``continue``
        token raises :class:`Gone`: list again from the start. ``transform`` is applied
        to each object as its page arrives (what is dropped there is never held for
        the whole list)."""
        params = _selectors(label_selector, field_selector)
        if limit:
            params["limit"] = str(limit)
        items: list[dict[str, Any]] = []
        path = res.path(namespace)
        while True:
            body = self._json("GET", path, params=params)
            page = body.get("items") or ()
            items.extend(map(transform, page) if transform is not None else page)
            meta = body.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                return Page(items, str(meta.get("resourceVersion") or ""))
            params["continue"] = str(token)

    def watch(self, res: Resource, namespace: str | None = None, *, resource_version: str,
              timeout_seconds: int = 300, label_selector: str | None = None,
              field_selector: str | None = None, bookmarks: bool = True,
              read_timeout: float | None = None) -> Iterator[WatchEvent]:
        """Events after ``resource_version``, until the server ends the watch
        (``timeoutSeconds``) or the connection drops (:class:`Unavailable`).

        An HTTP 410, or an ERROR event of code 410, raises :class:`Gone`; any other
        ERROR event raises its :class:`KubeError`. ``read_timeout`` bounds the wait for
        the next byte (default: ``timeout_seconds`` + 30 s); a server that sends
        nothing for that long, not even a bookmark, raises :class:`Unavailable`.
        """
        params = _selectors(label_selector, field_selector)
        params.update(watch="true", resourceVersion=resource_version,
                      timeoutSeconds=str(timeout_seconds))
        if bookmarks:
            params["allowWatchBookmarks"] = "true"
        rt = read_timeout if read_timeout is not None else timeout_seconds + 30.0
        timeout = httpx.Timeout(_TIMEOUT.connect or 10.0, read=rt, write=10.0, pool=10.0)
        path = res.path(namespace)
        where = f"watch {path}"
        try:
            with self._http.stream("GET", path, params=params, timeout=timeout) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise _response_error(resp, where)
                for line in resp.iter_lines():
                    if not line.strip():
                        continue
                    try:
                        raw = json.loads(line)
                        etype = str(raw["type"])
                        obj = raw["object"]
                        if not isinstance(obj, dict):
                            raise TypeError("object is not a mapping")
                    except (ValueError, KeyError, TypeError) as e:
                        # A torn or garbled line: the stream can no longer be trusted.
                        raise Unavailable(0, "BadWatchEvent", f"{e}: {line[:200]!r}",
                                          request=where) from e
                    if etype == "ERROR":
                        raise error_from_status(obj, request=where)
                    yield WatchEvent(etype, obj)
        except httpx.TimeoutException as e:
            raise Unavailable(0, "Timeout", f"nothing received for {rt:g} s",
                              request=where) from e
        except httpx.HTTPError as e:
            raise Unavailable(0, "ConnectionError", str(e) or type(e).__name__,
                              request=where) from e

    def get(self, res: Resource, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """One object, or None if there is none."""
        try:
            return self._json("GET", res.path(namespace, name))
        except NotFound:
            return None

    # ----- writes

    def create(self, res: Resource, obj: dict[str, Any]) -> dict[str, Any]:
        """POST a new object (namespace from its metadata); :class:`Conflict` if it exists."""
        return self._json("POST", res.path(_namespace_of(res, obj)), body=_with_kind(res, obj))

    def apply(self, res: Resource, obj: dict[str, Any], *, field_manager: str,
              force: bool = False) -> dict[str, Any]:
        """Server-side apply (``application/apply-patch+yaml``; JSON is valid YAML)."""
        name = str((obj.get("metadata") or {}).get("name") or "")
        if not name:
            raise ValueError("apply needs metadata.name")
        params = {"fieldManager": field_manager}
        if force:
            params["force"] = "true"
        return self._json("PATCH", res.path(_namespace_of(res, obj), name), params=params,
                          body=_with_kind(res, obj),
                          content_type="application/apply-patch+yaml")

    def patch_status(self, res: Resource, name: str, namespace: str | None,
                     status: dict[str, Any], *, field_manager: str) -> dict[str, Any]:
        """A JSON merge patch of ``status`` on the status subresource."""
        return self._json("PATCH", res.path(namespace, name) + "/status",
                          params={"fieldManager": field_manager}, body={"status": status},
                          content_type="application/merge-patch+json")

    def delete(self, res: Resource, name: str, namespace: str | None = None) -> None:
        """Delete one object; one already gone is not an error."""
        try:
            self._json("DELETE", res.path(namespace, name))
        except NotFound:
            return

    # ----- plumbing

    def _json(self, method: str, path: str, *, params: dict[str, str] | None = None,
              body: dict[str, Any] | None = None,
              content_type: str = "application/json") -> dict[str, Any]:
        where = f"{method} {path}"
        content = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
        headers = {"Content-Type": content_type} if content is not None else None
        try:
            resp = self._http.request(method, path, params=params, content=content,
                                      headers=headers)
        except httpx.TimeoutException as e:
            raise Unavailable(0, "Timeout", str(e) or "timed out", request=where) from e
        except httpx.HTTPError as e:
            raise Unavailable(0, "ConnectionError", str(e) or type(e).__name__,
                              request=where) from e
        if resp.status_code >= 400:
            raise _response_error(resp, where)
        try:
            data = json.loads(resp.content) if resp.content else {}
        except ValueError as e:
            raise KubeError(resp.status_code, "BadResponse", f"not JSON: {e}",
                            request=where) from e
        if not isinstance(data, dict):
            raise KubeError(resp.status_code, "BadResponse", "not a JSON object", request=where)
        return data


_TIMEOUT = httpx.Timeout(30.0, connect=10.0)


def _selectors(label_selector: str | None, field_selector: str | None) -> dict[str, str]:
    params: dict[str, str] = {}
    if label_selector:
        params["labelSelector"] = label_selector
    if field_selector:
        params["fieldSelector"] = field_selector
    return params


def _namespace_of(res: Resource, obj: dict[str, Any]) -> str | None:
    if not res.namespaced:
        return None
    ns = (obj.get("metadata") or {}).get("namespace")
    if not ns:
        raise ValueError(f"a {res.kind} needs metadata.namespace")
    return str(ns)


def _with_kind(res: Resource, obj: dict[str, Any]) -> dict[str, Any]:
    if obj.get("kind") and obj.get("apiVersion"):
        return obj
    return {"apiVersion": res.api_version, "kind": res.kind, **obj}


def _response_error(resp: httpx.Response, where: str) -> KubeError:
    try:
        status = json.loads(resp.content)
    except ValueError:
        status = None
    if not isinstance(status, dict) or status.get("kind") != "Status":
        text = resp.content.decode("utf-8", "replace").strip()[:300]
        status = {"code": resp.status_code, "reason": resp.reason_phrase, "message": text}
    status = {**status, "code": resp.status_code}
    return error_from_status(status, code=resp.status_code, request=where)


def _http_client(single: Any) -> httpx.Client:
    """An httpx.Client for one kubeconfig context, with lightkube's TLS and auth."""
    from lightkube.config.client_adapter import user_auth, verify_cluster
    from lightkube.config.models import User

    user = single.user
    verify: Any = True
    if single.cluster.server.startswith("https"):
        verify = verify_cluster(single.cluster, user or User(), single.abs_file)
    inner = user_auth(user) if user is not None else None
    auth = _AuthAdapter(inner) if inner is not None else None
    proxy: str | None = getattr(single.cluster, "proxy_url", None)
    return httpx.Client(base_url=single.cluster.server, verify=verify, auth=auth,
                        proxy=proxy, timeout=_TIMEOUT, trust_env=proxy is None,
                        headers={"User-Agent": USER_AGENT})

