"""Hypothesis strategies for random *valid* clusters and NetworkPolicies.

Shared by every property suite (the reference evaluator's, the parser's, and the
kernel datapath's), so everything is parameterised by a `Universe`: the names,
labels, ports and IP ranges to draw from, and the `Features` to use. Vocabularies
are deliberately small so that selectors, ports and ipBlocks match often and the
properties say something.

Typical use::

    from tests.property.strategies import MINIMAL, Scenario, Universe, scenarios

    @given(scenarios(Universe(max_pods=4, ipv4_net="10.99.0.0/24")))
    def test_something(sc: Scenario) -> None:
        for flow in sc.flows():      # every pod pair and pod/external pair, per probe
            ...

    @given(scenarios(MINIMAL.with_features(named_ports=True)))
    ...

Building blocks: `clusters`, `network_policies`, `policy_sets`, `rules`, `peers`,
`policy_ports`, `ip_blocks`, `selectors`; `policy_manifests`, `pod_manifest`,
`namespace_manifest`, `cluster_manifests` render model objects as documents that
decode back to them. Universes: DEFAULT (everything), DENSE (tiny vocabularies,
overlapping rules), MINIMAL (IPv4/TCP, label selectors, numeric ports).

Everything generated here passes the API server's validation: label keys and
values, DNS names, IANA service names for named ports, `endPort >= port`, an
`except` strictly inside its `cidr` (same family, longer prefix), canonical CIDRs
(valid even with StrictIPCIDRValidation), peers with at least one field and never
an ipBlock together with a selector, no duplicate policyTypes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

from hypothesis import strategies as st

from stockade.engine.evaluate import Flow
from stockade.model.cluster import NS_NAME_LABEL, Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.labels import Labels
from stockade.model.policy import (
    EGRESS,
    INGRESS,
    PROTOCOLS,
    TCP,
    UDP,
    IPBlock,
    NetworkPolicy,
    Peer,
    PolicyPort,
    Rule,
)
from stockade.model.selector import DOES_NOT_EXIST, EXISTS, IN, NOT_IN, Requirement, Selector

NETPOL_API = "networking.k8s.io/v1"

# --------------------------------------------------------------------------- knobs


@dataclass(frozen=True)
class Features:
    """Which parts of the API the generated policies (and clusters) use."""

    match_expressions: bool = True
    pod_selector_peers: bool = True
    namespace_selector_peers: bool = True
    ip_blocks: bool = True
    ip_block_except: bool = True
    numeric_ports: bool = True
    named_ports: bool = True
    end_ports: bool = True
    port_less_entries: bool = True  # a port entry with a protocol and no port
    empty_peer_lists: bool = True  # `from: []` / no `to`: every peer
    empty_port_lists: bool = True  # no `ports`: every port
    explicit_policy_types: bool = True  # else always the API default
    directions: tuple[str, ...] = (INGRESS, EGRESS)
    protocols: tuple[str, ...] = PROTOCOLS
    ipv6: bool = True  # IPv6-only and dual-stack pods, IPv6 ipBlocks

    @classmethod
    def minimal(cls) -> Features:
        """Plain TCP/IPv4 with label selectors and numeric ports only."""
        return cls(match_expressions=False, ip_blocks=False, ip_block_except=False,
                   named_ports=False, end_ports=False, port_less_entries=False,
                   protocols=(TCP,), ipv6=False)


@dataclass(frozen=True)
class Universe:
    """What clusters and policies are drawn from.

    `ipv4_net`/`ipv6_net` hold every pod IP, every external IP and the interesting
    part of every ipBlock (ipBlocks may also be wider, up to /0). The first and
    last address of each range are never assigned.
    """

    namespaces: tuple[str, ...] = ("x", "y", "z")
    label_keys: tuple[str, ...] = ("a", "b", "c")
    label_values: tuple[str, ...] = ("1", "2")
    ports: tuple[int, ...] = (53, 80, 81, 443, 8080)
    port_names: tuple[str, ...] = ("http", "dns", "metrics")
    ipv4_net: str = "10.1.0.0/26"
    ipv6_net: str = "fd00:10:1::/122"
    min_pods: int = 2
    max_pods: int = 6
    max_namespaces: int = 3
    max_container_ports: int = 3
    max_policies: int = 4
    max_rules: int = 2
    max_peers: int = 2
    max_ports: int = 2
    max_requirements: int = 2
    features: Features = field(default_factory=Features)

    def __post_init__(self) -> None:
        if not 1 <= self.min_pods <= self.max_pods:
            raise ValueError("need 1 <= min_pods <= max_pods")
        for net in self.nets():
            # Room for every pod and a few external IPs, without the first and last.
            if net.num_addresses - 2 < self.max_pods + 2:
                raise ValueError(f"{net} is too small for {self.max_pods} pods")

    def with_features(self, **changes: Any) -> Universe:
        return replace(self, features=replace(self.features, **changes))

    @property
    def protocols(self) -> tuple[str, ...]:
        return self.features.protocols

    def nets(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        v4 = ipaddress.IPv4Network(self.ipv4_net)
        if not self.features.ipv6:
            return (v4,)
        return (v4, ipaddress.IPv6Network(self.ipv6_net))

    def probe_ports(self) -> tuple[int, ...]:
        """Ports worth probing: the vocabulary, its neighbours (range edges), one stranger."""
        near = {p + d for p in self.ports for d in (-1, 0, 1)}
        return tuple(sorted(p for p in near | {max(self.ports) + 1000} if 1 <= p <= 65535))


DEFAULT = Universe()
"""Every feature, three namespaces, up to six pods."""

DENSE = Universe(
    namespaces=("x", "y"), label_keys=("a", "b"), label_values=("1",), ports=(80, 81),
    port_names=("http", "web"), ipv4_net="10.1.0.0/28", ipv6_net="fd00:10:1::/124",
    max_pods=5, max_rules=3, max_ports=3, max_peers=3,
    features=Features(protocols=(TCP, UDP)),
)
"""Tiny vocabularies: nearly everything matches something, so traces list several
rules, second port entries match, named ports resolve."""

MINIMAL = Universe(features=Features.minimal())
"""IPv4 and TCP only, label selectors and numeric ports (a first datapath)."""

# --------------------------------------------------------------------------- labels
# Strategy objects are built once per vocabulary/universe (lru_cache): building
# them inside every draw costs more than the drawing.

Vocab = tuple[tuple[str, tuple[str, ...]], ...]


def _freeze(vocab: Mapping[str, Sequence[str]]) -> Vocab:
    return tuple(sorted((k, tuple(v)) for k, v in vocab.items()))


@cache
def _label_maps(vocab: Vocab, max_size: int) -> st.SearchStrategy[Labels]:
    pairs = st.one_of([st.tuples(st.just(k), st.sampled_from(vs)) for k, vs in vocab])
    return st.lists(pairs, max_size=min(max_size, len(vocab)),
                    unique_by=lambda kv: kv[0]).map(lambda kvs: Labels(dict(kvs)))


def label_maps(vocab: Mapping[str, Sequence[str]], max_size: int = 3
               ) -> st.SearchStrategy[Labels]:
    """Label maps over `vocab` (key -> values it may take)."""
    return _label_maps(_freeze(vocab), max_size)


@cache
def _requirements(vocab: Vocab) -> st.SearchStrategy[Requirement]:
    options = []
    for key, values in vocab:
        some = st.lists(st.sampled_from(values), min_size=1, max_size=len(values),
                        unique=True).map(tuple)
        options.append(st.builds(Requirement, st.just(key), st.sampled_from((IN, NOT_IN)), some))
        options.append(st.builds(Requirement, st.just(key),
                                 st.sampled_from((EXISTS, DOES_NOT_EXIST))))
    return st.one_of(options)


def requirements(vocab: Mapping[str, Sequence[str]]) -> st.SearchStrategy[Requirement]:
    """One matchExpressions entry over `vocab`: In/NotIn with values, Exists and
    DoesNotExist without."""
    return _requirements(_freeze(vocab))


@cache
def _selectors(vocab: Vocab, expressions: bool, max_labels: int, max_requirements: int
               ) -> st.SearchStrategy[Selector]:
    exprs = (st.lists(_requirements(vocab), max_size=max_requirements).map(tuple)
             if expressions else st.just(()))
    return st.builds(Selector, _label_maps(vocab, max_labels), exprs)


def selectors(vocab: Mapping[str, Sequence[str]], *, expressions: bool = True,
              max_labels: int = 2, max_requirements: int = 2) -> st.SearchStrategy[Selector]:
    """A LabelSelector over `vocab`; often empty (selects everything)."""
    return _selectors(_freeze(vocab), expressions, max_labels, max_requirements)


def pod_vocab(u: Universe) -> dict[str, tuple[str, ...]]:
    return {k: u.label_values for k in u.label_keys}


def namespace_vocab(u: Universe) -> dict[str, tuple[str, ...]]:
    """Pod label vocabulary plus kubernetes.io/metadata.name over namespace names."""
    vocab = pod_vocab(u)
    vocab[NS_NAME_LABEL] = u.namespaces
    return vocab


def pod_selectors(u: Universe) -> st.SearchStrategy[Selector]:
    return selectors(pod_vocab(u), expressions=u.features.match_expressions,
                     max_requirements=u.max_requirements)


def namespace_selectors(u: Universe) -> st.SearchStrategy[Selector]:
    return selectors(namespace_vocab(u), expressions=u.features.match_expressions,
                     max_requirements=u.max_requirements)


# --------------------------------------------------------------------------- clusters


def _host(net: ipaddress.IPv4Network | ipaddress.IPv6Network, offset: int) -> str:
    return str(net.network_address + offset)


def _host_offsets(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> range:
    return range(1, net.num_addresses - 1)


@cache
def container_ports(u: Universe) -> st.SearchStrategy[tuple[ContainerPort, ...]]:
    """A pod's container ports: unique names, unique (port, protocol)."""
    names: st.SearchStrategy[str] = st.just("")
    if u.features.named_ports:
        names = st.just("") | st.sampled_from(u.port_names)
    entry = st.builds(ContainerPort, st.sampled_from(u.ports), st.sampled_from(u.protocols),
                      names)
    return st.lists(entry, max_size=u.max_container_ports,
                    unique_by=(lambda p: (p.port, p.protocol),
                               lambda p: p.name or object())).map(tuple)


@st.composite
def namespaces(draw: st.DrawFn, u: Universe) -> tuple[Namespace, ...]:
    """1..max_namespaces namespaces, each with the metadata.name label and a few more."""
    names = draw(st.lists(st.sampled_from(u.namespaces), min_size=1,
                          max_size=min(u.max_namespaces, len(u.namespaces)), unique=True))
    out = []
    for name in names:
        labels = draw(label_maps(pod_vocab(u)))
        out.append(Namespace(name, labels.with_labels(**{NS_NAME_LABEL: name})))
    return tuple(out)


@st.composite
def clusters(draw: st.DrawFn, u: Universe = DEFAULT, *, with_policies: bool = False,
             min_policies: int = 0) -> Cluster:
    """Namespaces and pods with unique IPs (policies too if `with_policies`).

    Pods are IPv4-only, or (with `features.ipv6`) IPv6-only or dual-stack in
    either order. Every pod's namespace is declared.
    """
    nss = draw(namespaces(u))
    nets = u.nets()
    n = draw(st.integers(u.min_pods, u.max_pods))
    offsets = [draw(st.lists(st.sampled_from(_host_offsets(net)), min_size=n, max_size=n,
                             unique=True)) for net in nets]
    families = ("v4", "v6", "v4v6", "v6v4") if u.features.ipv6 else ("v4",)
    ns_names = st.sampled_from(tuple(ns.name for ns in nss))
    eps = []
    for i in range(n):
        fam = draw(st.sampled_from(families))
        v4 = _host(nets[0], offsets[0][i])
        v6 = _host(nets[1], offsets[1][i]) if len(nets) > 1 else ""
        ips = {"v4": (v4,), "v6": (v6,), "v4v6": (v4, v6), "v6v4": (v6, v4)}[fam]
        eps.append(Endpoint(
            namespace=draw(ns_names),
            name=f"pod-{i}",
            labels=draw(label_maps(pod_vocab(u))),
            ips=ips,
            ports=draw(container_ports(u)),
        ))
    policies: tuple[NetworkPolicy, ...] = ()
    if with_policies:
        # Weighted towards namespaces that have pods, so that policies select often.
        weighted = tuple(ns.name for ns in nss) + tuple(ep.namespace for ep in eps)
        policies = draw(policy_sets(u, weighted, min_size=min_policies))
    return Cluster(nss, tuple(eps), policies)


# --------------------------------------------------------------------------- policies


@st.composite
def _ip_blocks(draw: st.DrawFn, u: Universe) -> IPBlock:
    net = draw(st.sampled_from(u.nets()))
    bits = net.max_prefixlen
    if draw(st.booleans()) and draw(st.booleans()):
        # Wide blocks, /0 included: they hold every pod IP of their family.
        prefix = draw(st.sampled_from(sorted({0, net.prefixlen // 2, max(0, net.prefixlen - 4)})))
    else:
        prefix = draw(st.integers(max(0, net.prefixlen - 2), bits))
    addr = net.network_address + draw(st.integers(0, net.num_addresses - 1))
    cidr = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
    excepts: list[str] = []
    if u.features.ip_block_except and prefix < bits:
        # The part of the universe range inside the cidr, to aim the excepts at.
        inner = net if cidr.prefixlen <= net.prefixlen else cidr
        for _ in range(draw(st.integers(0, 2))):
            b = inner.network_address + draw(st.integers(0, inner.num_addresses - 1))
            q = draw(st.integers(prefix + 1, bits))
            exc = str(ipaddress.ip_network(f"{b}/{q}", strict=False))
            if exc not in excepts:
                excepts.append(exc)
    return IPBlock(str(cidr), tuple(excepts))


@cache
def ip_blocks(u: Universe) -> st.SearchStrategy[IPBlock]:
    """A canonical CIDR around the universe's range, with excepts strictly inside."""
    return _ip_blocks(u)


@cache
def peers(u: Universe) -> st.SearchStrategy[Peer]:
    """podSelector only, namespaceSelector only, both, or an ipBlock."""
    f = u.features
    options: list[st.SearchStrategy[Peer]] = []
    if f.pod_selector_peers:
        options.append(st.builds(Peer, pod_selector=pod_selectors(u)))
    if f.namespace_selector_peers:
        options.append(st.builds(Peer, namespace_selector=namespace_selectors(u)))
    if f.pod_selector_peers and f.namespace_selector_peers:
        options.append(st.builds(Peer, pod_selector=pod_selectors(u),
                                 namespace_selector=namespace_selectors(u)))
    if f.ip_blocks:
        options.append(st.builds(Peer, ip_block=ip_blocks(u)))
    if not options:
        raise ValueError("Features allow no kind of peer")
    return st.one_of(options)


@cache
def policy_ports(u: Universe) -> st.SearchStrategy[PolicyPort]:
    """A port entry: a number, a range, a name, or no port (every port)."""
    f = u.features
    protos = st.sampled_from(u.protocols)
    options: list[st.SearchStrategy[PolicyPort]] = []
    if f.numeric_ports:
        options.append(st.builds(PolicyPort, protos, st.sampled_from(u.ports)))
    if f.end_ports:
        ranges = sorted({(p, e) for p in u.ports for e in (*u.ports, p + 1)
                         if p <= e <= 65535})
        options.append(st.builds(lambda proto, r: PolicyPort(proto, r[0], r[1]),
                                 protos, st.sampled_from(ranges)))
    if f.named_ports:
        options.append(st.builds(PolicyPort, protos, st.sampled_from(u.port_names)))
    if f.port_less_entries:
        options.append(st.builds(PolicyPort, protos))
    if not options:
        raise ValueError("Features allow no kind of port entry")
    return st.one_of(options)


@cache
def rules(u: Universe) -> st.SearchStrategy[Rule]:
    """An ingress or egress rule; empty port or peer lists mean every port or peer."""
    f = u.features
    ports = st.lists(policy_ports(u), min_size=0 if f.empty_port_lists else 1,
                     max_size=u.max_ports).map(tuple)
    prs = st.lists(peers(u), min_size=0 if f.empty_peer_lists else 1,
                   max_size=u.max_peers).map(tuple)
    return st.builds(Rule, ports, prs)


@cache
def _rule_lists(u: Universe) -> st.SearchStrategy[tuple[Rule, ...]]:
    return st.lists(rules(u), max_size=u.max_rules).map(tuple)


def default_policy_types(egress: Sequence[Rule]) -> tuple[str, ...]:
    """The API server's default (written here independently of the product)."""
    return (INGRESS, EGRESS) if len(egress) > 0 else (INGRESS,)


@st.composite
def network_policies(draw: st.DrawFn, u: Universe = DEFAULT, *, name: str = "np",
                     namespace: str | None = None,
                     namespace_names: Sequence[str] | None = None) -> NetworkPolicy:
    """One policy. policyTypes are either the API default for its rules or explicit
    (any non-empty subset of `features.directions`, possibly listing a direction it
    has no rules for, or leaving out one it has rules for)."""
    f = u.features
    ns = namespace or draw(st.sampled_from(tuple(namespace_names or u.namespaces)))
    ingress = draw(_rule_lists(u)) if INGRESS in f.directions else ()
    egress = draw(_rule_lists(u)) if EGRESS in f.directions else ()
    default = default_policy_types(egress)
    explicit = [t for t in ((INGRESS,), (EGRESS,), (INGRESS, EGRESS), (EGRESS, INGRESS))
                if set(t) <= set(f.directions)]
    use_default = set(default) <= set(f.directions) and (
        not f.explicit_policy_types or draw(st.booleans()))
    if not use_default and not explicit:
        raise ValueError("Features allow no policyTypes")
    types = default if use_default else draw(st.sampled_from(explicit))
    return NetworkPolicy(
        namespace=ns,
        name=name,
        pod_selector=draw(pod_selectors(u)),
        ingress=ingress,
        egress=egress,
        policy_types=types,
    )


@st.composite
def policy_sets(draw: st.DrawFn, u: Universe = DEFAULT,
                namespace_names: Sequence[str] | None = None, *, min_size: int = 0,
                max_size: int | None = None, prefix: str = "np"
                ) -> tuple[NetworkPolicy, ...]:
    """Policies with unique names (so unique keys), in namespaces `namespace_names`."""
    n = draw(st.integers(min_size, u.max_policies if max_size is None else max_size))
    return tuple(draw(network_policies(u, name=f"{prefix}-{i}",
                                       namespace_names=namespace_names))
                 for i in range(n))


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    """A cluster with policies, IPs outside it, and the (port, protocol)s to probe."""

    cluster: Cluster
    external_ips: tuple[str, ...]
    probes: tuple[tuple[int, str], ...]

    def with_policies(self, policies: Sequence[NetworkPolicy]) -> Scenario:
        return replace(self, cluster=self.cluster.with_policies(policies))

    def flows(self, *, self_traffic: bool = False, external: bool = True) -> Iterator[Flow]:
        return probe_flows(self.cluster, self.probes, self.external_ips if external else (),
                           self_traffic=self_traffic)


def _family(ip: str) -> int:
    return ipaddress.ip_address(ip).version


def probe_flows(cluster: Cluster, probes: Sequence[tuple[int, str]],
                external_ips: Sequence[str] = (), *, self_traffic: bool = False
                ) -> Iterator[Flow]:
    """Every pod-to-pod flow (once per IP family both pods have), and every flow
    between a pod and an external IP of the same family, in both directions."""
    eps = cluster.endpoints
    for port, proto in probes:
        for s in eps:
            for d in eps:
                if s.key == d.key and not self_traffic:
                    continue
                for d_ip in d.ips:
                    s_ip = next((ip for ip in s.ips if _family(ip) == _family(d_ip)), None)
                    if s_ip is not None:
                        yield Flow(s, s_ip, d, d_ip, port, proto)
            for ext in external_ips:
                ip = next((i for i in s.ips if _family(i) == _family(ext)), None)
                if ip is not None:
                    yield Flow(None, ext, s, ip, port, proto)
                    yield Flow(s, ip, None, ext, port, proto)


@st.composite
def external_ips(draw: st.DrawFn, u: Universe, cluster: Cluster, max_size: int = 2
                 ) -> tuple[str, ...]:
    """IPs in the universe's ranges that belong to no pod."""
    used = {ip for ep in cluster.endpoints for ip in ep.ips}
    candidates = [_host(net, o) for net in u.nets() for o in _host_offsets(net)]
    free = [ip for ip in candidates if ip not in used]
    if not free:
        return ()
    return tuple(draw(st.lists(st.sampled_from(free), max_size=max_size, unique=True)))


def probes(u: Universe, max_size: int = 4) -> st.SearchStrategy[tuple[tuple[int, str], ...]]:
    """(port, protocol) pairs, mostly ports of the vocabulary, some range edges."""
    ports = st.sampled_from(u.ports) | st.sampled_from(u.probe_ports())
    return st.lists(st.tuples(ports, st.sampled_from(u.protocols)),
                    min_size=1, max_size=max_size, unique=True).map(tuple)


@st.composite
def scenarios(draw: st.DrawFn, u: Universe = DEFAULT, *, with_policies: bool = True,
              min_policies: int = 1, max_probes: int = 4) -> Scenario:
    """A cluster, with `min_policies`..`u.max_policies` policies unless not
    `with_policies`, some external IPs, and a few (port, protocol) probes."""
    cluster = draw(clusters(u, with_policies=with_policies, min_policies=min_policies))
    return Scenario(cluster, draw(external_ips(u, cluster)), draw(probes(u, max_probes)))


# --------------------------------------------------------------------------- manifests


def _render_selector(draw: st.DrawFn, sel: Selector) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if bool(sel.match_labels) or draw(st.booleans()):
        out["matchLabels"] = dict(sel.match_labels)
    if bool(sel.match_expressions) or draw(st.booleans()):
        exprs = []
        for r in sel.match_expressions:
            e: dict[str, Any] = {"key": r.key, "operator": r.operator}
            if bool(r.values) or draw(st.booleans()):
                e["values"] = list(r.values)
            exprs.append(e)
        out["matchExpressions"] = exprs
    return out


def _render_port(draw: st.DrawFn, p: PolicyPort) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if p.protocol != TCP or draw(st.booleans()):
        out["protocol"] = p.protocol
    if p.port is not None:
        out["port"] = p.port
    if p.end_port is not None:
        out["endPort"] = p.end_port
    return out


def _render_peer(draw: st.DrawFn, p: Peer) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if p.pod_selector is not None:
        out["podSelector"] = _render_selector(draw, p.pod_selector)
    if p.namespace_selector is not None:
        out["namespaceSelector"] = _render_selector(draw, p.namespace_selector)
    if p.ip_block is not None:
        block: dict[str, Any] = {"cidr": p.ip_block.cidr}
        if bool(p.ip_block.except_) or draw(st.booleans()):
            block["except"] = list(p.ip_block.except_)
        out["ipBlock"] = block
    return out


def _render_rule(draw: st.DrawFn, r: Rule, peers_key: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if bool(r.ports) or draw(st.booleans()):
        out["ports"] = [_render_port(draw, p) for p in r.ports]
    if bool(r.peers) or draw(st.booleans()):
        out[peers_key] = [_render_peer(draw, p) for p in r.peers]
    return out


@st.composite
def policy_manifests(draw: st.DrawFn, policy: NetworkPolicy) -> dict[str, Any]:
    """`policy` as a user would write it, varying everything the API defaults:
    omitted vs empty lists and selectors, protocol TCP omitted, policyTypes omitted
    (or `[]`) whenever the default gives the same value. Decoding it must give
    back `policy` exactly."""
    spec: dict[str, Any] = {}
    if not policy.pod_selector.is_empty or draw(st.booleans()):
        spec["podSelector"] = _render_selector(draw, policy.pod_selector)
    if bool(policy.ingress) or draw(st.booleans()):
        spec["ingress"] = [_render_rule(draw, r, "from") for r in policy.ingress]
    if bool(policy.egress) or draw(st.booleans()):
        spec["egress"] = [_render_rule(draw, r, "to") for r in policy.egress]
    if policy.policy_types != default_policy_types(policy.egress) or draw(st.booleans()):
        spec["policyTypes"] = list(policy.policy_types)
    elif draw(st.booleans()):
        spec["policyTypes"] = []
    meta: dict[str, Any] = {"name": policy.name, "namespace": policy.namespace}
    if policy.labels:
        meta["labels"] = dict(policy.labels)
    if policy.annotations:
        meta["annotations"] = dict(policy.annotations)
    return {"apiVersion": NETPOL_API, "kind": "NetworkPolicy", "metadata": meta, "spec": spec}


def namespace_manifest(ns: Namespace) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns.name, "labels": dict(ns.labels)}}


def pod_manifest(ep: Endpoint) -> dict[str, Any]:
    """A Pod whose decoding gives back `ep` (one container serving every port)."""
    ports = []
    for p in ep.ports:
        entry: dict[str, Any] = {"containerPort": p.port, "protocol": p.protocol}
        if p.name:
            entry["name"] = p.name
        ports.append(entry)
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": ep.name, "namespace": ep.namespace, "labels": dict(ep.labels)},
        "spec": {"containers": [{"name": "main", "image": "busybox", "ports": ports}]},
        "status": {"podIP": ep.ips[0], "podIPs": [{"ip": ip} for ip in ep.ips]},
    }


@st.composite
def cluster_manifests(draw: st.DrawFn, cluster: Cluster) -> list[dict[str, Any]]:
    """Every namespace, pod and policy of `cluster` as documents."""
    docs = [namespace_manifest(ns) for ns in cluster.namespaces]
    docs += [pod_manifest(ep) for ep in cluster.endpoints]
    docs += [draw(policy_manifests(p)) for p in cluster.policies]
    return docs
