"""`mcp-quota-proxy serve` as an operator runs it: a real process, tenants and keys made with
the CLI, a tool call through it, start-up warnings, and a clean exit on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.conftest import PEPPER
from tests.fakes.upstream import ScriptedUpstream
from tests.redis_server import free_port
from tests.rpc import bearer, call

pytestmark = pytest.mark.redis


async def _cli(env: dict[str, str], *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def _lines_until(stream: asyncio.StreamReader, marker: str, lines: list[str]) -> None:
    async with asyncio.timeout(30):
        while True:
            raw = await stream.readline()
            assert raw, f"serve exited before logging {marker!r}: {lines}"
            lines.append(raw.decode())
            if marker in lines[-1]:
                return


@pytest.fixture
def serve_env(
    tmp_path: Path, redis_url: str, key_prefix: str, scripted: tuple[ScriptedUpstream, str]
) -> tuple[dict[str, str], int]:
    port = free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "upstream": {"url": scripted[1]},
        "redis": {"key_prefix": key_prefix},
        "plans": {"free": {"included_units": 2}},
        "spool": {"path": str(tmp_path / "usage.db")},
        "ops": {"readiness_delay_s": 0.1},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "REDIS_URL": redis_url, "MQP_KEY_PEPPER": PEPPER, "MQP_CONFIG": str(path)}
    return env, port


@pytest.fixture
async def serve(
    serve_env: tuple[dict[str, str], int],
) -> AsyncIterator[tuple[asyncio.subprocess.Process, list[str]]]:
    env, _ = serve_env
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield proc, []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_serve_warns_about_an_empty_store_then_serves_and_stops_cleanly(
    serve_env: tuple[dict[str, str], int],
    serve: tuple[asyncio.subprocess.Process, list[str]],
) -> None:
    env, port = serve_env
    proc, lines = serve
    assert proc.stderr is not None
    await _lines_until(proc.stderr, '"listening"', lines)
    (warning,) = [json.loads(x) for x in lines if "tenant_store_empty" in x]
    assert "appendonly" in warning["message"] and "tenant create" in warning["message"]

    await _cli(env, "tenant", "create", "acme")
    key = (await _cli(env, "key", "issue", "acme")).strip()
    url = f"http://127.0.0.1:{port}/mcp"
    async with aiohttp.ClientSession() as http:
        replies = []
        for i in range(3):
            async with http.post(url, json=call(i, "add", a=i), headers=bearer(key)) as r:
                assert r.status == 200
                replies.append(await r.json())
    assert [r["result"]["isError"] for r in replies] == [False, False, True]

    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 20) == 0
    rest = (await proc.stderr.read()).decode()
    assert key not in "".join(lines) + rest  # the key never reaches the logs


async def test_serve_names_an_unreachable_store(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    port = free_port()
    path.write_text(
        yaml.safe_dump(
            {
                "listen": {"port": port},
                "spool": {"path": str(tmp_path / "u.db")},
                "ops": {"readiness_delay_s": 0.1},
            }
        )
    )
    env = {
        **os.environ,
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "MQP_KEY_PEPPER": PEPPER,
        "MQP_CONFIG": str(path),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        await _lines_until(proc.stderr, "tenant_store_unreachable", lines)
        event = json.loads(lines[-1])
        assert event["url"] == "redis://127.0.0.1:1/0"
        assert "503" in event["message"] and "REDIS_URL" in event["message"]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
