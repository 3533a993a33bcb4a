"""One frozen, validated configuration from config.yaml plus the environment.

This is the only module that reads ``os.environ``. Every validation error names the key's
path and what would be valid, so an operator can fix the file without reading code.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

ENV_REDIS_URL = "REDIS_URL"
ENV_PEPPER = "MQP_KEY_PEPPER"
ENV_STRIPE_SECRET_KEY = "STRIPE_SECRET_KEY"
ENV_STRIPE_WEBHOOK_SECRET = "STRIPE_WEBHOOK_SECRET"
ENV_STRIPE_API_BASE = "STRIPE_API_BASE"
MEMORY_URL = "memory://"
MIN_PEPPER_LEN = 16
MAX_PORT = 65535
MAX_BATCH = 100_000  # events per drain batch


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message says which and how to fix it."""


@dataclass(frozen=True, slots=True)
class RatePolicy:
    per_second: float
    burst: int


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    included_units: int | None  # None: unlimited
    overage: Literal["block", "bill"]
    hard_cap: int | None
    rate: RatePolicy | None
    tool_weights: Mapping[str, int]
    hidden_tools: frozenset[str]
    billed: bool
    stripe_lookup_keys: tuple[str, ...] = ()  # prices of this plan (Checkout, webhook mapping)


@dataclass(frozen=True, slots=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 8080


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str = "http://127.0.0.1:8000"
    mcp_paths: tuple[str, ...] = ("/mcp",)
    connect_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    max_body_bytes: int = 4 * 1024 * 1024
    allowed_origins: tuple[str, ...] = ()
    tenant_header: str = "X-MCP-Tenant"
    refusal_mode: Literal["tool_error", "jsonrpc_error"] = "tool_error"
    upgrade_url: str = ""
    bill_tool_errors: bool = False
    resume_grace_s: float = 300.0
    body_timeout_s: float = 30.0  # a client must send its whole body within this (slowloris)
    header_timeout_s: float = 60.0  # ...its request headers, or its next request when idle
    gated_methods: Mapping[str, int] = field(default_factory=lambda: {"tools/call": 1})


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = MEMORY_URL
    key_prefix: str = "mqp"
    timeout_ms: int = 250
    breaker_failures: int = 3
    breaker_cooldown_s: float = 5.0
    fail_mode: Literal["open", "closed"] = "open"
    reservation_ttl_s: int = 3600
    cluster: bool = False  # `url` names one node of a Redis Cluster (the seed)

    @property
    def embedded(self) -> bool:
        return self.url == MEMORY_URL


@dataclass(frozen=True, slots=True)
class AuthConfig:
    key_prefix: str = "mqp_"
    pepper: str = ""


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    path: str = "spool/usage.db"
    synchronous: Literal["normal", "full"] = "normal"
    replica_id: str = ""  # empty: the host name (the pod name in Kubernetes)
    retention_days: int = 35


@dataclass(frozen=True, slots=True)
class DrainConfig:
    embedded: bool = True  # `serve` supervises a drainer child process
    interval_s: float = 5.0
    max_batch: int = 10_000
    max_calls_per_second: float = 20.0
    age_alarm_days: int = 28


@dataclass(frozen=True, slots=True)
class BillingConfig:
    enabled: bool = False
    meter_event_name: str = "mcp_tool_calls"
    token_meter_event_name: str = ""  # empty: token counts are not billed
    token_meta_key: str = ""  # a key in a tool result's _meta holding its token count
    stripe_secret_key: str = ""
    stripe_api_base: str = ""  # a fake or a proxy; empty: Stripe itself
    webhook_secret: str = ""
    webhook_path: str = "/stripe/webhook"
    webhook_tolerance_s: int = 300
    past_due_grace_s: int = 3 * 86400
    restricted_plan: str = ""  # empty: the default plan
    refetch_subscriptions: bool = False
    portal_return_url: str = ""
    checkout_success_url: str = ""
    checkout_cancel_url: str = ""
    checkout_plan: str = ""  # empty: the first plan with stripe_lookup_keys

    def meter_names(self) -> tuple[str, ...]:
        names = (self.meter_event_name, self.token_meter_event_name)
        return tuple(n for n in names if n)


@dataclass(frozen=True, slots=True)
class OpsConfig:
    """Health thresholds (the guide's defaults), shutdown timing, metrics options."""

    webhook_max_age_s: int = 3600  # 0: do not judge webhook freshness
    unreported_max: int = 500  # unreported events older than 10 minutes
    stripe_max_age_s: int = 1800
    readiness_delay_s: float = 5.0  # /readyz is 503 this long before the listener closes
    shutdown_grace_s: float = 30.0  # in-flight requests and streams may finish within this
    per_tenant_metrics: bool = False
    stripe_probe_interval_s: float = 300.0  # an idle drainer checks Stripe this often


@dataclass(frozen=True, slots=True)
class Config:
    listen: ListenConfig
    upstream: UpstreamConfig
    proxy: ProxyConfig
    redis: RedisConfig
    auth: AuthConfig
    plans: Mapping[str, Plan]
    default_plan: str
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    drain: DrainConfig = field(default_factory=DrainConfig)
    billing: BillingConfig = field(default_factory=BillingConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)
    log_level: str = "info"

    def plan(self, name: str) -> Plan:
        """The named plan, or the default plan when a tenant names one that no longer exists."""
        return self.plans.get(name) or self.plans[self.default_plan]

    def plan_for_lookup_key(self, lookup_key: str) -> str | None:
        for plan in self.plans.values():
            if lookup_key in plan.stripe_lookup_keys:
                return plan.name
        return None


# --- reading -------------------------------------------------------------------------------


def _bounds(minimum: int, maximum: int | None) -> str:
    return f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"


class _Reader:
    """Typed access to one YAML mapping, remembering the dotted path for error messages."""

    def __init__(self, data: Mapping[str, Any], path: str, known: set[str]) -> None:
        self._data = data
        self._path = path
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            valid = ", ".join(sorted(known))
            raise ConfigError(f"{self._key(unknown[0])}: unknown key; valid keys here are {valid}")

    def _key(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def section(self, key: str, known: set[str]) -> _Reader:
        value = self._data.get(key, {})
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{self._key(key)}: expected a mapping, got {type(value).__name__}")
        return _Reader(value, self._key(key), known)

    def raw(self, key: str, default: Any) -> Any:
        return self._data.get(key, default)

    def string(self, key: str, default: str) -> str:
        value = self._data.get(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self._key(key)}: expected a string, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._data.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self._key(key)}: expected true or false, got {value!r}")
        return value

    def integer(
        self, key: str, default: int | None, *, minimum: int = 0, maximum: int | None = None
    ) -> int | None:
        value = self._data.get(key, default)
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < minimum
            or (maximum is not None and value > maximum)
        ):
            raise ConfigError(
                f"{self._key(key)}: expected a whole number {_bounds(minimum, maximum)}, "
                f"got {value!r}"
            )
        return value

    def required_int(
        self, key: str, default: int, *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        value = self.integer(key, default, minimum=minimum, maximum=maximum)
        if value is None:
            raise ConfigError(
                f"{self._key(key)}: must be set (a whole number {_bounds(minimum, maximum)})"
            )
        return value

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        value = self._data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            raise ConfigError(f"{self._key(key)}: expected a number >= {minimum}, got {value!r}")
        return float(value)

    def choice(self, key: str, default: str, options: tuple[str, ...]) -> str:
        value = self._data.get(key, default)
        if value not in options:
            raise ConfigError(
                f"{self._key(key)}: expected one of {', '.join(options)}, got {value!r}"
            )
        return str(value)

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._data.get(key, list(default))
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self._key(key)}: expected a list of strings, got {value!r}")
        return tuple(value)

    def weights(self, key: str, default: Mapping[str, int]) -> dict[str, int]:
        value = self._data.get(key, dict(default))
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{self._key(key)}: expected a mapping of name to whole number")
        out: dict[str, int] = {}
        for name, weight in value.items():
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
                raise ConfigError(
                    f"{self._key(key)}.{name}: expected a whole number >= 1, got {weight!r}"
                )
            out[str(name)] = weight
        return out


_PLAN_KEYS = {
    "included_units",
    "overage",
    "hard_cap",
    "rate",
    "tool_weights",
    "hidden_tools",
    "billed",
    "stripe_lookup_keys",
}


def _plan(name: str, reader: _Reader) -> Plan:
    rate_raw = reader.raw("rate", None)
    rate: RatePolicy | None = None
    if rate_raw is not None:
        r = reader.section("rate", {"per_second", "burst"})
        per_second = r.number("per_second", 0.0)
        if per_second <= 0:
            raise ConfigError(f"plans.{name}.rate.per_second: expected a number > 0")
        rate = RatePolicy(
            per_second=per_second,
            burst=r.required_int("burst", max(1, int(per_second)), minimum=1),
        )
    included = reader.integer("included_units", None)
    hard_cap = reader.integer("hard_cap", None)
    overage = reader.choice("overage", "block", ("block", "bill"))
    if included is not None and hard_cap is not None and hard_cap < included:
        raise ConfigError(
            f"plans.{name}.hard_cap: must be >= included_units ({included}), got {hard_cap}"
        )
    return Plan(
        name=name,
        included_units=included,
        overage="bill" if overage == "bill" else "block",
        hard_cap=hard_cap,
        rate=rate,
        tool_weights=reader.weights("tool_weights", {}),
        hidden_tools=frozenset(reader.strings("hidden_tools", ())),
        billed=reader.boolean("billed", True),
        stripe_lookup_keys=reader.strings("stripe_lookup_keys", ()),
    )


def _url_like(value: str, key: str, schemes: tuple[str, ...]) -> str:
    if not value.startswith(tuple(f"{s}://" for s in schemes)):
        raise ConfigError(
            f"{key}: expected a URL starting with {' or '.join(schemes)}://, got {value!r}"
        )
    # Checked here, or the first connection dies with a traceback ("Port out of range").
    address = value.partition("://")[2].partition("/")[0].rpartition("@")[2]  # no password
    try:
        port = urlsplit(value).port
    except ValueError:  # not a number, above 65535, or a broken [IPv6] address
        port = -1
    if port is not None and not 1 <= port <= MAX_PORT:
        raise ConfigError(
            f"{key}: expected HOST or HOST:PORT with a port from 1 to {MAX_PORT}, got {address!r}"
        )
    return value


def _cluster_url(url: str) -> None:
    """A cluster is reached over TCP through one seed node, in database 0 (the URL is not
    echoed: it may carry a password)."""
    if url == MEMORY_URL:
        raise ConfigError(
            "redis.cluster: true needs redis.url (or REDIS_URL) to name one node of the "
            "cluster, e.g. redis://10.0.0.5:6379; memory:// is a single in-process store"
        )
    scheme, _, rest = url.partition("://")
    if scheme not in ("redis", "rediss"):
        raise ConfigError(
            "redis.cluster: a Redis Cluster is reached over TCP; use a redis:// or rediss:// "
            f"URL, not {scheme}://"
        )
    address = rest.rpartition("@")[2].partition("?")[0]  # after any user:password@
    database = address.partition("/")[2].strip("/")
    if database not in ("", "0"):
        raise ConfigError(
            "redis.url (or REDIS_URL): a Redis Cluster has only database 0; "
            "end the URL with /0 or no path"
        )


_DEFAULT_PLANS: dict[str, Any] = {
    "free": {"included_units": 100, "overage": "block", "rate": {"per_second": 5, "burst": 10}},
}


def parse_config(data: Mapping[str, Any] | None, env: Mapping[str, str]) -> Config:
    """Validate a parsed YAML document plus environment into a Config (pure)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError("config: the top level must be a mapping of sections")
    top = _Reader(
        data,
        "",
        {
            "listen",
            "upstream",
            "proxy",
            "redis",
            "auth",
            "plans",
            "default_plan",
            "log_level",
            "spool",
            "drain",
            "billing",
            "ops",
        },
    )

    lr = top.section("listen", {"host", "port"})
    listen = ListenConfig(
        host=lr.string("host", "127.0.0.1"),
        # 0: the OS picks a free port. Above 65535 the OS would silently wrap the number.
        port=lr.required_int("port", 8080, minimum=0, maximum=MAX_PORT),
    )

    ur = top.section("upstream", {"url", "mcp_paths", "connect_timeout_s"})
    paths = ur.strings("mcp_paths", ("/mcp",))
    for p in paths:
        if not p.startswith("/"):
            raise ConfigError(f"upstream.mcp_paths: each path must start with '/', got {p!r}")
    if not paths:
        raise ConfigError("upstream.mcp_paths: list at least one path, e.g. [/mcp]")
    upstream = UpstreamConfig(
        url=_url_like(
            ur.string("url", "http://127.0.0.1:8000"), "upstream.url", ("http", "https")
        ).rstrip("/"),
        mcp_paths=paths,
        connect_timeout_s=ur.number("connect_timeout_s", 10.0),
    )

    pr = top.section(
        "proxy",
        {
            "max_body_bytes",
            "allowed_origins",
            "tenant_header",
            "refusal_mode",
            "upgrade_url",
            "bill_tool_errors",
            "resume_grace_s",
            "body_timeout_s",
            "header_timeout_s",
            "gated_methods",
        },
    )
    gated = pr.weights("gated_methods", {"tools/call": 1})
    proxy = ProxyConfig(
        max_body_bytes=pr.required_int("max_body_bytes", 4 * 1024 * 1024, minimum=1024),
        allowed_origins=pr.strings("allowed_origins", ()),
        tenant_header=pr.string("tenant_header", "X-MCP-Tenant"),
        refusal_mode="jsonrpc_error"
        if pr.choice("refusal_mode", "tool_error", ("tool_error", "jsonrpc_error"))
        == "jsonrpc_error"
        else "tool_error",
        upgrade_url=pr.string("upgrade_url", ""),
        bill_tool_errors=pr.boolean("bill_tool_errors", False),
        resume_grace_s=pr.number("resume_grace_s", 300.0),
        body_timeout_s=pr.number("body_timeout_s", 30.0, minimum=0.1),
        header_timeout_s=pr.number("header_timeout_s", 60.0, minimum=0.1),
        gated_methods=gated,
    )

    rr = top.section(
        "redis",
        {
            "url",
            "key_prefix",
            "timeout_ms",
            "breaker_failures",
            "breaker_cooldown_s",
            "fail_mode",
            "reservation_ttl_s",
            "cluster",
        },
    )
    redis_url = env.get(ENV_REDIS_URL) or rr.string("url", MEMORY_URL)
    if redis_url != MEMORY_URL:
        _url_like(redis_url, "redis.url (or REDIS_URL)", ("redis", "rediss", "unix"))
    redis = RedisConfig(
        url=redis_url,
        key_prefix=rr.string("key_prefix", "mqp"),
        timeout_ms=rr.required_int("timeout_ms", 250, minimum=1),
        breaker_failures=rr.required_int("breaker_failures", 3, minimum=1),
        breaker_cooldown_s=rr.number("breaker_cooldown_s", 5.0),
        fail_mode="closed"
        if rr.choice("fail_mode", "open", ("open", "closed")) == "closed"
        else "open",
        reservation_ttl_s=rr.required_int("reservation_ttl_s", 3600, minimum=60),
        cluster=rr.boolean("cluster", False),
    )
    if redis.cluster:
        _cluster_url(redis.url)
    if not redis.key_prefix or "{" in redis.key_prefix or "}" in redis.key_prefix:
        raise ConfigError("redis.key_prefix: must be non-empty and contain no braces")

    ar = top.section("auth", {"key_prefix"})
    pepper = env.get(ENV_PEPPER, "")
    if pepper and len(pepper) < MIN_PEPPER_LEN:
        raise ConfigError(
            f"{ENV_PEPPER}: the key-hashing pepper must be at least {MIN_PEPPER_LEN} characters; "
            "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    if not pepper and not redis.embedded:
        raise ConfigError(
            f"{ENV_PEPPER}: must be set when Redis is shared, so API-key hashes stay valid across "
            "restarts and replicas; generate one with: "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    key_prefix = ar.string("key_prefix", "mqp_")
    if not re.fullmatch(r"[A-Za-z0-9_]{1,16}", key_prefix):
        raise ConfigError(
            "auth.key_prefix: expected 1-16 letters, digits or underscores, e.g. mqp_"
        )
    auth = AuthConfig(key_prefix=key_prefix, pepper=pepper)

    plans_raw = top.raw("plans", _DEFAULT_PLANS)
    if not isinstance(plans_raw, Mapping) or not plans_raw:
        raise ConfigError(
            "plans: expected a mapping of plan name to plan settings, with at least one plan"
        )
    for name in plans_raw:
        if not isinstance(name, str):
            # YAML reads `2024:` or `on:` as a number or a boolean; settings would be lost.
            raise ConfigError(f"plans: plan names must be strings; quote {name!r} in the file")
    plans_reader = _Reader(plans_raw, "plans", set(plans_raw))
    plans = {
        str(name): _plan(str(name), plans_reader.section(str(name), _PLAN_KEYS))
        for name in plans_raw
    }
    default_plan = top.string("default_plan", next(iter(plans)))
    if default_plan not in plans:
        raise ConfigError(
            f"default_plan: {default_plan!r} is not a plan; defined plans are {', '.join(plans)}"
        )
    log_level = top.choice("log_level", "info", ("debug", "info", "warning", "error"))
    billing = _billing(top, env)
    if billing.checkout_plan and billing.checkout_plan not in plans:
        raise ConfigError(
            f"billing.checkout_plan: {billing.checkout_plan!r} is not a plan; defined plans are "
            f"{', '.join(plans)}"
        )
    if billing.restricted_plan and billing.restricted_plan not in plans:
        raise ConfigError(
            f"billing.restricted_plan: {billing.restricted_plan!r} is not a plan; defined plans "
            f"are {', '.join(plans)}"
        )
    owners: dict[str, str] = {}
    for plan in plans.values():
        for key in plan.stripe_lookup_keys:
            if key in owners:
                raise ConfigError(
                    f"plans.{plan.name}.stripe_lookup_keys: {key!r} already belongs to plan "
                    f"{owners[key]}; a price maps to one plan"
                )
            owners[key] = plan.name
    return Config(
        ops=_ops(top),
        spool=_spool(top),
        drain=_drain(top),
        billing=billing,
        listen=listen,
        upstream=upstream,
        proxy=proxy,
        redis=redis,
        auth=auth,
        plans=plans,
        default_plan=default_plan,
        log_level=log_level,
    )


_EVENT_NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,100}")


def _spool(top: _Reader) -> SpoolConfig:
    r = top.section("spool", {"path", "synchronous", "replica_id", "retention_days"})
    replica = r.string("replica_id", "")
    if replica and not re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", replica):
        raise ConfigError("spool.replica_id: 1-40 letters, digits, '.', '_' or '-'")
    return SpoolConfig(
        path=r.string("path", "spool/usage.db"),
        synchronous="full"
        if r.choice("synchronous", "normal", ("normal", "full")) == "full"
        else "normal",
        replica_id=replica,
        retention_days=r.required_int("retention_days", 35, minimum=1),
    )


def _ops(top: _Reader) -> OpsConfig:
    r = top.section(
        "ops",
        {
            "webhook_max_age_s",
            "unreported_max",
            "stripe_max_age_s",
            "readiness_delay_s",
            "shutdown_grace_s",
            "per_tenant_metrics",
            "stripe_probe_interval_s",
        },
    )
    return OpsConfig(
        webhook_max_age_s=r.required_int("webhook_max_age_s", 3600),
        unreported_max=r.required_int("unreported_max", 500),
        stripe_max_age_s=r.required_int("stripe_max_age_s", 1800, minimum=1),
        readiness_delay_s=r.number("readiness_delay_s", 5.0),
        shutdown_grace_s=r.number("shutdown_grace_s", 30.0),
        per_tenant_metrics=r.boolean("per_tenant_metrics", False),
        stripe_probe_interval_s=r.number("stripe_probe_interval_s", 300.0, minimum=1.0),
    )


def _drain(top: _Reader) -> DrainConfig:
    r = top.section(
        "drain", {"embedded", "interval_s", "max_batch", "max_calls_per_second", "age_alarm_days"}
    )
    per_second = r.number("max_calls_per_second", 20.0)
    if per_second <= 0:
        raise ConfigError("drain.max_calls_per_second: expected a number > 0")
    alarm = r.required_int("age_alarm_days", 28, minimum=1)
    if alarm >= 35:
        raise ConfigError(
            "drain.age_alarm_days: must be below 35, Stripe's limit for an event's timestamp"
        )
    return DrainConfig(
        embedded=r.boolean("embedded", True),
        interval_s=r.number("interval_s", 5.0, minimum=0.05),
        # With MAX_TOKENS_PER_CALL, keeps a token meter event within Stripe's 15 digits.
        max_batch=r.required_int("max_batch", 10_000, minimum=1, maximum=MAX_BATCH),
        max_calls_per_second=per_second,
        age_alarm_days=alarm,
    )


def _billing(top: _Reader, env: Mapping[str, str]) -> BillingConfig:
    r = top.section(
        "billing",
        {
            "enabled",
            "meter_event_name",
            "token_meter_event_name",
            "token_meta_key",
            "webhook_path",
            "webhook_tolerance_s",
            "past_due_grace_s",
            "restricted_plan",
            "refetch_subscriptions",
            "portal_return_url",
            "checkout_success_url",
            "checkout_cancel_url",
            "checkout_plan",
        },
    )
    enabled = r.boolean("enabled", False)
    names = {}
    for key, default in (("meter_event_name", "mcp_tool_calls"), ("token_meter_event_name", "")):
        value = r.string(key, default)
        if value and not _EVENT_NAME_RE.fullmatch(value):
            raise ConfigError(f"billing.{key}: 1-100 letters, digits, '_', '.', ':' or '-'")
        names[key] = value
    if not names["meter_event_name"]:
        raise ConfigError("billing.meter_event_name: must be set, e.g. mcp_tool_calls")
    token_key = r.string("token_meta_key", "")
    if names["token_meter_event_name"] and not token_key:
        raise ConfigError(
            "billing.token_meta_key: set it (e.g. tokens) when token_meter_event_name is set"
        )
    secret = env.get(ENV_STRIPE_SECRET_KEY, "")
    if enabled and not secret.startswith(("sk_", "rk_")):
        raise ConfigError(
            f"{ENV_STRIPE_SECRET_KEY}: billing.enabled is true, so set a Stripe secret key "
            "(sk_live_..., sk_test_... or a restricted rk_... key)"
        )
    webhook_path = r.string("webhook_path", "/stripe/webhook")
    if not webhook_path.startswith("/"):
        raise ConfigError(f"billing.webhook_path: must start with '/', got {webhook_path!r}")
    api_base = env.get(ENV_STRIPE_API_BASE, "").rstrip("/")
    if api_base:
        _url_like(api_base, ENV_STRIPE_API_BASE, ("http", "https"))
    return BillingConfig(
        enabled=enabled,
        meter_event_name=names["meter_event_name"],
        token_meter_event_name=names["token_meter_event_name"],
        token_meta_key=token_key,
        stripe_secret_key=secret,
        stripe_api_base=api_base,
        webhook_secret=env.get(ENV_STRIPE_WEBHOOK_SECRET, ""),
        webhook_path=webhook_path,
        webhook_tolerance_s=r.required_int("webhook_tolerance_s", 300, minimum=1),
        past_due_grace_s=r.required_int("past_due_grace_s", 3 * 86400, minimum=0),
        restricted_plan=r.string("restricted_plan", ""),
        refetch_subscriptions=r.boolean("refetch_subscriptions", False),
        portal_return_url=r.string("portal_return_url", ""),
        checkout_success_url=r.string("checkout_success_url", ""),
        checkout_cancel_url=r.string("checkout_cancel_url", ""),
        checkout_plan=r.string("checkout_plan", ""),
    )


ENV_CONFIG = "MQP_CONFIG"


def default_config_path(env: Mapping[str, str] | None = None) -> str | None:
    """$MQP_CONFIG, else ./config.yaml when present, else None (embedded defaults)."""
    environ = os.environ if env is None else env
    if environ.get(ENV_CONFIG):
        return environ[ENV_CONFIG]
    return "config.yaml" if Path("config.yaml").is_file() else None


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Read config.yaml (or embedded defaults when ``path`` is None) plus the environment."""
    environ = os.environ if env is None else env
    data: Any = None
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(
                f"{p}: config file not found; pass --config PATH or create it"
            ) from None
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read config file: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{p}: not valid UTF-8 (byte {exc.start}); save it as UTF-8"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{p}: not valid YAML{where}") from None
    return parse_config(data, environ)
