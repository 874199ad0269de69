"""Every case of the shared validation corpus, checked as its FORMAT.md says."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.support import shared
from tests.support.validation_corpus import (
    Expect,
    ExpectedError,
    ValidationCase,
    check_case,
    load_case,
)

from stockade.model.field import INVALID

CORPUS = shared("validation")
FILES = sorted(CORPUS.glob("*.yaml")) if CORPUS.is_dir() else []

pytestmark = pytest.mark.skipif(
    not CORPUS.is_dir(), reason=f"validation corpus not found at {CORPUS}")


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_case(path: Path) -> None:
    result = check_case(load_case(path))
    assert result.passed, "\n".join(result.problems)


def test_corpus_is_not_empty() -> None:
    assert FILES, f"no *.yaml case in {CORPUS}"


def _case(rule: str, manifest: object, expect: Expect,
          gates: tuple[tuple[str, bool], ...] = ()) -> ValidationCase:
    return ValidationCase(id="x", rule=rule, description="", manifest=manifest,
                          expect=expect, gates=gates)


POLICY = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "api", "namespace": "shop"},
    "spec": {"ingress": [{"ports": [{"port": 0}]}]},
}


def test_checker_catches_a_wrong_expectation() -> None:
    # The checker must fail a case whose expectation does not hold, or it proves nothing.
    right = Expect(False, path="spec.ingress[0].ports[0].port", reason=INVALID,
                   detail="must be between 1 and 65535")
    assert check_case(_case("V14", POLICY, right)).passed
    wrong_path = Expect(False, path="spec.ingress[0].ports[0].endPort", reason=INVALID)
    assert not check_case(_case("V14", POLICY, wrong_path)).passed
    wrong_detail = Expect(False, path="spec.ingress[0].ports[0].port", reason=INVALID,
                          detail="nope")
    assert not check_case(_case("V14", POLICY, wrong_detail)).passed
    assert not check_case(_case("valid", POLICY, Expect(True))).passed


def test_checker_compares_the_error_multiset() -> None:
    port = ExpectedError("spec.ingress[0].ports[0].port", INVALID)
    assert check_case(_case("V14", POLICY, Expect(False, errors=(port,)))).passed
    assert not check_case(_case("V14", POLICY, Expect(False, errors=(port, port)))).passed


def test_checker_checks_defaulted_values() -> None:
    empty = {**POLICY, "spec": {}}
    right = Expect(True, defaulted=(("spec.policyTypes", ["Ingress"]), ("spec.podSelector", {})))
    assert check_case(_case("valid", empty, right)).passed
    wrong = Expect(True, defaulted=(("spec.policyTypes", ["Ingress", "Egress"]),))
    assert not check_case(_case("valid", empty, wrong)).passed
    absent = Expect(True, defaulted=(("spec.ingress[0].ports[0].protocol", "TCP"),))
    assert not check_case(_case("valid", empty, absent)).passed


def test_checker_refuses_unknown_gates() -> None:
    case = _case("valid", POLICY, Expect(True), gates=(("SomeFutureGate", True),))
    assert "not modelled" in check_case(case).problems[0]


def test_checker_honours_the_strict_cidr_gate() -> None:
    manifest = {**POLICY, "spec": {"ingress": [{"from": [{"ipBlock": {"cidr": "10.1.2.3/16"}}]}]}}
    on = (("StrictIPCIDRValidation", True),)
    assert check_case(_case("valid", manifest, Expect(True))).passed
    assert not check_case(_case("valid", manifest, Expect(True), gates=on)).passed
    rejected = Expect(False, path="spec.ingress[0].from[0].ipBlock.cidr", reason=INVALID)
    assert check_case(_case("V24", manifest, rejected, gates=on)).passed


def test_decode_case_checks_the_path() -> None:
    doc = {**POLICY, "spec": {"ingres": []}}
    assert check_case(_case("decode", doc, Expect(False, path="spec.ingres"))).passed
    assert not check_case(_case("decode", doc, Expect(False, path="spec.ingress"))).passed
    assert not check_case(_case("decode", POLICY, Expect(False))).passed
    # A document that fails to decode fails any non-decode case.
    assert not check_case(_case("V14", doc, Expect(False))).passed
