"""The plugin's shell without a kernel: chained mode, error mapping, undo, with a fake agent."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stockade.cni import plugin
from stockade.cni.plugin import Undo, run
from stockade.cni.spec import CniError

PREV = {"cniVersion": "1.0.0",
        "interfaces": [{"name": "cni0"}, {"name": "veth1", "mac": "aa:aa:aa:aa:aa:01"},
                       {"name": "eth0", "mac": "aa:aa:aa:aa:aa:02", "sandbox": "/run/netns/c"}],
        "ips": [{"address": "10.22.0.5/16", "gateway": "10.22.0.1", "interface": 2}],
        "routes": [{"dst": "0.0.0.0/0"}], "dns": {}}


class FakeAgent:
    """Answers the plugin's calls; records them; can be made unreachable."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.down = False
        self.status: dict[str, Any] = {"ready": True, "inSync": True, "error": ""}

    def __call__(self, path: str, op: str, args: dict[str, Any]) -> Any:
        if self.down:
            raise CniError(11, "the stockade agent is not reachable", path)
        self.calls.append((op, dict(args)))
        if op == "cni.status":
            return self.status
        if op == "cni.add":
            ep = args["endpoint"]
            return {"revision": 1, "key": f"{ep['namespace']}/{ep['name']}", "labels": {},
                    "inherited": False}
        if op == "cni.gc":
            return {"removed": [], "released": [], "revision": 1, "hostInterfaces": []}
        return {"removed": True, "released": None, "revision": 2}

    def ops(self) -> list[str]:
        return [op for op, _ in self.calls]


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAgent]:
    fake = FakeAgent()
    monkeypatch.setattr(plugin, "agent_call", fake)
    yield fake


def _invoke(command: str, conf: dict[str, Any] | bytes, **env: str) -> tuple[int, Any, str]:
    environ = {"CNI_COMMAND": command, "CNI_CONTAINERID": "ctr1", "CNI_NETNS": "/run/netns/c",
               "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni", **env}
    out, err = io.StringIO(), io.StringIO()
    data = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    code = run(environ, data, out, err)
    text = out.getvalue().strip()
    return code, json.loads(text) if text else None, err.getvalue()


def _conf(tmp: Path, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
    return {"cniVersion": version, "name": "net", "type": "stockade-cni",
            "dataDir": str(tmp), "socket": "/x.sock", **extra}


def test_chained_add_passes_the_previous_result_on(tmp_path: Path, agent: FakeAgent) -> None:
    code, out, _ = _invoke("ADD", _conf(tmp_path, prevResult=PREV,
                                        args={"labels": {"app": "web"}}),
                           CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=w")
    assert code == 0 and out == PREV
    op, args = agent.calls[-1]
    assert op == "cni.add" and args["allocate"] is False
    assert args["labels"] == {"app": "web"}
    assert args["endpoint"]["ips"] == ["10.22.0.5"]
    assert (args["endpoint"]["namespace"], args["endpoint"]["name"]) == ("shop", "w")
    state = json.loads((tmp_path / "net" / "ctr1:eth0.json").read_text())
    assert state["complete"] and state["mode"] == "chained" and state["key"] == "shop/w"


def test_chained_add_converts_to_the_configured_version(tmp_path: Path,
                                                        agent: FakeAgent) -> None:
    code, out, _ = _invoke("ADD", _conf(tmp_path, "0.4.0", prevResult=PREV))
    assert code == 0 and out["cniVersion"] == "0.4.0" and out["ips"][0]["version"] == "4"


def test_chained_add_needs_an_address(tmp_path: Path, agent: FakeAgent) -> None:
    prev = {**PREV, "ips": []}
    code, out, _ = _invoke("ADD", _conf(tmp_path, prevResult=prev, mode="chained"))
    assert code == 1 and out["code"] == 7
    code, out, _ = _invoke("ADD", _conf(tmp_path, mode="chained"))
    assert code == 1 and out["code"] == 7


def test_add_with_the_agent_down_is_11_and_leaves_no_file(tmp_path: Path,
                                                          agent: FakeAgent) -> None:
    agent.down = True
    code, out, _ = _invoke("ADD", _conf(tmp_path, prevResult=PREV))
    assert code == 1 and out == {"cniVersion": "1.0.0", "code": 11,
                                 "msg": "the stockade agent is not reachable",
                                 "details": "/x.sock"}
    assert list(tmp_path.iterdir()) == []


def test_agent_refusing_the_endpoint_leaves_nothing(tmp_path: Path, agent: FakeAgent,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: str, op: str, args: dict[str, Any]) -> Any:
        if op == "cni.add":
            raise plugin._api_error(op, "invalid", "endpoint x/y is invalid", ["labels: bad"])
        return agent(path, op, args)

    monkeypatch.setattr(plugin, "agent_call", refuse)
    code, out, _ = _invoke("ADD", _conf(tmp_path, prevResult=PREV))
    assert code == 1 and out["code"] == 104 and "labels: bad" in out["details"]
    assert not (tmp_path / "net" / "ctr1:eth0.json").exists()
    assert agent.ops()[-1] == "cni.del"  # the undo asked the agent to forget it


def test_chained_del_and_a_second_del(tmp_path: Path, agent: FakeAgent) -> None:
    assert _invoke("ADD", _conf(tmp_path, prevResult=PREV))[0] == 0
    for _ in range(2):
        code, out, _ = _invoke("DEL", _conf(tmp_path, prevResult=PREV), CNI_NETNS="")
        assert (code, out) == (0, None)
    assert agent.ops()[-2:] == ["cni.del", "cni.del"]
    assert not (tmp_path / "net" / "ctr1:eth0.json").exists()


def test_duplicate_chained_add_re_registers_and_answers_the_same(tmp_path: Path,
                                                                 agent: FakeAgent) -> None:
    first = _invoke("ADD", _conf(tmp_path, prevResult=PREV))
    second = _invoke("ADD", _conf(tmp_path, prevResult=PREV))
    assert first == second
    assert agent.ops().count("cni.add") == 2


def test_gc_releases_attachments_not_listed(tmp_path: Path, agent: FakeAgent) -> None:
    for cid in ("a", "b"):
        assert _invoke("ADD", _conf(tmp_path, prevResult=PREV), CNI_CONTAINERID=cid)[0] == 0
    code, out, _ = _invoke("GC", _conf(tmp_path, "1.1.0", **{
        "cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}]}))
    assert (code, out) == (0, None)
    assert sorted(p.name for p in (tmp_path / "net").glob("*.json")) == ["a:eth0.json"]
    op, args = agent.calls[-1]
    assert op == "cni.gc" and args["valid"] == [{"containerID": "a", "ifname": "eth0"}]


@pytest.mark.parametrize(("status", "down", "code"), [
    ({"ready": True, "error": ""}, False, 0),
    ({"ready": False, "error": ""}, False, 50),
    ({"ready": True, "error": "nft: refused"}, False, 51),
    ({}, True, 50),
])
def test_status_codes(tmp_path: Path, agent: FakeAgent, status: dict[str, Any], down: bool,
                      code: int) -> None:
    agent.status, agent.down = status, down
    rc, out, _ = _invoke("STATUS", _conf(tmp_path, "1.1.0"))
    assert (rc == 0) == (code == 0)
    assert (out or {}).get("code", 0) == code


@pytest.mark.parametrize(("code", "message", "want"), [
    ("bad_request", "operation 'cni.add' is not served by this agent", 105),
    ("bad_request", "unknown operation 'cni.add'", 105),
    ("unavailable", "subnet exhausted", 11),
    ("timeout", "not enforced after 30s", 11),
    ("invalid", "endpoint x is invalid", 104),
    ("internal", "boom", 100),
])
def test_agent_errors_map_to_cni_codes(code: str, message: str, want: int) -> None:
    assert plugin._api_error("cni.add", code, message, []).code == want


def test_an_unreachable_socket_is_try_again(tmp_path: Path) -> None:
    with pytest.raises(CniError) as err:
        plugin.agent_call(str(tmp_path / "none.sock"), "cni.status", {})
    assert err.value.code == 11


def test_a_bug_still_answers_with_an_error_object(tmp_path: Path, agent: FakeAgent,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(call: Any) -> None:
        raise KeyError("oops")

    monkeypatch.setitem(plugin.HANDLERS, "DEL", broken)
    code, out, err = _invoke("DEL", _conf(tmp_path))
    assert code == 1 and out["code"] == 100 and "KeyError" in out["details"]
    assert "Traceback" in err


def test_version_needs_no_stdin() -> None:
    code, out, _ = _invoke("VERSION", b"")
    assert code == 0 and out["supportedVersions"] == ["0.4.0", "1.0.0", "1.1.0"]


def test_undo_runs_backwards_and_stops_at_the_first_failure() -> None:
    done: list[str] = []
    undo = Undo()
    undo.push(lambda: done.append("first"))
    undo.push(lambda: done.append("second"))
    assert undo.run() is True and done == ["second", "first"]

    def fail() -> None:
        raise OSError("agent gone")

    done.clear()
    undo.push(lambda: done.append("release address"))
    undo.push(fail)
    assert undo.run() is False and done == []  # the address is not released blindly


def test_a_busy_agent_is_knocked_on_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from stockade.agent import client
    from stockade.errors import AgentError

    attempts: list[int] = []

    class Busy:
        def __init__(self, path: str, timeout: float) -> None:
            pass

        def __enter__(self) -> Busy:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def call(self, op: str, **args: Any) -> Any:
            attempts.append(1)
            if len(attempts) < 3:
                raise AgentError(f"cannot reach the agent at /x: {plugin.BUSY}")
            return {"ready": True}

    monkeypatch.setattr(client, "AgentClient", Busy)
    assert plugin.agent_call("/x", "cni.status", {}) == {"ready": True}
    assert len(attempts) == 3
    monkeypatch.setattr(plugin, "BUSY_PATIENCE", 0.0)
    attempts.clear()
    with pytest.raises(CniError) as err:
        plugin.agent_call("/x", "cni.status", {})
    assert err.value.code == 11 and len(attempts) == 1


@pytest.mark.parametrize(("answer", "expected"), [
    ({"bindsInterfaces": False}, []),  # nft, iptables: bound by name in ADD's apply
    ({"bindsInterfaces": True}, ["cni.attached"]),  # eBPF: keyed by the interface
    ({}, ["cni.attached"]),  # an agent that does not say: ask it
])
def test_attached_is_said_only_to_a_datapath_that_binds_interfaces(
        tmp_path: Path, agent: FakeAgent, answer: dict[str, Any], expected: list[str]) -> None:
    from stockade.cni.spec import parse_conf, parse_env

    env = parse_env({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "ctr1", "CNI_NETNS": "/x",
                     "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni"})
    call = plugin.Call(parse_conf(json.dumps(_conf(tmp_path)).encode(), env), env)
    plugin._attached(call, answer)
    assert agent.ops() == expected
