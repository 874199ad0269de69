"""Validation cases (`../shared/validation/*.yaml`, see FORMAT.md there): read and check.

Test support, not part of the package: tests/unit/test_validation_corpus.py
finds the corpus with :func:`tests.support.shared` and checks every case.

A case holds one submitted document and the API server's verdict on it. Checking
a case decodes the document, validates it with the case's feature gates and
compares the outcome with `expect` exactly as FORMAT.md prescribes: decode
cases by the failing field, rejected cases by one (path, reason, detail) error
and, when listed, the complete multiset of (path, reason), accepted cases by the
absence of errors and by the `defaulted` values.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stockade.errors import DecodeError, InputError
from stockade.model.decode import decode_network_policy
from stockade.model.field import FieldError
from stockade.model.labels import Labels
from stockade.model.parse import parse_documents
from stockade.model.policy import IPBlock, NetworkPolicy, Peer, PolicyPort, Rule
from stockade.model.selector import Requirement, Selector
from stockade.model.validate import validate_policy, warn_policy

RULES = frozenset({f"V{i}" for i in range(1, 29)} | {"valid", "decode"})
STRICT_CIDR_GATE = "StrictIPCIDRValidation"
SUPPORTED_GATES = frozenset({STRICT_CIDR_GATE})
_REQUIRED_KEYS = ("id", "rule", "description", "expect", "manifest")
_PATH_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


@dataclass(frozen=True)
class ExpectedError:
    path: str
    reason: str


@dataclass(frozen=True)
class Expect:
    valid: bool
    path: str | None = None
    reason: str | None = None
    detail: str | None = None
    errors: tuple[ExpectedError, ...] | None = None
    warnings: tuple[str, ...] = ()
    defaulted: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class ValidationCase:
    id: str
    rule: str
    description: str
    expect: Expect
    manifest: Any = field(compare=False)
    gates: tuple[tuple[str, bool], ...] = ()
    notes: str = ""
    file: str = ""

    @property
    def strict_cidr(self) -> bool:
        return dict(self.gates).get(STRICT_CIDR_GATE, False)


@dataclass(frozen=True)
class CaseResult:
    """What checking a case found: `problems` fail it, `notes` are advisory."""

    case: ValidationCase
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    errors: tuple[FieldError, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.problems


# --- reading -------------------------------------------------------------------


def load_case(path: str | Path) -> ValidationCase:
    """One case file; InputError names the file when it does not follow FORMAT.md."""
    p = Path(path)
    source = str(p)
    docs = parse_documents(p.read_text(encoding="utf-8"), source)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise InputError("a case file holds exactly one mapping", source=source)
    raw: dict[str, Any] = docs[0]
    missing = [k for k in _REQUIRED_KEYS if k not in raw]
    if missing:
        raise InputError(f"missing key(s): {', '.join(missing)}", source=source)
    if raw["id"] != p.stem:
        raise InputError(f"id {raw['id']!r} differs from the file name", source=source)
    if raw["rule"] not in RULES:
        raise InputError(f"unknown rule {raw['rule']!r}", source=source)
    return ValidationCase(
        id=str(raw["id"]),
        rule=str(raw["rule"]),
        description=str(raw["description"]),
        expect=_expect(raw["expect"], source),
        manifest=raw["manifest"],
        gates=_gates(raw.get("gates"), source),
        notes=str(raw.get("notes") or ""),
        file=source,
    )


def load_corpus(folder: str | Path) -> list[ValidationCase]:
    return [load_case(p) for p in sorted(Path(folder).glob("*.yaml"))]


def _expect(raw: Any, source: str) -> Expect:
    if not isinstance(raw, dict) or not isinstance(raw.get("valid"), bool):
        raise InputError("expect needs `valid: true|false`", source=source)
    errors = raw.get("errors")
    if errors is not None and not isinstance(errors, list):
        raise InputError("expect.errors must be a list", source=source)
    defaulted = raw.get("defaulted") or {}
    if not isinstance(defaulted, dict):
        raise InputError("expect.defaulted must be a mapping", source=source)
    return Expect(
        valid=raw["valid"],
        path=_optional_text(raw.get("path")),
        reason=_optional_text(raw.get("reason")),
        detail=_optional_text(raw.get("detail")),
        errors=None if errors is None else tuple(
            ExpectedError(str(e["path"]), str(e["reason"])) for e in errors),
        warnings=tuple(str(w) for w in raw.get("warnings") or ()),
        defaulted=tuple((str(k), v) for k, v in defaulted.items()),
    )


def _gates(raw: Any, source: str) -> tuple[tuple[str, bool], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not all(isinstance(v, bool) for v in raw.values()):
        raise InputError("gates must map gate names to true or false", source=source)
    return tuple((str(k), v) for k, v in raw.items())


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


# --- checking ------------------------------------------------------------------


def check_case(case: ValidationCase) -> CaseResult:
    unsupported = sorted(name for name, _ in case.gates if name not in SUPPORTED_GATES)
    if unsupported:
        return CaseResult(case, (f"feature gate(s) not modelled: {', '.join(unsupported)}",))
    try:
        policy = decode_network_policy(case.manifest)
    except DecodeError as exc:
        return CaseResult(case, tuple(_check_decode_error(case, exc)))
    if case.rule == "decode":
        return CaseResult(case, ("expected a decode error, but the document decoded",))
    errors = tuple(validate_policy(policy, strict_cidr=case.strict_cidr))
    if case.expect.valid:
        problems = [f"unexpected error: {e.render()}" for e in errors]
        problems += _check_defaulted(policy, case.expect.defaulted)
        return CaseResult(case, tuple(problems), _warning_notes(case, policy), errors)
    return CaseResult(case, tuple(_check_rejected(case.expect, errors)), (), errors)


def _check_decode_error(case: ValidationCase, exc: DecodeError) -> list[str]:
    if case.rule != "decode":
        return [f"the document did not decode: {exc.message}"]
    want = case.expect.path
    if want is not None and exc.path != want:
        return [f"decode error names {exc.path or '(the document)'!r}, "
                f"expected {want!r}: {exc.message}"]
    return []


def _check_rejected(expect: Expect, errors: tuple[FieldError, ...]) -> list[str]:
    if not errors:
        return ["expected the policy to be rejected, but it validated"]
    problems = []
    if not any(_matches(e, expect) for e in errors):
        want = ": ".join(x for x in (expect.path, expect.reason, expect.detail) if x)
        got = "; ".join(e.render() for e in errors)
        problems.append(f"no error matches {want!r}; got: {got}")
    if expect.errors is not None:
        want_set = Counter((e.path, e.reason) for e in expect.errors)
        got_set = Counter((e.path, e.reason) for e in errors)
        if want_set != got_set:
            problems.append(f"errors differ: missing {sorted((want_set - got_set).elements())}, "
                            f"unexpected {sorted((got_set - want_set).elements())}")
    return problems


def _matches(error: FieldError, expect: Expect) -> bool:
    if expect.path is not None and error.path != expect.path:
        return False
    if expect.reason is not None and error.reason != expect.reason:
        return False
    return expect.detail is None or expect.detail in error.render()


def _warning_notes(case: ValidationCase, policy: NetworkPolicy) -> tuple[str, ...]:
    warned = {w.path for w in warn_policy(policy)}
    return tuple(f"expected a warning on {p}" for p in case.expect.warnings if p not in warned)


def _check_defaulted(policy: NetworkPolicy, pairs: tuple[tuple[str, Any], ...]) -> list[str]:
    if not pairs:
        return []
    doc = policy_document(policy)
    problems = []
    for path, want in pairs:
        found, got = lookup(doc, path)
        if not found:
            problems.append(f"defaulted {path}: absent, expected {want!r}")
        elif got != want or type(got) is not type(want):
            problems.append(f"defaulted {path}: {got!r}, expected {want!r}")
    return problems


# --- the defaulted object as JSON ------------------------------------------------


def lookup(doc: Any, path: str) -> tuple[bool, Any]:
    """The value at an API path such as `spec.ingress[0].ports[0].protocol`."""
    value = doc
    for name, index in _PATH_TOKEN.findall(path):
        if name:
            if not isinstance(value, dict) or name not in value:
                return False, None
            value = value[name]
        else:
            if not isinstance(value, list) or int(index) >= len(value):
                return False, None
            value = value[int(index)]
    return True, value


def policy_document(policy: NetworkPolicy) -> dict[str, Any]:
    """The policy as the API server would store it (empty optional fields omitted)."""
    meta: dict[str, Any] = {"name": policy.name, "namespace": policy.namespace}
    if policy.generate_name:
        meta["generateName"] = policy.generate_name
    _put(meta, "labels", dict(policy.labels))
    _put(meta, "annotations", dict(policy.annotations))
    spec: dict[str, Any] = {"podSelector": _selector(policy.pod_selector)}
    _put(spec, "ingress", [_rule(r, "from") for r in policy.ingress])
    _put(spec, "egress", [_rule(r, "to") for r in policy.egress])
    spec["policyTypes"] = list(policy.policy_types)
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": meta, "spec": spec}


def _put(target: dict[str, Any], key: str, value: Any) -> None:
    # Go's `omitempty`: empty lists and maps are not written.
    if value:
        target[key] = value


def _selector(selector: Selector) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _put(out, "matchLabels", _labels(selector.match_labels))
    _put(out, "matchExpressions", [_requirement(r) for r in selector.match_expressions])
    return out


def _labels(labels: Labels) -> dict[str, str]:
    return dict(labels.items_tuple())


def _requirement(req: Requirement) -> dict[str, Any]:
    out: dict[str, Any] = {"key": req.key, "operator": req.operator}
    _put(out, "values", list(req.values))
    return out


def _rule(rule: Rule, peers_key: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _put(out, "ports", [_port(p) for p in rule.ports])
    _put(out, peers_key, [_peer(p) for p in rule.peers])
    return out


def _port(port: PolicyPort) -> dict[str, Any]:
    out: dict[str, Any] = {"protocol": port.protocol}
    if port.port is not None:
        out["port"] = port.port
    if port.end_port is not None:
        out["endPort"] = port.end_port
    return out


def _peer(peer: Peer) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if peer.pod_selector is not None:
        out["podSelector"] = _selector(peer.pod_selector)
    if peer.namespace_selector is not None:
        out["namespaceSelector"] = _selector(peer.namespace_selector)
    if peer.ip_block is not None:
        out["ipBlock"] = _ip_block(peer.ip_block)
    return out


def _ip_block(block: IPBlock) -> dict[str, Any]:
    out: dict[str, Any] = {"cidr": block.cidr}
    _put(out, "except", list(block.except_))
    return out

