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
  never hand out one address.
* **Addresses stay local.** Which address of a block which container has is the
  host's own business (the local store keeps it, as before); etcd holds only who owns
  each block.
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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from stockade.errors import NetError
from stockade.etcd.client import EtcdClient, EtcdError, b64, unb64
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


class BlockIpam(Ipam):
    """The pool's addresses, handed out only from blocks this host claimed.

    The same interface as :class:`Ipam` (the agent's container manager and CNI
    operations use it unchanged); ``claim`` is asked for a new block when the
    claimed ones are full (None: no claimer, e.g. a copy).
    """

    def __init__(self, subnet: str, gateway: str | None = None,
                 allocated: Mapping[str, str] | None = None, *,
                 blocks: Sequence[str] = (),
                 claim: Callable[[], Network] | None = None) -> None:
        self.blocks: list[Network] = []
        for b in blocks:
            net = ipaddress.ip_network(b, strict=True)
            if net not in self.blocks:
                self.blocks.append(net)
        self.claim = claim
        super().__init__(subnet, gateway, allocated)

    def allocate(self, owner: str) -> str:
        known = self.address_of(owner)
        if known is not None:
            return known
        for block in list(self.blocks):
            free = self._free_in(block)
            if free is not None:
                return self._take(owner, free)
        if self.claim is None:
            raise NetError(f"no free address in this host's blocks of {self.subnet}")
        block = self.claim()
        if block not in self.blocks:
            self.blocks.append(block)
        free = self._free_in(block)
        if free is None:
            raise NetError(f"block {block} has no usable address")
        return self._take(owner, free)

    def _free_in(self, block: Network) -> Address | None:
        first = max(int(block.network_address), self._first)
        last = min(int(block.broadcast_address), self._last)
        for value in range(first, last + 1):
            candidate = ipaddress.ip_address(value)
            if candidate != self.gateway and candidate not in self._by_address:
                return candidate
        return None

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "blocks": [str(b) for b in self.blocks]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BlockIpam:
        base = Ipam.from_dict(data)
        return cls(str(base.subnet), str(base.gateway),
                   {k: v for k, v in base.to_dict()["allocated"].items()},
                   blocks=[str(b) for b in data.get("blocks") or ()])


class Blocks:
    """This host's side of the pool in etcd: the pool, its claims, claiming more."""

    def __init__(self, client: EtcdClient, prefix: str, host: str) -> None:
        self.client = client
        self.prefix = prefix
        self.host = host

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

    def claim(self, pool: Network, size: int) -> Network:
        """The lowest free block of the pool, claimed for this host (compare-and-swap)."""
        try:
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
    if saved and str(saved.get("subnet")) == subnet:
        allocated = {str(k): str(v) for k, v in dict(saved.get("allocated") or {}).items()}
        for b in saved.get("blocks") or ():
            if b not in mine:
                log.warning("a saved address block is no longer this host's in etcd",
                            extra={"fields": {"block": b}})
    pool = ipaddress.ip_network(subnet)
    ipam = BlockIpam(subnet, None, allocated, blocks=mine)
    ipam.claim = lambda: blocks.claim(pool, size)
    return ipam


def reclaim(client: EtcdClient, prefix: str, host: str) -> list[str]:
    """Delete the blocks ``host`` owns (each compared to be still its) and its host
    record; the blocks freed."""
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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stockade.etcd.ipam",
                                description="address blocks of the etcd datastore")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reclaim", help="free the address blocks of a host that is gone")
    r.add_argument("host")
    s = sub.add_parser("show", help="every claimed block and its host")
    for q in (r, s):
        q.add_argument("--etcd-endpoints", nargs="+", required=True, metavar="URL")
        q.add_argument("--etcd-prefix", default="/stockade")
    args = p.parse_args(argv)
    from stockade.etcd.datastore import normalize_prefix

    prefix = normalize_prefix(args.etcd_prefix)
    with EtcdClient(args.etcd_endpoints) as client:
        try:
            if args.cmd == "reclaim":
                freed = reclaim(client, prefix, args.host)
                print(f"{args.host}: {len(freed)} block(s) freed"
                      + (f": {', '.join(freed)}" if freed else ""))
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
