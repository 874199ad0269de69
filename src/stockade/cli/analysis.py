"""`stockade coverage|diff|lint`: analyses of a set of policies over a cluster.

Each command loads the files, calls one pure analysis of `stockade.engine`, and
prints text or JSON to stdout (rendered by `stockade.engine.report`). Exit status:
coverage is a report (0); diff follows diff(1) (0 same, 1 different); lint fails (1)
on warnings, not on notes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from stockade import __version__
from stockade.cli.inputs import View, add_files, add_filters, add_output, check, load, read
from stockade.cli.pictures import PICTURE_FORMATS, add_group_by, emit_graph
from stockade.engine import coverage as cov
from stockade.engine.diff import diff_policies
from stockade.engine.graph import diff_graph
from stockade.engine.lint import CHECKS, WARNING, Finding, lint
from stockade.engine.report import (
    COVERAGE_COLUMNS,
    DIFF_COLUMNS,
    LINT_COLUMNS,
    LINT_RULES,
    coverage_json,
    coverage_rows,
    coverage_text,
    diff_json,
    diff_rows,
    diff_text,
    json_text,
    lint_json,
    lint_rows,
    lint_sarif_results,
    lint_text,
    rows_text,
    sarif_log,
    yaml_text,
)
from stockade.errors import InputError
from stockade.load import Locations
from stockade.model.cluster import Cluster
from stockade.model.parse import Objects
from stockade.model.ports import parse_port_text

EXIT_OK = 0
EXIT_FINDINGS = 1

# `load` and `check` live with the other input conventions; kept importable here.
__all__ = ["check", "load"]

REPORT_FORMATS = ("txt", "json", "yaml", "csv", "md")


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


def emit(fmt: str, data: Any, text: Callable[[], list[str]],
         rows: tuple[Sequence[str], Callable[[], Sequence[Sequence[object]]]] | None = None
         ) -> None:
    """Write a report in `fmt`: `data` (json, yaml), `text` lines (txt), `rows` (csv, md)."""
    if fmt == "json":
        sys.stdout.write(json_text(data))
    elif fmt == "yaml":
        sys.stdout.write(yaml_text(data))
    elif fmt in ("csv", "md") and rows is not None:
        sys.stdout.write(rows_text(rows[0], rows[1](), fmt))
    else:
        sys.stdout.write("".join(line + "\n" for line in text()))


def _subject_shown(view: View, subject: str, cluster: Cluster) -> bool:
    """A finding about `subject` (a pod or workload key, or `NetworkPolicy ns/name`, or
    several of those comma-separated) is shown when one of them is selected: a pod by
    its namespace and labels, a policy by its namespace and its own labels."""
    if view.namespace is None and view.selector is None:
        return True
    policies = {p.key: p for p in cluster.policies}
    for part in subject.split(", "):
        key = part.removeprefix("NetworkPolicy ")
        if part.startswith("NetworkPolicy "):
            policy = policies.get(key)
            ns = key.split("/", 1)[0]
            labels = policy.labels if policy is not None else None
            if (view.namespace is None or ns == view.namespace) and (
                    view.selector is None or (labels is not None
                                              and view.selector.matches(labels))):
                return True
        else:
            ep = cluster.endpoint(key)
            if ep is not None and view.selects(ep):
                return True
    return False


# ---- coverage ----------------------------------------------------------------------------

COVERAGE_EPILOG = f"""\
Reports pods that no policy isolates (for ingress, for egress), policies that
select no pod, and rules or rule entries that can never match (a selector that
matches nothing, a named port no destination serves, rules ignored by policyTypes).
ClusterNetworkPolicies: the pods each one selects, one selecting no pod, and rules
that match no connection of their pods or that are shadowed (every connection they
match is decided first by earlier rules of their tier); a pod is not isolated only
when no ClusterNetworkPolicy selecting it can deny in that direction either.
Pod-dependent checks need Pods in the files. -n and -l show the findings about the
pods, workloads and policies of a namespace or with some labels (a policy by its own
labels); the analysis always sees every object.
Finding codes (for --fail-on):
  {", ".join(cov.KINDS[:4])},
  {", ".join(cov.KINDS[4:])}.
Exit status: 0 (it is a report), or 1 when --fail-on names a code that is found
(among the findings shown), 2 on bad input.
"""

def _register_coverage(sub: Any) -> None:
    p = sub.add_parser("coverage", help="unisolated pods, unused policies, dead rules",
                       epilog=COVERAGE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_files(p)
    add_filters(p)
    coverage_options(p)
    p.set_defaults(run=run_coverage)


def coverage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fail-on", dest="fail_on", action="extend", nargs="+", default=[],
                   metavar="CODE", help="exit 1 when a finding with one of these codes is "
                   f"shown (codes: {', '.join(cov.KINDS)}; comma-separated or repeated)")
    add_output(p, REPORT_FORMATS)


def fail_on_codes(values: Sequence[str]) -> set[str]:
    """The codes of --fail-on; an unknown one is bad input naming the valid ones."""
    codes = {c.strip().lower() for v in values for c in v.split(",") if c.strip()}
    unknown = sorted(codes - set(cov.KINDS))
    if unknown:
        raise InputError(f"--fail-on {','.join(unknown)}: no such coverage finding "
                         f"(valid codes: {', '.join(cov.KINDS)})")
    return codes


def run_coverage(args: argparse.Namespace) -> int:
    fail_on_codes(args.fail_on)  # a bad --fail-on is reported before the files are read
    return report_coverage(args, read(args))


def report_coverage(args: argparse.Namespace, objects: Objects, where: str = "files",
                    prog: str = "stockade") -> int:
    fail_on = fail_on_codes(getattr(args, "fail_on", []))
    cluster = objects.cluster()
    report = cov.coverage(cluster)
    if not cluster.endpoints:
        print(f"{prog}: no Pod in the {where}: only pod-independent checks were made",
              file=sys.stderr)
    view = View.of(args)
    if not view.everything:
        report = cov.Coverage(tuple(g for g in report.gaps
                                    if _subject_shown(view, g.subject, cluster)),
                              report.pods, report.policies)
    emit(args.output, coverage_json(report), lambda: coverage_text(report),
         (COVERAGE_COLUMNS, lambda: coverage_rows(report)))
    return EXIT_FINDINGS if any(g.kind in fail_on for g in report.gaps) else EXIT_OK


# ---- diff --------------------------------------------------------------------------------

DIFF_EPILOG = """\
Compares the connections that the OLD and the NEW policies allow between pods (and
workloads), and between a pod and the external ranges the ipBlocks of either side
cut the IPv4 and IPv6 spaces into (a range written as a CIDR when it is one), over
every port of TCP, UDP and SCTP (exactly: ports are grouped into the ranges that
policies and named ports distinguish). The pods and namespaces are the union of
both sides (the NEW side wins when a pod or namespace is in both), so cluster
files can be given on either side; only the policies differ. ClusterNetworkPolicies
are policies too: a change of tier, priority, action or rule order shows as the
connections it changes, with the tier rule that now decides (or no longer does).
Lines: '+' opened, '-' closed, with the rules responsible. -n, -l and
--focus-workload show the changes from or to the pods and workloads selected.
-o dot|svg|png: a graph, opened connections as green edges, closed ones red
(--group-by namespace: a node per namespace); svg and png need graphviz's dot.
Exit status: 0 no difference, 1 differences (among those shown), 2 bad input
(as diff(1)).
"""


def _register_diff(sub: Any) -> None:
    p = sub.add_parser("diff", help="connections a policy change opens and closes",
                       epilog=DIFF_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_files(p, help="the current manifests (OLD): files, directories or -")
    add_files(p, flags=("-a", "--against"), dest="against", recursive=False,
              help="the proposed manifests (NEW): files, directories or -")
    add_filters(p, focus=True)
    diff_options(p)
    p.set_defaults(run=run_diff)


def diff_options(p: argparse.ArgumentParser) -> None:
    add_output(p, (*REPORT_FORMATS, *PICTURE_FORMATS))
    add_group_by(p)


def workloads(old: Objects, new: Objects) -> Cluster:
    """Pods and namespaces of both sides, the new side's version winning."""
    pods = {ep.key: ep for ep in old.endpoints + old.workloads} \
        | {ep.key: ep for ep in new.endpoints + new.workloads}
    nss = {ns.name: ns for ns in old.namespaces} | {ns.name: ns for ns in new.namespaces}
    both = Objects(policies=old.policies + new.policies, namespaces=list(nss.values()),
                   endpoints=list(pods.values()))
    return both.cluster().with_policies(())


def run_diff(args: argparse.Namespace) -> int:
    return report_diff(args, read(args), read(args, "against"), "files",
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
    before, after = old.cluster(), new.cluster()
    result = diff_policies(cluster, before.policies, after.policies, external=True,
                           old_tiers=before.cluster_policies, new_tiers=after.cluster_policies)
    view = View.of(args)
    if not view.everything:
        controllers = {**old.controllers, **new.controllers}
        view.check_focus(cluster.endpoints, controllers)
        endpoints = {ep.key: ep for ep in cluster.endpoints}
        result = type(result)(tuple(
            c for c in result.changes
            if view.shown_pair(endpoints.get(c.src), endpoints.get(c.dst), controllers)))
    if args.output in PICTURE_FORMATS:
        owners = {**old.controllers, **new.controllers}
        selected = None if view.everything else [
            ep.key for ep in cluster.endpoints
            if view.selects(ep) and view.focused(ep, owners.get(ep.key))]
        emit_graph(diff_graph(result, [ep.key for ep in cluster.endpoints], args.group_by,
                              selected), args.output)
    else:
        emit(args.output, diff_json(result), lambda: diff_text(result),
             (DIFF_COLUMNS, lambda: diff_rows(result)))
    return EXIT_FINDINGS if result.changes else EXIT_OK


# ---- lint --------------------------------------------------------------------------------

LINT_EPILOG = "Checks:\n" + "\n".join(
    f"  {code} {sev:<7} {title}" for code, (sev, title) in CHECKS.items()) + """
Every finding names its file and the line where its policy starts (-o sarif: a SARIF
2.1.0 log for code-scanning annotations). -n and -l show the findings about the
policies of a namespace or with some labels.
Exit status: 1 when there is a warning (among those shown), 0 otherwise (notes alone
do not fail), 2 on bad input.
"""


def _register_lint(sub: Any) -> None:
    p = sub.add_parser("lint", help="suspicious but valid policy constructs",
                       epilog=LINT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_files(p)
    add_filters(p)
    lint_options(p)
    p.set_defaults(run=run_lint)


def lint_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ignore", action="append", default=[], metavar="CODE[,CODE…]",
                   help="leave out findings with these codes (repeatable)")
    add_output(p, (*REPORT_FORMATS, "sarif"))


def ignored_codes(values: Sequence[str]) -> set[str]:
    codes = {c.strip().upper() for v in values for c in v.split(",") if c.strip()}
    unknown = sorted(codes - set(CHECKS))
    if unknown:
        raise InputError(f"--ignore {','.join(unknown)}: no such check "
                         f"(known: {', '.join(CHECKS)})")
    return codes


def run_lint(args: argparse.Namespace) -> int:
    ignored_codes(args.ignore)  # a bad --ignore is reported before the files are read
    locations = Locations()
    return report_lint(args, read(args, locations=locations), locations)


def finding_line(finding: Finding, locations: Locations | None) -> int:
    """The line where the (first) policy of a finding starts in its file; 0: unknown."""
    if locations is None:
        return 0
    first = finding.subject.split(", ", 1)[0]
    if first.startswith("ClusterNetworkPolicy "):  # cluster-scoped: load keys it default/
        return locations.line(finding.source, "ClusterNetworkPolicy",
                              "default/" + first.removeprefix("ClusterNetworkPolicy "))
    return locations.line(finding.source, "NetworkPolicy", first.removeprefix("NetworkPolicy "))


def report_lint(args: argparse.Namespace, objects: Objects,
                locations: Locations | None = None) -> int:
    skip = ignored_codes(args.ignore)
    cluster = objects.cluster()
    view = View.of(args)
    # The cluster keeps the last of two policies with one name; lint sees both.
    findings = [f for f in lint(cluster, objects.policies) if f.code not in skip
                and _subject_shown(view, f.subject, cluster)]
    lines = [finding_line(f, locations) for f in findings]
    if args.output == "sarif":
        log = sarif_log("stockade", __version__, LINT_RULES,
                        lint_sarif_results(findings, lines))
        sys.stdout.write(json_text(log))
    else:
        emit(args.output, lint_json(findings, lines), lambda: lint_text(findings, lines),
             (LINT_COLUMNS, lambda: lint_rows(findings, lines)))
    return EXIT_FINDINGS if any(f.severity == WARNING for f in findings) else EXIT_OK

