"""An eBPF datapath for a test, in the trio's host namespace."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import Any

from stockade.datapath import libbpf
from stockade.datapath.ebpf import EbpfDatapath
from stockade.net.namespace import entered


@contextlib.contextmanager
def ebpf_datapath(trio: Any, **options: Any) -> Iterator[EbpfDatapath]:
    """Checked against the kernel first; its pins removed, and checked gone, whatever
    the test does."""
    dp = EbpfDatapath(netns=trio.host_netns, **options)
    try:
        dp.check()
        yield dp
    finally:
        EbpfDatapath(netns=trio.host_netns).remove()
        assert not dp.dir.exists()


def from_pod(trio: Any, datapath: EbpfDatapath) -> Callable[[bytes, Any], int]:
    """frame, port (a trio attachment) -> stockade_from_pod's verdict for that frame
    arriving on the port (BPF_PROG_TEST_RUN)."""
    prog = datapath._progs["in"]

    def verdict(frame: bytes, att: Any) -> int:
        with entered(trio.host_netns):
            index = socket.if_nametoindex(att.host_ifname)
            return libbpf.test_run(prog, frame, 1, ifindex=index)[0]

    return verdict
