"""Reading manifests from files and standard input (the shell around model.parse)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from stockade.errors import InputError, InvalidObjects, ValidationError
from stockade.model.cluster import Cluster
from stockade.model.parse import Objects, parse_objects
from stockade.model.validate import validate_policy


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


def expand_paths(paths: Iterable[str]) -> list[str]:
    """Files as given; a directory stands for its *.yaml, *.yml and *.json files."""
    out: list[str] = []
    for path in paths:
        p = Path(path)
        if path != "-" and p.is_dir():
            out.extend(sorted(str(f) for f in p.iterdir()
                              if f.suffix in (".yaml", ".yml", ".json") and f.is_file()))
        else:
            out.append(path)
    return out


def load_objects(paths: Iterable[str]) -> Objects:
    objects = Objects()
    for path in expand_paths(paths):
        objects.extend(parse_objects(read_text(path), path))
    return objects


def validate_objects(objects: Objects, *, strict_cidr: bool = False) -> None:
    """Raise one error listing every invalid policy, so nothing of the set is applied."""
    bad = []
    for policy in objects.policies:
        errors = validate_policy(policy, strict_cidr=strict_cidr)
        if errors:
            name = policy.name or policy.generate_name
            bad.append(ValidationError(errors, source=policy.source.render(),
                                       obj=f"NetworkPolicy {policy.namespace}/{name}"))
    if bad:
        raise InvalidObjects(bad)


def load_cluster(paths: Iterable[str], *, strict_cidr: bool = False) -> Cluster:
    """The cluster the files describe, every policy in it valid."""
    objects = load_objects(paths)
    validate_objects(objects, strict_cidr=strict_cidr)
    return objects.cluster()
