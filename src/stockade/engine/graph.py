"""Graphviz pictures of `list`, `matrix` and `diff` (pure: DOT text, no I/O).

A picture is a `Graph` of nodes and edges, rendered as DOT text by `render_dot`
(the CLI hands that text to graphviz's `dot` for SVG or PNG):

* a node per peer: a workload or pod (inside a box per namespace), or an external
  address range (a distinct shape, outside every namespace);
* an edge per ordered pair with something allowed (or, for `diff`, changed),
  labelled with what: the connections as `list` writes them, or the probed ports
  of `matrix`; an edge that allows everything is labelled `all`;
* grouped by namespace, the peers of a namespace are one node and an edge is the
  union of its pairs' connections; when not every pair of peers of the two
  groups allows exactly that, the edge is dashed and its label says how many
  pairs allow something (`3 of 4 pairs`), and `union over` when those differ.

Every name comes from user files, so every ID and label goes through `quote`:
nothing in a name can end the quoted string, start a graphviz escape (`\\N`,
`\\l`) or an entity (`&lt;`), or add a line to the DOT text. Nodes, edges and
namespaces are sorted, so the same input gives the same text.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from stockade.engine.connectivity import Connections, ConnList
from stockade.engine.diff import OPENED, PolicyDiff
from stockade.engine.matrix import Matrix

WORKLOAD = "workload"
NAMESPACE = "namespace"
GROUPINGS = (WORKLOAD, NAMESPACE)

ALL = "all"
OPENED_COLOUR = "#1a7f37"
CLOSED_COLOUR = "#cf222e"
ALL_COLOUR = "#8c959f"
EXTERNAL_SUFFIX = "[External]"

V = TypeVar("V")


@dataclass(frozen=True)
class Node:
    id: str  # unique in the graph; the peer's full name, or the namespace's
    label: str
    namespace: str = ""  # the box it is drawn in; "" outside every box
    external: bool = False  # an address range
    group: bool = False  # a namespace standing for its peers


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    label: str
    everything: bool = False
    partial: bool = False  # only some pairs of the two groups allow all of the label
    colour: str = ""


@dataclass(frozen=True)
class Graph:
    title: str
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]


# ---- DOT text ---------------------------------------------------------------------------


def _safe_char(c: str) -> str:
    if c == "\\":
        return "\\\\"
    if c == '"':
        return '\\"'
    if c == "&":  # graphviz reads entities in labels: `&lt;` would show as `<`
        return "&amp;"
    if c == "\n":
        return "\\n"
    code = ord(c)
    if code < 0x20 or 0x7F <= code < 0xA0 or 0xD800 <= code < 0xE000:
        # Control characters (invalid in SVG's XML) and lone surrogates (not UTF-8).
        return "\N{REPLACEMENT CHARACTER}"
    return c


def quote(text: str) -> str:
    """`text` as a DOT quoted string that reads back as `text` (control characters
    shown as U+FFFD, a newline as a line break)."""
    return '"' + "".join(map(_safe_char, text)) + '"'


def _attrs(**values: str) -> str:
    return "[" + ", ".join(f"{k}={quote(v)}" for k, v in values.items() if v) + "]"


def render_dot(graph: Graph) -> str:
    """The graph as DOT text: namespaces as boxes (`cluster_N` subgraphs)."""
    lines = [
        f"digraph {quote(graph.title)} {{",
        "  rankdir=LR;",
        "  graph [fontname=\"Helvetica\", fontsize=11, labelloc=t, "
        f"label={quote(graph.title)}];",
        "  node [fontname=\"Helvetica\", fontsize=10];",
        "  edge [fontname=\"Helvetica\", fontsize=9];",
    ]
    boxes: dict[str, list[Node]] = {}
    for node in sorted(graph.nodes, key=lambda n: (n.namespace, n.id)):
        boxes.setdefault(node.namespace, []).append(node)
    for i, (namespace, nodes) in enumerate(sorted(boxes.items())):
        indent = "  "
        if namespace:
            lines.append(f"  subgraph cluster_{i} {{")
            lines.append(f"    label={quote(namespace)}; style=\"rounded\"; color=\"#8c959f\";")
            indent = "    "
        lines.extend(f"{indent}{quote(n.id)} {_node_attrs(n)};" for n in nodes)
        if namespace:
            lines.append("  }")
    for e in sorted(graph.edges, key=lambda e: (e.src, e.dst, e.colour, e.label)):
        lines.append(f"  {quote(e.src)} -> {quote(e.dst)} {_edge_attrs(e)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _node_attrs(node: Node) -> str:
    if node.external:
        return _attrs(label=node.label, shape="hexagon", style="filled", fillcolor="#fff1d6")
    if node.group:
        return _attrs(label=node.label, shape="folder", style="filled", fillcolor="#dbe9f9")
    return _attrs(label=node.label, shape="box", style="rounded,filled", fillcolor="#eef4fb")


def _edge_attrs(edge: Edge) -> str:
    # What policies restrict stands out; an edge allowing everything stays in the back.
    colour = edge.colour or (ALL_COLOUR if edge.everything else "")
    return _attrs(label=edge.label, color=colour, fontcolor=colour,
                  style="dashed" if edge.partial else "",
                  penwidth="1" if edge.everything else "1.6")


# ---- peers and groups -------------------------------------------------------------------


def _split(name: str) -> tuple[str, str]:
    """(namespace, the rest) of `ns/name...`."""
    namespace, _, rest = name.partition("/")
    return namespace, rest


def _range_label(name: str) -> str:
    """An external range as a CIDR when it is one (`192.168.0.0/16`), else as written."""
    text = name.removesuffix(EXTERNAL_SUFFIX)
    first, sep, last = text.partition("-")
    try:
        nets = list(ipaddress.summarize_address_range(ipaddress.ip_address(first),
                                                      ipaddress.ip_address(last)))
    except (ValueError, TypeError):
        return text
    return str(nets[0]) if sep and len(nets) == 1 else text


@dataclass(frozen=True)
class _Peers:
    """The nodes of a picture and the group of every peer (itself, or its namespace)."""

    nodes: tuple[Node, ...]
    group_of: Mapping[str, str]
    sizes: Mapping[str, int]


def _peers(peers: Iterable[str], external: Iterable[str], group_by: str) -> _Peers:
    """Workloads (or pods) are `ns/name`; every other peer is an address range."""
    if group_by not in GROUPINGS:
        raise ValueError(f"group_by: {group_by!r} is not one of {GROUPINGS}")
    nodes: dict[str, Node] = {}
    group_of: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for name in sorted(set(peers)):
        namespace, short = _split(name)
        group = namespace if group_by == NAMESPACE else name
        group_of[name] = group
        sizes[group] = sizes.get(group, 0) + 1
        if group_by == NAMESPACE:
            nodes[group] = Node(group, group, group=True)
        else:
            nodes[name] = Node(name, short, namespace)
    for name in sorted(set(external) - set(group_of)):
        group_of[name] = name
        sizes[name] = 1
        nodes[name] = Node(name, _range_label(name), external=True)
    return _Peers(tuple(nodes.values()), group_of, sizes)


def _grouped_edges(peers: _Peers, pairs: Iterable[tuple[str, str, V]],
                   union: Callable[[V, V], V], label: Callable[[V], str],
                   everything: Callable[[V], bool], colour: str = "",
                   prefix: str = "") -> list[Edge]:
    """One edge per pair of groups: the union of its pairs' values (`pairs` has at
    most one entry per pair of peers). Partial when not every pair of peers of the
    two groups (a peer never paired with itself) has the same value: the label then
    says how many pairs have one, and whether it is a union of different values."""
    merged: dict[tuple[str, str], list[V]] = {}
    for src, dst, value in pairs:
        key = (peers.group_of[src], peers.group_of[dst])
        merged.setdefault(key, []).append(value)
    edges = []
    for (src, dst), values in merged.items():
        total = peers.sizes[src] * peers.sizes[dst] - (peers.sizes[src] if src == dst else 0)
        union_value = values[0]
        for value in values[1:]:
            union_value = union(union_value, value)
        alike = all(value == union_value for value in values)
        text = prefix + (ALL if everything(union_value) else label(union_value))
        partial = len(values) < total or not alike
        if partial:
            text += f"\n({'' if alike else 'union over '}{len(values)} of {total} pairs)"
        edges.append(Edge(src, dst, text, everything(union_value), partial, colour))
    return edges


# ---- the three pictures -----------------------------------------------------------------


def list_graph(result: ConnList, peers: Sequence[str], group_by: str = WORKLOAD,
               shown: Collection[str] | None = None) -> Graph:
    """`stockade list`'s connections. `peers`: every workload's name (`ns/name[Kind]`),
    so that one with no connection is drawn too; every other name is a range.
    `shown`: when the connections are filtered, the peers to draw besides the ends
    of the edges (None: all)."""
    ranges = [r.render() for r in (*result.sources, *result.destinations)]
    names = {n for c in result.connections for n in (c.src, c.dst)}
    found = _peers(peers, names.union(ranges) - set(peers), group_by)
    edges = _grouped_edges(found, ((c.src, c.dst, c.connections) for c in result.connections),
                           Connections.union, Connections.render, _everything)
    return _graph("stockade list", found, edges, shown)


def _graph(title: str, found: _Peers, edges: Sequence[Edge],
           shown: Collection[str] | None) -> Graph:
    """The graph of the edges, with the nodes of `shown` peers and of the edges' ends."""
    nodes = found.nodes
    if shown is not None:
        kept = {found.group_of.get(name, name) for name in shown}
        kept.update(n for e in edges for n in (e.src, e.dst))
        nodes = tuple(n for n in nodes if n.id in kept)
    return Graph(title, nodes, tuple(edges))


def _everything(value: Connections) -> bool:
    return value.everything


def matrix_graph(matrix: Matrix, group_by: str = WORKLOAD) -> Graph:
    """`stockade matrix`'s allowed pairs (a pod with itself left out), each edge
    labelled with the probes that allow it; `all` when every probe does (of two or
    more: with one probe, the label is the probe)."""
    probes = tuple(t.probe.render() for t in matrix.tables)
    order = {p: i for i, p in enumerate(probes)}
    allowed: dict[tuple[int, int], set[str]] = {}
    for table, probe in zip(matrix.tables, probes, strict=True):
        for i, cells in enumerate(table.cells):
            for j, cell in enumerate(cells):
                if cell and i != j:
                    allowed.setdefault((i, j), set()).add(probe)
    found = _peers(matrix.pods, (), group_by)
    pairs = ((matrix.pods[i], matrix.pods[j], frozenset(v)) for (i, j), v in allowed.items())
    every = frozenset(probes)

    def label(value: frozenset[str]) -> str:
        return ", ".join(sorted(value, key=order.__getitem__))

    def everything(value: frozenset[str]) -> bool:
        return len(every) > 1 and value == every

    edges = _grouped_edges(found, pairs, frozenset.union, label, everything)
    title = f"stockade matrix ({ALL} = {', '.join(probes)})" if len(probes) > 1 \
        else f"stockade matrix ({probes[0] if probes else 'no probe'})"
    return Graph(title, found.nodes, tuple(edges))


def diff_graph(result: PolicyDiff, peers: Sequence[str], group_by: str = WORKLOAD,
               shown: Collection[str] | None = None) -> Graph:
    """`stockade diff`'s changes: opened connections as green edges (`+`), closed
    ones as red edges (`-`). `peers`: the pods and workloads (`ns/name`), every
    other name is an external range; `shown` as for `list_graph`."""
    names = {n for c in result.changes for n in (c.src, c.dst)}
    found = _peers(peers, names - set(peers), group_by)
    edges: list[Edge] = []
    for opened, colour in ((True, OPENED_COLOUR), (False, CLOSED_COLOUR)):
        changed: dict[tuple[str, str], Connections] = {}
        for c in result.changes:
            if (c.change == OPENED) is opened:
                conns = Connections.of({p.protocol: [(r.low, r.high) for r in p.ranges]
                                        for p in c.ports})
                key = (c.src, c.dst)
                changed[key] = changed[key].union(conns) if key in changed else conns
        edges += _grouped_edges(found, ((s, d, v) for (s, d), v in changed.items()),
                                Connections.union, Connections.render, _everything,
                                colour, "+ " if opened else "- ")
    return _graph("stockade diff (+ opened, - closed)", found, edges, shown)
