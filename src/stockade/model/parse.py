"""From text (YAML or JSON, multi-document, `kind: List`) to model objects."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from stockade.errors import DecodeError, InputError, InvalidObjects, ValidationError
from stockade.model.cluster import Cluster, Endpoint, Namespace, implicit_namespace
from stockade.model.cnp import CNP_KIND, ClusterNetworkPolicy
from stockade.model.cnp_decode import decode_cluster_network_policy
from stockade.model.decode import (
    WORKLOAD_TEMPLATES,
    decode_namespace,
    decode_network_policy,
    decode_pod,
    decode_workload,
    describe_value,
    object_name,
    pod_controller,
)
from stockade.model.jsonkeys import unique_keys
from stockade.model.policy import NetworkPolicy, Source


class _Loader(yaml.SafeLoader):
    """SafeLoader whose timestamps stay strings, as in JSON."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> Any:
    # kubectl rejects a mapping with a key twice; PyYAML would keep the last one.
    seen: set[object] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, str | int | float | bool):
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"mapping key {key!r} already defined", key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

for _first, _resolvers in list(_Loader.yaml_implicit_resolvers.items()):
    _Loader.yaml_implicit_resolvers[_first] = [
        (tag, rx) for tag, rx in _resolvers if tag != "tag:yaml.org,2002:timestamp"
    ]


def parse_documents(text: str, source: str = "") -> list[Any]:
    """Every document of a YAML (or JSON) stream; empty documents are dropped.

    The result is the reference loader's (`_Loader`, PyYAML's pure-Python
    SafeLoader: YAML 1.1, a key twice is an error, timestamps stay strings), got
    faster where that is safe: a JSON text through `json` with the same
    numbers, strings and duplicate-key rejection; other YAML through libyaml's
    parser with the same constructors and resolvers. Whatever a fast path
    cannot vouch for, or fails on, goes to the reference loader, which then
    decides and words any error. 10,000 pods as a JSON List: 29 s -> 0.2 s.
    """
    fast = _fast_documents(text)
    if fast is not None:
        return [d for d in fast if d is not None]
    return parse_documents_reference(text, source)


def parse_documents_reference(text: str, source: str = "") -> list[Any]:
    """`parse_documents` through the pure-Python loader only (the reference)."""
    try:
        docs = list(yaml.load_all(text, Loader=_Loader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"not valid YAML or JSON{where}: {problem}", source=source) from None
    except RecursionError:
        raise InputError("not valid YAML or JSON: nested too deeply", source=source) from None
    except (ValueError, KeyError, AttributeError, TypeError, IndexError) as exc:
        # PyYAML's constructors raise these on values their tags cannot hold
        # (`!!int foo`, `!!timestamp 2001-02-30`, integers of thousands of digits).
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"not valid YAML or JSON: a value cannot be read ({text[:120]})",
                         source=source) from None
    return [d for d in docs if d is not None]


# ---- fast paths: each gives the reference loader's documents, or None ----------------

if getattr(yaml, "__with_libyaml__", False):
    class _CLoader(yaml.CSafeLoader):
        """libyaml's parser under `_Loader`'s constructors and resolvers."""

    _CLoader.yaml_constructors = _Loader.yaml_constructors
    _CLoader.yaml_implicit_resolvers = _Loader.yaml_implicit_resolvers
    _C_LOADER: type | None = _CLoader
else:  # pragma: no cover - PyYAML built without libyaml
    _C_LOADER = None

# YAML 1.1's float (the loader's resolver): `1e5` and `1.5e10` are strings there.
_YAML_FLOAT = next(rx for rx_list in _Loader.yaml_implicit_resolvers.values()
                   for tag, rx in rx_list if tag == "tag:yaml.org,2002:float")
# Characters after which `json` and the YAML reader could disagree: tabs (not
# YAML whitespace here), characters the reader refuses, NEL (a YAML line break,
# folded inside quotes) and the other Unicode line breaks.
# Compiled on the first text that is not ASCII: the class costs 7 ms to compile,
# a tenth of a small command's start-up.
_NOT_PLAIN_JSON = "[^\n\r\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
# A key whose colon is on another line is a flow-mapping error for YAML; a
# surrogate escape stays two lone surrogates in YAML where `json` joins them.
_JSON_DIFFERS = re.compile(r'"[ ]*[\r\n][ \r\n]*:|\\u[dD][89abAB]')


def _may_differ(text: str) -> bool:
    """Whether `_JSON_DIFFERS` can match: it needs a backslash, or a quote before a
    line break (plain `in` tests, far faster than the search; a single character
    is looked for faster still, and compact JSON has no line break at all)."""
    if "\\" in text:
        return True
    if "\n" not in text and "\r" not in text:
        return False
    return '"\n' in text or '"\r' in text or '" ' in text


class _Unsure(Exception):
    """The fast path cannot vouch for the reference loader's result."""


def _fast_documents(text: str) -> list[Any] | None:
    """The reference loader's documents, or None when only it can tell."""
    if "\t" in text:
        return None  # libyaml accepts tabs where the reference loader refuses them
    try:
        start = text.lstrip(" \r\n")[:1]
        if start in ("{", "["):
            return [_json_document(text)]
        if _C_LOADER is not None:
            return list(yaml.load_all(text, Loader=_C_LOADER))
    except _Unsure:
        pass
    except Exception:  # noqa: S110 - any failure: the reference loader decides and words it
        pass
    return None


def _json_document(text: str) -> Any:
    if not (text.isascii() and "\x7f" not in text) and re.search(_NOT_PLAIN_JSON, text):
        raise _Unsure
    # The search alone walks the whole text (0.7 s at 100,000 pods).
    if _may_differ(text) and _JSON_DIFFERS.search(text):
        raise _Unsure
    doc = json.loads(text, parse_float=_json_float, parse_constant=str)
    if unique_keys(text, doc):
        return doc
    return json.loads(text, object_pairs_hook=_json_object, parse_float=_json_float,
                      parse_constant=str)


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _Unsure  # a key twice: the reference loader says where
    return out


def _json_float(text: str) -> Any:
    # What YAML 1.1 reads a plain scalar as: a float, or (`1e5`) a string.
    return float(text) if _YAML_FLOAT.fullmatch(text) else text


def expand_lists(docs: list[Any]) -> Iterator[tuple[int, Any]]:
    """Documents with `kind: List` (or `*List`) items flattened, each with its index."""
    for i, doc in enumerate(docs):
        kind = doc.get("kind") if isinstance(doc, dict) else None
        if isinstance(kind, str) and kind.endswith("List") \
                and isinstance(doc.get("items"), list):
            for item in doc["items"]:
                yield i, item
        else:
            yield i, doc


@dataclass
class Objects:
    """What a set of files describes: policies and the cluster they apply to."""

    policies: list[NetworkPolicy] = field(default_factory=list)
    cluster_policies: list[ClusterNetworkPolicy] = field(default_factory=list)
    namespaces: list[Namespace] = field(default_factory=list)
    endpoints: list[Endpoint] = field(default_factory=list)
    # Documents of other kinds (Deployments, Services...) are skipped but counted.
    skipped: int = 0
    # Decoded only for the offline analyses (`workloads=True`): workloads as one
    # address-less endpoint each, named `name[Kind]` (Deployments, Jobs...); the
    # controller (kind, name) of each Pod that has one, by Pod key; and each
    # skipped object, as `FILE: Kind ns/name` for a note.
    workloads: list[Endpoint] = field(default_factory=list)
    controllers: dict[str, tuple[str, str]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    def extend(self, other: Objects) -> None:
        self.policies.extend(other.policies)
        self.cluster_policies.extend(other.cluster_policies)
        self.namespaces.extend(other.namespaces)
        self.endpoints.extend(other.endpoints)
        self.skipped += other.skipped
        self.workloads.extend(other.workloads)
        for ep in other.endpoints:
            self.controllers.pop(ep.key, None)  # a later Pod replaces an earlier one whole
        self.controllers.update(other.controllers)
        self.ignored.extend(other.ignored)

    def cluster(self) -> Cluster:
        """The cluster, with any namespace named by a pod or policy but not declared.

        Workloads (when decoded) are endpoints of it like Pods, without addresses.
        """
        declared = {ns.name: ns for ns in self.namespaces}
        everyone = self.endpoints + self.workloads
        named = dict.fromkeys([ep.namespace for ep in everyone]
                              + [p.namespace for p in self.policies])
        for name in named:  # each once, in order (not once per pod)
            if name not in declared:
                declared[name] = implicit_namespace(name)
        # As with `kubectl apply` of several files, a later object of the same
        # kind, namespace and name replaces an earlier one.
        endpoints = {ep.key: ep for ep in everyone}
        policies = {p.key: p for p in self.policies}
        tiers = {p.key: p for p in self.cluster_policies}
        return Cluster(tuple(declared.values()), tuple(endpoints.values()),
                       tuple(policies.values()), tuple(tiers.values()))


def parse_objects(text: str, source: str = "", *, strict_kinds: bool = False,
                  workloads: bool = False) -> Objects:
    """Decode every NetworkPolicy, Pod and Namespace of a stream.

    Decoding errors name the file and the object; all of them are reported
    (InvalidObjects), or the one (DecodeError). Other kinds are skipped unless
    `strict_kinds`, where they are an error. `workloads`: as `decode_objects`.
    """
    objects, errors = decode_objects(parse_documents(text, source), source,
                                     strict_kinds=strict_kinds, workloads=workloads)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise InvalidObjects(errors)
    return objects


def decode_objects(docs: list[Any], source: str = "", *, strict_kinds: bool = False,
                   workloads: bool = False) -> tuple[Objects, list[InputError]]:
    """Every object of a list of documents, and every document that cannot be decoded.

    The one decoding path of files and of the agent's socket alike; validation
    follows in `model.admit.admit_objects`. `workloads` (the offline analyses):
    workload kinds are decoded from their pod templates, Pods are read whatever
    their status (without an IP they have no address), each Pod's controller is
    kept, and every skipped object is named in `ignored`. Without it, what
    enforcement needs: a Pod without an IP is an error, workloads are skipped.
    """
    out = Objects()
    errors: list[InputError] = []
    for index, doc in expand_lists(docs):
        src = Source(source, index)
        kind = doc.get("kind") if isinstance(doc, dict) else None
        try:
            if kind == "NetworkPolicy":
                out.policies.append(decode_network_policy(doc, src, allow_status=workloads))
            elif kind == CNP_KIND:
                out.cluster_policies.append(decode_cluster_network_policy(doc, src))
            elif kind == "Pod":
                ep = decode_pod(doc, src, require_ip=not workloads)
                out.endpoints.append(ep)
                if workloads:
                    owner = pod_controller(doc)
                    if owner is not None:
                        out.controllers[ep.key] = owner
                    else:
                        out.controllers.pop(ep.key, None)
            elif kind == "Namespace":
                out.namespaces.append(decode_namespace(doc, src))
            elif workloads and not strict_kinds and kind in WORKLOAD_TEMPLATES:
                out.workloads.append(decode_workload(doc, src))
            elif strict_kinds or not isinstance(doc, dict) or not isinstance(kind, str):
                supported = (" (NetworkPolicy, ClusterNetworkPolicy, Namespace, Pod)"
                             if strict_kinds else "")
                raise DecodeError(f"unsupported document (kind {describe_value(kind)})"
                                  + supported)
            else:
                out.skipped += 1
                if workloads:
                    out.ignored.append(f"{source or '<input>'}: "
                                       f"{object_name(doc) or f'document {index + 1}'}")
        except DecodeError as exc:
            errors.append(DecodeError(exc.message.removeprefix(f"{exc.path}: "),
                                      path=exc.path, source=source,
                                      obj=object_name(doc) or f"document {index + 1}"))
        except ValidationError as exc:  # a ClusterNetworkPolicy: its CRD's schema
            errors.append(exc)
    return out, errors
