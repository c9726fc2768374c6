"""Command line of the agent (imperative shell): `gpu-agent sim`, and the daemon's commands.

Exit codes: 0 on a clean stop, 2 on a usage error, `EXIT_BAD_CONFIG` (78) on bad settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

log = logging.getLogger("gpu_agent")


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "sim":
        with contextlib.suppress(KeyboardInterrupt):
            return asyncio.run(_run_sim(args))
        return 0
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
