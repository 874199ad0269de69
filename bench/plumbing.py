"""Benchmark: endpoint plumbing with in-process setns vs pyroute2's NetNS objects.

Creates and deletes N endpoints (namespace, veth pair on a bridge, IPv4
address, loopback up, default route) twice inside a private host namespace:

* ``setns``: :class:`stockade.net.Plumber`, which enters each namespace in the
  calling thread and opens an ``IPRoute`` there;
* ``NetNS``: the same steps through ``pyroute2.NetNS`` objects, each of which
  forks a helper process to create its netlink socket in the namespace (and
  ``NetNS(name)`` also creates the namespace that way).

Prints per-endpoint milliseconds and the ratio. Everything is made under a
random ``stkb..`` prefix and removed at the end, also on error or Ctrl-C.

    sudo .venv/bin/python bench/plumbing.py [-n 50]
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import string
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from pyroute2 import NetNS, netns

from stockade.net.namespace import create_netns, list_netns, netns_path, remove_netns
from stockade.net.plumber import EndpointSpec, Plumber


@dataclass(frozen=True)
class Timing:
    approach: str
    create_ms: float
    delete_ms: float


def _spec(i: int) -> EndpointSpec:
    return EndpointSpec(f"bench/{i}", f"10.244.{i // 250}.{i % 250 + 2}/16", gateway4="10.244.0.1")


def bench_setns(plumber: Plumber, n: int) -> Timing:
    start = time.perf_counter()
    for i in range(n):
        plumber.ensure_endpoint(_spec(i))
    created = time.perf_counter()
    for i in range(n):
        plumber.remove_endpoint(_spec(i).key)
    done = time.perf_counter()
    return Timing("setns (Plumber)", (created - start) * 1e3 / n, (done - created) * 1e3 / n)


def bench_setns_batch(plumber: Plumber, n: int) -> Timing:
    """Plumber again, but deleting through teardown(): namespaces dropped as a batch."""
    start = time.perf_counter()
    for i in range(n):
        plumber.ensure_endpoint(_spec(i))
    created = time.perf_counter()
    plumber.teardown()
    done = time.perf_counter()
    plumber.ensure_bridge()
    return Timing("setns + teardown", (created - start) * 1e3 / n, (done - created) * 1e3 / n)


def bench_netns_objects(plumber: Plumber, n: int) -> Timing:
    """The same endpoints as Plumber.ensure_endpoint makes, via NetNS objects."""
    names = plumber.naming
    host = NetNS(plumber.host_netns)
    try:
        bridge = host.link_lookup(ifname=plumber.bridge)[0]
        start = time.perf_counter()
        for i in range(n):
            spec = _spec(i)
            ns_name, host_if = names.netns(spec.key), names.host_ifname(spec.key)
            with NetNS(ns_name) as ns:  # forks a helper; O_CREAT makes the namespace
                fd = os.open(netns_path(ns_name), os.O_RDONLY)
                try:
                    host.link(
                        "add", ifname=host_if, kind="veth", peer={"ifname": "eth0", "net_ns_fd": fd}
                    )
                finally:
                    os.close(fd)
                index = host.link_lookup(ifname=host_if)[0]
                host.link("set", index=index, master=bridge, state="up")
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
                eth0 = ns.link_lookup(ifname="eth0")[0]
                address, prefixlen = spec.ipv4.split("/")
                ns.addr("add", index=eth0, address=address, prefixlen=int(prefixlen))
                ns.link("set", index=eth0, state="up")
                ns.route(
                    "replace",
                    dst="0.0.0.0/0",
                    gateway=spec.gateway4,
                    oif=eth0,
                    family=socket.AF_INET,
                )
        created = time.perf_counter()
        for i in range(n):
            key = _spec(i).key
            found = host.link_lookup(ifname=names.host_ifname(key))
            if found:
                host.link("del", index=found[0])
            netns.remove(names.netns(key))
        done = time.perf_counter()
    finally:
        host.close()
    return Timing("NetNS objects", (created - start) * 1e3 / n, (done - created) * 1e3 / n)


def _cleanup(prefix: str) -> None:
    for name in list_netns():
        if name.startswith(prefix):
            remove_netns(name)


def run(n: int, rounds: int, settle: float = 1.0) -> list[Timing]:
    prefix = "stkb" + "".join(secrets.choice(string.ascii_lowercase) for _ in range(2))
    host = f"{prefix}-host"
    results: list[Timing] = []
    try:
        create_netns(host)
        plumber = Plumber(prefix=prefix, host_netns=host)
        plumber.ensure_bridge()
        benches: list[Callable[[Plumber, int], Timing]] = [
            bench_setns,
            bench_netns_objects,
            bench_setns_batch,
        ]
        for r in range(rounds):
            # Rotate the order: the kernel destroys namespaces in the background
            # after a delete phase, which slows whatever runs next.
            for bench in benches[r % len(benches) :] + benches[: r % len(benches)]:
                results.append(bench(plumber, n))
                leftover = plumber.inventory()
                assert not leftover.host_links and not leftover.netns, leftover
                time.sleep(settle)  # let the kernel finish destroying namespaces in the background
        plumber.teardown()
    finally:
        _cleanup(prefix)
    return results


def render(results: list[Timing], n: int, rounds: int) -> str:
    """Per approach the best create and the best delete over the rounds (the runs
    least disturbed by other load on the machine), and the ratios to setns."""
    best: dict[str, Timing] = {}
    for t in results:
        prev = best.get(t.approach)
        if prev is not None:
            t = Timing(
                t.approach, min(t.create_ms, prev.create_ms), min(t.delete_ms, prev.delete_ms)
            )
        best[t.approach] = t
    base = best["setns (Plumber)"]
    lines = [
        f"{n} endpoints, best of {rounds} round(s), ms per endpoint",
        f"{'approach':<18}{'create':>9}{'delete':>9}{'total':>9}   vs setns (create/delete)",
    ]
    for t in best.values():
        total = t.create_ms + t.delete_ms
        ratio = f"{t.create_ms / base.create_ms:.1f}x / {t.delete_ms / base.delete_ms:.1f}x"
        row = f"{t.approach:<18}{t.create_ms:>9.2f}{t.delete_ms:>9.2f}{total:>9.2f}"
        lines.append(f"{row}   {ratio}")
    return "\n".join(lines)


def _terminate(main_pid: int) -> Callable[[int, object], None]:
    """A SIGTERM handler raising SystemExit in this process only.

    pyroute2's helper children inherit handlers and are stopped with SIGTERM;
    there the default action (exit at once) must stay.
    """

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        sys.exit(128 + signum)

    return handler


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=50, help="endpoints per round (default 50)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, best is shown (default 3)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/plumbing.py needs root (network namespaces)", file=sys.stderr)
        return 2
    # SIGTERM as an exception, so that run()'s cleanup also happens when killed.
    signal.signal(signal.SIGTERM, _terminate(os.getpid()))
    print(render(run(args.n, args.rounds), args.n, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
