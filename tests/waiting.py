"""Waiting on conditions in tests: a deadline, never a fixed sleep."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


async def wait_until(
    condition: Callable[..., Any],
    *,
    timeout_s: float = 5.0,
    poll_s: float = 0.005,
    what: str = "condition",
) -> Any:
    """Return the first truthy result of `condition()` (plain or awaitable); fail the test
    after `timeout_s` real seconds."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(poll_s)
