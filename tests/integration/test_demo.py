"""`mcp-quota-proxy demo` as a new user meets it: run it, paste the printed command."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from tests.redis_server import free_port


def test_demo_prints_a_working_command_and_stops_on_ctrl_c() -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed; the command the demo prints needs it")
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    ) as proc:
        try:
            _paste_and_stop(proc, port)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _paste_and_stop(proc: subprocess.Popen[str], port: int) -> None:
    assert proc.stdout is not None
    command = ""
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        if line.strip().startswith("curl -s"):
            command = line.strip()
            break
        assert time.monotonic() < deadline, "demo did not print its command in time"
    assert f"http://127.0.0.1:{port}/mcp" in command
    result = subprocess.run(
        command, shell=True, capture_output=True, text=True, timeout=30, check=True
    )
    reply = json.loads(result.stdout)
    assert reply["result"]["content"][0]["text"] == "5"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 0


# --- failures and shutdown -------------------------------------------------------------------

KEY_RE = re.compile(r"API key\s+(\S+)")


def test_demo_on_a_busy_port_fails_in_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "demo", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr == (
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use; is another process "
        "using it? Pick another port with --port N\n"
    )


@dataclass(frozen=True)
class Proc:
    """A process as /proc shows it; `started` (clock ticks after boot) tells a reused pid."""

    pid: int
    ppid: int
    session: int
    started: int
    state: str


def _proc(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name, in parentheses, may hold spaces: the fields follow the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return Proc(pid, int(fields[1]), int(fields[3]), int(fields[19]), fields[0])


def _children(pid: int) -> list[Proc]:
    found = (_proc(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit())
    return [p for p in found if p is not None and p.ppid == pid]


def _is_running(proc: Proc) -> bool:
    now = _proc(proc.pid)
    # A zombie runs nothing and holds no socket; only its exit status is left to collect.
    return now is not None and now.started == proc.started and now.state != "Z"


def _wait_gone(proc: Proc, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while _is_running(proc):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@dataclass(frozen=True)
class Demo:
    proc: subprocess.Popen[str]
    port: int
    key: str
    upstream: Proc  # the bundled MCP server, the demo's child
    stderr: IO[str]  # the demo's and its server's; read it back after the demo exits

    def logged(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()


@contextlib.contextmanager
def _running_demo() -> Iterator[Demo]:
    """The demo, ready, in a session of its own (as under a terminal, whose Ctrl-C reaches
    its process group). Whatever the test did, neither it nor its server outlives this."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc to find the demo's child process")
    port = free_port()
    upstream: Proc | None = None
    with (
        tempfile.TemporaryFile("w+") as stderr,
        subprocess.Popen(
            [sys.executable, "-m", "proxy", "demo", "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        ) as proc,
    ):
        try:
            assert proc.stdout is not None
            key = ""
            for line in proc.stdout:  # the demo prints its key, then its command
                if match := KEY_RE.search(line):
                    key = match.group(1)
                if line.strip().startswith("curl -s"):
                    break
            assert key, "the demo did not print its API key"
            (upstream,) = _children(proc.pid)
            cmdline = Path(f"/proc/{upstream.pid}/cmdline").read_bytes().split(b"\0")
            assert b"proxy.demo.upstream" in cmdline
            yield Demo(proc, port, key, upstream, stderr)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if upstream is not None and _is_running(upstream):
                os.kill(upstream.pid, signal.SIGKILL)


def _call_slow_count(port: int, key: str, n: int, delay: float) -> tuple[int, dict[str, Any]]:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "slow_count", "arguments": {"n": n, "delay": delay}},
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/mcp",
        data=json.dumps(body).encode(),
        headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {"body": exc.read().decode(errors="replace")}


def _wait_in_flight(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            if re.search(r"^mqp_inflight_requests 1\.0$", reply.read().decode(), re.M):
                return
        time.sleep(0.02)
    raise AssertionError("the call never showed as in flight")


def test_ctrl_c_lets_an_in_flight_call_finish_then_stops_the_server() -> None:
    with _running_demo() as demo:
        # A terminal's Ctrl-C signals its foreground process group: the server must not be in it.
        assert demo.upstream.session != _proc(demo.proc.pid).session  # type: ignore[union-attr]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # Longer than the server's own 2 s graceful stop: Ctrl-C reaching it would cut it.
            call = pool.submit(_call_slow_count, demo.port, demo.key, 8, 0.5)
            _wait_in_flight(demo.port)
            os.killpg(demo.proc.pid, signal.SIGINT)
            status, reply = call.result(timeout=30)
        assert status == 200, reply
        assert reply["result"]["content"][0]["text"] == "counted to 8", reply
        assert demo.proc.wait(timeout=30) == 0
        assert _wait_gone(demo.upstream), f"the demo's server {demo.upstream.pid} outlived it"
        assert "Traceback" not in demo.logged()


def test_sighup_stops_the_demo_and_its_server() -> None:
    """A closed terminal: the server, in its own session, relies on the demo to stop it."""
    with _running_demo() as demo:
        demo.proc.send_signal(signal.SIGHUP)
        assert demo.proc.wait(timeout=30) == 0
        assert _wait_gone(demo.upstream), f"the demo's server {demo.upstream.pid} outlived it"
        assert "Traceback" not in demo.logged()
