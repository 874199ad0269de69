"""`stockade status`'s text: what an operator reads when the agent is not in sync."""

from __future__ import annotations

from typing import Any

from stockade.cli.agent import status_lines


def _reflector(lists: int, error: str = "") -> dict[str, Any]:
    return {"synced": bool(lists), "resourceVersion": "7" if lists else "", "lists": lists,
            "events": 0, "errors": 1 if error else 0, "lastError": error}


def _status(datastore: dict[str, Any]) -> dict[str, Any]:
    return {"inSync": False, "revision": 3, "appliedRevision": 3,
            "counts": {"namespaces": 1, "endpoints": 2, "policies": 0},
            "driftRepairs": 0, "applyFailures": 0, "datapath": "nft", "uptime": 5,
            "datastore": datastore}


def test_a_first_sync_waiting_for_the_host_tables_blocks_names_them_and_their_error() -> None:
    ds = {"kind": "etcd", "server": "http://127.0.0.1:2379", "synced": False,
          "resources": {"pods": _reflector(1), "namespaces": _reflector(1)},
          "hosts": {"addressOf": "", "error": "",
                    "resources": {"hosts": _reflector(1),
                                  "ipam/blocks": _reflector(0, "permission denied")}},
          "node": {"name": "node-1", "held": True, "error": ""}}
    lines = status_lines(_status(ds))
    head = next(line for line in lines if line.startswith("datastore:"))
    assert head == ("datastore:      etcd http://127.0.0.1:2379 (node node-1), "
                    "NOT SYNCED: waiting for the first lists of ipam/blocks")
    blocks = next(line for line in lines if line.strip().startswith("ipam/blocks"))
    assert "lists 0" in blocks and "last error: permission denied" in blocks
    assert any(line.strip().startswith("hosts ") for line in lines)
    assert not any("NODE NAME NOT HELD" in line for line in lines)


def test_the_api_feeds_status_names_its_node_and_its_unlisted_resources() -> None:
    ds = {"kind": "kubernetes", "server": "https://api:6443", "node": "n1", "synced": False,
          "resources": {"pods": _reflector(0), "networkpolicies": _reflector(1)}}
    head = next(line for line in status_lines(_status(ds)) if line.startswith("datastore:"))
    assert head == ("datastore:      kubernetes https://api:6443 (node n1), "
                    "NOT SYNCED: waiting for the first lists of pods")


def test_a_synced_datastore_and_a_lost_node_name() -> None:
    ds = {"kind": "etcd", "server": "s", "synced": True, "resources": {"pods": _reflector(2)},
          "node": {"name": "node-1", "held": False, "error": "held by another instance"}}
    lines = status_lines(_status(ds))
    assert "(node node-1), synced" in lines[-3]
    assert lines[-1] == ("  NODE NAME NOT HELD: nothing is written to etcd for node node-1: "
                         "held by another instance")


def test_the_last_verification_is_shown_only_once_there_was_one() -> None:
    st = {k: v for k, v in _status({}).items() if k != "datastore"}
    assert not any(line.startswith("last verified:") for line in status_lines(st))
    lines = status_lines({**st, "lastVerified": 1_800_000_000.0})
    shown = next(line for line in lines if line.startswith("last verified:"))
    assert "found as applied" in shown and "20" in shown  # a date, in local time
