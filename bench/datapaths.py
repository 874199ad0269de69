"""Every datapath side by side, with real packets, against the same pair with no policy.

One run, 10,000 synthetic endpoints and 1,000 policies (bench/synthetic.py
make_cluster) plus two real endpoints on a bridge, a server and a client, with a
policy isolating the server and allowing the client on the benchmark ports.
Variants: nft, iptables (nf_tables backend), iptables (legacy backend), ebpf; what
conntrack costs before any rule of policy (a base chain that only accepts, after the
usual established accept, so that conntrack tracks every connection as it does under
every netfilter datapath; bridged packets reach netfilter through br_netfilter, which
a new namespace has on, so the baseline pays that too); and the naive baseline a user
would otherwise write: one `iptables -A FORWARD -s SRC
-d DST -p PROTO --dport P -j ACCEPT` per allowed pair in one linear chain (after
the usual ESTABLISHED,RELATED accept), then a DROP for the server. Every datapath binds
the server's and client's ports to their addresses and MACs, as the agent does each
pod's (the port guard); "nft unguarded" leaves that out, to show what it costs.

Each variant gets a fresh host namespace (bridge, two endpoints, servers), so no
variant inherits another's kernel state (conntrack hooks, a legacy table that
cannot be unregistered, pins). In it, the same measures run first with no
ruleset, then with the variant's ruleset loaded, so each ratio is against a
baseline taken right before on the same plumbing. With `--interleave N` the variants
named by `--interleaved` (by default nft, ebpf and conntrack alone: those with goals) are then
measured N more times, in turns with a twin pair that carries no ruleset (twin,
variant, twin, ...; each variant measure against the mean of the two around it), and
their goals take the median of every sample: one iperf3 stream's rate moves by a
tenth between two runs, more than a datapath costs. The measures:

- TCP throughput: iperf3, one stream, `--seconds`;
- new TCP connections per second and their latency (p50, p99): bench/loadgen.c
  `crr` (connect, 64-byte request, 64-byte answer, close with RST; one at a time);
- UDP packets per second received: loadgen `udp-flood` (64-byte frames: 18 bytes
  of payload, one flow, sendmmsg) into `udp-sink`; a one-way flow never becomes
  ESTABLISHED, so every datagram is judged;
- programming time (bench/iptables.py `program`): the full load from nothing, one
  endpoint added, one policy changed, a verifying read-back. For the naive
  baseline these are extrapolated by bench/iptables.py `naive` (one process per
  rule, timed at several chain lengths); its packet tests load a chain capped at
  `--naive-rules` rules with one iptables-restore, the real pair's rules in the
  middle.

The variants take turns (the order rotates each round), `--rounds` times; the
table gives medians and the range (min-max) in brackets. Every server and client
runs on one CPU (`--cpu`, the last one by default): a veth delivers a packet on the
sender's CPU, so a connection's whole exchange then runs there and the rate is what
it costs. Left to the scheduler (`--cpu free`), the two ends share a CPU in some runs
and not in others, and the baseline's connection rate alone varies by about 10 %
between runs (3 % pinned), more than the differences measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from common import exit_on_sigterm, print_markdown, timed
from iptables import build_loadgen, naive, program
from results import Results
from stockade.compile.iptables import Layout
from stockade.compile.lower import compile_cluster, guards_of
from stockade.compile.nft import Table
from stockade.datapath.base import require_bridge_netfilter
from stockade.datapath.conntrack import Arrivals
from stockade.datapath.ebpf import EbpfDatapath
from stockade.datapath.iptables import IptablesDatapath
from stockade.datapath.nft import NftDatapath
from stockade.model.cluster import Cluster, ContainerPort, Endpoint
from stockade.model.labels import Labels
from stockade.model.policy import INGRESS, NetworkPolicy, Peer, PolicyPort, Rule
from stockade.model.selector import Selector
from stockade.net.namespace import create_netns, remove_netns
from stockade.net.plumber import EndpointSpec, Plumber
from synthetic import make_cluster

T = TypeVar("T")
SERVER, CLIENT = "10.200.0.10", "10.200.0.11"
CRR_PORT, IPERF_PORT, UDP_PORT, CLOSED_PORT = 5002, 5201, 5003, 5009
ALLOWED = (("TCP", CRR_PORT), ("TCP", IPERF_PORT), ("UDP", UDP_PORT))
UDP_PAYLOAD = 18  # 14 Ethernet + 20 IP + 8 UDP + 18 + 4 FCS = a 64-byte frame
NAIVE_TOOL = "iptables-nft"  # the host's default iptables here
DATAPATHS = ("nft", "iptables (nf_tables)", "iptables (legacy)", "ebpf")
# nft with the agent's revoker listening for new connections (conntrack then builds an
# event for each, which the socket drops once full: what the agent's host pays)
LISTENING = "nft + ct events"
# What conntrack costs before any rule of policy: a base chain accepting everything,
# established first (bridged packets reach netfilter through br_netfilter, which a
# new namespace has on, with no ruleset too: the baseline pays it as well).
CONNTRACK = "conntrack only"
# nft without the port guard (every other datapath guards the pair's ports, as the agent
# does its pods'): what the guard's bridge table costs per packet.
UNGUARDED = "nft unguarded"
# nft with `--conntrack-limit` (a per-source count in conntrack for each new connection),
# set far above what the load generator holds at once: what counting costs, not refusing.
LIMITED = "nft + conntrack limit"
LIMIT = 100_000
VARIANTS = (*DATAPATHS, UNGUARDED, LISTENING, LIMITED, CONNTRACK, "naive")
INTERLEAVED = ("nft", "ebpf", CONNTRACK)  # the variants with goals, and what they pay first
CONNTRACK_TABLE = ("table inet {name} {{\n chain forward {{\n"
                   "  type filter hook forward priority 0; policy accept;\n"
                   "  ct state established,related accept\n  accept\n }}\n}}\n")
LENGTHS = (0, 2_000, 10_000, 20_000)  # chain lengths bench/iptables.py `naive` times


def bench_cluster(pods: int, policies: int) -> Cluster:
    """The synthetic cluster plus the server (isolated) and the client (allowed)."""
    base = make_cluster(pods, policies)
    server = Endpoint("ns0", "server", Labels({"app": "bench-server"}), (SERVER,),
                      tuple(ContainerPort(port, proto, f"b{port}") for proto, port in ALLOWED))
    client = Endpoint("ns0", "client", Labels({"app": "bench-client"}), (CLIENT,))
    allow = NetworkPolicy("ns0", "bench-allow", Selector(Labels({"app": "bench-server"})),
                          ingress=(Rule(tuple(PolicyPort(proto, port) for proto, port in ALLOWED),
                                        (Peer(pod_selector=Selector(
                                            Labels({"app": "bench-client"}))),)),),
                          policy_types=(INGRESS,))
    return Cluster(base.namespaces, (*base.endpoints, server, client), (*base.policies, allow))


def open_datapath(name: str, tag: str, host: str) -> Any:
    if name == "nft":
        return NftDatapath(Table(tag), netns=host)
    if name == LIMITED:
        return NftDatapath(Table(tag, conntrack_limit=LIMIT), netns=host)
    if name == "ebpf":
        return EbpfDatapath(tag, netns=host)
    backend = "legacy" if name == "iptables (legacy)" else "nft"
    return IptablesDatapath(Layout.of(tag), netns=host, backend=backend)


def naive_restore(cluster: Cluster, rules: int) -> str:
    """The naive chain: ESTABLISHED first, `rules` pair rules (the real pair's in the
    middle), a DROP for the server; as iptables-restore input."""
    ips = [e.ips[0] for e in cluster.endpoints if e.ips and e.ips[0] not in (SERVER, CLIENT)]
    lines = ["*filter", ":FORWARD ACCEPT [0:0]",
             "-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"]
    pairs = [f"-A FORWARD -s {ips[k % len(ips)]} -d {ips[(k * 7919 + 1) % len(ips)]} "
             "-p tcp -m tcp --dport 8080 -j ACCEPT" for k in range(rules)]
    mine = [f"-A FORWARD -s {CLIENT} -d {SERVER} -p {p.lower()} -m {p.lower()} --dport {port} "
            "-j ACCEPT" for p, port in ALLOWED]
    lines += [*pairs[:rules // 2], *mine, *pairs[rules // 2:],
              f"-A FORWARD -d {SERVER} -j DROP", "COMMIT", ""]
    return "\n".join(lines)


def load_naive(host: str, restore: str) -> float:
    """Seconds to load the naive chain with one iptables-restore."""
    t, _ = timed(lambda: subprocess.run(["ip", "netns", "exec", host, f"{NAIVE_TOOL}-restore",
                                         "-w"], input=restore, text=True, check=True))
    return t


def in_netns(netns: str, *cmd: str, timeout: float = 120) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, *cmd], capture_output=True, text=True,
                          check=True, timeout=timeout).stdout


def add_cpu_argument(ap: argparse.ArgumentParser) -> None:
    """`--cpu`, for every benchmark that measures packets through a `Pair`."""
    ap.add_argument("--cpu", default=str(max(os.sched_getaffinity(0))),
                    help="the CPU every server and client runs on, or 'free' to leave them "
                    "to the scheduler (default: the last one)")


def chosen_cpu(ap: argparse.ArgumentParser, args: argparse.Namespace) -> int | None:
    """`--cpu` checked: a CPU this process may use, or None for `free`."""
    if args.cpu == "free":
        return None
    if not (args.cpu.isdigit() and int(args.cpu) in os.sched_getaffinity(0)):
        ap.error(f"--cpu: one of {sorted(os.sched_getaffinity(0))} or 'free'")
    return int(args.cpu)


def placement(cpu: int | None) -> str:
    """Where the packet tests' processes ran, for a table's title."""
    return ("servers and clients left to the scheduler" if cpu is None
            else f"servers and clients on CPU {cpu}")


class Pair:
    """A host namespace with a bridge, a server and a client endpoint, the servers running."""

    def __init__(self, tag: str, index: int, loadgen: str, cpu: int | None = None) -> None:
        self.tag, self.host, self.loadgen = tag, f"{tag}-h{index}", loadgen
        # Every server and client on one CPU (`cpu`): a veth delivers a packet on the
        # sender's CPU, so the whole exchange then runs there and its rate is what it
        # costs. Left to the scheduler, each run lands the two ends on one CPU or on
        # two, and the rate swings by a tenth between runs (cross-CPU wakeups).
        self.pin: tuple[str, ...] = () if cpu is None else ("taskset", "-c", str(cpu))
        self.procs: list[subprocess.Popen[str]] = []
        create_netns(self.host)
        self.plumber = Plumber(prefix=tag, host_netns=self.host, subnet4="10.200.0.0/16")
        try:
            self.plumber.ensure_bridge()
            server = self.plumber.ensure_endpoint(EndpointSpec(f"server{index}",
                                                               f"{SERVER}/16"))
            client = self.plumber.ensure_endpoint(EndpointSpec(f"client{index}",
                                                               f"{CLIENT}/16"))
            self.server, self.client = server.netns, client.netns
            # endpoint name -> the port and MAC it is bound to (the datapath's guard)
            self.ports = {att.key.removesuffix(str(index)): (att.host_ifname, att.mac.lower())
                          for att in (server, client)}
            crr = self._spawn(self.server, loadgen, "crr-server", str(CRR_PORT))
            assert crr.stdout is not None and crr.stdout.readline().strip() == "ready"
        except BaseException:
            self.close()
            raise

    def _spawn(self, netns: str, *cmd: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(["ip", "netns", "exec", netns, *self.pin, *cmd],
                                stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        self.procs.append(proc)
        return proc

    def guarded(self, cluster: Cluster, rs: Any) -> tuple[Cluster, Any]:
        """`cluster` and its ruleset with the server's and client's ports bound to them."""
        eps = tuple(replace(ep, port=self.ports[ep.name][0], mac=self.ports[ep.name][1])
                    if ep.namespace == "ns0" and ep.name in self.ports else ep
                    for ep in cluster.endpoints)
        return replace(cluster, endpoints=eps), replace(rs, guards=guards_of(eps))

    def isolated(self) -> bool:
        """Whether a new connection to a closed, unallowed port of the server is dropped
        (a timeout) rather than refused by the server's kernel."""
        code = ("import socket, sys\ns = socket.socket()\ns.settimeout(0.5)\n"
                f"try:\n    s.connect(('{SERVER}', {CLOSED_PORT}))\n"
                "except socket.timeout:\n    sys.exit(3)\nexcept OSError:\n    sys.exit(0)\n")
        run = subprocess.run(["ip", "netns", "exec", self.client, sys.executable, "-c", code],
                             check=False)
        return run.returncode == 3

    def iperf(self, secs: float) -> float:
        """TCP throughput, Gbit/s (iperf3's received rate); a one-off server per test, and
        a test that hangs is run again (once)."""
        for _ in range(2):
            server = self._spawn(self.server, "iperf3", "-s", "-1", "--forceflush", "-p",
                                 str(IPERF_PORT))
            try:
                assert server.stdout is not None
                while "listening" not in (line := server.stdout.readline()):
                    assert line, "the iperf3 server exited"
                run = subprocess.run(["ip", "netns", "exec", self.client, *self.pin, "iperf3",
                                      "-c", SERVER, "-p", str(IPERF_PORT), "-t", str(secs), "-J"],
                                     capture_output=True, text=True, timeout=secs + 30,
                                     check=False)
            except subprocess.TimeoutExpired:
                print("iperf3 hung; again", file=sys.stderr)
                continue
            finally:
                server.kill()
                server.wait()
                self.procs.remove(server)
            try:
                out = json.loads(run.stdout)
            except json.JSONDecodeError:
                out = {"error": run.stderr.strip() or f"exit status {run.returncode}"}
            # no sum_received: the data connection died (counted as 0, said on stderr)
            received = out.get("end", {}).get("sum_received", {}).get("bits_per_second", 0.0)
            if not received:
                print(f"iperf3 received nothing: {out.get('error')}", file=sys.stderr)
            return float(received) / 1e9
        print("iperf3 hung twice: counted as 0", file=sys.stderr)
        return 0.0

    def crr(self, secs: float) -> tuple[float, float, float, float]:
        """Connections/s, p50 and p99 latency in µs, failures (stalled 1 s or refused)."""
        rate, failed, p50, p99 = in_netns(self.client, *self.pin, self.loadgen, "crr", SERVER,
                                          str(CRR_PORT), str(secs)).split()
        return float(rate), float(p50), float(p99), float(failed)

    def udp(self, secs: float) -> float:
        """Datagrams received per second, over `secs` of a flood a second longer."""
        sink = self._spawn(self.server, self.loadgen, "udp-sink", str(UDP_PORT), str(secs))
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        in_netns(self.client, *self.pin, self.loadgen, "udp-flood", SERVER, str(UDP_PORT),
                 str(secs + 1), str(UDP_PAYLOAD))
        out, _ = sink.communicate(timeout=secs + 40)
        self.procs.remove(sink)
        pps = float(out.strip())
        if not pps:
            print("no datagram arrived", file=sys.stderr)
        return pps

    def measure(self, secs: float) -> dict[str, float]:
        gbps = self.iperf(secs)
        rate, p50, p99, failed = self.crr(secs)
        return {"gbps": gbps, "crr": rate, "p50": p50, "p99": p99, "failed": failed,
                "pps": self.udp(secs)}

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        self.procs.clear()
        with contextlib.suppress(Exception):  # pins of an ebpf variant left by a failure
            ebpf = EbpfDatapath(self.tag, netns=self.host)
            if ebpf.dir.exists():
                ebpf.remove()
        try:
            self.plumber.teardown()
        finally:
            remove_netns(self.host)


def release(pair: Pair, dp: Any) -> None:
    """Remove a variant's ruleset, then its pair (the pair even when that fails)."""
    try:
        if dp is not None:
            dp.remove()
            dp.close()
    finally:
        pair.close()


def take_turns(variants: Sequence[str], rounds: int, run: Callable[[str, int], T]
               ) -> tuple[dict[str, list[T]], list[str]]:
    """`run(variant, index)` for each variant once a round, the order rotating each
    round; a variant's failure costs its sample (said on stderr), not the run."""
    out: dict[str, list[T]] = {v: [] for v in variants}
    failures: list[str] = []
    start = time.monotonic()
    index = 0
    for r in range(rounds):
        for name in (*variants[r % len(variants):], *variants[:r % len(variants)]):
            index += 1
            try:
                sample = run(name, index)
            except Exception:
                traceback.print_exc()
                failures.append(f"round {r + 1} {name}")
                continue
            out[name].append(sample)
            print(f"round {r + 1} {name} ({time.monotonic() - start:.0f} s): {sample}",
                  file=sys.stderr)
    return out, failures


def fmt_time(secs: float) -> str:
    if secs >= 3600:
        return f"{secs / 3600:,.0f} h"
    if secs >= 60:
        return f"{secs / 60:,.0f} min"
    if secs >= 1:
        return f"{secs:.1f} s"
    return f"{secs * 1000:.0f} ms" if secs >= 0.01 else f"{secs * 1000:.1f} ms"


def cell(values: Sequence[float], fmt: Callable[[float], str]) -> str:
    if not values:
        return "n/a"
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}-{fmt(max(values))})"


Sample = tuple[dict[str, float], dict[str, float]]  # (no ruleset, the variant's) measures


def one_pair(name: str, tag: str, index: int, loadgen: str, cluster: Cluster, rs: Any,
             restore: str, secs: float, cpu: int | None = None, interleave: int = 0
             ) -> tuple[dict[str, float], dict[str, float], dict[str, float], float,
                        list[Sample]]:
    """In a fresh pair: the measures with no ruleset, then with `name`'s; its programming
    times (a datapath) or the restore's time (naive); and with `interleave`, that many
    more of the variant's, each between two of a twin pair with no ruleset (see
    `interleaved`)."""
    pair = Pair(tag, index, loadgen, cpu)
    dp: Any = None
    prog: dict[str, float] = {}
    load = 0.0
    listener: Arrivals | None = None
    twin: Pair | None = None
    try:
        assert not pair.isolated(), "the server is unreachable without a ruleset"
        if interleave:
            twin = Pair(tag, index + TWIN, loadgen, cpu)
        base = pair.measure(secs)
        if name != "ebpf":  # the netfilter ones judge bridged packets in FORWARD
            require_bridge_netfilter(pair.host, "the FORWARD hook")
        if name == CONNTRACK:
            # Nothing isolates the server here: this prices conntrack, not a policy.
            subprocess.run(["ip", "netns", "exec", pair.host, "nft", "-f", "-"],
                           input=CONNTRACK_TABLE.format(name=tag), text=True,
                           check=True, capture_output=True)
            return (base, pair.measure(secs), prog, load,
                    interleaved(pair, twin, interleave, secs))
        if name == "naive":
            load = load_naive(pair.host, restore)
        else:
            if name == LISTENING:
                listener = Arrivals(pair.host)
            if name != UNGUARDED:
                cluster, rs = pair.guarded(cluster, rs)
            dp = open_datapath("nft" if name in (LISTENING, UNGUARDED) else name, tag, pair.host)
            dp.check()
            prog = program(dp, cluster, rs)
        assert pair.isolated(), f"{name}: the server is not isolated"
        return (base, pair.measure(secs), prog, load,
                interleaved(pair, twin, interleave, secs))
    finally:
        if listener is not None:
            listener.close()
        try:
            release(pair, dp)
        finally:
            if twin is not None:
                twin.close()


# A twin pair's index: past any round's (its namespaces' names are the index's).
TWIN = 10_000


def interleaved(pair: Pair, twin: Pair | None, count: int, secs: float) -> list[Sample]:
    """`count` measures of `pair` (its ruleset loaded), each between two of `twin` (the
    same topology with no ruleset) and paired with their mean.

    One iperf3 stream varies by a tenth and more from one run to the next on this
    machine, more than the few hundredths a datapath costs: a ratio of one run to one
    run, as measured right before, says little on its own. Samples taken in turns with
    a twin that carries no ruleset give the same comparison more often within a round.
    """
    if twin is None or not count:
        return []
    out: list[Sample] = []
    before = twin.measure(secs)
    for _ in range(count):
        got = pair.measure(secs)
        after = twin.measure(secs)
        out.append(({k: (before[k] + after[k]) / 2 for k in before}, got))
        before = after
    return out


def main() -> None:
    exit_on_sigterm()
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--policies", type=int, default=1_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", metavar="FILE", help="also write the results for bench/report.py")
    ap.add_argument("--seconds", type=float, default=5.0, help="per packet test")
    ap.add_argument("--naive-rules", type=int, default=20_000,
                    help="cap on the naive chain's length in the packet tests")
    ap.add_argument("--sample", type=int, default=50,
                    help="sources sampled to count the naive baseline's allowed pairs")
    ap.add_argument("--interleave", type=int, default=0, metavar="N",
                    help="per round, N more measures of each of --interleaved's variants, "
                         "taken in turns with a twin pair that has no ruleset")
    ap.add_argument("--interleaved", default=None,
                    help="the variants --interleave applies to (comma-separated; default: "
                         f"those of {', '.join(INTERLEAVED)} that are measured)")
    add_cpu_argument(ap)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"a comma-separated subset of: {', '.join(VARIANTS)}")
    args = ap.parse_args()
    variants = tuple(v.strip() for v in args.variants.split(","))
    cpu = chosen_cpu(ap, args)
    datapaths = tuple(v for v in variants
                      if v in DATAPATHS or v in (LISTENING, UNGUARDED, LIMITED))
    if not set(variants) <= set(VARIANTS):
        ap.error(f"--variants: choose from {', '.join(VARIANTS)}")
    if args.interleave < 0:
        ap.error("--interleave: a count of 0 or more")
    # Those named must be measured; by default, those with goals that are.
    interleaving = ({v.strip() for v in args.interleaved.split(",")}
                    if args.interleaved is not None else set(INTERLEAVED) & set(variants))
    if not interleaving <= set(variants):
        ap.error(f"--interleaved: {', '.join(sorted(interleaving - set(variants)))}: not "
                 f"among --variants")
    if not args.interleave:
        interleaving = set()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on a kill too
    t_start = time.monotonic()
    tag = f"dp{secrets.token_hex(2)}"
    scratch = f"{tag}-naive"
    tmp = tempfile.TemporaryDirectory()
    loadgen = build_loadgen(tmp.name)
    cluster = bench_cluster(args.pods, args.policies)
    t_compile, rs = timed(lambda: compile_cluster(cluster))
    c = rs.counts()
    print(f"compiled in {t_compile:.1f} s: {c}", file=sys.stderr)

    # the naive baseline's programming time, extrapolated (bench/iptables.py)
    nv: dict[str, float] = {}
    if "naive" in variants:
        create_netns(scratch)
        try:
            nv = naive(scratch, cluster, rs, args.sample, NAIVE_TOOL)
        finally:
            remove_netns(scratch)
        print(f"naive: {nv}", file=sys.stderr)
        slope, icept = statistics.linear_regression(LENGTHS, [nv[f"at{x}"] for x in LENGTHS])
        nv["full"] = nv["total"]
        nv["per_pod"] = 2 * nv["pairs"] / len(cluster.endpoints)  # a new pod's, both ways
        nv["endpoint"] = nv["per_pod"] * (icept + slope * nv["pairs"])
        nv["rules"] = int(min(nv["pairs"], args.naive_rules))
    restore = naive_restore(cluster, int(nv["rules"])) if nv else ""

    samples, failures = take_turns(variants, args.rounds, lambda name, index: one_pair(
        name, tag, index, loadgen, cluster, rs, restore, args.seconds, cpu,
        args.interleave if name in interleaving else 0))
    base = {v: [s[0] for s in samples[v]] for v in variants}
    got = {v: [s[1] for s in samples[v]] for v in variants}
    prog = {v: [s[2] for s in samples[v] if s[2]] for v in datapaths}
    naive_load = [s[3] for v in variants for s in samples[v] if s[3]]
    # every (no ruleset, variant) pair of measures: right before, then interleaved
    every = {v: [(s[0], s[1]) for s in samples[v]] + [x for s in samples[v] for x in s[4]]
             for v in variants}

    def ratio_of(pairs: Sequence[Sample], key: str) -> list[float]:
        return [g[key] / b[key] if b[key] else float("nan") for b, g in pairs]

    def ratios(name: str, key: str) -> list[float]:
        return ratio_of(list(zip(base[name], got[name], strict=True)), key)

    def pooled(name: str, key: str) -> list[float]:
        return ratio_of(every[name], key)

    def absolute(name: str, key: str) -> list[float]:
        return [g[key] for g in got[name]]

    nones = {key: [b[key] for v in variants for b in base[v]]
             for key in ("gbps", "crr", "p50", "p99", "pps", "failed")}
    rows: list[list[str]] = []
    labels: dict[str, str] = {}
    for key, label, fmt in (
            ("gbps", f"TCP throughput, iperf3 one stream {args.seconds:g} s (Gbit/s)",
             lambda x: f"{x:.1f}"),
            ("crr", "new TCP connections/s (connect, 64 B request, 64 B answer, close)",
             lambda x: f"{x:,.0f}"),
            ("p50", "connect-request-response latency p50 (µs)", lambda x: f"{x:.0f}"),
            ("p99", "connect-request-response latency p99 (µs)", lambda x: f"{x:.0f}"),
            ("pps", f"UDP packets/s received (64-byte frames, one flow, {args.seconds:g} s)",
             lambda x: f"{x / 1000:,.0f}k")):
        labels[key] = label
        rows.append([label, cell(nones[key], fmt), *(cell(absolute(v, key), fmt)
                                                     for v in variants)])
        rows.append(["  ratio to no ruleset, measured right before", "1",
                     *(cell(ratios(v, key), lambda x: f"{x:.2f}") for v in variants)])
        if interleaving:
            rows.append([f"  ratio, with {args.interleave} more a round taken in turns with "
                         f"a twin pair with no ruleset (samples)", "1",
                         *(f"{cell(pooled(v, key), lambda x: f'{x:.2f}')} "
                           f"({len(pooled(v, key))})" if v in interleaving else "-"
                           for v in variants)])
    # the variant's failures in every measure of it, interleaved ones too
    rows.append(["connect-request-responses failed (stalled 1 s), sum of rounds",
                 f"{sum(nones['failed']):.0f} (all baselines)",
                 *(f"{sum(g['failed'] for _, g in every[v]):.0f}" for v in variants)])
    for key, label in (("full", "programming: full load, from nothing"),
                       ("endpoint", "programming: one endpoint added"),
                       ("policy", "programming: one policy changed"),
                       ("read", "verifying read-back of everything")):
        naive_cell = ([f"~{fmt_time(nv[key])}, extrapolated" if key in ("full", "endpoint")
                       else "not estimated" if key == "policy" else "-"] if nv else [])
        rows.append([label, "-", *(cell([p[key] for p in prog[v]], fmt_time)
                                   if v in datapaths else "-"
                                   for v in variants if v != "naive"), *naive_cell])

    elapsed = time.monotonic() - t_start
    where = placement(cpu)
    if interleaving:
        where += (f"; {', '.join(v for v in variants if v in interleaving)}: {args.interleave} "
                  f"more measures a round, in turns with a twin pair with no ruleset, and "
                  f"their goals from every sample")
    print(f"\n{len(cluster.endpoints):,} endpoints, {len(cluster.policies):,} policies "
          f"(compiled: {c['chains']} chains, {c['rules']} rules, {c['sets']} sets, "
          f"{c['set_elements']} elements); {args.rounds} rounds, the variants in turn, each "
          f"in a fresh namespace, its own no-ruleset baseline right before; {where}; median "
          f"(min-max). Run took {elapsed / 60:.0f} min.\n")
    print_markdown(("measure", "no ruleset", *variants), rows)
    out = Results("datapaths", " ".join(["bench/datapaths.py", *sys.argv[1:]]))
    out.table(f"{len(cluster.endpoints):,} endpoints, {len(cluster.policies):,} policies; "
              f"{args.rounds} rounds, variants in turn; {where}; median (min-max)",
              ("measure", "no ruleset", *variants), rows)
    # Each variant's median ratio per measure: of every sample where it was interleaved.
    bars: dict[str, dict[str, float]] = {}
    for key, label in labels.items():
        for v in variants:
            values = pooled(v, key) if v in interleaving else ratios(v, key)
            if values:
                bars.setdefault(v, {})[label.split("(")[0].strip()[:28]] = statistics.median(
                    values)
    out.series["datapath-ratios"] = {"y": "ratio to no ruleset (1 = no cost)", "bars": bars,
                                     "ref": 1.0}
    for v in ("nft", "ebpf"):
        for measure, value in bars.get(v, {}).items():
            if measure.startswith(("TCP throughput", "new TCP connections")):
                # Beside it, what conntrack alone leaves (no rule of policy), when measured.
                floor = bars.get(CONNTRACK, {}).get(measure)
                bare = bars.get(UNGUARDED, {}).get(measure) if v == "nft" else None
                notes = [f"{what}: {x:.2f}" for what, x in (("unguarded", bare),
                                                           ("conntrack alone", floor))
                         if x is not None]
                note = f" ({'; '.join(notes)})" if notes else ""
                out.goal(f"{v}: {measure} ratio >= 0.97", f"{value:.2f}{note}",
                         value >= 0.97)
    out.write(args.json)
    if failures:
        print(f"\nfailed, left out (see stderr): {', '.join(failures)}")
    if nv:
        print(naive_note(nv, args.sample, statistics.median(naive_load or [float("nan")])))


def naive_note(nv: dict[str, float], sample: int, load: float) -> str:
    per_length = " / ".join(f"{nv[f'at{x}'] * 1000:.1f}" for x in LENGTHS)
    return (f"\nnaive: one `{NAIVE_TOOL} -A FORWARD -s SRC -d DST -p tcp --dport 8080 -j "
            f"ACCEPT` per allowed pair after an ESTABLISHED,RELATED accept, then `-d server "
            f"-j DROP`. Allowed pairs: {nv['pairs']:,.0f} (counted for {sample} sampled "
            f"sources, scaled). Packet tests: a chain of {nv['rules']:,.0f} pair rules "
            f"(capped), the real pair's 3 rules after the first {nv['rules'] // 2:,.0f}, "
            f"loaded with one iptables-restore in {fmt_time(load)} (not how a user loads "
            f"it). Programming, extrapolated (bench/iptables.py): one process per rule, "
            f"{per_length} ms each at 0 / 2k / 10k / 20k rules, the fitted line summed over "
            f"all pairs; one endpoint added = {nv['per_pod']:,.0f} more processes at the "
            f"full chain's length.")

if __name__ == "__main__":
    main()
