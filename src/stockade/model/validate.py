"""Validation of NetworkPolicy objects with the API server's rules, on create.

A port of `ValidateNetworkPolicy` (pkg/apis/networking/validation) and what it
calls: ValidateObjectMeta, metav1 ValidateLabelSelector (label values in
selector requirements checked, as for any new object), ValidateNetworkPolicyPort,
ValidateNetworkPolicyPeer and ValidateIPBlock. Every error is collected, in the
API server's order; the only skips are upstream's own (an empty or unparsable
cidr skips its excepts, an unparsable except skips its subset test, more than two
policyTypes skip the per-entry check).

The input is the decoded, defaulted object: an absent protocol is already TCP,
empty policyTypes are already inferred, as after API defaulting.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping

from stockade.model import names
from stockade.model.cidr import (
    INVALID_CIDR,
    cidr_warnings,
    is_strict_subset,
    parse_cidr_sloppy,
    strict_cidr_problems,
)
from stockade.model.field import (
    FORBIDDEN,
    INVALID,
    REQUIRED,
    TOO_LONG,
    UNSUPPORTED,
    FieldError,
    invalid_each,
)
from stockade.model.labels import Labels
from stockade.model.policy import (
    DIRECTIONS,
    PROTOCOLS,
    IPBlock,
    NetworkPolicy,
    Peer,
    PolicyPort,
    Rule,
)
from stockade.model.selector import DOES_NOT_EXIST, EXISTS, IN, NOT_IN, Requirement, Selector

TOTAL_ANNOTATION_SIZE_LIMIT = 256 * 1024
MAX_POLICY_TYPES = len(DIRECTIONS)
WARNING = "Warning"


def validate_policy(policy: NetworkPolicy, *, strict_cidr: bool = False) -> list[FieldError]:
    """Every error the API server reports when this policy is created.

    `strict_cidr` is the StrictIPCIDRValidation feature gate (off by default).
    """
    return [*validate_object_meta(policy), *_validate_spec(policy, strict_cidr)]


# --- metadata ------------------------------------------------------------------


def validate_object_meta(policy: NetworkPolicy) -> list[FieldError]:
    """ValidateObjectMeta for a namespaced object named as a DNS-1123 subdomain."""
    errs = []
    if policy.generate_name:
        errs += invalid_each("metadata.generateName", policy.generate_name,
                              names.name_is_dns_subdomain(policy.generate_name, True))
    # The API server generates the name before it validates, so a generateName
    # stands in for the name; a bad prefix is then reported on both fields.
    name = policy.name or (names.generated_name(policy.generate_name)
                           if policy.generate_name else "")
    errs += validate_names(name, policy.namespace)
    errs += validate_labels(policy.labels, "metadata.labels")
    errs += validate_annotations(policy.annotations, "metadata.annotations")
    return errs


def validate_names(name: str, namespace: str) -> list[FieldError]:
    """metadata.name (a DNS-1123 subdomain) and metadata.namespace (a DNS-1123 label)."""
    errs = []
    if not name:
        errs.append(FieldError("metadata.name", REQUIRED, "name or generateName is required"))
    else:
        errs += invalid_each("metadata.name", name, names.name_is_dns_subdomain(name, False))
    if not namespace:
        errs.append(FieldError("metadata.namespace", REQUIRED))
    else:
        errs += invalid_each("metadata.namespace", namespace,
                              names.name_is_dns_label(namespace, False))
    return errs


def validate_labels(labels: Mapping[str, str], path: str) -> list[FieldError]:
    """Label keys and values; every error names the map, not the key."""
    known = isinstance(labels, Labels)  # hashable, and interned by decoding
    if known and labels in VALID.seen:
        return []
    errs: list[FieldError] = []
    for pair in labels.items_tuple() if isinstance(labels, Labels) else labels.items():
        if known and pair in VALID.seen:  # a label seen valid in another map (app=web)
            continue
        key, value = pair
        bad = names.is_qualified_name(key)
        if bad:
            errs += invalid_each(path, key, bad)
        bad_value = names.is_label_value(value)
        if bad_value:
            errs += invalid_each(path, value, bad_value)
        if known and not bad and not bad_value:
            VALID.add(pair)
    if known and not errs:
        VALID.add(labels)
    return errs


class KnownValid:
    """Values already found valid (label maps, selectors, port lists), by value.

    Whether a value is valid depends on the value only (its path only words the
    errors), and a cluster repeats a few of them thousands of times: replicas
    share their labels and ports, policies their selectors. Callers give
    hashable values only; bounded, as the agent validates for as long as it runs.
    """

    MAX = 1 << 16

    def __init__(self) -> None:
        self.seen: set[Hashable] = set()
        # Objects found valid, by identity (key: their ids), each entry holding them so
        # that their ids stay theirs. Hashing a spec's selectors, rules and peers by
        # value would cost much of what validating them costs.
        self.held: dict[tuple[object, ...], tuple[object, ...]] = {}

    def add(self, value: Hashable) -> None:
        if len(self.seen) >= self.MAX:
            self.seen.clear()
        self.seen.add(value)

    def holds(self, key: tuple[object, ...], parts: tuple[object, ...]) -> bool:
        held = self.held.get(key)
        return held is not None and all(a is b for a, b in zip(held, parts, strict=True))

    def hold(self, key: tuple[object, ...], parts: tuple[object, ...]) -> None:
        if len(self.held) >= self.MAX:
            self.held.clear()
        self.held[key] = parts

    def clear(self) -> None:
        self.seen.clear()
        self.held.clear()


VALID = KnownValid()


def validate_annotations(annotations: Mapping[str, str], path: str) -> list[FieldError]:
    """Annotation keys are qualified names up to case; all of them share a size limit."""
    if not annotations:
        return []
    errs = []
    for key in annotations:
        errs += invalid_each(path, key, names.is_qualified_name(names.go_lower(key)))
    size = sum(names.byte_len(k) + names.byte_len(v) for k, v in annotations.items())
    if size > TOTAL_ANNOTATION_SIZE_LIMIT:
        errs.append(FieldError(path, TOO_LONG,
                               f"may not be more than {TOTAL_ANNOTATION_SIZE_LIMIT} bytes"))
    return errs


# --- selectors -----------------------------------------------------------------


def validate_selector(selector: Selector, path: str) -> list[FieldError]:
    """metav1 ValidateLabelSelector with label values in requirements checked."""
    if selector in VALID.seen:
        return []
    errs = validate_labels(selector.match_labels, f"{path}.matchLabels")
    for i, requirement in enumerate(selector.match_expressions):
        errs += validate_requirement(requirement, f"{path}.matchExpressions[{i}]")
    if not errs:
        VALID.add(selector)
    return errs


def validate_requirement(req: Requirement, path: str) -> list[FieldError]:
    errs = []
    if req.operator in (IN, NOT_IN):
        if not req.values:
            errs.append(FieldError(f"{path}.values", REQUIRED,
                                   "must be specified when `operator` is 'In' or 'NotIn'"))
    elif req.operator in (EXISTS, DOES_NOT_EXIST):
        if req.values:
            errs.append(FieldError(
                f"{path}.values", FORBIDDEN,
                "may not be specified when `operator` is 'Exists' or 'DoesNotExist'"))
    else:
        errs.append(FieldError(f"{path}.operator", INVALID, "not a valid selector operator",
                               req.operator))
    errs += invalid_each(f"{path}.key", req.key, names.is_qualified_name(req.key))
    # Values are checked whatever the operator, even where they are forbidden.
    for j, value in enumerate(req.values):
        errs += invalid_each(f"{path}.values[{j}]", value, names.is_label_value(value))
    return errs


# --- spec ----------------------------------------------------------------------


def _validate_spec(policy: NetworkPolicy, strict_cidr: bool) -> list[FieldError]:
    # Decoding gives policies with equal specs the very same parts (`decode._SPECS`):
    # 75,000 policies of 3,000 specs validate 3,000 (what the errors say depends on
    # the spec alone).
    parts = (policy.pod_selector, policy.ingress, policy.egress, policy.policy_types)
    key = (*map(id, parts), strict_cidr)
    if VALID.holds(key, parts):
        return []
    errs = _spec_errors(policy, strict_cidr)
    if not errs:
        VALID.hold(key, parts)
    return errs


def _spec_errors(policy: NetworkPolicy, strict_cidr: bool) -> list[FieldError]:
    errs = validate_selector(policy.pod_selector, "spec.podSelector")
    for rules, field_name, peers_key in _rule_lists(policy):
        for i, rule in enumerate(rules):
            rule_path = f"spec.{field_name}[{i}]"
            for j, port in enumerate(rule.ports):
                errs += validate_port(port, f"{rule_path}.ports[{j}]")
            for k, peer in enumerate(rule.peers):
                errs += validate_peer(peer, f"{rule_path}.{peers_key}[{k}]",
                                      strict_cidr=strict_cidr)
    errs += validate_policy_types(policy.policy_types, "spec.policyTypes")
    return errs


def validate_policy_types(types: tuple[str, ...], path: str) -> list[FieldError]:
    if len(types) > MAX_POLICY_TYPES:
        # Upstream stops here: the entries themselves are not looked at.
        return [FieldError(path, INVALID, "may not specify more than two policyTypes",
                           list(types))]
    return [FieldError(f"{path}[{i}]", UNSUPPORTED, _supported(DIRECTIONS), t)
            for i, t in enumerate(types) if t not in DIRECTIONS]


def validate_port(port: PolicyPort, path: str) -> list[FieldError]:
    errs = []
    if port.protocol not in PROTOCOLS:
        errs.append(FieldError(f"{path}.protocol", UNSUPPORTED, _supported(PROTOCOLS),
                               port.protocol))
    end_path = f"{path}.endPort"
    if isinstance(port.port, int):
        errs += invalid_each(f"{path}.port", port.port, names.is_valid_port_num(port.port))
        if port.end_port is not None:
            if port.end_port < port.port:
                errs.append(FieldError(end_path, INVALID,
                                       "must be greater than or equal to `port`", port.end_port))
            errs += invalid_each(end_path, port.end_port,
                                  names.is_valid_port_num(port.end_port))
    elif isinstance(port.port, str):
        if port.end_port is not None:
            errs.append(FieldError(end_path, INVALID,
                                   "may not be specified when `port` is non-numeric",
                                   port.end_port))
        errs += invalid_each(f"{path}.port", port.port, names.is_valid_port_name(port.port))
    elif port.end_port is not None:
        errs.append(FieldError(end_path, INVALID,
                               "may not be specified when `port` is not specified",
                               port.end_port))
    return errs


def validate_peer(peer: Peer, path: str, *, strict_cidr: bool = False) -> list[FieldError]:
    """Exactly one kind of peer: selectors (one or both), or an ipBlock alone."""
    errs = []
    if peer.pod_selector is not None:
        errs += validate_selector(peer.pod_selector, f"{path}.podSelector")
    if peer.namespace_selector is not None:
        errs += validate_selector(peer.namespace_selector, f"{path}.namespaceSelector")
    if peer.ip_block is not None:
        errs += validate_ip_block(peer.ip_block, f"{path}.ipBlock", strict_cidr=strict_cidr)
    count = sum(s is not None for s in (peer.pod_selector, peer.namespace_selector,
                                        peer.ip_block))
    if count == 0:
        errs.append(FieldError(path, REQUIRED, "must specify a peer"))
    elif count > 1 and peer.ip_block is not None:
        errs.append(FieldError(path, FORBIDDEN, "may not specify both ipBlock and another peer"))
    return errs


def validate_ip_block(block: IPBlock, path: str, *, strict_cidr: bool = False) -> list[FieldError]:
    cidr_path = f"{path}.cidr"
    if not block.cidr:
        return [FieldError(cidr_path, REQUIRED)]
    errs = _cidr_errors(block.cidr, cidr_path, strict_cidr)
    cidr = parse_cidr_sloppy(block.cidr)
    if cidr is None:
        return errs
    for n, text in enumerate(block.except_):
        except_path = f"{path}.except[{n}]"
        errs += _cidr_errors(text, except_path, strict_cidr)
        inner = parse_cidr_sloppy(text)
        if inner is not None and not is_strict_subset(cidr, inner):
            errs.append(FieldError(except_path, INVALID, "must be a strict subset of `cidr`",
                                   text))
    return errs


def _cidr_errors(text: str, path: str, strict: bool) -> list[FieldError]:
    """IsValidCIDRForLegacyField: parsable always; canonical only under the gate."""
    if parse_cidr_sloppy(text) is None:
        return [FieldError(path, INVALID, INVALID_CIDR, text)]
    if not strict:
        return []
    return invalid_each(path, text, strict_cidr_problems(text))


# --- warnings ------------------------------------------------------------------


def warn_policy(policy: NetworkPolicy) -> list[FieldError]:
    """The API server's warnings on create: non-standard CIDR text (advisory).

    Reported with reason "Warning"; they never make a policy invalid.
    """
    out = []
    for path, text in _cidr_fields(policy):
        out += [FieldError(path, WARNING, msg) for msg in cidr_warnings(text)]
    return out


def _cidr_fields(policy: NetworkPolicy) -> Iterable[tuple[str, str]]:
    for rules, field_name, peers_key in _rule_lists(policy):
        for i, rule in enumerate(rules):
            for k, peer in enumerate(rule.peers):
                block = peer.ip_block
                if block is None or parse_cidr_sloppy(block.cidr) is None:
                    continue
                path = f"spec.{field_name}[{i}].{peers_key}[{k}].ipBlock"
                yield f"{path}.cidr", block.cidr
                for n, text in enumerate(block.except_):
                    yield f"{path}.except[{n}]", text


# --- helpers -------------------------------------------------------------------


def _rule_lists(policy: NetworkPolicy) -> tuple[tuple[tuple[Rule, ...], str, str], ...]:
    """Each rule list with its field name and the name of its peer list."""
    return ((policy.ingress, "ingress", "from"), (policy.egress, "egress", "to"))


def _supported(values: Iterable[str]) -> str:
    return "supported values: " + ", ".join(f'"{v}"' for v in values)
