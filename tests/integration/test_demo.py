"""`mcp-quota-proxy demo` as a new user meets it: run it, paste the printed command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

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
