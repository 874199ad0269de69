"""Benchmark of the nftables datapath at scale, in a private network namespace.

Measures, side by side in one run:
- programming 10,000 endpoints and 1,000 policies from scratch (compile, kernel);
- one endpoint added, and one policy changed, with all of that loaded (compile,
  plan, kernel), and the size of the delta sent;
- new TCP connections per second and bulk throughput between two real endpoints,
  with the full ruleset loaded (both endpoints isolated, allowed by a policy) and
  with no ruleset, as a ratio;
- one set-element change through libnftables in-process vs one `nft` process.
"""

from __future__ import annotations

import argparse
import secrets
import subprocess
import sys
from dataclasses import replace

from common import exit_on_sigterm, print_table, timed
from stockade.compile.lower import compile_cluster
from stockade.compile.nft import Table
from stockade.datapath.nfnetlink import ElementChange
from stockade.datapath.nft import NftDatapath
from stockade.model.cluster import Cluster, ContainerPort, Endpoint
from stockade.model.labels import Labels
from stockade.model.policy import INGRESS, NetworkPolicy, Peer, PolicyPort, Rule
from stockade.model.selector import Selector
from stockade.net.namespace import create_netns, remove_netns
from stockade.net.plumber import EndpointSpec, Plumber
from synthetic import make_cluster

SERVER = """
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5001)); s.listen(512); print("ready", flush=True)
def sink(c):
    while c.recv(1 << 16):
        pass
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=sink, args=(c,), daemon=True).start()
"""

CLIENT = """
import socket, sys, time
addr, mode, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
end = time.perf_counter() + secs; n = 0
if mode == "conn":
    while time.perf_counter() < end:
        c = socket.create_connection((addr, 5001)); c.close(); n += 1
    print(n / secs)
else:
    c = socket.create_connection((addr, 5001)); buf = b"x" * (1 << 16)
    while time.perf_counter() < end:
        c.sendall(buf); n += len(buf)
    c.close(); print(n / secs / 1e6)
"""


def measure(netns: str, addr: str, mode: str, secs: float) -> float:
    out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", CLIENT, addr,
                          mode, str(secs)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def main() -> None:
    exit_on_sigterm()
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--policies", type=int, default=1_000)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    tag = f"bd{secrets.token_hex(2)}"
    host = f"{tag}-host"
    create_netns(host)
    plumber = Plumber(prefix=tag, host_netns=host, subnet4="10.200.0.0/16")
    rows: list[tuple[str, str, str]] = []
    try:
        plumber.ensure_bridge()
        srv = plumber.ensure_endpoint(EndpointSpec("bench/server", "10.200.0.10/16"))
        cli = plumber.ensure_endpoint(EndpointSpec("bench/client", "10.200.0.11/16"))
        dp = NftDatapath(Table("stockade"), netns=host)
        dp.check()
        base = make_cluster(args.pods, args.policies)
        real = (Endpoint("ns0", "server", Labels({"app": "bench-server"}), (srv.address4,),
                         (ContainerPort(5001, "TCP", "bench"),)),
                Endpoint("ns0", "client", Labels({"app": "bench-client"}), (cli.address4,)))
        allow = NetworkPolicy("ns0", "bench-allow", Selector(Labels({"app": "bench-server"})),
                              ingress=(Rule((PolicyPort("TCP", "bench"),), (Peer(
                                  pod_selector=Selector(Labels({"app": "bench-client"}))),)),),
                              policy_types=(INGRESS,))
        cluster = Cluster(base.namespaces, base.endpoints + real, (*base.policies, allow))

        server = subprocess.Popen(["ip", "netns", "exec", srv.netns, sys.executable, "-c",
                                   SERVER], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            conn_plain = measure(cli.netns, srv.address4, "conn", args.seconds)
            mb_plain = measure(cli.netns, srv.address4, "bulk", args.seconds)

            t_compile, rs = timed(lambda: compile_cluster(cluster))
            t_apply, delta = timed(lambda: dp.apply(rs))
            c = rs.counts()
            rows.append((f"from scratch: compile {len(cluster.endpoints)} endpoints, "
                         f"{len(cluster.policies)} policies", f"{t_compile * 1000:.0f} ms",
                         f"{c['chains']} chains, {c['rules']} rules, {c['sets']} sets, "
                         f"{c['set_elements']} elements"))
            rows.append(("from scratch: kernel transaction", f"{t_apply * 1000:.0f} ms",
                         f"{sum(delta.summary().values())} objects"))

            new_ep = Endpoint("ns3", "newpod", Labels({"app": "app7", "tier": "api",
                                                       "env": "prod"}), ("10.129.0.1",),
                              (ContainerPort(8080, "TCP", "http"),))
            one_more = replace(cluster, endpoints=(*cluster.endpoints, new_ep))
            t_c1, rs1 = timed(lambda: compile_cluster(one_more))
            t_p1, _ = timed(lambda: dp.diff(rs1))
            t_a1, plan1 = timed(lambda: dp.apply(rs1))
            s1 = plan1.summary()
            rows.append(("one endpoint added: full compile", f"{t_c1 * 1000:.0f} ms",
                         "recompiles everything (incremental compile: see bench/agent.py)"))
            rows.append(("one endpoint added: plan + kernel", f"{t_a1 * 1000:.1f} ms",
                         f"delta {({k: v for k, v in s1.items() if v})}; reading the "
                         f"kernel back instead (drift check): {t_p1 * 1000:.0f} ms"))
            changed = list(one_more.policies)
            p0 = changed[0]
            changed[0] = replace(p0, ingress=(*p0.ingress, Rule((PolicyPort("TCP", 9999),))))
            pol_change = replace(one_more, policies=tuple(changed))
            t_c2, rs2 = timed(lambda: compile_cluster(pol_change))
            t_a2, plan2 = timed(lambda: dp.apply(rs2))
            s2 = plan2.summary()
            rows.append(("one policy changed: full compile", f"{t_c2 * 1000:.0f} ms", ""))
            rows.append(("one policy changed: plan + kernel", f"{t_a2 * 1000:.1f} ms",
                         f"delta {({k: v for k, v in s2.items() if v})}"))

            conn_rules = measure(cli.netns, srv.address4, "conn", args.seconds)
            mb_rules = measure(cli.netns, srv.address4, "bulk", args.seconds)
            rows.append(("new TCP connections/s: no ruleset | full ruleset",
                         f"{conn_plain:.0f}", f"{conn_rules:.0f} with ruleset, ratio "
                         f"{conn_rules / conn_plain:.2f}"))
            rows.append(("TCP throughput MB/s: no ruleset | full ruleset",
                         f"{mb_plain:.0f}", f"{mb_rules:.0f} with ruleset, ratio "
                         f"{mb_rules / mb_plain:.2f}"))
        finally:
            server.kill()
            server.wait()

        # one map entry, three ways, with the whole ruleset loaded
        chain = next(iter(rs2.chains))
        n = 100
        t_nl, _ = timed(lambda: [dp._elements.apply([ElementChange(
            "egress4", [f"10.250.0.{i}"], jumps=[chain])]) for i in range(n)])
        t_lib, _ = timed(lambda: [dp._run([{"add": {"element": dp.table.ref(
            name="egress4", elem=[[f"10.250.1.{i}", {"jump": {"target": chain}}]])}}],
            "bench") for i in range(n)])
        t_proc, _ = timed(lambda: [subprocess.run(
            ["ip", "netns", "exec", host, "nft", "add", "element", "inet", "stockade",
             "egress4", f"{{ 10.250.2.{i} : jump {chain} }}"], check=True)
            for i in range(n // 10)])
        per_nl = t_nl / n * 1000
        per_lib = t_lib / n * 1000
        per_proc = t_proc / (n // 10) * 1000
        rows.append(("one map entry: raw nfnetlink batch (used for element deltas)",
                     f"{per_nl:.2f} ms", ""))
        rows.append(("one map entry: libnftables JSON in-process", f"{per_lib:.2f} ms",
                     f"ratio to nfnetlink {per_lib / per_nl:.0f}x"))
        rows.append(("one map entry: an nft process", f"{per_proc:.2f} ms",
                     f"ratio to nfnetlink {per_proc / per_nl:.0f}x"))
    finally:
        plumber.teardown()
        remove_netns(host)

    print_table(("measure", "value", "notes"), rows)


if __name__ == "__main__":
    main()
