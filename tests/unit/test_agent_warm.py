"""A warm start (agent/warm.py): taken only when it is what the cold start computes.

The kept result is keyed by the digest of the rows that hold the state; every
way the rows, the code, the configuration or the file itself can differ from
what was kept must fall back to the cold start.
"""

from __future__ import annotations

import os
import pickle
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.agent import warm
from stockade.agent.admission import enforceable, quarantine
from stockade.agent.records import (
    AgentState,
    Change,
    ClusterPolicyRecord,
    EndpointRecord,
    PolicyRecord,
    PutClusterPolicy,
    PutEndpoint,
    PutNamespace,
    PutPolicy,
    RefusedClusterPolicy,
)
from stockade.agent.store import Store
from stockade.compile.incremental import IncrementalCompiler
from stockade.model.cluster import NS_NAME_LABEL, ContainerPort, Endpoint, Namespace
from stockade.model.labels import Labels


def endpoint(name: str, ip: str, ns: str = "default", **labels: str) -> EndpointRecord:
    return EndpointRecord(Endpoint(ns, name, Labels(labels or {"app": name}), (ip,),
                                   (ContainerPort(80, "TCP", "http"),)),
                          netns=f"/run/netns/{name}", owner="run", pid=42,
                          command=("sleep", "1"), created=1.5)


def policy(name: str, app: str, ns: str = "default") -> PolicyRecord:
    return PolicyRecord.from_dict({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"podSelector": {"matchLabels": {"app": app}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "db"}}}],
                              "ports": [{"port": "http"}]}]}})


def changes() -> list[Change]:
    return [PutNamespace(Namespace("default", Labels({"team": "a", NS_NAME_LABEL: "default"}))),
            PutNamespace(Namespace("other", Labels({NS_NAME_LABEL: "other"}))),
            PutEndpoint(endpoint("web", "10.244.0.2")),
            PutEndpoint(endpoint("db", "10.244.0.3")),
            PutEndpoint(endpoint("db6", "fd00::3", app="db")),
            PutEndpoint(endpoint("api", "10.244.0.4", ns="other")),
            PutPolicy(policy("allow-web", "web")), PutPolicy(policy("allow-api", "api", "other"))]


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A store holding `changes()`, and the same state as a running agent holds it
    (folded from the changes, not decoded from the rows), kept at a clean stop."""
    directory = tmp_path / "state"
    with Store(directory) as store:
        store.commit(changes())
    live = AgentState()
    live.apply(changes())
    assert warm.save(directory, live, strict_cidr=False)
    yield directory


def start(directory: Path, strict_cidr: bool = False) -> tuple[AgentState, warm.WarmStart]:
    w = warm.WarmStart(directory, strict_cidr=strict_cidr)
    with Store(directory) as store:
        state, _ = store.load(w.known)
    return state, w


def cold(directory: Path, strict_cidr: bool = False) -> tuple[AgentState, IncrementalCompiler]:
    with Store(directory) as store:
        state, _ = store.load()
    state.quarantined = quarantine(state, strict_cidr=strict_cidr)
    return state, IncrementalCompiler.of(enforceable(state, state.quarantined))


def test_a_kept_start_is_the_cold_start(state_dir: Path) -> None:
    state, w = start(state_dir)
    assert w.kept is not None and w.kept.state is state
    cold_state, cold_compiler = cold(state_dir)
    assert state == cold_state
    assert state.quarantined == cold_state.quarantined
    assert w.kept.compiler.ruleset() == cold_compiler.ruleset()
    # and it goes on as the cold one does
    moved = endpoint("web", "10.244.0.9")
    for compiler in (w.kept.compiler, cold_compiler):
        compiler.upsert_endpoint(moved.endpoint)
    assert w.kept.compiler.ruleset() == cold_compiler.ruleset()


def test_tiers_are_kept_too(tmp_path: Path) -> None:
    """ClusterNetworkPolicies (Admin and Baseline) compile into the kept compiler as
    into a cold one."""
    tiers = [PutClusterPolicy(ClusterPolicyRecord.from_dict({
        "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name},
        "spec": {"tier": tier, "priority": 10,
                 "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
                 "ingress": [{"name": "r", "action": action, "from": [{"namespaces": {}}]}]}}))
        for name, tier, action in (("deny", "Admin", "Deny"), ("base", "Baseline", "Accept"))]
    directory = tmp_path / "state"
    with Store(directory) as store:
        store.commit([*changes(), *tiers])
    live = AgentState()
    live.apply([*changes(), *tiers])
    assert warm.save(directory, live, strict_cidr=False)
    _, w = start(directory)
    assert w.kept is not None
    cold_state, cold_compiler = cold(directory)
    assert w.kept.state.cluster_policies == cold_state.cluster_policies != {}
    assert w.kept.compiler.ruleset() == cold_compiler.ruleset()


def test_a_change_committed_after_the_stop_starts_cold(state_dir: Path) -> None:
    with Store(state_dir) as store:
        store.commit([PutEndpoint(endpoint("late", "10.244.0.8"))])
    state, w = start(state_dir)
    assert w.kept is None
    assert "default/late" in state.endpoints


def test_a_row_rewritten_by_hand_starts_cold(state_dir: Path) -> None:
    """The same revision, one row's labels changed: only the digest can tell."""
    db = sqlite3.connect(state_dir / "state.db")
    doc = db.execute("SELECT doc FROM endpoints WHERE key = 'default/db'").fetchone()[0]
    db.execute("UPDATE endpoints SET doc = ? WHERE key = 'default/db'",
               (doc.replace('"app":"db"', '"app":"dbx"'),))
    db.commit()
    db.close()
    state, w = start(state_dir)
    assert w.kept is None
    assert state.endpoints["default/db"].endpoint.labels == Labels({"app": "dbx"})


def test_a_state_that_is_not_the_rows_is_never_taken(tmp_path: Path) -> None:
    """A running agent whose store was replaced under it keeps what it holds, under
    the digest of what it holds: the replaced rows do not match it."""
    directory = tmp_path / "state"
    with Store(directory) as store:
        store.commit(changes())
    live = AgentState()
    live.apply([*changes(), PutEndpoint(endpoint("ghost", "10.244.0.7"))])
    assert warm.save(directory, live, strict_cidr=False)
    state, w = start(directory)
    assert w.kept is None
    assert "default/ghost" not in state.endpoints


def test_other_code_or_configuration_starts_cold(state_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    assert start(state_dir, strict_cidr=True)[1].kept is None
    monkeypatch.setattr(warm, "code_key", lambda strict_cidr: "0" * 64)
    assert start(state_dir)[1].kept is None


def test_a_file_others_could_write_is_not_read(state_dir: Path) -> None:
    path = state_dir / warm.FILE
    os.chmod(path, 0o620)
    assert start(state_dir)[1].kept is None
    os.chmod(path, 0o600)
    os.chown(path, 65534, -1)
    assert start(state_dir)[1].kept is None
    os.chown(path, os.geteuid(), -1)
    assert start(state_dir)[1].kept is not None


def test_a_link_in_place_of_the_file_is_not_followed(state_dir: Path) -> None:
    path = state_dir / warm.FILE
    path.rename(state_dir / "elsewhere")
    path.symlink_to(state_dir / "elsewhere")
    assert start(state_dir)[1].kept is None


@pytest.mark.parametrize("damage", ["truncated", "header", "foreign"])
def test_a_damaged_file_starts_cold(state_dir: Path, damage: str) -> None:
    path = state_dir / warm.FILE
    data = path.read_bytes()
    lines = data.split(b"\n", 2)
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "header":
        path.write_bytes(b"\n".join([b"something else", *lines[1:]]))
    else:  # the right header over another object
        path.write_bytes(b"\n".join(lines[:2]) + b"\n" + pickle.dumps({"a": 1}))
    state, w = start(state_dir)
    assert w.kept is None
    state.quarantined = quarantine(state, strict_cidr=False)
    assert state == cold(state_dir)[0]


def test_a_missing_file_starts_cold(state_dir: Path) -> None:
    (state_dir / warm.FILE).unlink()
    assert start(state_dir)[1].kept is None


def test_nothing_is_kept_for_a_refused_cluster_policy(state_dir: Path) -> None:
    live = AgentState()
    live.apply(changes())
    live.refused_cluster_policies["bad"] = RefusedClusterPolicy("bad", ("spec: invalid",), None)
    assert not warm.save(state_dir, live, strict_cidr=False)
    assert not (state_dir / warm.FILE).exists()


def test_a_quarantined_endpoint_stays_held(tmp_path: Path) -> None:
    """An endpoint the store holds but admission refuses (written by hand) is held
    fail-closed after a warm start as after a cold one."""
    directory = tmp_path / "state"
    with Store(directory) as store:
        store.commit(changes())
    db = sqlite3.connect(directory / "state.db")
    doc = db.execute("SELECT doc FROM endpoints WHERE key = 'default/db'").fetchone()[0]
    db.execute("UPDATE endpoints SET doc = ? WHERE key = 'default/db'",
               (doc.replace('"10.244.0.3"', '"10.244.0.2"'),))  # web's address
    db.commit()
    db.close()
    with Store(directory) as store:
        live, _ = store.load()
    assert warm.save(directory, live, strict_cidr=False)
    state, w = start(directory)
    assert w.kept is not None
    cold_state, cold_compiler = cold(directory)
    assert state.quarantined == cold_state.quarantined
    assert set(state.quarantined) == {"default/db", "default/web"}
    assert w.kept.compiler.ruleset() == cold_compiler.ruleset()


def test_the_file_is_private(state_dir: Path) -> None:
    st = (state_dir / warm.FILE).stat()
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.geteuid()
    assert [p.name for p in state_dir.iterdir() if p.name.startswith(".warm-")] == []


def test_a_write_cut_short_leaves_nothing_behind(state_dir: Path) -> None:
    """A stop killed while writing leaves a temporary file; the next save removes it."""
    (state_dir / ".warm-cut").write_bytes(b"half")
    live = AgentState()
    live.apply(changes())
    assert warm.save(state_dir, live, strict_cidr=False)
    assert sorted(p.name for p in state_dir.iterdir() if "warm" in p.name) == [warm.FILE]
