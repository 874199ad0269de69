"""What a live cluster holds, as the documents a file would give (`kubectl stockade`).

The analyses read a cluster through the one decode path of files
(:func:`stockade.model.parse.decode_objects`): this module only lists Namespaces,
Pods and NetworkPolicies and turns each item into the document ``kubectl get -o
yaml`` would print. A list's items carry no ``apiVersion`` and ``kind`` (the list
has them), so they are put back; nothing else is changed.

Pods that NetworkPolicy does not govern are left out, each with its reason, since a
file of them would describe no enforceable endpoint:

* on the host network (``spec.hostNetwork``): NetworkPolicy never applies to them,
  and they share the node's address;
* finished (``status.phase`` Succeeded or Failed): their address is released;
* without an address yet (``status.podIP`` empty: pending, or being created).

Also here: which kubeconfig context and namespace a command uses, read as kubectl
reads them (``--kubeconfig``, else ``$KUBECONFIG``'s first file, else
``~/.kube/config``, else the in-cluster service account).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stockade.kube.client import (
    NAMESPACES,
    NETWORK_POLICIES,
    PODS,
    SERVICE_ACCOUNT,
    KubeClient,
    KubeError,
    Resource,
)

HOST_NETWORK = "on the host network"
FINISHED = "finished"
NO_ADDRESS = "without an address yet"


@dataclass(frozen=True)
class Context:
    """The kubeconfig context a command talks to, and its default namespace."""

    name: str
    namespace: str


def kube_context(kubeconfig: str | None = None, context: str | None = None, *,
                 service_account: str = SERVICE_ACCOUNT) -> Context:
    """The context ``KubeClient.connect(kubeconfig, context)`` uses, with its namespace
    (``default`` when the context names none)."""
    # Lazy, as in KubeClient.connect: only the Kubernetes path pays for lightkube.
    from lightkube.config.kubeconfig import KubeConfig
    from lightkube.core.exceptions import ConfigError

    path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
    if path is None and not Path("~/.kube/config").expanduser().is_file():
        ns_file = Path(service_account, "namespace")
        ns = ns_file.read_text().strip() if ns_file.is_file() else ""
        return Context("in-cluster", ns or "default")
    try:
        single = KubeConfig.from_file(path or "~/.kube/config").get(context)
    except (ConfigError, KeyError, TypeError, ValueError, OSError) as e:
        raise KubeError(0, "ConfigError", str(e) or type(e).__name__) from e
    if single is None:
        raise KubeError(0, "ConfigError", "no context in the kubeconfig")
    return Context(single.context_name, single.namespace)


@dataclass
class ClusterDocuments:
    """Namespaces, Pods and NetworkPolicies as documents, and the pods left out."""

    namespaces: list[dict[str, Any]] = field(default_factory=list)
    pods: list[dict[str, Any]] = field(default_factory=list)
    policies: list[dict[str, Any]] = field(default_factory=list)
    # reason -> the pods (namespace/name) left out for it
    left_out: dict[str, list[str]] = field(default_factory=dict)

    def documents(self) -> list[dict[str, Any]]:
        return [*self.namespaces, *self.pods, *self.policies]


def as_document(res: Resource, item: dict[str, Any]) -> dict[str, Any]:
    """A listed item as a file holds it: ``apiVersion`` and ``kind`` first."""
    rest = {k: v for k, v in item.items() if k not in ("apiVersion", "kind")}
    return {"apiVersion": res.api_version, "kind": res.kind, **rest}


def left_out_reason(pod: dict[str, Any]) -> str | None:
    """Why NetworkPolicy does not govern this pod (None: it does)."""
    spec = pod.get("spec") if isinstance(pod.get("spec"), dict) else {}
    status = pod.get("status") if isinstance(pod.get("status"), dict) else {}
    assert isinstance(spec, dict) and isinstance(status, dict)
    if spec.get("hostNetwork") is True:
        return HOST_NETWORK
    if status.get("phase") in ("Succeeded", "Failed"):
        return FINISHED
    if not status.get("podIP") and not status.get("podIPs"):
        return NO_ADDRESS
    return None


def pod_key(pod: dict[str, Any]) -> str:
    meta = pod.get("metadata") if isinstance(pod.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    return f"{meta.get('namespace') or 'default'}/{meta.get('name') or '?'}"


def read_cluster(client: KubeClient, namespace: str | None) -> ClusterDocuments:
    """The objects of ``namespace`` (its Namespace, Pods and NetworkPolicies), or of
    every namespace when it is None. A namespace that does not exist holds nothing."""
    out = ClusterDocuments()
    if namespace is None:
        out.namespaces = [as_document(NAMESPACES, ns) for ns in client.list(NAMESPACES).items]
    else:
        ns = client.get(NAMESPACES, namespace)
        if ns is None:
            return out
        out.namespaces = [as_document(NAMESPACES, ns)]
    for pod in client.list(PODS, namespace).items:
        reason = left_out_reason(pod)
        if reason is None:
            out.pods.append(as_document(PODS, pod))
        else:
            out.left_out.setdefault(reason, []).append(pod_key(pod))
    out.policies = [as_document(NETWORK_POLICIES, p)
                    for p in client.list(NETWORK_POLICIES, namespace).items]
    return out
