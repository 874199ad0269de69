"""The conformance cases on the real kernel: namespaces, nftables, real packets.

Each case's cluster is built for real inside a private "host" network namespace
(one namespace per pod on a bridge, with the case's IPs), its policies are
compiled and programmed through the chosen datapath (each pod bound to its
bridge port and MAC, as the agent binds them), and every pair of every
probe group is probed with real TCP, UDP and SCTP packets. Namespaces, the
bridge and probe servers are kept from case to case when they fit; the table
changes by deltas, as it does in production. `close()` removes everything.
"""

from __future__ import annotations

import ipaddress
import secrets
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import replace

from stockade.compile.lower import compile_cluster
from stockade.conformance.case import Case
from stockade.conformance.runner import Judgement
from stockade.datapath import open_datapath
from stockade.model.cluster import Cluster
from stockade.net.namespace import create_netns, remove_netns
from stockade.net.plumber import Attachment, EndpointSpec, Plumber
from stockade.probe.client import Probe, run_probes
from stockade.probe.launcher import ProbeServer
from stockade.probe.protocol import Port, Protocol


def on_link_prefix(addresses: Iterable[str]) -> dict[int, int]:
    """Per family, the prefix length of the smallest network holding every address.

    Giving each pod its address with that prefix puts all of them on one link,
    whatever subnets a case uses, so no router is needed on the bridge.
    """
    out: dict[int, int] = {}
    by_family: dict[int, list[int]] = {}
    for text in addresses:
        a = ipaddress.ip_address(text)
        by_family.setdefault(a.version, []).append(int(a))
    for fam, values in by_family.items():
        bits = 32 if fam == 4 else 128
        lo, hi = min(values), max(values)
        prefix = min(bits - (lo ^ hi).bit_length(), bits - 2)
        # No address may be its network's first (network) or last (broadcast) one.
        while prefix > 1:
            size = 1 << (bits - prefix)
            network = lo & ~(size - 1)
            if lo > network and hi < network + size - 1:
                break
            prefix -= 1
        out[fam] = prefix
    return out


class CasePods:
    """A case's pods for real, probed with real packets.

    Each endpoint is a network namespace on the plumber's bridge with the case's IPs;
    pods are kept from case to case while their addresses stay, and the probe servers
    while the ports do. What enforces the case's policies in between is the caller's:
    `KernelDatapath` programs a datapath itself, a test may have an agent do it.
    """

    def __init__(self, plumber: Plumber, timeout: float = 1.0) -> None:
        self.plumber = plumber
        self.timeout = timeout
        self.attached: dict[str, Attachment] = {}
        self.server: ProbeServer | None = None
        self.bindings: dict[str | None, tuple[Port, ...]] = {}

    def attach(self, case: Case) -> None:
        """Plumb the case's endpoints (and unplumb those of earlier cases it has not)."""
        prefixes = on_link_prefix(ip for ep in case.cluster.endpoints for ip in ep.ips)
        wanted = set()
        for ep in case.cluster.endpoints:
            v4 = [ip for ip in ep.ips if ipaddress.ip_address(ip).version == 4]
            v6 = [ip for ip in ep.ips if ipaddress.ip_address(ip).version == 6]
            if not v4:
                raise ValueError(f"{ep.key} has no IPv4 address; the prober needs one")
            spec = EndpointSpec(ep.key, f"{v4[0]}/{prefixes[4]}",
                                f"{v6[0]}/{prefixes[6]}" if v6 else None)
            have = self.attached.get(ep.key)
            if have is None or have.ipv4 != spec.ipv4 or have.ipv6 != spec.ipv6:
                self.attached[ep.key] = self.plumber.ensure_endpoint(spec)
            wanted.add(ep.key)
        for key in set(self.attached) - wanted:
            self.plumber.remove_endpoint(key)
            del self.attached[key]

    def bound(self, cluster: Cluster) -> Cluster:
        """The cluster with each attached pod bound to its bridge port and MAC, as the
        agent binds the pods it plumbs: their guards, and on eBPF direct delivery
        between them, are what the probes go through."""
        return replace(cluster, endpoints=tuple(
            replace(ep, port=att.host_ifname, mac=att.mac)
            if (att := self.attached.get(ep.key)) is not None else ep
            for ep in cluster.endpoints))

    def probe(self, case: Case) -> Judgement:
        """Every pair of every probe group of the (attached) case, probed over IPv4."""
        probes: list[Probe] = []
        keys: list[tuple[int, str, str]] = []
        for gi, group in enumerate(case.probes):
            for src, dst in group.judged(case):
                port = group.port
                if isinstance(port, str):
                    number = dst.resolve_port(port, group.protocol)
                    if number is None:
                        raise ValueError(f"{dst.key} serves no {group.protocol} port {port}")
                    port = number
                att = self.attached[src.key]
                probes.append(Probe(src.key, att.netns, dst.key,
                                    self.attached[dst.key].address4,
                                    Port(port, Protocol(group.protocol))))
                keys.append((gi, src.key, dst.key))
        self._serve([p.port for p in probes])
        verdicts = run_probes(probes, timeout=self.timeout)
        return {k: v.allowed for k, v in zip(keys, verdicts, strict=True)}

    def _serve(self, ports: Sequence[Port]) -> None:
        bindings: dict[str | None, tuple[Port, ...]] = {
            a.netns: tuple(sorted(set(ports))) for a in self.attached.values()}
        if self.server is not None and bindings == self.bindings:
            return
        if self.server is not None:
            self.server.stop()
        self.server = ProbeServer(bindings).start()
        self.bindings = bindings

    def close(self) -> None:
        """Stop the probe servers (the pods go with the plumber's teardown)."""
        if self.server is not None:
            self.server.stop()
            self.server = None


class KernelDatapath:
    """`--datapath nft|iptables|ebpf`: programs each case into the kernel and probes it."""

    def __init__(self, probe_timeout: float = 1.0, prefix: str | None = None,
                 datapath: str = "nft") -> None:
        self.name = datapath
        tag = prefix or f"sc{secrets.token_hex(2)}"
        self.host = f"{tag}-host"
        create_netns(self.host)
        try:
            self.plumber = Plumber(prefix=tag, host_netns=self.host)
            self.plumber.ensure_bridge(addresses=[])
            self.pods = CasePods(self.plumber, probe_timeout)
            self.datapath = open_datapath(datapath, netns=self.host)
            self.datapath.check()
        except BaseException:
            remove_netns(self.host)
            raise

    def _flush_conntrack(self) -> None:
        # Entries of the previous case's probes must not pass as "established".
        subprocess.run(["ip", "netns", "exec", self.host, "conntrack", "-F"],
                       capture_output=True, check=False)
        flush = getattr(self.datapath, "flush_connections", None)  # the eBPF datapath's own
        if flush is not None:
            flush()

    def judge(self, case: Case) -> Judgement:
        self.pods.attach(case)
        self.datapath.apply(compile_cluster(self.pods.bound(case.cluster)))
        self._flush_conntrack()
        return self.pods.probe(case)

    def close(self) -> None:
        """Remove every namespace, link and table this run created."""
        try:
            self.pods.close()
            if self.name != "nft":  # nft's table goes with the namespace; pins do not
                self.datapath.remove()
        finally:
            try:
                self.plumber.teardown()
            finally:
                remove_netns(self.host)
