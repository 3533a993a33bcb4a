"""The Grafana dashboard in deploy/grafana: Grafana can import it, its PromQL is well formed,
and every metric and label it queries is in a real /metrics scrape of a proxy that has served
traffic, with a real spool written by a real drainer cycle against the Stripe fake."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import stripe
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import Components, build_components, create_app
from proxy.clock import SystemClock
from proxy.usage.drainer import Drainer
from proxy.usage.meter import StripeMeterClient
from proxy.usage.runner import open_spool
from proxy.usage.spool import Spool
from tests.conftest import ConfigFactory
from tests.fakes.stripe_fake import Fault, run_stripe_fake
from tests.fakes.upstream import ScriptedUpstream
from tests.rpc import bearer, call

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "mcp-quota-proxy.json"

STRIPE_KEY = "sk_test_dashboard_0123456789"
WEBHOOK_SECRET = "whsec_test_dashboard_0123456789"
METER = "mcp_tool_calls"
PRO_LOOKUP_KEY = "mqp_pro_base"

METRIC_RE = re.compile(r"\bmqp_[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Labels Prometheus adds at scrape time: never in the proxy's own exposition.
TARGET_LABELS = frozenset({"job", "instance"})
# Families the proxy only exposes when opted in (ops.per_tenant_metrics).
OPT_IN_FAMILIES = frozenset({"mqp_tenant_units"})
GRAFANA_BUILTINS = frozenset({"__rate_interval", "__interval", "__range"})
PROMQL_FUNCTIONS = frozenset(
    {
        "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh",
        "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh",
        "count_over_time", "day_of_month", "day_of_week", "day_of_year", "days_in_month", "deg",
        "delta", "deriv", "exp", "floor", "histogram_avg", "histogram_count",
        "histogram_fraction", "histogram_quantile", "histogram_stddev", "histogram_stdvar",
        "histogram_sum", "holt_winters", "hour", "idelta", "increase", "irate", "label_join",
        "label_replace", "last_over_time", "ln", "log10", "log2", "mad_over_time",
        "max_over_time", "min_over_time", "minute", "month", "pi", "predict_linear",
        "present_over_time", "quantile_over_time", "rad", "rate", "resets", "round", "scalar",
        "sgn", "sin", "sinh", "sort", "sort_desc", "sqrt", "stddev_over_time",
        "stdvar_over_time", "sum_over_time", "tan", "tanh", "time", "timestamp", "vector",
        "year",
    }
)  # fmt: skip
PROMQL_AGGREGATIONS = frozenset(
    {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"}
    | {"bottomk", "topk", "quantile", "limitk", "limit_ratio"}
)
PROMQL_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
COUNTER_FUNCTIONS = ("rate(", "irate(", "increase(")
DURATION_RE = r"(?:\d+(?:ms|s|m|h|d|w|y))+"
RANGE_RE = re.compile(rf"(?:{DURATION_RE}|\$__rate_interval|\$__interval|\$__range)")
SUBQUERY_RE = re.compile(rf"{DURATION_RE}:(?:{DURATION_RE})?")
STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
MATCHER_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
VARIABLE_RE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")


# --------------------------------------------------------------------------------------------
# The dashboard file


def _dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text("utf-8"))
    assert isinstance(doc, dict), "the dashboard must be one JSON object"
    return doc


def _panels() -> list[dict[str, Any]]:
    panels = _dashboard()["panels"]
    assert isinstance(panels, list)
    return panels


@dataclass(frozen=True)
class Query:
    where: str  # panel title and refId, or the templating variable, for messages
    expr: str
    legend: str = ""
    promql: bool = True  # templating label_values(...) is Grafana's, not PromQL


def _queries() -> list[Query]:
    out = [
        Query(f"panel {p['title']!r} target {t.get('refId')}", t["expr"], t.get("legendFormat", ""))
        for p in _panels()
        for t in p.get("targets", [])
    ]
    for var in _dashboard().get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]
            text = query["query"] if isinstance(query, dict) else query
            out.append(Query(f"variable {var['name']!r}", text, promql=False))
    return out


def _metric_names(expr: str) -> set[str]:
    return set(METRIC_RE.findall(_without_strings(expr)))


def _without_strings(expr: str) -> str:
    return STRING_RE.sub('""', expr)


def _family(name: str) -> str:
    """The metric family a series name belongs to (histogram and counter suffixes off)."""
    for suffix in (*HISTOGRAM_SUFFIXES, "_total"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def test_dashboard_has_what_grafana_needs_to_import_it() -> None:
    doc = _dashboard()
    assert isinstance(doc.get("uid"), str) and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", doc["uid"])
    assert isinstance(doc.get("title"), str) and doc["title"].strip()
    assert isinstance(doc.get("schemaVersion"), int) and doc["schemaVersion"] >= 39
    assert doc.get("id") is None, "an exported dashboard must not carry a database id"
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    ds = variables.get("datasource")
    assert ds is not None and ds["type"] == "datasource" and ds["query"] == "prometheus"
    defined = set(variables) | GRAFANA_BUILTINS
    panels = _panels()
    assert panels, "no panels"
    ids = [p.get("id") for p in panels]
    assert all(isinstance(i, int) for i in ids), ids
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    for p in panels:
        name = p.get("title")
        assert isinstance(name, str) and name.strip(), p
        assert p.get("type") in ("timeseries", "stat"), (name, p.get("type"))
        assert len(p.get("description", "")) >= 80, f"{name!r}: say what to do when it looks bad"
        pos = p.get("gridPos")
        assert isinstance(pos, dict) and all(isinstance(pos.get(k), int) for k in "hwxy"), name
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] >= 0 and pos["y"] >= 0, name
        assert pos["x"] + pos["w"] <= 24, f"{name!r} is wider than Grafana's 24-column grid"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, name
        targets = p.get("targets")
        assert isinstance(targets, list) and targets, f"{name!r} has no targets"
        ref_ids = [t.get("refId") for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), f"{name!r}: duplicate refIds {ref_ids}"
        for t in targets:
            assert isinstance(t.get("expr"), str) and t["expr"].strip(), (name, t)
            assert t.get("datasource", p["datasource"]) == p["datasource"], name
    for q in _queries():
        unknown = set(VARIABLE_RE.findall(q.expr)) - defined
        assert not unknown, f"{q.where} uses undefined variables {sorted(unknown)}"


def test_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for p in _panels():
        pos = p["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                other = cells.setdefault((x, y), p["title"])
                assert other == p["title"], f"{p['title']!r} overlaps {other!r} at {(x, y)}"


def _promql_problems(expr: str) -> Iterator[str]:
    """Cheap well-formedness checks that need no Prometheus: brackets, functions, ranges."""
    text = _without_strings(expr)
    if '"' in text.replace('""', ""):
        yield "unterminated string"
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for ch in text:
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            yield f"unbalanced {ch!r}"
            return
    if stack:
        yield f"unclosed {''.join(stack)!r}"
        return
    known = PROMQL_FUNCTIONS | PROMQL_AGGREGATIONS | PROMQL_GROUPING
    for name in re.findall(r"([A-Za-z_][A-Za-z0-9_:]*)\s*\(", text):
        if name not in known:
            yield f"unknown function {name!r}"
    for inner in (r.strip() for r in re.findall(r"\[([^\]]*)\]", text)):
        if not (RANGE_RE.fullmatch(inner) or SUBQUERY_RE.fullmatch(inner)):
            yield f"bad range [{inner}]"
    for call_at in (m.end() for m in re.finditer(r"\bhistogram_quantile\(", text)):
        body = text[call_at:]
        if "_bucket" not in body or not any(
            "le" in {s.strip() for s in g.split(",")} for g in GROUPING_RE.findall(body)
        ):
            yield "histogram_quantile needs a _bucket series aggregated by (le, ...)"
    if not METRIC_RE.search(text):
        yield "queries no mqp_ metric"


def test_promql_is_well_formed() -> None:
    problems = [
        f"{q.where}: {problem}: {q.expr}"
        for q in _queries()
        if q.promql
        for problem in _promql_problems(q.expr)
    ]
    assert not problems, "\n".join(problems)


def test_promql_parses_with_promtool(tmp_path: Path) -> None:
    """promtool has no PromQL-only check, but `check rules` parses every rule's expr."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (.ci/run installs Debian's prometheus package)")
    rules = []
    for i, q in enumerate(q for q in _queries() if q.promql):
        # Grafana's interval variables become a duration; $job etc. sit inside strings.
        expr = re.sub(r"\$__(?:rate_interval|interval|range)\b", "5m", q.expr)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard.rules.yml"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------
# A real scrape


@dataclass
class Scrape:
    text: str
    types: dict[str, str] = field(default_factory=dict)  # sample name -> family type
    labels: dict[str, set[str]] = field(default_factory=dict)  # sample name -> label names
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)
    families: dict[str, set[str]] = field(default_factory=dict)  # family -> sample names

    @classmethod
    def parse(cls, text: str) -> Scrape:
        scrape = cls(text)
        for family in text_string_to_metric_families(text):
            names = scrape.families.setdefault(family.name, set())
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue  # prometheus_client's creation timestamps, not a series to chart
                names.add(s.name)
                scrape.types[s.name] = family.type
                scrape.labels.setdefault(s.name, set()).update(s.labels)
                scrape.samples.append((s.name, dict(s.labels), s.value))
        return scrape

    def value(self, name: str, **labels: str) -> float:
        return sum(
            v
            for n, have, v in self.samples
            if n == name and all(have.get(k) == want for k, want in labels.items())
        )


async def _tenant_key(c: Components, tenant: str, plan: str, customer: str | None) -> str:
    await c.tenants.create(tenant, name=None, plan=plan, stripe_customer=customer, now=0)
    key, _ = await c.tenants.issue_key(tenant, label="dashboard", now=0)
    return key


async def _tool_call(
    http: aiohttp.ClientSession, url: str, key: str, rpc_id: int
) -> dict[str, Any]:
    async with http.post(url, json=call(rpc_id, "add", a=1, b=2), headers=bearer(key)) as r:
        body: dict[str, Any] = await r.json(content_type=None)
        return body


def _subscription_event(customer: str, tenant: str) -> bytes:
    start = int(time.time()) - 86400
    sub = {
        "id": "sub_dashboard",
        "object": "subscription",
        "customer": customer,
        "status": "active",
        "metadata": {"tenant_id": tenant},
        "trial_end": None,
        "items": {
            "object": "list",
            "data": [
                {
                    "id": "si_dashboard",
                    "object": "subscription_item",
                    "price": {
                        "id": "price_dashboard",
                        "object": "price",
                        "lookup_key": PRO_LOOKUP_KEY,
                        "metadata": {},
                    },
                    "current_period_start": start,
                    "current_period_end": start + 30 * 86400,
                }
            ],
        },
    }
    event = {
        "id": "evt_dashboard_1",
        "object": "event",
        "type": "customer.subscription.updated",
        "created": start,
        "api_version": "2026-10-28.endive",
        "data": {"object": sub},
    }
    return json.dumps(event).encode()


@pytest.fixture
async def scrape(
    tmp_path: Path, make_config: ConfigFactory, scripted: tuple[ScriptedUpstream, str]
) -> Scrape:
    """GET /metrics from a proxy (real Spool sink) after a paid call, a free call, a quota
    refusal, a verified webhook, and two drainer cycles (a 429, then a delivery)."""
    async with run_stripe_fake() as fake, AsyncExitStack() as stack:
        fake.add_meter(METER)
        customer = fake.add_customer(name="paid")["id"]
        config = make_config(
            env={
                "STRIPE_SECRET_KEY": STRIPE_KEY,
                "STRIPE_API_BASE": fake.url,
                "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            },
            upstream={"url": scripted[1]},
            spool={"path": str(tmp_path / "usage.db"), "replica_id": "dashboard"},
            drain={"embedded": False, "max_calls_per_second": 1000.0},
            billing={"enabled": True, "meter_event_name": METER},
            plans={
                "free": {"included_units": 1, "overage": "block"},
                "pro": {
                    "included_units": 1000,
                    "overage": "bill",
                    "stripe_lookup_keys": [PRO_LOOKUP_KEY],
                },
            },
            default_plan="free",
        )
        components = build_components(config)
        assert isinstance(components.sink, Spool), "the /metrics drainer state needs a Spool"
        server = TestServer(create_app(components), host="127.0.0.1", port=0)
        await server.start_server()
        stack.push_async_callback(server.close)
        base = str(server.make_url("")).rstrip("/")
        mcp = f"{base}/mcp"
        paid = await _tenant_key(components, "paid", "pro", customer)
        free = await _tenant_key(components, "free", "free", None)
        http = await stack.enter_async_context(aiohttp.ClientSession())

        for key, rpc_id in ((paid, 1), (free, 2)):  # billable; unbillable (no customer)
            ok = await _tool_call(http, mcp, key, rpc_id)
            assert not ok["result"].get("isError"), ok
        refused = await _tool_call(http, mcp, free, 3)  # the free plan's one unit is used up
        assert refused["result"]["_meta"]["mcp-quota-proxy/quota"]["reason"] == "refused_quota"

        body = _subscription_event(customer, "paid")
        header = stripe.WebhookSignature.generate_signature_header(
            body.decode(), WEBHOOK_SECRET, timestamp=int(time.time())
        )
        async with http.post(
            f"{base}{config.billing.webhook_path}",
            data=body,
            headers={"Stripe-Signature": header, "Content-Type": "application/json"},
        ) as r:
            assert r.status == 200, await r.text()

        # The drainer as its own process would run it: its own connection to the spool file.
        spool = open_spool(config)
        await spool.open()
        stack.push_async_callback(spool.close)
        client = StripeMeterClient(config.billing.stripe_secret_key, config.billing.stripe_api_base)
        stack.push_async_callback(client.close)
        drainer = Drainer(
            spool,
            client,
            drain=config.drain,
            billing=config.billing,
            spool_config=config.spool,
            clock=SystemClock(),
        )
        fake.inject(Fault("POST /v1/billing/meter_events", "status_429"))
        first = await drainer.cycle()
        assert (first.sent, first.retries) == (0, 1), first
        second = await drainer.cycle()
        assert (second.sent, second.retries) == (1, 0), second
        assert fake.total(customer, METER) == 1

        async with http.get(f"{base}/metrics") as r:
            assert r.status == 200
            return Scrape.parse(await r.text())


async def test_the_scrape_saw_the_traffic(scrape: Scrape) -> None:
    """Guards the fixture: the series below exist only because the traffic really happened."""
    assert scrape.value("mqp_tool_calls_total", tool="add", outcome="ok") == 2
    assert scrape.value("mqp_tool_calls_total", outcome="refused_quota") == 1
    assert scrape.value("mqp_quota_decisions_total", plan="free", result="refused_quota") == 1
    assert scrape.value("mqp_webhook_events_total", outcome="applied") == 1
    assert scrape.value("mqp_spool_appends_total") == 2
    assert scrape.value("mqp_spool_backlog_events") == 0
    assert scrape.value("mqp_spool_unbillable_events") == 1
    assert scrape.value("mqp_drain_events_total") == 1
    assert scrape.value("mqp_drain_calls_total") == 2
    assert scrape.value("mqp_drain_errors_total", kind="rate_limited") == 1
    assert scrape.value("mqp_drain_consecutive_failures") == 0
    assert 0 <= scrape.value("mqp_stripe_last_success_age_seconds") < 60
    assert scrape.value("mqp_redis_breaker_state") == 0


async def test_every_dashboard_metric_is_in_a_real_scrape(scrape: Scrape) -> None:
    missing: dict[str, list[str]] = {}
    for q in _queries():
        for name in sorted(_metric_names(q.expr)):
            if name not in scrape.types:
                exposed = sorted(scrape.families.get(_family(name), ()))
                hint = f" (the family exposes {exposed})" if exposed else " (no such family)"
                missing.setdefault(name + hint, []).append(q.where)
    report = "\n".join(f"{name}: used by {', '.join(where)}" for name, where in missing.items())
    assert not missing, f"metrics the dashboard queries but /metrics does not expose:\n{report}"


async def test_dashboard_labels_exist_on_the_metrics_they_group(scrape: Scrape) -> None:
    problems = []
    for q in _queries():
        text = _without_strings(q.expr)
        names = _metric_names(q.expr) & set(scrape.types)
        if not names:
            continue  # reported by the metric test
        have = set().union(*(scrape.labels[n] for n in names)) | TARGET_LABELS
        used = set(MATCHER_RE.findall(" ".join(re.findall(r"\{([^}]*)\}", text))))
        grouped = {s.strip() for g in GROUPING_RE.findall(text) for s in g.split(",") if s.strip()}
        for label in sorted((used | grouped) - have):
            problems.append(f"{q.where}: label {label!r} is not on {sorted(names)}")
        # A legend can only name labels that survive the aggregation.
        aggregated = re.search(r"\b(?:sum|max|min|avg|count)\s*\(", text) is not None
        shown = grouped or (set() if aggregated else have)
        for label in sorted(set(re.findall(r"\{\{\s*(\w+)\s*\}\}", q.legend)) - shown):
            problems.append(f"{q.where}: legend {{{{{label}}}}} is aggregated away")
    assert not problems, "\n".join(problems)


async def test_counters_are_rated_and_gauges_are_not(scrape: Scrape) -> None:
    problems = []
    for q in _queries():
        if not q.promql:
            continue
        text = _without_strings(q.expr)
        for m in METRIC_RE.finditer(text):
            kind = scrape.types.get(m.group())
            if kind is None:
                continue  # reported by the metric test
            rated = text[: m.start()].rstrip().endswith(COUNTER_FUNCTIONS)
            if kind in ("counter", "histogram") and not rated:
                problems.append(f"{q.where}: {kind} {m.group()} is used without rate/increase")
            if kind == "gauge" and rated:
                problems.append(f"{q.where}: gauge {m.group()} is used with rate/increase")
    assert not problems, "\n".join(problems)


async def test_every_exposed_metric_has_a_panel(scrape: Scrape) -> None:
    """A metric added to proxy/metrics.py should show up on the dashboard too."""
    used = set().union(*(_metric_names(q.expr) for q in _queries()))
    unused = sorted(
        family
        for family, names in scrape.families.items()
        if family.startswith("mqp_")
        and family not in OPT_IN_FAMILIES
        and names
        and not names & used
    )
    assert not unused, f"exposed by /metrics but on no panel: {unused}"
