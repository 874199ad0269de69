"""Lost nf_tables events (our own large transactions overflow the monitor's socket) ask
for a read-back only when another process could have changed the table."""

from __future__ import annotations

from types import SimpleNamespace

from stockade.agent.daemon import Agent


def _agent(owned: bool) -> SimpleNamespace:
    checks: list[bool] = []
    fake = SimpleNamespace(reconciler=SimpleNamespace(datapath=SimpleNamespace(owned=owned)),
                           checks=checks)
    fake._check_soon = lambda: checks.append(True)
    return fake


def test_an_owned_table_waits_for_the_periodic_check() -> None:
    fake = _agent(owned=True)
    Agent._events_lost(fake)  # type: ignore[arg-type]
    assert fake.checks == []


def test_a_table_others_can_change_is_read_back_soon() -> None:
    fake = _agent(owned=False)
    Agent._events_lost(fake)  # type: ignore[arg-type]
    assert fake.checks == [True]
