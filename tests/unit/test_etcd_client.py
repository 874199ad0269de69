"""The etcd client against a real etcd on loopback (started by the test): ranges in
pages at one revision, transactions comparing mod revisions, watches from a revision,
compaction, an outage, and the pure helpers."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from tests.support.etcd import EtcdServer, etcd_binary

from stockade.etcd.client import (
    Compacted,
    EtcdClient,
    EtcdError,
    Unavailable,
    b64,
    prefix_end,
)

needs_etcd = pytest.mark.skipif(etcd_binary() is None, reason="etcd is not installed")


def test_prefix_end() -> None:
    assert prefix_end("/stockade/pods/") == b"/stockade/pods0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"


@needs_etcd
def test_list_is_paged_at_one_revision(etcd: EtcdServer) -> None:
    with etcd.client() as c:
        for i in range(25):
            c.put(f"/p/k{i:02}", f"v{i}")
        c.put("/q/outside", "x")
        header, kvs = c.list_prefix("/p/", page=7)
        assert [kv.key for kv in kvs] == [f"/p/k{i:02}" for i in range(25)]
        assert header.revision == 27  # 1 (the first revision) + 26 puts
        assert all(kv.mod_revision <= header.revision for kv in kvs)
        kv = c.get("/p/k03")
        assert kv is not None and kv.value == b"v3"


@needs_etcd
def test_a_transaction_compares_mod_revisions(etcd: EtcdServer) -> None:
    with etcd.client() as c:
        put = {"request_put": {"key": b64("/k"), "value": b64("one")}}
        absent = {"key": b64("/k"), "target": "MOD", "result": "EQUAL", "mod_revision": "0"}
        first = c.txn([absent], [put])
        assert first.succeeded
        again = c.txn([absent], [put], [{"request_range": {"key": b64("/k")}}])
        assert not again.succeeded  # another writer got there first: nothing written
        kv = again.responses[0]["response_range"]["kvs"][0]
        assert int(kv["mod_revision"]) == first.revision
        same = {**absent, "mod_revision": str(first.revision)}
        assert c.txn([same], [{"request_delete_range": {"key": b64("/k")}}]).succeeded
        assert c.get("/k") is None


@needs_etcd
def test_watch_from_a_revision_and_compaction(etcd: EtcdServer) -> None:
    with etcd.client() as c:
        r1 = c.put("/w/a", "1")
        c.put("/w/b", "2")
        c.delete("/w/a")
        events = []
        for wr in c.watch("/w/", r1, read_timeout=5):
            events += [(e.type, e.kv.key, e.kv.value) for e in wr.events]
            if len(events) == 3:
                break
        assert events == [("PUT", "/w/a", b"1"), ("PUT", "/w/b", b"2"), ("DELETE", "/w/a", b"")]
        etcd.compact()
        with pytest.raises(Compacted):
            for _ in c.watch("/w/", r1, read_timeout=5):
                pass
        with pytest.raises(Compacted):
            c.range("/w/", prefix=True, revision=r1)


@needs_etcd
def test_an_outage_is_unavailable_and_ends_a_watch(etcd: EtcdServer) -> None:
    with etcd.client(timeout=2.0) as c:
        rev = c.put("/o/a", "1")
        ended: list[BaseException] = []

        def watch() -> None:
            try:
                for _ in c.watch("/o/", rev + 1, read_timeout=30):
                    pass
            except Exception as e:
                ended.append(e)

        t = threading.Thread(target=watch)
        t.start()
        etcd.kill()
        t.join(10)
        assert not t.is_alive() and ended and isinstance(ended[0], Unavailable)
        with pytest.raises(Unavailable):
            c.put("/o/b", "2")
        etcd.start()
        assert c.put("/o/b", "2") > rev  # the data survived the restart


def test_failover_to_the_next_endpoint(tmp_path: Path) -> None:
    if etcd_binary() is None:
        pytest.skip("etcd is not installed")
    with EtcdServer(tmp_path) as etcd, EtcdClient(["http://127.0.0.1:1", etcd.url],
                                                  timeout=2.0) as c:
        assert c.put("/f", "x") > 0
        assert c.server == etcd.url


def test_tls_with_client_certificates(tmp_path: Path) -> None:
    import shutil

    from stockade.etcd.client import TlsConfig

    if etcd_binary() is None or shutil.which("openssl") is None:
        pytest.skip("etcd or openssl is not installed")
    with EtcdServer(tmp_path, tls=True) as etcd:
        assert etcd.url.startswith("https://") and etcd.tls is not None
        with etcd.client() as c:  # the CA, and this client's certificate
            rev = c.put("/t", "x")
            assert c.get("/t") is not None
            events = next(iter(c.watch("/t", rev, read_timeout=5)))
            assert events.created or events.events
        # Without a client certificate etcd refuses the connection.
        with EtcdClient([etcd.url], timeout=2.0, tls=TlsConfig(ca=etcd.tls.ca)) as c, \
                pytest.raises(EtcdError):
            c.put("/t", "y")
        # A server whose certificate is not from the configured CA is refused.
        with EtcdClient([etcd.url], timeout=2.0) as c, pytest.raises(EtcdError):
            c.put("/t", "z")
