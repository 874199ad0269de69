"""The CNI spec's pure side: environment, names, configuration, results, versions."""

from __future__ import annotations

import json

import pytest

from stockade.cni import spec
from stockade.cni.spec import (
    DNS,
    CniError,
    Env,
    Interface,
    IPConfig,
    Result,
    Route,
    convert_result,
    parse_conf,
    parse_env,
    parse_result,
)

BASE_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc123", "CNI_NETNS": "/run/netns/x",
            "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni:/opt/cni/bin"}


def _conf(**extra: object) -> bytes:
    return json.dumps({"cniVersion": "1.0.0", "name": "net1", "type": "stockade-cni",
                       **extra}).encode()


def _code(fn: object, *args: object) -> int:
    with pytest.raises(CniError) as err:
        fn(*args)  # type: ignore[operator]
    return err.value.code


# ---- environment -------------------------------------------------------------------------


def test_env_is_parsed_with_args_and_path() -> None:
    env = parse_env({**BASE_ENV, "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web;X="})
    assert env == Env("ADD", "abc123", "/run/netns/x", "eth0",
                      {"IgnoreUnknown": "1", "K8S_POD_NAME": "web", "X": ""},
                      ("/usr/lib/cni", "/opt/cni/bin"))


@pytest.mark.parametrize(("command", "drop", "named"), [
    ("ADD", "CNI_NETNS", "CNI_NETNS"),
    ("ADD", "CNI_CONTAINERID", "CNI_CONTAINERID"),
    ("CHECK", "CNI_IFNAME", "CNI_IFNAME"),
    ("DEL", "CNI_PATH", "CNI_PATH"),
    ("GC", "CNI_PATH", "CNI_PATH"),
    ("STATUS", "CNI_PATH", "CNI_PATH"),
])
def test_missing_variables_are_code_4_and_named(command: str, drop: str, named: str) -> None:
    environ = {**BASE_ENV, "CNI_COMMAND": command}
    del environ[drop]
    with pytest.raises(CniError) as err:
        parse_env(environ)
    assert err.value.code == spec.INVALID_ENVIRONMENT
    assert named in err.value.msg


def test_del_needs_no_namespace_and_version_needs_nothing() -> None:
    env = {k: v for k, v in BASE_ENV.items() if k != "CNI_NETNS"}
    assert parse_env({**env, "CNI_COMMAND": "DEL"}).netns == ""
    assert parse_env({"CNI_COMMAND": "VERSION"}).command == "VERSION"


@pytest.mark.parametrize("environ", [{}, {"CNI_COMMAND": "FROB"}, {**BASE_ENV,
                                                                    "CNI_ARGS": "novalue"}])
def test_bad_command_or_args_are_code_4(environ: dict[str, str]) -> None:
    assert _code(parse_env, environ) == spec.INVALID_ENVIRONMENT


# ---- names --------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "code"), [
    ("", spec.UNKNOWN_CONTAINER), ("-abc", spec.INVALID_ENVIRONMENT),
    ("a/b", spec.INVALID_ENVIRONMENT), ("a b", spec.INVALID_ENVIRONMENT),
])
def test_container_id_rules(value: str, code: int) -> None:
    assert _code(spec.validate_container_id, value) == code


@pytest.mark.parametrize("value", ["a", "A0_.-z", "0" * 64, "ab.c-d_e"])
def test_container_ids_that_pass(value: str) -> None:
    spec.validate_container_id(value)


@pytest.mark.parametrize("value", ["", ".", "..", "a" * 16, "a/b", "a:b", "a b", "a\tb"])
def test_interface_name_rules(value: str) -> None:
    assert _code(spec.validate_ifname, value) == spec.INVALID_ENVIRONMENT


@pytest.mark.parametrize("value", ["eth0", "a" * 15, "net@1", "ens3.100"])
def test_interface_names_that_pass(value: str) -> None:
    spec.validate_ifname(value)


@pytest.mark.parametrize("value", ["", "-net", "net/1", "n e t", "net:1"])
def test_network_name_rules(value: str) -> None:
    assert _code(spec.validate_network_name, value) == spec.INVALID_CONFIG


# ---- configuration: the order and codes skel uses -------------------------------------------


@pytest.mark.parametrize(("data", "env", "code"), [
    (b"{", {}, spec.DECODING_FAILURE),
    (b"[1]", {}, spec.DECODING_FAILURE),
    (b"", {}, spec.DECODING_FAILURE),
    (_conf(name=""), {}, spec.INVALID_CONFIG),
    (_conf(name=5), {}, spec.DECODING_FAILURE),
    (_conf(name="bad name"), {}, spec.INVALID_CONFIG),
    (_conf(), {"CNI_IFNAME": "a/b"}, spec.INVALID_ENVIRONMENT),
    (_conf(), {"CNI_CONTAINERID": "-x"}, spec.INVALID_ENVIRONMENT),
    (_conf(cniVersion="0.3.1"), {}, spec.INCOMPATIBLE_VERSION),
    (_conf(cniVersion="2.0.0"), {}, spec.INCOMPATIBLE_VERSION),
    (_conf(cniVersion=""), {}, spec.DECODING_FAILURE),
    (_conf(cniVersion="1.0.0"), {"CNI_COMMAND": "GC"}, spec.INCOMPATIBLE_VERSION),
    (_conf(cniVersion="1.0.0"), {"CNI_COMMAND": "STATUS"}, spec.INCOMPATIBLE_VERSION),
    (_conf(mode="sideways"), {}, spec.INVALID_CONFIG),
    (_conf(bridge="a-bridge-name-too-long"), {}, spec.INVALID_CONFIG),
    (_conf(vethPrefix="Stk"), {}, spec.INVALID_CONFIG),
    (_conf(dataDir="relative"), {}, spec.INVALID_CONFIG),
    (_conf(mtu=10), {}, spec.INVALID_CONFIG),
    (_conf(isGateway="yes"), {}, spec.INVALID_CONFIG),
    (_conf(ipam={"type": ""}), {}, spec.INVALID_CONFIG),
    (_conf(ipam="host-local"), {}, spec.INVALID_CONFIG),
    (_conf(args={"labels": {"a": 1}}), {}, spec.INVALID_CONFIG),
    (_conf(runtimeConfig=[]), {}, spec.INVALID_CONFIG),
    (_conf(prevResult={"ips": [{"address": "10.0.0.1"}]}), {}, spec.DECODING_FAILURE),
    (_conf(prevResult={"ips": [{"address": "10.0.0.1/8", "interface": 3}]}), {},
     spec.DECODING_FAILURE),
    (_conf(**{"cni.dev/valid-attachments": [{"ifname": "eth0"}]}),
     {"CNI_COMMAND": "GC"}, spec.INCOMPATIBLE_VERSION),
])
def test_configuration_errors(data: bytes, env: dict[str, str], code: int) -> None:
    assert _code(parse_conf, data, parse_env({**BASE_ENV, **env})) == code


def test_configuration_defaults() -> None:
    conf = parse_conf(_conf(), parse_env(BASE_ENV))
    assert (conf.bridge, conf.veth_prefix, conf.data_dir, conf.ipam, conf.labels,
            conf.namespace, conf.mode) == ("stkbr0", "stkc", "/var/lib/stockade/cni", None,
                                          None, "default", "")


def test_ipam_of_the_agent_or_a_plugin() -> None:
    env = parse_env(BASE_ENV)
    assert parse_conf(_conf(ipam={"type": "stockade"}), env).ipam is None
    section = {"type": "host-local", "subnet": "10.1.0.0/24"}
    assert parse_conf(_conf(ipam=section), env).ipam == section


def test_labels_merge_from_args_and_runtime_config() -> None:
    conf = parse_conf(_conf(args={"cni": {"labels": {"a": "1", "b": "1"}},
                                  "labels": {"b": "2"}},
                            runtimeConfig={"labels": {"c": "3"}}), parse_env(BASE_ENV))
    assert conf.labels == {"a": "1", "b": "2", "c": "3"}
    assert parse_conf(_conf(args={"labels": {}}), parse_env(BASE_ENV)).labels == {}


def test_valid_attachments_under_either_name() -> None:
    env = parse_env({**BASE_ENV, "CNI_COMMAND": "GC"})
    for key in ("cni.dev/valid-attachments", "cni.dev/attachments"):
        conf = parse_conf(_conf(cniVersion="1.1.0", **{key: [
            {"containerID": "a", "ifname": "eth0"}, {"containerID": "b"}]}), env)
        assert conf.valid_attachments == (("a", "eth0"), ("b", ""))


def test_identity_is_the_pod_else_the_container() -> None:
    conf = parse_conf(_conf(namespace="edge"), parse_env(BASE_ENV))
    assert spec.endpoint_identity(conf, parse_env(BASE_ENV)) == ("edge", "abc123")
    env = parse_env({**BASE_ENV, "CNI_ARGS": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1"})
    assert spec.endpoint_identity(conf, env) == ("shop", "web-1")
    env = parse_env({**BASE_ENV, "CNI_ARGS": "K8S_POD_NAME=ctr"})  # podman
    assert spec.endpoint_identity(conf, env) == ("edge", "ctr")


def test_mode_is_inferred_from_a_previous_interface() -> None:
    env = parse_env(BASE_ENV)
    assert spec.effective_mode(parse_conf(_conf(), env)) == "main"
    empty = {"cniVersion": "1.0.0", "dns": {}}
    assert spec.effective_mode(parse_conf(_conf(prevResult=empty), env)) == "main"
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/x"}]}
    assert spec.effective_mode(parse_conf(_conf(prevResult=prev), env)) == "chained"
    assert spec.effective_mode(parse_conf(_conf(prevResult=prev, mode="main"), env)) == "main"


# ---- results ------------------------------------------------------------------------------

RESULT = Result(
    (Interface("veth1", "aa:bb:cc:dd:ee:01"),
     Interface("eth0", "aa:bb:cc:dd:ee:02", "/run/netns/x", mtu=1400)),
    (IPConfig("10.1.0.5/24", "10.1.0.1", 1), IPConfig("fd00::5/64", "fd00::1", 1)),
    (Route("0.0.0.0/0", "10.1.0.1", priority=5), Route("::/0", "fd00::1")),
    DNS(("10.1.0.10",), "cluster.local"))


def test_result_0_4_0_has_ip_versions_and_no_new_fields() -> None:
    out = RESULT.render("0.4.0")
    assert out["ips"][0] == {"version": "4", "address": "10.1.0.5/24", "gateway": "10.1.0.1",
                             "interface": 1}
    assert out["ips"][1]["version"] == "6"
    assert "mtu" not in out["interfaces"][1] and "priority" not in out["routes"][0]
    assert out["dns"] == {"nameservers": ["10.1.0.10"], "domain": "cluster.local"}


def test_result_1_0_0_drops_versions_and_1_1_0_adds_fields() -> None:
    one = RESULT.render("1.0.0")
    assert "version" not in one["ips"][0]
    assert "mtu" not in one["interfaces"][1]
    new = RESULT.render("1.1.0")
    assert new["interfaces"][1]["mtu"] == 1400 and new["routes"][0]["priority"] == 5


@pytest.mark.parametrize("version", spec.VERSIONS)
def test_results_round_trip(version: str) -> None:
    rendered = RESULT.render(version)
    again = parse_result(rendered).render(version)
    assert again == rendered


def test_convert_keeps_a_same_version_result_byte_for_byte() -> None:
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/x",
                                                   "x-vendor": 1}],
            "ips": [{"address": "10.0.0.2/24", "interface": 0}], "dns": {}}
    assert convert_result(prev, "1.0.0") == prev
    old = convert_result(prev, "0.4.0")
    assert old["cniVersion"] == "0.4.0" and old["ips"][0]["version"] == "4"
    assert convert_result(old, "1.0.0") == {**prev, "interfaces": [{"name": "eth0",
                                                                    "sandbox": "/x"}]}


def test_container_ips_pick_the_sandbox_interface() -> None:
    prev = parse_result({"interfaces": [{"name": "br0"}, {"name": "veth9"},
                                        {"name": "eth0", "sandbox": "/run/netns/a"}],
                         "ips": [{"address": "10.0.0.2/24", "interface": 2},
                                 {"address": "10.0.0.1/24", "interface": 0}]})
    assert [ip.address for ip in prev.container_ips("eth0", "/run/netns/a")] == \
        ["10.0.0.2/24"]
    bare = parse_result({"ips": [{"address": "10.0.0.9/24"}]})
    assert [ip.ip for ip in bare.container_ips("eth0")] == ["10.0.0.9"]


def test_main_result_and_default_routes() -> None:
    ips = [IPConfig("10.0.0.2/24", "10.0.0.1"), IPConfig("fd00::2/64", "fd00::1"),
           IPConfig("10.9.0.2/24")]
    assert spec.default_routes(ips) == (Route("0.0.0.0/0", "10.0.0.1"), Route("::/0",
                                                                               "fd00::1"))
    res = spec.main_result("eth0", "/ns", "m2", "vh", "m1", ips[:1], (), DNS(), None)
    assert res.render("1.0.0")["interfaces"] == [{"name": "vh", "mac": "m1"},
                                                 {"name": "eth0", "mac": "m2",
                                                  "sandbox": "/ns"}]
    assert res.ips[0].interface == 1


def test_error_objects_and_version_report() -> None:
    err = CniError(spec.TRY_AGAIN, "busy", "later")
    assert err.to_dict("1.0.0") == {"cniVersion": "1.0.0", "code": 11, "msg": "busy",
                                    "details": "later"}
    assert "details" not in CniError(7, "bad").to_dict("1.1.0")
    assert spec.version_report("0.4.0") == {"cniVersion": "0.4.0", "supportedVersions":
                                            ["0.4.0", "1.0.0", "1.1.0"]}
    assert spec.version_report("9.9.9")["cniVersion"] == "1.1.0"
    assert spec.highest_common(spec.VERSIONS, ["0.1.0", "0.4.0", "1.0.0"]) == "1.0.0"
    assert spec.highest_common(spec.VERSIONS, ["0.2.0", "junk"]) is None


def test_delegate_conf_speaks_the_delegates_version() -> None:
    prev = {"cniVersion": "1.1.0", "ips": [{"address": "10.0.0.2/24"}]}
    conf = parse_conf(_conf(cniVersion="1.1.0", prevResult=prev, ipam={"type": "host-local"}),
                      parse_env(BASE_ENV))
    out = json.loads(spec.delegate_conf(conf, "1.0.0"))
    assert out["cniVersion"] == "1.0.0" and out["prevResult"]["cniVersion"] == "1.0.0"
    assert out["ipam"] == {"type": "host-local"}
