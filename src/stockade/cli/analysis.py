"""`stockade coverage|diff|lint`: analyses of a set of policies over a cluster.

Each command loads the files, calls one pure analysis of `stockade.engine`, and
prints text or JSON to stdout (rendered by `stockade.engine.report`). Exit status:
coverage is a report (0); diff follows diff(1) (0 same, 1 different); lint fails (1)
on warnings, not on notes.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from stockade.engine import coverage as cov
from stockade.engine.diff import diff_policies
from stockade.engine.lint import CHECKS, WARNING, lint
from stockade.engine.report import (
    coverage_json,
    coverage_text,
    diff_json,
    diff_text,
    lint_json,
    lint_text,
)
from stockade.errors import InputError
from stockade.load import load_objects, validate_objects
from stockade.model.cluster import Cluster
from stockade.model.parse import Objects
from stockade.model.ports import parse_port_text

EXIT_OK = 0
EXIT_FINDINGS = 1


def load(paths: Sequence[str], *, recursive: bool = False,
         prog: str = "stockade") -> Objects:
    """The objects of the files: every policy valid, every pod IP an IP address.

    An analysis of policies the API server would reject would describe nothing
    real, so invalid ones stop it (every error listed, exit 2). Decoding keeps pod
    IPs as written; one that is not an address would fail deep in the evaluator,
    so it is reported here as bad input, by file and Pod. Workloads (Deployments,
    Jobs, ...) are read from their pod templates, Pods whatever their status;
    every object of another kind is skipped with a note on stderr.
    """
    objects = load_objects(paths, workloads=True, recursive=recursive)
    note_ignored(objects, prog)
    return check(objects)


def note_ignored(objects: Objects, prog: str = "stockade") -> None:
    """One note on stderr per object the analyses skip (a Service, a ConfigMap...)."""
    for what in objects.ignored:
        print(f"{prog}: note: {what}: skipped (not a NetworkPolicy, Namespace, Pod "
              "or workload)", file=sys.stderr)


def check(objects: Objects) -> Objects:
    """`load`'s checks of objects from anywhere (files; a cluster's, `kubectl stockade`)."""
    validate_objects(objects)
    for ep in objects.endpoints:
        for ip in ep.ips:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise InputError(f"status.podIP: {ip!r} is not an IP address",
                                 source=ep.source.render(), obj=f"Pod {ep.key}") from None
    return objects


def parse_port(text: str) -> int | str:
    """A `--port` value: a number (1-65535) or a container port name."""
    try:
        return parse_port_text(text, protocol=False).port
    except ValueError as exc:
        raise InputError(f"--port {text}: {exc}") from None


def register(sub: Any) -> None:
    _register_coverage(sub)
    _register_diff(sub)
    _register_lint(sub)


def _files(p: argparse.ArgumentParser, flag: str = "-f", long: str = "--file",
           dest: str = "files", what: str = "manifests: Pods, Namespaces, NetworkPolicies"
           ) -> None:
    p.add_argument(flag, long, dest=dest, action="extend", nargs="+", required=True,
                   metavar="FILE", help=what)


def _output(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", default="text", choices=("text", "json"))


def _emit(args: argparse.Namespace, data: Any, text: Callable[[], list[str]]) -> None:
    if args.output == "json":
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        sys.stdout.write("".join(line + "\n" for line in text()))


# ---- coverage ----------------------------------------------------------------------------

COVERAGE_EPILOG = """\
Reports pods that no policy isolates (for ingress, for egress), policies that
select no pod, and rules or rule entries that can never match (a selector that
matches nothing, a named port no destination serves, rules ignored by policyTypes).
Pod-dependent checks need Pods in the files. Exit status 0: it is a report.
"""

def _register_coverage(sub: Any) -> None:
    p = sub.add_parser("coverage", help="unisolated pods, unused policies, dead rules",
                       epilog=COVERAGE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _files(p)
    coverage_options(p)
    p.set_defaults(run=run_coverage)


def coverage_options(p: argparse.ArgumentParser) -> None:
    _output(p)


def run_coverage(args: argparse.Namespace) -> int:
    return report_coverage(args, load(args.files))


def report_coverage(args: argparse.Namespace, objects: Objects, where: str = "files",
                    prog: str = "stockade") -> int:
    cluster = objects.cluster()
    report = cov.coverage(cluster)
    if not cluster.endpoints:
        print(f"{prog}: no Pod in the {where}: only pod-independent checks were made",
              file=sys.stderr)
    _emit(args, coverage_json(report), lambda: coverage_text(report))
    return EXIT_OK


# ---- diff --------------------------------------------------------------------------------

DIFF_EPILOG = """\
Compares the connections that the OLD and the NEW policies allow between pods (and
workloads), and between a pod and the external ranges the ipBlocks of either side
cut the IPv4 and IPv6 spaces into (a range written as a CIDR when it is one), over
every port of TCP, UDP and SCTP (exactly: ports are grouped into the ranges that
policies and named ports distinguish). The pods and namespaces are the union of
both sides (the NEW side wins when a pod or namespace is in both), so cluster
files can be given on either side; only the policies differ.
Lines: '+' opened, '-' closed, with the rules responsible.
Exit status: 0 no difference, 1 differences, 2 bad input (as diff(1)).
"""


def _register_diff(sub: Any) -> None:
    p = sub.add_parser("diff", help="connections a policy change opens and closes",
                       epilog=DIFF_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _files(p, what="the current manifests (OLD)")
    _files(p, "-a", "--against", "against", "the proposed manifests (NEW)")
    diff_options(p)
    p.set_defaults(run=run_diff)


def diff_options(p: argparse.ArgumentParser) -> None:
    _output(p)


def workloads(old: Objects, new: Objects) -> Cluster:
    """Pods and namespaces of both sides, the new side's version winning."""
    pods = {ep.key: ep for ep in old.endpoints + old.workloads} \
        | {ep.key: ep for ep in new.endpoints + new.workloads}
    nss = {ns.name: ns for ns in old.namespaces} | {ns.name: ns for ns in new.namespaces}
    both = Objects(policies=old.policies + new.policies, namespaces=list(nss.values()),
                   endpoints=list(pods.values()))
    return both.cluster().with_policies(())


def run_diff(args: argparse.Namespace) -> int:
    return report_diff(args, load(args.files), load(args.against), "files",
                       ", ".join([*args.files, *args.against]))


def report_diff(args: argparse.Namespace, old: Objects, new: Objects, where: str,
                source: str) -> int:
    """The diff of two checked sets of objects; `where` they come from and `source`
    (their names) for messages."""
    cluster = workloads(old, new)
    if not cluster.endpoints:
        raise InputError(f"no Pod in the {where}: the diff compares connections between pods",
                         source=source)
    # A name given twice on one side is one policy, the last one, as kubectl applies it.
    result = diff_policies(cluster, old.cluster().policies, new.cluster().policies,
                           external=True)
    _emit(args, diff_json(result), lambda: diff_text(result))
    return EXIT_FINDINGS if result.changes else EXIT_OK


# ---- lint --------------------------------------------------------------------------------

LINT_EPILOG = "Checks:\n" + "\n".join(
    f"  {code} {sev:<7} {title}" for code, (sev, title) in CHECKS.items()) + """
Exit status: 1 when there is a warning, 0 otherwise (notes alone do not fail).
"""


def _register_lint(sub: Any) -> None:
    p = sub.add_parser("lint", help="suspicious but valid policy constructs",
                       epilog=LINT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _files(p)
    lint_options(p)
    p.set_defaults(run=run_lint)


def lint_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ignore", action="append", default=[], metavar="CODE[,CODE…]",
                   help="leave out findings with these codes (repeatable)")
    _output(p)


def ignored_codes(values: Sequence[str]) -> set[str]:
    codes = {c.strip().upper() for v in values for c in v.split(",") if c.strip()}
    unknown = sorted(codes - set(CHECKS))
    if unknown:
        raise InputError(f"--ignore {','.join(unknown)}: no such check "
                         f"(known: {', '.join(CHECKS)})")
    return codes


def run_lint(args: argparse.Namespace) -> int:
    ignored_codes(args.ignore)  # a bad --ignore is reported before the files are read
    return report_lint(args, load(args.files))


def report_lint(args: argparse.Namespace, objects: Objects) -> int:
    skip = ignored_codes(args.ignore)
    # The cluster keeps the last of two policies with one name; lint sees both.
    findings = [f for f in lint(objects.cluster(), objects.policies) if f.code not in skip]
    _emit(args, lint_json(findings), lambda: lint_text(findings))
    return EXIT_FINDINGS if any(f.severity == WARNING for f in findings) else EXIT_OK
