"""A restartable aiohttp server on loopback, for the emulators.

`stop()` closes the listening socket and every connection, as a process exit would; `start()` binds
the same port again, so clients see a real outage and a real comeback.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web


class LoopbackServer:
    """Serves the application that `app_factory` makes, on `host:port` (port 0 = any free)."""

    def __init__(
        self,
        app_factory: Callable[[], web.Application],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        shutdown_timeout_s: float = 0.5,
    ) -> None:
        self._app_factory = app_factory
        self.host = host
        self.port = port
        self._shutdown_timeout_s = shutdown_timeout_s
        self._runner: web.AppRunner | None = None

    @property
    def running(self) -> bool:
        return self._runner is not None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        """Bind and serve (no-op when running); after the first start `port` is the bound one."""
        if self._runner is not None:
            return
        runner = web.AppRunner(
            self._app_factory(),
            access_log=None,
            shutdown_timeout=self._shutdown_timeout_s,
            handle_signals=False,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        if self.port == 0:
            self.port = int(runner.addresses[0][1])
        self._runner = runner

    async def stop(self) -> None:
        """Close the socket and every open connection; `start()` binds the same port again."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
