"""`stockade conformance DIR`: run conformance cases against a datapath."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from stockade.cli.inputs import add_output, positive_seconds
from stockade.conformance.case import STANDARD_CLUSTER, Case, parse_case
from stockade.conformance.runner import (
    CaseBackend,
    CaseResult,
    ModelDatapath,
    check_case,
    failures,
    results_json,
    results_junit,
)
from stockade.datapath import DATAPATHS as KERNEL_DATAPATHS
from stockade.engine.report import json_text
from stockade.errors import InputError
from stockade.load import read_text
from stockade.model.parse import parse_documents

DATAPATHS = ("model", *KERNEL_DATAPATHS)


def register(sub: Any) -> None:
    p = sub.add_parser("conformance", help="run conformance cases (FORMAT.md) against a datapath")
    p.add_argument("paths", nargs="+", metavar="DIR|FILE")
    p.add_argument("--datapath", default="model", choices=DATAPATHS,
                   help="model: the reference evaluator; nft, iptables, ebpf: that datapath "
                   "in the kernel, with real packets")
    p.add_argument("--probe-timeout", type=positive_seconds, default=1.0, metavar="SECONDS",
                   help="how long a probe waits before it counts as denied (nft)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary line")
    add_output(p, ("txt", "json", "junit"),
               help="txt: a line per case as it runs; json: cases with id, passed, failures; "
                    "junit: JUnit XML, a testcase per case (default txt)")
    p.set_defaults(run=run)


def load_cases(paths: list[str]) -> list[Case]:
    cases: list[Case] = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            files = sorted(f for f in p.glob("*.yaml") if f.name != STANDARD_CLUSTER)
            std_path = p / STANDARD_CLUSTER
        elif p.is_file():
            files = [p]
            std_path = p.parent / STANDARD_CLUSTER
        else:
            raise InputError("no such file or directory", source=path)
        standard = None
        if std_path.is_file():
            docs = parse_documents(read_text(str(std_path)), str(std_path))
            standard = docs[0] if docs else None
        for f in files:
            cases.append(parse_case(read_text(str(f)), str(f), standard))
    return cases


def make_datapath(args: argparse.Namespace) -> CaseBackend:
    if args.datapath != "model":
        from stockade.conformance.kernel import KernelDatapath

        return KernelDatapath(probe_timeout=args.probe_timeout, datapath=args.datapath)
    return ModelDatapath()


def run(args: argparse.Namespace) -> int:
    cases = load_cases(args.paths)
    datapath = make_datapath(args)
    try:
        if args.output == "txt":
            return _run_cases(cases, datapath, args.quiet)
        results = _judged(cases, datapath)
    finally:
        close = getattr(datapath, "close", None)
        if close is not None:
            close()
    if args.output == "json":
        sys.stdout.write(json_text(results_json(results, args.datapath)))
    else:
        sys.stdout.write(results_junit(results, args.datapath))
    return 0 if all(r.passed for r, _ in results) else 1


def _judged(cases: list[Case], datapath: CaseBackend) -> list[tuple[CaseResult, float]]:
    out = []
    for case in cases:
        start = time.monotonic()
        result = check_case(case, datapath)
        out.append((result, time.monotonic() - start))
    return out


def _run_cases(cases: list[Case], datapath: CaseBackend, quiet: bool) -> int:
    passed = failed = 0
    for case in cases:
        result = check_case(case, datapath)
        if result.passed:
            passed += 1
            if not quiet:
                print(f"ok   {case.id}")
            continue
        failed += 1
        for line in failures(result):
            print(line)
    print(f"{passed} passed, {failed} failed")
    sys.stdout.flush()
    return 0 if failed == 0 else 1
