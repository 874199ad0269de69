"""A test run stopped with SIGTERM still removes what its fixtures made.

`timeout` and CI runners stop a run with SIGTERM; without tests/conftest.py's
handler the fixtures' teardowns never ran and their network namespaces stayed.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stockade.net.namespace import list_netns, remove_netns

pytestmark = pytest.mark.privileged

TESTS = Path(__file__).resolve().parent.parent

HANGING = '''
import time

import pytest

from stockade.net.namespace import create_netns, remove_netns


@pytest.fixture
def namespace():
    create_netns("{name}")
    try:
        yield
    finally:
        remove_netns("{name}")


def test_hangs(namespace):
    open("{ready}", "w").close()
    time.sleep(120)
'''


def test_a_run_stopped_with_sigterm_removes_its_namespaces(tmp_path: Path) -> None:
    name = f"stk{secrets.token_hex(2)}-stopped"
    ready = tmp_path / "ready"
    (tmp_path / "test_hanging.py").write_text(HANGING.format(name=name, ready=ready))
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), str(tmp_path / "test_hanging.py")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()[0].decode()
            assert time.monotonic() < deadline, "the hanging test never started"
            time.sleep(0.05)
        assert name in list_netns()
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode()
        assert name not in list_netns(), out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if name in list_netns():
            remove_netns(name)
