"""The agent's metrics, declared once: names, types, help, labels.

The machinery (registry, metric types, naming rules, exposition, the HTTP
server for ``/metrics`` and ``/healthz``) is :mod:`stockade.agent.prometheus`,
over prometheus_client; its public names are re-exported here, so the agent
imports everything metrics from this module.

Public API::

    agent_metrics(Registry()) -> AgentMetrics     # every metric the agent exposes
    MetricsServer(registry, address, health=None).start() / .stop() / .port
    Registry, Counter, Gauge, Histogram, parse_address, CONTENT_TYPE, LATENCY_BUCKETS
"""

from __future__ import annotations

from dataclasses import dataclass

from stockade.agent.prometheus import (
    CONTENT_TYPE,
    LATENCY_BUCKETS,
    Counter,
    Gauge,
    Histogram,
    Metric,
    MetricsServer,
    Registry,
    check_name,
    parse_address,
)

__all__ = [
    "CONTENT_TYPE", "DATAPATH_KINDS", "LATENCY_BUCKETS", "AgentMetrics", "Counter", "Gauge",
    "Histogram", "Metric", "MetricsServer", "Registry", "agent_metrics", "check_name",
    "parse_address",
]

DATAPATH_KINDS = ("sets", "set_elements", "chains", "rules", "map_entries")


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
    cluster_policies: Gauge
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
        cluster_policies=r.gauge("stockade_state_cluster_policies",
                                 "ClusterNetworkPolicies in the agent's state."),
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
            "Time from a state store commit to its being on disk (the fsync, which "
            "concurrent commits share, included)."),
        api_requests=r.counter("stockade_api_requests_total",
                               "Local API requests by operation and result code.",
                               ("op", "code")),
    )
    for kind in DATAPATH_KINDS:
        m.datapath_objects.set(0, kind=kind)
    return m
