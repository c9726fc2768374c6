"""Fault hooks for the emulated servers: slow, hung and failing responses.

Each emulator owns one `ServerFaults`; tests flip its fields at run time and the aiohttp
middleware from `fault_middleware` obeys them on every request. Faults that belong to one protocol
(a mid-stream error line, a silent websocket) live here too and are read by that emulator.
Delays are in seconds of the loop's clock (virtual in process, real for `gpu-agent sim`): what
they exercise is the client's timeouts, which run on the same clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ErrorResponder = Callable[[int, str], web.StreamResponse]


class ServerFaults:
    """The faults one emulated server is currently showing. All off by default."""

    def __init__(self) -> None:
        self.response_delay_s = 0.0
        self.fail_status: int | None = None
        self.fail_message = "simulated failure"
        self.fail_remaining: int | None = None
        self.fail_stream_after_tokens: int | None = None
        self.websocket_silent = False
        self._released = asyncio.Event()
        self._released.set()

    @property
    def hung(self) -> bool:
        """Whether requests are held unanswered by `hang()`."""
        return not self._released.is_set()

    def hang(self) -> None:
        """Requests from now on wait, unanswered, until `unhang()`."""
        self._released.clear()

    def unhang(self) -> None:
        """Let the held requests, and every later one, proceed."""
        self._released.set()

    def fail(
        self, status: int, message: str = "simulated failure", count: int | None = None
    ) -> None:
        """Answer requests with `status` (the next `count` of them, or all until `clear()`)."""
        self.fail_status = status
        self.fail_message = message
        self.fail_remaining = count

    def clear(self) -> None:
        """Switch every fault off."""
        self.response_delay_s = 0.0
        self.fail_status = None
        self.fail_remaining = None
        self.fail_stream_after_tokens = None
        self.websocket_silent = False
        self._released.set()

    async def wait_released(self) -> None:
        """Return at once unless hung; else once `unhang()` or `clear()` lets requests through."""
        await self._released.wait()

    def take_failure(self) -> int | None:
        """The status to fail this request with, counting it down; None to serve it."""
        if self.fail_status is None:
            return None
        status = self.fail_status
        if self.fail_remaining is not None:
            self.fail_remaining -= 1
            if self.fail_remaining <= 0:
                self.fail_status = None
                self.fail_remaining = None
        return status


def fault_middleware(faults: ServerFaults, respond_error: ErrorResponder) -> Callable[..., object]:
    """An aiohttp middleware applying `faults` before the handler runs."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if faults.hung:
            await faults.wait_released()
        if faults.response_delay_s > 0:
            await asyncio.sleep(faults.response_delay_s)
        status = faults.take_failure()
        if status is not None:
            return respond_error(status, faults.fail_message)
        return await handler(request)

    return middleware
