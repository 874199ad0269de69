"""Random clusters with NetworkPolicies and ClusterNetworkPolicy tiers, programmed into
every datapath (nftables, iptables + ipset on both backends, eBPF) and probed with real
packets: every verdict must be the evaluator's, the interpreted ruleset's (and on eBPF
the model of the program's lookups), and what was programmed must read back as it was
rendered."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from tests.property.strategies import Scenario, Universe
from tests.property.tier_strategies import cnp_scenarios

from stockade.compile import bpf as bpfc
from stockade.compile.interpret import allows
from stockade.compile.lower import compile_cluster
from stockade.conformance.case import Case, ProbeGroup
from stockade.conformance.kernel import KernelDatapath
from stockade.datapath.iptables import BACKEND_ENV
from stockade.engine.evaluate import Evaluator

pytestmark = pytest.mark.privileged

UNIVERSE = Universe(ipv4_net="10.78.0.0/26", max_pods=5, max_policies=2).with_features(
    ipv6=False)
DATAPATHS = ["nft", "iptables-nft", "iptables-legacy", "ebpf"]
OUTCOMES: dict[str, list[tuple[int, int]]] = {d: [] for d in DATAPATHS}  # (allowed, denied)


@pytest.fixture(scope="module", params=DATAPATHS)
def kernel(request: pytest.FixtureRequest) -> Iterator[tuple[str, KernelDatapath]]:
    name = str(request.param)
    datapath, _, backend = name.partition("-")
    with pytest.MonkeyPatch.context() as mp:
        if backend:
            mp.setenv(BACKEND_ENV, backend)
        dp = KernelDatapath(probe_timeout=0.5, datapath=datapath)
    try:
        if backend:
            assert getattr(dp.datapath, "backend", None) == backend
        yield name, dp
    finally:
        dp.close()


@settings(max_examples=15, deadline=None)
@given(sc=cnp_scenarios(UNIVERSE, max_probes=3))
def test_the_kernel_agrees_with_the_evaluator_on_tiers(
        kernel: tuple[str, KernelDatapath], sc: Scenario) -> None:
    name, dp = kernel
    cluster = sc.cluster
    groups = tuple(ProbeGroup(port, proto, True, frozenset()) for port, proto in sc.probes)
    case = Case("cnp-property", "", cluster, groups)
    seen = dp.judge(case)
    ev = Evaluator(cluster)
    rs = compile_cluster(cluster)
    state = bpfc.compile_state(rs) if name == "ebpf" else None
    by_key = {ep.key: ep for ep in cluster.endpoints}
    wrong = []
    for (gi, src, dst), got in seen.items():
        group = groups[gi]
        flow = ev.flow(by_key[src], by_key[dst], group.port, group.protocol)
        want = ev.allowed(flow)
        interpreted = allows(rs, flow.src_ip, flow.dst_ip, flow.protocol, flow.port)
        modelled = want if state is None else bpfc.allows(
            state, flow.src_ip, flow.dst_ip, flow.protocol, flow.port)
        if not got == want == interpreted == modelled:
            wrong.append(f"{group.render()} {src} -> {dst}: kernel {got}, interpreted "
                         f"{interpreted}, modelled {modelled}, evaluator {want}")
    assert len(seen) == len(groups) * len(case.pairs())
    assert not wrong, "\n".join(wrong)
    # it reads back as it was rendered (with the pods bound to their ports, as judged)
    assert dp.datapath.diff(compile_cluster(dp.pods.bound(cluster))).empty, name
    OUTCOMES[name].append((sum(seen.values()), sum(not v for v in seen.values())))


def test_the_examples_exercised_both_verdicts() -> None:
    """Worth something only if each datapath had to drop packets and let others through."""
    for name, outcomes in OUTCOMES.items():
        if not outcomes:
            pytest.fail(f"runs after the property test, in the same session ({name})")
        assert sum(a for a, _ in outcomes) > 0 and sum(d for _, d in outcomes) > 0, name
