"""The eBPF map contents after a change, worked out from the change (pure).

`bpf.compile_state` works out every prefix's identity and every policy's entries
from the whole ruleset: about half a second at 10,000 endpoints and 1,000
policies, for an endpoint added as for everything loaded. Here the previous
state and the ruleset it was made from give the new state from what differs:

* the prefixes whose sets or map entries changed (an endpoint added, removed or
  relabelled: its address, in the sets that gained or lost it) get their identity
  and policies again, from their previous identity and the sets' changes;
* an ipBlock that comes, goes or changes (its set is named by its content, so an
  edit is one of each) moves every prefix inside its networks into or out of its
  set, and a new network is a prefix of its own;
* an identity keeps its id while any prefix has it, a new one takes the lowest
  free id, as `compile_state` numbers them; likewise policies;
* only the policies whose sets hold a new or a gone identity, or that are new,
  get their entries again.

The result equals `compile_state(rs, previous)` (a property test holds the two to
each other on random changes) and carries what changed, so that `state_delta`
encodes only that. Chains come and go with policies (a NetworkPolicy chain's name
is its content): a new chain is a new policy for the prefixes whose map entries
name it. A tier's chain is named by what it selects, so it changes under its
name: its policies' entries are worked out again, a flipped ANY flag is stamped
again in the stage ids naming them, and the prefixes it judges are judged again
when its rules come or go or name other named-port sets. A change that moves most
prefixes (a wide ipBlock) returns None: the caller compiles whole. Guards are
the ruleset's, carried as they are: no slot, identity or policy depends on them.

What is compared is what the incremental compiler recorded as possibly different
from the previous ruleset (`plan.derive`), or everything for a ruleset without that
record; the same ruleset again shares the previous state. What a change works out
from the whole state (the numbers inverted, identities by set, the ipBlock sets'
names, the policies naming each set) is handed on in the index's memo.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

from stockade.compile.bpf import (
    ADDR_BITS,
    ANY4,
    ANY6,
    FIRST_IDENTITY,
    STAGE_POLICY,
    WORLD4,
    WORLD6,
    BpfState,
    Identity,
    IpInfo,
    Named,
    PeerKeys,
    PolicyEntries,
    PolicyKey,
    PolicyRef,
    Prefix,
    StateIndex,
    identities_by_set,
    index_of,
    peer_grouped,
    peer_keys,
    policy_keys,
    prefix_mask,
    stage_id,
    stages,
)
from stockade.compile.bpf import _exact as exact
from stockade.compile.bpf import _net as net_of
from stockade.compile.bpf import _network as network_of
from stockade.compile.bpf import _prefix as prefix_bits
from stockade.compile.ir import ADDR, ADDR_PORT, EGRESS, INGRESS, NET, AddressSet, Chain, Ruleset
from stockade.compile.plan import Touched, derived
from stockade.errors import DataplaneError

_KEEP = object()  # a prefix's map entry the change left as it was
_Peer = tuple[int, Identity, frozenset[str]]  # an identity's id, itself, the sets it is in
# Prefixes a change may move before a whole compile is the cheaper way, and at least a
# quarter of them: at 10,000 endpoints the two cost the same near 4,000 moved
# (bench/ebpf.py's ipBlock rows; an ipBlock around 1,024 pods: 0.2 s against 0.65 s).
_MANY = 1024
K = TypeVar("K")
V = TypeVar("V")


class _Unsure(Exception):
    """The change is of a kind only a whole compile works out."""


def changed_state(rs: Ruleset, previous: BpfState, previous_rs: Ruleset) -> BpfState | None:
    """`compile_state(rs, previous)`, given that `previous` enforces `previous_rs`; None
    when most prefixes move, or a set changes its kind under its name (lowering names
    sets by their kind and content, so never), and the caller compiles whole."""
    if rs is previous_rs:
        return _unchanged(previous)
    try:
        return _Change(rs, previous, previous_rs).state()
    except _Unsure:
        return None


def _unchanged(previous: BpfState) -> BpfState:
    """`previous`'s contents as a change that changed nothing (a label no selector
    reads: the incremental compiler hands back the same ruleset) makes them, shared:
    a state is never changed once made."""
    index = index_of(previous)
    _numbers(index, "identities", previous.identities)  # remembered for the next change
    _numbers(index, "policies", previous.policies)
    memo = {k: v for k, v in index.memo.items() if k != "meta"}
    memo["meta"] = (frozenset(), frozenset(), frozenset(), frozenset())  # the same ruleset
    made = StateIndex(index.keys_of, index.with_any, index.identity_uses, index.entry_uses,
                      index.stage_uses, weakref.ref(previous), memo=memo)
    return replace(previous, index=made)


def _rewritten(a: Mapping[str, Chain], b: Mapping[str, Chain],
               names: Iterable[str] | None = None) -> set[str]:
    """The chains changed under their names (a tier's chain is named by what it selects),
    of `names` when only those may differ. Chains that come and go are changes of the
    map entries naming them. Chain equality leaves comments out: a comment is the
    state's `chains`, not its maps."""
    if a is b:
        return set()
    return {n for n in (a if names is None else names)
            if n in a and n in b and (c := a[n]) is not b[n] and c != b[n]}


def _named_sets(chain: Chain) -> set[str]:
    return {r.named_set for r in chain.rules if r.named_set}


# The sets each chain names, by the chain object: a change asks it of every policy whose
# sets may hold a changed identity, and the incremental compiler hands over an unchanged
# chain as the same object, so most are known from the changes before (a chain is
# immutable; the cache holds it, so its id is not reused while it is there). Emptied
# when it holds many more chains than a change's ruleset has: those of rulesets gone.
_NAMES: dict[int, tuple[Chain, frozenset[str]]] = {}


def names_of(chain: Chain) -> frozenset[str]:
    """The sets a chain's rules name (peers and named ports)."""
    found = _NAMES.get(id(chain))
    if found is not None and found[0] is chain:
        return found[1]
    names = frozenset(n for r in chain.rules for n in (r.peer_set, r.named_set) if n)
    _NAMES[id(chain)] = chain, names
    return names


def _forget_names(chains: int) -> None:
    """Let go of the chains no ruleset of about `chains` chains can still hold."""
    if len(_NAMES) > 2 * chains + 1024:
        _NAMES.clear()


class _Change:
    def __init__(self, rs: Ruleset, previous: BpfState, previous_rs: Ruleset) -> None:
        _forget_names(len(rs.chains))
        # What may differ from the previous ruleset, when the incremental compiler made
        # this one from it (plan.derive): the sets, chains and map entries to look at
        # (of ~1,600 sets and 10,000 map entries, a few), instead of all of them.
        self.since: Touched | None = derived(rs, previous_rs)
        self.rewritten = _rewritten(previous_rs.chains, rs.chains,
                                    self.since.chains if self.since is not None else None)
        self.rs, self.prev, self.prs = rs, previous, previous_rs
        self.most = max(_MANY, len(previous.ipcache) // 4)  # prefixes moved, at most
        self.index = index_of(previous)
        # per prefix: ADDR sets gained and lost, named ports gained and lost
        self.gained: dict[Prefix, set[str]] = {}
        self.lost: dict[Prefix, set[str]] = {}
        self.named_gained: dict[Prefix, set[Named]] = {}
        self.named_lost: dict[Prefix, set[Named]] = {}
        self.net_sets: set[str] = set()
        self.entries: dict[tuple[str, Prefix], object] = {}  # (direction, prefix) -> chain
        self.touched: set[Prefix] = set()
        self._nets: tuple[dict[int, dict[tuple[int, int], set[str]]], set[Prefix]] | None = None
        self._stages: dict[str, tuple[str, ...]] = {}
        self._named_sets: dict[str, set[str]] = {}

    # ---- what changed ------------------------------------------------------------------

    def _sets(self) -> None:
        old, new = self.prs.sets, self.rs.sets
        moved: list[tuple[str, int, frozenset[object], frozenset[object]]] = []
        known = self.index.memo.get("net_sets") if self.since is not None else None
        if known is not None:  # the ipBlocks' sets before, and those that may differ
            names: Iterable[str] = self.since.sets  # type: ignore[union-attr]
            self.net_sets = set(known).difference(names)
        else:
            names = old.keys() | new.keys()
        for name in names:
            a, b = old.get(name), new.get(name)
            if a is None and b is None:
                continue
            kind = (b if b is not None else a).kind  # type: ignore[union-attr]
            if a is not None and b is not None and (a.kind, a.family) != (b.kind, b.family):
                raise _Unsure
            if kind == NET:
                if b is not None:
                    self.net_sets.add(name)
                if a is None or b is None or (a is not b and a.elements != b.elements):
                    family = (b if b is not None else a).family  # type: ignore[union-attr]
                    moved.append((name, family, a.elements if a is not None else frozenset(),
                                  b.elements if b is not None else frozenset()))
                continue
            if a is b:
                continue
            was = a.elements if a is not None else frozenset()
            now = b.elements if b is not None else frozenset()
            if was == now:
                continue
            for elements, plain, named in ((was - now, self.lost, self.named_lost),
                                           (now - was, self.gained, self.named_gained)):
                for e in elements:
                    if kind == ADDR:
                        assert isinstance(e, str)
                        p = exact(e)
                        plain.setdefault(p, set()).add(name)
                    else:
                        assert kind == ADDR_PORT and isinstance(e, tuple)
                        p = exact(e[0])
                        named.setdefault(p, set()).add((name, e[1], e[2]))
                    self.touched.add(p)
            if len(self.touched) > self.most:
                raise _Unsure  # most prefixes move (everything loaded at once): whole
        if moved:
            self._nets_moved(moved)

    def _nets_moved(self, moved: list[tuple[str, int, frozenset[object], frozenset[object]]]
                    ) -> None:
        """ipBlocks that came, went or changed: a prefix inside one of their networks
        gains or loses the set (each prefix's identity names the ipBlocks covering it),
        and a new network is a prefix of its own."""
        # (network, length) -> the moved sets holding it, before and after
        was: dict[int, dict[tuple[int, int], set[str]]] = {4: {}, 6: {}}
        now: dict[int, dict[tuple[int, int], set[str]]] = {4: {}, 6: {}}
        for name, family, before, after in moved:
            for elements, into in ((before, was), (after, now)):
                for e in elements:
                    assert isinstance(e, str)
                    n = net_of(family, e)
                    into[n.version].setdefault((int(n.network_address), n.prefixlen),
                                               set()).add(name)
        for fam in (4, 6):
            shifted = {k for k in was[fam].keys() | now[fam].keys()
                       if was[fam].get(k) != now[fam].get(k)}
            if not shifted:
                continue
            bits = ADDR_BITS[fam]
            lengths = sorted({ln for _, ln in shifted})
            all_lengths = sorted({ln for _, ln in was[fam].keys() | now[fam].keys()})
            for value, ln in shifted:  # a network's own prefix: new, kept or gone
                self.touched.add((fam, str(network_of(fam, value, ln))))
            for p in self.prev.ipcache:
                if p[0] != fam:
                    continue
                base, plen = prefix_bits(p[1])
                if not any((base & prefix_mask(bits, ln), ln) in shifted
                           for ln in lengths if ln <= plen):
                    continue
                covered: list[set[str]] = [set(), set()]
                for ln in all_lengths:
                    if ln > plen:
                        break
                    key = (base & prefix_mask(bits, ln), ln)
                    covered[0] |= was[fam].get(key, set())
                    covered[1] |= now[fam].get(key, set())
                lost, gained = covered[0] - covered[1], covered[1] - covered[0]
                if lost:
                    self.lost.setdefault(p, set()).update(lost)
                if gained:
                    self.gained.setdefault(p, set()).update(gained)
                if lost or gained:
                    self.touched.add(p)
                    if len(self.touched) > self.most:
                        raise _Unsure  # most prefixes move: no need to find them all

    def _restaged(self) -> None:
        """Prefixes a rewritten chain judges in other ways: the chains judging them in
        turn changed (a chain's rules came or went), or a chain judging them names
        other named-port sets (an ingress side's policy holds its own named ports) or
        became final or not (a stage id's flag)."""
        old, new = self.prs.chains, self.rs.chains
        renamed = {n for n in self.rewritten if _named_sets(old[n]) != _named_sets(new[n])
                   or old[n].final != new[n].final}
        if not renamed and all((bool(old[n].rules), old[n].next, old[n].calls)
                               == (bool(new[n].rules), new[n].next, new[n].calls)
                               for n in self.rewritten):
            return  # the same stages for every prefix
        moved: dict[str, bool] = {}
        for p, info in self.prev.ipcache.items():
            for pid in info[1:3]:
                if not pid:
                    continue
                chain = self.prev.policies[pid].chain
                m = moved.get(chain)
                if m is None:
                    if chain not in self.rs.chains:
                        continue  # its map entries changed: those prefixes are touched
                    before = stages(self.prs, chain)
                    m = moved[chain] = before != self._staged(chain) or not renamed.isdisjoint(
                        before)
                if m:
                    self.touched.add(p)

    def _maps(self) -> None:
        for direction, old, new in ((INGRESS, self.prs.ingress, self.rs.ingress),
                                    (EGRESS, self.prs.egress, self.rs.egress)):
            if old is new:
                continue
            if self.since is not None:
                maybe = self.since.ingress if direction == INGRESS else self.since.egress
                changed = {addr for addr in maybe if old.get(addr) != new.get(addr)}
            else:
                # The entries added, changed or gone, found by the set operation (in C:
                # a third of a loop over 10,000 entries).
                changed = {addr for addr, _ in new.items() ^ old.items()}
            if len(changed) > self.most:
                raise _Unsure
            for addr in changed:
                p = exact(addr)
                self.entries[(direction, p)] = new.get(addr)
                self.touched.add(p)

    # ---- one prefix ----------------------------------------------------------------------

    def _net_index(self) -> tuple[dict[int, dict[tuple[int, int], set[str]]], set[Prefix]]:
        """The ipBlocks' prefixes (only a new prefix needs them: the others keep theirs)."""
        if self._nets is None:
            nets: dict[int, dict[tuple[int, int], set[str]]] = {4: {}, 6: {}}
            own: set[Prefix] = set()
            for name in self.net_sets:
                s = self.rs.sets[name]
                for e in s.elements:
                    assert isinstance(e, str)
                    n = net_of(s.family, e)
                    nets[n.version].setdefault((int(n.network_address), n.prefixlen),
                                               set()).add(name)
                    own.add((n.version, str(n)))
            self._nets = nets, own
        return self._nets

    def _covering(self, p: Prefix) -> set[str]:
        """The ipBlock sets holding a prefix the previous state did not have (now)."""
        nets, _ = self._net_index()
        fam, text = p
        base, plen = prefix_bits(text)
        bits = ADDR_BITS[fam]
        out: set[str] = set()
        for (value, ln), names in nets[fam].items():
            if ln <= plen and base & prefix_mask(bits, ln) == value:
                out |= names
        return out

    def _identity(self, p: Prefix, info: IpInfo | None) -> tuple[Identity, bool]:
        """The prefix's identity now, and whether a set holds it (ADDR, ADDR_PORT, NET)."""
        before = self.prev.identities.get(info[0]) if info is not None else None
        if info is not None:
            held = set(before.sets) if before is not None else set()
            named = set(before.named) if before is not None else set()
        else:
            held, named = self._covering(p), set()
        held -= self.lost.get(p, set())
        held |= self.gained.get(p, set())
        named -= self.named_lost.get(p, set())
        named |= self.named_gained.get(p, set())
        in_addr = any(s not in self.net_sets for s in held)
        own_net = p in self._net_index()[1] if not (in_addr or named) else False
        return Identity(p[0], tuple(sorted(held)), tuple(sorted(named))), bool(
            in_addr or named or own_net)

    def _entry(self, direction: str, p: Prefix, info: IpInfo | None) -> str | None:
        chain = self.entries.get((direction, p), _KEEP)
        if chain is not _KEEP:
            assert chain is None or isinstance(chain, str)
            return chain
        pid = (info[1] if direction == INGRESS else info[2]) if info is not None else 0
        return self.prev.policies[pid].chain if pid else None

    def _ref(self, direction: str, chain: str, p: Prefix, named: Iterable[Named]) -> PolicyRef:
        own: tuple[Named, ...] = ()
        if direction == INGRESS:
            wanted = self._named_sets.get(chain)
            if wanted is None:
                wanted = self._named_sets[chain] = _named_sets(self.rs.chains[chain])
            own = tuple(sorted(n for n in named if n[0] in wanted))
        return PolicyRef(direction, chain, p[0], own)

    def _names(self, chain: str) -> frozenset[str]:
        """The sets a chain's rules name (peers and named ports)."""
        return names_of(self.rs.chains[chain])

    def _repeer(self, pid: int, ref: PolicyRef, gone: list[_Peer], added: list[_Peer],
                policy: dict[PolicyKey, int | None],
                keys_of: dict[int, PeerKeys], changed: set[PolicyKey]) -> None:
        """A kept policy's entries for the identities gone (those keyed by them) and new."""
        enforced = self.rs.chains[ref.chain]
        names = self._names(ref.chain)
        mine = _copy(keys_of[pid])
        for i, _, _ in gone:
            dropped = mine.pop(i, ())
            policy.update(dict.fromkeys(dropped))
            changed.update(dropped)
        for i, new, held in added:
            if names.isdisjoint(held):
                continue
            got = peer_keys(pid, ref, enforced, i, new)
            if got:
                policy.update(got)
                changed.update(got)
                mine[i] = tuple(got)  # a new identity: it had none (a gone one's are gone)
        keys_of[pid] = mine

    def _by_set(self, identities: Mapping[int, Identity], gone: list[int],
                added: Mapping[object, int]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        """`identities_by_set(identities)`, from the previous state's when known: its
        identities gone taken out, the new ones put in (a policy's new entries need
        it; worked out whole, it walks every identity's sets). The lists are never
        changed in place: the previous state keeps its own."""
        found = self.index.memo.get("by_set")
        if found is None:
            return identities_by_set(identities)
        by_set, by_named = _copy(found[0]), _copy(found[1])
        for into, names_of_ident in ((by_set, _plain_sets), (by_named, _named_set_names)):
            for i in gone:
                for name in names_of_ident(self.prev.identities[i]):
                    if name in into:
                        kept = [j for j in into[name] if j != i]
                        if kept:
                            into[name] = kept
                        else:
                            del into[name]
            for ident, i in added.items():
                if isinstance(ident, Identity):
                    for name in names_of_ident(ident):
                        into[name] = [*into.get(name, ()), i]
        return by_set, by_named

    def _naming(self, policies: Mapping[int, PolicyRef], gone: list[int],
                added: Mapping[object, int]) -> dict[str, frozenset[int]]:
        """The policies naming each set in their chain's rules, of `policies`: the
        previous state's, less the policies gone and with those come (an endpoint's
        change has neither); worked out whole the first time and when a chain changed
        under its name. Never changed in place: the previous state keeps its own."""
        found: dict[str, frozenset[int]] | None = self.index.memo.get("naming")
        if found is None or self.rewritten:
            whole: dict[str, set[int]] = {}
            for pid, ref in policies.items():
                for name in self._names(ref.chain):
                    whole.setdefault(name, set()).add(pid)
            return {name: frozenset(pids) for name, pids in whole.items()}
        if not gone and not added:
            return found
        out = _copy(found)
        for pid in gone:
            for name in names_of(self.prev.chains[self.prev.policies[pid].chain]):
                kept = out[name] - {pid}
                if kept:
                    out[name] = kept
                else:
                    del out[name]
        for pid in added.values():
            for name in self._names(policies[pid].chain):
                out[name] = out.get(name, frozenset()) | {pid}
        return out

    def _staged(self, chain: str) -> tuple[str, ...]:
        found = self._stages.get(chain)
        if found is None:
            found = self._stages[chain] = stages(self.rs, chain)
        return found

    # ---- the new state -------------------------------------------------------------------

    def state(self) -> BpfState:
        self._maps()  # first: everything loaded at once is found here, in C
        self._sets()
        if self.rewritten:
            self._restaged()
        prev, index = self.prev, self.index
        if len(self.touched) > self.most:
            raise _Unsure  # most prefixes move (a wide ipBlock): whole is cheaper
        identity_uses = _copy(index.identity_uses)
        entry_uses = _copy(index.entry_uses)
        stage_uses = _copy(index.stage_uses)

        # Every touched prefix lets go of what it had, then takes what it has now.
        restaged: set[int] = set()  # policies whose stages' count may change
        wanted: dict[Prefix, tuple[Identity, list[PolicyRef | None], list[PolicyRef]]] = {}
        for p in self.touched:
            info = prev.ipcache.get(p)
            if info is not None:
                _release(identity_uses, info[0])
                for pid in info[1:3]:
                    if pid:
                        _release(entry_uses, pid)
                for staged in info[3:]:
                    if staged:
                        _release(stage_uses, staged & STAGE_POLICY)
                        restaged.add(staged & STAGE_POLICY)
            ident, held = self._identity(p, info)
            entry_chains = [self._entry(INGRESS, p, info), self._entry(EGRESS, p, info)]
            if not held and entry_chains == [None, None]:
                continue  # gone from every set and map
            entry_refs: list[PolicyRef | None] = []
            staged_refs: list[PolicyRef] = []
            for direction, chain in zip((INGRESS, EGRESS), entry_chains, strict=True):
                if chain is None:
                    entry_refs.append(None)
                    continue
                entry_refs.append(self._ref(direction, chain, p, ident.named))
                staged_refs += [self._ref(direction, c, p, ident.named)
                                for c in self._staged(chain)]
            wanted[p] = ident, entry_refs, staged_refs

        # Identities, then policies: numbered as compile_state numbers them.
        id_numbers = _numbers(index, "identities", prev.identities)
        id_of, gone_ids, added_ids = _renumber(
            prev.identities, [(ident, identity_uses) for ident, _, _ in wanted.values()],
            [identity_uses], FIRST_IDENTITY, {Identity(4): WORLD4, Identity(6): WORLD6},
            id_numbers)
        identities = _copy(prev.identities)
        for i in gone_ids:
            del identities[i]
        identities.update({i: ident for ident, i in added_ids.items()})  # type: ignore[misc]
        changed_idents = [prev.identities[i] for i in gone_ids] + [
            ident for ident in added_ids if isinstance(ident, Identity)]
        uses_of: list[tuple[object, dict[int, int]]] = []
        for _, entry_refs, staged_refs in wanted.values():
            uses_of += [(ref, entry_uses) for ref in entry_refs if ref is not None]
            uses_of += [(ref, stage_uses) for ref in staged_refs]
        pid_numbers = _numbers(index, "policies", prev.policies)
        pid_of, gone_pids, added_pids = _renumber(prev.policies, uses_of,
                                                  [entry_uses, stage_uses], 1, None, pid_numbers)
        policies = _copy(prev.policies)
        for pid in gone_pids:
            del policies[pid]
        policies.update({pid: ref for ref, pid in added_pids.items()})  # type: ignore[misc]
        if policies and max(policies) > STAGE_POLICY:
            raise DataplaneError(f"{len(policies)} eBPF policies: more than the program "
                                 f"numbers ({STAGE_POLICY}); nothing was changed")

        # Entries of the policies that are new or rewritten, or whose sets hold a changed
        # identity.
        concerned: set[str] = set()
        for ident in changed_idents:
            concerned.update(ident.sets)
            concerned.update(n for n, _, _ in ident.named)
        keys_of = _copy(index.keys_of)
        with_any = set(index.with_any)
        # Keys to delete (None) and to write, applied at the end: most changes have none.
        policy: dict[PolicyKey, int | None] = {}
        changed_keys: set[PolicyKey] = set()
        by_set: dict[str, list[int]] | None = None
        by_named: dict[str, list[int]] = {}
        chains = self.rs.chains
        gone_pairs = [(i, prev.identities[i], _held(prev.identities[i])) for i in gone_ids]
        added_pairs = [(i, ident, _held(ident)) for ident, i in added_ids.items()
                       if isinstance(ident, Identity)]
        # Only these can be anything but a kept policy none of whose sets changed: one
        # whose count of stages changed (touched prefixes let go of it or take it), one
        # renumbered, one whose entries and stages disagreed before, one rewritten, one
        # naming a set a changed identity is in (of ~1,000 policies, a few).
        candidates = restaged.union(gone_pids, added_pids.values(),
                                    index.keys_of.keys() ^ index.stage_uses.keys())
        candidates.update(pid_of[ref] for ref, _ in uses_of)
        naming: dict[str, frozenset[int]] | None = None
        if self.rewritten:
            candidates.update(pid for pid, other in policies.items()
                              if other.chain in self.rewritten)
        if concerned:
            # (a set each policy names, looked up: not a loop over every policy)
            naming = self._naming(policies, gone_pids, added_pids)
            for name in concerned:
                candidates.update(naming.get(name, ()))
        for pid in sorted(candidates):
            if pid not in keys_of and pid not in policies:
                continue
            ref = policies.get(pid)
            staged = ref is not None and bool(stage_uses.get(pid))
            had = pid in keys_of  # its entries were worked out (it was a stage)
            if (had and staged and ref is not None
                    and ((was := prev.policies.get(pid)) is ref or was == ref)
                    and ref.chain not in self.rewritten):
                if concerned and not self._names(ref.chain).isdisjoint(concerned):
                    # The same policy: only the changed identities' entries change.
                    self._repeer(pid, ref, gone_pairs, added_pairs, policy, keys_of,
                                 changed_keys)
                continue
            if not had and not staged:
                continue
            for old_keys in keys_of.pop(pid, {}).values():
                policy.update(dict.fromkeys(old_keys))
                changed_keys.update(old_keys)
            with_any.discard(pid)
            if not staged:
                continue
            assert ref is not None
            if by_set is None:
                by_set, by_named = self._by_set(identities, gone_ids, added_ids)
            mine = policy_keys(pid, ref, chains[ref.chain], identities, by_set, by_named)
            policy.update(mine)
            changed_keys.update(mine)
            keys_of[pid] = grouped = peer_grouped(mine)
            if ANY4 in grouped or ANY6 in grouped:
                with_any.add(pid)
        # Kept policies that gained or lost entries keyed by ANY: the stage ids naming
        # them carry the flag, in every prefix judged by them.
        flipped = {pid for pid in with_any.symmetric_difference(index.with_any)
                   if pid in policies and prev.policies.get(pid) == policies[pid]}
        frozen_any = frozenset(with_any)

        # The touched prefixes' ipcache entries.
        ipcache = _copy(prev.ipcache)
        for p in self.touched:
            got = wanted.get(p)
            if got is None:
                ipcache.pop(p, None)
                continue
            ident, entry_refs, _ = got
            sides: list[int] = []
            for direction, ref in zip((INGRESS, EGRESS), entry_refs, strict=True):
                ids = []
                if ref is not None:
                    for c in self._staged(ref.chain):
                        sref = self._ref(direction, c, p, ident.named)
                        ids.append(stage_id(pid_of[sref], chains[c], frozen_any))
                first, second, *_ = [*ids, 0, 0]
                sides += [first, second]
            ing, egr = entry_refs
            ipcache[p] = (id_of[ident], pid_of[ing] if ing is not None else 0,
                          pid_of[egr] if egr is not None else 0, sides[0], sides[1], sides[2],
                          sides[3])
        touched = self.touched
        if flipped:
            touched = set(touched)
            for p, info in ipcache.items():
                if any(st and st & STAGE_POLICY in flipped for st in info[3:]):
                    touched.add(p)
            def restamped(st: int) -> int:
                pid = st & STAGE_POLICY
                if not st or pid not in flipped:
                    return st
                return stage_id(pid, chains[policies[pid].chain], frozen_any)

            for p in touched - self.touched:
                i, in_pid, out_pid, s0, s1, s2, s3 = ipcache[p]
                ipcache[p] = (i, in_pid, out_pid, restamped(s0), restamped(s1),
                              restamped(s2), restamped(s3))

        # Sets as the state keeps them: ipBlocks whole, the others without elements.
        psets = prev.sets
        sets: dict[str, AddressSet]
        if self.since is not None:  # those that may differ from the previous ruleset's
            sets = _copy(psets)
            for name in self.since.sets:
                a = self.rs.sets.get(name)
                if a is None:
                    sets.pop(name, None)
                else:
                    sets[name] = _kept_set(a, psets.get(name))
        else:
            sets = {name: _kept_set(a, psets.get(name)) for name, a in self.rs.sets.items()}
        made = StateIndex(keys_of, frozen_any, identity_uses, entry_uses, stage_uses,
                          weakref.ref(prev), frozenset(touched), frozenset(changed_keys),
                          {"identities": _renumbered(id_numbers, prev.identities, gone_ids,
                                                     added_ids),
                           "policies": _renumbered(pid_numbers, prev.policies, gone_pids,
                                                   added_pids)})
        made.memo["net_sets"] = frozenset(self.net_sets)
        if naming is None and "naming" in index.memo:  # handed on
            naming = self._naming(policies, gone_pids, added_pids)
        if naming is not None:
            made.memo["naming"] = naming
        if self.since is not None:  # what meta_delta compares (ids are numbered by content)
            made.memo["meta"] = (frozenset(gone_ids).union(added_ids.values()),
                                 frozenset(gone_pids).union(added_pids.values()),
                                 self.since.sets, self.since.chains)
        if by_set is not None:
            made.memo["by_set"] = by_set, by_named
        elif "by_set" in index.memo:
            made.memo["by_set"] = self._by_set(identities, gone_ids, added_ids)
        entries: Mapping[PolicyKey, int] = prev.policy
        if policy:
            entries = PolicyEntries.of(prev.policy).changed(policy)
        return BpfState(identities, policies, dict(chains), sets, ipcache, entries, made,
                        self.rs.guards)


def _kept_set(a: AddressSet, kept: AddressSet | None) -> AddressSet:
    """A set as the state keeps it (an ipBlock whole, the others without elements)."""
    if a.kind == NET:
        return a
    if kept is None or (kept.family, kept.kind, kept.comment) != (a.family, a.kind, a.comment):
        kept = AddressSet(a.name, a.family, a.kind, frozenset(), a.comment)
    return kept


def _copy(mapping: Mapping[K, V]) -> dict[K, V]:
    """A dict's copy by `dict.copy`, which clones the table (a dict with deletions is
    otherwise rebuilt entry by entry: the 90,000 policy entries of 10,000 endpoints
    and 1,000 policies in 3 ms, against 1 ms)."""
    return mapping.copy() if type(mapping) is dict else dict(mapping)


def _plain_sets(ident: Identity) -> tuple[str, ...]:
    return ident.sets


def _named_set_names(ident: Identity) -> list[str]:
    """Its named-port sets, once per named port (as `identities_by_set` lists them)."""
    return [n for n, _, _ in ident.named]


def _held(ident: Identity) -> frozenset[str]:
    """The sets an identity is in: address sets, ipBlocks and named-port sets."""
    return frozenset(ident.sets).union(n for n, _, _ in ident.named)


def _take(uses: dict[int, int], key: int) -> None:
    uses[key] = uses.get(key, 0) + 1


def _release(uses: dict[int, int], key: int) -> None:
    n = uses.get(key, 0) - 1
    if n > 0:
        uses[key] = n
    else:
        uses.pop(key, None)


def _numbers(index: StateIndex, what: str, previous: Mapping[int, object]) -> dict[Any, int]:
    """`previous` (a state's identities or policies) inverted: remembered on its index."""
    found = index.memo.get(what)
    if found is None:
        found = index.memo[what] = {v: i for i, v in previous.items()}
    return found


def _renumbered(numbers: Mapping[Any, int], previous: Mapping[int, object], gone: list[int],
                added: Mapping[object, int]) -> dict[Any, int]:
    """The inverted numbers after a change (see `_numbers`)."""
    out = _copy(numbers)
    for i in gone:
        if out.get(previous[i]) == i:
            del out[previous[i]]
    out.update(added)
    return out


def _renumber(previous: Mapping[int, object], wanted: list[tuple[object, dict[int, int]]],
              counters: list[dict[int, int]], first: int,
              reserved: Mapping[object, int] | None = None,
              numbers: Mapping[Any, int] | None = None
              ) -> tuple[dict[object, int], list[int], dict[object, int]]:
    """Numbers as `bpf._allocate` gives them: one still wanted keeps its number, a new
    one takes the lowest free from `first`, in order. `wanted` is each use with the
    counter it counts in (`counters`, which no longer count the touched prefixes' old
    uses, and are brought up to date); `numbers`: `previous` inverted, when known.
    Returns every number, the previous ones no longer used, and the new ones."""
    number_of = (_copy(numbers) if numbers is not None
                 else {v: i for i, v in previous.items()})
    number_of.update(reserved or {})
    fresh = set()
    for item, uses in wanted:
        if item in number_of:
            _take(uses, number_of[item])
        else:
            fresh.add(item)
    taken: set[int] = set().union(*counters)
    gone = sorted(previous.keys() - taken)
    added: dict[object, int] = {}
    n = first
    for item in sorted(fresh):  # type: ignore[type-var]
        while n in taken:
            n += 1
        added[item] = number_of[item] = n
        taken.add(n)
    for item, uses in wanted:
        if item in added:
            _take(uses, added[item])
    return number_of, gone, added


