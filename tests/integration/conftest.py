from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.fakes.upstream import ScriptedUpstream
from tests.proxy_harness import local_server


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedUpstream, str]]:
    """A scripted upstream and its base URL."""
    up = ScriptedUpstream()
    async with local_server(up.app()) as base:
        yield up, base
