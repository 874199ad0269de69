"""ClusterNetworkPolicy tiers on the iptables + ipset rendering (pure).

The rules are run by the model of the kernel in test_iptables_render (`FakeKernel`,
which also follows the packet mark the tiers use): over the ClusterNetworkPolicy
corpus and random clusters with both kinds of policy, what they let through is
exactly what the IR interpreter lets through, read back they are what was
rendered, and a tampered tier chain is drift that a verifying apply repairs.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from tests.property.strategies import DEFAULT, Scenario
from tests.property.tier_strategies import cnp_scenarios
from tests.support import shared
from tests.unit.test_iptables_render import FakeKernel, _apply, _first

from stockade.cli.conformance import load_cases
from stockade.compile import interpret
from stockade.compile.iptables import (
    ALLOW_MARK,
    CHAIN_MAX,
    SET_MAX,
    Layout,
    Names,
    chain_bodies,
    dispatch_set,
    parse_kernel,
)
from stockade.compile.ir import ALLOW, DENY, PASS, Chain, ChainRule, Ruleset
from stockade.compile.lower import compile_cluster
from stockade.compile.nft import TAMPERED, canonical
from stockade.compile.plan import plan
from stockade.conformance.case import Case
from stockade.engine.evaluate import Evaluator
from stockade.model.cnp import ADMIN, BASELINE

CNP_CORPUS = shared("conformance-cnp")
# The packet marks a flow is tried with: none, the tiers' own bit already set (by
# someone else), and kube-proxy's masquerade bit: each must leave as it came.
MARKS = (0, ALLOW_MARK, 0x4000 | ALLOW_MARK | 0x1)


def _cases() -> list[Case]:
    if not CNP_CORPUS.is_dir():
        pytest.fail(f"the ClusterNetworkPolicy corpus is missing at {CNP_CORPUS}")
    return load_cases([str(CNP_CORPUS)])


def _in_sync(k: FakeKernel, layout: Layout, rs: Ruleset) -> None:
    state = k.read(layout, dict(rs.chains))
    assert not state.needs_repair, state.drift
    assert state.ruleset == canonical(rs)
    assert plan(state.ruleset, canonical(rs)).empty


# ---- names ----------------------------------------------------------------------------------

def test_a_tiers_names_fit_the_kernels_limits() -> None:
    for name in ("stockade", "thirteen-char", "fourteen-chars", "a-very-long-datapath-name"):
        n = Names.of(name)
        for ir in ("ai-", "be-", "li-"):
            assert len(n.chain(ir + "a" * 12)) <= CHAIN_MAX
            assert len(n.tmp_set(dispatch_set(ir + "a" * 12, 6))) <= SET_MAX
            assert n.ir(n.chain(ir + "0123456789ab")) == ir + "0123456789ab"
            assert n.ir(n.set(dispatch_set(ir + "0123456789ab", 4))) == dispatch_set(
                ir + "0123456789ab", 4)
        assert n.ir(n.chain("i-0123456789ab")) == "i-0123456789ab"
    # the names a datapath had before tiers are kept: a 13-character name stays whole
    # (a tier's chain then loses its dash), a longer one is 8 characters and a hash
    assert Names.of("thirteen-char").prefix == "thirteen-char-"
    assert Names.of("thirteen-char").chain("ai-0123456789ab") == "thirteen-char-ai0123456789ab"
    assert Names.of("stockade").chain("ai-0123456789ab") == "stockade-ai-0123456789ab"
    assert len(Names.of("fourteen-chars").prefix) == 14
    assert dispatch_set("li-abc", 4) == "li4-abc" and dispatch_set("i-abc", 6) == "i6-abc"


# ---- what the rules look like ------------------------------------------------------------

ADMIN_CHAIN = Chain("ai-aaaaaaaaaaaa", "ingress", (
    ChainRule(protocol="TCP", ports=((80, 80),), action=PASS),
    ChainRule(protocol="TCP", ports=((81, 81),), action=DENY),
    ChainRule(protocol="UDP", action=ALLOW),
), "guard", tier=ADMIN)
BASE_CHAIN = Chain("bi-bbbbbbbbbbbb", "ingress", (
    ChainRule(protocol="TCP", ports=((82, 82),), action=ALLOW),
    ChainRule(protocol="TCP", action=DENY),
), "floor", tier=BASELINE)
LINK = Chain("li-cccccccccccc", "ingress", (), "guard", tier=ADMIN, next=BASE_CHAIN.name,
             calls=ADMIN_CHAIN.name)


def _targets(bodies: list[str]) -> list[str]:
    """What each rule does: the words after its comment."""
    return [b.split('"stk:', 1)[1].split('" ', 1)[1] for b in bodies]


def test_a_tiers_actions_as_rules() -> None:
    layout = Layout.of("stockade", log_group=5)
    admin = chain_bodies(layout, ADMIN_CHAIN, 4)
    # a pass returns to the link, a deny logs (rate-limited) then drops, an allow flips
    # the mark; the end falls off (back to the link)
    assert _targets(admin) == [
        "-j RETURN", '-j NFLOG --nflog-prefix "stockade-deny ai-aaaaaaaaaaaa" --nflog-group 5',
        "-j DROP", "-g stockade-flip"]
    assert "-m limit --limit 50/sec" in admin[1] and "-m limit" not in admin[2]
    assert admin[1].split(" -m limit")[0] == admin[2].split(" -m comment")[0]  # same match
    link = chain_bodies(layout, LINK, 4)
    assert _targets(link) == ["-j stockade-ai-aaaaaaaaaaaa", "-g stockade-flip",
                              "-g stockade-bi-bbbbbbbbbbbb"]
    assert f"-m mark --mark {ALLOW_MARK:#x}/{ALLOW_MARK:#x}" in link[1]
    base = chain_bodies(layout, BASE_CHAIN, 4)
    assert _targets(base)[0] == "-j RETURN" and _targets(base)[-1] == "-j DROP"
    # no logging asked: a deny is one rule
    assert len(chain_bodies(Layout.of("stockade"), ADMIN_CHAIN, 4)) == 3


def test_a_pass_goes_on_and_is_never_a_drop() -> None:
    """A Pass in a tier that has a next chain goes there; in the last tier it passes."""
    layout = Layout.of("stockade")
    passing = Chain("be-dddddddddddd", "egress", (ChainRule(action=PASS),), "p",
                    tier=BASELINE, next="e-eeeeeeeeeeee")
    assert chain_bodies(layout, passing, 4)[0].endswith("-g stockade-e-eeeeeeeeeeee")
    last = Chain("be-ffffffffffff", "egress", (ChainRule(action=PASS),), "p", tier=BASELINE)
    assert chain_bodies(layout, last, 6)[0].endswith("-j RETURN")
    # (lowering gives a tier's chain no next today; the IR allows one, so it is run too)
    np_egress = Chain("e-eeeeeeeeeeee", "egress", (ChainRule(protocol="UDP"),), "np")
    rs = Ruleset({}, {c.name: c for c in (passing, last, np_egress)},
                 {}, {"10.0.0.5": passing.name, "10.0.0.6": last.name})
    k = FakeKernel()
    _first(k, layout, rs)
    assert [k.verdict(src, "10.9.9.9", proto, 80) for src in ("10.0.0.5", "10.0.0.6")
            for proto in ("tcp", "udp")] == [False, True, True, True]
    # and with packets: only the Admin deny on TCP/81 and the Baseline's deny drop
    final = Chain("i-eeeeeeeeeeee", "ingress", (ChainRule(protocol="TCP"),), "np")
    rs = Ruleset({}, {c.name: c for c in (ADMIN_CHAIN, BASE_CHAIN, LINK, final)},
                 {"10.0.0.1": LINK.name, "10.0.0.2": BASE_CHAIN.name}, {})
    k = FakeKernel()
    _first(k, Layout.of("stockade", log_group=3), rs)
    seen = {(dst, proto, port): k.verdict("10.9.9.9", dst, proto, port, mark)
            for dst in ("10.0.0.1", "10.0.0.2") for proto, port in (
                ("tcp", 80), ("tcp", 81), ("tcp", 82), ("udp", 80)) for mark in MARKS}
    for (dst, proto, port), got in seen.items():
        assert got == interpret.allows(rs, "10.9.9.9", dst, proto.upper(), port)
    assert not seen[("10.0.0.1", "tcp", 80)]  # passed on to Baseline, which denies TCP
    assert seen[("10.0.0.1", "udp", 80)]  # the Admin allow, Baseline never asked
    assert not seen[("10.0.0.1", "tcp", 81)]
    assert seen[("10.0.0.1", "tcp", 82)]  # passed, then allowed by Baseline


# ---- semantics and read-back ---------------------------------------------------------------

def _check_flows(k: FakeKernel, rs: Ruleset, flows: list[tuple[str, str, str, int]]) -> int:
    checked = 0
    for src, dst, proto, port in flows:
        if src == dst:
            continue  # never forwarded
        want = interpret.allows(rs, src, dst, proto, port)
        for mark in MARKS:
            assert k.verdict(src, dst, proto.lower(), port, mark) == want, (
                src, dst, proto, port, hex(mark))
        checked += 1
    return checked


@pytest.mark.parametrize("name", ["stk", "thirteen-char"])  # tier chains with a dash, without
def test_the_cnp_corpus_renders_reads_back_and_decides_like_the_interpreter(name: str) -> None:
    layout = Layout.of(name, log_group=100)
    checked = tiered = 0
    verdicts: set[bool] = set()
    for case in _cases():
        rs = compile_cluster(case.cluster)
        tiered += any(c.tier for c in rs.chains.values())
        k = FakeKernel()
        _first(k, layout, rs)
        _in_sync(k, layout, rs)
        ev = Evaluator(case.cluster)
        flows = []
        for group in case.probes:
            for src, dst in case.pairs():
                flow = ev.flow(src, dst, group.port, group.protocol)
                flows.append((flow.src_ip, flow.dst_ip, flow.protocol, flow.port))
                verdicts.add(ev.allowed(flow))
        checked += _check_flows(k, rs, flows)
    assert tiered == len(_cases()) == 32
    assert checked > 4_000 and verdicts == {True, False}


@settings(max_examples=80, deadline=None)
@given(a=cnp_scenarios(DEFAULT), b=cnp_scenarios(DEFAULT))
def test_random_tiers_decide_like_the_interpreter_and_plans_between_them_converge(
        a: Scenario, b: Scenario) -> None:
    layout = Layout.of("stk", log_group=9)
    k = FakeKernel()
    first, second = compile_cluster(a.cluster), compile_cluster(b.cluster)
    _first(k, layout, first)
    for sc, rs in ((a, first), (b, second)):
        if rs is second:
            _apply(k, layout, canonical(first), rs)
        _in_sync(k, layout, rs)
        _check_flows(k, rs, [(f.src_ip, f.dst_ip, f.protocol, f.port) for f in sc.flows()])
    # and every chain gone again: nothing of the tiers is left behind
    _apply(k, layout, canonical(second), Ruleset())
    assert not [c for t in k.chains.values() for c in t if c.startswith("stk-")
                and "-" in c[4:] and c[4:6] not in ("ib", "eb")]


# ---- drift ---------------------------------------------------------------------------------

FLOOR = Chain("bi-999999999999", "ingress", (
    ChainRule(protocol="TCP", ports=((80, 82),), action=ALLOW),
    ChainRule(action=DENY),
), "floor", tier=BASELINE)
GUARDED = Ruleset({}, {c.name: c for c in (ADMIN_CHAIN, FLOOR, replace(
    LINK, name="li-888888888888", next=FLOOR.name))},
    {"10.0.0.1": "li-888888888888", "fd00::1": "li-888888888888"}, {})


def _guarded() -> tuple[FakeKernel, Layout, Ruleset, list[tuple[str, str, str, int]]]:
    """Each action of the Admin chain decides differently from the Baseline chain
    after it (a pass is allowed there, a deny would be, an allow would not)."""
    layout = Layout.of("stockade", log_group=7)
    k = FakeKernel()
    _first(k, layout, GUARDED)
    flows = [(src, dst, proto, port) for src, dst in (("10.9.9.9", "10.0.0.1"),
                                                      ("fd00::9", "fd00::1"))
             for proto, port in (("TCP", 80), ("TCP", 81), ("TCP", 82), ("TCP", 83),
                                 ("UDP", 53))]
    seen = {f[2:]: interpret.allows(GUARDED, *f) for f in flows}
    assert seen == {("TCP", 80): True, ("TCP", 81): False, ("TCP", 82): True,
                    ("TCP", 83): False, ("UDP", 53): True}
    return k, layout, GUARDED, flows


def _wrong(k: FakeKernel, rs: Ruleset, flows: list[tuple[str, str, str, int]]) -> list[object]:
    """The flows (and marks) the kernel gets wrong, or lets out with another mark."""
    out: list[object] = []
    for src, dst, proto, port in flows:
        for mark in MARKS:
            try:
                got = k.verdict(src, dst, proto.lower(), port, mark)
            except AssertionError:
                got = None  # left with another mark
            if got != interpret.allows(rs, src, dst, proto, port):
                out.append((src, dst, proto, port, mark))
    return out


@pytest.mark.parametrize("what", ["deny made a return", "pass made a drop", "mark test gone",
                                  "flip flushed", "link dropped from its bucket"])
def test_a_tampered_tier_is_drift_and_is_repaired(what: str) -> None:
    k, layout, rs, flows = _guarded()
    assert not _wrong(k, rs, flows)
    admins = [c for c in sorted(k.chains[4]) if c.startswith("stockade-a")]
    link = next(c for c in sorted(k.chains[4]) if c.startswith("stockade-l"))
    tampered: str | None = None
    if what in ("deny made a return", "pass made a drop"):
        # in a shared Admin chain a deny is a DROP, a pass a RETURN (to its link)
        was, now = ("-j DROP", "-j RETURN") if what.startswith("deny") else (
            "-j RETURN", "-j DROP")
        tampered, i = next((c, i) for c in admins for i, r in enumerate(k.chains[4][c])
                           if r.endswith(was))
        k.chains[4][tampered][i] = k.chains[4][tampered][i].replace(was, now)
    elif what == "mark test gone":
        del k.chains[4][link][1]
        tampered = link
    elif what == "flip flushed":
        k.chains[4]["stockade-flip"] = []
    else:
        bucket = next(c for c, r in k.chains[4].items() if any(f"-g {link}" in b for b in r))
        k.chains[4][bucket] = [b for b in k.chains[4][bucket] if f"-g {link}" not in b]
    assert _wrong(k, rs, flows), what  # the tampering shows: a test that can fail
    state = k.read(layout, dict(rs.chains))
    assert state.drift, what
    if tampered is not None:
        ir = tampered.removeprefix("stockade-")
        assert state.ruleset.chains[ir].rules == TAMPERED
        assert [c.name for c in plan(state.ruleset, canonical(rs)).replace_chains] == [ir]
    else:
        assert state.needs_repair
    _apply(k, layout, state.ruleset, rs, state)
    _in_sync(k, layout, rs)
    assert not _wrong(k, rs, flows)


def test_a_reader_that_knows_no_chain_reads_the_tiers_as_tampered() -> None:
    k, layout, rs, _ = _guarded()
    state = parse_kernel(layout, {4: k.save(4), 6: k.save(6)}, k.ipset_save(), {})
    assert set(state.ruleset.chains) == set(rs.chains)
    assert all(c.rules == TAMPERED for c in state.ruleset.chains.values())
