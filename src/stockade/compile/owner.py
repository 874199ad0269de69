"""The name a datapath owns its kernel objects under (`--table`).

It becomes the nftables table's name, the iptables chains' and ipsets' prefix and a
directory under /sys/fs/bpf, and it is written into `nft -f` and `iptables-restore`
input and into paths: so it is checked once, here, before any of those is made.
Letters, digits, `_` and `-`, beginning with a letter: what all three accept
verbatim, with no quoting and nothing a path or a rule could read otherwise.
"""

from __future__ import annotations

import re

from stockade.errors import InputError

MAX_LENGTH = 64
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def check_owner_name(name: str) -> str:
    """`name`, or an InputError saying what a datapath's name may be."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > MAX_LENGTH:
        raise InputError(f"invalid datapath name {name!r}: a letter, then letters, digits, "
                         f"'_' or '-', at most {MAX_LENGTH} characters", obj="--table")
    return name
