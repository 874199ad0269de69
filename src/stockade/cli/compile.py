"""`stockade compile -f FILE… [-o nft|json|stats]`: the ruleset the nftables datapath would program.

Offline and unprivileged: the files are loaded and checked as `stockade dataplane
apply` checks them (every object valid, none twice), compiled by the code the
agent and `dataplane apply` run (`compile.lower.compile_cluster`), and printed:

* `nft`: the libnftables JSON commands of a full load into an empty kernel (the
  table, its maps and base chain, every set, chain and map entry; what
  `compile.nft.render_plan` gives the datapath), loadable with `nft -j -f FILE`;
* `json`: the backend-neutral `Ruleset` (sets with their elements, chains with
  their rules, the two verdict maps);
* `stats`: its counts, one `name value` line each.

Nothing here imports a kernel library: it is safe in CI.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from stockade.cli.inputs import add_files
from stockade.compile.jsontext import dumps as _dumps
from stockade.errors import StockadeError

if TYPE_CHECKING:
    from stockade.compile.ir import Ruleset

FORMATS = ("nft", "json", "stats")


def register(sub: Any) -> None:
    p = sub.add_parser("compile", help="print the ruleset the nftables datapath would program",
                       description="Compile the files to the ruleset the nftables datapath "
                       "would program (offline; nothing touches the kernel).")
    add_files(p)
    p.add_argument("-o", "--output", default="stats", choices=FORMATS,
                   help="nft: libnftables JSON commands of a full load; json: the "
                   "backend-neutral ruleset; stats: its counts (default)")
    p.add_argument("--table", default="stockade", help="the nftables table's name (nft output)")
    p.add_argument("--strict-cidr", action="store_true",
                   help="turn on the StrictIPCIDRValidation rules (as `dataplane apply`)")
    p.set_defaults(run=run, one_shot=True)


def run(args: argparse.Namespace) -> int:
    # A one-shot command building millions of objects, none of them garbage in a
    # cycle: the cyclic collector would walk them all again and again (at
    # 100,000 pods a third of the time). The memos go before the collector is
    # back, so that interpreter shutdown has little left to walk.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _run(args)
    finally:
        _forget()
        if enabled:
            gc.enable()


def _run(args: argparse.Namespace) -> int:
    from stockade.compile.lower import compile_cluster
    from stockade.load import load_cluster

    ruleset = compile_cluster(load_cluster(args.files, strict_cidr=args.strict_cidr,
                                           recursive=args.recursive))
    try:
        _write(args, ruleset)
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise StockadeError(f"cannot write the output: {exc.strerror or exc}") from None
    return 0


def _write(args: argparse.Namespace, ruleset: Ruleset) -> None:
    out = sys.stdout
    if args.output == "stats":
        out.write("".join(f"{k} {v}\n" for k, v in ruleset.counts().items()))
    elif args.output == "json":
        from stockade.compile.ir import ruleset_data

        write_json(out, ruleset_data(ruleset))
    else:
        from stockade.compile.nft import Table
        from stockade.compile.nft_text import full_load

        # The commands' texts, built from pieces each encoded once: the same bytes as
        # `write_json(out, {"nftables": render_full(...)})`, at a third of the cost.
        out.write("{\n" + json.dumps("nftables") + ": ")
        _write_items(out, "[", full_load(Table(args.table), ruleset), "]")
        out.write("\n}\n")
    out.flush()


def _forget() -> None:
    from stockade.compile.lower import clear_caches
    from stockade.compile.nft import rule_digest
    from stockade.model import cidr
    from stockade.model.decode import clear_interned
    from stockade.model.validate import VALID

    clear_caches()
    clear_interned()
    VALID.clear()
    rule_digest.cache_clear()
    for cached in (cidr.parse_ip, cidr.parse_cidr, cidr.parse_cidr_sloppy):
        cached.cache_clear()


def write_json(out: Any, data: dict[str, Any]) -> None:
    """JSON with one line per item of each top-level list or mapping: readable and
    diffable in review, and written item by item (never the whole text at once)
    by the C encoder (`indent` would use the pure-Python one, several times
    slower on millions of elements)."""
    out.write("{")
    for i, (key, value) in enumerate(data.items()):
        out.write(("," if i else "") + "\n" + json.dumps(key) + ": ")
        if isinstance(value, dict) and value:
            items = (f"{_dumps(k)}: {_dumps(v)}" for k, v in value.items())
            _write_items(out, "{", items, "}")
        elif isinstance(value, list) and value:
            _write_items(out, "[", map(_dumps, value), "]")
        else:
            out.write(json.dumps(value))
    out.write("\n}\n")


def _write_items(out: Any, opening: str, items: Iterator[str], closing: str) -> None:
    out.write(opening)
    separator = "\n"
    # In batches: one write per item was a third of the writing.
    for batch in iter(lambda: list(itertools.islice(items, _BATCH)), []):
        out.write(separator + ",\n".join(batch))
        separator = ",\n"
    out.write("\n" + closing)


_BATCH = 4096
