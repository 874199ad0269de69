"""Runs conformance cases against a datapath and compares with the expected verdicts.

A datapath judges every pair of a case's probe groups; the model datapath is the
reference evaluator, the kernel datapaths program the case for real and probe it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from xml.etree import ElementTree

from stockade.conformance.case import Case, ProbeGroup
from stockade.engine.evaluate import Evaluator
from stockade.model.validate import validate_policy

Pair = tuple[str, str]
Judgement = dict[tuple[int, str, str], bool]  # (probe group index, from, to) -> allowed


class CaseBackend(Protocol):
    """What the runner needs of a datapath: verdicts for every probed pair of a case."""

    name: str

    def judge(self, case: Case) -> Judgement: ...


class ModelDatapath:
    """The reference evaluator as a datapath."""

    name = "model"

    def judge(self, case: Case) -> Judgement:
        ev = Evaluator(case.cluster)
        out: Judgement = {}
        for gi, group in enumerate(case.probes):
            for src, dst in group.judged(case):
                flow = ev.flow(src, dst, group.port, group.protocol)
                out[(gi, src.key, dst.key)] = ev.allowed(flow)
        return out


@dataclass(frozen=True)
class Mismatch:
    group: ProbeGroup
    src: str
    dst: str
    expected: bool

    def render(self, case_id: str) -> str:
        want = "allow" if self.expected else "deny"
        got = "deny" if self.expected else "allow"
        return f"FAIL {case_id}: {self.group.render()} {self.src} -> {self.dst}: " \
               f"expected {want}, got {got}"


@dataclass(frozen=True)
class CaseResult:
    case: Case
    mismatches: tuple[Mismatch, ...]
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.mismatches and not self.error


def check_case(case: Case, datapath: CaseBackend) -> CaseResult:
    problems = [line for p in case.cluster.policies for line in _invalid(p)]
    if problems:
        return CaseResult(case, (), "invalid policy: " + "; ".join(problems))
    try:
        judged = datapath.judge(case)
    except ValueError as exc:
        return CaseResult(case, (), str(exc))
    mismatches = []
    for gi, group in enumerate(case.probes):
        for src, dst in group.judged(case):
            expected = group.expected(src.key, dst.key)
            got = judged.get((gi, src.key, dst.key))
            if got is None or got != expected:
                mismatches.append(Mismatch(group, src.key, dst.key, expected))
    return CaseResult(case, tuple(mismatches))


def _invalid(policy: object) -> Iterable[str]:
    from stockade.model.policy import NetworkPolicy

    assert isinstance(policy, NetworkPolicy)
    return [f"{policy.key}: {e.render()}" for e in validate_policy(policy)]


# ---- reports for CI (`stockade conformance -o json|junit`) --------------------------------

def failures(result: CaseResult) -> list[str]:
    """Every failure of a case, one message each: its error, or each mismatched pair."""
    out = [f"FAIL {result.case.id}: {result.error}"] if result.error else []
    return out + [m.render(result.case.id) for m in result.mismatches]


def results_json(results: Sequence[tuple[CaseResult, float]], datapath: str) -> dict[str, Any]:
    """`cases`: id, passed, failures (messages) and seconds taken, in the order run."""
    return {
        "datapath": datapath,
        "passed": sum(r.passed for r, _ in results),
        "failed": sum(not r.passed for r, _ in results),
        "cases": [{"id": r.case.id, "passed": r.passed, "failures": failures(r),
                   "seconds": round(t, 3)} for r, t in results],
    }


def results_junit(results: Sequence[tuple[CaseResult, float]], datapath: str) -> str:
    """JUnit XML: one testsuite, one testcase per case; a failing case has one <failure>
    whose message counts its failures and whose text lists them (pair by pair)."""
    suite = ElementTree.Element("testsuite", {
        "name": f"stockade conformance ({datapath})",
        "tests": str(len(results)),
        "failures": str(sum(not r.passed for r, _ in results)),
        "errors": "0", "skipped": "0",
        "time": f"{sum(t for _, t in results):.3f}",
    })
    for result, seconds in results:
        case = ElementTree.SubElement(suite, "testcase", {
            "classname": f"conformance.{datapath}", "name": result.case.id,
            "time": f"{seconds:.3f}"})
        if not result.passed:
            found = failures(result)
            first = result.error or f"{len(found)} probe(s) got the wrong verdict"
            failure = ElementTree.SubElement(case, "failure", {
                "message": first, "type": "error" if result.error else "mismatch"})
            failure.text = "\n".join(found)
    ElementTree.indent(suite)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' \
        + ElementTree.tostring(suite, encoding="unicode") + "\n"
