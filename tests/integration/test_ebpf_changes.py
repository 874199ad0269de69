"""The eBPF datapath follows changes worked out from the change, with real packets.

A run of changes as the agent makes them (the incremental compiler's rulesets): a pod
relabelled into a policy's peers, a new pod, a policy edited, a pod gone; then an
ipBlock that comes, changes and goes. Each apply
must take the short way (`compile/bpf_change.py`: the state records the state it was
made from), the packets must follow the change, and a verifying apply right after
(the kernel read back, the map contents compiled whole) must find nothing to write:
the kernel holds exactly what a whole compile gives.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from dataclasses import replace

import pytest

from stockade.compile.incremental import IncrementalCompiler
from stockade.compile.ir import Ruleset
from stockade.datapath.ebpf import EbpfDatapath
from stockade.model.cluster import Cluster, ContainerPort, Endpoint, Namespace
from stockade.model.labels import Labels
from stockade.model.policy import INGRESS, IPBlock, NetworkPolicy, Peer, PolicyPort
from stockade.model.policy import Rule as PRule
from stockade.model.selector import Selector
from stockade.net.namespace import entered

from .ebpf_pins import ebpf_datapath
from .netio import EchoServer, connect, echo

pytestmark = pytest.mark.privileged

PORT = 7777


def _ep(trio, name: str, role: str) -> Endpoint:
    att = getattr(trio, name)
    return Endpoint("x", name, Labels({"role": role}), (att.address4, att.address6),
                    (ContainerPort(PORT, "TCP", "echo"),))


def _server_from(*roles: str) -> NetworkPolicy:
    return NetworkPolicy(
        "x", "server", Selector(Labels({"role": "server"})),
        ingress=tuple(PRule((PolicyPort("TCP", "echo"),),
                            (Peer(pod_selector=Selector(Labels({"role": r}))),))
                      for r in roles),
        policy_types=(INGRESS,))


def _reaches(netns: str, address: str) -> bool:
    with entered(netns):
        conn = socket.socket()
    conn.settimeout(0.5)
    try:
        conn.connect((address, PORT))
        return True
    except OSError:
        return False
    finally:
        conn.close()


@pytest.fixture
def datapath(trio) -> Iterator[EbpfDatapath]:
    with ebpf_datapath(trio) as dp:
        yield dp


def _apply_change(dp: EbpfDatapath, rs: Ruleset, *, in_place: bool | None = None) -> None:
    """`in_place`: whether the change must be written into the active slot as it stands
    (an endpoint's) rather than switched to (a policy's); None: either."""
    slot, before = dp._slot, dp.in_place
    dp.apply(rs)
    assert dp._state is not None and dp._state.index is not None
    assert dp._state.index.base is not None, "compiled whole, not worked out"
    if in_place is not None:
        assert (dp.in_place - before, dp._slot == slot) == (int(in_place), in_place)
    dp.apply(rs, verify=True)
    assert dp.last_drift is None, dp.last_drift_details
    assert dp.last_timing["entries"] == 0, "the kernel held other contents than a whole compile"


def test_changes_worked_out_are_enforced_and_equal_a_whole_compile(trio, datapath) -> None:
    ns = Namespace("x", Labels({"kubernetes.io/metadata.name": "x"}))
    a, b, c = _ep(trio, "a", "server"), _ep(trio, "b", "client"), _ep(trio, "c", "other")
    inc = IncrementalCompiler.of(Cluster((ns,), (a, b), (_server_from("client"),)))
    datapath.apply(inc.ruleset())
    server = trio.a.address4
    with EchoServer(trio.a.netns, PORT):
        assert _reaches(trio.b.netns, server)
        assert not _reaches(trio.c.netns, server)  # c: in no set, in no map

        inc.upsert_endpoint(c)  # a new pod, in no set and no map: nothing to write
        _apply_change(datapath, inc.ruleset())
        assert not _reaches(trio.c.netns, server)

        inc.upsert_endpoint(replace(c, labels=Labels({"role": "client"})))  # known identity
        _apply_change(datapath, inc.ruleset(), in_place=True)
        assert _reaches(trio.c.netns, server)

        inc.upsert_policy(_server_from("admin"))  # edited: new chains, old ones gone
        _apply_change(datapath, inc.ruleset(), in_place=False)
        assert not _reaches(trio.b.netns, server)
        assert not _reaches(trio.c.netns, server)

        inc.upsert_endpoint(replace(b, labels=Labels({"role": "admin"})))
        _apply_change(datapath, inc.ruleset(), in_place=True)
        assert _reaches(trio.b.netns, server)
        assert not _reaches(trio.c.netns, server)

        inc.delete_endpoint(b.key)  # gone: its identity and entries with it
        _apply_change(datapath, inc.ruleset(), in_place=True)
        assert not _reaches(trio.b.netns, server)
        assert datapath._state is not None
        assert (4, f"{trio.b.address4}/32") not in datapath._state.ipcache


def test_a_change_written_in_place_cuts_the_connections_it_revokes(trio, datapath) -> None:
    """The generation is bumped after the entries: a connection the relabelled pod may no
    longer make is judged again at its next packet, and cut."""
    ns = Namespace("x", Labels({"kubernetes.io/metadata.name": "x"}))
    a, b = _ep(trio, "a", "server"), _ep(trio, "b", "client")
    inc = IncrementalCompiler.of(Cluster((ns,), (a, b), (_server_from("client"),)))
    datapath.apply(inc.ruleset())
    with EchoServer(trio.a.netns, PORT):
        conn = connect(trio.b.netns, trio.a.address4, PORT)
        try:
            assert echo(conn, b"one")
            inc.upsert_endpoint(replace(b, labels=Labels({"role": "client", "v": "2"})))
            _apply_change(datapath, inc.ruleset())  # the same sets: nothing to write
            assert echo(conn, b"two")
            inc.upsert_endpoint(replace(b, labels=Labels({"role": "other"})))
            _apply_change(datapath, inc.ruleset(), in_place=True)
            assert not echo(conn, b"three")
            assert not _reaches(trio.b.netns, trio.a.address4)
        finally:
            conn.close()


def test_a_change_in_place_cut_short_leaves_the_old_judgement_and_is_repaired(
        trio, datapath, monkeypatch) -> None:
    """The write of the ipcache entry (the switch) fails after the policy entries went
    in: nothing any packet looks up changed, so the old judgement stands; the next
    apply reads the kernel back and finishes the change."""
    from stockade.compile import bpf as bpfc
    from stockade.datapath import ebpf as ebpf_mod
    from stockade.errors import DataplaneError

    ns = Namespace("x", Labels({"kubernetes.io/metadata.name": "x"}))
    a, b, c = _ep(trio, "a", "server"), _ep(trio, "b", "client"), _ep(trio, "c", "other")
    inc = IncrementalCompiler.of(Cluster((ns,), (a, b, c), (_server_from("client"),)))
    datapath.apply(inc.ruleset())
    switches: list[bpfc.MapDelta] = []
    steps = bpfc.in_place_steps
    monkeypatch.setattr(ebpf_mod.bpfc, "in_place_steps",
                        lambda d: (r := steps(d), switches.append(r[1]))[0])
    write = EbpfDatapath._write

    def failing(self, delta, **kw):  # type: ignore[no-untyped-def]
        if switches and delta is switches[-1]:
            raise DataplaneError("injected: the ipcache update failed")
        return write(self, delta, **kw)

    monkeypatch.setattr(EbpfDatapath, "_write", failing)
    inc.upsert_endpoint(replace(c, labels=Labels({"role": "client", "new": "yes"})))
    rs = inc.ruleset()
    with EchoServer(trio.a.netns, PORT):
        with pytest.raises(DataplaneError):
            datapath.apply(rs)
        assert switches and datapath._state is None
        assert not _reaches(trio.c.netns, trio.a.address4)  # the old judgement
        assert _reaches(trio.b.netns, trio.a.address4)
        monkeypatch.setattr(EbpfDatapath, "_write", write)
        datapath.apply(rs)  # the kernel read back: the rest written (a switch)
        assert _reaches(trio.c.netns, trio.a.address4)
        datapath.apply(rs, verify=True)
        assert datapath.last_timing["entries"] == 0


def _server_from_block(cidr: str, *except_: str) -> NetworkPolicy:
    return NetworkPolicy(
        "x", "server", Selector(Labels({"role": "server"})),
        ingress=(PRule((PolicyPort("TCP", "echo"),),
                       (Peer(ip_block=IPBlock(cidr, except_)),)),),
        policy_types=(INGRESS,))


def test_ipblock_changes_worked_out_move_the_pods_inside_them(trio, datapath) -> None:
    """An ipBlock that comes, changes and goes moves the pods inside its networks (they
    are in the ipcache already, with other identities) into and out of its set."""
    ns = Namespace("x", Labels({"kubernetes.io/metadata.name": "x"}))
    a, b, c = _ep(trio, "a", "server"), _ep(trio, "b", "client"), _ep(trio, "c", "other")
    inc = IncrementalCompiler.of(Cluster((ns,), (a, b, c), (_server_from("admin"),)))
    datapath.apply(inc.ruleset())
    server = trio.a.address4
    subnet = str(ipaddress.ip_network(f"{trio.b.address4}/24", strict=False))
    with EchoServer(trio.a.netns, PORT):
        assert not _reaches(trio.b.netns, server)
        assert not _reaches(trio.c.netns, server)

        inc.upsert_policy(_server_from_block(subnet, f"{trio.c.address4}/32"))
        _apply_change(datapath, inc.ruleset())
        assert _reaches(trio.b.netns, server)
        assert not _reaches(trio.c.netns, server)

        inc.upsert_policy(_server_from_block(f"{trio.c.address4}/32"))
        _apply_change(datapath, inc.ruleset())
        assert not _reaches(trio.b.netns, server)
        assert _reaches(trio.c.netns, server)

        inc.upsert_policy(_server_from("admin"))
        _apply_change(datapath, inc.ruleset())
        assert not _reaches(trio.b.netns, server)
        assert not _reaches(trio.c.netns, server)
        assert datapath._state is not None
        assert not [p for p in datapath._state.ipcache if not p[1].endswith(("/32", "/128"))]
