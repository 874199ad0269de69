"""The table is the security boundary: tampering is found by what the kernel does, and an
owned table cannot be tampered with at all.

Each test works in its own host namespace (see conftest). Tests that tamper with
the table use a datapath without ownership (`owner=False`), as the kernel would
refuse them otherwise; the ownership tests check that refusal, and that an owned
table outlives its owner and is claimed by the next one.
"""

from __future__ import annotations

import errno
import json
import pickle
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from tests.property.strategies import DEFAULT, clusters
from tests.support import shared

from stockade.cli.conformance import load_cases
from stockade.compile.ir import ADDR, AddressSet, Ruleset
from stockade.compile.lower import compile_cluster
from stockade.compile.nft import Table
from stockade.datapath.monitor import TableEvent
from stockade.datapath.nfnetlink import NftablesRefused, element_messages
from stockade.datapath.nfrules import set_message
from stockade.datapath.nft import OWNER_ON, OWNER_UNSUPPORTED, NftDatapath
from stockade.errors import DataplaneError
from stockade.model.cluster import Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.labels import Labels
from stockade.model.policy import INGRESS, NetworkPolicy, Peer, PolicyPort
from stockade.model.policy import Rule as PRule
from stockade.model.selector import Selector
from stockade.probe.client import Probe, run_probes
from stockade.probe.launcher import ProbeServer
from stockade.probe.protocol import Port, Protocol

pytestmark = pytest.mark.privileged

CORPUS = shared("conformance")
TCP80, TCP81 = Port(80, Protocol.TCP), Port(81, Protocol.TCP)


def _cluster(trio) -> Cluster:
    """a admits b on TCP/80 and nothing else; b and c are not isolated. Their ports are
    guarded (so the guard's table is there, owned with the policy's)."""
    ns = Namespace("x", Labels({"kubernetes.io/metadata.name": "x"}))
    eps = tuple(Endpoint("x", n, Labels({"pod": n}), (att.address4, att.address6),
                         (ContainerPort(80, "TCP", "http"),), port=att.host_ifname,
                         mac=att.mac)
                for n, att in (("a", trio.a), ("b", trio.b), ("c", trio.c)))
    pol = NetworkPolicy("x", "a-from-b", Selector(Labels({"pod": "a"})), ingress=(
        PRule((PolicyPort("TCP", 80),), (Peer(pod_selector=Selector(Labels({"pod": "b"}))),)),),
        policy_types=(INGRESS,))
    return Cluster((ns,), eps, (pol,))


@pytest.fixture
def servers(trio) -> Iterator[ProbeServer]:
    with ProbeServer({a.netns: [TCP80, TCP81] for a in trio.all}) as server:
        yield server


def _probe(trio, *pairs: tuple[str, str]) -> dict[tuple[str, str], bool]:
    atts = {a.key.split("/")[1]: a for a in trio.all}
    probes = [Probe(s, atts[s].netns, d, atts[d].address4, TCP80) for s, d in pairs]
    return {(v.probe.src, v.probe.dst): v.allowed for v in run_probes(probes, timeout=0.8)}


EXPECTED = {("b", "a"): True, ("c", "a"): False, ("a", "c"): True}


def _nft(netns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["ip", "netns", "exec", netns, "nft", *args], capture_output=True,
                         text=True)
    if check:
        assert out.returncode == 0, (args, out.stderr)
    return out


def _listing(netns: str) -> dict[str, list[dict[str, object]]]:
    doc = json.loads(_nft(netns, "-j", "-a", "list", "table", "inet", "stockade").stdout)
    out: dict[str, list[dict[str, object]]] = {}
    for item in doc["nftables"]:
        ((kind, body),) = item.items()
        out.setdefault(kind, []).append(body)
    return out


def _in_sync(dp: NftDatapath, rs: Ruleset) -> None:
    kt = dp.read_table(rs.chains)
    assert kt is not None and kt.drift == [] and not kt.needs_repair, kt.drift if kt else None
    assert dp.diff(rs).empty


# ---- tampering, found by behaviour and repaired ------------------------------------------

def test_a_rule_replaced_by_accept_keeping_its_comment_is_repaired(trio, servers) -> None:
    dp = NftDatapath(netns=trio.host_netns, owner=False)
    rs = compile_cluster(_cluster(trio))
    dp.apply(rs)
    assert _probe(trio, *EXPECTED) == EXPECTED
    (chain,) = rs.chains
    deny = [r for r in _listing(trio.host_netns)["rule"] if r["chain"] == chain][-1]
    assert deny["comment"] == "default deny #ingress"
    _nft(trio.host_netns, "replace", "rule", "inet", "stockade", chain, "handle",
         str(deny["handle"]), "accept", "comment", f'"{deny["comment"]}"')
    assert _probe(trio, ("c", "a")) == {("c", "a"): True}  # the hole is real
    assert dp.apply(rs).empty  # without verifying, the last apply is trusted
    delta = dp.apply(rs, verify=True)
    assert [c.name for c in delta.replace_chains] == [chain]
    assert dp.last_drift is not None and dp.last_drift_details == [f"chain {chain}: rules differ"]
    assert _probe(trio, *EXPECTED) == EXPECTED
    _in_sync(dp, rs)


def test_the_base_chain_policy_and_hook_are_repaired(trio, servers) -> None:
    dp = NftDatapath(netns=trio.host_netns, owner=False)
    rs = compile_cluster(_cluster(trio))
    dp.apply(rs)
    _nft(trio.host_netns, "add chain inet stockade forward { type filter hook forward "
         "priority 0; policy drop; }")
    # a -> c: neither side isolated, so no rule accepts it and the policy drops it
    assert _probe(trio, ("a", "c")) == {("a", "c"): False}
    dp.apply(rs, verify=True)
    assert dp.last_drift_details == ["base chain definition differs"]
    assert _probe(trio, *EXPECTED) == EXPECTED
    _in_sync(dp, rs)
    _nft(trio.host_netns, "flush chain inet stockade forward")
    _nft(trio.host_netns, "delete chain inet stockade forward")
    _nft(trio.host_netns, "add chain inet stockade forward { type filter hook forward "
         "priority 100; policy accept; }")
    assert _probe(trio, ("c", "a")) == {("c", "a"): True}
    dp.apply(rs, verify=True)
    assert dp.last_drift_details == ["base chain definition differs"]
    fwd = next(c for c in _listing(trio.host_netns)["chain"] if c["name"] == "forward")
    assert (fwd["hook"], fwd["prio"], fwd["policy"]) == ("forward", 0, "accept")
    assert _probe(trio, *EXPECTED) == EXPECTED
    _in_sync(dp, rs)


def test_foreign_chains_rules_sets_maps_and_objects_are_removed(trio, servers) -> None:
    dp = NftDatapath(netns=trio.host_netns, owner=False)
    rs = compile_cluster(_cluster(trio))
    dp.apply(rs)
    (chain,) = rs.chains
    host = trio.host_netns
    for cmd in ("add set inet stockade evilset { type ipv4_addr; }",
                f"add element inet stockade evilset {{ {trio.c.address4} }}",
                "add map inet stockade evilmap { type ipv4_addr : verdict; }",
                "add counter inet stockade evilcounter",
                "add chain inet stockade evil",
                "add rule inet stockade evil ip saddr @evilset counter name evilcounter accept",
                "insert rule inet stockade forward jump evil",
                f"insert rule inet stockade {chain} ip saddr @evilset accept",
                "add chain inet stockade evilbase { type filter hook forward priority -5; }",
                "add rule inet stockade evilbase counter"):
        _nft(host, cmd)
    assert _probe(trio, ("c", "a")) == {("c", "a"): True}
    dp.apply(rs, verify=True)
    assert sorted(dp.last_drift_details) == sorted([
        "base chain rules differ", f"chain {chain}: rules differ", "foreign set evilset",
        "foreign chain evil", "foreign chain evilbase", "foreign map evilmap",
        "foreign counter evilcounter"])
    listing = _listing(host)
    names = {b["name"] for kind in ("chain", "set", "map", "counter")
             for b in listing.get(kind, [])}
    assert not {n for n in names if "evil" in str(n)}
    assert _probe(trio, *EXPECTED) == EXPECTED
    _in_sync(dp, rs)
    assert dp.skeleton_intact()


def test_a_verdict_map_entry_that_accepts_is_rewritten(trio, servers) -> None:
    dp = NftDatapath(netns=trio.host_netns, owner=False)
    rs = compile_cluster(_cluster(trio))
    dp.apply(rs)
    a = trio.a.address4
    _nft(trio.host_netns, f"delete element inet stockade ingress4 {{ {a} }}")
    _nft(trio.host_netns, f"add element inet stockade ingress4 {{ {a} : accept }}")
    assert _probe(trio, ("c", "a")) == {("c", "a"): True}
    dp.apply(rs, verify=True)
    assert dp.last_drift_details == [f"map ingress4: {a} does not jump to a chain"]
    assert _probe(trio, *EXPECTED) == EXPECTED
    _in_sync(dp, rs)


def test_a_dormant_table_is_woken_after_its_repair(trio, servers) -> None:
    dp = NftDatapath(netns=trio.host_netns, owner=False)
    rs = compile_cluster(_cluster(trio))
    dp.apply(rs)
    _nft(trio.host_netns, "add table inet stockade { flags dormant; }")
    assert _probe(trio, ("c", "a")) == {("c", "a"): True}
    dp.apply(rs, verify=True)
    assert dp.last_drift is not None
    assert _probe(trio, *EXPECTED) == EXPECTED
    _in_sync(dp, rs)


def test_a_deleted_table_is_restored_from_the_event_without_reading(trio, servers) -> None:
    dp = NftDatapath(netns=trio.host_netns, owner=False)
    rs = compile_cluster(_cluster(trio))
    dp.apply(rs)
    heard: list[TableEvent] = []
    changed = threading.Event()
    mon = dp.monitor(changed.set)
    inner = mon.on_event
    assert inner is not None
    mon.on_event = lambda e: (heard.append(e), inner(e))  # type: ignore[func-returns-value]
    mon.start()
    try:
        _nft(trio.host_netns, "delete table inet stockade")
        assert changed.wait(5)
    finally:
        mon.stop()
    assert [e.deleted for e in heard] == [True]
    snap = dp.snapshot(rs.chains)
    assert snap.table is None  # not read: the event said there is nothing
    read, dp.read_table = dp.read_table, None  # type: ignore[assignment]
    try:
        dp.apply(rs, verify=snap)
    finally:
        dp.read_table = read  # type: ignore[method-assign]
    assert dp.last_drift_details == ["table missing"]
    assert _probe(trio, *EXPECTED) == EXPECTED
    _in_sync(dp, rs)


def test_the_kernel_names_no_policy_so_a_renamed_one_is_in_sync(trio) -> None:
    dp = NftDatapath(netns=trio.host_netns, owner=False)
    cluster = _cluster(trio)
    dp.apply(compile_cluster(cluster))
    (pol,) = cluster.policies
    renamed = cluster.with_policies([NetworkPolicy(
        pol.namespace, "another-name", pol.pod_selector, ingress=pol.ingress,
        policy_types=pol.policy_types)])
    # what `stockade dataplane diff` does: a new process, nothing remembered
    fresh = NftDatapath(netns=trio.host_netns)
    assert fresh.diff(compile_cluster(renamed)).empty and fresh.skeleton_intact()
    assert "a-from-b" not in dp.show()


# ---- right after any apply, a verifying read finds nothing to repair ---------------------

def test_no_drift_after_applying_every_conformance_ruleset(host_netns: str) -> None:
    if not CORPUS.is_dir():
        pytest.fail(f"the conformance corpus is missing at {CORPUS}")
    cases = load_cases([str(CORPUS)])
    assert len(cases) > 40
    for table in (Table(), Table(log_group=7, log_rate=1)):
        dp = NftDatapath(table, netns=host_netns, owner=False)
        for case in cases:
            rs = compile_cluster(case.cluster)
            dp.apply(rs)  # a delta from the previous case
            _in_sync(dp, rs)
            assert dp.apply(rs, verify=True).empty and dp.last_drift is None, case.id
            fresh = NftDatapath(table, netns=host_netns, owner=False)  # nothing remembered
            _in_sync(fresh, rs)
        dp.remove()


@pytest.fixture(scope="module")
def scratch_netns() -> Iterator[str]:
    from stockade.net.namespace import create_netns, remove_netns

    name = f"stkv{__import__('secrets').token_hex(2)}"
    create_netns(name)
    try:
        yield name
    finally:
        remove_netns(name)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster=clusters(DEFAULT, with_policies=True))
def test_no_drift_after_applying_random_rulesets(scratch_netns: str, cluster: Cluster) -> None:
    dp = NftDatapath(Table(log_group=100), netns=scratch_netns, owner=False)
    rs = compile_cluster(cluster)
    dp.apply(rs)
    _in_sync(dp, rs)
    assert dp.apply(rs, verify=True).empty and dp.last_drift is None


# ---- an owned table ----------------------------------------------------------------------

OWNER = """
import pickle, sys
from stockade.datapath.nft import NftDatapath
dp = NftDatapath(netns=sys.argv[1], owner=True)
dp.apply(pickle.loads(bytes.fromhex(sys.argv[2])))
print(dp.owner_status, flush=True)
sys.stdin.readline()
"""


def test_an_owned_table_refuses_others_outlives_its_owner_and_is_claimed(trio,
                                                                         servers) -> None:
    host = trio.host_netns
    rs = compile_cluster(_cluster(trio))
    (chain,) = rs.chains
    owner = subprocess.Popen([sys.executable, "-c", OWNER, host, pickle.dumps(rs).hex()],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == OWNER_ON
        for cmd in ("add chain inet stockade evil", f"flush chain inet stockade {chain}",
                    "delete table inet stockade",
                    "add table inet stockade { flags dormant; }",
                    "delete table bridge stockade", "flush chain bridge stockade guard"):
            out = _nft(host, *cmd.split(), check=False)
            assert out.returncode != 0 and "Operation not permitted" in out.stderr, cmd
        assert _probe(trio, *EXPECTED) == EXPECTED
        other = NftDatapath(netns=host, owner=True)
        with pytest.raises(DataplaneError, match=r"owned by process \d+"):
            other.apply(rs)
        with pytest.raises(DataplaneError, match="owned by"):
            NftDatapath(netns=host).remove()
        assert NftDatapath(netns=host).diff(rs).empty  # reading is for everyone
        assert owner.stdin is not None
        owner.stdin.close()
        assert owner.wait(10) == 0
    finally:
        owner.kill()
        owner.wait()
    # The owner is gone: the table stays, enforcing, and anybody may change it now.
    assert _probe(trio, *EXPECTED) == EXPECTED
    _in_sync(NftDatapath(netns=host), rs)  # an orphan (flags persist) is in sync
    _nft(host, "flush", "chain", "inet", "stockade", chain)
    assert _probe(trio, ("c", "a")) == {("c", "a"): True}
    heir = NftDatapath(netns=host, owner=True)
    delta = heir.apply(rs)  # claims the orphan, reads it back, repairs
    assert heir.owned and heir.owner_status == OWNER_ON
    assert [c.name for c in delta.replace_chains] == [chain]
    assert _probe(trio, *EXPECTED) == EXPECTED
    out = _nft(host, "flush", "chain", "inet", "stockade", chain, check=False)
    assert "Operation not permitted" in out.stderr
    _in_sync(heir, rs)
    # element deltas go over the owner's socket too
    more = Ruleset(rs.sets, rs.chains, {**rs.ingress, "10.244.9.9": chain}, rs.egress)
    assert heir.apply(more).set_map and heir.diff(more).empty
    heir.remove()
    assert "stockade" not in _nft(host, "list", "tables").stdout


def test_a_table_nobody_owns_is_replaced_by_an_owned_one(trio, servers) -> None:
    host = trio.host_netns
    rs = compile_cluster(_cluster(trio))
    NftDatapath(netns=host, owner=False).apply(rs)
    dp = NftDatapath(netns=host, owner=True)
    # after every step of the replacement, the policy is in force
    steps: list[dict[tuple[str, str], bool]] = []
    run, transact = dp._run, dp._elements.transact

    def probed_run(cmds: list[dict[str, object]], what: str) -> str:
        out = run(cmds, what)
        steps.append(_probe(trio, *EXPECTED))
        return out

    def probed_transact(body: list[tuple[int, int, bytes]], what: str) -> None:
        transact(body, what)
        steps.append(_probe(trio, *EXPECTED))

    dp._run = probed_run  # type: ignore[method-assign]
    dp._elements.transact = probed_transact  # type: ignore[method-assign]
    dp.apply(rs)
    dp._run, dp._elements.transact = run, transact  # type: ignore[method-assign]
    assert len(steps) >= 4 and all(seen == EXPECTED for seen in steps), steps
    assert dp.owned
    assert sorted(_nft(host, "list", "tables").stdout.splitlines()) == [
        "table bridge stockade", "table inet stockade"]  # the policy and the guard
    for family in ("inet", "bridge"):
        out = _nft(host, "delete", "table", family, "stockade", check=False)
        assert "Operation not permitted" in out.stderr, family
    assert _probe(trio, *EXPECTED) == EXPECTED
    _in_sync(dp, rs)
    assert dp.apply(rs, verify=True).empty and dp.last_drift is None


def test_without_persistent_tables_the_table_is_not_owned_at_all(trio, caplog) -> None:
    """An owned table that is not persistent would vanish with its owner: fail open."""
    host = trio.host_netns
    dp = NftDatapath(netns=host, owner=True)

    def refuse(body: object, what: str) -> None:
        raise NftablesRefused(f"{what}: refused", errno.EOPNOTSUPP)  # a kernel before 6.9

    dp._elements.transact = refuse  # type: ignore[method-assign]
    with caplog.at_level("WARNING", logger="stockade.dataplane"):
        dp.check()
    assert dp.owner_status == OWNER_UNSUPPORTED and not dp.owner_active
    assert "will not be owned" in caplog.text
    rs = compile_cluster(_cluster(trio))
    dp.apply(rs)
    assert not dp.owned
    _nft(host, "add", "chain", "inet", "stockade", "someone-elses")  # not owned: allowed
    dp.apply(rs, verify=True)
    assert dp.last_drift_details == ["foreign chain someone-elses"]
    _in_sync(dp, rs)


# ---- a raw batch the kernel refuses changes nothing --------------------------------------

def test_a_refused_raw_batch_changes_nothing_and_says_so(host_netns: str) -> None:
    """A batch acks its last message only: a refusal in the middle still raises (the
    kernel answers it before sendmsg returns) and nothing of the batch is applied."""
    dp = NftDatapath(netns=host_netns, owner=False)
    dp.apply(Ruleset())
    table = dp.table
    first = AddressSet("s4-first", 4, ADDR, frozenset())
    last = AddressSet("s4-last", 4, ADDR, frozenset())
    batch = [set_message(table, first, 1),
             *element_messages(table.name, "s4-missing", ["10.0.0.1"]),  # no such set
             set_message(table, last, 2)]
    with pytest.raises(NftablesRefused) as refused:
        dp._elements.transact(batch, "the test batch")
    assert refused.value.errno == errno.ENOENT
    listed = subprocess.run(["ip", "netns", "exec", host_netns, "nft", "list", "table",
                             "inet", table.name], capture_output=True, text=True,
                            check=True).stdout
    assert "s4-first" not in listed and "s4-last" not in listed
    dp._elements.transact([set_message(table, first, 1), set_message(table, last, 2)],
                          "the good batch")  # the socket reads no stale answer after it
    listed = subprocess.run(["ip", "netns", "exec", host_netns, "nft", "list", "table",
                             "inet", table.name], capture_output=True, text=True,
                            check=True).stdout
    assert "s4-first" in listed and "s4-last" in listed
