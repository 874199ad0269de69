"""The nftables datapath: libnftables in-process, one JSON transaction per apply.

The libnftables context keeps the netlink socket of the namespace it was created
in, so `--netns` costs one setns at start and none per change.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stockade.compile.ir import NET, Chain, Ruleset
from stockade.compile.nft import (
    FAMILY,
    FORWARD,
    MAPS,
    KernelTable,
    Table,
    canonical,
    parse_kernel,
    render_plan,
)
from stockade.compile.plan import Plan, plan
from stockade.dataplane.base import KernelSnapshot
from stockade.dataplane.nfnetlink import ElementChange, ElementWriter
from stockade.errors import DataplaneError
from stockade.net.namespace import entered

BRIDGE_SYSCTLS = ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables")


def _load_nftables() -> Any:
    try:
        import nftables
    except ImportError as exc:  # pragma: no cover - the package depends on it
        raise DataplaneError("the Python binding of libnftables (pip-nftables) is missing",
                             stderr=str(exc)) from None
    return nftables


class NftDatapath:
    """stockade's one `inet` table; nothing else in the ruleset is touched."""

    name = "nft"

    def __init__(self, table: Table | None = None, netns: str | None = None) -> None:
        self.table = table or Table()
        self.netns = netns
        self._lock = threading.Lock()
        nftables = _load_nftables()
        with entered(netns):
            try:
                self._nft = nftables.Nftables()
            except OSError as exc:
                raise DataplaneError("cannot load libnftables (install the Debian package "
                                     "libnftables1)", stderr=str(exc)) from None
            self._elements = ElementWriter(self.table.name)
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)
        self._nft.set_numeric_proto_output(False)
        self._nft.set_service_output(False)
        # What the last successful transaction left in the kernel; None until the
        # kernel has been read once (a restart adopts what it finds there).
        self._applied: Ruleset | None = None
        # What a verifying apply found changed behind our back (not pending changes).
        self.last_drift: Plan | None = None
        self._generation = 0  # successful transactions so far

    # ---- talking to the kernel --------------------------------------------------------

    def _run(self, cmds: list[dict[str, Any]], what: str) -> str:
        if not cmds:
            return ""
        with self._lock:
            rc, out, err = self._nft.json_cmd({"nftables": cmds})
        if rc != 0:
            raise DataplaneError(f"{what} was refused by the kernel; nothing was changed",
                                 command="nft -j -f -", stderr=str(err)[:2000])
        return str(out)

    def _text(self, command: str) -> tuple[int, str, str]:
        with self._lock:
            rc, out, err = self._nft.cmd(command)
        return int(rc), str(out), str(err)

    # ---- the Datapath protocol ---------------------------------------------------------

    def check(self) -> None:
        """Fail clearly unless the kernel has what the ruleset uses.

        A scratch table exercises everything: the inet forward hook, conntrack
        state, verdict maps, interval and concatenated sets. Bridged traffic
        reaches the inet forward hook only through br_netfilter with its
        bridge-nf-call sysctls set, so those are checked (and set) too.
        """
        probe = Table(f"{self.table.name}_probe_{os.getpid()}")
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
                                 "(inet forward hook, conntrack, verdict maps or "
                                 "concatenated sets)", stderr=exc.stderr) from None
        finally:
            self._text(f"delete table {FAMILY} {probe.name}")
        self._ensure_bridge_netfilter()

    def _ensure_bridge_netfilter(self) -> None:
        with entered(self.netns):
            base = Path("/proc/sys/net/bridge")
            if not base.is_dir():
                raise DataplaneError(
                    "br_netfilter is not available (no /proc/sys/net/bridge): bridged "
                    "container traffic would bypass the inet forward hook")
            for name in BRIDGE_SYSCTLS:
                path = base / name
                if path.read_text().strip() != "1":
                    path.write_text("1\n")

    def read_table(self, expected: Mapping[str, Chain] | None = None) -> KernelTable | None:
        """The table as the kernel holds it; chains are recognised among `expected`."""
        if expected is None:
            expected = self._applied.chains if self._applied is not None else {}
        rc, out, err = self._text(f"list table {FAMILY} {self.table.name}")
        if rc != 0:
            if "No such file" in err or "does not exist" in err:
                return None
            raise DataplaneError("cannot read the table", command="nft list table",
                                 stderr=err)
        return parse_kernel(json.loads(out), self.table, expected)

    def read(self) -> Ruleset:
        kt = self.read_table()
        return kt.ruleset if kt is not None else Ruleset()

    def _delta(self, desired: Ruleset) -> tuple[Plan, KernelTable | None]:
        known = dict(self._applied.chains) if self._applied is not None else {}
        kt = self.read_table({**known, **desired.chains})
        current = kt.ruleset if kt is not None else Ruleset()
        return plan(current, canonical(desired)), kt

    def snapshot(self, known: Mapping[str, Chain] | None = None) -> KernelSnapshot:
        """The kernel read back; chains are recognised among the last applied and `known`."""
        generation, applied = self._generation, self._applied
        chains = {**(applied.chains if applied is not None else {}), **(known or {})}
        return KernelSnapshot(generation, self.read_table(chains))

    def diff(self, desired: Ruleset) -> Plan:
        delta, _ = self._delta(desired)
        return delta

    def apply(self, desired: Ruleset, *, verify: bool | KernelSnapshot = False) -> Plan:
        """One transaction: the kernel holds either the old or the new ruleset.

        The delta is taken against what the previous apply left, without reading
        the kernel back; `verify` (and the first apply of this object) reads the
        kernel instead, which is how drift is found and repaired.
        """
        target = canonical(desired)
        self.last_drift = None
        snap = verify if isinstance(verify, KernelSnapshot) else None
        if snap is not None and snap.generation != self._generation:
            snap = None  # a transaction came in between: read again
        if snap is None and (verify or self._applied is None):
            snap = self.snapshot(desired.chains)
        if snap is not None:
            kt: KernelTable | None = snap.table
            current = kt.ruleset if kt is not None else Ruleset()
            delta = plan(current, target)
            repair = kt is None or not kt.skeleton_ok
            if self._applied is not None:
                # Drift is the kernel against what we last left there, not against
                # what we are about to apply.
                drift = plan(current, self._applied)
                if repair or not drift.empty:
                    self.last_drift = drift
        else:
            assert self._applied is not None
            delta, kt, repair = plan(self._applied, target), None, False
        if delta.empty and not repair:
            self._applied = target
            return delta
        if not repair and elements_only(delta):
            try:
                with self._lock:
                    self._elements.apply(element_changes(delta))
            except DataplaneError:
                self._applied = None
                raise
            self._applied = target
            self._generation += 1
            return delta
        cmds = render_plan(self.table, delta, skeleton=repair)
        if kt is not None and repair:
            # Re-creating the base chain's rules needs it empty first, in the same batch.
            cmds.insert(0, {"flush": {"chain": self.table.ref(name=FORWARD)}})
            cmds.insert(0, {"add": {"chain": self.table.ref(name=FORWARD)}})
        try:
            self._run(cmds, "the ruleset update")
        except DataplaneError:
            self._applied = None
            raise
        self._applied = target
        self._generation += 1
        return delta

    def skeleton_intact(self) -> bool:
        kt = self.read_table()
        return kt is not None and kt.skeleton_ok

    def show(self) -> str:
        with self._lock:
            self._nft.set_json_output(False)
            try:
                rc, out, _ = self._nft.cmd(f"list table {FAMILY} {self.table.name}")
            finally:
                self._nft.set_json_output(True)
        return str(out) if rc == 0 else ""

    def remove(self) -> None:
        self._applied = None
        self._generation += 1
        rc, _, err = self._text(f"delete table {FAMILY} {self.table.name}")
        if rc != 0 and "No such file" not in err:
            raise DataplaneError("cannot remove the table", command="nft delete table",
                                 stderr=err)


def elements_only(delta: Plan) -> bool:
    """Whether a plan only adds and removes elements that nfnetlink can write directly."""
    return not (delta.add_sets or delta.add_chains or delta.replace_chains or delta.del_chains
                or delta.del_sets or any(s.kind == NET for s, _ in delta.add_elements))


def element_changes(delta: Plan) -> list[ElementChange]:
    """A plan's element work, in the order one transaction needs it."""
    out = [ElementChange(s.name, sorted(els, key=str)) for s, els in delta.add_elements]
    by_map: dict[str, list[str]] = {}
    for direction, fam, addr in delta.del_map:
        by_map.setdefault(MAPS[(direction, fam)], []).append(addr)
    out += [ElementChange(name, addrs, delete=True) for name, addrs in sorted(by_map.items())]
    jumps: dict[str, list[tuple[str, str]]] = {}
    for (direction, fam, addr), chain in delta.set_map:
        jumps.setdefault(MAPS[(direction, fam)], []).append((addr, chain))
    out += [ElementChange(name, [a for a, _ in pairs], jumps=[c for _, c in pairs])
            for name, pairs in sorted(jumps.items())]
    out += [ElementChange(s.name, sorted(els, key=str), delete=True)
            for s, els in delta.del_elements if s.kind != NET]
    return out
