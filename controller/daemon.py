"""The controller's lifecycle (imperative shell): store, engine, HTTP server; graceful stop.

Order on start: the job store (unfinished jobs and learned values) -> agent links and the
schedulers -> the HTTP server. On stop the server stops accepting first, then the engine, then
the store, so nothing accepted is left half-written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

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


@contextlib.asynccontextmanager
async def running_controller(settings: ControllerSettings) -> AsyncIterator[RunningController]:
    """Start the whole controller; stop it on exit."""
    async with contextlib.AsyncExitStack() as stack:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = AsyncJobStore(settings.data_dir / STORE_FILE)
        await store.ready()
        stack.push_async_callback(store.close)
        engine = Engine(settings, store)
        await engine.start()
        stack.push_async_callback(engine.stop)
        app = create_app(
            engine, token=settings.effective_token(), max_body_bytes=settings.max_body_bytes
        )
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
        log.info("controller listening on %s with %d agent(s)", url, len(engine.links))
        yield RunningController(engine=engine, url=url)


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
