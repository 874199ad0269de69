"""Reading manifests from files and standard input (the shell around model.parse)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from stockade.errors import InputError, InvalidObjects
from stockade.model.admit import admit_objects
from stockade.model.cluster import Cluster
from stockade.model.parse import Objects, parse_objects


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
                 recursive: bool = False) -> Objects:
    """The objects of the files. `workloads`: the offline analyses' reading (workload
    kinds from their pod templates, Pods whatever their status, skipped objects named;
    `model.parse.decode_objects`)."""
    objects = Objects()
    for path in expand_paths(paths, recursive=recursive):
        objects.extend(parse_objects(read_text(path), path, workloads=workloads))
    return objects


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


def load_cluster(paths: Iterable[str], *, strict_cidr: bool = False) -> Cluster:
    """The cluster the files describe to enforce: every object valid, none twice."""
    objects = load_objects(paths)
    validate_objects(objects, strict_cidr=strict_cidr, duplicates=True)
    return objects.cluster()
