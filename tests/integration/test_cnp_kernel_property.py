"""Random clusters with NetworkPolicies and ClusterNetworkPolicy tiers, programmed into
nftables and probed with real packets: every verdict must be the evaluator's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from tests.property.strategies import Scenario, Universe
from tests.property.tier_strategies import cnp_scenarios

from stockade.compile.interpret import allows
from stockade.compile.lower import compile_cluster
from stockade.conformance.case import Case, ProbeGroup
from stockade.conformance.kernel import KernelDatapath
from stockade.engine.evaluate import Evaluator

pytestmark = pytest.mark.privileged

UNIVERSE = Universe(ipv4_net="10.78.0.0/26", max_pods=5, max_policies=2).with_features(
    ipv6=False)
OUTCOMES: list[tuple[int, int]] = []  # (allowed, denied) per example


@pytest.fixture(scope="module")
def kernel() -> Iterator[KernelDatapath]:
    dp = KernelDatapath(probe_timeout=0.5, datapath="nft")
    try:
        yield dp
    finally:
        dp.close()


@settings(max_examples=20, deadline=None)
@given(sc=cnp_scenarios(UNIVERSE, max_probes=3))
def test_the_kernel_agrees_with_the_evaluator_on_tiers(kernel: KernelDatapath,
                                                       sc: Scenario) -> None:
    cluster = sc.cluster
    groups = tuple(ProbeGroup(port, proto, True, frozenset()) for port, proto in sc.probes)
    case = Case("cnp-property", "", cluster, groups)
    seen = kernel.judge(case)
    ev = Evaluator(cluster)
    rs = compile_cluster(cluster)
    by_key = {ep.key: ep for ep in cluster.endpoints}
    wrong = []
    for (gi, src, dst), got in seen.items():
        group = groups[gi]
        flow = ev.flow(by_key[src], by_key[dst], group.port, group.protocol)
        want = ev.allowed(flow)
        interpreted = allows(rs, flow.src_ip, flow.dst_ip, flow.protocol, flow.port)
        if got != want or interpreted != want:
            wrong.append(f"{group.render()} {src} -> {dst}: kernel {got}, "
                         f"interpreted {interpreted}, model {want}")
    assert len(seen) == len(groups) * len(case.pairs())
    assert not wrong, "\n".join(wrong)
    OUTCOMES.append((sum(seen.values()), sum(not v for v in seen.values())))


def test_the_examples_exercised_both_verdicts() -> None:
    """Worth something only if the kernel had to drop packets and let others through."""
    if not OUTCOMES:
        pytest.fail("runs after the property test, in the same session")
    assert sum(a for a, _ in OUTCOMES) > 0 and sum(d for _, d in OUTCOMES) > 0
