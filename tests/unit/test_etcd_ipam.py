"""Addresses across hosts (etcd/ipam.py): blocks of one pool claimed with
compare-and-swap, so hosts racing for blocks never share one; addresses only from a
host's own blocks; reclaiming a gone host's blocks."""

from __future__ import annotations

import ipaddress
import json
import threading
from typing import Any

import pytest
from tests.support.etcd import EtcdServer

from stockade.errors import BlockNeeded, NetError
from stockade.etcd.datastore import _holders_in
from stockade.etcd.ipam import BlockIndex, BlockIpam, BlockReturns, Blocks, open_ipam, reclaim
from stockade.net.ipam import Ipam


def test_addresses_come_from_the_claimed_blocks_only() -> None:
    claimed: list[str] = []
    blocks = iter(["10.244.0.0/30", "10.244.0.8/30"])

    def claim() -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        claimed.append(next(blocks))
        return ipaddress.ip_network(claimed[-1])

    ipam = BlockIpam("10.244.0.0/16", claim=claim)
    assert ipam.gateway_interface == "10.244.0.1/16"  # the pool's, on every host
    got = [ipam.allocate(f"o{i}") for i in range(4)]
    # 10.244.0.0 (network) and .1 (gateway) are never handed out; .2, .3, then a block.
    assert got == ["10.244.0.2/16", "10.244.0.3/16", "10.244.0.8/16", "10.244.0.9/16"]
    assert claimed == ["10.244.0.0/30", "10.244.0.8/30"]
    assert ipam.allocate("o1") == "10.244.0.3/16"  # the same owner, the same address
    copy = BlockIpam.from_dict(ipam.to_dict())
    assert copy.blocks == ipam.blocks and copy.address_of("o2") == "10.244.0.8/16"
    # A block's every address is usable (the pool's network and gateway excepted).
    assert [copy.allocate("o4"), copy.allocate("o5")] == ["10.244.0.10/16", "10.244.0.11/16"]
    with pytest.raises(NetError):
        copy.allocate("more")  # full, and a copy claims nothing


def test_the_block_of_an_address_and_its_host() -> None:
    """Blocks of any length, as etcd lists them; an address outside the pool (or of
    another family, or not one) is no block's; one in the pool but in no listed block
    is said apart."""
    index = BlockIndex(ipaddress.ip_network("10.244.0.0/16"), {
        "10.244.0.64/26": "a", "10.244.1.0/24": "b", "not-a-block": "x",
        "fd00::/64": "v6", "10.9.0.0/26": "outside", "10.244.2.0/26": ""})
    assert index.holder("10.244.0.64") == ("10.244.0.64/26", "a")
    assert index.holder("10.244.0.127") == ("10.244.0.64/26", "a")
    assert index.holder("10.244.1.200") == ("10.244.1.0/24", "b")
    assert index.holder("10.244.0.128") == ("", "")
    assert index.holder("10.244.0.3") == ("", "")
    assert index.holder("10.244.2.1") == ("", "")  # a record naming no host
    for ip in ("10.9.0.5", "192.168.1.1", "fd00::1", "garbage", ""):
        assert index.holder(ip) is None, ip


def test_the_holders_of_addresses_in_changed_blocks() -> None:
    """Found by walking the blocks' addresses or the holders, whichever is smaller: the
    same keys either way."""
    holders = {"10.244.0.5": "x/a", "10.244.0.70": "x/b", "10.244.1.9": "x/c",
               "fd00::5": "x/d"}
    small = {"10.244.0.0/30", "10.244.0.4/30"}  # 8 addresses: walked
    assert _holders_in(holders, small) == {"x/a"}
    big = {"10.244.0.0/25", "not-a-block"}  # 128 addresses, 4 holders: holders walked
    assert _holders_in(holders, big) == {"x/a", "x/b"}
    assert _holders_in(holders, set()) == set()


def test_a_pool_asked_not_to_claim_says_which_claim_it_needs() -> None:
    """The agent allocates with ``claim=False`` under its lock; a full pool raises
    BlockNeeded and gives the claim to make with the lock let go, then adopts it."""
    claims: list[int] = []

    def claim() -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        claims.append(1)
        return ipaddress.ip_network("10.244.0.8/30")

    ipam = BlockIpam("10.244.0.0/16", blocks=["10.244.0.0/30"],
                     returning=["10.244.0.8/30"], claim=claim)
    assert ipam.block_claim() is None  # room left: .2 and .3
    assert [ipam.allocate("a", claim=False), ipam.allocate("b", claim=False)] == [
        "10.244.0.2/16", "10.244.0.3/16"]
    with pytest.raises(BlockNeeded):
        ipam.allocate("c", claim=False)
    assert ipam.address_of("c") is None and not claims
    needed = ipam.block_claim()
    assert needed is not None
    ipam.adopt(needed())
    # Claimed again after it was given back: no longer returning, handed out of.
    assert ipam.returning == [] and [str(b) for b in ipam.blocks] == [
        "10.244.0.0/30", "10.244.0.8/30"]
    assert ipam.allocate("c", claim=False) == "10.244.0.8/16"
    assert ipam.block_claim() is None
    assert BlockIpam("10.244.0.0/16").block_claim() is None  # a copy's: no claimer
    with pytest.raises(NetError, match="does not hand out addresses by blocks"):
        Ipam("10.9.0.0/24").adopt(ipaddress.ip_network("10.9.0.0/26"))


def test_a_copy_still_claims_and_a_restore_keeps_the_blocks(
        caplog: pytest.LogCaptureFixture) -> None:
    """The agent changes its pool on a copy and keeps the copy (a CNI DEL), and a
    snapshot restore takes its allocations: both stay etcd's block pool."""
    blocks = iter(["10.244.0.64/30", "10.244.0.128/30"])
    ipam = BlockIpam("10.244.0.0/16", blocks=["10.244.0.4/30"],
                     claim=lambda: ipaddress.ip_network(next(blocks)))
    assert [ipam.allocate("a"), ipam.allocate("b")] == ["10.244.0.4/16", "10.244.0.5/16"]
    snapshot = ipam.to_dict()
    copy = ipam.copy()
    assert isinstance(copy, BlockIpam) and copy.to_dict() == ipam.to_dict()
    copy.release("a")
    assert ipam.address_of("a") == "10.244.0.4/16"  # apart from the original
    got = [copy.allocate(f"n{i}") for i in range(5)]
    assert got[3:] == ["10.244.0.64/16", "10.244.0.65/16"]  # full: a block claimed
    # A restore: the snapshot's allocations, the blocks and claimer of now.
    back = copy.restored(snapshot)
    assert isinstance(back, BlockIpam)
    assert [str(b) for b in back.blocks] == ["10.244.0.4/30", "10.244.0.64/30"]
    assert back.address_of("a") == "10.244.0.4/16" and back.address_of("n0") is None
    more = [back.allocate(f"m{i}") for i in range(6)]
    # Never from outside this host's blocks (a plain pool's lowest is 10.244.0.2).
    assert more == ["10.244.0.6/16", "10.244.0.7/16", "10.244.0.64/16", "10.244.0.65/16",
                    "10.244.0.66/16", "10.244.0.67/16"]
    assert back.allocate("m6") == "10.244.0.128/16"  # then a block claimed
    assert "outside this host's address blocks" not in caplog.text
    # An address of the snapshot in no block of this host's: kept, and said.
    astray = copy.restored({**snapshot, "allocated": {"10.244.9.9": "old"}})
    assert astray.address_of("old") == "10.244.9.9/16"
    assert "outside this host's address blocks" in caplog.text
    with pytest.raises(NetError, match=r"snapshot's address pool is 10\.9\.0\.0/16"):
        copy.restored({**snapshot, "subnet": "10.9.0.0/16", "gateway": "10.9.0.1",
                       "allocated": {}})


def test_hosts_racing_for_blocks_never_share_one(etcd: EtcdServer) -> None:
    with etcd.client() as c:
        first = open_ipam(Blocks(c, "/s", "h0"), "10.200.0.0/20", None)
        assert str(first.subnet) == "10.200.0.0/20"
        # A later host with another --subnet uses the cluster's.
        assert str(open_ipam(Blocks(c, "/s", "hx"), "10.9.0.0/16", None).subnet) == \
            "10.200.0.0/20"
        got: dict[str, list[str]] = {}

        def host(name: str) -> None:
            ipam = open_ipam(Blocks(c, "/s", name), "10.200.0.0/20", None)
            got[name] = [ipam.allocate(f"{name}-{i}") for i in range(100)]

        threads = [threading.Thread(target=host, args=(f"h{i}",)) for i in range(1, 5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        every = [a for addrs in got.values() for a in addrs]
        assert len(every) == 400 and len(set(every)) == 400  # never one address twice
        owned = Blocks(c, "/s", "").owned()
        assert sorted(set(owned.values())) == ["h1", "h2", "h3", "h4"]
        for name, addrs in got.items():
            mine = [b for b, h in owned.items() if h == name]
            assert all(any(ipaddress.ip_address(a.split("/")[0]) in b for b in mine)
                       for a in addrs)
        # A restarted host finds its blocks again.
        again = open_ipam(Blocks(c, "/s", "h1"), "10.200.0.0/20", None)
        assert {str(b) for b in again.blocks} == {str(b) for b, h in owned.items()
                                                  if h == "h1"}
        # Reclaiming a gone host frees its blocks, and only its.
        c.put("/s/hosts/h2", '{"address": "192.0.2.2"}')
        published = {"metadata": {"annotations": {"stockade.io/owner": "cni"}}}
        for key, node, doc in (("x/a", "h2", published), ("x/b", "h2", {}),
                               ("x/c", "h1", published), ("x/d", "h2", "not json")):
            c.put(f"/s/pods/{key}", doc if isinstance(doc, str) else json.dumps(
                {**doc, "spec": {"nodeName": node}}))
        freed = reclaim(c, "/s", "h2")
        assert len(freed) == sum(1 for h in owned.values() if h == "h2") and freed
        after = Blocks(c, "/s", "").owned()
        assert "h2" not in after.values() and len(after) == len(owned) - len(freed)
        assert c.get("/s/hosts/h2") is None
        # The Pods h2's agent published go with it (their addresses are in the freed
        # blocks); others stay.
        assert [kv.key for kv in c.list_prefix("/s/pods/")[1]] == [
            "/s/pods/x/b", "/s/pods/x/c", "/s/pods/x/d"]


class _Service:
    """What BlockReturns uses of the agent's service: its lock, its pool, its commit."""

    def __init__(self, ipam: BlockIpam) -> None:
        self.lock = threading.Lock()
        self.ipam = ipam
        self.committed: list[dict[str, Any]] = []

        self.synced = 0  # commits on disk (durable)

    def commit(self, changes: list[Any], *, sync: bool, meta: dict[str, Any],
               durable: bool) -> int:
        assert not changes and not sync and not durable and self.lock.locked()
        self.committed.append(meta["ipam"])
        return len(self.committed)

    def durable(self) -> None:
        assert not self.lock.locked()  # the fsync is not made under the lock
        self.synced = len(self.committed)


def _in(address: str, block: str) -> bool:
    return ipaddress.ip_address(address.split("/")[0]) in ipaddress.ip_network(block)


def test_empty_blocks_go_back_to_the_pool_after_their_grace(etcd: EtcdServer) -> None:
    """A block empty for the grace is taken out of the host's pool (stored as returning),
    then deleted in etcd (compared to be the host's); the last block stays; etcd away
    keeps it returning, never handed out of, until a later round; a restart remembers."""
    with etcd.client() as c:
        c.put("/s/ipam/blocks/10.244.0.0-26", '{"host": "other"}')
        blocks = Blocks(c, "/s", "h1")
        svc = _Service(open_ipam(blocks, "10.244.0.0/16", None))
        got = [svc.ipam.allocate(f"p{i}") for i in range(130)]  # three blocks of 64
        mine = [str(b) for b in svc.ipam.blocks]
        assert mine == ["10.244.0.64/26", "10.244.0.128/26", "10.244.0.192/26"]
        returns = BlockReturns(blocks, grace=10.0)
        returns.service = svc
        asked = blocks.give_back

        def give_back(block: Any) -> bool:
            assert svc.synced == len(svc.committed)  # taken out on disk before etcd is asked
            return asked(block)

        blocks.give_back = give_back  # type: ignore[method-assign]
        assert returns.run_once(0.0) == []  # nothing empty
        with pytest.raises(NetError, match="still has addresses"):
            svc.ipam.copy().take_out([ipaddress.ip_network(mine[1])])
        # The third block emptied: given back only once empty for the grace.
        for i, a in enumerate(got):
            if _in(a, mine[2]):
                svc.ipam.release(f"p{i}")
        assert returns.run_once(100.0) == [] and returns.run_once(109.0) == []
        assert [str(b) for b in returns.run_once(110.0)] == [mine[2]]
        assert [str(b) for b in svc.ipam.blocks] == mine[:2] and svc.ipam.returning == []
        assert svc.committed[-2]["returning"] == [mine[2]]  # stored before etcd was asked
        assert "returning" not in svc.committed[-1] and svc.synced == len(svc.committed)
        assert set(Blocks(c, "/s", "").owned().values()) == {"other", "h1"}
        assert len(blocks.mine()) == 2
        # A block emptied while etcd is away: taken out, kept returning, not handed out of.
        for i, a in enumerate(got):
            if _in(a, mine[1]):
                svc.ipam.release(f"p{i}")
        returns.run_once(200.0)
        etcd.stop()
        with pytest.raises(NetError):
            returns.run_once(210.0)
        assert [str(b) for b in svc.ipam.returning] == [mine[1]]
        assert [str(b) for b in svc.ipam.blocks] == mine[:1]
        # The first block is full: no address of the returning one, a claim is tried.
        with pytest.raises(NetError, match="cannot claim"):
            svc.ipam.allocate("new")
        # A restart: the stored state still keeps the block out of use.
        saved = svc.committed[-1]
        etcd.start()
        with etcd.client() as c2:
            again = open_ipam(Blocks(c2, "/s", "h1"), "10.244.0.0/16", saved)
            assert [str(b) for b in again.blocks] == mine[:1]
            assert [str(b) for b in again.returning] == [mine[1]]
            svc.ipam = again
            returns.blocks = Blocks(c2, "/s", "h1")
            assert [str(b) for b in returns.run_once(220.0)] == [mine[1]]
            assert svc.ipam.returning == [] and len(returns.blocks.mine()) == 1
            # The last block stays, empty or not.
            for i in range(130):
                svc.ipam.release(f"p{i}")
            assert returns.run_once(300.0) == [] and returns.run_once(1000.0) == []
            assert [str(b) for b in svc.ipam.blocks] == mine[:1]
            # A block given back is claimed again when needed (the lowest free).
            more = [svc.ipam.allocate(f"q{i}") for i in range(65)]
            assert _in(more[-1], "10.244.0.128/26")
            # One no longer this host's in etcd (reclaimed, taken) is just dropped.
            svc.ipam.release("q64")
            c2.put("/s/ipam/blocks/10.244.0.128-26", '{"host": "h9"}')
            assert [str(b) for b in returns.run_once(2000.0)] == []
            assert [str(b) for b in returns.run_once(2010.0)] == ["10.244.0.128/26"]
            assert Blocks(c2, "/s", "").owned()[ipaddress.ip_network("10.244.0.128/26")] \
                == "h9"
