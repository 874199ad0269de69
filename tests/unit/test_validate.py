"""validate_policy against the API server's rules V1..V28, beyond the shared corpus.

Each case is a manifest and the complete list of (path, reason) the API server
reports for it (empty: accepted), plus a piece of the message where it matters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stockade.cli.main import main
from stockade.errors import DecodeError
from stockade.model.decode import decode_network_policy
from stockade.model.field import FORBIDDEN, INVALID, REQUIRED, TOO_LONG, UNSUPPORTED, FieldError
from stockade.model.validate import validate_policy, warn_policy

NAME = "metadata.name"
GEN = "metadata.generateName"
NS = "metadata.namespace"
LABELS = "metadata.labels"
ANN = "metadata.annotations"
MATCH = "spec.podSelector.matchLabels"
EXPR = "spec.podSelector.matchExpressions[0]"
PORT = "spec.ingress[0].ports[0]"
PEER = "spec.ingress[0].from[0]"
BLOCK = f"{PEER}.ipBlock"


def doc(spec: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    """A NetworkPolicy manifest; metadata keys given as None are left out."""
    metadata = {"name": "api", "namespace": "shop", **meta}
    out: dict[str, Any] = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {k: v for k, v in metadata.items() if v is not None},
    }
    if spec is not None:
        out["spec"] = spec
    return out


def port(**entry: Any) -> dict[str, Any]:
    return doc({"ingress": [{"ports": [entry]}]})


def peer(entry: dict[str, Any]) -> dict[str, Any]:
    return doc({"ingress": [{"from": [entry]}]})


def block(cidr: str, *excepts: str) -> dict[str, Any]:
    ip_block: dict[str, Any] = {"cidr": cidr}
    if excepts:
        ip_block["except"] = list(excepts)
    return peer({"ipBlock": ip_block})


def selector(sel: dict[str, Any]) -> dict[str, Any]:
    return doc({"podSelector": sel})


def expr(key: str = "tier", operator: str = "In", values: list[str] | None = None) -> dict[
        str, Any]:
    requirement: dict[str, Any] = {"key": key, "operator": operator}
    if values is not None:
        requirement["values"] = values
    return selector({"matchExpressions": [requirement]})


def types(*entries: str) -> dict[str, Any]:
    return doc({"policyTypes": list(entries)})


@dataclass(frozen=True)
class Case:
    id: str
    manifest: dict[str, Any]
    errors: tuple[tuple[str, str], ...] = ()
    detail: str = ""
    strict: bool = False


def ok(id: str, manifest: dict[str, Any], strict: bool = False) -> Case:
    return Case(id, manifest, strict=strict)


def bad(id: str, manifest: dict[str, Any], *errors: tuple[str, str], detail: str = "",
        strict: bool = False) -> Case:
    return Case(id, manifest, errors, detail, strict)


A63 = "a" * 63
A64 = "a" * 64

CASES = [
    # V1 name required
    bad("v1-name-absent", doc(name=None), (NAME, REQUIRED),
        detail="name or generateName is required"),
    bad("v1-name-and-generatename-empty", doc(name="", generateName=""), (NAME, REQUIRED)),
    ok("v1-generatename-stands-for-name", doc(name=None, generateName="api-")),
    # V2 name / generateName: DNS-1123 subdomain
    ok("v2-name-253-bytes", doc(name="a" * 253)),
    bad("v2-name-254-bytes", doc(name="a" * 254), (NAME, INVALID),
        detail="must be no more than 253 bytes"),
    ok("v2-name-with-dots", doc(name="api.v1.shop")),
    ok("v2-name-label-over-63-inside-subdomain", doc(name=A64 + ".b")),
    bad("v2-name-trailing-dash", doc(name="api-"), (NAME, INVALID),
        detail="a lowercase RFC 1123 subdomain"),
    bad("v2-name-underscore", doc(name="api_v1"), (NAME, INVALID)),
    bad("v2-name-double-dot", doc(name="api..v1"), (NAME, INVALID)),
    bad("v2-name-too-long-and-uppercase", doc(name="A" * 254), (NAME, INVALID), (NAME, INVALID)),
    bad("v2-generatename-uppercase-also-blames-name", doc(name=None, generateName="API-"),
        (GEN, INVALID), (NAME, INVALID)),
    bad("v2-generatename-lone-dash", doc(name=None, generateName="-"),
        (GEN, INVALID), (NAME, INVALID)),
    bad("v2-generatename-too-long-but-generated-name-truncated",
        doc(name=None, generateName="a" * 300), (GEN, INVALID), detail="no more than 253"),
    ok("v2-generatename-ignored-for-name-when-name-set", doc(name="api", generateName="api-")),
    # V3 namespace: DNS-1123 label
    ok("v3-namespace-63-bytes", doc(namespace=A63)),
    bad("v3-namespace-64-bytes", doc(namespace=A64), (NS, INVALID),
        detail="must be no more than 63 bytes"),
    bad("v3-namespace-dots", doc(namespace="team.alpha"), (NS, INVALID),
        detail="must not contain dots"),
    bad("v3-namespace-uppercase", doc(namespace="Shop"), (NS, INVALID),
        detail="a lowercase RFC 1123 label"),
    # V4 metadata.labels
    ok("v4-labels-prefixed-key-and-empty-value",
       doc(labels={"example.com/app": "", "app.kubernetes.io/name": "api"})),
    bad("v4-label-value-with-space", doc(labels={"team": "check out"}), (LABELS, INVALID)),
    bad("v4-label-key-two-slashes", doc(labels={"a/b/c": "x"}), (LABELS, INVALID),
        detail="with an optional DNS subdomain prefix"),
    bad("v4-label-key-uppercase-prefix", doc(labels={"Example.com/app": "x"}),
        (LABELS, INVALID), detail="prefix part a lowercase RFC 1123 subdomain"),
    bad("v4-label-key-name-64-bytes", doc(labels={A64: "x"}), (LABELS, INVALID),
        detail="name part must be no more than 63 bytes"),
    bad("v4-two-bad-labels-two-errors", doc(labels={"a": "-x", "b": "-x"}),
        (LABELS, INVALID), (LABELS, INVALID)),
    # V5 metadata.annotations
    ok("v5-annotation-uppercase-key-and-free-value",
       doc(annotations={"Example.COM/Owner": "Team A (checkout)\nline 2"})),
    bad("v5-annotation-key-space", doc(annotations={"my note": "x"}), (ANN, INVALID)),
    bad("v5-annotation-key-two-slashes", doc(annotations={"a/b/c": "x"}), (ANN, INVALID)),
    ok("v5-annotations-exactly-256KiB", doc(annotations={"k": "v" * (262144 - 1)})),
    bad("v5-annotations-over-256KiB", doc(annotations={"k": "v" * 262144}), (ANN, TOO_LONG),
        detail="262144"),
    bad("v5-annotations-size-counts-keys", doc(annotations={"k1": "v" * 131072,
                                                            "k2": "v" * 131071}),
        (ANN, TOO_LONG)),
    # V6 matchLabels keys
    ok("v6-key-starting-with-digit", selector({"matchLabels": {"1app": "x"}})),
    bad("v6-key-leading-dash", selector({"matchLabels": {"-app": "x"}}), (MATCH, INVALID)),
    bad("v6-key-empty", selector({"matchLabels": {"": "x"}}), (MATCH, INVALID),
        (MATCH, INVALID), detail="name part must be non-empty"),
    bad("v6-key-empty-name-after-prefix", selector({"matchLabels": {"example.com/": "x"}}),
        (MATCH, INVALID), (MATCH, INVALID)),
    # V7 matchLabels values
    ok("v7-value-63-bytes", selector({"matchLabels": {"app": A63}})),
    ok("v7-value-mixed-punctuation", selector({"matchLabels": {"app": "A.b_c-9"}})),
    bad("v7-value-64-bytes", selector({"matchLabels": {"app": A64}}), (MATCH, INVALID)),
    bad("v7-value-trailing-dot", selector({"matchLabels": {"app": "api."}}), (MATCH, INVALID)),
    bad("v7-value-64-bytes-and-bad-char", selector({"matchLabels": {"app": "-" * 64}}),
        (MATCH, INVALID), (MATCH, INVALID)),
    # V8 operator
    ok("v8-every-operator", selector({"matchExpressions": [
        {"key": "a", "operator": "In", "values": ["x"]},
        {"key": "b", "operator": "NotIn", "values": ["x"]},
        {"key": "c", "operator": "Exists"},
        {"key": "d", "operator": "DoesNotExist"},
    ]})),
    bad("v8-operator-lowercase", expr(operator="in", values=["a"]), (f"{EXPR}.operator", INVALID)),
    bad("v8-operator-empty", expr(operator="", values=["a"]), (f"{EXPR}.operator", INVALID),
        detail="not a valid selector operator"),
    bad("v8-unknown-operator-still-checks-values", expr(operator="Gt", values=["-1"]),
        (f"{EXPR}.operator", INVALID), (f"{EXPR}.values[0]", INVALID)),
    # V9 values required for In/NotIn
    bad("v9-in-without-values", expr(operator="In"), (f"{EXPR}.values", REQUIRED)),
    ok("v9-notin-with-values", expr(operator="NotIn", values=["a", "b"])),
    # V10 values forbidden for Exists/DoesNotExist
    ok("v10-exists-without-values", expr(operator="Exists")),
    ok("v10-doesnotexist-empty-values", expr(operator="DoesNotExist", values=[])),
    bad("v10-doesnotexist-with-values", expr(operator="DoesNotExist", values=["a"]),
        (f"{EXPR}.values", FORBIDDEN)),
    bad("v10-exists-with-invalid-value-both-reported", expr(operator="Exists", values=["a b"]),
        (f"{EXPR}.values", FORBIDDEN), (f"{EXPR}.values[0]", INVALID)),
    # V11 key
    bad("v11-key-with-space", expr(key="my key", values=["a"]), (f"{EXPR}.key", INVALID)),
    bad("v11-key-empty-two-messages", expr(key="", operator="Exists"),
        (f"{EXPR}.key", INVALID), (f"{EXPR}.key", INVALID)),
    ok("v11-key-prefixed", expr(key="app.kubernetes.io/name", values=["api"])),
    # V12 values[j]
    bad("v12-value-64-bytes", expr(values=["a", A64]), (f"{EXPR}.values[1]", INVALID),
        detail="must be no more than 63 bytes"),
    ok("v12-empty-value-allowed", expr(values=[""])),
    # V13 protocol
    ok("v13-udp", port(protocol="UDP", port=53)),
    ok("v13-sctp", port(protocol="SCTP")),
    bad("v13-explicit-empty", port(protocol="", port=80), (f"{PORT}.protocol", UNSUPPORTED),
        detail='supported values: "TCP", "UDP", "SCTP"'),
    bad("v13-icmp", port(protocol="ICMP"), (f"{PORT}.protocol", UNSUPPORTED)),
    # V14 port number
    ok("v14-port-1", port(port=1)),
    ok("v14-port-65535", port(port=65535)),
    bad("v14-port-65536", port(port=65536), (f"{PORT}.port", INVALID),
        detail="must be between 1 and 65535, inclusive"),
    bad("v14-port-negative", port(port=-1), (f"{PORT}.port", INVALID)),
    # V15 port name
    ok("v15-name-15-bytes", port(port="abcdefghijklmno")),
    ok("v15-name-with-digits", port(port="h2c-8080")),
    bad("v15-name-16-bytes", port(port="abcdefghijklmnop"), (f"{PORT}.port", INVALID),
        detail="must be no more than 15"),
    bad("v15-name-underscore", port(port="http_alt"), (f"{PORT}.port", INVALID),
        detail="must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)"),
    bad("v15-name-consecutive-hyphens", port(port="a--b"), (f"{PORT}.port", INVALID),
        detail="must not contain consecutive hyphens"),
    bad("v15-name-leading-hyphen", port(port="-http"), (f"{PORT}.port", INVALID),
        detail="must not begin or end with a hyphen"),
    bad("v15-name-uppercase-two-messages", port(port="HTTP"),
        (f"{PORT}.port", INVALID), (f"{PORT}.port", INVALID)),
    bad("v15-name-empty-string", port(port=""), (f"{PORT}.port", INVALID),
        (f"{PORT}.port", INVALID)),
    # V16 endPort with a named port
    bad("v16-endport-named-port-also-checks-name", port(port="http_x", endPort=90),
        (f"{PORT}.endPort", INVALID), (f"{PORT}.port", INVALID),
        detail="may not be specified when `port` is non-numeric"),
    ok("v16-endport-with-numeric-port", port(port=80, endPort=81)),
    # V17 endPort without port
    ok("v17-no-port-no-endport", port(protocol="UDP")),
    bad("v17-endport-without-port", port(endPort=90), (f"{PORT}.endPort", INVALID),
        detail="may not be specified when `port` is not specified"),
    # V18 endPort below port
    ok("v18-endport-equal-port", port(port=80, endPort=80)),
    ok("v18-endport-above-port", port(port=80, endPort=65535)),
    bad("v18-endport-below-port", port(port=80, endPort=79), (f"{PORT}.endPort", INVALID),
        detail="must be greater than or equal to `port`"),
    # V19 endPort range
    ok("v19-endport-1-on-port-1", port(port=1, endPort=1)),
    bad("v19-endport-65536", port(port=80, endPort=65536), (f"{PORT}.endPort", INVALID),
        detail="must be between 1 and 65535, inclusive"),
    bad("v19-endport-zero-below-and-out-of-range", port(port=80, endPort=0),
        (f"{PORT}.endPort", INVALID), (f"{PORT}.endPort", INVALID)),
    bad("v19-port-zero-endport-ok", port(port=0, endPort=5), (f"{PORT}.port", INVALID)),
    # V20 empty peer
    bad("v20-empty-egress-peer", doc({"egress": [{"to": [{}]}]}),
        ("spec.egress[0].to[0]", REQUIRED), detail="must specify a peer"),
    ok("v20-empty-from-list-is-no-peer-list", doc({"ingress": [{"from": []}]})),
    # V21 ipBlock with a selector
    bad("v21-ipblock-and-empty-podselector",
        peer({"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}), (PEER, FORBIDDEN),
        detail="may not specify both ipBlock and another peer"),
    bad("v21-ipblock-and-both-selectors-once",
        peer({"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}, "namespaceSelector": {}}),
        (PEER, FORBIDDEN)),
    bad("v21-errors-inside-and-on-peer",
        peer({"ipBlock": {"cidr": "x"}, "podSelector": {"matchLabels": {"a": "-"}}}),
        (f"{PEER}.podSelector.matchLabels", INVALID), (f"{BLOCK}.cidr", INVALID),
        (PEER, FORBIDDEN)),
    ok("v21-both-selectors-no-ipblock", peer({"podSelector": {}, "namespaceSelector": {}})),
    # V22 empty cidr
    ok("v22-cidr-everything", block("0.0.0.0/0")),
    bad("v22-cidr-empty-skips-excepts", block("", "garbage"), (f"{BLOCK}.cidr", REQUIRED)),
    bad("v22-ipblock-without-cidr", peer({"ipBlock": {}}), (f"{BLOCK}.cidr", REQUIRED)),
    # V23 unparsable cidr
    ok("v23-ipv6-cidr", block("2001:db8::/32")),
    ok("v23-long-zero-padded-octets-parse", block("0010.0.0.0/8")),
    bad("v23-prefix-too-long", block("10.0.0.0/33"), (f"{BLOCK}.cidr", INVALID),
        detail="must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"),
    bad("v23-ipv6-prefix-129", block("2001:db8::/129"), (f"{BLOCK}.cidr", INVALID)),
    bad("v23-unparsable-skips-excepts", block("10.0.0.0", "garbage", "11.0.0.0/8"),
        (f"{BLOCK}.cidr", INVALID)),
    bad("v23-zone-not-accepted", block("fe80::/64%eth0"), (f"{BLOCK}.cidr", INVALID)),
    bad("v23-netmask-form-not-accepted", block("10.0.0.0/255.0.0.0"), (f"{BLOCK}.cidr", INVALID)),
    bad("v23-octet-over-255", block("10.0.0.256/32"), (f"{BLOCK}.cidr", INVALID)),
    # V24 strict CIDR (gate on), accepted without the gate
    ok("v24-leading-zeros-default-gates", block("010.000.0.0/8")),
    ok("v24-prefix-leading-zero-default-gates", block("10.0.0.0/08")),
    ok("v24-v4-mapped-default-gates", block("::ffff:10.0.0.0/104")),
    bad("v24-leading-zeros", block("010.0.0.0/8"), (f"{BLOCK}.cidr", INVALID),
        detail="must not have leading 0s in IP or prefix length", strict=True),
    bad("v24-prefix-leading-zero", block("10.0.0.0/08"), (f"{BLOCK}.cidr", INVALID),
        detail="must not have leading 0s", strict=True),
    bad("v24-v4-mapped", block("::ffff:10.0.0.0/104"), (f"{BLOCK}.cidr", INVALID),
        detail="must not have an IPv4-mapped IPv6 address", strict=True),
    bad("v24-ipv6-host-bits", block("2001:db8::1/32"), (f"{BLOCK}.cidr", INVALID),
        detail="must not have bits set beyond the prefix length", strict=True),
    ok("v24-canonical-strict", block("10.0.0.0/8", "10.1.0.0/16"), strict=True),
    ok("v24-ipv6-uppercase-is-only-a-warning", block("2001:DB8::/32"), strict=True),
    # V25 except entries checked like cidr
    bad("v25-except-unparsable-no-subset-check", block("10.0.0.0/8", "10.1.0.0"),
        (f"{BLOCK}.except[0]", INVALID), detail="must be a valid CIDR value"),
    bad("v25-except-host-bits-strict-still-subset-checked",
        block("10.0.0.0/8", "10.1.2.3/16", "11.0.0.0/16"),
        (f"{BLOCK}.except[0]", INVALID), (f"{BLOCK}.except[1]", INVALID), strict=True),
    ok("v25-except-host-bits-default-gates", block("10.0.0.0/8", "10.1.2.3/16")),
    # V26 except strictly inside cidr
    bad("v26-except-equal-to-cidr", block("10.0.0.0/16", "10.0.0.0/16"),
        (f"{BLOCK}.except[0]", INVALID), detail="must be a strict subset of `cidr`"),
    bad("v26-except-wider", block("10.0.0.0/16", "10.0.0.0/8"), (f"{BLOCK}.except[0]", INVALID)),
    bad("v26-except-other-family", block("10.0.0.0/8", "2001:db8::/64"),
        (f"{BLOCK}.except[0]", INVALID)),
    bad("v26-ipv6-except-outside", block("2001:db8::/32", "2001:db9::/48"),
        (f"{BLOCK}.except[0]", INVALID)),
    bad("v26-only-the-bad-except", block("10.0.0.0/8", "10.1.0.0/16", "12.0.0.0/16"),
        (f"{BLOCK}.except[1]", INVALID)),
    ok("v26-except-host-address", block("10.0.0.0/8", "10.9.9.9/32")),
    ok("v26-everything-but-one-ipv6", block("::/0", "2001:db8::1/128")),
    # V27 more than two policyTypes
    bad("v27-three-entries-entries-not-checked", types("Ingress", "bogus", "Egress"),
        ("spec.policyTypes", INVALID), detail="may not specify more than two policyTypes"),
    ok("v27-two-entries", types("Ingress", "Egress")),
    # V28 each policyType
    bad("v28-empty-entry", types(""), ("spec.policyTypes[0]", UNSUPPORTED),
        detail='supported values: "Ingress", "Egress"'),
    bad("v28-second-entry", types("Ingress", "egress"), ("spec.policyTypes[1]", UNSUPPORTED)),
    bad("v28-both-bad", types("in", "out"),
        ("spec.policyTypes[0]", UNSUPPORTED), ("spec.policyTypes[1]", UNSUPPORTED)),
    ok("v28-egress-only", types("Egress")),
    ok("v28-duplicate-egress", types("Egress", "Egress")),
    # accumulation across metadata and spec
    bad("accumulate-metadata-and-spec",
        doc({"policyTypes": ["ingress"], "ingress": [{"ports": [{"port": 0}]}]},
            name="Bad", labels={"a": "-"}),
        (NAME, INVALID), (LABELS, INVALID), (f"{PORT}.port", INVALID),
        ("spec.policyTypes[0]", UNSUPPORTED)),
    ok("valid-everything", doc({
        "podSelector": {"matchLabels": {"app": "api"},
                        "matchExpressions": [{"key": "tier", "operator": "NotIn",
                                              "values": ["db"]}]},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}},
                               "podSelector": {}},
                              {"ipBlock": {"cidr": "192.168.0.0/16",
                                           "except": ["192.168.1.0/24"]}}],
                     "ports": [{"port": 8080, "endPort": 8090}, {"port": "metrics",
                                                                 "protocol": "UDP"}]}],
        "egress": [{}],
    }, labels={"app": "api"}, annotations={"note": "x"})),
]


def errors_of(case: Case) -> list[FieldError]:
    return validate_policy(decode_network_policy(case.manifest), strict_cidr=case.strict)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rule(case: Case) -> None:
    errors = errors_of(case)
    rendered = [e.render() for e in errors]
    assert sorted((e.path, e.reason) for e in errors) == sorted(case.errors), rendered
    if case.detail:
        assert any(case.detail in line for line in rendered), rendered


def test_enough_cases_covering_every_rule() -> None:
    assert len(CASES) >= 60
    for n in range(1, 29):
        prefix = f"v{n}-"
        assert any(c.id.startswith(prefix) and c.errors for c in CASES), f"no reject for V{n}"
        assert any(c.id.startswith(prefix) and not c.errors for c in CASES), f"no accept for V{n}"


# --- rendering -----------------------------------------------------------------


@pytest.mark.parametrize(("manifest", "line"), [
    (port(port=80, endPort=79),
     f"{PORT}.endPort: Invalid value: 79: must be greater than or equal to `port`"),
    (port(protocol="tcp"),
     f'{PORT}.protocol: Unsupported value: "tcp": supported values: "TCP", "UDP", "SCTP"'),
    (peer({}), f"{PEER}: Required value: must specify a peer"),
    (block(""), f"{BLOCK}.cidr: Required value"),
    (doc(annotations={"k": "v" * 262144}),
     f"{ANN}: Too long: may not be more than 262144 bytes"),
    (doc(namespace="a.b"), f'{NS}: Invalid value: "a.b": must not contain dots'),
    (expr(operator="Exists", values=["a"]),
     f"{EXPR}.values: Forbidden: may not be specified when `operator` is 'Exists' or "
     "'DoesNotExist'"),
])
def test_rendered_line(manifest: dict[str, Any], line: str) -> None:
    assert [e.render() for e in validate_policy(decode_network_policy(manifest))] == [line]


def test_regex_message_matches_upstream_text() -> None:
    (error,) = validate_policy(decode_network_policy(doc(labels={"a b": "x"})))
    assert error.detail == (
        "name part must consist of alphanumeric characters, '-', '_' or '.', and must start "
        "and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', "
        "regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')")


# --- warnings ------------------------------------------------------------------


def test_warnings_name_non_standard_cidrs() -> None:
    policy = decode_network_policy(block("10.1.2.3/16", "010.1.0.0/24", "10.1.128.0/17"))
    assert validate_policy(policy) == []
    warned = {(w.path, w.detail) for w in warn_policy(policy)}
    assert warned == {
        (f"{BLOCK}.cidr", 'CIDR value "10.1.2.3/16" is ambiguous in this context '
                          '(should be "10.1.0.0/16" or "10.1.2.3/32"?)'),
        (f"{BLOCK}.except[0]", 'non-standard CIDR value "010.1.0.0/24" will be considered '
                               'invalid in a future Kubernetes release: use "10.1.0.0/24"'),
    }


def test_warnings_ipv6_canonical_form() -> None:
    policy = decode_network_policy(block("2001:DB8:0::/32"))
    (warning,) = warn_policy(policy)
    assert "should be in RFC 5952 canonical format (\"2001:db8::/32\")" in warning.detail


def test_no_warnings_for_standard_cidrs() -> None:
    assert warn_policy(decode_network_policy(block("10.0.0.0/8", "10.1.0.0/16"))) == []


# --- the command ---------------------------------------------------------------

BAD_POLICY = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web
  namespace: shop
spec:
  podSelector: {}
  ingress:
  - ports:
    - port: 80
      endPort: 79
    from:
    - {}
"""

GOOD_POLICY = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web
  namespace: shop
spec:
  podSelector: {}
  ingress:
  - from:
    - ipBlock:
        cidr: 10.1.2.3/16
"""


def test_cli_reports_every_error_and_exits_2(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_POLICY)
    assert main(["validate", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"{path}:1: NetworkPolicy shop/web: spec.ingress[0].ports[0].endPort: Invalid value: 79: "
        "must be greater than or equal to `port`",
        f"{path}:1: NetworkPolicy shop/web: spec.ingress[0].from[0]: Required value: "
        "must specify a peer",
    ]


def test_cli_accepts_a_valid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD_POLICY)
    assert main(["validate", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "1 NetworkPolicy object(s) valid" in captured.out


def test_cli_strict_cidr_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD_POLICY)
    assert main(["validate", "--strict-cidr", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f'{path}:1: NetworkPolicy shop/web: spec.ingress[0].from[0].ipBlock.cidr: Invalid value: '
        '"10.1.2.3/16": must not have bits set beyond the prefix length')


def test_cli_decode_error_names_the_field(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(GOOD_POLICY.replace("ingress:", "ingres:"))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:1: NetworkPolicy shop/web: spec.ingres: unknown field")


def test_a_spec_found_valid_is_remembered_for_its_gate_only() -> None:
    """Policies decoded from equal specs share their parts, and a spec found valid is not
    validated again; under StrictIPCIDRValidation the same parts are judged anew, and a
    spec found invalid is never remembered."""
    def doc(name: str, cidr: str) -> dict[str, Any]:
        return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": cidr}}]}]}}

    first, second = (decode_network_policy(doc(n, "10.0.0.1/8")) for n in ("a", "b"))
    assert first.ingress is second.ingress  # shared by decoding
    assert validate_policy(first) == validate_policy(second) == []
    strict = [e.path for e in validate_policy(second, strict_cidr=True)]
    assert strict == ["spec.ingress[0].from[0].ipBlock.cidr"]
    bad = [decode_network_policy(doc(n, "10.0.0.0/33")) for n in ("c", "d")]
    assert [e.path for e in validate_policy(bad[0])] == ["spec.ingress[0].from[0].ipBlock.cidr"]
    assert [e.path for e in validate_policy(bad[1])] == ["spec.ingress[0].from[0].ipBlock.cidr"]


def test_specs_equal_only_by_equality_are_decoded_apart() -> None:
    """`True == 1`: a spec whose port is `true` is not found as the spec whose port is 1
    (it is refused, naming the field), and the spec with 1 is still shared."""
    def doc(port: object) -> dict[str, Any]:
        return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "a", "namespace": "default"},
                "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": port}]}]}}

    first = decode_network_policy(doc(1))
    with pytest.raises(DecodeError, match=r"spec\.ingress\[0\]\.ports\[0\]\.port: "
                                          r"cannot decode boolean"):
        decode_network_policy(doc(True))
    assert decode_network_policy(doc(1)).ingress is first.ingress
