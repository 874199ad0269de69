"""The CNI plugin end to end: real namespaces, a real agent, real packets.

Main mode on its own, main mode delegating to ``host-local``, and chained
after the Debian reference ``bridge`` + ``host-local`` — each driven as a
runtime drives it (:mod:`.test_cni_harness`), each showing that the policy
holds the moment ADD returns.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from stockade.compile.guard import link_local
from stockade.net.sysctl import write_sysctl
from stockade.probe.client import Probe, run_probes
from stockade.probe.launcher import ProbeServer
from stockade.probe.protocol import Port, Protocol

from .test_cni_harness import REFERENCE, THIN, Runtime, World, world  # noqa: F401

pytestmark = pytest.mark.privileged

TCP80 = Port(80, Protocol.TCP)
WEB_POLICY = {
    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
    "metadata": {"name": "web", "namespace": "x"},
    "spec": {"podSelector": {"matchLabels": {"app": "web"}},
             "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                          "ports": [{"port": 80}]}]},
}
LABELS = {"web": {"app": "web"}, "client": {"role": "client"}, "other": {"role": "other"}}


def _pod(name: str) -> str:
    """What kubelet-driven runtimes pass (IgnoreUnknown: host-local refuses unknown keys)."""
    return f"IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME={name}"


def _probe(w: World, src: str, address: str) -> bool:
    [verdict] = run_probes([Probe(src, f"{w.prefix}-{src}", "web", address, TCP80)],
                           timeout=0.6)
    return verdict.allowed


def _added(world: World) -> dict[str, dict[str, Any]]:  # noqa: F811
    """ADD of web, client and other (labelled as in LABELS): each one's result."""
    out = {}
    for name in ("web", "client", "other"):
        netns = world.netns(name)
        if name == "web":  # link-local addresses random by default here: see the test
            write_sysctl("net.ipv6.conf.default.addr_gen_mode", "3", f"{world.prefix}-web")
        got = world.run("ADD", world.conf(args={"labels": LABELS[name]}), cid=f"c-{name}",
                        netns=netns, args=_pod(name))
        assert got.code == 0 and got.out is not None, got
        out[name] = got.out
    return out


def _eth0(netns: str) -> dict[str, Any]:
    out = subprocess.run(["ip", "-n", netns, "-j", "addr", "show", "dev", "eth0"],
                         capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out)[0])


def _link_locals(netns: str) -> set[str]:
    """eth0's link-local addresses, once none is tentative (detection done)."""
    deadline = time.monotonic() + 5
    while True:
        found = [a for a in _eth0(netns)["addr_info"] if a.get("scope") == "link"]
        if not any(a.get("tentative") for a in found) or time.monotonic() > deadline:
            return {str(a["local"]) for a in found}
        time.sleep(0.1)


def _mac_link_local(netns: str) -> set[str]:
    return {str(link_local(_eth0(netns)["address"]))}


def _address(result: dict[str, Any]) -> str:
    return str(result["ips"][0]["address"]).split("/")[0]


def test_main_mode_enforces_the_policy_when_add_returns(world: World) -> None:  # noqa: F811
    world.agent.call("apply", documents=[WEB_POLICY])
    results = _added(world)
    eps = world.endpoints()
    assert {k: v["labels"] for k, v in eps.items()} == {f"x/{n}": LABELS[n] for n in LABELS}
    assert {v["owner"] for v in eps.values()} == {"cni"}
    # no router advertisement configures a pod or the bridge (a pod's would route
    # its neighbours or the host through it)
    from stockade.net.sysctl import read_sysctl

    assert read_sysctl(f"net.ipv6.conf.{world.bridge}.accept_ra", world.host) == "0"
    for name in LABELS:
        assert read_sysctl("net.ipv6.conf.eth0.accept_ra", f"{world.prefix}-{name}") == "0"
    # each pod's link-local address is its MAC's (EUI-64), the one its port guard binds,
    # though the namespace's default was random (web's: set before its ADD, in _added)
    for name in LABELS:
        ns = f"{world.prefix}-{name}"
        assert read_sysctl("net.ipv6.conf.eth0.addr_gen_mode", ns) == "0"
        assert _link_locals(ns) == _mac_link_local(ns), name
    with ProbeServer({f"{world.prefix}-web": [TCP80]}):
        web = _address(results["web"])
        assert _probe(world, "client", web) is True
        assert _probe(world, "other", web) is False
    ran = world.agent.call("status")["cniExec"]
    # the thin plugin's calls ran in the agent, none fell back to the Python plugin
    assert ran == ({"calls": 3, "fallbacks": 0} if world.plugin == THIN
                   else {"calls": 0, "fallbacks": 0})


@pytest.mark.parametrize("world", ["thin"], indirect=True)
def test_the_thin_plugin_hands_other_agents_calls_to_the_python_plugin(
        world: World) -> None:  # noqa: F811
    """A configuration naming another socket, and an agent that is gone: the thin plugin
    runs the Python plugin, whose answers are the reference (code 11, try again)."""
    elsewhere = world.run("ADD", world.conf(socket=str(world.tmp / "other.sock")),
                          cid="c-x", netns=world.netns("x"), args=_pod("x"))
    assert elsewhere.code == 1 and elsewhere.error == 11, elsewhere
    assert "other.sock" in str(elsewhere.out)
    assert world.agent.call("status")["cniExec"] == {"calls": 0, "fallbacks": 0}
    # reached all the same (a socket path that resolves elsewhere in another mount
    # namespace), the agent hands it back rather than serve another agent's network
    answer = world.agent.call("cni.exec", env={"CNI_COMMAND": "VERSION"},
                              stdin=json.dumps(world.conf(socket=str(world.tmp / "o.sock"))))
    assert answer == {"fallback": "the configuration names another agent's socket "
                                  f"({world.tmp / 'o.sock'})"}
    assert world.agent.call("status")["cniExec"] == {"calls": 0, "fallbacks": 1}
    # an agent that does not see the runtime's files (a container of its own)
    unseen = world.agent.call("cni.exec", env={"CNI_COMMAND": "ADD",
                                               "CNI_NETNS": "/run/netns/not-here"},
                              stdin=json.dumps(world.conf()))
    assert unseen == {"fallback": "CNI_NETNS /run/netns/not-here is not visible to the agent"}
    world.agent.kill9()
    gone = world.run("ADD", world.conf(), cid="c-y", netns=world.netns("y"), args=_pod("y"))
    assert gone.code == 1 and gone.error == 11, gone
    assert world.veths() == []


def test_no_packet_passes_before_the_policy_applies(world: World) -> None:  # noqa: F811
    """Probes from a container that is being added never get through a deny."""
    world.agent.call("apply", documents=[WEB_POLICY])
    web = world.run("ADD", world.conf(args={"labels": LABELS["web"]}), cid="c-web",
                    netns=world.netns("web"), args=_pod("web"))
    assert web.out is not None
    address = _address(web.out)
    netns = world.netns("other")
    leaks: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if _probe(world, "other", address):
                leaks.append("other reached web")

    with ProbeServer({f"{world.prefix}-web": [TCP80]}):
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            for round_ in range(4):
                conf = world.conf(args={"labels": LABELS["other"]})
                assert world.run("ADD", conf, cid=f"c-o{round_}", netns=netns,
                                 args=_pod("other")).code == 0
                assert world.run("DEL", conf, cid=f"c-o{round_}", netns=netns,
                                 args=_pod("other")).code == 0
        finally:
            stop.set()
            watcher.join()
    assert leaks == []


def test_labels_come_from_the_agents_record_of_the_pod(world: World) -> None:  # noqa: F811
    world.agent.call("apply", documents=[WEB_POLICY, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "x", "labels": {"app": "web"}},
        "status": {"podIP": "10.99.0.1"}}])
    got = world.run("ADD", world.conf(), cid="c-web", netns=world.netns("web"),
                    args=_pod("web"))
    assert got.code == 0 and got.out is not None, got
    rec = world.endpoints()["x/web"]
    assert rec["labels"] == {"app": "web"} and rec["owner"] == "cni"
    assert rec["ips"] == [_address(got.out)]
    client = world.run("ADD", world.conf(args={"labels": LABELS["client"]}), cid="c-cl",
                       netns=world.netns("client"), args=_pod("client"))
    other = world.run("ADD", world.conf(), cid="c-ot", netns=world.netns("other"),
                      args=_pod("other"))
    assert client.code == other.code == 0
    with ProbeServer({f"{world.prefix}-web": [TCP80]}):
        assert _probe(world, "client", _address(got.out)) is True
        assert _probe(world, "other", _address(got.out)) is False


def test_main_mode_delegates_to_host_local_across_versions(world: World,  # noqa: F811
                                                           tmp_path: Path) -> None:
    """A 1.1.0 configuration with host-local, which speaks up to 1.0.0: negotiated."""
    ipam = {"type": "host-local", "subnet": "10.251.7.0/24", "dataDir": str(tmp_path / "hl"),
            "routes": [{"dst": "0.0.0.0/0"}]}
    conf = world.conf("1.1.0", ipam=ipam, args={"labels": LABELS["web"]})
    netns = world.netns("web")
    got = world.run("ADD", conf, cid="c-web", netns=netns, args=_pod("web"))
    assert got.code == 0 and got.out is not None, got
    assert got.out["cniVersion"] == "1.1.0"
    assert got.out["ips"][0]["address"].startswith("10.251.7.")
    assert got.out["routes"] == [{"dst": "0.0.0.0/0"}]  # as host-local gave it
    assert world.pool() == {}  # the agent's pool was not used
    route = subprocess.run(["ip", "-n", os.path.basename(netns), "route", "show", "default"],
                           capture_output=True, text=True, check=True).stdout
    assert "via 10.251.7.1 dev eth0" in route  # a route without gw uses the gateway
    held = tmp_path / "hl" / world.network / _address(got.out)
    assert held.exists()
    prev = {**conf, "prevResult": got.out}
    assert world.run("CHECK", prev, cid="c-web", netns=netns).code == 0
    assert world.run("DEL", prev, cid="c-web", netns=netns).code == 0
    assert not held.exists() and world.endpoints() == {} and world.veths() == []


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_chained_after_the_reference_bridge(world: World, tmp_path: Path,  # noqa: F811
                                            version: str) -> None:
    host_local = tmp_path / "hl"
    conflist = {"cniVersion": version, "name": world.network, "plugins": [
        {"type": "bridge", "bridge": f"{world.prefix}cb0", "isGateway": True,
         "ipam": {"type": "host-local", "subnet": "10.251.8.0/24",
                  "dataDir": str(host_local), "routes": [{"dst": "0.0.0.0/0"}]}},
        {"type": "stockade-cni", "socket": world.agent.socket,
         "dataDir": str(world.data_dir)},
    ]}
    rt = Runtime(conflist, world.host, REFERENCE)
    world.agent.call("apply", documents=[WEB_POLICY])
    results = {}
    for name in ("web", "client", "other"):
        netns = world.netns(name)
        if name == "web":  # the bridge plugin's interface gets a random link-local address
            write_sysctl("net.ipv6.conf.default.addr_gen_mode", "3", f"{world.prefix}-web")
        got = rt.add(f"c-{name}", netns, args=_pod(name),
                     extra={"args": {"cni": {"labels": LABELS[name]}}})
        assert got.code == 0 and got.out is not None, got
        assert got.out == rt.trail[0], "the bridge's result is passed on unchanged"
        results[name] = got.out
    assert all(("version" in ip) == (version == "0.4.0")
               for r in results.values() for ip in r["ips"])
    # the previous plugin's interface has its MAC's link-local address, the one its guard
    # binds, and no other (web's random one replaced before the container runs)
    for name in LABELS:
        assert _link_locals(f"{world.prefix}-{name}") == _mac_link_local(
            f"{world.prefix}-{name}"), name
    eps = world.endpoints()
    assert {k: (v["labels"], v["ips"]) for k, v in eps.items()} == {
        f"x/{n}": (LABELS[n], [_address(results[n])]) for n in LABELS}
    with ProbeServer({f"{world.prefix}-web": [TCP80]}):
        assert _probe(world, "client", _address(results["web"])) is True
        assert _probe(world, "other", _address(results["web"])) is False
    # The previous plugin's veth is guarded too: the kernel pairs its ends, its result
    # names the host side (web admits everyone again, so only the guard stands between).
    world.agent.call("delete", refs=[{"kind": "NetworkPolicy", "namespace": "x",
                                      "name": "web"}])
    _bound(world, results)
    assert rt.check("c-web", f"/run/netns/{world.prefix}-web").code == 0
    for name in LABELS:
        assert rt.delete(f"c-{name}", f"/run/netns/{world.prefix}-{name}").code == 0
    assert world.endpoints() == {} and world.states() == []
    leftover = [p for p in (host_local / world.network).iterdir()
                if p.name.startswith("10.")] if (host_local / world.network).exists() else []
    assert leftover == []


def test_the_agent_restarting_between_add_check_and_del(world: World) -> None:  # noqa: F811
    conf = world.conf(args={"labels": LABELS["web"]})
    netns = world.netns("web")
    got = world.run("ADD", conf, cid="c-web", netns=netns, args=_pod("web"))
    assert got.code == 0
    prev = {**conf, "prevResult": got.out}
    world.agent.kill9()
    world.agent.start()  # the attachment and its address are in the agent's store
    assert world.run("CHECK", prev, cid="c-web", netns=netns).code == 0
    world.agent.kill9()
    down = world.run("DEL", prev, cid="c-web", netns=netns, args=_pod("web"))
    assert down.error == 11, down  # the address must not be forgotten: try again
    assert world.states() == ["c-web:eth0.json"]
    world.agent.start()
    assert world.run("STATUS", {**conf, "cniVersion": "1.1.0"}).code == 0
    assert world.run("DEL", prev, cid="c-web", netns=netns, args=_pod("web")).code == 0
    assert world.pool() == {} and world.endpoints() == {} and world.states() == []
    assert world.veths() == []
    assert os.path.exists(netns)  # the runtime's namespace is the runtime's to remove


def test_main_mode_announces_the_address_to_its_neighbours(world: World) -> None:  # noqa: F811
    """A neighbour's ARP cache still holding another MAC for the address (a reused one)
    learns the new container's MAC from ADD's gratuitous ARP, sent once it is up."""
    client = world.run("ADD", world.conf(args={"labels": LABELS["client"]}), cid="c-cl",
                       netns=world.netns("client"), args=_pod("client"))
    assert client.code == 0 and client.out is not None, client
    base = ipaddress.ip_address(_address(client.out))
    stale = "02:00:00:00:00:99"
    candidates = [str(base + i) for i in range(1, 9)]
    for address in candidates:
        subprocess.run(["ip", "-n", f"{world.prefix}-client", "neigh", "replace", address,
                        "lladdr", stale, "dev", "eth0", "nud", "stale"], check=True)
    web = world.run("ADD", world.conf(args={"labels": LABELS["web"]}), cid="c-web",
                    netns=world.netns("web"), args=_pod("web"))
    assert web.code == 0 and web.out is not None, web
    address = _address(web.out)
    assert address in candidates, (address, candidates)
    mac = next(i["mac"] for i in web.out["interfaces"] if i.get("sandbox"))
    deadline = time.monotonic() + 3.0
    seen = ""
    while time.monotonic() < deadline:
        seen = subprocess.run(["ip", "-n", f"{world.prefix}-client", "neigh", "show", address],
                              capture_output=True, text=True, check=True).stdout
        if mac in seen:
            break
        time.sleep(0.02)
    assert mac in seen and stale not in seen, seen


def test_a_pods_port_is_bound_to_its_address_and_mac_when_add_returns(
        world: World) -> None:  # noqa: F811
    """ADD picks the container's MAC before the veth exists and the agent binds the port to
    it and the address: a frame from the pod claiming another pod's address is dropped
    at its port, its own passes."""
    _bound_when_add_returns(world)


def test_on_ebpf_too_a_pods_port_is_bound_when_add_returns(
        tmp_path: Path, host_netns: str, netns_prefix: str) -> None:
    """The eBPF datapath keys its guards by the port's ifindex, and the port does not exist
    when ADD registers the endpoint: the agent must still bind it before ADD returns."""
    from stockade.datapath.ebpf import EbpfDatapath

    from .test_cni_harness import THIN, cni_agent

    agent = cni_agent(tmp_path, host_netns, netns_prefix, "--datapath", "ebpf").start()
    try:
        _bound_when_add_returns(World(netns_prefix, host_netns, tmp_path, agent, THIN))
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.kill9()
        EbpfDatapath(agent.table, netns=host_netns).remove()  # its pins outlive it


def _bound_when_add_returns(world: World) -> None:  # noqa: F811
    _bound(world, _added(world))


def _bound(world: World, out: dict[str, dict[str, Any]]) -> None:  # noqa: F811
    """Each pod's record names the port and MAC its ADD's result shows; a frame from
    `other` with `client`'s address does not reach `web`, one with its own does."""
    from .test_forged_source import FRAME, SINK, collected, python_in, run_in

    eps = world.endpoints()
    for name, result in out.items():
        port = eps[f"x/{name}"]["hostInterface"]
        assert port in {i["name"] for i in result["interfaces"] if not i.get("sandbox")}
        link = subprocess.run(["ip", "-n", world.host, "-d", "-j", "link", "show", port],
                              capture_output=True, text=True, check=True).stdout
        assert json.loads(link)[0]["linkinfo"]["info_kind"] == "veth", name  # not the bridge
        mac = next(i["mac"] for i in result["interfaces"] if i.get("sandbox"))
        inside = subprocess.run(["ip", "-n", f"{world.prefix}-{name}", "-j", "link", "show",
                                 "eth0"], capture_output=True, text=True, check=True).stdout
        assert json.loads(inside)[0]["address"] == mac == eps[f"x/{name}"]["mac"], name
    sink = python_in(f"{world.prefix}-web", SINK, "4", "5003")
    web_mac = next(i["mac"] for i in out["web"]["interfaces"] if i.get("sandbox"))
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        for sender, source, payload in (("other", "client", "forged"),
                                        ("other", "other", "from-other")):
            mac = next(i["mac"] for i in out[sender]["interfaces"] if i.get("sandbox"))
            run_in(f"{world.prefix}-{sender}", FRAME, "eth0", mac, web_mac,
                   _address(out[source]), _address(out["web"]), "5003", payload)
    finally:
        got = collected(sink)
    assert got == {"from-other"}, got
