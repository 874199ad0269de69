"""The MicroService operator's policies against the graph they come from.

Random dependency graphs (several namespaces, services with ports, dependsOn
edges to existing and missing services, ports by name and number, declared or
not, random isolation) go through the path of `stockade operator render` (YAML
text, decode, admission, `render_all`, a JSON `kind: List`) and the path of
`stockade matrix` (the List read back with generated Pods: every service's pods
labelled for its selector and serving its ports, pods of no service, the cluster
DNS). For every ordered pair of distinct pods and every probed port, the
matrix's verdict must be what the graph says, worked out here from the raw
graph without the operator's code:

* into a pod of an ingress-isolated service T: only pods of services with a
  resolvable dependency on T, on the ports of that dependency;
* out of a pod of an egress-isolated service D: only pods of D's resolvable
  dependencies on their ports, and the DNS pods on UDP/TCP 53;
* any other direction is unrestricted.

A dependency resolves when its target exists and declares every port it names
(by name, or by number with any protocol); its ports are then those, or every
declared port when it names none, or every port when the target declares none.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hypothesis import given
from hypothesis import strategies as st

from stockade.engine.matrix import compute_matrix
from stockade.model.parse import Objects, parse_documents, parse_objects
from stockade.operator.render import Rendering, changed_policies, policy_key, render_all
from stockade.operator.service import (
    API_VERSION,
    MicroService,
    admit_microservices,
    decode_microservices,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "microservices"

NAMESPACES = ("alpha", "beta", "gamma")
NAMES = ("api", "web", "db", "cache", "auth")
# name, number, protocol: two numbers are served with two protocols each
PORTS = (("http", 80, "TCP"), ("grpc", 9000, "TCP"), ("stats", 9000, "UDP"),
         ("metrics", 9090, "TCP"), ("dns", 53, "UDP"), ("diameter", 3868, "SCTP"))
UNDECLARED = 7777
PROBES = sorted({n for _, n, _ in PORTS} | {53, UNDECLARED})
PROTOCOLS = ("TCP", "UDP", "SCTP")
DNS = ("kube-system", "coredns")
ALL_PORTS = frozenset({("*", 0)})  # a dependency allowing every port


@dataclass
class Service:
    namespace: str
    name: str
    selector: dict[str, Any]
    pod_labels: dict[str, str]
    ports: list[tuple[str, int, str]]
    depends: list[tuple[str, str, list[int | str] | None, bool]]  # ns, name, ports, ns given
    ingress: bool | None
    egress: bool | None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def manifest(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"selector": self.selector}
        if self.ports:
            spec["ports"] = [{"name": n, "port": p, **({"protocol": proto}
                                                      if proto != "TCP" or n == "http" else {})}
                             for n, p, proto in self.ports]
        if self.depends:
            deps = []
            for ns, name, refs, ns_given in self.depends:
                dep: dict[str, Any] = {"name": name}
                if ns_given:
                    dep["namespace"] = ns
                if refs is not None:
                    dep["ports"] = refs
                deps.append(dep)
            spec["dependsOn"] = deps
        iso = {k: v for k, v in (("ingress", self.ingress), ("egress", self.egress))
               if v is not None}
        if iso:
            spec["isolation"] = iso
        return {"apiVersion": API_VERSION, "kind": "MicroService",
                "metadata": {"name": self.name, "namespace": self.namespace,
                             "uid": f"uid-{self.namespace}-{self.name}"},
                "spec": spec}


@dataclass
class Pod:
    namespace: str
    name: str
    labels: dict[str, str]
    ip: str
    ports: list[tuple[str, int, str]]
    service: str | None  # the key of the service it belongs to

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def manifest(self) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": self.name, "namespace": self.namespace,
                             "labels": self.labels},
                "spec": {"containers": [{"name": "c", "ports": [
                    {"name": n, "containerPort": p, "protocol": proto}
                    for n, p, proto in self.ports]}]},
                "status": {"podIP": self.ip}}


@dataclass
class World:
    services: list[Service]
    pods: list[Pod] = field(default_factory=list)


@st.composite
def selectors(draw: st.DrawFn, name: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A selector for the service `name` and labels of pods it selects (and no other's)."""
    form = draw(st.sampled_from(("labels", "two-labels", "expression", "mixed")))
    tier = draw(st.sampled_from(("front", "back")))
    labels = {"app": name, "tier": tier}
    if form == "labels":
        return {"matchLabels": {"app": name}}, labels
    if form == "two-labels":
        return {"matchLabels": {"app": name, "tier": tier}}, labels
    if form == "expression":
        return {"matchExpressions": [{"key": "app", "operator": "In", "values": [name]}]}, labels
    return {"matchLabels": {"app": name},
            "matchExpressions": [{"key": "tier", "operator": "Exists"}]}, labels


@st.composite
def worlds(draw: st.DrawFn) -> World:
    keys = draw(st.lists(st.tuples(st.sampled_from(NAMESPACES), st.sampled_from(NAMES)),
                         min_size=1, max_size=6, unique=True))
    services = []
    for ns, name in keys:
        selector, labels = draw(selectors(name))
        ports = draw(st.lists(st.sampled_from(PORTS), max_size=3, unique=True))
        services.append(Service(ns, name, selector, labels, sorted(ports), [],
                                draw(st.none() | st.booleans()),
                                draw(st.none() | st.booleans())))
    targets = [*keys, ("alpha", "ghost"), ("beta", "gone")]
    refs = st.sampled_from([n for n, _, _ in PORTS] + sorted({p for _, p, _ in PORTS})
                           + [8443])
    for s in services:
        chosen = draw(st.lists(st.sampled_from(targets), max_size=4, unique=True))
        for ns, name in chosen:
            ports = draw(st.none() | st.lists(refs, min_size=1, max_size=3, unique=True))
            ns_given = ns != s.namespace or draw(st.booleans())
            s.depends.append((ns, name, ports, ns_given))
    world = World(services)
    n = 0

    def ip() -> str:
        nonlocal n
        n += 1
        return f"10.0.{n // 200}.{n % 200 + 1}"

    for s in services:
        for i in range(draw(st.integers(1, 2))):
            world.pods.append(Pod(s.namespace, f"{s.name}-{i}", dict(s.pod_labels), ip(),
                                  list(s.ports), s.key))
    for i in range(draw(st.integers(0, 3))):
        ns = draw(st.sampled_from(NAMESPACES))
        # labels no selector matches: `app` of no service (a tier alone is not enough)
        labels = draw(st.sampled_from(({"app": "stray", "tier": "front"}, {"tier": "back"},
                                       {})))
        ports = draw(st.lists(st.sampled_from(PORTS), max_size=2, unique=True))
        world.pods.append(Pod(ns, f"stray-{i}", labels, ip(), sorted(ports), None))
    world.pods.append(Pod(*DNS, {"k8s-app": "kube-dns"}, ip(),
                          [("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")], None))
    return world


# --------------------------------------------------------------------------- the graph's word


def edge_ports(source: Service, target: Service) -> frozenset[tuple[str, int]] | None:
    """What `source` may call on `target`: None when it may not (no resolvable edge)."""
    for ns, name, refs, _ in source.depends:
        if (ns, name) != (target.namespace, target.name):
            continue
        if refs is None:
            if not target.ports:
                return ALL_PORTS
            return frozenset((proto, p) for _, p, proto in target.ports)
        allowed: set[tuple[str, int]] = set()
        for ref in refs:
            matched = {(proto, p) for n, p, proto in target.ports if ref in (n, p)}
            if not matched:
                return None
            allowed |= matched
        return frozenset(allowed)
    return None


def edge_allows(source: Service | None, target: Service | None, proto: str, port: int) -> bool:
    if source is None or target is None:
        return False
    ports = edge_ports(source, target)
    return ports is not None and (ports == ALL_PORTS or (proto, port) in ports)


def graph_allows(world: World, src: Pod, dst: Pod, proto: str, port: int) -> bool:
    by_key = {s.key: s for s in world.services}
    s = by_key.get(src.service or "")
    t = by_key.get(dst.service or "")
    egress_ok = True
    if s is not None and s.egress is True:
        dns = (dst.namespace, dst.name) == DNS and port == 53 and proto in ("UDP", "TCP")
        egress_ok = dns or edge_allows(s, t, proto, port)
    ingress_ok = True
    if t is not None and t.ingress is not False:
        ingress_ok = edge_allows(s, t, proto, port)
    return egress_ok and ingress_ok


def expected_findings(world: World) -> set[tuple[str, str]]:
    by_key = {(s.namespace, s.name): s for s in world.services}
    out = set()
    for s in world.services:
        for i, (ns, name, refs, _) in enumerate(s.depends):
            target = by_key.get((ns, name))
            if target is None:
                out.add((s.key, f"spec.dependsOn[{i}]"))
                continue
            for j, ref in enumerate(refs or ()):
                if not any(ref in (n, p) for n, p, _ in target.ports):
                    out.add((s.key, f"spec.dependsOn[{i}].ports[{j}]"))
    return out


# --------------------------------------------------------------------------- the product's path


def render(world: World, order: list[Service] | None = None) -> tuple[Rendering, str]:
    """As `stockade operator render -o json` does: YAML in, a JSON List out."""
    text = yaml.safe_dump_all([s.manifest() for s in (order or world.services)])
    services, errors, skipped = decode_microservices(parse_documents(text, "graph.yaml"),
                                                     "graph.yaml")
    assert (errors, skipped) == ([], 0)
    assert admit_microservices(services) == []
    rendering = render_all(services)
    listed = json.dumps({"apiVersion": "v1", "kind": "List", "items": rendering.manifests()})
    return rendering, listed


@given(worlds())
def test_the_matrix_of_the_rendered_policies_is_the_graph(world: World) -> None:
    rendering, listed = render(world)
    assert {(f.service, f.path) for f in rendering.findings} == expected_findings(world)
    objects = Objects()
    objects.extend(parse_objects(listed, "-"))
    objects.extend(parse_objects(yaml.safe_dump_all([p.manifest() for p in world.pods]),
                                 "pods.yaml"))
    assert len(objects.policies) == len(rendering.policies)
    matrix = compute_matrix(objects.cluster(), PROBES, PROTOCOLS)
    pods = {p.key: p for p in world.pods}
    assert sorted(pods) == list(matrix.pods)
    for table in matrix.tables:
        proto, port = table.probe.protocol, table.probe.port
        assert isinstance(port, int)
        for i, src in enumerate(matrix.pods):
            for j, dst in enumerate(matrix.pods):
                if i == j:
                    continue
                want = graph_allows(world, pods[src], pods[dst], proto, port)
                assert table.cells[i][j] is want, (
                    f"{src} -> {dst} {proto}/{port}: matrix says {table.cells[i][j]}, "
                    f"the graph says {want}")


@given(worlds(), st.randoms(use_true_random=False))
def test_rendering_ignores_the_order_of_services(world: World, rnd: random.Random) -> None:
    order = list(world.services)
    rnd.shuffle(order)
    assert render(world, order)[1] == render(world)[1]


@given(worlds(), st.data())
def test_a_new_edge_changes_only_the_policies_at_its_ends(world: World, data: st.DataObject
                                                          ) -> None:
    source = data.draw(st.sampled_from(world.services))
    free = [t for t in world.services
            if (t.namespace, t.name) not in {(ns, n) for ns, n, _, _ in source.depends}]
    if not free:
        return
    target = data.draw(st.sampled_from(free))
    before, _ = render(world)
    source.depends.append((target.namespace, target.name, None, True))
    after, _ = render(world)
    write, delete = changed_policies(before, after)
    assert delete == ()
    ends = set()
    for svc, direction in ((target, "Ingress"), (source, "Egress")):
        ends.add(policy_key(_model(svc), direction))
    assert set(write) <= ends


def _model(s: Service) -> MicroService:
    services, _, _ = decode_microservices([s.manifest()])
    return services[0]


# --------------------------------------------------------------------------- the real commands


def _stockade() -> list[str]:
    exe = Path(sys.executable).parent / "stockade"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "stockade.cli.main"]


def test_render_piped_into_matrix_on_the_example() -> None:
    """`stockade operator render -f services.yaml -o json | stockade matrix -f pods.yaml -`"""
    rendered = subprocess.run([*_stockade(), "operator", "render", "-f",
                               str(EXAMPLE / "services.yaml"), "-o", "json"],
                              capture_output=True, text=True, timeout=60, check=False)
    assert rendered.returncode == 0, rendered.stderr
    assert "shop/api: ingress allowed from shop/web on TCP/8000" in rendered.stderr
    done = subprocess.run([*_stockade(), "matrix", "-f", str(EXAMPLE / "pods.yaml"), "-",
                           "-o", "json"], input=rendered.stdout, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    t = {f"{x['protocol']}/{x['port']}": x["allowed"] for x in json.loads(done.stdout)["tables"]}
    assert t["TCP/8000"]["shop/web"]["shop/api"] is True
    assert t["TCP/8000"]["shop/debug"]["shop/api"] is False   # api admits web only
    assert t["TCP/9090"]["shop/web"]["shop/api"] is False     # on http only
    assert t["TCP/5432"]["shop/api"]["data/postgres"] is True  # every port of postgres
    assert t["TCP/6379"]["shop/api"]["data/redis"] is True
    assert t["TCP/6379"]["shop/web"]["data/redis"] is False
    assert t["UDP/53"]["shop/api"]["kube-system/coredns"] is True  # api's egress: DNS
    assert t["TCP/8080"]["shop/api"]["shop/web"] is False      # api's egress: not web
    assert t["TCP/8080"]["shop/debug"]["shop/web"] is True     # web is not isolated
