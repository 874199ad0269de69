"""The example configurations in deploy/cni are valid for the plugin and documented."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stockade.cni.spec import VERSIONS, parse_conf, parse_env

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "cni"
LISTS = sorted(DEPLOY.glob("*.conflist"))
ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc", "CNI_NETNS": "/run/netns/x",
       "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni"}


def test_there_are_examples_for_both_modes() -> None:
    modes = {p.get("mode") for f in LISTS for p in json.loads(f.read_text())["plugins"]
             if p["type"] == "stockade-cni"}
    assert modes == {"main", "chained"}


@pytest.mark.parametrize("path", LISTS, ids=[p.name for p in LISTS])
def test_each_plugin_configuration_parses(path: Path) -> None:
    conflist = json.loads(path.read_text())
    assert conflist["cniVersion"] in VERSIONS
    for version in conflist.get("cniVersions", [conflist["cniVersion"]]):
        for plugin in conflist["plugins"]:
            if plugin["type"] != "stockade-cni":
                continue
            conf = {**plugin, "name": conflist["name"], "cniVersion": version}
            parsed = parse_conf(json.dumps(conf).encode(), parse_env(ENV))
            assert parsed.veth_prefix != "stk", "GC would take `stockade run` veths for ours"


def test_the_readme_explains_every_file() -> None:
    readme = (DEPLOY / "README.md").read_text()
    assert all(f"`{p.name}`" in readme for p in LISTS)
