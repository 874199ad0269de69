"""The nftables datapath against the real kernel, with real packets.

Each test builds endpoints in its own host namespace (see conftest), programs
policies compiled from the model, and checks the kernel: verdicts by probing,
deltas by their size, atomicity by a refused transaction, drift by tampering
(so without an owned table: `owner=False`; see test_nft_integrity.py for more).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.property.strategies import DENSE
from tests.property.tier_strategies import cnp_clusters

import stockade.datapath.nft as nftmod
from stockade.compile.lower import compile_cluster
from stockade.compile.nft import Table
from stockade.datapath.nfrules import encode_plan
from stockade.datapath.nft import NftDatapath
from stockade.errors import DataplaneError
from stockade.model.labels import Labels
from stockade.model.policy import NetworkPolicy, Peer, PolicyPort
from stockade.model.policy import Rule as PRule
from stockade.model.selector import Selector

from . import clusters
from .clusters import A_ONLY_FROM_B, PORTS, allow_only, cluster, denied, probe
from .clusters import servers as servers  # the fixture

pytestmark = pytest.mark.privileged

@pytest.fixture
def datapath(trio) -> Iterator[NftDatapath]:
    dp = NftDatapath(netns=trio.host_netns, owner=False)
    dp.check()
    yield dp


def test_policy_enforced_with_real_packets_v4_and_v6(trio, datapath, servers) -> None:
    rs = compile_cluster(cluster(trio, allow_only("a", "b")))
    datapath.apply(rs)
    for family in (4, 6):
        assert denied(trio, family) == A_ONLY_FROM_B, family


def test_restart_adopts_the_table_without_changes(trio, datapath) -> None:
    rs = compile_cluster(cluster(trio, allow_only("a", "b")))
    first = datapath.apply(rs)
    assert not first.empty
    again = NftDatapath(netns=trio.host_netns)  # a new process would start like this
    assert again.diff(rs).empty
    assert again.apply(rs).empty
    assert again.skeleton_intact()


def test_established_connection_survives_unrelated_change(trio, datapath) -> None:
    with clusters.across_an_unrelated_change(trio, datapath) as (_, delta):
        assert not delta.empty and not delta.del_chains


def test_relabel_moves_an_endpoint_between_sets_only(trio, datapath, servers) -> None:
    pol = allow_only("a", "b")
    pol = NetworkPolicy(pol.namespace, pol.name, pol.pod_selector, ingress=(
        PRule((PolicyPort("TCP", 80),), (Peer(pod_selector=Selector(Labels({"role": "client"}))),)),
    ))
    datapath.apply(compile_cluster(cluster(trio, pol, b={"role": "client"})))
    assert probe(trio, [("b", "a", PORTS[0]), ("c", "a", PORTS[0])]) == {
        ("b", "a", "TCP/80"): True, ("c", "a", "TCP/80"): False}
    delta = datapath.apply(compile_cluster(cluster(trio, pol, c={"role": "client"})))
    # only set elements move: no chain, set or map entry is touched
    assert not delta.add_chains and not delta.del_chains and not delta.add_sets
    assert not delta.set_map and not delta.del_map
    moved = {e for _, els in delta.add_elements for e in els} | {
        e for _, els in delta.del_elements for e in els}
    assert moved == {trio.b.address4, trio.c.address4, trio.b.address6, trio.c.address6}
    assert probe(trio, [("b", "a", PORTS[0]), ("c", "a", PORTS[0])]) == {
        ("b", "a", "TCP/80"): False, ("c", "a", "TCP/80"): True}


def test_refused_transaction_leaves_previous_ruleset(trio, datapath, servers) -> None:
    good = compile_cluster(cluster(trio, allow_only("a", "b")))
    datapath.apply(good)
    before = datapath.show()
    broken = clusters.refused(good, trio.c.address4)
    with pytest.raises(DataplaneError, match="nothing was changed"):
        datapath.apply(broken)
    assert datapath.show() == before
    assert datapath.diff(good).empty
    assert probe(trio, [("c", "a", PORTS[0]), ("b", "a", PORTS[0]), ("a", "c", PORTS[0])]) == {
        ("c", "a", "TCP/80"): False, ("b", "a", "TCP/80"): True, ("a", "c", "TCP/80"): True}


def test_drift_is_seen_and_repaired(trio, datapath, servers) -> None:
    rs = compile_cluster(cluster(trio, allow_only("a", "b")))
    datapath.apply(rs)
    chain = next(iter(rs.chains))
    _nft(trio.host_netns, f"flush chain inet stockade {chain}")
    assert probe(trio, [("c", "a", PORTS[0])]) == {("c", "a", "TCP/80"): True}  # hole
    drift = datapath.diff(rs)
    assert [c.name for c in drift.replace_chains] == [chain]
    assert datapath.apply(rs).empty  # without verify, the last apply is trusted
    assert [c.name for c in datapath.apply(rs, verify=True).replace_chains] == [chain]
    assert datapath.diff(rs).empty
    assert probe(trio, [("c", "a", PORTS[0])]) == {("c", "a", "TCP/80"): False}
    _nft(trio.host_netns, "delete table inet stockade")
    assert not datapath.skeleton_intact()
    datapath.apply(rs, verify=True)
    assert datapath.skeleton_intact() and datapath.diff(rs).empty


def test_foreign_tables_are_left_alone(trio, datapath) -> None:
    _nft(trio.host_netns, "add table inet other")
    _nft(trio.host_netns, "add chain inet other c")
    datapath.apply(compile_cluster(cluster(trio, allow_only("a", "b"))))
    datapath.remove()
    out = _nft_out(trio.host_netns, "list tables")
    assert "table inet other" in out and "stockade" not in out


def test_ipblock_except_and_egress(trio, datapath, servers) -> None:
    datapath.apply(compile_cluster(cluster(trio, clusters.egress_to_block_except_c(trio))))
    assert probe(trio, clusters.EGRESS_PAIRS) == clusters.EGRESS_SEEN


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_raw_deltas_leave_the_kernel_as_libnftables_would(host_netns, monkeypatch,
                                                           data: st.DataObject) -> None:
    """A delta written as raw messages (nfrules) and the same delta through libnftables
    leave tables the kernel lists identically (so the read-back sees no drift), over
    random clusters with tiers, IPv6, named ports, ipBlocks and the denied-flow log."""
    first = compile_cluster(data.draw(cnp_clusters(DENSE, max_cnps=3)))
    second = compile_cluster(data.draw(cnp_clusters(DENSE, max_cnps=3)))
    raw = NftDatapath(Table("rawdelta", log_group=5), netns=host_netns)
    lib = NftDatapath(Table("libdelta", log_group=5), netns=host_netns)
    used: list[bool] = []

    def spy(table: Table, delta: Any, shared: Any = None) -> Any:
        msgs = encode_plan(table, delta, shared)
        used.append(msgs is not None)
        return msgs

    try:
        monkeypatch.setattr(nftmod, "encode_plan", encode_plan)  # the last example's undone
        for dp in (raw, lib):
            dp.apply(first)
        monkeypatch.setattr(nftmod, "encode_plan", spy)
        raw.apply(second)
        monkeypatch.setattr(nftmod, "encode_plan", lambda table, delta, shared=None: None)
        lib.apply(second)
        assert _listing(host_netns, "rawdelta") == _listing(host_netns, "libdelta")
        assert raw.apply(second, verify=True).empty and raw.last_drift is None
        RAW_USED.extend(used)
    finally:
        for dp in (raw, lib):
            dp.remove()


RAW_USED: list[bool] = []


def test_the_raw_deltas_were_exercised() -> None:
    """The test above wrote some deltas raw. Most go through libnftables: between two
    unrelated random clusters the tier chains differ, and a new tier chain's verdict maps
    and lookups are libnftables' to create (the next test has membership changes, raw)."""
    if RAW_USED:
        assert sum(RAW_USED) >= 1, RAW_USED


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_membership_change_under_tiers_leaves_the_kernel_as_libnftables_would(
        host_netns, monkeypatch, data: st.DataObject) -> None:
    """An endpoint gone or relabelled under ClusterNetworkPolicies: set elements and the
    tier chains' verdict-map intervals (deleted before added: they may not overlap);
    written the datapath's way (raw where it can) the kernel lists the same as after
    libnftables, and the read-back finds no drift."""
    c = data.draw(cnp_clusters(DENSE, min_cnps=1, max_cnps=4))
    if not c.endpoints:
        return
    ep = data.draw(st.sampled_from(c.endpoints))
    others = tuple(e for e in c.endpoints if e is not ep)
    moved = data.draw(st.sampled_from([
        replace(c, endpoints=others),
        replace(c, endpoints=(*others, replace(ep, labels=ep.labels.with_labels(
            pod=data.draw(st.sampled_from(("a", "b", "c", "zz")))))))]))
    first, second = compile_cluster(c), compile_cluster(moved)
    if first.chains.keys() != second.chains.keys():
        return  # a chain comes or goes: libnftables' (the test above)
    raw = NftDatapath(Table("rawmember", log_group=5), netns=host_netns)
    lib = NftDatapath(Table("libmember", log_group=5), netns=host_netns)
    used: list[bool] = []

    def spy(table: Table, delta: Any, shared: Any = None) -> Any:
        msgs = encode_plan(table, delta, shared)
        used.append(msgs is not None)
        return msgs

    try:
        monkeypatch.setattr(nftmod, "encode_plan", encode_plan)
        for dp in (raw, lib):
            dp.apply(first)
        monkeypatch.setattr(nftmod, "encode_plan", spy)
        raw.apply(second)
        monkeypatch.setattr(nftmod, "encode_plan", lambda table, delta, shared=None: None)
        lib.apply(second)
        got, want = _listing(host_netns, "rawmember"), _listing(host_netns, "libmember")
        assert got == want, (sorted(set(got) - set(want)), sorted(set(want) - set(got)))
        assert raw.apply(second, verify=True).empty and raw.last_drift is None
    finally:
        for dp in (raw, lib):
            dp.remove()


def _listing(netns: str, table: str) -> list[str]:
    """The table as `nft -j` lists it, less its name and the kernel's handles."""
    doc = json.loads(_nft_out(netns, f"-j list table inet {table}"))["nftables"]
    out = []
    for item in doc:
        ((kind, body),) = item.items()
        if kind == "metainfo":
            continue
        body = {k: v for k, v in body.items() if k not in ("handle", "table")}
        if kind == "table":
            body.pop("name")
        out.append(json.dumps([kind, body], sort_keys=True))
    return sorted(out)


# ---- helpers ----------------------------------------------------------------------------

def _nft(netns: str, command: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "nft", command], check=True)


def _nft_out(netns: str, command: str) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, "nft", *command.split()], check=True,
                          capture_output=True, text=True).stdout


def test_the_first_and_last_endpoint_of_a_family_with_real_packets(trio, datapath,
                                                                    servers) -> None:
    """Known only by their IPv4 addresses, the pods get no IPv6 pod sets or rules; once
    they are known by both, IPv6 is enforced as IPv4 is; known by IPv4 alone again, the
    IPv6 rules go and nothing refers to them. Through the incremental compiler, each
    step a delta against the kernel's table, read back without drift."""
    from stockade.compile.incremental import IncrementalCompiler

    full = cluster(trio, allow_only("a", "b"))
    # Unguarded while known by IPv4 alone: a guarded port lets out no address it does
    # not know, so their IPv6 would be dropped whatever the policy says.
    v4 = replace(full, endpoints=tuple(replace(ep, ips=ep.ips[:1], port="")
                                       for ep in full.endpoints))
    inc = IncrementalCompiler.of(v4)
    rs = inc.ruleset()
    assert not any(s.family == 6 for s in rs.sets.values())
    datapath.apply(rs)
    assert denied(trio, 4) == A_ONLY_FROM_B
    for ep in full.endpoints:  # the first one brings IPv6 in: every chain lowered again
        inc.upsert_endpoint(ep)
        datapath.apply(inc.ruleset())
    rs = inc.ruleset()
    assert rs == compile_cluster(full) and any(s.family == 6 for s in rs.sets.values())
    assert datapath.diff(rs).empty
    for family in (4, 6):
        assert denied(trio, family) == A_ONLY_FROM_B, family
    for ep in v4.endpoints:  # the last one takes it away
        inc.upsert_endpoint(ep)
        datapath.apply(inc.ruleset())
    rs = inc.ruleset()
    assert rs == compile_cluster(v4) and datapath.diff(rs).empty
    assert not any(s.family == 6 for s in rs.sets.values())
    assert denied(trio, 4) == A_ONLY_FROM_B
    assert denied(trio, 6) == set()  # no policy knows these addresses: not isolated
