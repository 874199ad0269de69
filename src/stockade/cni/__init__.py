"""The CNI plugin: container runtimes hand stockade their containers' network namespaces.

``stockade-cni`` implements the CNI specification 0.4.0, 1.0.0 and 1.1.0
(ADD, DEL, CHECK, GC, STATUS, VERSION), as a main plugin (veth onto
stockade's bridge, address from the agent's pool or a delegated IPAM plugin)
or chained after another plugin (the endpoint taken from ``prevResult``).
Either way ADD returns only once the node agent enforces the new endpoint's
policy, so no container can talk before its policy applies.

Modules, pure first:

* :mod:`~stockade.cni.spec` — the specification: environment, names,
  configuration, result types per version, error objects (no I/O);
* :mod:`~stockade.cni.state` — per-attachment state files and the locks
  that order parallel plugin processes;
* :mod:`~stockade.cni.attach` — main mode's plumbing in a namespace given
  by path, over :mod:`stockade.net.rtnl` (the plumbing layer ``stockade run``
  shares);
* :mod:`~stockade.cni.delegate` — running the IPAM plugin ``ipam.type``
  from ``CNI_PATH``, negotiating its spec version;
* :mod:`~stockade.cni.plugin` — the executable: reads, dispatches, prints.

The agent's side is :mod:`stockade.agent.cni_ops` (``cni.add``, ``cni.del``,
``cni.check``, ``cni.gc``, ``cni.status``); example configurations and their
explanation are in ``deploy/cni``.
"""
