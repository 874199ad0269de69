"""The agent's one table of operations: what the protocol names is what a fully wired
agent serves, and nothing is registered twice (no root needed)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from stockade.agent.daemon import Agent, AgentConfig, default_extensions
from stockade.agent.protocol import BAD_REQUEST, OPS, ApiError
from stockade.agent.records import AgentState
from stockade.agent.service import Service
from stockade.agent.store import Store
from stockade.errors import AgentError
from stockade.net.ipam import Ipam


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    store = Store(tmp_path)
    reconciler: Any = SimpleNamespace()  # the table is built without reconciling
    yield Service(store, AgentState(), reconciler, ipam=Ipam("10.9.0.0/24"))
    store.close()


def wired(service: Service, tmp_path: Path) -> Service:
    """The service as `stockade agent` wires it (agent/daemon.py), extensions not started."""
    agent = Agent(AgentConfig(state_dir=str(tmp_path)))
    agent.extensions.extend(default_extensions())
    for provider in agent.operation_providers():
        service.register(provider)
    return service


def test_every_operation_of_the_protocol_is_served_and_nothing_else(
        service: Service, tmp_path: Path) -> None:
    served = set(wired(service, tmp_path).table)
    assert served == set(OPS), {"not served": set(OPS) - served,
                                "not in protocol.OPS": served - set(OPS)}
    assert len(OPS) == len(set(OPS))


def test_the_core_is_registered_like_any_extension(service: Service) -> None:
    assert set(service.table) == set(service.operations())
    assert all(callable(h) for h in service.table.values())


def test_an_unknown_operation_is_a_bad_request(service: Service) -> None:
    with pytest.raises(ApiError) as err:
        service.handle("nope", {})
    assert err.value.code == BAD_REQUEST
    assert err.value.message == "operation 'nope' is not served by this agent"


class Probe:
    """A provider of one operation and one status field."""

    def __init__(self, name: str = "probe.echo") -> None:
        self.name = name

    def operations(self) -> Mapping[str, Any]:
        return {self.name: lambda args: {"echo": args}}

    def status(self) -> Mapping[str, Any]:
        return {"probe": {"ok": True}}


def test_a_registered_provider_serves_its_operations_and_adds_to_status(
        service: Service) -> None:
    service.status = lambda: {"ready": True}  # type: ignore[method-assign]  # no reconciler
    service.register(Probe())
    assert service.handle("probe.echo", {"x": 1}) == {"echo": {"x": 1}}
    assert "probe.echo" in service.table
    assert list(service.handle("status", {}).items()) == [("ready", True),
                                                           ("probe", {"ok": True})]


class Feed:
    """A feed that commits to the core between reads: what it reports as seen, the
    core must show as committed (the Kubernetes feed's resourceVersion and inSync)."""

    def __init__(self, core: dict[str, int]) -> None:
        self.core = core
        self.seen = 0

    def operations(self) -> Mapping[str, Any]:
        return {}

    def status(self) -> Mapping[str, Any]:
        self.seen = self.core["revision"] = self.seen + 1  # an event lands right now
        return {"feed": {"seen": self.seen}}


def test_status_never_shows_a_feed_ahead_of_the_core(service: Service) -> None:
    core = {"revision": 0}
    service.status = lambda: {"revision": core["revision"]}  # type: ignore[method-assign]
    service.register(Feed(core))
    for _ in range(3):
        st = service.handle("status", {})
        assert st["revision"] >= st["feed"]["seen"], st
    assert list(st) == ["revision", "feed"]  # the core's fields still come first


def test_an_operation_registered_twice_is_a_wiring_error(service: Service) -> None:
    service.register(Probe())
    with pytest.raises(AgentError, match=r"probe\.echo registered twice"):
        service.register(Probe())
    with pytest.raises(AgentError, match="status registered twice"):
        service.register(Probe("status"))
    assert service.handle("probe.echo", {}) == {"echo": {}}


def test_the_table_is_read_only(service: Service) -> None:
    with pytest.raises(TypeError):
        service.table["x"] = lambda args: None  # type: ignore[index]


class _Ext:
    """An extension that records its start, or fails it."""

    def __init__(self, name: str, started: list[str], fails: bool = False) -> None:
        self.name, self.started, self.fails = name, started, fails

    def start(self, agent: Any) -> None:
        if self.fails:
            raise RuntimeError(f"{self.name} cannot start")
        self.started.append(self.name)


def test_one_extension_failing_keeps_the_others_when_they_start_apart(tmp_path: Path) -> None:
    # With the API as the datastore the agent serves before the extensions start: the
    # CNI operations must not be lost to `stockade run`'s manager failing first.
    started: list[str] = []
    agent = Agent(AgentConfig(state_dir=str(tmp_path)))
    exts: list[Any] = [_Ext("run", started, fails=True), _Ext("cni", started),
                       _Ext("thin", started)]
    agent.extensions.extend(exts)
    agent._start_extensions(apart=True)
    assert started == ["cni", "thin"]
    assert agent._started == exts[1:]
    # At a local start the first failure is the start's, as before.
    again = Agent(AgentConfig(state_dir=str(tmp_path)))
    failing: list[Any] = [_Ext("run", [], fails=True), _Ext("cni", started)]
    again.extensions.extend(failing)
    with pytest.raises(RuntimeError, match="run cannot start"):
        again._start_extensions()
    assert started == ["cni", "thin"]
