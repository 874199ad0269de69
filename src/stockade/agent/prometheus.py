"""The metrics machinery: prometheus_client behind stockade's naming rules, and a
small HTTP server for ``/metrics`` and ``/healthz``.

prometheus_client (the standard client) holds the values (thread-safe, one lock
per value) and the samples; this module adds what it does not do, or not as
stockade did before it:

* Naming rules, checked at registration (ValueError): names match
  ``^stockade_[a-z0-9_]+$`` (``stockade_<subsystem>_<name>_<unit>``), counters
  end in ``_total`` and nothing else does, and no two metrics expose the same
  series name (a histogram ``x`` also owns ``x_bucket``, ``x_sum``, ``x_count``).
  Label names and buckets are checked at declaration.
* One calling convention, labels as keywords: ``c.inc(op="apply", code="ok")``;
  the labels given must be exactly the declared ones.
* The text exposition format 0.0.4, unchanged from the hand-made version (see
  :func:`render_metric`): metrics sorted by name, series by label values.
* The HTTP server: prometheus_client's serves the metrics on every path, has no
  health endpoint and resolves its own name at bind time (a DNS lookup that can
  hang); ours answers ``/metrics``, ``/healthz`` (200, or 503 when the health
  callback says so or raises), ``/status`` (the agent's report as JSON, when given
  one: what ``kubectl stockade status`` reads) and 404 otherwise, on IPv4, IPv6 or
  both.

Public API::

    Registry().counter(name, help, labelnames=()) -> Counter     # or register(Counter(...))
    Registry().gauge(name, help, labelnames=()) -> Gauge
    Registry().histogram(name, help, buckets=LATENCY_BUCKETS, labelnames=()) -> Histogram
    Registry.render() -> str
    Registry.refresh_with(fn)                                    # fn() before each render
    Counter.inc(amount=1, **labels) / .value(**labels)
    Gauge.set(value, **labels) / .inc(amount=1, **labels) / .dec(amount=1, **labels) / .value()
    Histogram.observe(value, **labels) / .count(**labels)
    parse_address("127.0.0.1:9464" | "[::1]:9464" | ":9464") -> (host, port)
    MetricsServer(registry, address, health=None).start() / .stop() / .port
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import logging
import math
import re
import socket
import socketserver
import threading
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, TypeVar, cast

import prometheus_client
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.samples import Sample

from stockade.errors import AgentError

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# From half a millisecond (one small nft transaction) to ten seconds (a sync timeout's order).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)

_NAME = re.compile(r"^stockade_[a-z0-9_]+$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

_M = TypeVar("_M", bound="Metric")
Key = tuple[str, ...]


# ---- metrics ------------------------------------------------------------------------


class Metric:
    """What all metric types share: name, help, label names, the client's metric."""

    kind: ClassVar[str] = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        _check_labelnames(self.labelnames, self._reserved_labels())

    @property
    def client(self) -> MetricWrapperBase:
        """The prometheus_client metric behind this one."""
        raise NotImplementedError

    def exposed_names(self) -> tuple[str, ...]:
        """The series names this metric writes (for collision checks)."""
        return (self.name,)

    def render(self) -> list[str]:
        """HELP, TYPE and every sample line."""
        return render_metric(self)

    def _reserved_labels(self) -> frozenset[str]:
        return frozenset()

    def _key(self, labels: Mapping[str, object]) -> Key:
        """The series key; the labels given must be exactly the declared ones."""
        if len(labels) != len(self.labelnames) or set(labels) != set(self.labelnames):
            want = ", ".join(self.labelnames) or "none"
            raise ValueError(f"{self.name}: labels must be exactly ({want}),"
                             f" not ({', '.join(sorted(labels)) or 'none'})")
        return tuple(str(labels[n]) for n in self.labelnames)

    def _child(self, labels: Mapping[str, object]) -> Any:
        key = self._key(labels)
        return self.client.labels(*key) if key else self.client

    def _sample(self, name: str, labels: Mapping[str, object]) -> float:
        """The value of one sample as a scrape would see it (0 when never touched)."""
        want = dict(zip(self.labelnames, self._key(labels), strict=True))
        for family in self.client.collect():
            for s in family.samples:
                if s.name == name and s.labels == want:
                    return float(s.value)
        return 0.0


class Counter(Metric):
    """A count that only goes up (restarts reset it; Prometheus' rate() copes)."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._client = prometheus_client.Counter(name, help, self.labelnames, registry=None)

    @property
    def client(self) -> prometheus_client.Counter:
        return self._client

    def inc(self, amount: float = 1, **labels: object) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot decrease (inc({amount}))")
        self._child(labels).inc(amount)

    def value(self, **labels: object) -> float:
        """The current value of one series (0 when never touched)."""
        name = self.name if self.name.endswith("_total") else self.name + "_total"
        return self._sample(name, labels)


class Gauge(Metric):
    """A value that goes up and down."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._client = prometheus_client.Gauge(name, help, self.labelnames, registry=None)

    @property
    def client(self) -> prometheus_client.Gauge:
        return self._client

    def set(self, value: float, **labels: object) -> None:
        self._child(labels).set(value)

    def inc(self, amount: float = 1, **labels: object) -> None:
        self._child(labels).inc(amount)

    def dec(self, amount: float = 1, **labels: object) -> None:
        self._child(labels).dec(amount)

    def value(self, **labels: object) -> float:
        """The current value of one series (0 when never touched)."""
        return self._sample(self.name, labels)


class Histogram(Metric):
    """A distribution over fixed upper bounds (``le`` is inclusive; ``+Inf`` added)."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float] = LATENCY_BUCKETS,
                 labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self.bounds = _check_buckets(name, buckets)
        self._client = prometheus_client.Histogram(
            name, help, self.labelnames, registry=None, buckets=(*self.bounds, math.inf))

    @property
    def client(self) -> prometheus_client.Histogram:
        return self._client

    def exposed_names(self) -> tuple[str, ...]:
        return tuple(self.name + s for s in _HISTOGRAM_SUFFIXES)

    def observe(self, value: float, **labels: object) -> None:
        self._child(labels).observe(value)

    def count(self, **labels: object) -> int:
        return int(self._sample(self.name + "_count", labels))

    def _reserved_labels(self) -> frozenset[str]:
        return frozenset({"le"})


# ---- registry -----------------------------------------------------------------------


class Registry:
    """The set of metrics one process exposes; enforces the naming rules."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[str, Metric] = {}
        self._exposed: set[str] = set()
        self._client = prometheus_client.CollectorRegistry(auto_describe=True)
        self._refresh: list[Callable[[], None]] = []

    def register(self, metric: _M) -> _M:
        check_name(metric)
        with self._lock:
            taken = self._exposed.intersection(metric.exposed_names())
            if taken:
                raise ValueError(f"{metric.name}: already registered"
                                 f" ({', '.join(sorted(taken))})")
            self._client.register(metric.client)
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

    def refresh_with(self, fn: Callable[[], None]) -> None:
        """Call `fn` before each render: values worth working out only when they are
        read (counting a large ruleset's objects, say) are set there, not on every change."""
        with self._lock:
            self._refresh.append(fn)

    def render(self) -> str:
        """The text exposition format 0.0.4, metrics sorted by name."""
        with self._lock:
            refresh = list(self._refresh)
        for fn in refresh:
            try:
                fn()
            except Exception:  # the other metrics are still worth serving
                log.exception("refreshing metrics before a scrape failed")
        with self._lock:
            metrics = [self._metrics[n] for n in sorted(self._metrics)]
        return "".join(line + "\n" for m in metrics for line in render_metric(m))


def render_metric(metric: Metric) -> list[str]:
    """HELP, TYPE and the samples of one metric, series sorted by label values.

    Written here rather than by prometheus_client.generate_latest so that the
    exposition stays what it was: integral values and bounds as Go writes them
    ("3", ``le="1"``, not "3.0", ``le="1.0"``), a histogram's ``_sum`` before its
    ``_count``, and no ``_created`` series.
    """
    wanted = set(metric.exposed_names())
    rank = {metric.name + "_sum": 1, metric.name + "_count": 2}
    series: dict[Key, list[Sample]] = {}
    for family in metric.client.collect():
        for s in family.samples:
            if s.name in wanted:
                key = tuple(v for n, v in s.labels.items() if n != "le")
                series.setdefault(key, []).append(s)
    lines = [f"# HELP {metric.name} {_escape_help(metric.help)}",
             f"# TYPE {metric.name} {metric.kind}"]
    for key in sorted(series):
        # Stable: the buckets keep their order, then _sum, then _count.
        for s in sorted(series[key], key=lambda s: rank.get(s.name, 0)):
            labels = ",".join(f'{n}="{_number(float(v)) if n == "le" else _escape_label(v)}"'
                              for n, v in s.labels.items())
            lines.append(f"{s.name}{{{labels}}} {_number(s.value)}" if labels
                         else f"{s.name} {_number(s.value)}")
    return lines


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
                 health: Callable[[], bool] | None,
                 status: Callable[[], dict[str, Any]] | None = None) -> None:
        self.registry = registry
        self.health = health
        self.status = status
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
        elif path == "/status" and server.status is not None:
            try:
                body = (json.dumps(server.status(), sort_keys=True) + "\n").encode()
                status, ctype = 200, "application/json"
            except Exception:  # a broken report is an error answer, not a dead server
                log.exception("status report failed")
                status, ctype, body = 500, "text/plain; charset=utf-8", b"error\n"
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
    except Exception:  # a broken health check is an unhealthy agent, not a dead server
        log.exception("health check failed")
        return False


class MetricsServer:
    """Serves ``GET /metrics`` and ``GET /healthz`` from a background thread.

    The address is checked at construction (ValueError); binding happens in
    :meth:`start` (AgentError when the port is taken or not permitted).
    `health`, if given, decides whether /healthz answers 200 or 503.
    """

    def __init__(self, registry: Registry, address: str,
                 health: Callable[[], bool] | None = None,
                 status: Callable[[], dict[str, Any]] | None = None) -> None:
        self.registry = registry
        self.address = address
        self.host, self._port = parse_address(address)
        self.health = health
        self.status = status  # GET /status: this JSON object (kubectl stockade status)
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
            server = _Server(self.host, self._port, self.registry, self.health, self.status)
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
