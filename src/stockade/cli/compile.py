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
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from stockade.cli.inputs import add_conntrack_limit, add_files, table_name
from stockade.compile.ir import Ruleset
from stockade.compile.jsontext import dumps as _dumps
from stockade.errors import StockadeError

if TYPE_CHECKING:
    from stockade.compile.ir import Chain
    from stockade.compile.lower import EntryKey, Lowering, Work

FORMATS = ("nft", "json", "stats")
# Entries (policy sets by direction) below which a fork costs more than it saves.
PARALLEL_ENTRIES = 2000
# What the command built, held when the process ends with `os._exit` (`exits`): freeing
# millions of objects one by one, then the memos, takes 0.4 s at Antrea's shape and
# serves no one.
_HELD: list[object] = []


def register(sub: Any) -> None:
    p = sub.add_parser("compile", help="print the ruleset the nftables datapath would program",
                       description="Compile the files to the ruleset the nftables datapath "
                       "would program (offline; nothing touches the kernel).")
    add_files(p)
    p.add_argument("-o", "--output", default="stats", choices=FORMATS,
                   help="nft: libnftables JSON commands of a full load; json: the "
                   "backend-neutral ruleset; stats: its counts (default)")
    p.add_argument("--table", default="stockade", type=table_name,
                   help="the nftables table's name (nft output)")
    add_conntrack_limit(p)
    p.add_argument("--strict-cidr", action="store_true",
                   help="turn on the StrictIPCIDRValidation rules (as `dataplane apply`)")
    p.add_argument("-j", "--jobs", type=_jobs, default=1, metavar="N",
                   help="processes to lower and render a big input in (nft and stats "
                   "output; default 1; at most the cores it may use). Faster on more "
                   "cores, at more memory: each process holds its own share besides "
                   "what they all share")
    p.set_defaults(run=run, one_shot=True)


def _jobs(text: str) -> int:
    n = int(text) if text.isdigit() else 0
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 64, not {text!r}")
    return n


def usable_cores() -> int:
    """The cores this process may run on: more processes than that only add memory
    (each holds its own share), as lowering and rendering never wait."""
    return len(os.sched_getaffinity(0))


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
        if not getattr(args, "exits", False):
            _forget()
        if enabled:
            gc.enable()


def _run(args: argparse.Namespace) -> int:
    from stockade.compile.lower import Lowering
    from stockade.engine.resolve import resolve
    from stockade.load import load_cluster

    cluster = load_cluster(args.files, strict_cidr=args.strict_cidr, recursive=args.recursive)
    lowering = Lowering(resolve(cluster))
    work = lowering.work()
    held = _HELD if getattr(args, "exits", False) else []
    held += (cluster, lowering, work)
    try:
        # Tier chains' verdict maps are sets `nft_target` adds after the others, in the
        # chains' order: a cluster with tiers is compiled in this process alone.
        jobs = min(args.jobs, usable_cores())
        if (jobs > 1 and args.output != "json" and not cluster.cluster_policies
                and len(work.keys) >= PARALLEL_ENTRIES):
            _write_shared(args, lowering, work, jobs)
        else:
            ruleset = lowering.assemble(work, lowering.lower(work, work.keys))
            held.append(ruleset)
            _write(args, ruleset)
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise StockadeError(f"cannot write the output: {exc.strerror or exc}") from None
    return 0


def _write_shared(args: argparse.Namespace, lowering: Lowering, work: Work, jobs: int) -> None:
    """`_write` of the ruleset, each of `jobs` processes lowering a share of the entries
    and rendering what its share names: the same bytes, from texts (or counts) sent
    back, never the ruleset's objects (pickling those costs what lowering them does).

    A set or chain two shares name is the same (named by content), and so are their
    texts; only a chain's comment (its first policy set) differs, which neither output
    shows. bench/offline.py times it against one process (docs/benchmarks.md).
    """
    from stockade.compile import lower
    from stockade.compile.nft import Table, nft_target
    from stockade.compile.nft_text import Texts

    table = Table(args.table, conntrack_limit=args.conntrack_limit)
    nft = args.output == "nft"

    def share(keys: list[EntryKey]) -> tuple[dict[EntryKey, str], dict[str, Any],
                                             dict[str, Any]]:
        lowered = lowering.lower(work, keys)
        chains: dict[str, Chain] = {}
        for key in keys:
            for chain in lowered[key]:
                chains.setdefault(chain.name, chain)
        part = Ruleset(lowering.sets, chains)
        entries = {key: lowered[key][0].name for key in keys}
        if not nft:
            return (entries, {n: len(s.elements) for n, s in part.sets.items()},
                    {n: len(c.rules) for n, c in chains.items()})
        part = nft_target(part)
        texts = Texts(table)
        return (entries, {n: texts.set(s) for n, s in part.sets.items()},
                {n: ",\n".join(texts.rules(c)) for n, c in part.chains.items()})

    # Runs of consecutive entries (a namespace's entries share policies), dealt out in
    # turn: what an entry costs varies along the list (ingress first, then egress).
    run = max(1, -(-len(work.keys) // (jobs * 16)))
    runs = [work.keys[i:i + run] for i in range(0, len(work.keys), run)]
    from stockade.cli.fork import fork_map  # pickle and signals: only here

    names: dict[EntryKey, str] = {}
    sets: dict[str, Any] = {}
    chains: dict[str, Any] = {}
    for part_names, part_sets, part_chains in fork_map(
            share, [[key for keys in runs[i::jobs] for key in keys] for i in range(jobs)]):
        names.update(part_names)
        for name, value in part_sets.items():
            sets.setdefault(name, value)
        for name, value in part_chains.items():
            chains.setdefault(name, value)
    maps = lowering.maps(work, names)
    out = sys.stdout
    if not nft:
        counts = {"sets": len(sets), "set_elements": sum(sets.values()), "chains": len(chains),
                  "rules": sum(chains.values()), "ingress_entries": len(maps.ingress),
                  "egress_entries": len(maps.egress),
                  "guarded_ports": len(lower.guards_of(lowering.index.cluster.endpoints))}
        out.write("".join(f"{k} {v}\n" for k, v in counts.items()))
    else:
        texts = Texts(table)
        chain_names = sorted(chains)
        items = itertools.chain(texts.head(), (sets[n] for n in sorted(sets)),
                                map(texts.chain, chain_names),
                                (chains[n] for n in chain_names if chains[n]), texts.entries(maps))
        out.write("{\n" + json.dumps("nftables") + ": ")
        _write_items(out, "[", items, "]")
        out.write("\n}\n")
    out.flush()


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
        table = Table(args.table, conntrack_limit=args.conntrack_limit)
        _write_items(out, "[", full_load(table, ruleset), "]")
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
