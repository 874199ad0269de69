"""The nftables datapath: libnftables in-process, one JSON transaction per apply.

The libnftables context keeps the netlink socket of the namespace it was created
in, so `--netns` costs one setns at start and none per change.

With `owner=True` the table is the kernel's to protect: it is created (or an
orphan claimed) with NFT_TABLE_F_OWNER | NFT_TABLE_F_PERSIST on libnftables'
own netlink socket, so no other process (not `nft`, not another agent) may
change or delete it while this one lives, and it keeps enforcing, as an orphan
any process may inspect, remove or claim, once this one is gone.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from queue import Queue
from typing import Any

from stockade.compile import guard
from stockade.compile.ir import ADDR, ADDR_PORT, NET, AddressSet, Chain, Guard, Ruleset
from stockade.compile.nft import (
    DECISION,
    DENIED,
    FAMILY,
    Command,
    KernelTable,
    RuleComparator,
    Table,
    canonical,
    mapped_chains,
    nft_target,
    parse_kernel,
    refresh_tier_sets,
    render_plan,
)
from stockade.compile.plan import (
    STAGE_PART,
    Plan,
    derive,
    derived,
    plan,
    set_delta,
    staged,
    with_guards,
)
from stockade.datapath.base import KernelSnapshot, ReadAhead, require_bridge_netfilter
from stockade.datapath.monitor import TableEvent, TableMonitor
from stockade.datapath.nfnetlink import (
    NFPROTO_BRIDGE,
    NFPROTO_INET,
    NFT_TABLE_F_DORMANT,
    NFT_TABLE_F_OWNER,
    NFT_TABLE_F_PERSIST,
    ElementWriter,
    NftablesRefused,
    TableInfo,
    del_object,
    del_table,
    netfilter_sockets,
    new_table,
)
from stockade.datapath.nfrules import (
    Encoding,
    Message,
    del_chain,
    del_set,
    encode_plan,
    flush_chain,
)
from stockade.errors import DataplaneError
from stockade.heap import collector_paused
from stockade.net.namespace import entered

log = logging.getLogger("stockade.dataplane")  # the logger's name, as logs have always shown it

OWNED = NFT_TABLE_F_OWNER | NFT_TABLE_F_PERSIST
# Chains and sets left unused in the kernel (see NftDatapath._spare), by name.
Spare = tuple[dict[str, Chain], dict[str, AddressSet]]
# What libnftables answered to `list table`: rc, output, error; the table's flags.
Listing = tuple[int, str, str, "TableInfo | None"]

# What `owner_status` says.
OWNER_OFF = "off: not asked for; any process with CAP_NET_ADMIN can change the table"
OWNER_PENDING = "pending: the table is claimed at the first apply"
OWNER_ON = "owned: flags owner, persist; only this process can change the table"
OWNER_UNSUPPORTED = ("unsupported: this kernel refuses persistent tables "
                     "(NFT_TABLE_F_PERSIST, Linux >= 6.9); the table is not owned, so other "
                     "processes can change it (drift is still repaired)")
OWNER_NO_SOCKET = ("unavailable: libnftables' netlink socket was not found; the table is "
                   "not owned, so other processes can change it (drift is still repaired)")


def _load_nftables() -> Any:
    # Missing, it is the 'agent' extra's: the ModuleNotFoundError reaches the command
    # line, which names the extra for every such library alike (cli/main.py).
    import nftables

    return nftables


class NftDatapath:
    """stockade's one `inet` table; nothing else in the ruleset is touched.

    `owner`: make the table owned and persistent (see the module). Off by
    default, so that a one-shot command leaves a table other tools can
    change; the agent asks for it. Where the kernel cannot keep an owned table
    after its owner exits (no NFT_TABLE_F_PERSIST), the table is not owned at
    all, since an owned table would vanish with the agent (fail open):
    `owner_status` says which it is, and a warning is logged.
    """

    name = "nft"

    def __init__(self, table: Table | None = None, netns: str | None = None, *,
                 owner: bool = False) -> None:
        self.table = table or Table()
        self.netns = netns
        self._lock = threading.Lock()
        nftables = _load_nftables()
        shared: socket.socket | None = None
        with entered(netns):
            before = netfilter_sockets() if owner else set()
            try:
                self._nft = nftables.Nftables()
            except OSError as exc:
                raise DataplaneError("cannot load libnftables (install the Debian package "
                                     "libnftables1)", stderr=str(exc)) from None
            if owner:
                # libnftables' socket: the one that appeared with its context (not
                # bound yet, should another thread have opened one meanwhile).
                found = [socket.socket(fileno=os.dup(fd))
                         for fd in sorted(netfilter_sockets() - before)]
                unbound = [s for s in found if s.getsockname()[0] == 0]
                if len(found) == 1 or len(unbound) == 1:
                    shared = (found if len(found) == 1 else unbound)[0]
                for s in found:
                    if s is not shared:
                        s.close()
            self._elements = ElementWriter(self.table.name, shared)
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)
        self._nft.set_numeric_proto_output(False)
        self._nft.set_service_output(False)
        # What the last successful transaction left in the kernel; None until the
        # kernel has been read once (a restart adopts what it finds there).
        self._applied: Ruleset | None = None
        # The guard table is in the kernel: made, or read back, since the last read. Left
        # in place when its last port goes, so the next first guard need not remake it.
        self._guard_there = False
        # Chains and sets no longer used, left in the kernel for a while (see `_spare`):
        # the kernel holds what was applied plus these.
        self._spare_chains: dict[str, Chain] = {}
        self._spare_sets: dict[str, AddressSet] = {}
        self._spare_since = 0.0
        # The last ruleset asked for and its canonical form (see `_target`).
        self._last_desired: Ruleset | None = None
        self._last_target: Ruleset | None = None
        # Its tier chains rendered as verdict maps, kept with it (most rulesets have none:
        # a change then looks for them in no chain, not in all).
        self._mapped: set[str] = set()
        # What a verifying apply found changed behind our back (not pending changes),
        # and every difference it found, one line each (foreign objects included).
        self.last_drift: Plan | None = None
        self.last_drift_details: list[str] = []
        self._generation = 0  # successful transactions so far
        self._check = RuleComparator()
        # Ownership: asked for, held, and in words.
        self.owner = owner
        self.owned = False
        self._persist: bool | None = None if shared is not None else False
        self.owner_status = (OWNER_OFF if not owner else OWNER_PENDING if shared is not None
                             else OWNER_NO_SOCKET)
        if owner and shared is None:
            log.warning("table inet %s will not be owned: %s", self.table.name,
                        self.owner_status)
        # The generation at which another process deleted the table (from its
        # netlink event): the kernel holds nothing of it, no need to read it back.
        self._gone_at: int | None = None
        # A table that kept enforcing while a table without ownership was replaced.
        self._handover: str | None = None
        # A read of the table started ahead (see `prefetch`): the thread, then what it
        # read, with the generation it was read at.
        self._ahead: ReadAhead[Listing] = ReadAhead("nft-prefetch")
        # Reading the table while transactions go on (see `verify_quietly`) and
        # comparing it (the comparator's memory is shared): one reader at a time.
        self._read_lock = threading.Lock()

    @classmethod
    def open(cls, name: str, *, netns: str | None = None, owner: bool = False,
             log_group: int | None = None, conntrack_limit: int = 0) -> NftDatapath:
        """The datapath as `datapath.open_datapath` makes every one."""
        return cls(Table(name, log_group=log_group, conntrack_limit=conntrack_limit),
                   netns=netns, owner=owner)

    @property
    def conntrack_limit(self) -> int:
        """The connections a source may hold in conntrack (0: no limit)."""
        return self.table.conntrack_limit

    # ---- talking to the kernel --------------------------------------------------------

    def _run(self, cmds: list[dict[str, Any]], what: str,
             applied: Ruleset | None = None, spare: Spare = ({}, {})) -> str:
        """One libnftables transaction; with `applied`, it becomes what the kernel holds
        (with `spare`), in the same critical section as the commit (see `verify_quietly`)."""
        if not cmds:
            return ""
        with self._lock:
            rc, out, err = self._nft.json_cmd({"nftables": cmds})
            if rc == 0 and applied is not None:
                self._applied = applied
                self._spare_chains, self._spare_sets = spare
                self._generation += 1
        if rc != 0:
            raise DataplaneError(f"{what} was refused by the kernel; nothing was changed",
                                 command="nft -j -f -", stderr=str(err)[:2000])
        return str(out)

    def _text(self, command: str) -> tuple[int, str, str]:
        with self._lock:
            rc, out, err = self._nft.cmd(command)
        return int(rc), str(out), str(err)

    def close(self) -> None:
        """Let go of the kernel: the netlink sockets, and with them the table's ownership.

        An owned table outlives its owner as an orphan (persist), so another datapath
        (the next agent, in this process or another) can claim it.
        """
        with self._lock:
            self._elements.close()
            nft, self._nft = self._nft, None
            if nft is not None:
                del nft  # libnftables frees its context (and socket) when collected

    # ---- ownership -------------------------------------------------------------------------

    def _persist_supported(self) -> bool:
        """Whether the kernel keeps an owned table after its owner exits (probed once)."""
        if self._persist is None:
            probe = f"{self.table.name}_persist_{os.getpid()}"
            try:
                with self._lock:
                    self._elements.transact([new_table(probe, OWNED), del_table(probe)],
                                            "the persistent-table probe")
                self._persist = True
            except NftablesRefused as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._persist = False
                self.owner_status = OWNER_UNSUPPORTED
                log.warning("table inet %s will not be owned: %s", self.table.name,
                            OWNER_UNSUPPORTED)
        return self._persist

    @property
    def owner_active(self) -> bool:
        """Whether this datapath makes the table owned (asked for, and the kernel can)."""
        return self.owner and self._persist is not False

    def _who(self, port: int | None) -> str:
        """The process behind a netlink port id, as well as /proc tells."""
        if port is None:
            return "another process"
        inode = None
        try:
            with entered(self.netns):
                lines = Path("/proc/thread-self/net/netlink").read_text().splitlines()[1:]
            for line in lines:
                cols = line.split()
                if len(cols) >= 10 and cols[1] == "12" and int(cols[2]) == port:
                    inode = cols[9]
        except (OSError, ValueError):
            pass
        if inode is not None:
            target = f"socket:[{inode}]"
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    for fd in (proc / "fd").iterdir():
                        if os.readlink(fd) == target:
                            comm = (proc / "comm").read_text().strip()
                            return f"process {proc.name} ({comm})"
                except OSError:
                    continue
        return f"another process (netlink port {port})"

    def _claim(self) -> bool:
        """Make the table ours alone, before reading it for a write; False if it cannot be.

        No table: it is created owned and persistent. An orphan (persistent,
        its owner gone): claimed, atomically, contents untouched. Owned by a
        live process: refused (DataplaneError). A table without ownership (made
        by an older stockade, a one-shot command or anybody) cannot become
        persistent: False, and `apply` replaces it (see `_migrate`).
        """
        with self._lock:
            info = self._elements.table_info()
            if info is not None and info.owned:
                if info.owner != self._elements.port:
                    raise DataplaneError(
                        f"table {FAMILY} {self.table.name} is owned by "
                        f"{self._who(info.owner)}; stop it first (one agent per network "
                        "namespace)")
            elif info is None or info.persistent:
                self._elements.transact([new_table(self.table.name, OWNED)],
                                        "claiming the table" if info else "creating the table")
            else:
                return False
            # The guard table left by the last owner: claimed alike, so that a restart
            # keeps it guarding (one not persistent is made anew by the next apply).
            ginfo = self._elements.table_info(self.table.name, NFPROTO_BRIDGE)
            if ginfo is not None and ginfo.persistent and ginfo.owner != self._elements.port:
                self._elements.transact([new_table(self.table.name, OWNED, NFPROTO_BRIDGE)],
                                        "claiming the guard table")
        self.owned = True
        self.owner_status = OWNER_ON
        self._generation += 1
        self._applied = None  # whatever is there now is read back before writing
        self._spare_chains, self._spare_sets = {}, {}
        log.info("table %s %s %s (flags owner, persist)", FAMILY, self.table.name,
                 "claimed" if info is not None else "created")
        return True

    def _migrate(self, target: Ruleset) -> Plan:
        """Replace a table without ownership by an owned one, enforcing all along.

        A handover table (owned) gets the whole ruleset first, so both enforce
        (a packet passes only if both allow it, and both hold the same policy);
        then the old table goes and an owned one takes its name and the ruleset
        (one transaction each), and the handover table goes. One-time cost: the
        ruleset is written twice.
        """
        handover = replace(self.table, name=f"{self.table.name}-handover")
        log.warning("table %s %s is not owned (made by an older stockade, a one-shot "
                    "command or another process): replacing it with an owned one",
                    FAMILY, self.table.name)
        full = replace(plan(Ruleset(), target), set_guards=())
        with self._lock:
            stale = self._elements.table_info(handover.name)
            self._elements.transact(([del_table(handover.name)] if stale else [])
                                    + [new_table(handover.name, OWNED)],
                                    "creating the handover table")
        self._handover = handover.name
        try:
            self._run(render_plan(handover, full, skeleton=True, create_table=False),
                      "the handover ruleset")
        except DataplaneError:
            self._drop_handover()
            raise
        with self._lock:
            self._elements.transact([del_table(self.table.name),
                                     new_table(self.table.name, OWNED)],
                                    "replacing the table")
        self.owned = True
        self.owner_status = OWNER_ON
        self._applied = None
        self._generation += 1
        self._write_guard(target.guards)  # owned now, as the policy table
        # From here on a failure leaves the handover table enforcing; the next
        # apply fills the owned table and then drops it.
        self._run(render_plan(self.table, full, skeleton=True, create_table=False),
                  "the ruleset update")
        self._applied = target
        self._spare_chains, self._spare_sets = {}, {}
        self._generation += 1
        self._drop_handover()
        return full

    def _drop_handover(self) -> None:
        if self._handover is None:
            return
        with self._lock:
            if self._elements.table_info(self._handover) is not None:
                self._elements.transact([del_table(self._handover)],
                                        "removing the handover table")
        self._handover = None

    # ---- the Datapath protocol ---------------------------------------------------------

    def check(self) -> None:
        """Fail clearly unless the kernel has what the ruleset uses.

        A scratch table exercises everything: the inet forward hook, conntrack
        state, verdict maps, interval and concatenated sets. Bridged traffic
        reaches the inet forward hook only through br_netfilter with its
        bridge-nf-call sysctls set, so those are checked (and set) too. With
        `owner`, whether the kernel keeps persistent tables is probed as well.
        """
        probe = Table(f"{self.table.name}_probe_{os.getpid()}",
                      conntrack_limit=self.table.conntrack_limit)
        cmds = render_plan(probe, plan(Ruleset(), Ruleset()), skeleton=True)
        cmds.append({"add": {"set": probe.ref(name="c4-probe", type="ipv4_addr",
                                              flags=["interval"],
                                              elem=[{"prefix": {"addr": "10.0.0.0",
                                                                "len": 8}}])}})
        cmds.append({"add": {"set": probe.ref(name="n4-probe",
                                              type=["ipv4_addr", "inet_proto",
                                                    "inet_service"],
                                              elem=[{"concat": ["10.0.0.1", "tcp", 80]}])}})
        try:
            self._run(cmds, "the feature probe")
        except DataplaneError as exc:
            raise DataplaneError("this kernel lacks an nftables feature stockade needs "
                                 "(inet forward hook, conntrack, verdict maps, "
                                 "concatenated sets or, with a connection limit, "
                                 "nft_connlimit)", stderr=exc.stderr) from None
        finally:
            self._text(f"delete table {FAMILY} {probe.name}")
        require_bridge_netfilter(self.netns, "the inet forward hook")
        if self.owner:
            self._persist_supported()

    def read_table(self, expected: Mapping[str, Chain] | None = None, *,
                   listing: Listing | None = None) -> KernelTable | None:
        """The table as the kernel holds it, compared with what stockade renders.

        Chains are recognised among `expected` (by default the last applied).
        `listing`: what libnftables printed, read before (see `prefetch`).
        """
        if expected is None:
            held = self._held()
            expected = held.chains if held is not None else {}
        if listing is None:
            with self._lock:
                rc, out, err = self._nft.cmd(f"list table {FAMILY} {self.table.name}")
                info = self._elements.table_info() if rc == 0 else None
        else:
            rc, out, err, info = listing
        if rc != 0:
            if "No such file" in err or "does not exist" in err:
                return None
            raise DataplaneError("cannot read the table", command="nft list table",
                                 stderr=err)
        # Millions of fresh objects, none in a cycle: the cyclic collector would
        # only walk them (and everything kept alive) again and again.
        with collector_paused(freeze=False):
            doc = json.loads(out)
            with self._read_lock:  # the comparator's memory is shared with verify_quietly
                kt = parse_kernel(doc, self.table, expected, self._check,
                                  info.flags if info is not None else None)
        return with_guard(kt, self._read_guard(self._nft))

    def _read_guard(self, reader: Any) -> guard.KernelGuard | None:
        """The guard table as the kernel holds it; None when there is none. Owned by
        anybody but this datapath when this one owns its table: not as made."""
        with self._lock:
            rc, out, err = reader.cmd(f"list table {guard.FAMILY} {self.table.name}")
            info = (self._elements.table_info(self.table.name, NFPROTO_BRIDGE)
                    if rc == 0 and self.owned else None)
        if rc != 0:
            if "No such file" in err or "does not exist" in err:
                return None
            raise DataplaneError("cannot read the guard table",
                                 command="nft list table bridge", stderr=err)
        kg = guard.parse_guard(json.loads(out), self.table.name)
        if self.owned and (info is None or info.owner != self._elements.port):
            kg.drift.append("guard table not owned by this datapath")
        return kg

    def _write_guard(self, guards: Mapping[str, Guard]) -> None:
        """Make the guard table anew with `guards`: when it is missing or not as made.

        Its skeleton is text (see compile.guard), which cannot make a table persistent:
        an owned one is made empty over raw netlink first, then filled (between the
        two it guards nothing, as when it was missing)."""
        owned = self.owned
        if owned:
            with self._lock:
                gone = self._elements.table_info(self.table.name, NFPROTO_BRIDGE) is None
                self._elements.transact(
                    ([] if gone else [del_table(self.table.name, NFPROTO_BRIDGE)])
                    + [new_table(self.table.name, OWNED, NFPROTO_BRIDGE)],
                    "making the guard table")
            self._generation += 1
        rc, _out, err = self._text(guard.skeleton_text(self.table.name, guards,
                                                       table=not owned))
        if rc != 0:
            raise DataplaneError("the guard table was refused by the kernel",
                                 command="nft -f -", stderr=err[:2000])
        self._guard_there = True

    def read(self) -> Ruleset:
        kt = self.read_table()
        return kt.ruleset if kt is not None else Ruleset()

    def _delta(self, desired: Ruleset) -> tuple[Plan, KernelTable | None]:
        held = self._held()
        known = dict(held.chains) if held is not None else {}
        kt = self.read_table({**known, **desired.chains})
        current = kt.ruleset if kt is not None else Ruleset()
        return plan(current, nft_target(desired)), kt

    def snapshot(self, known: Mapping[str, Chain] | None = None) -> KernelSnapshot:
        """The kernel read back; chains are recognised among the last applied and `known`.

        When another process deleted the table since our last transaction (its
        netlink event said so), the kernel holds nothing of it: not read.
        """
        if self.owner and not self.owned and self._persist_supported():
            self._claim()  # first, so that nobody changes it after it was read
        generation, applied = self._generation, self._held()
        if self._gone_at is not None and self._gone_at == generation:
            return KernelSnapshot(generation, None)
        chains = {**(applied.chains if applied is not None else {}), **(known or {})}
        pre = self._ahead.take()
        listing = pre[1] if pre is not None and pre[0] == generation else None
        return KernelSnapshot(generation, self.read_table(chains, listing=listing))

    def prefetch(self) -> None:
        """Start reading the table back on a thread of its own (at start, while the state
        loads and compiles: the read is libnftables' work, outside the interpreter).

        The table is claimed first, as `snapshot` does. The next snapshot takes what
        was read if no transaction came in between; otherwise it reads again. No
        table: nothing is read, and nothing made (the agent may yet refuse to start:
        its store is read meanwhile).
        """
        def read() -> tuple[int, Listing] | None:
            with self._lock:
                there = self._elements.table_info() is not None
            if not there:
                return None
            if self.owner and not self.owned and self._persist_supported():
                self._claim()
            generation = self._generation
            rc, out, err = self._reader().cmd(f"list table {FAMILY} {self.table.name}")
            with self._lock:
                if self._generation != generation:
                    return None  # a transaction came in: the snapshot reads again
                info = self._elements.table_info() if rc == 0 else None
            return generation, (int(rc), str(out), str(err), info)

        self._ahead.start(read)

    def _reader(self) -> Any:
        """A libnftables context of its own, for one read: it keeps what it read (the
        whole table) in its cache until it goes, and takes no lock of the writer's."""
        with entered(self.netns):
            reader = _load_nftables().Nftables()
        reader.set_json_output(True)
        reader.set_handle_output(False)
        reader.set_numeric_proto_output(False)
        reader.set_service_output(False)
        return reader

    def verify_quietly(self) -> bool:
        """Whether the kernel holds what was applied, read without holding up transactions.

        The periodic verification at scale reads for a second or more; changes keep
        being applied meanwhile (this reads through a context of its own), so the
        table read may hold any state between what was applied when the read
        began and what is applied when it ends. It is compared with both: an
        object that differs from both is drift, as is anything foreign or a
        skeleton not as rendered. True: no drift (nothing to do). False: drift,
        or nothing to compare with: the caller runs a verifying apply, which
        reads the kernel again under the transaction lock and repairs.
        """
        with self._lock:
            before = self._held()
        if before is None or (self.owner and not self.owned) or (
                self._gone_at is not None and self._gone_at == self._generation):
            return False
        with self._read_lock:
            rc, out, _err = self._reader().cmd(f"list table {FAMILY} {self.table.name}")
            with self._lock:
                after = self._held()
                info = self._elements.table_info() if rc == 0 else None
            if rc != 0 or after is None or info is None:
                return False
            with collector_paused(freeze=False):
                kt = parse_kernel(json.loads(out), self.table,
                                  {**before.chains, **after.chains}, self._check, info.flags)
            kg = self._read_guard(self._reader())
        if kg is None and (before.guards or after.guards):
            return False
        if kg is not None and (not kg.intact or kg.guards not in (before.guards,
                                                                  after.guards)):
            return False
        return not kt.needs_repair and read_while_applying(kt.ruleset, before, after)

    def foreign_change(self, event: TableEvent) -> None:
        """What the table monitor saw another process commit (see `monitor`)."""
        self._gone_at = self._generation if event.deleted and not event.lost else None

    def monitor(self, on_foreign_change: Callable[[], None],
                on_lost: Callable[[], None] | None = None) -> TableMonitor:
        """A monitor of this table that tells this datapath what it saw, then calls back.

        `on_lost`, if given, is called instead of `on_foreign_change` when events were
        lost (the socket overflowed, as our own large transactions make it): nothing
        says another process changed anything, so the caller may check without haste.
        """
        lost = [False]

        def event(ev: TableEvent) -> None:
            self.foreign_change(ev)
            lost[0] = ev.lost

        def changed() -> None:
            if lost[0] and on_lost is not None:
                on_lost()
            else:
                on_foreign_change()

        return TableMonitor(self.table.name, changed, netns=self.netns, on_event=event)

    def diff(self, desired: Ruleset) -> Plan:
        delta, _ = self._delta(desired)
        return delta

    def apply(self, desired: Ruleset, *, verify: bool | KernelSnapshot = False) -> Plan:
        """One transaction switches packets over: they meet either the old or the new
        ruleset (a large delta sends what nothing reaches yet first: see `_raw`).

        The delta is taken against what the previous apply left, without reading
        the kernel back; `verify` (and the first apply of this object) reads the
        kernel instead, which is how drift is found and repaired: whatever in
        the table is not what stockade renders is removed or rewritten in the
        same transaction.
        """
        target = self._target(desired)
        self.last_drift = None
        self.last_drift_details = []
        if self.owner and not self.owned and self._persist_supported() and not self._claim():
            return self._migrate(target)
        snap = verify if isinstance(verify, KernelSnapshot) else None
        if snap is not None and snap.generation != self._generation:
            snap = None  # a transaction came in between: read again
        if snap is None and (verify or self._applied is None):
            snap = self.snapshot(desired.chains)
        repair = False
        kt: KernelTable | None = None
        rewrite_guard = False
        if snap is not None:
            kt = snap.table
            current = kt.ruleset if kt is not None else Ruleset()
            # A guard table not as made is made anew, whole, first; a missing one when a
            # port is to be guarded. With the policy table gone, the guard's is read apart.
            kg = self._read_guard(self._nft) if kt is None else None
            if kg is not None:
                current = replace(current, guards=kg.guards)
            absent = kt.guard_missing if kt is not None else kg is None
            self._guard_there = not absent
            intact = kt.guard_ok if kt is not None else kg is None or kg.intact
            rewrite_guard = not intact or (absent and bool(target.guards))
            delta = plan(replace(current, guards=target.guards) if rewrite_guard else current,
                         target)
            repair = kt is None or kt.needs_repair
            held = self._held()
            if held is not None:
                # Drift is the kernel against what we last left there, not against
                # what we are about to apply.
                drift = plan(current, held)
                if repair or not drift.empty:
                    self.last_drift = drift
                    self.last_drift_details = (kt.drift if kt is not None
                                               else ["table missing"]) or drift.describe()
        else:
            assert self._applied is not None
            # the first guard since none: the table may not be there yet (one deleted
            # since fails the transaction its elements go in, and the apply after a
            # failure reads the kernel back and makes it)
            rewrite_guard = bool(target.guards) and not self._applied.guards and \
                not self._guard_there
            applied = (replace(self._applied, guards=target.guards) if rewrite_guard
                       else self._applied)
            delta, spare = self._spare(plan(applied, target))
        shown = delta  # what is returned: with the guards a rewrite put in, if one did
        if rewrite_guard:
            self._write_guard(target.guards)
            before = current if snap is not None else self._applied
            shown = with_guards(delta, before.guards if before is not None else {}, target)
        if snap is not None:
            spare = ({}, {})  # the plan from the kernel removes whatever is unused
        if delta.empty and not repair:
            with self._lock:
                self._applied = target
                self._spare_chains, self._spare_sets = spare
            self._drop_handover()
            return shown
        if not repair and self._raw(delta, target, spare):
            self._drop_handover()
            return shown
        missing = snap is not None and kt is None  # the kernel holds no table at all
        cmds: list[Command] = list(kt.prelude) if kt is not None else []
        cmds += render_plan(self.table, delta,
                            skeleton=missing or (kt is not None and not kt.skeleton_ok),
                            create_table=missing and not self.owned,
                            kept_sets=kt.kept_sets if kt is not None else ())
        try:
            self._run(cmds, "the ruleset update", applied=target, spare=spare)
        except DataplaneError:
            self._applied = None
            raise
        if kt is not None and kt.objects:
            self._delete_objects(kt.objects)
        if kt is not None and not kt.table_ok:
            self._wake()
        self._drop_handover()
        return shown

    def _raw(self, delta: Plan, target: Ruleset, spare: Spare) -> bool:
        """Apply a delta from what was applied as raw nf_tables messages, without
        libnftables reading the table first (see `nfrules`). False when the delta has
        something only libnftables writes, or the kernel refused it (then nothing of
        it applied, and libnftables tries it and reports what it says).

        A large delta goes in parts (`plan.staged`): what nothing reaches yet, sent
        from a thread while the next part is encoded, then the rest in one
        transaction that makes it all reachable at once.
        """
        if _tier_maps_in(delta):
            return False  # a tier chain's verdict maps: libnftables writes them
        parts, rest = staged(delta, self.stage_part)
        shared = Encoding()
        if parts and not self._stage(parts, shared):
            return False
        try:
            msgs = encode_plan(self.table, rest, shared)
        except Exception:  # a bug in the encoder must not stop enforcement
            log.exception("encoding the ruleset update failed; sending it through libnftables")
            msgs = None
        if msgs is None:
            self._unstage(parts)
            return False
        try:
            with self._lock:
                self._elements.transact(msgs, "the ruleset update")
                self._applied = target
                self._spare_chains, self._spare_sets = spare
                self._generation += 1
        except DataplaneError as exc:
            log.warning("the raw ruleset update was refused (%s); sending it through "
                        "libnftables", exc)
            self._unstage(parts)
            return False
        return True

    def _stage(self, parts: tuple[Plan, ...], shared: Encoding | None = None) -> bool:
        """Send `parts` in order, each encoded while the one before it goes in; False
        (and none of them left in the kernel) when one cannot be."""
        sent: list[Plan] = []
        failed: list[BaseException] = []
        queue: Queue[tuple[Plan, list[Message]] | None] = Queue(maxsize=2)

        def send() -> None:
            while (item := queue.get()) is not None:
                if failed:
                    continue  # drained, so that the encoder never blocks on a full queue
                part, msgs = item
                try:
                    with self._lock:
                        self._elements.transact(msgs, "a staged part of the ruleset update")
                        self._generation += 1
                    sent.append(part)
                except BaseException as exc:  # reported by the encoder's thread
                    failed.append(exc)

        sender = threading.Thread(target=send, name="nft-stage", daemon=True)
        sender.start()
        try:
            for part in parts:
                if failed:
                    break
                msgs = encode_plan(self.table, part, shared)
                if msgs is None:
                    # (never: a part holds sets of addresses and NetworkPolicy chains)
                    raise DataplaneError("a staged part needs libnftables")
                queue.put((part, msgs))
        except Exception as exc:  # an encoder bug must not stop enforcement
            failed.append(exc)
        finally:
            queue.put(None)
            sender.join()
        if failed:
            log.warning("a staged part of the ruleset update failed (%s); sending it "
                        "through libnftables", failed[0])
            self._unstage(tuple(sent))
            return False
        return True

    def _unstage(self, parts: tuple[Plan, ...] | list[Plan]) -> None:
        """Remove what `parts` added. If the kernel refuses, what it holds is unknown
        here: the next apply reads it (and removes what nothing uses)."""
        if not parts:
            return
        chains = [c.name for p in parts for c in p.add_chains]
        body = [flush_chain(self.table.name, name) for name in chains]
        body += [del_chain(self.table.name, name) for name in chains]
        body += [del_set(self.table.name, s.name) for p in parts for s in p.add_sets]
        try:
            with self._lock:
                self._elements.transact(body, "removing the staged parts")
                self._generation += 1
        except DataplaneError:
            with self._lock:
                self._applied = None
            raise

    # How large a delta goes in parts (see `plan.staged`), and how large each part is.
    stage_part = STAGE_PART

    # Whether unused chains stay a while for reuse (the agent's choice; a one-shot
    # command leaves exactly the ruleset asked for).
    keep_unused = False
    # Unused chains kept at most, and how long they wait for a use before an apply with
    # nothing else to do removes them.
    SPARE_MAX = 256
    SPARE_AGE = 10.0

    def _held(self) -> Ruleset | None:
        """What the kernel holds as far as this datapath knows: the last applied ruleset
        and the unused chains and sets left with it (None: unknown, read it)."""
        applied = self._applied
        if applied is None or not (self._spare_chains or self._spare_sets):
            return applied
        return Ruleset({**applied.sets, **self._spare_sets},
                       {**applied.chains, **self._spare_chains}, applied.ingress,
                       applied.egress, applied.guards)

    def _spare(self, delta: Plan) -> tuple[Plan, Spare]:
        """The plan from what was applied, with unused chains left in the kernel a while.

        A chain (and its sets) that a change stops using stays, and a change that
        asks for the same chain again (the same content, so the same name) finds it
        there: an endpoint that goes and comes back (a pod replaced, a rollout) then
        costs element changes over raw netlink, not a libnftables transaction
        (~15-30 ms at 10,000 endpoints: libnftables reads every set and chain
        first). Unused, they decide nothing: no map entry jumps to them. They go
        with the next transaction that needs libnftables anyway, or when more
        than SPARE_MAX wait, or older than SPARE_AGE when nothing else is to do.
        Returns the plan to run and the unused chains and sets after it.
        """
        if not self.keep_unused:
            return delta, ({}, {})
        applied = self._applied
        assert applied is not None
        chains, sets = dict(self._spare_chains), dict(self._spare_sets)
        if not (chains or sets or delta.del_chains or delta.del_sets):
            return delta, (chains, sets)
        add_el = list(delta.add_elements)
        del_el = list(delta.del_elements)
        add_sets: list[AddressSet] = []
        for s in delta.add_sets:
            kept = sets.pop(s.name, None)
            if kept is None:
                add_sets.append(s)
            else:
                set_delta(kept, s, add_el, del_el)
        add_chains: list[Chain] = []
        replace_chains = list(delta.replace_chains)
        for c in delta.add_chains:
            spare = chains.pop(c.name, None)
            if spare is None:
                add_chains.append(c)
            elif spare.rules != c.rules:
                replace_chains.append(c)  # a tier's chain is named by subjects, not rules
        if not (chains or sets):
            self._spare_since = time.monotonic()
        chains.update((name, applied.chains[name]) for name in delta.del_chains)
        sets.update((name, applied.sets[name]) for name in delta.del_sets)
        out = replace(delta, add_sets=tuple(add_sets), add_chains=tuple(add_chains),
                      replace_chains=tuple(replace_chains),
                      add_elements=tuple(add_el), del_elements=tuple(del_el),
                      del_chains=(), del_sets=())
        idle = out.empty and time.monotonic() - self._spare_since > self.SPARE_AGE
        if (chains or sets) and (not elements_only(out) or idle
                                 or len(chains) > self.SPARE_MAX):
            out = replace(out, del_chains=tuple(chains), del_sets=tuple(sets))
            chains, sets = {}, {}
        return out, (chains, sets)

    def _target(self, desired: Ruleset) -> Ruleset:
        """`nft_target(desired)`; when `desired` was derived from the previous one (the
        incremental compiler records what changed, see plan.derive), only the sets that
        changed are made canonical, and the target is derived from the previous target
        alike, so that the plan from what was applied looks at those only."""
        previous, before = self._last_desired, self._last_target
        if desired is previous and before is not None:
            return before  # the compiler's same ruleset: nothing changed since
        touched = derived(desired, previous) if previous is not None else None
        if touched is None or before is None:
            target = nft_target(desired)
            mapped = mapped_chains(desired.chains.values())
        else:
            # a copy that clones the table (see IncrementalCompiler.ruleset)
            sets = before.sets.copy() if isinstance(before.sets, dict) else dict(before.sets)
            for name in touched.sets:
                s = desired.sets.get(name)
                if s is None:
                    sets.pop(name, None)
                elif s.kind == NET:
                    sets[name] = canonical(Ruleset(sets={name: s})).sets[name]
                else:
                    sets[name] = s
            target = Ruleset(sets, desired.chains, desired.ingress, desired.egress,
                             desired.guards)
            # the tier chains' verdict maps follow their chains and the sets they name
            changed = [c for n in touched.chains if (c := desired.chains.get(n)) is not None]
            mapped = (self._mapped - touched.chains) | mapped_chains(changed)
            maps = refresh_tier_sets(sets, before, target, touched, mapped)
            derive(target, before, replace(touched, sets=touched.sets | maps))
        self._last_desired, self._last_target, self._mapped = desired, target, mapped
        return target

    def _delete_objects(self, objects: list[tuple[str, str, int]]) -> None:
        """Foreign stateful objects and flowtables, unused once the repair is in."""
        msgs = [m for kind, _, handle in objects
                if (m := del_object(self.table.name, kind, handle)) is not None]
        if msgs:
            with self._lock:
                self._elements.transact(msgs, "removing foreign objects")
            self._generation += 1

    def _wake(self) -> None:
        """Clear a dormant flag someone set (after the repair: the table never runs tampered)."""
        with self._lock:
            info = self._elements.table_info()
            if info is not None and info.flags & NFT_TABLE_F_DORMANT:
                self._elements.transact([new_table(self.table.name,
                                                   info.flags & ~NFT_TABLE_F_DORMANT)],
                                        "waking the table")
        self._generation += 1

    def skeleton_intact(self) -> bool:
        """Whether the table is there with its base chain and maps, and nothing foreign."""
        kt = self.read_table()
        return kt is not None and not kt.needs_repair

    def show(self) -> str:
        with self._lock:
            self._nft.set_json_output(False)
            try:
                rc, out, _ = self._nft.cmd(f"list table {FAMILY} {self.table.name}")
                grc, gout, _ = self._nft.cmd(f"list table {guard.FAMILY} {self.table.name}")
            finally:
                self._nft.set_json_output(True)
        return (str(out) if rc == 0 else "") + (str(gout) if grc == 0 else "")

    def remove(self) -> None:
        """Delete the table: this datapath's own, an orphan, or one nobody owns."""
        self._applied = None
        self._guard_there = False
        self._spare_chains, self._spare_sets = {}, {}
        self._generation += 1
        # The guard table goes first: an owned one's refusal leaves both in place.
        for family, number in ((guard.FAMILY, NFPROTO_BRIDGE), (FAMILY, NFPROTO_INET)):
            rc, _, err = self._text(f"delete table {family} {self.table.name}")
            if rc == 0 or "No such file" in err:
                continue
            if "Operation not permitted" in err:
                with self._lock:
                    info = self._elements.table_info(self.table.name, number)
                who = self._who(info.owner if info is not None else None)
                raise DataplaneError(
                    f"table {family} {self.table.name} is owned by {who}; stop it first "
                    "(the table then stays, enforcing, until removed)",
                    command="nft delete table", stderr=err)
            raise DataplaneError("cannot remove the table", command="nft delete table",
                                 stderr=err)
        self.owned = False
        if self.owner_active:
            self.owner_status = OWNER_PENDING
        self._drop_handover()


def read_while_applying(current: Ruleset, before: Ruleset, after: Ruleset) -> bool:
    """Whether `current`, read while transactions took the kernel from `before` to
    `after`, shows no drift: every object in it is as one of the two left it.

    An object changed twice during the read may be read in its state in between
    and is then taken for drift; so is anything neither holds. The caller's
    verifying apply tells which (it reads again, under the transaction lock).
    """
    early = plan(current, before)
    if after is before or early.empty:
        return early.empty
    return not (plan_objects(early) & plan_objects(plan(current, after)))


def plan_objects(delta: Plan) -> set[tuple[Any, ...]]:
    """Every kernel object a plan touches: sets (interval sets whole), elements, chains,
    map entries."""
    out: set[tuple[Any, ...]] = {("set", s.name) for s in delta.add_sets}
    out |= {("set", name) for name in delta.del_sets}
    for s, els in (*delta.add_elements, *delta.del_elements):
        if s.kind == NET:
            out.add(("set", s.name))
        else:
            out |= {("element", s.name, e) for e in els}
    out |= {("chain", c.name) for c in (*delta.add_chains, *delta.replace_chains)}
    out |= {("chain", name) for name in delta.del_chains}
    out |= {("map", *entry) for entry in delta.del_map}
    out |= {("map", *entry) for entry, _ in delta.set_map}
    return out


def _tier_maps_in(delta: Plan) -> bool:
    """Whether a plan writes a tier chain's verdict maps or denied sets."""
    return any(s.kind in (DECISION, DENIED) for s in delta.add_sets) or any(
        s.kind in (DECISION, DENIED) for s, _ in (*delta.add_elements, *delta.del_elements))


def elements_only(delta: Plan) -> bool:
    """Whether a plan only adds and removes elements that nfnetlink can write directly."""
    return not (delta.add_sets or delta.add_chains or delta.replace_chains or delta.del_chains
                or delta.del_sets or any(s.kind not in (ADDR, ADDR_PORT) for s, _ in (
                    *delta.add_elements, *delta.del_elements)))


def with_guard(kt: KernelTable | None, kg: guard.KernelGuard | None) -> KernelTable | None:
    """The policy table read back with the guard table's guards and drift."""
    if kt is None:
        return None
    kt.ruleset = replace(kt.ruleset, guards=kg.guards if kg is not None else {})
    kt.guard_missing = kg is None
    kt.guard_ok = kg is None or kg.intact
    kt.drift += kg.drift if kg is not None else []
    return kt
