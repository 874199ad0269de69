"""What one verdict-map entry costs the kernel, against one data-map entry.

Adding an element that jumps to a chain makes nf_tables validate the whole table
at commit (every element of every verdict map, every chain they reach); an
element of a map whose values are plain numbers does not. This measures both in
a table shaped like the agent's at 10,000 endpoints: `--chains` chains of
`--rules` rules, a verdict map of `--entries` addresses jumping to them, a data
map of as many addresses to numbers, and a small verdict map from number to
chain (the indirection that would spare the validation). Each measure is one
raw nfnetlink batch (the agent's own writer), added and then removed, `--rounds`
times, in a network namespace of its own.

    .venv/bin/python bench/vmap_validation.py [--entries 10000] [--chains 800]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import exit_on_sigterm
from stockade.datapath.nfnetlink import (
    ElementWriter,
    element_list_messages,
    element_messages,
    encode_key,
)
from stockade.net.namespace import create_netns, entered, remove_netns
from stockade.netlink import attr, nested

NFTA_LIST_ELEM, NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA, NFTA_DATA_VALUE = 1, 1, 2, 1
TABLE = "vmapbench"


def address(i: int, net: int = 10) -> str:
    return f"{net}.{i // 62500 % 250}.{i // 250 % 250}.{i % 250 + 1}"


def ruleset(entries: int, chains: int, rules: int) -> str:
    lines = [f"table inet {TABLE} {{"]
    for c in range(chains):
        body = "\n".join(f"    ip saddr 172.16.{c % 250}.{r + 1} tcp dport {1000 + r} accept"
                         for r in range(rules))
        lines.append(f"  chain c{c} {{\n{body}\n    drop\n  }}")
    jumps = ", ".join(f"{address(i)} : jump c{i % chains}" for i in range(entries))
    numbers = ", ".join(f"{address(i)} : {i % chains}" for i in range(entries))
    small = ", ".join(f"{c} : jump c{c}" for c in range(chains))
    lines += [f"  map jumps {{ type ipv4_addr : verdict; elements = {{ {jumps} }} }}",
              f"  map numbers {{ type ipv4_addr : mark; elements = {{ {numbers} }} }}",
              f"  map chains {{ type mark : verdict; elements = {{ {small} }} }}",
              "  chain forward {",
              "    type filter hook forward priority 0;",
              "    ip daddr vmap @jumps",
              "    meta mark set ip daddr map @numbers",
              "    meta mark vmap @chains",
              "  }", "}"]
    return "\n".join(lines) + "\n"


def number_item(key: bytes, value: int) -> bytes:
    return nested(NFTA_LIST_ELEM, nested(NFTA_SET_ELEM_KEY, attr(NFTA_DATA_VALUE, key)),
                  nested(NFTA_SET_ELEM_DATA, attr(NFTA_DATA_VALUE, struct.pack("=I", value))))


def measure(writer: ElementWriter, rounds: int,
            batches: Callable[[str, int], tuple[list[tuple[int, int, bytes]],
                                                 list[tuple[int, int, bytes]]]]) -> list[float]:
    took = []
    for i in range(rounds):
        add, remove = batches(address(i, 11), i)
        t0 = time.perf_counter()
        writer.transact(add, "add")
        took.append(time.perf_counter() - t0)
        writer.transact(remove, "remove")
    return took


def main() -> None:
    exit_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=10_000)
    ap.add_argument("--chains", type=int, default=800)
    ap.add_argument("--rules", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    ns = f"vmb{secrets.token_hex(3)}"
    create_netns(ns)
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".nft") as f:
            f.write(ruleset(args.entries, args.chains, args.rules))
            f.flush()
            subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", f.name], check=True)
        chains = args.chains
        with entered(f"/run/netns/{ns}"):
            writer = ElementWriter(TABLE)
            try:
                variants = {
                    "verdict-map entry (jump): the table validated": lambda a, i: (
                        element_messages(TABLE, "jumps", [a], jumps=[f"c{i % chains}"]),
                        element_messages(TABLE, "jumps", [a], delete=True)),
                    "data-map entry (number): no validation": lambda a, i: (
                        element_list_messages(TABLE, "numbers",
                                              [number_item(encode_key(a), i % chains)]),
                        element_messages(TABLE, "numbers", [a], delete=True)),
                }
                results: dict[str, list[float]] = {name: [] for name in variants}
                for _ in range(2):  # in turns
                    for name, batches in variants.items():
                        results[name] += measure(writer, args.rounds, batches)
            finally:
                writer.close()
    finally:
        remove_netns(ns)
    print(f"{args.entries} map entries, {args.chains} chains of {args.rules} rules; "
          f"{2 * args.rounds} adds each, in turns; load average "
          f"{Path('/proc/loadavg').read_text().split()[0]}")
    for name, values in results.items():
        values.sort()
        print(f"  {name}: p50 {statistics.median(values) * 1000:.2f} ms, "
              f"p90 {values[int(len(values) * 0.9)] * 1000:.2f} ms")


if __name__ == "__main__":
    main()
