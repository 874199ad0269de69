"""The resource registry: built-in resources, CRD-defined ones, discovery, OpenAPI, tables.

A :class:`ResourceType` is one (group, version, plural). Objects are stored per
(group, plural) (:attr:`ResourceType.storage`), so every served version of a CRD
sees the same objects; no conversion is done (only ``apiVersion`` is rewritten).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .selectors import field_value

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
SUB_VERBS = ("get", "patch", "update")

# The field selectors the real server accepts, beyond metadata.name/metadata.namespace.
FIELD_LABELS: dict[tuple[str, str], frozenset[str]] = {
    ("", "pods"): frozenset(
        {
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        }
    ),
    ("", "events"): frozenset(
        {
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        }
    ),
    ("", "namespaces"): frozenset({"status.phase"}),
    ("", "nodes"): frozenset({"spec.unschedulable"}),
    ("", "secrets"): frozenset({"type"}),
}


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    subresources: frozenset[str] = frozenset()
    crd: str = ""  # the CRD's name when defined by one
    printer_columns: tuple[dict[str, Any], ...] = ()
    selectable_fields: frozenset[str] = frozenset()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def storage(self) -> tuple[str, str]:
        return (self.group, self.plural)

    @property
    def list_kind(self) -> str:
        return self.kind + "List"

    @property
    def qualified(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def field_labels(self) -> frozenset[str]:
        base = frozenset({"metadata.name", "metadata.namespace"})
        return base | FIELD_LABELS.get(self.storage, frozenset()) | self.selectable_fields

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        root = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            root += f"/namespaces/{namespace}"
        root += f"/{self.plural}"
        return root + (f"/{name}" if name else "")

    def api_resources(self) -> list[dict[str, Any]]:
        main: dict[str, Any] = {
            "name": self.plural,
            "singularName": self.singular or self.kind.lower(),
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": ["create"] if self.storage in REVIEWS else list(ALL_VERBS),
            "storageVersionHash": hashlib.sha256(self.qualified.encode()).hexdigest()[:11],
        }
        if self.short_names:
            main["shortNames"] = list(self.short_names)
        if self.categories:
            main["categories"] = list(self.categories)
        out = [main]
        for sub in sorted(self.subresources):
            out.append(
                {
                    "name": f"{self.plural}/{sub}",
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "kind": self.kind,
                    "verbs": list(SUB_VERBS),
                }
            )
        return out


def _rt(
    group: str,
    version: str,
    plural: str,
    kind: str,
    namespaced: bool,
    short: tuple[str, ...] = (),
    status: bool = False,
    categories: tuple[str, ...] = (),
) -> ResourceType:
    return ResourceType(
        group=group,
        version=version,
        plural=plural,
        kind=kind,
        namespaced=namespaced,
        singular=kind.lower(),
        short_names=short,
        categories=categories,
        subresources=frozenset({"status"}) if status else frozenset(),
    )


BUILTINS: tuple[ResourceType, ...] = (
    _rt("", "v1", "namespaces", "Namespace", False, ("ns",), status=True),
    _rt("", "v1", "pods", "Pod", True, ("po",), status=True, categories=("all",)),
    _rt("", "v1", "nodes", "Node", False, ("no",), status=True),
    _rt("", "v1", "events", "Event", True, ("ev",)),
    _rt("", "v1", "serviceaccounts", "ServiceAccount", True, ("sa",)),
    _rt("", "v1", "configmaps", "ConfigMap", True, ("cm",)),
    _rt("", "v1", "secrets", "Secret", True),
    _rt("", "v1", "services", "Service", True, ("svc",), status=True, categories=("all",)),
    _rt("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True, ("netpol",)),
    _rt("apps", "v1", "daemonsets", "DaemonSet", True, ("ds",), status=True, categories=("all",)),
    _rt(
        "apps",
        "v1",
        "deployments",
        "Deployment",
        True,
        ("deploy",),
        status=True,
        categories=("all",),
    ),
    _rt("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
    _rt("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
    _rt("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
    _rt("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
    _rt("coordination.k8s.io", "v1", "leases", "Lease", True),
    _rt("authorization.k8s.io", "v1", "selfsubjectaccessreviews", "SelfSubjectAccessReview", False),
    _rt("authorization.k8s.io", "v1", "selfsubjectrulesreviews", "SelfSubjectRulesReview", False),
    _rt(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        False,
        ("crd", "crds"),
        status=True,
    ),
)

CRD_STORAGE = ("apiextensions.k8s.io", "customresourcedefinitions")
# create-only resources answered at once and never stored (like the real server's)
REVIEWS = frozenset(
    {
        ("authorization.k8s.io", "selfsubjectaccessreviews"),
        ("authorization.k8s.io", "selfsubjectrulesreviews"),
    }
)
NAMESPACE_STORAGE = ("", "namespaces")


def types_from_crd(crd: dict[str, Any]) -> list[ResourceType]:
    """The resource types a CRD defines (one per served version)."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    out = []
    for v in spec.get("versions") or []:
        if not v.get("served", True):
            continue
        sub = v.get("subresources") or {}
        selectable = frozenset(
            str(f.get("jsonPath", "")).lstrip(".") for f in v.get("selectableFields") or []
        )
        out.append(
            ResourceType(
                group=spec["group"],
                version=v["name"],
                plural=names["plural"],
                kind=names["kind"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                singular=names.get("singular") or names["kind"].lower(),
                short_names=tuple(names.get("shortNames") or ()),
                categories=tuple(names.get("categories") or ()),
                subresources=frozenset(k for k in ("status", "scale") if k in sub),
                crd=crd["metadata"]["name"],
                printer_columns=tuple(v.get("additionalPrinterColumns") or ()),
                selectable_fields=selectable,
            )
        )
    return out


# --------------------------------------------------------------------------- discovery


def api_resource_list(group_version: str, types: list[ResourceType]) -> dict[str, Any]:
    resources: list[dict[str, Any]] = []
    for t in sorted(types, key=lambda t: t.plural):
        resources.extend(t.api_resources())
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }


def api_group(group: str, versions: list[str]) -> dict[str, Any]:
    vs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": vs,
        "preferredVersion": vs[0],
    }


# --------------------------------------------------------------------------- OpenAPI v3


_PATCH_TYPES = (
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/apply-patch+yaml",
)


def openapi_v3_document(types: list[ResourceType]) -> dict[str, Any]:
    """A minimal OpenAPI v3 document of one group-version.

    kubectl reads it to learn that the server validates fields itself (the PATCH
    operation of each kind declares the ``fieldValidation`` query parameter), so
    it sends ``fieldValidation=Strict`` instead of validating on the client
    against full schemas. The document lists no strategic-merge-patch body, so
    ``kubectl apply`` computes its strategic patches from its compiled-in types,
    as it does against servers without an OpenAPI v3 schema for the kind.
    """
    paths: dict[str, Any] = {}
    for t in types:
        gvk = {"group": t.group, "version": t.version, "kind": t.kind}
        params = [
            {
                "name": "fieldValidation",
                "in": "query",
                "schema": {"type": "string", "uniqueItems": True},
            },
            {
                "name": "fieldManager",
                "in": "query",
                "schema": {"type": "string", "uniqueItems": True},
            },
            {"name": "force", "in": "query", "schema": {"type": "boolean", "uniqueItems": True}},
            {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": True}},
        ]
        ref = {"$ref": f"#/components/schemas/{_schema_name(t)}"}
        op = {
            "x-kubernetes-group-version-kind": gvk,
            "x-kubernetes-action": "patch",
            "operationId": f"patch{t.kind}",
            "parameters": params,
            "requestBody": {
                "content": {ct: {"schema": {"type": "object"}} for ct in _PATCH_TYPES},
                "required": True,
            },
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": ref}}}
            },
        }
        item = t.path("{namespace}" if t.namespaced else None, "{name}")
        paths[item] = {
            "patch": op,
            "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
            ]
            + (
                [
                    {
                        "name": "namespace",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ]
                if t.namespaced
                else []
            ),
        }
    schemas = {
        _schema_name(t): {
            "type": "object",
            "x-kubernetes-group-version-kind": [
                {"group": t.group, "version": t.version, "kind": t.kind}
            ],
            "x-kubernetes-preserve-unknown-fields": True,
        }
        for t in types
    }
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def _schema_name(t: ResourceType) -> str:
    parts = list(reversed(t.group.split("."))) if t.group else ["io", "k8s", "api", "core"]
    return ".".join([*parts, t.version, t.kind])


# --------------------------------------------------------------------------- tables


def human_duration(seconds: float) -> str:
    """kubectl's duration.HumanDuration (the AGE column)."""
    s = int(seconds)
    if s < 0:
        s = 0
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    h = s // 3600
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    d = h // 24
    if h < 24 * 8:
        return f"{d}d{h % 24}h" if h % 24 else f"{d}d"
    if d < 365 * 2:
        return f"{d}d"
    return f"{d // 365}y"


def _age(obj: dict[str, Any], now: datetime) -> str:
    ts = obj.get("metadata", {}).get("creationTimestamp")
    if not ts:
        return "<unknown>"
    created = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return human_duration((now - created).total_seconds())


def _col(name: str, typ: str = "string", fmt: str = "", priority: int = 0) -> dict[str, Any]:
    return {"name": name, "type": typ, "format": fmt, "description": name, "priority": priority}


def _selector_text(sel: dict[str, Any] | None) -> str:
    if not sel:
        return "<none>"
    parts = [f"{k}={v}" for k, v in sorted((sel.get("matchLabels") or {}).items())]
    for e in sel.get("matchExpressions") or []:
        op = e.get("operator", "")
        if op in ("In", "NotIn"):
            parts.append(f"{e.get('key')} {op.lower()} ({','.join(e.get('values') or [])})")
        elif op == "Exists":
            parts.append(str(e.get("key")))
        else:
            parts.append(f"!{e.get('key')}")
    return ",".join(parts) or "<none>"


def _pod_cells(obj: dict[str, Any]) -> list[Any]:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    containers = spec.get("containers") or []
    statuses = status.get("containerStatuses") or []
    ready = sum(1 for s in statuses if s.get("ready"))
    restarts = sum(int(s.get("restartCount", 0)) for s in statuses)
    phase = status.get("phase") or "Pending"
    if obj.get("metadata", {}).get("deletionTimestamp"):
        phase = "Terminating"
    ip = status.get("podIP") or "<none>"
    node = spec.get("nodeName") or "<none>"
    return [f"{ready}/{len(containers)}", phase, restarts, AGE, ip, node, "<none>", "<none>"]


AGE = object()  # where a kind's cells put the age, when columns follow it (wide output)


def table_columns(t: ResourceType) -> tuple[list[dict[str, Any]], Any]:
    """The columns of a kind after NAME, and a function of an object giving their cells (the
    age last, unless the cells hold :data:`AGE` where it goes)."""
    if t.storage == ("", "pods"):
        return [
            _col("Ready"),
            _col("Status"),
            _col("Restarts", "integer"),
            _col("Age"),
            _col("IP", priority=1),
            _col("Node", priority=1),
            _col("Nominated Node", priority=1),
            _col("Readiness Gates", priority=1),
        ], _pod_cells
    if t.storage == ("", "namespaces"):
        return [_col("Status")], lambda o: [(o.get("status") or {}).get("phase", "Active")]
    if t.storage == ("networking.k8s.io", "networkpolicies"):
        return [_col("Pod-Selector")], lambda o: [
            _selector_text((o.get("spec") or {}).get("podSelector")).replace("<none>", "")
        ]
    if t.storage == ("", "configmaps"):
        return [_col("Data", "integer")], lambda o: [
            len(o.get("data") or {}) + len(o.get("binaryData") or {})
        ]
    if t.printer_columns:
        cols = [c for c in t.printer_columns if c.get("jsonPath") != ".metadata.creationTimestamp"]
        defs = [
            _col(c["name"], c.get("type", "string"), c.get("format", ""), c.get("priority", 0))
            for c in cols
        ]
        paths = [str(c.get("jsonPath", "")).lstrip(".") for c in cols]
        return defs, lambda o: [field_value(o, p) for p in paths]
    return [], lambda o: []


def to_table(
    t: ResourceType,
    objects: list[dict[str, Any]],
    include_object: str,
    list_meta: dict[str, Any] | None,
) -> dict[str, Any]:
    """The ``meta.k8s.io/v1 Table`` the server answers to ``Accept: ...;as=Table``."""
    now = datetime.now(UTC)
    extra_defs, cells = table_columns(t)
    age_inside = any(d["name"] == "Age" for d in extra_defs)
    defs = [_col("Name", fmt="name"), *extra_defs, *([] if age_inside else [_col("Age")])]
    rows = []
    for o in objects:
        age = _age(o, now)
        values = [age if c is AGE else c for c in cells(o)]
        row: dict[str, Any] = {
            "cells": [o["metadata"].get("name", ""), *values, *([] if age_inside else [age])]
        }
        if include_object == "Object":
            row["object"] = o
        elif include_object != "None":
            row["object"] = {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": o["metadata"],
            }
        rows.append(row)
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta or {},
        "columnDefinitions": defs,
        "rows": rows,
    }


@dataclass
class Registry:
    """Resource types by (group, version, plural); a generation counter for cache keys."""

    types: dict[tuple[str, str, str], ResourceType] = field(default_factory=dict)
    generation: int = 0

    def add(self, t: ResourceType) -> None:
        self.types[(t.group, t.version, t.plural)] = t
        self.generation += 1

    def remove_crd(self, crd_name: str) -> None:
        for key in [k for k, t in self.types.items() if t.crd == crd_name]:
            del self.types[key]
        self.generation += 1

    def lookup(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self.types.get((group, version, plural))

    def group_versions(self) -> dict[str, list[str]]:
        """group -> versions (in registration order), core group "" included."""
        out: dict[str, list[str]] = {}
        for t in self.types.values():
            vs = out.setdefault(t.group, [])
            if t.version not in vs:
                vs.append(t.version)
        return out

    def in_group_version(self, group: str, version: str) -> list[ResourceType]:
        return [t for t in self.types.values() if t.group == group and t.version == version]

    def resolve(self, name: str) -> ResourceType | None:
        """A type by plural, singular, kind, short name, ``plural.group`` or ``Kind.group``."""
        low = name.lower()
        for t in self.types.values():
            if low in (t.plural, t.singular, t.kind.lower(), t.qualified, *t.short_names):
                return t
            if t.group and low == f"{t.kind.lower()}.{t.group}":
                return t
        return None

    def by_kind(self, api_version: str, kind: str) -> ResourceType | None:
        group, _, version = api_version.rpartition("/")
        for t in self.types.values():
            if t.group == group and t.version == version and t.kind == kind:
                return t
        return None

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(sorted(self.types)).encode()).hexdigest()[:16].upper()
