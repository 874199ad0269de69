"""A Kubernetes API server TEST DOUBLE, in memory, for tests only (proven with the real kubectl).

``KubeAPI`` serves the Kubernetes REST API over plain HTTP on 127.0.0.1 (an
ephemeral port) from a thread, with an in-memory store. It is a test double: it
is never part of stockade, and it aims to be faithful wherever a client can
tell: tests/integration/test_kubeapi_double.py runs the real kubectl (1.32, and
Debian's 1.20) and plain HTTP clients against it. The package type-checks
under ``mypy --strict``.

Faithful:

* One global, monotonically increasing ``resourceVersion`` shared by every
  resource (etcd's revision); every object gets ``uid``, ``resourceVersion``,
  ``creationTimestamp``, ``generation`` (bumped when anything but metadata and
  status changes); no-op writes change nothing (no new resourceVersion, no event).
* Resources: v1 namespaces, pods, nodes, events, serviceaccounts, configmaps,
  secrets, services; networking.k8s.io/v1 networkpolicies; apps/v1 daemonsets,
  deployments; rbac.authorization.k8s.io/v1 (cluster)roles and (cluster)rolebindings;
  coordination.k8s.io/v1 leases; apiextensions.k8s.io/v1 customresourcedefinitions;
  authorization.k8s.io/v1 self-subject access and rules reviews (create only,
  never stored; they allow everything, which is the truth here: ``kubectl auth
  can-i`` says yes).
  Creating a CRD registers its resource at once (group, served versions, plural,
  kind, scope, short names, categories, status subresource, printer columns,
  selectable fields) with an ``Established`` condition; deleting it deletes its
  objects and unregisters it. The namespaces default, kube-system, kube-public
  and kube-node-lease exist; a namespaced object needs its namespace (404).
* Discovery (/version, /api, /api/v1, /apis, /apis/<g>, /apis/<g>/<v>) in the
  legacy format, answered as plain ``application/json`` even when the client
  asks for aggregated discovery first (client-go then falls back, as with an
  older server). /openapi/v3 and one document per group-version: minimal
  (see :func:`.resources.openapi_v3_document`): enough for ``kubectl apply`` to
  see that the server validates fields (``fieldValidation``) so that plain
  ``kubectl apply`` works without ``--validate=false``. /openapi/v2 is an empty
  document (protobuf), which older kubectl (1.20) needs to exist; kubectl then
  computes strategic merge patches from its compiled-in types.
* GET, LIST (label selectors: ``=``, ``==``, ``!=``, ``in``, ``notin``, exists,
  ``!key``; field selectors: the fields the real server supports per resource,
  else 400; ``limit``/``continue`` pagination consistent at the list's
  resourceVersion, computed from the event history; ``remainingItemCount``;
  ``resourceVersionMatch=Exact``), lists across namespaces, typed lists whose
  items carry no kind/apiVersion (custom resources' do), server-side tables
  (``Accept: ...;as=Table``: NAME, a few kind-specific columns, CRD printer
  columns, AGE) for ``kubectl get``, metadata-only answers (``Accept:
  ...;as=PartialObjectMetadata[List]``).
* WATCH: a chunked stream of JSON lines. From a resourceVersion: the events
  after it, from the history; absent or "0": synthetic ADDED for the current
  objects first; ``sendInitialEvents=true``: the same and a BOOKMARK annotated
  ``k8s.io/initial-events-end``; ``allowWatchBookmarks=true``: BOOKMARK events
  (kind, apiVersion, metadata.resourceVersion only) every ``bookmark_interval``
  seconds; ``timeoutSeconds`` ends the stream cleanly; label/field selectors
  apply, and an object that stops matching is sent as DELETED (the previous
  state at the event's resourceVersion), one that starts matching as ADDED, like
  the watch cache. A resourceVersion older than the last compaction: by default
  as the real server does (200, then an ERROR event with a 410 ``Expired``
  Status, then the end of the stream); ``KubeAPI(watch_gone="http")`` answers an
  HTTP 410 Status instead. A watch that falls behind a compaction gets the ERROR.
  The history keeps the last ``history_limit`` events (100,000 by default, in
  steps of a tenth; None keeps all), like etcd's periodic compaction.
* Writes: POST (409 AlreadyExists, ``generateName``), PUT (409 Conflict on a
  stale resourceVersion), DELETE (the object; preconditions; finalizers: marked
  with deletionTimestamp and removed when the last finalizer goes), deletecollection,
  PATCH as JSON patch and JSON merge patch (exact), strategic merge patch
  (approximated, see :mod:`.patch`), server-side apply (``fieldManager``
  required, ``force``; creates when absent; ``metadata.managedFields`` per
  manager in the real FieldsV1 format; an identical apply is a no-op; fields a
  manager stops applying are removed unless another manager owns them; a
  change to another manager's field is a 409 Conflict naming the fields unless
  ``force``); non-apply writes record ``Update`` managers and take ownership of
  what they change; a client that writes ``managedFields`` has them taken as
  given. /status subresources (PUT, PATCH, apply) for pods, nodes, namespaces,
  services, daemonsets, deployments, CRDs and custom resources declaring it;
  the main resource ignores ``status`` and the subresource everything else.
* Errors are ``kind: Status`` objects with reason, code and details: NotFound
  404, AlreadyExists/Conflict 409, Expired 410, BadRequest 400, Invalid 422
  (e.g. a missing or malformed name, a malformed CRD), UnsupportedMediaType 415,
  MethodNotAllowed 405.
* Garbage collection by ``ownerReferences``: deleting an owner deletes its
  dependents (recursively) whose owners are all gone, and removes the
  reference from those with another live owner; ``propagationPolicy=Orphan``
  (or ``orphanDependents``) removes the references and keeps the dependents;
  ``Foreground`` deletes dependents before the owner. By default the collector
  runs within the owner's DELETE (deterministic); ``KubeAPI(gc_delay=s)`` runs
  it ``s`` seconds later, per generation of dependents, like the real,
  asynchronous one (``collect_garbage()`` runs it at once). Deleting a namespace
  marks it Terminating, deletes what it holds, then the namespace. Deleting a
  CRD deletes its objects (DELETED events) and ends the watches on it.

Not implemented (on purpose): authentication and authorization (any token is
accepted and ignored), admission, defaulting beyond a namespace's phase and a
pod's ``status.phase: Pending``, validation beyond names, labels and CRDs (no
OpenAPI schema validation or pruning; ``fieldValidation`` is accepted and
ignored), version conversion (a CRD's versions share the objects, only
``apiVersion`` is rewritten), graceful deletion (pods go at once: there is no
kubelet), the scale subresource, protobuf responses (requests: only the bodies
kubectl's generators send for a few kinds are decoded, see :mod:`.protobuf`;
others get 415), HTTP/2, aggregated discovery, OpenAPI schemas, the watch-list
feature beyond ``sendInitialEvents``, ``resourceVersionMatch=NotOlderThan``
waits, and the real schemas:
server-side apply and strategic merge patch know associative lists only from
the small table in :mod:`.patch`.

Fault injection (methods of :class:`KubeAPI`): ``compact()``, ``drop_watches()``,
``stall_watches(seconds)``, ``delay(seconds)``, ``fail_next(n, code, verb=, resource=)``;
``count(verb, resource)`` counts requests; ``open_watches``/``wait_for_watches(n)``;
``internal_errors`` keeps the traceback of any bug of the double itself (answered
as a 500 InternalError Status), for a test to assert there was none.

Use::

    from tests.support.kubeapi import KubeAPI, kube_api_fixture

    kube_api = kube_api_fixture()          # a pytest fixture named kube_api

    def test_x(kube_api: KubeAPI, tmp_path: Path) -> None:
        cfg = kube_api.write_kubeconfig(tmp_path / "kubeconfig")
        kube_api.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}})

(or, in a conftest.py, ``from tests.support.kubeapi import kube_api``), or
``with KubeAPI() as api: ...``. :class:`Kubectl` runs the real kubectl against it::

    kubectl = Kubectl(kube_api.write_kubeconfig(tmp_path / "kubeconfig"))
    kubectl.run("apply", "-f", str(manifest))   # argv list, timeout, private cache dir

The Python helpers (``create``, ``get``, ``list``, ``update``, ``update_status``,
``patch``, ``apply``, ``delete``) call the same store methods as the HTTP
handlers, so they make the same events, resourceVersions and managedFields; they
take and return copies. Errors are :class:`ApiError` (``code``, ``reason``,
``message``, ``status()``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .errors import ApiError
from .resources import ResourceType
from .server import KubeAPI

__all__ = [
    "ApiError",
    "KubeAPI",
    "Kubectl",
    "ResourceType",
    "kube_api",
    "kube_api_fixture",
    "kubectl_path",
]


def kube_api_fixture(name: str = "kube_api", **options: Any) -> Callable[..., Iterator[KubeAPI]]:
    """A function-scoped pytest fixture (named ``name``) yielding a started :class:`KubeAPI`.

    Assign it at module level (``kube_api = kube_api_fixture()``) in a test
    module or conftest.py; ``options`` go to :class:`KubeAPI` (e.g.
    ``bookmark_interval=0.2``, ``watch_gone="http"``). The server is stopped and
    every thread joined at teardown.
    """

    def fixture() -> Iterator[KubeAPI]:
        with KubeAPI(**options) as api:
            yield api

    return pytest.fixture(name=name)(fixture)


# The fixture with default options, for a conftest.py to import:
#     from tests.support.kubeapi import kube_api  (with a noqa for F401: it is used by name)
kube_api = kube_api_fixture()


def kubectl_path() -> str | None:
    """The kubectl binary (``KUBECTL`` or the PATH's), or None."""
    return os.environ.get("KUBECTL") or shutil.which("kubectl")


class Kubectl:
    """The real kubectl, pointed at a kubeconfig, with a private discovery cache.

    Arguments are passed as a list (never through a shell); every call has a timeout.
    """

    def __init__(self, kubeconfig: Path, binary: str | None = None) -> None:
        found = binary or kubectl_path()
        if found is None:
            raise FileNotFoundError("kubectl")
        self.binary = found
        self.kubeconfig = kubeconfig
        self.cache_dir = kubeconfig.parent / f"{kubeconfig.name}.kubectl-cache"

    def argv(self, *args: str) -> list[str]:
        return [
            self.binary,
            f"--kubeconfig={self.kubeconfig}",
            f"--cache-dir={self.cache_dir}",
            *args,
        ]

    def run(
        self,
        *args: str,
        input: str | None = None,
        timeout: float = 60,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.argv(*args),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def cleanup(self) -> None:
        shutil.rmtree(self.cache_dir, ignore_errors=True)
