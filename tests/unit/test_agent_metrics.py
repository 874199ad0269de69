"""Prometheus metrics: exposition format, naming rules, threads, and the HTTP server."""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.agent.daemon import Agent, AgentConfig
from stockade.agent.metrics import (
    CONTENT_TYPE,
    DATAPATH_KINDS,
    LATENCY_BUCKETS,
    Counter,
    Gauge,
    Histogram,
    MetricsServer,
    Registry,
    agent_metrics,
    parse_address,
)
from stockade.compile.ir import ADDR, AddressSet, Chain, ChainRule, Ruleset
from stockade.errors import AgentError

# ---- exposition format ------------------------------------------------------------------


def test_exposition_format_line_by_line() -> None:
    r = Registry()
    c = r.counter("stockade_api_requests_total", "Requests.\nBy op \\ code.", ("op", "code"))
    g = r.gauge("stockade_state_endpoints", "Endpoints.")
    h = r.histogram("stockade_apply_duration_seconds", "Apply time.", buckets=(0.5, 1, 2.5))
    c.inc(op="apply", code="ok")
    c.inc(2, op="apply", code="ok")
    c.inc(op='we"ird\\op\n', code="err")
    g.set(3)
    g.dec()
    g.inc(0.5)
    for v in (0.1, 0.5, 0.7, 3, 100):
        h.observe(v)
    assert r.render().splitlines() == [
        "# HELP stockade_api_requests_total Requests.\\nBy op \\\\ code.",
        "# TYPE stockade_api_requests_total counter",
        'stockade_api_requests_total{op="apply",code="ok"} 3',
        'stockade_api_requests_total{op="we\\"ird\\\\op\\n",code="err"} 1',
        "# HELP stockade_apply_duration_seconds Apply time.",
        "# TYPE stockade_apply_duration_seconds histogram",
        'stockade_apply_duration_seconds_bucket{le="0.5"} 2',  # le is inclusive
        'stockade_apply_duration_seconds_bucket{le="1"} 3',
        'stockade_apply_duration_seconds_bucket{le="2.5"} 3',
        'stockade_apply_duration_seconds_bucket{le="+Inf"} 5',
        "stockade_apply_duration_seconds_sum 104.3",
        "stockade_apply_duration_seconds_count 5",
        "# HELP stockade_state_endpoints Endpoints.",
        "# TYPE stockade_state_endpoints gauge",
        "stockade_state_endpoints 2.5",
    ]
    assert r.render().endswith("\n")


def test_unlabelled_metrics_show_zero_and_labelled_ones_no_series() -> None:
    r = Registry()
    r.counter("stockade_x_total", "x")
    r.gauge("stockade_y", "y", ("kind",))
    r.histogram("stockade_z_seconds", "z", buckets=(1,), labelnames=("op",))
    lines = r.render().splitlines()
    assert "stockade_x_total 0" in lines
    assert not [line for line in lines if line.startswith(("stockade_y", "stockade_z"))]


def test_labelled_histogram_series() -> None:
    h = Histogram("stockade_z_seconds", "z", buckets=(1, float("inf")), labelnames=("op",))
    h.observe(0.5, op="b")
    h.observe(2, op="a")
    assert h.render()[2:] == [
        'stockade_z_seconds_bucket{op="a",le="1"} 0',
        'stockade_z_seconds_bucket{op="a",le="+Inf"} 1',
        'stockade_z_seconds_sum{op="a"} 2',
        'stockade_z_seconds_count{op="a"} 1',
        'stockade_z_seconds_bucket{op="b",le="1"} 1',
        'stockade_z_seconds_bucket{op="b",le="+Inf"} 1',
        'stockade_z_seconds_sum{op="b"} 0.5',
        'stockade_z_seconds_count{op="b"} 1',
    ]
    assert h.count(op="a") == 1 and h.count(op="c") == 0


def test_labels_must_match_the_declaration() -> None:
    c = Counter("stockade_x_total", "x", ("kind",))
    with pytest.raises(ValueError, match=r"labels must be exactly \(kind\), not \(none\)"):
        c.inc()
    with pytest.raises(ValueError, match=r"not \(kind, other\)"):
        c.inc(kind="a", other="b")
    with pytest.raises(ValueError, match="cannot decrease"):
        c.inc(-1, kind="a")
    assert c.value(kind="a") == 0


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Counter("stockade_x_total", "x", ("bad-label",)), "invalid label name"),
    (lambda: Counter("stockade_x_total", "x", ("__reserved",)), "invalid label name"),
    (lambda: Gauge("stockade_x", "x", ("a", "a")), "duplicate label names"),
    (lambda: Histogram("stockade_x_seconds", "x", labelnames=("le",)), "reserved"),
    (lambda: Histogram("stockade_x_seconds", "x", buckets=(1, 1)), "strictly increasing"),
    (lambda: Histogram("stockade_x_seconds", "x", buckets=()), "at least one"),
    (lambda: Histogram("stockade_x_seconds", "x", buckets=(float("nan"),)), "finite"),
])
def test_invalid_declarations(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


# ---- naming rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(("metric", "message"), [
    (Counter("process_cpu_seconds_total", "x"), "must match"),
    (Gauge("stockade_Bad", "x"), "must match"),
    (Gauge("stockade_", "x"), "must match"),
    (Counter("stockade_applies", "x"), "a counter must end in _total"),
    (Gauge("stockade_applies_total", "x"), "a gauge must not end in _total"),
    (Histogram("stockade_applies_total", "x"), "a histogram must not end in _total"),
    (Histogram("stockade_apply_count", "x"), "must not end in _bucket, _sum, _count"),
])
def test_naming_rules_are_enforced_at_registration(metric: Counter | Gauge | Histogram,
                                                   message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Registry().register(metric)


def test_names_cannot_collide() -> None:
    r = Registry()
    r.histogram("stockade_apply_seconds", "x")
    with pytest.raises(ValueError, match="already registered"):
        r.histogram("stockade_apply_seconds", "again")
    with pytest.raises(ValueError, match=r"already registered \(stockade_apply_seconds_sum\)"):
        r.gauge("stockade_apply_seconds_sum", "clashes with the histogram's series")
    assert r.get("stockade_apply_seconds_sum") is None


# ---- threads ----------------------------------------------------------------------------------


def test_concurrent_updates_are_not_lost() -> None:
    r = Registry()
    c = r.counter("stockade_x_total", "x", ("t",))
    g = r.gauge("stockade_g", "g")
    h = r.histogram("stockade_h_seconds", "h")
    threads, n = 8, 5000
    start = threading.Barrier(threads + 1)

    def work(t: int) -> None:
        start.wait()
        for _ in range(n):
            c.inc(t=t % 2)
            g.inc()
            h.observe(0.001)
            g.dec(0.5)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    start.wait()
    for _ in range(50):
        r.render()  # scrapes while writers run
    for th in pool:
        th.join()
    assert c.value(t=0) + c.value(t=1) == threads * n
    assert g.value() == threads * n * 0.5
    assert h.count() == threads * n
    assert f"stockade_h_seconds_count {threads * n}" in r.render().splitlines()


# ---- the agent's set --------------------------------------------------------------------------


def test_agent_metrics() -> None:
    r = Registry()
    m = agent_metrics(r)
    text = r.render()
    for name in ("stockade_reconcile_apply_duration_seconds",
                 "stockade_reconcile_enforcement_latency_seconds",
                 "stockade_reconcile_applies_total", "stockade_reconcile_apply_errors_total",
                 "stockade_reconcile_drift_repairs_total", "stockade_state_endpoints",
                 "stockade_state_policies", "stockade_state_cluster_policies",
                 "stockade_state_namespaces",
                 "stockade_datapath_objects", "stockade_flows_denied_packets_total",
                 "stockade_conntrack_flows_cut_total"):
        assert f"# TYPE {name} " in text, name
    for kind in DATAPATH_KINDS:
        assert f'stockade_datapath_objects{{kind="{kind}"}} 0' in text
    assert LATENCY_BUCKETS[0] == 0.0005 and LATENCY_BUCKETS[-1] == 10
    assert 'stockade_reconcile_enforcement_latency_seconds_bucket{le="0.0005"} 0' in text
    m.applies.inc()
    m.apply_duration.observe(0.003)
    m.datapath_objects.set(12, kind="rules")
    text = r.render()
    assert "stockade_reconcile_applies_total 1" in text
    assert 'stockade_datapath_objects{kind="rules"} 12' in text
    with pytest.raises(ValueError, match="already registered"):
        agent_metrics(r)


# ---- addresses and HTTP -------------------------------------------------------------------


@pytest.mark.parametrize(("address", "parsed"), [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)),
    ("[::1]:9464", ("::1", 9464)),
    (":9464", ("", 9464)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
    ("[fe80::1%eth0]:1", ("fe80::1%eth0", 1)),
])
def test_parse_address(address: str, parsed: tuple[str, int]) -> None:
    assert parse_address(address) == parsed


@pytest.mark.parametrize(("address", "message"), [
    ("", "expected HOST:PORT"),
    ("9464", "no port"),
    ("127.0.0.1", "no port"),
    ("::1:9464", "needs brackets"),
    ("[::1]9464", "expected HOST:PORT"),
    ("[::1:9464", "expected HOST:PORT"),
    ("[127.0.0.1]:9464", "expected HOST:PORT"),
    ("localhost:9464", "'localhost' is not an IP address"),
    ("127.0.0.1:65536", "port must be 0-65535"),
    ("127.0.0.1:-1", "port must be 0-65535"),
    ("127.0.0.1:http", "port must be 0-65535"),
    ("127.0.0.1:", "port must be 0-65535"),
])
def test_invalid_addresses(address: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_address(address)
    with pytest.raises(ValueError, match=r"invalid metrics address"):
        MetricsServer(Registry(), address)


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


@pytest.fixture
def served() -> Iterator[tuple[MetricsServer, Registry]]:
    r = Registry()
    agent_metrics(r).applies.inc(3)
    server = MetricsServer(r, "127.0.0.1:0")
    server.start()
    yield server, r
    server.stop()


def test_http_metrics_and_healthz(served: tuple[MetricsServer, Registry]) -> None:
    server, registry = served
    assert server.port != 0
    base = f"http://127.0.0.1:{server.port}"
    status, ctype, body = get(base + "/metrics")
    assert (status, ctype) == (200, CONTENT_TYPE)
    assert body == registry.render()
    assert "stockade_reconcile_applies_total 3" in body.splitlines()
    assert get(base + "/metrics?x=1")[0] == 200
    assert get(base + "/healthz")[::2] == (200, "ok\n")
    assert get(base + "/other")[0] == 404


def test_http_health_callback(served: tuple[MetricsServer, Registry]) -> None:
    healthy = [True]
    server = MetricsServer(served[1], "127.0.0.1:0", health=lambda: healthy[0])
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/healthz"
        assert get(url)[0] == 200
        healthy[0] = False
        assert get(url)[::2] == (503, "unhealthy\n")
    finally:
        server.stop()


def test_stop_closes_the_port_and_a_taken_port_is_an_agent_error(
        served: tuple[MetricsServer, Registry]) -> None:
    server, registry = served
    port = server.port
    with pytest.raises(AgentError, match=rf"cannot serve metrics on 127\.0\.0\.1:{port}"):
        MetricsServer(registry, f"127.0.0.1:{port}").start()
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_http_over_ipv6() -> None:
    server = MetricsServer(Registry(), "[::1]:0")
    server.start()
    try:
        assert get(f"http://[::1]:{server.port}/healthz")[0] == 200
    finally:
        server.stop()


def test_no_host_listens_on_every_address() -> None:
    server = MetricsServer(Registry(), ":0")
    server.start()
    try:
        assert get(f"http://127.0.0.1:{server.port}/healthz")[0] == 200
        if socket.has_dualstack_ipv6() and _has_ipv6_loopback():
            assert get(f"http://[::1]:{server.port}/healthz")[0] == 200
    finally:
        server.stop()


def test_exposition_is_read_back_by_the_standard_parser() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    r = Registry()
    m = agent_metrics(r)
    m.api_requests.inc(op='we"ird\\op\n', code="ok")
    m.apply_duration.observe(0.003)
    families = {f.name: f for f in text_string_to_metric_families(r.render())}
    assert families["stockade_api_requests"].type == "counter"
    assert [s.labels for s in families["stockade_api_requests"].samples] == [
        {"op": 'we"ird\\op\n', "code": "ok"}]
    hist = families["stockade_reconcile_apply_duration_seconds"]
    assert hist.type == "histogram"
    assert {s.name: s.value for s in hist.samples if s.name.endswith(("_sum", "_count"))} == {
        "stockade_reconcile_apply_duration_seconds_sum": 0.003,
        "stockade_reconcile_apply_duration_seconds_count": 1}
    assert not [f for f in families if f.endswith("_created")]


def test_refresh_runs_before_each_render_and_a_failing_one_spoils_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    r = Registry()
    g = r.gauge("stockade_test_reads", "Renders so far.")
    calls: list[int] = []

    def count() -> None:
        calls.append(1)
        g.set(len(calls))

    r.refresh_with(count)

    def broken() -> None:
        raise RuntimeError("no count")

    r.refresh_with(broken)
    assert "stockade_test_reads 1" in r.render()
    assert "stockade_test_reads 2" in r.render()
    assert "refreshing metrics before a scrape failed" in caplog.text


def test_the_agents_datapath_objects_are_counted_when_read(tmp_path: Path) -> None:
    """Counted on a scrape, once per ruleset, not on every change (agent/daemon.py)."""
    counted: list[Ruleset] = []

    class Counting(Ruleset):
        def counts(self) -> dict[str, int]:
            counted.append(self)
            return super().counts()

    agent = Agent(AgentConfig(state_dir=str(tmp_path)))
    rule = ChainRule(4, "s4-a", None, "tcp", ((80, 80),))
    chain = Chain("c-1", "in", (rule, rule))
    first = Counting({"s4-a": AddressSet("s4-a", 4, ADDR, frozenset({"10.0.0.1", "10.0.0.2"}))},
                     {"c-1": chain}, {"10.0.0.1": "c-1"}, {"10.0.0.2": "c-1"})
    agent._ruleset = first
    text = agent.registry.render()
    for kind, value in (("sets", 1), ("set_elements", 2), ("chains", 1), ("rules", 2),
                        ("map_entries", 2)):
        assert f'stockade_datapath_objects{{kind="{kind}"}} {value}' in text
    agent.registry.render()
    assert counted == [first]  # the same ruleset: not counted again
    agent._ruleset = Counting()
    assert 'stockade_datapath_objects{kind="chains"} 0' in agent.registry.render()
    assert len(counted) == 2
