"""Shared test configuration: hypothesis profiles and the import path of `tests.*`.

Profiles (choose with HYPOTHESIS_PROFILE=<name>; "ci" by default):
  ci    deterministic (derandomized, no example database), bounded in time; the
        property and fuzz suites together stay well under a minute on 2 cores.
  dev   random and many more examples, for hunting bugs locally.
  quick a smoke run.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# Shared strategies are imported as `tests.property.strategies` by every suite.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.support import SHARED_DIR  # noqa: E402  (needs the path above)

settings.register_profile(
    "ci",
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=1000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "quick",
    max_examples=10,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # A run stopped with SIGTERM (`timeout`, a CI runner giving up) would skip every
    # fixture's teardown and leave its namespaces, tables and pins behind. As an
    # interrupt, pytest still tears down what is set up when the session finishes.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupted)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared corpora (``<repository>/../shared``); see tests/support."""
    return SHARED_DIR


@pytest.fixture(autouse=True)
def _stockade_logging() -> Iterator[None]:
    """A test that runs a command in-process (`main(["agent", ...])`) configures the
    `stockade` logger with a handler on that test's captured stderr, closed after it:
    the next test's log lines would then fail to write. Put back as it was."""
    root = logging.getLogger("stockade")
    kept = (root.handlers[:], root.level, root.propagate)
    yield
    root.handlers[:], root.level, root.propagate = kept[0], kept[1], kept[2]


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Any]:
    """A real etcd on loopback for the test (free ports, a temporary data directory),
    stopped and removed even when the test fails."""
    from tests.support.etcd import EtcdServer, etcd_binary

    if etcd_binary() is None:
        pytest.skip("etcd is not installed")
    with EtcdServer(tmp_path) as server:
        yield server
