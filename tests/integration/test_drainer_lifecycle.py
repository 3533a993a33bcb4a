"""The drainer child's lifecycle: it never outlives the `serve` that supervises it, even when
`serve` alone is SIGKILLed, and its restart backoff forgets crashes a healthy run ago."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from proxy.usage.runner import (
    HEALTHY_RUN_S,
    RESTART_CAP_S,
    SUPERVISOR_PID_ENV,
    restart_delay,
    supervisor_pid,
    watch_parent,
)
from tests.fakes.stripe_fake import StripeFake
from tests.fakes.upstream import ScriptedUpstream
from tests.ops_support import ServeStack, children, start_proxy, stripe_serve_stack, until
from tests.rpc import bearer, call

STRIPE_KEY = "sk_test_lifecycle_0123456789"
METER = "mcp_tool_calls"
CALLS = 5
PROBE = ("GET", "/v1/billing/meters")  # an idle drainer's first cycle ends with this read


# --- restart backoff (pure) -----------------------------------------------------------------


def _failures_and_delays(runs: list[float]) -> Iterator[tuple[int, float]]:
    failures = 0
    for ran_s in runs:
        failures, delay = restart_delay(failures, ran_s, lambda: 1.0)
        yield failures, delay


def test_restart_delay_doubles_while_the_child_keeps_crashing_quickly() -> None:
    delays = list(_failures_and_delays([1.0] * 8))
    assert delays == [
        (1, 1.0),
        (2, 2.0),
        (3, 4.0),
        (4, 8.0),
        (5, 16.0),
        (6, 32.0),
        (7, RESTART_CAP_S),
        (8, RESTART_CAP_S),
    ]


def test_restart_delay_starts_afresh_after_a_healthy_run() -> None:
    # A drainer that crashes once a day must not creep up to the cap.
    assert list(_failures_and_delays([HEALTHY_RUN_S] * 10))[-1] == (1, 1.0)
    assert restart_delay(9, HEALTHY_RUN_S, lambda: 1.0) == (1, 1.0)
    assert restart_delay(9, 86_400.0, lambda: 1.0) == (1, 1.0)
    assert restart_delay(9, HEALTHY_RUN_S - 0.001, lambda: 1.0) == (10, RESTART_CAP_S)


def test_restart_delay_is_jittered_below_its_ceiling() -> None:
    assert restart_delay(2, 0.5, lambda: 0.25) == (3, 1.0)
    assert restart_delay(0, 0.5, lambda: 0.0) == (1, 0.0)


# --- who supervises the drainer -------------------------------------------------------------


def test_only_a_supervised_drainer_has_a_supervisor_pid() -> None:
    assert supervisor_pid({}) is None  # `drain` run by hand: no new requirement
    assert supervisor_pid({SUPERVISOR_PID_ENV: "4242"}) == 4242
    assert supervisor_pid({SUPERVISOR_PID_ENV: ""}) is None
    assert supervisor_pid({SUPERVISOR_PID_ENV: "-1"}) is None
    assert supervisor_pid({SUPERVISOR_PID_ENV: "serve"}) is None


async def test_watch_parent_stops_the_drainer_once_it_is_reparented() -> None:
    parents = iter([42, 42, 1])  # serve, serve, then init adopts the orphan
    stop = asyncio.Event()
    await asyncio.wait_for(watch_parent(42, stop, every=0.0, getppid=lambda: next(parents)), 5)
    assert stop.is_set()
    assert next(parents, None) is None  # it looked until the parent changed, not longer


async def test_watch_parent_ends_with_the_drainer() -> None:
    stop = asyncio.Event()
    watcher = asyncio.get_running_loop().create_task(
        watch_parent(42, stop, every=3600.0, getppid=lambda: 42)
    )
    await asyncio.sleep(0)  # let it reach its wait
    assert not watcher.done()
    stop.set()  # SIGTERM from serve, or the final attempt is over
    await asyncio.wait_for(watcher, 5)


# --- real processes -------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Whether `pid` is a live process: an exited orphan may linger as a zombie when the
    init that adopted it does not reap."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _kill(pid: int | None) -> None:
    if pid is not None and _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@pytest.fixture
async def lifecycle(
    tmp_path: Path, redis_url: str, key_prefix: str, scripted: tuple[ScriptedUpstream, str]
) -> AsyncIterator[tuple[StripeFake, ServeStack]]:
    async with stripe_serve_stack(
        tmp_path,
        redis_url=redis_url,
        key_prefix=key_prefix,
        upstream_url=scripted[1],
        stripe_key=STRIPE_KEY,
        meter=METER,
        key_label="lifecycle",
        # After its first cycle the drainer sleeps: only a final attempt can send later usage.
        drain={"interval_s": 3600.0},
        ops={"readiness_delay_s": 0.1},
        log_level="info",
    ) as pair:
        yield pair


@pytest.mark.redis
async def test_sigkilled_serve_takes_its_drainer_down_after_a_final_attempt(
    lifecycle: tuple[StripeFake, ServeStack], tmp_path: Path
) -> None:
    fake, stack = lifecycle
    log = tmp_path / "serve.log"
    serve = await start_proxy(stack, "serve", stderr=log)
    pid = serve.proc.pid
    drainer: int | None = None
    try:
        async with aiohttp.ClientSession() as http:
            await serve.wait_healthy(http)
            await until(lambda: len(children(pid)) == 1, 20, "the drainer child")
            (drainer,) = children(pid)
            await until(lambda: PROBE in fake.calls, 20, "the drainer's first cycle")
            for i in range(CALLS):
                async with http.post(
                    stack.url, json=call(i, "add"), headers=bearer(stack.key)
                ) as r:
                    assert (await r.json())["result"]["isError"] is False
        assert stack.unreported() == CALLS  # the drainer is asleep until its next cycle

        os.kill(pid, signal.SIGKILL)  # serve alone, not its process group
        assert await asyncio.wait_for(serve.proc.wait(), 10) == -signal.SIGKILL
        child = drainer
        await until(lambda: not _alive(child), 5, f"the orphaned drainer {child} to exit")
    except BaseException:
        print(_tail(log))
        raise
    finally:
        serve.kill_group()  # the drainer is in serve's group: this reaches it if it lingers
        _kill(drainer)
    # Parent death arrives as SIGTERM, so the drainer took its usual way out: a final attempt.
    assert fake.total(stack.customer, METER) == CALLS
    assert stack.unreported() == 0


@pytest.mark.redis
async def test_a_drainer_whose_supervisor_died_before_it_started_exits_at_once(
    lifecycle: tuple[StripeFake, ServeStack], tmp_path: Path
) -> None:
    fake, stack = lifecycle
    log = tmp_path / "drain.log"
    # Its real parent is this test: as if `serve` died and the child was adopted before
    # it could ask for PDEATHSIG.
    env = {**stack.env, SUPERVISOR_PID_ENV: str(os.getpid() + 1)}
    orphan = await start_proxy(dataclasses.replace(stack, env=env), "drain", stderr=log)
    try:
        assert await asyncio.wait_for(orphan.proc.wait(), 30) == 0, _tail(log)
    finally:
        orphan.kill_group()
    assert "drainer_orphaned" in _tail(log)
    assert fake.calls == []  # it never started draining


@pytest.mark.redis
async def test_a_drainer_whose_supervisor_lives_keeps_draining_until_sigterm(
    lifecycle: tuple[StripeFake, ServeStack], tmp_path: Path
) -> None:
    fake, stack = lifecycle
    log = tmp_path / "drain.log"
    env = {**stack.env, SUPERVISOR_PID_ENV: str(os.getpid())}  # this test is its parent
    drainer = await start_proxy(dataclasses.replace(stack, env=env), "drain", stderr=log)
    try:
        # The parent check runs at the first await of the first cycle, before this probe.
        await until(lambda: PROBE in fake.calls, 20, "the drainer's first cycle")
        assert drainer.proc.returncode is None, _tail(log)
        drainer.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(drainer.proc.wait(), 20) == 0, _tail(log)
    finally:
        drainer.kill_group()
    assert "drainer_orphaned" not in _tail(log)
    assert "drainer_parent_gone" not in _tail(log)
