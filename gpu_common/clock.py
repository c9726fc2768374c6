"""The one place where the agent, the controller and the simulator read time.

Every duration, deadline and timestamp in `gpu_agent` and `controller` comes from here:

- `monotonic_s()` is the running event loop's clock (`loop.time()`); with no loop running it is
  `time.monotonic()`, which is what a standard asyncio loop reads anyway, so both have one origin.
- `utc_now()` is the wall clock for timestamps on the wire. On a `VirtualTimeLoop` it is the
  loop's fixed epoch plus its virtual seconds, so every timestamp agrees with every duration.
- `perf_s()` is real elapsed time, for the one question virtual time cannot answer: how long a
  run took on this machine (the demo's closing line, benchmarks of real overhead); `cpu_s()`
  is the CPU time it took.

A test walks the packages and fails on any other read of `time.monotonic`, `time.time` or
`datetime.now`, the way the core-purity test guards the policy core.

`VirtualTimeLoop` (in `gpu_common.virtual_time`) makes the in-process simulated stack run on
virtual time: its clock only moves when every task is waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable


@runtime_checkable
class HasWallEpoch(Protocol):
    """A loop whose `time()` is seconds since a known wall-clock instant (virtual time)."""

    wall_epoch: datetime

    def time(self) -> float:
        """Seconds on the loop's clock; `wall_epoch` is the wall-clock instant of 0."""
        ...


# httpx's default: an idle pooled connection is closed after this long.
HTTP_KEEPALIVE_S = 5.0


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


def loop_clock() -> Callable[[], float]:
    """The running loop's clock as a function that any thread may call later.

    `monotonic_s()` finds the loop of the calling thread; a worker thread (the NVML sampler's,
    reading a simulated GPU) has none, and would read the process clock instead of virtual time.
    With no loop running this is `time.monotonic`.
    """
    loop = _running_loop()
    return time.monotonic if loop is None else loop.time


def utc_now() -> datetime:
    """Wall-clock time (UTC) for timestamps on the wire; derived from virtual time when virtual."""
    loop = _running_loop()
    if isinstance(loop, HasWallEpoch):
        return loop.wall_epoch + timedelta(seconds=loop.time())
    return datetime.now(UTC)


def perf_s() -> float:
    """Real seconds from an arbitrary origin, for reporting how long a run took on this machine.

    Never use it for a deadline or a policy decision: those follow `monotonic_s()`.
    """
    return time.perf_counter()


def cpu_s() -> float:
    """CPU seconds this process has used, for reporting what a run cost on this machine (a
    busy machine stretches its wall time, not this)."""
    return time.process_time()


def http_keepalive_expiry_s() -> float | None:
    """How long an httpx client may keep an idle connection for reuse.

    httpx times keep-alive on the process clock, which virtual time cannot steer: on a
    virtual-time loop a connection would expire after some real seconds, at a different point
    of every run. There it is kept until the server closes it (httpx checks before reuse), so a
    run replays identically. Create clients inside the loop that uses them.
    """
    return None if isinstance(_running_loop(), HasWallEpoch) else HTTP_KEEPALIVE_S
