"""Runs conformance cases against a datapath and compares with the expected verdicts.

A datapath judges every pair of a case's probe groups; the model datapath is the
reference evaluator, the kernel datapaths program the case for real and probe it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

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
