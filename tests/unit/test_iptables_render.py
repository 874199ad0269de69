"""The iptables + ipset rendering, against a small model of the kernel (pure).

`FakeKernel` executes the scripts `compile.iptables` renders as `ipset restore`
and `ip[6]tables-restore --noflush` would (declaring a chain flushes it, `-D`
deletes by body, `create -exist` refuses another definition, `swap`), prints
what `iptables-save` / `ipset save` print, and runs a packet through the
FORWARD chain as the kernel would (the first packet of a connection). With it
the tests check round trips, plans, drift repair and, over the whole
conformance corpus, that the rendered rules allow exactly what the IR
interpreter allows.
"""

from __future__ import annotations

import functools
import ipaddress
import shlex
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from tests.property.strategies import DEFAULT, Scenario, scenarios
from tests.support import shared

from stockade.cli.conformance import load_cases
from stockade.compile import interpret
from stockade.compile.iptables import (
    BUCKETS,
    CHAIN_MAX,
    FORWARD,
    SET_MAX,
    KernelState,
    Layout,
    Names,
    Step,
    bucket_of,
    net_entries,
    parse_kernel,
    read_net,
    render_plan,
    render_remove,
    skeleton_chains,
)
from stockade.compile.ir import ADDR, NET, AddressSet, Chain, ChainRule, Ruleset
from stockade.compile.lower import compile_cluster
from stockade.compile.nft import canonical
from stockade.compile.plan import plan
from stockade.conformance.case import Case
from stockade.engine.evaluate import Evaluator
from stockade.model.cluster import Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.labels import Labels
from stockade.model.policy import IPBlock, NetworkPolicy, Peer, PolicyPort, Rule
from stockade.model.selector import Selector

CORPUS = shared("conformance")


class Refused(Exception):
    pass


_TARGETS = frozenset({"RETURN", "DROP", "ACCEPT", "NFLOG", "MARK"})


@functools.lru_cache(maxsize=1 << 16)
def _words(line: str) -> list[str]:
    return shlex.split(line)


@dataclass
class FakeSet:
    definition: str  # "hash:ip family inet maxelem N"
    elements: dict[str, bool] = field(default_factory=dict)  # element -> nomatch


@dataclass
class FakeKernel:
    chains: dict[int, dict[str, list[str]]] = field(
        default_factory=lambda: {4: {FORWARD: []}, 6: {FORWARD: []}})
    sets: dict[str, FakeSet] = field(default_factory=dict)
    processes: int = 0

    # ---- executing scripts ----
    def run(self, steps: list[Step]) -> None:
        for step in steps:
            self.processes += 1
            if step.tool == "ipset":
                self._ipset(step.lines)
            else:
                assert step.family is not None
                self._iptables(step.family, step.lines)

    def _ipset(self, lines: list[str]) -> None:
        for line in lines:  # not atomic: every line before a failure stays
            w = line.split()
            cmd, name, rest = w[0], w[1], [x for x in w[2:] if x != "-exist"]
            if cmd == "create":
                d = " ".join(rest)
                if name in self.sets and self.sets[name].definition != d:
                    raise Refused(line)
                self.sets.setdefault(name, FakeSet(d))
            elif cmd == "add":
                self.sets[name].elements[rest[0]] = rest[1:] == ["nomatch"]
            elif cmd == "del":
                self.sets[name].elements.pop(rest[0], None)
            elif cmd == "flush":
                self.sets[name].elements.clear()
            elif cmd == "swap":
                self.sets[name], self.sets[rest[0]] = self.sets[rest[0]], self.sets[name]
            elif cmd == "destroy":
                if name not in self.sets or self._referenced(name):
                    raise Refused(line)
                del self.sets[name]
            else:
                raise AssertionError(line)

    def _referenced(self, set_name: str) -> bool:
        return any(f"--match-set {set_name} " in b for t in self.chains.values()
                   for rules in t.values() for b in rules)

    def _iptables(self, fam: int, lines: list[str]) -> None:
        table = {k: list(v) for k, v in self.chains[fam].items()}  # atomic: a copy
        assert lines[0] == "*filter" and lines[-1] == "COMMIT"
        for line in lines[1:-1]:
            if line.startswith(":"):
                table[line[1:].split()[0]] = []
                continue
            op, chain, *rest = line.split(" ", 2)
            body = rest[0] if rest else ""
            if op in ("-A", "-I"):  # what a rule names must exist already
                words = _words(line)
                for i, word in enumerate(words):
                    if word in ("-j", "-g") and words[i + 1] not in _TARGETS and \
                            words[i + 1] not in table:
                        raise Refused(f"no chain {words[i + 1]}")
                    if word == "--match-set" and words[i + 1] not in self.sets:
                        raise Refused(f"no set {words[i + 1]}")
            if op == "-A":
                table[chain].append(body)
            elif op == "-I":
                pos, body = body.split(" ", 1)
                table[chain].insert(int(pos) - 1, body)
            elif op == "-D":
                if body not in table.get(chain, []):
                    raise Refused(line)
                table[chain].remove(body)
            elif op == "-F":
                if chain not in table:  # as iptables-restore: "No chain/target/match"
                    raise Refused(line)
                table[chain] = []
            elif op == "-X":
                if table.get(chain) or any(f"-j {chain}" in b or f"-g {chain}" in b
                                           for r in table.values() for b in r):
                    raise Refused(line)
                del table[chain]
            else:
                raise AssertionError(line)
        self.chains[fam] = table

    # ---- what the tools print ----
    def save(self, fam: int) -> str:
        out = ["# Generated by iptables-save", "*filter", ":INPUT ACCEPT [0:0]",
               ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
        out += [f":{c} - [0:0]" for c in self.chains[fam] if c != FORWARD]
        out += [f"-A {c} {b}" for c, rules in self.chains[fam].items() for b in rules]
        return "\n".join([*out, "COMMIT", "# Completed"]) + "\n"

    def ipset_save(self) -> str:
        out: list[str] = []
        for name, s in self.sets.items():
            t, *opts = s.definition.split()
            out.append(f"create {name} {t} {' '.join(opts[:2])} hashsize 1024 "
                       f"{' '.join(opts[2:])} bucketsize 12 initval 0x1234")
            for e, nomatch in s.elements.items():
                printed = e[:-3] if e.endswith("/32") and ":" not in e else e
                out.append(f"add {name} {printed}{' nomatch' if nomatch else ''}")
        return "\n".join(out) + "\n"

    def read(self, layout: Layout, expected: dict[str, Chain]) -> KernelState:
        return parse_kernel(layout, {4: self.save(4), 6: self.save(6)}, self.ipset_save(),
                            expected)

    # ---- a packet ----
    def _in_set(self, name: str, addr: str, proto: str, port: int, dirs: str) -> bool:
        s = self.sets[name]
        if s.definition.startswith("hash:ip,port"):
            return f"{addr},{proto}:{port}" in s.elements
        if s.definition.startswith("hash:ip "):
            return addr in s.elements
        a = ipaddress.ip_address(addr)
        best: tuple[int, bool] | None = None
        for e, nomatch in s.elements.items():
            n = ipaddress.ip_network(e)
            if n.version == a.version and a in n and (best is None or n.prefixlen > best[0]):
                best = (n.prefixlen, nomatch)
        return best is not None and not best[1]

    def _matches(self, words: list[str], src: str, dst: str, proto: str, port: int,
                 mark: int = 0) -> bool:
        i = 0
        while i < len(words):
            w = words[i]
            if w == "--mark":
                value, _, mask = words[i + 1].partition("/")
                if mark & int(mask or "0xffffffff", 16) != int(value, 16):
                    return False
                i += 2
            elif w == "-p":
                if words[i + 1] != proto:
                    return False
                i += 2
            elif w == "--match-set":
                name, dirs = words[i + 1], words[i + 2]
                addr = src if dirs == "src" else dst
                if not self._in_set(name, addr, proto, port, dirs):
                    return False
                i += 3
            elif w == "--dports":
                ok = False
                for item in words[i + 1].split(","):
                    lo, _, hi = item.partition(":")
                    ok = ok or int(lo) <= port <= int(hi or lo)
                if not ok:
                    return False
                i += 2
            elif w == "--ctstate":
                if "NEW" not in words[i + 1]:
                    return False  # a first packet is NEW
                i += 2
            elif w == "!" and words[i + 1] == "--tcp-flags":
                return False  # a SYN
            elif w == "--icmpv6-type":
                return False
            else:
                i += 1
        return True

    def verdict(self, src: str, dst: str, proto: str, port: int, mark: int = 0) -> bool:
        """Whether the first packet of a connection passes; one that passes leaves
        with the packet mark it came with."""
        fam = ipaddress.ip_address(src).version
        packet = [mark]
        passed = self._walk(fam, FORWARD, src, dst, proto, port, packet) != "DROP"
        assert not passed or packet == [mark], (hex(mark), hex(packet[0]))
        return passed

    def _walk(self, fam: int, chain: str, src: str, dst: str, proto: str, port: int,
              packet: list[int]) -> str:
        for body in self.chains[fam][chain]:
            words = _words(body)
            if not self._matches(words, src, dst, proto, port, packet[0]):
                continue
            at = max(i for i, w in enumerate(words) if w in ("-j", "-g"))
            kind, target = words[at], words[at + 1]
            if target == "NFLOG":
                continue
            if target == "MARK":
                assert words[at + 2] == "--set-xmark"
                value, mask = (int(x, 16) for x in words[at + 3].split("/"))
                packet[0] = (packet[0] & ~mask) ^ value
                continue
            if target == "DROP":
                return "DROP"
            if target == "RETURN":
                return "RETURN"
            got = self._walk(fam, target, src, dst, proto, port, packet)
            if got == "DROP" or kind == "-g":
                return got
        return "RETURN"


def _cases() -> list[Case]:
    if not CORPUS.is_dir():
        pytest.skip(f"no conformance corpus at {CORPUS}")
    return load_cases([str(CORPUS)])


def _apply(k: FakeKernel, layout: Layout, old: Ruleset, new: Ruleset,
           state: KernelState | None = None) -> list[Step]:
    steps = render_plan(layout, plan(old, canonical(new)), old,
                        repair=state.repair if state is not None else None)
    k.run(steps)
    return steps


def _first(k: FakeKernel, layout: Layout, rs: Ruleset) -> None:
    state = k.read(layout, dict(rs.chains))
    _apply(k, layout, state.ruleset, rs, state)


# ---- names -------------------------------------------------------------------------------

def test_names_fit_the_kernels_limits_and_are_deterministic() -> None:
    for name in ("stockade", "s", "a-very-long-datapath-name-indeed", "stk-test-12345678"):
        n = Names.of(name)
        assert n == Names.of(name)
        assert len(n.chain("i-" + "a" * 12)) <= CHAIN_MAX
        assert len(n.tmp_set("s4-" + "a" * 12)) <= SET_MAX
        assert n.ir(n.chain("i-abc")) == "i-abc"
    assert Names.of("stockade").prefix == "stockade-"
    assert Names.of("a-very-long-datapath-name-indeed") != Names.of(
        "a-very-long-datapath-name-indeeD")


# ---- ipBlocks ------------------------------------------------------------------------------

def test_an_ipblock_with_excepts_is_a_supernet_with_nomatch_holes() -> None:
    from stockade.compile.lower import block_networks
    nets = [str(n) for n in block_networks(IPBlock("10.0.0.0/8", ("10.1.2.3/32",
                                                                  "10.9.0.0/16")))]
    assert len(nets) > 20
    entries = net_entries(nets, 4)
    assert entries == ["10.0.0.0/8", "10.1.2.3/32 nomatch", "10.9.0.0/16 nomatch"]
    assert read_net(entries, 4) == canonical(Ruleset({"c": AddressSet(
        "c", 4, NET, frozenset(nets))})).sets["c"].elements


def test_the_whole_address_space_is_two_halves() -> None:
    assert net_entries(["0.0.0.0/0"], 4) == ["0.0.0.0/1", "128.0.0.0/1"]
    assert net_entries(["::/0"], 6) == ["::/1", "8000::/1"]
    assert read_net(["0.0.0.0/1", "128.0.0.0/1"], 4) == frozenset({"0.0.0.0/0"})
    from stockade.compile.lower import block_networks
    nets = [str(n) for n in block_networks(IPBlock("0.0.0.0/0", ("10.0.0.0/8",)))]
    entries = net_entries(nets, 4)
    assert entries == ["0.0.0.0/1", "10.0.0.0/8 nomatch", "128.0.0.0/1"]


def test_a_few_networks_stay_as_they_are() -> None:
    assert net_entries(["10.0.0.0/24", "10.0.2.0/24"], 4) == ["10.0.0.0/24", "10.0.2.0/24"]
    big, hole = ipaddress.IPv4Network("10.0.0.0/8"), ipaddress.IPv4Network("10.0.0.0/16")
    assert read_net(["10.0.0.1", "10.0.0.0/8", "10.0.0.0/16 nomatch"], 4) == frozenset(
        str(n) for n in ipaddress.collapse_addresses(
            [*big.address_exclude(hole), ipaddress.IPv4Network("10.0.0.1/32")]))


# ---- rendering -------------------------------------------------------------------------------

def _ns(name: str) -> Namespace:
    return Namespace(name, Labels({"kubernetes.io/metadata.name": name}))


def _ep(name: str, *ips: str, **labels: str) -> Endpoint:
    return Endpoint("x", name, Labels({"app": name, **labels}), ips,
                    (ContainerPort(8080, "TCP", "http"),))


POLICIES = (
    NetworkPolicy("x", "db", Selector(Labels({"app": "db"})), ingress=(
        Rule((*(PolicyPort("TCP", p) for p in range(5000, 5040, 2)),
              PolicyPort("UDP", 53), PolicyPort("SCTP", 7000, 7010)),
             (Peer(pod_selector=Selector(Labels({"role": "api"}))),
              Peer(ip_block=IPBlock("192.168.0.0/16", ("192.168.1.0/24",))))),
        Rule((PolicyPort("TCP", "http"),), ()),
    )),
    NetworkPolicy("x", "api", Selector(Labels({"role": "api"})), egress=(
        Rule((PolicyPort("TCP", "http"),), (Peer(pod_selector=Selector(Labels({}))),)),),
        policy_types=("Egress",)),
    NetworkPolicy("x", "web", Selector(Labels({"app": "web"}))),  # deny all ingress
)


def _cluster(*eps: Endpoint) -> Cluster:
    return Cluster((_ns("x"),), eps, POLICIES)


BASE = (_ep("db", "10.0.0.1", "fd00::1"), _ep("api", "10.0.0.2", "fd00::2", role="api"),
        _ep("web", "10.0.0.3", "fd00::3"))


def test_rules_read_as_iptables_save_prints_them() -> None:
    layout = Layout.of("stockade", log_group=100)
    rs = compile_cluster(_cluster(*BASE))
    k = FakeKernel()
    _first(k, layout, rs)
    save = k.save(4)
    assert '-A FORWARD -m comment --comment "stk:' in save
    assert "-m conntrack --ctstate RELATED,ESTABLISHED" in save.split("\n", 7)[6] or \
        "--ctstate RELATED,ESTABLISHED" in save
    # 20 ports and a range: two multiport matches of at most 15 ports each
    first = ",".join(str(p) for p in range(5000, 5030, 2))
    assert f"--dports {first} " in save
    assert "--dports 5030,5032,5034,5036,5038 " in save
    assert '-j NFLOG --nflog-prefix "stockade-deny i-' in save
    assert "-p ipv6-icmp -m icmp6 --icmpv6-type 135" in k.save(6)
    assert "nomatch" in k.ipset_save()
    for line in save.splitlines():
        if line.startswith("-A stockade-"):
            assert '--comment "stk:' in line


def test_render_then_read_back_is_in_sync_in_both_families() -> None:
    layout = Layout.of("stockade", log_group=100)
    rs = compile_cluster(_cluster(*BASE))
    k = FakeKernel()
    _first(k, layout, rs)
    state = k.read(layout, dict(rs.chains))
    assert not state.needs_repair, state.drift
    assert state.ruleset == canonical(rs)
    assert plan(state.ruleset, canonical(rs)).empty
    # a new reader that does not know the chains: they read as tampered, never as ours
    assert not parse_kernel(layout, {4: k.save(4), 6: k.save(6)}, k.ipset_save(),
                            {}).ruleset.chains.keys() - rs.chains.keys()


def test_an_endpoint_change_is_only_ipset_lines() -> None:
    layout = Layout.of("stockade")
    old = compile_cluster(_cluster(*BASE))
    k = FakeKernel()
    _first(k, layout, old)
    new = compile_cluster(_cluster(*BASE, _ep("api2", "10.0.0.4", role="api")))
    before = k.processes
    steps = _apply(k, layout, old, new)
    assert [s.tool for s in steps] == ["ipset"]
    assert k.processes == before + 1
    assert all(line.startswith(("add ", "del ")) for line in steps[0].lines)
    assert k.read(layout, dict(new.chains)).ruleset == canonical(new)
    # and back: only deletions
    steps = _apply(k, layout, new, old)
    assert [s.tool for s in steps] == ["ipset"]
    assert all(line.startswith("del ") for line in steps[0].lines)
    assert k.read(layout, dict(old.chains)).ruleset == canonical(old)


def test_a_policy_change_rewrites_only_the_chains_concerned() -> None:
    layout = Layout.of("stockade")
    eps = (*BASE, _ep("other", "10.0.0.9", "fd00::9"))
    old = compile_cluster(_cluster(*eps))
    k = FakeKernel()
    _first(k, layout, old)
    extra = NetworkPolicy("x", "other", Selector(Labels({"app": "other"})),
                          ingress=(Rule((PolicyPort("TCP", 22),), ()),))
    new = compile_cluster(Cluster((_ns("x"),), eps, (*POLICIES, extra)))
    steps = _apply(k, layout, old, new)
    ipt = [s for s in steps if s.tool == "iptables"]
    assert ipt and all(s.lines[0] == "*filter" for s in ipt)
    added = set(new.chains) - set(old.chains)
    text = "".join(s.text for s in ipt)
    for name in old.chains:
        assert f":stockade-{name} " not in text  # untouched chains are not rewritten
    for name in added:
        assert f":stockade-{name} " in text
    assert "-j stockade-forward" not in text  # the skeleton is not rewritten
    state = k.read(layout, {**old.chains, **new.chains})
    assert not state.needs_repair and state.ruleset == canonical(new)
    # removing the policy again deletes the chain and its dispatch sets
    _apply(k, layout, new, old)
    state = k.read(layout, dict(old.chains))
    assert not state.needs_repair and state.ruleset == canonical(old)
    assert not [n for n in k.sets if any(a[2:] in n for a in added)]


def test_removal_leaves_nothing_of_ours_and_everything_else() -> None:
    layout = Layout.of("stockade")
    k = FakeKernel()
    k.chains[4][FORWARD].append("-j ACCEPT")
    k.sets["user-set"] = FakeSet("hash:ip family inet maxelem 65536")
    _first(k, layout, compile_cluster(_cluster(*BASE)))
    k.run(render_remove(layout, {4: k.save(4), 6: k.save(6)}, k.ipset_save()))
    assert k.chains == {4: {FORWARD: ["-j ACCEPT"]}, 6: {FORWARD: []}}
    assert list(k.sets) == ["user-set"]


# ---- drift ------------------------------------------------------------------------------

def _drifted(tamper: object) -> tuple[KernelState, FakeKernel, Layout, Ruleset]:
    layout = Layout.of("stockade", log_group=7)
    rs = compile_cluster(_cluster(*BASE))
    k = FakeKernel()
    _first(k, layout, rs)
    tamper(k)  # type: ignore[operator]
    state = k.read(layout, dict(rs.chains))
    return state, k, layout, rs


def _repair(state: KernelState, k: FakeKernel, layout: Layout, rs: Ruleset) -> None:
    _apply(k, layout, state.ruleset, rs, state)
    after = k.read(layout, dict(rs.chains))
    assert not after.needs_repair, after.drift
    assert after.ruleset == canonical(rs)


def _policy_chain(k: FakeKernel) -> str:
    return next(c for c in k.chains[4] if c.startswith("stockade-i-"))


@pytest.mark.parametrize("what", ["flush", "foreign rule", "member", "jump", "jump moved",
                                  "dispatch", "set redefined", "foreign chain",
                                  "foreign set", "two dispatch sets", "base chain",
                                  "bucket member", "bucket chain"])
def test_drift_is_found_and_repaired(what: str) -> None:
    def tamper(k: FakeKernel) -> None:
        chain = _policy_chain(k)
        if what == "flush":
            k.chains[4][chain] = []
        elif what == "foreign rule":
            k.chains[4][chain].insert(0, "-j RETURN")
        elif what == "member":
            name = next(n for n, s in k.sets.items() if n.startswith("stockade-s4-")
                        and s.elements)
            k.sets[name].elements.popitem()
        elif what == "jump":
            k.chains[6][FORWARD].clear()
        elif what == "jump moved":
            k.chains[4][FORWARD].insert(0, "-j ACCEPT")
        elif what == "dispatch":
            k.chains[4]["stockade-ingress"].clear()
        elif what == "set redefined":
            name = next(n for n in k.sets if n.startswith("stockade-s4-"))
            k.sets[name].definition = "hash:ip family inet maxelem 65536"
        elif what == "foreign chain":
            k.chains[4]["stockade-mine"] = ["-j DROP"]
        elif what == "foreign set":
            k.sets["stockade-x"] = FakeSet("hash:ip family inet maxelem 1")
        elif what == "two dispatch sets":
            holder = next(n for n, s in k.sets.items() if n.startswith("stockade-i4-")
                          and "10.0.0.1" in s.elements)
            other = next(n for n in k.sets if n.startswith("stockade-i4-") and n != holder)
            k.sets[other].elements["10.0.0.1"] = False
        elif what == "base chain":
            k.chains[4]["stockade-forward"].pop(0)
        elif what == "bucket member":
            name = next(n for n, s in k.sets.items() if n.startswith("stockade-ib4-")
                        and s.elements)
            k.sets[name].elements.popitem()
        elif what == "bucket chain":
            name = next(c for c, r in k.chains[6].items() if c.startswith("stockade-ib-")
                        and len(r) > 1)
            k.chains[6][name] = k.chains[6][name][-1:]

    state, k, layout, rs = _drifted(tamper)
    if what == "member":  # a plain difference of elements: the plan puts it back
        assert not plan(state.ruleset, canonical(rs)).empty
    else:
        assert state.needs_repair
        assert state.drift, what
    _repair(state, k, layout, rs)
    if what == "jump moved":
        assert k.chains[4][FORWARD][1] == "-j ACCEPT"  # the user's rule stays
    assert any(n.startswith("stockade-e4-") for n in k.sets)


def test_a_chain_known_to_nobody_is_deleted() -> None:
    layout = Layout.of("stockade")
    old = compile_cluster(_cluster(*BASE))
    k = FakeKernel()
    _first(k, layout, old)
    new = compile_cluster(Cluster((_ns("x"),), BASE, ()))
    state = k.read(layout, {})
    _apply(k, layout, state.ruleset, new, state)
    assert {c for c in k.chains[4] if c.startswith("stockade-")} == set(
        skeleton_chains(layout.names))
    assert all(not s.elements for s in k.sets.values())
    assert not [n for n in k.sets if n.startswith("stockade-") and "b4-" not in n
                and "b6-" not in n]


def test_a_chain_left_in_one_family_by_a_cut_short_apply_is_removed() -> None:
    """A kill -9 between the families' steps leaves a chain in IPv4 only; the next
    process deletes it there and writes nothing about it for IPv6."""
    layout = Layout.of("stockade")
    old = compile_cluster(_cluster(*BASE))
    k = FakeKernel()
    _first(k, layout, old)
    gone = _policy_chain(k)
    for rules in k.chains[6].values():  # as if IPv6's step had not run
        rules[:] = [r for r in rules if gone not in r]
    del k.chains[6][gone]
    new = compile_cluster(Cluster((_ns("x"),), BASE, ()))
    state = k.read(layout, dict(new.chains))
    _apply(k, layout, state.ruleset, new, state)  # refused before: -F of a missing chain
    after = k.read(layout, dict(new.chains))
    assert not after.needs_repair and after.ruleset == canonical(new)
    assert gone not in k.chains[4]


def test_a_refused_iptables_restore_changes_nothing_of_that_table() -> None:
    layout = Layout.of("stockade")
    k = FakeKernel()
    rs = compile_cluster(_cluster(*BASE))
    _first(k, layout, rs)
    before = {f: {c: list(r) for c, r in t.items()} for f, t in k.chains.items()}
    bad = Ruleset(rs.sets, {"i-bad": Chain("i-bad", "ingress", (
        ChainRule(4, "s4-missing"),))}, {}, {})
    with pytest.raises(Refused):
        k.run(render_plan(layout, plan(rs, bad), rs))
    assert k.chains == before
    # the ipset step before it left the new chain's dispatch sets: the next verifying
    # apply removes them
    assert "stockade-i4-bad" in k.sets
    state = k.read(layout, dict(rs.chains))
    assert state.needs_repair
    _repair(state, k, layout, rs)
    assert "stockade-i4-bad" not in k.sets


# ---- semantics ----------------------------------------------------------------------------

def test_the_rendered_rules_allow_what_the_ir_allows_on_the_corpus() -> None:
    checked = 0
    layout = Layout.of("stk", log_group=100)
    for case in _cases():
        rs = compile_cluster(case.cluster)
        k = FakeKernel()
        _first(k, layout, rs)
        state = k.read(layout, dict(rs.chains))
        assert not state.needs_repair, (case.id, state.drift)
        ev = Evaluator(case.cluster)
        for group in case.probes:
            for src, dst in case.pairs():
                flow = ev.flow(src, dst, group.port, group.protocol)
                if flow.src_ip == flow.dst_ip:
                    continue  # never forwarded
                want = interpret.allows(rs, flow.src_ip, flow.dst_ip, flow.protocol, flow.port)
                got = k.verdict(flow.src_ip, flow.dst_ip, flow.protocol.lower(), flow.port)
                assert got == want, (case.id, group.render(), src.key, dst.key)
                checked += 1
    assert checked > 10_000


@pytest.mark.parametrize("same_bucket", [True, False])
def test_moving_an_endpoint_never_leaves_it_unenforced_between_steps(same_bucket: bool) -> None:
    layout = Layout.of("stockade")
    a = Chain("i-aaaaaaaaaaaa", "ingress", (ChainRule(protocol="tcp", ports=((80, 80),)),))
    b = next(c for i in range(100) if (c := Chain(f"i-{i:012d}", "ingress", (
        ChainRule(protocol="tcp", ports=((81, 81),)),))) and (
            bucket_of(c.name) == bucket_of(a.name)) == same_bucket)
    chains = {a.name: a, b.name: b}
    old = Ruleset({}, chains, {"10.0.0.3": a.name, "10.0.0.4": b.name}, {})
    new = Ruleset({}, chains, {"10.0.0.3": b.name, "10.0.0.4": b.name}, {})
    k = FakeKernel()
    _first(k, layout, old)
    steps = render_plan(layout, plan(old, new), old)
    assert [s.tool for s in steps] == ["ipset"]
    for line in ["", *steps[0].lines]:
        if line:
            k._ipset([line])
        # at every line of the session 10.0.0.3 is under its old chain or its new one:
        # exactly one of the two ports passes (neither: dropped; both: unenforced)
        seen = [k.verdict("10.9.9.9", "10.0.0.3", "tcp", port) for port in (80, 81)]
        assert seen in ([True, False], [False, True]), line
    assert k.read(layout, chains).ruleset == new


def test_dispatch_does_not_grow_with_endpoints_or_linearly_with_chains() -> None:
    layout = Layout.of("stockade")
    chains = {f"i-{i:012x}": Chain(f"i-{i:012x}", "ingress", ()) for i in range(800)}
    ingress = {f"10.{i // 250}.{i % 250}.1": f"i-{i % 800:012x}" for i in range(5000)}
    rs = Ruleset({}, chains, ingress, {})
    k = FakeKernel()
    _first(k, layout, rs)
    assert len(k.chains[4]["stockade-ingress"]) == BUCKETS
    biggest = max(len(r) for c, r in k.chains[4].items() if c.startswith("stockade-ib-"))
    assert biggest < 3 * 800 / BUCKETS
    assert not k.verdict("10.9.9.9", "10.3.7.1", "tcp", 80)
    assert k.verdict("10.9.9.9", "10.99.7.1", "tcp", 80)


def test_interval_set_rewrites_go_through_a_swap() -> None:
    layout = Layout.of("stockade")
    s_old = AddressSet("c4-aaaaaaaaaaaa", 4, NET, frozenset({"10.0.0.0/8"}))
    s_new = replace(s_old, elements=frozenset({"10.0.0.0/9"}))
    ch = Chain("i-aaaaaaaaaaaa", "ingress", (ChainRule(4, s_old.name),))
    old = Ruleset({s_old.name: s_old}, {ch.name: ch}, {"10.1.1.1": ch.name}, {})
    new = Ruleset({s_new.name: s_new}, {ch.name: ch}, {"10.1.1.1": ch.name}, {})
    steps = render_plan(layout, plan(old, new), old)
    assert [s.tool for s in steps] == ["ipset"]
    assert "swap stockade-tc4-aaaaaaaaaaaa stockade-c4-aaaaaaaaaaaa" in steps[0].lines
    k = FakeKernel()
    _first(k, layout, old)
    k.run(steps)
    assert k.read(layout, dict(new.chains)).ruleset == canonical(new)
    assert ADDR != NET


# ---- random clusters (hypothesis, the property tests' strategies) ----------------------

@settings(max_examples=60, deadline=None)
@given(a=scenarios(DEFAULT.with_features(named_ports=True)),
       b=scenarios(DEFAULT.with_features(named_ports=True)))
def test_random_rulesets_decide_like_the_interpreter_and_plans_between_them_converge(
        a: Scenario, b: Scenario) -> None:
    layout = Layout.of("stk", log_group=9)
    k = FakeKernel()
    first, second = compile_cluster(a.cluster), compile_cluster(b.cluster)
    _first(k, layout, first)
    for sc, rs in ((a, first), (b, second)):
        if rs is second:
            steps = _apply(k, layout, canonical(first), rs)
            if plan(canonical(first), canonical(second)).empty:
                assert steps == []
        state = k.read(layout, dict(rs.chains))
        assert not state.needs_repair, state.drift
        assert state.ruleset == canonical(rs)
        for flow in sc.flows():
            if flow.src_ip == flow.dst_ip:
                continue
            want = interpret.allows(rs, flow.src_ip, flow.dst_ip, flow.protocol, flow.port)
            got = k.verdict(flow.src_ip, flow.dst_ip, flow.protocol.lower(), flow.port)
            assert got == want, flow
