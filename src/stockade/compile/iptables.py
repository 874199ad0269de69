"""Rendering the ruleset for iptables + ipset, and reading it back (pure).

What stockade owns, per family (iptables for IPv4, ip6tables for IPv6), all in
the `filter` table and named with the datapath's prefix `P` (`stockade-`):

    FORWARD          one rule, first:  -j P-forward
    P-forward        conntrack first: RELATED,ESTABLISHED -> RETURN
                     TCP opening a connection without SYN -> DROP
                     (IPv6) neighbour solicitation/advertisement -> RETURN
                     ALLOW_MARK set -> -g P-marked
                     -j P-egress ; -j P-ingress
    P-ingress        32 rules, one per bucket:
                       -m set --match-set P-ib4-NN dst -g P-ib-NN
    P-ib-NN          one rule per ingress chain of bucket NN, then DROP:
                       -m set --match-set P-i4-<hash> dst -g P-i-<hash>
    P-egress, P-eb-NN  the same for egress, on the source address
    P-e-/P-i-<hash>  the rules of one set of policies: match -> RETURN,
                     else NFLOG "stockade-deny <chain>" (rate-limited) and DROP
    P-flip           flips ALLOW_MARK and returns
    P-marked         -j P-flip ; -j P-egress ; -j P-ingress ; -j P-flip

ClusterNetworkPolicy tiers (see `compile.ir`) are chains of the same kind,
reached the same way (an endpoint's first chain is a link, a NetworkPolicy or
a Baseline chain: `P-li-`, `P-i-`, `P-bi-<hash>`, dispatched as above; a
shared Admin chain `P-ai-<hash>` is only called):

    P-bi-/P-be-<hash>  a tier's rules in order: allow -> RETURN (the side passes),
                       deny -> NFLOG (rate-limited) and DROP, pass -> -g next
                       (none: RETURN); at the end -g next, or fall off (RETURN)
    P-li-/P-le-<hash>  -j P-ai-<hash> ; ALLOW_MARK set -> -g P-flip ; -g next
    P-ai-/P-ae-<hash>  the shared Admin rules: allow -> -g P-flip (sets the bit,
                       then RETURNs to the link), deny -> NFLOG and DROP,
                       pass -> RETURN; at the end fall off (RETURN to the link)

iptables returns one level at a time, so a shared chain cannot both "go on in
the caller's next" (pass) and "leave the caller too" (allow) by returning: the
allow leaves a mark bit for its link, which clears it and returns. The bit is
clear whenever a link calls (P-forward sends a packet that arrives with it to
P-marked, which clears it for the judging and sets it again after), so a
packet leaves with the mark it came with. Per new connection a tier costs its
chain's rules up to the first match (linear, as on nftables), a link three
rules more, and P-forward one mark test.

and ipsets: `P-s4-/s6-` selector members (hash:ip), `P-c4-/c6-` ipBlocks
(hash:net; an `except` is a `nomatch` entry when that is shorter),
`P-n4-/n6-` named ports (hash:ip,port); the dispatch sets `P-i4-/e4-/i6-/e6-
<hash>` (the endpoints whose ingress or egress the chain `i-<hash>` or
`e-<hash>` enforces: the ruleset's verdict maps; `P-li4-`, `P-bi4-`... for a
tier's) and the bucket sets `P-ib4-NN`... (every endpoint whose chain is in
bucket NN, a hash of the chain's name). An endpoint added, removed or moving
between policy sets is an ipset element change, and a new connection meets at
most 32 bucket rules and the rules of one bucket (about chains / 32) per
direction, whatever the number of endpoints. With one set match per chain
instead (the first version; `BUCKETS = 1` gives it back), 815 chains cost a new
connection ~50 us, half the connection rate, against 0.7-0.8 of it with buckets
(bench/iptables.py; the README has the numbers).

Nothing here ACCEPTs: an allowed packet RETURNs to FORWARD and meets the rules
other software put there, exactly as an nftables `accept` in stockade's own
table leaves other tables' verdicts standing.

Every rule carries a comment `stk:<digest>` (a digest of its chain and body).
Reading back compares every rule line of our chains, as `iptables-save` prints
it, with what this module renders; sets are compared by type, family and
maxelem, and elements (the bucket sets with what the dispatch sets imply).
Whatever differs is drift, repaired by the next verifying apply.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

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
    Ruleset,
)
from stockade.compile.nft import LOG_PREFIX, TAMPERED, canonical
from stockade.compile.plan import Plan
from stockade.model.cnp import ADMIN

CHAIN_MAX = 28  # iptables' chain names (XT_EXTENSION_MAXNAMELEN - 1 = 28 usable)
SET_MAX = 31  # ipset's set names (IPSET_MAXNAMELEN - 1)
# IR names are at most this long: a NetworkPolicy chain "i-" + 12 hex digits (a tier's
# "bi-" + 12 loses its dash where it would not fit, see `Names.chain`), a tier's
# dispatch set "bi4-" + 12.
_IR_SET_LEN = 16
_IR_CHAIN_LEN = 14
PREFIX_MAX = min(CHAIN_MAX - _IR_CHAIN_LEN, SET_MAX - _IR_SET_LEN - 1)  # 14 (room for "t")
MAXELEM = 1 << 20
FORWARD = "FORWARD"
TABLE = "filter"
FAMILIES = (4, 6)
_INET = {4: "inet", 6: "inet6"}
_TYPE = {ADDR: "hash:ip", NET: "hash:net", ADDR_PORT: "hash:ip,port"}
_KIND_OF_TYPE = {v: k for k, v in _TYPE.items()}
_SET_KINDS = {"s": ADDR, "c": NET, "n": ADDR_PORT}
# Options ipset prints that stockade never sets; anything else is drift.
_OK_OPTIONS = frozenset({"family", "hashsize", "maxelem", "bucketsize", "initval"})
MULTIPORT_MAX = 15  # ports per multiport match (a range counts twice)
# Dispatch is two levels of set matches: a packet meets at most BUCKETS bucket rules,
# then the rules of one bucket (about chains / BUCKETS), never one rule per chain.
BUCKETS = 32
# The packet mark bit a shared Admin chain's allow sets for the link that called it
# (iptables cannot return two levels at once). Any bit will do: the skeleton keeps it
# clear inside stockade's chains and gives a packet back the mark it came with.
ALLOW_MARK = 0x100000
_MARKED = f"-m mark --mark {ALLOW_MARK:#x}/{ALLOW_MARK:#x}"
# A policy chain's IR name: NetworkPolicy `i-`/`e-`, a tier's `ai-`, `be-`, a link `li-`...
_CHAIN_NAME = re.compile(r"([abl]?[ie])-.+")
_COMPACT_TIER = re.compile(r"[abl][ie][0-9a-f]{12}")  # a tier's chain without its dash
_DISPATCH_NAME = re.compile(r"([bl]?[ie])([46])-(.+)")


def _digest(*parts: object, n: int = 10) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:n]


@dataclass(frozen=True)
class Names:
    """Kernel names: the prefix, then the IR name (so a name read back gives the IR name).

    The prefix is the datapath's name and a dash; a name too long for iptables'
    28 characters is shortened to 8 characters and 5 of its hash, deterministically.
    """

    prefix: str

    @classmethod
    def of(cls, name: str) -> Names:
        if len(name) + 1 <= PREFIX_MAX:
            return cls(name + "-")
        return cls(f"{name[:8]}{_digest(name, n=5)}-")

    def chain(self, ir_name: str) -> str:
        """The kernel's name of a chain; a tier's loses its dash when the prefix is too
        long to keep it (14 characters: `ai-` + 12 would make 29)."""
        name = self.prefix + ir_name
        if len(name) > CHAIN_MAX and ir_name[2:3] == "-":
            return self.prefix + ir_name[:2] + ir_name[3:]
        return name

    def set(self, ir_name: str) -> str:
        return self.prefix + ir_name

    def tmp_set(self, ir_name: str) -> str:
        return self.prefix + "t" + ir_name

    @property
    def forward(self) -> str:
        return self.prefix + "forward"

    @property
    def flip(self) -> str:
        """The chain that flips `ALLOW_MARK` and returns."""
        return self.prefix + "flip"

    @property
    def marked(self) -> str:
        """Where a packet that arrives with `ALLOW_MARK` set is judged, the bit cleared."""
        return self.prefix + "marked"

    def dispatch_chain(self, direction: str) -> str:
        return self.prefix + direction

    def ir(self, kernel_name: str) -> str | None:
        if not kernel_name.startswith(self.prefix):
            return None
        rest = kernel_name[len(self.prefix):]
        return f"{rest[:2]}-{rest[2:]}" if _COMPACT_TIER.fullmatch(rest) else rest


def dispatch_set(chain: str, family: int) -> str:
    """The IR name of the set of endpoints a chain serves: `i-abc` -> `i4-abc`,
    `li-abc` -> `li4-abc`."""
    head, _, tail = chain.partition("-")
    return f"{head}{family}-{tail}"


def chain_of_dispatch(set_name: str) -> tuple[str, int] | None:
    """`i4-abc` -> (`i-abc`, 4); None if not a dispatch set's name."""
    m = _DISPATCH_NAME.fullmatch(set_name)
    return (f"{m[1]}-{m[3]}", int(m[2])) if m else None


def set_kind(set_name: str) -> tuple[str, int] | None:
    """(kind, family) of an address set's IR name (`s4-`, `c6-`, `n4-`), else None."""
    if len(set_name) >= 4 and set_name[0] in _SET_KINDS and set_name[1] in "46" and \
            set_name[2] == "-":
        return _SET_KINDS[set_name[0]], int(set_name[1])
    return None


def is_chain_name(ir_name: str) -> bool:
    return _CHAIN_NAME.fullmatch(ir_name) is not None


def dispatched(chain: str) -> bool:
    """Whether endpoints can be dispatched to a chain: every policy chain but a shared
    Admin tier's (`ai-`, `ae-`), which only link chains call."""
    return not chain.startswith("a")


@dataclass(frozen=True)
class Layout:
    """What the rendering depends on besides the ruleset (nft's `Table`)."""

    names: Names
    # Dropped new connections go to this NFLOG group, with the prefix
    # "stockade-deny <chain>" as on nftables; None: no logging.
    log_group: int | None = None
    log_rate: int = 50  # per second, per chain, beyond a burst of as many
    # A new connection from a source holding this many in conntrack is dropped (connlimit,
    # as nft's `Table.conntrack_limit`); 0: no limit.
    conntrack_limit: int = 0

    @classmethod
    def of(cls, name: str = "stockade", log_group: int | None = None,
           conntrack_limit: int = 0) -> Layout:
        return cls(Names.of(name), log_group, conntrack_limit=conntrack_limit)


# ---- rules ---------------------------------------------------------------------------

def _with_comment(chain: str, spec: str, target: str) -> str:
    """A rule's body exactly as iptables-save prints it (after `-A <chain> `)."""
    comment = f'-m comment --comment "stk:{_digest(chain, spec, target)}"'
    return " ".join(p for p in (spec, comment, target) if p)


def _port_groups(ports: Sequence[tuple[int, int]]) -> list[str]:
    """multiport's --dports values, at most 15 ports (a range counts twice) each."""
    groups: list[str] = []
    current: list[str] = []
    used = 0
    for lo, hi in ports:
        cost = 1 if lo == hi else 2
        if used + cost > MULTIPORT_MAX:
            groups.append(",".join(current))
            current, used = [], 0
        current.append(str(lo) if lo == hi else f"{lo}:{hi}")
        used += cost
    if current:
        groups.append(",".join(current))
    return groups


def rule_specs(names: Names, rule: ChainRule, direction: str, family: int) -> list[str]:
    """The match part of a rule, in iptables-save's order; [] if not of this family.

    Several specs when the ports need more than one multiport match.
    """
    if rule.family is not None and rule.family != family:
        return []
    parts: list[str] = []
    if rule.protocol is not None and rule.named_set is None:
        parts.append(f"-p {rule.protocol.lower()}")
    if rule.peer_set is not None:
        parts.append(f"-m set --match-set {names.set(rule.peer_set)} "
                     f"{'src' if direction == INGRESS else 'dst'}")
    if rule.named_set is not None:
        parts.append(f"-m set --match-set {names.set(rule.named_set)} dst,dst")
    base = " ".join(parts)
    if rule.protocol is None or rule.named_set is not None or not rule.ports:
        return [base]
    return [f"{base} -m multiport --dports {g}" for g in _port_groups(rule.ports)]


def _log_rule(layout: Layout, kname: str, chain: Chain, spec: str) -> str:
    """Copy a dropped packet to the log group, rate-limited (NFLOG does not end the
    chain: the DROP after it drops whatever the limit lets through unlogged)."""
    return _with_comment(
        kname, " ".join(p for p in (spec, f"-m limit --limit {layout.log_rate}/sec "
                                          f"--limit-burst {layout.log_rate}") if p),
        f'-j NFLOG --nflog-prefix "{LOG_PREFIX} {chain.name}" '
        f"--nflog-group {layout.log_group}")


def called(chain: Chain) -> bool:
    """A shared Admin tier's chain: jumped to (`-j`) by link chains, never dispatched to."""
    return chain.tier == ADMIN and chain.calls is None


def rule_target(names: Names, chain: Chain, rule: ChainRule) -> str:
    """What a matching rule of a policy chain does.

    The side passes: RETURN (to P-forward, which goes on to the ingress side or back
    to FORWARD); from a shared Admin chain, whose RETURN goes back to the link that
    called it, P-flip first sets `ALLOW_MARK` for the link to see. A deny drops. A
    pass goes on in `next` (none: the side passes); from a shared Admin chain it
    returns to its link, which goes on in its own `next`.
    """
    if rule.action == DENY:
        return "-j DROP"
    if called(chain):
        return f"-g {names.flip}" if rule.action == ALLOW else "-j RETURN"
    if rule.action == PASS and chain.tier and chain.next is not None:
        return f"-g {names.chain(chain.next)}"
    return "-j RETURN"


def chain_bodies(layout: Layout, chain: Chain, family: int) -> list[str]:
    """Every rule of a policy chain in one family, as iptables-save prints it.

    A NetworkPolicy chain returns on a match and logs and drops at its end. A tier's
    chain acts on its first matching rule and otherwise goes on in `next` (or falls
    off its end: the side passes). A link chain first calls its Admin chain; a return
    with `ALLOW_MARK` set is that chain's allow, taken back off on the way out.
    """
    names = layout.names
    kname = names.chain(chain.name)
    out: list[str] = []
    if chain.calls is not None:
        out += [_with_comment(kname, "", f"-j {names.chain(chain.calls)}"),
                _with_comment(kname, _MARKED, f"-g {names.flip}")]
    for rule in chain.rules:
        target = rule_target(names, chain, rule) if chain.tier else "-j RETURN"
        for spec in rule_specs(names, rule, chain.direction, family):
            if chain.tier and rule.action == DENY and layout.log_group is not None:
                out.append(_log_rule(layout, kname, chain, spec))
            out.append(_with_comment(kname, spec, target))
    if chain.final:
        if layout.log_group is not None:
            out.append(_log_rule(layout, kname, chain, ""))
        out.append(_with_comment(kname, "", "-j DROP"))
    elif chain.next is not None and not called(chain):
        out.append(_with_comment(kname, "", f"-g {names.chain(chain.next)}"))
    return out


def base_bodies(names: Names, family: int, conntrack_limit: int = 0) -> list[str]:
    """The rules of P-forward: conntrack first, then the two dispatch chains."""
    k = names.forward
    out = [
        _with_comment(k, "-m conntrack --ctstate RELATED,ESTABLISHED", "-j RETURN"),
        # A TCP packet that would open a connection without SYN is a stream that
        # conntrack lost (or that stockade cut after revoking access): picked up
        # mid-stream it would pass as a new connection the other way.
        _with_comment(k, "-p tcp -m conntrack --ctstate NEW -m tcp ! --tcp-flags "
                         "FIN,SYN,RST,ACK SYN", "-j DROP"),
    ]
    if conntrack_limit:
        # One source cannot fill the node's conntrack table (nft's `limit_rules`).
        out.append(_with_comment(
            k, f"-m conntrack --ctstate NEW -m connlimit --connlimit-above {conntrack_limit} "
               f"--connlimit-mask {32 if family == 4 else 128} --connlimit-saddr", "-j DROP"))
    if family == 6:
        out += [_with_comment(k, f"-p ipv6-icmp -m icmp6 --icmpv6-type {t}", "-j RETURN")
                for t in (135, 136)]
    # ALLOW_MARK is clear inside our chains: a packet that has it is judged in P-marked
    out.append(_with_comment(k, _MARKED, f"-g {names.marked}"))
    out += [_with_comment(k, "", f"-j {names.dispatch_chain(d)}") for d in (EGRESS, INGRESS)]
    return out


def flip_bodies(names: Names) -> list[str]:
    """P-flip: `ALLOW_MARK` flipped; it then returns (falls off its end)."""
    return [_with_comment(names.flip, "", f"-j MARK --set-xmark {ALLOW_MARK:#x}/0x0")]


def marked_bodies(names: Names) -> list[str]:
    """P-marked: both sides judged with `ALLOW_MARK` cleared, and set again after."""
    k = names.marked
    return [_with_comment(k, "", f"-j {names.flip}"),
            *(_with_comment(k, "", f"-j {names.dispatch_chain(d)}") for d in (EGRESS, INGRESS)),
            _with_comment(k, "", f"-j {names.flip}")]


@functools.lru_cache(maxsize=1 << 14)
def bucket_of(chain: str) -> int:
    """The bucket of a policy chain: a hash of its name (names are content hashes)."""
    return int(hashlib.sha256(chain.encode()).hexdigest()[:4], 16) % BUCKETS


def bucket_set(direction: str, bucket: int, family: int) -> str:
    """IR name of the set of every endpoint whose chain is in `bucket`: `ib4-07`."""
    return f"{direction[0]}b{family}-{bucket:02d}"


def bucket_chain(direction: str, bucket: int) -> str:
    """IR name of the chain holding the dispatch rules of one bucket: `ib-07`."""
    return f"{direction[0]}b-{bucket:02d}"


def _peer_dir(direction: str) -> str:
    return "dst" if direction == INGRESS else "src"


def dispatch_body(names: Names, chain: str, family: int) -> str:
    """In the chain's bucket chain: an endpoint of the chain goes to it."""
    direction = _direction(chain)
    return _with_comment(names.chain(bucket_chain(direction, bucket_of(chain))),
                         f"-m set --match-set {names.set(dispatch_set(chain, family))} "
                         f"{_peer_dir(direction)}", f"-g {names.chain(chain)}")


def bucket_bodies(names: Names, direction: str, family: int) -> list[str]:
    """P-ingress / P-egress: one rule per bucket, to its bucket chain."""
    k = names.dispatch_chain(direction)
    return [_with_comment(k, f"-m set --match-set {names.set(bucket_set(direction, b, family))}"
                             f" {_peer_dir(direction)}",
                          f"-g {names.chain(bucket_chain(direction, b))}")
            for b in range(BUCKETS)]


def bucket_tail(names: Names, direction: str, bucket: int) -> str:
    """An endpoint in a bucket but in none of its chains' sets: drift; fail closed."""
    return _with_comment(names.chain(bucket_chain(direction, bucket)), "", "-j DROP")


def bucket_chain_lines(names: Names, direction: str, bucket: int, chains: Iterable[str],
                       family: int) -> list[str]:
    """A bucket chain declared (emptied) and filled with the dispatch rules of `chains`."""
    k = names.chain(bucket_chain(direction, bucket))
    mine = sorted(c for c in chains if dispatched(c) and _direction(c) == direction
                  and bucket_of(c) == bucket)
    return [f":{k} - [0:0]", *(f"-A {k} {dispatch_body(names, c, family)}" for c in mine),
            f"-A {k} {bucket_tail(names, direction, bucket)}"]


def skeleton_chains(names: Names) -> list[str]:
    """The kernel names of the chains every family holds whatever the policies."""
    return [names.forward, names.flip, names.marked,
            *(names.dispatch_chain(d) for d in (EGRESS, INGRESS)),
            *(names.chain(bucket_chain(d, b)) for d in (EGRESS, INGRESS)
              for b in range(BUCKETS))]


def jump_body(names: Names) -> str:
    return _with_comment(FORWARD, "", f"-j {names.forward}")


# ---- sets ------------------------------------------------------------------------------

def create_line(names: Names, kernel_name: str, kind: str, family: int) -> str:
    return (f"create {kernel_name} {_TYPE[kind]} family {_INET[family]} maxelem {MAXELEM} "
            "-exist")


def _net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def _subtract(nets: list[Net], hole: Net) -> list[Net]:
    out: list[Net] = []
    for n in nets:
        if n.version != hole.version:
            out.append(n)
        elif hole.subnet_of(n):  # type: ignore[arg-type]
            out.extend(n.address_exclude(hole))  # type: ignore[arg-type]
        elif not n.subnet_of(hole):  # type: ignore[arg-type]
            out.append(n)
    return out


def _collapse(nets: Iterable[Net]) -> list[Net]:
    return list(ipaddress.collapse_addresses(cast(Any, list(nets))))


def _halves(family: int) -> list[Net]:
    return list(ipaddress.ip_network("0.0.0.0/0" if family == 4 else "::/0").subnets(1))


def net_entries(elements: Iterable[Element], family: int) -> list[str]:
    """An interval set as hash:net entries: networks, or a supernet with `nomatch` holes.

    hash:net cannot hold /0, so each half of the address space is written on its
    own. Within a half, the smallest network holding every member plus its holes
    (as `nomatch`, most specific wins) is used when that takes fewer entries:
    10.0.0.0/8 except 10.1.2.3/32 is 2 entries instead of 24.
    """
    nets = [n for e in elements if isinstance(e, str) and (n := _net(e)) is not None
            and n.version == family]
    full: list[Net] = []
    for n in _collapse(nets):
        full.extend(_halves(family) if n.prefixlen == 0 else [n])
    out: list[str] = []
    for half in _halves(family):
        mine = sorted((n for n in full if n.subnet_of(half)),  # type: ignore[arg-type]
                      key=lambda n: (n.network_address, n.prefixlen))
        if not mine:
            continue
        first, last = int(mine[0].network_address), int(mine[-1].broadcast_address)
        bits = 32 if family == 4 else 128
        length = bits - (first ^ last).bit_length()
        cover = ipaddress.ip_network((first >> (bits - length) << (bits - length), length)
                                     if length else 0)
        holes: list[Net] = [cover]
        for n in mine:
            holes = _subtract(holes, n)
        holes = _collapse(holes)
        if 1 + len(holes) < len(mine):
            out.append(str(cover))
            out += [f"{h} nomatch" for h in sorted(holes, key=lambda h: (h.network_address,
                                                                           h.prefixlen))]
        else:
            out += [str(n) for n in mine]
    return out


def element_text(kind: str, e: Element) -> str:
    if kind == ADDR_PORT:
        assert isinstance(e, tuple)
        return f"{e[0]},{e[1]}:{e[2]}"
    assert isinstance(e, str)
    return e


def _sorted(elements: Iterable[Element]) -> list[Element]:
    return sorted(elements, key=lambda e: (str(type(e)), e))


def set_lines(names: Names, s: AddressSet, kernel_name: str | None = None) -> list[str]:
    """A set created (if missing) and filled, as `ipset restore` lines."""
    k = kernel_name or names.set(s.name)
    out = [create_line(names, k, s.kind, s.family)]
    if s.kind == NET:
        out += [f"add {k} {e} -exist" for e in net_entries(s.elements, s.family)]
    else:
        out += [f"add {k} {element_text(s.kind, e)} -exist" for e in _sorted(s.elements)]
    return out


def swap_lines(names: Names, s: AddressSet) -> list[str]:
    """Replace a set whole, atomically for the rules using it: fill a temporary set, swap."""
    tmp = names.tmp_set(s.name)
    fill = set_lines(names, s, tmp)
    return [fill[0], f"flush {tmp}", *fill[1:], f"swap {tmp} {names.set(s.name)}",
            f"destroy {tmp}"]


# ---- plans -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One process: `ipset restore` (family None) or `ip[6]tables-restore --noflush`."""

    tool: str  # "ipset" or "iptables"
    family: int | None
    text: str

    @property
    def lines(self) -> list[str]:
        return self.text.splitlines()


def _restore(lines: list[str]) -> str:
    return "\n".join([f"*{TABLE}", *lines, "COMMIT", ""])


@dataclass
class Repair:
    """What a read-back found that a plan does not express, and how to clear it away.

    Filled by `parse_kernel`; an empty Repair (the default) means none.
    """

    # per family: rewrite P-forward, P-ingress, P-egress whole and fix the jump
    skeleton: dict[int, bool] = field(default_factory=dict)
    # per family: every FORWARD rule jumping to P-forward (deleted when the skeleton is
    # rewritten, before the one jump is inserted first)
    jumps: dict[int, list[str]] = field(default_factory=dict)
    # per family: chains in our namespace to delete (foreign ones, leftovers)
    del_chains: dict[int, list[str]] = field(default_factory=dict)
    # kernel set names with a wrong definition (recreated by swap) / not ours (destroyed)
    bad_sets: set[str] = field(default_factory=set)
    del_sets: list[str] = field(default_factory=list)
    # (kernel dispatch set, address): an address in more than one dispatch set
    stale_members: list[tuple[str, str]] = field(default_factory=list)
    # chains present in the kernel (per family), whose dispatch rules P-in/egress hold
    kernel_chains: dict[int, set[str]] = field(default_factory=dict)
    # IR names of dispatch sets whose chain is in neither family (a refused apply's
    # leftovers): destroyed unless a plan brings the chain back
    orphans: list[str] = field(default_factory=list)
    # ipset lines that make the bucket sets agree with the chains' sets again
    bucket_fixes: list[str] = field(default_factory=list)

    @property
    def needed(self) -> bool:
        return (any(self.skeleton.values()) or any(self.del_chains.values()) or bool(self.bad_sets)
                or bool(self.del_sets) or bool(self.stale_members) or bool(self.orphans)
                or bool(self.bucket_fixes))


def render_plan(layout: Layout, p: Plan, old: Ruleset, *, skeleton: bool = False,
                repair: Repair | None = None) -> list[Step]:
    """The processes that make the kernel go from `old` to `old + p`, in order.

    Up to five steps, each one process and empty ones left out: (1) ipset:
    new sets, added elements, endpoints entering dispatch sets; (2) iptables
    per family: new and rewritten chains; (3) ipset: removed elements,
    endpoints leaving dispatch sets; (4) iptables: chains no longer used;
    (5) ipset: sets no longer used. Every reference stays valid between steps.
    A plan that only moves elements is one ipset session.
    `skeleton`: write the base chain, the dispatch chains and the jump (first apply).
    """
    names = layout.names
    rep = repair or Repair()
    new_chains = {c.name: c for c in (*p.add_chains, *p.replace_chains)}
    del_chains = set(p.del_chains)
    old_map = {INGRESS: old.ingress, EGRESS: old.egress}

    # (1) ipset: creations and additions (leftover temporary sets out first)
    s1: list[str] = [f"destroy {k}" for k in rep.del_sets
                     if (names.ir(k) or "").startswith("t")]
    if skeleton or any(rep.skeleton.values()):
        for d in (EGRESS, INGRESS):
            for b in range(BUCKETS):
                for fam in FAMILIES:
                    ir = bucket_set(d, b, fam)
                    s1 += (swap_lines(names, AddressSet(ir, fam, ADDR, frozenset()))
                           if names.set(ir) in rep.bad_sets
                           else [create_line(names, names.set(ir), ADDR, fam)])
    for s in p.add_sets:
        k = names.set(s.name)
        s1 += swap_lines(names, s) if k in rep.bad_sets else set_lines(names, s)
    for s, els in p.add_elements:
        if s.kind == NET:
            s1 += swap_lines(names, s)  # rewritten whole, atomically
        else:
            s1 += [f"add {names.set(s.name)} {element_text(s.kind, e)} -exist"
                   for e in _sorted(els)]
    for c in p.add_chains:
        if not dispatched(c.name):
            continue
        for fam in FAMILIES:
            k = names.set(dispatch_set(c.name, fam))
            if k in rep.bad_sets:
                s1 += swap_lines(names, AddressSet(dispatch_set(c.name, fam), fam, ADDR,
                                                   frozenset()))
            else:
                s1.append(create_line(names, k, ADDR, fam))
    for bad in sorted(rep.bad_sets):
        ir = names.ir(bad) or ""
        cd = chain_of_dispatch(ir)
        if cd is not None and cd[0] not in {c.name for c in p.add_chains}:
            # a dispatch set recreated empty: the plan refills it (the map entries of a
            # set read as bad were left out of the read-back)
            s1 += swap_lines(names, AddressSet(ir, cd[1], ADDR, frozenset()))
    # an endpoint enters its chain's set first: without its bucket, nothing reads it yet
    for (_, fam, addr), target in p.set_map:
        s1.append(f"add {names.set(dispatch_set(target, fam))} {addr} -exist")

    # (2) iptables: new chains, rewritten chains, the skeleton
    t2: dict[int, list[str]] = {f: [] for f in FAMILIES}
    t4: dict[int, list[str]] = {f: [] for f in FAMILIES}
    for fam in FAMILIES:
        lines = t2[fam]
        whole = skeleton or rep.skeleton.get(fam, False)
        held = rep.kernel_chains.get(fam, set(old.chains))
        # declared (and emptied) first: iptables-restore wants a target declared before
        # a rule jumps to it (a tier's chain jumps to others, a link to P-flip)
        if whole:
            lines += [f":{k} - [0:0]" for k in skeleton_chains(names)]
        for cn in sorted(new_chains):
            lines.append(f":{names.chain(cn)} - [0:0]")
        for cn in sorted(new_chains):
            lines += [f"-A {names.chain(cn)} {b}"
                      for b in chain_bodies(layout, new_chains[cn], fam)]
        if whole:
            present = (held | set(new_chains)) - set(rep.del_chains.get(fam, []))
            lines += [f"-A {names.flip} {b}" for b in flip_bodies(names)]
            for d in (EGRESS, INGRESS):
                for b in range(BUCKETS):
                    lines += bucket_chain_lines(names, d, b, present, fam)[1:]
            for d in (EGRESS, INGRESS):
                lines += [f"-A {names.dispatch_chain(d)} {b}"
                          for b in bucket_bodies(names, d, fam)]
            lines += [f"-A {names.marked} {b}" for b in marked_bodies(names)]
            lines += [f"-A {names.forward} {b}"
                      for b in base_bodies(names, fam, layout.conntrack_limit)]
            lines += [f"-D {FORWARD} {b}" for b in rep.jumps.get(fam, [])]
            lines.append(f"-I {FORWARD} 1 {jump_body(names)}")
        else:
            # chains the kernel does not hold in this family: their dispatch rule goes
            # first in their bucket chain (before its closing DROP)
            for cn in sorted(c for c in set(new_chains) - held if dispatched(c)):
                k = names.chain(bucket_chain(_direction(cn), bucket_of(cn)))
                lines.append(f"-I {k} 1 {dispatch_body(names, cn, fam)}")

    # (3) ipset: endpoints into their new bucket, out of their old one, out of their
    # old chain's set (in that order: at every line an endpoint is dispatched to its
    # old chain or its new one), then removed elements
    s3: list[str] = list(rep.bucket_fixes)
    moves: dict[tuple[str, int, str], list[str | None]] = {}
    for direction, fam, addr in p.del_map:
        moves[(direction, fam, addr)] = [old_map[direction].get(addr), None]
    for (direction, fam, addr), target in p.set_map:
        moves.setdefault((direction, fam, addr), [None, None])[1] = target
    bucket_dels: list[str] = []
    for (direction, fam, addr), (was, now) in sorted(moves.items()):
        ob = bucket_of(was) if was is not None and is_chain_name(was) else None
        nb = bucket_of(now) if now is not None else None
        if ob == nb:
            continue
        if nb is not None:
            s3.append(f"add {names.set(bucket_set(direction, nb, fam))} {addr} -exist")
        if ob is not None:
            bucket_dels.append(f"del {names.set(bucket_set(direction, ob, fam))} {addr} -exist")
    s3 += bucket_dels
    added = {(names.set(dispatch_set(chain, fam)), addr)
             for (_, fam, addr), chain in p.set_map}
    for direction, fam, addr in p.del_map:
        was = old_map[direction].get(addr)
        if was is not None and is_chain_name(was):
            k = names.set(dispatch_set(was, fam))
            if (k, addr) not in added:
                s3.append(f"del {k} {addr} -exist")
    s3 += [f"del {k} {addr} -exist" for k, addr in rep.stale_members if (k, addr) not in added]
    for s, els in p.del_elements:
        if s.kind != NET:
            s3 += [f"del {names.set(s.name)} {element_text(s.kind, e)} -exist"
                   for e in _sorted(els)]

    # (4) iptables: chains no longer used (their bucket chains rewritten without them)
    for fam in FAMILIES:
        gone_ir = sorted(del_chains)
        foreign = sorted(rep.del_chains.get(fam, []))
        if not gone_ir and not foreign:
            continue
        lines = t4[fam]
        present = (rep.kernel_chains.get(fam, set(old.chains)) | set(new_chains)) - del_chains
        for d, b in sorted({(_direction(cn), bucket_of(cn)) for cn in gone_ir
                            if dispatched(cn)}):
            lines += bucket_chain_lines(names, d, b, present, fam)
        # only where the chain is: an apply cut short (kill -9 between the families'
        # steps) leaves it in one family, and `-F` of a missing chain fails the restore
        held = rep.kernel_chains.get(fam, set(old.chains))
        gone = [names.chain(cn) for cn in gone_ir if cn in held] + foreign
        # every one flushed before any is deleted: a tier's chain going away may be
        # what another one going away jumps to
        lines += [f"-F {k}" for k in gone] + [f"-X {k}" for k in gone]

    # (5) ipset: sets no longer used
    s5 = [f"destroy {names.set(n)}" for n in p.del_sets]
    s5 += [f"destroy {names.set(dispatch_set(cn, fam))}" for cn in sorted(del_chains)
           if dispatched(cn) for fam in FAMILIES]
    s5 += [f"destroy {k}" for k in rep.del_sets if not (names.ir(k) or "").startswith("t")]
    keep = {a.name for a in p.add_sets} | {
        dispatch_set(cn, fam) for cn in (set(old.chains) | set(new_chains)) - del_chains
        for fam in FAMILIES} | {bucket_set(d, b, fam) for d in (EGRESS, INGRESS)
                                for b in range(BUCKETS) for fam in FAMILIES}
    s5 += [f"destroy {k}" for k in sorted(rep.bad_sets) if names.ir(k) not in keep]
    s5 += [f"destroy {names.set(n)}" for n in rep.orphans if n not in keep]

    steps: list[Step] = []
    ipset_pending: list[str] = []

    def flush_ipset() -> None:
        if ipset_pending:
            steps.append(Step("ipset", None, "\n".join(ipset_pending) + "\n"))
            ipset_pending.clear()

    for part in (s1, t2, s3, t4, s5):
        if isinstance(part, list):
            ipset_pending += part
            continue
        if any(part.values()):
            flush_ipset()
            steps += [Step("iptables", fam, _restore(part[fam])) for fam in FAMILIES
                      if part[fam]]
    flush_ipset()
    return steps


def _direction(chain: str) -> str:
    """A policy chain's direction from its IR name: the letter before the dash."""
    return INGRESS if chain[chain.index("-") - 1] == "i" else EGRESS


def render_remove(layout: Layout, save: Mapping[int, str], ipset_save: str) -> list[Step]:
    """Everything of ours out: the jump, the chains, then the sets (read from the kernel)."""
    names = layout.names
    steps: list[Step] = []
    for fam in FAMILIES:
        chains, rules = parse_save(save.get(fam, ""))
        mine = [c for c in chains if c.startswith(names.prefix)]
        lines = [f"-D {FORWARD} {b}" for b in rules.get(FORWARD, [])
                 if _targets(b, names.forward)]
        lines += [f"-F {c}" for c in mine] + [f"-X {c}" for c in mine]
        if lines:
            steps.append(Step("iptables", fam, _restore(lines)))
    sets = [n for n, _ in _ipset_creates(ipset_save) if n.startswith(names.prefix)]
    if sets:
        steps.append(Step("ipset", None, "".join(f"destroy {n}\n" for n in sets)))
    return steps


# ---- reading back ------------------------------------------------------------------------

def parse_save(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """The filter table of `iptables-save` output: chain names, and each chain's rule bodies."""
    chains: list[str] = []
    rules: dict[str, list[str]] = {}
    in_filter = False
    for line in text.splitlines():
        if line.startswith("*"):
            in_filter = line[1:].strip() == TABLE
        elif not in_filter or line.startswith("#"):
            continue
        elif line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            chains.append(name)
            rules.setdefault(name, [])
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            rules.setdefault(chain, []).append(rest[0] if rest else "")
    return chains, rules


def _targets(body: str, chain: str) -> bool:
    try:
        words = shlex.split(body)
    except ValueError:
        return False
    return any(w in ("-j", "-g", "--jump", "--goto") and i + 1 < len(words)
               and words[i + 1] == chain for i, w in enumerate(words))


def _ipset_creates(text: str) -> list[tuple[str, list[str]]]:
    return [(w[1], w[2:]) for line in text.splitlines()
            if (w := line.split()) and w[0] == "create" and len(w) >= 3]


def parse_ipset(text: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """`ipset save` output: each set's create options (type first), and its elements."""
    defs: dict[str, list[str]] = {}
    members: dict[str, list[str]] = {}
    for line in text.splitlines():
        w = line.split(" ", 2)
        if len(w) < 3:
            continue
        if w[0] == "create":
            defs[w[1]] = w[2].split()
            members.setdefault(w[1], [])
        elif w[0] == "add":
            members.setdefault(w[1], []).append(w[2].strip())
    return defs, members


def _definition_ok(options: list[str], kind: str, family: int) -> bool:
    if not options or options[0] != _TYPE[kind]:
        return False
    rest = options[1:]
    if len(rest) % 2:
        return False
    pairs = dict(zip(rest[::2], rest[1::2], strict=True))
    return (set(pairs) <= _OK_OPTIONS and pairs.get("family") == _INET[family]
            and pairs.get("maxelem") == str(MAXELEM))


def read_net(entries: Iterable[str], family: int) -> frozenset[Element]:
    """hash:net entries (most specific wins, `nomatch` excludes) back into networks."""
    parsed: list[tuple[Net, bool]] = []
    for e in entries:
        text, _, flag = e.partition(" ")
        n = _net(text)
        if n is not None and n.version == family:
            parsed.append((n, flag.strip() == "nomatch"))
    nets: list[Net] = []
    for n, nomatch in sorted(parsed, key=lambda x: x[0].prefixlen):
        nets = _subtract(nets, n) if nomatch else _collapse([*nets, n])
    return frozenset(str(n) for n in _collapse(nets))


def _read_elements(kind: str, family: int, raw: list[str]) -> frozenset[Element] | None:
    if kind == NET:
        return read_net(raw, family)
    out: set[Element] = set()
    for e in raw:
        text = e.split(" ", 1)[0]
        if kind == ADDR:
            n = _net(text)
            if n is None or n.version != family:
                return None
            out.add(str(n.network_address))
        else:
            addr, _, pp = text.rpartition(",")
            proto, _, port = pp.partition(":")
            n = _net(addr)
            if n is None or not port.isdigit():
                return None
            out.add((str(n.network_address), proto, int(port)))
    return frozenset(out)


@dataclass
class KernelState:
    """What the kernel holds of ours, in stockade's terms, and what differs from ours."""

    ruleset: Ruleset
    repair: Repair
    drift: list[str] = field(default_factory=list)
    present: bool = False  # anything of ours at all
    # The port guard's nftables table (compile.guard) is not there (made when a port is
    # to be guarded), or there and not as made (made anew).
    guard_missing: bool = False
    guard_ok: bool = True

    @property
    def needs_repair(self) -> bool:
        return bool(self.drift) or self.repair.needed or not self.guard_ok


def _bucket_key(ir: str) -> tuple[str, int, int] | None:
    """`ib4-07` -> (ingress, 4, 7); None if not a bucket set's name."""
    if (len(ir) == 6 and ir[0] in "ie" and ir[1] == "b" and ir[2] in "46" and ir[3] == "-"
            and ir[4:].isdigit() and int(ir[4:]) < BUCKETS):
        return (INGRESS if ir[0] == "i" else EGRESS, int(ir[2]), int(ir[4:]))
    return None


def _unkey(key: tuple[str, int, int]) -> tuple[str, int, int]:
    """(direction, family, bucket) -> the arguments of `bucket_set`."""
    return key[0], key[2], key[1]


def parse_kernel(layout: Layout, save: Mapping[int, str], ipset_save: str,
                 expected_chains: Mapping[str, Chain]) -> KernelState:
    """`ip[6]tables-save` (per family) and `ipset save` output, against what we render.

    A policy chain is known by its name among `expected_chains` and is that
    chain only if its rules in both families are exactly what we render for it;
    otherwise it reads as tampered (plans rewrite or delete it). Sets must have
    our type, family and maxelem. The base chain, the dispatch chains and the
    one jump from FORWARD must be exactly ours. Everything in our namespace
    that is none of these is foreign and removed.
    """
    names = layout.names
    rep = Repair()
    drift: list[str] = []
    present = False

    # sets
    defs, members = parse_ipset(ipset_save)
    sets: dict[str, AddressSet] = {}
    dispatch: dict[str, dict[str, list[str]]] = {INGRESS: {}, EGRESS: {}}
    # (direction, family, bucket) -> members, for the bucket sets that are as we make them
    buckets: dict[tuple[str, int, int], set[str]] = {}
    for kname, options in defs.items():
        ir = names.ir(kname)
        if ir is None:
            continue
        present = True
        if (bk := _bucket_key(ir)) is not None:
            els = _read_elements(ADDR, bk[1], members.get(kname, []))
            if els is None or not _definition_ok(options, ADDR, bk[1]):
                drift.append(f"set {kname}: definition differs")
                rep.bad_sets.add(kname)
            else:
                buckets[bk] = {str(e) for e in els}
            continue
        sk, cd = set_kind(ir), chain_of_dispatch(ir)
        kind, fam = sk if sk is not None else (ADDR, cd[1]) if cd is not None else ("", 0)
        if not kind:
            drift.append(f"foreign set {kname}")
            rep.del_sets.append(kname)
            continue
        els = _read_elements(kind, fam, members.get(kname, []))
        if not _definition_ok(options, kind, fam) or els is None:
            drift.append(f"set {kname}: definition differs")
            rep.bad_sets.add(kname)
            continue
        if cd is not None:
            for addr in els:
                assert isinstance(addr, str)
                dispatch[_direction(cd[0])].setdefault(addr, []).append(cd[0])
        else:
            sets[ir] = AddressSet(ir, fam, kind, els)
    maps: dict[str, dict[str, str]] = {INGRESS: {}, EGRESS: {}}
    for direction, by_addr in dispatch.items():
        for addr, holders in by_addr.items():
            holders.sort()
            maps[direction][addr] = holders[0]
            if len(holders) > 1:
                drift.append(f"{direction} endpoint {addr} in {len(holders)} dispatch sets")
                fam = 6 if ":" in addr else 4
                rep.stale_members += [(names.set(dispatch_set(h, fam)), addr)
                                      for h in holders[1:]]

    # chains, per family
    seen: dict[str, dict[int, list[str]]] = {}
    for fam in FAMILIES:
        chain_names, rules = parse_save(save.get(fam, ""))
        tool = "iptables" if fam == 4 else "ip6tables"
        kernel_chains: set[str] = set()
        rep.kernel_chains[fam] = kernel_chains
        fixed = set(skeleton_chains(names))
        skeleton_ok = True
        for kname in chain_names:
            ir = names.ir(kname)
            if ir is None or kname in fixed:
                continue
            present = True
            if is_chain_name(ir):
                kernel_chains.add(ir)
                seen.setdefault(ir, {})[fam] = rules.get(kname, [])
            else:
                drift.append(f"foreign chain {kname} ({tool})")
                rep.del_chains.setdefault(fam, []).append(kname)
                skeleton_ok = False  # a dispatch rule may jump to it
        # the base chain, the dispatch chains
        if names.forward in chain_names:
            present = True
        for k, want_rules in ((names.forward,
                               base_bodies(names, fam, layout.conntrack_limit)),
                              (names.flip, flip_bodies(names)),
                              (names.marked, marked_bodies(names))):
            if rules.get(k) != want_rules or k not in chain_names:
                if k in chain_names or any(names.ir(c) for c in chain_names):
                    drift.append(f"base chain {k} "
                                 f"{'differs' if k in chain_names else 'missing'} ({tool})")
                skeleton_ok = False
        for d in (EGRESS, INGRESS):
            k = names.dispatch_chain(d)
            if k not in chain_names or rules.get(k) != bucket_bodies(names, d, fam):
                if k in chain_names:
                    drift.append(f"dispatch chain {k} differs ({tool})")
                skeleton_ok = False
            for b in range(BUCKETS):
                k = names.chain(bucket_chain(d, b))
                got = rules.get(k, [])
                want = sorted(dispatch_body(names, c, fam) for c in kernel_chains
                              if dispatched(c) and _direction(c) == d and bucket_of(c) == b)
                if (k not in chain_names or not got or got[-1] != bucket_tail(names, d, b)
                        or sorted(got[:-1]) != want):
                    if k in chain_names:
                        drift.append(f"dispatch chain {k} differs ({tool})")
                    skeleton_ok = False
        # the jump
        jumps = [b for b in rules.get(FORWARD, []) if _targets(b, names.forward)]
        first = rules.get(FORWARD, [None])[0] if rules.get(FORWARD) else None
        if jumps != [jump_body(names)] or first != jump_body(names):
            if names.forward in chain_names:
                drift.append(f"jump from {FORWARD} {'missing' if not jumps else 'altered'}"
                             f" ({tool})")
            skeleton_ok = False
        rep.jumps[fam] = jumps
        rep.skeleton[fam] = not skeleton_ok

    chains: dict[str, Chain] = {}
    for ir, by_fam in seen.items():
        chain = expected_chains.get(ir)
        direction = _direction(ir)
        if chain is not None and chain.direction == direction and all(
                by_fam.get(fam) == chain_bodies(layout, chain, fam) for fam in FAMILIES) and not (
                {n for r in chain.rules for n in (r.peer_set, r.named_set) if n}
                - set(sets)):
            chains[ir] = chain
            continue
        if chain is not None:
            drift.append(f"chain {names.chain(ir)}: rules differ")
        chains[ir] = Chain(ir, direction, TAMPERED, "tampered")
    for kname in defs:
        ir = names.ir(kname)
        cd = chain_of_dispatch(ir) if ir is not None else None
        if ir is not None and cd is not None and cd[0] not in seen and kname not in rep.bad_sets:
            rep.orphans.append(ir)
    # the bucket sets: every endpoint of a chain the family holds, in its chain's bucket
    expect: dict[tuple[str, int, int], set[str]] = {
        (d, fam, b): set() for d in (EGRESS, INGRESS) for fam in FAMILIES
        for b in range(BUCKETS)}
    for d in (EGRESS, INGRESS):
        for addr, chain_name in maps[d].items():
            fam = 6 if ":" in addr else 4
            if chain_name in rep.kernel_chains.get(fam, set()):
                expect[(d, fam, bucket_of(chain_name))].add(addr)
    for key, members_wanted in sorted(expect.items()):
        have = buckets.get(key)
        k = names.set(bucket_set(*_unkey(key)))
        if have is None:
            rep.skeleton[key[1]] = True  # created with the skeleton, filled here
            have = set()
        adds, dels = sorted(members_wanted - have), sorted(have - members_wanted)
        if (adds or dels) and key in buckets:
            drift.append(f"set {k}: {len(adds)} endpoints missing, {len(dels)} extra")
        rep.bucket_fixes += [f"add {k} {a} -exist" for a in adds]
        rep.bucket_fixes += [f"del {k} {a} -exist" for a in dels]
    return KernelState(Ruleset(dict(sorted(sets.items())), dict(sorted(chains.items())),
                               maps[INGRESS], maps[EGRESS]), rep, drift, present)


__all__ = [
    "FAMILIES",
    "KernelState",
    "Layout",
    "Names",
    "Repair",
    "Step",
    "canonical",
    "chain_bodies",
    "net_entries",
    "parse_ipset",
    "parse_kernel",
    "parse_save",
    "read_net",
    "render_plan",
    "render_remove",
]
