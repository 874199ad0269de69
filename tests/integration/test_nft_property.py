"""Random clusters and policies, programmed into the kernel and probed with real packets.

Run on every kernel datapath (nftables, iptables, eBPF): the same examples, the same probes.

Hypothesis draws a cluster (pods with labels, IPs and named ports in a few
namespaces) and a set of valid policies; the kernel datapath builds it in private
namespaces, compiles and applies it as a delta from the previous example, and
probes every pair on the drawn ports and protocols. Every verdict must equal the
reference evaluator's.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from tests.property.strategies import Scenario, Universe, scenarios

from stockade.conformance.case import Case, ProbeGroup
from stockade.conformance.kernel import KernelDatapath
from stockade.engine.evaluate import Evaluator

pytestmark = pytest.mark.privileged

# IPv4 pods (the prober connects over IPv4); everything else the API offers.
DENIED: list[int] = []
UNIVERSE = Universe(ipv4_net="10.77.0.0/26", max_pods=5, max_policies=4).with_features(
    ipv6=False)


@pytest.fixture(scope="module", params=["nft", "iptables", "ebpf"])
def kernel(request: pytest.FixtureRequest) -> Iterator[KernelDatapath]:
    dp = KernelDatapath(probe_timeout=0.5, datapath=request.param)
    try:
        yield dp
    finally:
        dp.close()


@settings(max_examples=25, deadline=None)
@given(sc=scenarios(UNIVERSE, max_probes=3))
def test_the_kernel_agrees_with_the_evaluator(kernel: KernelDatapath, sc: Scenario) -> None:
    groups = tuple(ProbeGroup(port, proto, True, frozenset()) for port, proto in sc.probes)
    case = Case("property", "", sc.cluster, groups)
    seen = kernel.judge(case)
    ev = Evaluator(sc.cluster)
    by_key = {ep.key: ep for ep in sc.cluster.endpoints}
    wrong = []
    for (gi, src, dst), got in seen.items():
        group = groups[gi]
        want = ev.allowed(ev.flow(by_key[src], by_key[dst], group.port, group.protocol))
        if got != want:
            wrong.append(f"{group.render()} {src} -> {dst}: kernel {got}, model {want}")
    assert len(seen) == len(groups) * len(case.pairs())
    assert not wrong, "\n".join(wrong)
    DENIED.append(sum(not v for v in seen.values()))


def test_the_examples_exercised_denials() -> None:
    """The property above is only worth something if the kernel had to drop packets."""
    if not DENIED:
        pytest.skip("runs after the property test, in the same session")
    assert sum(DENIED) > 0
