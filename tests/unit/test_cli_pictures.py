"""The pictures of `stockade list|matrix|diff -o dot|svg|png` and `matrix -o heatmap`
on the example set (examples/: the README's small shop), drawn by graphviz.

The SVG's nodes and edges are read from graphviz's own `<title>` elements (a node's
is its ID, an edge's `src->dst`) and compared with what `-o txt` lists.
"""

from __future__ import annotations

import os
import pty
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from tests.support.png import read_png

from stockade.cli.main import main
from stockade.engine.heatmap import ALLOWED, DENIED, layout

ROOT = Path(__file__).resolve().parents[2]
EX = ROOT / "examples"
CLUSTER, V1, V2 = (str(EX / f) for f in ("cluster.yaml", "policies.yaml", "policies-v2.yaml"))
SVG = "{http://www.w3.org/2000/svg}"
needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="graphviz's dot is not installed")


def run(capsysbinary: pytest.CaptureFixture[bytes], *argv: str) -> tuple[int, bytes]:
    code = main(list(argv))
    out, _ = capsysbinary.readouterr()
    return code, out


def svg_graph(data: bytes) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """Nodes (title -> label) and edges (title -> (label, stroke colour)) of an SVG."""
    root = ET.fromstring(data)
    nodes, edges = {}, {}
    for g in root.iter(f"{SVG}g"):
        title = g.findtext(f"{SVG}title") or ""
        text = "\n".join(t.text or "" for t in g.iter(f"{SVG}text"))
        if g.get("class") == "node":
            nodes[title] = text
        elif g.get("class") == "edge":
            path = g.find(f"{SVG}path")
            edges[title] = (text, path.get("stroke", "") if path is not None else "")
    return nodes, edges


@needs_dot
def test_the_svg_of_the_example_set_has_its_peers_and_connections(
        capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    code, listed = run(capsysbinary, "list", "-f", CLUSTER, V1, "-o", "txt")
    assert code == 0
    lines = [line.split(" : ") for line in listed.decode().splitlines()]
    expected = {f"{pair.replace(' => ', '->')}": conns for pair, conns in lines}
    code, data = run(capsysbinary, "list", "-f", CLUSTER, V1, "-o", "svg")
    assert code == 0
    nodes, edges = svg_graph(data)
    workloads = {"frontend/web[Pod]", "frontend/admin[Pod]", "backend/api[Pod]",
                 "backend/worker[Pod]", "db/postgres[Pod]", "monitoring/prometheus[Pod]",
                 "kube-system/coredns[Pod]"}
    ranges = {"0.0.0.0-192.167.255.255[External]", "192.168.0.0-192.168.255.255[External]",
              "192.169.0.0-255.255.255.255[External]", "0.0.0.0-255.255.255.255[External]"}
    assert set(nodes) == workloads | ranges
    assert nodes["frontend/web[Pod]"] == "web[Pod]"
    assert nodes["192.168.0.0-192.168.255.255[External]"] == "192.168.0.0/16"
    assert set(edges) == set(expected) and len(edges) == 39
    assert {title: label for title, (label, _) in edges.items()} == \
        {pair: "all" if conns == "All Connections" else conns
         for pair, conns in expected.items()}
    # What the policies allow, as the examples' README says.
    assert edges["frontend/web[Pod]->backend/api[Pod]"][0] == "TCP 8000"
    assert edges["backend/api[Pod]->db/postgres[Pod]"][0] == "TCP 5432"
    assert edges["monitoring/prometheus[Pod]->backend/worker[Pod]"][0] == "TCP 9100"
    assert "frontend/admin[Pod]->backend/api[Pod]" not in edges
    assert "backend/worker[Pod]->db/postgres[Pod]" not in edges
    # Namespaces are boxes.
    titles = [t.text for t in ET.fromstring(data).iter(f"{SVG}title")]
    clusters = [g.findtext(f"{SVG}text") for g in ET.fromstring(data).iter(f"{SVG}g")
                if g.get("class") == "cluster"]
    assert sorted(clusters) == ["backend", "db", "frontend", "kube-system", "monitoring"]
    assert titles.count("cluster_1") == 1


@needs_dot
def test_grouped_by_namespace(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    code, data = run(capsysbinary, "list", "-f", CLUSTER, V1, "-o", "svg",
                     "--group-by", "namespace")
    assert code == 0
    nodes, edges = svg_graph(data)
    assert {n for n in nodes if "[External]" not in n} == \
        {"backend", "db", "frontend", "kube-system", "monitoring"}
    assert edges["frontend->backend"][0] == "TCP 8000\n(1 of 4 pairs)"
    assert edges["monitoring->backend"][0] == "TCP 9090,9100\n(union over 2 of 2 pairs)"
    assert edges["backend->kube-system"][0] == "TCP 53,UDP 53"
    assert edges["frontend->frontend"][0] == "all"


@needs_dot
def test_matrix_and_diff_pictures(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    code, data = run(capsysbinary, "matrix", "-f", CLUSTER, V1, "--port", "8000",
                     "--port", "5432", "-o", "svg")
    assert code == 0
    _, edges = svg_graph(data)
    assert edges["frontend/web->backend/api"][0] == "TCP/8000"
    assert edges["backend/api->db/postgres"][0] == "TCP/5432"
    assert edges["frontend/web->frontend/admin"][0] == "all"
    assert "frontend/admin->backend/api" not in edges
    code, data = run(capsysbinary, "diff", "-f", CLUSTER, V1, "--against", V2, "-o", "svg")
    assert code == 1  # differences, as with text
    _, edges = svg_graph(data)
    assert edges == {
        "backend/worker->db/postgres": ("+ TCP 5432", "#1a7f37"),
        "frontend/admin->backend/api": ("+ TCP 8000", "#1a7f37"),
        "monitoring/prometheus->backend/api": ("- TCP 9090", "#cf222e"),
        "monitoring/prometheus->backend/worker": ("- TCP 9100", "#cf222e"),
    }
    code, data = run(capsysbinary, "diff", "-f", CLUSTER, V1, "--against", V2, "-o", "png")
    assert code == 1 and data.startswith(b"\x89PNG\r\n\x1a\n")


def test_dot_needs_no_graphviz_and_svg_says_it_does(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # no dot on it
    argv = [sys.executable, "-m", "stockade.cli.main", "list", "-f", CLUSTER, V1]
    done = subprocess.run([*argv, "-o", "dot"], env=env, capture_output=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.startswith(b'digraph "stockade list" {')
    done = subprocess.run([*argv, "-o", "svg"], env=env, capture_output=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, b"")
    assert done.stderr.decode() == ("stockade: graphviz's dot is needed for -o svg; install "
                                    "graphviz (apt-get install graphviz), or use -o dot\n")


def test_a_png_is_not_written_to_a_terminal() -> None:
    leader, terminal = pty.openpty()
    try:
        done = subprocess.run([sys.executable, "-m", "stockade.cli.main", "matrix", "-f",
                               CLUSTER, V1, "-o", "heatmap"], stdout=terminal,
                              stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(terminal)
        os.close(leader)
    assert done.returncode == 2
    assert "redirect standard output to a file" in done.stderr.decode()


def test_the_heatmap_is_the_matrix(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    code, data = run(capsysbinary, "matrix", "-f", CLUSTER, V1, "--port", "8000",
                     "-o", "heatmap")
    assert code == 0
    picture = read_png(data)
    pods = ["backend/api", "backend/worker", "db/postgres", "frontend/admin", "frontend/web",
            "kube-system/coredns", "monitoring/prometheus"]
    place = layout(pods)
    assert picture.width == picture.height == place.side

    def cell(src: str, dst: str) -> int:
        return picture.at(place.starts[pods.index(dst)], place.starts[pods.index(src)])

    assert cell("frontend/web", "backend/api") == ALLOWED
    assert cell("frontend/admin", "backend/api") == DENIED
    assert cell("backend/api", "frontend/web") == DENIED  # backend's egress is isolated
    assert cell("backend/worker", "backend/worker") == ALLOWED


def test_a_filtered_picture_draws_what_the_filter_shows(
        capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    code, data = run(capsysbinary, "list", "-f", CLUSTER, V1, "-n", "backend", "-o", "dot")
    assert code == 0
    text = data.decode()
    edges = {line.split(" [")[0].strip() for line in text.splitlines() if " -> " in line}
    assert edges == {
        '"backend/api[Pod]" -> "db/postgres[Pod]"',
        '"backend/api[Pod]" -> "kube-system/coredns[Pod]"',
        '"backend/worker[Pod]" -> "kube-system/coredns[Pod]"',
        '"frontend/web[Pod]" -> "backend/api[Pod]"',
        '"monitoring/prometheus[Pod]" -> "backend/api[Pod]"',
        '"monitoring/prometheus[Pod]" -> "backend/worker[Pod]"',
    }
    assert '"frontend/admin[Pod]"' not in text and "[External]" not in text
