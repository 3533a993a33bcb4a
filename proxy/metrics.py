"""Prometheus metrics, all on one registry passed in (tests use a fresh one each).

No tenant ids as labels: a fleet of tenants would explode the series count. The opt-in
`per_tenant` gauge is for small fleets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
# Tool names come from clients: past this many distinct ones, new names count as "other".
MAX_TOOL_LABELS = 256


class Metrics:
    def __init__(self, registry: CollectorRegistry, *, per_tenant: bool = False) -> None:
        self.registry = registry
        self.requests = Counter(
            "mqp_requests",
            "MCP requests by JSON-RPC method and outcome",
            ["method", "outcome"],
            registry=registry,
        )
        self.tool_calls = Counter(
            "mqp_tool_calls",
            "Gated calls by tool and outcome (ok, refused, rpc_error, ...)",
            ["tool", "outcome"],
            registry=registry,
        )
        self.quota_decisions = Counter(
            "mqp_quota_decisions",
            "Quota decisions by plan and result",
            ["plan", "result"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "mqp_request_duration_seconds",
            "Time from request to the end of the reply",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_seconds = Histogram(
            "mqp_upstream_duration_seconds",
            "Time the upstream took to answer (headers)",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.overhead_seconds = Histogram(
            "mqp_proxy_overhead_seconds",
            "The proxy's own time before forwarding (auth, parse, quota)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inflight = Gauge("mqp_inflight_requests", "Requests being handled", registry=registry)
        self.open_streams = Gauge(
            "mqp_open_streams", "Upstream SSE streams being forwarded", registry=registry
        )
        self.spool_appends = Counter(
            "mqp_spool_appends", "Usage events committed to the spool", registry=registry
        )
        self.spool_errors = Counter(
            "mqp_spool_errors", "Usage events the spool failed to commit", registry=registry
        )
        self.webhooks = Counter(
            "mqp_webhook_events",
            "Stripe webhook deliveries by event type and outcome",
            ["type", "outcome"],
            registry=registry,
        )
        self.redis_errors = Counter(
            "mqp_redis_errors",
            "Failed or timed-out calls to the quota/tenant store",
            registry=registry,
        )
        self.per_tenant = (
            Gauge(
                "mqp_tenant_units",
                "Units used this period, per tenant (opt-in)",
                ["tenant"],
                registry=registry,
            )
            if per_tenant
            else None
        )
        # labels() validates and takes a lock on every call; the hot path reuses children.
        self._children: dict[tuple[object, ...], Any] = {}
        self._tools: set[str] = set()

    def child(self, metric: Counter | Histogram, *values: str) -> Any:
        key = (metric, *values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def tool_call(self, tool: str | None, outcome: str) -> None:
        name = tool or "-"
        if tool and name not in self._tools:
            if len(self._tools) >= MAX_TOOL_LABELS:
                name = "other"
            else:
                self._tools.add(name)
        self.child(self.tool_calls, name, outcome).inc()


@dataclass(frozen=True, slots=True)
class DrainSnapshot:
    """What the drainer process last wrote to the spool, plus the spool's own backlog."""

    backlog: int
    oldest_unreported_age_s: float | None
    unbillable: int
    rejected_groups: int
    counters: dict[str, float]  # batches, events, calls, errors:<kind>
    last_success_age_s: float | None
    failures: int


class StateCollector(Collector):
    """Gauges read on scrape from state that lives elsewhere (breaker, spool, drainer)."""

    def __init__(
        self,
        breaker_state: Callable[[], str],
        drain: Callable[[], DrainSnapshot | None],
    ) -> None:
        self._breaker_state = breaker_state
        self._drain = drain

    def collect(self) -> Iterable[Metric]:
        breaker = GaugeMetricFamily(
            "mqp_redis_breaker_state", "Store circuit breaker: 0 closed, 1 half-open, 2 open"
        )
        breaker.add_metric([], BREAKER_STATES.get(self._breaker_state(), 2))
        yield breaker
        snap = self._drain()
        if snap is None:
            return
        yield GaugeMetricFamily(
            "mqp_spool_backlog_events",
            "Billable events Stripe has not accepted yet",
            value=snap.backlog,
        )
        yield GaugeMetricFamily(
            "mqp_spool_oldest_unreported_age_seconds",
            "Age of the oldest billable event Stripe has not accepted (0 when none)",
            value=snap.oldest_unreported_age_s or 0.0,
        )
        yield GaugeMetricFamily(
            "mqp_spool_unbillable_events",
            "Events kept but never sent (no customer/unbilled)",
            value=snap.unbillable,
        )
        yield GaugeMetricFamily(
            "mqp_drain_rejected_groups",
            "Meter events Stripe rejected (kept in the spool)",
            value=snap.rejected_groups,
        )
        yield GaugeMetricFamily(
            "mqp_drain_consecutive_failures",
            "Drain cycles in a row with a transient failure",
            value=snap.failures,
        )
        yield GaugeMetricFamily(
            "mqp_stripe_last_success_age_seconds",
            "Seconds since Stripe last answered the drainer successfully (-1: never)",
            value=-1.0 if snap.last_success_age_s is None else snap.last_success_age_s,
        )
        # Drainer counters are written by the drainer process into the spool; exposed here as
        # counters so one scrape of the proxy covers both processes.
        from prometheus_client.core import CounterMetricFamily

        batches = CounterMetricFamily("mqp_drain_batches", "Batches reported to Stripe")
        batches.add_metric([], snap.counters.get("batches", 0.0))
        yield batches
        events = CounterMetricFamily("mqp_drain_events", "Meter events accepted by Stripe")
        events.add_metric([], snap.counters.get("events", 0.0))
        yield events
        calls = CounterMetricFamily("mqp_drain_calls", "Meter-event calls made to Stripe")
        calls.add_metric([], snap.counters.get("calls", 0.0))
        yield calls
        errors = CounterMetricFamily(
            "mqp_drain_errors", "Failed meter-event calls by Stripe error kind", labels=["kind"]
        )
        for name, value in sorted(snap.counters.items()):
            if name.startswith("errors:"):
                errors.add_metric([name.removeprefix("errors:")], value)
        yield errors
