"""`stockade validate FILE…`: the API server's verdict on every NetworkPolicy."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from stockade.errors import DecodeError, InputError
from stockade.load import expand_paths, read_text
from stockade.model.decode import decode_network_policy, object_name
from stockade.model.parse import expand_lists, parse_documents
from stockade.model.policy import Source
from stockade.model.validate import validate_policy


def register(sub: Any) -> None:
    p = sub.add_parser("validate", help="validate NetworkPolicy manifests as the API server does")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--strict-cidr", action="store_true",
                   help="turn on the StrictIPCIDRValidation rules (off by default, as upstream)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Every error of every object, one line each; nothing stops at the first."""
    bad = 0
    count = 0
    for path in expand_paths(args.files):
        try:
            docs = parse_documents(read_text(path), path)
        except InputError as exc:
            print(exc.render(), file=sys.stderr)
            bad += 1
            continue
        n, b = check_documents(docs, path, strict_cidr=args.strict_cidr)
        count += n
        bad += b
    return conclude(count, bad)


def check_documents(docs: list[Any], source: str, *, strict_cidr: bool) -> tuple[int, int]:
    """Check every NetworkPolicy of `docs` (from `source`): errors on stderr; the number
    of policies and of errors. Every object of another kind is named on stderr as
    ignored (a document without a kind is checked, and fails, as a NetworkPolicy)."""
    bad = 0
    count = 0
    for index, doc in expand_lists(docs):
        kind = doc.get("kind") if isinstance(doc, dict) else None
        if isinstance(kind, str) and kind and kind != "NetworkPolicy":
            print(f"{source}: {object_name(doc)}: ignored (validate checks NetworkPolicies)",
                  file=sys.stderr)
            continue
        count += 1
        name = object_name(doc) or f"document {index}"
        try:
            policy = decode_network_policy(doc, Source(source, index))
        except DecodeError as exc:
            print(f"{source}: {name}: {exc.message}", file=sys.stderr)
            bad += 1
            continue
        for err in validate_policy(policy, strict_cidr=strict_cidr):
            name = policy.name or policy.generate_name
            print(f"{source}: NetworkPolicy {policy.namespace}/{name}: {err.render()}",
                  file=sys.stderr)
            bad += 1
    return count, bad


def conclude(count: int, bad: int) -> int:
    if bad:
        return 2
    print(f"{count} NetworkPolicy object(s) valid")
    return 0
