"""Patches and server-side apply: merge, JSON, strategic merge (approximated), field sets.

* JSON merge patch (RFC 7386) and JSON patch (RFC 6902: add, remove, replace,
  move, copy, test) are exact.
* Strategic merge patch is approximated: a merge patch in which the lists named
  in :data:`MERGE_KEYS` (containers by ``name``, container ports by
  ``containerPort``, ...) are merged item by item on their merge key, ``$patch:
  delete|replace`` directives are honoured, ``$setElementOrder/...``,
  ``$retainKeys`` and ``$deleteFromPrimitiveList/...`` are accepted, the latter
  two applied, the first ignored (order follows the live list). Every other
  list is replaced, which is what the real schemas say for NetworkPolicy's lists.
  This is enough for ``kubectl apply`` (client-side) and ``kubectl edit``.
* Server-side apply keeps ``metadata.managedFields`` in the real format
  (``fieldsType: FieldsV1``) and follows structured-merge-diff's rules on a
  schema reduced to the same table: maps are granular, lists in
  :data:`MERGE_KEYS` are associative (``k:{...}`` entries), ``finalizers`` is a
  set (``v:...``), every other list is atomic (owned as a whole).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from typing import Any

from .errors import ApiError, bad_request

Path = tuple[str, ...]

# Associative lists (by field name; ``ports`` depends on the parent): the merge keys.
MERGE_KEYS: dict[str, tuple[str, ...]] = {
    "containers": ("name",),
    "initContainers": ("name",),
    "ephemeralContainers": ("name",),
    "env": ("name",),
    "volumes": ("name",),
    "volumeMounts": ("mountPath",),
    "volumeDevices": ("devicePath",),
    "imagePullSecrets": ("name",),
    "conditions": ("type",),
    "ownerReferences": ("uid",),
    "hostAliases": ("ip",),
    "topologySpreadConstraints": ("topologyKey", "whenUnsatisfiable"),
    "resourceClaims": ("name",),
}
SET_LISTS = frozenset({"finalizers"})
_CONTAINER_LISTS = frozenset({"containers", "initContainers", "ephemeralContainers"})


def list_keys(names: Path) -> tuple[str, ...] | None:
    """The merge keys of the list at field path ``names`` (plain field names), if associative."""
    if not names:
        return None
    last = names[-1]
    if last == "ports":
        # container ports (a list item of containers), or a Service's ports
        if len(names) >= 2 and names[-2] in _CONTAINER_LISTS:
            return ("containerPort", "protocol")
        if names[:-1] == ("spec",):
            return ("port", "protocol")
        return None
    return MERGE_KEYS.get(last)


def _item_key(item: dict[str, Any], keys: tuple[str, ...]) -> str:
    present = {k: item[k] for k in sorted(keys) if k in item}
    return "k:" + json.dumps(present, separators=(",", ":"), sort_keys=True)


def _is_assoc(value: Any, keys: tuple[str, ...] | None) -> bool:
    return (
        keys is not None
        and isinstance(value, list)
        and all(isinstance(i, dict) and keys[0] in i for i in value)
    )


# --------------------------------------------------------------------------- merge patch


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386; returns a new value, ``target`` is not modified."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


# --------------------------------------------------------------------------- JSON patch


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise bad_request(f"json patch: invalid path {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, parts: list[str]) -> tuple[Any, str]:
    cur = doc
    for p in parts[:-1]:
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        elif isinstance(cur, list) and p.isdigit() and int(p) < len(cur):
            cur = cur[int(p)]
        else:
            raise ApiError(422, "Invalid", f"jsonpatch: doc is missing path: /{'/'.join(parts)}")
    return cur, parts[-1]


def _get(doc: Any, parts: list[str]) -> Any:
    if not parts:
        return doc
    parent, last = _parent(doc, parts)
    if isinstance(parent, dict) and last in parent:
        return parent[last]
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent[int(last)]
    raise ApiError(422, "Invalid", f"jsonpatch: doc is missing key: /{'/'.join(parts)}")


def _remove(doc: Any, parts: list[str]) -> Any:
    parent, last = _parent(doc, parts)
    if isinstance(parent, dict) and last in parent:
        return parent.pop(last)
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent.pop(int(last))
    raise ApiError(
        422,
        "Invalid",
        f"jsonpatch remove operation does not apply: doc is missing path: /{'/'.join(parts)}",
    )


def _add(doc: Any, parts: list[str], value: Any, replace: bool) -> Any:
    if not parts:
        return value
    parent, last = _parent(doc, parts)
    if isinstance(parent, dict):
        if replace and last not in parent:
            raise ApiError(
                422,
                "Invalid",
                "jsonpatch replace operation does not apply: doc is missing key: "
                f"/{'/'.join(parts)}",
            )
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-":
            parent.append(value)
        elif last.isdigit() and int(last) <= len(parent):
            if replace:
                if int(last) >= len(parent):
                    raise ApiError(422, "Invalid", "jsonpatch replace: index out of range")
                parent[int(last)] = value
            else:
                parent.insert(int(last), value)
        else:
            raise ApiError(422, "Invalid", f"jsonpatch: invalid index {last!r}")
    else:
        raise ApiError(422, "Invalid", f"jsonpatch: doc is missing path: /{'/'.join(parts)}")
    return doc


def json_patch(target: Any, ops: Any) -> Any:
    """RFC 6902; returns a new value."""
    if not isinstance(ops, list):
        raise bad_request("json patch: the patch is not a list of operations")
    doc = copy.deepcopy(target)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise bad_request(f"json patch: malformed operation {op!r}")
        kind, parts = op["op"], _pointer(op["path"])
        if kind == "add":
            doc = _add(doc, parts, copy.deepcopy(op.get("value")), False)
        elif kind == "replace":
            doc = _add(doc, parts, copy.deepcopy(op.get("value")), True)
        elif kind == "remove":
            _remove(doc, parts)
        elif kind == "move":
            value = _remove(doc, _pointer(op["from"]))
            doc = _add(doc, parts, value, False)
        elif kind == "copy":
            doc = _add(doc, parts, copy.deepcopy(_get(doc, _pointer(op["from"]))), False)
        elif kind == "test":
            if _get(doc, parts) != op.get("value"):
                raise ApiError(
                    422,
                    "Invalid",
                    "the server rejected our request due to an error in our request: testing "
                    f"value {op['path']} failed",
                )
        else:
            raise bad_request(f"json patch: unknown operation {kind!r}")
    return doc


# --------------------------------------------------------------------------- strategic merge


def strategic_merge_patch(target: Any, patch: Any, names: Path = ()) -> Any:
    """An approximation of strategic merge patch (see the module docstring)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return None
    out = dict(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    for k, v in patch.items():
        if k.startswith("$setElementOrder/") or k in ("$retainKeys", "$patch"):
            continue
        if k.startswith("$deleteFromPrimitiveList/"):
            field = k.split("/", 1)[1]
            if isinstance(out.get(field), list):
                out[field] = [x for x in out[field] if x not in v]
            continue
        if v is None:
            out.pop(k, None)
            continue
        sub = (*names, k)
        keys = list_keys(sub) or (("",) if k in SET_LISTS else None)
        cur = out.get(k)
        if isinstance(v, list) and keys is not None and isinstance(cur, list):
            out[k] = _merge_list(cur, v, keys, sub)
        elif isinstance(v, dict):
            merged = strategic_merge_patch(cur, v, sub)
            if merged is None:
                out.pop(k, None)
            else:
                out[k] = merged
        else:
            out[k] = copy.deepcopy(v)
    if isinstance(retain, list):
        out = {k: v for k, v in out.items() if k in retain}
    return out


def _merge_list(cur: list[Any], patch: list[Any], keys: tuple[str, ...], names: Path) -> list[Any]:
    if keys == ("",):  # a set of primitives: union
        return list(cur) + [x for x in patch if x not in cur]
    key = keys[0]
    out = list(cur)
    for item in patch:
        if not isinstance(item, dict):
            return copy.deepcopy(patch)
        if item.get("$patch") == "replace":
            return [
                copy.deepcopy({k: v for k, v in i.items() if k != "$patch"})
                for i in patch
                if isinstance(i, dict) and i.get("$patch") != "replace"
            ]
        idx = next(
            (i for i, c in enumerate(out) if isinstance(c, dict) and c.get(key) == item.get(key)),
            None,
        )
        if item.get("$patch") == "delete":
            if idx is not None:
                out.pop(idx)
            continue
        if idx is None:
            out.append(strategic_merge_patch({}, item, names))
        else:
            out[idx] = strategic_merge_patch(out[idx], item, names)
    return out


# --------------------------------------------------------------------------- field sets

# Top-level and metadata fields that managedFields never record.
_META_SKIP = frozenset(
    {
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "managedFields",
        "selfLink",
        "generateName",
    }
)


def tracked(obj: dict[str, Any], subresource: str) -> dict[str, Any]:
    """The part of an object that managedFields track for the main resource or a subresource."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if k in ("apiVersion", "kind"):
            continue
        if subresource == "status":
            if k == "status":
                out[k] = v
            continue
        if k == "status":
            continue
        if k == "metadata" and isinstance(v, dict):
            meta = {mk: mv for mk, mv in v.items() if mk not in _META_SKIP}
            if meta:
                out[k] = meta
            continue
        out[k] = v
    return out


def fieldset(value: Any, prefix: Path = (), names: Path = ()) -> set[Path]:
    """The set of paths of ``value`` as structured-merge-diff enumerates them for an apply."""
    out: set[Path] = set()
    if not isinstance(value, dict):
        return out
    for k, v in value.items():
        p, n = (*prefix, "f:" + k), (*names, k)
        keys = list_keys(n)
        if isinstance(v, dict) and v:
            out |= fieldset(v, p, n)
        elif isinstance(v, list) and v and _is_assoc(v, keys):
            assert keys is not None
            for item in v:
                ip = (*p, _item_key(item, keys))
                out.add(ip)
                out |= fieldset(item, ip, n)
        elif isinstance(v, list) and v and k in SET_LISTS:
            for item in v:
                out.add((*p, "v:" + json.dumps(item, separators=(",", ":"))))
        else:
            out.add(p)
    return out


def parse_fields_v1(doc: Any, prefix: Path = ()) -> set[Path]:
    out: set[Path] = set()
    if not isinstance(doc, dict):
        return out
    for k, sub in doc.items():
        if k == ".":
            out.add(prefix)
        elif isinstance(sub, dict) and sub:
            out |= parse_fields_v1(sub, (*prefix, k))
        else:
            out.add((*prefix, k))
    return out


def render_fields_v1(paths: Iterable[Path]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    members: set[Path] = set()
    for p in paths:
        node = root
        for part in p:
            node = node.setdefault(part, {})
        members.add(p)

    def finish(node: dict[str, Any], prefix: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if node and prefix in members:
            out["."] = {}
        for k in sorted(node):
            out[k] = finish(node[k], (*prefix, k))
        return out

    return finish(root, ())


def _step(value: Any, part: str) -> tuple[bool, Any]:
    """Follow one path element; (found, child)."""
    kind, _, rest = part.partition(":")
    if kind == "f":
        if isinstance(value, dict) and rest in value:
            return True, value[rest]
        return False, None
    if kind == "k" and isinstance(value, list):
        want = json.loads(rest)
        for item in value:
            if isinstance(item, dict) and all(item.get(k) == v for k, v in want.items()):
                return True, item
        return False, None
    if kind == "v" and isinstance(value, list):
        want = json.loads(rest)
        return (want in value), want
    return False, None


def value_at(obj: Any, path: Path) -> tuple[bool, Any]:
    cur = obj
    for part in path:
        found, cur = _step(cur, part)
        if not found:
            return False, None
    return True, cur


def remove_path(obj: Any, path: Path) -> None:
    """Delete the field, list item or set member at ``path`` in place (if present)."""
    if not path:
        return
    found, parent = value_at(obj, path[:-1])
    if not found:
        return
    kind, _, rest = path[-1].partition(":")
    if kind == "f" and isinstance(parent, dict):
        parent.pop(rest, None)
    elif kind == "k" and isinstance(parent, list):
        want = json.loads(rest)
        parent[:] = [
            i
            for i in parent
            if not (isinstance(i, dict) and all(i.get(k) == v for k, v in want.items()))
        ]
    elif kind == "v" and isinstance(parent, list):
        want = json.loads(rest)
        parent[:] = [i for i in parent if i != want]


def is_key_field(path: Path) -> bool:
    """Whether ``path`` names a merge-key field of an associative list item."""
    if len(path) < 2 or not path[-2].startswith("k:") or not path[-1].startswith("f:"):
        return False
    return path[-1][2:] in json.loads(path[-2][2:])


def render_path(path: Path) -> str:
    """``.spec.containers[name="c"].image``, as conflict messages name fields."""
    out = ""
    for part in path:
        kind, _, rest = part.partition(":")
        if kind == "f":
            out += "." + rest
        elif kind == "k":
            out += "[" + ",".join(f"{k}={json.dumps(v)}" for k, v in json.loads(rest).items()) + "]"
        else:
            out += f"[={rest}]"
    return out


def apply_merge(live: Any, config: Any, names: Path = ()) -> Any:
    """Merge an applied configuration into the live value (a new value is returned)."""
    if isinstance(live, dict) and isinstance(config, dict):
        out = dict(live)
        for k, v in config.items():
            out[k] = apply_merge(live[k], v, (*names, k)) if k in live else copy.deepcopy(v)
        return out
    keys = list_keys(names)
    if (
        isinstance(live, list)
        and isinstance(config, list)
        and _is_assoc(config, keys)
        and _is_assoc(live, keys)
    ):
        assert keys is not None
        out_list = list(live)
        index = {_item_key(i, keys): n for n, i in enumerate(out_list)}
        for item in config:
            k = _item_key(item, keys)
            if k in index:
                out_list[index[k]] = apply_merge(out_list[index[k]], item, names)
            else:
                index[k] = len(out_list)
                out_list.append(copy.deepcopy(item))
        return out_list
    if isinstance(live, list) and isinstance(config, list) and names and names[-1] in SET_LISTS:
        return list(live) + [x for x in config if x not in live]
    return copy.deepcopy(config)


def leaves(paths: set[Path]) -> set[Path]:
    """The paths of ``paths`` that no other path extends."""
    parents = {p[:i] for p in paths for i in range(1, len(p))}
    return paths - parents


def changed_paths(old: Any, new: Any, paths: Iterable[Path]) -> set[Path]:
    """The paths among ``paths`` whose value differs between ``old`` and ``new``.

    A list item (``k:``) or set member (``v:``) differs only by existing in one
    and not the other; its fields are paths of their own.
    """
    out = set()
    for p in paths:
        a, b = value_at(old, p), value_at(new, p)
        if a[0] != b[0] or (a[0] and p and not p[-1].startswith(("k:", "v:")) and a[1] != b[1]):
            out.add(p)
    return out
