"""Small hot-path helpers: request ids without a system call each, cached metric children
with a bounded tool label."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry

from proxy.ids import IdSource
from proxy.metrics import MAX_TOOL_LABELS, Metrics


def test_ids_are_32_hex_and_unique_within_and_across_sources() -> None:
    a, b = IdSource(), IdSource()
    ids = [a.next() for _ in range(1000)] + [b.next() for _ in range(1000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == 2000


def _samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, ...], float]:
    return {
        tuple(s.labels.values()): s.value
        for metric in registry.collect()
        for s in metric.samples
        if s.name == name
    }


def test_cached_children_count_like_labels() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    for _ in range(3):
        m.child(m.requests, "tools/call", "ok").inc()
    m.child(m.requests, "ping", "ok").inc()
    assert _samples(registry, "mqp_requests_total") == {
        ("tools/call", "ok"): 3.0,
        ("ping", "ok"): 1.0,
    }


def test_client_chosen_tool_names_cannot_grow_the_series_without_bound() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    for n in range(MAX_TOOL_LABELS + 50):
        m.tool_call(f"tool-{n}", "ok")
    m.tool_call("tool-0", "ok")  # a name seen before the cap keeps its own series
    m.tool_call(None, "abandoned")
    samples = _samples(registry, "mqp_tool_calls_total")
    assert len(samples) == MAX_TOOL_LABELS + 2  # the kept names, "other", and "-" (no tool)
    assert samples[("tool-0", "ok")] == 2.0
    assert samples[("other", "ok")] == 50.0
    assert samples[("-", "abandoned")] == 1.0
    assert ("tool-300", "ok") not in samples
