"""A tier chain's verdict map in the kernel: what it holds decides, and an element
removed behind stockade's back is found by the read-back and put back."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from stockade.compile.lower import compile_cluster
from stockade.datapath.nft import NftDatapath
from stockade.model.cluster import Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.cnp import ADMIN, DENY, PODS, ClusterNetworkPolicy, CnpPeer, CnpPort, CnpRule
from stockade.model.labels import Labels
from stockade.model.selector import ALL, Selector
from stockade.probe.client import Probe, run_probes
from stockade.probe.launcher import ProbeServer
from stockade.probe.protocol import Port, Protocol

pytestmark = pytest.mark.privileged

TCP80 = Port(80, Protocol.TCP)


def _cluster(trio) -> Cluster:
    """An Admin policy denies a's TCP/80 to c, after 200 that match nobody."""
    ns = Namespace("x", Labels({"kubernetes.io/metadata.name": "x"}))
    eps = tuple(Endpoint("x", n, Labels({"pod": n}), (att.address4, att.address6),
                         (ContainerPort(80, "TCP", "http"),))
                for n, att in (("a", trio.a), ("b", trio.b), ("c", trio.c)))
    subject = CnpPeer(PODS, ALL, Selector(Labels({"pod": "a"})))
    nobody = [ClusterNetworkPolicy(
        name=f"nobody-{i:03}", tier=ADMIN, priority=1, subject=subject,
        ingress=(CnpRule(DENY, (CnpPeer(PODS, ALL, Selector(Labels({"pod": f"n{i}"}))),),
                         (CnpPort("TCP", 80, 80),), "r"),)) for i in range(200)]
    deny_c = ClusterNetworkPolicy(
        name="deny-c", tier=ADMIN, priority=5, subject=subject,
        ingress=(CnpRule(DENY, (CnpPeer(PODS, ALL, Selector(Labels({"pod": "c"}))),),
                         (CnpPort("TCP", 80, 80),), "c"),))
    return Cluster((ns,), eps, (), (*nobody, deny_c))


@pytest.fixture
def servers(trio) -> Iterator[ProbeServer]:
    with ProbeServer({a.netns: [TCP80] for a in trio.all}) as server:
        yield server


def _probe(trio, *pairs: tuple[str, str]) -> dict[tuple[str, str], bool]:
    atts = {a.key.split("/")[1]: a for a in trio.all}
    probes = [Probe(s, atts[s].netns, d, atts[d].address4, TCP80) for s, d in pairs]
    return {(v.probe.src, v.probe.dst): v.allowed for v in run_probes(probes, timeout=0.8)}


def _nft(netns: str, *args: str) -> str:
    out = subprocess.run(["ip", "netns", "exec", netns, "nft", *args], capture_output=True,
                         text=True, check=False)
    assert out.returncode == 0, (args, out.stderr)
    return out.stdout


def test_the_map_decides_and_a_removed_element_is_put_back(trio, servers) -> None:
    dp = NftDatapath(netns=trio.host_netns, owner=False)
    rs = compile_cluster(_cluster(trio))
    dp.apply(rs)
    want = {("c", "a"): False, ("b", "a"): True}
    assert _probe(trio, *want) == want
    (admin,) = [c for c in rs.chains.values() if c.tier == ADMIN and c.calls is None]
    assert len(admin.rules) > 200  # and yet, in the kernel:
    doc = json.loads(_nft(trio.host_netns, "-j", "list", "chain", "inet", "stockade",
                          admin.name))["nftables"]
    rules = [x["rule"] for x in doc if "rule" in x]
    assert len(rules) == 2 and all("vmap" in json.dumps(r["expr"]) for r in rules)
    dmap = f"d4-{admin.name}-0"
    _nft(trio.host_netns, "flush", "map", "inet", "stockade", dmap)
    assert _probe(trio, ("c", "a")) == {("c", "a"): True}  # the hole is real
    delta = dp.diff(rs)
    assert [s.name for s, _ in delta.add_elements] == [dmap]
    dp.apply(rs, verify=True)
    assert _probe(trio, *want) == want
    assert dp.diff(rs).empty
