"""Command line of the agent (imperative shell): `gpu-agent run`, `status` and `sim`.

Exit codes: 0 on a clean stop, 1 when the agent cannot start or cannot be asked, 2 on a usage
error, `EXIT_BAD_CONFIG` (78) on bad settings (systemd's `RestartPreventExitStatus=` stops there).
The first SIGTERM or SIGINT stops `run` gracefully; a second one ends the process at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gpu_agent.errors import GpuAgentError
from gpu_common.errors import ConfigError, ServiceError

if TYPE_CHECKING:
    from gpu_agent.daemon import RunningAgent
    from gpu_agent.settings import AgentSettings

EXIT_FAILURE = 1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# The daemon's own token variable (settings.ENV_PREFIX + "TOKEN"), read by `status` as well.
# Named here rather than imported: `status` should start without loading the settings machinery.
TOKEN_ENV = "GPU_AGENT_TOKEN"

log = logging.getLogger("gpu_agent")

# httpx imports its own command-line client, and with it click, rich and pygments, whenever
# they happen to be installed (celery brings click, the report extra rich). This process never
# runs that client: marked absent, httpx skips it and the daemon stays without them.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `gpu-agent` parser with its `run`, `sim` and `status` subcommands."""
    parser = argparse.ArgumentParser(
        prog="gpu-agent",
        description="GPU desktop agent: telemetry and control of Ollama and ComfyUI.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser(
        "sim",
        help="run the simulated desktop (emulated Ollama and ComfyUI on one simulated 12 GB GPU)",
    )
    sim.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback)")
    sim.add_argument("--ollama-port", type=_port, default=11434, help="emulated Ollama port")
    sim.add_argument("--comfyui-port", type=_port, default=8188, help="emulated ComfyUI port")
    sim.add_argument(
        "--speed", type=_positive_float, default=1.0, help="simulated seconds per real second"
    )
    sim.add_argument("--seed", type=int, default=0, help="seed for generated text and images")
    sim.add_argument("--data-dir", type=Path, default=None, help="where ComfyUI writes images")

    run = sub.add_parser("run", help="run the agent daemon")
    run.add_argument("--config", type=Path, default=None, help="TOML settings file")
    run.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    run.add_argument("--port", type=_port, default=None, help="port to listen on (default 8765)")
    run.add_argument("--ollama-url", default=None, help="Ollama base URL")
    run.add_argument("--comfyui-url", default=None, help="ComfyUI base URL")
    run.add_argument("--token-file", type=Path, default=None, help="file holding the bearer token")
    run.add_argument(
        "--simulate",
        action="store_const",
        const=True,
        default=None,
        help="run on an in-process simulated desktop instead of the real one",
    )
    run.add_argument("--speed", type=_positive_float, default=None, help="simulation speed")
    run.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR")

    status = sub.add_parser("status", help="print an agent's status")
    status.add_argument("--url", default="http://127.0.0.1:8765", help="the agent's URL")
    status.add_argument("--token-file", type=Path, default=None, help="file holding the token")
    status.add_argument("--json", action="store_true", help="print the raw JSON status")
    status.add_argument("--timeout", type=_positive_float, default=5.0, help="seconds to wait")
    return parser


async def _wait_for_stop_signal() -> None:
    """Return on the first SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _run_sim(args: argparse.Namespace) -> int:
    from gpu_agent.sim.desktop import SimDesktop

    desktop = SimDesktop(
        speed=args.speed,
        seed=args.seed,
        data_dir=args.data_dir,
        host=args.host,
        ollama_port=args.ollama_port,
        comfyui_port=args.comfyui_port,
    )
    try:
        await desktop.start()
    except OSError as exc:
        print(f"gpu-agent sim: cannot listen: {exc}", file=sys.stderr)
        await desktop.stop()
        return 1
    gpu = desktop.gpu.spec
    print(f"simulated desktop: {gpu.name}, {gpu.total_bytes // 2**20} MiB, speed x{args.speed:g}")
    print(f"ollama   {desktop.ollama_url}")
    print(f"comfyui  {desktop.comfyui_url}")
    print(f"images   {desktop.comfyui.output_dir}")
    print("press Ctrl+C to stop", flush=True)
    try:
        await _wait_for_stop_signal()
    finally:
        await desktop.stop()
    return 0


async def _serve_until_signal(settings: AgentSettings) -> int:
    from gpu_agent.daemon import serve

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def first_signal() -> None:
        log.info("stop requested; shutting down")
        stop.set()
        # A second signal gets the default action: the process ends at once.
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)

    def announce(agent: RunningAgent) -> None:
        print(f"gpu-agent listening on {agent.url}", flush=True)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, first_signal)
    try:
        await serve(settings, stop, on_ready=announce)
    except OSError as exc:
        print(
            f"gpu-agent: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr
        )
        return EXIT_FAILURE
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
    return 0


def _run_agent(args: argparse.Namespace) -> int:
    from gpu_agent.settings import EXIT_BAD_CONFIG, load_settings

    try:
        settings = load_settings(
            args.config,
            host=args.host,
            port=args.port,
            ollama_url=args.ollama_url,
            comfyui_url=args.comfyui_url,
            token_file=args.token_file,
            simulate=args.simulate,
            sim_speed=args.speed,
            log_level=args.log_level,
        )
    except ConfigError as exc:
        print(f"gpu-agent: invalid settings:\n{exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    logging.getLogger().setLevel(settings.log_level)
    return asyncio.run(_serve_until_signal(settings))


def _status_token(token_file: Path | None) -> str | None:
    """The token for `status`: from --token-file, else the agent's own environment variable."""
    if token_file is None:
        return os.environ.get(TOKEN_ENV, "").strip() or None
    try:
        token = token_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise GpuAgentError(f"cannot read the token file {token_file}: {exc}") from exc
    if not token:
        raise GpuAgentError(f"the token file {token_file} is empty")
    return token


def _show_status(args: argparse.Namespace) -> int:
    from gpu_agent.status_view import fetch_status, render_status

    try:
        status = fetch_status(
            args.url, token=_status_token(args.token_file), timeout_s=args.timeout
        )
    except ServiceError as exc:
        print(f"gpu-agent status: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(status.model_dump_json(indent=2))
    else:
        render_status(status)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The `gpu-agent` command: `run`, `sim` or `status`; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        # `status` prints a report on stdout; only problems belong on stderr there.
        level=logging.WARNING if args.command == "status" else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO: one line per poll of Ollama and ComfyUI.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.command == "sim":
        with contextlib.suppress(KeyboardInterrupt):
            return asyncio.run(_run_sim(args))
        return 0
    if args.command == "run":
        return _run_agent(args)
    if args.command == "status":
        return _show_status(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
