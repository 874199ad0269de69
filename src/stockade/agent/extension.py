"""The agent's extension seam: what serves the local API's operations (pure).

The service holds ONE table of operations, name → handler
(:attr:`stockade.agent.service.Service.table`). Everything that serves
operations fills it the same way, through :meth:`Service.register`: the
service's own core operations (status, apply, delete, get, …), the agent's
denied-flow log (``flows``, in ``agent/daemon.py``), and each
:class:`Extension` (the container manager's run/ps/rm, the CNI plugin's
``cni.*``; later the Kubernetes and etcd feeds). An operation registered twice
is a wiring error at start-up, never a silent override. ``status`` is the
merge of every provider's :meth:`Operations.status`, in registration order.

How to add an agent operation:

1. write the handler, ``def op_x(self, args: dict[str, Any]) -> Any``, reading
   its arguments through :class:`stockade.agent.protocol.Args` (a wrong type
   answers ``bad_request`` naming the argument) and raising
   :class:`~stockade.agent.protocol.ApiError` for what the client did wrong;
   changes go through ``Service.commit`` (admission, store, kernel);
2. return it from ``operations()`` of the provider it belongs to: the core in
   ``Service.operations`` (service.py), or an extension of your own (a class
   with ``operations``/``status``/``start``/``stop``, added to
   ``daemon.default_extensions``);
3. add its name to ``protocol.OPS`` (and the protocol's docstring): requests
   naming anything else are refused before they reach the table.
   ``tests/unit/test_agent_operations.py`` checks that OPS and the table of a
   fully wired agent are the same set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from stockade.agent.daemon import AgentConfig
    from stockade.agent.service import Service

# One operation: the request's args → a JSON-able result (or raise ApiError).
Handler = Callable[[dict[str, Any]], Any]


class Operations(Protocol):
    """Something that serves operations: the service's core, the flow log, an extension."""

    def operations(self) -> Mapping[str, Handler]:
        """Operation name → handler; asked once, when registered (before serving)."""
        ...

    def status(self) -> Mapping[str, Any]:
        """Fields added to the answer of ``status`` (asked at every ``status`` call)."""
        ...


class Host(Protocol):
    """What an extension sees of the agent when it starts."""

    @property
    def config(self) -> AgentConfig: ...

    @property
    def service(self) -> Service: ...


class Extension(Operations, Protocol):
    """A part of the agent with a life cycle: started after the first reconciliation
    and before the socket opens, stopped in reverse order. Its operations are in
    the table from registration on; until `start` they answer ``unavailable``."""

    def start(self, agent: Host) -> None: ...

    def stop(self) -> None: ...
