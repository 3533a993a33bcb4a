from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from proxy.config import Config, parse_config
from tests.redis_server import RedisServer, delete_prefix, shared_url, start_private_server

PEPPER = "test-pepper-0123456789abcdef"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis over a real connection for the whole run."""
    url = shared_url()
    if url is not None:
        yield url
        return
    server = start_private_server()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def key_prefix(redis_url: str) -> Iterator[str]:
    prefix = f"mqpt{uuid.uuid4().hex[:12]}"
    yield prefix
    delete_prefix(redis_url, prefix)


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server only this test uses, so it may be stopped mid-test."""
    server = start_private_server()
    try:
        yield server
    finally:
        server.stop()


ConfigFactory = Callable[..., Config]


def build_config(
    base: dict[str, Any], env: dict[str, str] | None = None, **sections: Any
) -> Config:
    data: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name].update(value)
        else:
            data[name] = value
    return parse_config(data, {"MQP_KEY_PEPPER": PEPPER, **(env or {})})


@pytest.fixture
def make_config() -> ConfigFactory:
    def factory(env: dict[str, str] | None = None, **sections: Any) -> Config:
        base: dict[str, Any] = {
            "upstream": {"url": "http://127.0.0.1:9"},
            "redis": {"url": "memory://"},
            "plans": {
                "free": {"included_units": 5, "overage": "block"},
                "pro": {"included_units": 1000, "overage": "bill", "hard_cap": 5000},
            },
            "default_plan": "free",
        }
        return build_config(base, env, **sections)

    return factory


@pytest.fixture
async def anyio_backend() -> AsyncIterator[str]:
    yield "asyncio"
