"""Fuzzing the real agent's socket: frames, and the arguments of every operation.

A real agent process (its own host namespace, bridge prefix, state directory
and socket per test) starts with a known state: endpoints x/a and x/b added
through `endpoint.add`, x/c attached through `cni.add`, and one policy letting
only x/b reach x/a on TCP 80. Real packets check it: b -> a passes, c -> a is
dropped. Then, with a seeded generator (STOCKADE_FUZZ_SEED to replay another
run; the seed is in every failure):

1. **Invalid phase.** Random and mutated frames (bytes, truncated and bit-flipped
   JSON, wrong types for v/op/args, huge strings, deep nesting, NULs, invalid
   UTF-8), then for every operation in `protocol.OPS` argument sets that are
   invalid by construction: a wrong JSON type for one field, a missing required
   field, or a value no API server accepts (ports 0/65536/70000/-1, names with
   newlines, quotes, ';' or upper case, bad IPs and labels, duplicates). Every
   mutation starts from a template that would *change* the state if accepted
   (add an endpoint, delete the policy, relabel x/c, detach x/c...), so an
   operation that acts before it validates is caught. Afterwards the kernel
   table (`nft -j list table`, counters aside) and the store revision are
   unchanged, and packets still say b -> a passes, c -> a is dropped.
2. **Valid phase.** Random but valid operations on other names (namespace fz,
   CNI network fznet), without the "unchanged" assertion.
3. **Connections.** More connections than the cap at once, and concurrent
   clients sending random frames.

Throughout: every answer is one well-formed JSON line, ok or a known error code;
a connection is never dropped without an answer (except for a frame over the
size limit); no answer is "internal" (a bug: each is listed with its op and
args); an invalid argument set is never answered ok. At the end the agent is
alive and answers `status`, its thread count has not grown beyond a small bound
and its file descriptors are back near where they started.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from stockade.agent.protocol import MAX_LINE, OPS
from stockade.probe.client import Probe, run_probes
from stockade.probe.launcher import ProbeServer
from stockade.probe.protocol import Port, Protocol

from .agent_harness import AgentProcess

pytestmark = pytest.mark.privileged

SEED = int(os.environ.get("STOCKADE_FUZZ_SEED", "20261202"))
KNOWN_ERRORS = {"invalid", "not_found", "bad_request", "unavailable", "timeout"}
TCP80 = Port(80, Protocol.TCP)
ANSWER_TIMEOUT = 60.0  # a sync change waits up to 30 s for the kernel
CONNECTION_CAP = 256  # the agent's default
EXAMPLES_PER_OP = 24  # random type mutations per operation, beside the listed ones
FRAMES = 250
VALID_OPS = 120

# ---- values ------------------------------------------------------------------------------

STRINGS = ["", "x", "a\nb", 'a"b', "a';b", "x; rm -rf /", "\x00", "a\x00b", "é", "☃",
           "\U0001f600", "-", ".", "..", "/", "a/b", "A", " ", "\t", "x" * 300, "y" * 70_000,
           "$(reboot)", "`id`", "%s%n", "\\", "\u202e", "\ufeff"]
INTS = [0, 1, -1, 65535, 65536, 70000, -65536, 2**31 - 1, 2**31, 2**32, 2**53,
        2**63 - 1, -(2**63)]
FLOATS = [0.5, -1.5, 1e300, -1e-300, 80.5]
BOOLS = [True, False]
LISTS: list[Any] = [[], [1], ["x"], [None], [[]], [{}], [True, "x", 3]]
OBJECTS: list[Any] = [{}, {"a": 1}, {"": ""}, {"x": [1, 2]}, {"port": 80}]
BY_TYPE: dict[str, list[Any]] = {"str": STRINGS, "int": INTS, "float": FLOATS, "bool": BOOLS,
                                 "list": LISTS, "obj": OBJECTS}
# a field's kind -> the JSON types it accepts
ACCEPTS = {"str": {"str"}, "int": {"int"}, "num": {"int", "float"}, "bool": {"bool"},
           "list": {"list"}, "obj": {"obj"}, "port": {"int", "str"}}

BAD_DNS_LABELS = ["", "A", "Ab", "a\nb", "a b", "a;b", "a'b", 'a"b', "-a", "a-", "a_b", "a.b",
                  "x" * 64, "é", "a\x00b", "a\tb", "../a"]
BAD_SUBDOMAINS = ["", "A", "a\nb", "a b", "a;b", "a'b", 'a"b', "-a", "a-", "a_b", "a..b",
                  "x" * 254, "é", "a\x00b", ".a", "a/b"]
BAD_PORTS: list[Any] = [0, -1, 65536, 70000, 2**31, 2**63 - 1, -(2**63)]
BAD_PORT_NAMES = ["a" * 16, "http\n", "80", "a--b", "-a", "a-", "HTTP", "a b", "a;b", "é"]
BAD_PROTOCOLS = ["ICMP", "", "tcp\n", "TCP ", "T;CP", "x" * 100]
BAD_IPS = ["10.0.0.256", "1.2.3", "::g", "", "10.0.0.1/24", " 10.0.0.1", "10.0.0.1\n",
           "localhost", "10.0.0.1; true", "fd00::1::2", "0x0a000001"]
BAD_LABEL_KEYS = ["", "a b", "-a", "a/b/c", "x" * 64, "é", "a\n", "/a", "a/", "a;b",
                  "-x.example.com/a", ("x" * 254) + "/a"]
BAD_LABEL_VALUES = ["a b", "x" * 64, "-a", "a-", "a\n", "é", "a;b", "a'b"]
BAD_CIDRS = ["10.0.0.0/33", "x", "", "10.0.0.0/-1", "300.0.0.0/8", "10.0.0.0/8/8", "::/129"]


def _short(value: Any, limit: int = 300) -> str:
    """JSON for a failure message: long strings and the whole cut to a readable size."""
    def cut(v: Any) -> Any:
        if isinstance(v, str) and len(v) > 40:
            return v[:20] + f"...({len(v)} chars)"
        if isinstance(v, list):
            return [cut(x) for x in v]
        if isinstance(v, dict):
            return {cut(k): cut(x) for k, x in v.items()}
        return v
    text = json.dumps(cut(value), ensure_ascii=True) if not isinstance(value, bytes) \
        else repr(value)
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} chars)"


def _where(path: tuple[Any, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


# ---- the wire -------------------------------------------------------------------------------


@dataclass
class Outcome:
    what: str  # the op and args, or the frame, for failure messages
    answer: dict[str, Any] | None
    problem: str = ""  # a malformed answer or no answer

    @property
    def code(self) -> str:
        if self.answer is None:
            return "-"
        return "ok" if self.answer.get("ok") else str(self.answer["error"]["code"])


class Wire:
    """One connection to the agent, reopened when the agent closes it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.pending = b""

    def _open(self) -> socket.socket:
        if self.sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(ANSWER_TIMEOUT)
            s.connect(self.path)
            self.sock, self.pending = s, b""
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def exchange(self, frame: bytes, what: str) -> Outcome:
        """Send one line (no newline inside), read one answer line and check its shape."""
        assert b"\n" not in frame
        s = self._open()
        # an answer sent before the frame was read whole is still there to read
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(frame + b"\n")
        try:
            while b"\n" not in self.pending:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                self.pending += chunk
        except (TimeoutError, OSError) as exc:
            self.close()
            return Outcome(what, None, f"no answer: {exc!r}")
        line, nl, self.pending = self.pending.partition(b"\n")
        if not nl:
            self.close()
            return Outcome(what, None, f"connection closed without an answer "
                                       f"(got {line[:200]!r})")
        return check_answer(line, what)


def check_answer(line: bytes, what: str) -> Outcome:
    try:
        answer = json.loads(line)
    except ValueError:
        return Outcome(what, None, f"the answer is not JSON: {line[:300]!r}")
    shape_ok = isinstance(answer, dict) and answer.get("v") == 1 and isinstance(
        answer.get("ok"), bool)
    if shape_ok and answer["ok"]:
        shape_ok = "result" in answer
    elif shape_ok:
        err = answer.get("error")
        shape_ok = (isinstance(err, dict) and isinstance(err.get("message"), str)
                    and isinstance(err.get("lines"), list)
                    and all(isinstance(x, str) for x in err["lines"])
                    and err.get("code") in KNOWN_ERRORS | {"internal"})
    if not shape_ok:
        return Outcome(what, None, f"a malformed answer: {line[:300]!r}")
    return Outcome(what, answer)


def frame_of(op: Any, args: Any) -> bytes:
    return json.dumps({"v": 1, "op": op, "args": args}, separators=(",", ":")).encode()


# ---- the record of a run ----------------------------------------------------------------------


@dataclass
class Findings:
    seed: int
    internal: list[str] = field(default_factory=list)
    accepted_invalid: list[str] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # invalid requests that changed state
    other: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def note(self, out: Outcome, *, must_fail: bool) -> None:
        self.counts[out.code] = self.counts.get(out.code, 0) + 1
        if out.problem:
            self.unanswered.append(f"{out.what}: {out.problem}")
        elif out.code == "internal":
            assert out.answer is not None
            self.internal.append(f"{out.what} -> {_short(out.answer['error'], 400)}")
        elif must_fail and out.code == "ok":
            assert out.answer is not None
            self.accepted_invalid.append(f"{out.what} -> ok {_short(out.answer['result'])}")

    def report(self) -> str:
        parts = [f"fuzz seed {self.seed} (STOCKADE_FUZZ_SEED); answers by code: {self.counts}"]
        for title, items in (("answered internal (bugs)", self.internal),
                             ("invalid arguments accepted", self.accepted_invalid),
                             ("no or malformed answer", self.unanswered),
                             ("invalid requests that changed the state", self.changed),
                             ("other", self.other)):
            if items:
                parts.append(f"{title}: {len(items)}")
                parts += [f"  - {item}" for item in _dedup(items)[:80]]
        return "\n".join(parts)

    @property
    def failed(self) -> bool:
        return bool(self.internal or self.accepted_invalid or self.unanswered or self.changed
                    or self.other)


def _dedup(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


# ---- the agent and its known state -----------------------------------------------------------


def _policy(name: str, target: str, source: dict[str, str], port: Any = 80,
            namespace: str = "x") -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"podSelector": {"matchLabels": {"pod": target}},
                 "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": source}}],
                              "ports": [{"protocol": "TCP", "port": port}]}]},
    }


@dataclass
class World:
    agent: AgentProcess
    trio: Any
    c_ident: dict[str, str]  # x/c's CNI attachment

    @property
    def pid(self) -> int:
        assert self.agent.proc is not None
        return self.agent.proc.pid

    def threads(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
        raise AssertionError("no Threads line")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def revision(self) -> int:
        """The store's revision once it holds still (a container's cleanup comes late)."""
        last, steady = -1, 0
        deadline = time.monotonic() + 5
        while steady < 5 and time.monotonic() < deadline:
            now = int(self.agent.call("status")["revision"])
            steady = steady + 1 if now == last else 0
            last = now
            if steady < 5:
                time.sleep(0.05)
        return last

    def remove_containers(self) -> None:
        for item in self.agent.call("ps")["items"]:
            with contextlib.suppress(Exception):
                self.agent.call("rm", key=item["key"], grace=0.5)

    def restore(self, snapshot: dict[str, Any]) -> int:
        """Back to the known state after a request changed it; the new revision."""
        self.remove_containers()
        self.agent.call("snapshot.restore", snapshot=snapshot)
        self.agent.call("cni.add", **self.c_ident, labels={"pod": "c"}, endpoint={
            "namespace": "x", "name": "c",
            "ips": [self.trio.c.address4, self.trio.c.address6],
            "netns": self.trio.c.netns_path, "hostInterface": self.trio.c.host_ifname})
        return self.revision()

    def alive(self) -> bool:
        return self.agent.proc is not None and self.agent.proc.poll() is None

    def table(self) -> Any:
        out = subprocess.run(["ip", "netns", "exec", self.trio.host_netns, "nft", "-j", "list",
                              "table", "inet", "stockade"], capture_output=True, text=True,
                             check=True)
        return _without_counters(json.loads(out.stdout))

    def verdicts(self) -> dict[str, bool]:
        atts = {a.key.split("/")[1]: a for a in self.trio.all}
        probes = [Probe(s, atts[s].netns, d, atts[d].address4, TCP80)
                  for s, d in (("b", "a"), ("c", "a"), ("a", "b"))]
        return {f"{v.probe.src}->{v.probe.dst}": v.allowed
                for v in run_probes(probes, timeout=0.6)}


def _without_counters(value: Any) -> Any:
    """The table's JSON without what packets change (counters), metainfo aside."""
    if isinstance(value, dict):
        return {k: ({} if k == "counter" and isinstance(v, dict) else _without_counters(v))
                for k, v in value.items() if k != "metainfo"}
    if isinstance(value, list):
        return [_without_counters(v) for v in value if not (
            isinstance(v, dict) and "metainfo" in v)]
    return value


EXPECTED = {"b->a": True, "c->a": False, "a->b": True}


@pytest.fixture
def world(tmp_path: Path, trio, netns_prefix: str) -> Iterator[World]:
    agent = AgentProcess(tmp_path, trio.host_netns, netns_prefix).start()
    try:
        for att in (trio.a, trio.b):
            ns, name = att.key.split("/")
            agent.call("endpoint.add", endpoint={
                "namespace": ns, "name": name, "labels": {"pod": name},
                "ips": [att.address4, att.address6], "netns": att.netns_path,
                "interface": att.ifname, "hostInterface": att.host_ifname})
        c = trio.c
        ident = {"network": "fuzznet", "containerID": "fuzzc0", "ifname": c.ifname}
        agent.call("cni.add", **ident, labels={"pod": "c"}, endpoint={
            "namespace": "x", "name": "c", "ips": [c.address4, c.address6],
            "netns": c.netns_path, "hostInterface": c.host_ifname})
        agent.call("apply", documents=[_policy("web", "a", {"pod": "b"})], source="fuzz")
        yield World(agent, trio, ident)
    finally:
        with contextlib.suppress(Exception):
            if agent.proc is not None and agent.proc.poll() is None:
                for item in agent.call("ps")["items"]:
                    with contextlib.suppress(Exception):
                        agent.call("rm", key=item["key"], grace=0.5)
        agent.stop()
        _kill_leftovers(netns_prefix)


def _kill_leftovers(prefix: str) -> None:
    """Processes `run` may have left in the test's namespaces (none, normally)."""
    for name in os.listdir("/run/netns") if os.path.isdir("/run/netns") else []:
        if not name.startswith(prefix):
            continue
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)


# ---- invalid argument sets, by construction -------------------------------------------------


@dataclass(frozen=True)
class Field:
    path: tuple[Any, ...]  # keys (and list indexes) into the args
    kind: str  # str | int | num | bool | list | obj
    required: bool = False  # absent (or null) is invalid too
    bad: tuple[Any, ...] = ()  # values of the right type no server accepts


def _set(args: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(args)
    node: Any = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def _drop(args: dict[str, Any], path: tuple[Any, ...]) -> dict[str, Any]:
    out = copy.deepcopy(args)
    node: Any = out
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return out


def _wrong_types(kind: str) -> list[Any]:
    return [v for t, values in BY_TYPE.items() if t not in ACCEPTS[kind] for v in values]


def _ports_bad() -> list[Any]:
    out: list[Any] = [[{"name": "http", "port": p, "protocol": "TCP"}] for p in BAD_PORTS]
    out += [[{"name": n, "port": 80, "protocol": "TCP"}] for n in BAD_PORT_NAMES]
    out += [[{"name": "http", "port": 80, "protocol": p}] for p in BAD_PROTOCOLS]
    out += [[{"name": "http", "port": 80, "protocol": "TCP"},
             {"name": "http", "port": 81, "protocol": "TCP"}],  # a name twice
            [{"name": "web", "port": "80", "protocol": "TCP"}],
            [{"name": "web", "protocol": "TCP"}], [80], ["80/tcp"],
            [{"name": "web", "port": 80.5, "protocol": "TCP"}],
            [{"name": "web", "port": True, "protocol": "TCP"}]]
    return out


def _labels_bad() -> list[Any]:
    out: list[Any] = [{k: "v"} for k in BAD_LABEL_KEYS]
    out += [{"app": v} for v in BAD_LABEL_VALUES]
    out += [{"app": 5}, {"app": None}, {"app": ["x"]}, {"app": True}, {"app": {"a": "b"}}]
    return out


def templates(world: World) -> dict[str, tuple[dict[str, Any], list[Field]]]:
    """Per operation: arguments that would change the known state, and their fields."""
    c = world.c_ident
    a_ip = world.trio.a.address4
    bad_ips = [[ip] for ip in BAD_IPS] + [[a_ip], ["10.244.0.60", "10.244.0.60"], [5], "x"]
    endpoint_spec = {"namespace": "x", "name": "d", "labels": {"pod": "b"},
                     "ips": ["10.244.0.60"], "netns": "", "interface": "", "hostInterface": "",
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    ident_bad = {
        "network": ["", "fuzz net", "a;b", "a/b", "x\n", "é"],
        "containerID": ["", "a b", "a\n", "a;b", "a/b", "\x00"],
        "ifname": ["", "a/b", "a:b", "a b", "x" * 16, ".", "..", "a\n"],
    }
    policy = _policy("fz-allow-c", "a", {"pod": "c"})
    snapshot = world.agent.call("snapshot.save")["snapshot"]
    restore = dict(snapshot, policies=[])  # valid: restoring it deletes policy web

    t: dict[str, tuple[dict[str, Any], list[Field]]] = {
        "status": ({}, []),
        "snapshot.save": ({}, []),
        "cni.status": ({}, []),
        "get": ({"kind": "endpoints"}, [
            Field(("kind",), "str", True, ("", "pods", "endpoints\n", "Endpoints", "x" * 300))]),
        "apply": ({"documents": [policy], "source": "fuzz", "sync": True}, [
            Field(("documents",), "list", True, (
                [policy, policy],  # the same object twice
                [policy, 5], [policy, "x"], [policy, []], [policy, None],
                [policy, {"kind": "Deployment", "metadata": {"name": "d"}}],
                [policy, {"kind": "Pod", "metadata": {"name": "p", "namespace": "x"},
                          "status": {"podIPs": [{"ip": a_ip}]}}],  # a's address again
                [dict(policy, spec=dict(policy["spec"], podSelectr={}))],
            )),
            Field(("documents", 0, "metadata", "name"), "str", True, tuple(BAD_SUBDOMAINS)),
            Field(("documents", 0, "metadata", "namespace"), "str", False,
                  tuple(x for x in BAD_DNS_LABELS if x)),
            Field(("documents", 0, "spec", "podSelector"), "obj", False, (
                {"matchLabels": {"a b": "c"}}, {"matchLabels": {"pod": 5}},
                {"matchExpressions": [{"key": "pod", "operator": "Sideways"}]},
                {"matchExpressions": [{"key": "pod", "operator": "In", "values": []}]},
                {"matchExpressions": [{"key": "pod", "operator": "Exists",
                                       "values": ["x"]}]},
                {"nope": 1})),
            Field(("documents", 0, "spec", "ingress", 0, "ports", 0, "port"), "port", False,
                  tuple(BAD_PORTS) + tuple(BAD_PORT_NAMES)),
            Field(("documents", 0, "spec", "ingress", 0, "ports", 0, "protocol"), "str", False,
                  tuple(BAD_PROTOCOLS)),
            Field(("documents", 0, "spec", "ingress", 0, "ports", 0), "obj", False, (
                {"protocol": "TCP", "port": 80, "endPort": 79},
                {"protocol": "TCP", "port": "http", "endPort": 90},
                {"protocol": "TCP", "port": 80, "endPort": 70000})),
            Field(("documents", 0, "spec", "ingress", 0, "from", 0), "obj", False, tuple(
                [{"ipBlock": {"cidr": cidr}} for cidr in BAD_CIDRS]
                + [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}},
                   {"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}},
                   {"namespaceSelector": {"matchLabels": {"-x": "y"}}}])),
            Field(("documents", 0, "spec", "policyTypes"), "list", False,
                  (["Sideways"], ["Ingress", "Egress", "Ingress"], [5])),
            Field(("source",), "str"),
            Field(("sync",), "bool"),
        ]),
        "delete": ({"refs": [{"kind": "NetworkPolicy", "namespace": "x", "name": "web"}],
                    "sync": True}, [
            Field(("refs",), "list", False, (
                [{"kind": "NetworkPolicy", "namespace": "x", "name": "web"}, 5],
                [{"kind": "NetworkPolicy", "namespace": "x", "name": "web"},
                 {"kind": "Deployment", "namespace": "x", "name": "web"}],
                [{"kind": "NetworkPolicy", "namespace": "x", "name": "web"}, "x/web"])),
            Field(("refs", 0, "kind"), "str", False, ("Deployment", "")),
            Field(("refs", 0, "namespace"), "str"),
            Field(("refs", 0, "name"), "str"),
            Field(("documents",), "list"),
            Field(("sync",), "bool"),
        ]),
        "label": ({"kind": "endpoint", "name": "x/c", "set": {"pod": "b"}, "remove": [],
                   "sync": True}, [
            Field(("kind",), "str", True, ("pod", "endpoints", "", "Endpoint", "policy")),
            Field(("name",), "str", True),
            Field(("set",), "obj", False, tuple(_labels_bad())),
            Field(("remove",), "list", False, (["pod", 5], ["pod", None], ["pod", ["x"]])),
            Field(("sync",), "bool"),
        ]),
        "snapshot.restore": ({"snapshot": restore, "sync": True}, [
            Field(("snapshot",), "obj", True, (
                dict(restore, version=2), dict(restore, kind="Snapshot"),
                dict(restore, surprise=1),
                dict(restore, namespaces=[{"name": "Bad"}]),
                dict(restore, namespaces=[{"name": "x"}, {"name": "x"}]),
                dict(restore, endpoints=[dict(restore["endpoints"][0], ips=["10.0.0.999"])]),
                dict(restore, endpoints=[dict(restore["endpoints"][0], name="a\nb")]),
                dict(restore, endpoints=[dict(restore["endpoints"][0],
                                              ports=[{"port": 70000}])]),
                dict(restore, endpoints=[dict(e, ips=[a_ip]) for e in restore["endpoints"]]),
                dict(restore, endpoints=restore["endpoints"] * 2),
                dict(restore, endpoints=[dict(restore["endpoints"][0], owner="root")]),
                dict(restore, endpoints=[5]),
                dict(restore, policies=[_policy("p", "a", {"pod": "b"}, 0)]),
                dict(restore, policies=[{"kind": "NetworkPolicy"}]),
                dict(restore, policies=[policy, policy]),
                dict(restore, meta={"ipam": "garbage"}),
                dict(restore, meta={"ipam": {"subnet": "10.0.0.0/33"}}),
                dict(restore, meta={"ipam": {"allocated": 5}}),
                dict(restore, meta=[]),
                dict(restore, revision="x"),
            )),
            Field(("snapshot", "namespaces"), "list", True),
            Field(("snapshot", "endpoints"), "list", True),
            Field(("snapshot", "policies"), "list", True),
            Field(("sync",), "bool"),
        ]),
        "endpoint.add": ({"endpoint": endpoint_spec, "sync": True}, [
            Field(("endpoint",), "obj", True),
            Field(("endpoint", "namespace"), "str", True, tuple(BAD_DNS_LABELS)),
            Field(("endpoint", "name"), "str", True, tuple(BAD_SUBDOMAINS)),
            Field(("endpoint", "labels"), "obj", False, tuple(_labels_bad())),
            Field(("endpoint", "ips"), "list", True, tuple(bad_ips)),
            Field(("endpoint", "ports"), "list", False, tuple(_ports_bad())),
            Field(("endpoint", "netns"), "str"),
            Field(("endpoint", "interface"), "str"),
            Field(("endpoint", "hostInterface"), "str"),
            Field(("sync",), "bool"),
        ]),
        "endpoint.remove": ({"key": "x/b", "sync": True}, [
            Field(("key",), "str", True),
            Field(("sync",), "bool"),
        ]),
        "ipam.allocate": ({"owner": "fuzz-owner"}, [Field(("owner",), "str", True, ("",))]),
        "ipam.release": ({"owner": "fuzz-owner"}, [Field(("owner",), "str", True)]),
        "run": ({"namespace": "x", "name": "fzrun", "labels": {"pod": "b"},
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
                 "command": ["/bin/true"], "cwd": "/", "env": {"A": "1"}}, [
            Field(("namespace",), "str", False, tuple(x for x in BAD_DNS_LABELS if x)),
            Field(("name",), "str", True, tuple(BAD_SUBDOMAINS)),
            Field(("labels",), "obj", False, tuple(_labels_bad())),
            Field(("ports",), "list", False, tuple(_ports_bad())),
            Field(("command",), "list", True, ([], [""], ["/bin/true", "a\x00b"], [5],
                                               ["/bin/true", None], [["/bin/true"]])),
            Field(("cwd",), "str", False, ("relative", "/nonexistent-fuzz-dir", "",
                                           "/etc/passwd", "/\x00")),
            Field(("env",), "obj", False, ({"": "x"}, {"A=B": "x"}, {"A": "x\x00"},
                                           {"A": 5}, {"A": None}, {"A\x00": "x"})),
        ]),
        "ps": ({"all": True}, [Field(("all",), "bool")]),
        "rm": ({"key": "x/fzrun", "grace": 1}, [
            Field(("key",), "str", True),
            Field(("grace",), "num", False, (-1, -0.5, 1e300, 2**63 - 1)),
        ]),
        "flows": ({"since": 0, "limit": 10, "tail": False}, [
            Field(("since",), "int", False, (-1, -(2**63))),
            Field(("limit",), "int", False, (-1, -(2**63))),
            Field(("tail",), "bool"),
        ]),
        "cni.add": ({"network": "fuzznet", "containerID": "fuzzd", "ifname": "eth9",
                     "labels": {"pod": "b"}, "allocate": False, "sync": True,
                     "endpoint": {"namespace": "x", "name": "e", "ips": ["10.244.0.61"],
                                  "netns": "", "hostInterface": "",
                                  "ports": [{"name": "http", "port": 80}]}}, [
            Field(("network",), "str", True, tuple(ident_bad["network"])),
            Field(("containerID",), "str", True, tuple(ident_bad["containerID"])),
            Field(("ifname",), "str", True, tuple(ident_bad["ifname"])),
            Field(("labels",), "obj", False, tuple(_labels_bad())),
            Field(("allocate",), "bool"),
            Field(("sync",), "bool"),
            Field(("endpoint",), "obj", True),
            Field(("endpoint", "namespace"), "str", True, tuple(BAD_DNS_LABELS)),
            Field(("endpoint", "name"), "str", True, tuple(BAD_SUBDOMAINS)),
            Field(("endpoint", "ips"), "list", False, tuple(bad_ips)),
            Field(("endpoint", "ports"), "list", False, tuple(_ports_bad())),
            Field(("endpoint", "netns"), "str"),
            Field(("endpoint", "hostInterface"), "str"),
        ]),
        "cni.del": ({**c, "sync": True}, [
            Field(("network",), "str", True),
            Field(("containerID",), "str", True),
            Field(("ifname",), "str", True),
            Field(("sync",), "bool"),
        ]),
        # the interface of x/c's attachment exists: on nft, nothing to do
        "cni.attached": ({**c}, [
            Field(("network",), "str", True),
            Field(("containerID",), "str", True),
            Field(("ifname",), "str", True),
        ]),
        "cni.check": ({**c, "ips": [world.trio.c.address4, world.trio.c.address6]}, [
            Field(("network",), "str", True),
            Field(("containerID",), "str", True),
            Field(("ifname",), "str", True),
            Field(("ips",), "list", False, ([5], [None], [["x"]])),
        ]),
        # valid as given (x/c's attachment is listed): changes nothing; every garbage
        # entry must be refused, not ignored (ignoring it makes x/c stale, and removed)
        "cni.gc": ({"network": "fuzznet", "sync": True,
                    "valid": [{"containerID": c["containerID"], "ifname": c["ifname"]}]}, [
            Field(("network",), "str", True, ("",)),
            Field(("valid",), "list", True, ([5], ["x"], [[]], [None],
                                             [{"containerID": 5, "ifname": c["ifname"]}],
                                             [{"containerID": c["containerID"], "ifname": 5}],
                                             [{"containerID": [c["containerID"]]}])),
            Field(("valid", 0, "containerID"), "str", True),
            Field(("valid", 0, "ifname"), "str", False),
            Field(("sync",), "bool"),
        ]),
        # VERSION: the plugin answers without touching anything
        "cni.exec": ({"env": {"CNI_COMMAND": "VERSION"}, "stdin": '{"cniVersion":"1.0.0"}',
                      "pid": 0}, [
            Field(("env",), "obj", True, ({"CNI_COMMAND": 5}, {"CNI_COMMAND": None})),
            Field(("stdin",), "str", True),
            Field(("pid",), "int", False, (-1, 2**40)),
            Field(("fds",), "list", False, ([], ["net"], ["net", "mnt", "x"], [1, 2, 3])),
        ]),
    }
    assert set(t) == set(OPS), set(OPS) ^ set(t)
    return t


# operations whose template changes nothing (reads, and a GC that lists x/c)
HARMLESS = {"status", "snapshot.save", "cni.status", "get", "ps", "flows", "cni.check",
            "cni.gc", "cni.exec", "cni.attached"}


def invalid_cases(rng: random.Random,
                  world: World) -> list[tuple[str, dict[str, Any], bool, str]]:
    """(op, args, must_fail, what was done to the template): every listed bad value,
    every required field missing or null, and random wrong types, per op."""
    out: list[tuple[str, dict[str, Any], bool, str]] = []
    for op, (base, fields) in templates(world).items():
        cases: list[tuple[dict[str, Any], bool, str]] = []
        for f in fields:
            cases += [(_set(base, f.path, v), True, f"{_where(f.path)}={_short(v, 80)}")
                      for v in f.bad]
            if f.required:
                cases.append((_drop(base, f.path), True, f"{_where(f.path)} missing"))
                cases.append((_set(base, f.path, None), True, f"{_where(f.path)}=null"))
        for _ in range(EXAMPLES_PER_OP if fields else 0):
            f = rng.choice(fields)
            v = rng.choice(_wrong_types(f.kind))
            cases.append((_set(base, f.path, v), True, f"{_where(f.path)}={_short(v, 80)}"))
        # unknown arguments, where the template changes nothing: no expectation but
        # a well-formed answer (ignored or refused)
        if op in HARMLESS:
            for _ in range(3):
                extra = {rng.choice(["zz", "args", "op", "v", "", "\n", "sync "]):
                         rng.choice(STRINGS + INTS + LISTS)}
                cases.append(({**copy.deepcopy(base), **extra}, False,
                              f"unknown argument {_short(extra, 80)}"))
        out += [(op, args, must_fail, note) for args, must_fail, note in cases]
    rng.shuffle(out)
    return out


# ---- frames ----------------------------------------------------------------------------------


def _nest(depth: int) -> Any:
    value: Any = []
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def random_frames(rng: random.Random) -> list[tuple[bytes, bool]]:
    """(frame, over_the_size_limit). Built from read-only requests, so no mutation of
    them can become a change of state; none holds a newline (one frame, one answer)."""
    seeds = [frame_of("status", {}), frame_of("get", {"kind": "policies"}),
             frame_of("snapshot.save", {}), frame_of("cni.status", {})]
    frames: list[bytes] = [
        b"", b" ", b"\t\r", b"\x00", b"\x00" * 1000, b"\xff\xfe\xfd", b"\xc0\xaf",
        b"null", b"true", b"[]", b"{}", b"0", b'"status"', b"{" * 10, b"[" * 200_000,
        b"[" * 200_000 + b"]" * 200_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        frame_of("status", {"x": _nest(80)}), frame_of("status", {"x": _nest(900)}),
        b'{"v":1,"op":"status","args":{"n":' + b"9" * 10_000 + b"}}",
        b'{"v":1,"op":"status","args":{"n":1' + b"0" * 400 + b".5e99999}}",
        b'{"v":1,"op":"status","args":{"n":NaN,"m":-Infinity}}',
        b'{"v":1,"op":"status","args":{"s":"\\ud800\\u0000"}}',
        b'{"v":1,"op":"status","op":"delete","args":{}}',
        b'{"v":1,"op":"get","args":{"kind":"policies","kind":"endpoints"}}',
        b'{"v":1.0,"op":"status"}', b'{"v":true,"op":"status"}', b'{"v":"1","op":"status"}',
        b'{"v":1,"op":null}', b'{"v":1,"op":5}', b'{"v":1,"op":{"x":1}}',
        b'{"v":1,"op":"status","args":[]}', b'{"v":1,"op":"status","args":"x"}',
        b'{"v":1,"op":"status","args":5}', b'{"v":1,"op":"STATUS"}',
        b'{"v":1,"op":"status\\u0000"}', b'{"v":1,"op":"sta\\ntus"}',
        b'\xef\xbb\xbf{"v":1,"op":"status"}', '{"v":1,"op":"status"}'.encode("utf-16"),
        b'{"v":1,"op":"status","args":{"s":"' + b"x" * 8_000_000 + b'"}}',
        b'{"v":1,"op":"get","args":{"kind":"' + b"\xe2\x98\x83" * 100_000 + b'"}}',
        b"{'v':1,'op':'status'}", b'{"v":1,"op":"status",}', b'{"v":1 "op":"status"}',
        b"\r".join(seeds),
    ]
    frames += [f.replace(b"\n", b" ") for f in seeds]
    while len(frames) < FRAMES:
        base = bytearray(rng.choice(seeds))
        how = rng.randrange(6)
        if how == 0:  # truncated
            base = base[:rng.randrange(len(base))]
        elif how == 1:  # flipped bytes
            for _ in range(rng.randint(1, 4)):
                base[rng.randrange(len(base))] = rng.randrange(256)
        elif how == 2:  # inserted bytes
            for _ in range(rng.randint(1, 4)):
                base.insert(rng.randrange(len(base) + 1), rng.randrange(256))
        elif how == 3:  # deleted bytes
            for _ in range(rng.randint(1, 4)):
                if base:
                    del base[rng.randrange(len(base))]
        elif how == 4:  # random bytes
            base = bytearray(rng.randbytes(rng.randint(1, 2000)))
        else:  # a random JSON value where v, op or args belong
            key = rng.choice(["v", "op", "args"])
            doc = json.loads(bytes(rng.choice(seeds)))
            doc[key] = rng.choice(STRINGS + INTS + FLOATS + BOOLS + LISTS + OBJECTS + [None])
            base = bytearray(json.dumps(doc).encode())
        frames.append(bytes(base).replace(b"\n", b" "))
    out = [(f, False) for f in frames]
    out.append((b"x" * (MAX_LINE + 1024), True))  # over the limit: may be cut off
    rng.shuffle(out)
    return out


# ---- valid random operations ----------------------------------------------------------------


class ValidOps:
    """Random valid requests on names of their own (namespace fz, CNI network fznet)."""

    def __init__(self, rng: random.Random, snapshot: dict[str, Any]) -> None:
        self.rng = rng
        self.snapshot = snapshot
        self.names = [f"n{i}" for i in range(6)]

    def labels(self) -> dict[str, str]:
        r = self.rng
        return {r.choice(["app", "tier", "fz.io/role", "pod"]): r.choice(["a", "b", "web-1",
                                                                          "x.y_z", ""])
                for _ in range(r.randint(0, 3))}

    def ip(self) -> str:
        return f"10.244.{self.rng.randint(100, 120)}.{self.rng.randint(1, 254)}"

    def ports(self) -> list[dict[str, Any]]:
        r = self.rng
        return [{"name": f"p{i}", "port": r.randint(1, 65535),
                 "protocol": r.choice(["TCP", "UDP", "SCTP"])}
                for i in range(r.randint(0, 3))]

    def doc(self) -> dict[str, Any]:
        r = self.rng
        kind = r.choice(["NetworkPolicy", "Pod", "Namespace"])
        name = r.choice(self.names)
        if kind == "Namespace":
            return {"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": "fz", "labels": self.labels()}}
        if kind == "Pod":
            return {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "namespace": "fz", "labels": self.labels()},
                    "status": {"podIPs": [{"ip": self.ip()}]}}
        p = _policy(name, r.choice(["a", "b", "c"]), self.labels() or {"pod": "b"},
                    r.choice([r.randint(1, 65535), "http", "p0"]), namespace="fz")
        if r.random() < 0.3:
            p["spec"]["ingress"][0]["from"] = [{"ipBlock": {"cidr": "10.0.0.0/8",
                                                            "except": ["10.1.0.0/16"]}}]
        return p

    def next(self) -> tuple[str, dict[str, Any]]:
        r = self.rng
        op = r.choice(OPS)
        name = r.choice(self.names)
        sync = r.choice([True, False])
        cid = f"fz{r.randrange(4)}"
        args: dict[str, Any]
        if op == "apply":
            args = {"documents": [self.doc() for _ in range(r.randint(1, 3))],
                    "source": "fuzz", "sync": sync}
        elif op == "delete":
            args = {"refs": [{"kind": r.choice(["NetworkPolicy", "Pod", "Namespace"]),
                              "namespace": "fz", "name": r.choice(self.names)}],
                    "sync": sync}
        elif op == "get":
            args = {"kind": r.choice(["namespaces", "endpoints", "policies"])}
        elif op == "label":
            args = r.choice([{"kind": "namespace", "name": "fz"},
                             {"kind": "endpoint", "name": f"fz/{name}"}])
            args |= {"set": self.labels(), "remove": r.sample(["app", "tier"], r.randint(0, 2)),
                     "sync": sync}
        elif op == "snapshot.restore":
            args = {"snapshot": self.snapshot, "sync": sync}
        elif op == "endpoint.add":
            args = {"endpoint": {"namespace": "fz", "name": name, "labels": self.labels(),
                                 "ips": [self.ip()], "ports": self.ports()}, "sync": sync}
        elif op == "endpoint.remove":
            args = {"key": f"fz/{name}", "sync": sync}
        elif op in ("ipam.allocate", "ipam.release"):
            args = {"owner": f"fz-owner-{r.randrange(4)}"}
        elif op == "run":
            args = {"namespace": "fz", "name": f"run-{name}", "labels": self.labels(),
                    "command": r.choice([["/bin/true"], ["/bin/sleep", "0.2"]]),
                    "ports": self.ports()}
        elif op == "ps":
            args = {"all": r.choice([True, False])}
        elif op == "rm":
            args = {"key": f"fz/run-{name}", "grace": r.choice([0, 0.5, 1])}
        elif op == "flows":
            args = {"since": r.randrange(0, 100), "limit": r.randrange(0, 100),
                    "tail": r.choice([True, False])}
        elif op == "cni.add":
            args = {"network": "fznet", "containerID": cid, "ifname": "eth0",
                    "labels": self.labels(), "allocate": r.choice([True, False]),
                    "sync": sync, "endpoint": {"namespace": "fz", "name": f"cni-{cid}",
                                               "ips": [self.ip()], "ports": self.ports(),
                                               "netns": "", "hostInterface": ""}}
        elif op in ("cni.del", "cni.check", "cni.attached"):
            args = {"network": "fznet", "containerID": cid, "ifname": "eth0"}
            if op == "cni.del":
                args["sync"] = sync
        elif op == "cni.gc":
            args = {"network": "fznet", "sync": sync,
                    "valid": [{"containerID": f"fz{i}", "ifname": "eth0"}
                              for i in range(4) if r.random() < 0.5]}
        else:
            args = {}
        return op, args


# ---- connections ------------------------------------------------------------------------------


def flood_connections(world: World, findings: Findings) -> None:
    """More connections than the cap at once: the excess is told so, nothing else breaks."""
    held: list[socket.socket] = []
    try:
        for _ in range(CONNECTION_CAP + 60):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            try:
                s.connect(world.agent.socket)
            except OSError as exc:
                findings.other.append(f"connect {len(held)} refused by the kernel: {exc!r}")
                s.close()
                continue
            held.append(s)
        time.sleep(0.5)
        refused = 0
        for s in held:
            s.settimeout(0.05)
            try:
                data = s.recv(4096)
            except TimeoutError:
                continue  # accepted and waiting
            out = check_answer(data.rstrip(b"\n"), "a connection beyond the cap")
            if out.code != "unavailable":
                findings.other.append(f"beyond the cap: {out.problem or out.answer}")
            refused += 1
        if refused < 60 - 5:  # the other tests' connections may come and go: a little slack
            findings.other.append(f"only {refused} of {len(held)} connections were refused "
                                  f"with a cap of {CONNECTION_CAP}")
    finally:
        for s in held:
            s.close()


def concurrent_frames(world: World, rng: random.Random, findings: Findings) -> None:
    """Clients at once, each with its own connection and random frames."""
    import threading

    lock = threading.Lock()
    batches = [[f for f, big in random_frames(random.Random(rng.random())) if not big][:25]
               for _ in range(24)]

    def client(frames: list[bytes]) -> None:
        wire = Wire(world.agent.socket)
        try:
            for f in frames:
                out = wire.exchange(f, f"concurrent frame {_short(f, 120)}")
                with lock:
                    findings.note(out, must_fail=False)
        finally:
            wire.close()

    threads = [threading.Thread(target=client, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ---- the test ------------------------------------------------------------------------------------


def _settle(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def test_fuzz_the_agents_socket(world: World) -> None:
    rng = random.Random(SEED)
    findings = Findings(SEED)
    started = time.monotonic()
    with ProbeServer({a.netns: [TCP80] for a in world.trio.all}):
        assert world.verdicts() == EXPECTED, "the known state is not enforced to begin with"
        threads0, fds0 = world.threads(), world.fds()
        table0 = world.table()
        baseline = world.agent.call("snapshot.save")["snapshot"]
        cases = invalid_cases(rng, world)
        frames = random_frames(rng)

        # 1. invalid frames and arguments: nothing may change
        revision = world.revision()
        restored = 0
        wire = Wire(world.agent.socket)
        try:
            for frame, over_limit in frames:
                out = wire.exchange(frame, f"frame {_short(frame, 160)}")
                if over_limit:  # answered "too large" and closed, or cut off mid-frame
                    wire.close()
                    if out.problem:
                        continue
                findings.note(out, must_fail=False)
            if world.revision() != revision:
                findings.changed.append("random frames changed the store")
                revision, restored = world.restore(baseline), restored + 1
            for op, args, must_fail, note in cases:
                out = wire.exchange(frame_of(op, args), f"{op} [{note}] {_short(args)}")
                findings.note(out, must_fail=must_fail)
                now = world.agent.call("status")["revision"]
                if now != revision:
                    findings.changed.append(f"{op} [{note}] -> {out.code}, and the store "
                                            f"went from revision {revision} to {now}")
                    revision, restored = world.restore(baseline), restored + 1
        finally:
            wire.close()
        assert world.alive(), "the agent died during the invalid phase:\n" + \
            world.agent.logs()[-3000:]
        table1 = world.table()
        if restored:  # the state was put back: compare what the rules say, not their handles
            table0, table1 = _without_handles(table0), _without_handles(table1)
        if table1 != table0:
            findings.other.append("invalid requests changed the kernel table:\n"
                                  + _table_diff(table0, table1))
        verdicts = world.verdicts()
        if verdicts != EXPECTED:
            findings.other.append(f"after the invalid phase, packets say {verdicts}, "
                                  f"not {EXPECTED}")

        # 2. valid random operations on other names
        ops = ValidOps(rng, world.agent.call("snapshot.save")["snapshot"])
        wire = Wire(world.agent.socket)
        try:
            for _ in range(VALID_OPS):
                op, args = ops.next()
                out = wire.exchange(frame_of(op, args), f"{op} {_short(args)}")
                findings.note(out, must_fail=False)
        finally:
            wire.close()

        # 3. connections beyond the cap, and clients at once
        flood_connections(world, findings)
        concurrent_frames(world, rng, findings)

        # the end: alive, answering, nothing leaked, x as it was
        assert world.alive(), "the agent died:\n" + world.agent.logs()[-3000:]
        assert world.agent.call("status")["revision"] >= revision
        world.remove_containers()
        if not _settle(lambda: world.threads() <= threads0 + 4):
            findings.other.append(f"threads grew from {threads0} to {world.threads()}")
        if not _settle(lambda: world.fds() <= fds0 + 4):
            findings.other.append(f"file descriptors grew from {fds0} to {world.fds()}: "
                                  f"{_fd_targets(world.pid)}")
        verdicts = world.verdicts()
        if verdicts != EXPECTED:
            findings.other.append(f"at the end, packets say {verdicts}, not {EXPECTED}")
    elapsed = time.monotonic() - started
    assert not findings.failed, findings.report() + f"\n({elapsed:.1f}s)"


def _without_handles(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_handles(v) for k, v in value.items() if k != "handle"}
    if isinstance(value, list):
        items = [_without_handles(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    return value


def _table_diff(before: Any, after: Any) -> str:
    a = Counter(json.dumps(x, sort_keys=True) for x in before["nftables"])
    b = Counter(json.dumps(x, sort_keys=True) for x in after["nftables"])
    lines = [f"  - {x[:300]}" for x in sorted(a - b)] + [f"  + {x[:300]}" for x in sorted(b - a)]
    if not lines:
        lines = ["  (the same objects in another order)"]
    return "\n".join(lines[:40])


def _fd_targets(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return sorted(out)
