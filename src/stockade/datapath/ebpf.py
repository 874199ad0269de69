"""The eBPF datapath: `bpf/stockade.bpf.c` on every endpoint veth, maps written in batches.

What lives where (`name` is the datapath's name, "stockade" by default)::

    /sys/fs/bpf/stockade/<host | netns-NAME>/<name>/
        ipcache4 ipcache6 policy config ct ct_live ct_owners frag guard mac_port events
        meta ratelimit stats inflight                                     the maps
        prog_from_pod prog_to_pod                                         the programs
        built-<digest>-<tag>-<tag>                           which build they are (a dir)
        link-<ifindex>-in link-<ifindex>-out                              tcx links

Everything is pinned, so the kernel keeps enforcing after the process exits
(kill -9 included); a new `EbpfDatapath` finds the pins, reads the maps back
(`compile.bpf.decode` → `ruleset_of`) and applies only the difference. bpffs is
mounted on /sys/fs/bpf when it is not there.

The object is compiled with clang on first use (or by `make bpf`) into a cache
named after the SHA-256 of the source and the flags, so an edited source is
rebuilt and a stale object is never used; `STOCKADE_BPF_OBJECT` names another.
A directory among the pins, `built-<digest of the object>-<tag>-<tag>`, says which
build the pinned programs are: a new process of that build whose pinned programs
still have those tags takes the pins as they are (25 ms), where loading the object
again runs the verifier (about 0.33 s here) only to find the same programs.

**Atomic applies.** ipcache and policy entries carry a slot (0 or 1); the program
reads the active slot from `config` once per packet. An apply writes the
inactive slot, flips `config.slot` (and bumps the generation: conntrack entries
validated under an older generation are judged again, so revoked connections are
cut), waits until every run of the programs that may have read the old slot has
returned, then brings the old slot up to date. Definitions in `meta` are added
before the flip and removed after it.

The wait: a run bumps its CPU's count in `inflight` before it reads the slot and
after its last read of the slot's entries (fully ordered atomics; only a new
connection's judgement and an established one's judged again read them), so a count
is odd while a run may read a slot. After the flip and a full barrier
(`libbpf.barrier`) a run that reads the slot reads the new one, and one that read
the old slot shows as an odd count, over once that count moves (`_wait_runs`: one
read of the counts, microseconds). An RCU grace period (membarrier, 8-18 ms
here, in ticks of 4 ms, most of a small apply's time) is the fallback: on PREEMPT_RT
(where runs can interleave on a CPU), for a count that does not move within
`RUN_WAIT`, and when a link runs a program that is not this build's (it counts
nothing). Loading a new build over an older one waits a grace period too.

An endpoint added, removed or relabelled changes one
prefix's ipcache entry in each family, adds policy entries only under a new identity
or policy and deletes them only under a gone one (`bpf.in_place`): that change is
written into the active slot as it stands, policy entries added first (nothing looks
them up yet), the ipcache entry next (one update: the switch), entries deleted last
(nothing looks them up any more), then the generation bumped; every packet is judged
by the old contents or the new, as with a flip, and no grace period is waited for.
The inactive slot gets the same change first. Anything else (a policy's change moves
every prefix it judges) takes the flip.

**Attachment.** tcx links (kernel >= 6.6) on the host side of every veth that is
a bridge port in the namespace: `tcx/ingress` judges packets leaving the pod,
`tcx/egress` packets entering it. Each apply attaches new ports and unpins the
links of vanished ones; a full check (the agent's poll every second, outside the
lock, and every verifying apply) asks about every link: one detached, unpinned or
pointing at another program is drift, repaired and reported. Where tcx is missing,
clsact filters (direct action) are the fallback, made, read and removed over
rtnetlink (`net/rtnl.py`), never through a `tc` process.

**Conntrack** is the program's own (not the kernel's through bpf_skb_ct_lookup):
it works whether or not netfilter tracks the bridge's traffic, and lets a policy
generation re-judge flows lazily. New connections go in `ct` (LRU); an established
one (answered, then used again by its originator) moves to `ct_live`, a hash that
evicts nothing, within its port's share (`CT_LIVE_PER_PORT`, counted in
`ct_owners`): a flood of new connections from one pod evicts only new connections,
never the node's established ones. A connection's key is its tuple in normal form
(lower address and port first; a flag in the entry says which side opened it), so a
packet of either direction costs one lookup per map; entries a program from before
the normal form made are turned into it when a new build replaces that program
(`normalize_connections`). A
verifying apply sweeps `ct_live` of connections that expired unseen (abandoned:
the program deletes an entry only when a packet finds it) and counts the shares
again. Its timestamps come from the coarse monotonic clock
(bpf_ktime_get_coarse_ns: timeouts are seconds, and reading the TSC per packet
costs more in a VM). IP fragments fail closed: an allowed first fragment's ports
are kept in `frag` (LRU) under its datagram's (family, addresses, protocol, IP id),
a later fragment is judged with them, and one without is dropped (counted as
`fragments_dropped`). Denied new connections go to the `events` ring buffer
(rate-limited to `log_rate` per second; `DeniedEvents` reads them as
`LoggedPacket`s naming the chain, like NFLOG's prefix does: the deciding stage's).

**Guards.** `Ruleset.guards` binds each pod's bridge port to its addresses and MAC:
the `guard` map, keyed by the port's ifindex, which `stockade_from_pod` looks up
once per packet and checks before conntrack (a frame claiming another pod's IP
source, ARP sender or neighbour-advertisement target, from another MAC, tagged, or
of another ethertype is dropped, counted as `spoofed_dropped`); a port without an
entry is unguarded. Each apply lists the ports and writes the guards of those that
exist, deleting entries of ports that are gone; a guard whose port does not exist
yet is written by the first apply that finds it (until then the kernel reads back
without it). Entries are not slotted: a port's entry is replaced in one update,
and no packet needs two ports' guards to agree.

**Direct delivery.** The `mac_port` map holds each guarded pod's MAC with its port
and the port's bridge (`compile.bpf.mac_ports`, from the guards written, after the
ports' programs are attached). A frame `stockade_from_pod` passes from a guarded
port to the MAC of another guarded pod on the same bridge is redirected to that
pod's port (`bpf_redirect`, to its egress, where `stockade_to_pod` runs as
before): the bridge would forward it there, since guards hold both ends to their
MACs, and skipping it skips br_netfilter's hooks too, which cost a pair of pods more
than this datapath's whole judgement (`bench/datapaths.py`: connections at 1.00 of
the plain bridge's rate, against 0.90 through it). Frames from or to an unguarded
port, to a group address, tagged, of another ethertype than IP and ARP, to a MAC two
ports claim, or between bridges, take the bridge; so do all of a bridge that
filters VLANs (it forwards by more than the MAC). So the host's netfilter and
bridge-family rules do not see traffic between two guarded pods of one bridge on
this datapath, as on other eBPF datapaths that bypass the host stack. The map is
read back with the rest: a missing, changed or foreign entry is drift, repaired by
a verifying apply.

**Tiers.** ClusterNetworkPolicy Admin and Baseline chains are enforced: each side is
judged by up to two stages (Admin, then NetworkPolicy or Baseline), each one
policy-map lookup whatever the number of rules (two when its policy has a rule
without a peer condition); `compile.bpf` resolves each tier's first match into the
entries. A tracked connection a policy change now denies is cut unless every denying
side keeps it, as the agent's revoker decides on nftables: a tier's Deny is kept
only when its own ClusterNetworkPolicy is annotated `stockade.io/existing-connections:
keep` (its entries carry `KEEP_BIT`), a NetworkPolicy chain's denial when a policy of
the chain is (its keep mark).

**Versions.** Maps pinned by a version with another layout (before tiers, the
ipcache's values were 12 bytes) are refused with a clear error before anything is
loaded: the running program keeps enforcing them until `dataplane remove`. A map
added since (`guard`, `ct_live`, `ct_owners`, `mac_port`, `inflight`) is created and
pinned beside the older pins, whose layouts are unchanged, so a datapath pinned before
them is adopted as it is (its connections in `ct` move to `ct_live` as their next
packets come; the new build replaces the old programs, and that load waits a grace
period for their runs, which count nothing).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import ipaddress
import os
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from stockade.compile import bpf as bpfc
from stockade.compile.bpf_change import changed_state
from stockade.compile.ir import Chain, Ruleset
from stockade.compile.nft import LOG_PREFIX
from stockade.compile.plan import Plan, plan
from stockade.datapath import ATTACH_MODES, libbpf
from stockade.datapath.base import KernelSnapshot, ReadAhead
from stockade.datapath.nflog import LoggedPacket
from stockade.errors import DataplaneError, NetError
from stockade.heap import collector_paused
from stockade.net.namespace import entered, netns_exists
from stockade.net.rtnl import CLSACT_EGRESS, CLSACT_INGRESS, KeptRtnl, Link, Rtnl
from stockade.netlink import NetlinkError

SOURCE = Path(__file__).resolve().parents[3] / "bpf" / "stockade.bpf.c"
PIN_ROOT = Path("/sys/fs/bpf")
PROGRAMS = {"in": "stockade_from_pod", "out": "stockade_to_pod"}  # hook -> program
ATTACH = {"in": libbpf.BPF_TCX_INGRESS, "out": libbpf.BPF_TCX_EGRESS}
# map -> (key size, value size)
LAYOUT = {"ipcache4": (bpfc.IP4_KEY.size, bpfc.IP_INFO.size),
          "ipcache6": (bpfc.IP6_KEY.size, bpfc.IP_INFO.size),
          "policy": (bpfc.POLICY_KEY.size, bpfc.POLICY_VALUE.size),
          "meta": (bpfc.META_KEY.size, bpfc.META_VALUE.size),
          "guard": (bpfc.GUARD_KEY.size, bpfc.GUARD_VALUE.size),
          "config": (4, 16), "ct": (bpfc.CT_KEY.size, bpfc.CT_VALUE.size),
          "ct_live": (bpfc.CT_KEY.size, bpfc.CT_VALUE.size),
          "ct_owners": (bpfc.CT_OWNER.size, bpfc.CT_OWNER.size),
          "mac_port": (bpfc.MAC_PORT_KEY.size, bpfc.MAC_PORT_VALUE.size)}
MAP_NAMES = ("ipcache4", "ipcache6", "policy", "config", "ct", "ct_live", "ct_owners", "frag",
             "guard", "mac_port", "events", "meta", "ratelimit", "stats", "inflight")
# every pin but the links': the maps and the programs
PIN_NAMES = (*MAP_NAMES, *(f"prog_{p.removeprefix('stockade_')}" for p in PROGRAMS.values()))
CT_MAPS = ("ct", "ct_live", "ct_owners")  # connection tracking: emptied together
CONFIG = struct.Struct("=IIQ")  # slot, log rate, generation
EVENT = struct.Struct("=QIIBBBB2s2s16s16sB7x")
STATS = ("allowed", "denied", "conntrack", "rejudged", "cut", "passed", "fragments_dropped",
         "spoofed_dropped")  # the program's STAT_* counters, in order
LOG_RATE = 50  # denied-connection events per second, as the nftables chains log
# How long a CPU's run may seem to go on after a flip before the wait falls back to a
# grace period: runs take microseconds, so only a count written from outside lasts.
RUN_WAIT = 0.02
# PREEMPT_RT runs softirqs in threads that can be preempted: two runs can interleave on
# a CPU, and an even count says nothing. There, a grace period every time.
REALTIME = Path("/sys/kernel/realtime")


# ---- the object file --------------------------------------------------------------------


def _cflags() -> list[str]:
    arch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    return ["-O2", "-g", "-Wall", "-Werror", "-target", "bpf", f"-I/usr/include/{arch}"]


def _cache_dir() -> Path:
    env = os.environ.get("STOCKADE_BPF_CACHE")
    if env:
        return Path(env)
    repo_build = SOURCE.parent.parent / "build" / "bpf"
    with contextlib.suppress(OSError):
        repo_build.mkdir(parents=True, exist_ok=True)
        if os.access(repo_build, os.W_OK):
            return repo_build
    return Path("/var/cache/stockade/bpf")


def object_path(source: Path = SOURCE) -> Path:
    """The compiled program, built with clang when no object of this source exists."""
    env = os.environ.get("STOCKADE_BPF_OBJECT")
    if env:
        return Path(env)
    try:
        text = source.read_bytes()
    except OSError as exc:
        raise DataplaneError(f"the eBPF program's source is missing ({source})",
                             stderr=str(exc)) from None
    flags = _cflags()
    digest = hashlib.sha256(text + " ".join(flags).encode()).hexdigest()[:16]
    cache = _cache_dir()
    out = cache / f"stockade-{digest}.o"
    if out.exists():
        return out
    clang = shutil.which("clang") or shutil.which("clang-14")
    if clang is None:
        raise DataplaneError("clang is needed to build the eBPF program (apt-get install clang)")
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".o.tmp")
    os.close(fd)
    try:
        run = subprocess.run([clang, *flags, "-c", str(source), "-o", tmp],
                             capture_output=True, text=True, check=False)
        if run.returncode != 0:
            raise DataplaneError("clang refused the eBPF program",
                                 command=" ".join([clang, *flags]), stderr=run.stderr)
        os.replace(tmp, out)  # atomic: a concurrent build ends with the same file
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return out


def normalize_connections(maps: Mapping[str, int]) -> int:
    """Turn the tracked connections of a program from before keys had a normal form
    (`compile.bpf.ct_normal`) into it; returns how many were turned.

    Run when a new build of the program replaces a pinned one: before the first link
    switches (the old program finds a turned entry too, under the reversed tuple, as
    a reply's), and again after the last did and a grace period passed (what the old
    program added meanwhile). Connections the new program made are in normal form
    already, so nothing else changes, and counts per port stay (one entry for one).
    """
    turned = 0
    for name in ("ct", "ct_live"):
        ksize, vsize = LAYOUT[name]
        entries = libbpf.dump(maps[name], ksize, vsize)
        new: dict[bytes, bytes] = {}
        old: list[bytes] = []
        for key, value in entries.items():
            nkey, nvalue = bpfc.ct_normal(key, value)
            if nkey != key:
                old.append(key)
                if nkey not in entries:
                    new[nkey] = nvalue
        if new:
            libbpf.update_batch(maps[name], list(new), list(new.values()), ksize, vsize)
        if old:
            libbpf.delete_batch(maps[name], old, ksize)
        turned += len(old)
    return turned


# ---- bpffs ----------------------------------------------------------------------------------


def _is_bpffs(path: Path) -> bool:
    """Whether bpffs is mounted on `path` in this mount namespace."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return False
    return any(len(f := line.split()) >= 3 and f[1] == str(path) and f[2] == "bpf"
               for line in mounts)


def ensure_bpffs(root: Path = PIN_ROOT) -> None:
    """Mount bpffs on `root` when it is not there (pins need it)."""
    if _is_bpffs(root):
        return
    root.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(["mount", "-t", "bpf", "bpf", str(root)], capture_output=True,
                         text=True, check=False)
    if run.returncode != 0 or not _is_bpffs(root):
        raise DataplaneError(f"cannot mount bpffs on {root}", command="mount -t bpf",
                             stderr=run.stderr)


# ---- the datapath -----------------------------------------------------------------------------


@dataclass
class EbpfKernel:
    """The maps and attachments as read back."""

    slots: dict[int, bpfc.MapContents]
    meta: dict[bytes, bytes]
    slot: int
    generation: int
    log_rate: int
    links: dict[str, str] = field(default_factory=dict)  # pin name -> problem ("" if fine)
    guards: dict[bytes, bytes] = field(default_factory=dict)  # the guard map
    ports: dict[int, str] = field(default_factory=dict)  # bridge ports when read
    macs: dict[bytes, bytes] = field(default_factory=dict)  # the mac_port map
    bridge_of: dict[int, int] = field(default_factory=dict)  # see EbpfDatapath._listing

    def state(self) -> tuple[bpfc.BpfState, str]:
        """The active slot decoded, and why not ("" when it could be)."""
        try:
            return bpfc.decode(self.slots[self.slot], self.meta, self.slot, self.guards,
                               self.ports), ""
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            return bpfc.BpfState(), f"meta map unreadable ({exc})"


def _held_guards(guards: Mapping[bytes, bytes], written: Mapping[int, str],
                 ports: Mapping[int, str]) -> dict[bytes, bytes]:
    """The entries an apply wrote (`guards`, for the ports `written`) whose interface is
    still the port they were written for: what the guard map must hold (an entry of a
    port gone since is stale, and not missed)."""
    return {k: v for k, v in guards.items()
            if (i := bpfc.GUARD_KEY.unpack(k)[0]) in ports and ports[i] == written.get(i)}


def _differences(kernel: EbpfKernel, state: bpfc.BpfState, guards: Mapping[bytes, bytes],
                 written: Mapping[int, str], *,
                 skip: Mapping[str, Collection[bytes]] | None = None) -> list[str]:
    """How the maps read back differ from those `state` and the guards written encode
    (empty: they hold exactly that), leaving out the keys in `skip` of each map.
    Links are not looked at."""
    def unskipped(m: str, entries: Mapping[bytes, bytes]) -> Mapping[bytes, bytes]:
        left = (skip or {}).get(m)
        return {k: v for k, v in entries.items() if k not in left} if left else entries

    out = []
    for s, want_all in enumerate(bpfc.encode_slots(state)):
        for m in bpfc.MAPS:
            have, want = unskipped(m, kernel.slots[s][m]), unskipped(m, want_all[m])
            if have == want:  # in C: nearly always, and the counts walk 190,000 entries
                continue
            missing = sum(1 for k in want if k not in have)
            changed = sum(1 for k, v in want.items() if k in have and have[k] != v)
            foreign = sum(1 for k in have if k not in want)
            if missing or changed or foreign:
                out.append(f"{m} slot {s}: {missing} missing, {changed} changed, "
                           f"{foreign} foreign entries")
    if unskipped("meta", bpfc.encode_meta(state)) != unskipped("meta", kernel.meta):
        out.append("meta map differs")
    held = _held_guards(guards, written, kernel.ports)
    want_guards = dict(unskipped("guard", held))
    have_guards = {k: v for k, v in unskipped("guard", kernel.guards).items()
                   if bpfc.GUARD_KEY.unpack(k)[0] in kernel.ports}
    if want_guards != have_guards:
        missing = sum(1 for k in want_guards if k not in have_guards)
        changed = sum(1 for k, v in want_guards.items() if have_guards.get(k, v) != v)
        foreign = sum(1 for k in have_guards if k not in want_guards)
        out.append(f"guard: {missing} missing, {changed} changed, {foreign} foreign entries")
    # an entry of a port the last apply wrote for and gone since is stale, not drift
    want_macs = dict(unskipped("mac_port", bpfc.mac_ports(held, kernel.bridge_of)))
    have_macs = {k: v for k, v in unskipped("mac_port", kernel.macs).items()
                 if (p := bpfc.MAC_PORT_VALUE.unpack(v)[0]) in kernel.ports
                 or p not in written}
    if want_macs != have_macs:
        missing = sum(1 for k in want_macs if k not in have_macs)
        changed = sum(1 for k, v in want_macs.items() if have_macs.get(k, v) != v)
        foreign = sum(1 for k in have_macs if k not in want_macs)
        out.append(f"mac_port: {missing} missing, {changed} changed, {foreign} foreign "
                   f"entries")
    return out


# what verify_quietly reads and compares
QUIET_MAPS = (*bpfc.MAPS, "meta", "guard", "mac_port")


def _split(contents: Mapping[str, Mapping[bytes, bytes]]) -> dict[int, bpfc.MapContents]:
    out: dict[int, bpfc.MapContents] = {0: {m: {} for m in bpfc.MAPS},
                                        1: {m: {} for m in bpfc.MAPS}}
    for m in bpfc.MAPS:
        for k, v in contents.get(m, {}).items():
            slot = bpfc.slot_of_key(m, k)
            # a key of no slot is nobody's: with slot 0's, it is found foreign and deleted
            out[slot if slot in (0, 1) else 0][m][k] = v
    return out


def _strays(prog: int, pinned: set[int]) -> list[int]:
    """The maps `prog` holds under the name of one of ours that are not the pinned one
    (its pin lost, or replaced): open descriptors, the caller's to close."""
    out = []
    for map_id in sorted(libbpf.prog_map_ids(prog) - pinned):
        fd = libbpf.map_by_id(map_id)
        if libbpf.map_name(fd) in MAP_NAMES:
            out.append(fd)
        else:
            os.close(fd)
    return out


def _keep_connections(strays: list[int], into: dict[str, list[int]]) -> None:
    """Of a replaced program's stray maps, the connection maps are kept (to be carried
    into the pinned ones); the others are closed."""
    for fd in strays:
        name = libbpf.map_name(fd)
        if name in ("ct", "ct_live") and libbpf.map_layout(fd) == LAYOUT[name]:
            into.setdefault(name, []).append(fd)
        else:
            os.close(fd)


def _carry_connections(orphans: Mapping[str, list[int]], maps: Mapping[str, int]) -> None:
    """The connections of maps a replaced program kept alone, into the pinned maps (those
    already there stay: they are newer), so that replacing it loses none."""
    for name, fds in orphans.items():
        ksize, vsize = LAYOUT[name]
        have = libbpf.dump(maps[name], ksize, vsize)
        for fd in fds:
            new = {k: v for k, v in libbpf.dump(fd, ksize, vsize).items() if k not in have}
            if new:
                libbpf.update_batch(maps[name], list(new), list(new.values()), ksize, vsize)
                have.update(new)


class EbpfDatapath:
    """stockade's eBPF program and maps, pinned under one directory per name and namespace."""

    name = "ebpf"
    enforces_tiers = True  # ClusterNetworkPolicy tiers: see compile.bpf (stages)
    # Programs and guards are keyed by interface (ifindex), found at each apply: a port
    # made after one needs another (the CNI plugin asks: `cni.attached`).
    binds_interfaces = True

    def __init__(self, name: str = "stockade", netns: str | None = None, *,
                 log_group: int | None = None, bridge: str | None = None,
                 pin_root: Path = PIN_ROOT, attach: str = "auto") -> None:
        self.pin_name = name
        self.netns = netns
        self.bridge = bridge
        self.log_rate = LOG_RATE if log_group is not None else 0
        scope = "host" if netns is None else (
            "netns-" + (netns if "/" not in netns else hashlib.sha256(
                netns.encode()).hexdigest()[:12]))
        self.pin_root = pin_root
        self.dir = pin_root / "stockade" / scope / name
        self._dir_text = str(self.dir)  # pins' paths as text: a Path join per pin is slow
        self._lock = threading.RLock()
        self._links = KeptRtnl(netns)  # the ports are listed at every apply
        # The last listing and the ports worked out from it (read-only: shared by every
        # apply until a link changes).
        self._listed: tuple[tuple[Link, ...], dict[int, str], dict[int, int]] | None = None
        self._maps: dict[str, int] = {}
        self._progs: dict[str, int] = {}  # hook -> fd
        self._prog_ids: dict[str, int] = {}
        self._build = ""  # the object's `built-<digest>` (see _mark_build)
        self._attach_mode = attach  # "auto" (tcx where the kernel has it), "tcx", "clsact"
        self._mode = ""  # resolved when loading
        self._attached: set[str] = set()  # clsact: filters known in place since the last check
        self._pref = 0xC000 + int(hashlib.sha256(name.encode()).hexdigest()[:3], 16)
        # What the last apply left: the ruleset, its map state, both slots' bytes.
        self._applied: Ruleset | None = None
        self._state: bpfc.BpfState | None = None
        self._slot = 0
        self._kgen = 0  # the policy generation in config
        # The guard map as the last apply left it, and the port each entry was for.
        self._guards: dict[bytes, bytes] = {}
        self._guard_ports: dict[int, str] = {}
        # map -> keys written while verify_quietly reads (None: no read under way)
        self._written: dict[str, set[bytes]] | None = None
        self._macs: dict[bytes, bytes] = {}  # the mac_port map as the last apply left it
        self._generation = 0  # successful applies (snapshots taken before are stale)
        self._ahead: ReadAhead[EbpfKernel] = ReadAhead("ebpf-prefetch")
        self.last_drift: Plan | None = None
        self.last_drift_details: list[str] = []
        self.last_timing: dict[str, float] = {}
        self.in_place = 0  # applies that wrote the active slot in place (no switch)
        # after a flip: waits that saw the runs in flight end, and grace periods waited
        self.waits = {"runs": 0, "grace": 0}

    @classmethod
    def open(cls, name: str, *, netns: str | None = None, owner: bool = False,
             log_group: int | None = None, conntrack_limit: int = 0,
             attach: str = "auto") -> EbpfDatapath:
        """The datapath as `datapath.open_datapath` makes every one (`owner` has no
        meaning here: pinned objects are root's; see the README). The program tracks
        connections in maps of its own, each port's share of the established bounded
        (`ct_live`): `conntrack_limit`, the kernel's conntrack's, is refused. `attach`:
        see `ATTACH_MODES`."""
        if conntrack_limit:
            raise DataplaneError("the eBPF datapath tracks connections in its own maps "
                                 "(a port's share bounded); --conntrack-limit is for the "
                                 "nft and iptables datapaths")
        if attach not in ATTACH_MODES:
            raise DataplaneError(f"no eBPF attach mode {attach!r} (choose from "
                                 f"{', '.join(ATTACH_MODES)})")
        return cls(name, netns=netns, log_group=log_group, attach=attach)

    # ---- loading ------------------------------------------------------------------------

    def _pin(self, what: str) -> str:
        return f"{self._dir_text}/{what}"

    def _exists(self) -> bool:
        """Whether there is something to read: loaded here, or pinned by an earlier process."""
        return bool(self._maps) or (self.dir / "config").exists()

    def _load(self) -> None:
        """Maps (created or reused from their pins) and programs, pinned."""
        if self._maps:
            return
        if self.netns is not None and not self.dir.exists() and not netns_exists(self.netns):
            # Pins are not in the namespace: nothing is made for one that is not there
            # (what is pinned for one that went is still read and removed).
            raise NetError(f"network namespace {self.netns!r} does not exist")
        ensure_bpffs(self.pin_root)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._check_layout()
        self._check_attach()
        obj = object_path()
        build = self._build = "built-" + hashlib.sha256(obj.read_bytes()).hexdigest()[:16]
        if self._adopt(build):
            return
        progs, maps = libbpf.load_object(str(obj), {m: self._pin(m) for m in MAP_NAMES})
        pinned = {libbpf.obj_id(fd) for fd in maps.values()}
        relinked = False
        orphans: dict[str, list[int]] = {}  # connection maps the old programs kept alone
        try:
            for hook, prog in PROGRAMS.items():
                fd = progs.pop(prog)
                pin = self._pin(f"prog_{prog.removeprefix('stockade_')}")
                _, new_tag = libbpf.prog_id_tag(fd)
                old = None
                with contextlib.suppress(libbpf.BpfError):
                    old = libbpf.obj_get(pin)
                # The same build on the pinned maps is kept; one on a map whose pin was
                # lost (or replaced) enforces what nobody writes any more: replaced.
                strays = _strays(old, pinned) if old is not None else []
                if old is not None and libbpf.prog_id_tag(old)[1] == new_tag and not strays:
                    os.close(fd)
                    fd = old
                else:
                    if old is not None:
                        _keep_connections(strays, orphans)
                        os.close(old)
                        os.unlink(pin)
                        if not relinked:
                            _carry_connections(orphans, maps)
                            normalize_connections(maps)
                        self._relink(hook, fd)
                        relinked = True
                    libbpf.obj_pin(fd, pin)
                self._progs[hook] = fd
                self._prog_ids[hook] = libbpf.prog_id_tag(fd)[0]
            if relinked:
                # what the old program made between the first pass and its last link
                libbpf.synchronize()
                _carry_connections(orphans, maps)
                normalize_connections(maps)
        finally:
            for fd in progs.values():
                os.close(fd)
            for fds in orphans.values():
                for fd in fds:
                    os.close(fd)
        self._maps = maps
        self._mark_build(build)
        self._loaded()

    def _loaded(self) -> None:
        self._mode = self._resolve_mode()
        cfg = self._config()
        if cfg[1] != self.log_rate:
            self._write_config(cfg[0], cfg[2])

    def _mark_build(self, build: str) -> None:
        """Say which build the pinned programs are, with their tags: a directory named
        `built-<object digest>-<tag>-<tag>` (bpffs holds no files)."""
        tags = "-".join(libbpf.prog_id_tag(self._progs[h])[1].hex() for h in PROGRAMS)
        for entry in os.listdir(self.dir):
            if entry.startswith("built-"):
                with contextlib.suppress(OSError):
                    (self.dir / entry).rmdir()
        (self.dir / f"{build}-{tags}").mkdir(exist_ok=True)

    def _adopt(self, build: str) -> bool:
        """Take the pinned maps and programs as they are when the programs are this
        build's (its marker, and each program's tag as marked): loading the object
        again runs the verifier (a third of a second) to find the same programs.
        Anything missing or different: False, and the object is loaded."""
        marks = [e for e in os.listdir(self.dir) if e.startswith(build + "-")]
        tags = marks[0].removeprefix(build + "-").split("-") if len(marks) == 1 else []
        if len(tags) != len(PROGRAMS):
            return False
        fds: list[int] = []
        try:
            progs = {}
            for (hook, prog), tag in zip(PROGRAMS.items(), tags, strict=True):
                fd = libbpf.obj_get(self._pin(f"prog_{prog.removeprefix('stockade_')}"))
                fds.append(fd)
                if libbpf.prog_id_tag(fd)[1].hex() != tag:
                    raise libbpf.BpfError("another program", errno.ESTALE)
                progs[hook] = fd
            maps = {}
            for m in MAP_NAMES:
                maps[m] = fd = libbpf.obj_get(self._pin(m))
                fds.append(fd)
            pinned = {libbpf.obj_id(fd) for fd in maps.values()}
            for fd in progs.values():
                strays = _strays(fd, pinned)
                for stray in strays:
                    os.close(stray)
                if strays:
                    raise libbpf.BpfError("a program on a map no longer pinned", errno.ESTALE)
        except libbpf.BpfError:
            for fd in fds:
                os.close(fd)
            return False
        self._progs, self._maps = progs, maps
        self._prog_ids = {hook: libbpf.prog_id_tag(fd)[0] for hook, fd in progs.items()}
        self._loaded()
        return True

    def _check_layout(self) -> None:
        """Fail before loading anything when a pinned map has another layout: maps an
        older stockade made (the ipcache's values grew with ClusterNetworkPolicy
        stages) cannot be reused, and replacing them under the running program would
        leave it unenforced until they are written again."""
        wrong = []
        for m, (ksize, vsize) in LAYOUT.items():
            pin = self.dir / m
            if not pin.exists():
                continue
            fd = libbpf.obj_get(str(pin))
            try:
                have = libbpf.map_layout(fd)
            finally:
                os.close(fd)
            if have != (ksize, vsize):
                wrong.append(f"{m} has {have[0]}-byte keys and {have[1]}-byte values, "
                             f"this version needs {ksize} and {vsize}")
        if wrong:
            raise DataplaneError(
                f"the eBPF maps pinned in {self.dir} were made by another version of "
                f"stockade ({'; '.join(wrong)}); nothing was changed and the kernel still "
                f"enforces them with their program. To change over: `stockade dataplane "
                f"remove --datapath ebpf`, then apply again (nothing is enforced between)")

    def _check_attach(self) -> None:
        """Fail before loading anything when the ports' programs are attached the other
        way than asked (`attach`): the links or filters there would go on running
        beside the new ones, checked by no one."""
        if self._attach_mode == "auto":
            return
        there = ("clsact" if (self.dir / "mode-clsact").exists()
                 else "tcx" if self._link_pins() else None)
        if there is not None and there != self._attach_mode:
            raise DataplaneError(
                f"the eBPF programs pinned in {self.dir} are attached with {there}, not "
                f"{self._attach_mode} as asked; nothing was changed and they still enforce. "
                f"To change over: `stockade dataplane remove --datapath ebpf`, then start "
                f"again (nothing is enforced between)")

    def _resolve_mode(self) -> str:
        """tcx links where the kernel has them (Linux >= 6.6), else clsact filters.

        A datapath that attached with clsact leaves a `mode-clsact` directory among its
        pins, so a later process (and `remove`) knows where its filters are.
        """
        marker = self.dir / "mode-clsact"
        mode = self._attach_mode
        if mode == "auto":
            mode = "clsact" if marker.exists() else "tcx" if self._tcx_works() else "clsact"
        if mode == "clsact":
            marker.mkdir(exist_ok=True)
        return mode

    def _tcx_works(self) -> bool:
        with entered(self.netns):
            try:
                fd = libbpf.link_create(self._progs["in"], 1, ATTACH["in"])
            except libbpf.BpfError as exc:
                if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, 524):  # 524: ENOTSUPP
                    return False
                raise
        try:
            libbpf.link_detach(fd)
        finally:
            os.close(fd)
        return True

    def _relink(self, hook: str, prog_fd: int) -> None:
        """A new build of the program: every link of this hook switches to it atomically."""
        for pin in self._link_pins():
            if pin.endswith(f"-{hook}"):
                try:
                    fd = libbpf.obj_get(self._pin(pin))
                except libbpf.BpfError:
                    continue
                try:
                    libbpf.link_update(fd, prog_fd)
                except libbpf.BpfError:
                    pass  # a defunct link: the next apply attaches anew
                finally:
                    os.close(fd)

    def close(self) -> None:
        """Let go of the file descriptors; the pins keep everything enforcing."""
        self._links.close()
        with self._lock:
            for fd in [*self._maps.values(), *self._progs.values()]:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._maps = {}
            self._progs = {}

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # ---- config and maps -----------------------------------------------------------------

    def _config(self) -> tuple[int, int, int]:
        raw = libbpf.lookup(self._maps["config"], struct.pack("=I", 0), CONFIG.size)
        slot, rate, gen = CONFIG.unpack(raw or bytes(CONFIG.size))
        return slot & 1, rate, gen

    def _flip(self, slot: int, generation: int) -> None:
        """Make `slot` the active one, then `generation` the policy's: a program reads
        the generation before the slot (its connections are stamped with it), so a
        run that sees the new generation sees the new slot, and a connection judged
        by the old slot is never stamped as judged by the new policy. One update would
        copy both in no order the program can count on."""
        self._write_config(slot, generation - 1)
        libbpf.barrier()
        self._write_config(slot, generation)

    def _write_config(self, slot: int, generation: int) -> None:
        libbpf.update(self._maps["config"], struct.pack("=I", 0),
                      CONFIG.pack(slot, self.log_rate, generation))

    def _wait_runs(self, *, counted: bool = True) -> None:
        """After a flip, wait until no run that may have read the old slot goes on.

        A run bumps its CPU's count in `inflight` before it reads the slot and after
        its last read of the slot's entries (odd in between). After the flip and a
        barrier (`libbpf.barrier`), a run that reads the slot reads the new one; one
        that read the old slot had bumped its count, so its CPU's count is odd now,
        and it is done with the old slot once that count moves. Judgements take
        microseconds: the wait is one read of the counts, rarely two, against an RCU
        grace period's 8-18 ms (`libbpf.synchronize`), which remains the fallback: for
        a count that does not move, on PREEMPT_RT, and when a link runs another
        program than ours (`counted` False: one that counts nothing may read the maps).
        """
        if not counted or _realtime():
            libbpf.synchronize()
            self.waits["grace"] += 1
            return
        libbpf.barrier()
        ncpu = _possible_cpus()
        first = self._runs(ncpu)
        busy = [cpu for cpu, n in enumerate(first) if n & 1]
        deadline = time.monotonic() + RUN_WAIT
        while busy:
            os.sched_yield()
            now = self._runs(ncpu)
            busy = [cpu for cpu in busy if now[cpu] == first[cpu]]
            if busy and time.monotonic() > deadline:
                libbpf.synchronize()
                self.waits["grace"] += 1
                return
        self.waits["runs"] += 1

    def _runs(self, ncpu: int) -> tuple[int, ...]:
        raw = libbpf.lookup(self._maps["inflight"], struct.pack("=I", 0), 8 * ncpu)
        return struct.unpack(f"={ncpu}Q", raw or bytes(8 * ncpu))

    def _write(self, delta: bpfc.MapDelta, *, deletes: bool = True, updates: bool = True
               ) -> None:
        for m in sorted(set(delta.update) | set(delta.delete)):
            ksize, vsize = LAYOUT[m]
            if deletes and delta.delete.get(m):
                if self._written is not None:
                    self._written.setdefault(m, set()).update(delta.delete[m])
                libbpf.delete_batch(self._maps[m], list(delta.delete[m]), ksize)
            if updates and delta.update.get(m):
                items = delta.update[m]
                if self._written is not None:
                    self._written.setdefault(m, set()).update(items)
                libbpf.update_batch(self._maps[m], list(items), list(items.values()), ksize,
                                    vsize)

    def _read_kernel(self) -> EbpfKernel:
        dumped = {m: libbpf.dump(self._maps[m], *LAYOUT[m]) for m in bpfc.MAPS}
        meta = libbpf.dump(self._maps["meta"], *LAYOUT["meta"])
        guards = libbpf.dump(self._maps["guard"], *LAYOUT["guard"])
        macs = libbpf.dump(self._maps["mac_port"], *LAYOUT["mac_port"])
        slot, rate, gen = self._config()
        ports, bridge_of = self._listing()
        return EbpfKernel(_split(dumped), meta, slot, gen, rate, self._check_links(ports),
                          guards, ports, macs, bridge_of)

    def _held_guards(self, ports: Mapping[int, str]) -> dict[bytes, bytes]:
        return _held_guards(self._guards, self._guard_ports, ports)

    def _expected(self, applied: Ruleset, ports: Mapping[int, str]) -> Ruleset:
        """`applied` as the kernel reads it back: with the guards written for ports that
        still exist (a guard whose port was missing was not written, and is no drift)."""
        held = {self._guard_ports[bpfc.GUARD_KEY.unpack(k)[0]] for k in
                self._held_guards(ports)}
        if held == applied.guards.keys():
            return applied
        return replace(applied, guards={p: g for p, g in applied.guards.items() if p in held})

    # ---- attachment ------------------------------------------------------------------------

    def _link_pins(self) -> list[str]:
        try:
            return sorted(p for p in os.listdir(self.dir) if p.startswith("link-"))
        except FileNotFoundError:
            return []

    def _ports(self) -> dict[int, str]:
        """ifindex -> name of every veth on a bridge (or on `bridge`) in the namespace."""
        return self._listing()[0]

    def _listing(self) -> tuple[dict[int, str], dict[int, int]]:
        """The ports (see `_ports`), and the bridge of each port frames may go to from
        another port of that bridge directly (`mac_port`): a bridge that filters VLANs
        forwards by more than a MAC, so its ports are left to it."""
        links = self._links.links()
        kept = self._listed
        if kept is not None and kept[0] is links:  # no link changed: the same answer
            return kept[1], kept[2]
        bridges = {lk.index: lk for lk in links if lk.kind == "bridge"
                   and (self.bridge is None or lk.name == self.bridge)}
        ports = [lk for lk in links if lk.master in bridges and lk.kind == "veth"]
        out = ({lk.index: lk.name for lk in ports},
               {lk.index: lk.master for lk in ports if not bridges[lk.master].vlan_filtering})
        self._listed = (links, *out)
        return out

    def _check_links(self, ports: dict[int, str] | None = None, *, full: bool = True
                     ) -> dict[str, str]:
        """Every link pin and what is wrong with it ("" if nothing); wanted ones missing too.

        Only a full check (`full`: reading the kernel back, and the link poll's
        `skeleton_intact` every second) asks the kernel about each port's programs:
        with tcx, the programs on each port's hooks queried (1 ms at 100 ports);
        with clsact, a dump of the filters of each port's hooks. Otherwise what this
        process attached (since the last full check) is taken as attached, and
        only ports come and gone are seen: an apply costs what its change does, not
        what the node's pods are. A link detached meanwhile is found by the next poll,
        which repairs it at once (agent/daemon.py `_poll_links`).
        """
        if ports is None:
            ports = self._ports()
        out: dict[str, str] = {}
        if not full:
            # What this process attached (a full check, or the read-back after a start,
            # came first), without a look at the pins: their listing and names cost
            # 0.3 ms an apply at 100 ports.
            for key in self._attached:
                if int(key.split("-")[1]) not in ports:
                    out[key] = "gone"
            for port_index in ports:
                for hook in ATTACH:
                    key = f"link-{port_index}-{hook}"
                    out[key] = "" if key in self._attached else "missing"
            return out
        if self._mode == "clsact":
            for port_index in ports:
                for hook in ATTACH:
                    key = f"link-{port_index}-{hook}"
                    ids = self._filter_programs(port_index, hook)
                    out[key] = ("missing" if not ids else "" if ids == [self._prog_ids.get(hook)]
                                else f"runs program {ids[0]}, not stockade's")
            return out
        # A port's hook is intact when its link is pinned and stockade's program runs
        # there: one listing of the pins and one query a hook (the pins opened and
        # their links read took 2.4 ms at 100 ports, the queries 0.65 ms; the agent
        # polls this every second, and its many short calls delayed changes).
        pins = set(self._link_pins())
        for pin in pins:
            if int(pin.split("-")[1]) not in ports:
                out[pin] = "gone"
        with entered(self.netns):
            for port in ports:
                for hook, attach in ATTACH.items():
                    key = f"link-{port}-{hook}"
                    try:
                        ids = libbpf.attached_programs(port, attach)
                    except libbpf.BpfError:  # the port went meanwhile
                        ids = []
                    out[key] = ("missing" if key not in pins
                                else "" if self._prog_ids.get(hook) in ids
                                else f"runs program {ids[0]}, not stockade's" if ids
                                else "detached")
        return out

    def _filter_programs(self, index: int, hook: str) -> list[int]:
        """The programs of the bpf filters at stockade's priority on a port's clsact
        hook (a netlink dump: with a `tc` process a port and hook, the check the agent
        polls every second took 508 ms at 100 ports, `bench/ebpf_change.py --attach
        clsact`)."""
        parent = CLSACT_INGRESS if hook == "in" else CLSACT_EGRESS
        try:
            found = self._links.call(lambda nl: nl.filters(index, parent))
        except NetlinkError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                return []  # the port went meanwhile
            raise
        return [f.program for f in found if f.pref == self._pref and f.program]

    def _attach(self, index: int, hook: str, ifname: str) -> None:
        if self._mode == "clsact":
            self._attach_filter(index, hook, ifname)
            self._attached.add(f"link-{index}-{hook}")
            return
        pin = self._pin(f"link-{index}-{hook}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pin)
        for attempt in range(50):
            try:
                with entered(self.netns):
                    fd = libbpf.link_create(self._progs[hook], index, ATTACH[hook])
                break
            except libbpf.BpfError as exc:
                # EEXIST: a link of ours that lost its pin is still being released (the
                # kernel frees links from a workqueue): wait for it, briefly.
                if exc.errno != errno.EEXIST or attempt == 49:
                    raise
                time.sleep(0.01)
        try:
            libbpf.obj_pin(fd, pin)
        finally:
            os.close(fd)
        self._attached.add(f"link-{index}-{hook}")

    def _attach_filter(self, index: int, hook: str, ifname: str) -> None:
        """clsact's filter of the hook's program on a port, over netlink (what `tc
        filter replace ... bpf direct-action` does, without two processes a hook)."""
        parent = CLSACT_INGRESS if hook == "in" else CLSACT_EGRESS

        def attach(nl: Rtnl) -> None:
            with contextlib.suppress(NetlinkError):  # EEXIST: there already
                nl.add_clsact(index)
            nl.replace_bpf_filter(index, parent, self._pref, 1, self._progs[hook],
                                  PROGRAMS[hook])

        try:
            self._links.call(attach)
        except NetlinkError as exc:
            raise DataplaneError(f"cannot attach the {PROGRAMS[hook]} filter to {ifname} "
                                 f"(clsact): {exc.strerror}") from None

    def _unlink(self, pin: str, *, detach: bool, ifname: str = "") -> None:
        if self._mode == "clsact":
            self._attached.discard(pin)
            if ifname:
                _, index, hook = pin.split("-")
                parent = CLSACT_INGRESS if hook == "in" else CLSACT_EGRESS
                with contextlib.suppress(NetlinkError):  # gone with its port, or never there
                    self._links.call(lambda nl: nl.delete_filters(int(index), parent,
                                                                  self._pref))
            return
        path = self._pin(pin)
        if detach:
            with contextlib.suppress(libbpf.BpfError):
                fd = libbpf.obj_get(path)
                try:
                    libbpf.link_detach(fd)
                finally:
                    os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def _ensure_links(self, links: dict[str, str], ports: dict[int, str]) -> list[str]:
        """Attach what is missing, repair what is broken; the repairs, in words."""
        repaired = []
        switched = False
        before, self._attached = self._attached, {p for p, problem in links.items()
                                                  if not problem}
        for pin, problem in sorted(links.items()):
            if not problem:
                continue
            _, index, hook = pin.split("-")
            ifname = ports.get(int(index), "")
            if problem == "gone":
                self._unlink(pin, detach=True)
                continue
            if problem != "missing":
                self._unlink(pin, detach=True, ifname=ifname)
                repaired.append(f"{ifname or index} {hook}: {problem}")
                switched = switched or problem.startswith("runs program")
            elif not ifname:
                continue
            elif pin in before:  # attached by the last apply, gone since
                repaired.append(f"{ifname} {hook}: detached (no link or filter left)")
            self._attach(int(index), hook, ifname)
        if switched:
            # Another program ran there, maybe an older build whose pins were lost (so
            # `_load` replaced none) or a filter clsact switches only here: its
            # connections in the older form are turned once it runs nowhere.
            libbpf.synchronize()
            normalize_connections(self._maps)
        return repaired

    # ---- the Datapath protocol --------------------------------------------------------------

    def check(self) -> None:
        """Fail clearly unless bpffs, clang, the verifier and tcx links (or clsact) work."""
        with self._lock:
            self._load()

    def snapshot(self, known: Mapping[str, Chain] | None = None) -> KernelSnapshot:
        ahead = self._ahead.take()  # outside the lock: the read holds it
        with collector_paused(freeze=False), self._lock:
            if ahead is not None and ahead[0] == self._generation and self._maps:
                return KernelSnapshot(self._generation, ahead[1])
            if not self._exists():
                return KernelSnapshot(self._generation, None)
            self._load()
            return KernelSnapshot(self._generation, self._read_kernel())

    # verify_quietly skips what applies wrote during its read: what differs is drift
    QUIET_READS = 1

    def verify_quietly(self) -> bool:
        """Whether the kernel holds what the last apply left, without holding up changes
        (the agent's periodic check, on a thread of its own).

        The maps are read outside the datapath's lock (at 10,000 endpoints and 1,000
        policies about a quarter of a second: 190,000 policy entries) through
        descriptors of their own, while `_write` records every key an apply writes
        meanwhile. Then, briefly under the lock, the slot, the ports and their
        programs, the pins, and what was applied by now; compared after letting go
        (about a third of a second: every entry encoded and compared). A key written
        during the read may have been read before or after its write and is not
        judged this time; any other key must hold what was applied. A tampered key
        that a change writes over is set right by that write; one it does not is
        found by the next check. Connections that expired unseen are swept, as a
        verifying apply sweeps them.

        True: the maps, the pins and every port's programs are as applied. False:
        something differs, or nothing was applied to compare with, or the maps were
        replaced meanwhile: the caller runs a verifying apply, which reads again under
        the lock and repairs.
        """
        with self._lock:
            if self._state is None or not self._maps or not self._exists():
                return False
            fds: dict[str, int] = {}
            try:
                for m in QUIET_MAPS:
                    fds[m] = os.dup(self._maps[m])
            except OSError:  # out of descriptors: none kept
                for fd in fds.values():
                    os.close(fd)
                raise
            self._written = {}
        try:
            ids = {m: libbpf.obj_id(fd) for m, fd in fds.items()}
            with collector_paused(freeze=False):
                dumped = {m: libbpf.dump(fd, *LAYOUT[m]) for m, fd in fds.items()}
        finally:
            for fd in fds.values():
                os.close(fd)
            with self._lock:
                written, self._written = self._written, None
        with self._lock:
            if self._state is None or any(libbpf.obj_id(self._maps[m]) != i
                                          for m, i in ids.items()):
                return False  # replaced (a build loaded), or a failed apply: read again
            slot, rate, gen = self._config()
            ports, bridge_of = self._listing()
            links = self._check_links(ports)
            _, astray = self._astray(full=True)
            state, active, kgen = self._state, self._slot, self._kgen
            guards, guard_ports = self._guards, self._guard_ports
            self.sweep_connections()
        if astray or (slot, gen) != (active, kgen):
            return False
        if any(problem and problem != "gone" for problem in links.values()):
            return False
        kernel = EbpfKernel(_split({m: dumped[m] for m in bpfc.MAPS}), dumped["meta"], slot,
                            gen, rate, links, dumped["guard"], ports, dumped["mac_port"],
                            bridge_of)
        with collector_paused(freeze=False):
            return not _differences(kernel, state, guards, guard_ports, skip=written)

    def prefetch(self) -> None:
        """Start reading the maps back on a thread of its own (at start, while the agent
        loads its store and compiles: the batched lookups are system calls, outside the
        interpreter's lock, and the first apply waits for them otherwise).

        The next snapshot takes what was read if no apply came in between. Nothing
        pinned: nothing is read, and nothing made.
        """
        def read() -> tuple[int, EbpfKernel] | None:
            with collector_paused(freeze=False), self._lock:
                if not self._exists():
                    return None
                self._load()
                return self._generation, self._read_kernel()

        self._ahead.start(read)

    def read(self) -> Ruleset:
        with self._lock:
            if not self._exists():
                return Ruleset()
            self._load()
            state, _ = self._read_kernel().state()
            return bpfc.ruleset_of(state)

    def diff(self, desired: Ruleset) -> Plan:
        return plan(self.read(), desired)

    def apply(self, desired: Ruleset, *, verify: bool | KernelSnapshot = False) -> Plan:
        """Make the maps and links enforce `desired`; see the module for the slot switch."""
        # Hundreds of thousands of fresh tuples, none in a cycle: the cyclic collector
        # would only walk them (and everything alive) again and again.
        with collector_paused(freeze=False), self._lock:
            return self._apply(desired, verify)

    def _apply(self, desired: Ruleset, verify: bool | KernelSnapshot) -> Plan:
        t0 = time.perf_counter()
        self._load()
        self.last_drift = None
        self.last_drift_details = []
        remade = self._remake_dir()
        kernel: EbpfKernel | None = None
        # The bridge ports, listed once per apply for the links and the guards (a
        # snapshot's may be old: they are listed again).
        ports: dict[int, str] | None = None
        bridge_of: dict[int, int] = {}
        if isinstance(verify, KernelSnapshot) and verify.generation == self._generation \
                and isinstance(verify.table, EbpfKernel):
            kernel = verify.table
        elif verify or self._state is None:
            kernel = self._read_kernel()
            ports, bridge_of = kernel.ports, kernel.bridge_of
        if kernel is not None:
            kstate, problem = kernel.state()
            before = bpfc.ruleset_of(kstate)
            active, kgen = kernel.slot, kernel.generation
            links = kernel.links
            base = self._state if self._state is not None else kstate
            if self._state is not None and self._applied is not None:
                details = self._drift_details(kernel, problem)
                drift = plan(before, self._expected(self._applied, kernel.ports))
                if details or not drift.empty:
                    self.last_drift = drift
                    self.last_drift_details = details or drift.describe()
        else:
            assert self._state is not None and self._applied is not None
            before = self._applied
            active, kgen, base = self._slot, self._kgen, self._state
            ports, bridge_of = self._listing()
            # a pin directory made again lost the link pins: every port looked at
            links = self._check_links(ports, full=remade)
        t1 = time.perf_counter()
        # Against the last apply, a change is worked out from the change
        # (compile/bpf_change.py); one that moves most prefixes is compiled whole.
        state = changed_state(desired, base, before) if kernel is None else None
        if state is None:
            state = bpfc.compile_state(desired, base)
        inactive = 1 - active
        if kernel is not None:  # against the bytes the kernel holds
            new = bpfc.encode_slots(state)
            d_in = bpfc.map_delta(kernel.slots[inactive], new[inactive])
            d_act = bpfc.map_delta(kernel.slots[active], new[active])
            d_meta = bpfc.map_delta({"meta": kernel.meta}, {"meta": bpfc.encode_meta(state)})
        else:  # against the last apply: only what changed is encoded
            deltas = bpfc.state_deltas(base, state)
            d_in, d_act = deltas[inactive], deltas[active]
            d_meta = bpfc.meta_delta(base, state)
        # Guards of the ports there now, each in place before its port's programs are
        # attached; a guard of a missing port waits for an apply that finds it.
        if ports is None:  # a snapshot's kernel: the ports as they are now
            ports, bridge_of = self._listing()
        guards = bpfc.encode_guards(state.guards, {n: i for i, n in ports.items()})
        d_guard = bpfc.map_delta({"guard": kernel.guards if kernel is not None
                                  else self._guards}, {"guard": guards})
        macs = bpfc.mac_ports(guards, bridge_of)
        d_mac = bpfc.map_delta({"mac_port": kernel.macs if kernel is not None
                                else self._macs}, {"mac_port": macs})
        t2 = time.perf_counter()
        written = False
        try:
            self._write(d_guard)
            self._write(d_meta, deletes=False)
            if not d_in.empty or not d_act.empty:
                self._write(d_in)
                kgen += 1
                if kernel is None and bpfc.in_place(base, state):
                    # An endpoint's change: the active slot is written in place, in an
                    # order no packet can tell from a switch; no grace period to wait.
                    for step in bpfc.in_place_steps(d_act):
                        self._write(step)
                    self._write_config(active, kgen)  # connections judged again
                    self.in_place += 1
                else:
                    self._flip(inactive, kgen)
                    # no program still reads the old slot (only ours count their runs)
                    self._wait_runs(counted=not any(problem.startswith("runs program")
                                                    for problem in links.values()))
                    active = inactive
                    self._write(d_act)
                written = True
            self._write(d_meta, updates=False)
            repaired = self._ensure_links(links, ports)
            self._write(d_mac)  # to ports whose programs are attached now
        except DataplaneError:
            self._state = None  # read the kernel back before the next apply
            self._applied = None
            raise
        repinned = self._repin(full=bool(verify))
        if remade:
            self._mark_build(self._build)
            self.last_drift_details.append(f"pin directory lost: {self.dir} (made again)")
        if repaired or repinned or remade:
            self.last_drift = self.last_drift or Plan()
            self.last_drift_details += [f"program detached: {r}" for r in repaired]
            self.last_drift_details += [f"pin lost: {r} (pinned again)" for r in repinned]
        if verify:
            self.sweep_connections()
        self._state, self._applied, self._slot, self._kgen = state, desired, active, kgen
        self._guards, self._macs = guards, macs
        self._guard_ports = {i: n for i, n in ports.items() if n in state.guards}
        if written or not d_meta.empty or not d_guard.empty or not d_mac.empty:
            self._generation += 1
        t3 = time.perf_counter()
        self.last_timing = {"read": t1 - t0, "compile": t2 - t1, "write": t3 - t2,
                            "entries": float(d_in.size() + d_act.size() + d_meta.size()
                                             + d_guard.size() + d_mac.size())}
        return plan(before, desired)

    def _drift_details(self, kernel: EbpfKernel, problem: str) -> list[str]:
        assert self._state is not None
        return [problem] * bool(problem) + _differences(  # links: reported as repaired
            kernel, self._state, self._guards, self._guard_ports)

    def skeleton_intact(self) -> bool:
        """Whether the pins are there and every bridge port runs both programs (cheap
        enough to poll every second or so: no map is read).

        The kernel is asked outside the datapath's lock first: under it, the check
        would hold every change back for as long as it takes (at 100 ports, 200 pins
        opened and asked about; with clsact, two filter dumps a port). Only what
        looks wrong then is asked again under the lock, since an apply may have been
        halfway through a port or a new build of the programs.
        """
        if self._maps and self._intact():
            return True
        with self._lock:
            if not self._exists():
                return False
            self._load()
            return self._intact()

    def _intact(self) -> bool:
        if not all(os.path.exists(self._pin(n)) for n in self._pin_names()):
            return False
        return all(not p or p == "gone" for p in self._check_links().values())

    @staticmethod
    def _pin_names() -> tuple[str, ...]:
        return PIN_NAMES

    def _remake_dir(self) -> bool:
        """The pin directory made again when it was removed under this process (`rm -rf`
        of the pins, or bpffs unmounted: mounted again): the maps and programs are held
        here and pinned again (`_repin`); the links, held by their pins alone, are
        attached again (`_ensure_links`). Left missing, every pin would fail, every
        apply with it, and the ports stay open."""
        if self.dir.is_dir():
            return False
        ensure_bpffs(self.pin_root)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._mode == "clsact":  # the marker a later process finds the filters by
            (self.dir / "mode-clsact").mkdir(exist_ok=True)
        return True

    def _repin(self, *, full: bool) -> list[str]:
        """Pins of the maps and programs this process holds, lost (or, with `full`,
        replaced by another object) since: pinned again, so that the next process takes
        these and not empty maps (whose program it would then have to replace). The
        names of those pinned again."""
        there, astray = self._astray(full=full)
        held = self._held_objects()
        for name in astray:
            pin = self._pin(name)
            if name in there:
                os.unlink(pin)
            libbpf.obj_pin(held[name], pin)
        return astray

    def _held_objects(self) -> dict[str, int]:
        """pin name -> the descriptor this process holds of that map or program."""
        return {**self._maps, **{f"prog_{p.removeprefix('stockade_')}": self._progs[h]
                                 for h, p in PROGRAMS.items()}}

    def _astray(self, *, full: bool) -> tuple[set[str], list[str]]:
        """The pin directory's entries, and the names of the pins of what this process
        holds that are lost (or, with `full`, are another object's now)."""
        try:  # one listing, not a stat of each pin: this runs after every apply
            there = set(os.listdir(self._dir_text))
        except FileNotFoundError:
            there = set()
        if not full and there.issuperset(PIN_NAMES):
            return there, []  # every pin there (after an apply: nearly always)
        held = self._held_objects()
        out = []
        for name in self._pin_names():
            if name in there:
                if not full:
                    continue
                fd = libbpf.obj_get(self._pin(name))
                try:
                    if libbpf.obj_id(fd) == libbpf.obj_id(held[name]):
                        continue
                finally:
                    os.close(fd)
            out.append(name)
        return there, out

    def flush_connections(self) -> int:
        """Forget every tracked connection (the next packet of each is judged as new)."""
        with self._lock:
            if not self._exists():
                return 0
            self._load()
            forgotten = 0
            for m in CT_MAPS:
                keys = list(libbpf.keys(self._maps[m], LAYOUT[m][0]))
                libbpf.delete_batch(self._maps[m], keys, LAYOUT[m][0])
                forgotten += len(keys) if m != "ct_owners" else 0
            return forgotten

    def sweep_connections(self) -> int:
        """Delete the established connections that expired without a packet to notice
        (the program deletes an entry only when a packet looks it up), and count again
        what each port holds of `ct_live` (its share; a count a race left off is set
        right). Run with every verifying apply. Returns the entries deleted."""
        fd, owners = self._maps["ct_live"], self._maps["ct_owners"]
        expired, held = bpfc.ct_sweep(libbpf.dump(fd, *LAYOUT["ct_live"]),
                                      time.clock_gettime_ns(time.CLOCK_MONOTONIC))
        if expired:
            libbpf.delete_batch(fd, expired, LAYOUT["ct_live"][0])
        size = bpfc.CT_OWNER.size
        counted = {bpfc.CT_OWNER.pack(o): bpfc.CT_OWNER.pack(n) for o, n in held.items()}
        gone = [k for k in libbpf.keys(owners, size) if k not in counted]
        if counted:
            libbpf.update_batch(owners, list(counted), list(counted.values()), size, size)
        if gone:
            libbpf.delete_batch(owners, gone, size)
        return len(expired)

    def stats(self) -> dict[str, int]:
        """The program's counters, summed over CPUs."""
        with self._lock:
            self._load()
            ncpu = _possible_cpus()
            out = {}
            for i, what in enumerate(STATS):
                raw = libbpf.lookup(self._maps["stats"], struct.pack("=I", i), 8 * ncpu)
                out[what] = sum(struct.unpack(f"={ncpu}Q", raw)) if raw else 0
            return out

    def show(self) -> str:
        with self._lock:
            if not self._exists():
                return ""
            self._load()
            kernel = self._read_kernel()
            state, problem = kernel.state()
            lines = [f"eBPF datapath {self.pin_name}: pinned in {self.dir}",
                     "programs: " + ", ".join(f"{PROGRAMS[h]} id {i}" for h, i in
                                              sorted(self._prog_ids.items())),
                     f"active slot {kernel.slot}, policy generation {kernel.generation}, "
                     f"denied events {kernel.log_rate}/s"]
            if problem:
                lines.append(problem)
            lines.append("maps: " + ", ".join(f"{k} {v}" for k, v in state.counts().items()))
            for pin, p in sorted(kernel.links.items()):
                lines.append(f"{pin}: {p or 'attached'}")
            lines.append("counters: " + ", ".join(f"{k} {v}" for k, v in self.stats().items()))
            rs = bpfc.ruleset_of(state)
            for d, m in (("ingress", rs.ingress), ("egress", rs.egress)):
                for addr, chain in sorted(m.items()):
                    lines.append(f"{d} {addr} -> {chain}")
            for port, g in rs.guards.items():
                lines.append(f"guard {port}: {', '.join(g.addresses) or 'no address'}"
                             + (f" at {g.mac}" if g.mac else ""))
            return "\n".join(lines) + "\n"

    def remove(self) -> None:
        """Detach every link and unpin everything (the maps go with their last reference)."""
        with self._lock:
            for pin in self._link_pins():
                self._unlink(pin, detach=True)
            if (self.dir / "mode-clsact").exists():
                self._mode = "clsact"
                with contextlib.suppress(DataplaneError, OSError):
                    for index, ifname in self._ports().items():
                        for hook in ATTACH:
                            self._unlink(f"link-{index}-{hook}", detach=True, ifname=ifname)
            self.close()
            if self.dir.exists():
                for entry in os.listdir(self.dir):
                    with contextlib.suppress(FileNotFoundError):
                        if (self.dir / entry).is_dir():
                            (self.dir / entry).rmdir()
                        else:
                            os.unlink(self.dir / entry)
                with contextlib.suppress(OSError):
                    self.dir.rmdir()
                    self.dir.parent.rmdir()
                    self.dir.parent.parent.rmdir()
            self._applied = None
            self._state = None
            self._guards, self._guard_ports, self._macs = {}, {}, {}
            self._generation += 1

    # ---- denied connections ------------------------------------------------------------

    def events(self) -> DeniedEvents:
        with self._lock:
            self._load()
            return DeniedEvents(self._maps["events"], self)

    def chain_of(self, policy: int) -> str:
        """The chain a policy id stands for (from the last apply or the maps)."""
        state = self._state
        if state is None or policy not in state.policies:
            with self._lock:
                self._load()
                state, _ = self._read_kernel().state()
        ref = state.policies.get(policy)
        return ref.chain if ref is not None else ""


@functools.cache  # (a kernel's build: it does not change while it runs)
def _realtime() -> bool:
    try:
        return REALTIME.read_text().strip() == "1"
    except OSError:
        return False


@functools.cache
def _possible_cpus() -> int:
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


_PROTO = {6: "TCP", 17: "UDP", 132: "SCTP", 1: "ICMP", 58: "ICMPv6"}


def parse_event(raw: bytes, chain: str, boot_offset: float) -> LoggedPacket:
    """One ring buffer record as the flow log's packet ("stockade-deny <chain>" prefix)."""
    (ts, _ifindex, _policy, family, proto, _direction, flags, sport, dport, src, dst,
     _hook) = EVENT.unpack(raw[:EVENT.size])

    def addr(b: bytes) -> str:
        return str(ipaddress.ip_address(b[:4] if family == 4 else b))

    ports = proto in (6, 17, 132)
    return LoggedPacket(
        prefix=f"{LOG_PREFIX} {chain}", family=family, src=addr(src), dst=addr(dst),
        protocol=_PROTO.get(proto, str(proto)),
        sport=int.from_bytes(sport, "big") if ports else None,
        dport=int.from_bytes(dport, "big") if ports else None,
        timestamp=boot_offset + ts / 1e9, hw_protocol=0x0800 if family == 4 else 0x86DD,
        tcp_flags=flags if proto == 6 else None)


class DeniedEvents:
    """Denied new connections from the program's ring buffer, as `LoggedPacket`s."""

    def __init__(self, map_fd: int, datapath: EbpfDatapath) -> None:
        self._datapath = datapath
        self._pending: list[bytes] = []
        self._fd = os.dup(map_fd)
        self._rb = libbpf.RingBuffer(self._fd, self._pending.append)
        # bpf_ktime_get_ns is CLOCK_MONOTONIC
        self._offset = time.time() - time.monotonic()

    def read(self, timeout: float = 0.0) -> list[LoggedPacket]:
        self._rb.poll(int(timeout * 1000))
        raw = list(self._pending)
        self._pending.clear()
        out = []
        for r in raw:
            policy = EVENT.unpack(r[:EVENT.size])[2]
            out.append(parse_event(r, self._datapath.chain_of(policy), self._offset))
        return out

    def close(self) -> None:
        self._rb.close()
        with contextlib.suppress(OSError):
            os.close(self._fd)


def main(argv: list[str]) -> int:
    """`python -m stockade.datapath.ebpf build`: compile the object (what `make bpf` runs)."""
    if argv[1:2] != ["build"]:
        print("usage: python -m stockade.datapath.ebpf build", file=sys.stderr)
        return 2
    try:
        print(object_path())
    except DataplaneError as exc:
        print(f"stockade: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))


__all__ = ["DeniedEvents", "EbpfDatapath", "ensure_bpffs", "object_path"]
