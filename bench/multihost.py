"""Benchmark of the multi-host network on etcd: from `apply` on one host to enforcement
on every host.

Simulated hosts on this machine (tests/support/hosts.py, as the multi-host tests build
them): each host a network namespace with its own bridge and its own agent process
(``--datastore etcd --node host-N``), joined to the others by veth links; one etcd on
loopback started here (tests/support/etcd.py). The cluster is the realistic one of
realistic.py (Pareto-sized namespaces, ~1,000 policies) with its pods spread over the
hosts round-robin (``spec.nodeName``, ``status.podIP``: no veth, an agent enforces a
Pod of its node as soon as its address is known), plus, on every host, two real
endpoints with a veth each in the namespace ``bench``: a server (``role=server``) and a
client (``bench-peer=yes``), routed across hosts. The policy ``bench/servers`` admits
``bench-peer=yes`` pods of any namespace to every server, so each change below decides
something on every host.

Everything is loaded through host-1's agent (the agent client's ``apply``, what
``stockade apply -f`` sends), then each change is one ``apply`` through host-1's agent,
timed from the moment the call starts until **every host enforces it**: one thread per
host asks that host's agent for its ``status`` every ``POLL`` seconds, and the host
enforces the change at the first answer whose watch of the resource is at the etcd
revision of the write (or past it) and whose kernel is in sync with what the agent
committed (the agent answers its feed's progress before its state, so such an answer
says that revision is in the kernel). After the first change of each kind and every
``--verify-every``-th, every host's kernel is read (``nft`` in its namespace) for what
decides the change, which must be there:

* **policy**: ``bench/servers`` admits one more port: the verdict map ``ingress4``
  sends the host's server to a chain whose rule from the peer set matches that port;
* **label**: a pod of the realistic cluster on another host gets ``bench-peer=yes``:
  its address is an element of the peer set;
* **endpoint**: a new Pod on another host (``spec.nodeName``, an address) with
  ``bench-peer=yes``: likewise.

Each time is given from the call's start and from its return (the call returns once
host-1 enforces the change: etcd has it, host-1's watch delivered it, its kernel holds
it). Once, with real packets: the last port the policy changes will admit is refused
between every pair of hosts' real endpoints before the changes and accepted after.

Run as root (``--endpoints 30 --changes 3`` for a quick look):

    .venv/bin/python bench/multihost.py [--endpoints 10000] [--hosts 3] [--changes 100]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from common import AgentProcess, pct, print_table
from realistic import generate
from results import Results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.etcd import EtcdServer
from tests.support.hosts import Hosts

from stockade.agent.client import AgentClient
from stockade.etcd.client import EtcdClient
from stockade.net.namespace import entered, list_netns, remove_netns
from stockade.net.plumber import EndpointSpec

TABLE = "stockade"
NS = "bench"
POLL = 0.005  # seconds between two status calls to one agent
PEER = {"bench-peer": "yes"}
BASE_PORT = 10000  # the policy change k admits BASE_PORT + k
KINDS = ("policy", "label", "endpoint")

Doc = dict[str, Any]
Samples = dict[str, list[tuple[float, float, float]]]


# ---- the cluster ----------------------------------------------------------------------------


def real_address(host: int, role: int) -> str:
    """The address of host ``host``'s (1-based) real server (role 0) or client (1)."""
    return f"10.250.0.{10 + 2 * host + role}"


def pod(name: str, labels: dict[str, str], ip: str, node: str, ns: str = NS) -> Doc:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "main"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def servers_policy(ports: Sequence[int]) -> Doc:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "servers", "namespace": NS},
            "spec": {"podSelector": {"matchLabels": {"role": "server"}},
                     "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"namespaceSelector": {},
                                            "podSelector": {"matchLabels": dict(PEER)}}],
                                  "ports": [{"protocol": "TCP", "port": p} for p in ports]}]}}


def cluster(endpoints: int, policies: int, hosts: Sequence[str],
            seed: int) -> tuple[list[Doc], list[Doc]]:
    """Every document to load (namespaces, pods, policies; ``bench/servers`` last),
    and the realistic cluster's pods (each with its ``spec.nodeName``)."""
    docs = generate(max(1, endpoints - 2 * len(hosts)), policies, seed=seed)
    pods = [d for d in docs if d["kind"] == "Pod"]
    for i, d in enumerate(pods):
        d["spec"]["nodeName"] = hosts[i % len(hosts)]
    real = [pod(f"{role}-{h}", {"role": role} if role == "server" else {"role": role, **PEER},
                real_address(h, r), host)
            for h, host in enumerate(hosts, 1) for r, role in enumerate(("server", "client"))]
    ns = {"apiVersion": "v1", "kind": "Namespace",
          "metadata": {"name": NS, "labels": {"kubernetes.io/metadata.name": NS}}}
    order = {"Namespace": 0, "Pod": 1, "NetworkPolicy": 2}
    ordered = sorted(docs, key=lambda d: order[d["kind"]])
    return [ns, *ordered[:len(docs) - sum(d["kind"] == "NetworkPolicy" for d in docs)],
            *real, *[d for d in ordered if d["kind"] == "NetworkPolicy"],
            servers_policy([80])], pods


# ---- reading one host's kernel -----------------------------------------------------------


class Kernel:
    """One host's table, read with a libnftables context opened in its namespace (the
    context's netlink socket stays there; reads cost no process and no setns)."""

    def __init__(self, netns: str) -> None:
        import nftables

        with entered(netns):
            self.nft = nftables.Nftables()
        self.nft.set_json_output(True)
        self.nft.set_handle_output(False)
        self.rules: dict[str, list[Any]] = {}  # chain -> its rules (named by their hash)

    def _json(self, command: str) -> list[Any]:
        rc, out, _ = self.nft.cmd(command)
        return list(json.loads(out)["nftables"]) if rc == 0 and out else []

    def target(self, vmap: str, ip: str) -> str | None:
        """The chain the verdict map sends ``ip`` to (nft answers `get element` in its
        text form only, JSON asked or not)."""
        rc, out, _ = self.nft.cmd(f"get element inet {TABLE} {vmap} {{ {ip} }}")
        found = re.search(rf"(?<![\d.]){re.escape(ip)} : (?:goto|jump) ([\w-]+)", out)
        return found.group(1) if rc == 0 and found else None

    def chain(self, name: str) -> list[Any]:
        if name not in self.rules:
            self.rules[name] = [i["rule"]["expr"] for i in self._json(
                f"list chain inet {TABLE} {name}") if "rule" in i]
        return self.rules[name]

    def member(self, set_name: str, ip: str) -> bool:
        rc, _, _ = self.nft.cmd(f"get element inet {TABLE} {set_name} {{ {ip} }}")
        return rc == 0

    def peer_set(self, server: str) -> str | None:
        """The address set of ``bench-peer=yes`` pods the server's chain admits from."""
        chain = self.target("ingress4", server)
        for expr in self.chain(chain) if chain else ():
            for m in expr:
                right = (m.get("match") or {}).get("right")
                left = (m.get("match") or {}).get("left") or {}
                if (isinstance(right, str) and right.startswith("@")
                        and (left.get("payload") or {}).get("field") == "saddr"):
                    return right[1:]
        return None

    def admits_port(self, server: str, port: int) -> bool:
        """Whether the server's ingress chain has a rule from a set matching ``port``."""
        chain = self.target("ingress4", server)
        return chain is not None and any(
            _matches_port(expr, port) for expr in self.chain(chain))


def _matches_port(expr: list[Any], port: int) -> bool:
    for m in expr:
        match = m.get("match") or {}
        if (match.get("left") or {}).get("payload", {}).get("field") != "dport":
            continue
        right = match.get("right")
        values = right.get("set", []) if isinstance(right, dict) else [right]
        for v in values:
            if v == port or (isinstance(v, dict) and "range" in v
                             and v["range"][0] <= port <= v["range"][1]):
                return True
    return False


# ---- one change, timed until every host enforces it ------------------------------------------


class Watch:
    """One thread per host asking its agent's ``status`` every ``POLL`` seconds until it
    has seen the write (its watch of the resource at the write's etcd revision, known
    once the apply returned, or past it) and its kernel holds what it committed
    (``inSync``); each answer is kept with the time it came back. The agent answers its
    feed's progress before its state, so a ``status`` showing the revision also shows
    ``inSync`` with that revision committed."""

    def __init__(self, sockets: Mapping[str, str], timeout: float) -> None:
        self.revisions: dict[str, int] | None = None  # resource -> revision to reach
        self.answers: dict[str, list[tuple[float, dict[str, int], bool]]] = {
            h: [] for h in sockets}
        self.errors: dict[str, str] = {}
        self._deadline = time.perf_counter() + timeout
        # Daemons: a thread stuck on a hung agent cannot keep the run from ending.
        self._threads = [threading.Thread(target=self._poll, args=(h, s), daemon=True)
                         for h, s in sockets.items()]
        for t in self._threads:
            t.start()

    def _poll(self, host: str, socket: str) -> None:
        try:
            with AgentClient(socket, timeout=30) as c:
                while time.perf_counter() < self._deadline:
                    st = c.call("status")
                    t = time.perf_counter()
                    rvs = {p: int(r["resourceVersion"] or 0)
                           for p, r in st["datastore"]["resources"].items()}
                    self.answers[host].append((t, rvs, bool(st["inSync"])))
                    if self.revisions is not None and self._reached(rvs, bool(st["inSync"])):
                        return
                    time.sleep(POLL)
        except Exception as e:
            self.errors[host] = f"{type(e).__name__}: {e}"

    def _reached(self, rvs: Mapping[str, int], in_sync: bool) -> bool:
        assert self.revisions is not None
        return in_sync and all(rvs.get(p, 0) >= r for p, r in self.revisions.items())

    def until(self, revisions: Mapping[str, int]) -> dict[str, float]:
        """When each host first enforced the writes at ``revisions`` (resource ->
        revision); hosts that did not are missing."""
        self.revisions = dict(revisions)
        for t in self._threads:
            t.join(max(0.0, self._deadline - time.perf_counter()) + 31)
        return {h: next(t for t, rvs, ok in answers if self._reached(rvs, ok))
                for h, answers in self.answers.items()
                if any(self._reached(rvs, ok) for _, rvs, ok in answers)}


class Bench:
    """Changes applied through host-1's agent, each timed until every host enforces it,
    and every ``verify_every``-th (the first of each kind too) then read in every host's
    kernel: the status must not have said more than the kernel holds."""

    def __init__(self, run: Run, client: AgentClient, etcd: EtcdClient, timeout: float,
                 verify_every: int, samples: Samples) -> None:
        self.run, self.client, self.etcd = run, client, etcd
        self.timeout, self.verify_every = timeout, verify_every
        self.sockets = {h: a.socket for h, a in run.agents.items()}
        self.samples = samples  # kind -> (from start, from return, the call), seconds
        self.verified: dict[str, int] = {k: 0 for k in KINDS}

    def change(self, kind: str, doc: Doc, check: Callable[[Kernel, str], bool]) -> None:
        plural = "networkpolicies" if doc["kind"] == "NetworkPolicy" else "pods"
        meta = doc["metadata"]
        t0 = time.perf_counter()
        watch = Watch(self.sockets, self.timeout)
        self.client.call("apply", documents=[doc])
        t1 = time.perf_counter()
        kv = self.etcd.get(f"/stockade/{plural}/{meta['namespace']}/{meta['name']}")
        assert kv is not None, f"{kind} change {meta['name']} is not in etcd"
        seen = watch.until({plural: kv.mod_revision})
        if len(seen) < len(self.sockets):
            late = sorted(set(self.sockets) - set(seen))
            raise SystemExit(f"{kind} change {meta['name']} (etcd revision {kv.mod_revision}) "
                             f"not enforced on {', '.join(late)} within {self.timeout:.0f} s "
                             f"{watch.errors}")
        last = max(seen.values())
        n = len(self.samples[kind])
        self.samples[kind].append((last - t0, max(0.0, last - t1), t1 - t0))
        if n % self.verify_every == 0:
            for host, kernel in self.run.kernels.items():
                if not check(kernel, self.run.real.servers[host]):
                    raise SystemExit(f"{host}: its agent says it enforces {kind} change "
                                     f"{meta['name']}, its kernel does not")
            self.verified[kind] += 1

    @staticmethod
    def in_peer_set(ip: str) -> Callable[[Kernel, str], bool]:
        def check(k: Kernel, server: str) -> bool:
            name = k.peer_set(server)
            return name is not None and k.member(name, ip)
        return check

    @staticmethod
    def admits(port: int) -> Callable[[Kernel, str], bool]:
        return lambda k, server: k.admits_port(server, port)


def run_changes(bench: Bench, count: int, pods: list[Doc], hosts: Sequence[str],
                rnd: random.Random) -> None:
    """``count`` changes of each kind, interleaved (policy, label, endpoint, ...)."""
    others = list(hosts[1:])
    remote = [p for p in pods if p["spec"]["nodeName"] != hosts[0]]
    targets = rnd.sample(remote, min(count, len(remote)))
    ports = [80]
    for k in range(count):
        ports.append(BASE_PORT + k)
        bench.change("policy", servers_policy(ports), bench.admits(BASE_PORT + k))
        if k < len(targets):
            doc = json.loads(json.dumps(targets[k]))
            doc["metadata"]["labels"].update(PEER)
            bench.change("label", doc, bench.in_peer_set(doc["status"]["podIP"]))
        ip = f"10.251.{k // 250}.{k % 250 + 1}"
        bench.change("endpoint", pod(f"new-{k}", dict(PEER), ip, others[k % len(others)]),
                     bench.in_peer_set(ip))


# ---- the hosts, etcd and agents, and cleaning up after them ----------------------------------


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM and SIGHUP end the run as Ctrl-C does: through every ``finally``."""
    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    before = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


class RealEndpoints:
    """A server and a client with a veth on every host, routed from the others."""

    def __init__(self, hosts: Hosts) -> None:
        self.hosts = hosts.names
        self.servers: dict[str, str] = {}  # host -> the server's address
        self.netns: dict[tuple[str, int], str] = {}  # (host, role) -> its namespace
        for i, host in enumerate(hosts.names, 1):
            for role in (0, 1):
                ip = real_address(i, role)
                att = hosts.plumbers[host].ensure_endpoint(EndpointSpec(
                    f"{NS}/{('server', 'client')[role]}-{i}", f"{ip}/24", None))
                hosts.route(ip, host)
                self.netns[host, role] = att.netns
            self.servers[host] = real_address(i, 0)

    def probe(self, port: int) -> dict[tuple[str, str], bool]:
        """Real TCP connections from each host's client to every other host's server."""
        from stockade.probe.client import Probe, run_probes
        from stockade.probe.launcher import ProbeServer
        from stockade.probe.protocol import Port, Protocol

        tcp = Port(port, Protocol.TCP)
        probes = [Probe(src, self.netns[src, 1], dst, self.servers[dst], tcp)
                  for src in self.hosts for dst in self.hosts if src != dst]
        with ProbeServer({self.netns[h, 0]: [tcp] for h in self.hosts}):
            return {(v.probe.src, v.probe.dst): v.allowed
                    for v in run_probes(probes, timeout=1.0)}


class Run:
    """Everything one run starts, and its removal (on failure and interrupt too): the
    agents (before etcd), etcd and its data, every namespace carrying the run's prefix."""

    def __init__(self, hosts: int) -> None:
        self.prefix = f"bm{secrets.token_hex(2)}"
        self.tmp = Path(tempfile.mkdtemp(prefix="stockade-bench-multihost-"))
        self.stack = contextlib.ExitStack()
        self.stack.enter_context(interruptible())
        self.stack.callback(shutil.rmtree, self.tmp, True)
        self.stack.callback(self._remove_namespaces)
        try:
            self._start(hosts)
        except BaseException:
            self.stack.close()
            raise

    def _start(self, hosts: int) -> None:
        self.etcd = self.stack.enter_context(EtcdServer(self.tmp))
        self.hosts = Hosts(self.prefix, hosts)
        self.real = RealEndpoints(self.hosts)
        self.agents: dict[str, AgentProcess] = {}
        for host in self.hosts.names:
            (self.tmp / host).mkdir()
            agent = AgentProcess(self.tmp / host, self.hosts.netns[host],
                                 "--bridge-prefix", self.prefix, "--datastore", "etcd",
                                 "--etcd-endpoints", self.etcd.url, "--node", host)
            self.agents[host] = agent
            self.stack.callback(agent.stop)
            agent.start()
        self.kernels = {h: Kernel(self.hosts.netns[h]) for h in self.hosts.names}

    def _remove_namespaces(self) -> None:
        for name in list_netns():
            if name.startswith(self.prefix):
                remove_netns(name)

    def close(self) -> None:
        self.stack.close()

    def load(self, docs: list[Doc], chunks: Sequence[list[Doc]]) -> tuple[float, float]:
        """Everything applied through host-1, ``chunks`` one apply each: seconds until
        the last apply returned, and until every host enforces all of it (each agent's
        watches at the last revision and its kernel in sync; checked once against the
        kernels)."""
        first = self.agents[self.hosts.names[0]]
        t0 = time.perf_counter()
        done = 0
        for chunk in chunks:
            first.call("apply", documents=chunk)
            done += len(chunk)
            print(f"# applied {done}/{len(docs)} documents ({time.perf_counter() - t0:.1f} s)",
                  file=sys.stderr, flush=True)
        applied = time.perf_counter()
        watch = Watch({h: a.socket for h, a in self.agents.items()}, 600)
        with self.etcd.client() as etcd:
            last = {p: max(kv.mod_revision for kv in etcd.list_prefix(f"/stockade/{p}/")[1])
                    for p in ("namespaces", "pods", "networkpolicies")}
        seen = watch.until(last)
        if len(seen) < len(self.agents):
            raise SystemExit(f"not all in sync after 600 s: {sorted(seen)} {watch.errors}")
        synced = max(seen.values())
        clients = [real_address(i, 1) for i in range(1, len(self.hosts.names) + 1)]
        for h, server in self.real.servers.items():
            k = self.kernels[h]
            peers = k.peer_set(server)
            if not (peers and k.admits_port(server, 80)
                    and all(k.member(peers, c) for c in clients)):
                raise SystemExit(f"{h}: its agent says it is in sync, but its kernel does "
                                 f"not enforce {NS}/servers")
        return applied - t0, synced - t0

    def rss(self) -> dict[str, float]:
        """Each agent's and etcd's resident memory, MB."""
        out = {h: a.rss_mb() for h, a in self.agents.items()}
        assert self.etcd.proc is not None
        for line in Path(f"/proc/{self.etcd.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["etcd"] = int(line.split()[1]) / 1024
        return out


def chunked(docs: list[Doc], size: int, policies: int) -> list[list[Doc]]:
    """The documents in applies of ``size`` (``policies`` for NetworkPolicies), in order."""
    out: list[list[Doc]] = []
    for doc in docs:
        limit = policies if doc["kind"] == "NetworkPolicy" else size
        if not out or len(out[-1]) >= limit or (
                out[-1][0]["kind"] == "NetworkPolicy") != (doc["kind"] == "NetworkPolicy"):
            out.append([])
        out[-1].append(doc)
    return out


def latency_rows(samples: Samples) -> list[list[str]]:
    rows = []
    for kind in KINDS:
        if not samples[kind]:
            continue
        start, ret, call = ([v[i] * 1000 for v in samples[kind]] for i in range(3))
        rows.append([kind, str(len(start)),
                     *(f"{f(x):.0f}" for x in (start, ret) for f in (
                         lambda v: pct(v, 50), lambda v: pct(v, 99), max)),
                     f"{pct(call, 50):.0f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoints", type=int, default=10_000)
    ap.add_argument("--policies", type=int, default=1_000)
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--changes", type=int, default=100, help="changes of each kind")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=500,
                    help="namespaces and pods per apply when loading")
    ap.add_argument("--policy-chunk", type=int, default=20,
                    help="policies per apply when loading (an apply returns once host-1 "
                         "enforces it, and fails if its watch makes no progress delivering "
                         "it for 30 s)")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="seconds a change may take to reach every host")
    ap.add_argument("--verify-every", type=int, default=10, metavar="N",
                    help="read every host's kernel after every N-th change of a kind (and "
                         "the first): what status said must be there (a read of a large "
                         "table takes a second or two)")
    ap.add_argument("--json", metavar="FILE", help="also write the results for bench/report.py")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/multihost.py: run as root (namespaces, agents, nftables)")
    if args.hosts < 2 or args.changes < 1:
        raise SystemExit("bench/multihost.py: --hosts must be at least 2, --changes 1")
    samples: Samples = {k: [] for k in KINDS}
    run = Run(args.hosts)
    try:
        names = run.hosts.names
        docs, pods = cluster(args.endpoints, args.policies, names, args.seed)
        chunks = chunked(docs, args.chunk, args.policy_chunk)
        loaded, everywhere = run.load(docs, chunks)
        after_load = run.rss()
        known = [run.agents[h].call("status")["counts"]["endpoints"] for h in names]
        last_port = BASE_PORT + args.changes - 1
        before = run.real.probe(last_port)
        client = AgentClient(run.agents[names[0]].socket, timeout=600)
        with client, run.etcd.client() as etcd:
            bench = Bench(run, client, etcd, args.timeout, args.verify_every, samples)
            run_changes(bench, args.changes, pods, names, random.Random(args.seed))
            verified = bench.verified
        after = run.real.probe(last_port)
        if any(before.values()) or not all(after.values()):
            raise SystemExit(f"real packets disagree with the kernel reads: port {last_port} "
                             f"before the changes {before}, after {after}")
        after_changes = run.rss()
    finally:
        run.close()
    n_pods = sum(d["kind"] == "Pod" for d in docs)
    n_pols = sum(d["kind"] == "NetworkPolicy" for d in docs)
    latency = latency_rows(samples)
    header = ["change", "n", "start p50", "start p99", "start max", "return p50",
              "return p99", "return max", "apply call p50", "kernel-checked"]
    for row in latency:
        row.append(str(verified[row[0]]))
    load = [[f"{n_pods} pods, {n_pols} policies, {len(docs) - n_pods - n_pols} namespaces",
             f"{len(chunks)} (up to {args.chunk} pods, {args.policy_chunk} policies)",
             f"{loaded:.1f}",
             f"{everywhere:.1f}"]]
    load_header = ["loaded through host-1", "applies", "host-1 returned s", "every host s"]
    memory = [[who, f"{after_load[who]:.0f}", f"{after_changes[who]:.0f}",
               str(known[i]) if i < len(known) else ""]
              for i, who in enumerate([*names, "etcd"])]
    memory_header = ["process", "RSS MB after the load", "after the changes",
                     "endpoints known"]
    for h, r in ((header, latency), (load_header, load), (memory_header, memory)):
        print_table(h, r)
        print()
    out = Results("multihost", " ".join(["bench/multihost.py", *sys.argv[1:]]))
    out.table(f"`apply` on host-1 to enforced on all {args.hosts} hosts (ms), "
              f"{n_pods} endpoints, {n_pols} policies", header, latency,
              note=f"From the start of the `apply` call on host-1 (the agent client over "
                   f"its socket, what `stockade apply` sends) and from its return, until "
                   f"every host's agent reports the write's etcd revision seen and its "
                   f"kernel in sync (each asked every {POLL * 1000:.0f} ms; the time is "
                   f"when the answer came back). `apply call`: the call itself, which "
                   f"returns once host-1 enforces the change. `kernel-checked`: changes "
                   f"after which every host's nftables table was read and held what "
                   f"decides the change (the port in the server's chain, the address in "
                   f"the peer set). Real packets between every pair of hosts: port "
                   f"{last_port} refused before the changes, admitted after.")
    out.table("loading everything", load_header, load,
              note="Until every host's agent has every write and its kernel is in sync "
                   "(checked against each kernel once).")
    out.table("memory", memory_header, memory)
    out.series["multihost"] = {"y": "ms from the apply's start (p50, p99)", "bars": {
        r[0]: {"p50": float(r[2]), "p99": float(r[3])} for r in latency}}
    out.write(args.json)


if __name__ == "__main__":
    main()
