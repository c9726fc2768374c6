"""Real parts for the workflow tests: a Redis server, the simulated stack on real time, workers.

- `RedisServer`: Debian's `redis-server` on a free port in a temporary folder, with an
  append-only file synced on every write, so a restart keeps everything it acknowledged.
- `StackThread`: a simulated desktop (fast: `speed`), an agent and a controller on a standard
  event loop in a thread of their own, on real time, for Celery workers to call over HTTP.
- `WorkerProcess`: `celery -A controller.workflows worker` as a subprocess a test may kill.

Every wait here has a deadline and waits on a condition, never a fixed pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import redis

from controller.workflows.settings import WorkflowSettings
from gpu_agent.sim.desktop import SimDesktop
from gpu_agent.sim.workflows import SDXL, text_to_image
from gpu_common import clock
from tests.integration.stack import CONTROLLER_TOKEN, Stack, free_port, running_stack

T = TypeVar("T")
TOKEN = CONTROLLER_TOKEN
ROOT = Path(__file__).resolve().parents[2]
# How fast the simulated desktop runs: a 20-step SDXL image (about 5 s on the card) takes a
# fifth of a second, a qwen2.5:14b load and answer well under a second.
SIM_SPEED = 25.0
READY_TIMEOUT_S = 20.0


def wait_for(
    condition: Callable[[], T | None], *, timeout_s: float, what: str, poll_s: float = 0.05
) -> T:
    """The first truthy result of `condition()`; AssertionError after `timeout_s` real seconds."""
    deadline = clock.monotonic_s() + timeout_s
    pause = threading.Event()
    while True:
        result = condition()
        if result:
            return result
        if clock.monotonic_s() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        pause.wait(poll_s)


def redis_server_path() -> str | None:
    """Where `redis-server` is, if installed."""
    return shutil.which("redis-server")


class RedisServer:
    """A `redis-server` on loopback that a test can stop and start again on the same port."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server and wait until it answers."""
        binary = redis_server_path()
        assert binary is not None, "redis-server is not installed (make redis installs it)"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.data_dir), "--save", "", "--appendonly", "yes", "--appendfsync", "always",
             "--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)

        def answers() -> bool:
            with contextlib.suppress(redis.RedisError):
                return bool(client.ping())
            return False

        try:
            wait_for(answers, timeout_s=READY_TIMEOUT_S, what="redis-server to answer")
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server (SIGTERM: it syncs its append-only file and exits)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            process.wait(timeout=10)

    def restart(self) -> None:
        """Stop the server and start it again on the same port with the same data."""
        self.stop()
        self.start()

    def client(self, db: int = 0) -> redis.Redis:
        """A client of database `db`."""
        return redis.Redis(port=self.port, db=db, socket_timeout=5.0)

    def settings(self, controller_url: str, **overrides: Any) -> WorkflowSettings:
        """Workflow settings on this server (broker db 0, results db 1) and `controller_url`,
        with the waits and countdowns short enough for a test."""
        values: dict[str, Any] = {
            "broker_url": f"{self.url}/0",
            "result_backend": f"{self.url}/1",
            "controller_url": controller_url,
            "controller_token": TOKEN,
            "request_timeout_s": 30.0,
            "hold_wait_s": 0.3,
            "hold_retry_s": 0.3,
            "hold_retry_max_s": 0.5,
            "time_limit_s": 60.0,
            "soft_time_limit_s": 50.0,
            "visibility_timeout_s": 61.0,
            "restore_interval_s": 1.0,
            "agent_modules": ["tests.workflows.studio_agents"],
        }
        values.update(overrides)
        return WorkflowSettings(**values)


def settings_env(settings: WorkflowSettings) -> dict[str, str]:
    """`settings` as the `GPU_WORKFLOWS_*` variables a worker subprocess reads."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if name == "controller_token":
            value = settings.token()
        elif name == "agent_modules":
            value = ",".join(value)
        env[f"GPU_WORKFLOWS_{name.upper()}"] = str(value)
    return env


class StackThread:
    """The simulated desktop, its agent and a controller, on a loop in a thread of their own."""

    def __init__(self, data_dir: Path, *, speed: float = SIM_SPEED) -> None:
        self._data_dir = data_dir
        self._speed = speed
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._stop: asyncio.Event | None = None
        self._done: Future[None] | None = None
        self.stack: Stack | None = None
        self.desktop: SimDesktop | None = None

    @property
    def url(self) -> str:
        assert self.stack is not None
        return self.stack.url

    def start(self) -> None:
        """Start everything and return once the controller sees its agent."""
        self._thread.start()
        ready: Future[None] = Future()
        self._done = asyncio.run_coroutine_threadsafe(self._main(ready), self._loop)
        ready.result(timeout=READY_TIMEOUT_S)

    async def _main(self, ready: Future[None]) -> None:
        self._stop = asyncio.Event()
        try:
            # The controller's policy times (residency, holds, yields) are real seconds here
            # while the desktop runs fast: no minimum residency, as in the integration tests.
            async with (
                SimDesktop(speed=self._speed, data_dir=self._data_dir / "desktop") as desktop,
                running_stack(desktop, self._data_dir / "controller", tick_interval_s=0.1) as stack,
            ):
                self.desktop, self.stack = desktop, stack
                ready.set_result(None)
                await self._stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    def call(self, work: Callable[[], Awaitable[T]], timeout_s: float = 10.0) -> T:
        """Run the coroutine function `work` on the stack's loop; its result."""

        async def run() -> T:
            return await work()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=timeout_s)

    def prompts_run(self) -> int:
        """How many prompts the emulated ComfyUI has run."""
        desktop = self.desktop
        assert desktop is not None

        async def read() -> int:
            return desktop.comfyui.stats.prompts_run

        return self.call(read)

    def job_counts(self) -> dict[str, int]:
        """The controller's image jobs by state."""
        assert self.stack is not None
        counts = self.call(self.stack.engine.store.counts)
        return {str(state): n for state, n in counts.items()}

    def stop(self) -> None:
        """Stop the stack and its loop."""
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._done is not None:
            with contextlib.suppress(Exception):
                self._done.result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


class WorkerProcess:
    """`celery -A controller.workflows worker` in a subprocess, named `name`."""

    def __init__(
        self, settings: WorkflowSettings, name: str, *, concurrency: int = 2, log: Path
    ) -> None:
        self.name = f"{name}@localhost"
        env = {**os.environ, **settings_env(settings), "PYTHONPATH": str(ROOT)}
        self._log = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "controller.workflows", "worker",
             "--concurrency", str(concurrency), "--pool", "prefork", "--loglevel", "INFO",
             "--hostname", self.name, "--without-mingle", "--without-gossip"],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, ping: Callable[[str], bool], timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until the worker answers `ping(name)`."""
        wait_for(lambda: ping(self.name), timeout_s=timeout_s, what=f"worker {self.name}")

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes at once, as a crash or the OOM killer would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """Stop the worker: SIGTERM (a warm shutdown), then SIGKILL if it lingers."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


def sdxl_workflow(seed: int = 1, steps: int = 20) -> dict[str, Any]:
    """A 1024x1024 SDXL text-to-image workflow; node "6" is the positive prompt."""
    return text_to_image(SDXL, width=1024, height=1024, steps=steps, seed=seed)


def run_coroutine(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run `coroutine` to its end on a loop of its own (tests are plain functions here)."""
    return asyncio.run(coroutine)
