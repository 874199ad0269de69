"""Chains, rules and sets as raw nf_tables messages: a plan without libnftables.

libnftables reads the whole table (every set, chain and rule) before it runs
any command that adds a rule, 20-60 ms at 10,000 endpoints; a policy change or
an endpoint with a new set of policies needs a chain or two. This turns the
JSON commands `compile.nft` renders for a plan into the messages libnftables
would send for them, expression for expression (the same bytecode, so that
the kernel lists them back exactly as if libnftables had written them, and the
verifying read-back sees no difference), for the subset stockade's policy
chains use: the nfproto dependency libnftables adds before an `ip`/`ip6`
field, payload and meta loads, lookups in named sets (concatenations
included), comparisons and ranges, limit, log and verdicts, comments.

Sets of addresses, of (address, protocol, port) triples and of address
ranges (interval sets) are written too, elements as libnftables sends them.
Anything else (an anonymous set of ports, a map, a statement not in that
subset) makes `encode_plan` answer None: the caller sends the plan
through libnftables, as before. Pure: bytes in, bytes out.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from stockade.compile import guard
from stockade.compile.ir import (
    ADDR,
    ADDR_PORT,
    EGRESS,
    INGRESS,
    NET,
    AddressSet,
    Chain,
    ChainRule,
    Guard,
)
from stockade.compile.nft import DECISION, DENIED, MAPS, Table, chain_rules
from stockade.compile.plan import Plan
from stockade.datapath.nfnetlink import (
    NFPROTO_BRIDGE,
    element_item,
    element_list_messages,
    element_messages,
    in_family,
)
from stockade.netlink import NLM_F_CREATE, attr, attr_str, attr_u32, attr_u64, nested

log = logging.getLogger("stockade.dataplane")

NFT_MSG_NEWCHAIN = 3
NFT_MSG_DELCHAIN = 5
NFT_MSG_NEWRULE = 6
NFT_MSG_DELRULE = 8
NFT_MSG_NEWSET = 9
NFT_MSG_DELSET = 11
NLM_F_APPEND = 0x800

NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME = 1, 3
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS, NFTA_RULE_USERDATA = 1, 2, 4, 7
NFTA_SET_TABLE, NFTA_SET_NAME, NFTA_SET_FLAGS, NFTA_SET_KEY_TYPE = 1, 2, 3, 4
NFTA_SET_KEY_LEN, NFTA_SET_ID, NFTA_SET_USERDATA = 5, 10, 13
NFTA_LIST_ELEM = 1
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2

NF_DROP, NF_ACCEPT = 0, 1
NFT_JUMP, NFT_GOTO, NFT_RETURN = -3, -4, -5
NFT_REG_VERDICT, NFT_REG_1, NFT_REG32_00 = 0, 1, 8
NFT_CMP_EQ, NFT_CMP_LTE, NFT_CMP_GTE = 0, 3, 5
NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER = 1, 2
NFT_META_NFPROTO, NFT_META_L4PROTO = 15, 16
NFT_LIMIT_PKTS = 0

# libnftnl's user data: a rule's comment; a set's key byte order, key type of a
# concatenation.
UDATA_RULE_COMMENT = 0
UDATA_SET_KEYBYTEORDER, UDATA_SET_KEY_TYPEOF = 0, 3
UDATA_TYPEOF_EXPR, UDATA_TYPEOF_DATA = 0, 1
UDATA_SET_ELEM_FLAGS, SET_ELEM_F_INTERVAL_OPEN = 1, 1
NFT_SET_INTERVAL, NFT_SET_ELEM_INTERVAL_END = 0x4, 0x1
BYTEORDER_INVALID, BYTEORDER_BIG_ENDIAN = 0, 2
EXPR_CONCAT = 13
# nftables' data types: ipv4_addr, ipv6_addr, inet_proto, inet_service (6 bits each
# in a concatenation's type).
TYPE_IPV4, TYPE_IPV6, TYPE_PROTO, TYPE_SERVICE = 7, 8, 12, 13

NFPROTO = {"ipv4": 2, "ipv6": 10}
L4PROTO = {"tcp": 6, "udp": 17, "sctp": 132, "icmp": 1, "icmpv6": 58}
# (protocol, field) of an address: byte offset, length, nfproto it depends on.
FIELDS = {("ip", "saddr"): (12, 4, 2), ("ip", "daddr"): (16, 4, 2),
          ("ip6", "saddr"): (8, 16, 10), ("ip6", "daddr"): (24, 16, 10)}
VERDICTS = {"accept": NF_ACCEPT, "drop": NF_DROP, "return": NFT_RETURN}
PER = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}

# (message type, netlink flags, attributes), as ElementWriter.transact takes them.
Message = tuple[int, int, bytes]


class Unsupported(Exception):
    """Something libnftables must write (the caller falls back to it)."""


def _u32(kind: int, value: int) -> bytes:
    return attr_u32(kind, value, big=True)


def _expr(name: str, *attrs: bytes) -> bytes:
    return nested(NFTA_LIST_ELEM, attr_str(NFTA_EXPR_NAME, name), nested(NFTA_EXPR_DATA, *attrs))


def _register(reg32: int) -> int:
    """The register libnftables names for the `reg32`th 32-bit register: the 128-bit one
    where it starts one (as libnftables does, for older kernels)."""
    return NFT_REG_1 + reg32 // 4 if reg32 % 4 == 0 else NFT_REG32_00 + reg32


# The expressions are few and recur in every rule (a lookup: once per set): each is
# encoded once (a full load's 5,000 rules took ~150 ms, nearly all of it here).
@functools.lru_cache(maxsize=1024)
def _meta(key: int, reg32: int = 0) -> bytes:
    return _expr("meta", _u32(1, _register(reg32)), _u32(2, key))  # DREG, KEY


@functools.lru_cache(maxsize=1024)
def _payload(base: int, start: int, length: int, reg32: int = 0) -> bytes:
    return _expr("payload", _u32(1, _register(reg32)), _u32(2, base), _u32(3, start),
                 _u32(4, length))


@functools.lru_cache(maxsize=1 << 14)
def _cmp(op: int, data: bytes) -> bytes:
    return _expr("cmp", _u32(1, NFT_REG_1), _u32(2, op), nested(3, attr(NFTA_DATA_VALUE, data)))


@functools.lru_cache(maxsize=1 << 16)
def _lookup(name: str) -> bytes:
    if not name.startswith("@"):
        raise Unsupported(f"a lookup in {name!r}")
    return _expr("lookup", attr_str(1, name[1:]), _u32(2, NFT_REG_1))  # SET, SREG


@functools.lru_cache(maxsize=1 << 14)
def _verdict(code: int, chain: str | None = None) -> bytes:
    parts = [attr(NFTA_VERDICT_CODE, struct.pack("!i", code))]
    if chain is not None:
        parts.append(attr_str(NFTA_VERDICT_CHAIN, chain))
    return _expr("immediate", _u32(1, NFT_REG_VERDICT), nested(2, nested(NFTA_DATA_VERDICT,
                                                                          *parts)))


class _Rule:
    """One rule's expressions, with the protocol context libnftables keeps while it
    linearises: which network protocol is already known (no dependency needed)."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.nfproto: int | None = None
        self.l4 = False

    def _depend(self, nfproto: int) -> None:
        if self.nfproto is None:
            self.out += [_meta(NFT_META_NFPROTO), _cmp(NFT_CMP_EQ, bytes([nfproto]))]
            self.nfproto = nfproto
        elif self.nfproto != nfproto:
            raise Unsupported("two network protocols in one rule")

    def _load(self, value: Any, reg32: int) -> int:
        """Load one field into the `reg32`th 32-bit register on; its length in bytes."""
        if isinstance(value, dict) and set(value) == {"payload"}:
            p = value["payload"]
            key = (p.get("protocol"), p.get("field"))
            if key in FIELDS:
                start, length, nfproto = FIELDS[key]
                if reg32 and self.nfproto is None:
                    raise Unsupported("a dependency inside a concatenation")
                self._depend(nfproto)
                self.out.append(_payload(NFT_PAYLOAD_NETWORK_HEADER, start, length, reg32))
                return length
            if key == ("th", "dport"):
                if not self.l4:
                    raise Unsupported("a transport header without its protocol")
                self.out.append(_payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, reg32))
                return 2
        if isinstance(value, dict) and set(value) == {"meta"}:
            key = value["meta"].get("key")
            if key == "l4proto":
                self.out.append(_meta(NFT_META_L4PROTO, reg32))
                self.l4 = True
                return 1
            if key == "nfproto":
                self.out.append(_meta(NFT_META_NFPROTO, reg32))
                return 1
        raise Unsupported(f"the expression {value!r}")

    def match(self, m: dict[str, Any]) -> None:
        if m.get("op") != "==":
            raise Unsupported(f"the operator {m.get('op')!r}")
        left, right = m["left"], m["right"]
        if isinstance(left, dict) and set(left) == {"concat"}:
            reg = 0  # in 32-bit registers: each field takes whole ones
            for part in left["concat"]:
                reg += -(-self._load(part, reg) // 4)
            self.out.append(_lookup(right))
            return
        if left == {"meta": {"key": "nfproto"}}:
            if right not in NFPROTO or self.nfproto is not None:
                raise Unsupported(f"nfproto {right!r}")
            self._load(left, 0)
            self.nfproto = NFPROTO[right]
            self.out.append(_cmp(NFT_CMP_EQ, bytes([self.nfproto])))
            return
        if left == {"meta": {"key": "l4proto"}}:
            if right not in L4PROTO:
                raise Unsupported(f"l4proto {right!r}")
            self._load(left, 0)
            self.out.append(_cmp(NFT_CMP_EQ, bytes([L4PROTO[right]])))
            return
        length = self._load(left, 0)
        if isinstance(right, str):
            self.out.append(_lookup(right))
        elif length == 2 and isinstance(right, int) and not isinstance(right, bool):
            self.out.append(_cmp(NFT_CMP_EQ, struct.pack("!H", right)))
        elif (length == 2 and isinstance(right, dict) and set(right) == {"range"}
              and all(isinstance(v, int) for v in right["range"])):
            lo, hi = right["range"]
            self.out += [_cmp(NFT_CMP_GTE, struct.pack("!H", lo)),
                         _cmp(NFT_CMP_LTE, struct.pack("!H", hi))]
        else:
            raise Unsupported(f"a match against {right!r}")

    def statement(self, stmt: dict[str, Any]) -> None:
        if len(stmt) != 1:
            raise Unsupported(f"the statement {stmt!r}")
        (kind, body), = stmt.items()
        if kind == "match":
            self.match(body)
        elif kind in VERDICTS and body is None:
            self.out.append(_verdict(VERDICTS[kind]))
        elif kind in ("goto", "jump") and isinstance(body, dict) and set(body) == {"target"}:
            self.out.append(_verdict(NFT_GOTO if kind == "goto" else NFT_JUMP, body["target"]))
        elif kind == "limit" and set(body) == {"rate", "per", "burst"} and body["per"] in PER:
            self.out.append(_expr("limit", attr_u64(1, body["rate"]),
                                  attr_u64(2, PER[body["per"]]), _u32(3, body["burst"]),
                                  _u32(4, NFT_LIMIT_PKTS), _u32(5, 0)))
        elif kind == "log" and set(body) == {"group", "prefix"}:
            self.out.append(_expr("log", attr(1, struct.pack("!H", body["group"])),
                                  attr_str(2, body["prefix"])))
        else:
            raise Unsupported(f"the statement {stmt!r}")


def _udata(kind: int, payload: bytes) -> bytes:
    if len(payload) > 255:
        raise Unsupported("user data over 255 bytes")
    return bytes([kind, len(payload)]) + payload


# Encoded expressions by the list `chain_rules` rendered them into (it shares one list
# between the chains holding the same rule): (the list, kept alive so that its id is
# not reused, and its bytes).
Encoded = dict[int, tuple[list[dict[str, Any]], bytes]]


def rule_message(table: str, chain: str, expr: list[dict[str, Any]], comment: str | None,
                 encoded: Encoded | None = None) -> Message:
    """NEWRULE appending one rule (its JSON expressions as `compile.nft` renders them)."""
    hit = encoded.get(id(expr)) if encoded is not None else None
    if hit is not None and hit[0] is expr:
        body_expr = hit[1]
    else:
        rule = _Rule()
        for stmt in expr:
            rule.statement(stmt)
        body_expr = nested(NFTA_RULE_EXPRESSIONS, *rule.out)
        if encoded is not None:
            encoded[id(expr)] = (expr, body_expr)
    body = attr_str(NFTA_RULE_TABLE, table) + attr_str(NFTA_RULE_CHAIN, chain) + body_expr
    if comment:
        body += attr(NFTA_RULE_USERDATA,
                     _udata(UDATA_RULE_COMMENT, comment.encode() + b"\0"))
    return (NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, body)


def chain_messages(table: Table, chain: Chain, *, create: bool,
                   memo: dict[ChainRule, list[dict[str, Any]]] | None = None,
                   encoded: Encoded | None = None) -> list[Message]:
    """A chain's rules (after NEWCHAIN when `create`; else after flushing the old ones).

    `memo` and `encoded` share the rendering and the encoding of a rule between the
    chains of one plan (`memo` is per direction, as `chain_rules` takes it)."""
    head = attr_str(NFTA_CHAIN_TABLE, table.name) + attr_str(NFTA_CHAIN_NAME, chain.name)
    out: list[Message] = [
        (NFT_MSG_NEWCHAIN, NLM_F_CREATE, head) if create else
        flush_chain(table.name, chain.name)]
    out += [rule_message(table.name, chain.name, expr, comment, encoded)
            for expr, comment in chain_rules(table, chain, memo)]
    return out


def set_message(table: Table, s: AddressSet, set_id: int) -> Message:
    """NEWSET for a set of addresses, of (address, protocol, port) triples, or of
    address ranges (an interval set).

    Without its comment: libnftables 1.0.6 drops a set's comment from JSON, and the
    kernel should hold the same whichever wrote it."""
    if s.kind not in (ADDR, ADDR_PORT, NET):
        raise Unsupported("a map")
    addr_type, addr_len = (TYPE_IPV4, 4) if s.family == 4 else (TYPE_IPV6, 16)
    flags = 0
    if s.kind in (ADDR, NET):
        key_type, key_len = addr_type, addr_len
        udata = _udata(UDATA_SET_KEYBYTEORDER, struct.pack("=I", BYTEORDER_BIG_ENDIAN))
        flags = NFT_SET_INTERVAL if s.kind == NET else 0
    else:
        key_type = (addr_type << 12) | (TYPE_PROTO << 6) | TYPE_SERVICE
        key_len = addr_len + 4 + 4
        udata = (_udata(UDATA_SET_KEYBYTEORDER, struct.pack("=I", BYTEORDER_INVALID))
                 + _udata(UDATA_SET_KEY_TYPEOF,
                          _udata(UDATA_TYPEOF_EXPR, struct.pack("=I", EXPR_CONCAT))
                          + _udata(UDATA_TYPEOF_DATA, b"")))
    return (NFT_MSG_NEWSET, NLM_F_CREATE,
            attr_str(NFTA_SET_TABLE, table.name) + attr_str(NFTA_SET_NAME, s.name)
            + _u32(NFTA_SET_FLAGS, flags) + _u32(NFTA_SET_KEY_TYPE, key_type)
            + _u32(NFTA_SET_KEY_LEN, key_len) + _u32(NFTA_SET_ID, set_id)
            + attr(NFTA_SET_USERDATA, udata))


def interval_items(s: AddressSet) -> list[bytes]:
    """An interval set's elements as libnftables sends them: each range as its start
    and, flagged as an end, the address after it (none past the last address: the
    start then says the range is open); an end at address zero first, unless a range
    starts there. Adjacent ranges stay apart, as libnftables leaves them."""
    ranges = []
    for e in s.elements:
        if not isinstance(e, str):
            raise Unsupported(f"the interval element {e!r}")
        net = ipaddress.ip_network(e)
        ranges.append((int(net.network_address), int(net.broadcast_address)))
    ranges.sort()
    size = 4 if s.family == 4 else 16
    top = (1 << (8 * size)) - 1
    out: list[bytes] = []
    if ranges and ranges[0][0] != 0:
        out.append(element_item(bytes(size), flags=NFT_SET_ELEM_INTERVAL_END))
    for lo, hi in ranges:
        if hi == top:
            out.append(element_item(lo.to_bytes(size, "big"), userdata=_udata(
                UDATA_SET_ELEM_FLAGS, struct.pack("=I", SET_ELEM_F_INTERVAL_OPEN))))
        else:
            out += [element_item(lo.to_bytes(size, "big")),
                    element_item((hi + 1).to_bytes(size, "big"),
                                 flags=NFT_SET_ELEM_INTERVAL_END)]
    return out


def flush_chain(table: str, chain: str) -> Message:
    return (NFT_MSG_DELRULE, 0, attr_str(NFTA_RULE_TABLE, table)
            + attr_str(NFTA_RULE_CHAIN, chain))


def del_chain(table: str, chain: str) -> Message:
    """Delete an empty chain (`flush_chain` first)."""
    return (NFT_MSG_DELCHAIN, 0, attr_str(NFTA_CHAIN_TABLE, table)
            + attr_str(NFTA_CHAIN_NAME, chain))


def del_set(table: str, name: str) -> Message:
    return (NFT_MSG_DELSET, 0, attr_str(NFTA_SET_TABLE, table) + attr_str(NFTA_SET_NAME, name))


def _sorted(elements: Iterable[Any]) -> list[Any]:
    return sorted(elements, key=str)


@dataclass
class Encoding:
    """The rules rendered and encoded so far, shared by the chains of one plan (and by
    the parts of a staged one): chains of many endpoints hold the same rules."""

    memo: dict[str, dict[ChainRule, list[dict[str, Any]]]] = field(
        default_factory=lambda: {INGRESS: {}, EGRESS: {}})
    encoded: Encoded = field(default_factory=dict)


def encode_plan(table: Table, p: Plan,
                shared: Encoding | None = None) -> list[Message] | None:
    """The messages of one transaction carrying out `p`, in `compile.nft.render_plan`'s
    order; None when some of it is for libnftables to write (see the module)."""
    name = table.name
    out: list[Message] = []
    shared = shared or Encoding()
    memo, encoded = shared.memo, shared.encoded
    try:
        for i, s in enumerate(p.add_sets, 1):
            out.append(set_message(table, s, i))
            if s.kind == NET:
                out += element_list_messages(name, s.name, interval_items(s))
            elif s.elements:
                out += element_messages(name, s.name, _sorted(s.elements))
        for s, els in p.add_elements:
            if s.kind == NET:
                # Rewritten whole, as render_plan does: the kernel may split or join ranges.
                out += element_list_messages(name, s.name, [], delete=True)
                out += element_list_messages(name, s.name, interval_items(s))
            elif s.kind not in (ADDR, ADDR_PORT):
                raise Unsupported("elements of a map")
            elif els:
                out += element_messages(name, s.name, _sorted(els))
        # Every new chain exists before any rule: a tier's chain jumps to the next.
        out += [(NFT_MSG_NEWCHAIN, NLM_F_CREATE, attr_str(NFTA_CHAIN_TABLE, name)
                 + attr_str(NFTA_CHAIN_NAME, c.name)) for c in p.add_chains]
        for c in p.add_chains:
            out += chain_messages(table, c, create=True, memo=memo[c.direction],
                                  encoded=encoded)[1:]
        for c in p.replace_chains:
            out += chain_messages(table, c, create=False, memo=memo[c.direction],
                                  encoded=encoded)
        dels: dict[str, list[str]] = {}
        for direction, fam, addr in p.del_map:
            dels.setdefault(MAPS[(direction, fam)], []).append(addr)
        for m, addrs in sorted(dels.items()):
            out += element_messages(name, m, addrs, delete=True)
        sets: dict[str, list[tuple[str, str]]] = {}
        for (direction, fam, addr), chain in p.set_map:
            sets.setdefault(MAPS[(direction, fam)], []).append((addr, chain))
        for m, pairs in sorted(sets.items()):
            out += element_messages(name, m, [a for a, _ in pairs], jumps=[c for _, c in pairs])
        # Flushed first: a tier's chain going away may be what another one jumps to.
        out += [flush_chain(name, c) for c in p.del_chains]
        out += [del_chain(name, c) for c in p.del_chains]
        for s, els in p.del_elements:
            if s.kind in (DECISION, DENIED):
                raise Unsupported("elements of a tier map")  # (no raw encoding here yet)
            if s.kind == NET:
                continue  # rewritten whole with its additions, as render_plan does
            if s.kind not in (ADDR, ADDR_PORT):
                raise Unsupported("elements of a map")
            if els:
                out += element_messages(name, s.name, _sorted(els), delete=True)
        out += [del_set(name, n) for n in p.del_sets]
        out += guard_messages(name, p.set_guards, p.old_guards)
    except Unsupported as exc:
        log.debug("a plan for libnftables: %s", exc)
        return None
    return out


def guard_messages(table: str, set_guards: Iterable[tuple[str, Guard]],
                   old: Iterable[tuple[str, Guard]]) -> list[Message]:
    """`compile.guard.element_commands` as raw messages for the `bridge` table."""
    out: list[Message] = []
    for delete, guards in ((True, old), (False, set_guards)):
        by_set: dict[str, list[bytes]] = {}
        for port, g in guards:
            for set_name, e in guard.port_elements(port, g):
                by_set.setdefault(set_name, []).append(element_item(_guard_key(set_name, e)))
        for set_name, items in sorted(by_set.items()):
            out += [(in_family(kind, NFPROTO_BRIDGE), flags, attrs) for kind, flags, attrs
                    in element_list_messages(table, set_name, items, delete=delete)]
    return out


def _guard_key(set_name: str, e: guard.Element) -> bytes:
    """A guard element's key as the kernel keeps it: an interface name in 16 bytes, each
    field padded to whole 32-bit registers."""
    if set_name == guard.DMACS:  # a MAC alone: not padded, as no concatenation is
        return _mac(e if isinstance(e, str) else e[0])[:6]
    if set_name not in guard.PORT_SETS:  # a MAC, then its address
        mac, *fields = (e,) if isinstance(e, str) else e
        return _mac(mac) + b"".join(ipaddress.ip_address(v).packed for v in fields)
    if isinstance(e, str):
        return _ifname(e)
    port, *fields = e
    out = _ifname(port)
    for i, value in enumerate(fields):
        if set_name == guard.MACS or (set_name in (guard.M4, guard.M6) and i == 0):
            out += _mac(value)
        elif set_name == guard.T6:
            out += int(value, 16).to_bytes(16, "big")
        else:
            out += ipaddress.ip_address(value).packed
    return out


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", "")) + bytes(2)  # padded to a register


def _ifname(name: str) -> bytes:
    raw = name.encode()
    if len(raw) > 15:
        raise Unsupported(f"interface name {name!r} is too long")
    return raw.ljust(16, b"\0")
