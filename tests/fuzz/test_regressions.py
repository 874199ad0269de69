"""Regressions: one minimal reproducer for each product bug the fuzz tests found.

All three were reported from this suite and fixed in commit 9a6abda ("Bad YAML
values, huge integers and mistyped Pod fields are input errors, never
tracebacks"); these tests keep them fixed. The contract they check is
stockade/errors.py's: bad input raises a StockadeError (InputError/DecodeError
naming file and object), and the command line prints one line and exits 2, never
a traceback.

  BUG-1  src/stockade/model/parse.py, parse_documents: only yaml.YAMLError was
         turned into InputError, but PyYAML's SafeLoader also raises ValueError,
         KeyError, AttributeError and RecursionError on bad input (explicit tags
         with bad values, integers of more than 4300 digits, deep nesting).
  BUG-2  src/stockade/model/decode.py (and parse.py, cli/validate.py): error
         messages formatted the offending value with str()/repr(); for an integer
         of more than 4300 decimal digits (YAML spells it in hex, which loads
         fine) Python raised ValueError instead of the DecodeError being built.
  BUG-3  src/stockade/model/decode.py, decode_pod: `status.podIPs`,
         `spec.containers` and `spec.containers[i].ports` were iterated without a
         type check; a number or boolean there raised TypeError.

They depend on Python's default limit on int-to-str conversion (4300 digits);
with PYTHONINTMAXSTRDIGITS=0 the BUG-2 cases cannot fail.
"""

from __future__ import annotations

import contextlib
import io
import signal
from pathlib import Path
from typing import Any

import pytest

from stockade.cli.main import main
from stockade.errors import DecodeError, StockadeError
from stockade.model.decode import decode_network_policy, decode_pod
from stockade.model.parse import parse_documents, parse_objects

HUGE_HEX = "0x" + "f" * 5000  # a valid YAML 1.1 int: 16**5000 - 1, 6021 decimal digits

POLICY = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: p, namespace: x}}
spec:
  podSelector: {{}}
  ingress:
  - ports:
    - port: {port}
"""

# --------------------------------------------------------------------------- BUG-1

LOADER_CRASHES = {
    "int-tag-on-text": ("a: !!int foo\n", "ValueError"),
    "float-tag-on-text": ("a: !!float foo\n", "ValueError"),
    "bool-tag-on-text": ("a: !!bool foo\n", "KeyError"),
    "timestamp-tag-on-text": ("a: !!timestamp foo\n", "AttributeError"),
    "timestamp-out-of-range": ("a: !!timestamp 2001-02-30\n", "ValueError"),
    "int-of-4400-digits": ("a: " + "1" * 4400 + "\n", "ValueError"),
    "json-int-of-4400-digits": ('{"a": ' + "1" * 4400 + "}\n", "ValueError"),
    "nested-flow-sequences": ("a: " + "[" * 5000 + "]" * 5000 + "\n", "RecursionError"),
    "nested-flow-mappings": ("a: " + "{a: " * 5000 + "}" * 5000 + "\n", "RecursionError"),
}


@pytest.mark.parametrize("text", [t for t, _ in LOADER_CRASHES.values()],
                         ids=list(LOADER_CRASHES))
def test_bug1_parse_documents_raises_only_input_errors(text: str) -> None:
    """BUG-1. Expected: InputError ("not valid YAML or JSON ..."). Before the fix:
    the exception named in LOADER_CRASHES escaped parse_documents."""
    with pytest.raises(StockadeError):
        parse_documents(text, "bug1.yaml")


# --------------------------------------------------------------------------- BUG-2

HUGE_INT_DOCS = {
    # decode.py _integer: f"number {value} does not fit int32"
    "policy-port": POLICY.format(port=HUGE_HEX),
    # decode.py _type_meta: f"{api!r} does not serve ..."
    "policy-apiVersion": f"apiVersion: {HUGE_HEX}\nkind: NetworkPolicy\n",
    # decode.py _type_meta: f"{got!r} is not NetworkPolicy" is not reached; parse.py
    # expand_lists calls str(doc.get("kind")) first
    "kind": f"apiVersion: v1\nkind: {HUGE_HEX}\n",
    # decode.py decode_pod -> _int32 -> _integer
    "pod-containerPort": (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nstatus: {podIP: 10.0.0.1}\n"
        f"spec: {{containers: [{{ports: [{{containerPort: {HUGE_HEX}}}]}}]}}\n"),
}


@pytest.mark.parametrize("text", list(HUGE_INT_DOCS.values()), ids=list(HUGE_INT_DOCS))
def test_bug2_huge_integers_are_decode_errors(text: str) -> None:
    """BUG-2. Expected: DecodeError ("number ... does not fit int32", or a wrong
    apiVersion/kind). Before the fix: ValueError "Exceeds the limit (4300 digits)
    for integer string conversion" while the message was formatted."""
    with pytest.raises(StockadeError):
        parse_objects(text, "bug2.yaml")


def test_bug2_huge_integer_port_in_memory() -> None:
    """BUG-2, without YAML: decode_network_policy on a dict with port = 16**5000."""
    doc: dict[str, Any] = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "p"},
        "spec": {"ingress": [{"ports": [{"port": 16**5000}]}]},
    }
    with pytest.raises(DecodeError):
        decode_network_policy(doc)


# --------------------------------------------------------------------------- BUG-3

POD_CRASHES = {
    "podIPs-number": {"status": {"podIP": "10.0.0.1", "podIPs": 5}},
    "podIPs-true": {"status": {"podIP": "10.0.0.1", "podIPs": True}},
    "containers-number": {"status": {"podIP": "10.0.0.1"}, "spec": {"containers": 5}},
    "container-ports-true": {"status": {"podIP": "10.0.0.1"},
                             "spec": {"containers": [{"ports": True}]}},
}


@pytest.mark.parametrize("fields", list(POD_CRASHES.values()), ids=list(POD_CRASHES))
def test_bug3_decode_pod_wrong_types_are_decode_errors(fields: dict[str, Any]) -> None:
    """BUG-3. Expected: DecodeError naming the field ("status.podIPs: cannot decode
    number as an array"). Before the fix: TypeError "'int' object is not iterable"."""
    doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}, **fields}
    with pytest.raises(DecodeError):
        decode_pod(doc)


# --------------------------------------------------------------------------- the CLI


CLI_CASES = {
    "bug1-bad-int-tag": "a: !!int foo\n",
    "bug1-deep-nesting": "[" * 5000 + "]" * 5000 + "\n",
    "bug2-huge-port": POLICY.format(port=HUGE_HEX),
    "bug2-huge-name": ("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
                       f"metadata: {{name: {HUGE_HEX}}}\n"),
}


@pytest.mark.parametrize("text", list(CLI_CASES.values()), ids=list(CLI_CASES))
def test_bugs_make_stockade_validate_crash(tmp_path: Path, text: str) -> None:
    """`stockade validate FILE`: expected one error line and exit 2; before the
    fix: an uncaught exception (a traceback from the console script)."""
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    previous = signal.getsignal(signal.SIGTERM)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["validate", str(path)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 2
    assert "Traceback" not in err.getvalue()
