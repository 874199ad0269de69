"""`stockade operator …`: the MicroService dependency operator.

`render` prints, offline, the NetworkPolicies the operator would create from
MicroService manifests (`stockade.operator.render.render_all`, the function the
live operator calls). `run` is the live operator (`stockade.operator.controller`):
it watches MicroServices and NetworkPolicies through the kubeconfig (or the
in-cluster service account) until SIGTERM or SIGINT, then exits 0.

Exit status: 0 rendered; 1 findings (a dependency on a MicroService that does
not exist, a port its target does not declare), printed to stderr after the
policies, which are printed anyway (the edges concerned are left out); 2 an
invalid MicroService, every error on a line naming the file, object and field.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from stockade.cli.inputs import add_files, metrics_address, positive_seconds
from stockade.errors import InputError, InvalidObjects
from stockade.load import expand_paths, read_text
from stockade.model.parse import parse_documents
from stockade.operator.render import render_all
from stockade.operator.service import MicroService, admit_microservices, decode_microservices

EXIT_OK = 0
EXIT_FINDINGS = 1

EPILOG = """\
Files may hold other kinds (Pods, Namespaces, ...): they are skipped.
Each generated policy is named <service>-ingress or <service>-egress, in the
service's namespace, labelled app.kubernetes.io/managed-by=stockade-operator and
owned by its MicroService (metadata.uid comes from the input).
What each policy allows is written to stderr, one line per rule (-q: not).
"""


def register(sub: Any) -> None:
    p = sub.add_parser("operator", help="the MicroService dependency operator")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb in VERBS:
        verb(verbs)


def register_render(verbs: Any) -> None:
    p = verbs.add_parser("render", help="print the NetworkPolicies MicroServices ask for",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_files(p, help="manifests with MicroServices, directories of them, or - for "
              "standard input; repeatable")
    p.add_argument("-o", "--output", default="yaml", choices=("yaml", "json"),
                   help="yaml: one document per policy; json: a kind: List")
    p.add_argument("-q", "--quiet", action="store_true", help="no summaries on stderr")
    p.set_defaults(run=run_render)


RUN_EPILOG = """\
Writes, with server-side apply (field manager stockade-operator), the
NetworkPolicies `operator render` prints, only where they differ from the
cluster's; deletes the managed ones no longer asked for; never touches a policy
without the label app.kubernetes.io/managed-by=stockade-operator. Each
MicroService gets status.conditions Valid, DependenciesResolved and Ready, and a
Warning event per new finding. Logs (logfmt) go to stderr.
"""


def register_run(verbs: Any) -> None:
    p = verbs.add_parser("run", help="run the operator against a cluster",
                         epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kubeconfig", metavar="FILE",
                   help="kubeconfig (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")
    p.add_argument("-n", "--namespace", default=None,
                   help="watch one namespace (default: all); dependencies on services "
                        "of other namespaces are then not found")
    p.add_argument("--metrics-address", type=metrics_address, metavar="HOST:PORT",
                   help="serve /metrics and /healthz there (default: not served)")
    p.add_argument("--resync", type=positive_seconds, default=600.0, metavar="SECONDS",
                   help="reconcile at least this often (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    p.set_defaults(run=run_operator)


VERBS: tuple[Callable[[Any], None], ...] = (register_render, register_run)



def load_microservices(paths: Sequence[str], *, recursive: bool = False) -> list[MicroService]:
    """Every MicroService of the files, all valid and none twice, or InvalidObjects."""
    services: list[MicroService] = []
    errors: list[InputError] = []
    for path in expand_paths(paths, recursive=recursive):
        found, bad, _ = decode_microservices(parse_documents(read_text(path), path), path)
        services += found
        errors += bad
    errors += admit_microservices(services)
    if errors:
        raise InvalidObjects(errors)
    if not services:
        raise InputError("no MicroService (stockade.io/v1alpha1) in the files",
                         source=", ".join(paths))
    return services


def run_render(args: argparse.Namespace) -> int:
    services = load_microservices(args.files, recursive=args.recursive)
    rendering = render_all(services)
    manifests = rendering.manifests()
    if args.output == "json":
        doc = {"apiVersion": "v1", "kind": "List", "items": manifests}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump_all(manifests, sort_keys=False, explicit_start=True))
    if not args.quiet:
        for lines in rendering.summaries.values():
            for line in lines:
                print(line, file=sys.stderr)
    where = {s.key: s.source.render() for s in services}
    for finding in rendering.findings:
        print(f"{where[finding.service]}: {finding.render()}", file=sys.stderr)
    return EXIT_FINDINGS if rendering.findings else EXIT_OK


def run_operator(args: argparse.Namespace) -> int:
    # Imported here: the offline verbs load neither the client nor the metrics.
    import signal
    import threading

    from stockade.agent.logfmt import setup_logging
    from stockade.agent.prometheus import MetricsServer, Registry
    from stockade.kube.client import KubeClient
    from stockade.operator.controller import Operator, OperatorConfig, OperatorMetrics

    setup_logging(args.log_level)
    client = KubeClient.connect(args.kubeconfig, args.context)
    registry = Registry()
    metrics = OperatorMetrics.create(registry) if args.metrics_address else None
    operator = Operator(client, OperatorConfig(namespace=args.namespace, resync=args.resync),
                        metrics=metrics)
    server = (MetricsServer(registry, args.metrics_address, health=operator.healthy)
              if args.metrics_address else None)
    stopping = threading.Event()

    def stop(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        if server is not None:
            server.start()
        operator.start()
        while not stopping.wait(1.0):
            pass
    finally:
        operator.stop()
        if server is not None:
            server.stop()
        client.close()
    return EXIT_OK
