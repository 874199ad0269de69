"""Reading manifests from files and standard input (the shell around model.parse)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stockade.errors import InputError, InvalidObjects
from stockade.model.admit import admit_objects
from stockade.model.cluster import Cluster
from stockade.model.parse import Objects, expand_lists, parse_documents, parse_objects


def read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("no such file", source=path) from None
    except IsADirectoryError:
        raise InputError("is a directory (give the files in it)", source=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read: {exc}", source=path) from None


MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


def expand_paths(paths: Iterable[str], *, recursive: bool = False) -> list[str]:
    """Files as given; a directory stands for its *.yaml, *.yml and *.json files
    (and, `recursive`, those of its subdirectories, as `kubectl -R` reads them)."""
    out: list[str] = []
    for path in paths:
        p = Path(path)
        if path != "-" and p.is_dir():
            found = p.rglob("*") if recursive else p.iterdir()
            out.extend(sorted(str(f) for f in found
                              if f.suffix in MANIFEST_SUFFIXES and f.is_file()))
        else:
            out.append(path)
    return out


def load_objects(paths: Iterable[str], *, workloads: bool = False,
                 recursive: bool = False, locations: Locations | None = None) -> Objects:
    """The objects of the files. `workloads`: the offline analyses' reading (workload
    kinds from their pod templates, Pods whatever their status, skipped objects named;
    `model.parse.decode_objects`). `locations`: filled with the line of each object."""
    objects = Objects()
    for path in expand_paths(paths, recursive=recursive):
        text = read_text(path)
        objects.extend(parse_objects(text, path, workloads=workloads))
        if locations is not None:
            locations.add(path, text)
    return objects


# ---- where each object starts ------------------------------------------------------------

_NULL = "tag:yaml.org,2002:null"
_LINE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def object_lines(text: str) -> list[int]:
    """The line (from 1) where each object of a stream starts, in the order of
    `model.parse.expand_lists` (an item of a `kind: List` is an object); [] when
    the text cannot be read (its errors are the parser's to report)."""
    nodes: list[Any] = []
    for loader in (_LINE_LOADER, yaml.SafeLoader):
        try:
            nodes = list(yaml.compose_all(text, Loader=loader))
            break
        except Exception:  # noqa: S112 - libyaml refuses what the pure loader may take
            continue
    else:
        return []
    lines: list[int] = []
    for node in nodes:
        if node is None or node.tag == _NULL:
            continue  # empty documents are dropped by the parser too
        items = _list_items(node)
        targets = items if items is not None else [node]
        lines.extend(n.start_mark.line + 1 for n in targets)
    return lines


def _list_items(node: Any) -> list[Any] | None:
    """The item nodes of a `kind: *List` document with a sequence of items."""
    if not isinstance(node, yaml.MappingNode):
        return None
    fields = {k.value: v for k, v in node.value if isinstance(k, yaml.ScalarNode)}
    kind, items = fields.get("kind"), fields.get("items")
    if isinstance(kind, yaml.ScalarNode) and str(kind.value).endswith("List") \
            and isinstance(items, yaml.SequenceNode):
        return list(items.value)
    return None


def document_lines(text: str, docs: list[Any]) -> list[int]:
    """`object_lines`, one per object of `expand_lists(docs)`, or zeros (unknown) when
    the two readings disagree on the count."""
    count = sum(1 for _ in expand_lists(docs))
    lines = object_lines(text)
    return lines if len(lines) == count else [0] * count


def object_key(doc: Any) -> tuple[str, str] | None:
    """(kind, ns/name) of an object as decoding names it (no namespace: default)."""
    if not isinstance(doc, dict):
        return None
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    kind, name, ns = doc.get("kind"), meta.get("name"), meta.get("namespace")
    if not isinstance(kind, str) or not isinstance(name, str):
        return None
    if kind == "Namespace":
        return kind, name
    return kind, f"{ns if isinstance(ns, str) and ns else 'default'}/{name}"


@dataclass
class Locations:
    """The line where each object of each file starts: file -> (kind, key) -> line
    (the first, when a file has one twice)."""

    lines: dict[str, dict[tuple[str, str], int]] = field(default_factory=dict)

    def add(self, source: str, text: str) -> None:
        docs = parse_documents(text, source)
        found = self.lines.setdefault(source, {})
        for (_, doc), line in zip(expand_lists(docs), document_lines(text, docs), strict=True):
            key = object_key(doc)
            if key is not None and line:
                found.setdefault(key, line)

    def line(self, source: str, kind: str, key: str) -> int:
        """The line of the object in `source`; 0 when unknown."""
        return self.lines.get(source, {}).get((kind, key), 0)


def validate_objects(objects: Objects, *, strict_cidr: bool = False,
                     duplicates: bool = False) -> None:
    """Raise one error listing every invalid object, so nothing of the set is applied.

    `duplicates`: a key given twice is an error too (a set to enforce).
    """
    # A Pod without an address (read by the analyses only: enforcement refuses it
    # at decoding) describes a workload, not an endpoint to admit.
    bad = admit_objects(objects.policies, objects.namespaces,
                        [ep for ep in objects.endpoints if ep.ips],
                        strict_cidr=strict_cidr, duplicates=duplicates)
    if bad:
        raise InvalidObjects(bad)


def load_cluster(paths: Iterable[str], *, strict_cidr: bool = False,
                 recursive: bool = False) -> Cluster:
    """The cluster the files describe to enforce: every object valid, none twice."""
    objects = load_objects(paths, recursive=recursive)
    validate_objects(objects, strict_cidr=strict_cidr, duplicates=True)
    return objects.cluster()
