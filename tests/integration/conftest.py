"""Fixtures for tests that build real network namespaces, links and rules.

Every test gets its own random prefix (``stk`` + 3 characters) and a dedicated
"host" network namespace named ``<prefix>-host``: the bridge and the host sides
of the veths live there, each endpoint in a namespace of its own. Nothing is
configured in the machine's own network namespace; the only global objects are
the named namespaces under /run/netns (and the lock files agents leave under
/run/stockade/locks when killed), and every one carrying the test's prefix is
removed afterwards, whether the test passed, failed or crashed midway.
"""

from __future__ import annotations

import os
import secrets
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from stockade.agent.ownership import LOCK_DIR
from stockade.net.namespace import create_netns, list_netns, remove_netns
from stockade.net.plumber import Attachment, EndpointSpec, Plumber

_ALPHABET = string.ascii_lowercase + string.digits


def _privileged_ok() -> str | None:
    """Why privileged tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, nftables)"
    if not os.path.exists("/proc/thread-self/ns/net"):
        return "no network namespace support"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _privileged_ok()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "privileged" in item.keywords:
            item.add_marker(skip)


def _remove_prefixed(prefix: str) -> None:
    for name in list_netns():
        if name.startswith(prefix):
            remove_netns(name)
    # An agent killed -9 leaves its datapath's lock file (agent/ownership.py: the lock
    # itself went with it): the test's, by its namespace's name or its table's.
    for where in ("netns-", "host-"):
        for path in LOCK_DIR.glob(f"{where}{prefix}*.lock"):
            path.unlink(missing_ok=True)


@pytest.fixture
def netns_prefix() -> Iterator[str]:
    """A fresh prefix, unique to this test (and so to this run)."""
    prefix = "stk" + "".join(secrets.choice(_ALPHABET) for _ in range(3))
    yield prefix
    _remove_prefixed(prefix)


@pytest.fixture
def host_netns(netns_prefix: str) -> Iterator[str]:
    """A dedicated "host" network namespace, removed with all the test's namespaces."""
    name = f"{netns_prefix}-host"
    create_netns(name)
    try:
        yield name
    finally:
        _remove_prefixed(netns_prefix)


@pytest.fixture
def plumber(netns_prefix: str, host_netns: str) -> Iterator[Plumber]:
    """A Plumber working in ``host_netns`` with a dual-stack bridge up."""
    p = Plumber(
        prefix=netns_prefix,
        host_netns=host_netns,
        subnet4="10.244.0.0/16",
        subnet6="fd00:244::/64",
    )
    p.ensure_bridge()
    try:
        yield p
    finally:
        p.teardown()


def _spec(key: str, host: int) -> EndpointSpec:
    return EndpointSpec(
        key=key,
        ipv4=f"10.244.0.{host}/16",
        ipv6=f"fd00:244::{host:x}/64",
        gateway4="10.244.0.1",
        gateway6="fd00:244::1",
    )


@pytest.fixture
def spec_for() -> Callable[[str, int], EndpointSpec]:
    """``spec_for("x/a", 10)``: a dual-stack endpoint .10 / ::a on the plumber's subnets."""
    return _spec


@dataclass(frozen=True)
class Trio:
    """Three endpoints x/a, x/b, x/c on one bridge."""

    plumber: Plumber
    host_netns: str
    a: Attachment
    b: Attachment
    c: Attachment

    @property
    def all(self) -> tuple[Attachment, Attachment, Attachment]:
        return (self.a, self.b, self.c)


@pytest.fixture
def trio(plumber: Plumber, host_netns: str) -> Trio:
    a, b, c = (plumber.ensure_endpoint(_spec(f"x/{n}", 10 + i)) for i, n in enumerate("abc"))
    return Trio(plumber, host_netns, a, b, c)
