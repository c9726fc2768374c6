"""Waiting on conditions in tests: a deadline on the loop's clock, never a fixed sleep.

On the virtual-time loop a poll costs no real time, and the deadline is in simulated seconds,
so a slow machine cannot make a wait fail.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from gpu_common import clock


async def wait_until(
    condition: Callable[..., Any],
    *,
    timeout_s: float = 60.0,
    poll_s: float = 0.01,
    what: str = "condition",
) -> Any:
    """Return the first truthy result of `condition()` (plain or awaitable); fail the test
    after `timeout_s` seconds of the loop's clock."""
    deadline = clock.monotonic_s() + timeout_s
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if clock.monotonic_s() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(poll_s)


FINAL_JOB_STATES = frozenset({"succeeded", "failed", "cancelled"})


async def wait_all_final(
    job: Callable[[str], Awaitable[dict[str, Any]]],
    job_ids: list[str],
    *,
    timeout_s: float = 120.0,
    poll_s: float = 0.1,
) -> dict[str, dict[str, Any]]:
    """Every job (read with `job(job_id)`) once all of them are in a final state."""

    async def all_final() -> dict[str, dict[str, Any]] | None:
        jobs = {job_id: await job(job_id) for job_id in job_ids}
        return jobs if all(j["state"] in FINAL_JOB_STATES for j in jobs.values()) else None

    result: dict[str, dict[str, Any]] = await wait_until(
        all_final, timeout_s=timeout_s, poll_s=poll_s, what="every job to end"
    )
    return result
