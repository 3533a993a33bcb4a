"""Running the drainer: as `drain [--once]`, and as a child process supervised by `serve`."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import random
import signal
import socket
import sys
from collections.abc import Callable, Mapping

import structlog

from ..clock import Clock, SystemClock
from ..config import Config
from .drainer import CycleReport, Drainer
from .meter import StripeMeterClient
from .retry import backoff
from .spool import Spool

log = structlog.get_logger(__name__)

CHILD_GRACE_S = 25.0
# A child that ran this long was healthy: its next crash restarts it after the shortest delay.
HEALTHY_RUN_S = 60.0
RESTART_BASE_S = 1.0
RESTART_CAP_S = 60.0
# `serve` puts its pid here for the drainer child it supervises (process plumbing, not
# configuration, so it is not in Config). A hand-run `drain` has no such variable.
SUPERVISOR_PID_ENV = "MQP_DRAIN_SUPERVISOR_PID"
# How often a supervised drainer checks that `serve` is still its parent: the portable
# fallback to PR_SET_PDEATHSIG (and a backstop if prctl is unavailable).
PARENT_CHECK_S = 1.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def replica_id(config: Config) -> str:
    return config.spool.replica_id or socket.gethostname()[:40]


def open_spool(config: Config) -> Spool:
    return Spool(
        config.spool.path, synchronous=config.spool.synchronous, replica_id=replica_id(config)
    )


async def drain(config: Config, *, once: bool) -> CycleReport | None:
    # A --once run ends by itself; only the long-running child must not outlive `serve`.
    supervisor = None if once else supervisor_pid(os.environ)
    if supervisor is not None and not follow_parent(supervisor):
        log.warning("drainer_orphaned", supervisor_pid=supervisor, parent_pid=os.getppid())
        return None
    spool = open_spool(config)
    await spool.open()
    client = StripeMeterClient(config.billing.stripe_secret_key, config.billing.stripe_api_base)
    drainer = Drainer(
        spool,
        client,
        drain=config.drain,
        billing=config.billing,
        spool_config=config.spool,
        clock=SystemClock(),
        probe_interval_s=config.ops.stripe_probe_interval_s,
    )
    try:
        if once:
            return await drainer.cycle()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("drainer_started", spool=config.spool.path, replica=spool.replica_id)
        if supervisor is None:
            await drainer.run(stop)
            return None
        watcher = loop.create_task(watch_parent(supervisor, stop), name="drainer-parent-watch")
        try:
            await drainer.run(stop)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        return None
    finally:
        await client.close()
        await spool.close()


def supervisor_pid(environ: Mapping[str, str]) -> int | None:
    """The pid of the `serve` supervising this drainer, or None when run by hand."""
    raw = environ.get(SUPERVISOR_PID_ENV, "")
    return int(raw) if raw.isdigit() else None


def follow_parent(expected: int) -> bool:
    """Have the kernel SIGTERM this process when its parent dies (Linux); whether the parent
    is still `expected`. The check after prctl catches a parent that died before it ran."""
    if sys.platform == "linux":
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            # prctl is variadic and the kernel reads unsigned longs: pass them at that width.
            args = (int(signal.SIGTERM), 0, 0, 0)
            if libc.prctl(PR_SET_PDEATHSIG, *map(ctypes.c_ulong, args)) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        except (OSError, AttributeError) as exc:
            log.warning("drainer_pdeathsig_unavailable", error=repr(exc))  # polling still works
    return os.getppid() == expected


async def watch_parent(
    expected: int,
    stop: asyncio.Event,
    *,
    every: float = PARENT_CHECK_S,
    getppid: Callable[[], int] = os.getppid,
) -> None:
    """Set `stop` (the drainer's graceful exit) once the parent is no longer `expected`: an
    orphan is re-parented to init or a subreaper. Covers platforms without PDEATHSIG."""
    while not stop.is_set():
        if getppid() != expected:
            log.warning("drainer_parent_gone", supervisor_pid=expected)
            stop.set()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(every):
                await stop.wait()


def restart_delay(failures: int, ran_s: float, rand: Callable[[], float]) -> tuple[int, float]:
    """After a child exited having run `ran_s` seconds, given `failures` consecutive earlier
    crashes: the new failure count and the seconds to wait before restarting it. A child that
    ran HEALTHY_RUN_S or longer starts the count afresh, so rare crashes never reach the cap."""
    failures = 1 if ran_s >= HEALTHY_RUN_S else failures + 1
    return failures, backoff(failures, rand, base=RESTART_BASE_S, cap=RESTART_CAP_S)


async def supervise(
    config_path: str | None,
    stop: asyncio.Event,
    *,
    clock: Clock | None = None,
    rand: Callable[[], float] = random.random,
) -> None:
    """Keep a `drain` child process running until `stop`; restart it with backoff if it dies.
    On stop the child gets SIGTERM and CHILD_GRACE_S for its final attempt; if it did not
    make one (it was still starting, or had died), a `drain --once` makes it instead.

    The child exits when this process dies, even by SIGKILL: it gets our pid in
    SUPERVISOR_PID_ENV and sets PR_SET_PDEATHSIG. PDEATHSIG fires when the forking *thread*
    exits; the event loop's thread forks here, and it outlives every child it starts."""
    clock = clock or SystemClock()
    argv = [sys.executable, "-m", "proxy", "drain"]
    if config_path:
        argv += ["--config", config_path]
    env = {**os.environ, SUPERVISOR_PID_ENV: str(os.getpid())}
    failures = 0
    finished_cleanly = False
    while not stop.is_set():
        started = clock.monotonic()
        proc = await asyncio.create_subprocess_exec(*argv, env=env)
        waiter = asyncio.ensure_future(proc.wait())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if stop.is_set():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            finished_cleanly = await _wait(proc, CHILD_GRACE_S) == 0
            break
        failures, delay = restart_delay(failures, clock.monotonic() - started, rand)
        log.error(
            "drainer_exited",
            returncode=proc.returncode,
            failures=failures,
            restart_in_s=round(delay, 2),
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await stop.wait()
    if not finished_cleanly:
        log.info("drainer_final_attempt")
        once = await asyncio.create_subprocess_exec(*argv, "--once")
        await _wait(once, CHILD_GRACE_S)


async def _wait(proc: asyncio.subprocess.Process, limit: float) -> int:
    """The exit code, killing the process if it outlives `limit`."""
    try:
        async with asyncio.timeout(limit):
            return await proc.wait()
    except TimeoutError:
        proc.kill()
        return await proc.wait()
