from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestServer

from tests.fakes.upstream import ScriptedUpstream


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedUpstream, str]]:
    """A scripted upstream and its base URL."""
    up = ScriptedUpstream()
    server = TestServer(up.app(), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield up, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()
