"""The agent as a daemon: sd_notify to a real datagram socket, and the `gpu-agent` command line
run in a subprocess (bad settings, a simulated desktop, `status`, SIGTERM).

`serve` runs in process on the virtual-time loop; the tests that start a subprocess run on a real
loop (`real_time`), since a process outside this one cannot share the virtual clock."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest

from gpu_agent.cli import TOKEN_ENV
from gpu_agent.cli import main as cli_main
from gpu_agent.daemon import RunningAgent, running_agent, serve
from gpu_agent.sdnotify import SystemdNotifier
from gpu_agent.settings import ENV_PREFIX, EXIT_BAD_CONFIG
from gpu_agent.sim.desktop import SimDesktop
from gpu_common import clock
from gpu_common.schema import AgentStatus
from tests.integration.test_agent_api import GPU_NAME, TOKEN, agent_settings
from tests.waiting import wait_until

# systemd asks for a keep-alive within WATCHDOG_USEC (WatchdogSec=30 in systemd/gpu-agent.service);
# the agent pings at half that. Simulated seconds: `serve` runs on the virtual-time loop.
WATCHDOG_USEC = 30_000_000
PING_INTERVAL_S = WATCHDOG_USEC / 2_000_000
STALE_AFTER_S = 5.0
# Real seconds, for the subprocesses of the `real_time` tests: generous, as a loaded machine
# takes seconds just to start a Python process that imports the agent.
CLI_TIMEOUT_S = 30.0


class NotifyListener:
    """The systemd end of sd_notify: a bound AF_UNIX datagram socket collecting every message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[dict[str, str]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.setblocking(False)
        self._arrived = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            datagram = await loop.sock_recv(self._sock, 4096)
            lines = datagram.decode().splitlines()
            message = dict(line.split("=", 1) for line in lines if line)
            async with self._arrived:
                self.messages.append(message)
                self._arrived.notify_all()

    async def wait_for(
        self,
        predicate: Callable[[dict[str, str]], bool],
        *,
        after: int = 0,
        timeout_s: float = 4 * PING_INTERVAL_S,
    ) -> int:
        """Index of the first message from `after` on that satisfies `predicate`, waiting up to
        `timeout_s` seconds of the loop's clock for it."""

        def found() -> int | None:
            return next(
                (i for i in range(after, len(self.messages)) if predicate(self.messages[i])), None
            )

        async with asyncio.timeout(timeout_s), self._arrived:
            await self._arrived.wait_for(lambda: found() is not None)
        index = found()
        assert index is not None
        return index

    @asynccontextmanager
    async def listening(self) -> AsyncIterator[NotifyListener]:
        self._task = asyncio.create_task(self._receive())
        try:
            yield self
        finally:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._sock.close()


def is_watchdog(message: dict[str, str]) -> bool:
    return message.get("WATCHDOG") == "1"


async def test_serve_keeps_systemd_informed(tmp_path: Path) -> None:
    listener = NotifyListener(tmp_path / "notify")
    environ = {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    settings = agent_settings(stale_after_s=STALE_AFTER_S)
    stop = asyncio.Event()
    agents: list[RunningAgent] = []
    async with listener.listening():
        server = asyncio.create_task(
            serve(settings, stop, notifier=SystemdNotifier(environ), on_ready=agents.append)
        )
        try:
            ready = await listener.wait_for(lambda m: "READY" in m)
            assert listener.messages[ready]["READY"] == "1"
            # READY came after the first sample: the status it carries has read the GPU.
            assert listener.messages[ready]["STATUS"].startswith("telemetry ok; 1.0/12.0 GiB")
            assert not any(is_watchdog(m) for m in listener.messages[:ready])
            (agent,) = agents
            assert agent.desktop is not None

            first_ping = await listener.wait_for(is_watchdog, after=ready)
            await listener.wait_for(is_watchdog, after=first_ping + 2)

            # The sampler stops: once the last sample is too old, the keep-alives stop too.
            await agent.service.sampler.stop()
            stale = await listener.wait_for(lambda m: "stale" in m.get("STATUS", ""))
            with pytest.raises(TimeoutError):
                await listener.wait_for(is_watchdog, after=stale, timeout_s=6 * PING_INTERVAL_S)
            latest = agent.service.sampler.latest
            assert latest is not None
            assert latest.age_s(clock.monotonic_s()) > STALE_AFTER_S

            await agent.service.sampler.start()
            resumed = await listener.wait_for(is_watchdog, after=stale)
            await listener.wait_for(lambda m: "telemetry ok" in m.get("STATUS", ""), after=stale)
            assert resumed > stale

            stop.set()
            await asyncio.wait_for(server, timeout=60.0)
            # The datagram is sent; wait for the listener to have read it before judging.
            stopping = await listener.wait_for(lambda m: "STOPPING" in m, after=resumed)
        finally:
            stop.set()
            await asyncio.gather(server, return_exceptions=True)
        assert listener.messages[stopping]["STOPPING"] == "1"
        assert stopping == len(listener.messages) - 1, listener.messages[stopping:]
        assert sum("READY" in m for m in listener.messages) == 1


# -- the command line -------------------------------------------------------------------------


def cli_env() -> dict[str, str]:
    """This environment without any of the agent's own settings in it."""
    return {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpu_agent.cli", *args]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def run_cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *cli(*args),
        cwd=cwd,
        env=cli_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(CLI_TIMEOUT_S):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.real_time
async def test_bad_config_file_exits_78_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("sample_interval_s = -1\n")
    code, out, err = await run_cli("run", "--simulate", "--config", str(config), cwd=tmp_path)
    assert code == EXIT_BAD_CONFIG
    assert out == ""
    assert "sample_interval_s" in err
    assert str(config) in err
    assert "Traceback" not in err


@pytest.mark.real_time
async def test_listening_beyond_loopback_without_a_token_exits_78(tmp_path: Path) -> None:
    code, _, err = await run_cli("run", "--simulate", "--host", "0.0.0.0", cwd=tmp_path)
    assert code == EXIT_BAD_CONFIG
    assert "token" in err
    assert "Traceback" not in err


@pytest.mark.real_time
async def test_bad_flag_is_a_usage_error(tmp_path: Path) -> None:
    code, _, err = await run_cli("run", "--port", "99999", cwd=tmp_path)
    assert code == 2
    assert "--port" in err


@contextmanager
def stopped_on_exit(process: asyncio.subprocess.Process) -> Iterator[None]:
    try:
        yield
    finally:
        if process.returncode is None:
            process.kill()


@pytest.mark.real_time
async def test_run_status_and_sigterm(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *cli("run", "--simulate", "--port", str(port)),
        *("--token-file", str(token_file)),
        cwd=tmp_path,
        env=cli_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    with stopped_on_exit(process):
        async with asyncio.timeout(CLI_TIMEOUT_S):
            first_line = (await process.stdout.readline()).decode()
        url = f"http://127.0.0.1:{port}"
        assert url in first_line

        code, out, err = await run_cli(
            "status", "--url", url, "--token-file", str(token_file), "--json", cwd=tmp_path
        )
        assert code == 0, err
        status = AgentStatus.model_validate_json(out)
        assert status.telemetry.status == "ok"
        assert status.telemetry.gpus[0].name == GPU_NAME
        assert status.ollama.reachable

        code, out, err = await run_cli(
            "status", "--url", url, "--token-file", str(token_file), cwd=tmp_path
        )
        assert code == 0, err
        assert GPU_NAME in out
        assert "ComfyUI: up" in out

        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(CLI_TIMEOUT_S):
            _, log = await process.communicate()
        assert process.returncode == 0, log.decode()
        assert "Traceback" not in log.decode()
        # Per-request lines of the HTTP client would drown the log: only state changes show.
        assert "HTTP Request" not in log.decode()


async def test_status_command_reports_problems(
    desktop: SimDesktop, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # In this process, with the command in a worker thread: its HTTP call blocks.
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    async with running_agent(agent_settings(), desktop) as agent:
        assert await asyncio.to_thread(cli_main, ["status", "--url", agent.url]) == 1
        assert "refused the token" in capsys.readouterr().err

        monkeypatch.setenv(TOKEN_ENV, TOKEN)
        assert await asyncio.to_thread(cli_main, ["status", "--url", agent.url]) == 0
        out = capsys.readouterr().out
        assert GPU_NAME in out
        assert "Ollama (up" in out

        await desktop.stop_ollama()
        await wait_until(lambda: not agent.service.status().ollama.reachable, what="Ollama down")
        assert await asyncio.to_thread(cli_main, ["status", "--url", agent.url]) == 0
        assert "Ollama (DOWN: cannot reach Ollama" in capsys.readouterr().out
        await desktop.start_ollama()

    code = await asyncio.to_thread(cli_main, ["status", "--url", agent.url, "--timeout", "1"])
    assert code == 1
    assert "cannot reach the agent" in capsys.readouterr().err


def test_status_reads_the_daemons_token_variable() -> None:
    assert f"{ENV_PREFIX}TOKEN" == TOKEN_ENV
