"""Tests for proxy.config: defaults, environment overrides and validation messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config import (
    ENV_PEPPER,
    ENV_REDIS_URL,
    ENV_STRIPE_API_BASE,
    MEMORY_URL,
    MIN_PEPPER_LEN,
    Config,
    ConfigError,
    Plan,
    RatePolicy,
    load_config,
    parse_config,
)

PEPPER = "unit-test-pepper-0123456789"
SAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "config.yaml"


def config_error(data: Any, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env or {})
    return str(info.value)


# --- defaults -------------------------------------------------------------------------------


def test_defaults_when_document_is_empty() -> None:
    cfg = parse_config(None, {})

    assert cfg.listen.host == "127.0.0.1"
    assert cfg.listen.port == 8080
    assert cfg.upstream.url == "http://127.0.0.1:8000"
    assert cfg.upstream.mcp_paths == ("/mcp",)
    assert cfg.upstream.connect_timeout_s == 10.0
    assert cfg.proxy.max_body_bytes == 4 * 1024 * 1024
    assert cfg.proxy.allowed_origins == ()
    assert cfg.proxy.tenant_header == "X-MCP-Tenant"
    assert cfg.proxy.refusal_mode == "tool_error"
    assert cfg.proxy.upgrade_url == ""
    assert cfg.proxy.bill_tool_errors is False
    assert cfg.proxy.resume_grace_s == 300.0
    assert dict(cfg.proxy.gated_methods) == {"tools/call": 1}
    assert cfg.redis.url == MEMORY_URL
    assert cfg.redis.embedded is True
    assert cfg.redis.key_prefix == "mqp"
    assert cfg.redis.timeout_ms == 250
    assert cfg.redis.breaker_failures == 3
    assert cfg.redis.breaker_cooldown_s == 5.0
    assert cfg.redis.fail_mode == "open"
    assert cfg.redis.reservation_ttl_s == 3600
    assert cfg.auth.key_prefix == "mqp_"
    assert cfg.auth.pepper == ""
    assert cfg.log_level == "info"
    assert cfg.default_plan == "free"
    assert list(cfg.plans) == ["free"]
    free = cfg.plans["free"]
    assert free.included_units == 100
    assert free.overage == "block"
    assert free.hard_cap is None
    assert free.rate == RatePolicy(per_second=5.0, burst=10)
    assert dict(free.tool_weights) == {}
    assert free.hidden_tools == frozenset()
    assert free.billed is True


def test_empty_mapping_and_none_give_the_same_config() -> None:
    assert parse_config({}, {}) == parse_config(None, {})


def test_null_sections_are_treated_as_empty() -> None:
    cfg = parse_config({"listen": None, "proxy": None, "redis": None}, {})
    assert cfg == parse_config(None, {})


def test_full_document_is_read() -> None:
    cfg = parse_config(
        {
            "listen": {"host": "0.0.0.0", "port": 9000},
            "upstream": {"url": "https://up.example.com/", "mcp_paths": ["/mcp", "/sse"]},
            "proxy": {
                "allowed_origins": ["https://app.example.com"],
                "tenant_header": "X-Tenant",
                "refusal_mode": "jsonrpc_error",
                "upgrade_url": "https://example.com/upgrade",
                "bill_tool_errors": True,
                "gated_methods": {"tools/call": 2, "resources/read": 1},
            },
            "redis": {"fail_mode": "closed", "key_prefix": "acme"},
            "auth": {"key_prefix": "acme_"},
            "plans": {
                "free": {"included_units": 10},
                "pro": {
                    "included_units": 1000,
                    "overage": "bill",
                    "hard_cap": 5000,
                    "rate": {"per_second": 0.5},
                    "tool_weights": {"search": 5},
                    "hidden_tools": ["admin"],
                    "billed": False,
                },
            },
            "default_plan": "pro",
            "log_level": "debug",
        },
        {},
    )

    assert cfg.listen.host == "0.0.0.0"
    assert cfg.listen.port == 9000
    assert cfg.upstream.url == "https://up.example.com"  # trailing slash stripped
    assert cfg.upstream.mcp_paths == ("/mcp", "/sse")
    assert cfg.proxy.allowed_origins == ("https://app.example.com",)
    assert cfg.proxy.tenant_header == "X-Tenant"
    assert cfg.proxy.refusal_mode == "jsonrpc_error"
    assert cfg.proxy.bill_tool_errors is True
    assert dict(cfg.proxy.gated_methods) == {"tools/call": 2, "resources/read": 1}
    assert cfg.redis.fail_mode == "closed"
    assert cfg.redis.key_prefix == "acme"
    assert cfg.auth.key_prefix == "acme_"
    assert cfg.default_plan == "pro"
    assert cfg.log_level == "debug"
    pro = cfg.plans["pro"]
    assert pro == Plan(
        name="pro",
        included_units=1000,
        overage="bill",
        hard_cap=5000,
        rate=RatePolicy(per_second=0.5, burst=1),  # burst defaults to max(1, int(rate))
        tool_weights={"search": 5},
        hidden_tools=frozenset({"admin"}),
        billed=False,
    )
    assert cfg.plans["free"].rate is None


def test_burst_defaults_to_whole_per_second_rate() -> None:
    cfg = parse_config({"plans": {"p": {"rate": {"per_second": 20}}}}, {})
    assert cfg.plans["p"].rate == RatePolicy(per_second=20.0, burst=20)


def test_hard_cap_equal_to_included_units_is_accepted() -> None:
    cfg = parse_config({"plans": {"p": {"included_units": 50, "hard_cap": 50}}}, {})
    assert cfg.plans["p"].hard_cap == 50


# --- environment ----------------------------------------------------------------------------


def test_redis_url_env_overrides_file() -> None:
    cfg = parse_config(
        {"redis": {"url": "redis://from-file:6379/0"}},
        {ENV_REDIS_URL: "redis://from-env:6379/1", ENV_PEPPER: PEPPER},
    )
    assert cfg.redis.url == "redis://from-env:6379/1"
    assert cfg.redis.embedded is False
    assert cfg.auth.pepper == PEPPER


def test_redis_url_env_applies_without_file_setting() -> None:
    cfg = parse_config(None, {ENV_REDIS_URL: "rediss://secure:6380", ENV_PEPPER: PEPPER})
    assert cfg.redis.url == "rediss://secure:6380"


def test_redis_url_from_file_is_used_without_env() -> None:
    cfg = parse_config({"redis": {"url": "unix:///run/redis.sock"}}, {ENV_PEPPER: PEPPER})
    assert cfg.redis.url == "unix:///run/redis.sock"


def test_redis_url_with_wrong_scheme_is_rejected() -> None:
    message = config_error(None, {ENV_REDIS_URL: "http://redis:6379", ENV_PEPPER: PEPPER})
    assert message.startswith("redis.url (or REDIS_URL):")
    assert "'http://redis:6379'" in message


# --- Redis Cluster ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "env"),
    [
        ({"redis": {"url": "redis://node-0:6379/0", "cluster": True}}, {}),
        ({"redis": {"cluster": True}}, {ENV_REDIS_URL: "rediss://u:p%40ss@node-0:6380"}),
        ({"redis": {"url": "redis://:secret@10.0.0.5:7000", "cluster": True}}, {}),
    ],
    ids=["file", "env-tls", "password"],
)
def test_cluster_names_one_seed_node(data: Any, env: dict[str, str]) -> None:
    cfg = parse_config(data, {ENV_PEPPER: PEPPER, **env})
    assert cfg.redis.cluster is True
    assert cfg.redis.embedded is False
    assert parse_config(None, {}).redis.cluster is False  # the default: one node


@pytest.mark.parametrize(
    ("redis", "key", "says"),
    [
        ({"cluster": "yes"}, "redis.cluster", "expected true or false"),
        ({"cluster": True}, "redis.cluster", "memory:// is a single in-process store"),
        ({"url": "unix:///run/redis.sock", "cluster": True}, "redis.cluster", "not unix://"),
        ({"url": "redis://:hunter2@node-0:6379/2", "cluster": True}, "redis.url", "database 0"),
    ],
    ids=["not-a-boolean", "embedded", "unix-socket", "database-2"],
)
def test_cluster_settings_that_cannot_work_are_rejected(
    redis: dict[str, Any], key: str, says: str
) -> None:
    message = config_error({"redis": redis}, {ENV_PEPPER: PEPPER})
    assert message.startswith(f"{key}"), message
    assert says in message
    assert "hunter2" not in message  # the URL may carry a password: never echoed


@pytest.mark.parametrize(
    ("data", "env"),
    [
        ({"redis": {"url": "redis://shared:6379"}}, {}),
        (None, {ENV_REDIS_URL: "redis://shared:6379"}),
    ],
    ids=["file", "env"],
)
def test_shared_redis_requires_pepper(data: Any, env: dict[str, str]) -> None:
    message = config_error(data, env)
    assert message.startswith(f"{ENV_PEPPER}:")
    assert "must be set" in message


def test_embedded_redis_does_not_require_pepper() -> None:
    cfg = parse_config(None, {})
    assert cfg.redis.embedded
    assert cfg.auth.pepper == ""


def test_short_pepper_is_rejected_even_with_embedded_redis() -> None:
    message = config_error(None, {ENV_PEPPER: "x" * (MIN_PEPPER_LEN - 1)})
    assert message.startswith(f"{ENV_PEPPER}:")
    assert str(MIN_PEPPER_LEN) in message


def test_pepper_of_minimum_length_is_accepted() -> None:
    pepper = "x" * MIN_PEPPER_LEN
    cfg = parse_config({"redis": {"url": "redis://r:6379"}}, {ENV_PEPPER: pepper})
    assert cfg.auth.pepper == pepper


# --- unknown keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "path", "valid"),
    [
        ({"bogus": 1}, "bogus", ["default_plan", "listen", "plans", "proxy", "redis"]),
        ({"proxy": {"bogus": 1}}, "proxy.bogus", ["allowed_origins", "tenant_header"]),
        ({"listen": {"prot": 1}}, "listen.prot", ["host", "port"]),
        (
            {"plans": {"free": {"bogus": 1}}},
            "plans.free.bogus",
            ["hard_cap", "included_units", "overage", "tool_weights"],
        ),
        (
            {"plans": {"free": {"rate": {"per_second": 1, "bogus": 2}}}},
            "plans.free.rate.bogus",
            ["burst", "per_second"],
        ),
    ],
    ids=["top", "proxy", "listen", "plan", "plan-rate"],
)
def test_unknown_key_names_dotted_path_and_valid_keys(
    data: Any, path: str, valid: list[str]
) -> None:
    message = config_error(data)
    assert message.startswith(f"{path}: unknown key")
    assert "valid keys here are" in message
    listed = message.split("valid keys here are", 1)[1]
    for key in valid:
        assert key in listed


# --- invalid values -------------------------------------------------------------------------


def plan_with(**settings: Any) -> dict[str, Any]:
    return {"plans": {"free": settings}}


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"listen": {"port": "8080"}}, "listen.port"),
        ({"listen": {"port": True}}, "listen.port"),
        ({"listen": {"port": -1}}, "listen.port"),
        ({"listen": {"host": 127}}, "listen.host"),
        ({"listen": "0.0.0.0:80"}, "listen"),
        ({"upstream": {"url": "ftp://up"}}, "upstream.url"),
        ({"upstream": {"mcp_paths": ["mcp"]}}, "upstream.mcp_paths"),
        ({"upstream": {"mcp_paths": []}}, "upstream.mcp_paths"),
        ({"upstream": {"mcp_paths": "/mcp"}}, "upstream.mcp_paths"),
        ({"proxy": {"refusal_mode": "silent"}}, "proxy.refusal_mode"),
        ({"proxy": {"bill_tool_errors": "yes"}}, "proxy.bill_tool_errors"),
        ({"proxy": {"max_body_bytes": 10}}, "proxy.max_body_bytes"),
        ({"proxy": {"gated_methods": {"tools/call": 0}}}, "proxy.gated_methods.tools/call"),
        ({"redis": {"fail_mode": "maybe"}}, "redis.fail_mode"),
        ({"redis": {"timeout_ms": 0}}, "redis.timeout_ms"),
        ({"redis": {"key_prefix": "a{b}"}}, "redis.key_prefix"),
        ({"auth": {"key_prefix": "has-dash"}}, "auth.key_prefix"),
        (plan_with(included_units=-1), "plans.free.included_units"),
        (plan_with(included_units=1.5), "plans.free.included_units"),
        (plan_with(overage="refund"), "plans.free.overage"),
        (plan_with(included_units=100, hard_cap=99), "plans.free.hard_cap"),
        (plan_with(rate={"per_second": 0}), "plans.free.rate.per_second"),
        (plan_with(rate={"per_second": -2}), "plans.free.rate.per_second"),
        (plan_with(rate={"per_second": 1, "burst": 0}), "plans.free.rate.burst"),
        (plan_with(rate=5), "plans.free.rate"),
        (plan_with(tool_weights={"search": 0}), "plans.free.tool_weights.search"),
        (plan_with(tool_weights={"search": True}), "plans.free.tool_weights.search"),
        (plan_with(hidden_tools="admin"), "plans.free.hidden_tools"),
        (plan_with(billed="no"), "plans.free.billed"),
        ({"plans": {}}, "plans"),
        ({"plans": ["free"]}, "plans"),
        ({"default_plan": "gold"}, "default_plan"),
        ({"log_level": "verbose"}, "log_level"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_value_names_its_dotted_key(data: Any, key: str) -> None:
    message = config_error(data)
    assert message.startswith(f"{key}:"), message


@pytest.mark.parametrize("port", [0, 1, 65535])
def test_listen_port_accepts_the_tcp_range(port: int) -> None:
    assert parse_config({"listen": {"port": port}}, {}).listen.port == port


@pytest.mark.parametrize("port", [65536, 70000, 2**32])
def test_listen_port_above_65535_is_refused(port: int) -> None:
    # The OS would take the port modulo 65536: 70000 listens on 4464.
    message = config_error({"listen": {"port": port}})
    assert message == f"listen.port: expected a whole number from 0 to 65535, got {port}"


def test_drain_max_batch_is_bounded_by_stripes_value_digits() -> None:
    assert parse_config({"drain": {"max_batch": 100_000}}, {}).drain.max_batch == 100_000
    message = config_error({"drain": {"max_batch": 100_001}})
    assert message == "drain.max_batch: expected a whole number from 1 to 100000, got 100001"


@pytest.mark.parametrize(
    ("data", "env", "key", "address"),
    [
        ({"upstream": {"url": "http://up:70000"}}, {}, "upstream.url", "up:70000"),
        ({"upstream": {"url": "http://up:0/mcp"}}, {}, "upstream.url", "up:0"),
        ({"upstream": {"url": "http://up:http"}}, {}, "upstream.url", "up:http"),
        (
            {"redis": {"url": "redis://:hunter2@r:65536/0"}},
            {ENV_PEPPER: PEPPER},
            "redis.url (or REDIS_URL)",
            "r:65536",
        ),
        (
            None,
            {ENV_REDIS_URL: "redis://r:99999", ENV_PEPPER: PEPPER},
            "redis.url (or REDIS_URL)",
            "r:99999",
        ),
        (None, {ENV_STRIPE_API_BASE: "http://fake:123456"}, "STRIPE_API_BASE", "fake:123456"),
    ],
    ids=["upstream-high", "upstream-zero", "upstream-name", "redis", "redis-env", "stripe-base"],
)
def test_url_with_a_bad_port_is_refused_without_echoing_secrets(
    data: Any, env: dict[str, str], key: str, address: str
) -> None:
    message = config_error(data, env)
    assert message.startswith(f"{key}: expected HOST or HOST:PORT with a port from 1 to 65535")
    assert message.endswith(f"got {address!r}")
    assert "hunter2" not in message


@pytest.mark.parametrize(
    "url", ["http://up", "http://up:1", "http://up:65535/", "http://[::1]:8000", "https://up"]
)
def test_upstream_url_with_a_valid_port_is_accepted(url: str) -> None:
    assert parse_config({"upstream": {"url": url}}, {}).upstream.url == url.rstrip("/")


def test_default_plan_error_lists_defined_plans() -> None:
    message = config_error({"plans": {"free": {}, "pro": {}}, "default_plan": "gold"})
    assert "'gold'" in message
    assert "free" in message
    assert "pro" in message


def test_top_level_must_be_a_mapping() -> None:
    message = config_error(["listen"])
    assert "top level" in message


# --- Config.plan ----------------------------------------------------------------------------


def test_plan_lookup_falls_back_to_default_plan() -> None:
    cfg = parse_config({"plans": {"free": {"included_units": 1}, "pro": {"included_units": 2}}}, {})
    assert cfg.plan("pro").included_units == 2
    assert cfg.plan("free").included_units == 1
    assert cfg.plan("retired-plan") is cfg.plans["free"]


def test_plan_lookup_falls_back_to_explicit_default() -> None:
    cfg = parse_config({"plans": {"free": {}, "pro": {}}, "default_plan": "pro"}, {})
    assert cfg.plan("nope") is cfg.plans["pro"]


# --- load_config ----------------------------------------------------------------------------


def test_load_config_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing, {})
    assert str(missing) in str(info.value)
    assert "not found" in str(info.value)


def test_load_config_directory_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path, {})


def test_load_config_invalid_yaml_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("listen:\n  host: 127.0.0.1\n  port: 8080\n bad: x\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    message = str(info.value)
    assert str(path) in message
    assert "not valid YAML" in message
    assert "line 4" in message


def test_load_config_reads_file_and_env(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "listen:\n  port: 9100\nplans:\n  basic:\n    included_units: 7\n", encoding="utf-8"
    )
    cfg = load_config(path, {ENV_REDIS_URL: "redis://r:6379", ENV_PEPPER: PEPPER})
    assert cfg.listen.port == 9100
    assert cfg.default_plan == "basic"
    assert cfg.plans["basic"].included_units == 7
    assert cfg.redis.url == "redis://r:6379"


def test_load_config_validation_error_from_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("plans:\n  free:\n    bogus: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^plans\.free\.bogus: unknown key"):
        load_config(path, {})


def test_load_config_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("", encoding="utf-8")
    assert load_config(path, {}) == parse_config(None, {})


def test_load_config_without_path_uses_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_REDIS_URL, "redis://os-env:6379")
    monkeypatch.setenv(ENV_PEPPER, PEPPER)
    cfg = load_config(None)
    assert cfg.redis.url == "redis://os-env:6379"
    assert cfg.auth.pepper == PEPPER


def test_sample_config_loads() -> None:
    cfg = load_config(SAMPLE_CONFIG, {ENV_PEPPER: PEPPER})
    assert isinstance(cfg, Config)
    assert cfg.default_plan in cfg.plans


# --- bugs -----------------------------------------------------------------------------------


def test_load_config_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes('log_level: "café"\n'.encode("latin-1"))
    with pytest.raises(ConfigError):
        load_config(path, {})


def test_numeric_plan_name_keeps_its_settings_or_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("plans:\n  2024:\n    included_units: 5\n", encoding="utf-8")
    try:
        cfg = load_config(path, {})
    except ConfigError as exc:
        assert "plans" in str(exc)
        return
    # Accepting the plan is fine only if its limit survives; today it becomes unlimited.
    assert cfg.plan("2024").included_units == 5


def test_unknown_keys_of_mixed_types_give_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("proxy:\n  bogus: 1\n  2: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^proxy\."):
        load_config(path, {})
