"""ClusterNetworkPolicy tiers on the iptables + ipset datapath, with real packets.

On both iptables backends (nf_tables and legacy): a Pass that must not be a drop,
drift in a tier's chains, and a restart that adopts the tiers without writing
anything (the shared corpus and random clusters on every datapath:
test_cnp_conformance_kernel.py and test_cnp_kernel_property.py).
"""

from __future__ import annotations

import time

import pytest

from stockade.agent.flowlog import DeniedFlow, FlowLogReader
from stockade.compile.iptables import Layout
from stockade.compile.lower import compile_cluster
from stockade.datapath.iptables import IptablesDatapath
from stockade.engine.evaluate import Evaluator
from stockade.model.cluster import Cluster
from stockade.model.cnp import (
    ADMIN,
    BASELINE,
    NAMESPACES,
    PODS,
    ClusterNetworkPolicy,
    CnpPeer,
    CnpPort,
    CnpRule,
)
from stockade.model.labels import Labels
from stockade.model.selector import Selector
from stockade.probe.protocol import Port

from .clusters import PORTS, allow_only, cluster, probe
from .clusters import servers as servers  # the fixture
from .test_iptables_datapath import _ipt, _run

pytestmark = pytest.mark.privileged

BACKENDS = ["nft", "legacy"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# ---- the trio: a Pass, drift, a restart -------------------------------------------------------

def _pods(name: str) -> CnpPeer:
    return CnpPeer(PODS, pod_selector=Selector(Labels({"pod": name})))


# a's ingress: Admin accepts c on TCP/81 (which the NetworkPolicy would not), passes
# b on to the NetworkPolicy (which admits b on TCP/80 only) and denies everyone else.
# c's egress: Admin accepts TCP/80 to a (a's ingress is still judged) and passes
# everything else with no tier after it (the side passes). b's egress: Baseline denies
# UDP to a (no NetworkPolicy isolates b's egress, so the Baseline decides).
TIERS = (
    ClusterNetworkPolicy("guard-a", ADMIN, 1, _pods("a"), ingress=(
        CnpRule("Accept", (_pods("c"),), (CnpPort("TCP", 81, 81),)),
        CnpRule("Pass", (_pods("b"),)),
        CnpRule("Deny", (CnpPeer(NAMESPACES),)),
    )),
    ClusterNetworkPolicy("pass-c", ADMIN, 2, _pods("c"), egress=(
        CnpRule("Accept", (_pods("a"),), (CnpPort("TCP", 80, 80),)),
        CnpRule("Pass", (CnpPeer(NAMESPACES),)),
    )),
    ClusterNetworkPolicy("floor", BASELINE, 1, _pods("b"), egress=(
        CnpRule("Deny", (_pods("a"),), (CnpPort("UDP", 80, 80),)),
    )),
)
# (source, destination, port) -> allowed, as the evaluator says
EXPECTED = {
    ("b", "a", "TCP/80"): True,  # Admin Pass, then the NetworkPolicy admits it
    ("b", "a", "TCP/81"): False,  # Admin Pass, then the NetworkPolicy does not
    ("c", "a", "TCP/81"): True,  # Admin Accept over the NetworkPolicy
    ("c", "a", "TCP/80"): False,  # egress Accepted, ingress Denied
    ("c", "b", "TCP/80"): True,  # Admin Pass in the last tier: the side passes
    ("c", "b", "UDP/80"): True,
    ("b", "c", "TCP/80"): True,
    ("b", "a", "UDP/80"): False,  # Baseline deny (and a's Admin Pass, NetworkPolicy)
}
OPENED = ("c", "a", "TCP/81")  # what only the Admin chain's accept lets through


def _tiered(trio) -> Cluster:
    base = cluster(trio, allow_only("a", "b"))
    return Cluster(base.namespaces, base.endpoints, base.policies, TIERS)


def _pairs() -> list[tuple[str, str, Port]]:
    by_name = {str(p): p for p in PORTS}
    return [(s, d, by_name[p]) for s, d, p in EXPECTED]


@pytest.fixture
def tiers_dp(trio, backend: str) -> IptablesDatapath:
    dp = IptablesDatapath(Layout.of(trio.host_netns.split("-")[0], log_group=100),
                          netns=trio.host_netns, backend=backend)
    dp.check()
    return dp


def test_a_pass_goes_on_to_the_next_tier_and_is_not_a_drop(trio, tiers_dp, servers) -> None:
    cl = _tiered(trio)
    ev = Evaluator(cl)
    by_name = {ep.name: ep for ep in cl.endpoints}
    for (s, d, p), want in EXPECTED.items():
        port = next(x for x in PORTS if str(x) == p)
        flow = ev.flow(by_name[s], by_name[d], port.number, port.protocol.value)
        assert ev.allowed(flow) == want, (s, d, p)
    tiers_dp.apply(compile_cluster(cl))
    for family in (4, 6):
        assert probe(trio, _pairs(), family) == EXPECTED, family


def _saved(dp: IptablesDatapath) -> tuple[str, ...]:
    """Every rule (`-S` prints no counters) and set of the namespace."""
    return (_ipt(dp, 4, "-S"), _ipt(dp, 6, "-S"), _run(dp.netns or "", "ipset", "save"))


def test_a_restart_adopts_the_tiers_without_writing(trio, tiers_dp, backend, servers) -> None:
    rs = compile_cluster(_tiered(trio))
    assert any(c.calls for c in rs.chains.values())  # a link and its Admin chain
    assert not tiers_dp.apply(rs).empty
    before = _saved(tiers_dp)
    again = IptablesDatapath(tiers_dp.layout, netns=trio.host_netns, backend=backend)
    assert again.diff(rs).empty
    assert again.apply(rs).empty and again.apply(rs, verify=True).empty
    assert again.processes == 12  # three read-backs (diff, apply, verify), four tools each
    assert again.last_drift is None and again.skeleton_intact()
    assert _saved(tiers_dp) == before
    assert probe(trio, _pairs()) == EXPECTED


@pytest.mark.parametrize("tamper", ["admin flushed", "mark test deleted", "call deleted"])
def test_a_tampered_tier_is_repaired(trio, tiers_dp, servers, tamper: str) -> None:
    rs = compile_cluster(_tiered(trio))
    tiers_dp.apply(rs)
    pairs = _pairs()
    assert probe(trio, pairs) == EXPECTED
    prefix = tiers_dp.layout.names.prefix
    admin = next(c for c in rs.chains.values() if c.tier == ADMIN and c.calls is None
                 and c.direction == "ingress")
    link = next(c for c in rs.chains.values() if c.calls == admin.name)
    if tamper == "admin flushed":
        _ipt(tiers_dp, 4, "-F", prefix + admin.name)
        chain = admin.name
    else:
        _ipt(tiers_dp, 4, "-D", prefix + link.name, "2" if "mark" in tamper else "1")
        chain = link.name
    # the accept lost (the link goes on to the NetworkPolicy, which denies c)
    assert probe(trio, pairs) == {**EXPECTED, OPENED: False}
    assert tiers_dp.apply(rs).empty  # without verify, the last apply is trusted
    delta = tiers_dp.apply(rs, verify=True)
    assert [c.name for c in delta.replace_chains] == [chain]
    assert any("rules differ" in d and chain in d for d in tiers_dp.last_drift_details)
    assert probe(trio, pairs) == EXPECTED
    assert tiers_dp.diff(rs).empty and tiers_dp.skeleton_intact()


def test_a_tier_deny_is_logged_with_the_deciding_chain(trio, tiers_dp, servers) -> None:
    """As on nftables: the NFLOG prefix names the Admin chain for its Deny, and the
    NetworkPolicy chain for a denial a Pass led to."""
    rs = compile_cluster(_tiered(trio))
    tiers_dp.apply(rs)
    link = rs.chains[rs.ingress[trio.a.address4]]
    assert link.calls is not None and link.next is not None
    seen: list[DeniedFlow] = []
    group = tiers_dp.layout.log_group
    assert group is not None
    with FlowLogReader(group, trio.host_netns, on_record=seen.append):
        assert probe(trio, [("c", "a", PORTS[0]), ("b", "a", PORTS[1])]) == {
            ("c", "a", "TCP/80"): False, ("b", "a", "TCP/81"): False}
        got: dict[tuple[str, int], str] = {}
        deadline = time.monotonic() + 3
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            got = {(f.record["srcIP"], f.record["port"]): f.record["chain"] for f in seen
                   if f.record["protocol"] == "TCP" and f.record["direction"] == "ingress"}
    assert got == {(trio.c.address4, 80): link.calls, (trio.b.address4, 81): link.next}


def test_a_priority_flip_rewrites_the_admin_chain_in_place(trio, tiers_dp, servers) -> None:
    """Tier chains are named by their policies' subjects: a priority change keeps every
    name, rewrites the Admin chain (one iptables-restore per family) and moves no
    endpoint; a verifying apply across it sees no drift."""
    def flip(deny_first: bool) -> Cluster:
        deny = ClusterNetworkPolicy("deny-b", ADMIN, 1 if deny_first else 3, _pods("a"),
                                    ingress=(CnpRule("Deny", (_pods("b"),)),))
        accept = ClusterNetworkPolicy("accept-b", ADMIN, 2, _pods("a"),
                                      ingress=(CnpRule("Accept", (_pods("b"),)),))
        base = cluster(trio, allow_only("a", "c"))
        return Cluster(base.namespaces, base.endpoints, base.policies, (deny, accept))

    first, second = compile_cluster(flip(True)), compile_cluster(flip(False))
    assert first.ingress == second.ingress and first.chains.keys() == second.chains.keys()
    pairs = [("b", "a", PORTS[0]), ("c", "a", PORTS[0])]
    tiers_dp.apply(first)
    assert probe(trio, pairs) == {("b", "a", "TCP/80"): False, ("c", "a", "TCP/80"): True}
    before = tiers_dp.processes
    delta = tiers_dp.apply(second, verify=True)
    assert tiers_dp.last_drift is None, tiers_dp.last_drift_details
    assert [c.tier for c in delta.replace_chains] == [ADMIN] and not delta.set_map
    assert tiers_dp.processes == before + 4 + 2  # the read-back, then one restore a family
    assert probe(trio, pairs) == {("b", "a", "TCP/80"): True, ("c", "a", "TCP/80"): True}
    assert tiers_dp.diff(second).empty and tiers_dp.read() == second
