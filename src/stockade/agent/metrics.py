"""Prometheus metrics with the standard library only: a registry, three metric
types, the text exposition format 0.0.4, and a small HTTP server.

Why not prometheus_client: the agent needs a dozen metrics and one endpoint;
a dependency on every node for that is not worth it, and owning the code lets
the naming rules be enforced where metrics are declared.

Naming rules, checked at registration (ValueError): names match
``^stockade_[a-z0-9_]+$`` (``stockade_<subsystem>_<name>_<unit>``), counters
end in ``_total`` and nothing else does, and no two metrics expose the same
series name (a histogram ``x`` also owns ``x_bucket``, ``x_sum``, ``x_count``).

Every metric is thread-safe (one lock each); :meth:`Registry.render` reads each
metric under its lock, so a scrape never sees a histogram whose count and
buckets disagree.

Public API::

    Registry().counter(name, help, labelnames=()) -> Counter     # or register(Counter(...))
    Registry().gauge(name, help, labelnames=()) -> Gauge
    Registry().histogram(name, help, buckets=LATENCY_BUCKETS, labelnames=()) -> Histogram
    Registry.render() -> str
    Counter.inc(amount=1, **labels)
    Gauge.set(value, **labels) / .inc(amount=1, **labels) / .dec(amount=1, **labels)
    Histogram.observe(value, **labels)
    parse_address("127.0.0.1:9464" | "[::1]:9464" | ":9464") -> (host, port)
    MetricsServer(registry, address, health=None).start() / .stop() / .port
    agent_metrics(registry) -> AgentMetrics
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools
import logging
import math
import re
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, TypeVar, cast

from stockade.errors import AgentError

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# From half a millisecond (one small nft transaction) to ten seconds (a sync timeout's order).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)
DATAPATH_KINDS = ("sets", "set_elements", "chains", "rules", "map_entries")

_NAME = re.compile(r"^stockade_[a-z0-9_]+$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

_M = TypeVar("_M", bound="Metric")
Key = tuple[str, ...]


# ---- metrics ------------------------------------------------------------------------


class Metric:
    """What all metric types share: name, help, label names and the lock."""

    kind: ClassVar[str] = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        _check_labelnames(self.labelnames, self._reserved_labels())
        self._lock = threading.Lock()

    def exposed_names(self) -> tuple[str, ...]:
        """The series names this metric writes (for collision checks)."""
        return (self.name,)

    def render(self) -> list[str]:
        """HELP, TYPE and every sample line."""
        with self._lock:
            samples = self._samples()
        return [f"# HELP {self.name} {_escape_help(self.help)}",
                f"# TYPE {self.name} {self.kind}", *samples]

    def _samples(self) -> list[str]:
        raise NotImplementedError

    def _reserved_labels(self) -> frozenset[str]:
        return frozenset()

    def _key(self, labels: Mapping[str, object]) -> Key:
        """The series key; the labels given must be exactly the declared ones."""
        if len(labels) != len(self.labelnames) or set(labels) != set(self.labelnames):
            want = ", ".join(self.labelnames) or "none"
            raise ValueError(f"{self.name}: labels must be exactly ({want}),"
                             f" not ({', '.join(sorted(labels)) or 'none'})")
        return tuple(str(labels[n]) for n in self.labelnames)

    def _labels(self, key: Key, extra: Iterable[tuple[str, str]] = ()) -> str:
        pairs = [*zip(self.labelnames, key, strict=True), *extra]
        if not pairs:
            return ""
        return "{" + ",".join(f'{n}="{_escape_label(v)}"' for n, v in pairs) + "}"


class _Scalar(Metric):
    """A metric with one number per series (counter, gauge)."""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        # Unlabelled metrics exist from the start, so a scrape shows 0, not nothing.
        self._values: dict[Key, float] = {} if self.labelnames else {(): 0.0}

    def value(self, **labels: object) -> float:
        """The current value of one series (0 when never touched)."""
        key = self._key(labels)
        with self._lock:
            return self._values.get(key, 0.0)

    def _add(self, amount: float, labels: Mapping[str, object]) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def _samples(self) -> list[str]:
        return [f"{self.name}{self._labels(k)} {_number(v)}"
                for k, v in sorted(self._values.items())]


class Counter(_Scalar):
    """A count that only goes up (restarts reset it; Prometheus' rate() copes)."""

    kind = "counter"

    def inc(self, amount: float = 1, **labels: object) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot decrease (inc({amount}))")
        self._add(amount, labels)


class Gauge(_Scalar):
    """A value that goes up and down."""

    kind = "gauge"

    def set(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1, **labels: object) -> None:
        self._add(amount, labels)

    def dec(self, amount: float = 1, **labels: object) -> None:
        self._add(-amount, labels)


@dataclass
class _Series:
    """One histogram series: per-bucket (not cumulative) counts, sum, count."""

    buckets: list[int]
    sum: float = 0.0
    count: int = 0


class Histogram(Metric):
    """A distribution over fixed upper bounds (``le`` is inclusive; ``+Inf`` added)."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float] = LATENCY_BUCKETS,
                 labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self.bounds = _check_buckets(name, buckets)
        self._series: dict[Key, _Series] = {} if self.labelnames else {(): self._new()}

    def exposed_names(self) -> tuple[str, ...]:
        return tuple(self.name + s for s in _HISTOGRAM_SUFFIXES)

    def observe(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        index = bisect.bisect_left(self.bounds, value)  # first bound >= value
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = self._new()
            series.buckets[index] += 1
            series.sum += value
            series.count += 1

    def count(self, **labels: object) -> int:
        key = self._key(labels)
        with self._lock:
            series = self._series.get(key)
            return 0 if series is None else series.count

    def _new(self) -> _Series:
        return _Series([0] * (len(self.bounds) + 1))  # the last one is +Inf

    def _reserved_labels(self) -> frozenset[str]:
        return frozenset({"le"})

    def _samples(self) -> list[str]:
        lines = []
        for key, s in sorted(self._series.items()):
            cumulative = 0
            for bound, n in zip([*self.bounds, math.inf], s.buckets, strict=True):
                cumulative += n
                le = self._labels(key, [("le", _number(bound))])
                lines.append(f"{self.name}_bucket{le} {cumulative}")
            lines.append(f"{self.name}_sum{self._labels(key)} {_number(s.sum)}")
            lines.append(f"{self.name}_count{self._labels(key)} {s.count}")
        return lines


# ---- registry -----------------------------------------------------------------------


class Registry:
    """The set of metrics one process exposes; enforces the naming rules."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[str, Metric] = {}
        self._exposed: set[str] = set()

    def register(self, metric: _M) -> _M:
        check_name(metric)
        with self._lock:
            taken = self._exposed.intersection(metric.exposed_names())
            if taken:
                raise ValueError(f"{metric.name}: already registered"
                                 f" ({', '.join(sorted(taken))})")
            self._metrics[metric.name] = metric
            self._exposed.update(metric.exposed_names())
        return metric

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        return self.register(Counter(name, help, labelnames))

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self.register(Gauge(name, help, labelnames))

    def histogram(self, name: str, help: str, buckets: Sequence[float] = LATENCY_BUCKETS,
                  labelnames: Sequence[str] = ()) -> Histogram:
        return self.register(Histogram(name, help, buckets, labelnames))

    def get(self, name: str) -> Metric | None:
        with self._lock:
            return self._metrics.get(name)

    def render(self) -> str:
        """The text exposition format 0.0.4, metrics sorted by name."""
        with self._lock:
            metrics = [self._metrics[n] for n in sorted(self._metrics)]
        return "".join(line + "\n" for m in metrics for line in m.render())


def check_name(metric: Metric) -> None:
    """The naming rules of the module docstring; ValueError naming the metric."""
    name = metric.name
    if not _NAME.match(name):
        raise ValueError(f"metric name {name!r} must match {_NAME.pattern}"
                         " (stockade_<subsystem>_<name>_<unit>)")
    if isinstance(metric, Counter) != name.endswith("_total"):
        rule = "must" if isinstance(metric, Counter) else "must not"
        raise ValueError(f"metric name {name!r}: a {metric.kind} {rule} end in _total")
    if isinstance(metric, Histogram) and name.endswith(_HISTOGRAM_SUFFIXES):
        raise ValueError(f"metric name {name!r}: a histogram must not end in"
                         f" {', '.join(_HISTOGRAM_SUFFIXES)}")


def _check_labelnames(names: tuple[str, ...], reserved: frozenset[str]) -> None:
    for n in names:
        if not _LABEL.match(n) or n.startswith("__"):
            raise ValueError(f"invalid label name {n!r}")
        if n in reserved:
            raise ValueError(f"label name {n!r} is reserved for this metric type")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate label names in {names}")


def _check_buckets(name: str, buckets: Sequence[float]) -> tuple[float, ...]:
    """Strictly increasing finite bounds; a trailing +Inf is implied, so dropped."""
    bounds = [float(b) for b in buckets]
    if bounds and bounds[-1] == math.inf:
        bounds.pop()
    if not bounds:
        raise ValueError(f"{name}: a histogram needs at least one finite bucket")
    if any(not math.isfinite(b) for b in bounds) \
            or any(a >= b for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"{name}: buckets must be finite and strictly increasing: {buckets}")
    return tuple(bounds)


def _number(v: float) -> str:
    """Go's formatting of floats as Prometheus clients write them ("1", "0.25", "+Inf")."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# ---- the agent's metrics ------------------------------------------------------------


@dataclass(frozen=True)
class AgentMetrics:
    """Every metric the agent exposes, declared once (see :func:`agent_metrics`)."""

    apply_duration: Histogram
    enforcement_latency: Histogram
    applies: Counter
    apply_errors: Counter
    drift_repairs: Counter
    endpoints: Gauge
    policies: Gauge
    namespaces: Gauge
    datapath_objects: Gauge
    flows_denied_packets: Counter
    conntrack_flows_cut: Counter
    store_commit_duration: Histogram
    api_requests: Counter


def agent_metrics(registry: Registry) -> AgentMetrics:
    """Register the agent's metrics; the datapath kinds start at 0 so dashboards
    see every series from the first scrape."""
    r = registry
    m = AgentMetrics(
        apply_duration=r.histogram(
            "stockade_reconcile_apply_duration_seconds",
            "Time one datapath apply took (compile delta, kernel transaction, verify)."),
        enforcement_latency=r.histogram(
            "stockade_reconcile_enforcement_latency_seconds",
            "Time from a change being accepted (committed) to the kernel enforcing it."),
        applies=r.counter("stockade_reconcile_applies_total",
                          "Datapath applies that succeeded."),
        apply_errors=r.counter("stockade_reconcile_apply_errors_total",
                               "Datapath applies the kernel refused or that failed."),
        drift_repairs=r.counter(
            "stockade_reconcile_drift_repairs_total",
            "Times the kernel's ruleset differed from the desired one and was repaired."),
        endpoints=r.gauge("stockade_state_endpoints", "Endpoints in the agent's state."),
        policies=r.gauge("stockade_state_policies", "NetworkPolicies in the agent's state."),
        namespaces=r.gauge("stockade_state_namespaces", "Namespaces in the agent's state."),
        datapath_objects=r.gauge(
            "stockade_datapath_objects",
            "Objects in the kernel datapath by kind (" + ", ".join(DATAPATH_KINDS) + ").",
            ("kind",)),
        flows_denied_packets=r.counter(
            "stockade_flows_denied_packets_total",
            "Packets of new connections dropped by policy (as logged)."),
        conntrack_flows_cut=r.counter(
            "stockade_conntrack_flows_cut_total",
            "Established connections removed from conntrack because policy now denies them."),
        store_commit_duration=r.histogram(
            "stockade_store_commit_duration_seconds",
            "Time one durable state store commit took (fsync included)."),
        api_requests=r.counter("stockade_api_requests_total",
                               "Local API requests by operation and result code.",
                               ("op", "code")),
    )
    for kind in DATAPATH_KINDS:
        m.datapath_objects.set(0, kind=kind)
    return m


# ---- HTTP ---------------------------------------------------------------------------


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` with an IP literal host, IPv6 in brackets, or no host (every
    address). ValueError with the accepted forms on anything else."""
    forms = "expected HOST:PORT such as 127.0.0.1:9464, [::1]:9464 or :9464"
    if not isinstance(address, str) or not address:
        raise ValueError(f"invalid metrics address {address!r}: {forms}")
    if address.startswith("["):
        host, bracket, rest = address[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"invalid metrics address {address!r}: {forms}")
        port_text = rest[1:]
        _check_ip(host, 6, address, forms)
    else:
        host, colon, port_text = address.rpartition(":")
        if not colon:
            raise ValueError(f"invalid metrics address {address!r}: no port; {forms}")
        if ":" in host:
            raise ValueError(f"invalid metrics address {address!r}: an IPv6 address"
                             f" needs brackets, as in [::1]:9464")
        if host:
            _check_ip(host, 4, address, forms)
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ValueError(f"invalid metrics address {address!r}: port must be 0-65535")
    return host, int(port_text)


def _check_ip(host: str, version: int, address: str, forms: str) -> None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"invalid metrics address {address!r}: {host!r} is not an"
                         f" IP address; {forms}") from None
    if ip.version != version:
        raise ValueError(f"invalid metrics address {address!r}: {forms}")


class _Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer for one address family; no reverse DNS at bind time."""

    daemon_threads = True

    def __init__(self, host: str, port: int, registry: Registry,
                 health: Callable[[], bool] | None) -> None:
        self.registry = registry
        self.health = health
        self.dualstack = not host and socket.has_dualstack_ipv6()
        if self.dualstack:
            host = "::"
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        if self.dualstack:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # HTTPServer.server_bind would call getfqdn(), a DNS lookup that can hang.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


class _Handler(BaseHTTPRequestHandler):
    server_version = "stockade-metrics"
    timeout = 10  # a stalled scraper cannot hold a thread forever

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        server = cast(_Server, self.server)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            status, ctype, body = 200, CONTENT_TYPE, server.registry.render().encode()
        elif path == "/healthz":
            ok = _healthy(server.health)
            status, ctype, body = (200 if ok else 503), "text/plain; charset=utf-8", \
                b"ok\n" if ok else b"unhealthy\n"
        else:
            status, ctype, body = 404, "text/plain; charset=utf-8", b"not found\n"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics %s: " + format, self.client_address[0], *args)


def _healthy(health: Callable[[], bool] | None) -> bool:
    if health is None:
        return True
    try:
        return bool(health())
    except Exception:
        log.exception("health check failed")
        return False


class MetricsServer:
    """Serves ``GET /metrics`` and ``GET /healthz`` from a background thread.

    The address is checked at construction (ValueError); binding happens in
    :meth:`start` (AgentError when the port is taken or not permitted).
    `health`, if given, decides whether /healthz answers 200 or 503.
    """

    def __init__(self, registry: Registry, address: str,
                 health: Callable[[], bool] | None = None) -> None:
        self.registry = registry
        self.address = address
        self.host, self._port = parse_address(address)
        self.health = health
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port listened on: the kernel's choice when 0 was asked for."""
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._port

    def start(self) -> None:
        if self._server is not None:
            return
        try:
            server = _Server(self.host, self._port, self.registry, self.health)
        except OSError as exc:
            raise AgentError(f"cannot serve metrics on {self.address}: {exc}") from exc
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="metrics",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()
        log.info("serving metrics on %s port %d", self.host or "*", self.port)

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
