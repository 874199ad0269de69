"""An eBPF datapath for a test, in the trio's host namespace."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from stockade.datapath.ebpf import EbpfDatapath


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
