"""The ruleset as the eBPF program's map contents, and back (pure).

The program (`bpf/stockade.bpf.c`) judges a packet with one ipcache lookup per
address (source and destination) and, per side, one or two lookups in the policy
map for each stage of that side (at most MAX_STAGES: an Admin tier, then
NetworkPolicy or Baseline), whatever the number of rules:

* **ipcache** (one LPM trie per family): prefix -> (identity, ingress entry,
  egress entry, ingress stages, egress stages). An *identity* stands for every
  address that belongs to the same sets: the ADDR sets (selector members) and
  NET sets (ipBlocks) holding it, and its named ports (ADDR_PORT triples). The
  prefixes are the addresses of every ADDR/ADDR_PORT set and verdict map, and
  every element of every NET set; an address matches its longest prefix, and
  all addresses with the same longest prefix belong to the same sets (a NET
  element holding the address holds that prefix too), so the identity is exact.
  An address in no prefix is WORLD4/WORLD6 (in no set). Endpoints carry, per
  direction, the policy of their map entry's chain (the *entry*: what
  `ruleset_of` reads back; the program never looks it up) and the policies of
  the chains that judge in turn (the *stages*: a link chain's called Admin
  chain, then its `next`; a chain alone is its own one stage).
* **policy** (one LPM trie): (policy, peer identity, protocol, port prefix) ->
  action (ALLOW_VALUE, DENY_VALUE, PASS_VALUE). A *policy* is a chain as one
  endpoint sees it: (direction, chain, family, the endpoint's own named ports
  that the chain uses), so chains are shared as in nftables (an Admin chain by
  every endpoint under it, whatever follows) while ingress named ports, which
  name the local endpoint's ports, stay exact. A rule without a peer condition
  is keyed by ANY4/ANY6; a rule without protocol by a 64-bit prefix, a
  protocol without ports by 72 bits, a port range by its 72+n-bit prefixes.
  The program looks up the peer's identity, and ANY only when that misses
  and the stage says the policy has ANY entries (STAGE_ANY: a rule without a
  peer condition), so a stage costs one lookup, two at most. A miss then
  denies for a NetworkPolicy chain (its entries all allow: its rules are a
  union) and passes on for a tier's (STAGE_TIER). A tier chain's first-match
  order is resolved here: for each peer key the rules that can match it (its
  own and ANY's, in order) paint the (protocol, port) space, each point taking
  the first rule's action, and the painting is written as disjoint prefixes, a
  64-bit entry holding what the rest gets (the first everything-matching rule's
  action); what would pass is left out, as a miss passes, except under an
  identity while ANY has entries (there a miss would fall to ANY's, so the
  identity's key gets a 64-bit entry, PASS if nothing else). ALLOW ends the
  side (passes), DENY drops, PASS goes on to the next stage (none: the side
  passes). What keeps existing connections is marked two ways, as the agent's
  revoker decides on nftables (the deciding tier policy, or the NetworkPolicy
  chain a Pass led to): a tier's Deny from a policy annotated keep
  (`ChainRule.keep`) has KEEP_BIT in its value (DENY_VALUE | KEEP_BIT, painted
  like any other action, so a kept and a cut Deny are different entries); a
  NetworkPolicy chain that keeps (`Chain.keep`), whose denial is a miss and so
  has no entry to mark, has one more entry, (policy, KEEP_MARK, 0, 0) with a
  64-bit prefix; KEEP_MARK (0) is no identity, so no packet's lookup can match
  it. When the policy generation changes, the program judges a tracked
  connection again and cuts it if denied, unless every denying side's
  deciding entry has KEEP_BIT or its stage's policy has the mark
  (`keeps_connection`).
* **guard** (a hash, not slotted): a pod's bridge port -> the MAC and addresses
  what leaves it may claim (`ir.Guard`), checked before anything else. The map
  is keyed by the port's ifindex, which only the datapath knows: `encode_guards`
  and `decode` take its port listing, and a guard whose port does not exist
  (yet) has no entry, and so does not read back (the next apply writes it).
  `BpfState.guards` holds them by port name, as the ruleset does.
* **mac_port** (a hash, not slotted): each guarded pod's MAC -> its port and the
  port's bridge (`mac_ports`, from the guard map's entries), so that a frame between
  two pods on one bridge goes from one port to the other without the bridge.
* **meta**: the definitions of identities, policies, chains and sets as JSON
  chunks, so that a new process reads the maps back into the `Ruleset` they
  enforce (`ruleset_of`) and adopts them; selector members and named ports are
  read from the ipcache itself, so a deleted entry shows as a difference.

Ids are stable across compilations when the previous state is given: an
identity or policy that still exists keeps its number, so one change is a
small delta. `encode_maps` gives the byte-level keys and values of one slot
(the maps hold two copies; see the program), `map_delta` the batch between two.
`allows` models the program's lookup on the plain data, for the property tests.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import ipaddress
import itertools
import json
import operator
import struct
import weakref
from collections.abc import Callable, ItemsView, Iterable, Iterator, KeysView, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from stockade.compile.ir import (
    ADDR,
    ADDR_PORT,
    ALLOW,
    DENY,
    EGRESS,
    INGRESS,
    NET,
    PASS,
    AddressSet,
    Chain,
    ChainRule,
    Element,
    Guard,
    Ruleset,
    guard_of,
)
from stockade.errors import DataplaneError
from stockade.model.cidr import Address, is_canonical_ipv4, parse_cidr, parse_ip

WORLD4, WORLD6, ANY4, ANY6 = 1, 2, 3, 4
KEEP_MARK = 0  # the policy key's identity that marks a policy keeping connections
FIRST_IDENTITY = 16
WORLD = {4: WORLD4, 6: WORLD6}
ANY = {4: ANY4, 6: ANY6}
SLOT_BIT = 1 << 31
PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132}
PROTOCOL_NAMES = {6: "TCP", 17: "UDP", 132: "SCTP", 1: "ICMP", 58: "ICMPv6"}
ADDR_BITS = {4: 32, 6: 128}
# A policy entry's value: what a match does (a NetworkPolicy chain's entries all allow).
ALLOW_VALUE, DENY_VALUE, PASS_VALUE = 1, 2, 3
ACTION_VALUE = {ALLOW: ALLOW_VALUE, DENY: DENY_VALUE, PASS: PASS_VALUE}
KEEP_BIT = 1 << 8  # with DENY_VALUE: a tier's Deny that keeps existing connections
MAX_STAGES = 2  # chains judging one side in turn: an Admin tier, then NetworkPolicy or Baseline
# A stage in the ipcache: its policy, and what the program does on a miss.
STAGE_TIER = 1 << 30  # a tier's policy: a miss passes on (a NetworkPolicy's denies)
STAGE_ANY = 1 << 29  # the policy has entries keyed by ANY: look there before missing
STAGE_POLICY = STAGE_ANY - 1

# Byte layouts shared with the C program (struct ip4_key, ip6_key, ip_info, policy_key,
# meta_key, meta_value).
IP4_KEY = struct.Struct("=IB4s3x")
IP6_KEY = struct.Struct("=IB16s3x")
IP_INFO = struct.Struct("=IIIIIII")
POLICY_KEY = struct.Struct("=I4s4sB2sx")
POLICY_VALUE = struct.Struct("=I")
META_KEY = struct.Struct("=28sI")
META_DATA = 508
META_VALUE = struct.Struct(f"=I{META_DATA}s")

MAPS = ("ipcache4", "ipcache6", "policy")

# Connection tracking (the program's ct_key and ct_value), for the loader's sweep of
# ct_live: family, protocol, pad, ports, addresses; seen_ns, generation, flags, owner.
# CT_CLOSING, CT_ORIG_B, `ct_timeout` and `ct_normal` below are the program's own: the
# two must agree.
CT_KEY = struct.Struct("=BBH2s2s16s16s")
CT_VALUE = struct.Struct("=QQII")
CT_OWNER = struct.Struct("=I")
CT_CLOSING = 1
CT_ORIG_B = 4  # the connection was opened from the key's dst side
_WORDS = struct.Struct("=4I")
_PORT = struct.Struct("=H")
_PROTO_TCP, _PROTO_UDP, _PROTO_SCTP = 6, 17, 132
_SEC_NS = 1_000_000_000

# The guard map (struct guard): key the port's ifindex; value the MAC, which of MAC,
# IPv4 and IPv6 it binds (flags), the IPv4 and the IPv6 address, in network order.
GUARD_KEY = struct.Struct("=I")
GUARD_VALUE = struct.Struct("=6sBx4s16s")
GUARD_MAC, GUARD_V4, GUARD_V6 = 1, 2, 4
# The mac_port map (struct mac_key, struct mac_port): a MAC -> its port's ifindex and
# that port's bridge's.
MAC_PORT_KEY = struct.Struct("=6s2x")
MAC_PORT_VALUE = struct.Struct("=II")

Named = tuple[str, str, int]  # (named set, protocol as the set holds it, port)
Prefix = tuple[int, str]  # (family, canonical CIDR)
# (identity, ingress entry, egress entry, ingress stage 1, 2, egress stage 1, 2)
IpInfo = tuple[int, int, int, int, int, int, int]
PolicyKey = tuple[int, int, int, int, int]  # (policy, identity, protocol, port, prefixlen)
MapContents = dict[str, dict[bytes, bytes]]
# What a rule matches for one peer key: (protocol, first port, last port) ranges, or
# None for every protocol and port.
Space = tuple[tuple[int, int, int], ...] | None
K = TypeVar("K", "Identity", "PolicyRef")
V = TypeVar("V")


@dataclass(frozen=True, order=True)
class Identity:
    """What an address belongs to: sets holding it and its named ports."""

    family: int
    sets: tuple[str, ...] = ()
    named: tuple[Named, ...] = ()


@dataclass(frozen=True, order=True)
class PolicyRef:
    """A chain as one endpoint (one address family) enforces it."""

    direction: str
    chain: str
    family: int
    named: tuple[Named, ...] = ()  # ingress: the endpoint's own ports in the chain's named sets


# A policy's entries by the peer key (an identity, or ANY) they are keyed by: an
# identity that comes or goes adds or takes away its own keys in each policy.
PeerKeys = Mapping[int, tuple[PolicyKey, ...]]


def peer_grouped(keys: Iterable[PolicyKey]) -> dict[int, tuple[PolicyKey, ...]]:
    """Policy keys by their peer key."""
    out: dict[int, list[PolicyKey]] = {}
    for key in keys:
        out.setdefault(key[1], []).append(key)
    return {peer: tuple(mine) for peer, mine in out.items()}


class PolicyEntries(Mapping[PolicyKey, int]):
    """The policy map's entries, kept by policy: a change copies the entries of the
    policies it touches, not all of them (at 10,000 endpoints and 1,000 policies a
    new identity touches a few dozen of ~800 policies, where every change copied all
    ~90,000 entries and freed the old copy).
    Never changed once made."""

    __slots__ = ("_len", "by_policy")

    def __init__(self, by_policy: dict[int, dict[PolicyKey, int]],
                 length: int | None = None) -> None:
        self.by_policy = by_policy  # policy -> its entries (none empty)
        self._len = sum(map(len, by_policy.values())) if length is None else length

    @classmethod
    def of(cls, entries: Mapping[PolicyKey, int]) -> PolicyEntries:
        if isinstance(entries, PolicyEntries):
            return entries
        by_policy: dict[int, dict[PolicyKey, int]] = {}
        for key, value in entries.items():
            by_policy.setdefault(key[0], {})[key] = value
        return cls(by_policy, len(entries))

    def changed(self, changes: Mapping[PolicyKey, int | None]) -> PolicyEntries:
        """These entries with `changes` made (None: deleted), copying only the
        policies they touch."""
        by_policy = self.by_policy.copy()
        mine: dict[int, dict[PolicyKey, int]] = {}
        length = self._len
        for key, value in changes.items():
            pid = key[0]
            entries = mine.get(pid)
            if entries is None:
                # dict.copy clones the table even with a few deleted slots (an identity
                # gone left them); dict() re-inserts every entry then: 4 times slower
                were = by_policy.get(pid)
                entries = mine[pid] = were.copy() if were is not None else {}
            length -= len(entries)
            if value is None:
                entries.pop(key, None)
            else:
                entries[key] = value
            length += len(entries)
        for pid, entries in mine.items():
            if entries:
                by_policy[pid] = entries
            else:
                by_policy.pop(pid, None)
        return PolicyEntries(by_policy, length)

    def _entries(self, key: object) -> dict[PolicyKey, int] | None:
        """The entries of the key's policy (None: no such policy, or not a key)."""
        return self.by_policy.get(key[0]) if isinstance(key, tuple) and key else None

    def __getitem__(self, key: PolicyKey) -> int:
        entries = self._entries(key)
        if entries is None:
            raise KeyError(key)
        return entries[key]

    def get(self, key: PolicyKey, default: Any = None) -> Any:
        entries = self._entries(key)
        return default if entries is None else entries.get(key, default)

    def __contains__(self, key: object) -> bool:
        entries = self._entries(key)
        return entries is not None and key in entries

    def __iter__(self) -> Iterator[PolicyKey]:
        return itertools.chain.from_iterable(self.by_policy.values())

    def __len__(self) -> int:
        return self._len

    def items(self) -> ItemsView[PolicyKey, int]:
        return _ChainedItems(self)

    def keys(self) -> KeysView[PolicyKey]:
        return _ChainedKeys(self)

    def __repr__(self) -> str:
        return f"PolicyEntries({dict(self.items())!r})"


def _policy_values(old: Mapping[PolicyKey, int], new: Mapping[PolicyKey, int],
                  keys: Iterable[PolicyKey]) -> list[tuple[PolicyKey, int | None, int | None]]:
    """Each key with its value in `old` and in `new` (None: not there), looked up a
    policy at a time: a `PolicyEntries` lookup is a Python call, and a new identity's
    change asks it of hundreds of keys of a few dozen policies."""
    by_pid: dict[int, list[PolicyKey]] = {}
    for key in keys:
        group = by_pid.get(key[0])
        if group is None:
            by_pid[key[0]] = [key]
        else:
            group.append(key)
    out: list[tuple[PolicyKey, int | None, int | None]] = []
    for pid, group in by_pid.items():
        a, b = _policy_of(old, pid), _policy_of(new, pid)
        out += [(key, a.get(key), b.get(key)) for key in group]
    return out


_NO_ENTRIES: Mapping[PolicyKey, int] = {}


def _policy_of(entries: Mapping[PolicyKey, int], pid: int) -> Mapping[PolicyKey, int]:
    """A mapping holding at least policy `pid`'s entries of `entries`."""
    if isinstance(entries, PolicyEntries):
        return entries.by_policy.get(pid, _NO_ENTRIES)
    return entries


class _ChainedItems(ItemsView[PolicyKey, int]):
    _mapping: PolicyEntries

    def __iter__(self) -> Iterator[tuple[PolicyKey, int]]:
        return itertools.chain.from_iterable(
            entries.items() for entries in self._mapping.by_policy.values())


class _ChainedKeys(KeysView[PolicyKey]):
    _mapping: PolicyEntries

    def __iter__(self) -> Iterator[PolicyKey]:
        return iter(self._mapping)


@dataclass(frozen=True)
class StateIndex:
    """What a state's contents imply, kept beside them so that a small change is
    worked out from the change (compile/bpf_change.py) instead of from everything.

    `base`, `prefixes` and `policy_keys` are set on a state made from another by a
    change: the ipcache prefixes and policy keys that differ from `base`'s, so
    that `state_delta` encodes only those.
    """

    keys_of: Mapping[int, PeerKeys]  # a policy's entries, by the identity they are keyed by
    with_any: frozenset[int]  # policies with entries keyed by ANY
    identity_uses: Mapping[int, int]  # identity -> prefixes that have it
    entry_uses: Mapping[int, int]  # policy -> map entries (ingress, egress) naming it
    stage_uses: Mapping[int, int]  # policy -> stages naming it (it has entries iff > 0)
    base: weakref.ref[BpfState] | None = None
    prefixes: frozenset[Prefix] = frozenset()
    policy_keys: frozenset[PolicyKey] = frozenset()
    # What a change works out from the contents, handed on to the state it makes
    # (compile/bpf_change.py): "identities" and "policies" inverted (the numbers by
    # what they number), "by_set" (`identities_by_set` of the identities), "net_sets"
    # (the names of the ruleset's NET sets)
    memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class BpfState:
    """Everything the maps hold, as plain data."""

    identities: Mapping[int, Identity] = field(default_factory=dict)
    policies: Mapping[int, PolicyRef] = field(default_factory=dict)
    chains: Mapping[str, Chain] = field(default_factory=dict)
    # NET sets whole; ADDR and ADDR_PORT sets without elements (the ipcache has them)
    sets: Mapping[str, AddressSet] = field(default_factory=dict)
    ipcache: Mapping[Prefix, IpInfo] = field(default_factory=dict)
    policy: Mapping[PolicyKey, int] = field(default_factory=dict)  # -> ALLOW/DENY/PASS_VALUE
    index: StateIndex | None = field(default=None, compare=False, repr=False)
    # bridge port name -> its guard: the ruleset's, or those the guard map holds for
    # ports that exist (see the module)
    guards: Mapping[str, Guard] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {"identities": len(self.identities), "policies": len(self.policies),
                "ipcache": len(self.ipcache), "policy_entries": len(self.policy),
                "guards": len(self.guards)}


def index_of(state: BpfState) -> StateIndex:
    """`state.index`, or worked out from the contents (a state read back from the maps)."""
    if state.index is not None:
        return state.index
    keys_of: dict[int, list[PolicyKey]] = {}
    for key in state.policy:
        keys_of.setdefault(key[0], []).append(key)
    return _index(state.ipcache, {pid: peer_grouped(keys) for pid, keys in keys_of.items()},
                  frozenset(k[0] for k in state.policy if k[1] in (ANY4, ANY6)))


def _index(ipcache: Mapping[Prefix, IpInfo], keys_of: Mapping[int, PeerKeys],
           with_any: frozenset[int]) -> StateIndex:
    identity_uses: dict[int, int] = {}
    entry_uses: dict[int, int] = {}
    stage_uses: dict[int, int] = {}
    for info in ipcache.values():
        identity_uses[info[0]] = identity_uses.get(info[0], 0) + 1
        for pid in info[1:3]:
            if pid:
                entry_uses[pid] = entry_uses.get(pid, 0) + 1
        for staged in info[3:]:
            if staged:
                pid = staged & STAGE_POLICY
                stage_uses[pid] = stage_uses.get(pid, 0) + 1
    return StateIndex(keys_of, with_any, identity_uses, entry_uses, stage_uses)


def _net(family: int, text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    n = parse_cidr(text) if "/" in text else None
    if n is None:
        a = parse_ip(text)
        assert a is not None, text
        return ipaddress.ip_network(f"{a}/{ADDR_BITS[a.version]}")
    return n


def _network(family: int, value: int, length: int
             ) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if family == 4:
        return ipaddress.IPv4Network((value, length))
    return ipaddress.IPv6Network((value, length))


def _prefix_text(family: int, packed: bytes, length: int) -> str:
    """A prefix read from the kernel as canonical text; ValueError if it is none (host
    bits set, a length out of range)."""
    value = int.from_bytes(packed, "big")
    if family == 4 and 0 <= length <= 32 and not value & ((1 << (32 - length)) - 1):
        return f"{packed[0]}.{packed[1]}.{packed[2]}.{packed[3]}/{length}"  # as ipaddress
    return str(_network(family, value, length))


def prefix_mask(bits: int, length: int) -> int:
    """The network bits of a prefix `length` long in a `bits`-bit address."""
    return ((1 << bits) - 1) ^ ((1 << (bits - length)) - 1)


@functools.lru_cache(maxsize=1 << 17)
def _exact(addr: str) -> Prefix:
    """An address as its full-length prefix (canonical text)."""
    if is_canonical_ipv4(addr):  # what pods have: its own text (see is_canonical_ipv4)
        return 4, addr + "/32"
    a = parse_ip(addr)
    assert a is not None, addr
    return (a.version, f"{a}/{ADDR_BITS[a.version]}")


@functools.lru_cache(maxsize=1 << 17)
def _prefix(text: str) -> tuple[int, int]:
    """(network as an integer, length) of a canonical prefix."""
    addr, _, length = text.partition("/")
    if length == "32" and is_canonical_ipv4(addr):  # an address: most of them, faster
        a, b, c, d = addr.split(".")
        return (int(a) << 24) | (int(b) << 16) | (int(c) << 8) | int(d), 32
    n = ipaddress.ip_network(text)
    return int(n.network_address), n.prefixlen


@functools.lru_cache(maxsize=1 << 12)
def port_prefixes(lo: int, hi: int) -> tuple[tuple[int, int], ...]:
    """The fewest (base, bits) blocks of the 16-bit port space covering lo..hi (a
    cluster's policies name a few ranges again and again: remembered)."""
    out: list[tuple[int, int]] = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << 16
        while size > hi - lo + 1:
            size >>= 1
        out.append((lo, 16 - (size.bit_length() - 1)))
        lo += size
    return tuple(out)


def _allocate(wanted: Iterable[K], previous: Mapping[int, K], first: int,
              reserved: Mapping[K, int] | None = None) -> dict[K, int]:
    """Ids for `wanted`: reserved ones, then the previous ones, then the lowest free."""
    out: dict[K, int] = {}
    taken: set[int] = set()
    by_value = {v: k for k, v in previous.items()}
    rest = []
    for w in sorted(set(wanted)):
        if reserved is not None and w in reserved:
            out[w] = reserved[w]
        elif w in by_value and by_value[w] >= first:
            out[w] = by_value[w]
            taken.add(by_value[w])
        else:
            rest.append(w)
    n = first
    for w in rest:
        while n in taken:
            n += 1
        out[w] = n
        taken.add(n)
    return out


_NO_SETS: frozenset[str] = frozenset()


def compile_state(rs: Ruleset, previous: BpfState | None = None) -> BpfState:
    """The map contents that enforce `rs` (ids kept from `previous` where they still fit)."""
    # Every prefix: exact addresses and NET elements, with what holds them.
    sets_of: dict[Prefix, set[str]] = {}
    named_of: dict[Prefix, set[Named]] = {}
    nets: dict[int, dict[tuple[int, int], set[str]]] = {4: {}, 6: {}}  # (network int, len)

    exact = _exact
    for s in rs.sets.values():
        name = s.name
        if s.kind == ADDR:
            for e in s.elements:
                p = exact(e)
                held = sets_of.get(p)
                if held is None:
                    sets_of[p] = {name}
                else:
                    held.add(name)
        elif s.kind == ADDR_PORT:
            for e in s.elements:
                assert isinstance(e, tuple)
                named_of.setdefault(exact(e[0]), set()).add((name, e[1], e[2]))
        else:
            for e in s.elements:
                assert isinstance(e, str)
                n = _net(s.family, e)
                nets[n.version].setdefault((int(n.network_address), n.prefixlen),
                                           set()).add(name)
                sets_of.setdefault((n.version, str(n)), set())
    for m in (rs.ingress, rs.egress):
        for addr in m:
            sets_of.setdefault(exact(addr), set())
    for p in named_of:
        sets_of.setdefault(p, set())
    # The lengths of each family's NET elements, shortest first, with their masks.
    masks = {fam: [(ln, prefix_mask(ADDR_BITS[fam], ln))
                   for ln in sorted({ln for _, ln in nets[fam]})] for fam in (4, 6)}
    identity_of: dict[Prefix, Identity] = {}
    for p, held in sets_of.items():
        fam, text = p
        base, plen = _prefix(text)
        member = set(held)
        in_nets = nets[fam]
        for ln, mask in masks[fam]:
            if ln > plen:
                break
            member |= in_nets.get((base & mask, ln), _NO_SETS)
        identity_of[p] = Identity(fam, tuple(sorted(member)),
                                  tuple(sorted(named_of.get(p, ()))))
    prev_ids = previous.identities if previous is not None else {}
    reserved = {Identity(4): WORLD4, Identity(6): WORLD6}
    ids = _allocate(identity_of.values(), prev_ids, FIRST_IDENTITY, reserved)
    identities = {i: ident for ident, i in ids.items() if i >= FIRST_IDENTITY}

    # Policies: each endpoint address's entry chain and the chains judging in turn.
    chain_named = {c.name: {r.named_set for r in c.rules if r.named_set} for c in
                   rs.chains.values()}
    stages_of: dict[str, tuple[str, ...]] = {}
    entry_of: dict[tuple[str, Prefix], PolicyRef] = {}
    staged_of: dict[tuple[str, Prefix], tuple[PolicyRef, ...]] = {}
    # The refs of an entry chain and its stages depend on the direction, the chain,
    # the family and the address's own named ports (shared by most pods): made once.
    made_refs: dict[tuple[str, str, int, frozenset[Named]],
                    tuple[PolicyRef, tuple[PolicyRef, ...]]] = {}
    no_named: frozenset[Named] = frozenset()
    for direction, m in ((INGRESS, rs.ingress), (EGRESS, rs.egress)):
        for addr, chain in m.items():
            p = exact(addr)
            named_set = named_of.get(p)
            named = frozenset(named_set) if named_set and direction == INGRESS else no_named
            key = (direction, chain, p[0], named)
            both = made_refs.get(key)
            if both is None:
                def ref(name: str, direction: str = direction, fam: int = p[0],
                        named: Iterable[Named] = named) -> PolicyRef:
                    own: tuple[Named, ...] = ()
                    if direction == INGRESS:
                        wanted = chain_named.get(name, set())
                        own = tuple(sorted(n for n in named if n[0] in wanted))
                    return PolicyRef(direction, name, fam, own)

                found = stages_of.get(chain)
                if found is None:
                    found = stages_of[chain] = stages(rs, chain)
                both = made_refs[key] = ref(chain), tuple(ref(c) for c in found)
            entry_of[(direction, p)], staged_of[(direction, p)] = both
    staged = {r for _, refs in made_refs.values() for r in refs}
    prev_pols = previous.policies if previous is not None else {}
    pids = _allocate(set(entry_of.values()) | staged, prev_pols, 1)
    policies = {i: r for r, i in pids.items()}

    if pids and max(pids.values()) > STAGE_POLICY:
        raise DataplaneError(f"{len(pids)} eBPF policies: more than the program numbers "
                             f"({STAGE_POLICY}); nothing was changed")

    by_set, by_named = identities_by_set(identities)
    by_policy: dict[int, dict[PolicyKey, int]] = {}
    keys_of: dict[int, PeerKeys] = {}
    for pid, r in policies.items():
        if r not in staged:
            continue  # an entry only (a link chain): its stages hold the rules
        mine = policy_keys(pid, r, rs.chains[r.chain], identities, by_set, by_named)
        if mine:
            by_policy[pid] = mine
        keys_of[pid] = peer_grouped(mine)

    keys = PolicyEntries(by_policy)
    with_any = frozenset(pid for pid, peers in keys_of.items()
                         if ANY4 in peers or ANY6 in peers)

    ids_of: dict[int, tuple[int, int]] = {}  # by the (shared) tuple of refs
    none: tuple[PolicyRef, ...] = ()

    def stage_ids(key: tuple[str, Prefix]) -> tuple[int, int]:
        refs = staged_of.get(key, none)
        found = ids_of.get(id(refs))
        if found is None:
            out = [stage_id(pids[r], rs.chains[r.chain], with_any) for r in refs]
            first, second, *_ = [*out, 0, 0]
            found = ids_of[id(refs)] = first, second
        return found

    # An entry's number by the ref object: most endpoints share a few (made_refs), and a
    # ref hashes all its fields each time it is looked up.
    pid_of: dict[int, int] = {}

    def entry_id(ref: PolicyRef | None) -> int:
        if ref is None:
            return 0
        found = pid_of.get(id(ref))
        if found is None:
            found = pid_of[id(ref)] = pids[ref]
        return found

    ipcache: dict[Prefix, IpInfo] = {}
    for p, ident in identity_of.items():
        ipcache[p] = (ids[ident], entry_id(entry_of.get((INGRESS, p))),
                      entry_id(entry_of.get((EGRESS, p))),
                      *stage_ids((INGRESS, p)), *stage_ids((EGRESS, p)))

    sets = {name: a if a.kind == NET else AddressSet(a.name, a.family, a.kind, frozenset(),
                                                     a.comment)
            for name, a in rs.sets.items()}
    made = _index(ipcache, keys_of, with_any)
    made.memo["by_set"] = by_set, by_named
    made.memo["net_sets"] = frozenset(n for n, a in rs.sets.items() if a.kind == NET)
    return BpfState(identities, policies, dict(rs.chains), sets, ipcache, keys, made,
                    rs.guards)


def identities_by_set(identities: Mapping[int, Identity]
                      ) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """The identities each set holds, and those with named ports in each named set."""
    by_set: dict[str, list[int]] = {}
    by_named: dict[str, list[int]] = {}
    for i, ident in identities.items():
        for held_by in ident.sets:
            by_set.setdefault(held_by, []).append(i)
        for named_set, _, _ in ident.named:
            by_named.setdefault(named_set, []).append(i)
    return by_set, by_named


def policy_keys(pid: int, ref: PolicyRef, enforced: Chain, identities: Mapping[int, Identity],
                by_set: Mapping[str, list[int]], by_named: Mapping[str, list[int]]
                ) -> dict[PolicyKey, int]:
    """The entries of one policy (a chain as `ref`'s endpoints see it)."""
    spaces = [(peer, space, _value(rule)) for rule in enforced.rules
              for peer, space in _rule_spaces(ref, rule, identities, by_set, by_named)]
    if enforced.final:
        out = dict.fromkeys(_union_keys(pid, spaces), ALLOW_VALUE)
    else:
        out = _first_match_keys(pid, ref.family, spaces)
    if enforced.keep:
        out[(pid, KEEP_MARK, 0, 0, 64)] = ALLOW_VALUE
    return out


def peer_keys(pid: int, ref: PolicyRef, enforced: Chain, ident_id: int, ident: Identity
              ) -> dict[PolicyKey, int]:
    """The entries of one policy keyed by one identity: `policy_keys` restricted to that
    peer, which they do not depend on the other identities for (a NetworkPolicy chain's
    entries are a union over peers; a tier chain paints each peer's key from its own
    rules and ANY's)."""
    identities = {ident_id: ident}
    alone = [ident_id]  # (only read)
    by_set = dict.fromkeys(ident.sets, alone)
    by_named = dict.fromkeys((n for n, _, _ in ident.named), alone)
    final = enforced.final
    # A union needs only the rules this peer can match: in their peer set, or (no peer
    # set) in their named-port set; first match paints from every rule.
    rules = [rule for rule in enforced.rules
             if (rule.peer_set in by_set if rule.peer_set is not None
                 else rule.named_set in by_named)] if final else enforced.rules
    spaces = [(peer, space, _value(rule)) for rule in rules
              for peer, space in _rule_spaces(ref, rule, identities, by_set, by_named)]
    if final:
        return dict.fromkeys(_union_keys(pid, [s for s in spaces if s[0] == ident_id]),
                             ALLOW_VALUE)
    return {k: v for k, v in _first_match_keys(pid, ref.family, spaces).items()
            if k[1] == ident_id}


def stage_id(pid: int, enforced: Chain, with_any: frozenset[int]) -> int:
    """A stage's policy as the ipcache holds it: with the flags the program reads."""
    return (pid | (0 if enforced.final else STAGE_TIER)
            | (STAGE_ANY if pid in with_any else 0))


def _value(rule: ChainRule) -> int:
    """A rule's action as a policy entry's value (only a Deny's keep matters: it cuts)."""
    if rule.keep and rule.action == DENY:
        return DENY_VALUE | KEEP_BIT
    return ACTION_VALUE[rule.action]


def stages(rs: Ruleset, entry: str) -> tuple[str, ...]:
    """The chains that judge a side in turn, from its map entry's chain: a link's called
    Admin chain, then the chain itself when it has rules or is final, then its `next`.

    Raises DataplaneError when there are more than the program runs (MAX_STAGES)."""
    out: list[str] = []
    name: str | None = entry
    seen: set[str] = set()
    while name is not None and name not in seen:
        seen.add(name)
        c = rs.chains[name]
        if c.calls is not None and rs.chains[c.calls].rules:
            out.append(c.calls)
        if c.rules or c.final:
            out.append(name)
        if c.final:
            break
        name = c.next
    if len(out) > MAX_STAGES:
        raise DataplaneError(
            f"chain {entry}: {len(out)} chains judge in turn ({', '.join(out)}), the eBPF "
            f"program runs at most {MAX_STAGES}; nothing was changed")
    return tuple(out)


def _union_keys(pid: int, spaces: Iterable[tuple[int, Space, int]]) -> set[PolicyKey]:
    """A NetworkPolicy chain's entries: every rule's space, for any match allows."""
    out: set[PolicyKey] = set()
    for peer, space, _ in spaces:
        if space is None:
            out.add((pid, peer, 0, 0, 64))
            continue
        for proto, lo, hi in space:
            out.update((pid, peer, proto, base, 72 + bits)
                       for base, bits in port_prefixes(lo, hi))
    return out


def _first_match_keys(pid: int, family: int, spaces: list[tuple[int, Space, int]]
                      ) -> dict[PolicyKey, int]:
    """A tier chain's entries: per peer key, its own rules and ANY's in order, resolved
    to the first match (see the module)."""
    anyone = ANY[family]
    by_peer: dict[int, list[tuple[int, Space, int]]] = {anyone: []}
    for n, (peer, space, action) in enumerate(spaces):
        by_peer.setdefault(peer, []).append((n, space, action))
    anys = by_peer[anyone]
    out: dict[PolicyKey, int] = {}
    for peer, own in sorted(by_peer.items()):
        merged = own if peer == anyone else heapq.merge(own, anys, key=lambda e: e[0])
        out.update(_painted(pid, peer, [(space, action) for _, space, action in merged],
                            whole=bool(anys) and peer != anyone))
    return out


def _painted(pid: int, peer: int, ordered: list[tuple[Space, int]], *, whole: bool
             ) -> dict[PolicyKey, int]:
    """Disjoint entries for one peer key giving each (protocol, port) its first rule's
    action; the 64-bit entry holds what the rest gets (the first rule matching
    everything, after which no later rule is ever first; else PASS). What passes is
    left out (a miss passes) unless `whole`: the key must never miss."""
    rest = PASS_VALUE
    painted: dict[int, list[tuple[int, int, int]]] = {}
    for space, action in ordered:
        if space is None:
            rest = action
            break
        for proto, lo, hi in space:
            done = painted.setdefault(proto, [])
            done += [(a, b, action) for a, b in _gaps(done, lo, hi)]
            done.sort()
    out: dict[PolicyKey, int] = {}
    if whole or rest != PASS_VALUE:
        out[(pid, peer, 0, 0, 64)] = rest
    for proto, done in sorted(painted.items()):
        for lo, hi, action in _merged(done):
            if action != rest:  # the rest falls to the 64-bit entry
                for base, bits in port_prefixes(lo, hi):
                    out[(pid, peer, proto, base, 72 + bits)] = action
    return out


def _gaps(done: list[tuple[int, int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """The parts of lo..hi that no interval of `done` (sorted, disjoint) covers."""
    out: list[tuple[int, int]] = []
    at = lo
    for a, b, _ in done:
        if b < at:
            continue
        if a > hi:
            break
        if a > at:
            out.append((at, a - 1))
        at = b + 1
        if at > hi:
            return out
    if at <= hi:
        out.append((at, hi))
    return out


def _merged(done: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Adjacent intervals with the same action as one."""
    out: list[tuple[int, int, int]] = []
    for lo, hi, action in done:
        if out and out[-1][1] + 1 == lo and out[-1][2] == action:
            out[-1] = (out[-1][0], hi, action)
        else:
            out.append((lo, hi, action))
    return out


def _rule_spaces(ref: PolicyRef, rule: ChainRule, identities: Mapping[int, Identity],
                 by_set: Mapping[str, list[int]], by_named: Mapping[str, list[int]]
                 ) -> list[tuple[int, Space]]:
    """What a rule matches, per peer key (an identity, or ANY without a peer condition)."""
    fam = ref.family
    if rule.family is not None and rule.family != fam:
        return []
    if rule.peer_set is not None:
        peers = [i for i in by_set.get(rule.peer_set, ()) if identities[i].family == fam]
    else:
        peers = [ANY[fam]]
    if rule.named_set is not None:
        def pairs(named: Iterable[Named]) -> Space:
            got = []
            for n, proto, port in named:
                if n != rule.named_set or proto.upper() not in PROTOCOLS:
                    continue
                if rule.protocol is not None and rule.protocol != proto.upper():
                    continue
                if rule.ports and not any(lo <= port <= hi for lo, hi in rule.ports):
                    continue
                got.append((PROTOCOLS[proto.upper()], port, port))
            return tuple(sorted(got))

        if ref.direction == INGRESS:
            own = pairs(ref.named)
            return [(i, own) for i in peers] if own else []
        # the destination is the peer: its own named ports
        out: list[tuple[int, Space]] = []
        allowed = set(peers) if rule.peer_set is not None else None
        for i in by_named.get(rule.named_set, ()):
            if identities[i].family != fam or (allowed is not None and i not in allowed):
                continue
            if theirs := pairs(identities[i].named):
                out.append((i, theirs))
        return out
    if rule.protocol is not None:
        if rule.protocol not in PROTOCOLS:
            return []
        protos = [PROTOCOLS[rule.protocol]]
    elif rule.ports:
        protos = list(PROTOCOLS.values())
    else:
        return [(i, None) for i in peers]
    ranges = rule.ports or ((0, 65535),)
    space = tuple((proto, lo, hi) for proto in protos for lo, hi in ranges)
    return [(i, space) for i in peers]


# ---- the program's lookup, modelled ------------------------------------------------------


def _lookup_ip(state: BpfState, addr: ipaddress.IPv4Address | ipaddress.IPv6Address
               ) -> IpInfo:
    fam = addr.version
    bits = ADDR_BITS[fam]
    value = int(addr)
    for ln in range(bits, -1, -1):
        net = _network(fam, value & prefix_mask(bits, ln), ln)
        info = state.ipcache.get((fam, str(net)))
        if info is not None:
            return info
    return (WORLD[fam], 0, 0, 0, 0, 0, 0)


def _policy_lookup(state: BpfState, pid: int, ident: int, proto: int, port: int
                   ) -> int | None:
    """The value of the longest prefix matching the key, as the LPM trie answers."""
    want = (pid << 56) | (ident << 24) | (proto << 16) | port
    for plen in range(88, 63, -1):
        k = want >> (88 - plen) << (88 - plen)
        value = state.policy.get((k >> 56, (k >> 24) & 0xFFFFFFFF, (k >> 16) & 0xFF,
                                  k & 0xFFFF, plen))
        if value is not None:
            return value
    return None


Denial = tuple[int, int]  # (the denying stage's policy, 0: none; the entry's value)


def _denying(state: BpfState, stages: tuple[int, ...], ident: int, fam: int, proto: int,
             port: int) -> Denial:
    """The stage that denies a side and the value that did (the program's
    `side_denies`), (0, 0) when it passes: the peer's identity, else ANY if the stage
    has ANY entries; a miss passes on in a tier's stage and denies in a
    NetworkPolicy's."""
    for stage in stages:
        if not stage:
            break
        pid = stage & STAGE_POLICY
        action = _policy_lookup(state, pid, ident, proto, port)
        if action is None and stage & STAGE_ANY:
            action = _policy_lookup(state, pid, ANY[fam], proto, port)
        if action is None:
            action = PASS_VALUE if stage & STAGE_TIER else DENY_VALUE
        if action == ALLOW_VALUE:
            break
        if action != PASS_VALUE:
            return pid, action
    return 0, 0


class Judge:
    """The program's decisions over one state, as it judges packets (its `judge`, in
    Python). Each address is looked up once: a model asked about every pair of a
    cluster's addresses otherwise walks every prefix length of each again and again."""

    def __init__(self, state: BpfState) -> None:
        self.state = state
        self._looked_up: dict[str, tuple[Address, IpInfo]] = {}

    def _lookup(self, address: str) -> tuple[Address, IpInfo]:
        """The address and its ipcache entry (the longest prefix)."""
        found = self._looked_up.get(address)
        if found is None:
            parsed = parse_ip(address)
            assert parsed is not None, address
            found = self._looked_up[address] = (parsed, _lookup_ip(self.state, parsed))
        return found

    def sides(self, src: str, dst: str, protocol: str, port: int) -> tuple[Denial, Denial]:
        """What denies the source's egress and the destination's ingress ((0, 0):
        nothing)."""
        (s, si), (d, di) = self._lookup(src), self._lookup(dst)
        if s == d:
            return (0, 0), (0, 0)
        proto = PROTOCOLS[protocol]
        return (_denying(self.state, si[5:7], di[0], s.version, proto, port),
                _denying(self.state, di[3:5], si[0], s.version, proto, port))

    def allows(self, src: str, dst: str, protocol: str, port: int) -> bool:
        """What the program decides for a new connection."""
        return self.sides(src, dst, protocol, port) == ((0, 0), (0, 0))

    def keeps_connection(self, src: str, dst: str, protocol: str, port: int) -> bool:
        """Whether the program, judging a tracked connection again after a policy
        change, lets it live: allowed, or every denying side kept (its deciding entry
        has KEEP_BIT, or its stage's policy the keep mark)."""
        return all(not pid or value & KEEP_BIT
                   or _policy_lookup(self.state, pid, KEEP_MARK, 0, 0) is not None
                   for pid, value in self.sides(src, dst, protocol, port))


def allows(state: BpfState, src: str, dst: str, protocol: str, port: int) -> bool:
    """`Judge.allows` of one connection (many over one state: a `Judge`)."""
    return Judge(state).allows(src, dst, protocol, port)


def keeps_connection(state: BpfState, src: str, dst: str, protocol: str, port: int) -> bool:
    """`Judge.keeps_connection` of one connection."""
    return Judge(state).keeps_connection(src, dst, protocol, port)


# ---- back to the ruleset ------------------------------------------------------------------


def ruleset_of(state: BpfState) -> Ruleset:
    """The ruleset the maps enforce: sets filled from the ipcache, maps from its endpoints."""
    elements: dict[str, set[Element]] = {n: set(s.elements) for n, s in state.sets.items()}
    ingress: dict[str, str] = {}
    egress: dict[str, str] = {}
    for (fam, text), (ident, ing, egr, *_) in state.ipcache.items():
        addr, _, length = text.partition("/")
        if int(length) != ADDR_BITS[fam]:
            continue
        identity = state.identities.get(ident)
        if identity is not None:
            for s in identity.sets:
                if s in elements and state.sets[s].kind == ADDR:
                    elements[s].add(addr)
            for n, proto, port in identity.named:
                if n in elements:
                    elements[n].add((addr, proto, port))
        if ing and ing in state.policies:
            ingress[addr] = state.policies[ing].chain
        if egr and egr in state.policies:
            egress[addr] = state.policies[egr].chain
    sets = {n: AddressSet(n, s.family, s.kind, frozenset(elements[n]), s.comment)
            for n, s in sorted(state.sets.items())}
    return Ruleset(sets, dict(sorted(state.chains.items())), ingress, egress,
                   dict(sorted(state.guards.items())))


# ---- bytes: what the maps hold ---------------------------------------------------------


def encode_maps(state: BpfState, slot: int) -> MapContents:
    """The keys and values of `slot`'s copy in ipcache4, ipcache6 and policy."""
    return encode_slots(state)[slot]


def encode_slots(state: BpfState) -> tuple[MapContents, MapContents]:
    """`encode_maps` of both slots, in one pass: an entry's value and the rest of its
    key are the same in both (what a restart's adoption compares with the kernel)."""
    zero: MapContents = {m: {} for m in MAPS}
    one: MapContents = {m: {} for m in MAPS}
    for (fam, text), info in state.ipcache.items():
        for slot, out in ((0, zero), (1, one)):
            m, k, v = _ip_entry(fam, text, info, slot)
            out[m][k] = v
    policy0, policy1 = zero["policy"], one["policy"]
    pack = POLICY_VALUE.pack
    for key, value in state.policy.items():
        k0, k1 = _policy_keys(key)
        policy0[k0] = policy1[k1] = pack(value)
    return zero, one


def _doc_key(kind: str, name: str) -> bytes:
    text = f"{kind}{name}"
    if len(text.encode()) > 27:
        text = kind + "#" + hashlib.sha256(name.encode()).hexdigest()[:25]
    return text.encode()


def _rule_doc(r: ChainRule) -> dict[str, object]:
    doc: dict[str, object] = {"family": r.family, "peer_set": r.peer_set,
                              "named_set": r.named_set, "protocol": r.protocol,
                              "ports": [list(p) for p in r.ports], "comment": r.comment}
    if r.action != ALLOW:  # only then: a rule reads as it did before tiers existed
        doc["action"] = r.action
    if r.keep:  # likewise
        doc["keep"] = True
    return doc


def _docs(state: BpfState) -> dict[bytes, object]:
    docs: dict[bytes, object] = {}
    for i, ident in state.identities.items():
        docs[_doc_key("i", str(i))] = {"id": i, "family": ident.family, "sets": list(ident.sets),
                                       "named": [list(n) for n in ident.named]}
    for i, ref in state.policies.items():
        docs[_doc_key("p", str(i))] = {"id": i, "direction": ref.direction, "chain": ref.chain,
                                       "family": ref.family,
                                       "named": [list(n) for n in ref.named]}
    for name, c in state.chains.items():
        doc: dict[str, object] = {"name": name, "direction": c.direction,
                                  "comment": c.comment,
                                  "rules": [_rule_doc(r) for r in c.rules]}
        if c.keep:  # only then: a chain without keep reads as it did before keep existed
            doc["keep"] = True
        if c.tier:  # likewise for tiers
            doc["tier"] = c.tier
            doc["next"] = c.next
        if c.calls is not None:
            doc["calls"] = c.calls
        docs[_doc_key("c", name)] = doc
    for name, s in state.sets.items():
        docs[_doc_key("s", name)] = {"name": name, "family": s.family, "kind": s.kind,
                                     "comment": s.comment,
                                     "elements": sorted(str(e) for e in s.elements)
                                     if s.kind == NET else []}
    return docs


def encode_meta(state: BpfState) -> dict[bytes, bytes]:
    """The meta map: each definition as compact JSON in chunks of META_DATA bytes."""
    out: dict[bytes, bytes] = {}
    for key, doc in _docs(state).items():
        data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        for n, at in enumerate(range(0, max(len(data), 1), META_DATA)):
            chunk = data[at:at + META_DATA]
            out[META_KEY.pack(key, n)] = META_VALUE.pack(len(chunk), chunk)
    return out


def _named(items: object) -> tuple[Named, ...]:
    assert isinstance(items, list)
    return tuple((str(n), str(p), int(port)) for n, p, port in items)


def decode(maps: Mapping[str, Mapping[bytes, bytes]], meta: Mapping[bytes, bytes],
           slot: int, guards: Mapping[bytes, bytes] | None = None,
           ports: Mapping[int, str] | None = None) -> BpfState:
    """What one slot of the maps holds (entries of the other slot are ignored), and
    the guard map's entries of the interfaces in `ports` (ifindex -> name); an entry
    of an interface that is gone names no port (the next apply deletes it).

    Raises ValueError when the meta map cannot be read (a damaged chunk).
    """
    chunks: dict[bytes, dict[int, bytes]] = {}
    for k, v in meta.items():
        name, n = META_KEY.unpack(k)
        length, data = META_VALUE.unpack(v)
        chunks.setdefault(name.rstrip(b"\0"), {})[n] = data[:length]
    identities: dict[int, Identity] = {}
    policies: dict[int, PolicyRef] = {}
    chains: dict[str, Chain] = {}
    sets: dict[str, AddressSet] = {}
    for name, parts in chunks.items():
        if sorted(parts) != list(range(len(parts))):
            raise ValueError(f"meta {name!r}: chunks missing")
        doc = json.loads(b"".join(parts[i] for i in range(len(parts))))
        kind = name[:1]
        if kind == b"i":
            identities[int(doc["id"])] = Identity(int(doc["family"]), tuple(doc["sets"]),
                                                  _named(doc["named"]))
        elif kind == b"p":
            policies[int(doc["id"])] = PolicyRef(doc["direction"], doc["chain"],
                                                 int(doc["family"]), _named(doc["named"]))
        elif kind == b"c":
            rules = tuple(ChainRule(r["family"], r["peer_set"], r["named_set"], r["protocol"],
                                    tuple((int(a), int(b)) for a, b in r["ports"]),
                                    r["comment"], str(r.get("action", ALLOW)),
                                    bool(r.get("keep", False)))
                          for r in doc["rules"])
            chains[doc["name"]] = Chain(doc["name"], doc["direction"], rules, doc["comment"],
                                        bool(doc.get("keep", False)), str(doc.get("tier", "")),
                                        doc.get("next"), doc.get("calls"))
        elif kind == b"s":
            sets[doc["name"]] = AddressSet(doc["name"], int(doc["family"]), doc["kind"],
                                           frozenset(doc["elements"]), doc["comment"])
    ipcache: dict[Prefix, IpInfo] = {}
    for mapname, layout, fam in (("ipcache4", IP4_KEY, 4), ("ipcache6", IP6_KEY, 6)):
        for k, v in maps.get(mapname, {}).items():
            plen, s, packed = layout.unpack(k)
            if s != slot:
                continue
            ipcache[(fam, _prefix_text(fam, packed, plen - 8))] = IP_INFO.unpack(v)
    policy: dict[PolicyKey, int] = {}
    # The slot is the policy number's top bit (SLOT_BIT): the first byte of the big
    # endian number after the prefix length; the other slot's half is passed over
    # before it is unpacked (a restart reads ~190,000 entries at 10,000 pods).
    other = 0 if slot else 0x80
    length, rest, value = _PREFIX_LEN.unpack_from, _POLICY_REST.unpack_from, POLICY_VALUE.unpack
    for k, v in maps.get("policy", {}).items():
        if k[4] & 0x80 == other:
            continue
        pid, ident, proto, port = rest(k, 4)
        policy[(pid & ~SLOT_BIT, ident, proto, port, length(k)[0])] = value(v)[0]
    named_guards: dict[str, Guard] = {}
    for k, v in (guards or {}).items():
        port = (ports or {}).get(GUARD_KEY.unpack(k)[0])
        if port is not None:
            named_guards[port] = decode_guard(v)
    return BpfState(identities, policies, dict(sorted(chains.items())),
                    dict(sorted(sets.items())), ipcache, policy,
                    guards=dict(sorted(named_guards.items())))


# ---- guards ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1 << 16)
def encode_guard(port: str, guard: Guard) -> bytes:
    """A guard as the map's value (the program holds one address per family)."""
    addr4 = addr6 = b""
    for text in guard.addresses:
        a = parse_ip(text)
        if a is None:
            raise DataplaneError(f"bridge port {port}: {text!r} is not an IP address")
        if (addr4 if a.version == 4 else addr6):
            raise DataplaneError(
                f"bridge port {port} is bound to more than one IPv{a.version} address "
                f"({', '.join(guard.addresses)}); the eBPF datapath guards one per "
                f"family; nothing was changed")
        if a.version == 4:
            addr4 = a.packed
        else:
            addr6 = a.packed
    try:
        mac = bytes.fromhex(guard.mac.replace(":", "")) if guard.mac else bytes(6)
    except ValueError:
        mac = b""
    if len(mac) != 6:
        raise DataplaneError(f"bridge port {port}: {guard.mac!r} is not a MAC address")
    flags = ((GUARD_MAC if guard.mac else 0) | (GUARD_V4 if addr4 else 0)
             | (GUARD_V6 if addr6 else 0))
    return GUARD_VALUE.pack(mac, flags, addr4 or bytes(4), addr6 or bytes(16))


def ct_timeout(proto: int, flags: int) -> int:
    """The program's `ct_timeout`, in ns: how long an entry lives without a packet."""
    if proto == _PROTO_TCP:
        return (10 if flags & CT_CLOSING else 86400) * _SEC_NS
    if proto in (_PROTO_UDP, _PROTO_SCTP):
        return 180 * _SEC_NS
    return 60 * _SEC_NS


def ct_normal(key: bytes, value: bytes) -> tuple[bytes, bytes]:
    """An entry with its key in the program's normal form (`ct_normal_key`): the side
    with the lower address (words compared in the machine's order, first word first),
    then the lower port, as the key's src; CT_ORIG_B flipped when the sides change.
    Entries of a program from before the normal form are turned with this."""
    family, proto, pad, sport, dport, src, dst = CT_KEY.unpack(key)
    if (_WORDS.unpack(src), _PORT.unpack(sport)) <= (_WORDS.unpack(dst), _PORT.unpack(dport)):
        return key, value
    seen, generation, flags, owner = CT_VALUE.unpack(value)
    return (CT_KEY.pack(family, proto, pad, dport, sport, dst, src),
            CT_VALUE.pack(seen, generation, flags ^ CT_ORIG_B, owner))


def ct_original(key: bytes, value: bytes) -> tuple[int, int, bytes, bytes, int, int]:
    """A tracked connection as it was opened: (family, protocol, source address,
    destination address, source port, destination port)."""
    family, proto, _, sport, dport, src, dst = CT_KEY.unpack(key)
    if CT_VALUE.unpack(value)[2] & CT_ORIG_B:
        src, dst, sport, dport = dst, src, dport, sport
    return (family, proto, src, dst, int.from_bytes(sport, "big"),
            int.from_bytes(dport, "big"))


def ct_sweep(entries: Mapping[bytes, bytes], now: int) -> tuple[list[bytes], dict[int, int]]:
    """Of `ct_live`'s entries, those that expired (no packet for their timeout: the program
    deletes an entry only when a packet looks it up, and an abandoned connection's
    never does), and what each port holds of the rest (owner ifindex -> entries)."""
    expired: list[bytes] = []
    held: dict[int, int] = {}
    for key, value in entries.items():
        proto = key[1]
        seen, _, flags, owner = CT_VALUE.unpack(value)
        if now > seen and now - seen > ct_timeout(proto, flags):
            expired.append(key)
        else:
            held[owner] = held.get(owner, 0) + 1
    return expired, held


def decode_guard(value: bytes) -> Guard:
    mac, flags, addr4, addr6 = GUARD_VALUE.unpack(value)
    addresses = []
    if flags & GUARD_V4:
        addresses.append(str(ipaddress.IPv4Address(addr4)))
    if flags & GUARD_V6:
        addresses.append(str(ipaddress.IPv6Address(addr6)))
    return guard_of(addresses, mac.hex(":") if flags & GUARD_MAC else "")


def encode_guards(guards: Mapping[str, Guard], ports: Mapping[str, int]) -> dict[bytes, bytes]:
    """The guard map's contents: each guard of a port in `ports` (name -> ifindex).
    Every guard is encoded, so one the program cannot hold fails the apply even
    while its port is missing."""
    out: dict[bytes, bytes] = {}
    for port, guard in guards.items():
        value = encode_guard(port, guard)
        index = ports.get(port)
        if index is not None:
            out[GUARD_KEY.pack(index)] = value
    return out


def mac_ports(guards: Mapping[bytes, bytes], bridge_of: Mapping[int, int]
              ) -> dict[bytes, bytes]:
    """The mac_port map's contents from the guard map's: each MAC one port is bound to
    -> that port and its bridge (`bridge_of`: port ifindex -> bridge ifindex, the ports
    frames may go between directly). A MAC two ports claim is left to the bridge, as
    is a port not in `bridge_of`."""
    found: dict[bytes, bytes | None] = {}
    for k, v in guards.items():
        port = GUARD_KEY.unpack(k)[0]
        mac, flags = v[:6], v[6]
        bridge = bridge_of.get(port)
        if not flags & GUARD_MAC or bridge is None:
            continue
        key = MAC_PORT_KEY.pack(mac)
        found[key] = None if key in found else MAC_PORT_VALUE.pack(port, bridge)
    return {k: v for k, v in found.items() if v is not None}


def slot_of_key(mapname: str, key: bytes) -> int:
    """Which slot a key of ipcache4, ipcache6 or policy belongs to."""
    # The byte after the prefix length: the slot of an ipcache key, the top byte of a
    # policy key's id (big-endian, SLOT_BIT its top bit).
    return key[4] >> 7 if mapname == "policy" else key[4]


@dataclass(frozen=True)
class MapDelta:
    """A batch for each map: keys to write (with their values), keys to delete."""

    update: Mapping[str, Mapping[bytes, bytes]]
    delete: Mapping[str, tuple[bytes, ...]]

    @property
    def empty(self) -> bool:
        return not any(self.update.values()) and not any(self.delete.values())

    def size(self) -> int:
        return sum(len(v) for v in self.update.values()) + sum(
            len(v) for v in self.delete.values())


def map_delta(old: Mapping[str, Mapping[bytes, bytes]],
              new: Mapping[str, Mapping[bytes, bytes]]) -> MapDelta:
    """What turns the contents `old` into `new`, map by map."""
    update: dict[str, dict[bytes, bytes]] = {}
    delete: dict[str, tuple[bytes, ...]] = {}
    for name in sorted(set(old) | set(new)):
        o, n = old.get(name, {}), new.get(name, {})
        update[name] = {k: v for k, v in n.items() if o.get(k) != v}
        delete[name] = tuple(sorted(k for k in o if k not in n))
    return MapDelta(update, delete)


def _ip_entry(fam: int, text: str, info: IpInfo, slot: int) -> tuple[str, bytes, bytes]:
    base, plen = _prefix(text)
    if fam == 4:
        return "ipcache4", IP4_KEY.pack(8 + plen, slot, base.to_bytes(4, "big")), IP_INFO.pack(
            *info)
    return "ipcache6", IP6_KEY.pack(8 + plen, slot, base.to_bytes(16, "big")), IP_INFO.pack(
        *info)


def _policy_keys(key: PolicyKey) -> tuple[bytes, bytes]:
    """A policy entry's key in slot 0 and in slot 1."""
    pid, ident, proto, port, plen = key
    # POLICY_KEY's layout in two structs (the prefix length native, the rest big
    # endian): a third of the time of packing byte strings made one by one
    head = _PREFIX_LEN.pack(plen)
    return (head + _POLICY_REST.pack(pid, ident, proto, port),
            head + _POLICY_REST.pack(pid | SLOT_BIT, ident, proto, port))


_PREFIX_LEN = struct.Struct("=I")
_POLICY_REST = struct.Struct(">IIBHx")


def state_delta(old: BpfState, new: BpfState, slot: int) -> MapDelta:
    """`map_delta(encode_maps(old, slot), encode_maps(new, slot))`, encoding only changes
    (and looking only at what changed when `new` was made from `old` by a change)."""
    return state_deltas(old, new)[slot]


def state_deltas(old: BpfState, new: BpfState) -> tuple[MapDelta, MapDelta]:
    """`state_delta` of both slots, in one pass over what changed."""
    if not old.ipcache and not old.policy:  # from nothing (a first load): all of it
        nothing = {m: () for m in MAPS}
        zero, one = encode_slots(new)
        return MapDelta(zero, nothing), MapDelta(one, nothing)
    update: tuple[dict[str, dict[bytes, bytes]], ...] = ({m: {} for m in MAPS},
                                                         {m: {} for m in MAPS})
    delete: tuple[dict[str, list[bytes]], ...] = ({m: [] for m in MAPS}, {m: [] for m in MAPS})
    made = new.index
    if made is not None and made.base is not None and made.base() is old:
        prefixes: Iterable[Prefix] = made.prefixes
        keys: Iterable[PolicyKey] = made.policy_keys
    else:
        prefixes = new.ipcache.keys() | old.ipcache.keys()
        keys = new.policy.keys() | old.policy.keys()
    for p in prefixes:
        info, was = new.ipcache.get(p), old.ipcache.get(p)
        if info is None:
            if was is not None:
                for slot in (0, 1):
                    m, k, _ = _ip_entry(p[0], p[1], was, slot)
                    delete[slot][m].append(k)
        elif was != info:
            for slot in (0, 1):
                m, k, v = _ip_entry(p[0], p[1], info, slot)
                update[slot][m][k] = v
    updated0, updated1 = update[0]["policy"], update[1]["policy"]
    deleted0, deleted1 = delete[0]["policy"], delete[1]["policy"]
    pack_value = POLICY_VALUE.pack
    for key, old_value, value in _policy_values(old.policy, new.policy, keys):
        if old_value == value:
            continue
        k0, k1 = _policy_keys(key)
        if value is None:
            deleted0.append(k0)
            deleted1.append(k1)
        else:
            updated0[k0] = updated1[k1] = pack_value(value)
    return (MapDelta(update[0], {m: tuple(sorted(v)) for m, v in delete[0].items()}),
            MapDelta(update[1], {m: tuple(sorted(v)) for m, v in delete[1].items()}))


def in_place(old: BpfState, new: BpfState) -> bool:
    """Whether the active slot may go from `old` to `new` entry by entry, in the order
    of `in_place_steps`, with every packet judged by one of the two and never by a mix:
    at most one prefix's ipcache entry changes in each family (an update is atomic, and
    a packet looks up prefixes, identities and policies of its own family only), every
    policy entry added is one no packet looks up before it (its policy or its peer
    identity is new) and every one deleted one no packet looks up after it (gone), and
    no entry changes its verdict. An endpoint added, removed or relabelled is such a
    change; a policy's is not (every prefix it judges moves). Known only of a state made
    from `old` by a change (its index names what differs)."""
    made = new.index
    if made is None or made.base is None or made.base() is not old:
        return False
    moved = [p[0] for p in made.prefixes if old.ipcache.get(p) != new.ipcache.get(p)]
    if len(moved) != len(set(moved)):
        return False
    for key, was, now in _policy_values(old.policy, new.policy, made.policy_keys):
        if was == now:
            continue
        if was is not None and now is not None:
            return False
        pid, ident = key[0], key[1]
        unseen_in = old if was is None else new
        if pid in unseen_in.policies and (ident < FIRST_IDENTITY
                                          or ident in unseen_in.identities):
            return False
    return True


def in_place_steps(delta: MapDelta) -> tuple[MapDelta, MapDelta, MapDelta]:
    """The active slot's delta of an `in_place` change in the order that keeps each
    packet's judgement the old or the new: the policy entries added (nothing looks
    them up yet), the ipcache entry (the switch), the policy entries deleted."""
    ipcache = ("ipcache4", "ipcache6")
    return (MapDelta({"policy": delta.update.get("policy", {})}, {}),
            MapDelta({m: delta.update.get(m, {}) for m in ipcache},
                     {m: delta.delete.get(m, ()) for m in ipcache}),
            MapDelta({}, {"policy": delta.delete.get("policy", ())}))


def _chain_doc(c: Chain | None) -> object:
    """A chain with its comments (which its equality leaves out, but meta stores)."""
    return None if c is None else (c, c.comment, tuple(r.comment for r in c.rules))


def _set_doc(a: AddressSet | None) -> object:
    return None if a is None else (a, a.comment)


def meta_delta(old: BpfState, new: BpfState) -> MapDelta:
    """`map_delta` of the two states' meta maps, encoding only the definitions that changed."""
    # A state made from `old` by a change names the identities, policies, sets and
    # chains that may differ (compile/bpf_change.py; a chain whose comment alone changed
    # is a new object, and so among them).
    made = new.index
    hint: tuple[frozenset[int], frozenset[int], frozenset[str], frozenset[str]] | None = (
        made.memo.get("meta") if made is not None and made.base is not None
        and made.base() is old else None)

    def differing(a: Mapping[Any, V], b: Mapping[Any, V], keys: Iterable[Any] | None,
                  same: Callable[[V | None, V], bool]) -> dict[Any, V]:
        # The same object is the same definition (most are, from one apply to the next).
        if keys is None:
            return {k: v for k, v in a.items() if (w := b.get(k)) is not v and not same(w, v)}
        return {k: v for k in keys if (v := a.get(k)) is not None
                and (w := b.get(k)) is not v and not same(w, v)}

    def changed(a: BpfState, b: BpfState) -> BpfState:
        ids, pids, names, chains = hint if hint is not None else (None, None, None, None)
        return BpfState(
            differing(a.identities, b.identities, ids, operator.eq),
            differing(a.policies, b.policies, pids, operator.eq),
            differing(a.chains, b.chains, chains, lambda w, v: _chain_doc(w) == _chain_doc(v)),
            differing(a.sets, b.sets, names, lambda x, v: _set_doc(x) == _set_doc(v)))

    return map_delta({"meta": encode_meta(changed(old, new))},
                     {"meta": encode_meta(changed(new, old))})


def apply_delta(contents: Mapping[str, Mapping[bytes, bytes]], delta: MapDelta) -> MapContents:
    """`contents` with `delta` applied (what the kernel holds after the batch)."""
    out = {k: dict(v) for k, v in contents.items()}
    for name, keys in delta.delete.items():
        for k in keys:
            out.get(name, {}).pop(k, None)
    for name, items in delta.update.items():
        out.setdefault(name, {}).update(items)
    return out
