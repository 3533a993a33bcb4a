"""Running the drainer: as `drain [--once]`, and as a child process supervised by `serve`."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import socket
import sys

import structlog

from ..clock import SystemClock
from ..config import Config
from .drainer import CycleReport, Drainer
from .meter import StripeMeterClient
from .retry import backoff
from .spool import Spool

log = structlog.get_logger(__name__)

CHILD_GRACE_S = 25.0


def replica_id(config: Config) -> str:
    return config.spool.replica_id or socket.gethostname()[:40]


def open_spool(config: Config) -> Spool:
    return Spool(
        config.spool.path, synchronous=config.spool.synchronous, replica_id=replica_id(config)
    )


async def drain(config: Config, *, once: bool) -> CycleReport | None:
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
        await drainer.run(stop)
        return None
    finally:
        await client.close()
        await spool.close()


async def supervise(config_path: str | None, stop: asyncio.Event) -> None:
    """Keep a `drain` child process running until `stop`; restart it with backoff if it dies.
    On stop the child gets SIGTERM and CHILD_GRACE_S for its final attempt; if it did not
    make one (it was still starting, or had died), a `drain --once` makes it instead."""
    argv = [sys.executable, "-m", "proxy", "drain"]
    if config_path:
        argv += ["--config", config_path]
    failures = 0
    finished_cleanly = False
    while not stop.is_set():
        proc = await asyncio.create_subprocess_exec(*argv)
        waiter = asyncio.ensure_future(proc.wait())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if stop.is_set():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            finished_cleanly = await _wait(proc, CHILD_GRACE_S) == 0
            break
        failures += 1
        delay = backoff(failures, random.random, base=1.0, cap=60.0)
        log.error("drainer_exited", returncode=proc.returncode, restart_in_s=round(delay, 2))
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
