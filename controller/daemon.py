"""The controller's lifecycle (imperative shell): store, engine, HTTP server; graceful stop.

Order on start: the job store (unfinished jobs and learned values) -> agent links and the
schedulers -> the HTTP server. On stop the server stops accepting first, then the engine, then
the store, so nothing accepted is left half-written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from controller.api import create_app
from controller.engine import Engine
from controller.settings import ControllerSettings
from controller.store import AsyncJobStore

log = logging.getLogger(__name__)

STORE_FILE = "jobs.sqlite3"


@dataclass
class RunningController:
    """A started controller: its engine, and the URL its HTTP server listens on."""

    engine: Engine
    url: str
    _crash: Callable[[], Awaitable[None]] | None = field(default=None, repr=False)

    async def crash(self) -> None:
        """Die on the spot, as after SIGKILL, for crash drills in one process: the store takes
        no further write (pending learned values are lost), every open connection is cut and
        the requests on it abandoned, and the engine's tasks end without a clean shutdown. A
        new controller may then be started on the same data folder; leaving the
        `running_controller` block afterwards does nothing more."""
        if self._crash is not None:
            crash, self._crash = self._crash, None
            await crash()


@contextlib.asynccontextmanager
async def running_controller(
    settings: ControllerSettings, *, rng: random.Random | None = None
) -> AsyncIterator[RunningController]:
    """Start the whole controller; stop it on exit. `rng` draws the jitter of the agent links'
    reconnects (a seeded one replays a simulated run exactly)."""
    crashed = False

    def unless_crashed(stop: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        async def stop_unless_crashed() -> None:
            if not crashed:
                await stop()

        return stop_unless_crashed

    async with contextlib.AsyncExitStack() as stack:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = AsyncJobStore(settings.data_dir / STORE_FILE)
        await store.ready()
        stack.push_async_callback(unless_crashed(store.close))
        engine = Engine(settings, store, rng=rng)
        await engine.start()
        stack.push_async_callback(unless_crashed(engine.stop))
        app = create_app(
            engine, token=settings.effective_token(), max_body_bytes=settings.max_body_bytes
        )
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
        await runner.setup()
        stack.push_async_callback(unless_crashed(runner.cleanup))
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
        log.info("controller listening on %s with %d agent(s)", url, len(engine.links))

        async def crash() -> None:
            nonlocal crashed
            crashed = True
            log.warning("controller crashing on purpose: no clean shutdown")
            # First the store, so nothing the dying tasks still try is written.
            await store.abandon()
            await _cut_connections(runner)
            await engine.stop()
            # The app's own background tasks (the dashboard's history) die with the process
            # too; they hold nothing that would reach the disk in a clean shutdown.
            await runner.cleanup()

        yield RunningController(engine=engine, url=url, _crash=crash)


async def _cut_connections(runner: web.AppRunner) -> None:
    """Close the listening sockets and abort every connection, cancelling its handler, as the
    kernel does for a killed process."""
    for site in list(runner.sites):
        await site.stop()
    server = runner.server
    if server is None:
        return
    server.handler_cancellation = True
    for connection in server.connections:
        if connection.transport is not None:
            connection.transport.abort()
    # Let the aborted connections' handlers see their cancellation before the engine goes.
    await asyncio.sleep(0)


async def serve(
    settings: ControllerSettings,
    stop: asyncio.Event,
    *,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run the controller until `stop` is set."""
    async with running_controller(settings) as controller:
        if on_ready is not None:
            on_ready(controller.url)
        await stop.wait()
        log.info("controller stopping")
