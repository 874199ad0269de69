"""cli.pictures: graphviz's dot run on DOT text, and its absence reported."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from stockade.cli.pictures import PictureError, render
from stockade.engine.graph import Graph, Node, render_dot

needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="graphviz's dot is not installed")
SVG = "{http://www.w3.org/2000/svg}"


@needs_dot
def test_dot_draws_svg_and_png() -> None:
    text = render_dot(Graph("t", (Node("a/x", "x", "a"),), ()))
    root = ET.fromstring(render(text, "svg"))
    assert [t.text for t in root.iter(f"{SVG}title")] == ["t", "cluster_0", "a/x"]
    assert render(text, "png").startswith(b"\x89PNG\r\n\x1a\n")


def test_without_dot_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without graphviz
    with pytest.raises(PictureError) as err:
        render("digraph {}", "svg")
    assert str(err.value) == ("graphviz's dot is needed for -o svg; install graphviz "
                              "(apt-get install graphviz), or use -o dot")


@needs_dot
def test_a_failing_dot_is_reported_with_its_message() -> None:
    with pytest.raises(PictureError, match=r"dot -Tsvg failed \(exit 1\): .*syntax error"):
        render("digraph { -> }", "svg")
