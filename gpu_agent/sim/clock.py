"""Simulated time for the simulated desktop, read from the one clock (`gpu_common.clock`).

Everything the emulators model (load times, decode speed, diffusion steps, keep-alive expiry) is
expressed in simulated seconds: `speed` simulated seconds pass per second of the running loop.

- In process, on a `VirtualTimeLoop`, the loop's seconds are virtual and `speed` is 1: simulated
  time is the loop's time, shared with the agent and the controller, and costs only CPU work.
- The standalone `gpu-agent sim --speed S` runs on a real loop, so real clients can talk to it;
  there `speed` compresses a 40 s SDXL job into 40 / S real seconds.

The origin, and the loop whose clock it follows, are taken at the first reading, so make the
first reading inside the loop that runs the desktop. Later readings may come from any thread:
the agent's telemetry reads the simulated GPU on a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta

from gpu_common import clock


class SimClock:
    """Simulated seconds: the running loop's seconds times `speed`, from the first reading."""

    def __init__(self, speed: float = 1.0, *, wall_epoch: datetime | None = None) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be positive, got {speed}")
        self.speed = float(speed)
        self._origin_s = 0.0
        self._wall_origin = wall_epoch
        self._source: Callable[[], float] | None = None

    def _loop_time(self) -> float:
        if self._source is None:
            self._source = clock.loop_clock()
            self._origin_s = self._source()
            if self._wall_origin is None:
                self._wall_origin = clock.utc_now()
        return self._source()

    def now(self) -> float:
        """Simulated seconds since the clock's first reading."""
        return (self._loop_time() - self._origin_s) * self.speed

    def wall(self) -> datetime:
        """Simulated wall-clock time (UTC), for timestamps on the wire."""
        now = self.now()
        assert self._wall_origin is not None  # set by the first reading
        return self._wall_origin + timedelta(seconds=now)

    def wall_ms(self) -> int:
        """Simulated wall-clock time in integer milliseconds, as ComfyUI stamps its events."""
        return int(self.wall().timestamp() * 1000)

    def to_real(self, sim_s: float) -> float:
        """How many of the loop's seconds `sim_s` simulated seconds take."""
        return max(0.0, sim_s) / self.speed

    async def sleep(self, sim_s: float) -> None:
        """Sleep for `sim_s` simulated seconds."""
        await asyncio.sleep(self.to_real(sim_s))

    async def sleep_until(self, sim_t: float) -> None:
        """Sleep until simulated time `sim_t`; returns at once if it has passed."""
        remaining = sim_t - self.now()
        if remaining > 0:
            await asyncio.sleep(remaining / self.speed)
