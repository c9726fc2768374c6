"""`gpu-controller` command line: `run`'s settings and exit codes, its signal handling, and
`status` against a small fake controller (a real aiohttp server on loopback)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from controller.cli import build_parser, main, serve_until_signalled, settings_from_args
from controller.schema import AgentInfo, FleetInfo, HeldJobInfo
from controller.settings import EXIT_BAD_CONFIG, ControllerSettings, load_settings
from gpu_common.schema import GpuInfo, ResidentModelInfo
from tests.waiting import wait_until

TOKEN = "0123456789abcdef0123456789abcdef"
GIB = 1024**3
REPO = Path(__file__).resolve().parents[2]
HELD_REASON = "needs 9.10 GiB, 2.30 GiB free on desktop1; waiting for qwen2.5:7b to finish"

AiohttpServer = Callable[[web.Application], Awaitable[TestServer]]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU_CONTROLLER_* or GPU_AGENT_* variable from the test machine leaks into the tests;
    a wide terminal keeps table cells on one line."""
    for name in list(os.environ):
        if name.upper().startswith(("GPU_CONTROLLER_", "GPU_AGENT_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "250")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real entry point in a child process, for exit codes and stderr."""
    child_env = {
        key: value
        for key, value in os.environ.items()
        if not key.upper().startswith(("GPU_CONTROLLER_", "GPU_AGENT_"))
    }
    child_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args],
        cwd=REPO,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def parse_run(*args: str) -> ControllerSettings:
    return settings_from_args(build_parser().parse_args(["run", *args]))


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def canned_fleet() -> FleetInfo:
    now = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    gpu = GpuInfo(
        index=0,
        uuid="GPU-0",
        name="NVIDIA GeForce RTX 4070 SUPER",
        memory_total_bytes=12 * GIB,
        memory_used_bytes=9 * GIB,
        memory_free_bytes=3 * GIB,
        memory_reserved_bytes=None,
        utilization_gpu_percent=80,
        utilization_memory_percent=40,
        temperature_c=65,
        power_w=180.0,
        power_limit_w=220.0,
        memory_by_owner_bytes={"ollama": 8 * GIB},
        processes=[],
    )

    def resident(name: str, offloaded: bool) -> ResidentModelInfo:
        return ResidentModelInfo(
            name=name,
            size_bytes=6 * GIB,
            vram_bytes=5 * GIB if offloaded else 6 * GIB,
            context_length=4096,
            expires_at=now,
            in_flight=1,
            offloaded=offloaded,
        )

    def agent(name: str, healthy: bool, **extra: object) -> AgentInfo:
        fields: dict[str, object] = {
            "name": name,
            "url": f"http://{name}:8765",
            "healthy": healthy,
            "reason": None if healthy else "telemetry 42 s old",
            "connected": healthy,
            "age_s": 0.4 if healthy else 42.0,
            "budget_bytes": 11 * GIB,
            "used_bytes": 9 * GIB,
            "pending_bytes": 0,
            "free_bytes": 2 * GIB,
            "draining": False,
            "gpus": [gpu] if healthy else [],
            "resident": [],
            "comfyui_connection": "websocket" if healthy else None,
            "image_running": None,
        }
        fields.update(extra)
        return AgentInfo.model_validate(fields)

    return FleetInfo(
        agents=[
            agent(
                "desktop1",
                True,
                resident=[resident("qwen2.5:7b", False), resident("qwen2.5:14b", True)],
                draining=True,
                image_running="job-running-1",
            ),
            agent("desktop2", False),
        ],
        held_jobs=[
            HeldJobInfo(
                id="job-held-1",
                reason=HELD_REASON,
                waiting_s=12.5,
                vram_bytes=9 * GIB,
                family="sdxl",
            )
        ],
        jobs_by_state={"succeeded": 7, "held": 1, "running": 1},
    )


async def fake_controller(
    aiohttp_server: AiohttpServer, *, token: str | None = None
) -> tuple[TestServer, list[str | None]]:
    """A controller that serves `canned_fleet()` on GET /v1/fleet and records each request's
    Authorization header; with `token`, any other token is answered 401."""
    seen: list[str | None] = []

    async def fleet(request: web.Request) -> web.Response:
        header = request.headers.get("Authorization")
        seen.append(header)
        if token is not None and header != f"Bearer {token}":
            return web.json_response(
                {"error": {"code": "unauthorized", "message": "bad token"}}, status=401
            )
        return web.Response(
            body=canned_fleet().model_dump_json().encode(), content_type="application/json"
        )

    app = web.Application()
    app.router.add_get("/v1/fleet", fleet)
    return await aiohttp_server(app), seen


# -- run: settings and exit codes -------------------------------------------------------------


def test_agent_flags_build_the_agent_list() -> None:
    settings = parse_run(
        "--agent",
        "http://desktop1:8765",
        "--agent",
        "http://192.168.1.42:9000/",
        "--port",
        "0",
        "--log-level",
        "debug",
    )
    assert [(a.name, a.url) for a in settings.agents] == [
        ("desktop1", "http://desktop1:8765"),
        ("192.168.1.42-9000", "http://192.168.1.42:9000"),
    ]
    assert settings.port == 0
    assert settings.log_level == "DEBUG"


def test_agent_flags_replace_the_files_agents(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        'port = 9100\n[[agents]]\nname = "from-file"\nurl = "http://file:8765"\n',
        encoding="utf-8",
    )
    from_file = parse_run("--config", str(config))
    assert [a.name for a in from_file.agents] == ["from-file"]
    from_flags = parse_run("--config", str(config), "--agent", "http://flag:8765")
    assert [a.name for a in from_flags.agents] == ["flag"]
    assert from_flags.port == 9100


def test_run_flags_reach_the_settings(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN, encoding="utf-8")
    settings = parse_run(
        "--host", "0.0.0.0", "--token-file", str(token_file), "--data-dir", str(tmp_path)
    )
    assert settings.host == "0.0.0.0"
    assert settings.effective_token() == TOKEN
    assert settings.data_dir == tmp_path


def test_bad_port_flag_exits_78_naming_the_field() -> None:
    result = run_cli("run", "--port", "70000")
    assert result.returncode == EXIT_BAD_CONFIG
    assert "port:" in result.stderr
    assert "command line" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_agent_url_in_the_file_exits_78(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[[agents]]\nname = "a"\nurl = "desktop1:8765"\n', encoding="utf-8")
    result = run_cli("run", "--config", str(config))
    assert result.returncode == EXIT_BAD_CONFIG
    assert "agents.0.url:" in result.stderr
    assert str(config) in result.stderr


def test_off_loopback_without_token_exits_78() -> None:
    result = run_cli(
        "run", "--host", "0.0.0.0", env={"GPU_AGENT_TOKEN": TOKEN, "GPU_CONTROLLER_PORT": "0"}
    )
    assert result.returncode == EXIT_BAD_CONFIG
    assert "token:" in result.stderr
    assert TOKEN not in result.stderr


def test_bad_environment_exits_78_naming_the_variable() -> None:
    result = run_cli("run", env={"GPU_CONTROLLER_LLM_WAIT_S": "soon"})
    assert result.returncode == EXIT_BAD_CONFIG
    assert "llm_wait_s:" in result.stderr
    assert "GPU_CONTROLLER_LLM_WAIT_S" in result.stderr


def test_missing_command_is_a_usage_error() -> None:
    assert run_cli().returncode == 2


# -- run: signals -----------------------------------------------------------------------------


class FakeService:
    """A stand-in for `controller.daemon.serve`: a real HTTP server on loopback that stops when
    told to, and whose shutdown can be held up to see what a second signal does."""

    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self.release = asyncio.Event()
        self.stopped = False

    async def serve(
        self,
        settings: ControllerSettings,
        stop: asyncio.Event,
        *,
        on_ready: Callable[[str], None] | None = None,
    ) -> None:
        runner = web.AppRunner(web.Application(), handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        try:
            host, port = runner.addresses[0][:2]
            if on_ready is not None:
                on_ready(f"http://{host}:{port}")
            await stop.wait()
            self.stopping.set()
            await self.release.wait()
        finally:
            await runner.cleanup()
            self.stopped = True


async def test_first_signal_stops_gracefully() -> None:
    service = FakeService()
    service.release.set()
    urls: list[str] = []
    forced: list[int] = []
    task = asyncio.create_task(
        serve_until_signalled(
            service.serve, load_settings(port=0), on_ready=urls.append, force_exit=forced.append
        )
    )
    await wait_until(lambda: urls, what="the service to be ready")
    assert urls[0].startswith("http://127.0.0.1:")
    os.kill(os.getpid(), signal.SIGTERM)
    async with asyncio.timeout(5):
        await task
    assert service.stopped
    assert forced == []


async def test_second_signal_forces_exit() -> None:
    service = FakeService()
    urls: list[str] = []
    forced: list[int] = []
    task = asyncio.create_task(
        serve_until_signalled(
            service.serve, load_settings(port=0), on_ready=urls.append, force_exit=forced.append
        )
    )
    await wait_until(lambda: urls, what="the service to be ready")
    os.kill(os.getpid(), signal.SIGINT)
    async with asyncio.timeout(5):
        await service.stopping.wait()
    os.kill(os.getpid(), signal.SIGINT)
    await wait_until(lambda: forced, what="the forced exit")
    assert forced == [signal.SIGINT]
    service.release.set()
    async with asyncio.timeout(5):
        await task
    # The handlers are gone once serving ends, so later signals reach their usual handlers.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.real_time
async def test_run_serves_until_sigterm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real service in a child process: it says where it listens, answers `status`, and
    exits 0 on SIGTERM. On real time: a virtual clock would jump past the timeouts below while
    the child starts."""
    child_env = {
        key: value
        for key, value in os.environ.items()
        if not key.upper().startswith(("GPU_CONTROLLER_", "GPU_AGENT_"))
    }
    child_env["GPU_CONTROLLER_TOKEN"] = TOKEN
    agent_port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controller.cli",
        "run",
        "--port",
        "0",
        "--data-dir",
        str(tmp_path / "state"),
        "--agent",
        f"http://127.0.0.1:{agent_port}",
        cwd=REPO,
        env=child_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(15):
            line = (await process.stdout.readline()).decode()
        assert line.startswith("gpu-controller listening on http://127.0.0.1:"), line
        url = line.split()[-1]
        code = await asyncio.to_thread(main, ["status", "--url", url, "--json"])
        captured = capsys.readouterr()
        assert code == 1  # this process has no token
        assert "requires a token" in captured.err
        monkeypatch.setenv("GPU_CONTROLLER_TOKEN", TOKEN)
        code = await asyncio.to_thread(main, ["status", "--url", url, "--json"])
        fleet = FleetInfo.model_validate_json(capsys.readouterr().out)
        assert code == 0
        assert [agent.name for agent in fleet.agents] == [f"127.0.0.1-{agent_port}"]
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# -- status -----------------------------------------------------------------------------------


def test_status_unreachable_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["status", "--url", url, "--timeout", "2"]) == 1
    captured = capsys.readouterr()
    assert "cannot reach the controller" in captured.err
    assert url in captured.err
    assert captured.out == ""


def test_status_unreachable_exit_code_of_the_process() -> None:
    result = run_cli("status", "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "2")
    assert result.returncode == 1
    assert "cannot reach the controller" in result.stderr
    assert "Traceback" not in result.stderr


async def test_status_json_prints_the_fleet(
    aiohttp_server: AiohttpServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, seen = await fake_controller(aiohttp_server, token=TOKEN)
    monkeypatch.setenv("GPU_CONTROLLER_TOKEN", TOKEN)
    url = str(server.make_url(""))
    # The command is synchronous; run it off the loop that serves the fake controller.
    code = await asyncio.to_thread(main, ["status", "--url", url, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert FleetInfo.model_validate(json.loads(captured.out)) == canned_fleet()
    assert seen == [f"Bearer {TOKEN}"]


async def test_status_table_shows_agents_and_held_reasons(
    aiohttp_server: AiohttpServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    server, seen = await fake_controller(aiohttp_server, token=TOKEN)
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n", encoding="utf-8")
    url = str(server.make_url(""))
    code = await asyncio.to_thread(main, ["status", "--url", url, "--token-file", str(token_file)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = captured.out
    assert seen == [f"Bearer {TOKEN}"]
    for expected in (
        "desktop1",
        "desktop2",
        "telemetry 42 s old",
        "qwen2.5:14b (CPU spill)",
        "websocket",
        "job-running-1",
        "draining",
        "9.00/12.00",
        "job-held-1",
        HELD_REASON,
        "held 1, running 1, succeeded 7",
    ):
        assert expected in out, f"{expected!r} missing from:\n{out}"
    assert "qwen2.5:7b (CPU spill)" not in out


async def test_status_with_a_wrong_token_exits_1(
    aiohttp_server: AiohttpServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, _ = await fake_controller(aiohttp_server, token=TOKEN)
    monkeypatch.setenv("GPU_CONTROLLER_TOKEN", "wrong")
    code = await asyncio.to_thread(main, ["status", "--url", str(server.make_url(""))])
    captured = capsys.readouterr()
    assert code == 1
    assert "refused the token" in captured.err
    assert captured.out == ""
