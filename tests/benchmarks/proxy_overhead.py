"""What the quota proxy costs over plain forwarding, measured with wrk: a benchmark, not a test.

    python -m tests.benchmarks.proxy_overhead [--rounds 3] [--duration 10] [--concurrency 1,16,64]
        [--quick] [--warmup 2] [--no-sdk] [--no-rss] [--profile FILE] [--json FILE]

The method of /work/shared/reference/perf-baseline.md, in one run on a 2-core machine:

* One process tree. CPU0 (taskset): wrk ``-t1``, the minimal aiohttp upstream
  (``tests.benchmarks.minimal_upstream``), the official-SDK upstream (``python -m
  proxy.demo.upstream --stateless --json``), a private redis-server (no persistence) and this
  script. CPU1: the systems under test (SUT): nginx as a pure reverse proxy (1 worker,
  keepalive 128), the bare aiohttp forwarder (``tests.benchmarks.bare_forwarder``) and
  ``python -m proxy serve`` (Redis quota, SQLite spool with group commit, billing off, so no
  drainer child), plus a second proxy instance in front of the SDK upstream.
* Load: ``wrk -t1 -cC -dDs --latency -s post.lua URL`` POSTing the 201-byte ``tools/call`` body
  with the tenant's key (``tests/benchmarks/post.lua``). Targets alternate within a round (the
  order rotates), rounds are interleaved, each run has a warm-up; figures are medians over
  rounds and ratios are taken within a round (same pass) before the median.
* CPU µs/request: utime+stime (``/proc/<pid>/stat``, every thread, plus live and reaped
  children) of the SUT's process tree over the measured run ÷ wrk's request count. For the
  direct targets the SUT is the upstream itself (it runs on CPU0 here, next to wrk).
* Foreign CPU: busy time from ``/proc/stat`` (user+nice+system+irq+softirq) minus the CPU of
  every process this script started (and its own). A run above ``--foreign-limit`` cores
  (0.15) is repeated up to ``--max-repeats`` times (within ``--repeat-budget`` repeats per
  invocation) and the least-loaded attempt is kept.
* RSS of a fresh proxy: idle, after one call by each of 10,000 tenants (records written
  straight into Redis with TenantStore's layout, so the proxy's directory caches them all),
  then with 100 SSE streams (GET /mcp) held open through it.

Nothing is installed: wrk, nginx, redis-server and taskset must be on PATH. Everything binds
127.0.0.1 on free ports; temp files live in one directory removed at exit, and every child
process group is terminated (then killed) on exit, error or signal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

MODULE = "tests.benchmarks.proxy_overhead"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LUA = HERE / "post.lua"
NGINX_TEMPLATE = HERE / "nginx_proxy.conf.template"
LOAD_CPU = "0"  # wrk, upstreams, redis, this script
SUT_CPU = "1"  # the system under test
CLK_TCK = os.sysconf("SC_CLK_TCK")
TENANT = "bench"
PLAN = "bench"
REDIS_PREFIX = "mqpbench"
HUGE_LIMIT = 10**12
INSTALL = "apt-get install -y wrk nginx redis-server util-linux"
BODY = (
    '{"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"name":"search_docs","arguments":'
    '{"query":"quarterly revenue by region","limit":10,"snippets":true,"filters":{"lang":"en",'
    '"source":"finance"}}}}'
)
# Same size, but a tool the SDK demo server has (search_docs would be an isError result there,
# which the proxy refunds instead of spooling).
SDK_BODY = (
    '{"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"name":"echo","arguments":{"text":'
    '"quarterly revenue by region, top 10 with snippets, lang en, source finance, fiscal 2026 by '
    'quarter, Q1-Q4"}}}'
)
SDK_ENV = {"BENCH_BODY": SDK_BODY, "BENCH_ACCEPT": "application/json, text/event-stream"}
RESULT_RE = re.compile(r"RESULT rps=([\d.]+) p50_ms=([\d.]+) p99_ms=([\d.]+)")
STATS_RE = re.compile(
    r"STATS requests=(\d+) duration_us=(\d+) status_errors=(\d+) connect_errors=(\d+) "
    r"read_errors=(\d+) write_errors=(\d+) timeouts=(\d+)"
)
MAIN_TARGETS = ("direct", "nginx", "bare", "bare-ours", "proxy")
SDK_TARGETS = ("sdk-direct", "sdk-proxy")
LABELS = {
    "direct": "minimal upstream, direct",
    "nginx": "nginx → upstream",
    "bare": "bare aiohttp forwarder → upstream",
    "bare-ours": "bare forwarder on the proxy's upstream client → upstream",
    "proxy": "mcp-quota-proxy → upstream",
    "sdk-direct": "SDK upstream, direct",
    "sdk-proxy": "mcp-quota-proxy → SDK upstream",
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- prerequisites and the machine -----------------------------------------------------------


def require_tools() -> dict[str, str]:
    tools = {name: shutil.which(name) for name in ("wrk", "nginx", "taskset", "redis-server")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        raise SystemExit(
            f"missing: {', '.join(missing)}. Install them (Debian/Ubuntu) with:\n  {INSTALL}"
        )
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs 2 CPUs (0 and 1) to pin the load and the system under test apart")
    return {name: str(path) for name, path in tools.items()}


def _pkg(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _first_line(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        return f"unavailable ({exc})"
    text = (out.stdout or "") + (out.stderr or "")
    return text.strip().splitlines()[0] if text.strip() else "?"


def machine(tools: dict[str, str]) -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="utf-8") as f:
        kb = int(f.readline().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    redis_v = _first_line([tools["redis-server"], "--version"])
    match = re.search(r"v=(\S+)", redis_v)
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": mem,
        "kernel": platform.release(),
        "os": _os_name(),
        "python": platform.python_version(),
        "aiohttp": _pkg("aiohttp"),
        "uvloop": _pkg("uvloop"),
        "orjson": _pkg("orjson"),
        "redis-py": _pkg("redis"),
        "hiredis": _pkg("hiredis"),
        "aiosqlite": _pkg("aiosqlite"),
        "mcp (SDK)": _pkg("mcp"),
        "sqlite": sqlite3.sqlite_version,
        "redis-server": match.group(1) if match else redis_v,
        "nginx": _first_line([tools["nginx"], "-v"]).removeprefix("nginx version: "),
        "wrk": " ".join(_first_line([tools["wrk"], "-v"]).split()[:2]),
    }


def code_version() -> str:
    """The commit under test and which proxy/ files differ from it (others edit concurrently)."""

    def git(*argv: str) -> str:
        done = subprocess.run(
            ["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
        return done.stdout

    head = git("rev-parse", "--short", "HEAD").strip() or "?"
    # Porcelain lines are "XY path": the status columns may be blank, so no strip() before.
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "proxy").splitlines()]
    return f"{head}" + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else " (clean)")


def _os_name() -> str:
    with contextlib.suppress(OSError), open("/etc/os-release", encoding="utf-8") as f:
        for line in f:
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    return platform.system()


# --- /proc ---------------------------------------------------------------------------------


def proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime+stime+cutime+cstime in clock ticks) for every live process."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="utf-8", errors="replace") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2 :].split()
        # fields[0] is field 3 (state); ppid is 4, utime..cstime are 14..17.
        table[int(entry.name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    return table


def tree_ticks(root: int, table: dict[int, tuple[int, int]]) -> int:
    """CPU ticks of a process, its threads and its descendants (live, plus reaped ones)."""
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (ppid, _) in table.items():
        children[ppid].append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            total += table[pid][1]
            todo.extend(children.get(pid, ()))
    return total


def cpu_stat() -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    with open("/proc/stat", encoding="utf-8") as f:
        for line in f:
            if line.startswith("cpu"):
                name, *values = line.split()
                out[name] = [int(v) for v in values]
    return out


def busy(values: list[int]) -> int:
    user, nice, system, _idle, _iowait, irq, softirq = values[:7]
    return user + nice + system + irq + softirq


def steal(values: list[int]) -> int:
    return values[7] if len(values) > 7 else 0


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


# --- child processes -------------------------------------------------------------------------


def free_port() -> int:
    """A port below the ephemeral range: wrk's thousands of client sockets take ports from that
    range, and one of them can land on a port picked there before its server binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(low // 2, low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {low // 2} and {low}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    cpu: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Harness:
    """Owns the temp dir and every child process group; close() tears all of it down."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="mqp-overhead-"))
        self.tmp.chmod(0o755)  # nginx's worker runs as nobody when started by root
        self.children: dict[str, Child] = {}
        self.transient: list[subprocess.Popen[Any]] = []  # wrk, py-spy while they run
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")

    def spawn(
        self, name: str, argv: Sequence[str], cpu: str, env: dict[str, str] | None = None
    ) -> Child:
        log_path = self.tmp / f"{name}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                ["taskset", "-c", cpu, *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env or self.env,
                start_new_session=True,  # its own process group: killpg reaches its children
            )
        child = Child(name, proc, log_path, cpu)
        self.children[name] = child
        return child

    def wait_port(self, child: Child, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                raise RuntimeError(
                    f"{child.name} exited ({child.proc.returncode}):\n{child.tail()}"
                )
            if port_open(port):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{child.name} did not listen on {port} in {timeout}s:\n{child.tail()}")

    def stop(self, name: str) -> None:
        child = self.children.pop(name)
        _terminate([child.proc])

    def close(self) -> None:
        procs = [p for p in self.transient if p.poll() is None]
        procs += [c.proc for c in reversed(self.children.values())]
        self.children.clear()
        _terminate(procs)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _terminate(procs: Iterable[subprocess.Popen[Any]]) -> None:
    procs = list(procs)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 8.0
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        # The group may outlive its leader (nginx workers): kill whatever is left of it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2.0)


# --- the stack -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    sut: str  # child whose process tree is the system under test
    upstream: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Stack:
    key: str
    redis_url: str
    pepper: str
    upstream_port: int
    targets: dict[str, Target]
    proxy_env: dict[str, str]


def http_post(
    url: str, body: str, headers: dict[str, str], timeout: float = 5.0
) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body.encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def proxy_config(path: Path, port: int, upstream_port: int, redis_url: str, spool: Path) -> Path:
    doc = {
        "listen": {"host": "127.0.0.1", "port": port},
        "upstream": {"url": f"http://127.0.0.1:{upstream_port}", "mcp_paths": ["/mcp"]},
        "redis": {"url": redis_url, "key_prefix": REDIS_PREFIX},
        "default_plan": PLAN,
        "plans": {
            # A huge limit, no rate limit, no per-tool weights, not billed.
            PLAN: {"included_units": HUGE_LIMIT, "overage": "block", "billed": False},
        },
        "spool": {"path": str(spool), "synchronous": "normal", "replica_id": "bench"},
        "drain": {"embedded": False},
        "billing": {"enabled": False},
        "ops": {"readiness_delay_s": 0, "shutdown_grace_s": 2},
        "log_level": "warning",
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def start_proxy(h: Harness, stack_env: dict[str, str], name: str, upstream_port: int) -> Target:
    port = free_port()
    conf = proxy_config(
        h.tmp / f"{name}.yaml",
        port,
        upstream_port,
        stack_env["REDIS_URL"],
        h.tmp / name / "usage.db",
    )
    child = h.spawn(
        name, [sys.executable, "-m", "proxy", "serve", "--config", str(conf)], SUT_CPU, stack_env
    )
    h.wait_port(child, port)
    return Target(name, f"http://127.0.0.1:{port}/mcp", name, "")


def start_stack(h: Harness, tools: dict[str, str], with_sdk: bool) -> Stack:
    py = sys.executable
    redis_port, up_port, sdk_port, nginx_port, bare_port, ours_port = (
        free_port() for _ in range(6)
    )
    redis = h.spawn(
        "redis",
        [
            tools["redis-server"],
            "--port", str(redis_port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(h.tmp),
            "--protected-mode", "yes",
        ],
        LOAD_CPU,
    )  # fmt: skip
    upstream = h.spawn(
        "upstream",
        [py, "-m", "tests.benchmarks.minimal_upstream", "--port", str(up_port)],
        LOAD_CPU,
    )
    if with_sdk:
        h.spawn(
            "sdk-upstream",
            [py, "-m", "proxy.demo.upstream", "--port", str(sdk_port), "--stateless", "--json"],
            LOAD_CPU,
        )
    conf_text = (
        NGINX_TEMPLATE.read_text()
        .replace("@@DIR@@", str(h.tmp / "nginx"))
        .replace("@@PORT@@", str(nginx_port))
        .replace("@@UPSTREAM_PORT@@", str(up_port))
    )
    (h.tmp / "nginx").mkdir(mode=0o755)
    conf = h.tmp / "nginx" / "nginx.conf"
    conf.write_text(conf_text)
    nginx = h.spawn(
        "nginx",
        [
            tools["nginx"],
            "-c", str(conf),
            "-p", str(h.tmp / "nginx"),
            "-e", str(h.tmp / "nginx" / "error.log"),
            "-g", "daemon off;",
        ],
        SUT_CPU,
    )  # fmt: skip
    bare = h.spawn(
        "bare",
        [
            py, "-m", "tests.benchmarks.bare_forwarder",
            "--port", str(bare_port),
            "--upstream", f"http://127.0.0.1:{up_port}/mcp",
        ],
        SUT_CPU,
    )  # fmt: skip
    ours = h.spawn(
        "bare-ours",
        [
            py, "-m", "tests.benchmarks.bare_forwarder",
            "--port", str(ours_port),
            "--upstream", f"http://127.0.0.1:{up_port}/mcp",
            "--client", "proxy",
        ],
        SUT_CPU,
    )  # fmt: skip
    h.wait_port(redis, redis_port)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    pepper = secrets.token_urlsafe(32)
    env = dict(h.env, REDIS_URL=redis_url, MQP_KEY_PEPPER=pepper)
    # The tenant, with the CLI an operator would use (same config, same environment).
    admin_conf = proxy_config(h.tmp / "admin.yaml", 0, up_port, redis_url, h.tmp / "admin.db")
    for argv in (
        ["tenant", "create", TENANT, "--plan", PLAN],
        ["key", "issue", TENANT, "--label", "benchmark"],
    ):
        done = subprocess.run(
            [py, "-m", "proxy", *argv, "--config", str(admin_conf)],
            capture_output=True, text=True, cwd=ROOT, env=env, timeout=60, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"`proxy {' '.join(argv)}` failed:\n{done.stdout}{done.stderr}")
    key = done.stdout.strip().splitlines()[0]
    for child, port in (
        (upstream, up_port),
        (nginx, nginx_port),
        (bare, bare_port),
        (ours, ours_port),
    ):
        h.wait_port(child, port)
    targets = {
        "direct": Target("direct", f"http://127.0.0.1:{up_port}/mcp", "upstream", "upstream"),
        "nginx": Target("nginx", f"http://127.0.0.1:{nginx_port}/mcp", "nginx", "upstream"),
        "bare": Target("bare", f"http://127.0.0.1:{bare_port}/mcp", "bare", "upstream"),
        "bare-ours": Target(
            "bare-ours", f"http://127.0.0.1:{ours_port}/mcp", "bare-ours", "upstream"
        ),
    }
    proxy = start_proxy(h, env, "proxy", up_port)
    targets["proxy"] = Target("proxy", proxy.url, "proxy", "upstream")
    if with_sdk:
        h.wait_port(h.children["sdk-upstream"], sdk_port, timeout=60)
        sdk_proxy = start_proxy(h, env, "proxy-sdk", sdk_port)
        targets["sdk-direct"] = Target(
            "sdk-direct",
            f"http://127.0.0.1:{sdk_port}/mcp",
            "sdk-upstream",
            "sdk-upstream",
            SDK_ENV,
        )
        targets["sdk-proxy"] = Target(
            "sdk-proxy", sdk_proxy.url, "proxy-sdk", "sdk-upstream", SDK_ENV
        )
    stack = Stack(key, redis_url, pepper, up_port, targets, env)
    for target in targets.values():
        sanity_check(stack, target)
    return stack


def sanity_check(stack: Stack, target: Target) -> None:
    """One call per target: a 200 with a non-error tools/call result for id 42."""
    body = target.env.get("BENCH_BODY", BODY)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {stack.key}"}
    if "BENCH_ACCEPT" in target.env:
        headers["Accept"] = target.env["BENCH_ACCEPT"]
    status, text = http_post(target.url, body, headers)
    try:
        doc = json.loads(text)
        ok = status == 200 and doc.get("id") == 42 and doc["result"].get("isError") is False
    except (ValueError, KeyError, AttributeError):
        ok = False
    if not ok:
        raise RuntimeError(f"{target.name}: unexpected answer {status}: {text[:300]}")


# --- measuring -------------------------------------------------------------------------------


@dataclass
class Run:
    target: str
    concurrency: int
    round: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    elapsed_s: float
    sut_cpu_s: float
    upstream_cpu_s: float
    wrk_cpu_s: float
    redis_cpu_s: float
    foreign_cores: float
    steal_cores: float
    sut_core_busy: float  # CPU1 busy fraction (all processes)
    attempts: int = 1
    cpu_s: dict[str, float] = field(default_factory=dict)  # every started process tree

    @property
    def sut_us(self) -> float:
        return self.sut_cpu_s * 1e6 / self.requests if self.requests else math.nan

    @property
    def upstream_us(self) -> float:
        return self.upstream_cpu_s * 1e6 / self.requests if self.requests else math.nan


@dataclass
class Snapshot:
    wall: float
    stat: dict[str, list[int]]
    ticks: dict[str, int]
    own: float  # this process + its reaped children (wrk), seconds


def snapshot(h: Harness) -> Snapshot:
    table = proc_table()
    ticks = {name: tree_ticks(c.pid, table) for name, c in h.children.items()}
    t = os.times()
    return Snapshot(
        time.monotonic(),
        cpu_stat(),
        ticks,
        t.user + t.system + t.children_user + t.children_system,
    )


def foreign_cores(a: Snapshot, b: Snapshot) -> float:
    """Cores busy between two snapshots with work that is not ours."""
    ours = sum(b.ticks.get(n, 0) - t for n, t in a.ticks.items()) / CLK_TCK + (b.own - a.own)
    busy_s = (busy(b.stat["cpu"]) - busy(a.stat["cpu"])) / CLK_TCK
    return max(0.0, busy_s - ours) / (b.wall - a.wall)


class Bench:
    def __init__(self, h: Harness, stack: Stack, wrk: str, args: argparse.Namespace) -> None:
        self.h = h
        self.stack = stack
        self.wrk = wrk
        self.args = args
        self.repeats_left = args.repeat_budget
        self.quiet_left = float(args.quiet_wait)
        self.proxied: Counter[str] = Counter()  # requests sent to each proxy (spool check)

    def wrk_run(self, target: Target, c: int, seconds: int) -> tuple[str, float]:
        """Run wrk; (its stdout, its CPU seconds)."""
        env = dict(self.h.env, BENCH_KEY=self.stack.key, **target.env)
        argv = ["taskset", "-c", LOAD_CPU, self.wrk, "-t1", f"-c{c}", f"-d{seconds}s", "--latency"]
        argv += ["-s", str(LUA), target.url]
        before = os.times()
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            start_new_session=True,
        )  # fmt: skip
        self.h.transient.append(proc)
        try:
            out, err = proc.communicate(timeout=seconds + 60)
        finally:
            self.h.transient.remove(proc)
        after = os.times()
        if proc.returncode != 0 or "RESULT" not in out:
            raise RuntimeError(f"wrk failed ({proc.returncode}) on {target.name}:\n{out}\n{err}")
        cpu = (after.children_user + after.children_system) - (
            before.children_user + before.children_system
        )
        stats = STATS_RE.search(out)
        if stats and target.sut.startswith("proxy"):
            self.proxied[target.sut] += int(stats.group(1))
        return out, cpu

    def once(self, target: Target, c: int, rnd: int) -> Run:
        a = snapshot(self.h)
        out, wrk_cpu = self.wrk_run(target, c, self.args.duration)
        b = snapshot(self.h)
        result, stats = RESULT_RE.search(out), STATS_RE.search(out)
        assert result is not None and stats is not None, out
        elapsed = b.wall - a.wall
        ticks = {name: b.ticks.get(name, 0) - a.ticks.get(name, 0) for name in a.ticks}
        cpu1 = f"cpu{SUT_CPU}"
        requests = int(stats.group(1))
        errors = sum(int(stats.group(i)) for i in range(3, 8))
        if errors:
            log(f"  !! {target.name} c={c}: {errors} errors (non-2xx or socket) in {requests}")
        return Run(
            target=target.name,
            concurrency=c,
            round=rnd,
            rps=float(result.group(1)),
            p50_ms=float(result.group(2)),
            p99_ms=float(result.group(3)),
            requests=requests,
            errors=errors,
            elapsed_s=elapsed,
            sut_cpu_s=ticks[target.sut] / CLK_TCK,
            upstream_cpu_s=ticks.get(target.upstream, 0) / CLK_TCK,
            wrk_cpu_s=wrk_cpu,
            redis_cpu_s=ticks.get("redis", 0) / CLK_TCK,
            foreign_cores=foreign_cores(a, b),
            steal_cores=(steal(b.stat["cpu"]) - steal(a.stat["cpu"])) / CLK_TCK / elapsed,
            sut_core_busy=(busy(b.stat[cpu1]) - busy(a.stat[cpu1])) / CLK_TCK / elapsed,
            cpu_s={name: t / CLK_TCK for name, t in ticks.items()} | {"wrk+script": b.own - a.own},
        )

    def wait_quiet(self, limit_s: float = 10.0) -> None:
        """Wait (at most limit_s, within the --quiet-wait budget) for foreign load to drop."""
        waited = 0.0
        while waited < limit_s and self.quiet_left > 0:
            a = snapshot(self.h)
            time.sleep(0.5)
            load = foreign_cores(a, snapshot(self.h))
            if load <= self.args.foreign_limit:
                break
            waited += 0.5
            self.quiet_left -= 0.5
        if waited:
            log(
                f"  waited {waited:.1f} s for foreign load to drop "
                f"(budget left {self.quiet_left:.0f} s)"
            )

    def measure(self, target: Target, c: int, rnd: int) -> Run:
        if self.args.warmup > 0:
            self.wrk_run(target, c, self.args.warmup)
        best: Run | None = None
        for attempt in range(1, self.args.max_repeats + 2):
            if attempt > 1:
                self.wait_quiet()
            run = self.once(target, c, rnd)
            if best is None or run.foreign_cores < best.foreign_cores:
                best = run
            best.attempts = attempt
            if run.foreign_cores <= self.args.foreign_limit:
                break
            if attempt > self.args.max_repeats or self.repeats_left <= 0:
                log(f"  foreign load {run.foreign_cores:.2f} core: kept (no repeat left)")
                break
            self.repeats_left -= 1
            log(f"  foreign load {run.foreign_cores:.2f} core > {self.args.foreign_limit}: repeat")
        assert best is not None
        log(
            f"[round {rnd + 1} c={c:<3} {target.name:<10}] {best.rps:8.0f} req/s  "
            f"p50 {best.p50_ms:6.2f}  p99 {best.p99_ms:6.2f} ms  "
            f"SUT {best.sut_us:6.1f} µs/req  foreign {best.foreign_cores:.2f}  "
            f"CPU1 {best.sut_core_busy:.2f}"
        )
        return best


def rotate(items: Sequence[str], n: int) -> list[str]:
    n %= len(items)
    return [*items[n:], *items[:n]]


def schedule(args: argparse.Namespace, with_sdk: bool) -> list[tuple[int, int, str]]:
    """(round, concurrency, target) in run order: targets rotate within every round."""
    plan = []
    for rnd in range(args.rounds):
        for ci, c in enumerate(args.concurrency):
            order = rotate(MAIN_TARGETS, rnd + ci)
            if with_sdk and rnd < args.sdk_rounds:
                order += list(SDK_TARGETS if (rnd + ci) % 2 == 0 else reversed(SDK_TARGETS))
            plan += [(rnd, c, name) for name in order]
    return plan


# --- RSS: 10,000 tenants and 100 open SSE streams ----------------------------------------------


def create_tenants(redis_url: str, pepper: str, count: int) -> list[str]:
    """Tenants and keys written straight into Redis in TenantStore's layout; returns the keys."""
    import redis

    from proxy.auth import hash_key, new_key
    from proxy.keys import KeySpace
    from proxy.tenants import Tenant

    ks = KeySpace(REDIS_PREFIX)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    keys: list[str] = []
    now = int(time.time())
    try:
        pipe = client.pipeline(transaction=False)
        for i in range(count):
            tenant_id = f"t{i:05d}"
            tenant = Tenant(id=tenant_id, name=tenant_id, plan=PLAN, created_at=now)
            key, key_id = new_key("mqp_")
            digest = hash_key(key, pepper)
            pipe.hset(ks.tenant(tenant_id), mapping=tenant.to_redis())  # type: ignore[arg-type]
            pipe.sadd(ks.tenant_index(), tenant_id)
            pipe.set(ks.api_key(digest), f"{tenant_id}:{key_id}")
            pipe.hset(
                ks.tenant_keys(tenant_id),
                key_id,
                json.dumps({"hash": digest, "created_at": now, "label": "rss"}),
            )
            keys.append(key)
            if len(pipe) >= 2000:
                pipe.execute()
        pipe.execute()
    finally:
        client.close()
    return keys


async def call_each(url: str, keys: list[str], parallel: int = 32) -> Counter[int]:
    import aiohttp

    statuses: Counter[int] = Counter()
    queue = iter(keys)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=parallel)) as http:

        async def worker() -> None:
            for key in queue:
                headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
                async with http.post(url, data=BODY, headers=headers) as resp:
                    await resp.read()
                    statuses[resp.status] += 1

        await asyncio.gather(*(worker() for _ in range(parallel)))
    return statuses


async def hold_streams(
    url: str, key: str, count: int, while_open: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Open `count` SSE streams through the proxy, wait for a keep-alive on each, measure."""
    import aiohttp

    headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
    ) as http:
        responses = await asyncio.gather(*(http.get(url, headers=headers) for _ in range(count)))
        try:
            if any(r.status != 200 for r in responses):
                raise RuntimeError(f"SSE GET statuses {Counter(r.status for r in responses)}")
            async with asyncio.timeout(10):
                firsts = await asyncio.gather(*(r.content.readuntil(b"\n\n") for r in responses))
            assert all(f.startswith(b":") for f in firsts), firsts[:3]
            await asyncio.sleep(2.5)  # at least two more keep-alives through every stream
            return while_open()
        finally:
            for r in responses:
                r.close()


def open_streams_metric(base: str) -> float | None:
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    match = re.search(r"^mqp_open_streams (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def measure_rss(h: Harness, stack: Stack, tenants: int, streams: int) -> dict[str, Any]:
    target = start_proxy(h, stack.proxy_env, "proxy-rss", stack.upstream_port)
    pid = h.children["proxy-rss"].pid
    base = target.url.removesuffix("/mcp")
    sanity_check(stack, target)
    out: dict[str, Any] = {"idle_kb": status_kb(pid, "VmRSS")}
    t0 = time.perf_counter()
    keys = create_tenants(stack.redis_url, stack.pepper, tenants)
    out["create_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    statuses = asyncio.run(call_each(target.url, keys))
    out["calls_s"] = time.perf_counter() - t0
    out["call_statuses"] = dict(statuses)
    if statuses.get(200) != len(keys):
        raise RuntimeError(f"tenant calls through the proxy: {dict(statuses)}")
    time.sleep(0.5)
    out["tenants"] = tenants
    out["tenants_kb"] = status_kb(pid, "VmRSS")

    def while_open() -> dict[str, Any]:
        return {
            "streams_kb": status_kb(pid, "VmRSS"),
            "open_streams_metric": open_streams_metric(base),
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
        }

    out["streams"] = streams
    out |= asyncio.run(hold_streams(target.url, keys[0], streams, while_open))
    out["hwm_kb"] = status_kb(pid, "VmHWM")
    h.stop("proxy-rss")
    return out


# --- profile -------------------------------------------------------------------------------


FRAME_RE = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
# Frames that sit under every sample of their thread: the process and thread entry points and
# the event loop's run call (uvloop's own C work is attributed to Runner.run's self time).
SCAFFOLD = {
    "<module>",
    "_run_module_as_main",
    "_run_code",
    "main",
    "cmd_serve",
    "_run",
    "run",
    "Runner.run",
    "run_forever",
    "Thread._bootstrap",
    "Thread._bootstrap_inner",
    "Thread.run",
}


def frame_key(frame: str) -> str:
    """``module:function`` of a py-spy frame ``function (path/to/module.py:line)``."""
    match = FRAME_RE.match(frame)
    if not match:
        return frame
    path = match.group("file").removesuffix(".py")
    for marker in ("site-packages/", "/lib/python3", str(ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3":
                path = path.split("/", 1)[1] if "/" in path else path
            break
    return f"{path.strip('/').replace('/', '.')}:{match.group('func')}"


def thread_label(keys: list[str]) -> str:
    if any(k.startswith("aiosqlite.") for k in keys):
        return "aiosqlite worker"
    if any(k.endswith(":Runner.run") or k.endswith(":run_forever") for k in keys):
        return "event loop"
    return "other"


def summarise_profile(raw: Path, top: int = 10) -> dict[str, Any]:
    """Self and total sample shares per module:function from py-spy's raw (collapsed) output,
    over the event-loop thread's samples (the one that saturates the core). Other threads
    (the aiosqlite worker) are only counted: py-spy takes a thread blocked inside a C call
    (SimpleQueue.get) for active, so their share says little; see the on-CPU figures."""
    self_c: Counter[str] = Counter()
    total_c: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    other_self: Counter[str] = Counter()
    loop_samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread ("))]
        if not frames:
            continue
        keys = [frame_key(f) for f in frames]
        label = thread_label(keys)
        threads[label] += count
        if label != "event loop":
            other_self[f"{label}: {keys[-1]}"] += count
            continue
        loop_samples += count
        self_c[keys[-1]] += count
        for k in set(keys):
            if k.rsplit(":", 1)[-1] not in SCAFFOLD:
                total_c[k] += count
    packages: Counter[str] = Counter()
    for k, v in self_c.items():
        packages[k.split(".", 1)[0].split(":", 1)[0]] += v
    n = loop_samples or 1
    return {
        "samples": sum(threads.values()),
        "loop_samples": loop_samples,
        "threads": dict(threads.most_common()),
        "other_self": other_self.most_common(5),
        "packages": [(k, v / n) for k, v in packages.most_common(12)],
        "self": [(k, v / n) for k, v in self_c.most_common(top)],
        "total": [(k, v / n) for k, v in total_c.most_common(top)],
    }


def thread_ticks(pid: int) -> dict[int, int]:
    out: dict[int, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/stat") as f:
            data = f.read()
            fields = data[data.rindex(")") + 2 :].split()
            out[int(tid)] = int(fields[11]) + int(fields[12])
    return out


def profile(h: Harness, bench: Bench, out: Path, seconds: int, c: int = 16) -> dict[str, Any]:
    pyspy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if pyspy is None:
        raise SystemExit(f"py-spy is not installed: {sys.executable} -m pip install py-spy")
    target = bench.stack.targets["proxy"]
    pid = h.children["proxy"].pid
    env = dict(h.env, BENCH_KEY=bench.stack.key)
    load = subprocess.Popen(
        ["taskset", "-c", LOAD_CPU, bench.wrk, "-t1", f"-c{c}", f"-d{seconds + 4}s", "--latency",
         "-s", str(LUA), target.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )  # fmt: skip
    h.transient.append(load)
    try:
        time.sleep(2.0)
        before, t0 = thread_ticks(pid), time.monotonic()
        spy = subprocess.run(
            ["taskset", "-c", LOAD_CPU, pyspy, "record", "-o", str(out), "--format", "raw",
             "-d", str(seconds), "-r", "100", "--threads", "-p", str(pid)],
            capture_output=True, text=True, timeout=seconds + 60, check=False,
        )  # fmt: skip
        after, elapsed = thread_ticks(pid), time.monotonic() - t0
        wrk_out, _ = load.communicate(timeout=seconds + 60)
    finally:
        h.transient.remove(load)
    if spy.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed ({spy.returncode}): {spy.stdout}{spy.stderr}")
    summary = summarise_profile(out)
    # On-CPU time per thread over the sampling window (py-spy's "active" includes GIL waits).
    summary["thread_cpu"] = {
        ("main (event loop)" if tid == pid else f"thread {tid}"): round(
            (after.get(tid, 0) - before.get(tid, 0)) / CLK_TCK / elapsed, 3
        )
        for tid in after
        if after.get(tid, 0) - before.get(tid, 0) > 0
    }
    result = RESULT_RE.search(wrk_out)
    summary["load"] = result.group(0) if result else wrk_out
    summary["concurrency"] = c
    summary["raw"] = str(out)
    return summary


# --- report --------------------------------------------------------------------------------


def med(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return statistics.median(vals) if vals else math.nan


def fmt(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def per_round(
    runs: list[Run], a: str, b: str, c: int, f: Callable[[Run, Run], float]
) -> list[float]:
    by = {(r.target, r.round): r for r in runs if r.concurrency == c}
    return [f(by[(a, rnd)], by[(b, rnd)]) for (t, rnd) in by if t == a and (b, rnd) in by]


def report(
    runs: list[Run],
    args: argparse.Namespace,
    info: dict[str, str],
    extra: dict[str, Any],
) -> str:
    lines: list[str] = []
    w = lines.append
    w(f"## Proxy overhead ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)\n")
    w(f"Command: `python -m {MODULE} {shlex.join(args.argv)}`".rstrip())
    w("")
    w("Machine: " + "; ".join(f"{k} {v}" for k, v in info.items() if k != "code"))
    w("")
    w(f"Code: {info.get('code', '?')}")
    w("")
    w(
        f"Rounds {args.rounds} x {args.duration} s per run (warm-up {args.warmup} s), "
        f"c = {', '.join(map(str, args.concurrency))}; medians over rounds; ratios within "
        f"a round, then the median. SUT on CPU{SUT_CPU}; wrk, upstreams, redis on CPU{LOAD_CPU}."
    )
    w("")
    for c in args.concurrency:
        w(f"### c = {c}\n")
        w(
            "| target | req/s | p50 ms | p99 ms | ÷ direct | ÷ nginx | ÷ bare | SUT CPU µs/req "
            "| upstream µs/req | CPU1 busy | foreign (max) | runs |"
        )
        w("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name in (*MAIN_TARGETS, *SDK_TARGETS):
            rs = [r for r in runs if r.target == name and r.concurrency == c]
            if not rs:
                continue
            ratios = []
            refs = ("sdk-direct", "", "") if name.startswith("sdk") else ("direct", "nginx", "bare")
            for ref in refs:
                vals = per_round(runs, name, ref, c, lambda x, y: x.rps / y.rps) if ref else []
                ratios.append(fmt(med(vals)) if vals else "-")
            direct = name in ("direct", "sdk-direct")
            upstream_us = "-" if direct else fmt(med(r.upstream_us for r in rs), 0)
            attempts = sum(r.attempts for r in rs)
            count = f"{len(rs)}"
            if attempts > len(rs):
                count += f", {attempts} attempts"
            flagged = sum(r.foreign_cores > args.foreign_limit for r in rs)
            if flagged:
                count += f", {flagged} above {args.foreign_limit}"
            cells = [
                LABELS[name],
                f"{med(r.rps for r in rs):.0f}",
                fmt(med(r.p50_ms for r in rs)),
                fmt(med(r.p99_ms for r in rs)),
                *ratios,
                fmt(med(r.sut_us for r in rs), 0),
                upstream_us,
                fmt(med(r.sut_core_busy for r in rs)),
                f"{max(r.foreign_cores for r in rs):.2f}",
                count,
            ]
            w("| " + " | ".join(cells) + " |")
        w("")
    w("### Targets\n")
    c16 = 16 if 16 in args.concurrency else args.concurrency[-1]
    cpu_ratio = per_round(runs, "proxy", "bare", c16, lambda x, y: x.sut_us / y.sut_us)
    proxy_us = med(r.sut_us for r in runs if r.target == "proxy" and r.concurrency == c16)
    bare_us = med(r.sut_us for r in runs if r.target == "bare" and r.concurrency == c16)
    ok1 = med(cpu_ratio) <= 1.25
    w(
        f"1. Full-path CPU ≤ 1.25 x bare forwarder at c={c16}: proxy {fmt(proxy_us, 0)} µs/req, "
        f"bare {fmt(bare_us, 0)} µs/req → **{fmt(med(cpu_ratio))}x** (per round: "
        f"{', '.join(fmt(v) for v in cpu_ratio)}) — **{'holds' if ok1 else 'does not hold'}**"
    )
    c1 = 1 if 1 in args.concurrency else args.concurrency[0]
    added = per_round(runs, "proxy", "direct", c1, lambda x, y: x.p50_ms - y.p50_ms)
    ok2 = med(added) <= 0.5
    w(
        f"2. Added p50 at c={c1} ≤ 0.5 ms over direct: **+{fmt(med(added), 3)} ms** (per round: "
        f"{', '.join(fmt(v, 3) for v in added)}) — **{'holds' if ok2 else 'does not hold'}**"
    )
    for ref in ("nginx", "bare", "bare-ours"):
        vals = per_round(runs, "proxy", ref, c1, lambda x, y: x.p50_ms - y.p50_ms)
        w(f"   - vs {ref} at c={c1}: +{fmt(med(vals), 3)} ms")
    # The same plumbing as the proxy's (aiohttp server, proxy.upstream client): what the proxy
    # costs beyond it is its own per-call work.
    ours_ratio = per_round(runs, "proxy", "bare-ours", c16, lambda x, y: x.sut_us / y.sut_us)
    ours_us = med(r.sut_us for r in runs if r.target == "bare-ours" and r.concurrency == c16)
    plumbing = per_round(runs, "bare-ours", "bare", c16, lambda x, y: x.sut_us / y.sut_us)
    if ours_ratio:
        w(
            f"- Decomposition at c={c16}: the bare forwarder on the proxy's upstream client costs "
            f"{fmt(ours_us, 0)} µs/req ({fmt(med(plumbing))}x the aiohttp one); the proxy costs "
            f"{fmt(med(ours_ratio))}x that, i.e. {fmt(proxy_us - ours_us, 0)} µs/req of its own "
            "per-call work (auth, quota, spool, settle, metrics)"
        )
    w("")
    w("### Against perf-baseline.md's targets for the real proxy\n")
    cmax = args.concurrency[-1]
    nginx_ratio = per_round(runs, "proxy", "nginx", cmax, lambda x, y: x.rps / y.rps)
    w(f"- c={cmax} throughput ÷ nginx: {fmt(med(nginx_ratio))} (excellent ≥ 0.30, floor ≥ 0.25)")
    for c in args.concurrency:
        rs = [r for r in runs if r.target == "proxy" and r.concurrency == c]
        w(
            f"- c={c}: proxy CPU {fmt(med(r.sut_us for r in rs), 0)} µs/req (excellent ≤ 260, "
            f"floor ≤ 350); p50 {fmt(med(r.p50_ms for r in rs))} ms, p99 "
            f"{fmt(med(r.p99_ms for r in rs))} ms"
        )
    w("")
    if "spool" in extra:
        w(f"Spool check: {extra['spool']}")
        w("")
    flagged = [r for r in runs if r.foreign_cores > args.foreign_limit]
    w(
        f"Foreign load: {len(flagged)} of {len(runs)} kept runs above {args.foreign_limit} core; "
        f"{sum(r.attempts - 1 for r in runs)} repeats; median foreign "
        f"{fmt(med(r.foreign_cores for r in runs))} core, median steal "
        f"{fmt(med(r.steal_cores for r in runs))} core."
    )
    w("")
    if "rss" in extra:
        rss = extra["rss"]
        w("### Proxy memory (fresh instance)\n")
        w("| state | VmRSS MiB |")
        w("|---|---|")
        w(f"| idle, after one call | {rss['idle_kb'] / 1024:.1f} |")
        w(
            f"| after one call from each of {rss['tenants']:,} tenants "
            f"| {rss['tenants_kb'] / 1024:.1f} |"
        )
        w(
            f"| + {rss['streams']} open SSE streams (mqp_open_streams = "
            f"{rss['open_streams_metric']}, {rss['fds']} fds) | {rss['streams_kb'] / 1024:.1f} |"
        )
        w(f"| peak (VmHWM) | {rss['hwm_kb'] / 1024:.1f} |")
        w("")
        w(
            f"{rss['tenants']:,} tenants written to Redis in {rss['create_s']:.1f} s; one "
            f"tools/call each through the proxy in {rss['calls_s']:.1f} s (all 200)."
        )
        if "main_rss_kb" in extra:
            w(
                f"Main proxy after the benchmark: VmRSS {extra['main_rss_kb'] / 1024:.1f} MiB, "
                f"VmHWM {extra['main_hwm_kb'] / 1024:.1f} MiB."
            )
        w("")
    if "profile" in extra:
        p = extra["profile"]
        w(f"### py-spy profile of the proxy at c={p['concurrency']} ({p['load']})\n")
        threads = ", ".join(f"{k} {v}" for k, v in p["threads"].items())
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in p["thread_cpu"].items())
        w(
            f"Samples by thread: {threads} (100 Hz; raw stacks in {p['raw']}). On-CPU cores "
            f"per thread over the window (/proc/<pid>/task): {cpu}. Shares below are of the "
            f"{p['loop_samples']} event-loop samples; `asyncio.runners:Runner.run` self time is "
            "uvloop's C code (poll, callbacks, transports).\n"
        )
        pkgs = ", ".join(f"{k} {v:.1%}" for k, v in p["packages"])
        w(f"Self time by package: {pkgs}\n")
        w("| # | self | share | total (excl. loop scaffolding) | share |")
        w("|---|---|---|---|---|")
        for i in range(max(len(p["self"]), len(p["total"]))):
            s = p["self"][i] if i < len(p["self"]) else ("", 0.0)
            t = p["total"][i] if i < len(p["total"]) else ("", 0.0)
            w(f"| {i + 1} | `{s[0]}` | {s[1]:.1%} | `{t[0]}` | {t[1]:.1%} |")
        w("")
    return "\n".join(lines)


def spool_events(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT count(*) FROM events").fetchone()[0])


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per run")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--quick", action="store_true", help="1 round, 3 s runs, c=1,16")
    parser.add_argument("--sdk-rounds", type=int, default=1, help="rounds with the SDK pair")
    parser.add_argument("--no-sdk", action="store_true", help="skip the official-SDK upstream")
    parser.add_argument("--no-rss", action="store_true", help="skip the RSS measurement")
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--foreign-limit", type=float, default=0.15, help="cores")
    parser.add_argument("--max-repeats", type=int, default=2, help="per run")
    parser.add_argument("--repeat-budget", type=int, default=6, help="repeats per invocation")
    parser.add_argument(
        "--quiet-wait", type=float, default=30.0, help="seconds per invocation to wait for quiet"
    )
    parser.add_argument("--profile", type=Path, help="py-spy raw output file (c=16 load)")
    parser.add_argument("--profile-seconds", type=int, default=10)
    parser.add_argument("--profile-concurrency", type=int, default=16)
    parser.add_argument("--json", type=Path, help="write every kept run here")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.rounds, args.duration, args.warmup, args.concurrency = 1, 3, 1, "1,16"
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tools = require_tools()
    info = machine(tools) | {"code": code_version()}
    os.sched_setaffinity(0, {int(LOAD_CPU)})  # this script shares CPU0 with the load
    with_sdk = not args.no_sdk
    plan = schedule(args, with_sdk)
    estimate = len(plan) * (args.duration + args.warmup) + 40
    log(f"{len(plan)} runs, about {estimate / 60:.1f} min plus repeats; machine: {info}")

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    h = Harness()
    extra: dict[str, Any] = {}
    runs: list[Run] = []
    try:
        stack = start_stack(h, tools, with_sdk)
        bench = Bench(h, stack, tools["wrk"], args)
        log(f"stack up in {h.tmp}: {', '.join(f'{n}={c.pid}' for n, c in h.children.items())}")
        for rnd, c, name in plan:
            runs.append(bench.measure(stack.targets[name], c, rnd))
        time.sleep(1.0)  # the last group commits
        for proxy in ("proxy", "proxy-sdk"):
            if proxy in h.children and bench.proxied[proxy]:
                events = spool_events(h.tmp / proxy / "usage.db")
                extra.setdefault("spool", "")
                extra["spool"] += (
                    f"{proxy}: {events:,} usage events spooled; wrk completed "
                    f"{bench.proxied[proxy]:,} tools/call requests through it (warm-ups "
                    "included) plus 1 sanity call. "
                )
        if args.profile is not None:
            extra["profile"] = profile(
                h, bench, args.profile, args.profile_seconds, args.profile_concurrency
            )
        extra["main_rss_kb"] = status_kb(h.children["proxy"].pid, "VmRSS")
        extra["main_hwm_kb"] = status_kb(h.children["proxy"].pid, "VmHWM")
        if not args.no_rss:
            extra["rss"] = measure_rss(h, stack, args.tenants, args.streams)
    finally:
        h.close()
    text = report(runs, args, info, extra)
    print(text)
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "args": args.argv,
                    "runs": [asdict(r) | {"sut_us": r.sut_us} for r in runs],
                    "extra": extra,
                },
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
