"""Datapaths: the kernel side, behind one small protocol (see `base`).

`open_datapath` is the one place a datapath is chosen by name (`--datapath`
of the CLI, the conformance runner and the agent), so a new datapath is one
entry in `DATAPATHS` and one module implementing `base.Datapath`.
"""

from __future__ import annotations

import importlib

from stockade.compile.owner import check_owner_name
from stockade.datapath.base import Datapath
from stockade.errors import DataplaneError

# kind -> "module:class"; every class has a classmethod
# `open(name, *, netns, owner, log_group, conntrack_limit) -> Self`, where `name`
# names what it owns in the kernel (the nftables table, the iptables chain and ipset
# prefix, the pinned eBPF directory), `log_group` is the NFLOG group of denied packets
# and `conntrack_limit` the connections a source may hold in conntrack (0: no limit;
# a datapath that cannot enforce one refuses it). The eBPF one's also takes `attach`.
DATAPATHS: dict[str, str] = {
    "nft": "stockade.datapath.nft:NftDatapath",
    "iptables": "stockade.datapath.iptables:IptablesDatapath",
    "ebpf": "stockade.datapath.ebpf:EbpfDatapath",
}

# How the eBPF datapath puts its programs on the ports: tcx links where the kernel has
# them (6.6+), else clsact filters ("auto"); or either, asked for. A tcx link cannot be
# removed by `tc`, but each attach waits for an RCU grace period under the RTNL lock
# (12-16 ms a hook here, one attach at a time across the machine); a clsact filter
# goes on in a fraction of that, and one another tc user removes is put back by the
# agent's link poll.
ATTACH_MODES = ("auto", "tcx", "clsact")


def open_datapath(kind: str, name: str = "stockade", *, netns: str | None = None,
                  owner: bool = False, log_group: int | None = None,
                  conntrack_limit: int = 0, ebpf_attach: str = "auto") -> Datapath:
    """The datapath `kind`, owning the kernel objects called `name`, in `netns`;
    `ebpf_attach`: how the eBPF datapath attaches its programs (`ATTACH_MODES`)."""
    if kind not in DATAPATHS:
        raise DataplaneError(f"no datapath {kind!r} (choose from {', '.join(DATAPATHS)})")
    check_owner_name(name)
    module, cls = DATAPATHS[kind].split(":")
    try:
        factory = getattr(importlib.import_module(module), cls).open
    except ImportError as exc:
        raise DataplaneError(f"the {kind} datapath is not available: {exc}") from None
    if conntrack_limit < 0:
        raise DataplaneError(f"a connection limit of {conntrack_limit}: give 0 (none) or more")
    if ebpf_attach != "auto" and kind != "ebpf":
        raise DataplaneError(f"--ebpf-attach {ebpf_attach} is for the eBPF datapath, not {kind}")
    extra = {"attach": ebpf_attach} if kind == "ebpf" else {}
    datapath: Datapath = factory(name, netns=netns, owner=owner, log_group=log_group,
                                 conntrack_limit=conntrack_limit, **extra)
    return datapath
