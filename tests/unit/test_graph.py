"""engine.graph: the DOT pictures of list, matrix and diff (pure), and what graphviz
makes of their hostile names."""

from __future__ import annotations

import itertools
import random
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

from stockade.engine.connectivity import (
    ALL_CONNECTIONS,
    AddressRange,
    Connection,
    Connections,
    ConnList,
)
from stockade.engine.diff import CLOSED, OPENED, Change, PolicyDiff, PortRange, PortSet
from stockade.engine.graph import (
    ALL,
    CLOSED_COLOUR,
    NAMESPACE,
    OPENED_COLOUR,
    Edge,
    Graph,
    diff_graph,
    list_graph,
    matrix_graph,
    quote,
    render_dot,
)
from stockade.engine.matrix import Matrix, MatrixPort, TruthTable

SVG = "{http://www.w3.org/2000/svg}"
TCP80 = Connections.of({"TCP": [(80, 80)]})
UDP53 = Connections.of({"UDP": [(53, 53)]})
QUOTED = re.compile(r'"(?:[^"\\\n]|\\.)*"')
HOSTILE = [
    'a"b', "back\\", "two\nlines", "\\N\\G\\l", "&lt;b&gt;", '"]; evil -> x; "',
    "tab\tbell\x07", "<html>", "über", "x\ud800y",
]


def unquote(text: str) -> str:
    """A DOT quoted string as graphviz shows it as a label (\\n a line break, entities)."""
    assert QUOTED.fullmatch(text), text
    out = re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), text[1:-1])
    return out.replace("&amp;", "&")


def edges_of(graph: Graph) -> dict[tuple[str, str], Edge]:
    return {(e.src, e.dst): e for e in graph.edges}


def conn_list(*pairs: tuple[str, str, Connections]) -> ConnList:
    return ConnList(tuple(Connection(s, d, c) for s, d, c in pairs))


# ---- escaping ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", HOSTILE)
def test_quote_gives_one_closed_string_that_reads_back(name: str) -> None:
    quoted = quote(name)
    assert QUOTED.fullmatch(quoted)  # one string: no unescaped quote, no raw newline
    shown = unquote(quoted)
    expected = "".join("\N{REPLACEMENT CHARACTER}" if (ord(c) < 0x20 and c != "\n")
                       or 0xD800 <= ord(c) < 0xE000 else c for c in name)
    assert shown == expected
    quoted.encode()  # valid UTF-8 for dot's standard input


def test_hostile_names_add_no_line_and_no_statement() -> None:
    names = [f"ns/{n}[Pod]" for n in HOSTILE]
    result = conn_list(*((a, b, TCP80) for a, b in itertools.pairwise(names)))
    text = render_dot(list_graph(result, names))
    body = [line for line in text.splitlines() if line.startswith("    \"")
            or " -> " in line]
    # One line per node, one per edge; every quoted string closed on its line.
    assert len(body) == len(names) + len(names) - 1
    for line in body:
        rest = QUOTED.sub("S", line)
        assert re.fullmatch(r"\s*S( -> S)? \[(\w+=S(, )?)+\];", rest), line
    assert text.count("\n") == len(text.splitlines())


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot is not installed")
def test_graphviz_draws_each_hostile_name_as_one_node_labelled_with_it() -> None:
    names = [f"ns/{n}" for n in HOSTILE]
    result = conn_list((names[0], names[1], TCP80))
    svg = subprocess.run(["dot", "-Tsvg"], input=render_dot(list_graph(result, names)).encode(),
                         capture_output=True, check=True, timeout=60).stdout
    root = ET.fromstring(svg)
    nodes = [g for g in root.iter(f"{SVG}g") if g.get("class") == "node"]
    edges = [g for g in root.iter(f"{SVG}g") if g.get("class") == "edge"]
    assert len(nodes) == len(names) and len(edges) == 1
    labels = sorted("\n".join(t.text or "" for t in g.iter(f"{SVG}text")) for g in nodes)
    assert labels == sorted(unquote(quote(n.split("/", 1)[1])) for n in names)


# ---- list -------------------------------------------------------------------------------


def test_an_edge_allowing_everything_is_labelled_all() -> None:
    every_tcp = Connections.of({"TCP": [(1, 65535)]})
    graph = list_graph(conn_list(("a/x[Pod]", "a/y[Pod]", ALL_CONNECTIONS),
                                 ("a/y[Pod]", "a/x[Pod]", every_tcp)), ["a/x[Pod]", "a/y[Pod]"])
    edges = edges_of(graph)
    assert edges["a/x[Pod]", "a/y[Pod]"].label == ALL
    assert edges["a/x[Pod]", "a/y[Pod]"].everything
    assert edges["a/y[Pod]", "a/x[Pod]"].label == "TCP 1-65535"  # only TCP: not all
    assert not edges["a/y[Pod]", "a/x[Pod]"].everything


def test_workloads_are_boxed_by_namespace_and_ranges_are_external() -> None:
    rng = AddressRange(0, 2**32 - 1)
    result = ConnList((Connection("a/x[Deployment]", rng.render(), UDP53),),
                      destinations=(rng, AddressRange(10, 20)))
    graph = list_graph(result, ["a/x[Deployment]", "b/lonely[Pod]"])
    nodes = {n.id: n for n in graph.nodes}
    assert set(nodes) == {"a/x[Deployment]", "b/lonely[Pod]", rng.render(),
                          AddressRange(10, 20).render()}
    assert (nodes["a/x[Deployment]"].namespace, nodes["a/x[Deployment]"].label) == \
        ("a", "x[Deployment]")
    assert nodes[rng.render()].external and nodes[rng.render()].label == "0.0.0.0/0"
    assert nodes[AddressRange(10, 20).render()].label == "0.0.0.10-0.0.0.20"
    assert not nodes["b/lonely[Pod]"].external  # drawn although nothing reaches it
    text = render_dot(graph)
    assert 'subgraph cluster_1 {\n    label="a";' in text
    assert '"a/x[Deployment]" -> "0.0.0.0-255.255.255.255[External]" [label="UDP 53"' in text


def test_grouped_by_namespace_an_edge_is_the_union_and_says_when_partial() -> None:
    peers = ["a/a1[Pod]", "a/a2[Pod]", "b/b1[Pod]"]
    rng = "1.0.0.0-1.255.255.255[External]"
    result = conn_list(
        ("a/a1[Pod]", "b/b1[Pod]", TCP80), ("a/a2[Pod]", "b/b1[Pod]", TCP80),  # every pair
        ("a/a1[Pod]", "a/a2[Pod]", ALL_CONNECTIONS),  # 1 of the 2 pairs inside a
        ("b/b1[Pod]", "a/a1[Pod]", TCP80), ("b/b1[Pod]", "a/a2[Pod]", UDP53),  # different
        (rng, "a/a2[Pod]", ALL_CONNECTIONS),
    )
    graph = list_graph(result, peers, NAMESPACE)
    assert {(n.id, n.group, n.external) for n in graph.nodes} == \
        {("a", True, False), ("b", True, False), (rng, False, True)}
    edges = edges_of(graph)
    assert (edges["a", "b"].label, edges["a", "b"].partial) == ("TCP 80", False)
    assert (edges["a", "a"].label, edges["a", "a"].partial) == (f"{ALL}\n(1 of 2 pairs)", True)
    assert edges["b", "a"].label == "TCP 80,UDP 53\n(union over 2 of 2 pairs)"
    assert edges["b", "a"].partial
    assert edges[rng, "a"].label == f"{ALL}\n(1 of 2 pairs)"
    assert 'style="dashed"' in render_dot(graph).split('"a" -> "a"')[1].splitlines()[0]


def test_same_input_in_any_order_gives_the_same_text() -> None:
    peers = [f"ns{i % 3}/w{i}[Pod]" for i in range(12)]
    conns = [Connection(a, b, TCP80 if (i + j) % 2 else ALL_CONNECTIONS)
             for i, a in enumerate(peers) for j, b in enumerate(peers) if (i * j) % 5 == 1]
    texts = set()
    for seed in range(5):
        shuffled = list(conns)
        random.Random(seed).shuffle(shuffled)
        order = list(peers)
        random.Random(seed + 1).shuffle(order)
        for group_by in ("workload", NAMESPACE):
            texts.add((group_by, render_dot(list_graph(ConnList(tuple(shuffled)), order,
                                                      group_by))))
    assert len(texts) == 2


def test_an_unknown_grouping_is_refused() -> None:
    with pytest.raises(ValueError, match="group_by"):
        list_graph(conn_list(), [], "pod")


# ---- matrix -----------------------------------------------------------------------------


def test_matrix_edges_merge_the_probes_and_all_means_every_probe() -> None:
    pods = ("a/p", "a/q", "b/r")
    t, f, n = True, False, None
    tables = (
        TruthTable(MatrixPort("TCP", 80), ((t, t, t), (f, t, f), (t, f, t))),
        TruthTable(MatrixPort("UDP", 53), ((t, t, f), (f, t, f), (f, f, t))),
        TruthTable(MatrixPort("TCP", "http"), ((t, t, n), (t, t, n), (t, f, n))),
    )
    graph = matrix_graph(Matrix(pods, tables))
    edges = {k: e.label for k, e in edges_of(graph).items()}
    assert edges == {("a/p", "a/q"): ALL, ("a/p", "b/r"): "TCP/80",
                     ("a/q", "a/p"): "TCP/http", ("b/r", "a/p"): "TCP/80, TCP/http"}
    assert graph.title == "stockade matrix (all = TCP/80, UDP/53, TCP/http)"
    grouped = edges_of(matrix_graph(Matrix(pods, tables), NAMESPACE))
    assert grouped["a", "a"].label == f"{ALL}\n(union over 2 of 2 pairs)"
    assert grouped["a", "b"].label == "TCP/80\n(1 of 2 pairs)"


# ---- diff -------------------------------------------------------------------------------


def change(kind: str, src: str, dst: str, *ports: tuple[str, int, int]) -> Change:
    return Change(kind, src, dst, tuple(PortSet(p, (PortRange(lo, hi),)) for p, lo, hi in ports),
                  "by NetworkPolicy a/x ingress[0]")


def test_diff_opened_edges_are_green_and_closed_ones_red() -> None:
    everything = [(p, 1, 65535) for p in ("SCTP", "TCP", "UDP")]
    result = PolicyDiff((
        change(OPENED, "a/p", "b/r", ("TCP", 443, 443)),
        change(OPENED, "a/p", "b/r", ("TCP", 8000, 8100), ("UDP", 53, 53)),  # another reason
        change(CLOSED, "a/p", "b/r", ("TCP", 5432, 5432)),
        change(OPENED, "a/q", "192.168.0.0/16", *everything),
    ))
    graph = diff_graph(result, ["a/p", "a/q", "b/r", "b/idle"])
    by = {(e.src, e.dst, e.colour): e for e in graph.edges}
    assert by["a/p", "b/r", OPENED_COLOUR].label == "+ TCP 443,8000-8100,UDP 53"
    assert by["a/p", "b/r", CLOSED_COLOUR].label == "- TCP 5432"
    assert by["a/q", "192.168.0.0/16", OPENED_COLOUR].label == f"+ {ALL}"
    assert len(graph.edges) == 3
    nodes = {n.id: n for n in graph.nodes}
    assert nodes["192.168.0.0/16"].external and "b/idle" in nodes
    text = render_dot(graph)
    assert f'"a/p" -> "b/r" [label="- TCP 5432", color="{CLOSED_COLOUR}"' in text
    grouped = {(e.src, e.dst, e.colour): e.label
               for e in diff_graph(result, ["a/p", "a/q", "b/r", "b/idle"], NAMESPACE).edges}
    assert grouped["a", "b", CLOSED_COLOUR] == "- TCP 5432\n(1 of 4 pairs)"
    assert grouped["a", "b", OPENED_COLOUR] == "+ TCP 443,8000-8100,UDP 53\n(1 of 4 pairs)"


def test_when_filtered_only_the_shown_peers_and_the_ends_of_edges_are_drawn() -> None:
    peers = ["a/x[Pod]", "a/y[Pod]", "b/z[Pod]", "c/w[Pod]"]
    rng = AddressRange(0, 2**32 - 1)
    result = ConnList((Connection("b/z[Pod]", "a/x[Pod]", TCP80),), sources=(rng,))
    drawn = list_graph(result, peers, shown=["a/x[Pod]", "a/y[Pod]"])
    assert {n.id for n in drawn.nodes} == {"a/x[Pod]", "a/y[Pod]", "b/z[Pod]"}
    grouped = list_graph(result, peers, NAMESPACE, shown=["a/x[Pod]"])
    assert {n.id for n in grouped.nodes} == {"a", "b"}
    assert edges_of(grouped)["b", "a"].label == "TCP 80\n(1 of 2 pairs)"
    assert len(list_graph(result, peers).nodes) == 5  # unfiltered: every peer and range
