"""The incremental compiler: one change in, the ruleset out, without recompiling.

It keeps the cluster and everything derived from it: which sets exist (those
the live chains name) and who is in them, which chain serves which endpoint,
and the two address -> chain maps. An endpoint change touches the sets it
enters or leaves and its own map entries; a policy change rebuilds only the
chains of the policy sets that contain it and moves only the endpoints it
selects; a namespace relabel re-examines only namespace-selecting sets. Sets
and chains that do not change keep their identity, so a plan against the
previous ruleset skips them at once.

ClusterNetworkPolicy tiers: an endpoint-direction's map entry is the first of
its run of chains (see `Lowering._entry`): a link chain that calls the shared
Admin chain and goes on in the NetworkPolicy or Baseline chain, or one of those
alone. Every chain of the run counts the endpoint among its users, so each
lives as long as some endpoint's run passes through it. A tier policy's change
moves the endpoints its old or new subject selects; a namespace relabel, with
tiers present, moves that namespace's endpoints too (a subject selects
namespaces by their labels).

`ruleset()` always equals `compile_cluster()` of the same cluster (a property
test replays random changes and compares).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from stockade.compile.ir import (
    EGRESS,
    INGRESS,
    NET,
    AddressSet,
    Chain,
    Element,
    Guard,
    Ruleset,
    guard_of,
)
from stockade.compile.lower import (
    DIRECTION,
    Lowering,
    Need,
    absent,
    endpoint_addresses,
    families_of,
    held_apart,
    lower_chain,
    port_guards,
)
from stockade.compile.membership import PeerMembers, PolicyTargets, SetSpec
from stockade.compile.plan import Touched, derive
from stockade.compile.tiers import link_chain, lower_tier_chain, subject_key
from stockade.engine.resolve import resolve
from stockade.engine.tiers import subject_selects
from stockade.model import policy as model
from stockade.model.cluster import Cluster, Endpoint, Namespace
from stockade.model.cnp import ADMIN, BASELINE, ClusterNetworkPolicy, CnpPeer
from stockade.model.labels import Labels
from stockade.model.selector import EXISTS, IN

PolicySetKey = tuple[str, tuple[str, ...]]  # (model direction, sorted policy keys)
# (model direction, tier, policy names in precedence order, the next chain)
TierKey = tuple[str, str, tuple[str, ...], str | None]
Members = Callable[[SetSpec], list[Endpoint]]


class IncrementalCompiler:
    def __init__(self) -> None:
        self.namespace_labels: dict[str, Labels] = {}
        self.endpoints: dict[str, Endpoint] = {}
        self.policies: dict[str, model.NetworkPolicy] = {}
        self.cluster_policies: dict[str, ClusterNetworkPolicy] = {}
        self._tier_order: list[ClusterNetworkPolicy] = []  # by precedence
        self._subjects: dict[str, CnpPeer] = {}  # their distinct subjects, by subject_key
        # (direction, the subjects selecting a pod) -> its Admin and Baseline policies
        self._by_selection: dict[tuple[str, frozenset[str]],
                                 tuple[tuple[str, ...], tuple[str, ...]]] = {}
        self._tier_cache: dict[tuple[str, str, Labels],
                               tuple[tuple[str, ...], tuple[str, ...]]] = {}
        self._policies_in: dict[str, dict[str, model.NetworkPolicy]] = {}
        self._endpoints_in: dict[str, set[str]] = {}
        # sets: the spec, how many chains name it, element counts, the current object
        self._specs: dict[str, SetSpec] = {}
        self._set_refs: dict[str, int] = {}
        self._elements: dict[str, Counter[Element]] = {}
        self._sets: dict[str, AddressSet] = {}
        self._stale_sets: set[str] = set()
        # Since the last ruleset, per stale set: elements that came (+1) or went (-1)
        # through joins and leaves, so that an endpoint leaving and joining again (a
        # relabel) rebuilds no set; and the sets that must be rebuilt whole regardless.
        self._net: dict[str, dict[Element, int]] = {}
        self._rebuild: set[str] = set()
        # Which sets an endpoint might join, so that an endpoint change tests a few
        # sets, not all: by scope (a namespace, or "" for sets open to every
        # namespace) and by a label every member must carry (key, value or None).
        self._guarded: dict[tuple[str, str, str | None], set[str]] = {}
        self._guard_of: dict[str, list[tuple[str, str, str | None]]] = {}
        self._specs_anywhere: set[str] = set()  # sets that depend on namespace labels
        self._member_of: dict[str, set[str]] = {}  # endpoint key -> sets it is in
        # chains
        self._chains: dict[str, Chain] = {}
        self._chain_specs: dict[str, frozenset[str]] = {}
        self._chain_users: dict[str, int] = {}
        self._chain_of: dict[PolicySetKey, str] = {}
        self._tier_of: dict[TierKey, str] = {}
        self._tier_key: dict[str, TierKey] = {}  # the other way round
        self._link_of: dict[tuple[str, str | None], str] = {}  # (Admin chain, next)
        # (direction, ep) -> the chains its packets may run through, the entry first
        self._endpoint_chain: dict[tuple[str, str], tuple[str, ...]] = {}
        self._unused: set[str] = set()
        # maps: direction -> address -> chain, and who owns each address
        self._maps: dict[str, dict[str, str]] = {INGRESS: {}, EGRESS: {}}
        self._owner: dict[str, dict[str, str]] = {INGRESS: {}, EGRESS: {}}
        # What changed since the last ruleset() (handed to plan.derive), and that one.
        self._last: Ruleset | None = None
        self._touched_sets: set[str] = set()
        self._touched_chains: set[str] = set()
        self._touched_addrs: dict[str, set[str]] = {INGRESS: set(), EGRESS: set()}
        # The address families the chains were lowered for (a pod set of another family
        # is left out, see lower.absent), and how many endpoints have each.
        self._families: frozenset[int] = frozenset()
        self._family_count: Counter[int] = Counter()
        # Bridge ports: who is behind each, what may leave it, which changed since.
        self._on_port: dict[str, set[str]] = {}
        self._raw_guards: dict[str, Guard] = {}  # before held_apart
        self._on_mac: dict[str, set[str]] = {}  # MAC -> the ports whose guards have it
        self._port_guards: dict[str, Guard] = {}
        self._touched_guards: set[str] = set()

    # ---- bulk ------------------------------------------------------------------------

    @classmethod
    def of(cls, cluster: Cluster) -> IncrementalCompiler:
        """Start from a whole cluster, resolved in bulk through the label index.

        Adding endpoints one by one would give the same state; resolving them
        together is several times faster, which is what a restart needs.
        """
        inc = cls()
        for ns in cluster.namespaces:
            inc.namespace_labels[ns.name] = ns.labels
        for p in cluster.policies:
            inc.policies[p.key] = p
            inc._policies_in.setdefault(p.namespace, {})[p.key] = p
        for cp in cluster.cluster_policies:
            inc.cluster_policies[cp.key] = cp
        inc._order_tiers()
        for ep in cluster.endpoints:
            inc.endpoints[ep.key] = ep
            inc._endpoints_in.setdefault(ep.namespace, set()).add(ep.key)
            inc._family_count.update(families_of((ep,)))
            if ep.port and not ep.remote:
                inc._on_port.setdefault(ep.port, set()).add(ep.key)
        inc._raw_guards = port_guards(cluster.endpoints)
        for port, g in inc._raw_guards.items():
            if g.mac:
                inc._on_mac.setdefault(g.mac, set()).add(port)
        inc._port_guards = held_apart(inc._raw_guards)
        bulk = Lowering(resolve(cluster))
        inc._families = bulk.families
        tier_subjects = bulk.tier_subjects() if inc._tier_order else {}
        for direction in model.DIRECTIONS:
            isolated = bulk.res.isolated[direction]
            if not inc._tier_order:
                for ident, ps in isolated.items():
                    for ep in bulk.index.members[ident]:
                        inc._place(ep, direction, ps.keys, bulk.members)
                continue
            # With tiers an endpoint no NetworkPolicy isolates may still have a chain;
            # which tiers select whom is answered through the label index, as in bulk.
            subjects = tier_subjects[direction]
            named: dict[tuple[int, int], tuple[tuple[str, ...], tuple[str, ...]]] = {}
            for ident, pods in enumerate(bulk.index.members):
                found = isolated.get(ident)
                admin, baseline = subjects.get(ident, ((), ()))
                names = named.get((id(admin), id(baseline)))  # shared tuples: tier_subjects
                if names is None:
                    names = named[(id(admin), id(baseline))] = (
                        tuple(p.name for p in admin), tuple(p.name for p in baseline))
                for ep in pods:
                    inc._place(ep, direction, found.keys if found else (), bulk.members,
                               names)
        return inc

    def cluster(self) -> Cluster:
        return Cluster(tuple(Namespace(n, lab) for n, lab in self.namespace_labels.items()),
                       tuple(self.endpoints.values()), tuple(self.policies.values()),
                       tuple(self.cluster_policies.values()))

    def ruleset(self) -> Ruleset:
        for name in self._stale_sets:
            if name in self._specs:
                spec = self._specs[name]
                old = self._sets.get(name)
                net = self._net.get(name)
                if old is not None and net is not None and name not in self._rebuild:
                    came = [e for e, d in net.items() if d > 0]
                    went = [e for e, d in net.items() if d < 0]
                    if not came and not went:
                        continue
                    elements = old.elements.difference(went).union(came)
                else:
                    elements = frozenset(self._elements[name])
                    if old is not None and old.elements == elements:
                        continue
                self._sets[name] = AddressSet(name, spec.family, spec.kind, elements,
                                              spec.comment)
        self._touched_sets |= self._stale_sets
        self._stale_sets.clear()
        self._net.clear()
        self._rebuild.clear()
        last = self._last
        touched = Touched(frozenset(self._touched_sets), frozenset(self._touched_chains),
                          frozenset(self._touched_addrs[INGRESS]),
                          frozenset(self._touched_addrs[EGRESS]),
                          frozenset(self._touched_guards))
        self._touched_sets = set()
        self._touched_chains = set()
        self._touched_addrs = {INGRESS: set(), EGRESS: set()}
        self._touched_guards = set()
        if last is not None:
            touched = _changed_since(last, touched, self._sets, self._chains, self._maps,
                                     self._port_guards)
            if not (touched.sets or touched.chains or touched.ingress or touched.egress
                    or touched.guards):
                # Nothing differs (a relabel no selector reads, a pod gone and back): the
                # same ruleset, without cloning its tables (the maps hold every endpoint).
                return last
        # dict.copy, not dict(): it clones the table even after deletions (which the
        # maps see at every endpoint change), where dict() re-inserts key by key.
        out = Ruleset(self._sets.copy(), self._chains.copy(), self._maps[INGRESS].copy(),
                      self._maps[EGRESS].copy(), self._port_guards.copy())
        if last is not None:
            # A plan from the previous one looks at what changed only (plan.derive).
            derive(out, last, touched)
        self._last = out
        return out

    def chains(self) -> dict[str, Chain]:
        """The chains in use (without making a ruleset)."""
        return dict(self._chains)

    # ---- namespaces --------------------------------------------------------------------

    def upsert_namespace(self, ns: Namespace) -> None:
        if self.namespace_labels.get(ns.name) == ns.labels:
            return
        self.namespace_labels[ns.name] = ns.labels
        self._reexamine_namespace(ns.name)

    def delete_namespace(self, name: str) -> None:
        if self.namespace_labels.pop(name, None) is not None:
            self._reexamine_namespace(name)

    def _reexamine_namespace(self, name: str) -> None:
        """Membership in namespace-selecting sets may change for the pods of `name`, and
        with tiers, which tier policies' subjects select them."""
        for key in self._endpoints_in.get(name, ()):
            ep = self.endpoints[key]
            for set_name in self._specs_anywhere:
                self._leave(ep, set_name)
                self._join_if_selected(ep, set_name)
        if self._tier_order:
            self._tier_cache.clear()
            self._replace_endpoints([self.endpoints[k]
                                     for k in sorted(self._endpoints_in.get(name, ()))])
            self._collect()

    # ---- endpoints -----------------------------------------------------------------------

    def upsert_endpoint(self, ep: Endpoint) -> None:
        old = self.endpoints.get(ep.key)
        if old == ep:
            return
        if old is not None and old == replace(ep, labels=old.labels):
            self._relabel(old, ep)
            return
        if old is not None:
            self._detach(old)
        self.endpoints[ep.key] = ep
        self._endpoints_in.setdefault(ep.namespace, set()).add(ep.key)
        self._attach(ep)
        self._collect()
        self._check_families()

    def delete_endpoint(self, key: str) -> None:
        old = self.endpoints.get(key)
        if old is not None:
            self._detach(old)
            self._collect()
            self._check_families()

    def _check_families(self) -> None:
        """The first endpoint with an address of a family, or the last one gone: every
        chain is lowered again (the rules of that family's pod sets come or go).

        Rare (a cluster is dual-stack or not), and then a compile of the whole
        state; the next ruleset is planned against the last one in full.
        """
        present = frozenset(f for f, n in self._family_count.items() if n > 0)
        if present == self._families:
            return
        fresh = IncrementalCompiler.of(self.cluster())
        self.__dict__.update(fresh.__dict__)
        self._last = None  # not derived: the plan compares everything

    def _relabel(self, old: Endpoint, ep: Endpoint) -> None:
        """Only the labels changed: the endpoint adds the same elements to any set, so it
        leaves only the sets that no longer select it and joins only those that now do
        (a relabel no selector reads touches no set); its chains are found again."""
        self.endpoints[ep.key] = ep
        was = self._member_of.get(ep.key, set())
        now = {name for name in self._candidate_sets(ep.namespace, ep.labels)
               if (cand := self._specs[name].candidates) is not None
               and cand.selects(ep, self.namespace_labels)}
        for name in was - now:
            self._leave(old, name)
        for name in now - was:
            self._join(ep, name)
        for direction in model.DIRECTIONS:
            self._unplace(old, direction)
            self._place(ep, direction)
        self._collect()

    def _attach(self, ep: Endpoint) -> None:
        self._family_count.update(families_of((ep,)))
        if ep.port and not ep.remote:
            self._on_port.setdefault(ep.port, set()).add(ep.key)
            self._guard_port(ep.port)
        for name in self._candidate_sets(ep.namespace, ep.labels):
            self._join_if_selected(ep, name)
        for direction in model.DIRECTIONS:
            self._place(ep, direction)

    def _detach(self, ep: Endpoint) -> None:
        self._family_count.subtract(families_of((ep,)))
        for name in list(self._member_of.get(ep.key, ())):
            self._leave(ep, name)
        self._member_of.pop(ep.key, None)
        for direction in model.DIRECTIONS:
            self._unplace(ep, direction)
        del self.endpoints[ep.key]
        self._endpoints_in[ep.namespace].discard(ep.key)
        if ep.key in self._on_port.get(ep.port, ()):
            self._on_port[ep.port].discard(ep.key)
            self._guard_port(ep.port)

    def _guard_port(self, port: str) -> None:
        """The port's guard again from the endpoints behind it (none: unguarded)."""
        keys = self._on_port.get(port)
        old = self._raw_guards.pop(port, None)
        if keys:
            self._raw_guards[port] = port_guards(self.endpoints[k] for k in sorted(keys))[port]
        else:
            self._on_port.pop(port, None)
        new = self._raw_guards.get(port)
        if old is not None and old.mac:
            self._on_mac[old.mac].discard(port)
        if new is not None and new.mac:
            self._on_mac.setdefault(new.mac, set()).add(port)
        # a MAC taken or let go changes the guards of the other ports that have it
        for p in {port}.union(*(self._on_mac.get(g.mac, ()) for g in (old, new)
                                if g is not None and g.mac)):
            raw = self._raw_guards.get(p)
            if raw is None:
                self._port_guards.pop(p, None)
            elif raw.mac and len(self._on_mac[raw.mac]) > 1:
                self._port_guards[p] = guard_of(())
            else:
                self._port_guards[p] = raw
            self._touched_guards.add(p)
        for g in (old, new):
            if g is not None and g.mac and not self._on_mac.get(g.mac):
                self._on_mac.pop(g.mac, None)

    def _candidate_sets(self, namespace: str, labels: Labels) -> set[str]:
        out: set[str] = set()
        for scope in (namespace, ""):
            out |= self._guarded.get((scope, "", None), set())
            for k, v in labels.items_tuple():
                out |= self._guarded.get((scope, k, v), set())
                out |= self._guarded.get((scope, k, None), set())
        return out

    def _join_if_selected(self, ep: Endpoint, name: str) -> None:
        spec = self._specs[name]
        if spec.candidates is not None and spec.candidates.selects(ep, self.namespace_labels):
            self._join(ep, name)

    def _join(self, ep: Endpoint, name: str) -> None:
        elements = self._specs[name].contributes(ep)
        if elements:
            counts = self._elements[name]
            net = self._net.setdefault(name, {})
            for e in elements:
                n = counts[e]
                if not n:
                    net[e] = net.get(e, 0) + 1
                counts[e] = n + 1
            self._stale_sets.add(name)
            self._member_of.setdefault(ep.key, set()).add(name)

    def _join_all(self, eps: Iterable[Endpoint], name: str) -> None:
        """`_join` of each, the set's counts updated once (a bulk start: 180,000 joins at
        10,000 endpoints, a third of the time it took one by one)."""
        contributes = self._specs[name].contributes
        member_of = self._member_of
        joined: list[Element] = []
        for ep in eps:
            elements = contributes(ep)
            if elements:
                joined += elements
                sets = member_of.get(ep.key)
                if sets is None:
                    member_of[ep.key] = {name}
                else:
                    sets.add(name)
        if joined:
            self._elements[name].update(joined)
            self._stale_sets.add(name)
            self._rebuild.add(name)

    def _leave(self, ep: Endpoint, name: str) -> None:
        member_of = self._member_of.get(ep.key)
        if member_of is None or name not in member_of:
            return
        member_of.discard(name)
        counts = self._elements[name]
        net = self._net.setdefault(name, {})
        for e in self._specs[name].contributes(ep):
            n = counts[e] - 1
            if n > 0:
                counts[e] = n
            elif e in counts:
                del counts[e]
                net[e] = net.get(e, 0) - 1
        self._stale_sets.add(name)

    # ---- which chain serves an endpoint -------------------------------------------------

    def _selecting(self, ep: Endpoint, direction: str) -> tuple[str, ...]:
        return tuple(sorted(
            k for k, p in self._policies_in.get(ep.namespace, {}).items()
            if p.affects(direction) and p.pod_selector.matches(ep.labels)))

    def _tiers(self, ep: Endpoint, direction: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The Admin and the Baseline policies with rules of `direction` whose subject
        selects `ep`, in precedence order. A subject reads the pod's labels and its
        namespace's: the answer is kept per (direction, namespace, labels) until a tier
        policy or a namespace's labels change (a policy change moves many pods of few
        label sets)."""
        key = (direction, ep.namespace, ep.labels)
        found = self._tier_cache.get(key)
        if found is not None:
            return found
        # Each distinct subject is asked once (a thousand policies may share a few), and
        # the policies follow from the subjects that select the pod (see tiers.selection).
        picked = frozenset(k for k, subject in self._subjects.items()
                           if subject_selects(subject, ep, self.namespace_labels))
        found = self._by_selection.get((direction, picked))
        if found is None:
            admin: list[str] = []
            baseline: list[str] = []
            for p in self._tier_order:
                if p.rules(direction) and subject_key(p.subject) in picked:
                    (admin if p.tier == ADMIN else baseline).append(p.name)
            found = self._by_selection[(direction, picked)] = (tuple(admin), tuple(baseline))
        self._tier_cache[key] = found
        return found

    def _place(self, ep: Endpoint, direction: str, keys: tuple[str, ...] | None = None,
               members: Members | None = None,
               tiers: tuple[tuple[str, ...], tuple[str, ...]] | None = None) -> None:
        """Give `ep` its run of chains for `direction`: by the NetworkPolicies selecting
        it (`keys`) and the tier policies (`tiers`: Admin, Baseline names), both found
        here when not given."""
        if ep.remote:
            return  # a peer only: its node enforces its policies (see Endpoint.remote)
        if keys is None:
            keys = self._selecting(ep, direction)
        admin: tuple[str, ...] = ()
        baseline: tuple[str, ...] = ()
        if self._tier_order:
            admin, baseline = tiers if tiers is not None else self._tiers(ep, direction)
            if keys:
                baseline = ()  # NetworkPolicy is final: Baseline is never reached
        if not keys and not admin and not baseline:
            return
        chains = self._entry(direction, keys, admin, baseline, members)
        for name in chains:
            self._chain_users[name] += 1
        self._endpoint_chain[(direction, ep.key)] = chains
        chain = chains[0]
        ir_dir = DIRECTION[direction]
        for addr in endpoint_addresses(ep):
            self._maps[ir_dir][addr] = chain
            self._owner[ir_dir][addr] = ep.key
            self._touched_addrs[ir_dir].add(addr)

    def chain_uses(self) -> dict[str, tuple[str, int, list[tuple[str, ...]]]]:
        """Each chain in use: its direction, how many endpoints it isolates, and the
        sets of policies it enforces. Policy names live here, not in the kernel: a
        chain is shared by content, so its users change while it stays."""
        out: dict[str, tuple[str, int, list[tuple[str, ...]]]] = {}
        uses = [(keys, name) for (_direction, keys), name in sorted(self._chain_of.items())]
        uses += [(tuple(f"{tier}:{n}" for n in names), name)
                 for (_direction, tier, names, _next), name in sorted(
                     self._tier_of.items(), key=lambda kv: (kv[0][:3], kv[0][3] or ""))]
        # A link chain: the Admin policies it calls, then where it goes on.
        uses += [(tuple(f"{ADMIN}:{n}" for n in self._chains[admin].comment.split(", "))
                  + ((f"then {after}",) if after else ()), name)
                 for (admin, after), name in sorted(self._link_of.items(),
                                                    key=lambda kv: (kv[0][0], kv[0][1] or ""))
                 if admin in self._chains]
        for keys, name in uses:
            users = self._chain_users.get(name, 0)
            if users and name in self._chains:
                out.setdefault(name, (self._chains[name].direction, users, []))[2].append(keys)
        return out

    def _unplace(self, ep: Endpoint, direction: str) -> None:
        chains = self._endpoint_chain.pop((direction, ep.key), None)
        if chains is None:
            return
        ir_dir = DIRECTION[direction]
        for addr in endpoint_addresses(ep):
            if self._owner[ir_dir].get(addr) == ep.key:
                del self._maps[ir_dir][addr]
                del self._owner[ir_dir][addr]
                self._touched_addrs[ir_dir].add(addr)
        for chain in chains:
            self._chain_users[chain] -= 1
            if self._chain_users[chain] == 0:
                # Dropped at the end of the change, unless the change uses it again.
                self._unused.add(chain)

    def _collect(self) -> None:
        for name in self._unused:
            if self._chain_users.get(name) == 0:
                self._drop_chain(name)
        self._unused.clear()

    def _entry(self, direction: str, keys: tuple[str, ...], admin: tuple[str, ...],
               baseline: tuple[str, ...], members: Members | None) -> tuple[str, ...]:
        """The chains of an endpoint-direction, the entry first: as `Lowering._entry`."""
        chains: list[str] = []
        if keys:
            chains.append(self._chain(direction, keys, members))
        elif baseline:
            chains.append(self._tier_chain(direction, BASELINE, baseline, None, members))
        if admin:
            tier = self._tier_chain(direction, ADMIN, admin, None, members)
            link = self._link_chain(tier, chains[0] if chains else None)
            chains[:0] = [link, tier]
        return tuple(chains)

    def _chain(self, direction: str, keys: tuple[str, ...], members: Members | None) -> str:
        name = self._chain_of.get((direction, keys))
        if name is not None:
            return name
        specs: dict[str, SetSpec] = {}
        chain = lower_chain(direction, [self.policies[k] for k in keys],
                            _collector(specs, self._families))
        self._chain_of[(direction, keys)] = chain.name
        self._register(chain, specs, members)
        return chain.name

    def _tier_chain(self, direction: str, tier: str, names: tuple[str, ...],
                    next_chain: str | None, members: Members | None) -> str:
        key = (direction, tier, names, next_chain)
        name = self._tier_of.get(key)
        if name is not None:
            return name
        specs: dict[str, SetSpec] = {}
        chain = lower_tier_chain(direction, tier, [self.cluster_policies[n] for n in names],
                                 next_chain, _collector(specs, self._families))
        # One key per name: a chain is named by its policies' subjects, so the key of
        # its previous policies (one since deleted, say) must not find it again.
        stale = self._tier_key.get(chain.name)
        if stale is not None and self._tier_of.get(stale) == chain.name:
            del self._tier_of[stale]
        self._tier_of[key] = chain.name
        self._tier_key[chain.name] = key
        self._register(chain, specs, members)
        return chain.name

    def _link_chain(self, admin: str, next_chain: str | None) -> str:
        """The chain that calls the Admin chain `admin`, then goes on in `next_chain`."""
        name = self._link_of.get((admin, next_chain))
        if name is not None:
            return name
        chain = link_chain(self._chains[admin], next_chain)
        self._link_of[(admin, next_chain)] = chain.name
        self._register(chain, {}, None)
        return chain.name

    def _register(self, chain: Chain, specs: dict[str, SetSpec],
                  members: Members | None) -> None:
        """A chain just lowered, unless one of the same content is in use; a tier's
        chain of the same name (the same subjects) but other rules is replaced in place."""
        old = self._chains.get(chain.name)
        if old is not None:
            if old == chain and old.comment == chain.comment:
                return
            self._chains[chain.name] = chain
            self._touched_chains.add(chain.name)
            # The new rules' sets first: a set both name keeps its members.
            before = self._chain_specs[chain.name]
            self._chain_specs[chain.name] = frozenset(specs)
            for spec in specs.values():
                self._ref_set(spec, members)
            for set_name in before:
                self._unref_set(set_name)
            return
        self._chains[chain.name] = chain
        self._touched_chains.add(chain.name)
        self._chain_users[chain.name] = 0
        self._chain_specs[chain.name] = frozenset(specs)
        for spec in specs.values():
            self._ref_set(spec, members)

    def _drop_chain(self, name: str) -> None:
        del self._chains[name]
        self._touched_chains.add(name)
        del self._chain_users[name]
        for set_name in self._chain_specs.pop(name):
            self._unref_set(set_name)
        for k in [k for k, v in self._chain_of.items() if v == name]:
            del self._chain_of[k]
        tier_key = self._tier_key.pop(name, None)
        if tier_key is not None and self._tier_of.get(tier_key) == name:
            del self._tier_of[tier_key]
        for k2 in [k2 for k2, v in self._link_of.items() if v == name or k2[0] == name]:
            del self._link_of[k2]

    # ---- sets -----------------------------------------------------------------------------

    def _ref_set(self, spec: SetSpec, members: Members | None = None) -> None:
        name = spec.name
        if name in self._specs:
            self._set_refs[name] += 1
            return
        self._specs[name] = spec
        self._set_refs[name] = 1
        self._elements[name] = Counter(spec.fixed) if spec.kind == NET else Counter()
        self._stale_sets.add(name)
        self._rebuild.add(name)
        cand = spec.candidates
        if cand is None:
            return
        guards = _guards(cand)
        self._guard_of[name] = guards
        for g in guards:
            self._guarded.setdefault(g, set()).add(name)
        if isinstance(cand, PeerMembers) and cand.peer.namespace_selector is not None:
            self._specs_anywhere.add(name)
        if members is not None:
            self._join_all(members(spec), name)
            return
        scopes = {g[0] for g in guards}
        population: Iterable[str] = (
            self.endpoints if "" in scopes
            else (k for scope in scopes for k in self._endpoints_in.get(scope, ())))
        for key in list(population):
            self._join_if_selected(self.endpoints[key], name)

    def _unref_set(self, name: str) -> None:
        self._set_refs[name] -= 1
        if self._set_refs[name] > 0:
            return
        spec = self._specs.pop(name)
        del self._set_refs[name]
        del self._elements[name]
        self._sets.pop(name, None)
        self._stale_sets.discard(name)
        self._net.pop(name, None)
        self._rebuild.discard(name)
        self._touched_sets.add(name)
        del spec
        guards = self._guard_of.pop(name, ())
        for g in guards:
            self._guarded[g].discard(name)
        self._specs_anywhere.discard(name)
        # Its members are endpoints of its scopes (every join went through the guards'
        # scopes or the set's own selection): only theirs are looked at, not all.
        scopes = {g[0] for g in guards}
        keys: Iterable[str] = (
            self._member_of if "" in scopes
            else [k for scope in scopes for k in self._endpoints_in.get(scope, ())])
        for key in keys:
            members = self._member_of.get(key)
            if members is not None:
                members.discard(name)

    # ---- policies ---------------------------------------------------------------------------

    def upsert_policy(self, policy: model.NetworkPolicy) -> None:
        old = self.policies.get(policy.key)
        if old == policy:
            return
        self._replace_policy(policy.key, policy.namespace, old, policy)

    def delete_policy(self, key: str) -> None:
        old = self.policies.get(key)
        if old is not None:
            self._replace_policy(key, old.namespace, old, None)

    def _replace_policy(self, key: str, namespace: str, old: model.NetworkPolicy | None,
                        new: model.NetworkPolicy | None) -> None:
        affected = [self.endpoints[k] for k in sorted(self._endpoints_in.get(namespace, ()))
                    if any(p is not None and p.pod_selector.matches(self.endpoints[k].labels)
                           for p in (old, new))]
        for ep in affected:
            for direction in model.DIRECTIONS:
                self._unplace(ep, direction)
        # Chains built from the old text of the policy must not be found again.
        for k in [k for k in self._chain_of if key in k[1]]:
            del self._chain_of[k]
        if new is None:
            del self.policies[key]
            del self._policies_in[namespace][key]
        else:
            self.policies[key] = new
            self._policies_in.setdefault(namespace, {})[key] = new
        for ep in affected:
            for direction in model.DIRECTIONS:
                self._place(ep, direction)
        self._collect()

    # ---- ClusterNetworkPolicy tiers -----------------------------------------------------------

    def upsert_cluster_policy(self, policy: ClusterNetworkPolicy) -> None:
        old = self.cluster_policies.get(policy.key)
        if old != policy:
            self._replace_cluster_policy(policy.key, old, policy)

    def delete_cluster_policy(self, name: str) -> None:
        old = self.cluster_policies.get(name)
        if old is not None:
            self._replace_cluster_policy(name, old, None)

    def _replace_cluster_policy(self, name: str, old: ClusterNetworkPolicy | None,
                                new: ClusterNetworkPolicy | None) -> None:
        """Move the endpoints the old or the new subject selects (in any namespace); or,
        when the change leaves whom it selects as it was, only rewrite its chains."""
        if old is not None and new is not None and _same_selection(old, new):
            self.cluster_policies[name] = new
            self._order_tiers()
            self._relower(name)
            return
        subjects = [p.subject for p in (old, new) if p is not None]
        affected = [ep for _, ep in sorted(self.endpoints.items())
                    if any(subject_selects(s, ep, self.namespace_labels) for s in subjects)]
        for ep in affected:
            for direction in model.DIRECTIONS:
                self._unplace(ep, direction)
        # Chains built from the old text (or order) of the policy must not be found again.
        for k in [k for k in self._tier_of if name in k[2]]:
            del self._tier_of[k]
        if new is None:
            del self.cluster_policies[name]
        else:
            self.cluster_policies[name] = new
        self._order_tiers()
        for ep in affected:
            for direction in model.DIRECTIONS:
                self._place(ep, direction)
        self._collect()

    def _relower(self, name: str) -> None:
        """Lower again, in the new precedence, every tier chain holding the policy `name`.

        Each keeps its name (its policies' subjects are the same), so the endpoints
        running through it and their map entries stay as they are: a priority change of
        a policy selecting every pod costs its chains, not ten thousand placements.
        """
        for key in [k for k in self._tier_of if name in k[2]]:
            direction, tier, names, next_chain = key
            was = self._tier_of.pop(key)
            ordered = tuple(sorted(names, key=lambda n: self.cluster_policies[n].order()))
            now = self._tier_chain(direction, tier, ordered, next_chain, None)
            assert now == was, "a tier chain is named by its policies' subjects"

    def _order_tiers(self) -> None:
        self._tier_order = sorted(self.cluster_policies.values(),
                                  key=ClusterNetworkPolicy.order)
        self._subjects = {subject_key(p.subject): p.subject for p in self._tier_order}
        self._tier_cache.clear()
        self._by_selection.clear()

    def _replace_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """Place endpoints again, both ways (what selects them may have changed)."""
        for ep in endpoints:
            for direction in model.DIRECTIONS:
                self._unplace(ep, direction)
                self._place(ep, direction)


def _same_selection(old: ClusterNetworkPolicy, new: ClusterNetworkPolicy) -> bool:
    """Whether two versions of a policy select the same endpoints in each direction (one
    without rules of a direction selects none there), in the same tier."""
    return old.tier == new.tier and old.subject == new.subject and all(
        bool(old.rules(d)) == bool(new.rules(d)) for d in model.DIRECTIONS)


def _collector(specs: dict[str, SetSpec], families: frozenset[int]) -> Need:
    """A `need` that records the specs a chain's lowering asks for (those not absent)."""
    def need(spec: SetSpec) -> str | None:
        if absent(spec, families):
            return None
        specs.setdefault(spec.name, spec)
        return spec.name
    return need


def _guards(cand: object) -> list[tuple[str, str, str | None]]:
    """Index keys of a set: every member carries one of these (scope, key, value).

    The scope is the one namespace its members live in, or "" for any. The
    label is one requirement every member must meet: `key in (values)` gives a
    key per value, `key exists` one for the key; with none, ("scope", "", None).
    """
    scope = ""
    selector = None
    if isinstance(cand, PolicyTargets):
        scope, selector = cand.namespace, cand.selector
    elif isinstance(cand, PeerMembers):
        if cand.peer.namespace_selector is None:
            scope = cand.namespace
        selector = cand.peer.pod_selector
    if selector is not None:
        for req in selector.requirements():
            if req.operator == IN and req.values:
                return [(scope, req.key, v) for v in req.values]
        for req in selector.requirements():
            if req.operator == EXISTS:
                return [(scope, req.key, None)]
    return [(scope, "", None)]


def _changed_since(last: Ruleset, touched: Touched, sets: Mapping[str, AddressSet],
                   chains: Mapping[str, Chain], maps: Mapping[str, Mapping[str, str]],
                   guards: Mapping[str, Guard]) -> Touched:
    """`touched` without what is as it was in `last`: an object replaced by itself or an
    equal one (a chain dropped and made again), or a map entry removed and put back (an
    endpoint unplaced and placed again). A chain whose comments alone changed stays:
    chain equality leaves them out, but the eBPF meta map stores them."""
    return Touched(
        frozenset(n for n in touched.sets if not _same(last.sets.get(n), sets.get(n))),
        frozenset(n for n in touched.chains
                  if not _same_chain(last.chains.get(n), chains.get(n))),
        frozenset(a for a in touched.ingress if last.ingress.get(a) != maps[INGRESS].get(a)),
        frozenset(a for a in touched.egress if last.egress.get(a) != maps[EGRESS].get(a)),
        frozenset(p for p in touched.guards if last.guards.get(p) != guards.get(p)))


def _same(a: object, b: object) -> bool:
    return a is b or a == b


def _same_chain(a: Chain | None, b: Chain | None) -> bool:
    """The same chain, comments too (its own and its rules')."""
    return a is b or (a is not None and b is not None and a == b and a.comment == b.comment
                      and [r.comment for r in a.rules] == [r.comment for r in b.rules])
