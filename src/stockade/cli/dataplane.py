"""`stockade dataplane show|diff|apply|remove`: the kernel side, read and written.

`stockade datapath …` is the same command (the name of the package and of the
`Datapath` protocol); `dataplane` stays, as it always was.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from stockade.cli.inputs import add_conntrack_limit, add_files, table_name
from stockade.compile.lower import compile_cluster
from stockade.datapath import DATAPATHS, open_datapath
from stockade.datapath.base import Datapath
from stockade.datapath.nft import NftDatapath
from stockade.load import load_cluster


def register(sub: Any) -> None:
    p = sub.add_parser("dataplane", aliases=["datapath"],
                       help="show, compare or program the kernel datapath")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--netns", metavar="NAME",
                       help="work in this named network namespace (/run/netns/NAME)")
        q.add_argument("--datapath", default="nft", choices=tuple(DATAPATHS),
                       help="which datapath (default nft)")
        q.add_argument("--table", default="stockade", type=table_name,
                       help="the name of what stockade owns in the kernel (the nftables table)")
        add_conntrack_limit(q)

    show = verbs.add_parser("show", help="print what stockade has in the kernel")
    common(show)
    show.add_argument("-o", "--output", choices=("nft", "json"), default="nft")
    show.set_defaults(run=run_show)

    diff = verbs.add_parser("diff", help="compare the kernel with what the files produce")
    common(diff)
    add_files(diff)
    diff.set_defaults(run=run_diff)

    apply = verbs.add_parser("apply", help="program the kernel from files (all or nothing)")
    common(apply)
    add_files(apply)
    apply.add_argument("--strict-cidr", action="store_true")
    apply.set_defaults(run=run_apply)

    remove = verbs.add_parser("remove", help="delete stockade's table")
    common(remove)
    remove.set_defaults(run=run_remove)


def _datapath(args: argparse.Namespace) -> Datapath:
    return open_datapath(args.datapath, args.table, netns=args.netns,
                         conntrack_limit=args.conntrack_limit)


def run_show(args: argparse.Namespace) -> int:
    dp = _datapath(args)
    if args.output == "json":
        rs = dp.read()
        print(json.dumps({
            "counts": rs.counts(),
            "sets": {n: sorted(map(str, s.elements)) for n, s in rs.sets.items()},
            "chains": sorted(rs.chains),
            "ingress": dict(rs.ingress),
            "egress": dict(rs.egress),
        }, indent=2))
        return 0
    text = dp.show()
    print(text if text else f"# no {args.datapath} state named {args.table} in the kernel")
    return 0


def run_diff(args: argparse.Namespace) -> int:
    desired = compile_cluster(load_cluster(args.files, recursive=args.recursive))
    dp = _datapath(args)
    delta = dp.diff(desired)
    lines = delta.describe()
    if isinstance(dp, NftDatapath):
        kt = dp.read_table(desired.chains)
        if kt is None:
            lines.insert(0, f"+ table inet {args.table}")
        else:
            # What the plan does not show: the base chain, foreign objects, flags.
            lines[:0] = [f"~ {d}" for d in kt.drift if not d.startswith("chain ")
                         or "foreign" in d]
    elif (details := getattr(dp, "diff_details", None)) is not None:
        lines[:0] = details(desired)  # the same, from a datapath that says it (iptables)
    for line in lines:
        print(line)
    return 1 if lines else 0


def run_apply(args: argparse.Namespace) -> int:
    desired = compile_cluster(load_cluster(args.files, strict_cidr=args.strict_cidr,
                                           recursive=args.recursive))
    dp = _datapath(args)
    dp.check()
    delta = dp.apply(desired)
    summary = ", ".join(f"{k}={v}" for k, v in delta.summary().items() if v)
    print(f"applied: {summary or 'nothing to change'}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    _datapath(args).remove()
    return 0
