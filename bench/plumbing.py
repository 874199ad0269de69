"""Benchmark: endpoint plumbing over stockade's own rtnetlink client vs pyroute2.

Creates and deletes N endpoints (namespace, veth pair on a bridge, IPv4
address, loopback up, default route) inside a private host namespace:

* ``setns (Plumber)``: :class:`stockade.net.plumber.Plumber`, which enters
  each namespace in the calling thread and opens a :class:`stockade.net.rtnl.Rtnl`
  socket there (``setns + teardown``: the same, deleting through teardown());
* ``setns + IPRoute``: the same steps with a pyroute2 ``IPRoute`` opened in the
  entered namespace (what the Plumber did before pyroute2 was dropped);
* ``NetNS objects``: the same steps through ``pyroute2.NetNS`` objects, each of
  which forks a helper process to create its netlink socket in the namespace.

The pyroute2 rows need pyroute2, which stockade no longer depends on
(``pip install pyroute2`` into the venv to see them); they are skipped without it.
Also prints the cost of importing each client in a fresh interpreter (best of
``--imports`` runs of ``python -c``), which is what a CNI plugin process pays.

Prints per-endpoint milliseconds and the ratio. Everything is made under a
random ``stkb..`` prefix and removed at the end, also on error or Ctrl-C.

    sudo .venv/bin/python bench/plumbing.py [-n 50]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import signal
import socket
import string
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from stockade.net.namespace import (
    create_netns,
    entered,
    list_netns,
    netns_path,
    remove_netns,
)
from stockade.net.plumber import EndpointSpec, Plumber

HAVE_PYROUTE2 = importlib.util.find_spec("pyroute2") is not None


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


def bench_iproute_setns(plumber: Plumber, n: int) -> Timing:
    """The same endpoints with pyroute2's IPRoute in the entered namespace (the old Plumber)."""
    from pyroute2 import IPRoute

    names = plumber.naming
    with entered(plumber.host_netns), IPRoute() as host:
        bridge = host.link_lookup(ifname=plumber.bridge)[0]
    start = time.perf_counter()
    for i in range(n):
        spec = _spec(i)
        ns_name, host_if = names.netns(spec.key), names.host_ifname(spec.key)
        create_netns(ns_name)
        with entered(plumber.host_netns), IPRoute() as host:
            fd = os.open(netns_path(ns_name), os.O_RDONLY)
            try:
                host.link("add", ifname=host_if, kind="veth", master=bridge, state="up",
                          peer={"ifname": "eth0", "net_ns_fd": fd})
            finally:
                os.close(fd)
        with entered(ns_name), IPRoute() as ns:
            ns.link("set", index=1, state="up")
            eth0 = ns.link("get", ifname="eth0")[0]["index"]
            address, prefixlen = spec.ipv4.split("/")
            ns.addr("add", index=eth0, address=address, prefixlen=int(prefixlen))
            ns.link("set", index=eth0, state="up")
            ns.route("replace", dst="0.0.0.0/0", gateway=spec.gateway4, oif=eth0,
                     family=socket.AF_INET)
    created = time.perf_counter()
    for i in range(n):
        key = _spec(i).key
        with entered(plumber.host_netns), IPRoute() as host:
            found = host.link_lookup(ifname=names.host_ifname(key))
            if found:
                host.link("del", index=found[0])
        remove_netns(names.netns(key))
    done = time.perf_counter()
    return Timing("setns + IPRoute", (created - start) * 1e3 / n, (done - created) * 1e3 / n)


def bench_netns_objects(plumber: Plumber, n: int) -> Timing:
    """The same endpoints as Plumber.ensure_endpoint makes, via NetNS objects."""
    from pyroute2 import NetNS, netns

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
        benches: list[Callable[[Plumber, int], Timing]] = [bench_setns, bench_setns_batch]
        if HAVE_PYROUTE2:
            benches += [bench_iproute_setns, bench_netns_objects]
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


def import_times(runs: int) -> str:
    """Best wall time of ``python -c 'import X'`` per module, less a bare interpreter's."""
    modules = ["stockade.netlink", "stockade.net.rtnl", "stockade.net.plumber"]
    if HAVE_PYROUTE2:
        modules.append("pyroute2")

    def best(code: str) -> float:
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            times.append(time.perf_counter() - start)
        return min(times) * 1e3

    bare = best("pass")
    lines = [f"import in a fresh interpreter, best of {runs}, ms above `python -c pass` "
             f"({bare:.1f} ms)"]
    for module in modules:
        lines.append(f"  {module:<24}{best(f'import {module}') - bare:>8.1f}")
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
    parser.add_argument("--imports", type=int, default=20,
                        help="runs per import measurement (default 20)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/plumbing.py needs root (network namespaces)", file=sys.stderr)
        return 2
    # SIGTERM as an exception, so that run()'s cleanup also happens when killed.
    signal.signal(signal.SIGTERM, _terminate(os.getpid()))
    print(import_times(args.imports))
    print(render(run(args.n, args.rounds), args.n, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
