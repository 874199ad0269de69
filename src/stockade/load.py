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

_LINE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_NULLS = ("", "~", "null", "Null", "NULL")
_NODE_EVENTS = (yaml.ScalarEvent, yaml.AliasEvent, yaml.MappingStartEvent,
                yaml.SequenceStartEvent)


def object_lines(text: str) -> list[int]:
    """The line (from 1) where each object of a stream starts, in the order of
    `model.parse.expand_lists` (an item of a `kind: List` is an object); [] when
    the text cannot be read (its errors are the parser's to report).

    From the parser's events, not a composed tree: 10 times faster, and a List's
    `kind` may come after its `items` (kubectl prints them so)."""
    for loader in (_LINE_LOADER, yaml.SafeLoader):
        try:
            return _event_lines(yaml.parse(text, Loader=loader))
        except Exception:  # noqa: S112 - libyaml refuses what the pure loader may take
            continue
    return []


def _event_lines(events: Iterable[Any]) -> list[int]:
    lines: list[int] = []
    depth = 0
    root = 0  # the line of the document's root node; 0: none yet, or an empty document
    kind: str | None = None
    items: list[int] | None = None
    key: Any = None
    in_items = mapping = False
    for ev in events:
        if isinstance(ev, yaml.DocumentStartEvent):
            root, kind, items, key, in_items = 0, None, None, None, False
        elif isinstance(ev, yaml.DocumentEndEvent):
            if root:
                is_list = kind is not None and kind.endswith("List") and items is not None
                lines.extend(items if is_list and items is not None else [root])
        elif isinstance(ev, _NODE_EVENTS):
            line = ev.start_mark.line + 1 if ev.start_mark is not None else 0
            if depth == 0:
                empty = isinstance(ev, yaml.ScalarEvent) and ev.tag is None \
                    and ev.implicit[0] and ev.value in _NULLS
                root = 0 if empty else line
                mapping = isinstance(ev, yaml.MappingStartEvent)
            elif depth == 1 and mapping:  # a key or a value of the root mapping, in turn
                if key is None:
                    key = ev.value if isinstance(ev, yaml.ScalarEvent) else ""
                else:
                    if key == "kind" and isinstance(ev, yaml.ScalarEvent):
                        kind = ev.value
                    elif key == "items" and isinstance(ev, yaml.SequenceStartEvent):
                        items, in_items = [], True
                    key = None
            elif depth == 2 and in_items and items is not None:
                items.append(line)
            if isinstance(ev, yaml.MappingStartEvent | yaml.SequenceStartEvent):
                depth += 1
        elif isinstance(ev, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            depth -= 1
            if depth == 1:
                in_items = False
    return lines


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
