"""A warm start (agent/warm.py): taken only when it is what the cold start computes.

The kept result holds the rows that hold its state. Rows changed since are folded
in as the running agent folds changes, and the result must equal the cold start;
rows admission refuses, a kept state with held endpoints, other code or
configuration, and a file that is not the agent's must fall back to the cold start.
"""

from __future__ import annotations

import os
import pickle
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.agent import warm
from stockade.agent.admission import enforceable, quarantine
from stockade.agent.reconcile import Reconciler
from stockade.agent.records import (
    AgentState,
    Change,
    ClusterPolicyRecord,
    DeleteEndpoint,
    DeleteNamespace,
    DeletePolicy,
    EndpointRecord,
    PolicyRecord,
    PutClusterPolicy,
    PutEndpoint,
    PutNamespace,
    PutPolicy,
    RefusedClusterPolicy,
)
from stockade.agent.store import Store, StoreError
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


def assert_cold(state: AgentState, w: warm.WarmStart, directory: Path) -> None:
    """What the start made of the kept result is what the cold start computes."""
    assert w.state is state and w.compiler is not None
    cold_state, cold_compiler = cold(directory)
    assert state == cold_state
    assert list(state.endpoints) == list(cold_state.endpoints)  # key order too
    assert state.quarantined == cold_state.quarantined
    assert w.compiler.ruleset() == cold_compiler.ruleset()
    # and it goes on as the cold one does
    for compiler in (w.compiler, cold_compiler):
        compiler.upsert_endpoint(endpoint("next", "10.244.0.99").endpoint)
        compiler.delete_policy("default/allow-web")
    assert w.compiler.ruleset() == cold_compiler.ruleset()


def test_a_change_committed_after_the_keep_is_folded_in(state_dir: Path) -> None:
    with Store(state_dir) as store:
        store.commit([PutEndpoint(endpoint("late", "10.244.0.8"))])
    state, w = start(state_dir)
    assert w.folded == 1 and "default/late" in state.endpoints
    assert_cold(state, w, state_dir)


def test_any_changes_since_the_keep_fold_into_the_cold_start(state_dir: Path) -> None:
    """Endpoints added, moved, relabelled and deleted, policies changed and deleted,
    a namespace relabelled, another deleted with its endpoints, tiers added."""
    tier = ClusterPolicyRecord.from_dict({
        "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "deny"},
        "spec": {"tier": "Admin", "priority": 10,
                 "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
                 "ingress": [{"name": "r", "action": "Deny", "from": [{"namespaces": {}}]}]}})
    with Store(state_dir) as store:
        store.commit([PutEndpoint(endpoint("late", "10.244.0.8", app="db")),
                      PutEndpoint(endpoint("web", "10.244.0.3")),  # db's address, freed:
                      DeleteEndpoint("default/db"),
                      PutPolicy(policy("allow-web", "db")),
                      PutNamespace(Namespace("default", Labels({NS_NAME_LABEL: "default"}))),
                      DeleteEndpoint("other/api"), DeletePolicy("other/allow-api"),
                      DeleteNamespace("other"), PutClusterPolicy(tier)])
        store.commit([PutEndpoint(endpoint("db6", "fd00::3", app="web"))])
    state, w = start(state_dir)
    assert w.folded == 10 and "other" not in state.namespaces
    assert state.cluster_policies == {"deny": tier}
    assert_cold(state, w, state_dir)


def test_more_changes_than_a_bulk_compile_the_state_anew(
        state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Reconciler, "BULK", 2)
    with Store(state_dir) as store:
        store.commit([PutEndpoint(endpoint(f"bulk{i}", f"10.244.1.{i}")) for i in range(5)])
    state, w = start(state_dir)
    assert w.folded == 5 and w.kept is not None and w.compiler is not w.kept.compiler
    assert_cold(state, w, state_dir)


def test_a_row_rewritten_by_hand_is_admitted_like_a_change(state_dir: Path) -> None:
    """The same revision, one row's labels changed: found by its document."""
    db = sqlite3.connect(state_dir / "state.db")
    doc = db.execute("SELECT doc FROM endpoints WHERE key = 'default/db'").fetchone()[0]
    db.execute("UPDATE endpoints SET doc = ? WHERE key = 'default/db'",
               (doc.replace('"app":"db"', '"app":"dbx"'),))
    db.commit()
    db.close()
    state, w = start(state_dir)
    assert w.folded == 1
    assert state.endpoints["default/db"].endpoint.labels == Labels({"app": "dbx"})
    assert_cold(state, w, state_dir)


@pytest.mark.parametrize("damage", ["shared address", "invalid label", "undecodable",
                                    "refused tier"])
def test_a_row_admission_refuses_starts_cold(state_dir: Path, damage: str) -> None:
    db = sqlite3.connect(state_dir / "state.db")
    doc = db.execute("SELECT doc FROM endpoints WHERE key = 'default/db'").fetchone()[0]
    if damage == "refused tier":
        db.execute("INSERT INTO cluster_policies VALUES ('bad', ?)", (
            '{"apiVersion":"policy.networking.k8s.io/v1alpha2",'
            '"kind":"ClusterNetworkPolicy","metadata":{"name":"bad"},'
            '"spec":{"tier":"Admin","priority":5000}}',))
    else:
        bad = {"shared address": doc.replace('"10.244.0.3"', '"10.244.0.2"'),
               "invalid label": doc.replace('"app":"db"', '"app":"-db-"'),
               "undecodable": "{not json"}[damage]
        db.execute("UPDATE endpoints SET doc = ? WHERE key = 'default/db'", (bad,))
    db.commit()
    db.close()
    w = warm.WarmStart(state_dir, strict_cidr=False)
    with Store(state_dir) as store:
        if damage == "undecodable":
            with pytest.raises(StoreError, match="default/db"):
                store.load(w.known)
            return
        state, _ = store.load(w.known)
    assert w.state is None and w.compiler is None
    state.quarantined = quarantine(state, strict_cidr=False)
    assert state.quarantined or state.refused_cluster_policies
    assert state == cold(state_dir)[0]


def test_a_state_that_is_not_the_rows_is_never_taken(tmp_path: Path) -> None:
    """A running agent whose store was replaced under it keeps what it holds: the
    start reads the rows, and what they lack is not started with."""
    directory = tmp_path / "state"
    with Store(directory) as store:
        store.commit(changes())
    live = AgentState()
    live.apply([*changes(), PutEndpoint(endpoint("ghost", "10.244.0.7"))])
    assert warm.save(directory, live, strict_cidr=False)
    state, w = start(directory)
    assert "default/ghost" not in state.endpoints
    assert_cold(state, w, directory)


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
    fail-closed after a warm start as after a cold one; a change since starts cold
    (folding is only done from a kept state with nothing held)."""
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
    assert w.kept is not None and not w.kept.spotless
    cold_state, cold_compiler = cold(directory)
    assert state.quarantined == cold_state.quarantined
    assert set(state.quarantined) == {"default/db", "default/web"}
    assert w.kept.compiler.ruleset() == cold_compiler.ruleset()
    with Store(directory) as store:
        store.commit([PutEndpoint(endpoint("late", "10.244.0.8"))])
    assert start(directory)[1].state is None


def test_the_keepers_child_keeps_what_a_clean_stop_keeps(state_dir: Path) -> None:
    """The keeper's child reads the rows and keeps their result; it prints the revision
    it read. It imports this package even from a directory holding another."""
    (state_dir / warm.FILE).unlink()
    with Store(state_dir) as store:
        revision = store.commit([PutEndpoint(endpoint("late", "10.244.0.8"))])
    planted = state_dir.parent / "cwd" / "stockade"
    planted.mkdir(parents=True)
    (planted / "__init__.py").write_text("raise SystemExit('the planted package ran')\n")
    out = subprocess.run([*warm.child_command(), "--state-dir", str(state_dir)],
                         capture_output=True, check=True, timeout=120, cwd=planted.parent,
                         env={**os.environ, "PYTHONPATH": str(planted.parent)})
    assert out.stdout.decode().strip() == str(revision)
    state, w = start(state_dir)
    assert w.kept is not None and w.folded == 0 and w.kept.spotless
    assert_cold(state, w, state_dir)


def test_the_keeper_keeps_once_the_agent_is_idle(state_dir: Path) -> None:
    """A revision that moved is kept after `idle` seconds without a change; a stop
    kills a child at work."""
    with Store(state_dir) as store:
        current = [store.commit([PutEndpoint(endpoint("late", "10.244.0.8"))])]
    keeper = warm.Keeper(state_dir, lambda: current[0], strict_cidr=False,
                         kept_revision=current[0] - 1, idle=0.3, interval=0.0)
    keeper.start()
    try:
        deadline = time.monotonic() + 60
        while keeper.kept_revision != current[0] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert keeper.kept_revision == current[0] and keeper.keeps == 1
        assert start(state_dir)[1].folded == 0
        time.sleep(1.0)
        assert keeper.keeps == 1  # nothing changed since: nothing to keep
    finally:
        keeper.stop()
    assert keeper._thread is not None and not keeper._thread.is_alive()


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


def test_kept_labels_are_found_by_equal_labels_in_the_next_interpreter(tmp_path: Path) -> None:
    """The file is written by one interpreter and read by another, whose string hashes
    differ: an unpickled Labels must hash as an equal one made there, or it is a
    different key in every dict and set of the warm state."""
    path = tmp_path / "labels.pickle"
    write = ("import pickle, sys; from stockade.model.labels import Labels; "
             "kept = {Labels({'app': 'web', 'tier': 'a'}): 1}; "
             "open(sys.argv[1], 'wb').write(pickle.dumps(kept))")
    read = ("import pickle, sys; from stockade.model.labels import Labels; "
            "kept = pickle.loads(open(sys.argv[1], 'rb').read()); "
            "print(Labels({'tier': 'a', 'app': 'web'}) in kept, "
            "[hash(k) == hash(Labels(dict(k))) for k in kept])")
    for code, seed in ((write, "1"), (read, "2")):
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                             check=True, timeout=60, env={**os.environ, "PYTHONHASHSEED": seed})
    assert out.stdout.decode().split() == ["True", "[True]"]
