"""Command line of the controller (imperative shell): `gpu-controller run` and `status`.

Exit codes: 0 on a clean stop, 1 when the service fails or `status` cannot get an answer, 2 on a
usage error, `EXIT_BAD_CONFIG` (78) on bad settings, 128 + the signal's number on a forced exit
(a second SIGINT or SIGTERM while shutting down).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

from controller import __version__
from controller.settings import (
    DEFAULT_PORT,
    ENV_PREFIX,
    EXIT_BAD_CONFIG,
    ControllerSettings,
    agent_name_from_url,
    load_settings,
)
from gpu_common.errors import ConfigError, ServiceError
from gpu_common.layered_settings import read_token_file

log = logging.getLogger("controller")

# httpx imports its own command-line client, and with it click, rich and pygments, whenever
# they happen to be installed (celery brings click, the report extra rich). This process never
# runs that client: marked absent, httpx skips it and the daemon stays without them.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

TOKEN_ENV = ENV_PREFIX + "TOKEN"
DEFAULT_STATUS_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ServeFn(Protocol):
    """The shape of `controller.daemon.serve`: run until `stop` is set, then shut down."""

    def __call__(
        self,
        settings: ControllerSettings,
        stop: asyncio.Event,
        *,
        on_ready: Callable[[str], None] | None = None,
    ) -> Awaitable[None]: ...


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `gpu-controller` parser with its `run` and `status` subcommands."""
    parser = argparse.ArgumentParser(
        prog="gpu-controller",
        description="Schedules LLM requests and image jobs across GPU agents.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    # Flags default to None ("not given") so the environment and the config file still apply;
    # values are checked by the settings, which name the field in one place.
    run = sub.add_parser("run", help="run the controller service")
    run.add_argument("--config", type=Path, default=None, help="TOML settings file")
    run.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    run.add_argument(
        "--port", type=int, default=None, help=f"port to listen on (default {DEFAULT_PORT})"
    )
    run.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="writable state directory (default ~/.local/share/gpu-controller)",
    )
    run.add_argument(
        "--agent",
        action="append",
        default=None,
        metavar="URL",
        help="an agent's base URL, named after its host (and port unless 8765); repeatable; "
        "replaces the config file's agents",
    )
    run.add_argument("--token-file", type=Path, default=None, help="file holding the API token")
    run.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR")

    status = sub.add_parser("status", help="print the controller's view of the fleet")
    status.add_argument(
        "--url", default=DEFAULT_STATUS_URL, help=f"the controller's URL ({DEFAULT_STATUS_URL})"
    )
    status.add_argument(
        "--token-file", type=Path, default=None, help=f"file holding the token (else ${TOKEN_ENV})"
    )
    status.add_argument("--json", action="store_true", help="print the fleet as JSON")
    status.add_argument("--timeout", type=_positive_float, default=5.0, help="seconds to wait")
    return parser


def settings_from_args(args: argparse.Namespace) -> ControllerSettings:
    """The settings for `run`: its flags over the environment over `--config`. Raises
    `ConfigError`."""
    agents = None
    if args.agent:
        agents = [{"name": agent_name_from_url(url), "url": url} for url in args.agent]
    return load_settings(
        args.config,
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        agents=agents,
        token_file=args.token_file,
        log_level=args.log_level,
    )


def _force_exit(signum: int) -> None:
    # The graceful shutdown is stuck or unwanted: leave now, without running any more cleanup.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


async def serve_until_signalled(
    serve: ServeFn,
    settings: ControllerSettings,
    *,
    on_ready: Callable[[str], None] | None = None,
    force_exit: Callable[[int], None] = _force_exit,
) -> None:
    """Run `serve` until the first SIGINT/SIGTERM sets its stop event; a second one calls
    `force_exit(signum)` (by default: exit the process at once with 128 + signum)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if not stop.is_set():
            log.info("%s received: shutting down (send it again to exit at once)", name)
            stop.set()
        else:
            log.warning("%s received again: exiting without finishing the shutdown", name)
            force_exit(signum)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, int(sig))
    try:
        await serve(settings, stop, on_ready=on_ready)
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


def _print_listening(url: str) -> None:
    print(f"gpu-controller listening on {url}", flush=True)


def _report(prefix: str, error: Exception) -> None:
    # One line per problem, each prefixed, so every journal line says where it comes from.
    for line in str(error).splitlines() or [type(error).__name__]:
        print(f"{prefix}: {line}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        _report("gpu-controller: bad configuration", exc)
        return EXIT_BAD_CONFIG
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # httpx logs every request at INFO: a line per call to an agent.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    # Imported here so that `status` and configuration errors never load the service.
    from controller.daemon import serve

    try:
        asyncio.run(serve_until_signalled(serve, settings, on_ready=_print_listening))
    except ConfigError as exc:
        _report("gpu-controller: bad configuration", exc)
        return EXIT_BAD_CONFIG
    except (ServiceError, OSError) as exc:
        _report("gpu-controller", exc)
        return 1
    return 0


def _status(args: argparse.Namespace) -> int:
    from controller.status_view import fetch_fleet, render_fleet

    if args.token_file is not None:
        try:
            token: str | None = read_token_file(args.token_file).get_secret_value()
        except ValueError as exc:
            _report("gpu-controller status", exc)
            return 1
    else:
        token = os.environ.get(TOKEN_ENV, "").strip() or None
    try:
        fleet = fetch_fleet(args.url, token=token, timeout_s=args.timeout)
    except ServiceError as exc:
        _report("gpu-controller status", exc)
        return 1
    if args.json:
        print(fleet.model_dump_json(indent=2))
    else:
        render_fleet(fleet)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The `gpu-controller` command; returns the process exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    if args.command == "run":
        # A Ctrl+C before the signal handlers are installed (during start-up) is a clean stop.
        with contextlib.suppress(KeyboardInterrupt):
            return _run(args)
        return 0
    if args.command == "status":
        return _status(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
