"""Nothing on the controller's import path is Linux-only: it runs on the studio's Mac mini.

The controller is started as a child process in a Python stripped of what only Linux has
(`portable_run.py`: epoll, `TCP_INFO`, `/proc`, the agent and NVML, ...); it must import,
serve `/healthz` and stop cleanly on SIGTERM. The Celery worker's app is imported there too.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"gpu-controller listening on (\S+)")
# Real seconds: starting a Python process with the controller's imports on a busy machine.
START_TIMEOUT_S = 30.0


@pytest.mark.real_time
@pytest.mark.timeout(60)
async def test_the_controller_runs_without_anything_linux_only(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    log = tmp_path / "controller.log"
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(REPO_ROOT / "tests" / "integration" / "portable_run.py"),
            "run",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "data"),
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            cwd=REPO_ROOT,
            env=env,
        )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(START_TIMEOUT_S):
            while True:
                line = await process.stdout.readline()
                assert line, f"the controller exited at start: {log.read_text()[-2000:]}"
                match = LISTENING.search(line.decode())
                if match:
                    break
        async with httpx.AsyncClient(base_url=match.group(1), trust_env=False) as http:
            health = await http.get("/healthz", timeout=10.0)
        assert health.status_code == 200
        assert health.json() == {"status": "ok", "agents": 0, "healthy_agents": 0}
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20.0):
            code = await process.wait()
        assert code == 0, log.read_text()[-2000:]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
