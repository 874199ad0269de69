"""A pod that forges another pod's source address, against every datapath, with real packets.

x/c admits UDP/5003 from x/a only. x/b, which c does not admit, sends c a datagram
with a's IPv4 address as its source (a raw socket, which a container has with the
default CAP_NET_RAW). Every datapath judges a packet by its addresses alone and does
not know which bridge port an address belongs to, so the forged datagram is judged
as a's and let in: a known gap (README, "Reliability and integrity"). The test is
marked to fail strictly, so the day a datapath checks the source against the port it
came in on, this test passes and the mark must go.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from stockade.compile.lower import compile_cluster
from stockade.datapath import open_datapath
from stockade.datapath.base import Datapath
from stockade.model.labels import Labels
from stockade.model.policy import INGRESS, NetworkPolicy, Peer, PolicyPort
from stockade.model.policy import Rule as PRule
from stockade.model.selector import Selector

from .clusters import cluster

pytestmark = pytest.mark.privileged

PORT = 5003

SINK = """
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", int(sys.argv[1])))
u.settimeout(2)
print("ready", flush=True)
try:
    while True:
        data, _ = u.recvfrom(100)
        print(data.decode(), flush=True)
except socket.timeout:
    pass
"""

# One UDP datagram with any source address, sent through a raw IPv4 socket.
FORGE = """
import socket, struct, sys
src, dst, port, payload = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
udp = struct.pack("!HHHH", 4444, port, 8 + len(payload), 0) + payload
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                 socket.inet_aton(src), socket.inet_aton(dst))
words = struct.unpack("!10H", ip)
total = sum(words)
total = (total >> 16) + (total & 0xFFFF)
total += total >> 16
ip = ip[:10] + struct.pack("!H", ~total & 0xFFFF) + ip[12:]
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
raw.sendto(ip + udp, (dst, 0))
"""

class ForgedDatagramArrived(AssertionError):
    """The gap itself: the one failure the mark expects (any other still fails the test)."""


C_ONLY_FROM_A_UDP = NetworkPolicy(
    "x", "udp-from-a", Selector(Labels({"pod": "c"})),
    ingress=(PRule((PolicyPort("UDP", PORT),),
                   (Peer(pod_selector=Selector(Labels({"pod": "a"}))),)),),
    policy_types=(INGRESS,))


@pytest.fixture(params=["nft", "iptables", "ebpf"])
def datapath(request: pytest.FixtureRequest, trio: Any, netns_prefix: str
             ) -> Iterator[Datapath]:
    dp = open_datapath(request.param, netns_prefix, netns=trio.host_netns)
    try:
        dp.check()
        yield dp
    finally:
        dp.remove()


def netns_run(netns: str, *argv: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, *argv], check=True, timeout=30)


@pytest.mark.xfail(strict=True, raises=ForgedDatagramArrived,
                   reason="known gap: no datapath checks a packet's source address against "
                   "the bridge port it came in on")
def test_a_forged_source_address_is_not_let_in(trio: Any, datapath: Datapath) -> None:
    datapath.apply(compile_cluster(cluster(trio, C_ONLY_FROM_A_UDP)))
    a, b, c = trio.a.address4, trio.b.address4, trio.c.address4
    sink = subprocess.Popen(["ip", "netns", "exec", trio.c.netns, sys.executable, "-c", SINK,
                             str(PORT)], stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        netns_run(trio.b.netns, sys.executable, "-c", FORGE, a, c, str(PORT), "forged")
        netns_run(trio.b.netns, sys.executable, "-c", FORGE, b, c, str(PORT), "from-b")
        netns_run(trio.a.netns, sys.executable, "-c", FORGE, a, c, str(PORT), "from-a")
        out, _ = sink.communicate(timeout=30)
    finally:
        sink.kill()
        sink.wait()
    got = set(out.split())
    # the policy is enforced: a's own datagram arrives, b's honest one does not
    assert "from-a" in got and "from-b" not in got, got
    if "forged" in got:
        raise ForgedDatagramArrived(f"b's datagram forged as a's ({a}) reached c")
