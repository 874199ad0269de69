"""The flags every file-reading command shares, as kubectl spells them.

* `-f/--file FILE|DIR|-` (repeatable, several values each), `-R/--recursive`;
* `-n/--namespace NS`, `-A/--all-namespaces`, `-l/--selector SELECTOR` and
  `--focus-workload [NS/]NAME`: what is *shown*. The analysis always sees every
  object, so a filter never changes a verdict, only which lines are printed;
* `-o/--output`: one set of names (`txt`, alias `text`; `json`, `yaml`, `csv`,
  `md`, ...), each command taking those that make sense for it.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from stockade.compile.owner import check_owner_name
from stockade.errors import InputError
from stockade.load import Locations, load_objects, validate_objects
from stockade.model.cluster import Endpoint
from stockade.model.parse import Objects
from stockade.model.selector import (
    DOES_NOT_EXIST,
    EXISTS,
    IN,
    NOT_IN,
    Requirement,
    Selector,
)

FILES_HELP = "manifests (YAML or JSON, multi-document, kind: List), directories of them, " \
             "or - for standard input; repeatable"

# Names an output format is also known by: `text` everywhere, `table` (the matrix's
# former default) for txt.
OUTPUT_ALIASES = {"text": "txt", "table": "txt"}


_T = TypeVar("_T")


def seconds(text: str) -> float:
    """A duration flag (argparse type): a finite number of seconds, 0 or more."""
    return _seconds(text, zero=True)


def positive_seconds(text: str) -> float:
    """A duration flag that cannot be 0 (an interval or a timeout)."""
    return _seconds(text, zero=False)


def _seconds(text: str, *, zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise argparse.ArgumentTypeError(
            f"{text!r}: seconds must be finite and {'0 or more' if zero else 'more than 0'}")
    return value


def lease_seconds(text: str) -> int:
    """An etcd lease's TTL (argparse type): whole seconds, 2 to 3600 (etcd raises a
    shorter one to its own minimum)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds") from None
    if not 2 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: from 2 to 3600 seconds")
    return value


def address_pool(text: str) -> str:
    """`--subnet` (argparse type): a network the agent's address pool can be (the pool's
    own check: a network address without host bits, room for a gateway and an
    endpoint), refused before the agent opens anything."""
    from stockade.errors import NetError
    from stockade.net.ipam import Ipam

    try:
        return str(Ipam(text).subnet)
    except NetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def bridge_prefix(text: str) -> str:
    """`--bridge-prefix` (argparse type): the names' own check (net/naming.py)."""
    from stockade.errors import NetError
    from stockade.net.naming import Naming

    try:
        return Naming(text).prefix
    except NetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def metrics_address(text: str) -> str:
    """`--metrics-address` (argparse type): HOST:PORT as the metrics server binds it."""
    from stockade.agent.prometheus import parse_address

    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def nflog_group(text: str) -> int:
    """`--log-group` (argparse type): an NFLOG group, 0 (no log) to 65535."""
    if not text.isdigit() or int(text) > 0xFFFF:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give an NFLOG group from 1 to 65535, or 0 for no denied-flow log")
    return int(text)


def host_address(text: str) -> str:
    """`--host-address` (argparse type): a unicast IPv4 address the other hosts can route
    to (it becomes their routes' next hop, through etcd)."""
    from stockade.model.cidr import next_hop_problem

    problem = next_hop_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return str(ipaddress.ip_address(text))


def etcd_url(text: str) -> str:
    """`--etcd-endpoints` (argparse type): http:// or https:// and a host, as etcd's
    client URLs are written."""
    from urllib.parse import urlsplit

    try:
        url = urlsplit(text)
        port = url.port
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    if url.scheme not in ("http", "https") or not url.hostname or port == 0 or \
            url.path not in ("", "/") or url.query or url.fragment or url.username:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give etcd's client URL, http://HOST:PORT or https://HOST:PORT")
    return text


def node_name(text: str) -> str:
    """`--node` (argparse type): a Kubernetes node name (a DNS subdomain)."""
    from stockade.model.names import name_is_dns_subdomain

    problems = name_is_dns_subdomain(text, False)
    if problems:
        raise argparse.ArgumentTypeError(f"{text!r}: {'; '.join(problems)}")
    return text


def connection_count(text: str) -> int:
    """`--conntrack-limit` (argparse type): a whole number of connections, 0 to 2^32-1
    (nft_connlimit's counter)."""
    if not text.isdigit() or int(text) > 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a whole number of connections from 0 (no limit) to 4294967295")
    return int(text)


def add_conntrack_limit(p: argparse.ArgumentParser) -> None:
    """`--conntrack-limit`, the same for every command that programs a datapath."""
    p.add_argument("--conntrack-limit", type=connection_count, default=0, metavar="N",
                   help="nft and iptables datapaths: drop a new connection from a source "
                   "address that already holds N connections in conntrack, so that one pod "
                   "cannot fill the node's table (0: no limit, the default)")


def as_argument(parse: Callable[[str], _T]) -> Callable[[str], _T]:
    """An argparse type from a parser that raises InputError: its message, on the flag."""
    def convert(text: str) -> _T:
        try:
            return parse(text)
        except InputError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None
    return convert


# `--table`: a datapath's name, checked (compile/owner.py).
table_name = as_argument(check_owner_name)


def add_files(p: argparse.ArgumentParser, *, flags: Sequence[str] = ("-f", "--file"),
              dest: str = "files", help: str = FILES_HELP, required: bool = True,
              recursive: bool = True) -> None:
    """`-f` (repeatable, several values each) and, once per parser, `-R`."""
    p.add_argument(*flags, dest=dest, action="extend", nargs="+", required=required,
                   default=None if required else [], metavar="FILE|DIR|-", help=help)
    if recursive:
        p.add_argument("-R", "--recursive", action="store_true",
                       help="read the directories given with -f recursively, as kubectl -R")


def add_output(p: argparse.ArgumentParser, formats: Sequence[str], default: str = "txt",
               help: str = "") -> None:
    """`-o/--output` among `formats` (their aliases accepted: `text` is `txt`)."""
    def parse(text: str) -> str:
        value = OUTPUT_ALIASES.get(text, text) if text not in formats else text
        if value not in formats:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {text!r} (choose from {', '.join(formats)})")
        return value

    shown = "{" + ",".join(formats) + "}"
    p.add_argument("-o", "--output", default=default, type=parse, metavar=shown,
                   help=help or f"output format (default {default}; text is txt)")


def add_filters(p: argparse.ArgumentParser, *, namespace: bool = True,
                focus: bool = False) -> None:
    """`-n`/`-A` (unless the caller has its own, as `kubectl stockade`), `-l`, and
    optionally `--focus-workload`: what is shown, never what is analysed."""
    # Whether -n filters (here) or names where to read (`kubectl stockade`'s scope).
    p.set_defaults(filter_namespace=namespace)
    if namespace:
        scope = p.add_mutually_exclusive_group()
        scope.add_argument("-n", "--namespace", metavar="NS", default=None,
                           help="show only what involves this namespace")
        scope.add_argument("-A", "--all-namespaces", action="store_true",
                           help="show every namespace (the default with files)")
    p.add_argument("-l", "--selector", metavar="SELECTOR", default=None,
                   type=_selector_arg,
                   help="show only what involves pods or workloads with these labels "
                        "(kubectl's syntax: a=b,c!=d,e in (x,y),!f,g)")
    if focus:
        p.add_argument("--focus-workload", metavar="[NS/]NAME", default=None,
                       help="show only connections from or to this workload (a Pod, or a "
                            "workload as list names it: ns/name, name, or ns/name[Kind])")


# ---- label selectors (kubectl -l) -----------------------------------------------------------

_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"
_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_SET = re.compile(rf"\s*(?P<key>{_KEY})\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)\s*")
_EQ = re.compile(rf"\s*(?P<key>{_KEY})\s*(?P<op>==|=|!=)\s*(?P<value>{_VALUE})\s*")
_HAS = re.compile(rf"\s*(?P<neg>!)?\s*(?P<key>{_KEY})\s*")
_VALUE_RE = re.compile(_VALUE)


def parse_selector(text: str) -> Selector:
    """A label selector in kubectl's string syntax: requirements separated by commas
    (AND): `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`."""
    requirements: list[Requirement] = []
    for part in _split_requirements(text):
        requirements.append(_requirement(part, text))
    return Selector(match_expressions=tuple(requirements))


def _split_requirements(text: str) -> list[str]:
    """Split on the commas outside parentheses."""
    parts: list[str] = []
    depth = 0
    current = ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p for p in parts if p.strip()] if text.strip() else []


def _requirement(part: str, text: str) -> Requirement:
    if m := _SET.fullmatch(part):
        values = tuple(v.strip() for v in m["values"].split(",") if v.strip())
        if not values or any(not _VALUE_RE.fullmatch(v) for v in values):
            raise InputError(f"-l {text}: {part.strip()!r}: give one or more label values "
                             "in the parentheses")
        return Requirement(m["key"], IN if m["op"] == "in" else NOT_IN, values)
    if m := _EQ.fullmatch(part):
        return Requirement(m["key"], NOT_IN if m["op"] == "!=" else IN, (m["value"],))
    if m := _HAS.fullmatch(part):
        return Requirement(m["key"], DOES_NOT_EXIST if m["neg"] else EXISTS)
    raise InputError(f"-l {text}: {part.strip()!r} is not a label requirement (k=v, k!=v, "
                     "k in (a,b), k notin (a,b), k or !k)")


_selector_arg = as_argument(parse_selector)


# ---- what is shown -------------------------------------------------------------------------

_KIND_SUFFIX = re.compile(r"\[(?P<kind>[^\]]*)\]$")


@dataclass(frozen=True)
class Focus:
    """A workload named as netpol-analyzer's --focus-workload names it."""

    namespace: str | None
    name: str
    kind: str | None

    @classmethod
    def parse(cls, text: str) -> Focus:
        body = text.strip()
        kind = None
        if m := _KIND_SUFFIX.search(body):
            kind = m["kind"]
            body = body[:m.start()]
        ns, _, name = body.rpartition("/")
        if not name:
            raise InputError(f"--focus-workload {text}: give NAME, NS/NAME or NS/NAME[Kind]")
        return cls(ns or None, name, kind)

    def matches(self, ep: Endpoint, controller: tuple[str, str] | None = None) -> bool:
        """Whether `ep` (a Pod with its `controller`, or a workload `name[Kind]`) is it."""
        if self.namespace is not None and ep.namespace != self.namespace:
            return False
        if m := _KIND_SUFFIX.search(ep.name):  # a workload: name[Kind]
            names = {(ep.name[:m.start()], m["kind"])}
        else:
            names = {(ep.name, "Pod")}
            if controller is not None:
                names.add((controller[1], controller[0]))
        return any(n == self.name and (self.kind is None or k == self.kind) for n, k in names)


@dataclass(frozen=True)
class View:
    """What a command shows: the endpoints of a namespace, with some labels, and (for
    connections) those from or to one workload. Every field None: everything."""

    namespace: str | None = None
    selector: Selector | None = None
    focus: Focus | None = None

    @classmethod
    def of(cls, args: argparse.Namespace) -> View:
        namespace = getattr(args, "namespace", None)
        if getattr(args, "all_namespaces", False) or not getattr(args, "filter_namespace", False):
            namespace = None
        focus = getattr(args, "focus_workload", None)
        return cls(namespace, getattr(args, "selector", None),
                   Focus.parse(focus) if focus else None)

    @property
    def everything(self) -> bool:
        return self.namespace is None and self.selector is None and self.focus is None

    def selects(self, ep: Endpoint) -> bool:
        """`ep` is in the namespace and has the labels (the focus aside)."""
        return (self.namespace is None or ep.namespace == self.namespace) \
            and (self.selector is None or self.selector.matches(ep.labels))

    def focused(self, ep: Endpoint, controller: tuple[str, str] | None = None) -> bool:
        return self.focus is None or self.focus.matches(ep, controller)

    def shown_pair(self, src: Endpoint | None, dst: Endpoint | None,
                   controllers: Mapping[str, tuple[str, str]] = {}) -> bool:
        """A connection between two endpoints (None: an address range) is shown when
        one end is selected, and one end is the focus if there is one."""
        ends = [ep for ep in (src, dst) if ep is not None]
        if not any(self.selects(ep) for ep in ends):
            return False
        return self.focus is None or any(self.focused(ep, controllers.get(ep.key))
                                         for ep in ends)

    def check_focus(self, endpoints: Iterable[Endpoint],
                    controllers: Mapping[str, tuple[str, str]] = {}) -> None:
        """A focus that names nothing is a typo: say so rather than print nothing."""
        if self.focus is None:
            return
        if not any(self.focus.matches(ep, controllers.get(ep.key)) for ep in endpoints):
            f = self.focus
            name = (f"{f.namespace}/" if f.namespace else "") + f.name \
                + (f"[{f.kind}]" if f.kind else "")
            raise InputError(f"--focus-workload {name}: no such workload or pod in the input")


# ---- reading -------------------------------------------------------------------------------

def read(args: argparse.Namespace, dest: str = "files", *,
         locations: Locations | None = None, prog: str = "stockade") -> Objects:
    """The objects of the files of `-f` (or of `dest`), as `load` reads them."""
    return load(getattr(args, dest), recursive=getattr(args, "recursive", False),
                prog=prog, locations=locations)


def load(paths: Sequence[str], *, recursive: bool = False, prog: str = "stockade",
         locations: Locations | None = None) -> Objects:
    """The objects of the files: every policy valid, every pod IP an IP address.

    An analysis of policies the API server would reject would describe nothing
    real, so invalid ones stop it (every error listed, exit 2). Decoding keeps pod
    IPs as written; one that is not an address would fail deep in the evaluator,
    so it is reported here as bad input, by file and Pod. Workloads (Deployments,
    Jobs, ...) are read from their pod templates, Pods whatever their status;
    every object of another kind is skipped with a note on stderr.
    """
    objects = load_objects(paths, workloads=True, recursive=recursive, locations=locations)
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
