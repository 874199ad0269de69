"""The base install is the offline analyses; the kernel and cluster libraries are extras.

Each command runs in a fresh interpreter where the extras' libraries cannot be
imported (a meta-path finder answers as Python does for a module that is not
installed), as after `pip install stockade` without extras: the offline commands
work, the others say which extra they need, exit 2, with no traceback.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from tests.support import shared

from stockade.cli.main import EXTRAS

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
CONFORMANCE = shared("conformance")
# The distributions of the extras and the module each provides.
MODULE_OF = {"pip-nftables": "nftables", "prometheus-client": "prometheus_client",
             "lightkube": "lightkube", "httpx": "httpx"}
BLOCKED = frozenset(m for modules in EXTRAS.values() for m in modules) | {"pyroute2"}

_RUN = """
import sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
from stockade.cli.main import {entry}
code = {entry}(sys.argv[1:])
leaked = sorted(m for m in sys.modules if m.partition(".")[0] in {blocked!r})
assert not leaked, leaked
sys.exit(code)
"""


def _run(*argv: str, entry: str = "main") -> subprocess.CompletedProcess[str]:
    code = _RUN.format(blocked=sorted(BLOCKED), entry=entry)
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def _pyproject() -> dict[str, list[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {"": project["dependencies"], **project["optional-dependencies"]}


def _names(requirements: list[str]) -> set[str]:
    return {r.split(">")[0].split("=")[0].split("[")[0].split(";")[0].strip()
            for r in requirements}


def test_the_extras_table_of_the_cli_is_pyprojects() -> None:
    deps = _pyproject()
    assert _names(deps[""]) == {"PyYAML", "orjson"}
    for extra, modules in EXTRAS.items():
        assert {MODULE_OF[d] for d in _names(deps[extra])} == set(modules), extra
    assert deps["all"] == [f"stockade[{','.join(EXTRAS)}]"]


OFFLINE = [
    (0, ["validate", "examples/policies.yaml", "examples/policies-v2.yaml"]),
    (0, ["list", "-f", "examples/cluster.yaml", "-f", "examples/policies.yaml"]),
    (0, ["matrix", "-f", "examples/cluster.yaml", "-f", "examples/policies.yaml"]),
    (0, ["explain", "-f", "examples/cluster.yaml", "-f", "examples/policies.yaml",
         "--from", "frontend/web", "--to", "backend/api", "--port", "api"]),
    (0, ["coverage", "-f", "examples/cluster.yaml", "-f", "examples/policies.yaml"]),
    (1, ["lint", "-f", "examples/cluster.yaml", "-f", "examples/policies-v2.yaml"]),
    (1, ["diff", "-f", "examples/cluster.yaml", "-f", "examples/policies.yaml",
         "--against", "examples/policies-v2.yaml"]),
    (0, ["compile", "-f", "examples/cluster.yaml", "-f", "examples/policies.yaml"]),
    (0, ["operator", "render", "-f", "examples/microservices/services.yaml"]),
    (0, ["completion", "bash"]),
]


@pytest.mark.parametrize(("expected", "argv"), OFFLINE, ids=[a[0] for _, a in OFFLINE])
def test_offline_commands_run_without_the_extras(expected: int, argv: list[str]) -> None:
    out = _run(*argv)
    assert out.returncode == expected, out.stderr
    assert out.stdout.strip()
    assert "Traceback" not in out.stderr


@pytest.mark.skipif(not CONFORMANCE.is_dir(), reason="no conformance corpus")
def test_conformance_on_the_model_runs_without_the_extras() -> None:
    out = _run("conformance", "--datapath", "model", str(CONFORMANCE))
    assert out.returncode == 0, out.stderr
    assert " 0 failed" in out.stdout


# The agent command is stopped before it does anything: the missing library is met
# on import. The namespace does not exist either, should that ever change.
NEEDS = [
    ("agent", ["agent", "--netns", "stk-none-such", "--state-dir", "{tmp}/state",
               "--socket", "{tmp}/sock"]),
    ("agent', 'kube", ["agent", "--datastore", "kubernetes", "--netns", "stk-none-such",
                       "--state-dir", "{tmp}/state", "--socket", "{tmp}/sock"]),
    ("kube", ["operator", "run", "--kubeconfig", "{tmp}/none"]),
    ("kube", ["completion", "bash", "--program", "kubectl-stockade"]),
]


@pytest.mark.parametrize(("extras", "argv"), NEEDS, ids=[" ".join(a[:3]) for _, a in NEEDS])
def test_a_command_without_its_extra_names_it(extras: str, argv: list[str],
                                              tmp_path: Path) -> None:
    out = _run(*(a.format(tmp=tmp_path) for a in argv))
    assert out.returncode == 2
    wanted = extras.replace("', '", ",")
    assert f"needs the '{extras.replace(', ', ' and ')}' extra" in out.stderr
    assert f"pip install 'stockade[{wanted}]'" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "state").exists()


def test_kubectl_stockade_without_the_kube_extra_names_it() -> None:
    out = _run("matrix", entry="kubectl_main")
    assert out.returncode == 2
    assert out.stderr == ("kubectl stockade needs the 'kube' extra (no module named "
                          "'httpx'): pip install 'stockade[kube]'\n")


def test_a_kernel_command_without_the_agent_extra_names_it() -> None:
    out = _run("dataplane", "show", "--netns", "stk-none-such")
    assert out.returncode == 2
    assert "pip install 'stockade[agent]'" in out.stderr
    assert "Traceback" not in out.stderr
