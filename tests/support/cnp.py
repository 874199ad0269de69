"""ClusterNetworkPolicy for the Kubernetes API test double (tests/support/kubeapi)."""

from __future__ import annotations

from typing import Any

# ClusterNetworkPolicy's CRD (policy.networking.k8s.io/v1alpha2, cluster-scoped), as the
# network-policy-api release installs it, less the schema (the double does not enforce
# one; the agent validates each object itself).
CNP_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "clusternetworkpolicies.policy.networking.k8s.io"},
    "spec": {"group": "policy.networking.k8s.io", "scope": "Cluster",
             "names": {"kind": "ClusterNetworkPolicy", "listKind": "ClusterNetworkPolicyList",
                       "plural": "clusternetworkpolicies",
                       "singular": "clusternetworkpolicy", "shortNames": ["cnp"]},
             "versions": [{"name": "v1alpha2", "served": True, "storage": True,
                           "subresources": {"status": {}},
                           "schema": {"openAPIV3Schema": {
                               "type": "object",
                               "x-kubernetes-preserve-unknown-fields": True}}}]}}
