"""The agent's datapath, opened before the rest of the agent is imported.

At a restart with 10,000 endpoints the table's read-back (libnftables' work,
about a second, outside the interpreter) is the longest part once the state
comes from a warm start (agent/warm.py). Importing the agent's modules takes
0.2-0.3 s of interpreter time; `stockade agent` opens the datapath and starts the
read-back first (`read_ahead`), so that the two run on two CPUs. The daemon opens
its datapath through the same function when none was opened ahead.
"""

from __future__ import annotations

from stockade.datapath import open_datapath
from stockade.datapath.base import Datapath


def open_agent_datapath(kind: str, table: str, *, netns: str | None, owner: bool,
                        log_group: int | None, conntrack_limit: int = 0,
                        ebpf_attach: str = "auto") -> Datapath:
    """The datapath as the agent uses it, checked."""
    datapath = open_datapath(kind, table, netns=netns, owner=owner, log_group=log_group,
                             conntrack_limit=conntrack_limit, ebpf_attach=ebpf_attach)
    datapath.check()
    if hasattr(datapath, "keep_unused"):
        datapath.keep_unused = True  # unused chains wait a while for reuse (nft)
    return datapath


def read_ahead(kind: str, table: str, *, datastore: str, netns: str | None, owner: bool,
               log_group: int | None, conntrack_limit: int = 0,
               ebpf_attach: str = "auto") -> Datapath | None:
    """With the local datastore: the datapath, its table already being read back (where
    the datapath can read ahead). The Kubernetes and etcd datastores open theirs later."""
    if datastore != "local":
        return None
    datapath = open_agent_datapath(kind, table, netns=netns, owner=owner, log_group=log_group,
                                   conntrack_limit=conntrack_limit, ebpf_attach=ebpf_attach)
    prefetch = getattr(datapath, "prefetch", None)
    if prefetch is not None:
        prefetch()
    return datapath
