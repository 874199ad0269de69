"""`stockade validate -f FILE…`: the API server's verdict on every NetworkPolicy and
ClusterNetworkPolicy."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from stockade import __version__
from stockade.cli.inputs import FILES_HELP, add_output
from stockade.engine.report import SarifResult, json_text, sarif_log, yaml_text
from stockade.errors import DecodeError, InputError, ValidationError
from stockade.load import document_lines, expand_paths, read_text
from stockade.model.cnp import CNP_KIND
from stockade.model.cnp_decode import decode_cluster_network_policy
from stockade.model.decode import decode_network_policy, object_name
from stockade.model.parse import expand_lists, parse_documents
from stockade.model.policy import Source
from stockade.model.validate import validate_policy

# The kinds of problem, as SARIF rules: (level, title).
INVALID, UNDECODABLE, UNREADABLE = "SV001", "SV002", "SV003"
RULES = {
    INVALID: ("error", "policy rejected by the API server's validation"),
    UNDECODABLE: ("error", "policy that cannot be decoded (unknown field, wrong type)"),
    UNREADABLE: ("error", "file that is not valid YAML or JSON"),
}

EPILOG = """\
Every error of every object, each naming its file, the line where its object starts
and the field (-o sarif: a SARIF 2.1.0 log for code-scanning annotations; json and
yaml: the same problems as data). Objects of other kinds are named on stderr as
ignored. Exit status: 0 all valid, 2 errors.
"""


def register(sub: Any) -> None:
    p = sub.add_parser("validate", help="validate NetworkPolicy and ClusterNetworkPolicy "
                       "manifests as the API server does",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", metavar="FILE", help="as -f (kept for older scripts)")
    p.add_argument("-f", "--file", dest="files", action="extend", nargs="+", default=[],
                   metavar="FILE|DIR|-", help=FILES_HELP)
    p.add_argument("-R", "--recursive", action="store_true",
                   help="read the directories given with -f recursively, as kubectl -R")
    p.add_argument("--strict-cidr", action="store_true",
                   help="turn on the StrictIPCIDRValidation rules (off by default, as upstream)")
    options(p)
    p.set_defaults(run=run)


def options(p: argparse.ArgumentParser) -> None:
    add_output(p, ("txt", "json", "yaml", "sarif"))


@dataclass(frozen=True)
class Problem:
    """One error: its rule (RULES), file, line (0: unknown), object and message."""

    rule: str
    source: str
    line: int
    subject: str
    message: str

    def render(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return ": ".join(p for p in (where, self.subject, self.message) if p)


@dataclass
class Validation:
    """What validation found: the policies checked and every problem."""

    count: int = 0
    problems: list[Problem] = field(default_factory=list)
    tiers: int = 0  # of `count`, the ClusterNetworkPolicies

    def extend(self, other: Validation) -> None:
        self.count += other.count
        self.tiers += other.tiers
        self.problems += other.problems


_AT_LINE = re.compile(r" at line (\d+)")


def run(args: argparse.Namespace) -> int:
    """Every error of every object, one line each; nothing stops at the first."""
    paths = [*args.paths, *args.files]
    if not paths:
        raise InputError("no file: give -f FILE|DIR|- (several, or repeated)")
    found = Validation()
    for path in expand_paths(paths, recursive=args.recursive):
        text = read_text(path)
        try:
            docs = parse_documents(text, path)
        except InputError as exc:
            m = _AT_LINE.search(exc.message)
            found.problems.append(Problem(UNREADABLE, path, int(m[1]) if m else 0, "",
                                          exc.message))
            continue
        found.extend(check_documents(docs, path, strict_cidr=args.strict_cidr,
                                     lines=document_lines(text, docs)))
    return report(args, found)


def check_documents(docs: list[Any], source: str, *, strict_cidr: bool,
                    lines: Sequence[int] = ()) -> Validation:
    """Check every NetworkPolicy of `docs` (from `source`; `lines`: where each object of
    `expand_lists(docs)` starts). Every object of another kind is named on stderr as
    ignored (a document without a kind is checked, and fails, as a NetworkPolicy)."""
    found = Validation()
    objects = list(expand_lists(docs))
    for (index, doc), line in zip(objects, lines or [0] * len(objects), strict=True):
        kind = doc.get("kind") if isinstance(doc, dict) else None
        if isinstance(kind, str) and kind and kind not in ("NetworkPolicy", CNP_KIND):
            print(f"{source}: {object_name(doc)}: ignored (validate checks NetworkPolicies "
                  "and ClusterNetworkPolicies)", file=sys.stderr)
            continue
        found.count += 1
        name = object_name(doc) or f"document {index}"
        if kind == CNP_KIND:
            found.tiers += 1
            try:
                decode_cluster_network_policy(doc, Source(source, index))
            except DecodeError as exc:
                found.problems.append(Problem(UNDECODABLE, source, line, name, exc.message))
            except ValidationError as exc:  # its CRD's schema and CEL rules, every error
                found.problems += [Problem(INVALID, source, line, exc.obj, err.render())
                                   for err in exc.errors]
            continue
        try:
            policy = decode_network_policy(doc, Source(source, index))
        except DecodeError as exc:
            found.problems.append(Problem(UNDECODABLE, source, line, name, exc.message))
            continue
        subject = f"NetworkPolicy {policy.namespace}/{policy.name or policy.generate_name}"
        found.problems += [Problem(INVALID, source, line, subject, err.render())
                           for err in validate_policy(policy, strict_cidr=strict_cidr)]
    return found


def report(args: argparse.Namespace, found: Validation) -> int:
    """Print what was found in the format of -o; exit 2 when there is a problem."""
    fmt = getattr(args, "output", "txt")
    if fmt == "sarif":
        sys.stdout.write(json_text(validation_sarif(found)))
    elif fmt in ("json", "yaml"):
        data = validation_json(found)
        sys.stdout.write(json_text(data) if fmt == "json" else yaml_text(data))
    else:
        for problem in found.problems:
            print(problem.render(), file=sys.stderr)
        if not found.problems:
            cnps = f" and {found.tiers} ClusterNetworkPolicy" if found.tiers else ""
            print(f"{found.count - found.tiers} NetworkPolicy{cnps} object(s) valid")
    return 2 if found.problems else 0


def validation_json(found: Validation) -> dict[str, Any]:
    return {
        "policies": found.count,
        "valid": not found.problems,
        "problems": [{"rule": p.rule, "source": p.source, "line": p.line or None,
                      "subject": p.subject, "message": p.message} for p in found.problems],
    }


def validation_sarif(found: Validation) -> dict[str, Any]:
    return sarif_log("stockade", __version__, RULES, [
        SarifResult(p.rule, RULES[p.rule][0], ": ".join(x for x in (p.subject, p.message) if x),
                    p.source, p.line, p.subject) for p in found.problems])
