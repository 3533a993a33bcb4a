"""What tenant lookup costs on the hot path: the pub/sub-invalidated cache this proxy uses
against reading Redis on every request (no cache). Not a test.

    python -m tests.benchmarks.auth_lookup [--redis-url URL] [--n 5000]

A TTL'd cache was not measured: it cannot meet "revocation effective at once".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid

from proxy.breaker import CircuitBreaker
from proxy.config import RedisConfig
from proxy.directory import Directory
from proxy.keys import KeySpace
from proxy.store import StoreGuard, connect
from proxy.tenants import TenantStore

PEPPER = "bench-pepper-0123456789abcdef"


async def _measure(directory: Directory, key: str, n: int) -> tuple[float, float, float]:
    lat = []
    cpu0 = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        tenant, _ = await directory.authenticate(key)
        lat.append(time.perf_counter() - t0)
        assert tenant is not None
    cpu = (time.process_time() - cpu0) / n
    lat.sort()
    return statistics.median(lat) * 1e6, lat[int(0.99 * n)] * 1e6, cpu * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--n", type=int, default=5000)
    args = parser.parse_args()
    prefix = f"mqpbench{uuid.uuid4().hex[:8]}"
    stores = connect(RedisConfig(url=args.redis_url, key_prefix=prefix))
    keys = KeySpace(prefix)
    tenants = TenantStore(stores.main, keys, PEPPER, "mqp_")
    guard = StoreGuard(CircuitBreaker(3, 5.0, time.monotonic), timeout=1.0)
    directory = Directory(stores.main, stores.listener, keys, PEPPER, guard)
    try:
        await tenants.create("bench", name=None, plan="free", stripe_customer=None, now=0)
        key, _ = await tenants.issue_key("bench", label="", now=0)
        await directory.start()
        assert directory.live
        await directory.authenticate(key)
        cached = await _measure(directory, key, args.n)
        directory._live = False  # what "no cache" costs: every request reads Redis
        uncached = await _measure(directory, key, args.n)
        print(f"tenant lookup, {args.n} sequential calls against {args.redis_url}")
        print(f"{'variant':36} {'p50 us':>8} {'p99 us':>8} {'CPU us/call':>12}")
        for name, (p50, p99, cpu) in (
            ("pub/sub-invalidated cache (chosen)", cached),
            ("no cache (3 Redis round trips)", uncached),
        ):
            print(f"{name:36} {p50:8.1f} {p99:8.1f} {cpu:12.1f}")
    finally:
        await directory.stop()
        scan = [k async for k in stores.main.scan_iter(match=f"{prefix}:*")]
        if scan:
            await stores.main.delete(*scan)
        await stores.close()


if __name__ == "__main__":
    asyncio.run(main())
