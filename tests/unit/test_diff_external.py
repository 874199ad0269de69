"""`stockade diff` covers addresses outside the cluster: the ranges the ipBlocks of
either side cut the IPv4 space into, towards and from every pod (issue 15's
example: removing an `except` opens the port to that range)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stockade.cli.main import main
from stockade.engine.connectivity import AddressRange
from stockade.engine.diff import CLOSED, OPENED, diff_policies, render_range
from stockade.model.cluster import Cluster, Endpoint, implicit_namespace
from stockade.model.labels import Labels
from stockade.model.policy import INGRESS, IPBlock, NetworkPolicy, Peer, PolicyPort, Rule
from stockade.model.selector import ALL

CLUSTER = """\
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: backend, labels: {app: api}}
status: {podIP: 10.0.0.5}
"""
POLICY = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress, namespace: backend}
spec:
  podSelector: {matchLabels: {app: api}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {cidr: 0.0.0.0/0%s}
    ports: [{port: 443}]
"""


def test_removing_an_except_opens_the_port_to_that_range(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cluster.yaml").write_text(CLUSTER)
    (tmp_path / "old.yaml").write_text(POLICY % ", except: [192.168.0.0/16]")
    (tmp_path / "new.yaml").write_text(POLICY % "")
    files = [str(tmp_path / "cluster.yaml"), str(tmp_path / "old.yaml")]
    assert main(["diff", "-f", *files, "--against", str(tmp_path / "new.yaml")]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "+ backend/api -> 192.168.0.0/16 TCP/443 "
        "(opened by NetworkPolicy backend/egress egress[0])",
        "1 opened, 0 closed (each line: one pod pair and its ports)",
    ]
    # and back: closed
    assert main(["diff", "-f", str(tmp_path / "cluster.yaml"), str(tmp_path / "new.yaml"),
                 "--against", str(tmp_path / "old.yaml")]) == 1
    assert capsys.readouterr().out.splitlines()[0] == (
        "- backend/api -> 192.168.0.0/16 TCP/443 "
        "(closed: NetworkPolicy backend/egress egress[0] no longer allows it)")


def test_a_workload_without_address_is_diffed_too(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cluster.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\n"
        "metadata: {name: api, namespace: backend}\n"
        "spec: {template: {metadata: {labels: {app: api}}, spec: {containers: []}}}\n")
    (tmp_path / "old.yaml").write_text(POLICY % ", except: [192.168.0.0/16]")
    (tmp_path / "new.yaml").write_text(POLICY % "")
    assert main(["diff", "-f", str(tmp_path / "cluster.yaml"), str(tmp_path / "old.yaml"),
                 "--against", str(tmp_path / "new.yaml")]) == 1
    assert capsys.readouterr().out.splitlines()[0].startswith(
        "+ backend/api[Deployment] -> 192.168.0.0/16 TCP/443 (opened")


def test_ingress_ranges_and_undeclared_ports() -> None:
    pod = Endpoint("x", "web", Labels({"app": "web"}), ("10.1.0.2",))

    def ingress(block: IPBlock, port: int) -> NetworkPolicy:
        return NetworkPolicy("x", "in", ALL, ingress=(Rule(
            (PolicyPort("TCP", port, port + 10),), (Peer(ip_block=block),)),),
            policy_types=(INGRESS,))
    cluster = Cluster((implicit_namespace("x"),), (pod,), ())
    old = ingress(IPBlock("10.0.0.0/8"), 9000)
    new = ingress(IPBlock("10.0.0.0/8", ("10.10.0.0/16",)), 9005)
    result = diff_policies(cluster, [old], [new], external=True)
    lines = [c.render() for c in result.changes]
    assert lines == [
        "- 10.0.0.0-10.9.255.255 -> x/web TCP/9000-9004 "
        "(closed: NetworkPolicy x/in ingress[0] no longer allows it)",
        "+ 10.0.0.0-10.9.255.255 -> x/web TCP/9011-9015 (opened by NetworkPolicy x/in ingress[0])",
        "- 10.10.0.0/16 -> x/web TCP/9000-9010 "
        "(closed: NetworkPolicy x/in ingress[0] no longer allows it)",
        "- 10.11.0.0-10.255.255.255 -> x/web TCP/9000-9004 "
        "(closed: NetworkPolicy x/in ingress[0] no longer allows it)",
        "+ 10.11.0.0-10.255.255.255 -> x/web TCP/9011-9015 "
        "(opened by NetworkPolicy x/in ingress[0])",
    ]
    assert {c.change for c in result.changes} == {OPENED, CLOSED}
    assert diff_policies(cluster, [old], [new]).changes == ()  # pods only: none here


def test_render_range() -> None:
    assert render_range(AddressRange(0, 2**32 - 1)) == "0.0.0.0/0"
    assert render_range(AddressRange(1, 1)) == "0.0.0.1/32"
    assert render_range(AddressRange(1, 2)) == "0.0.0.1-0.0.0.2"
