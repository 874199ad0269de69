"""`stockade agent`'s flags are checked as they are read: a bad value stops the agent
with exit 2 and the flag's name before it takes a lock or makes its state directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stockade.cli.main import main

TABLE = f"t{os.getpid()}f"  # the datapath's name, unique to this run (agent/ownership.py)
ETCD = ["--datastore", "etcd", "--etcd-endpoints", "http://127.0.0.1:1"]


@pytest.mark.parametrize(("flag", "value", "said"), [
    ("--subnet", "nonsense", "does not appear to be an IPv4 or IPv6 network"),
    ("--subnet", "10.244.0.1/16", "has host bits set"),
    ("--subnet", "10.0.0.0/31", "too small for a gateway and an endpoint"),
    ("--subnet", "10.244.0.0/33", "does not appear to be an IPv4 or IPv6 network"),
    ("--bridge-prefix", "x y", "1 to 6 lowercase letters or digits"),
    ("--bridge-prefix", "toolongx", "1 to 6 lowercase letters or digits"),
    ("--metrics-address", "nonsense", "no port"),
    ("--metrics-address", "1.2.3.4:99999", "port must be 0-65535"),
    ("--log-group", "-5", "an NFLOG group from 1 to 65535"),
    ("--log-group", "65536", "an NFLOG group from 1 to 65535"),
    ("--host-address", "300.1.1.1", "is not an IP address"),
    ("--host-address", "127.0.0.1", "unicast IPv4 address that the other hosts reach"),
    ("--host-address", "fd00::1", "routes between hosts are IPv4"),
    ("--host-address", "0.0.0.0", "unicast IPv4"),
    ("--etcd-endpoints", "ftp://x", "http://HOST:PORT or https://HOST:PORT"),
    ("--etcd-endpoints", "http://x:0", "http://HOST:PORT"),
    ("--etcd-endpoints", "http://x:99999", "Port out of range"),
    ("--etcd-endpoints", "http:///v3", "http://HOST:PORT"),
    ("--node", "Bad Name!", "RFC 1123 subdomain"),
    ("--node", "a" * 254, "must be no more than 253 bytes"),
    ("--node-claim-ttl", "1", "from 2 to 3600 seconds"),
    ("--node-claim-ttl", "2.5", "is not a whole number of seconds"),
    ("--node-claim-ttl", "3601", "from 2 to 3600 seconds"),
])
def test_a_bad_flag_stops_the_agent_before_anything(
        flag: str, value: str, said: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Before, each of these was found by the agent after it took its locks and made its
    state directory (a pool, the prefix), as a Python error (the metrics address, the
    log group), or not at all: an address the other hosts would route to, an etcd URL
    never reachable, a node name put in etcd keys."""
    with pytest.raises(SystemExit) as info:
        main(["agent", "--state-dir", str(tmp_path / "s"), "--socket", str(tmp_path / "k"),
              "--table", TABLE, *ETCD, flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and said in err, err
    assert not (tmp_path / "s").exists()


def test_an_ipv6_pool_is_refused_with_etcd(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """etcd's address blocks and the routes between hosts are IPv4: refused at start,
    not at the first block claim (a /26 block of an IPv6 pool: ipaddress raises)."""
    assert main(["agent", "--state-dir", str(tmp_path / "s"), "--socket", str(tmp_path / "k"),
                 "--table", TABLE, *ETCD, "--subnet", "fd00:244::/64"]) == 2
    assert "--subnet fd00:244::/64: with --datastore etcd the address pool is IPv4" in \
        capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_the_node_name_is_checked_wherever_it_comes_from(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """$NODE_NAME (and the host name) go into etcd keys as --node does: checked too."""
    monkeypatch.setenv("NODE_NAME", "Bad_Name")
    assert main(["agent", "--state-dir", str(tmp_path / "s"), "--socket", str(tmp_path / "k"),
                 "--table", TABLE, *ETCD]) == 2
    err = capsys.readouterr().err
    assert "node name 'Bad_Name' ($NODE_NAME)" in err and "--node" in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv", [
    ["operator", "run", "--metrics-address", "nonsense"],
])
def test_the_other_commands_check_the_same_flags_the_same_way(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "argument --metrics-address: invalid metrics address" in capsys.readouterr().err


def test_the_etcd_ipam_tool_checks_its_urls(capsys: pytest.CaptureFixture[str]) -> None:
    from stockade.etcd.ipam import main as ipam_main

    with pytest.raises(SystemExit) as info:
        ipam_main(["show", "--etcd-endpoints", "ftp://x"])
    assert info.value.code == 2
    assert "argument --etcd-endpoints" in capsys.readouterr().err
