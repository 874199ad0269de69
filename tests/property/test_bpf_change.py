"""The eBPF map contents worked out from a change equal those compiled whole.

Random clusters (with named ports, ipBlocks and, in the second test, ClusterNetworkPolicy
tiers) go through the incremental compiler and random changes, as in the agent. After
each change `bpf_change.changed_state` must give what `bpf.compile_state` gives from the
whole ruleset and the previous state (the same ids included), with an index equal to
one worked out from the contents, and `state_delta` from its record of what changed must
equal the delta found by comparing everything. The same change worked out without the
incremental compiler's record of what may differ (every set and map entry looked at)
must be the same. A change it declines (a chain changed
under its name) is compiled whole and the walk goes on from there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from hypothesis import event, given, settings
from hypothesis import strategies as st
from tests.property.strategies import (
    DEFAULT,
    DENSE,
    clusters,
    label_maps,
    namespace_vocab,
    network_policies,
    pod_vocab,
)
from tests.property.tier_strategies import cluster_network_policies, cnp_clusters

from stockade.compile import bpf
from stockade.compile.bpf_change import changed_state
from stockade.compile.incremental import IncrementalCompiler
from stockade.compile.ir import INGRESS as INGRESS_DIR
from stockade.compile.ir import NET, Ruleset
from stockade.model.cluster import Cluster, Endpoint, Namespace
from stockade.model.policy import NetworkPolicy

FEATURES = DENSE.with_features(named_ports=True)


def _follow(previous: bpf.BpfState, before: Ruleset, rs: Ruleset, *, unrecorded: bool = False
            ) -> tuple[bpf.BpfState, bool]:
    whole = bpf.compile_state(rs, previous)
    changed = changed_state(rs, previous, before)
    if unrecorded:
        # the same without the compiler's record of what may differ (plan.derive): every
        # set and map entry looked at
        assert changed_state(replace(rs), previous, before) == changed
    if changed is None:
        return whole, False
    assert changed == whole
    assert changed.index is not None
    bare = replace(changed, index=None)
    recomputed = bpf.index_of(bare)
    # (a policy without entries is known to the index only as worked out: left out here)
    def flat(keys_of: Mapping[int, bpf.PeerKeys]) -> dict[int, set[bpf.PolicyKey]]:
        got = {pid: {k for keys in by_peer.values() for k in keys}
               for pid, by_peer in keys_of.items()}
        return {pid: keys for pid, keys in got.items() if keys}

    assert flat(changed.index.keys_of) == flat(recomputed.keys_of)
    # each key under its own policy and peer
    assert all(k[0] == pid and k[1] == peer for pid, by_peer in changed.index.keys_of.items()
               for peer, keys in by_peer.items() for k in keys)
    assert changed.index.with_any == recomputed.with_any
    # the inverted numbers handed on to the next change
    for what, numbered in (("identities", changed.identities), ("policies", changed.policies)):
        assert changed.index.memo[what] == {v: i for i, v in numbered.items()}, what
    if "by_set" in changed.index.memo:
        for have, want in zip(changed.index.memo["by_set"],
                              bpf.identities_by_set(changed.identities), strict=True):
            assert {k: sorted(v) for k, v in have.items()} == {
                k: sorted(v) for k, v in want.items()}
    assert changed.index.memo["net_sets"] == {n for n, s in rs.sets.items() if s.kind == NET}
    if "naming" in changed.index.memo:  # the policies naming each set
        naming: dict[str, set[int]] = {}
        for pid, ref in changed.policies.items():
            for rule in rs.chains[ref.chain].rules:
                for name in (rule.peer_set, rule.named_set):
                    if name:
                        naming.setdefault(name, set()).add(pid)
        assert changed.index.memo["naming"] == naming
    for uses in ("identity_uses", "entry_uses", "stage_uses"):
        assert dict(getattr(changed.index, uses)) == dict(getattr(recomputed, uses)), uses
    for slot in (0, 1):
        assert bpf.state_delta(previous, changed, slot) == bpf.state_delta(previous, bare, slot)
    # the meta map's delta, from the change's record of what may differ
    assert bpf.meta_delta(previous, changed) == bpf.map_delta(
        {"meta": bpf.encode_meta(previous)}, {"meta": bpf.encode_meta(changed)})
    return changed, True


def _same_judgements_each_step(old: bpf.BpfState, new: bpf.BpfState, c: Cluster) -> None:
    """A change `bpf.in_place` allows, written in `in_place_steps`' order: after the
    policy entries written every connection is judged as before, after the ipcache
    entry as after (the entries still to delete change nothing)."""
    assert new.index is not None
    written = {k: v for k in new.index.policy_keys
               if (v := new.policy.get(k)) is not None and old.policy.get(k) != v}
    first = replace(old, policy={**old.policy, **written})
    second = replace(first, ipcache=new.ipcache)
    ips = sorted({ip for ep in c.endpoints for ip in ep.ips} | {"192.0.2.1", "2001:db8::1"})
    ports = sorted({p.port for ep in c.endpoints for p in ep.ports} | {53, 80})
    judges = [bpf.Judge(s) for s in (first, old, second, new)]
    for src in ips:
        for dst in ips:
            if (":" in src) != (":" in dst):
                continue
            for proto in ("TCP", "UDP"):
                for port in ports:
                    probe = (src, dst, proto, port)
                    a, b, c2, d = (j.allows(*probe) for j in judges)
                    assert a == b, probe
                    assert c2 == d, probe


def _walk(data: st.DataObject, c: Cluster, inc: IncrementalCompiler, steps: int,
          cnps: list[str] | None = None) -> int:
    before = inc.ruleset()
    state = bpf.compile_state(before)
    eps = list(c.endpoints)
    worked = 0
    for _ in range(steps):
        kinds = ["relabel", "gone", "back", "namespace", "ports", "policy", "no-policy"]
        if cnps is not None:
            kinds.append("cnp")
        kind = data.draw(st.sampled_from(kinds))
        if kind in ("relabel", "gone", "back", "ports") and not eps:
            continue
        if kind == "relabel":
            ep = data.draw(st.sampled_from(eps))
            inc.upsert_endpoint(replace(ep, labels=data.draw(label_maps(pod_vocab(DENSE)))))
        elif kind == "gone":
            inc.delete_endpoint(data.draw(st.sampled_from(eps)).key)
        elif kind == "back":
            inc.upsert_endpoint(data.draw(st.sampled_from(eps)))
        elif kind == "ports":
            ep = data.draw(st.sampled_from(eps))
            other = data.draw(st.sampled_from(eps))
            inc.upsert_endpoint(replace(ep, ports=other.ports))
        elif kind == "namespace" and c.namespaces:
            ns = data.draw(st.sampled_from(c.namespaces))
            inc.upsert_namespace(Namespace(ns.name, data.draw(
                label_maps(namespace_vocab(DENSE)))))
        elif kind == "policy" and c.namespaces:
            name = data.draw(st.sampled_from([p.name for p in c.policies] + ["np-new"]))
            inc.upsert_policy(data.draw(network_policies(
                DENSE, name=name, namespace_names=[ns.name for ns in c.namespaces])))
        elif kind == "no-policy" and c.policies:
            inc.delete_policy(data.draw(st.sampled_from(c.policies)).key)
        elif kind == "cnp" and cnps is not None:
            inc.upsert_cluster_policy(data.draw(cluster_network_policies(
                DENSE, data.draw(st.sampled_from(cnps)))))
        rs = inc.ruleset()
        previous = state
        state, done = _follow(state, before, rs, unrecorded=data.draw(st.booleans()))
        event(f"{kind}: {'worked out' if done else 'compiled whole'}")
        if bpf.in_place(previous, state):
            event(f"{kind}: written in place")
            _same_judgements_each_step(previous, state, c)
        nets = [{n for n, s in r.sets.items() if s.kind == NET} for r in (before, rs)]
        if nets[0] != nets[1]:
            event(f"ipBlocks changed: {'worked out' if done else 'compiled whole'}")
        worked += done
        before = rs
    return worked


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_changes_worked_out_equal_a_whole_compile(data: st.DataObject) -> None:
    c = data.draw(st.sampled_from([FEATURES, DEFAULT.with_features(named_ports=True)]).flatmap(
        lambda u: clusters(u, with_policies=True, min_policies=1)))
    _walk(data, c, IncrementalCompiler.of(c), data.draw(st.integers(1, 10)))


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_changes_under_tiers_worked_out_equal_a_whole_compile(data: st.DataObject) -> None:
    c = data.draw(cnp_clusters(DENSE, min_cnps=1, max_cnps=3))
    names = [p.name for p in c.cluster_policies]
    _walk(data, c, IncrementalCompiler.of(c), data.draw(st.integers(1, 8)), names)


def _web_from_api() -> tuple[NetworkPolicy, tuple[Endpoint, ...], IncrementalCompiler]:
    """Six pods of one namespace, web and api by turns, web admitting api."""
    from stockade.model.labels import Labels
    from stockade.model.policy import Peer, Rule
    from stockade.model.selector import Selector

    policy = NetworkPolicy("ns", "web", Selector(Labels({"app": "web"})), ingress=(Rule(
        peers=(Peer(pod_selector=Selector(Labels({"app": "api"}))),)),),
        policy_types=("Ingress",))
    eps = tuple(Endpoint("ns", f"p{i}", Labels({"app": "web" if i % 2 else "api"}),
                         (f"10.0.0.{i + 1}",)) for i in range(6))
    return policy, eps, IncrementalCompiler.of(
        Cluster((Namespace("ns", Labels({})),), eps, (policy,)))


def test_an_endpoint_added_is_worked_out_not_declined() -> None:
    # The common change must take the short way, or the property above proves little.
    from stockade.compile.lower import compile_cluster
    from stockade.model.labels import Labels

    _, _, inc = _web_from_api()
    before = inc.ruleset()
    state = bpf.compile_state(before)
    # (a pod no set holds and no policy selects is in no map: nothing changes)
    for name, app, ip, touched in (("new-web", "web", "10.0.0.50", 1),
                                   ("new-api", "api", "10.0.0.51", 1),
                                   ("other", "db", "10.0.0.52", 0)):
        inc.upsert_endpoint(Endpoint("ns", name, Labels({"app": app}), (ip,)))
        rs = inc.ruleset()
        assert rs == compile_cluster(inc.cluster())
        state, worked = _follow(state, before, rs)
        assert worked, name
        assert state.index is not None and len(state.index.prefixes) == touched
        before = rs


def test_a_chain_whose_comment_alone_changed_is_in_the_meta_delta() -> None:
    # Web's pods denied all ingress, then by a second policy too: their chain (named by
    # its rules, none) is the same, its comment names both policies. Chain equality
    # leaves the comment out; the meta map holds it, so the change's record must name
    # the chain.
    from stockade.compile.plan import derived

    policy, _, inc = _web_from_api()
    inc.upsert_policy(replace(policy, ingress=()))
    before = inc.ruleset()
    state = bpf.compile_state(before)
    inc.upsert_policy(replace(policy, name="web-too", ingress=()))
    rs = inc.ruleset()
    (name,) = [n for n, c in rs.chains.items() if c.comment != before.chains[n].comment]
    assert rs.chains[name] == before.chains[name]
    touched = derived(rs, before)
    assert touched is not None and name in touched.chains
    changed, worked = _follow(state, before, rs)  # meta_delta against the whole encoding
    assert worked
    assert bpf.meta_delta(state, changed).update["meta"]


def test_an_endpoints_change_is_written_in_place_a_policys_is_not() -> None:
    from stockade.model.labels import Labels
    from stockade.model.policy import Peer, PolicyPort, Rule
    from stockade.model.selector import Selector

    api = Selector(Labels({"app": "api"}))
    policy, eps, inc = _web_from_api()
    before = inc.ruleset()
    state = bpf.compile_state(before)
    steps = [
        ("added, a known identity", True,
         lambda: inc.upsert_endpoint(Endpoint("ns", "new", Labels({"app": "web"}),
                                              ("10.0.0.50",)))),
        ("added, a new identity", True,
         lambda: inc.upsert_endpoint(Endpoint("ns", "new2", Labels({"app": "web", "v": "2"}),
                                              ("10.0.0.51",)))),
        ("relabelled", True, lambda: inc.upsert_endpoint(replace(eps[0], labels=Labels(
            {"app": "web"})))),
        ("removed", True, lambda: inc.delete_endpoint(eps[2].key)),
        ("the last of an identity removed", True, lambda: inc.delete_endpoint(
            ("ns", "new2"))),
        ("a policy changed", False, lambda: inc.upsert_policy(replace(policy, ingress=(
            Rule((PolicyPort("TCP", 80),), (Peer(pod_selector=api),)),)))),
    ]
    for what, expected, change in steps:
        change()
        rs = inc.ruleset()
        previous = state
        state, worked = _follow(state, before, rs)
        assert worked, what
        assert bpf.in_place(previous, state) is expected, what
        if expected:
            _same_judgements_each_step(previous, state, inc.cluster())
        before = rs
    # A state not made from the other by a change says nothing of what differs.
    assert not bpf.in_place(state, bpf.compile_state(before, state))


def test_an_identity_number_taken_over_in_the_same_change_is_not_written_in_place() -> None:
    """The last pod of one identity relabelled to another: the new identity takes the
    freed number, so no ipcache entry changes and the verdicts under that number do.
    Written in place, the pod would be judged by a mix of the two for a moment."""
    from stockade.model.labels import Labels
    from stockade.model.policy import NetworkPolicy, Peer, PolicyPort, Rule
    from stockade.model.selector import Selector

    def sel(app: str) -> Selector:
        return Selector(Labels({"app": app}))

    policy = NetworkPolicy("ns", "web", sel("web"), ingress=(
        Rule((PolicyPort("TCP", 80),), (Peer(pod_selector=sel("db")),)),
        Rule((PolicyPort("TCP", 443),), (Peer(pod_selector=sel("db2")),))),
        policy_types=("Ingress",))
    db = Endpoint("ns", "d", Labels({"app": "db"}), ("10.0.0.2",))
    inc = IncrementalCompiler.of(Cluster((Namespace("ns", Labels({})),), (
        Endpoint("ns", "w", Labels({"app": "web"}), ("10.0.0.1",)), db), (policy,)))
    before = inc.ruleset()
    state = bpf.compile_state(before)
    inc.upsert_endpoint(replace(db, labels=Labels({"app": "db2"})))
    after, worked = _follow(state, before, inc.ruleset())
    assert worked and after.identities.keys() == state.identities.keys()
    assert after.ipcache == state.ipcache and after.policy != state.policy
    assert not bpf.in_place(state, after)


def test_the_steps_in_place_write_policy_entries_then_the_ipcache_then_deletions() -> None:
    delta = bpf.MapDelta({"policy": {b"k1": b"v"}, "ipcache4": {b"i": b"v"}, "ipcache6": {}},
                         {"policy": (b"k2",), "ipcache4": (), "ipcache6": (b"j",)})
    first, second, third = bpf.in_place_steps(delta)
    assert (first.update, first.size()) == ({"policy": {b"k1": b"v"}}, 1)
    assert second.update == {"ipcache4": {b"i": b"v"}, "ipcache6": {}}
    assert second.delete == {"ipcache4": (), "ipcache6": (b"j",)}
    assert (third.delete, third.size()) == ({"policy": (b"k2",)}, 1)


def test_an_ipblock_set_changed_under_its_name_moves_only_what_it_no_longer_covers() -> None:
    # Lowering names an ipBlock's set by its content, so its sets only come and go; a
    # set whose networks change under its name must still be worked out right: a
    # prefix inside a network that went, but still inside a wider one, keeps the set.
    from stockade.compile.lower import compile_cluster
    from stockade.model.labels import Labels
    from stockade.model.policy import IPBlock, NetworkPolicy, Peer, Rule
    from stockade.model.selector import Selector

    policy = NetworkPolicy("ns", "from-net", Selector(Labels({"app": "web"})), ingress=(
        Rule(peers=(Peer(ip_block=IPBlock("10.0.0.0/8")),)),), policy_types=("Ingress",))
    eps = (Endpoint("ns", "web", Labels({"app": "web"}), ("10.1.2.3",)),
           Endpoint("ns", "other", Labels({"app": "db"}), ("10.1.2.4",)),
           Endpoint("ns", "far", Labels({"app": "db"}), ("10.2.0.9",)))
    rs = compile_cluster(Cluster((Namespace("ns", Labels({})),), eps, (policy,)))
    (name,) = [n for n, s in rs.sets.items() if s.kind == NET]

    def networks(*nets: str) -> Ruleset:
        return replace(rs, sets={**rs.sets, name: replace(rs.sets[name],
                                                          elements=frozenset(nets))})

    state = bpf.compile_state(rs)
    before = rs
    for nets in (("10.0.0.0/8", "10.1.0.0/16"), ("10.0.0.0/8",), ("10.1.0.0/16",),
                 ("10.1.2.0/24", "10.2.0.0/16"), ("10.0.0.0/8", "10.1.2.0/24")):
        after = networks(*nets)
        state, worked = _follow(state, before, after)
        assert worked, nets
        before = after


def test_a_change_that_moves_most_prefixes_is_compiled_whole() -> None:
    # A wide ipBlock moves every pod inside it to another identity: past a quarter of
    # the prefixes (and 1,024), working it out costs more than compiling whole.
    from stockade.compile.lower import compile_cluster
    from stockade.model.labels import Labels
    from stockade.model.policy import IPBlock, NetworkPolicy, Peer, Rule
    from stockade.model.selector import ALL, Selector

    eps = tuple(Endpoint("ns", f"p{i}", Labels({"app": "db" if i else "web"}),
                         (f"10.1.{i // 250}.{i % 250 + 1}",)) for i in range(1200))
    ns = (Namespace("ns", Labels({})),)
    isolated = NetworkPolicy("ns", "all", ALL, policy_types=("Ingress",))

    def from_block(cidr: str) -> Ruleset:
        web = NetworkPolicy("ns", "web", Selector(Labels({"app": "web"})), ingress=(
            Rule(peers=(Peer(ip_block=IPBlock(cidr)),)),), policy_types=("Ingress",))
        return compile_cluster(Cluster(ns, eps, (isolated, web)))

    before = from_block("192.168.0.0/16")  # no pod inside
    state = bpf.compile_state(before)
    narrow = from_block("10.1.0.0/26")  # 63 pods inside
    assert _follow(state, before, narrow)[1]
    wide = from_block("10.1.0.0/16")  # all 1,200
    assert changed_state(wide, state, before) is None
    assert changed_state(from_block("10.1.0.0/22"), state, before) is not None  # 1,000


def test_a_tier_chain_rewritten_under_its_name_is_worked_out() -> None:
    # A tier's chain is named by what it selects, so its rules change under its name:
    # its policies' entries are worked out again; when it gains entries keyed by ANY,
    # every prefix it judges gets the flag in its stage id; when its rules come or go,
    # or it names other named-port sets, the prefixes it judges are judged again.
    from stockade.compile.ir import ADDR, ADDR_PORT, ALLOW, DENY, AddressSet, Chain, ChainRule

    sets = {"web": AddressSet("web", 4, ADDR, frozenset({"10.0.0.1", "10.0.0.2"})),
            "db": AddressSet("db", 4, ADDR, frozenset({"10.0.0.3"})),
            "http": AddressSet("http", 4, ADDR_PORT, frozenset({("10.0.0.1", "TCP", 8080)})),
            "admin": AddressSet("admin", 4, ADDR_PORT,
                                frozenset({("10.0.0.1", "TCP", 9090)}))}
    np_chain = Chain("np", INGRESS_DIR, (ChainRule(peer_set="web"),))

    def ruleset(*rules: ChainRule, tier: str = "Admin", after: str | None = "np") -> Ruleset:
        chain = Chain("admin-1", INGRESS_DIR, rules, tier=tier, next=after)
        return Ruleset(sets, {"np": np_chain, "admin-1": chain},
                       {"10.0.0.1": "admin-1", "10.0.0.2": "admin-1", "10.0.0.3": "np"}, {})

    deny_db = ChainRule(peer_set="db", action=DENY)
    steps = [
        ruleset(deny_db),
        ruleset(ChainRule(protocol="TCP", ports=((22, 22),), action=DENY), deny_db),  # ANY
        ruleset(deny_db),  # ANY gone
        ruleset(),  # no rules: the side is judged by np alone
        ruleset(deny_db),  # back
        ruleset(ChainRule(peer_set="db", named_set="http", action=DENY)),
        ruleset(ChainRule(peer_set="db", named_set="admin", action=DENY)),
        ruleset(ChainRule(peer_set="web", action=ALLOW), deny_db),
        ruleset(deny_db, after=None),  # (a new chain's name in lowering, not here)
        ruleset(ChainRule(peer_set="db"), tier="", after=None),  # final: another stage id
        ruleset(deny_db, after=None),
    ]
    before = steps[0]
    state = bpf.compile_state(before)
    for i, rs in enumerate(steps[1:], 1):
        state, worked = _follow(state, before, rs)
        assert worked, i
        before = rs
