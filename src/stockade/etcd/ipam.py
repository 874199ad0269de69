"""Addresses across hosts: each host claims blocks of a cluster-wide pool in etcd.

Layout under the prefix::

    <prefix>/ipam/pool                      {"subnet": "10.244.0.0/16", "block": 26}
    <prefix>/ipam/blocks/10.244.0.64-26     {"host": "host-1"}

* **One pool for every host.** The first agent stores its ``--subnet`` (default
  10.244.0.0/16) as the pool; every later agent uses the stored one (and says so when
  its own ``--subnet`` differs). Every host's bridge carries the pool's gateway with
  the pool's prefix length, so an endpoint sees the whole pool on its link; the host
  answers ARP for the addresses it routes elsewhere (proxy ARP, etcd/hosts.py).
* **Blocks claimed with compare-and-swap.** A host that has no free address left in
  its blocks claims the lowest free block with a transaction that creates the
  block's key only if it does not exist (``create_revision == 0``): two hosts racing
  for one block cannot both get it, the loser takes the next. Two hosts therefore
  never hand out one address. The agent claims outside its lock: an ADD that finds
  the blocks full lets go of it, claims (one claim at a time; etcd's round trips,
  up to its timeout when etcd is slow or away), and allocates again, so a slow etcd
  holds up only the ADDs that need a block, not the agent's other operations.
* **Addresses stay local.** Which address of a block which container has is the
  host's own business (the local store keeps it, as before); etcd holds only who owns
  each block.
* **Empty blocks go back to the pool.** A block this host has left without any
  address for ``--empty-block-grace`` seconds (600 by default; 0: never) is given
  back, the host's last block excepted. In two steps, so that no address is ever in
  a block another host can claim: the block is first taken out of the host's own
  pool (no address is handed out of it any more; the agent's store remembers it as
  *returning*), then its key is deleted in etcd, compared to be still this host's.
  A step that fails (etcd away, the agent killed between the two) is taken again
  later, and after a restart; the other hosts drop their route to it on the watch.
* **Reclaiming a gone host's blocks is explicit**:
  ``python -m stockade.etcd.ipam reclaim HOST --etcd-endpoints URL…`` deletes its
  blocks and its host record (only blocks still owned by HOST, compared in one
  transaction); a host that is merely unreachable must not lose its addresses.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from stockade.errors import BlockNeeded, NetError
from stockade.etcd.client import EtcdClient, EtcdError, b64, unb64
from stockade.etcd.nodes import NodeClaim
from stockade.net.ipam import Address, Ipam, Network

log = logging.getLogger("stockade.etcd")

BLOCK_PREFIXLEN = 26  # 64 addresses a block (IPv4)


def block_name(block: Network) -> str:
    return f"{block.network_address}-{block.prefixlen}"


def parse_block(name: str) -> Network | None:
    try:
        return ipaddress.ip_network(name.replace("-", "/"), strict=True)
    except ValueError:
        return None


class BlockIndex:
    """Which host holds the block of the pool an address lies in, as etcd lists the
    blocks (CIDR -> host). Pure; built once per change of the blocks, asked per Pod."""

    def __init__(self, pool: Network, blocks: Mapping[str, str]) -> None:
        self.pool = pool
        self._bits = pool.max_prefixlen
        self._by: dict[tuple[int, int], tuple[str, str]] = {}
        for cidr, host in blocks.items():
            try:
                net = ipaddress.ip_network(cidr)
            except ValueError:
                continue
            if not host:  # a record naming no host: no host's block
                continue
            if net.version == pool.version:
                top = int(net.network_address) >> (self._bits - net.prefixlen)
                self._by[(net.prefixlen, top)] = (str(net), host)
        self._lengths = sorted({n for n, _ in self._by})

    def holder(self, ip: str) -> tuple[str, str] | None:
        """(block, host) of `ip`; ("", "") when no block of the pool holds it; None when
        it is not in the pool (an address no host hands out)."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        if addr.version != self.pool.version or addr not in self.pool:
            return None
        value = int(addr)
        for n in self._lengths:
            found = self._by.get((n, value >> (self._bits - n)))
            if found is not None:
                return found
        return ("", "")


def _networks(texts: Sequence[str], leave_out: Sequence[Network] = ()) -> list[Network]:
    """The blocks named, each once, in order, less those in `leave_out`."""
    out: list[Network] = []
    for text in texts:
        net = ipaddress.ip_network(text, strict=True)
        if net not in out and net not in leave_out:
            out.append(net)
    return out


class BlockIpam(Ipam):
    """The pool's addresses, handed out only from blocks this host claimed.

    The same interface as :class:`Ipam` (the agent's container manager and CNI
    operations use it unchanged); ``claim`` is asked for a new block when the
    claimed ones are full (None: no claimer, e.g. a copy).
    """

    def __init__(self, subnet: str, gateway: str | None = None,
                 allocated: Mapping[str, str] | None = None, *,
                 blocks: Sequence[str] = (), returning: Sequence[str] = (),
                 claim: Callable[[], Network] | None = None) -> None:
        # Blocks being given back: never handed out of again (see BlockReturns).
        self.returning: list[Network] = _networks(returning)
        self.blocks: list[Network] = _networks(blocks, self.returning)
        self.claim = claim
        super().__init__(subnet, gateway, allocated)

    def allocate(self, owner: str, *, claim: bool = True) -> str:
        known = self.address_of(owner)
        if known is not None:
            return known
        free = self._free()
        if free is not None:
            return self._take(owner, free)
        if self.claim is None:
            raise NetError(f"no free address in this host's blocks of {self.subnet}")
        if not claim:
            raise BlockNeeded(f"this host's address blocks of {self.subnet} are full")
        block = self.claim()
        self.adopt(block)
        free = self._free_in(block)
        if free is None:
            raise NetError(f"block {block} has no usable address")
        return self._take(owner, free)

    def block_claim(self) -> Callable[[], Network] | None:
        return self.claim if self.claim is not None and self._free() is None else None

    def adopt(self, block: Network) -> None:
        if block in self.returning:  # deleted in etcd meanwhile, and claimed again
            self.returning.remove(block)
        if block not in self.blocks:
            self.blocks.append(block)

    def _free(self) -> Address | None:
        """The lowest free address of the first block that has one."""
        for block in list(self.blocks):
            free = self._free_in(block)
            if free is not None:
                return free
        return None

    def _free_in(self, block: Network) -> Address | None:
        first = max(int(block.network_address), self._first)
        last = min(int(block.broadcast_address), self._last)
        for value in range(first, last + 1):
            candidate = ipaddress.ip_address(value)
            if candidate != self.gateway and candidate not in self._by_address:
                return candidate
        return None

    def empty_blocks(self) -> list[Network]:
        """This host's blocks without any allocated address, in the order claimed
        (linear in addresses and blocks: it runs under the agent's lock)."""
        lengths = {b.prefixlen for b in self.blocks}
        used = {(n, int(a) >> (a.max_prefixlen - n))
                for a in self.allocated_addresses() for n in lengths}
        return [b for b in self.blocks if (b.prefixlen, int(b.network_address) >> (
            b.max_prefixlen - b.prefixlen)) not in used]

    def take_out(self, blocks: Sequence[Network]) -> None:
        """Stop handing out addresses of empty ``blocks``: they are to be given back."""
        empty = self.empty_blocks()
        for b in blocks:
            if b in self.blocks and b not in empty:
                raise NetError(f"block {b} still has addresses allocated")
            if b in self.blocks:
                self.blocks.remove(b)
                self.returning.append(b)

    def returned(self, blocks: Sequence[Network]) -> None:
        """``blocks`` are no longer this host's in etcd."""
        self.returning = [b for b in self.returning if b not in blocks]

    def to_dict(self) -> dict[str, Any]:
        out = {**super().to_dict(), "blocks": [str(b) for b in self.blocks]}
        if self.returning:
            out["returning"] = [str(b) for b in self.returning]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BlockIpam:
        base = Ipam.from_dict(data)
        return cls(str(base.subnet), str(base.gateway),
                   {k: v for k, v in base.to_dict()["allocated"].items()},
                   blocks=[str(b) for b in data.get("blocks") or ()],
                   returning=[str(b) for b in data.get("returning") or ()])

    def copy(self) -> BlockIpam:
        out = BlockIpam.from_dict(self.to_dict())
        out.claim = self.claim  # a copy the agent keeps must still claim blocks
        return out

    def restored(self, data: Mapping[str, Any]) -> BlockIpam:
        """This host's blocks and claimer with a snapshot's allocations.

        The blocks are etcd's, not the snapshot's: a block given up or reclaimed since
        may be another host's now, and a plain pool would hand out addresses from
        every host's blocks. The snapshot must be of this pool (NetError if not)."""
        base = Ipam.from_dict(data)
        if base.subnet != self.subnet:
            raise NetError(f"the snapshot's address pool is {base.subnet}, this cluster's "
                           f"is {self.subnet} (etcd's)")
        out = BlockIpam(str(self.subnet), str(self.gateway), base.to_dict()["allocated"],
                        blocks=[str(b) for b in self.blocks],
                        returning=[str(b) for b in self.returning], claim=self.claim)
        # Kept (the endpoints have them), but no longer in this host's blocks: another
        # host may hand them out too. Said, as a restart from such a store says it.
        astray = sorted(str(a) for a in out.allocated_addresses()
                        if not any(a in b for b in out.blocks))
        if astray:
            log.warning("restored addresses outside this host's address blocks",
                        extra={"fields": {"addresses": ", ".join(astray[:16]),
                                          "count": len(astray)}})
        return out


class Blocks:
    """This host's side of the pool in etcd: the pool, its claims, claiming more."""

    def __init__(self, client: EtcdClient, prefix: str, host: str,
                 node_claim: NodeClaim | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.host = host
        self.node_claim = node_claim  # held before a block is claimed or given back

    @property
    def pool_key(self) -> str:
        return f"{self.prefix}/ipam/pool"

    @property
    def blocks_prefix(self) -> str:
        return f"{self.prefix}/ipam/blocks/"

    def pool(self, wanted: str, block: int = BLOCK_PREFIXLEN) -> tuple[str, int]:
        """The cluster's pool: the stored one, else ``wanted``, stored now (first host)."""
        value = json.dumps({"subnet": wanted, "block": block})
        put = {"request_put": {"key": b64(self.pool_key), "value": b64(value)}}
        absent = {"key": b64(self.pool_key), "target": "CREATE", "result": "EQUAL",
                  "create_revision": "0"}
        result = self.client.txn([absent], [put], [{"request_range": {
            "key": b64(self.pool_key)}}])
        if result.succeeded:
            log.info("address pool stored in etcd", extra={"fields": {
                "subnet": wanted, "block": block}})
            return wanted, block
        kvs = (result.responses[0].get("response_range") or {}).get("kvs") or []
        stored = json.loads(unb64(kvs[0].get("value"))) if kvs else {}
        subnet, size = str(stored.get("subnet") or wanted), int(stored.get("block") or block)
        if subnet != wanted:
            log.warning("the cluster's address pool in etcd differs from --subnet; using "
                        "etcd's", extra={"fields": {"etcd": subnet, "subnet": wanted}})
        return subnet, size

    def owned(self) -> dict[Network, str]:
        """Every claimed block and its host."""
        _, kvs = self.client.list_prefix(self.blocks_prefix)
        out: dict[Network, str] = {}
        for kv in kvs:
            block = parse_block(kv.key[len(self.blocks_prefix):])
            if block is None:
                continue
            try:
                host = str(json.loads(kv.value).get("host") or "")
            except (ValueError, AttributeError):
                host = ""
            out[block] = host
        return out

    def mine(self) -> list[Network]:
        return sorted((b for b, h in self.owned().items() if h == self.host),
                      key=lambda b: int(b.network_address))

    def give_back(self, block: Network) -> bool:
        """Delete ``block``'s key if it is still this host's (compared in the same
        transaction). True once it is not this host's in etcd (deleted now, or before);
        False if it changed meanwhile (asked again later). EtcdError if unreachable."""
        if self.node_claim is not None:
            self.node_claim.ensure()
        key = self.blocks_prefix + block_name(block)
        kv = self.client.get(key)
        if kv is None:
            return True
        try:
            owner = json.loads(kv.value).get("host")
        except (ValueError, AttributeError):
            owner = None
        if owner != self.host:
            return True
        result = self.client.txn([{"key": b64(key), "target": "MOD", "result": "EQUAL",
                                   "mod_revision": str(kv.mod_revision)}],
                                 [{"request_delete_range": {"key": b64(key)}}])
        if result.succeeded:
            log.info("address block given back", extra={"fields": {
                "block": str(block), "host": self.host}})
        return bool(result.succeeded)

    def claim(self, pool: Network, size: int) -> Network:
        """The lowest free block of the pool, claimed for this host (compare-and-swap)."""
        try:
            if self.node_claim is not None:
                self.node_claim.ensure()  # two agents of one name: one host's blocks
            taken = set(self.owned())
            for block in pool.subnets(new_prefix=size):
                if block in taken:
                    continue
                key = self.blocks_prefix + block_name(block)
                value = json.dumps({"host": self.host})
                result = self.client.txn(
                    [{"key": b64(key), "target": "CREATE", "result": "EQUAL",
                      "create_revision": "0"}],
                    [{"request_put": {"key": b64(key), "value": b64(value)}}])
                if result.succeeded:
                    log.info("address block claimed", extra={"fields": {
                        "block": str(block), "host": self.host}})
                    return block
                # Another host was first: the next one.
        except EtcdError as e:
            raise NetError(f"cannot claim an address block in etcd: {e}") from None
        raise NetError(f"the address pool {pool} has no free block of /{size} left")


def open_ipam(blocks: Blocks, wanted: str, saved: Mapping[str, Any] | None) -> BlockIpam:
    """The agent's IPAM with etcd: the cluster's pool, this host's blocks (etcd's, and
    the saved ones while etcd is out of reach), and the addresses the local store
    remembers."""
    try:
        subnet, size = blocks.pool(wanted)
        mine = [str(b) for b in blocks.mine()]
    except EtcdError as e:
        # The agent starts anyway (it keeps the kernel's table until the first lists);
        # blocks are claimed when etcd is back and an address is needed.
        if saved:
            ipam = BlockIpam.from_dict(saved)
            subnet, mine = str(ipam.subnet), [str(b) for b in ipam.blocks]
        else:
            subnet, mine = wanted, []
        size = BLOCK_PREFIXLEN
        log.warning("etcd unreachable at start: using the saved address blocks and the "
                    "pool %s", subnet, extra={"fields": {"error": str(e)}})
    allocated: dict[str, str] = {}
    returning: list[str] = []
    if saved and str(saved.get("subnet")) == subnet:
        allocated = {str(k): str(v) for k, v in dict(saved.get("allocated") or {}).items()}
        # Taken out before the agent stopped: given back yet or not, never handed out of.
        returning = [str(b) for b in saved.get("returning") or ()]
        for b in saved.get("blocks") or ():
            if b not in mine:
                log.warning("a saved address block is no longer this host's in etcd",
                            extra={"fields": {"block": b}})
    pool = ipaddress.ip_network(subnet)
    ipam = BlockIpam(subnet, None, allocated, blocks=mine, returning=returning)
    ipam.claim = lambda: blocks.claim(pool, size)
    return ipam


class BlockReturns:
    """Gives back the blocks this host has left empty for ``grace`` seconds (see the
    module doc), from a thread of its own; `run_once` is one round.

    ``service`` is the agent's (its lock, its pool, its commit): the pool is changed
    on a copy, committed to the agent's store, then swapped in, as every change of it.
    """

    def __init__(self, blocks: Blocks, grace: float) -> None:
        self.blocks = blocks
        self.grace = grace
        self.service: Any = None
        self.given: list[str] = []  # given back by this agent, the latest last (at most 64)
        self.error = ""
        self._since: dict[Network, float] = {}  # empty since (monotonic), as first seen
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.grace <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="etcd-blocks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def status(self) -> dict[str, Any]:
        ipam = getattr(self.service, "ipam", None)
        mine = returning = []
        if isinstance(ipam, BlockIpam):
            mine = [str(b) for b in ipam.blocks]
            returning = [str(b) for b in ipam.returning]
        return {"mine": mine, "returning": returning, "givenBack": list(self.given),
                "emptyBlockGrace": self.grace, "error": self.error}

    def _loop(self) -> None:
        # Often enough that a block goes within a few seconds of its grace.
        interval = min(5.0, max(0.2, self.grace / 4))
        while not self._stop.wait(interval):
            try:
                self.run_once(time.monotonic())
                self.error = ""
            except Exception as e:  # the next round tries again
                self.error = f"{type(e).__name__}: {e}"
                log.warning("giving back empty address blocks: %s", e)

    def _swap(self, change: Callable[[BlockIpam], None]) -> BlockIpam:
        """Under the service's lock: ``change`` on a copy of the pool, committed, kept.
        On disk once the caller has let go of the lock and called `durable`."""
        svc = self.service
        pool: BlockIpam = svc.ipam.copy()
        change(pool)
        svc.commit([], sync=False, meta={"ipam": pool.to_dict()}, durable=False)
        svc.ipam = pool
        return pool

    def run_once(self, now: float) -> list[Network]:
        """Take out the blocks empty for ``grace`` (never the last), then give back every
        block taken out; the blocks no longer this host's in etcd."""
        svc = self.service
        if svc is None:
            return []
        with svc.lock:
            ipam = svc.ipam
            if not isinstance(ipam, BlockIpam):
                return []
            empty = ipam.empty_blocks()
            if len(empty) == len(ipam.blocks):
                empty = empty[1:]  # a host keeps one block: its next pod needs no claim
            self._since = {b: self._since.get(b, now) for b in empty}
            due = [b for b, t in self._since.items() if now - t >= self.grace]
            if due:
                ipam = self._swap(lambda pool: pool.take_out(due))
                for b in due:
                    del self._since[b]
            returning = list(ipam.returning)
        if due:
            svc.durable()  # taken out on disk before etcd lets another host claim them
        if not returning:
            return []
        try:
            gone = [b for b in returning if self.blocks.give_back(b)]
        except EtcdError as e:
            raise NetError(f"etcd: {e}") from None  # kept as returning: the next round
        if gone:
            with svc.lock:
                if isinstance(svc.ipam, BlockIpam):
                    self._swap(lambda pool: pool.returned(gone))
            svc.durable()
            self.given = (self.given + [str(b) for b in gone])[-64:]
        return gone


def reclaim(client: EtcdClient, prefix: str, host: str) -> list[str]:
    """Delete the blocks ``host`` owns (each compared to be still its), the Pods its
    agent published for its containers (`remove_published`, first) and its host
    record; the blocks freed.

    The Pods go too: nothing else deletes them once the host is gone, and each holds an
    address of a block freed here, which another host may claim and hand out."""
    remove_published(client, prefix, host)
    b = Blocks(client, prefix, host)
    _, kvs = client.list_prefix(b.blocks_prefix)
    freed: list[str] = []
    for kv in kvs:
        try:
            owner = json.loads(kv.value).get("host")
        except (ValueError, AttributeError):
            continue
        if owner != host:
            continue
        result = client.txn([{"key": b64(kv.key), "target": "MOD", "result": "EQUAL",
                              "mod_revision": str(kv.mod_revision)}],
                            [{"request_delete_range": {"key": b64(kv.key)}}])
        if result.succeeded:
            freed.append(kv.key[len(b.blocks_prefix):].replace("-", "/"))
    client.delete(f"{prefix}/hosts/{host}")
    return freed


def remove_published(client: EtcdClient, prefix: str, host: str) -> list[str]:
    """Delete the Pods an agent of ``host`` published for its CNI and `run` endpoints
    (annotated as such, ``spec.nodeName`` the host; each compared to be unchanged
    since read); their keys."""
    from stockade.agent.records import OWNER_CNI, OWNER_RUN
    from stockade.etcd.datastore import OWNER_ANNOTATION

    pods = f"{prefix}/pods/"
    _, kvs = client.list_prefix(pods)
    gone: list[str] = []
    for kv in kvs:
        try:
            doc = json.loads(kv.value)
        except ValueError:
            continue
        if not isinstance(doc, dict):
            continue
        spec, meta = doc.get("spec"), doc.get("metadata")
        notes = meta.get("annotations") if isinstance(meta, dict) else None
        if not (isinstance(spec, dict) and spec.get("nodeName") == host
                and isinstance(notes, dict)
                and notes.get(OWNER_ANNOTATION) in (OWNER_CNI, OWNER_RUN)):
            continue
        result = client.txn([{"key": b64(kv.key), "target": "MOD", "result": "EQUAL",
                              "mod_revision": str(kv.mod_revision)}],
                            [{"request_delete_range": {"key": b64(kv.key)}}])
        if result.succeeded:
            gone.append(kv.key[len(pods):])
    return gone


def main(argv: Sequence[str] | None = None) -> int:
    from stockade.cli.inputs import etcd_url

    p = argparse.ArgumentParser(prog="python -m stockade.etcd.ipam",
                                description="address blocks of the etcd datastore")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reclaim", help="free the address blocks of a host that is gone")
    r.add_argument("host")
    r.add_argument("--force", action="store_true",
                   help="even while an agent holds the host's name in etcd (its pods "
                        "keep their addresses, which other hosts may then be given, and "
                        "are peers of no other host: their published Pods are deleted)")
    s = sub.add_parser("show", help="every claimed block and its host")
    for q in (r, s):
        q.add_argument("--etcd-endpoints", type=etcd_url, nargs="+", required=True,
                       metavar="URL")
        q.add_argument("--etcd-prefix", default="/stockade")
    args = p.parse_args(argv)
    from stockade.etcd.datastore import normalize_prefix

    prefix = normalize_prefix(args.etcd_prefix)
    with EtcdClient(args.etcd_endpoints) as client:
        try:
            if args.cmd == "reclaim":
                from stockade.etcd.nodes import holder

                alive = holder(client, prefix, args.host)
                if alive is not None and not args.force:
                    print(f"error: an agent holds {args.host!r} in etcd now (pid "
                          f"{alive.get('pid')} on {alive.get('hostname')}): that host is "
                          "not gone; stop its agent first (its claim ends within "
                          "seconds of it), or give --force", file=sys.stderr)
                    return 1
                pods = remove_published(client, prefix, args.host)
                freed = reclaim(client, prefix, args.host)
                print(f"{args.host}: {len(freed)} block(s) freed"
                      + (f": {', '.join(freed)}" if freed else "")
                      + f"; {len(pods)} published Pod(s) deleted")
            else:
                for block, host in sorted(Blocks(client, prefix, "").owned().items(),
                                          key=lambda kv: int(kv[0].network_address)):
                    print(f"{block}\t{host}")
        except EtcdError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
