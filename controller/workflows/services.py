"""The whole workflow stack as processes on this machine, for the demo and the benchmark
(composition): Redis, a simulated desktop with its agent, a controller, Celery workers.

Everything runs as the studio would run it, each piece its own process on 127.0.0.1: Debian's
`redis-server`, `gpu-agent run --simulate --speed S`, `gpu-controller run` and `celery -A
controller.workflows worker`. The controller is started without a minimum residency, since its
policy times are real seconds while the desktop runs `speed` times faster than a real card.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from controller.workflows.celery_app import app
from controller.workflows.settings import WorkflowSettings
from gpu_common import clock

_LISTENING = re.compile(r"listening on (http://\S+)")
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait(condition: object, timeout_s: float, what: str) -> None:
    """Until `condition()` is truthy; RuntimeError after `timeout_s` seconds."""
    deadline = clock.monotonic_s() + timeout_s
    pause = threading.Event()
    while not condition():  # type: ignore[operator]
        if clock.monotonic_s() > deadline:
            raise RuntimeError(f"{what} not ready within {timeout_s:g} s")
        pause.wait(0.05)


@dataclass
class Service:
    """One process: its name, the URL it announced, and the tail of its output."""

    name: str
    process: subprocess.Popen[bytes]
    url: str | None = None
    output: list[str] = field(default_factory=list)

    def read(self) -> None:
        """Drain the process's output (a full pipe would stop it) and pick up its URL."""
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.output = [*self.output[-40:], line]
            if self.url is None and (match := _LISTENING.search(line)):
                self.url = match.group(1)

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL if it is still there after a while."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=STOP_TIMEOUT_S)


def _start(name: str, args: list[str], env: dict[str, str], *, announces: bool) -> Service:
    process = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    service = Service(name, process)
    threading.Thread(target=service.read, daemon=True, name=f"{name}-output").start()
    if announces:
        try:
            _wait(lambda: service.url or process.poll() is not None, STARTUP_TIMEOUT_S, name)
        except RuntimeError:
            service.stop()
            raise
        if service.url is None:
            tail = "\n".join(service.output[-15:])
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{tail}")
    return service


@dataclass
class Services:
    """The running stack: the URLs a client needs and the settings the workers use."""

    redis_url: str
    agent_url: str
    controller_url: str
    settings: WorkflowSettings
    services: list[Service]


@contextlib.contextmanager
def running_services(
    data_dir: Path, *, speed: float, workers: int = 1, concurrency: int = 2
) -> Iterator[Services]:
    """Start Redis, the simulated desktop and agent, a controller and `workers` Celery workers
    (each with `concurrency` processes); point `controller.workflows.app` at them; stop all
    on exit, the workers first."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (`make redis` installs it)")
    python = sys.executable
    started: list[Service] = []
    try:
        port = _free_port()
        redis_dir = data_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        started.append(
            _start(
                "redis",
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(redis_dir),
                 "--save", "", "--appendonly", "yes", "--daemonize", "no"],
                {},
                announces=False,
            )
        )  # fmt: skip
        redis_url = f"redis://127.0.0.1:{port}"
        probe = redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=0.5)

        def answers() -> bool:
            with contextlib.suppress(redis.RedisError):
                return bool(probe.ping())
            return False

        _wait(answers, STARTUP_TIMEOUT_S, "redis-server")
        probe.close()
        agent = _start(
            "agent",
            [python, "-m", "gpu_agent.cli", "run", "--simulate", "--speed", f"{speed:g}",
             "--port", "0", "--log-level", "WARNING"],
            {"GPU_AGENT_SAMPLE_INTERVAL_S": "0.25"},
            announces=True,
        )  # fmt: skip
        started.append(agent)
        assert agent.url is not None
        controller = _start(
            "controller",
            [python, "-m", "controller.cli", "run", "--port", "0", "--agent", agent.url,
             "--data-dir", str(data_dir / "controller"), "--log-level", "WARNING"],
            {"GPU_CONTROLLER_MIN_RESIDENCY_S": "0", "GPU_CONTROLLER_TICK_INTERVAL_S": "0.1"},
            announces=True,
        )  # fmt: skip
        started.append(controller)
        assert controller.url is not None
        settings = WorkflowSettings(
            broker_url=f"{redis_url}/0",
            result_backend=f"{redis_url}/1",
            controller_url=controller.url,
            concurrency=concurrency,
            hold_wait_s=0.5,
            hold_retry_s=0.5,
            hold_retry_max_s=2.0,
        )
        app.apply_settings(settings)
        env = {
            "GPU_WORKFLOWS_BROKER_URL": settings.broker_url,
            "GPU_WORKFLOWS_RESULT_BACKEND": settings.result_backend,
            "GPU_WORKFLOWS_CONTROLLER_URL": settings.controller_url,
            "GPU_WORKFLOWS_CONCURRENCY": str(concurrency),
            "GPU_WORKFLOWS_HOLD_WAIT_S": "0.5",
            "GPU_WORKFLOWS_HOLD_RETRY_S": "0.5",
            "GPU_WORKFLOWS_HOLD_RETRY_MAX_S": "2",
        }
        names = []
        for index in range(workers):
            name = f"worker{index + 1}@localhost"
            names.append(name)
            started.append(
                _start(
                    name,
                    [python, "-m", "celery", "-A", "controller.workflows", "worker",
                     "--concurrency", str(concurrency), "--loglevel", "WARNING",
                     "--hostname", name, "--without-mingle", "--without-gossip"],
                    env,
                    announces=False,
                )
            )  # fmt: skip
        for name in names:
            _wait(
                lambda name=name: app.control.ping(destination=[name], timeout=0.5),
                STARTUP_TIMEOUT_S,
                name,
            )
        yield Services(redis_url, agent.url, controller.url, settings, started)
    finally:
        # Workers first, then the controller and agent, Redis last.
        for service in reversed(started):
            service.stop()
