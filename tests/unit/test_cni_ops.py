"""The agent's CNI operations against a real store and compiler, with a kernel in memory."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from stockade.agent import cni_ops
from stockade.agent.cni_ops import CniOps, footprint
from stockade.agent.protocol import ApiError
from stockade.agent.reconcile import Reconciler
from stockade.agent.records import OWNER_RUN, EndpointRecord, PutEndpoint
from stockade.agent.service import Service
from stockade.agent.store import Store
from stockade.compile.incremental import IncrementalCompiler
from stockade.compile.ir import ADDR, AddressSet, Chain, Ruleset
from stockade.compile.nft import canonical
from stockade.compile.plan import Plan, plan
from stockade.datapath.base import KernelSnapshot
from stockade.errors import NetError
from stockade.etcd.ipam import BlockIpam
from stockade.model.cluster import Endpoint
from stockade.model.labels import Labels
from stockade.net.ipam import Ipam


class MemoryDatapath:
    """A kernel that holds whatever was applied last (and can be tampered with)."""

    name = "memory"

    def __init__(self) -> None:
        self.kernel = Ruleset()
        self.last_drift: Plan | None = None

    def read(self) -> Ruleset:
        return self.kernel

    def snapshot(self, known: Mapping[str, Chain] | None = None) -> KernelSnapshot:
        return KernelSnapshot(0, self.kernel)

    def apply(self, desired: Ruleset, *, verify: bool | KernelSnapshot = False) -> Plan:
        delta = plan(self.kernel, canonical(desired))
        self.kernel = canonical(desired)
        return delta

    def check(self) -> None:
        pass

    def diff(self, desired: Ruleset) -> Plan:
        return plan(self.kernel, canonical(desired))

    def show(self) -> str:
        return repr(self.kernel)

    def remove(self) -> None:
        self.kernel = Ruleset()


class Node:
    """Store, service, reconciler (applying synchronously) and the extension."""

    def __init__(self, state_dir: Path) -> None:
        self.store = Store(state_dir)
        state, revision = self.store.load()
        meta = self.store.get_meta("ipam")
        self.datapath = MemoryDatapath()
        self.reconciler = Reconciler(IncrementalCompiler.of(state.cluster()), self.datapath,
                                     revision)
        self.reconciler.attach(lambda: self.reconciler.run(False))
        self.reconciler.run(True)
        ipam = Ipam.from_dict(meta) if meta else Ipam("10.9.0.0/24")
        self.service = Service(self.store, state, self.reconciler, ipam=ipam)
        self.ops = CniOps()
        self.service.register(self.ops)
        self.ops.start(SimpleNamespace(service=self.service, store=self.store,
                                       reconciler=self.reconciler))

    def call(self, op: str, **args: Any) -> Any:
        return self.service.handle(op, args)

    def add(self, cid: str, name: str = "", network: str = "net", **kw: Any) -> Any:
        endpoint = {"namespace": kw.pop("namespace", "x"), "name": name or cid,
                    "netns": f"/run/netns/{cid}", "hostInterface": f"v{cid}"}
        endpoint.update(kw.pop("endpoint", {}))
        return self.call("cni.add", network=network, containerID=cid, ifname="eth0",
                         endpoint=endpoint, allocate=kw.pop("allocate", True), **kw)

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    yield n
    n.close()


POLICY = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
          "metadata": {"name": "web", "namespace": "x"},
          "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "c"}}}]}]}}


def test_add_allocates_registers_and_persists_in_one_transaction(node: Node,
                                                                  tmp_path: Path) -> None:
    out = node.add("c1", labels={"app": "web"})
    assert out["address"] == "10.9.0.2/24" and out["gateway"] == "10.9.0.1"
    rec = node.service.state.endpoints["x/c1"]
    assert rec.owner == "cni" and rec.container_id == "c1" and rec.endpoint.ips == ("10.9.0.2",)
    assert node.reconciler.applied_revision == out["revision"]
    again = node.add("c1", labels={"app": "web"})
    assert again["address"] == out["address"] and len(node.service.ipam or []) == 1
    node.close()
    reopened = Node(tmp_path)
    assert set(reopened.ops.attachments) == {"net/c1/eth0"}
    assert reopened.service.ipam is not None
    assert reopened.service.ipam.address_of("c1/eth0") == "10.9.0.2/24"
    reopened.close()


def test_an_add_waits_on_no_fsync_and_a_del_does(node: Node, tmp_path: Path) -> None:
    """An attachment does not outlive the machine (its namespace and veth go with it): its
    ADD is committed to the log in the page cache, which a killed agent leaves, without
    waiting for the disk. A DEL gives an address back and waits for it to be on disk."""
    synced: list[str] = []
    real = node.store._fsync

    def fsync() -> None:
        synced.append("sync")
        real()

    node.store._fsync = fsync  # type: ignore[method-assign]
    out = node.add("c1", labels={"app": "web"})
    assert synced == []
    node.call("cni.del", network="net", containerID="c1", ifname="eth0")
    assert synced == ["sync"]
    node.add("c2", labels={})
    assert synced == ["sync"]
    node.close()  # reopened: the ADD's commit is read back like any other
    reopened = Node(tmp_path)
    assert set(reopened.ops.attachments) == {"net/c2/eth0"}
    assert reopened.service.ipam is not None
    assert reopened.service.ipam.address_of("c2/eth0") == out["address"]
    reopened.close()


def test_adds_finding_the_blocks_full_claim_one_block_with_the_lock_let_go(
        node: Node) -> None:
    """etcd's block pool: ADDs that find this host's blocks full wait for one claim,
    made without the service's lock (which reads and other commits need meanwhile),
    then each gets an address of the new block."""
    claims: list[str] = []
    answer = threading.Event()

    def claim() -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        claims.append(threading.current_thread().name)
        answer.wait(10)  # etcd slow to answer
        return ipaddress.ip_network(f"10.9.0.{64 * len(claims)}/26")

    node.service.ipam = BlockIpam("10.9.0.0/24", blocks=["10.9.0.0/30"], claim=claim)
    assert [node.add(c)["address"] for c in "ab"] == ["10.9.0.2/24", "10.9.0.3/24"]
    got: dict[str, str] = {}
    adds = [threading.Thread(target=lambda c=c: got.update({c: node.add(c)["address"]}),
                             name=c) for c in "cdefghij"]
    for t in adds:
        t.start()
    deadline = time.monotonic() + 10
    while not claims and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(claims) == 1
    # The lock is free while the claim waits: reads and another caller's DEL go through.
    assert node.service.lock.acquire(timeout=2)
    node.service.lock.release()
    assert len(node.call("get", kind="endpoints")["items"]) == 2
    node.call("cni.del", network="net", containerID="a", ifname="eth0")
    answer.set()
    for t in adds:
        t.join(10)
    assert claims == claims[:1] and len(got) == 8
    addresses = sorted(got.values(), key=lambda a: ipaddress.ip_interface(a).ip)
    # The DEL's address first, then the new block's; no block claimed twice.
    assert addresses[0] == "10.9.0.2/24"
    assert addresses[1:] == [f"10.9.0.{64 + i}/24" for i in range(7)]
    assert [str(b) for b in node.service.ipam.blocks] == ["10.9.0.0/30", "10.9.0.64/26"]


def test_adds_waiting_for_a_claim_that_fails_share_its_error(node: Node) -> None:
    """etcd away: the ADDs that waited for one claim fail with its error, without asking
    etcd again each in turn (each up to its timeout); a later ADD tries again."""
    claims: list[str] = []
    answer = threading.Event()

    def claim() -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        claims.append(threading.current_thread().name)
        answer.wait(10)
        if len(claims) == 1:
            raise NetError("cannot claim an address block in etcd: no answer in 5s")
        return ipaddress.ip_network("10.9.0.64/26")

    node.service.ipam = BlockIpam("10.9.0.0/24", blocks=["10.9.0.0/31"], claim=claim)
    errors: dict[str, str] = {}

    def add(c: str) -> None:
        try:
            node.add(c)
        except ApiError as exc:
            errors[c] = f"{exc.code}: {exc.message}"

    adds = [threading.Thread(target=add, args=(c,), name=c) for c in "abcd"]
    for t in adds:
        t.start()
    deadline = time.monotonic() + 10
    while not claims and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the others queue for the claim
    answer.set()
    for t in adds:
        t.join(10)
    assert len(claims) == 1, claims
    assert sorted(errors) == list("abcd")
    assert set(errors.values()) == {
        "unavailable: cannot claim an address block in etcd: no answer in 5s"}
    assert node.add("e")["address"] == "10.9.0.64/24" and len(claims) == 2


def test_the_ipam_operation_claims_a_block_the_same_way(node: Node) -> None:
    """`ipam.allocate` (what `stockade run` uses) claims with the lock let go too."""
    free: list[bool] = []

    def take() -> None:  # another thread: this one would take its own RLock again
        free.append(node.service.lock.acquire(timeout=2))
        if free[-1]:
            node.service.lock.release()

    def claim() -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        other = threading.Thread(target=take)
        other.start()
        other.join()
        return ipaddress.ip_network("10.9.0.64/26")

    node.service.ipam = BlockIpam("10.9.0.0/24", blocks=["10.9.0.0/31"], claim=claim)
    assert node.call("ipam.allocate", owner="run:x/a")["address"] == "10.9.0.64/24"
    assert free == [True]
    assert node.store.get_meta("ipam")["blocks"] == ["10.9.0.0/31", "10.9.0.64/26"]


def test_add_says_whether_the_plugin_must_report_the_interface(node: Node) -> None:
    """A datapath binding by name (nft, iptables) needs no `cni.attached`; one binding the
    interface itself (eBPF) does, and is applied once more when it comes."""
    assert node.add("c1")["bindsInterfaces"] is False
    assert node.call("cni.attached", network="net", containerID="c1",
                     ifname="eth0") == {"applied": False}
    node.datapath.binds_interfaces = True  # type: ignore[attr-defined]
    assert node.add("c2")["bindsInterfaces"] is True
    assert node.call("cni.attached", network="net", containerID="c2",
                     ifname="eth0") == {"applied": True}


def test_labels_are_inherited_from_the_record_of_that_name(node: Node) -> None:
    node.call("apply", documents=[{"apiVersion": "v1", "kind": "Pod",
                                   "metadata": {"name": "web", "namespace": "x",
                                                "labels": {"app": "web"}},
                                   "spec": {"containers": [{"ports": [
                                       {"containerPort": 8080, "name": "http"}]}]},
                                   "status": {"podIP": "10.99.0.1"}}], sync=False)
    out = node.add("c1", name="web")
    assert out["inherited"] and out["labels"] == {"app": "web"}
    rec = node.service.state.endpoints["x/web"]
    assert rec.owner == "cni" and rec.endpoint.ips == ("10.9.0.2",)
    assert rec.endpoint.resolve_port("http", "TCP") == 8080
    explicit = node.add("c2", name="web", labels={"app": "other"})
    assert not explicit["inherited"] and explicit["labels"] == {"app": "other"}


def test_invalid_endpoint_holds_no_address(node: Node) -> None:
    with pytest.raises(ApiError) as err:
        node.add("c1", labels={"bad key!": "v"})
    assert err.value.code == "invalid"
    assert node.service.ipam is not None and len(node.service.ipam) == 0
    assert node.ops.attachments == {}
    with pytest.raises(ApiError):
        node.add("c2", namespace="Not_A_Label")
    assert len(node.service.ipam) == 0


def test_two_endpoints_cannot_be_bound_to_one_port(node: Node) -> None:
    """Bound to both, the port would let each send as the other (and eBPF, one address of a
    family per port, could not program it): the second is refused, holding nothing."""
    node.add("c1", endpoint={"hostInterface": "vshared"})
    with pytest.raises(ApiError) as err:
        node.add("c2", endpoint={"hostInterface": "vshared"})
    assert err.value.code == "invalid"
    assert err.value.lines == ["port vshared is held by two endpoints: endpoint x/c1 and "
                               "endpoint x/c2"]
    assert set(node.service.state.endpoints) == {"x/c1"}
    assert node.service.ipam is not None and len(node.service.ipam) == 1
    node.call("cni.del", network="net", containerID="c1", ifname="eth0")
    node.add("c2", endpoint={"hostInterface": "vshared"})  # free once its holder is gone


def test_two_endpoints_cannot_have_one_mac(node: Node) -> None:
    """The port guard holds a frame to a pod's MAC to that pod's addresses: two pods
    with one MAC could not be told apart, so the second is refused, holding nothing."""
    node.add("c1", endpoint={"hostInterface": "va", "mac": "02:00:00:00:00:0a"})
    with pytest.raises(ApiError) as err:
        node.add("c2", endpoint={"hostInterface": "vb", "mac": "02:00:00:00:00:0a"})
    assert err.value.lines == ["mac 02:00:00:00:00:0a is held by two endpoints: endpoint "
                               "x/c1 and endpoint x/c2"]
    assert set(node.service.state.endpoints) == {"x/c1"}
    assert node.service.ipam is not None and len(node.service.ipam) == 1


def test_a_run_container_of_that_name_is_not_taken_over(node: Node) -> None:
    rec = EndpointRecord(Endpoint("x", "job", Labels({}), ("10.9.0.50",)), owner=OWNER_RUN)
    node.service.commit([PutEndpoint(rec)])
    with pytest.raises(ApiError, match="stockade run"):
        node.add("c1", name="job")


def test_del_removes_only_its_own_endpoint_and_releases(node: Node) -> None:
    node.add("old", name="web", labels={})
    node.add("new", name="web", labels={})  # the pod's sandbox was recreated
    out = node.call("cni.del", network="net", containerID="old", ifname="eth0")
    assert out == {"removed": False, "released": "10.9.0.2/24", "revision": out["revision"]}
    assert node.service.state.endpoints["x/web"].container_id == "new"
    out = node.call("cni.del", network="net", containerID="new", ifname="eth0")
    assert out["removed"] and out["released"] == "10.9.0.3/24"
    assert "x/web" not in node.service.state.endpoints
    again = node.call("cni.del", network="net", containerID="new", ifname="eth0")
    assert again["removed"] is False and again["released"] is None
    assert node.service.ipam is not None and len(node.service.ipam) == 0


def test_del_of_an_attachment_the_table_does_not_know(node: Node) -> None:
    node.service.ipam.allocate("c9/eth0")  # type: ignore[union-attr]
    rec = EndpointRecord(Endpoint("x", "c9", Labels({}), ("10.9.0.2",)), interface="eth0",
                         owner="cni", container_id="c9")
    node.service.commit([PutEndpoint(rec)])
    out = node.call("cni.del", network="net", containerID="c9", ifname="eth0")
    assert out["removed"] and out["released"] == "10.9.0.2/24"


def test_gc_keeps_valid_attachments_and_other_networks(node: Node) -> None:
    for cid in ("a", "b", "c"):
        node.add(cid)
    node.add("d", network="other")
    out = node.call("cni.gc", network="net", valid=[{"containerID": "a", "ifname": "eth0"},
                                                    {"containerID": "c"}])
    assert out["removed"] == ["net/b/eth0"] and out["released"] == ["10.9.0.3/24"]
    assert set(node.service.state.endpoints) == {"x/a", "x/c", "x/d"}
    assert "va" in out["hostInterfaces"] and "vb" not in out["hostInterfaces"]
    assert node.call("cni.gc", network="net", valid=[])["removed"] == ["net/a/eth0",
                                                                      "net/c/eth0"]
    assert set(node.ops.attachments) == {"other/d/eth0"}


def test_check_compares_the_kernel_with_the_last_apply(node: Node,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cni_ops, "CONVERGE", 0.1)
    node.call("apply", documents=[POLICY], sync=False)
    node.add("web", labels={"app": "web"})
    ok = node.call("cni.check", network="net", containerID="web", ifname="eth0",
                   ips=["10.9.0.2"])
    assert ok["known"] and ok["applied"] and ok["inKernel"] and ok["problems"] == []
    wrong_ip = node.call("cni.check", network="net", containerID="web", ifname="eth0",
                         ips=["10.9.0.77"])
    assert wrong_ip["problems"]
    k = node.datapath.kernel
    node.datapath.kernel = Ruleset(k.sets, k.chains, {}, k.egress)  # someone flushed the map
    bad = node.call("cni.check", network="net", containerID="web", ifname="eth0")
    assert not bad["inKernel"] and "kernel differs" in bad["problems"][0]
    unknown = node.call("cni.check", network="net", containerID="nope", ifname="eth0")
    assert not unknown["known"] and unknown["problems"]


def test_status(node: Node) -> None:
    node.add("a")
    assert node.call("cni.status") == {"ready": True, "inSync": True, "error": "",
                                       "attachments": 1}
    assert node.call("status")["cni"] == {"attachments": 1}


def test_bad_requests(node: Node) -> None:
    for args in ({}, {"network": "n", "containerID": "", "ifname": "eth0"}):
        with pytest.raises(ApiError) as err:
            node.call("cni.del", **args)
        assert err.value.code == "bad_request"
    with pytest.raises(ApiError):
        node.call("cni.add", network="n", containerID="c", ifname="eth0", endpoint=[])
    with pytest.raises(ApiError):
        node.call("cni.gc", network="n")


def test_footprint_names_map_entries_chains_and_set_members() -> None:
    rs = Ruleset({"s1": AddressSet("s1", 4, ADDR, frozenset({"10.0.0.2", "10.0.0.3"})),
                  "s2": AddressSet("s2", 4, ADDR, frozenset({"10.0.0.3"}))},
                 {"c1": Chain("c1", "ingress", ())}, {"10.0.0.2": "c1"}, {"10.0.0.2": "c9"})
    assert footprint(rs, ["10.0.0.2"]) == {
        "ingress": {"10.0.0.2": "c1"}, "egress": {"10.0.0.2": "c9"},
        "chains": {"c1": True, "c9": False}, "sets": {"s1": ["10.0.0.2"]}}
    assert footprint(rs, ["10.0.0.99"]) == {"ingress": {}, "egress": {}, "chains": {},
                                            "sets": {}}
