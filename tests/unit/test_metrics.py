"""proxy.metrics' own instruments expose exactly what prometheus_client's would.

The reference below is the metric set as plain prometheus_client objects (what proxy/metrics.py
was before its hot path got its own instruments); both are fed the same updates and their
/metrics texts must match, `_created` timestamps aside.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from typing import Any

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from proxy.metrics import LATENCY_BUCKETS, Metrics


class Reference:
    """The same names, types, HELP, labels and buckets, as prometheus_client objects."""

    def __init__(self, registry: CollectorRegistry, *, per_tenant: bool = False) -> None:
        r = registry
        self.requests = Counter(
            "mqp_requests",
            "MCP requests by JSON-RPC method and outcome",
            ["method", "outcome"],
            registry=r,
        )
        self.tool_calls = Counter(
            "mqp_tool_calls",
            "Gated calls by tool and outcome (ok, refused, rpc_error, ...)",
            ["tool", "outcome"],
            registry=r,
        )
        self.quota_decisions = Counter(
            "mqp_quota_decisions",
            "Quota decisions by plan and result",
            ["plan", "result"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "mqp_request_duration_seconds",
            "Time from request to the end of the reply",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "mqp_upstream_duration_seconds",
            "Time the upstream took to answer (headers)",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead_seconds = Histogram(
            "mqp_proxy_overhead_seconds",
            "The proxy's own time before forwarding (auth, parse, quota)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge("mqp_inflight_requests", "Requests being handled", registry=r)
        self.open_streams = Gauge(
            "mqp_open_streams", "Upstream SSE streams being forwarded", registry=r
        )
        self.spool_appends = Counter(
            "mqp_spool_appends", "Usage events committed to the spool", registry=r
        )
        self.spool_errors = Counter(
            "mqp_spool_errors", "Usage events the spool failed to commit", registry=r
        )
        self.webhooks = Counter(
            "mqp_webhook_events",
            "Stripe webhook deliveries by event type and outcome",
            ["type", "outcome"],
            registry=r,
        )
        self.redis_errors = Counter(
            "mqp_redis_errors", "Failed or timed-out calls to the quota/tenant store", registry=r
        )
        self.per_tenant = (
            Gauge(
                "mqp_tenant_units",
                "Units used this period, per tenant (opt-in)",
                ["tenant"],
                registry=r,
            )
            if per_tenant
            else None
        )


# Values on every bucket bound, just past each, beyond the last, and the odd ones out.
OBSERVED = [
    *LATENCY_BUCKETS,
    *(b * 1.0001 for b in LATENCY_BUCKETS),
    0,
    0.0,
    1e-9,
    -0.5,
    61,
    1e9,
    math.inf,
]


def feed(m: Any) -> None:
    """The same updates, through the call surface the proxy uses, for either implementation."""
    m.inflight.inc()
    m.inflight.inc(3)
    m.inflight.dec()
    m.inflight.dec(0.5)
    m.open_streams.inc()
    m.open_streams.set(2)
    for method, outcome in [("tools/call", "ok")] * 3 + [("ping", "ok"), ("POST", "bad_request")]:
        m.requests.labels(method, outcome).inc()
    m.requests.labels("tools/call", "ok").inc(2.5)
    m.requests.labels("initialize", "ok").inc(0)
    m.requests.labels(7, None).inc()  # label values are str()-ed
    m.quota_decisions.labels("free", "allowed").inc()
    m.quota_decisions.labels("-", "hidden_tool").inc()
    m.tool_calls.labels("add", "ok").inc()
    m.tool_calls.labels("other", "refused").inc()
    for x in OBSERVED:
        m.request_seconds.labels("tools/call").observe(x)
        m.overhead_seconds.observe(x / 100)
    m.request_seconds.labels("ping").observe(0.003)
    m.request_seconds.labels("nan").observe(math.nan)  # NaN: in the sum, in no bucket
    m.upstream_seconds.labels("tools/call").observe(0.011)
    m.upstream_seconds.labels("tools/call").observe(3)
    m.spool_appends.inc()
    m.spool_appends.inc()
    m.webhooks.labels("customer.subscription.updated", "applied").inc()
    on_failure = m.redis_errors.inc  # app.py passes the bound method as a callback
    on_failure()
    if m.per_tenant is not None:
        m.per_tenant.labels("tenant-a").set(3)
        m.per_tenant.labels("tenant-a").set(5)
        m.per_tenant.labels("tenant-b").set(0)


CREATED = re.compile(r"^(\w+_created(?:\{[^}]*\})?) \S+$", re.MULTILINE)


def exposition(registry: CollectorRegistry) -> str:
    return CREATED.sub(r"\1 <created>", generate_latest(registry).decode())


def pair(per_tenant: bool) -> tuple[CollectorRegistry, Metrics, CollectorRegistry, Reference]:
    ours, ref = CollectorRegistry(), CollectorRegistry()
    return ours, Metrics(ours, per_tenant=per_tenant), ref, Reference(ref, per_tenant=per_tenant)


@pytest.fixture
def no_created() -> Iterator[None]:
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        prometheus_client.enable_created_metrics()  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("per_tenant", [False, True])
@pytest.mark.parametrize("fed", [False, True])
def test_exposition_matches_prometheus_client(per_tenant: bool, fed: bool) -> None:
    ours, m, ref, r = pair(per_tenant)
    if fed:
        feed(m)
        feed(r)
    text = exposition(ours)
    assert text == exposition(ref)
    assert ("mqp_tenant_units" in text) == per_tenant
    assert "<created>" in text


def test_created_samples_follow_disable_created_metrics(no_created: None) -> None:
    ours, m, ref, r = pair(True)
    feed(m)
    feed(r)
    text = generate_latest(ours).decode()
    assert "_created" not in text
    assert text == generate_latest(ref).decode()


def test_samples_read_back_like_prometheus_client() -> None:
    """The ways tests read values: get_sample_value and collect()."""
    ours, m, ref, r = pair(True)
    feed(m)
    feed(r)

    def samples(registry: CollectorRegistry) -> list[tuple[str, str, str]]:
        return [
            (s.name, repr(s.labels), "created" if s.name.endswith("_created") else repr(s.value))
            for family in registry.collect()
            for s in family.samples
        ]

    assert samples(ours) == samples(ref)
    assert ours.get_sample_value("mqp_requests_total", {"method": "7", "outcome": "None"}) == 1
    le = {"method": "tools/call", "le": "0.0005"}
    assert ours.get_sample_value("mqp_request_duration_seconds_bucket", le) == 5  # 0, 0.0, ...
    assert ours.get_sample_value("mqp_inflight_requests") == 2.5
    assert ours.get_sample_value("mqp_tenant_units", {"tenant": "tenant-a"}) == 5


def test_created_is_when_the_series_was_first_used() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    before = time.time()
    m.child(m.requests, "ping", "ok").inc()
    m.child(m.request_seconds, "ping").observe(0.1)
    after = time.time()
    for name in ("mqp_requests_created", "mqp_request_duration_seconds_created"):
        labels = {"method": "ping", "outcome": "ok"} if "requests" in name else {"method": "ping"}
        created = registry.get_sample_value(name, labels)
        assert created is not None and before <= created <= after


def test_children_are_cached_and_misuse_raises_like_prometheus_client() -> None:
    m = Metrics(CollectorRegistry())
    r = Reference(CollectorRegistry())
    assert m.child(m.requests, "a", "b") is m.requests.labels("a", "b")
    assert m.requests.labels(1, 2) is m.requests.labels("1", "2")
    for metric in (m.requests, r.requests):
        with pytest.raises(ValueError, match="Incorrect label count"):
            metric.labels("only-one")
    for counter in (m.spool_appends, r.spool_appends):
        with pytest.raises(ValueError, match="non-negative"):
            counter.inc(-1)


def test_a_second_metrics_on_one_registry_is_refused() -> None:
    """The families describe their names, so the registry still catches duplicates."""
    registry = CollectorRegistry()
    Metrics(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics(registry)
