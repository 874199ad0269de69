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
    CLUSTER_NETWORK_POLICIES,
    DAEMONSETS,
    NAMESPACES,
    NETWORK_POLICIES,
    NODES,
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
    """Namespaces, Pods, NetworkPolicies and ClusterNetworkPolicies as documents, and the
    pods left out."""

    namespaces: list[dict[str, Any]] = field(default_factory=list)
    pods: list[dict[str, Any]] = field(default_factory=list)
    policies: list[dict[str, Any]] = field(default_factory=list)
    # Cluster-scoped: every one, whatever the namespace read (they judge its pods too).
    cluster_policies: list[dict[str, Any]] = field(default_factory=list)
    # reason -> the pods (namespace/name) left out for it
    left_out: dict[str, list[str]] = field(default_factory=dict)

    def documents(self) -> list[dict[str, Any]]:
        return [*self.namespaces, *self.pods, *self.policies, *self.cluster_policies]


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
    every namespace when it is None, and every ClusterNetworkPolicy. A namespace that
    does not exist holds nothing."""
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
    out.cluster_policies = [as_document(CLUSTER_NETWORK_POLICIES, p)
                            for p in list_optional(client, CLUSTER_NETWORK_POLICIES)]
    return out


def list_optional(client: KubeClient, res: Resource) -> list[dict[str, Any]]:
    """Every object of ``res``; none when the server does not serve it (a CRD's
    resource before the CRD is installed answers 404)."""
    try:
        return client.list(res).items
    except KubeError as e:
        if res.optional and e.code == 404:
            return []
        raise


# ---- the CNI side: `kubectl stockade status` ------------------------------------------------
#
# Each agent serves GET /status on its metrics port (--metrics-address; the DaemonSet's
# container port named "metrics", host network) as one JSON object:
#
#   {"node": "node-1",                 the Node it runs on (spec.nodeName)
#    "ready": true,                    false while the kernel refuses its changes
#    "inSync": true,                   the kernel enforces the agent's whole state
#    "error": "",                      why not ready (optional)
#    "cniConfig": [                    /etc/cni/net.d as the runtime reads it: every
#      {"file": "10-stockade.conflist",  *.conflist/*.conf/*.json, sorted by name
#       "name": "stockade",              (the runtime takes the first), its network name
#       "plugins": ["stockade-cni"]}],   and its plugins' types in order
#    "features": {"inetForwardHook": true, ...},   the kernel feature probe, name -> present
#    "policies": {"ns/name": "<resourceVersion>"}} every NetworkPolicy it enforces, with the
#                                                  metadata.resourceVersion it enforces
#
# The plugin reaches it through the API server's pod proxy
# (/api/v1/namespaces/NS/pods/POD:PORT/proxy/status: works wherever kubectl does; needs
# get on pods/proxy in the agents' namespace), or with --direct at http://POD_IP:PORT/status
# (POD_IP is the node's address, since the agent is on the host network).

AGENT_LABEL = "app.kubernetes.io/name=stockade-agent"
AGENT_NAMESPACE = "stockade-system"
AGENT_DAEMONSET = "stockade-agent"
AGENT_PORT = 9641
AGENT_PORT_NAME = "metrics"
STOCKADE_CNI = "stockade-cni"


@dataclass
class NodeStatus:
    """One node: its agent pod, and what the agent said (or why it could not be asked)."""

    node: str
    pod: str = ""               # the agent pod's name ("" when none runs there)
    pod_ready: bool = False
    reached: bool = False
    error: str = ""             # why the agent could not be reached
    report: dict[str, Any] | None = None
    agreed: int | None = None   # the cluster's policies it enforces at their resourceVersion
    problems: list[str] = field(default_factory=list)


def _pod_ready(pod: dict[str, Any]) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or ():
        if isinstance(cond, dict) and cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def _agent_port(pod: dict[str, Any]) -> int:
    for c in (pod.get("spec") or {}).get("containers") or ():
        for p in (c or {}).get("ports") or ():
            if isinstance(p, dict) and p.get("name") == AGENT_PORT_NAME \
                    and isinstance(p.get("containerPort"), int):
                return int(p["containerPort"])
    return AGENT_PORT


def fetch_status(client: KubeClient, pod: dict[str, Any], *, port: int | None,
                 direct: bool, timeout: float = 5.0) -> dict[str, Any]:
    """The agent's /status, through the pod proxy, or directly at the pod's address."""
    meta = pod.get("metadata") or {}
    port = port or _agent_port(pod)
    if direct:
        import httpx

        ip = str((pod.get("status") or {}).get("podIP") or "")
        if not ip:
            raise KubeError(0, "NoAddress", "the agent pod has no address")
        host = f"[{ip}]" if ":" in ip else ip
        url = f"http://{host}:{port}/status"
        try:
            resp = httpx.get(url, timeout=timeout)
        except httpx.HTTPError as e:
            raise KubeError(0, "Unreachable", f"{url}: {e or type(e).__name__}") from e
        if resp.status_code != 200:
            raise KubeError(resp.status_code, "BadStatus", f"{url}: HTTP {resp.status_code}")
        try:
            data = resp.json()
        except ValueError as e:
            raise KubeError(200, "BadResponse", f"{url}: not JSON") from e
    else:
        # The pod's proxy subresource: GET .../pods/NAME:PORT/proxy/status.
        data = client.get(PODS, f"{meta.get('name')}:{port}/proxy/status",
                          str(meta.get("namespace") or AGENT_NAMESPACE))
        if data is None:
            raise KubeError(404, "NotFound", "the agent serves no /status")
    if not isinstance(data, dict):
        raise KubeError(200, "BadResponse", "/status is not a JSON object")
    return data


def report_problems(report: dict[str, Any], node: str) -> list[str]:
    """What an agent's /status says is wrong (its shape included), node and policies aside."""
    problems: list[str] = []
    if report.get("node") not in (None, node):
        problems.append(f"the agent says it runs on {report.get('node')!r}")
    if report.get("ready") is False:
        why = report.get("error")
        problems.append("the agent is not ready" + (f": {why}" if why else ""))
    if report.get("inSync") is not True:
        problems.append("the agent is not in sync (the kernel does not enforce its state)")
    cni = report.get("cniConfig")
    if not isinstance(cni, list):
        problems.append("the agent reports no cniConfig")
    elif not cni:
        problems.append("no CNI configuration in /etc/cni/net.d")
    else:
        first = cni[0] if isinstance(cni[0], dict) else {}
        if STOCKADE_CNI not in (first.get("plugins") or ()):
            problems.append(f"the container runtime uses {first.get('file', '?')} (the first "
                            f"CNI configuration), which does not call {STOCKADE_CNI}")
    features = report.get("features")
    if not isinstance(features, dict):
        problems.append("the agent reports no kernel features")
    else:
        missing = sorted(k for k, v in features.items() if v is not True)
        if missing:
            problems.append(f"kernel features missing: {', '.join(missing)}")
    if not isinstance(report.get("policies"), dict):
        problems.append("the agent reports no policies")
    return problems


def policy_differences(cluster: dict[str, str], enforced: dict[str, str]) -> list[str]:
    """The cluster's policies (key -> resourceVersion) against one agent's, one line each.

    A key with a slash is a NetworkPolicy's (ns/name), one without a
    ClusterNetworkPolicy's (its name: cluster-scoped)."""
    lines: list[str] = []
    for key in sorted(cluster.keys() | enforced.keys()):
        want, have = cluster.get(key), enforced.get(key)
        kind = "NetworkPolicy" if "/" in key else "ClusterNetworkPolicy"
        if have is None:
            lines.append(f"{kind} {key}: not enforced (the cluster has "
                         f"resourceVersion {want})")
        elif want is None:
            lines.append(f"{kind} {key}: enforced (resourceVersion {have}), "
                         "but not in the cluster")
        elif want != have:
            lines.append(f"{kind} {key}: enforces resourceVersion {have}, "
                         f"the cluster has {want}")
    return lines


def policy_versions(policies: list[dict[str, Any]]) -> dict[str, str]:
    """key -> resourceVersion: ns/name of a NetworkPolicy, the name of a cluster-scoped
    ClusterNetworkPolicy."""
    out: dict[str, str] = {}
    for p in policies:
        meta = p.get("metadata") or {}
        ns = meta.get("namespace")
        key = f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))
        out[key] = str(meta.get("resourceVersion"))
    return out


@dataclass
class ClusterStatus:
    daemonset: dict[str, Any] | None
    nodes: list[NodeStatus]
    policies: int               # NetworkPolicies compared
    agent_namespace: str

    @property
    def problems(self) -> int:
        return sum(len(n.problems) for n in self.nodes) + (self.daemonset is None)


def read_status(client: KubeClient, *, namespace: str | None,
                agent_namespace: str = AGENT_NAMESPACE, port: int | None = None,
                direct: bool = False, timeout: float = 5.0) -> ClusterStatus:
    """Every node, its agent, and the policies of `namespace` (None: all) against each
    agent's."""
    daemonset = client.get(DAEMONSETS, AGENT_DAEMONSET, agent_namespace)
    pods = client.list(PODS, agent_namespace, label_selector=AGENT_LABEL).items
    by_node: dict[str, dict[str, Any]] = {}
    for pod in pods:
        node = str((pod.get("spec") or {}).get("nodeName") or "")
        if node and (node not in by_node or _pod_ready(pod)):
            by_node[node] = pod
    cluster = policy_versions(client.list(NETWORK_POLICIES, namespace).items)
    if namespace is None:  # every policy: the cluster-scoped ones too
        cluster.update(policy_versions(list_optional(client, CLUSTER_NETWORK_POLICIES)))
    out: list[NodeStatus] = []
    for node in sorted(str((n.get("metadata") or {}).get("name"))
                       for n in client.list(NODES).items):
        ns = NodeStatus(node)
        out.append(ns)
        agent = by_node.get(node)
        if agent is None:
            ns.problems.append("no agent pod runs on this node")
            continue
        pod = agent
        ns.pod = str((pod.get("metadata") or {}).get("name"))
        ns.pod_ready = _pod_ready(pod)
        if not ns.pod_ready:
            ns.problems.append(f"agent pod {ns.pod} is not ready")
        try:
            ns.report = fetch_status(client, pod, port=port, direct=direct, timeout=timeout)
        except KubeError as e:
            ns.error = str(e)
            ns.problems.append(f"the agent cannot be reached, so its CNI configuration, "
                               f"kernel and policies are unknown: {e}")
            continue
        ns.reached = True
        ns.problems += report_problems(ns.report, node)
        enforced = ns.report.get("policies")
        if isinstance(enforced, dict):
            mine = {str(k): str(v) for k, v in enforced.items()
                    if namespace is None or str(k).startswith(f"{namespace}/")}
            ns.problems += policy_differences(cluster, mine)
            ns.agreed = sum(mine.get(k) == v for k, v in cluster.items())
    return ClusterStatus(daemonset, out, len(cluster), agent_namespace)
