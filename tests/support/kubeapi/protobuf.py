"""Decoding kubectl's protobuf request bodies for a few kinds (JSON is answered).

kubectl 1.32's typed commands (``create namespace|configmap|secret|serviceaccount|
deployment``, ``run``) send ``application/vnd.kubernetes.protobuf`` bodies and
do not fall back to JSON on a 415. The envelope is ``k8s\\0`` + a
``runtime.Unknown`` (typeMeta = 1 {apiVersion = 1, kind = 2}, raw = 2); ``raw``
is the object, decoded here with the field numbers of k8s.io/api's
generated.proto for the kinds in :data:`KINDS` (the fields those commands set
and the common ones around them). A field the schema below does not know is a
415 naming it, never a silently dropped value. Responses are always JSON
(client-go decodes by the response's Content-Type).

Empty strings, zeros, false and empty messages are dropped (protobuf cannot
tell them from absent; the JSON of these fields omits them too), except for
fields marked optional (``?``: pointers in Go, where false and 0 mean something).
"""

from __future__ import annotations

import base64
import json
import struct
from datetime import UTC, datetime
from typing import Any

from .errors import ApiError

MAGIC = b"k8s\x00"

# message name -> {field number: (json name, type)}; type is a scalar ("string",
# "int", "bool", "bytes", a trailing "?" for optional), a message name, "[]T"
# for repeated, "map:T" for map<string, T>.
Schema = dict[int, tuple[str, str]]
MESSAGES: dict[str, Schema] = {
    "Unknown": {
        1: ("typeMeta", "TypeMeta"),
        2: ("raw", "bytes"),
        3: ("contentEncoding", "string"),
        4: ("contentType", "string"),
    },
    "TypeMeta": {1: ("apiVersion", "string"), 2: ("kind", "string")},
    "Time": {1: ("seconds", "int"), 2: ("nanos", "int")},
    "ObjectMeta": {
        1: ("name", "string"),
        2: ("generateName", "string"),
        3: ("namespace", "string"),
        4: ("selfLink", "string"),
        5: ("uid", "string"),
        6: ("resourceVersion", "string"),
        7: ("generation", "int"),
        8: ("creationTimestamp", "Time"),
        9: ("deletionTimestamp", "Time"),
        10: ("deletionGracePeriodSeconds", "int?"),
        11: ("labels", "map:string"),
        12: ("annotations", "map:string"),
        13: ("ownerReferences", "[]OwnerReference"),
        14: ("finalizers", "[]string"),
        17: ("managedFields", "[]ManagedFieldsEntry"),
    },
    "OwnerReference": {
        1: ("kind", "string"),
        3: ("name", "string"),
        4: ("uid", "string"),
        5: ("apiVersion", "string"),
        6: ("controller", "bool?"),
        7: ("blockOwnerDeletion", "bool?"),
    },
    "ManagedFieldsEntry": {
        1: ("manager", "string"),
        2: ("operation", "string"),
        3: ("apiVersion", "string"),
        4: ("time", "Time"),
        6: ("fieldsType", "string"),
        7: ("fieldsV1", "FieldsV1"),
        8: ("subresource", "string"),
    },
    "FieldsV1": {1: ("Raw", "bytes")},
    "LabelSelector": {
        1: ("matchLabels", "map:string"),
        2: ("matchExpressions", "[]LabelSelectorRequirement"),
    },
    "LabelSelectorRequirement": {
        1: ("key", "string"),
        2: ("operator", "string"),
        3: ("values", "[]string"),
    },
    "Namespace": {
        1: ("metadata", "ObjectMeta"),
        2: ("spec", "NamespaceSpec"),
        3: ("status", "NamespaceStatus"),
    },
    "NamespaceSpec": {1: ("finalizers", "[]string")},
    "NamespaceStatus": {1: ("phase", "string")},
    "ConfigMap": {
        1: ("metadata", "ObjectMeta"),
        2: ("data", "map:string"),
        3: ("binaryData", "map:bytes"),
        4: ("immutable", "bool?"),
    },
    "Secret": {
        1: ("metadata", "ObjectMeta"),
        2: ("data", "map:bytes"),
        3: ("type", "string"),
        4: ("stringData", "map:string"),
        5: ("immutable", "bool?"),
    },
    "ServiceAccount": {
        1: ("metadata", "ObjectMeta"),
        2: ("secrets", "[]ObjectReference"),
        3: ("imagePullSecrets", "[]LocalObjectReference"),
        4: ("automountServiceAccountToken", "bool?"),
    },
    "ObjectReference": {
        1: ("kind", "string"),
        2: ("namespace", "string"),
        3: ("name", "string"),
        4: ("uid", "string"),
        5: ("apiVersion", "string"),
        6: ("resourceVersion", "string"),
        7: ("fieldPath", "string"),
    },
    "LocalObjectReference": {1: ("name", "string")},
    "Pod": {1: ("metadata", "ObjectMeta"), 2: ("spec", "PodSpec"), 3: ("status", "skip")},
    "PodSpec": {
        2: ("containers", "[]Container"),
        3: ("restartPolicy", "string"),
        4: ("terminationGracePeriodSeconds", "int?"),
        5: ("activeDeadlineSeconds", "int?"),
        6: ("dnsPolicy", "string"),
        7: ("nodeSelector", "map:string"),
        8: ("serviceAccountName", "string"),
        9: ("serviceAccount", "string"),
        10: ("nodeName", "string"),
        11: ("hostNetwork", "bool"),
        12: ("hostPID", "bool"),
        13: ("hostIPC", "bool"),
        14: ("securityContext", "PodSecurityContext"),
        15: ("imagePullSecrets", "[]LocalObjectReference"),
        16: ("hostname", "string"),
        17: ("subdomain", "string"),
        19: ("schedulerName", "string"),
        20: ("initContainers", "[]Container"),
        21: ("automountServiceAccountToken", "bool?"),
        24: ("priorityClassName", "string"),
        25: ("priority", "int?"),
        29: ("enableServiceLinks", "bool?"),
    },
    "PodSecurityContext": {},
    "Container": {
        1: ("name", "string"),
        2: ("image", "string"),
        3: ("command", "[]string"),
        4: ("args", "[]string"),
        5: ("workingDir", "string"),
        6: ("ports", "[]ContainerPort"),
        7: ("env", "[]EnvVar"),
        8: ("resources", "ResourceRequirements"),
        13: ("terminationMessagePath", "string"),
        14: ("imagePullPolicy", "string"),
        16: ("stdin", "bool"),
        17: ("stdinOnce", "bool"),
        18: ("tty", "bool"),
        20: ("terminationMessagePolicy", "string"),
    },
    "ContainerPort": {
        1: ("name", "string"),
        2: ("hostPort", "int"),
        3: ("containerPort", "int"),
        4: ("protocol", "string"),
        5: ("hostIP", "string"),
    },
    "EnvVar": {1: ("name", "string"), 2: ("value", "string")},
    "ResourceRequirements": {1: ("limits", "map:Quantity"), 2: ("requests", "map:Quantity")},
    "Quantity": {1: ("string", "string")},
    "Deployment": {
        1: ("metadata", "ObjectMeta"),
        2: ("spec", "DeploymentSpec"),
        3: ("status", "skip"),
    },
    "DeploymentSpec": {
        1: ("replicas", "int?"),
        2: ("selector", "LabelSelector"),
        3: ("template", "PodTemplateSpec"),
        4: ("strategy", "DeploymentStrategy"),
        5: ("minReadySeconds", "int"),
        6: ("revisionHistoryLimit", "int?"),
        7: ("paused", "bool"),
        9: ("progressDeadlineSeconds", "int?"),
    },
    "DeploymentStrategy": {1: ("type", "string")},
    "PodTemplateSpec": {1: ("metadata", "ObjectMeta"), 2: ("spec", "PodSpec")},
}

MESSAGES.update(
    {
        "SelfSubjectAccessReview": {
            1: ("metadata", "ObjectMeta"),
            2: ("spec", "SelfSubjectAccessReviewSpec"),
            3: ("status", "skip"),
        },
        "SelfSubjectAccessReviewSpec": {
            1: ("resourceAttributes", "ResourceAttributes"),
            2: ("nonResourceAttributes", "NonResourceAttributes"),
        },
        "ResourceAttributes": {
            1: ("namespace", "string"),
            2: ("verb", "string"),
            3: ("group", "string"),
            4: ("version", "string"),
            5: ("resource", "string"),
            6: ("subresource", "string"),
            7: ("name", "string"),
            # selectors do not change the answer here: everything is allowed
            8: ("fieldSelector", "skip"),
            9: ("labelSelector", "skip"),
        },
        "NonResourceAttributes": {1: ("path", "string"), 2: ("verb", "string")},
        "SelfSubjectRulesReview": {
            1: ("metadata", "ObjectMeta"),
            2: ("spec", "SelfSubjectRulesReviewSpec"),
            3: ("status", "skip"),
        },
        "SelfSubjectRulesReviewSpec": {1: ("namespace", "string")},
    }
)

KINDS = {
    ("v1", "Namespace"),
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("v1", "ServiceAccount"),
    ("v1", "Pod"),
    ("apps/v1", "Deployment"),
    ("authorization.k8s.io/v1", "SelfSubjectAccessReview"),
    ("authorization.k8s.io/v1", "SelfSubjectRulesReview"),
}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) of a message: ints or bytes."""
    out = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 1:
            value, pos = struct.unpack_from("<q", data, pos)[0], pos + 8
        elif wire == 5:
            value, pos = struct.unpack_from("<i", data, pos)[0], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((number, wire, value))
    return out


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _scalar(typ: str, value: Any, where: str) -> Any:
    base = typ.rstrip("?")
    if base == "string":
        return bytes(value).decode()
    if base == "bytes":
        return base64.b64encode(bytes(value)).decode()
    if base == "int":
        return _signed(int(value))
    if base == "bool":
        return bool(value)
    return _message(base, bytes(value), where)


def _empty(value: Any) -> bool:
    return value in ("", 0, False, None, {}, []) and value is not True


def _message(name: str, data: bytes, where: str = "") -> Any:
    schema = MESSAGES[name]
    where = f"{where}.{name}" if where else name
    out: dict[str, Any] = {}
    for number, _, value in _fields(data):
        if number not in schema:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the API test double cannot decode protobuf field {number} of "
                f"{where}; send JSON (e.g. kubectl create -f / apply -f)",
                {},
            )
        field, typ = schema[number]
        if typ == "skip":
            continue
        if typ.startswith("[]"):
            item = typ[2:]
            if item in ("int", "bool") and isinstance(value, bytes | bytearray):  # packed
                pos, items = 0, []
                while pos < len(value):
                    v, pos = _varint(bytes(value), pos)
                    items.append(_scalar(item, v, where))
                out.setdefault(field, []).extend(items)
            else:
                out.setdefault(field, []).append(_scalar(item, value, where))
        elif typ.startswith("map:"):
            entry = {n: v for n, _, v in _fields(bytes(value))}
            key = bytes(entry.get(1, b"")).decode()
            out.setdefault(field, {})[key] = _scalar(typ[4:], entry.get(2, b""), where)
        else:
            out[field] = _scalar(typ, value, where)
    if name == "Time":
        if not out.get("seconds"):
            return None
        return datetime.fromtimestamp(out["seconds"], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if name == "Quantity":
        return out.get("string", "")
    if name == "FieldsV1":
        return json.loads(base64.b64decode(out.get("Raw", "")) or b"{}")
    return {k: v for k, v in out.items() if not _empty(v) or schema_optional(schema, k)}


def schema_optional(schema: Schema, field: str) -> bool:
    return any(f == field and t.endswith("?") for f, t in schema.values())


def decode(body: bytes) -> dict[str, Any]:
    """The JSON form of a protobuf-encoded object (415 if it cannot be decoded here)."""
    if not body.startswith(MAGIC):
        raise ApiError(415, "UnsupportedMediaType", "protobuf body without the k8s magic", {})
    try:
        unknown = _message("Unknown", body[len(MAGIC) :])
        meta = unknown.get("typeMeta") or {}
        api_version, kind = meta.get("apiVersion", ""), meta.get("kind", "")
        if (api_version, kind) not in KINDS:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the API test double cannot decode protobuf {api_version} {kind}; "
                "send JSON (e.g. kubectl create -f / apply -f)",
                {},
            )
        obj = _message(kind, base64.b64decode(unknown.get("raw", "")))
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise ApiError(400, "BadRequest", f"malformed protobuf body: {e}") from None
    return {"apiVersion": api_version, "kind": kind, **obj}
