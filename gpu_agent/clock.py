"""The one place where the agent, the controller and the simulator read time.

Every duration, deadline and timestamp in `gpu_agent` and `controller` comes from here:

- `monotonic_s()` is the running event loop's clock (`loop.time()`); with no loop running it is
  `time.monotonic()`, which is what a standard asyncio loop reads anyway, so both have one origin.
- `utc_now()` is the wall clock for timestamps on the wire. On a `VirtualTimeLoop` it is the
  loop's fixed epoch plus its virtual seconds, so every timestamp agrees with every duration.
- `perf_s()` is real elapsed time, for the one question virtual time cannot answer: how long a
  run took on this machine (the demo's closing line, benchmarks of real overhead).

A test walks the packages and fails on any other read of `time.monotonic`, `time.time` or
`datetime.now`, the way the core-purity test guards the policy core.

`VirtualTimeLoop` (in `gpu_agent.virtual_time`) makes the in-process simulated stack run on
virtual time: its clock only moves when every task is waiting.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable


@runtime_checkable
class HasWallEpoch(Protocol):
    """A loop whose `time()` is seconds since a known wall-clock instant (virtual time)."""

    wall_epoch: datetime

    def time(self) -> float: ...


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def monotonic_s() -> float:
    """Seconds on the running loop's clock (virtual on a `VirtualTimeLoop`).

    Outside a running loop this is `time.monotonic()`, the same clock a standard loop reads.
    """
    loop = _running_loop()
    if loop is None:
        return time.monotonic()
    return loop.time()


def utc_now() -> datetime:
    """Wall-clock time (UTC) for timestamps on the wire; derived from virtual time when virtual."""
    loop = _running_loop()
    if isinstance(loop, HasWallEpoch):
        return loop.wall_epoch + timedelta(seconds=loop.time())
    return datetime.now(UTC)


def wall_s() -> float:
    """`utc_now()` as seconds since the Unix epoch."""
    return utc_now().timestamp()


def perf_s() -> float:
    """Real seconds from an arbitrary origin, for reporting how long a run took on this machine.

    Never use it for a deadline or a policy decision: those follow `monotonic_s()`.
    """
    return time.perf_counter()


async def sleep_until(deadline_s: float) -> None:
    """Sleep until `monotonic_s()` reaches `deadline_s`; returns at once if it has passed."""
    remaining = deadline_s - monotonic_s()
    if remaining > 0:
        await asyncio.sleep(remaining)
