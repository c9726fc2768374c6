"""Simulated time for the simulated desktop.

Everything the emulators model (load times, decode speed, diffusion steps, keep-alive expiry) is
expressed in simulated seconds. `speed` says how many simulated seconds pass per real second, so a
test can run a 5 s SDXL job in 0.1 s at speed 50 while every reported duration stays realistic.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta


class SimClock:
    """Monotonic simulated time, `speed` times faster than real time."""

    def __init__(self, speed: float = 1.0, *, wall_epoch: datetime | None = None) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be positive, got {speed}")
        self.speed = float(speed)
        self._real_origin = time.monotonic()
        self._wall_origin = wall_epoch or datetime.now(UTC)

    def now(self) -> float:
        """Simulated seconds since the clock was made."""
        return (time.monotonic() - self._real_origin) * self.speed

    def wall(self) -> datetime:
        """Simulated wall-clock time (UTC), for timestamps on the wire."""
        return self._wall_origin + timedelta(seconds=self.now())

    def wall_ms(self) -> int:
        """Simulated wall-clock time in integer milliseconds, as ComfyUI stamps its events."""
        return int(self.wall().timestamp() * 1000)

    def to_real(self, sim_s: float) -> float:
        """How many real seconds `sim_s` simulated seconds take."""
        return max(0.0, sim_s) / self.speed

    async def sleep(self, sim_s: float) -> None:
        """Sleep for `sim_s` simulated seconds."""
        await asyncio.sleep(self.to_real(sim_s))

    async def sleep_until(self, sim_t: float) -> None:
        """Sleep until simulated time `sim_t`; returns at once if it has passed."""
        remaining = sim_t - self.now()
        if remaining > 0:
            await asyncio.sleep(remaining / self.speed)
