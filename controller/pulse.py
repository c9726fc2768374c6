"""A wake-up signal for the controller's loops (imperative shell)."""

from __future__ import annotations

import asyncio
import contextlib


class Pulse:
    """Wakes every waiter when something changed (a snapshot, a finished request or job)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        """Wake everyone waiting now; later waiters wait for the next `fire()`."""
        self._event.set()
        self._event = asyncio.Event()

    def mark(self) -> asyncio.Event:
        """The event the next `fire()` sets: take it before reading state, wait on it after,
        and no change in between is missed."""
        return self._event

    async def wait(self, timeout_s: float, mark: asyncio.Event | None = None) -> None:
        """Return at the next `fire()` after `mark` was taken (or after now without one), or
        after `timeout_s`, whichever comes first."""
        event = mark if mark is not None else self._event
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await event.wait()
