"""The in-memory storage: objects, one global resourceVersion, the event history, watches.

Like etcd behind the real server, every write takes the next value of one
counter that all resources share; each write is appended to an event history
(with the object before the write, which is what lets a list be continued
consistently "as of" its resourceVersion and a selector-filtered watch send
DELETED when an object stops matching). :meth:`Store.compact` forgets the
history, after which older resourceVersions answer ``410 Gone``.

Stored objects are never mutated once stored: a write builds a new top-level
dict and a new ``metadata`` dict and shares the untouched subtrees with the
previous version. Readers may therefore encode what they get without copying,
outside the lock; the Python API of :class:`~.server.KubeAPI` hands out copies.
"""

from __future__ import annotations

import base64
import bisect
import builtins
import copy
import json
import re
import secrets
import string
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from . import patch as P
from .errors import (
    MODIFIED,
    ApiError,
    already_exists,
    bad_request,
    conflict,
    gone,
    invalid,
    not_found,
)
from .resources import (
    BUILTINS,
    CRD_STORAGE,
    NAMESPACE_STORAGE,
    Registry,
    ResourceType,
    types_from_crd,
)
from .selectors import Predicate

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects
Storage = tuple[str, str]  # (group, plural)

DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
GC_MANAGER = "garbage-collector"

_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Event:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    storage: Storage
    key: Key
    obj: Obj
    prev: Obj | None


@dataclass
class ListResult:
    items: list[Obj]
    resource_version: int
    continue_token: str = ""
    remaining: int | None = None


@dataclass
class Faults:
    """Watch faults, read by every open watch (under the store's lock)."""

    drop_generation: int = 0
    stall_until: float = 0.0  # time.monotonic()
    stopping: bool = False


def _encode_continue(rv: int, start: str) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_continue(token: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        doc = json.loads(raw)
        return int(doc["rv"]), str(doc["start"])
    except (ValueError, KeyError, TypeError) as e:
        raise bad_request(f"continue key is not valid: {e}") from None


def _sort_key(key: Key) -> str:
    return f"{key[0]}/{key[1]}" if key[0] else key[1]


def owner_uids(obj: Obj | None) -> set[str]:
    if not obj:
        return set()
    return {r.get("uid", "") for r in obj.get("metadata", {}).get("ownerReferences") or []}


def _strip_for_compare(obj: Obj) -> Obj:
    meta = {
        k: v
        for k, v in obj.get("metadata", {}).items()
        if k not in ("managedFields", "resourceVersion")
    }
    return {**obj, "metadata": meta}


def _spec_of(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


class Store:
    """Objects by resource, the event history and the condition every watch waits on."""

    def __init__(self, history_limit: int | None = 100_000) -> None:
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.registry = Registry()
        for t in BUILTINS:
            self.registry.add(t)
        self.objects: dict[Storage, dict[Key, Obj]] = defaultdict(dict)
        self.rv = 0
        self.events: list[Event] = []
        self.compacted = 0
        self.history_limit = history_limit
        self.faults = Faults()
        self._owners: dict[str, set[tuple[Storage, Key]]] = defaultdict(set)
        # > 0: the garbage collector runs that long after an owner goes (KubeAPI's thread)
        self.gc_delay = 0.0
        self.gc_pending: list[tuple[float, str]] = []  # (time.monotonic() due, owner uid)
        # The sorted snapshots of the last lists, by (storage, resourceVersion): each page
        # of a paginated list continues one, as the API server's range read on etcd does,
        # instead of rebuilding and sorting the whole resource per page (quadratic).
        self._snapshots: dict[tuple[Storage, int], builtins.list[tuple[str, Obj]]] = {}
        ns_type = self.registry.lookup("", "v1", "namespaces")
        assert ns_type is not None
        for ns in DEFAULT_NAMESPACES:
            self.create(ns_type, "", {"metadata": {"name": ns}}, manager="kube-apiserver")

    # ------------------------------------------------------------------ helpers

    def _commit(
        self, t: ResourceType, key: Key, obj: Obj | None, type_: str, prev: Obj | None
    ) -> Obj:
        """Store (or remove) one object under the next resourceVersion and record the event."""
        self.rv += 1
        rv = self.rv
        store = self.objects[t.storage]
        if type_ == "DELETED":
            assert prev is not None
            store.pop(key, None)
            ev_obj = {**prev, "metadata": {**prev["metadata"], "resourceVersion": str(rv)}}
        else:
            assert obj is not None
            obj["metadata"]["resourceVersion"] = str(rv)
            store[key] = obj
            ev_obj = obj
        old_owners, new_owners = owner_uids(prev), owner_uids(obj if type_ != "DELETED" else None)
        for uid in old_owners - new_owners:
            self._owners[uid].discard((t.storage, key))
        for uid in new_owners - old_owners:
            self._owners[uid].add((t.storage, key))
        self.events.append(Event(rv, type_, t.storage, key, ev_obj, prev))
        limit = self.history_limit
        if limit is not None and len(self.events) > limit + limit // 10:
            # compacted in steps of a tenth, as a slice off the front of a list costs O(n)
            drop = len(self.events) - limit
            self.compacted = self.events[drop - 1].rv
            del self.events[:drop]
        self.cond.notify_all()
        return ev_obj

    def compact(self) -> int:
        """Forget the history: every resourceVersion older than the current one is now too old."""
        with self.lock:
            self.compacted = self.rv
            self.events.clear()
            self.cond.notify_all()
            return self.rv

    def type_for(self, t: ResourceType) -> ResourceType:
        """The registered type (a CRD may have been deleted meanwhile)."""
        cur = self.registry.lookup(t.group, t.version, t.plural)
        if cur is None:
            raise not_found(t.group, t.plural, "")
        return cur

    def _check_namespace(self, t: ResourceType, namespace: str) -> None:
        if t.namespaced:
            if not namespace:
                raise bad_request(
                    "the server could not find the requested resource: a namespace is required"
                )
            if ("", namespace) not in self.objects[NAMESPACE_STORAGE]:
                raise not_found("", "namespaces", namespace)

    def _validate(
        self, t: ResourceType, obj: Obj, namespace: str, name_from_path: str | None
    ) -> None:
        if not isinstance(obj, dict):
            raise bad_request("the body of the request is not a JSON object")
        kind, api_version = obj.get("kind"), obj.get("apiVersion")
        if kind is None:
            obj["kind"] = t.kind
        elif kind != t.kind:
            raise bad_request(
                f"the kind of the body ({kind}) does not match the resource ({t.kind})"
            )
        if api_version is None:
            obj["apiVersion"] = t.api_version
        elif api_version != t.api_version:
            if self.registry.by_kind(api_version, t.kind) is None:
                raise bad_request(
                    f"the API version in the data ({api_version}) does not match the expected API "
                    f"version ({t.api_version})"
                )
            obj["apiVersion"] = t.api_version
        meta = obj.get("metadata")
        if meta is None:
            meta = obj["metadata"] = {}
        if not isinstance(meta, dict):
            raise bad_request("metadata is not an object")
        if t.namespaced:
            ns = meta.get("namespace")
            if ns and namespace and ns != namespace:
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on "
                    "the request"
                )
            meta["namespace"] = namespace or ns or ""
        else:
            meta.pop("namespace", None)
        if name_from_path is not None and meta.get("name") and meta["name"] != name_from_path:
            raise bad_request(
                "the name of the object ({}) does not match the name on the URL ({})".format(
                    meta["name"], name_from_path
                )
            )
        if name_from_path is not None and not meta.get("name"):
            meta["name"] = name_from_path
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(
                secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5)
            )
        name = meta.get("name") or ""
        causes: list[tuple[str, str, str]] = []
        if not name:
            causes.append(
                (
                    "FieldValueRequired",
                    "metadata.name",
                    "Required value: name or generateName is required",
                )
            )
        elif t.storage == NAMESPACE_STORAGE:
            if len(name) > 63 or not _LABEL.match(name):
                causes.append(
                    (
                        "FieldValueInvalid",
                        "metadata.name",
                        f'Invalid value: "{name}": a lowercase RFC 1123 label must consist of '
                        "lower case alphanumeric characters or '-', and must start and end with "
                        "an alphanumeric character",
                    )
                )
        elif t.group == "rbac.authorization.k8s.io":
            if name in (".", "..") or "/" in name or "%" in name:
                causes.append(
                    (
                        "FieldValueInvalid",
                        "metadata.name",
                        f"Invalid value: \"{name}\": may not contain '/' or '%'",
                    )
                )
        elif len(name) > 253 or not _SUBDOMAIN.match(name):
            causes.append(
                (
                    "FieldValueInvalid",
                    "metadata.name",
                    f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of '
                    "lower case alphanumeric characters, '-' or '.', and must start and end with "
                    "an alphanumeric character",
                )
            )
        for field_name in ("labels", "annotations"):
            value = meta.get(field_name)
            if value is not None and not (
                isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
            ):
                causes.append(
                    (
                        "FieldValueInvalid",
                        f"metadata.{field_name}",
                        "Invalid value: must be a map of strings",
                    )
                )
        for k, v in (
            (meta.get("labels") or {}).items() if isinstance(meta.get("labels"), dict) else ()
        ):
            if not isinstance(v, str) or len(v) > 63 or not _LABEL_VALUE.match(v):
                causes.append(
                    (
                        "FieldValueInvalid",
                        "metadata.labels",
                        f'Invalid value: "{v}": a valid label must be an empty string or '
                        "consist of alphanumeric characters, '-', '_' or '.', and must start and "
                        "end with an alphanumeric character",
                    )
                )
            prefix, _, lname = str(k).rpartition("/")
            if (
                not lname
                or len(lname) > 63
                or not _LABEL_NAME.match(lname)
                or (prefix and not _SUBDOMAIN.match(prefix))
            ):
                causes.append(
                    (
                        "FieldValueInvalid",
                        "metadata.labels",
                        f'Invalid value: "{k}": name part must consist of alphanumeric '
                        "characters, '-', '_' or '.'",
                    )
                )
        if t.storage == CRD_STORAGE:
            causes.extend(self._crd_causes(obj))
        if causes:
            raise invalid(t.kind, t.group, name, causes)

    def _crd_causes(self, crd: Obj) -> list[tuple[str, str, str]]:
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        out = []
        if not spec.get("group"):
            out.append(("FieldValueRequired", "spec.group", "Required value"))
        if not names.get("plural"):
            out.append(("FieldValueRequired", "spec.names.plural", "Required value"))
        if not names.get("kind"):
            out.append(("FieldValueRequired", "spec.names.kind", "Required value"))
        if spec.get("scope") not in ("Namespaced", "Cluster"):
            out.append(
                (
                    "FieldValueNotSupported",
                    "spec.scope",
                    'Unsupported value: supported values: "Cluster", "Namespaced"',
                )
            )
        versions = spec.get("versions") or []
        if not versions:
            out.append(
                (
                    "FieldValueRequired",
                    "spec.versions",
                    "Required value: must have exactly one version marked as storage version",
                )
            )
        elif sum(1 for v in versions if v.get("storage")) != 1:
            out.append(
                (
                    "FieldValueInvalid",
                    "spec.versions",
                    "Invalid value: must have exactly one version marked as storage version",
                )
            )
        if names.get("plural") and spec.get("group"):
            want = f"{names['plural']}.{spec['group']}"
            if crd["metadata"].get("name") != want:
                out.append(
                    (
                        "FieldValueInvalid",
                        "metadata.name",
                        f'Invalid value: "{crd["metadata"].get("name")}": must be '
                        'spec.names.plural+"."+spec.group',
                    )
                )
        return out

    def _defaults_on_create(self, t: ResourceType, obj: Obj) -> None:
        if "status" in t.subresources and t.crd:
            obj.pop("status", None)
        if t.storage == NAMESPACE_STORAGE:
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
            obj["status"] = {"phase": "Active"}
        elif t.storage == ("", "pods"):
            obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
        elif "status" in t.subresources and t.storage != CRD_STORAGE:
            obj.pop("status", None)
        if t.storage == CRD_STORAGE:
            names = (obj.get("spec") or {}).get("names") or {}
            accepted = {**names}
            accepted.setdefault("singular", str(names.get("kind", "")).lower())
            accepted.setdefault("listKind", f"{names.get('kind', '')}List")
            ts = now_iso()
            obj["status"] = {
                "acceptedNames": accepted,
                "conditions": [
                    {
                        "type": "NamesAccepted",
                        "status": "True",
                        "reason": "NoConflicts",
                        "message": "no conflicts found",
                        "lastTransitionTime": ts,
                    },
                    {
                        "type": "Established",
                        "status": "True",
                        "reason": "InitialNamesAccepted",
                        "message": "the initial names have been accepted",
                        "lastTransitionTime": ts,
                    },
                ],
                "storedVersions": [v["name"] for v in obj["spec"]["versions"] if v.get("storage")],
            }

    # ------------------------------------------------------------------ reads

    def get(self, t: ResourceType, namespace: str, name: str) -> Obj:
        with self.lock:
            t = self.type_for(t)
            obj = self.objects[t.storage].get((namespace if t.namespaced else "", name))
            if obj is None:
                raise not_found(t.group, t.plural, name)
            return obj

    def state_at(self, storage: Storage, rv: int) -> dict[Key, Obj]:
        """The objects of a resource as they were at resourceVersion ``rv`` (under the lock)."""
        current = self.objects[storage]
        if rv >= self.rv:
            return current
        if rv < self.compacted:
            raise gone(f"too old resource version: {rv} ({self.compacted})")
        state = dict(current)
        start = bisect.bisect_right(self.events, rv, key=lambda e: e.rv)
        for ev in reversed(self.events[start:]):
            if ev.storage != storage:
                continue
            if ev.type == "ADDED":
                state.pop(ev.key, None)
            else:
                assert ev.prev is not None
                state[ev.key] = ev.prev
        return state

    def list(
        self,
        t: ResourceType,
        namespace: str,
        label: Predicate | None = None,
        field: Predicate | None = None,
        limit: int = 0,
        continue_token: str = "",
        resource_version: str = "",
        resource_version_match: str = "",
    ) -> ListResult:
        with self.lock:
            t = self.type_for(t)
            start = ""
            if continue_token:
                rv, start = _decode_continue(continue_token)
                if rv < self.compacted:
                    raise gone(
                        "The provided continue parameter is too old to display a consistent list "
                        "result. You can start a new list without the continue parameter, or use "
                        "the continue token in this response to retrieve the remainder of the "
                        "results. Continuing with the provided token results in an inconsistent "
                        "list - objects that were created, modified, or deleted between the time "
                        "the first chunk was returned and now may show up in the list."
                    )
            elif resource_version and resource_version != "0" and resource_version_match == "Exact":
                rv = self._parse_rv(resource_version)
            else:
                rv = self.rv
            snapshot = self._snapshots.get((t.storage, rv))
            if snapshot is None or rv < self.compacted:
                # state_at answers 410 past the compaction; the live dict changes once the
                # lock is released, hence the copy
                pairs = list(self.state_at(t.storage, rv).items())
        if snapshot is None:
            snapshot = sorted(((_sort_key(k), obj) for k, obj in pairs), key=lambda x: x[0])
            with self.lock:
                self._snapshots[(t.storage, rv)] = snapshot
                while len(self._snapshots) > 8:  # oldest first: dicts keep insertion order
                    del self._snapshots[next(iter(self._snapshots))]
        ns = namespace if t.namespaced else ""
        named = [p for p in snapshot if p[0].startswith(ns + "/")] if ns else snapshot
        first = bisect.bisect_right(named, start, key=lambda x: x[0]) if start else 0
        items: builtins.list[Obj] = []
        token, remaining = "", None
        filtering = label is not None or field is not None
        last = ""
        for i in range(first, len(named)):
            sk, obj = named[i]
            if (label is None or label(obj)) and (field is None or field(obj)):
                if limit and len(items) == limit:
                    token = _encode_continue(rv, last)
                    if not filtering:
                        remaining = len(named) - i
                    break
                items.append(obj)
                last = sk
        return ListResult(items, rv, token, remaining)

    @staticmethod
    def _parse_rv(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise bad_request(f"invalid resource version: {text!r}") from None
        if value < 0:
            raise bad_request(f"invalid resource version: {text!r}")
        return value

    # ------------------------------------------------------------------ writes

    def create(
        self,
        t: ResourceType,
        namespace: str,
        body: Obj,
        *,
        manager: str,
        dry_run: bool = False,
        managed_fields: builtins.list[Obj] | None = None,
    ) -> Obj:
        """POST: ``body`` is taken over (the caller must not use it afterwards)."""
        with self.lock:
            t = self.type_for(t)
            self._validate(t, body, namespace, None)
            meta = body["metadata"]
            ns = meta.get("namespace", "") if t.namespaced else ""
            self._check_namespace(t, ns)
            key = (ns, meta["name"])
            if key in self.objects[t.storage]:
                raise already_exists(t.group, t.plural, meta["name"])
            for k in (
                "resourceVersion",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "selfLink",
            ):
                meta.pop(k, None)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = now_iso()
            meta["generation"] = 1
            self._defaults_on_create(t, body)
            if managed_fields is not None:
                meta["managedFields"] = managed_fields
            elif not meta.get("managedFields"):
                fields = P.fieldset(P.tracked(body, ""))
                meta["managedFields"] = (
                    [self._entry(manager, "Update", t.api_version, "", fields)] if fields else []
                )
            if not meta["managedFields"]:
                meta.pop("managedFields")
            if t.storage == CRD_STORAGE:
                self._register_crd(body)
            if dry_run:
                return body
            return self._commit(t, key, body, "ADDED", None)

    @staticmethod
    def _entry(
        manager: str, operation: str, api_version: str, subresource: str, fields: set[P.Path]
    ) -> Obj:
        entry: Obj = {
            "manager": manager,
            "operation": operation,
            "apiVersion": api_version,
            "time": now_iso(),
            "fieldsType": "FieldsV1",
            "fieldsV1": P.render_fields_v1(fields),
        }
        if subresource:
            entry["subresource"] = subresource
        return entry

    def _register_crd(self, crd: Obj) -> None:
        name = crd["metadata"]["name"]
        self.registry.remove_crd(name)
        for rt in types_from_crd(crd):
            existing = self.registry.lookup(rt.group, rt.version, rt.plural)
            if existing is None or existing.crd in ("", name):
                if existing is not None and existing.crd == "":
                    continue  # never shadow a built-in
                self.registry.add(rt)

    def update(
        self,
        t: ResourceType,
        namespace: str,
        name: str,
        body: Obj,
        *,
        manager: str,
        subresource: str = "",
        dry_run: bool = False,
    ) -> Obj:
        """PUT (optimistic concurrency on metadata.resourceVersion)."""
        with self.lock:
            t = self.type_for(t)
            self._validate(t, body, namespace, name)
            current = self.get(t, namespace, name)
            rv = body["metadata"].get("resourceVersion")
            if rv and rv != current["metadata"]["resourceVersion"]:
                raise conflict(t.group, t.plural, name, MODIFIED)
            return self._write(
                t,
                current,
                body,
                manager=manager,
                operation="Update",
                subresource=subresource,
                dry_run=dry_run,
            )

    def patch(
        self,
        t: ResourceType,
        namespace: str,
        name: str,
        patch_type: str,
        body: Any,
        *,
        manager: str,
        subresource: str = "",
        force: bool = False,
        dry_run: bool = False,
    ) -> Obj:
        """PATCH: ``patch_type`` is json, merge, strategic or apply."""
        with self.lock:
            t = self.type_for(t)
            if patch_type == "apply":
                return self.apply(
                    t,
                    namespace,
                    name,
                    body,
                    manager=manager,
                    subresource=subresource,
                    force=force,
                    dry_run=dry_run,
                )
            current = self.get(t, namespace, name)
            if patch_type == "json":
                new = P.json_patch(current, body)
            elif patch_type == "merge":
                if not isinstance(body, dict):
                    raise bad_request("merge patch: the patch is not a JSON object")
                new = P.merge_patch(current, body)
            elif patch_type == "strategic":
                if not isinstance(body, dict):
                    raise bad_request("strategic merge patch: the patch is not a JSON object")
                new = P.strategic_merge_patch(current, body)
            else:
                raise bad_request(f"unknown patch type {patch_type!r}")
            if not isinstance(new, dict):
                raise bad_request("the patched object is not a JSON object")
            new["metadata"] = dict(new.get("metadata") or {})
            rv = new["metadata"].get("resourceVersion")
            if rv and rv != current["metadata"]["resourceVersion"]:
                raise conflict(t.group, t.plural, name, MODIFIED)
            self._validate(t, new, namespace, name)
            return self._write(
                t,
                current,
                new,
                manager=manager,
                operation="Update",
                subresource=subresource,
                dry_run=dry_run,
            )

    def _write(
        self,
        t: ResourceType,
        current: Obj,
        new: Obj,
        *,
        manager: str,
        operation: str,
        subresource: str,
        dry_run: bool,
        managed_fields: builtins.list[Obj] | None = None,
    ) -> Obj:
        """Finish an update: immutable fields, status split, generation, managedFields, commit."""
        cur_meta = current["metadata"]
        if subresource == "status":
            new_meta = dict(cur_meta)
            incoming_mf = None
            new = {**current, "metadata": new_meta, "status": new.get("status")}
            if new["status"] is None:
                new.pop("status")
        else:
            new_meta = dict(new["metadata"])
            new = {**new, "metadata": new_meta}
            incoming_mf = new_meta.get("managedFields")
            if "status" in t.subresources:
                if "status" in current:
                    new["status"] = current["status"]
                else:
                    new.pop("status", None)
            for k in (
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "name",
            ):
                if k in cur_meta:
                    new_meta[k] = cur_meta[k]
                else:
                    new_meta.pop(k, None)
            if t.namespaced:
                new_meta["namespace"] = cur_meta.get("namespace", "")
            if cur_meta.get("deletionTimestamp"):
                added = set(new_meta.get("finalizers") or []) - set(
                    cur_meta.get("finalizers") or []
                )
                if added:
                    raise invalid(
                        t.kind,
                        t.group,
                        cur_meta["name"],
                        [
                            (
                                "FieldValueForbidden",
                                "metadata.finalizers",
                                "Forbidden: no new finalizers can be added if the object is "
                                "being deleted",
                            )
                        ],
                    )
        new_meta["generation"] = cur_meta.get("generation", 1)
        if _spec_of(new) != _spec_of(current):
            new_meta["generation"] = cur_meta.get("generation", 1) + 1
        new_meta["resourceVersion"] = cur_meta["resourceVersion"]
        if managed_fields is not None:
            mf: builtins.list[Obj] | None = managed_fields
        elif incoming_mf is not None and incoming_mf != cur_meta.get("managedFields"):
            mf = incoming_mf  # a client replaced managedFields: taken as given ([] resets them)
        else:
            mf = self._update_managed(
                cur_meta.get("managedFields") or [],
                current,
                new,
                manager,
                t.api_version,
                subresource,
            )
        if mf:
            new_meta["managedFields"] = mf
        else:
            new_meta.pop("managedFields", None)
        if _strip_for_compare(new) == _strip_for_compare(current) and mf == (
            cur_meta.get("managedFields") or []
        ):
            return current  # a no-op write: no new resourceVersion, no event
        if t.storage == CRD_STORAGE and subresource != "status":
            self._register_crd(new)
        if dry_run:
            return new
        key = (cur_meta.get("namespace", "") if t.namespaced else "", cur_meta["name"])
        if new_meta.get("deletionTimestamp") and not new_meta.get("finalizers"):
            self._commit(t, key, new, "MODIFIED", current)
            return self._delete_now(t, key, "Background")
        return self._commit(t, key, new, "MODIFIED", current)

    def _update_managed(
        self,
        entries: builtins.list[Obj],
        old: Obj,
        new: Obj,
        manager: str,
        api_version: str,
        subresource: str,
    ) -> builtins.list[Obj]:
        """managedFields after an Update: the manager takes the fields it changed."""
        t_old, t_new = P.tracked(old, subresource), P.tracked(new, subresource)
        new_paths = P.fieldset(t_new)
        old_paths = P.fieldset(t_old)
        changed = P.changed_paths(t_old, t_new, new_paths)
        removed = old_paths - new_paths
        if not changed and not removed:
            return entries
        out: builtins.list[Obj] = []
        mine_found = False
        for e in entries:
            fields = P.parse_fields_v1(e.get("fieldsV1") or {})
            is_mine = (
                e.get("manager") == manager
                and e.get("operation") == "Update"
                and e.get("subresource", "") == subresource
            )
            kept = fields - removed if is_mine else fields - removed - changed
            if is_mine:
                mine_found = True
                kept |= changed
            if kept == fields:
                out.append(e)
            elif kept:
                out.append(
                    {
                        **e,
                        "fieldsV1": P.render_fields_v1(kept),
                        "time": now_iso(),
                        **({"apiVersion": api_version} if is_mine else {}),
                    }
                )
        if not mine_found and changed:
            out.append(self._entry(manager, "Update", api_version, subresource, changed))
        return out

    def apply(
        self,
        t: ResourceType,
        namespace: str,
        name: str,
        body: Any,
        *,
        manager: str,
        subresource: str = "",
        force: bool = False,
        dry_run: bool = False,
    ) -> Obj:
        """Server-side apply (``application/apply-patch+yaml``)."""
        if not manager:
            raise bad_request("PATCH, fieldManager is required for apply requests")
        if not isinstance(body, dict):
            raise bad_request("apply: the configuration is not an object")
        if not body.get("apiVersion") or not body.get("kind"):
            raise bad_request("apply: apiVersion and kind must be set")
        meta = body.get("metadata") or {}
        if meta.get("name") and meta["name"] != name:
            raise bad_request(
                f"the name of the object ({meta['name']}) does not match the name on the URL "
                f"({name})"
            )
        with self.lock:
            t = self.type_for(t)
            key = (namespace if t.namespaced else "", name)
            current = self.objects[t.storage].get(key)
            config = P.tracked(body, subresource)
            new_set = P.fieldset(config)
            if current is None:
                if subresource:
                    raise not_found(t.group, t.plural, name)
                obj = copy.deepcopy(body)
                obj.setdefault("metadata", {})["name"] = name
                obj["metadata"].pop("managedFields", None)
                entry = self._entry(manager, "Apply", t.api_version, "", new_set)
                return self.create(
                    t, namespace, obj, manager=manager, dry_run=dry_run, managed_fields=[entry]
                )
            self._validate(t, copy.deepcopy(body), namespace, name)
            rv = meta.get("resourceVersion")
            if rv and rv != current["metadata"]["resourceVersion"]:
                raise conflict(t.group, t.plural, name, MODIFIED)
            entries = list(current["metadata"].get("managedFields") or [])
            sets = [P.parse_fields_v1(e.get("fieldsV1") or {}) for e in entries]
            mine = next(
                (
                    i
                    for i, e in enumerate(entries)
                    if e.get("manager") == manager
                    and e.get("operation") == "Apply"
                    and e.get("subresource", "") == subresource
                ),
                None,
            )
            old_set = sets[mine] if mine is not None else set()
            merged = P.apply_merge(copy.deepcopy(current), config)
            candidates = P.changed_paths(current, merged, P.leaves(new_set))
            conflicts: builtins.list[tuple[str, str, P.Path]] = []
            for i, e in enumerate(entries):
                if i == mine or e.get("subresource", "") != subresource:
                    continue
                for p in sorted(sets[i] & candidates):
                    conflicts.append((str(e.get("manager")), str(e.get("apiVersion", "")), p))
            if conflicts and not force:
                n = len(conflicts)
                lines = [
                    f'conflict with "{m}"' + (f" using {v}" if v else "") + f": {P.render_path(p)}"
                    for m, v, p in conflicts
                ]
                msg = f"Apply failed with {n} conflict{'s' if n > 1 else ''}: " + (
                    "\n".join(lines) if n > 1 else lines[0]
                )
                raise ApiError(
                    409,
                    "Conflict",
                    msg,
                    {
                        "name": name,
                        "kind": t.plural,
                        **({"group": t.group} if t.group else {}),
                        "causes": [
                            {
                                "reason": "FieldManagerConflict",
                                "message": f'conflict with "{m}"' + (f" using {v}" if v else ""),
                                "field": P.render_path(p),
                            }
                            for m, v, p in conflicts
                        ],
                    },
                )
            lost = {p for _, _, p in conflicts}
            new_sets = [s - lost if i != mine else s for i, s in enumerate(sets)]
            others: set[P.Path] = set()
            for i, s in enumerate(new_sets):
                if i != mine:
                    others |= s
            # parents first (an item goes with its fields); never a key field of a kept item
            for p in sorted(old_set - new_set, key=len):
                owned = p in others or any(o[: len(p)] == p for o in others)
                if not owned and not P.is_key_field(p):
                    P.remove_path(merged, p)
            out: builtins.list[Obj] = []
            for i, e in enumerate(entries):
                if i == mine:
                    if new_set == old_set and e.get("apiVersion") == t.api_version:
                        out.append(e)
                    elif new_set:
                        out.append(
                            self._entry(manager, "Apply", t.api_version, subresource, new_set)
                        )
                elif new_sets[i] == sets[i]:
                    out.append(e)
                elif new_sets[i]:
                    out.append({**e, "fieldsV1": P.render_fields_v1(new_sets[i])})
            if mine is None and new_set:
                out.append(self._entry(manager, "Apply", t.api_version, subresource, new_set))
            merged["metadata"] = dict(merged["metadata"])
            merged["metadata"]["managedFields"] = out
            return self._write(
                t,
                current,
                merged,
                manager=manager,
                operation="Apply",
                subresource=subresource,
                dry_run=dry_run,
                managed_fields=out,
            )

    # ------------------------------------------------------------------ deletes

    def delete(
        self,
        t: ResourceType,
        namespace: str,
        name: str,
        *,
        propagation: str = "",
        preconditions: Obj | None = None,
        dry_run: bool = False,
    ) -> Obj:
        with self.lock:
            t = self.type_for(t)
            current = self.get(t, namespace, name)
            meta = current["metadata"]
            pre = preconditions or {}
            if pre.get("uid") and pre["uid"] != meta["uid"]:
                raise conflict(
                    t.group,
                    t.plural,
                    name,
                    f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: "
                    f"{meta['uid']}",
                )
            if pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]:
                raise conflict(
                    t.group,
                    t.plural,
                    name,
                    "Precondition failed: ResourceVersion in precondition: "
                    f"{pre['resourceVersion']}, ResourceVersion in object meta: "
                    f"{meta['resourceVersion']}",
                )
            if dry_run:
                return current
            key = (meta.get("namespace", "") if t.namespaced else "", name)
            propagation = propagation or "Background"
            if propagation not in ("Background", "Foreground", "Orphan"):
                raise bad_request(
                    f'Unsupported value: {propagation!r}: supported values: "Foreground", '
                    '"Background", "Orphan"'
                )
            if meta.get("finalizers"):
                if meta.get("deletionTimestamp"):
                    return current
                new = {
                    **current,
                    "metadata": {
                        **meta,
                        "deletionTimestamp": now_iso(),
                        "deletionGracePeriodSeconds": 0,
                    },
                }
                return self._commit(t, key, new, "MODIFIED", current)
            if t.storage == NAMESPACE_STORAGE:
                terminating = {
                    **current,
                    "metadata": {**meta, "deletionTimestamp": now_iso()},
                    "status": {"phase": "Terminating"},
                }
                self._commit(t, key, terminating, "MODIFIED", current)
                self._empty_namespace(name)
                self._delete_now(t, key, propagation)
                return terminating
            return self._delete_now(t, key, propagation)

    def _empty_namespace(self, namespace: str) -> None:
        for storage, objs in list(self.objects.items()):
            rt = next((x for x in self.registry.types.values() if x.storage == storage), None)
            if rt is None or not rt.namespaced:
                continue
            for key in sorted(k for k in objs if k[0] == namespace):
                if key in objs:
                    self._delete_now(rt, key, "Background")

    def _delete_now(self, t: ResourceType, key: Key, propagation: str) -> Obj:
        """Remove an object, then collect its dependents (the garbage collector: at once, or
        ``gc_delay`` seconds later for the Background policy)."""
        current = self.objects[t.storage].get(key)
        if current is None:
            return {}
        uid = current["metadata"]["uid"]
        dependents = sorted(self._owners.get(uid, set()))
        if propagation == "Foreground":
            self._collect(uid, dependents, "Foreground")
            current = self.objects[t.storage].get(key) or current
        if t.storage == CRD_STORAGE:
            self._delete_crd_objects(current)
        out = self._commit(t, key, None, "DELETED", current)
        if propagation == "Orphan":
            self._orphan(uid, dependents)
        elif propagation == "Background":
            if self.gc_delay > 0:
                self.gc_pending.append((time.monotonic() + self.gc_delay, uid))
                self.cond.notify_all()
            else:
                self._collect(uid, dependents, "Background")
        return out

    def collect_garbage(self, now: float | None = None) -> float | None:
        """Collect the dependents of owners deleted before ``now`` (all, if None); the
        time the next collection is due, if any (under the lock or not)."""
        with self.lock:
            due = [p for p in self.gc_pending if now is None or p[0] <= now]
            self.gc_pending = [p for p in self.gc_pending if p not in due]
            for _, uid in due:
                self._collect(uid, sorted(self._owners.get(uid, set())), "Background")
            if now is None and self.gc_pending:  # collecting made more owners go
                return self.collect_garbage(None)
            return min((p[0] for p in self.gc_pending), default=None)

    def _rt_for_storage(self, storage: Storage) -> ResourceType | None:
        return next((x for x in self.registry.types.values() if x.storage == storage), None)

    def _remove_owner_ref(self, uid: str, storage: Storage, key: Key) -> None:
        rt = self._rt_for_storage(storage)
        obj = self.objects[storage].get(key)
        if rt is None or obj is None:
            return
        refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r.get("uid") != uid]
        new_meta = {**obj["metadata"], "ownerReferences": refs}
        if not refs:
            new_meta.pop("ownerReferences")
        self._write(
            rt,
            obj,
            {**obj, "metadata": new_meta},
            manager=GC_MANAGER,
            operation="Update",
            subresource="",
            dry_run=False,
        )

    def _orphan(self, uid: str, dependents: builtins.list[tuple[Storage, Key]]) -> None:
        for storage, key in dependents:
            self._remove_owner_ref(uid, storage, key)

    def _owner_exists(self, uid: str) -> bool:
        for objs in self.objects.values():
            for o in objs.values():
                if o["metadata"].get("uid") == uid:
                    return True
        return False

    def _collect(
        self, uid: str, dependents: builtins.list[tuple[Storage, Key]], propagation: str
    ) -> None:
        for storage, key in dependents:
            obj = self.objects[storage].get(key)
            rt = self._rt_for_storage(storage)
            if obj is None or rt is None:
                continue
            others = owner_uids(obj) - {uid}
            if any(self._owner_exists(o) for o in others):
                self._remove_owner_ref(uid, storage, key)
            elif obj["metadata"].get("finalizers"):
                if not obj["metadata"].get("deletionTimestamp"):
                    new = {**obj, "metadata": {**obj["metadata"], "deletionTimestamp": now_iso()}}
                    self._commit(rt, key, new, "MODIFIED", obj)
            else:
                self._delete_now(rt, key, propagation)

    def _delete_crd_objects(self, crd: Obj) -> None:
        spec = crd.get("spec") or {}
        storage = (spec.get("group", ""), (spec.get("names") or {}).get("plural", ""))
        rt = self._rt_for_storage(storage)
        if rt is not None and rt.crd == crd["metadata"]["name"]:
            for key in sorted(self.objects[storage]):
                self._delete_now(rt, key, "Background")
        self.registry.remove_crd(crd["metadata"]["name"])

    def delete_collection(
        self,
        t: ResourceType,
        namespace: str,
        label: Predicate | None,
        field: Predicate | None,
        propagation: str = "",
    ) -> builtins.list[Obj]:
        with self.lock:
            items = self.list(t, namespace, label, field).items
            out = []
            for o in items:
                m = o["metadata"]
                try:
                    out.append(
                        self.delete(t, m.get("namespace", ""), m["name"], propagation=propagation)
                    )
                except ApiError:
                    continue
            return out

    # ------------------------------------------------------------------ watch

    def events_after(self, rv: int) -> tuple[builtins.list[Event], int]:
        """The events after ``rv`` and the current resourceVersion (under the lock)."""
        if rv < self.compacted:
            raise gone(f"too old resource version: {rv} ({self.compacted})")
        start = bisect.bisect_right(self.events, rv, key=lambda e: e.rv)
        return self.events[start:], self.rv


@dataclass
class WatchFilter:
    """Which events a watch sends, and how (a selector mismatch turns into DELETED)."""

    storage: Storage
    namespace: str
    label: Predicate | None = None
    field: Predicate | None = None
    name: str = ""  # a metadata.name field selector, for speed

    def match(self, obj: Obj) -> bool:
        return (self.label is None or self.label(obj)) and (self.field is None or self.field(obj))

    def convert(self, ev: Event) -> tuple[str, Obj] | None:
        if ev.storage != self.storage:
            return None
        if self.namespace and ev.key[0] != self.namespace:
            return None
        if self.name and ev.key[1] != self.name:
            return None
        if self.label is None and self.field is None:
            return ev.type, ev.obj
        if ev.type == "ADDED":
            return ("ADDED", ev.obj) if self.match(ev.obj) else None
        if ev.type == "DELETED":
            return ("DELETED", ev.obj) if self.match(ev.prev or ev.obj) else None
        now, before = self.match(ev.obj), ev.prev is not None and self.match(ev.prev)
        if now and before:
            return "MODIFIED", ev.obj
        if now:
            return "ADDED", ev.obj
        if before:
            assert ev.prev is not None
            return "DELETED", {
                **ev.prev,
                "metadata": {**ev.prev["metadata"], "resourceVersion": str(ev.rv)},
            }
        return None


def iter_initial(store: Store, flt: WatchFilter) -> Iterator[Obj]:
    """The current objects a watch from resourceVersion "" or "0" starts with (under the lock)."""
    for key in sorted(store.objects[flt.storage], key=_sort_key):
        if flt.namespace and key[0] != flt.namespace:
            continue
        obj = store.objects[flt.storage][key]
        if flt.match(obj):
            yield obj
