"""Fuzzing the parser, the decoder, the validator and `stockade validate`.

Inputs start from valid manifests (the shared strategies rendered to dicts, and
the policies of the conformance corpus when ../shared/conformance exists) and
are mutated: keys deleted, values retyped or replaced by random JSON, unknown keys
inserted, deep nesting, huge integers, odd Unicode, empty strings, nulls. Random
text and YAML token soup go straight into `parse_documents`/`parse_objects`.

The contract under test (see stockade/errors.py): bad input raises a
`StockadeError` (an InputError naming the file and object) and nothing else; a
document that decodes can always be validated; the command line exits 0 or 2 and
never prints a traceback.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.property.strategies import (
    DEFAULT,
    DENSE,
    clusters,
    namespace_manifest,
    network_policies,
    pod_manifest,
    policy_manifests,
)
from tests.support import shared

from stockade.cli.main import main
from stockade.errors import DecodeError, StockadeError
from stockade.model.decode import decode_namespace, decode_network_policy, decode_pod
from stockade.model.field import FieldError
from stockade.model.parse import expand_lists, parse_documents, parse_objects
from stockade.model.policy import NetworkPolicy
from stockade.model.validate import validate_policy

CONFORMANCE = shared("conformance")

# --------------------------------------------------------------------------- seeds


def _conformance_policies() -> list[dict[str, Any]]:
    """Every policy of every conformance case (read with PyYAML, not the product)."""
    out: list[dict[str, Any]] = []
    if not CONFORMANCE.is_dir():
        return out
    for path in sorted(CONFORMANCE.glob("*.yaml")):
        try:
            case = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(case, dict):
            out.extend(p for p in case.get("policies") or [] if isinstance(p, dict))
    return out


CONFORMANCE_POLICIES = _conformance_policies()

FULL_METADATA: dict[str, Any] = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {
        "name": "full", "namespace": "x", "generateName": "full-", "uid": "1234",
        "resourceVersion": "7", "generation": 3, "selfLink": "/x",
        "creationTimestamp": "2024-01-02T03:04:05Z", "labels": {"a": "1"},
        "annotations": {"note": "text"}, "finalizers": ["f"],
        "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": "u",
                             "controller": True}],
        "managedFields": [{"manager": "kubectl", "operation": "Apply",
                           "time": "2024-01-02T03:04:05Z", "fieldsV1": {"f:spec": {}}}],
    },
    "spec": {
        "podSelector": {"matchExpressions": [{"key": "a", "operator": "In",
                                              "values": ["1", "2"]}]},
        "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
                              {"namespaceSelector": {}, "podSelector": {"matchLabels": {}}}],
                     "ports": [{"port": 80, "endPort": 90}, {"protocol": "UDP",
                                                             "port": "dns"}]}],
        "egress": [{}],
        "policyTypes": ["Ingress", "Egress"],
    },
}

HAND_SEEDS: list[Any] = [
    FULL_METADATA,
    {"apiVersion": "v1", "kind": "List", "items": [FULL_METADATA, FULL_METADATA]},
    {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
     "metadata": {"name": "empty"}},
]

policy_seeds = (network_policies(DEFAULT) | network_policies(DENSE)).flatmap(policy_manifests)
object_seeds = clusters(DEFAULT).flatmap(lambda c: st.sampled_from(
    [pod_manifest(e) for e in c.endpoints] + [namespace_manifest(n) for n in c.namespaces]))
_seed_options: dict[str, st.SearchStrategy[Any]] = {
    "policy": policy_seeds, "object": object_seeds, "hand": st.sampled_from(HAND_SEEDS)}
if CONFORMANCE_POLICIES:
    _seed_options["conformance"] = st.sampled_from(CONFORMANCE_POLICIES)
# Choose the kind of seed first, uniformly, whatever each kind costs to generate.
seeds = st.sampled_from(sorted(_seed_options)).flatmap(_seed_options.__getitem__).map(
    copy.deepcopy)

# --------------------------------------------------------------------------- random values

KNOWN_KEYS = (
    "apiVersion", "kind", "metadata", "spec", "status", "items", "name", "namespace",
    "generateName", "labels", "annotations", "creationTimestamp", "ownerReferences",
    "managedFields", "podSelector", "namespaceSelector", "ipBlock", "cidr", "except",
    "ingress", "egress", "from", "to", "ports", "port", "endPort", "protocol",
    "policyTypes", "matchLabels", "matchExpressions", "key", "operator", "values",
    "podIP", "podIPs", "ip", "containers", "containerPort",
)

# Python refuses str() of ints over 4300 digits (sys.get_int_max_str_digits()); YAML
# can still spell them, in hex. The product must run under the limit a real process
# has, while hypothesis must be able to print them: see `product_limits`.
PRODUCT_INT_DIGITS = sys.get_int_max_str_digits()
HUGE = 16 ** 5000
huge_ints = st.sampled_from([HUGE, 2**31 - 1, 2**31, -(2**31) - 1, 2**63, 2**64, 10**30,
                             -HUGE, 60 ** 3000])

TRICKY = (
    "", " ", "\t", "\n", "0", "-1", "65535", "65536", "80", "http", "HTTP", "a" * 64,
    "a" * 254, "x" * 5000, "10.0.0.0/8", "10.0.0.0/33", "010.000.0.0/08", "10.0.0.1/8",
    "::/0", "::ffff:1.2.3.4/128", "fe80::1%eth0/64", "1.2.3.4", "1.2.3.4/", "/8", "²",
    "\u0661\u0662\u0663.\u0660.\u0660.\u0660/\u0668",
    "\uff11\uff10.\uff10.\uff10.\uff10/\uff18", "\x00", "\u202e", "é", "🙂", "0x10", "TCP", "tcp",
    "SCTP", "Ingress", "ingress", "In", "in", "Exists", "kubernetes.io/metadata.name",
    "a/b/c", "-a-", "a..b", "null", "~", "yes", "y", "1e3", ".inf", "&a", "*a", "{", "'",
    '"', "2024-01-02T03:04:05Z", "2024-13-45T99:99:99Z", "v1", "networking.k8s.io/v1",
    "NetworkPolicy", "Pod", "Namespace", "List",
)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), huge_ints,
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(TRICKY),
)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=10), st.integers(-3, 3),
                 st.booleans(), st.none(), st.sampled_from(TRICKY))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)

# --------------------------------------------------------------------------- mutations


def _slots(root: list[Any], limit: int = 3000) -> list[tuple[Any, Any]]:
    """(container, key) of every value in the tree under root[0], root included."""
    out: list[tuple[Any, Any]] = [(root, 0)]
    i = 0
    while i < len(out) and len(out) < limit:
        parent, key = out[i]
        value = parent[key]
        if isinstance(value, dict):
            out.extend((value, k) for k in list(value))
        elif isinstance(value, list):
            out.extend((value, j) for j in range(len(value)))
        i += 1
    return out


def _retypes(value: Any) -> list[Any]:
    """The same value as other JSON types."""
    if isinstance(value, bool):
        return [str(value).lower(), int(value), [value], None]
    if isinstance(value, int):
        text = hex(value) if abs(value) > 10**4000 else str(value)
        return [text, float(value) if abs(value) < 2**1000 else 1e308, [value], {"v": value},
                value != 0]
    if isinstance(value, float):
        return [repr(value), [value], int(value) if value.is_integer() else 0]
    if isinstance(value, str):
        out: list[Any] = [[value], {value: value}, len(value), value.upper(), value * 2]
        if value.isascii() and value.isdigit() and len(value) < 100:
            out.append(int(value))
        return out
    if isinstance(value, list):
        return [{str(i): v for i, v in enumerate(value)}, value[0] if value else "", "",
                value * 2, [value]]
    if isinstance(value, dict):
        return [list(value.values()), list(value), "", [value], {"nested": value}]
    return [{}, [], "", 0, False]


def _nest(value: Any, depth: int, as_list: bool) -> Any:
    for _ in range(depth):
        value = [value] if as_list else {"a": value}
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Each mutation, with the values it prefers to hit (any value when none of those).
OPS: dict[str, Callable[[Any], bool]] = {
    "delete": lambda v: True,
    "replace": lambda v: True,
    "null": lambda v: True,
    "empty": lambda v: isinstance(v, dict | list),
    "scalar": lambda v: isinstance(v, dict | list),
    "huge": _is_int,
    "tricky": lambda v: isinstance(v, str),
    "retype": lambda v: True,
    "unknown_key": lambda v: isinstance(v, dict),
    "nest": lambda v: True,
    "duplicate": lambda v: isinstance(v, list) and bool(v),
}


@st.composite
def mutated(draw: st.DrawFn, seed: st.SearchStrategy[Any] = seeds, max_ops: int = 4) -> Any:
    """A seed document after 1..max_ops random mutations at random places."""
    root = [draw(seed, label="seed")]
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(sorted(OPS)))
        slots = _slots(root)
        preferred = [(p, k) for p, k in slots if OPS[op](p[k])]
        slots = preferred or slots
        parent, key = slots[draw(st.integers(0, len(slots) - 1))]
        value = parent[key]
        if op == "delete" and parent is not root:
            del parent[key]
        elif op == "replace":
            parent[key] = draw(json_values)
        elif op == "null":
            parent[key] = None
        elif op == "empty":
            parent[key] = draw(st.sampled_from(["", [], {}, 0, False, [None], [{}]]))
        elif op == "scalar":
            parent[key] = draw(scalars)
        elif op == "huge":
            parent[key] = draw(huge_ints)
        elif op == "tricky":
            parent[key] = draw(st.sampled_from(TRICKY))
        elif op == "retype":
            parent[key] = draw(st.sampled_from(_retypes(value)))
        elif op == "unknown_key":
            if isinstance(value, dict):
                value[draw(keys)] = draw(json_values)
            else:
                parent[key] = {draw(keys): value}
        elif op == "nest":
            parent[key] = _nest(value, draw(st.integers(1, 40)), draw(st.booleans()))
        elif op == "duplicate" and isinstance(value, list) and value:
            value.append(copy.deepcopy(value[draw(st.integers(0, len(value) - 1))]))
    # A fresh object: hypothesis would otherwise print it as "deepcopy(<the seed>)",
    # without the mutations.
    return copy.deepcopy(root[0])


# --------------------------------------------------------------------------- text


class _Dumper(yaml.SafeDumper):
    """SafeDumper that can write the huge ints Python will not turn into decimal."""


def _represent_int(dumper: yaml.SafeDumper, value: int) -> yaml.ScalarNode:
    text = hex(value) if value.bit_length() > 10000 else str(value)
    return dumper.represent_scalar("tag:yaml.org,2002:int", text)


_Dumper.add_representer(int, _represent_int)


def to_text(docs: list[Any], how: str) -> str:
    """Documents as a YAML stream, JSON documents, or a `kind: List`."""
    if how == "json":
        with contextlib.suppress(ValueError, TypeError):
            return "\n".join(json.dumps(d) for d in docs)
    if how == "list":
        docs = [{"apiVersion": "v1", "kind": "List", "items": docs}]
    return yaml.dump_all(docs, Dumper=_Dumper, allow_unicode=True)


TOKENS = (
    "!!int ", "!!float ", "!!bool ", "!!timestamp ", "!!binary ", "!!set ", "!!omap ",
    "!!pairs ", "!!str ", "!!null ", "!!seq ", "!!map ", "!!python/object:os.system ",
    "<<: ", "&a ", "*a", "*b", "? ", "- ", ": ", "{", "}", "[", "]", ", ", "\n", "  ", "\t",
    "---\n", "...\n", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "'", '"', "# c\n", "|\n",
    ">\n", "foo", "0x1F", "0o17", "0b101", "1_0", "190:20:30", "2001-02-30", "2001-01-01",
    ".nan", ".inf", "~", "null", "yes", "1e999", "9" * 40, "kind: NetworkPolicy\n",
    "apiVersion: networking.k8s.io/v1\n", "kind: Pod\n", "apiVersion: v1\n", "metadata:",
    "spec:", "ingress:", "ports:", "port: ", "name: a", "\x00", "\ufeff", "é", "🙂",
)

texts = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace")),
    st.lists(st.sampled_from(TOKENS), max_size=40).map("".join),
    # Fixed depths: near the recursion limit the outcome would depend on the stack.
    st.tuples(st.sampled_from((1, 10, 100, 10_000)), st.booleans()).map(
        lambda t: "a: " + ("[" * t[0] + "]" * t[0] if t[1] else "{a: " * t[0] + "}" * t[0])),
)


@st.composite
def corrupted_texts(draw: st.DrawFn) -> str:
    """Valid manifests as text with characters deleted, inserted or replaced."""
    docs = draw(st.lists(seeds, min_size=1, max_size=3))
    text = to_text(docs, draw(st.sampled_from(("yaml", "json"))))
    for _ in range(draw(st.integers(1, 5))):
        i = draw(st.integers(0, len(text)))
        piece = draw(st.sampled_from(TOKENS) | st.text(max_size=3))
        cut = draw(st.integers(0, 3))
        text = text[:i] + piece + text[i + cut:]
    return text


# --------------------------------------------------------------------------- checks


@pytest.fixture(autouse=True, scope="module")
def _printable_huge_ints() -> Iterator[None]:
    """Let hypothesis repr() the huge ints it generated (0: no limit)..."""
    sys.set_int_max_str_digits(0)
    yield
    sys.set_int_max_str_digits(PRODUCT_INT_DIGITS)


@contextlib.contextmanager
def product_limits() -> Iterator[None]:
    """...while the product runs with the limit every Python process starts with."""
    sys.set_int_max_str_digits(PRODUCT_INT_DIGITS)
    try:
        yield
    finally:
        sys.set_int_max_str_digits(0)



def check_validates(policy: NetworkPolicy) -> None:
    """validate_policy never raises on a decoded policy and returns FieldErrors."""
    for strict in (False, True):
        errors = validate_policy(policy, strict_cidr=strict)
        assert isinstance(errors, list)
        for e in errors:
            assert isinstance(e, FieldError)
            assert isinstance(e.render(), str)


def decode_any(doc: Any) -> None:
    """Every decoder on one document: success, or a DecodeError naming the problem."""
    decoders: tuple[Callable[[Any], object], ...] = (
        decode_network_policy, decode_pod, decode_namespace)
    for decode in decoders:
        try:
            result = decode(doc)
        except DecodeError as exc:
            assert isinstance(exc.render(), str)
            continue
        if isinstance(result, NetworkPolicy):
            check_validates(result)


def parse_any(text: str) -> None:
    """parse_documents and parse_objects: success, or a StockadeError."""
    with contextlib.suppress(StockadeError):
        docs = parse_documents(text, "fuzz.yaml")
        list(expand_lists(docs))
    for strict_kinds in (False, True):
        try:
            objects = parse_objects(text, "fuzz.yaml", strict_kinds=strict_kinds)
        except StockadeError as exc:
            assert str(exc)
            continue
        for policy in objects.policies:
            check_validates(policy)
        objects.cluster()


# --------------------------------------------------------------------------- properties


@settings(max_examples=5 * settings().max_examples)
@given(mutated())
def test_decoders_raise_only_decode_errors_and_validation_never_raises(doc: Any) -> None:
    with product_limits():
        decode_any(doc)


@settings(max_examples=max(10, settings().max_examples // 2))
@given(st.lists(mutated(), min_size=1, max_size=3),
       st.sampled_from(("yaml", "json", "list")))
def test_parse_objects_on_mutated_streams_raises_only_stockade_errors(
        docs: list[Any], how: str) -> None:
    text = to_text(docs, how)
    with product_limits():
        parse_any(text)


@given(texts)
def test_parse_random_text_raises_only_stockade_errors(text: str) -> None:
    with product_limits():
        parse_any(text)


@settings(max_examples=max(10, settings().max_examples // 2))
@given(corrupted_texts())
def test_parse_corrupted_manifests_raises_only_stockade_errors(text: str) -> None:
    with product_limits():
        parse_any(text)


_files = itertools.count()


@contextlib.contextmanager
def _cli() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """Captured stdout/stderr; SIGTERM's handler restored (main installs its own)."""
    out, err = io.StringIO(), io.StringIO()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield out, err
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_cli(argv: list[str]) -> tuple[int, str]:
    with _cli() as (_, err):
        code = main(argv)
    return code, err.getvalue()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=max(10, settings().max_examples // 3))
@given(data=st.data())
def test_cli_validate_exits_0_or_2(fuzz_dir: Path, data: st.DataObject) -> None:
    """`stockade validate` on mutated files (and raw bytes): 0 or 2, no traceback."""
    paths = []
    for _ in range(data.draw(st.integers(1, 2), label="files")):
        path = fuzz_dir / f"case-{next(_files)}.yaml"
        if data.draw(st.booleans(), label="raw bytes"):
            path.write_bytes(data.draw(st.binary(max_size=100)))
        else:
            docs = data.draw(st.lists(mutated(), min_size=1, max_size=3), label="docs")
            how = data.draw(st.sampled_from(("yaml", "json", "list")), label="format")
            path.write_text(to_text(docs, how), encoding="utf-8", errors="replace")
        paths.append(str(path))
    flags = ["--strict-cidr"] if data.draw(st.booleans(), label="strict") else []
    with product_limits():
        code, err = run_cli(["validate", *flags, *paths])
    assert code in (0, 2), err
    assert "Traceback" not in err
