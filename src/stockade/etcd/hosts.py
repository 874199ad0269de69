"""Routes between hosts: every host routes the others' address blocks to them.

Layout under the prefix::

    <prefix>/hosts/NAME                     {"address": "192.0.2.11"}   (--host-address)
    <prefix>/ipam/blocks/10.244.0.64-26     {"host": "NAME"}            (etcd/ipam.py)

Each agent given ``--host-address`` registers it, watches hosts and blocks (the same
list-then-watch as the datastore's objects) and keeps, in its network namespace, one
route per block of another host via that host's address
(``ip route replace 10.244.0.64/26 via 192.0.2.12``), removing the routes of blocks
that moved or were reclaimed. Endpoints see the whole pool on their link (their
address has the pool's prefix length), so the host's bridge answers ARP for the
addresses it routes elsewhere (``proxy_arp``, without the proxy delay) and the host
forwards (``ip_forward``). Policy needs nothing more: egress is enforced on the
source host, ingress on the destination host, both from the same etcd state.

Routes go through iproute2 (``ip``), a dependency of the setup already.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import subprocess
import threading
from collections.abc import Callable, Mapping
from typing import Any

from stockade.etcd.client import EtcdClient, EtcdError, b64, prefix_end
from stockade.etcd.ipam import BlockIndex, parse_block
from stockade.etcd.nodes import NodeClaim
from stockade.etcd.watch import EtcdReflector
from stockade.kube.client import Resource
from stockade.kube.reflector import ReflectorConfig
from stockade.model.cidr import next_hop_problem
from stockade.net.namespace import entered
from stockade.net.sysctl import write_sysctl

log = logging.getLogger("stockade.etcd")

HOSTS = Resource("stockade.io", "v1", "hosts", "Host", False)
BLOCKS = Resource("stockade.io", "v1", "ipam/blocks", "Block", False)
RECHECK = 5.0  # seconds between checks of the routes and the bridge's settings


class _Sink:
    def __init__(self, owner: HostRoutes, what: str) -> None:
        self.owner, self.what = owner, what

    def replace(self, items: list[dict[str, Any]], resource_version: str) -> None:
        self.owner.replace(self.what, items)

    def event(self, type: str, obj: dict[str, Any]) -> None:
        self.owner.event(self.what, type, obj)


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


def _address_of(value: bytes) -> str:
    try:
        doc = json.loads(value)
    except ValueError:
        return ""
    return str(doc.get("address") or "") if isinstance(doc, dict) else ""


def _same_address(a: str, b: str | None) -> bool:
    if not a or not b:
        return False
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


class HostRoutes:
    def __init__(self, client: EtcdClient, prefix: str, node: str, *, address: str | None,
                 netns: str | None, bridge: str, pool: str,
                 config: ReflectorConfig | None = None,
                 node_claim: NodeClaim | None = None) -> None:
        self.client = client
        self.node_claim = node_claim  # held before the host's address is written
        self.prefix = prefix
        self.node = node
        self.address = address
        self.netns = netns
        self.bridge = bridge
        self.pool = ipaddress.ip_network(pool)
        self.blocks: dict[str, str] = {}  # block (CIDR) -> host
        self._index: BlockIndex | None = None  # of `blocks`, built when first asked
        # Told the blocks that changed hands (came, went, moved), after each list and
        # event, outside this object's lock: the feed examines the Pods in them again.
        self.on_blocks: Callable[[set[str]], None] | None = None
        self.hosts: dict[str, str] = {}  # host -> address
        self.installed: dict[str, str] = {}  # block -> via, as programmed
        self.listed: set[str] = set()
        self.registered = address is None
        self.address_of: str = ""  # the host whose record has this host's address
        self.register_error = ""
        self.unroutable: dict[str, str] = {}  # host -> why its record is no next hop
        self.failed: dict[str, str] = {}  # block -> why the kernel refused its route
        self.error = ""
        self._cleaned = False  # stale routes of an earlier agent removed
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.reflectors = [
            EtcdReflector(client, BLOCKS, _Sink(self, "blocks"), prefix=prefix, config=config),
            EtcdReflector(client, HOSTS, _Sink(self, "hosts"), prefix=prefix, config=config)]

    # ---- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        for r in self.reflectors:
            r.start()
        self._thread = threading.Thread(target=self._loop, name="etcd-routes", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for r in self.reflectors:
            r.stop(timeout=0.5)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"address": self.address or "", "registered": self.registered,
                    "hosts": dict(sorted(self.hosts.items())),
                    "routes": dict(sorted(self.installed.items())),
                    "unroutable": dict(sorted(self.unroutable.items())),
                    "addressOf": self.address_of,
                    "error": "; ".join(e for e in (self.register_error, self.error) if e),
                    # The feed's first sync waits for the blocks' list: why it waits shows.
                    "resources": {r.res.plural: r.status.to_dict() for r in self.reflectors}}

    # ---- the sinks --------------------------------------------------------------------

    def replace(self, what: str, items: list[dict[str, Any]]) -> None:
        changed: set[str] = set()
        with self._lock:
            table: dict[str, str] = {}
            for obj in items:
                k, v = self._entry(what, obj)
                if k:
                    table[k] = v
            if what == "blocks":
                changed = {b for b in self.blocks.keys() | table.keys()
                           if self.blocks.get(b) != table.get(b)}
                self.blocks, self._index = table, None
            else:
                self.hosts = table
            self.listed.add(what)
        self._wake.set()
        if what == "blocks" and self.on_blocks is not None:
            self.on_blocks(changed)

    def event(self, what: str, type: str, obj: dict[str, Any]) -> None:
        with self._lock:
            k, v = self._entry(what, obj)
            table = self.blocks if what == "blocks" else self.hosts
            if not k:
                return
            before = table.get(k)
            if type == "DELETED":
                table.pop(k, None)
            else:
                table[k] = v
            moved = what == "blocks" and table.get(k) != before
            if moved:
                self._index = None
        self._wake.set()
        if moved and self.on_blocks is not None:
            self.on_blocks({k})

    @property
    def blocks_listed(self) -> bool:
        with self._lock:
            return "blocks" in self.listed

    def block_of(self, ip: str) -> tuple[str, str] | None:
        """(block, host) of an address of the pool (("", ""): in no host's block); None
        outside the pool."""
        with self._lock:
            if self._index is None:
                self._index = BlockIndex(self.pool, self.blocks)
            return self._index.holder(ip)

    def _entry(self, what: str, obj: Mapping[str, Any]) -> tuple[str, str]:
        name = _name(obj)
        if what == "blocks":
            block = parse_block(name)
            return (str(block), str(obj.get("host") or "")) if block is not None else ("", "")
        return name, str(obj.get("address") or "")

    # ---- the loop ---------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.registered:
                self._register()
            try:
                self.reconcile()
            except Exception as e:  # the next round tries again
                self.error = f"{type(e).__name__}: {e}"
                log.warning("routes between hosts: %s", e)
            self._wake.wait(RECHECK if self.registered or self.address_of else 1.0)
            self._wake.clear()

    def _register(self) -> None:
        """This host's record, unless another host's has its address: first come, first
        routed to. Two hosts given one --host-address would otherwise each have the
        other hosts route its blocks to the one machine that has it."""
        hosts = f"{self.prefix}/hosts/"
        try:
            if self.node_claim is not None:
                self.node_claim.ensure()
            header, kvs = self.client.list_prefix(hosts)
            other = next((kv.key[len(hosts):] for kv in kvs if kv.key != hosts + self.node
                          and _same_address(_address_of(kv.value), self.address)), "")
            if other:
                # This host's own record of an address it no longer has (--host-address
                # changed) would keep its blocks routed there: it goes.
                mine = next((kv for kv in kvs if kv.key == hosts + self.node), None)
                if mine is not None:
                    self.client.txn([{"key": b64(mine.key), "target": "MOD",
                                      "result": "EQUAL",
                                      "mod_revision": str(mine.mod_revision)}],
                                    [{"request_delete_range": {"key": b64(mine.key)}}])
                if self.address_of != other:
                    log.error("this host's address is another host's in etcd: not "
                              "registered, and its blocks not routed to by the others",
                              extra={"fields": {"address": self.address, "host": other}})
                self.address_of = other
                self.register_error = (
                    f"cannot register this host: its address {self.address} is in the "
                    f"record of host {other!r} in etcd (two hosts given one "
                    f"--host-address?); if {other!r} is gone: python -m "
                    f"stockade.etcd.ipam reclaim {other}")
                return
            # Put only if no host record changed since the list: another registering
            # with this address meanwhile is seen on the next round.
            unchanged = {"key": b64(hosts), "range_end": b64(prefix_end(hosts)),
                         "target": "MOD", "result": "LESS",
                         "mod_revision": str(header.revision + 1)}
            put = {"request_put": {"key": b64(hosts + self.node),
                                   "value": b64(json.dumps({"address": self.address}))}}
            if not self.client.txn([unchanged], [put]).succeeded:
                self._wake.set()
                return
        except EtcdError as e:
            self.register_error = f"cannot register this host: {e}"
            return
        self.registered, self.address_of, self.register_error = True, "", ""
        log.info("host registered in etcd", extra={"fields": {
            "host": self.node, "address": self.address}})

    def desired(self) -> dict[str, str]:
        """Each block of another host and the address to route it via; a host whose
        record cannot be a next hop (anything may write it) is left out, and said
        (`unroutable`)."""
        with self._lock:
            want: dict[str, str] = {}
            unroutable: dict[str, str] = {}
            for block, host in self.blocks.items():
                via = self.hosts.get(host)
                if host == self.node or not via:
                    continue
                problem = next_hop_problem(via) or (
                    f"{via} is this host's own address (two hosts given one "
                    "--host-address?)" if via == self.address else "")
                if problem:
                    unroutable[host] = problem
                else:
                    want[block] = via
            for host, problem in sorted(unroutable.items()):
                if self.unroutable.get(host) != problem:
                    log.error("another host's record cannot be routed to; its blocks "
                              "are not", extra={"fields": {"host": host,
                                                           "problem": problem}})
            self.unroutable = unroutable
            return want

    def reconcile(self) -> None:
        """The kernel's routes as etcd says (only once both lists are in), and the
        bridge's settings once the bridge exists."""
        with self._lock:
            want = self.desired() if self.listed == {"blocks", "hosts"} else {}
        if self.address or want:
            # Several hosts: forward and answer ARP for the others' endpoints (node-wide
            # settings, left alone on a single host).
            self._bridge()
        with self._lock:
            if self.listed != {"blocks", "hosts"}:
                return
            first = not self._cleaned
        if first:
            self._clean_stale(want)
            self._cleaned = True
        failed: dict[str, str] = {}
        for block, via in sorted(want.items()):
            if self.installed.get(block) != via:
                # Each route on its own: one the kernel refuses (a next hop it cannot
                # reach) leaves the others' as they should be.
                try:
                    self._ip("route", "replace", block, "via", via)
                except RuntimeError as e:
                    failed[block] = str(e)
                    continue
                self.installed[block] = via
                log.info("route to another host's block", extra={"fields": {
                    "block": block, "via": via}})
        for block in sorted(set(self.installed) - set(want)):
            self._ip("route", "del", block, check=False)
            del self.installed[block]
            log.info("route removed", extra={"fields": {"block": block}})
        for block, why in sorted(failed.items()):
            if self.failed.get(block) != why:
                log.warning("route to another host's block refused", extra={"fields": {
                    "block": block, "error": why}})
        self.failed = failed
        self.error = "; ".join(f"{b}: {why}" for b, why in sorted(failed.items()))

    def _clean_stale(self, want: Mapping[str, str]) -> None:
        """After a restart: routes to blocks of the pool via a gateway that etcd no
        longer gives are an earlier agent's, and go."""
        out = self._ip("-j", "route", "show", check=False)
        try:
            routes = json.loads(out or "[]")
        except ValueError:
            return
        for r in routes:
            dst, gw = str(r.get("dst") or ""), r.get("gateway")
            try:
                net = ipaddress.ip_network(dst)
            except ValueError:
                continue
            if gw and net.version == self.pool.version and net.subnet_of(
                    self.pool) and net != self.pool and dst not in want:  # type: ignore[arg-type]
                self._ip("route", "del", dst, check=False)
                log.info("stale route removed", extra={"fields": {"block": dst}})

    def _bridge(self) -> None:
        with entered(self.netns):
            exists = bool(self.bridge) and os.path.isdir(
                f"/proc/sys/net/ipv4/conf/{self.bridge}")
        write_sysctl("net.ipv4.ip_forward", 1, self.netns)
        if exists and self.bridge:
            write_sysctl(f"net.ipv4.conf.{self.bridge}.proxy_arp", 1, self.netns)
            write_sysctl(f"net.ipv4.neigh.{self.bridge}.proxy_delay", 0, self.netns)

    def _ip(self, *args: str, check: bool = True) -> str:
        cmd = ["ip", *(("-n", self.netns) if self.netns else ()), *args]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
        return out.stdout
