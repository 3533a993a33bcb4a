"""Prometheus metrics, all on one registry passed in (tests use a fresh one each).

No tenant ids as labels: a fleet of tenants would explode the series count. The opt-in
`per_tenant` gauge is for small fleets.

The instruments are small plain-Python ones rather than prometheus_client's, which check
observability and take a lock on every update (several microseconds per request). Each family
is a collector on the registry that builds, at scrape time, the samples prometheus_client would.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client import metrics as _prometheus_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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
_INF = float("inf")

# Loop-thread only: every update and every scrape runs on the event loop's thread, so the
# values below are plain numbers with no lock.

# One series' samples as (suffix, extra labels, value).
_Samples = list[tuple[str, dict[str, str], float]]


class Counter:
    """One counter series (`_total`, `_created`)."""

    __slots__ = ("_created", "_value")

    def __init__(self) -> None:
        self._value = 0.0
        self._created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self._value += amount

    def _samples(self) -> _Samples:
        return [("_total", {}, self._value), ("_created", {}, self._created)]


class Gauge:
    """One gauge series."""

    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value = 0.0

    def inc(self, amount: float = 1) -> None:
        self._value += amount

    def dec(self, amount: float = 1) -> None:
        self._value -= amount

    def set(self, value: float) -> None:
        self._value = float(value)

    def _samples(self) -> _Samples:
        return [("", {}, self._value)]


class Histogram:
    """One histogram series: a count per bucket, made cumulative at scrape."""

    __slots__ = ("_bounds", "_counts", "_created", "_les", "_sum")

    def __init__(self, bounds: Sequence[float], les: Sequence[str]) -> None:
        self._bounds = bounds  # ascending upper bounds, the last one +Inf
        self._les = les
        self._counts = [0] * len(bounds)
        self._sum = 0.0
        self._created = time.time()

    def observe(self, amount: float) -> None:
        self._sum += amount
        # Buckets are `le`: the first bound >= amount. NaN is <= no bound, so like
        # prometheus_client it counts in no bucket (bisect would put it in the first).
        if amount <= _INF:
            self._counts[bisect_left(self._bounds, amount)] += 1

    def _samples(self) -> _Samples:
        out: _Samples = []
        acc = 0.0
        for le, count in zip(self._les, self._counts, strict=True):
            acc += count
            out.append(("_bucket", {"le": le}, acc))
        out.append(("_count", {}, acc))
        if self._bounds[0] >= 0:  # as prometheus_client: no sum when buckets go negative
            out.append(("_sum", {}, self._sum))
        out.append(("_created", {}, self._created))
        return out


S = TypeVar("S", Counter, Gauge, Histogram)


class Family(Collector, Generic[S]):
    """A metric family on the registry: its series by label values, exposed at scrape."""

    def __init__(
        self,
        registry: CollectorRegistry,
        name: str,
        documentation: str,
        kind: str,
        new: Callable[[], S],
        labelnames: Sequence[str] = (),
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._kind = kind
        self._new: Callable[[], S] = new
        self._labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], S] = {}
        if not self._labelnames:
            self._series[()] = new()  # an unlabelled metric is exposed from the start
        registry.register(self)

    def labels(self, *values: object) -> S:
        # Looked up as given first: a hit means the values were already the str key.
        found = self._series.get(values)  # type: ignore[arg-type]
        if found is None:
            if not self._labelnames:
                raise ValueError(f"No label names were set when constructing {self._name}")
            if len(values) != len(self._labelnames):
                raise ValueError("Incorrect label count")
            key = tuple(str(v) for v in values)
            found = self._series.get(key)
            if found is None:
                found = self._series[key] = self._new()
        return found

    def only(self) -> S:
        """The one series of an unlabelled metric."""
        return self._series[()]

    def describe(self) -> Iterable[Metric]:
        return [Metric(self._name, self._documentation, self._kind)]

    def collect(self) -> Iterable[Metric]:
        metric = Metric(self._name, self._documentation, self._kind)
        # Honour disable_created_metrics(); a prometheus_client without the flag keeps them.
        created = getattr(_prometheus_metrics, "_use_created", True)
        for values, series in list(self._series.items()):
            labels = dict(zip(self._labelnames, values, strict=True))
            for suffix, extra, value in series._samples():
                if created or suffix != "_created":
                    metric.add_sample(self._name + suffix, {**labels, **extra}, value)
        return [metric]


def _histogram(buckets: Sequence[float]) -> Callable[[], Histogram]:
    bounds = [float(b) for b in buckets]
    if bounds[-1] != _INF:
        bounds.append(_INF)
    les = [floatToGoString(b) for b in bounds]  # type: ignore[no-untyped-call]
    return lambda: Histogram(bounds, les)


class Metrics:
    def __init__(self, registry: CollectorRegistry, *, per_tenant: bool = False) -> None:
        self.registry = registry
        latency = _histogram(LATENCY_BUCKETS)
        self.requests = Family(
            registry,
            "mqp_requests",
            "MCP requests by JSON-RPC method and outcome",
            "counter",
            Counter,
            ["method", "outcome"],
        )
        self.tool_calls = Family(
            registry,
            "mqp_tool_calls",
            "Gated calls by tool and outcome (ok, refused, rpc_error, ...)",
            "counter",
            Counter,
            ["tool", "outcome"],
        )
        self.quota_decisions = Family(
            registry,
            "mqp_quota_decisions",
            "Quota decisions by plan and result",
            "counter",
            Counter,
            ["plan", "result"],
        )
        self.request_seconds = Family(
            registry,
            "mqp_request_duration_seconds",
            "Time from request to the end of the reply",
            "histogram",
            latency,
            ["method"],
        )
        self.upstream_seconds = Family(
            registry,
            "mqp_upstream_duration_seconds",
            "Time the upstream took to answer (headers)",
            "histogram",
            latency,
            ["method"],
        )
        self.overhead_seconds = Family(
            registry,
            "mqp_proxy_overhead_seconds",
            "The proxy's own time before forwarding (auth, parse, quota)",
            "histogram",
            latency,
        ).only()
        self.inflight = Family(
            registry, "mqp_inflight_requests", "Requests being handled", "gauge", Gauge
        ).only()
        self.open_streams = Family(
            registry, "mqp_open_streams", "Upstream SSE streams being forwarded", "gauge", Gauge
        ).only()
        self.spool_appends = Family(
            registry,
            "mqp_spool_appends",
            "Usage events committed to the spool",
            "counter",
            Counter,
        ).only()
        self.spool_errors = Family(
            registry,
            "mqp_spool_errors",
            "Usage events the spool failed to commit",
            "counter",
            Counter,
        ).only()
        self.webhooks = Family(
            registry,
            "mqp_webhook_events",
            "Stripe webhook deliveries by event type and outcome",
            "counter",
            Counter,
            ["type", "outcome"],
        )
        self.redis_errors = Family(
            registry,
            "mqp_redis_errors",
            "Failed or timed-out calls to the quota/tenant store",
            "counter",
            Counter,
        ).only()
        self.per_tenant = (
            Family(
                registry,
                "mqp_tenant_units",
                "Units used this period, per tenant (opt-in)",
                "gauge",
                Gauge,
                ["tenant"],
            )
            if per_tenant
            else None
        )
        self._tools: set[str] = set()

    # m.child(family, *values) is family.labels(*values), minus a call and a repacking.
    child = staticmethod(Family.labels)

    def tool_call(self, tool: str | None, outcome: str) -> None:
        name = tool or "-"
        if tool and name not in self._tools:
            if len(self._tools) >= MAX_TOOL_LABELS:
                name = "other"
            else:
                self._tools.add(name)
        self.tool_calls.labels(name, outcome).inc()


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
