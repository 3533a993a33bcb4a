"""The `mcp-quota-proxy` command line, run as a real subprocess (`python -m proxy ...`).

Every run gets an explicit environment (REDIS_URL, MQP_KEY_PEPPER and MQP_CONFIG removed from
the inherited one unless a test sets them), a temporary working directory so that the
./config.yaml lookup never finds the repository's file, and a config whose redis.key_prefix is
the test's own prefix, so tenant and key commands touch only keys the test cleans up.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from proxy.auth import hash_key
from tests.conftest import PEPPER

REPO_ROOT = Path(__file__).resolve().parents[2]
REPO_CONFIG = REPO_ROOT / "config.yaml"
RUN_TIMEOUT_S = 30.0
KEY_RE = re.compile(r"mqp_([0-9a-f]{12})_[A-Za-z0-9_-]+")
DEAD_REDIS_URL = "redis://127.0.0.1:1/0"

HELP_ARGS = [
    [],
    ["serve"],
    ["check-config"],
    ["demo"],
    ["tenant"],
    ["tenant", "create"],
    ["tenant", "show"],
    ["tenant", "list"],
    ["tenant", "set-plan"],
    ["key"],
    ["key", "issue"],
    ["key", "list"],
    ["key", "revoke"],
]


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without the variables the CLI reads, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"REDIS_URL", "MQP_KEY_PEPPER", "MQP_CONFIG"}
    }
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def run_cli(
    args: list[str], *, env: dict[str, str], cwd: Path, timeout: float = RUN_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def repo_config_with(**changes: dict[str, Any]) -> dict[str, Any]:
    """The repository's config.yaml with some sections updated."""
    data: dict[str, Any] = yaml.safe_load(REPO_CONFIG.read_text(encoding="utf-8"))
    for section, values in changes.items():
        data.setdefault(section, {}).update(values)
    return data


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout


@dataclass
class Cli:
    """Runs the CLI against the test's Redis, with its key prefix and the test pepper."""

    workdir: Path
    config: Path
    env: dict[str, str]
    redis_url: str
    key_prefix: str
    calls: list[list[str]] = field(default_factory=list)

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [*args, "--config", str(self.config)]
        self.calls.append(argv)
        result = run_cli(argv, env=self.env, cwd=self.workdir)
        assert_no_traceback(result)
        return result

    def ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = self(*args)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result

    def stored(self) -> dict[str, list[str]]:
        """Every key under the test's prefix, with all its names, fields and values."""
        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        out: dict[str, list[str]] = {}
        try:
            for name in client.scan_iter(match=f"{self.key_prefix}:*", count=1000):
                kind = client.type(name)
                if kind == "string":
                    out[name] = [str(client.get(name))]
                elif kind == "hash":
                    h = client.hgetall(name)
                    out[name] = [*h.keys(), *h.values()]
                elif kind == "set":
                    out[name] = sorted(client.smembers(name))
                elif kind == "list":
                    out[name] = list(client.lrange(name, 0, -1))
                elif kind == "zset":
                    out[name] = list(client.zrange(name, 0, -1))
                else:
                    out[name] = [f"<{kind}>"]
        finally:
            client.close()
        return out


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    d = tmp_path / "cwd"
    d.mkdir()
    return d


@pytest.fixture
def cli(workdir: Path, tmp_path: Path, redis_url: str, key_prefix: str) -> Iterator[Cli]:
    config = write_yaml(
        tmp_path / "cli-config.yaml", repo_config_with(redis={"key_prefix": key_prefix})
    )
    env = clean_env(REDIS_URL=redis_url, MQP_KEY_PEPPER=PEPPER)
    yield Cli(workdir, config, env, redis_url, key_prefix)


def issue_key(cli: Cli, tenant: str) -> tuple[str, str]:
    """Issue a key; returns (key, key_id) after checking the output contract."""
    result = cli.ok("key", "issue", tenant)
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    key = lines[0]
    m = KEY_RE.fullmatch(key)
    assert m is not None, key
    key_id = m.group(1)
    assert key_id in result.stderr
    assert "only once" in result.stderr
    assert key not in result.stderr
    return key, key_id


# --- 1. usage ------------------------------------------------------------------------------


@pytest.mark.parametrize("verb", HELP_ARGS, ids=lambda v: " ".join(v) or "top")
def test_help_exits_zero_and_prints_usage(verb: list[str], workdir: Path) -> None:
    result = run_cli([*verb, "--help"], env=clean_env(), cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: mcp-quota-proxy"), result.stdout
    assert result.stderr == ""
    if (verb and verb[0] in {"serve", "check-config"}) or len(verb) == 2:
        assert "--config" in result.stdout


def test_no_verb_is_a_usage_error(workdir: Path) -> None:
    result = run_cli([], env=clean_env(), cwd=workdir)
    assert result.returncode == 2
    assert "usage: mcp-quota-proxy" in result.stderr
    assert "required" in result.stderr
    assert_no_traceback(result)


def test_unknown_verb_is_a_usage_error(workdir: Path) -> None:
    result = run_cli(["frobnicate"], env=clean_env(), cwd=workdir)
    assert result.returncode == 2
    assert "usage: mcp-quota-proxy" in result.stderr
    assert "frobnicate" in result.stderr
    assert "check-config" in result.stderr  # lists the valid verbs
    assert_no_traceback(result)


def test_unknown_action_is_a_usage_error(workdir: Path) -> None:
    result = run_cli(["tenant", "delete", "acme"], env=clean_env(), cwd=workdir)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
    assert_no_traceback(result)


# --- 2. check-config -----------------------------------------------------------------------


def test_check_config_accepts_the_repo_config(workdir: Path) -> None:
    result = run_cli(["check-config", "--config", str(REPO_CONFIG)], env=clean_env(), cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert "free, pro (default free)" in result.stdout
    assert "embedded (memory://)" in result.stdout


def test_check_config_with_shared_redis_and_pepper(workdir: Path) -> None:
    env = clean_env(REDIS_URL="redis://127.0.0.1:6399/0", MQP_KEY_PEPPER=PEPPER)
    result = run_cli(["check-config", "--config", str(REPO_CONFIG)], env=env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "shared Redis" in result.stdout


def test_check_config_defaults_without_any_file(workdir: Path) -> None:
    result = run_cli(["check-config"], env=clean_env(), cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "embedded defaults: OK" in result.stdout


def test_check_config_finds_config_yaml_in_cwd(workdir: Path) -> None:
    write_yaml(workdir / "config.yaml", {"listen": {"port": 9191}})
    result = run_cli(["check-config"], env=clean_env(), cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "config.yaml: OK" in result.stdout
    assert ":9191" in result.stdout


def test_check_config_honours_mqp_config(workdir: Path, tmp_path: Path) -> None:
    write_yaml(workdir / "config.yaml", {"listen": {"port": 9191}})
    other = write_yaml(tmp_path / "other.yaml", {"listen": {"port": 9292}})
    result = run_cli(["check-config"], env=clean_env(MQP_CONFIG=str(other)), cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert ":9292" in result.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plans: {free: {overage: maybe}}\n", ["plans.free.overage", "block", "bill", "maybe"]),
        ("listen:\n  port: 8080\n  bogus: 1\n", ["listen.bogus", "unknown key", "host, port"]),
        ("redis: {fail_mode: sideways}\n", ["redis.fail_mode", "open", "closed"]),
        ("upstream: {url: ftp://x}\n", ["upstream.url", "http"]),
        ("default_plan: gold\n", ["default_plan", "gold", "free"]),
        ("log_level: loud\n", ["log_level", "debug", "info", "warning", "error"]),
        ("listen: {port: 70000}\n", ["listen.port", "from 0 to 65535", "70000"]),
        ("upstream: {url: 'http://up:99999'}\n", ["upstream.url", "1 to 65535", "up:99999"]),
    ],
    ids=[
        "bad-choice",
        "unknown-key",
        "fail-mode",
        "upstream-url",
        "default-plan",
        "log-level",
        "listen-port-range",
        "upstream-port-range",
    ],
)
def test_check_config_rejects_bad_values_by_path(
    workdir: Path, text: str, expected: list[str]
) -> None:
    (workdir / "bad.yaml").write_text(text, encoding="utf-8")
    result = run_cli(["check-config", "--config", "bad.yaml"], env=clean_env(), cwd=workdir)
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    for needle in expected:
        assert needle in result.stderr, (needle, result.stderr)
    assert_no_traceback(result)


def test_check_config_invalid_yaml_names_the_line(workdir: Path) -> None:
    (workdir / "broken.yaml").write_text("listen:\n  port: 8080\nplans: [free\n", "utf-8")
    result = run_cli(["check-config", "--config", "broken.yaml"], env=clean_env(), cwd=workdir)
    assert result.returncode != 0
    assert "not valid YAML" in result.stderr
    assert re.search(r"line \d+", result.stderr), result.stderr
    assert_no_traceback(result)


def test_check_config_missing_file(workdir: Path) -> None:
    result = run_cli(["check-config", "--config", "nope.yaml"], env=clean_env(), cwd=workdir)
    assert result.returncode != 0
    assert "nope.yaml" in result.stderr
    assert "not found" in result.stderr
    assert_no_traceback(result)


@pytest.mark.parametrize("pepper", [None, "short"], ids=["unset", "too-short"])
def test_shared_redis_needs_a_pepper(workdir: Path, pepper: str | None) -> None:
    env = clean_env(REDIS_URL="redis://127.0.0.1:6399/0")
    if pepper is not None:
        env["MQP_KEY_PEPPER"] = pepper
    result = run_cli(["check-config", "--config", str(REPO_CONFIG)], env=env, cwd=workdir)
    assert result.returncode != 0
    assert "MQP_KEY_PEPPER" in result.stderr
    assert "token_urlsafe" in result.stderr  # says how to generate one
    assert_no_traceback(result)


# --- 3. tenants ----------------------------------------------------------------------------


@pytest.mark.redis
def test_tenant_lifecycle(cli: Cli) -> None:
    created = cli.ok("tenant", "create", "acme", "--plan", "free", "--stripe-customer", "cus_123")
    assert "created tenant acme on plan free" in created.stdout
    assert "key issue acme" in created.stdout  # next step

    shown = cli.ok("tenant", "show", "acme").stdout
    assert re.search(r"^plan\s+free$", shown, re.M), shown
    assert re.search(r"^stripe_customer\s+cus_123$", shown, re.M), shown
    assert re.search(r"^status\s+active$", shown, re.M), shown
    assert re.search(r"^created_at\s+\d{4}-\d\d-\d\dT", shown, re.M), shown

    again = cli("tenant", "create", "acme", "--plan", "pro")
    assert again.returncode == 2
    assert "already exists" in again.stderr
    assert "acme" in again.stderr
    # The failed create did not overwrite the existing tenant.
    shown = cli.ok("tenant", "show", "acme").stdout
    assert re.search(r"^plan\s+free$", shown, re.M), shown
    assert re.search(r"^stripe_customer\s+cus_123$", shown, re.M), shown

    listed = cli.ok("tenant", "list").stdout.splitlines()
    assert len(listed) == 1
    assert listed[0].split() == ["acme", "free", "active", "cus_123"]

    moved = cli.ok("tenant", "set-plan", "acme", "pro")
    assert "acme is now on plan pro" in moved.stdout
    shown = cli.ok("tenant", "show", "acme").stdout
    assert re.search(r"^plan\s+pro$", shown, re.M), shown
    assert re.search(r"^stripe_customer\s+cus_123$", shown, re.M), shown


@pytest.mark.redis
def test_tenant_list_empty_and_default_plan(cli: Cli) -> None:
    empty = cli.ok("tenant", "list")
    assert "no tenants" in empty.stdout
    assert "tenant create" in empty.stdout

    cli.ok("tenant", "create", "beta", "--name", "Beta Corp")
    cli.ok("tenant", "create", "alpha")
    shown = cli.ok("tenant", "show", "beta").stdout
    assert re.search(r"^name\s+Beta Corp$", shown, re.M), shown
    assert re.search(r"^plan\s+free$", shown, re.M), shown  # default_plan
    assert re.search(r"^stripe_customer\s+-$", shown, re.M), shown
    ids = [line.split()[0] for line in cli.ok("tenant", "list").stdout.splitlines()]
    assert ids == ["alpha", "beta"]


@pytest.mark.redis
def test_unknown_plan_is_refused(cli: Cli) -> None:
    refused = cli("tenant", "create", "acme", "--plan", "gold")
    assert refused.returncode == 2
    assert "gold" in refused.stderr
    assert "free, pro" in refused.stderr
    assert cli("tenant", "show", "acme").returncode != 0  # nothing was created

    cli.ok("tenant", "create", "acme")
    refused = cli("tenant", "set-plan", "acme", "gold")
    assert refused.returncode == 2
    assert "gold" in refused.stderr
    assert "free, pro" in refused.stderr
    shown = cli.ok("tenant", "show", "acme").stdout
    assert re.search(r"^plan\s+free$", shown, re.M), shown


@pytest.mark.redis
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["tenant", "create", "Bad Id!"], "invalid tenant id"),
        (["tenant", "create", "Acme"], "invalid tenant id"),
        (["tenant", "create", "_acme"], "invalid tenant id"),
        (["tenant", "create", "acme", "--stripe-customer", "xyz"], "invalid Stripe customer"),
    ],
    ids=["spaces", "uppercase", "leading-underscore", "customer"],
)
def test_invalid_tenant_input_is_refused(cli: Cli, args: list[str], needle: str) -> None:
    refused = cli(*args)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("error: ")
    assert needle in refused.stderr
    assert cli.stored() == {}  # nothing half-written


@pytest.mark.redis
@pytest.mark.parametrize(
    "args",
    [
        ["tenant", "show", "nope"],
        ["tenant", "set-plan", "nope", "pro"],
        ["key", "issue", "nope"],
        ["key", "list", "nope"],
    ],
    ids=["show", "set-plan", "key-issue", "key-list"],
)
def test_unknown_tenant_fails_clearly(cli: Cli, args: list[str]) -> None:
    result = cli(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "no tenant 'nope'" in result.stderr
    assert "tenant list" in result.stderr


# --- 4. keys -------------------------------------------------------------------------------


@pytest.mark.redis
def test_key_issue_list_revoke(cli: Cli) -> None:
    cli.ok("tenant", "create", "acme")
    none_yet = cli.ok("key", "list", "acme")
    assert "has no keys" in none_yet.stdout

    key1, id1 = issue_key(cli, "acme")
    key2, id2 = issue_key(cli, "acme")
    assert key1 != key2
    assert id1 != id2

    listed = cli.ok("key", "list", "acme").stdout
    ids = [line.split()[0] for line in listed.splitlines()]
    assert sorted(ids) == sorted([id1, id2])
    for key in (key1, key2):
        secret = key.split("_", 2)[2]
        assert key not in listed
        assert secret not in listed

    # Redis holds a peppered hash of each key, never the key or its secret part.
    stored = cli.stored()
    for key in (key1, key2):
        secret = key.split("_", 2)[2]
        assert f"{cli.key_prefix}:key:{hash_key(key, PEPPER)}" in stored
        for name, values in stored.items():
            assert key not in name and secret not in name
            for value in values:
                assert key not in value, name
                assert secret not in value, name

    revoked = cli.ok("key", "revoke", "acme", id1)
    assert f"revoked key {id1}" in revoked.stdout
    ids = [line.split()[0] for line in cli.ok("key", "list", "acme").stdout.splitlines()]
    assert ids == [id2]
    stored = cli.stored()
    assert f"{cli.key_prefix}:key:{hash_key(key1, PEPPER)}" not in stored
    assert f"{cli.key_prefix}:key:{hash_key(key2, PEPPER)}" in stored

    again = cli("key", "revoke", "acme", id1)
    assert again.returncode == 2
    assert id1 in again.stderr
    assert "key list acme" in again.stderr


@pytest.mark.redis
def test_key_label_is_listed(cli: Cli) -> None:
    cli.ok("tenant", "create", "acme")
    result = cli.ok("key", "issue", "acme", "--label", "ci-runner")
    key = result.stdout.strip()
    assert KEY_RE.fullmatch(key)
    listed = cli.ok("key", "list", "acme").stdout
    assert "ci-runner" in listed
    assert key not in listed


@pytest.mark.redis
def test_revoking_an_unknown_key_fails_clearly(cli: Cli) -> None:
    cli.ok("tenant", "create", "acme")
    _, kept = issue_key(cli, "acme")
    result = cli("key", "revoke", "acme", "0123456789ab")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "has no key '0123456789ab'" in result.stderr
    ids = [line.split()[0] for line in cli.ok("key", "list", "acme").stdout.splitlines()]
    assert ids == [kept]


# --- 5. embedded store ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["tenant", "create", "acme"],
        ["tenant", "show", "acme"],
        ["tenant", "list"],
        ["tenant", "set-plan", "acme", "pro"],
        ["key", "issue", "acme"],
        ["key", "list", "acme"],
        ["key", "revoke", "acme", "0123456789ab"],
    ],
    ids=lambda a: "-".join(a[:2]),
)
def test_admin_commands_need_shared_redis(workdir: Path, args: list[str]) -> None:
    config = write_yaml(workdir / "embedded.yaml", repo_config_with(redis={"url": "memory://"}))
    result = run_cli([*args, "--config", str(config)], env=clean_env(), cwd=workdir)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "set REDIS_URL" in result.stderr
    assert_no_traceback(result)


# --- 6. Redis down -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["tenant", "list"], ["tenant", "create", "acme"], ["key", "issue", "acme"]],
    ids=lambda a: "-".join(a[:2]),
)
def test_unreachable_redis_fails_fast_and_readably(workdir: Path, args: list[str]) -> None:
    env = clean_env(REDIS_URL=DEAD_REDIS_URL, MQP_KEY_PEPPER=PEPPER)
    started = time.monotonic()
    result = run_cli([*args, "--config", str(REPO_CONFIG)], env=env, cwd=workdir, timeout=15)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert elapsed < 5, elapsed
    assert result.stdout == ""
    assert_no_traceback(result)
    assert result.stderr.startswith("error: ")
    assert "Redis" in result.stderr
    assert "REDIS_URL" in result.stderr


def test_serve_on_a_busy_port_names_the_port_not_redis(workdir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_yaml(
            workdir / "busy.yaml",
            repo_config_with(listen={"port": port}, redis={"url": "memory://"}),
        )
        result = run_cli(["serve", "--config", str(config)], env=clean_env(), cwd=workdir)
    assert result.returncode == 2
    assert_no_traceback(result)
    assert result.stderr == (
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use; is another process "
        "using it? Pick another listen.port\n"
    )


# --- 7. the spool cannot be opened -----------------------------------------------------------

SPOOL_FIX = "fix or move the file, or point spool.path elsewhere"


def test_serve_with_a_spool_path_under_a_regular_file_names_spool_path(
    workdir: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory should be\n", encoding="utf-8")
    spool = blocker / "spool" / "usage.db"
    config = write_yaml(
        workdir / "spool.yaml",
        repo_config_with(
            listen={"port": 0}, redis={"url": "memory://"}, spool={"path": str(spool)}
        ),
    )
    # Port 0 would bind: a serve that got past the spool runs until the timeout fails the test.
    result = run_cli(["serve", "--config", str(config)], env=clean_env(), cwd=workdir)
    assert result.returncode == 2
    assert_no_traceback(result)
    assert result.stderr == (
        f"error: spool.path {spool}: {blocker} is a file, not a directory; {SPOOL_FIX}\n"
    )


@pytest.mark.parametrize("verb", [["serve"], ["usage", "acme"]], ids=lambda v: v[0])
def test_a_spool_that_is_not_sqlite_is_one_line_not_a_hang(
    workdir: Path, tmp_path: Path, verb: list[str]
) -> None:
    spool = tmp_path / "usage.db"
    spool.write_bytes(b"this is not an SQLite database, only text that looks like one\n" * 64)
    config = write_yaml(
        workdir / "garbage.yaml",
        repo_config_with(
            listen={"port": 0}, redis={"url": "memory://"}, spool={"path": str(spool)}
        ),
    )
    # An SQLite connection left open keeps its thread, and the process, alive: the timeout
    # turns that hang into a failure.
    result = run_cli([*verb, "--config", str(config)], env=clean_env(), cwd=workdir, timeout=20)
    assert result.returncode == 2
    assert_no_traceback(result)
    assert result.stderr == f"error: spool.path {spool}: file is not a database; {SPOOL_FIX}\n"
    assert "cannot listen" not in result.stderr
