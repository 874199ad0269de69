"""ClusterNetworkPolicy tiers on the eBPF datapath, with real packets (the shared corpus
and random clusters on every datapath: test_cnp_conformance_kernel.py and
test_cnp_kernel_property.py).

* over IPv4 and IPv6 on the trio: an Admin Pass goes on to NetworkPolicy or
  Baseline (it is no drop), an Admin Deny beats a NetworkPolicy that allows, an
  Admin Accept beats a Baseline Deny;
* a new process adopts a tiered ruleset without writing anything;
* an Admin Deny added cuts an established connection (and a Pass does not), unless
  its policy is annotated `stockade.io/existing-connections: keep` (as the agent's
  revoker decides on nftables; the annotation removed, the connection is cut);
* an agent on eBPF takes ClusterNetworkPolicies, enforces them and adopts them
  across a restart without a repair.

Each trio test builds its endpoints in its own host namespace (conftest: a per-test
prefix, removed whatever happens); the datapath's pins are removed and checked gone.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import pytest

from stockade.agent.revoke import keeping_policies, should_cut
from stockade.compile import bpf as bpfc
from stockade.compile.lower import compile_cluster
from stockade.datapath.ebpf import EbpfDatapath
from stockade.engine.evaluate import Evaluator
from stockade.model.cluster import Cluster
from stockade.model.cnp import (
    ACCEPT,
    ADMIN,
    BASELINE,
    DENY,
    PASS,
    PODS,
    ClusterNetworkPolicy,
    CnpPeer,
    CnpPort,
    CnpRule,
)
from stockade.model.labels import Labels
from stockade.model.policy import KEEP_ANNOTATION, NetworkPolicy
from stockade.model.selector import Selector
from stockade.probe.protocol import Port, Protocol

from . import test_agent
from .clusters import allow_only, cluster, probe
from .clusters import servers as servers  # the fixture
from .ebpf_pins import ebpf_datapath
from .netio import EchoServer, connect, echo
from .test_agent_cnp import apply, cnp, pods

pytestmark = pytest.mark.privileged
agent = test_agent.agent  # the fixture: an agent process on the trio, its datapath a parameter

TCP80, TCP81, UDP80 = Port(80, Protocol.TCP), Port(81, Protocol.TCP), Port(80, Protocol.UDP)
ECHO_PORT = 7777


# ---- the trio: hand-written tiers, both families ----------------------------------------


def _pod(name: str) -> CnpPeer:
    return CnpPeer(PODS, pod_selector=Selector(Labels({"pod": name})))


def _admin_in(name: str, target: str, *rules: CnpRule, tier: str = ADMIN,
              priority: int = 10) -> ClusterNetworkPolicy:
    """A tier policy on `target`'s ingress."""
    return ClusterNetworkPolicy(name, tier, priority, _pod(target), ingress=rules)


def _rule(action: str, source: str | None, *ports: Port) -> CnpRule:
    peer = _pod(source) if source else CnpPeer(PODS)
    return CnpRule(action, (peer,),
                   tuple(CnpPort(p.protocol.value, p.number, p.number) for p in ports)
                   or None)


def _tiered(trio, policies: tuple[NetworkPolicy, ...],
            tiers: tuple[ClusterNetworkPolicy, ...]) -> Cluster:
    base = cluster(trio, *policies)
    return Cluster(base.namespaces, base.endpoints, base.policies, tiers)


@pytest.fixture
def datapath(trio) -> Iterator[EbpfDatapath]:
    with ebpf_datapath(trio) as dp:
        yield dp


def _seen(trio, pairs: list[tuple[str, str, Port]]) -> dict[int, dict[tuple[str, str, str],
                                                                       bool]]:
    return {family: probe(trio, pairs, family) for family in (4, 6)}


def _expect(c: Cluster, pairs: list[tuple[str, str, Port]]) -> dict[tuple[str, str, str], bool]:
    ev = Evaluator(c)
    eps = {ep.name: ep for ep in c.endpoints}
    return {(s, d, str(p)): ev.allowed(ev.flow(eps[s], eps[d], p.number, p.protocol.value))
            for s, d, p in pairs}


PAIRS = [(s, "a", p) for s in "bc" for p in (TCP80, TCP81, UDP80)]


def test_a_pass_goes_on_and_is_no_drop(trio, datapath, servers) -> None:
    # Admin on a: Pass from b, then Deny everyone. No NetworkPolicy, no Baseline:
    # b's packets pass (a Pass taken for a drop would refuse them), c's are dropped.
    c = _tiered(trio, (), (_admin_in("pass-b", "a", _rule(PASS, "b"), _rule(DENY, None)),))
    datapath.apply(compile_cluster(c))
    want = _expect(c, PAIRS)
    assert want[("b", "a", "TCP/80")] and not want[("c", "a", "TCP/80")]
    assert _seen(trio, PAIRS) == {4: want, 6: want}
    # with a NetworkPolicy behind the pass, b gets only what it allows
    c = _tiered(trio, (allow_only("a", "b", 80),), c.cluster_policies)
    datapath.apply(compile_cluster(c))
    want = _expect(c, PAIRS)
    assert want[("b", "a", "TCP/80")] and not want[("b", "a", "TCP/81")]
    assert _seen(trio, PAIRS) == {4: want, 6: want}


def test_admin_beats_networkpolicy_and_baseline(trio, datapath, servers) -> None:
    # Admin on a: Deny b on TCP/80 though a NetworkPolicy allows it, Accept c on TCP/81
    # though that NetworkPolicy does not; Baseline on b (no NetworkPolicy isolates
    # it): Deny everyone.
    admin = _admin_in("admin", "a", _rule(DENY, "b", TCP80), _rule(ACCEPT, "c", TCP81))
    baseline = _admin_in("baseline", "b", _rule(DENY, None), tier=BASELINE)
    c = _tiered(trio, (allow_only("a", "b", 80),), (admin, baseline))
    datapath.apply(compile_cluster(c))
    pairs = [*PAIRS, ("a", "b", TCP80), ("c", "b", UDP80)]
    want = _expect(c, pairs)
    assert not want[("b", "a", "TCP/80")] and want[("c", "a", "TCP/81")]
    assert not want[("a", "b", "TCP/80")]
    assert _seen(trio, pairs) == {4: want, 6: want}


def test_a_new_process_adopts_tiers_without_writing(trio, datapath, servers) -> None:
    # the Admin policy keeps connections: its Deny rule's keep is read back too
    admin = _admin_in("admin", "a", _rule(PASS, "b", TCP80), _rule(DENY, None))
    admin = dataclasses.replace(admin, annotations=Labels({KEEP_ANNOTATION: "keep"}))
    baseline = _admin_in("baseline", "a", _rule(ACCEPT, "b"), tier=BASELINE)
    rs = compile_cluster(_tiered(trio, (), (admin, baseline)))
    assert any(ch.calls for ch in rs.chains.values())
    assert any(r.keep for ch in rs.chains.values() for r in ch.rules)
    datapath.apply(rs)
    before = datapath.snapshot().table
    again = EbpfDatapath(netns=trio.host_netns)
    assert again.read() == rs
    assert again.diff(rs).empty
    assert again.apply(rs).empty
    assert again.last_timing["entries"] == 0
    after = again.snapshot().table
    assert (after.slot, after.generation) == (before.slot, before.generation)
    assert probe(trio, [("b", "a", TCP80), ("b", "a", TCP81)]) == {
        ("b", "a", "TCP/80"): True, ("b", "a", "TCP/81"): False}


@pytest.fixture
def held(trio, datapath) -> Iterator[object]:
    """b's connection to a's echo server, opened with no policy at all."""
    datapath.apply(compile_cluster(_tiered(trio, (), ())))
    with EchoServer(trio.a.netns, ECHO_PORT):
        conn = connect(trio.b.netns, trio.a.address4, ECHO_PORT)
        try:
            assert echo(conn, b"one")
            yield conn
        finally:
            conn.close()


def test_an_admin_deny_added_cuts_an_established_connection(trio, datapath, held) -> None:
    echo_port = Port(ECHO_PORT, Protocol.TCP)
    # a Pass changes nothing for it (the generation moves: it is judged again, and kept)
    datapath.apply(compile_cluster(_tiered(
        trio, (), (_admin_in("pass", "a", _rule(PASS, "b", echo_port)),))))
    assert echo(held, b"two")
    assert datapath.stats()["cut"] == 0
    datapath.apply(compile_cluster(_tiered(
        trio, (), (_admin_in("deny", "a", _rule(DENY, "b", echo_port)),))))
    assert not echo(held, b"three")
    stats = datapath.stats()
    assert stats["rejudged"] >= 2 and stats["cut"] >= 1


def test_an_admin_deny_keeps_connections_only_when_its_policy_says_so(trio, datapath
                                                                    ) -> None:
    """b's and c's connections to a, then two Admin Denies on a's ingress: b's by a
    policy annotated keep (it lives on, though b cannot open a new one), c's by one
    that is not (cut). The annotation removed, b's is cut too."""
    echo_port = Port(ECHO_PORT, Protocol.TCP)

    def denying(keep: bool) -> Cluster:
        kept = _admin_in("keep-b", "a", _rule(DENY, "b", echo_port), priority=1)
        if keep:
            kept = dataclasses.replace(kept, annotations=Labels({KEEP_ANNOTATION: "keep"}))
        return _tiered(trio, (), (kept, _admin_in("cut-c", "a", _rule(DENY, "c", echo_port),
                                                  priority=2)))

    def revoker(c: Cluster) -> dict[str, bool]:
        """What the nftables revoker and the modelled program keep of each connection."""
        ev = Evaluator(c)
        eps = {ep.name: ep for ep in c.endpoints}
        state = bpfc.compile_state(compile_cluster(c))
        out = {}
        for src in "bc":
            flow = ev.flow(eps[src], eps["a"], ECHO_PORT, "TCP")
            want = not should_cut(ev.verdict(flow), keeping_policies(ev))
            assert bpfc.keeps_connection(state, flow.src_ip, flow.dst_ip, "TCP",
                                         ECHO_PORT) == want
            out[src] = want
        return out

    datapath.apply(compile_cluster(_tiered(trio, (), ())))
    with EchoServer(trio.a.netns, ECHO_PORT):
        conns = {src: connect(getattr(trio, src).netns, trio.a.address4, ECHO_PORT)
                 for src in "bc"}
        try:
            assert all(echo(conn, b"one") for conn in conns.values())
            keep = denying(True)
            assert revoker(keep) == {"b": True, "c": False}
            datapath.apply(compile_cluster(keep))
            assert echo(conns["b"], b"two")
            assert not echo(conns["c"], b"two")
            assert datapath.stats()["cut"] == 1
            assert probe(trio, [("b", "a", echo_port)]) == {("b", "a", str(echo_port)): False}
            assert echo(conns["b"], b"three")  # still, after another packet was judged
            cut = denying(False)
            assert revoker(cut) == {"b": False, "c": False}
            datapath.apply(compile_cluster(cut))
            assert not echo(conns["b"], b"four")
            assert datapath.stats()["cut"] == 2
        finally:
            for conn in conns.values():
                conn.close()


@pytest.mark.parametrize("agent", ["ebpf"], indirect=True)
def test_an_agent_on_ebpf_enforces_tiers_and_adopts_them(trio, agent, servers) -> None:
    apply(agent, test_agent._policy("web", "a", {"pod": "b"}),
          cnp("deny-c", "Admin", 1, "Deny", subject="a", peer=pods("c")),
          cnp("pass-b", "Admin", 0, "Pass", subject="a", peer=pods("b")),
          cnp("base", "Baseline", 3, "Deny", subject="b"))
    pairs = [("b", "a", TCP80), ("c", "a", TCP80), ("a", "b", TCP80), ("a", "c", TCP80),
             ("b", "a", TCP81)]
    expected = {("b", "a", "TCP/80"): True, ("c", "a", "TCP/80"): False,
                ("a", "b", "TCP/80"): False, ("a", "c", "TCP/80"): True,
                ("b", "a", "TCP/81"): False}
    assert _seen(trio, pairs) == {4: expected, 6: expected}
    dp = EbpfDatapath(agent.table, netns=agent.netns)
    kernel = dp.read()
    assert {c.tier for c in kernel.chains.values()} >= {ADMIN, BASELINE}
    generation = dp.snapshot().table.generation
    agent.stop()
    agent.start()
    st = agent.call("status")
    assert st["inSync"] and st["driftRepairs"] == 0, st
    assert dp.read() == kernel
    assert dp.snapshot().table.generation == generation  # nothing rewritten
    assert _seen(trio, pairs) == {4: expected, 6: expected}


def test_a_denied_event_names_the_deciding_chain(trio, servers) -> None:
    """As nftables' log prefix does: a tier's Deny names that tier's chain, a denial by
    the NetworkPolicy a Pass led to names the NetworkPolicy chain."""
    dp = EbpfDatapath(netns=trio.host_netns, log_group=1)
    try:
        admin = _admin_in("admin", "a", _rule(PASS, "b"), _rule(DENY, "c"))
        rs = compile_cluster(_tiered(trio, (allow_only("a", "b", 80),), (admin,)))
        dp.apply(rs)
        link = rs.chains[rs.ingress[trio.a.address4]]
        assert link.calls is not None and link.next is not None
        events = dp.events()
        try:
            events.read()  # whatever came before
            assert probe(trio, [("c", "a", TCP80), ("b", "a", TCP81)]) == {
                ("c", "a", "TCP/80"): False, ("b", "a", "TCP/81"): False}
            got: dict[tuple[str, int | None], str] = {}
            deadline = time.monotonic() + 2
            while len(got) < 2 and time.monotonic() < deadline:
                got.update({(p.src, p.dport): p.chain for p in events.read(0.2)
                            if p.protocol == "TCP" and p.direction == "ingress"})
        finally:
            events.close()
        assert got == {(trio.c.address4, 80): link.calls, (trio.b.address4, 81): link.next}
    finally:
        EbpfDatapath(netns=trio.host_netns).remove()
        assert not dp.dir.exists()


def test_a_priority_flip_rewrites_the_admin_chain_in_place(trio, datapath, servers) -> None:
    """Tier chains are named by their policies' subjects: a priority change keeps the
    chain's name and reorders its rules, so the same policy keys change action."""
    def flip(deny_first: bool) -> Cluster:
        deny = _admin_in("deny-b", "a", _rule(DENY, "b", TCP80), priority=1 if deny_first else 3)
        accept = _admin_in("accept-b", "a", _rule(ACCEPT, "b", TCP80), priority=2)
        return _tiered(trio, (allow_only("a", "c", 80),), (deny, accept))

    pairs = [("b", "a", TCP80)]
    first, second = compile_cluster(flip(True)), compile_cluster(flip(False))
    assert first.ingress == second.ingress and first.chains.keys() == second.chains.keys()
    datapath.apply(first)
    assert _seen(trio, pairs) == {4: {("b", "a", "TCP/80"): False},
                                  6: {("b", "a", "TCP/80"): False}}
    datapath.apply(second)
    # worked out from the change (the chain's policy keys computed again), not whole
    assert datapath._state is not None and datapath._state.index is not None
    assert datapath._state.index.base is not None
    assert datapath.read() == second
    assert _seen(trio, pairs) == {4: {("b", "a", "TCP/80"): True},
                                  6: {("b", "a", "TCP/80"): True}}
    datapath.apply(second, verify=True)  # the kernel holds what a whole compile gives
    assert datapath.last_drift is None and datapath.last_timing["entries"] == 0
    datapath.apply(first)
    assert datapath._state.index.base is not None
    assert _seen(trio, pairs) == {4: {("b", "a", "TCP/80"): False},
                                  6: {("b", "a", "TCP/80"): False}}
