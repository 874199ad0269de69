"""`stockade operator …`: the MicroService dependency operator.

`render` prints, offline, the NetworkPolicies the operator would create from
MicroService manifests (`stockade.operator.render.render_all`, the function the
live operator calls). Other verbs (the live `run`) register themselves by adding
their registrar to VERBS.

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
    p.add_argument("-f", "--file", dest="files", action="extend", nargs="+", required=True,
                   metavar="FILE", help="manifests with MicroServices ('-': standard input)")
    p.add_argument("-o", "--output", default="yaml", choices=("yaml", "json"),
                   help="yaml: one document per policy; json: a kind: List")
    p.add_argument("-q", "--quiet", action="store_true", help="no summaries on stderr")
    p.set_defaults(run=run_render)


VERBS: tuple[Callable[[Any], None], ...] = (register_render,)


def load_microservices(paths: Sequence[str]) -> list[MicroService]:
    """Every MicroService of the files, all valid and none twice, or InvalidObjects."""
    services: list[MicroService] = []
    errors: list[InputError] = []
    for path in expand_paths(paths):
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
    services = load_microservices(args.files)
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
