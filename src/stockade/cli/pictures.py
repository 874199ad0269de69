"""Pictures on stdout: `-o dot|svg|png` of list, matrix and diff, `matrix -o heatmap`.

The pictures are drawn by the pure `engine.graph` (DOT text) and `engine.heatmap`
(a PNG); here graphviz's `dot` turns DOT text into SVG or PNG, and the result is
written to stdout. `dot` runs without a shell, from an argument list, with a
timeout; when it is missing the error says what to install (exit 2).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

from stockade.engine.graph import GROUPINGS, WORKLOAD, Graph, render_dot
from stockade.errors import StockadeError

PICTURE_FORMATS = ("dot", "svg", "png")
HEATMAP = "heatmap"
DOT_TIMEOUT = 120.0
# Beyond this many edges a graph takes dot minutes and nobody can read it.
LARGE_GRAPH = 2000


class PictureError(StockadeError):
    """A picture that cannot be made here (graphviz missing or failing, a terminal)."""


def add_group_by(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group-by", choices=GROUPINGS, default=WORKLOAD,
                   help="with -o dot|svg|png: a node per workload (default) or per "
                        "namespace (an edge is then the union of its pairs)")


def emit_graph(graph: Graph, output: str, prog: str = "stockade") -> None:
    """The graph on stdout: DOT text, or SVG or PNG drawn by graphviz's dot."""
    if output not in PICTURE_FORMATS:
        raise ValueError(f"output: {output!r} is not one of {PICTURE_FORMATS}")
    text = render_dot(graph)
    if output == "dot":
        sys.stdout.write(text)
        return
    if len(graph.edges) > LARGE_GRAPH:
        print(f"{prog}: note: {len(graph.edges)} edges: dot may take long to draw them; "
              "--group-by namespace (or `stockade matrix -o heatmap`) draws large "
              "clusters", file=sys.stderr)
    write_binary(render(text, output), output)


def render(dot_text: str, output: str, timeout: float = DOT_TIMEOUT) -> bytes:
    """DOT text drawn by graphviz's dot as `output` (svg, png)."""
    dot = shutil.which("dot")
    if dot is None:
        raise PictureError(f"graphviz's dot is needed for -o {output}; install graphviz "
                           "(apt-get install graphviz), or use -o dot")
    try:
        done = subprocess.run([dot, f"-T{output}"], input=dot_text.encode(),
                              capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise PictureError(f"graphviz's dot did not finish within {timeout:.0f} s; "
                           "try --group-by namespace, or -o dot") from None
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()
        raise PictureError(f"graphviz's dot -T{output} failed (exit {done.returncode})"
                           + (f": {detail[0]}" if detail else ""))
    return done.stdout


def write_binary(data: bytes, output: str) -> None:
    """Bytes on stdout; a PNG is refused on a terminal (it would garble it)."""
    sys.stdout.flush()
    out = sys.stdout.buffer
    if output != "svg" and out.isatty():
        raise PictureError(f"-o {output} writes a PNG: redirect standard output to a "
                           f"file (… -o {output} > picture.png)")
    out.write(data)
    out.flush()
