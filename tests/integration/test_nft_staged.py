"""A large delta in parts (plan.staged, NftDatapath._stage) against the real kernel.

The parts add only what nothing reaches; the last transaction switches packets over.
So the kernel ends as one transaction leaves it, packets meet the old ruleset until
the switch, a refused part leaves nothing behind, and parts a crash left are removed
by the next agent.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from stockade.compile.ir import Ruleset
from stockade.compile.lower import compile_cluster
from stockade.compile.nft import Table
from stockade.compile.plan import plan, staged
from stockade.datapath.nft import NftDatapath
from stockade.errors import DataplaneError

from .clusters import PORTS, allow_only, cluster, probe
from .clusters import servers as servers  # the fixture

pytestmark = pytest.mark.privileged

# a admits only b; then only c (each in parts: every set and chain its own part).
OLD = [("b", "a", PORTS[0]), ("c", "a", PORTS[0])]


@pytest.fixture
def staging(trio) -> Iterator[NftDatapath]:
    dp = NftDatapath(netns=trio.host_netns, owner=False)
    dp.stage_part = 1
    yield dp


def _objects(netns: str, table: str) -> dict[str, set[str]]:
    """The table's chains and sets, by kind, as the kernel lists them."""
    out = subprocess.run(["ip", "netns", "exec", netns, "nft", "-j", "list", "table", "inet",
                          table], check=True, capture_output=True, text=True).stdout
    got: dict[str, set[str]] = {"chain": set(), "set": set(), "map": set()}
    for item in json.loads(out)["nftables"]:
        ((kind, body),) = item.items()
        if kind in got:
            got[kind].add(body["name"])
    return got


def test_a_delta_in_parts_enforces_as_one_transaction(trio, staging, servers) -> None:
    one = NftDatapath(Table("stkone"), netns=trio.host_netns, owner=False)
    staging.apply(Ruleset())  # the table (the first apply of a datapath reads the kernel)
    try:
        for rs in (compile_cluster(cluster(trio, allow_only("a", "b"))),
                   compile_cluster(cluster(trio, allow_only("a", "c"),
                                           allow_only("b", "c")))):
            before = staging._generation
            staging.apply(rs)
            one.apply(rs)
            parts, _ = staged(plan(Ruleset(), rs), 1)
            assert len(parts) >= 3
            assert staging._generation - before > 1, "the delta did not go in parts"
            assert _objects(trio.host_netns, staging.table.name) == _objects(
                trio.host_netns, "stkone")
            assert staging.apply(rs, verify=True).empty and staging.last_drift is None
        assert probe(trio, OLD) == {("b", "a", "TCP/80"): False, ("c", "a", "TCP/80"): True}
    finally:
        one.remove()


def test_packets_meet_the_old_ruleset_until_the_switch(trio, staging, servers) -> None:
    """The parts in, the last transaction not (as a crash would leave it): the old
    ruleset decides; the next agent removes what the parts added and applies anew."""
    old = compile_cluster(cluster(trio, allow_only("a", "b")))
    new = compile_cluster(cluster(trio, allow_only("a", "c")))
    staging.apply(old)
    held = _objects(trio.host_netns, staging.table.name)
    parts, _ = staged(plan(old, new), 1)
    assert parts and staging._stage(parts)
    added = _objects(trio.host_netns, staging.table.name)
    assert added["chain"] > held["chain"] and added["set"] > held["set"]
    assert probe(trio, OLD) == {("b", "a", "TCP/80"): True, ("c", "a", "TCP/80"): False}
    again = NftDatapath(netns=trio.host_netns, owner=False)  # the next agent
    again.apply(old)
    assert _objects(trio.host_netns, staging.table.name) == held
    again.apply(new)
    assert probe(trio, OLD) == {("b", "a", "TCP/80"): False, ("c", "a", "TCP/80"): True}


def test_a_refused_part_leaves_nothing_behind(trio, staging, servers, caplog) -> None:
    """A set of another type under the name of one in the second part: the kernel
    refuses that part, the first part is taken out again, and libnftables (tried next)
    is refused too. The old ruleset stays, whole, and nothing of the new is left."""
    old = compile_cluster(cluster(trio))
    new = compile_cluster(cluster(trio, allow_only("a", "b"), allow_only("c", "a")))
    staging.apply(old)
    parts, _ = staged(plan(old, new), 1)
    assert len(parts) >= 2 and parts[1].add_sets
    squatter = parts[1].add_sets[0].name
    subprocess.run(["ip", "netns", "exec", trio.host_netns, "nft", "add", "set", "inet",
                    staging.table.name, squatter, "{ type inet_service; }"], check=True)
    held = _objects(trio.host_netns, staging.table.name)
    with pytest.raises(DataplaneError):
        staging.apply(new)
    assert "a staged part of the ruleset update failed" in caplog.text
    assert _objects(trio.host_netns, staging.table.name) == held
    assert probe(trio, OLD) == {("b", "a", "TCP/80"): True, ("c", "a", "TCP/80"): True}
    subprocess.run(["ip", "netns", "exec", trio.host_netns, "nft", "delete", "set", "inet",
                    staging.table.name, squatter], check=True)
    staging.apply(new, verify=True)
    assert probe(trio, OLD) == {("b", "a", "TCP/80"): True, ("c", "a", "TCP/80"): False}


def test_a_refused_switch_takes_the_parts_out(trio, staging, servers, caplog) -> None:
    """Every part in, then the kernel refuses the last transaction: a chain the new
    ruleset no longer uses cannot be deleted while another chain jumps to it (a rule
    put there by hand). The parts are taken out again, libnftables (tried next) is
    refused too, and the old ruleset stays, whole, with nothing of the new left."""
    old = compile_cluster(cluster(trio, allow_only("a", "b")))
    new = compile_cluster(cluster(trio, allow_only("a", "c")))
    staging.apply(old)
    parts, rest = staged(plan(old, new), 1)
    gone = sorted(rest.del_chains)
    assert parts and gone
    nft = ["ip", "netns", "exec", trio.host_netns, "nft"]
    subprocess.run([*nft, "add", "chain", "inet", staging.table.name, "squat"], check=True)
    subprocess.run([*nft, "add", "rule", "inet", staging.table.name, "squat", "jump", gone[0]],
                   check=True)
    held = _objects(trio.host_netns, staging.table.name)
    before = staging._generation
    with pytest.raises(DataplaneError):
        staging.apply(new)
    assert staging._generation - before >= len(parts) + 1, "the parts did not go in"
    assert "the raw ruleset update was refused" in caplog.text
    assert _objects(trio.host_netns, staging.table.name) == held
    assert probe(trio, OLD) == {("b", "a", "TCP/80"): True, ("c", "a", "TCP/80"): False}
    subprocess.run([*nft, "flush", "chain", "inet", staging.table.name, "squat"], check=True)
    subprocess.run([*nft, "delete", "chain", "inet", staging.table.name, "squat"], check=True)
    staging.apply(new, verify=True)
    assert probe(trio, OLD) == {("b", "a", "TCP/80"): False, ("c", "a", "TCP/80"): True}
