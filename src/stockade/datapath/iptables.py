"""The iptables + ipset datapath: the shell around the pure `compile.iptables`.

Every apply is a handful of processes, never one per rule: `ipset restore`
sessions and one `ip[6]tables-restore --noflush --wait` per family, in the
order `compile.iptables.render_plan` gives (sets before the rules that use
them, chains before the endpoints that reach them, removals in reverse). Each
`iptables-restore` commits its table atomically (legacy: one table blob;
nf_tables: one transaction); an `ipset restore` session is not atomic, so a
set rewritten whole goes through a temporary set and `swap`, and an endpoint
moving between policy sets enters its new dispatch set before it leaves the
old one. A plan that only changes elements (an endpoint added, relabelled,
removed) is one `ipset restore` session.

What it owns, per family, in the `filter` table: the chains and sets named
with its prefix (`<name>-`), and one jump, first in FORWARD. It never flushes
anything else. Bridged traffic reaches FORWARD only through br_netfilter with
`bridge-nf-call-ip(6)tables=1`, which `check` sets in its namespace.

Backends: iptables comes in two flavours that must not be mixed on a host.
Like kubernetes-sigs/iptables-wrappers, the one in use is the one holding more
rules (`iptables-legacy-save` against `iptables-nft-save`, both families; a
tie, nf_tables); the legacy tools are run only when `/proc/net/ip_tables_names`
or `ip6_tables_names` already lists a table, so that detection never creates
legacy tables. `STOCKADE_IPTABLES_BACKEND=nft|legacy` overrides it.

The port guard (each pod's port bound to its addresses and MAC, `compile.guard`) is
layer 2, where iptables does not reach (ARP, neighbour discovery, MACs): it is the
nftables `bridge` table the nft datapath keeps, written with `nft -f -` (one
transaction) before the iptables steps, read back and repaired with them.

Ownership: iptables has nothing like nftables' owned tables; any process with
CAP_NET_ADMIN can change stockade's chains and sets. Every rule carries a
`stk:<digest>` comment, and a verifying apply reads everything back
(`iptables-save`, `ipset save`), compares it line by line with what it
renders and repairs the difference (`last_drift`, `last_drift_details`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from stockade.compile import guard
from stockade.compile.iptables import (
    ALLOW_MARK,
    FAMILIES,
    FORWARD,
    KernelState,
    Layout,
    Step,
    parse_ipset,
    parse_kernel,
    parse_save,
    render_plan,
    render_remove,
)
from stockade.compile.ir import Chain, Ruleset
from stockade.compile.nft import canonical
from stockade.compile.plan import Plan, plan, with_guards
from stockade.datapath.base import KernelSnapshot, require_bridge_netfilter
from stockade.errors import DataplaneError
from stockade.net.namespace import entered, netns_path

log = logging.getLogger("stockade.dataplane")

BACKENDS = ("nft", "legacy")
BACKEND_ENV = "STOCKADE_IPTABLES_BACKEND"
OWNER_STATUS = ("unsupported: iptables has no table ownership; any process with "
                "CAP_NET_ADMIN can change stockade's chains and sets, and a verifying "
                "apply repairs what it finds changed")
TIMEOUT = 300.0  # seconds for one restore (a full load at 10,000 endpoints takes ~1 s)


def _tool(backend: str, family: int, what: str) -> str:
    return f"{'iptables' if family == 4 else 'ip6tables'}-{backend}-{what}"


def _legacy_tables_present(netns: str | None) -> bool:
    """Whether legacy iptables holds any table here, read without loading anything."""
    with entered(netns):  # thread-self: /proc/net is the main thread's namespace
        for name in ("/proc/thread-self/net/ip_tables_names",
                     "/proc/thread-self/net/ip6_tables_names"):
            try:
                if Path(name).read_text().strip():
                    return True
            except OSError:
                continue  # no legacy iptables in this kernel: nothing there
    return False


def _rule_count(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith("-"))


class IptablesDatapath:
    """stockade's prefixed chains and sets in iptables + ipset, and one jump from FORWARD."""

    name = "iptables"
    enforces_tiers = True  # ClusterNetworkPolicy tiers: see compile.iptables

    def __init__(self, layout: Layout | None = None, netns: str | None = None, *,
                 backend: str | None = None, owner: bool = False) -> None:
        self.layout = layout or Layout.of()
        self.netns = netns
        self._lock = threading.Lock()
        self._backend = backend or os.environ.get(BACKEND_ENV) or None
        if self._backend is not None and self._backend not in BACKENDS:
            raise DataplaneError(f"no iptables backend {self._backend!r} "
                                 f"(choose from {', '.join(BACKENDS)})")
        self._applied: Ruleset | None = None
        # The guard table is in the kernel (see NftDatapath._guard_there).
        self._guard_there = False
        self.last_drift: Plan | None = None
        self.last_drift_details: list[str] = []
        self._generation = 0
        # Asked for, never possible: said in `owner_status`, and drift is repaired instead.
        self.owner = owner
        self.owned = False
        self.owner_status = OWNER_STATUS
        self.processes = 0  # processes run so far (tests and benchmarks count them)

    @classmethod
    def open(cls, name: str, *, netns: str | None = None, owner: bool = False,
             log_group: int | None = None, conntrack_limit: int = 0) -> IptablesDatapath:
        """The datapath as `datapath.open_datapath` makes every one."""
        return cls(Layout.of(name, log_group, conntrack_limit), netns=netns, owner=owner)

    # ---- processes ---------------------------------------------------------------------

    def _argv(self, argv: list[str]) -> list[str]:
        if self.netns is None:
            return argv
        return ["nsenter", f"--net={netns_path(self.netns)}", "--", *argv]

    def _exec(self, argv: list[str], stdin: str = "", what: str = "") -> str:
        full = self._argv(argv)
        self.processes += 1
        try:
            done = subprocess.run(full, input=stdin, capture_output=True, text=True,
                                  timeout=TIMEOUT, check=False)
        except FileNotFoundError as exc:
            raise DataplaneError(f"{argv[0]} is not installed (Debian: apt-get install "
                                 "iptables ipset)", command=" ".join(argv),
                                 stderr=str(exc)) from None
        except subprocess.TimeoutExpired:
            raise DataplaneError(f"{what or argv[0]} did not finish in {TIMEOUT:.0f} s",
                                 command=" ".join(argv)) from None
        if done.returncode != 0:
            raise DataplaneError(f"{what or argv[0]} was refused",
                                 command=" ".join(argv), stderr=done.stderr[-2000:])
        return done.stdout

    @property
    def backend(self) -> str:
        """`nft` or `legacy`: the one this host uses (detected once)."""
        if self._backend is None:
            self._backend = self.detect_backend()
            log.info("iptables backend: %s", self._backend)
        return self._backend

    def detect_backend(self) -> str:
        """The backend holding more rules (legacy only if it already has tables); ties: nft."""
        if not _legacy_tables_present(self.netns):
            return "nft"
        legacy = nft = 0
        for fam in FAMILIES:
            legacy += _rule_count(self._exec([_tool("legacy", fam, "save")]))
            nft += _rule_count(self._exec([_tool("nft", fam, "save")]))
        return "legacy" if legacy > nft else "nft"

    def _save(self, family: int) -> str:
        return self._exec([_tool(self.backend, family, "save"), "-t", "filter"],
                          what=f"{_tool(self.backend, family, 'save')}")

    def _ipset_save(self) -> str:
        return self._exec(["ipset", "save"], what="ipset save")

    def _run_steps(self, steps: list[Step]) -> None:
        for i, step in enumerate(steps):
            if step.tool == "ipset":
                argv = ["ipset", "restore"]
            else:
                assert step.family is not None
                argv = [_tool(self.backend, step.family, "restore"), "--noflush", "--wait"]
            try:
                self._exec(argv, step.text, what=f"{argv[0]} (step {i + 1} of {len(steps)})")
            except DataplaneError as exc:
                done = (" ; the steps before it stay applied (each was valid on its own)"
                        if i else "; nothing was changed" if step.tool != "ipset" else "")
                raise DataplaneError(f"the ruleset update was refused{done}",
                                     command=exc.command, stderr=exc.stderr) from None

    @property
    def conntrack_limit(self) -> int:
        """The connections a source may hold in conntrack (0: no limit)."""
        return self.layout.conntrack_limit

    # ---- the Datapath protocol -----------------------------------------------------------

    def check(self) -> None:
        """Fail clearly unless the tools and the kernel have what the ruleset uses.

        A scratch chain exercises every match and target stockade renders
        (set, multiport, conntrack, tcp flags, comment, limit, NFLOG, mark, MARK,
        goto, and connlimit with a connection limit), with
        scratch sets of every type; both are removed at once. br_netfilter's
        bridge-nf-call sysctls are checked and set.
        """
        for tool in ("ipset", _tool(self.backend, 4, "restore"),
                     _tool(self.backend, 6, "restore")):
            if self.netns is None and shutil.which(tool) is None:
                raise DataplaneError(f"{tool} is not installed (Debian: apt-get install "
                                     "iptables ipset)")
        p = f"{self.layout.names.prefix}probe"
        sets = [f"{p}{kind}{fam}" for fam in FAMILIES for kind in ("a", "n", "p")]
        create = "".join(
            f"create {p}a{fam} hash:ip family {inet} -exist\n"
            f"create {p}n{fam} hash:net family {inet} -exist\n"
            f"create {p}p{fam} hash:ip,port family {inet} -exist\n"
            for fam, inet in ((4, "inet"), (6, "inet6")))
        try:
            self._exec(["ipset", "restore"], create, what="the ipset feature probe")
            for fam in FAMILIES:
                restore = [_tool(self.backend, fam, "restore"), "--noflush", "--wait"]
                rules = [f"-A {p} -p tcp -m set --match-set {p}a{fam} src -m multiport "
                         "--dports 80,90:99 -m comment --comment probe -j RETURN",
                         f"-A {p} -m set --match-set {p}n{fam} dst -j RETURN",
                         f"-A {p} -m set --match-set {p}p{fam} dst,dst -j RETURN",
                         f"-A {p} -p tcp -m conntrack --ctstate NEW -m tcp ! --tcp-flags "
                         "FIN,SYN,RST,ACK SYN -j DROP",
                         f"-A {p} -m limit --limit 50/sec --limit-burst 50 -j NFLOG "
                         "--nflog-prefix probe --nflog-group 1",
                         f"-A {p} -m mark --mark {ALLOW_MARK:#x}/{ALLOW_MARK:#x} -j RETURN",
                         f"-A {p} -j MARK --set-xmark {ALLOW_MARK:#x}/0x0",
                         f"-A {p}2 -g {p}"]
                if self.layout.conntrack_limit:
                    rules.insert(-1, f"-A {p} -m conntrack --ctstate NEW -m connlimit "
                                 "--connlimit-above 1 --connlimit-saddr -j DROP")
                try:
                    self._exec(restore, "\n".join(["*filter", f":{p} - [0:0]",
                                                    f":{p}2 - [0:0]", *rules, "COMMIT", ""]),
                               what="the iptables feature probe")
                finally:
                    chains, _ = parse_save(self._save(fam))
                    gone = [c for c in (f"{p}2", p) if c in chains]
                    if gone:
                        self._exec(restore, "\n".join(
                            ["*filter", *(f"-F {c}" for c in gone),
                             *(f"-X {c}" for c in gone), "COMMIT", ""]),
                            what="removing the iptables feature probe")
        except DataplaneError as exc:
            raise DataplaneError(
                "this kernel or these tools lack an iptables/ipset feature stockade needs "
                "(hash:ip, hash:net, hash:ip,port sets; set, multiport, conntrack, comment, "
                "limit, mark matches; NFLOG, MARK)",
                command=exc.command, stderr=exc.stderr) from None
        finally:
            present = self._ipset_names()
            script = "".join(f"destroy {s}\n" for s in sets if s in present)
            if script:
                self._exec(["ipset", "restore"], script, what="removing the probe sets")
        require_bridge_netfilter(self.netns, "iptables' FORWARD chain")

    def _ipset_names(self) -> set[str]:
        return set(self._exec(["ipset", "list", "-n"], what="ipset list").split())

    def read_state(self, expected: Mapping[str, Chain] | None = None) -> KernelState:
        """The kernel read back, against what we render; chains known among `expected`."""
        if expected is None:
            expected = self._applied.chains if self._applied is not None else {}
        with self._lock:
            saves = {fam: self._save(fam) for fam in FAMILIES}
            ipsets = self._ipset_save()
            listed = self._nft(["-j", "list", "table", guard.FAMILY, self.guard_table],
                               missing_ok=True)
        state = parse_kernel(self.layout, saves, ipsets, expected)
        kg = guard.parse_guard(json.loads(listed), self.guard_table) if listed else None
        state.ruleset = replace(state.ruleset, guards=kg.guards if kg is not None else {})
        state.guard_missing = kg is None
        state.guard_ok = kg is None or kg.intact
        state.drift += kg.drift if kg is not None else []
        return state

    @property
    def guard_table(self) -> str:
        """The port guard's nftables table: the datapath's name."""
        return self.layout.names.prefix[:-1]

    def _nft(self, args: list[str], stdin: str = "", *, missing_ok: bool = False) -> str:
        """`nft` (the guard's table); `missing_ok`: "" when the table is not there."""
        try:
            return self._exec(["nft", *args], stdin, what=f"nft {' '.join(args[:3])}")
        except DataplaneError as exc:
            if missing_ok and "No such file" in exc.stderr:
                return ""
            raise

    def read(self) -> Ruleset:
        return self.read_state().ruleset

    def snapshot(self, known: Mapping[str, Chain] | None = None) -> KernelSnapshot:
        generation, applied = self._generation, self._applied
        # What was applied first: a chain may keep its name with other rules (a tier's
        # is named by its subjects), and the kernel should hold the applied ones.
        chains = {**(known or {}), **(applied.chains if applied is not None else {})}
        return KernelSnapshot(generation, self.read_state(chains))

    def diff(self, desired: Ruleset) -> Plan:
        known = dict(self._applied.chains) if self._applied is not None else {}
        state = self.read_state({**desired.chains, **known})
        return plan(state.ruleset, canonical(desired))

    def diff_details(self, desired: Ruleset) -> list[str]:
        """What a plan does not show: the skeleton, foreign objects, dispatch (for `diff`)."""
        known = dict(self._applied.chains) if self._applied is not None else {}
        state = self.read_state({**desired.chains, **known})
        if not state.present:
            return [f"+ chains and sets {self.layout.names.prefix}* (nothing in the kernel)"]
        out = [f"~ {d}" for d in state.drift if not d.startswith("chain ")]
        if any(state.repair.skeleton.values()) and not out:
            out.append("~ base chain, dispatch chains or jump to rewrite")
        return out

    def apply(self, desired: Ruleset, *, verify: bool | KernelSnapshot = False) -> Plan:
        """Make the kernel enforce `desired`; return the delta (see the module).

        The delta is taken against the previous apply, or against the kernel as
        read back when `verify` is set or nothing was applied by this object yet
        (a restart adopts what it finds). Drift is whatever the read-back shows
        that the previous apply did not leave: reported and repaired.
        """
        target = canonical(desired)
        self.last_drift = None
        self.last_drift_details = []
        snap = verify if isinstance(verify, KernelSnapshot) else None
        if snap is not None and snap.generation != self._generation:
            snap = None  # an apply came in between: read again
        if snap is None and (verify or self._applied is None):
            snap = self.snapshot(desired.chains)
        state: KernelState | None = None
        rewrite_guard = False
        if snap is not None:
            state = snap.table
            assert isinstance(state, KernelState)
            old = state.ruleset
            # A guard table not as made is made anew, whole (see compile.guard); a missing
            # one when a port is to be guarded.
            rewrite_guard = not state.guard_ok or (state.guard_missing and bool(target.guards))
            self._guard_there = not state.guard_missing
            delta = plan(replace(old, guards=target.guards) if rewrite_guard else old, target)
            repair = state.needs_repair
            if self._applied is not None:
                drift = plan(old, self._applied)
                if repair or not drift.empty:
                    self.last_drift = drift
                    self.last_drift_details = state.drift or drift.describe()
        else:
            assert self._applied is not None
            old = self._applied
            # the first guard since none: the table may not be there yet
            rewrite_guard = bool(target.guards) and not old.guards and not self._guard_there
            delta = plan(replace(old, guards=target.guards) if rewrite_guard else old, target)
            repair = False
        # what is returned: with the guards a rewrite puts in, if one does
        shown = with_guards(delta, old.guards, target) if rewrite_guard else delta
        if delta.empty and not repair and not rewrite_guard:
            self._applied = target
            return delta
        steps = render_plan(self.layout, delta, old,
                            repair=state.repair if state is not None else None)
        guarding = (guard.skeleton_text(self.guard_table, target.guards) if rewrite_guard
                    else guard.element_text(self.guard_table, delta.set_guards,
                                            delta.old_guards))
        try:
            with self._lock:
                if guarding:  # first: a new pod's port is bound before its policy is in
                    self._nft(["-f", "-"], guarding)
                    self._guard_there = self._guard_there or rewrite_guard
                self._run_steps(steps)
        except DataplaneError:
            self._applied = None  # read the kernel back before the next write
            self._generation += 1
            raise
        self._applied = target
        self._generation += 1
        return shown

    def show(self) -> str:
        """Our chains, the jump and our sets, as iptables-save and ipset save print them."""
        out: list[str] = []
        prefix = self.layout.names.prefix
        with self._lock:
            for fam in FAMILIES:
                chains, rules = parse_save(self._save(fam))
                tool = "iptables" if fam == 4 else "ip6tables"
                mine = [c for c in chains if c.startswith(prefix)]
                jumps = [b for b in rules.get(FORWARD, []) if f"-j {prefix}forward" in b]
                if not mine and not jumps:
                    continue
                out.append(f"# {tool} ({self.backend}), table filter")
                out += [f"-A {FORWARD} {b}" for b in jumps]
                for c in mine:
                    out.append(f":{c}")
                    out += [f"-A {c} {b}" for b in rules.get(c, [])]
            defs, members = parse_ipset(self._ipset_save())
            guarded = self._nft(["list", "table", guard.FAMILY, self.guard_table],
                                missing_ok=True)
        sets = [n for n in defs if n.startswith(prefix)]
        if sets:
            out.append("# ipset")
        for n in sets:
            out.append(f"create {n} {' '.join(defs[n])}")
            out += [f"add {n} {e}" for e in members.get(n, [])]
        if guarded:
            out += ["# nft (the port guard)", *guarded.splitlines()]
        return "\n".join(out) + ("\n" if out else "")

    def remove(self) -> None:
        """Delete the jump, our chains, then our sets; nothing else is touched."""
        self._applied = None
        self._guard_there = False
        self._generation += 1
        with self._lock:
            saves = {fam: self._save(fam) for fam in FAMILIES}
            steps = render_remove(self.layout, saves, self._ipset_save())
            self._run_steps(steps)
            self._nft(["delete", "table", guard.FAMILY, self.guard_table], missing_ok=True)

    def close(self) -> None:
        """Nothing to let go of: every call is its own process."""

    def skeleton_intact(self) -> bool:
        """Whether the base and dispatch chains and the one jump are there, nothing foreign."""
        return not self.read_state().needs_repair


__all__ = ["BACKENDS", "OWNER_STATUS", "IptablesDatapath"]
