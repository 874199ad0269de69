"""The port guard as an nftables `bridge` table: what may leave each pod's bridge port.

Policy judges a packet by its addresses; nothing in it knows which port an
address belongs to, so a pod that writes its own frames (CAP_NET_RAW, a runtime
default) could send with another pod's address and be judged as that pod, or
answer ARP and neighbour discovery for it and receive its traffic. The guard
binds each port to its pod's addresses and MAC (`compile.ir.Guard`) before the
bridge forwards anything, and so before br_netfilter, conntrack and the policy
table see the packet. The table has the policy table's name, in the `bridge`
family::

    set ports     { type ifname }                  guarded ports
    set macports  { type ifname }                  ... whose MAC is known
    set macs      { type ifname . ether_addr }
    set a4        { type ifname . ipv4_addr }
    set a6        { type ifname . ipv6_addr }
    set l6        { type ifname . ipv6_addr }      the port's link-local address (its MAC's)
    set t6        { typeof iifname . @th,64,128 }  a6 and l6 again, as a neighbour advert's target
    set m4, m6    { type ifname . ether_addr . ipv4_addr / ipv6_addr }  a4, a6 with the MAC
    set dmacs     { type ether_addr }              guarded pods' MACs, as destinations
    set d4, d6    { type ether_addr . ipv4_addr / ipv6_addr }  each with its pod's address
    chain guard   hook prerouting, priority filter (before br_netfilter), policy accept
        the common cases, and IPv6 (not ICMPv6) alike with @m6 and @d6:
        to the host (pkttype host), iifname . ether saddr . ip saddr @m4 accept
        to a pod (pkttype other), ether daddr . ip daddr @d4 and the same @m4 accept
        ether daddr @dmacs, ether daddr . ip daddr != @d4 drop   a frame to a pod's MAC
            carries its address (IPv6: but ND and MLD), from any port
        ether saddr @dmacs, iifname . ether saddr != @macs drop   a pod's MAC, from
            another port (bound to no MAC, or unguarded)
        iifname != @ports accept                           unguarded: not a pod of ours
        pkttype broadcast or multicast: IPv4 dropped, IPv6 but ND and MLD dropped
        iifname @macports iifname . ether saddr != @macs drop
        iifname @macports iifname . arp saddr ether != @macs drop
        arp (Ethernet/IPv4) iifname . arp saddr ip @a4 accept
        arp (Ethernet/IPv4) arp saddr ip 0.0.0.0 accept    address probes
        icmpv6 type { nd-router-advert, nd-redirect } drop   a pod is no router
        icmpv6 type nd-neighbor-advert, target neither iifname's (@t6) nor link-local: drop
        ... from a port whose MAC is known, a target not its own (@t6): drop
        icmpv6 type nd-neighbor-solicit from ::, the same two
        iifname . ip saddr @a4 accept
        iifname . ip6 saddr @a6 accept
        iifname @macports ip6 saddr fe80::/10, not iifname's (@l6): drop
        icmpv6 type { ND, MLD } ip6 saddr { ::, fe80::/10 } accept   and nothing else
        drop                                               anything else: other ethertypes,
                                                           VLAN tags, foreign sources

A port's link-local address is the one the kernel derives from its MAC (EUI-64,
`link_local`; stockade's plumbing keeps the interface in that mode): a port whose MAC
is known sends neighbour discovery and MLD from it or from :: only, and claims (by
advertisement or duplicate address probe) no other pod's. A port whose MAC is not
known may use any link-local address, as before.

`t6` exists because libnftables 1.0.6 has no `icmpv6 taddr`: the target is read
raw, and a raw field's set must be declared with `typeof`, which its JSON cannot
say; so the skeleton goes in as text (`skeleton_text`), and elements as JSON
commands (`element_commands`) in the policy table's transaction, or as raw
netlink (`datapath.nfrules`). Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from stockade.compile.ir import Guard, guard_of

FAMILY = "bridge"
CHAIN = "guard"
VERSION = "guard v7"
PORTS, MACPORTS, MACS, A4, A6, T6 = "ports", "macports", "macs", "a4", "a6", "t6"
L6 = "l6"
M4, M6 = "m4", "m6"
DMACS, D4, D6 = "dmacs", "d4", "d6"
SETS = (PORTS, MACPORTS, MACS, A4, A6, L6, T6, M4, M6, DMACS, D4, D6)
PORT_SETS = (PORTS, MACPORTS, MACS, A4, A6, L6, T6, M4, M6)  # elements keyed by the port
SET_TYPES: dict[str, Any] = {PORTS: "ifname", MACPORTS: "ifname", MACS: ["ifname", "ether_addr"],
                             A4: ["ifname", "ipv4_addr"], A6: ["ifname", "ipv6_addr"],
                             L6: ["ifname", "ipv6_addr"], T6: ["ifname", "integer"],
                             M4: ["ifname", "ether_addr", "ipv4_addr"],
                             M6: ["ifname", "ether_addr", "ipv6_addr"],
                             DMACS: "ether_addr", D4: ["ether_addr", "ipv4_addr"],
                             D6: ["ether_addr", "ipv6_addr"]}
_SET_DECLS = {PORTS: "type ifname", MACPORTS: "type ifname", MACS: "type ifname . ether_addr",
              A4: "type ifname . ipv4_addr", A6: "type ifname . ipv6_addr",
              L6: "type ifname . ipv6_addr",
              T6: "typeof meta iifname . @th,64,128",
              M4: "type ifname . ether_addr . ipv4_addr",
              M6: "type ifname . ether_addr . ipv6_addr",
              DMACS: "type ether_addr", D4: "type ether_addr . ipv4_addr",
              D6: "type ether_addr . ipv6_addr"}
_ARP = "arp htype 1 arp ptype ip arp hlen 6 arp plen 4"
# What a host sends from a link-local address or :: (types 130-133, 135, 136, 143)
_ND_MLD = ("mld-listener-query", "mld-listener-report", "mld-listener-done",
           "nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert",
           "mld2-listener-report")

_GROUP = "{ broadcast, multicast }"  # frames to more than one host

# The chain's rules as text (sent) and as libnftables 1.0.6 lists them back (compared,
# in `compile.nft.canonical_expr` form), with their comments.
RULES: tuple[tuple[str, str], ...] = (
    # What nearly every frame is, first: from its port's MAC and address (only a guarded
    # port has elements in m4, m6) to the host (the bridge's MAC: pkttype host), or to
    # another pod (pkttype other) at its own address. Not ICMPv6: an advertisement's target
    # is checked below. (A broadcast or multicast is checked below.)
    ("ether type ip meta pkttype host iifname . ether saddr . ip saddr @m4 accept",
     "own mac and ipv4 to the host"),
    ("ether type ip meta pkttype other ether daddr . ip daddr @d4 "
     "iifname . ether saddr . ip saddr @m4 accept", "own mac and ipv4 to a pod"),
    ("ether type ip6 meta pkttype host meta l4proto != ipv6-icmp "
     "iifname . ether saddr . ip6 saddr @m6 accept", "own mac and ipv6 to the host"),
    ("ether type ip6 meta pkttype other meta l4proto != ipv6-icmp "
     "ether daddr . ip6 daddr @d6 iifname . ether saddr . ip6 saddr @m6 accept",
     "own mac and ipv6 to a pod"),
    # A frame to a pod's MAC, from any port, is for the pod's own address. The pod would
    # take one to a broadcast or multicast address, or to its link-local one, as its
    # own, and no policy names those: its ingress would judge none of them. Neighbour
    # discovery and MLD go to any.
    ("ether type ip ether daddr @dmacs ether daddr . ip daddr != @d4 drop",
     "to a pod not at its ipv4"),
    ("ether type ip6 meta l4proto != ipv6-icmp ether daddr @dmacs "
     "ether daddr . ip6 daddr != @d6 drop", "to a pod not at its ipv6"),
    (f"icmpv6 type != {{ {', '.join(_ND_MLD)} }} ether daddr @dmacs "
     "ether daddr . ip6 daddr != @d6 drop", "icmpv6 to a pod not at its ipv6"),
    # A guarded pod's MAC is its port's alone, whichever port sends it (one bound to no
    # MAC, or unguarded): the bridge would learn it there and forward the pod's frames
    # to the sender.
    ("ether saddr @dmacs iifname . ether saddr != @macs drop", "a pod's mac, another port"),
    ("iifname != @ports accept", "unguarded port"),
    # A datagram to every pod at once has no pod's address as its destination, so no
    # pod's ingress policy would judge it: pods send none, but neighbour discovery
    # and MLD.
    (f"meta pkttype {_GROUP} ether type ip drop", "ipv4 broadcast or multicast"),
    (f"meta pkttype {_GROUP} ether type ip6 meta l4proto != ipv6-icmp drop",
     "ipv6 multicast"),
    (f"meta pkttype {_GROUP} icmpv6 type != {{ {', '.join(_ND_MLD)} }} drop",
     "ipv6 multicast but nd or mld"),
    ("iifname @macports iifname . ether saddr != @macs drop", "foreign mac"),
    ("iifname @macports iifname . arp saddr ether != @macs drop", "arp foreign mac"),
    (f"{_ARP} iifname . arp saddr ip @a4 accept", "arp own address"),
    (f"{_ARP} arp saddr ip 0.0.0.0 accept", "arp probe"),
    # A pod is not a router: its advertisements would give its neighbours (and the host)
    # a default route through it, its redirects move their routes (CVE-2020-10749).
    ("icmpv6 type { nd-router-advert, nd-redirect } drop", "router advert or redirect"),
    ("icmpv6 type nd-neighbor-advert iifname . @th,64,128 != @t6 "
     "@th,64,16 & 0xffc0 != 0xfe80 drop", "advert foreign target"),
    # A port whose MAC is known has its link-local address in t6 too: no other.
    ("icmpv6 type nd-neighbor-advert iifname @macports iifname . @th,64,128 != @t6 drop",
     "advert foreign link-local target"),
    # A duplicate address detection probe (from ::) for another's address makes its
    # owner, still detecting, give the address up.
    ("icmpv6 type nd-neighbor-solicit ip6 saddr :: iifname . @th,64,128 != @t6 "
     "@th,64,16 & 0xffc0 != 0xfe80 drop", "probe foreign target"),
    ("icmpv6 type nd-neighbor-solicit ip6 saddr :: iifname @macports "
     "iifname . @th,64,128 != @t6 drop", "probe foreign link-local target"),
    ("iifname . ip saddr @a4 accept", "own ipv4"),
    ("iifname . ip6 saddr @a6 accept", "own ipv6"),
    # A solicitation from another's link-local address makes its receivers take that
    # address to be at this pod's MAC.
    ("iifname @macports ip6 saddr fe80::/10 iifname . ip6 saddr != @l6 drop",
     "foreign link-local source"),
    # No policy names link-local addresses, and pods on one bridge share a link: from
    # one, anything but neighbour discovery and MLD would pass around policy.
    (f"icmpv6 type {{ {', '.join(_ND_MLD)} }} ip6 saddr {{ ::, fe80::/10 }} accept",
     "nd or mld from link-local or unspecified"),
    ("drop", "anything else"),
)


def _iif() -> dict[str, Any]:
    return {"meta": {"key": "iifname"}}


def _pl(protocol: str, fld: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": fld}}


def _raw(offset: int, length: int) -> dict[str, Any]:
    return {"payload": {"base": "th", "offset": offset, "len": length}}


def _m(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


_ARP_EXPR = [_m(_pl("arp", "htype"), 1), _m(_pl("arp", "ptype"), "ip"),
             _m(_pl("arp", "hlen"), 6), _m(_pl("arp", "plen"), 4)]

_PKTTYPE = {"meta": {"key": "pkttype"}}
_GROUP_SET = {"set": ["broadcast", "multicast"]}

_NOT_ICMPV6 = _m({"meta": {"key": "l4proto"}}, "ipv6-icmp", "!=")
_TO_POD = _m(_pl("ether", "daddr"), "@dmacs")

LISTED: tuple[list[dict[str, Any]], ...] = (
    [_m(_PKTTYPE, "host"),
     _m({"concat": [_iif(), _pl("ether", "saddr"), _pl("ip", "saddr")]}, "@m4"),
     {"accept": None}],
    [_m(_PKTTYPE, "other"),
     _m({"concat": [_pl("ether", "daddr"), _pl("ip", "daddr")]}, "@d4"),
     _m({"concat": [_iif(), _pl("ether", "saddr"), _pl("ip", "saddr")]}, "@m4"),
     {"accept": None}],
    [_m(_PKTTYPE, "host"), _NOT_ICMPV6,
     _m({"concat": [_iif(), _pl("ether", "saddr"), _pl("ip6", "saddr")]}, "@m6"),
     {"accept": None}],
    [_m(_PKTTYPE, "other"), _NOT_ICMPV6,
     _m({"concat": [_pl("ether", "daddr"), _pl("ip6", "daddr")]}, "@d6"),
     _m({"concat": [_iif(), _pl("ether", "saddr"), _pl("ip6", "saddr")]}, "@m6"),
     {"accept": None}],
    [_TO_POD,
     _m({"concat": [_pl("ether", "daddr"), _pl("ip", "daddr")]}, "@d4", "!="),
     {"drop": None}],
    [_NOT_ICMPV6, _TO_POD,
     _m({"concat": [_pl("ether", "daddr"), _pl("ip6", "daddr")]}, "@d6", "!="),
     {"drop": None}],
    [_m(_pl("icmpv6", "type"), {"set": list(_ND_MLD)}, "!="), _TO_POD,
     _m({"concat": [_pl("ether", "daddr"), _pl("ip6", "daddr")]}, "@d6", "!="),
     {"drop": None}],
    [_m(_pl("ether", "saddr"), "@dmacs"),
     _m({"concat": [_iif(), _pl("ether", "saddr")]}, "@macs", "!="), {"drop": None}],
    [_m(_iif(), "@ports", "!="), {"accept": None}],
    [_m(_PKTTYPE, _GROUP_SET), _m(_pl("ether", "type"), "ip"), {"drop": None}],
    [_m(_PKTTYPE, _GROUP_SET), _m(_pl("ether", "type"), "ip6"),
     _m({"meta": {"key": "l4proto"}}, "ipv6-icmp", "!="), {"drop": None}],
    [_m(_PKTTYPE, _GROUP_SET), _m(_pl("icmpv6", "type"), {"set": list(_ND_MLD)}, "!="),
     {"drop": None}],
    [_m(_iif(), "@macports"), _m({"concat": [_iif(), _pl("ether", "saddr")]}, "@macs", "!="),
     {"drop": None}],
    [_m(_iif(), "@macports"),
     _m({"concat": [_iif(), _pl("arp", "saddr ether")]}, "@macs", "!="), {"drop": None}],
    [*_ARP_EXPR, _m({"concat": [_iif(), _pl("arp", "saddr ip")]}, "@a4"), {"accept": None}],
    [*_ARP_EXPR, _m(_pl("arp", "saddr ip"), "0.0.0.0"),  # noqa: S104
     {"accept": None}],
    [_m(_pl("icmpv6", "type"), {"set": ["nd-router-advert", "nd-redirect"]}),
     {"drop": None}],
    [_m(_pl("icmpv6", "type"), "nd-neighbor-advert"),
     _m({"concat": [_iif(), _raw(64, 128)]}, "@t6", "!="),
     _m({"&": [_raw(64, 16), 65472]}, 65152, "!="), {"drop": None}],
    [_m(_pl("icmpv6", "type"), "nd-neighbor-advert"), _m(_iif(), "@macports"),
     _m({"concat": [_iif(), _raw(64, 128)]}, "@t6", "!="), {"drop": None}],
    [_m(_pl("icmpv6", "type"), "nd-neighbor-solicit"), _m(_pl("ip6", "saddr"), "::"),
     _m({"concat": [_iif(), _raw(64, 128)]}, "@t6", "!="),
     _m({"&": [_raw(64, 16), 65472]}, 65152, "!="), {"drop": None}],
    [_m(_pl("icmpv6", "type"), "nd-neighbor-solicit"), _m(_pl("ip6", "saddr"), "::"),
     _m(_iif(), "@macports"),
     _m({"concat": [_iif(), _raw(64, 128)]}, "@t6", "!="), {"drop": None}],
    [_m({"concat": [_iif(), _pl("ip", "saddr")]}, "@a4"), {"accept": None}],
    [_m({"concat": [_iif(), _pl("ip6", "saddr")]}, "@a6"), {"accept": None}],
    [_m(_iif(), "@macports"),
     _m(_pl("ip6", "saddr"), {"prefix": {"addr": "fe80::", "len": 10}}),
     _m({"concat": [_iif(), _pl("ip6", "saddr")]}, "@l6", "!="), {"drop": None}],
    [_m(_pl("icmpv6", "type"), {"set": list(_ND_MLD)}),
     _m(_pl("ip6", "saddr"), {"set": ["::", {"prefix": {"addr": "fe80::", "len": 10}}]}),
     {"accept": None}],
    [{"drop": None}],
)


def comment(text: str) -> str:
    return f"{text} #{VERSION}"


def base_chain(name: str) -> dict[str, Any]:
    """The guard chain's definition as listed back (less its handle)."""
    return {"family": FAMILY, "table": name, "name": CHAIN, "type": "filter",
            "hook": "prerouting", "prio": -200, "policy": "accept"}


def skeleton_text(name: str, guards: Mapping[str, Guard] | None = None, *,
                  table: bool = True) -> str:
    """One libnftables transaction (text) that makes the table anew: whatever was there
    goes, the sets, the chain and, with `guards`, their elements (`table=False`: into
    an empty table made before, owned). Names and addresses are validated before they
    get here (`model.admit.validate_attachment`), and each is checked again below:
    nothing unchecked is formatted into a command."""
    lines = [f"table {FAMILY} {name}", f"delete table {FAMILY} {name}",
             f"add table {FAMILY} {name}"] if table else []
    lines += [f"add set {FAMILY} {name} {s} {{ {_SET_DECLS[s]}; }}" for s in SETS]
    lines.append(f"add chain {FAMILY} {name} {CHAIN} {{ type filter hook prerouting "
                 "priority filter; policy accept; }")
    lines += [f'add rule {FAMILY} {name} {CHAIN} {rule} comment "{comment(text)}"'
              for rule, text in RULES]
    for set_name, elems in _elements(guards or {}).items():
        if elems:
            lines.append(f"add element {FAMILY} {name} {set_name} {{ "
                         + ", ".join(_text_element(set_name, e) for e in elems) + " }")
    return "\n".join(lines) + "\n"


def element_text(name: str, set_guards: Iterable[tuple[str, Guard]],
                 old: Iterable[tuple[str, Guard]]) -> str:
    """`element_commands` as text, for `nft -f -` (one transaction)."""
    lines: list[str] = []
    for verb, guards in (("delete", old), ("add", set_guards)):
        by_set: dict[str, list[str]] = {}
        for port, g in guards:
            for set_name, e in port_elements(port, g):
                by_set.setdefault(set_name, []).append(_text_element(set_name, e))
        lines += [f"{verb} element {FAMILY} {name} {s} {{ {', '.join(els)} }}"
                  for s, els in sorted(by_set.items())]
    return "".join(f"{line}\n" for line in lines)


def _text_element(set_name: str, e: Element) -> str:
    if set_name not in PORT_SETS:  # a MAC (checked by Guard's maker), then an address
        return e if isinstance(e, str) else " . ".join(e)
    if isinstance(e, str):
        return f'"{_port(e)}"'
    return " . ".join((f'"{_port(e[0])}"', *e[1:]))


def _port(name: str) -> str:
    from stockade.model.admit import validate_attachment

    if validate_attachment(name, ""):
        raise ValueError(f"{name!r} is not an interface name")
    return name


# a port, or a port and the fields after it; in dmacs, d4, d6 a MAC and its address
Element = str | tuple[str, ...]


def _elements(guards: Mapping[str, Guard]) -> dict[str, list[Element]]:
    """Each set's elements for `guards` (ports sorted), as JSON would send them."""
    out: dict[str, list[Element]] = {s: [] for s in SETS}
    for port, g in sorted(guards.items()):
        for set_name, e in port_elements(port, g):
            out[set_name].append(e)
    return out


def port_elements(port: str, g: Guard) -> list[tuple[str, Element]]:
    """(set, element) of one guard: the port, its MAC, its addresses."""
    _port(port)
    out: list[tuple[str, Element]] = [(PORTS, port)]
    mac = _mac(g.mac) if g.mac else ""
    if mac:
        ll = link_local(mac)
        out += [(MACPORTS, port), (MACS, (port, mac)), (DMACS, mac), (L6, (port, str(ll))),
                (T6, (port, f"0x{int(ll):032x}"))]
    for text in g.addresses:
        addr = ipaddress.ip_address(text)
        if addr.version == 4:
            out.append((A4, (port, str(addr))))
        else:
            out += [(A6, (port, str(addr))), (T6, (port, f"0x{int(addr):032x}"))]
        if mac:
            out += [(M4 if addr.version == 4 else M6, (port, mac, str(addr))),
                    (D4 if addr.version == 4 else D6, (mac, str(addr)))]
    return out


_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def link_local(mac: str) -> ipaddress.IPv6Address:
    """The link-local address the kernel gives an interface with `mac` (EUI-64, the
    default `addr_gen_mode`): fe80::/64 and the MAC with ff:fe in its middle and the
    universal/local bit flipped."""
    b = bytes.fromhex(_mac(mac).replace(":", ""))
    iid = bytes([b[0] ^ 0x02, b[1], b[2], 0xFF, 0xFE, b[3], b[4], b[5]])
    return ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + iid)


def _mac(text: str) -> str:
    if not _MAC.fullmatch(text):
        raise ValueError(f"{text!r} is not a MAC address")
    return text


def element_commands(name: str, set_guards: Iterable[tuple[str, Guard]],
                     old: Iterable[tuple[str, Guard]]) -> list[dict[str, Any]]:
    """JSON commands that replace the `old` guards' elements by the `set_guards`' (a
    port in `old` and not in `set_guards` is unguarded)."""
    cmds: list[dict[str, Any]] = []
    for verb, guards in (("delete", old), ("add", set_guards)):
        by_set: dict[str, list[Any]] = {}
        for port, g in guards:
            for set_name, e in port_elements(port, g):
                by_set.setdefault(set_name, []).append(
                    e if isinstance(e, str) else {"concat": list(e)})
        cmds += [{verb: {"element": {"family": FAMILY, "table": name, "name": s, "elem": els}}}
                 for s, els in sorted(by_set.items())]
    return cmds


@dataclass
class KernelGuard:
    """The guard table as read back: the guards it enforces, and what is not as made."""

    guards: dict[str, Guard]
    drift: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.drift


def parse_guard(doc: Mapping[str, Any], name: str) -> KernelGuard:
    """What `nft -j list table bridge NAME` shows, against what `skeleton_text` makes.

    Any difference in the chain or the sets' definitions, or any other object, is
    drift (the caller rewrites the table whole). Guards are read from the sets: a
    port whose elements disagree (an address in `a6` without its `t6` twin, a MAC
    without its port in `macports`) is drift too, and its guard is left out.
    """
    from stockade.compile.nft import canonical_expr

    drift: list[str] = []
    sets: dict[str, list[Any]] = {}
    rules: list[dict[str, Any]] = []
    chains: list[dict[str, Any]] = []
    for item in doc.get("nftables", []):
        if not isinstance(item, dict) or len(item) != 1:
            continue
        ((kind, body),) = item.items()
        if kind in ("metainfo", "table"):
            continue
        if kind == "set" and body.get("name") in SET_TYPES:
            if body.get("type") != SET_TYPES[body["name"]] or body.get("flags"):
                drift.append(f"guard set {body['name']}: definition differs")
            sets[body["name"]] = body.get("elem", [])
        elif kind == "chain":
            chains.append(body)
        elif kind == "rule":
            rules.append(body)
        else:
            drift.append(f"guard table: foreign {kind} {body.get('name', '')}".rstrip())
    if set(sets) != set(SETS):
        drift += [f"guard set {s} missing" for s in SETS if s not in sets]
    if len(chains) != 1 or {k: v for k, v in chains[0].items() if k != "handle"} != \
            base_chain(name):
        drift.append("guard chain: definition differs")
    want = [(canonical_expr(expr), comment(text)) for expr, (_, text) in zip(LISTED, RULES,
                                                                           strict=True)]
    got = [(canonical_expr(r.get("expr", [])), r.get("comment", "")) for r in rules
           if r.get("chain") == CHAIN]
    if got != want or len(rules) != len(got):
        drift.append("guard chain: rules differ")
    guards, bad = _read_guards(sets)
    drift += [f"guard of {port}: its elements disagree" for port in sorted(bad)]
    if not bad and _destinations(sets) != _destinations_of(guards):
        drift.append("guard sets dmacs, d4, d6: not their ports' MACs and addresses")
    return KernelGuard(guards, drift)


def _destinations(sets: Mapping[str, list[Any]]) -> set[tuple[str, Element]]:
    out: set[tuple[str, Element]] = set()
    for set_name in (DMACS, D4, D6):
        for raw in sets.get(set_name, []):
            val = _val(raw)
            concat = val.get("concat") if isinstance(val, dict) else None
            out.add((set_name, tuple(str(v) for v in concat) if isinstance(concat, list)
                     else str(val)))
    return out


def _destinations_of(guards: Mapping[str, Guard]) -> set[tuple[str, Element]]:
    return {(s, e) for port, g in guards.items() for s, e in port_elements(port, g)
            if s in (DMACS, D4, D6)}


def _val(raw: Any) -> Any:
    """An element's key, out of its wrapping when it has one (a comment, a timeout)."""
    return raw["elem"].get("val") if isinstance(raw, dict) and isinstance(
        raw.get("elem"), dict) else raw


def _key(raw: Any) -> tuple[str, Any] | None:
    """(port, the rest: one field, or a tuple of two) of a concatenated element."""
    concat = raw.get("concat") if isinstance(raw, dict) else None
    if isinstance(concat, list) and len(concat) in (2, 3) and isinstance(concat[0], str):
        return concat[0], concat[1] if len(concat) == 2 else (str(concat[1]), str(concat[2]))
    return None


def _read_guards(sets: Mapping[str, list[Any]]) -> tuple[dict[str, Guard], set[str]]:
    ports = {e for e in sets.get(PORTS, []) if isinstance(e, str)}
    macports = {e for e in sets.get(MACPORTS, []) if isinstance(e, str)}
    found: dict[str, dict[str, list[Any]]] = {p: {MACS: [], A4: [], A6: [], L6: [], T6: [],
                                                  M4: [], M6: []} for p in ports}
    bad: set[str] = set()
    for set_name in (MACS, A4, A6, L6, T6, M4, M6):
        for raw in sets.get(set_name, []):
            key = _key(_val(raw))
            if key is None:
                continue
            port, value = key
            if port not in found:
                bad.add(port)
                continue
            if set_name == T6:
                value = str(ipaddress.IPv6Address(int(value, 16) if isinstance(value, str)
                                                  else int(value)))
            found[port][set_name].append(value if set_name in (M4, M6) else str(value))
    guards: dict[str, Guard] = {}
    for port, got in found.items():
        mac = got[MACS][0] if got[MACS] else ""
        with_mac = {fam: sorted((mac, a) for a in got[fam]) if mac else [] for fam in (A4, A6)}
        own_ll = [str(link_local(mac))] if len(got[MACS]) == 1 and _MAC.fullmatch(mac) else []
        if sorted(got[A6] + own_ll) != sorted(got[T6]) or got[L6] != own_ll or len(
                got[MACS]) > 1 or (bool(got[MACS]) != (port in macports)) or sorted(
                got[M4]) != with_mac[A4] or sorted(got[M6]) != with_mac[A6]:
            bad.add(port)
            continue
        guards[port] = guard_of((*got[A4], *got[A6]), got[MACS][0] if got[MACS] else "")
    bad |= macports - ports
    return dict(sorted(guards.items())), bad
