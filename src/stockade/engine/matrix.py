"""The reachability matrix: the verdict of every ordered pair of pods, per port.

By default every table is computed on bitsets (`engine.reach`): a row of the
table is a few big-integer operations, so 1,000 pods on every declared port take
well under a second where asking the evaluator pair by pair took about 49 s
(`bench/policy_core.py`). The pairs can instead be judged through a `Judge`, a
plain function (`compute_matrix(cluster, ports, protocols, judge=evaluator_judge(
cluster))` is the reference evaluator); tests hold the two to the same tables.

ClusterNetworkPolicy tiers are part of the bitsets (`engine.reach` walks each
side's Admin rules, NetworkPolicy or Baseline rules, then the default, as masks),
so the tables stay exact, and as fast, with them.

With a judge, pods that no policy can tell apart (same namespace, labels, container ports, and
the same answers from every ipBlock and every ClusterNetworkPolicy `networks` CIDR) get the
same verdicts, so the judge is asked
once per pair of such classes, not once per pair of pods: replicas of a
Deployment cost one judgement, which keeps large clusters tractable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from stockade.engine.evaluate import Evaluator
from stockade.engine.match import ip_block_matches
from stockade.engine.reach import Reach, reachability
from stockade.engine.resolve import resolve
from stockade.model.cidr import parse_ip
from stockade.model.cluster import Cluster, Endpoint
from stockade.model.policy import TCP, IPBlock

# (source, destination, port number, protocol) -> allowed. Self pairs never reach it.
Judge = Callable[[Endpoint, Endpoint, int, str], bool]

# Probed when no port is asked for and no pod declares a container port.
FALLBACK_PORT = 80


@dataclass(frozen=True)
class MatrixPort:
    """One table of the matrix: a protocol and a port number or name."""

    protocol: str
    port: int | str  # a name is resolved on each destination pod

    def render(self) -> str:
        return f"{self.protocol}/{self.port}"


@dataclass(frozen=True)
class TruthTable:
    """Verdicts of one probe: `cells[i][j]` is pods[i] -> pods[j].

    None marks a destination that serves no port of that name and protocol: there
    is no such connection to judge.
    """

    probe: MatrixPort
    cells: tuple[tuple[bool | None, ...], ...]


@dataclass(frozen=True)
class Matrix:
    pods: tuple[str, ...]  # `namespace/name`, sorted
    tables: tuple[TruthTable, ...]


def evaluator_judge(cluster: Cluster) -> Judge:
    """The reference evaluator as a judge (it caches the policies selecting each pod)."""
    ev = Evaluator(cluster)

    def judge(src: Endpoint, dst: Endpoint, port: int, protocol: str) -> bool:
        return ev.allowed(ev.flow(src, dst, port, protocol))

    return judge


def served_probes(cluster: Cluster, protocols: Sequence[str] = ()) -> tuple[MatrixPort, ...]:
    """Every (protocol, port number) some pod declares, optionally only some protocols.

    Falls back to port 80 of each protocol asked for (TCP by default) when no pod
    declares a matching port, so the matrix is never empty.
    """
    wanted = set(protocols)
    found = {(p.protocol, p.port) for ep in cluster.endpoints for p in ep.ports
             if not wanted or p.protocol in wanted}
    if not found:
        return tuple(MatrixPort(proto, FALLBACK_PORT) for proto in (protocols or (TCP,)))
    return tuple(MatrixPort(proto, port) for proto, port in sorted(found))


def probes_for(cluster: Cluster, ports: Sequence[int | str],
               protocols: Sequence[str]) -> tuple[MatrixPort, ...]:
    """The tables to compute: each port with each protocol, or the ports pods serve."""
    if not ports:
        return served_probes(cluster, protocols)
    return tuple(MatrixPort(proto, port) for proto in (protocols or (TCP,)) for port in ports)


def pod_classes(cluster: Cluster, pods: Sequence[Endpoint]) -> list[int]:
    """A class number per pod: pods of one class are interchangeable for every policy.

    What a verdict can depend on besides identity: the namespace (and so its
    labels), the pod labels, the container ports (named ports), and for each
    ipBlock and each ClusterNetworkPolicy `networks` CIDR whether each of the pod's
    IPs, by family, is inside it.
    """
    blocks = _ip_blocks(cluster) + _networks(cluster)
    keys: dict[object, int] = {}
    out = []
    for ep in pods:
        ips = tuple((addr.version if (addr := parse_ip(ip)) else 0, ip) for ip in ep.ips)
        inside = tuple(tuple((v, ip_block_matches(b, ip)) for v, ip in ips) for b in blocks)
        key = (ep.namespace, ep.labels, ep.ports, inside)
        out.append(keys.setdefault(key, len(keys)))
    return out


def _ip_blocks(cluster: Cluster) -> tuple[IPBlock, ...]:
    found = {peer.ip_block for p in cluster.policies for r in p.ingress + p.egress
             for peer in r.peers if peer.ip_block is not None}
    return tuple(sorted(found, key=lambda b: (b.cidr, b.except_)))


def _networks(cluster: Cluster) -> tuple[IPBlock, ...]:
    """Each `networks` CIDR of the tiers, as an ipBlock without excepts."""
    found = {text for p in cluster.cluster_policies for r in p.ingress + p.egress
             for peer in r.peers for text in peer.networks}
    return tuple(IPBlock(text) for text in sorted(found))


def compute_matrix(cluster: Cluster, ports: Sequence[int | str] = (),
                   protocols: Sequence[str] = (), judge: Judge | None = None) -> Matrix:
    """The truth table of every probe; a pod talking to itself is always allowed.

    Without a judge, on bitsets; with one, pair of pod classes by pair.
    """
    pods = sorted(cluster.endpoints, key=lambda e: (e.namespace, e.name))
    probes = probes_for(cluster, ports, protocols)
    if judge is None:
        tables = bitset_tables(cluster, pods, probes)
    else:
        classes = pod_classes(cluster, pods)
        tables = tuple(_table(pods, classes, probe, judge) for probe in probes)
    return Matrix(tuple(e.key for e in pods), tables)


def bitset_tables(cluster: Cluster, pods: Sequence[Endpoint],
                  probes: Sequence[MatrixPort]) -> tuple[TruthTable, ...]:
    """Every table from `engine.reach`'s bitsets, over the pods in the given order.

    A named port gives one reachability per port number it resolves to, each
    read only in the columns of the destinations that serve that number.
    """
    ordered = replace(cluster, endpoints=tuple(pods))  # bit i is pods[i]
    res = resolve(ordered)
    n = len(pods)
    tables = []
    for probe in probes:
        numbers = [_port_number(dst, probe) for dst in pods]
        columns: dict[int, int] = {}  # port number -> destinations resolving to it
        for j, number in enumerate(numbers):
            if number is not None:
                columns[number] = columns.get(number, 0) | 1 << j
        parts = []
        for number, mask in columns.items():
            reach = reachability(ordered, number, probe.protocol, res)
            parts.append((reach, _admitted_by(reach, n), mask))
        served = sum(columns.values())
        rows: list[tuple[bool | None, ...]] = []
        for i in range(n):
            bits = (1 << i) & served  # a pod talking to itself
            for reach, admitted, mask in parts:
                bits |= reach.egress_ok[i] & admitted[i] & mask
            text = format(bits, f"0{n}b")[::-1] if n else ""  # text[j]: column j
            if served == (1 << n) - 1:
                rows.append(tuple(map("1".__eq__, text)))
            else:
                rows.append(tuple(None if numbers[j] is None else c == "1"
                                  for j, c in enumerate(text)))
        tables.append(TruthTable(probe, tuple(rows)))
    return tuple(tables)


def _admitted_by(reach: Reach, n: int) -> list[int]:
    """Per source, the destinations whose ingress admits it (`ingress_ok` transposed).

    Destinations share few distinct ingress bitsets (one per policy set), so the
    transposition walks each distinct bitset once.
    """
    by_value: dict[int, int] = {}
    for d, ok in enumerate(reach.ingress_ok):
        by_value[ok] = by_value.get(ok, 0) | 1 << d
    out = [0] * n
    for ok, dests in by_value.items():
        text = format(ok, f"0{n}b")[::-1] if n else ""
        start = text.find("1")
        while start != -1:
            out[start] |= dests
            start = text.find("1", start + 1)
    return out


def _table(pods: list[Endpoint], classes: list[int], probe: MatrixPort, judge: Judge) -> TruthTable:
    # A named port resolves once per destination, not once per pair.
    numbers = [_port_number(dst, probe) for dst in pods]
    seen: dict[tuple[int, int], bool] = {}
    rows = []
    for i, src in enumerate(pods):
        row: list[bool | None] = []
        for j, dst in enumerate(pods):
            number = numbers[j]
            if number is None:
                row.append(None)
            elif i == j:
                row.append(True)
            else:
                # Two different pods: any other two of the same classes get this verdict.
                pair = (classes[i], classes[j])
                if pair not in seen:
                    seen[pair] = judge(src, dst, number, probe.protocol)
                row.append(seen[pair])
        rows.append(tuple(row))
    return TruthTable(probe, tuple(rows))


def _port_number(dst: Endpoint, probe: MatrixPort) -> int | None:
    if isinstance(probe.port, int):
        return probe.port
    return dst.resolve_port(probe.port, probe.protocol)
