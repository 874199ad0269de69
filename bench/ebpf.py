"""Benchmark of the eBPF datapath at scale, in a private network namespace.

Measures, in one run:
- programming 10,000 endpoints and 1,000 policies from scratch (compile to map
  contents, write both slots), one endpoint added, one policy changed;
- re-reading the maps (adoption by a new process: dump, decode, empty delta), and
  the read alone in batches against key by key;
- 10,000 map entries written through libbpf in-process (one batch) against one
  `bpftool batch` process, and one entry through one `bpftool` process;
- the program's cost per packet (BPF_PROG_TEST_RUN, the kernel's own timing):
  a packet of a connection not answered yet (in `ct`), of an established one (in
  `ct_live`) each way, a denied new connection (the full judgement:
  two ipcache and two policy lookups), and an allowed new one with the ruleset
  loaded; and the cost of the kernel's conntrack lookup through the
  bpf_skb_ct_lookup kfunc (a miss) for the comparison that chose the program's
  own conntrack map.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import struct
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

from common import exit_on_sigterm, print_table, timed
from stockade.compile import bpf as bpfc
from stockade.compile.incremental import IncrementalCompiler
from stockade.compile.ir import Guard, Ruleset
from stockade.compile.lower import compile_cluster
from stockade.datapath import libbpf
from stockade.datapath.ebpf import LAYOUT, EbpfDatapath
from stockade.model.cluster import Cluster, ContainerPort, Endpoint
from stockade.model.cnp import ADMIN
from stockade.model.labels import Labels
from stockade.model.policy import INGRESS, IPBlock, NetworkPolicy, Peer, PolicyPort, Rule
from stockade.model.selector import Selector
from stockade.net.namespace import create_netns, remove_netns
from synthetic import make_cluster
from tiers import cluster_policies

KFUNC_PROBE = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#define TC_ACT_UNSPEC (-1)
#define TC_ACT_OK 0
extern struct nf_conn *bpf_skb_ct_lookup(struct __sk_buff *, struct bpf_sock_tuple *, __u32,
                                         struct bpf_ct_opts *, __u32) __ksym;
extern void bpf_ct_release(struct nf_conn *) __ksym;
SEC("tc") int kernel_ct(struct __sk_buff *skb) {
    struct bpf_sock_tuple t = {};
    struct bpf_ct_opts o = {.netns_id = -1, .l4proto = 6};
    t.ipv4.saddr = 0x0a000001; t.ipv4.daddr = 0x0a000002; t.ipv4.sport = 1; t.ipv4.dport = 2;
    struct nf_conn *ct = bpf_skb_ct_lookup(skb, &t, sizeof(t.ipv4), &o, sizeof(o));
    if (ct) { bpf_ct_release(ct); return TC_ACT_OK; }
    return TC_ACT_UNSPEC;
}
SEC("tc") int nothing(struct __sk_buff *skb) { return TC_ACT_UNSPEC; }
char LICENSE[] SEC("license") = "GPL";
"""


def tcp_packet(src: str, dst: str, sport: int, dport: int, flags: int = 0x02) -> bytes:
    eth = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00"
    tcp = struct.pack(">HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
    total = 20 + len(tcp)
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, 64, 6, 0,
                     ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    return eth + ip + tcp


def ns_per_packet(prog_fd: int, packet: bytes, repeat: int = 200_000) -> tuple[int, float]:
    best = None
    for _ in range(3):
        rc, ns = libbpf.test_run(prog_fd, packet, repeat)
        best = ns if best is None else min(best, ns)
    assert best is not None
    return rc, float(best)


def main() -> None:
    exit_on_sigterm()
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--policies", type=int, default=1_000)
    args = ap.parse_args()
    host = f"be{secrets.token_hex(2)}-host"
    create_netns(host)
    rows: list[tuple[str, str, str]] = []
    dp = EbpfDatapath("bench", netns=host)
    try:
        dp.check()
        base = make_cluster(args.pods, args.policies)
        client = Endpoint("ns0", "client", Labels({"app": "bench-client"}), ("10.200.0.11",))
        server = Endpoint("ns0", "server", Labels({"app": "bench-server"}), ("10.200.0.10",),
                          (ContainerPort(5001, "TCP", "bench"),))
        allow = NetworkPolicy("ns0", "bench-allow", Selector(Labels({"app": "bench-server"})),
                              ingress=(Rule((PolicyPort("TCP", "bench"),), (Peer(
                                  pod_selector=Selector(Labels({"app": "bench-client"}))),)),),
                              policy_types=(INGRESS,))
        cluster = Cluster(base.namespaces, (*base.endpoints, client, server),
                          (*base.policies, allow))
        t_lower, rs = timed(lambda: compile_cluster(cluster))
        t_state, state = timed(lambda: bpfc.compile_state(rs))
        c = state.counts()
        rows.append(("lower to the ruleset (shared with nft)", f"{t_lower * 1000:.0f} ms", ""))
        rows.append(("ruleset -> map contents", f"{t_state * 1000:.0f} ms",
                     f"{c['identities']} identities, {c['policies']} policies, "
                     f"{c['ipcache']} ipcache prefixes, {c['policy_entries']} policy entries"))
        # The agent's rulesets come from its incremental compiler: from the first apply
        # on, so that a change's unchanged chains and sets are the same objects.
        inc = IncrementalCompiler.of(cluster)
        rs_inc = inc.ruleset()
        assert rs_inc == rs
        t_full, _ = timed(lambda: dp.apply(rs_inc))
        rows.append(("from scratch: apply (compile, both slots, meta)",
                     f"{t_full * 1000:.0f} ms",
                     f"{dp.last_timing['entries']:.0f} entries; write "
                     f"{dp.last_timing['write'] * 1000:.0f} ms"))

        # Changes as the agent makes them: the incremental compiler's next ruleset, the
        # map contents worked out from the change (compile/bpf_change.py); beside each,
        # what compiling the map contents whole takes for the same ruleset.

        def change(label: str, rs_next: Ruleset) -> None:
            assert dp._state is not None
            known = len(dp._state.identities)
            t_whole, _ = timed(lambda: bpfc.compile_state(rs_next, dp._state))
            switches = dp.in_place
            t_apply, _ = timed(lambda: dp.apply(rs_next))
            how = "written in place" if dp.in_place > switches else "slot switch"
            if label.startswith("one endpoint"):
                label += " (a new identity)" if len(dp._state.identities) > known else \
                    " (a known identity)"
            rows.append((f"{label}: apply", f"{t_apply * 1000:.0f} ms",
                         f"{how}; {dp.last_timing['entries']:.0f} entries written in "
                         f"{dp.last_timing['write'] * 1000:.1f} ms; map compile "
                         f"{dp.last_timing['compile'] * 1000:.0f} ms (whole: "
                         f"{t_whole * 1000:.0f} ms)"))

        labels = Labels({"app": "app7", "tier": "api", "env": "prod"})
        inc.upsert_endpoint(Endpoint("ns3", "newpod", labels, ("10.129.0.1",),
                                     (ContainerPort(8080, "TCP", "http"),)))
        change("one endpoint added", inc.ruleset())
        inc.upsert_endpoint(Endpoint("ns3", "newpod2", labels, ("10.129.0.2",),
                                     (ContainerPort(8080, "TCP", "http"),)))
        change("one endpoint added, labelled as the last", inc.ruleset())
        first = cluster.policies[0]
        inc.upsert_policy(replace(first, ingress=(*first.ingress,
                                                  Rule((PolicyPort("TCP", 9999),)))))
        change("one policy changed", inc.ruleset())
        # an ipBlock around the pods of a /24: each moves to an identity that has its set
        inside = ipaddress.ip_network(f"{base.endpoints[0].ips[0]}/24", strict=False)
        moved = sum(1 for e in cluster.endpoints for ip in e.ips
                    if ipaddress.ip_address(ip) in inside)
        inc.upsert_policy(replace(first, ingress=(*first.ingress, Rule(
            (PolicyPort("TCP", 9999),), (Peer(ip_block=IPBlock(str(inside))),)))))
        change(f"one policy changed, an ipBlock added ({moved} pods inside)", inc.ruleset())
        inc.upsert_policy(first)
        change("the ipBlock removed again", inc.ruleset())
        # one around every pod: most prefixes move, so it is compiled whole
        inc.upsert_policy(replace(first, ingress=(*first.ingress, Rule(
            (PolicyPort("TCP", 9999),), (Peer(ip_block=IPBlock("10.0.0.0/8")),)))))
        change("one policy changed, an ipBlock around every pod", inc.ruleset())
        inc.upsert_policy(first)
        change("that ipBlock removed again", inc.ruleset())
        # ClusterNetworkPolicy tiers: two Admin policies for each namespace; then one's
        # priority changed, which rewrites its namespace's Admin chain under its name
        admins = cluster_policies(ADMIN, 100, spread=True)
        for cnp in admins:
            inc.upsert_cluster_policy(cnp)
        change("100 Admin ClusterNetworkPolicies added", inc.ruleset())
        inc.upsert_cluster_policy(replace(admins[0], priority=1000))
        rs2 = inc.ruleset()
        change("one's priority changed (its chain rewritten under its name)", rs2)
        dp.close()
        fresh = EbpfDatapath("bench", netns=host)
        t_adopt, delta = timed(lambda: fresh.apply(rs2))
        rows.append(("a new process adopts: read back, decode, apply", f"{t_adopt * 1000:.0f} ms",
                     f"delta empty: {delta.empty}; read {fresh.last_timing['read'] * 1000:.0f} "
                     f"ms, {fresh.last_timing['entries']:.0f} entries written"))

        # reading the maps back: batched against key by key, in turns
        def read_all(batched: bool) -> int:
            return sum(len(libbpf.dump(fresh._maps[m], *LAYOUT[m], batched=batched))
                       for m in (*bpfc.MAPS, "meta"))
        reads: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(3):
            for batched in (True, False):
                t, n_read = timed(lambda batched=batched: read_all(batched))
                reads[batched].append(t)
        t_batch, t_keys = min(reads[True]), min(reads[False])
        rows.append((f"reading the maps back ({n_read} entries): BPF_MAP_LOOKUP_BATCH",
                     f"{t_batch * 1000:.0f} ms", "best of 3, in turns with the next"))
        rows.append(("reading the maps back: key by key (get_next_key + lookup)",
                     f"{t_keys * 1000:.0f} ms", f"{t_keys / t_batch:.1f}x"))

        # 10,000 entries: libbpf in-process against bpftool
        pin = str(fresh.dir / "policy")
        fd = libbpf.obj_get(pin)
        keys = [bpfc.POLICY_KEY.pack(88, (0x7000_0000 + i).to_bytes(4, "big"),
                                     (5).to_bytes(4, "big"), 6, (80).to_bytes(2, "big"))
                for i in range(10_000)]
        one = bpfc.POLICY_VALUE.pack(1)
        t_lib, _ = timed(lambda: libbpf.update_batch(fd, keys, [one] * len(keys),
                                                     *LAYOUT["policy"]))
        libbpf.delete_batch(fd, keys, LAYOUT["policy"][0])
        os.close(fd)
        with tempfile.NamedTemporaryFile("w", suffix=".batch", delete=False) as f:
            for k in keys:
                f.write(f"map update pinned {pin} key hex {k.hex(' ')} value hex "
                        f"{one.hex(' ')}\n")
        t_tool, _ = timed(lambda: subprocess.run(["bpftool", "batch", "file", f.name],
                                                 check=True, capture_output=True))
        Path(f.name).unlink()
        t_one, _ = timed(lambda: subprocess.run(
            ["bpftool", "map", "update", "pinned", pin, "key", "hex", *keys[0].hex(" ").split(),
             "value", "hex", *one.hex(" ").split()], check=True, capture_output=True))
        rows.append(("10,000 entries: libbpf batch in-process", f"{t_lib * 1000:.1f} ms", ""))
        rows.append(("10,000 entries: one `bpftool batch` process", f"{t_tool * 1000:.0f} ms",
                     f"{t_tool / t_lib:.0f}x"))
        rows.append(("1 entry: one `bpftool` process", f"{t_one * 1000:.0f} ms", ""))

        # per packet
        prog = fresh._progs["in"]
        a, b = str(client.ips[0]), str(server.ips[0])
        rc, allowed_new = ns_per_packet(prog, tcp_packet(a, b, 40000, 5001), 1)
        # not answered yet: in `ct` (the LRU), two lookups; its answer too
        rc_new, unanswered = ns_per_packet(prog, tcp_packet(a, b, 40000, 5001, 0x10))
        rc_ans, answer = ns_per_packet(prog, tcp_packet(b, a, 5001, 40000, 0x10))
        # answered and used again: established, moved to `ct_live` by the first run
        rc_hit, tracked = ns_per_packet(prog, tcp_packet(a, b, 40000, 5001, 0x10))
        rc_reply, reply = ns_per_packet(prog, tcp_packet(b, a, 5001, 40000, 0x10))
        live = libbpf.dump(fresh._maps["ct_live"], *LAYOUT["ct_live"])
        assert any(bpfc.ct_original(k, v)[4:] == (40000, 5001) for k, v in live.items()), \
            "the connection was not established"
        rc_deny, denied = ns_per_packet(prog, tcp_packet(a, b, 40001, 5002))
        other = str(base.endpoints[0].ips[0])
        rc_far, far = ns_per_packet(prog, tcp_packet(other, b, 40002, 5001))
        rows.append(("first packet of an allowed connection (one run, with the insert)",
                     f"{allowed_new:.0f} ns", f"verdict {rc}"))
        rows.append(("per packet: a connection not answered yet (in ct)",
                     f"{unanswered:.0f} ns", f"verdict {rc_new}"))
        rows.append(("per packet: its answer (in ct)", f"{answer:.0f} ns",
                     f"verdict {rc_ans}"))
        rows.append(("per packet: established connection (in ct_live)", f"{tracked:.0f} ns",
                     f"verdict {rc_hit}"))
        rows.append(("per packet: established connection, a reply", f"{reply:.0f} ns",
                     f"verdict {rc_reply}"))
        rows.append(("per packet: new connection denied (full judgement)", f"{denied:.0f} ns",
                     f"verdict {rc_deny}"))
        rows.append(("per packet: new connection, other pod to an isolated one",
                     f"{far:.0f} ns", f"verdict {rc_far}"))
        rows += guard_rows(fresh, tcp_packet(a, b, 40000, 5001, 0x10), a, "in")
        rows += guard_rows(fresh, tcp_packet(a, b, 40000, 5001, 0x10), b, "out")
        rows += kfunc_rows()
    finally:
        dp.remove()
        remove_netns(host)
    print_table(("measure", "value", "notes"), rows)


def guard_rows(dp: EbpfDatapath, packet: bytes, owner: str, hook: str,
               rounds: int = 5) -> list[tuple[str, str, str]]:
    """A tracked connection's packet through an unguarded port and through a guarded one,
    in alternation: leaving its pod (`hook` "in": the guard holds the source, `owner`,
    and MAC) or entering it ("out": the destination). BPF_PROG_TEST_RUN's packet
    arrives on the loopback device (ifindex 1): a guard on it is the port's."""
    fd = dp._maps["guard"]
    key = bpfc.GUARD_KEY.pack(1)
    mac = packet[6:12] if hook == "in" else packet[0:6]
    value = bpfc.encode_guard("lo", Guard((owner,), mac.hex(":")))
    prog = dp._progs[hook]
    times: dict[bool, list[float]] = {False: [], True: []}
    verdicts: dict[bool, int] = {}
    try:
        for _ in range(rounds):
            for guarded in (False, True):
                if guarded:
                    libbpf.update(fd, key, value)
                else:
                    libbpf.delete(fd, key)
                verdicts[guarded], ns = ns_per_packet(prog, packet)
                times[guarded].append(ns)
    finally:
        libbpf.delete(fd, key)
    med = {g: sorted(t)[len(t) // 2] for g, t in times.items()}
    spread = {g: f"{min(t):.0f}-{max(t):.0f}" for g, t in times.items()}
    way = "leaving" if hook == "in" else "entering"
    held = "its MAC and source" if hook == "in" else "its destination"
    return [
        (f"per packet: tracked connection {way} a pod, unguarded port (median of "
         f"{rounds}, in turns)", f"{med[False]:.0f} ns", f"{spread[False]}; verdict "
                                                          f"{verdicts[False]}"),
        (f"per packet: tracked connection {way} a pod, guarded port ({held})",
         f"{med[True]:.0f} ns", f"{spread[True]}; verdict {verdicts[True]}; the guard "
                                f"+{med[True] - med[False]:.0f} ns"),
    ]


def kfunc_rows() -> list[tuple[str, str, str]]:
    """The kernel's conntrack through bpf_skb_ct_lookup, against an empty program."""
    with tempfile.TemporaryDirectory() as tmp:
        src, obj = Path(tmp, "k.c"), Path(tmp, "k.o")
        src.write_text(KFUNC_PROBE)
        with Path(tmp, "vmlinux.h").open("w") as header:
            subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux",
                            "format", "c"], stdout=header, check=True)
        arch = "x86_64-linux-gnu"
        run = subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{arch}",
                              f"-I{tmp}", "-c", str(src), "-o", str(obj)],
                             capture_output=True, text=True, check=False)
        if run.returncode != 0:
            return [("kernel conntrack kfunc", "n/a", run.stderr.strip()[:80])]
        pins = Path("/sys/fs/bpf", f"kfunc{os.getpid()}")
        pins.mkdir()
        try:
            subprocess.run(["bpftool", "prog", "loadall", str(obj), str(pins)], check=True,
                           capture_output=True, text=True)
            fds = {p: libbpf.obj_get(str(pins / p)) for p in ("kernel_ct", "nothing")}
            pkt = tcp_packet("10.0.0.1", "10.0.0.2", 1, 2)
            _, kct = ns_per_packet(fds["kernel_ct"], pkt)
            _, empty = ns_per_packet(fds["nothing"], pkt)
            for fd in fds.values():
                os.close(fd)
        except subprocess.CalledProcessError as exc:
            return [("kernel conntrack kfunc", "n/a", str(exc.stderr)[:80])]
        finally:
            for p in pins.iterdir():
                p.unlink()
            pins.rmdir()
    return [("per packet: an empty tc program", f"{empty:.0f} ns", ""),
            ("per packet: bpf_skb_ct_lookup (kernel conntrack, a miss) + release",
             f"{kct:.0f} ns", "the alternative to the program's own map")]


if __name__ == "__main__":
    main()
