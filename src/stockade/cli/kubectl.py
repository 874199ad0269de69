"""`kubectl stockade …` (the `kubectl-stockade` executable, a kubectl plugin).

The offline analyses on a live cluster: `matrix`, `explain`, `coverage`, `lint`,
`diff` and `validate` read Namespaces, Pods and NetworkPolicies through the user's
kubeconfig (kube/live.py turns the API's lists into the documents a file would
give), then run the very code of `stockade matrix -f …` and the others: the same
decoding and checks, the same analyses, the same output. Messages name the source
`context NAME` where the offline commands name a file.

`status` checks the CNI side: the agent DaemonSet's pods on every node, what each
agent reports on its /status endpoint (kube/live.py says what it must serve), and
the cluster's policies against what each agent enforces.

Scope, as kubectl's: `-n NS` (default: the context's namespace) or `-A`. `explain`
and `diff` read every namespace (a connection crosses namespaces); `-n` is then the
namespace of a pod or a file's object given without one.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from stockade import __version__
from stockade.cli import analysis, explain, matrix, validate
from stockade.cli.inputs import add_filters, add_output, positive_seconds
from stockade.cli.main import execute
from stockade.errors import InputError, InvalidObjects
from stockade.kube.client import KubeClient
from stockade.kube.live import (
    AGENT_NAMESPACE,
    AGENT_PORT,
    ClusterStatus,
    kube_context,
    read_cluster,
    read_status,
)
from stockade.load import expand_paths, read_text
from stockade.model.parse import Objects, decode_objects, expand_lists, parse_documents

PROG = "kubectl stockade"

EPILOG = """\
Every command reads the cluster through the kubeconfig (--kubeconfig, else
$KUBECONFIG, else ~/.kube/config, else the in-cluster service account).
matrix, coverage, lint and validate read the namespace of the context, or -n NS,
or every namespace with -A. explain and diff read every namespace (a connection
crosses them): -n is the namespace of pods and files given without one. status
compares the policies of every namespace, or of -n NS.
The output and exit status are those of the offline command (stockade COMMAND
-f FILE…) on the same objects. Pods NetworkPolicy does not govern (host network,
finished, no address yet) are left out, and said so on stderr.
"""


def _cluster_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    """--kubeconfig, --context, -n, -A: before the command or after it. Given after,
    they must not reset what was given before (hence SUPPRESS as the default)."""
    d: Any = None if top else argparse.SUPPRESS
    p.add_argument("--kubeconfig", metavar="PATH", default=d,
                   help="the kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    p.add_argument("--context", metavar="NAME", default=d,
                   help="the kubeconfig context (default: the current one)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", metavar="NS", default=d,
                       help="the namespace (default: the context's)")
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       default=False if top else argparse.SUPPRESS,
                       help="every namespace")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="stockade's analyses and status on a live cluster.")
    parser.add_argument("--version", action="version", version=f"stockade {__version__}")
    _cluster_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, epilog: str, options: Callable[[Any], None],
                run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _cluster_options(p, top=False)
        options(p)
        p.set_defaults(run=run)
        return p

    def shown(focus: bool) -> Callable[[Any], None]:
        # -n is the scope read here; -l and --focus-workload filter what is shown.
        return lambda p: add_filters(p, namespace=False, focus=focus)

    m = command("matrix", "reachability truth table between the cluster's pods",
                matrix.EPILOG, matrix.add_options, run_matrix)
    shown(True)(m)
    command("explain", "explain the verdict on one connection", explain.EPILOG,
            explain.add_options, run_explain)
    shown(False)(command("coverage", "unisolated pods, unused policies, dead rules",
                         analysis.COVERAGE_EPILOG, analysis.coverage_options, run_coverage))
    shown(False)(command("lint", "suspicious but valid policy constructs",
                         analysis.LINT_EPILOG, analysis.lint_options, run_lint))
    d = command("diff", "connections applying files would open and close", DIFF_EPILOG,
                analysis.diff_options, run_diff)
    shown(True)(d)
    d.add_argument("-f", "--file", dest="files", action="extend", nargs="+", required=True,
                   metavar="FILE", help="the manifests to apply (NEW)")
    d.add_argument("--replace", action="store_true",
                   help="the files' policies replace those of the namespace (-A: of the "
                        "cluster); by default they are applied over the cluster's, as "
                        "kubectl apply does")
    v = command("validate", "the cluster's NetworkPolicies by stockade's rules",
                VALIDATE_EPILOG, validate.options, run_validate)
    v.add_argument("--strict-cidr", action="store_true",
                   help="turn on the StrictIPCIDRValidation rules (off by default, as upstream)")
    command("status", "the agents on every node, their CNI side and their policies",
            STATUS_EPILOG, status_options, run_status)
    return parser


DIFF_EPILOG = """\
Compares the connections the cluster's policies allow (OLD) with those allowed once
the files are applied (NEW): the files' policies replace those of the same name and
add the others (--replace: they replace every policy of the namespace, or with -A of
the cluster). Pods and namespaces are the cluster's, every namespace, with the files'
winning. A file's object without a namespace takes the command's namespace (-n, or
the context's); with -n, one of another namespace is an error, as with kubectl apply.
Lines: '+' opened, '-' closed, with the rules responsible.
Exit status: 0 no difference, 1 differences, 2 bad input (as diff(1)).
"""

VALIDATE_EPILOG = """\
The API server has accepted these policies; stockade checks them again with its own
rules (the API server's, and --strict-cidr's), which is how the agent admits them.
Exit status: 0 all valid, 2 errors (one line each).
"""


STATUS_EPILOG = """\
For every node: the agent pod of the DaemonSet (label
app.kubernetes.io/name=stockade-agent in --agent-namespace) and whether it is ready;
then what the agent reports on GET /status of its metrics port: ready, in sync, the
CNI configuration the container runtime reads first (it must call stockade-cni), the
kernel features, and the NetworkPolicies it enforces, compared with the cluster's
(every namespace, or -n's), each difference named. The agent is reached through the
API server's pod proxy (needs get on pods/proxy in --agent-namespace), or with
--direct at its pod's address (the node's).
Exit status: 0 everything consistent, 1 a problem (each listed), 2 bad input.
"""


# ---- reading the cluster -------------------------------------------------------------------

class Scope:
    """Where a command reads: a context, and one namespace or all of them."""

    def __init__(self, args: argparse.Namespace, *, every_namespace: bool = False) -> None:
        self.kubeconfig: str | None = args.kubeconfig
        self.context_name: str | None = args.context
        ctx = kube_context(args.kubeconfig, args.context)
        self.source = f"context {ctx.name}"
        # The namespace of names given without one (explain), and of files' objects (diff).
        self.default_namespace: str = args.namespace or ctx.namespace
        self.explicit_namespace: str | None = args.namespace
        self.namespace: str | None = \
            None if args.all_namespaces or every_namespace else self.default_namespace

    def read(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The documents of the scope (Namespaces, Pods, NetworkPolicies), and its policies."""
        with KubeClient.connect(self.kubeconfig, self.context_name) as client:
            found = read_cluster(client, self.namespace)
        for reason, pods in sorted(found.left_out.items()):
            shown = ", ".join(pods[:5]) + (f", … ({len(pods) - 5} more)" if len(pods) > 5 else "")
            print(f"{PROG}: left out {len(pods)} pod(s) {reason}: {shown}", file=sys.stderr)
        return found.documents(), found.policies

    def objects(self) -> Objects:
        """The scope's objects, decoded and checked as the offline commands do."""
        return decoded(self.read()[0], self.source)


def decoded(docs: list[dict[str, Any]], source: str) -> Objects:
    """Documents through the one decode path, then the analyses' checks."""
    objects, errors = decode_objects(docs, source)
    if errors:
        raise InvalidObjects(errors)
    return analysis.check(objects)


def file_objects(paths: Sequence[str], scope: Scope) -> Objects:
    """The files' objects; one without a namespace takes the scope's, as kubectl apply
    gives it; with -n, one of another namespace is an error, as in kubectl apply."""
    objects = Objects()
    errors: list[InputError] = []
    for path in expand_paths(paths):
        docs = parse_documents(read_text(path), path)
        for index, doc in expand_lists(docs):
            _place(doc, scope, path, index)
        found, bad = decode_objects(docs, path)
        objects.extend(found)
        errors += bad
    if errors:
        raise InvalidObjects(errors)
    return analysis.check(objects)


def _place(doc: Any, scope: Scope, path: str, index: int) -> None:
    if not isinstance(doc, dict) or doc.get("kind") not in ("Pod", "NetworkPolicy"):
        return
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return
    ns = meta.get("namespace")
    if not ns:
        meta["namespace"] = scope.default_namespace
    elif scope.explicit_namespace is not None and ns != scope.explicit_namespace:
        raise InputError(f"the namespace of the object ({ns}) is not the namespace of the "
                         f"command ({scope.explicit_namespace}): give -n {ns}, or none",
                         source=path, obj=f"{doc.get('kind')} {ns}/{meta.get('name')}")


# ---- the analyses --------------------------------------------------------------------------

def run_matrix(args: argparse.Namespace) -> int:
    scope = Scope(args)
    return matrix.report(args, scope.objects(), "cluster", scope.source)


def run_explain(args: argparse.Namespace) -> int:
    scope = Scope(args, every_namespace=True)
    return explain.report(args, scope.objects(), scope.default_namespace, "cluster")


def run_coverage(args: argparse.Namespace) -> int:
    analysis.fail_on_codes(args.fail_on)
    return analysis.report_coverage(args, Scope(args).objects(), "cluster", PROG)


def run_lint(args: argparse.Namespace) -> int:
    analysis.ignored_codes(args.ignore)
    return analysis.report_lint(args, Scope(args).objects())


def run_diff(args: argparse.Namespace) -> int:
    # Every namespace is read: a policy of one namespace opens or closes connections
    # with pods of all the others.
    scope = Scope(args, every_namespace=True)
    files = file_objects(args.files, scope)  # bad files fail before the cluster is read
    old = scope.objects()
    replaced = None if args.all_namespaces else scope.default_namespace
    kept = [p for p in old.policies if replaced is not None and p.namespace != replaced] \
        if args.replace else old.policies
    new = Objects(policies=[*kept, *files.policies], namespaces=files.namespaces,
                  endpoints=files.endpoints)
    return analysis.report_diff(args, old, new, "cluster",
                                ", ".join([scope.source, *args.files]))


def run_validate(args: argparse.Namespace) -> int:
    scope = Scope(args)
    _, policies = scope.read()
    return validate.report(args, validate.check_documents(policies, scope.source,
                                                          strict_cidr=args.strict_cidr))


# ---- status --------------------------------------------------------------------------------

def status_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agent-namespace", default=AGENT_NAMESPACE, metavar="NS",
                   help=f"where the agent DaemonSet runs (default {AGENT_NAMESPACE})")
    p.add_argument("--agent-port", type=int, metavar="PORT",
                   help=f"the agents' status port (default: the agent pod's port named "
                        f"metrics, else {AGENT_PORT})")
    p.add_argument("--direct", action="store_true",
                   help="reach each agent at its pod's address, not through the API server")
    p.add_argument("--timeout", type=positive_seconds, default=5.0, metavar="SECONDS",
                   help="for each agent (default 5)")
    add_output(p, ("txt", "json"))


def run_status(args: argparse.Namespace) -> int:
    # Every namespace's policies unless -n is given (not the context's namespace).
    explicit = getattr(args, "namespace", None) is not None and not args.all_namespaces
    with KubeClient.connect(args.kubeconfig, args.context) as client:
        status = read_status(client, namespace=args.namespace if explicit else None,
                             agent_namespace=args.agent_namespace, port=args.agent_port,
                             direct=args.direct, timeout=args.timeout)
    if args.output == "json":
        sys.stdout.write(json.dumps(status_json(status), indent=2) + "\n")
    else:
        sys.stdout.write("".join(line + "\n" for line in status_text(status)))
    return 1 if status.problems else 0


def status_json(status: ClusterStatus) -> dict[str, Any]:
    return {
        "daemonset": _daemonset_summary(status),
        "policies": status.policies,
        "problems": status.problems,
        "nodes": [{"node": n.node, "pod": n.pod, "podReady": n.pod_ready,
                   "reached": n.reached, "error": n.error, "report": n.report,
                   "policiesAgreed": n.agreed,
                   "problems": n.problems} for n in status.nodes],
    }


def _daemonset_summary(status: ClusterStatus) -> dict[str, Any] | None:
    if status.daemonset is None:
        return None
    st = status.daemonset.get("status") or {}
    return {key: int(st.get(key) or 0) for key in
            ("desiredNumberScheduled", "numberReady", "updatedNumberScheduled",
             "numberAvailable")}


def status_text(status: ClusterStatus) -> list[str]:
    ds = _daemonset_summary(status)
    where = f"{status.agent_namespace}/stockade-agent"
    lines = [f"DaemonSet {where}: not found" if ds is None else
             f"DaemonSet {where}: {ds['desiredNumberScheduled']} desired, "
             f"{ds['numberReady']} ready, {ds['updatedNumberScheduled']} up to date, "
             f"{ds['numberAvailable']} available"]
    rows = [["NODE", "AGENT POD", "POD READY", "AGENT", "IN SYNC", "CNI CONFIG", "POLICIES"]]
    for n in status.nodes:
        r = n.report or {}
        cni = r.get("cniConfig") if isinstance(r.get("cniConfig"), list) else []
        first = cni[0] if cni and isinstance(cni[0], dict) else {}
        rows.append([
            n.node, n.pod or "-", ("yes" if n.pod_ready else "no") if n.pod else "-",
            ("reached" if n.reached else "unreachable") if n.pod else "-",
            ("yes" if r.get("inSync") is True else "no") if n.reached else "-",
            str(first.get("file") or "none") if n.reached else "-",
            "-" if n.agreed is None else f"{n.agreed} of {status.policies}",
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    problems = [f"  {n.node}: {p}" for n in status.nodes for p in n.problems]
    if ds is None:
        problems.insert(0, f"  DaemonSet {where} not found")
    if problems:
        lines += ["Problems:", *problems]
    lines.append(f"{len(status.nodes)} node(s), {status.policies} NetworkPolicy object(s) "
                 f"compared: {status.problems} problem(s)")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return execute(args, PROG)


if __name__ == "__main__":
    sys.exit(main())
