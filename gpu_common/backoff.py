"""Reconnect backoff for long-lived links: the agent's ComfyUI websocket, the controller's agents.

Delays grow exponentially from `initial_s` by `factor` up to `max_s` (tenacity's
`wait_exponential`), and each is shortened by a random part of up to `jitter` of itself, so that
clients restarted together do not reconnect in step. The randomness comes from an injected
`random.Random`, so a seeded run replays exactly; tenacity's own jittered strategies draw from
the process-wide generator instead. Waits go through `asyncio.sleep`, so they follow the event
loop's clock (virtual in tests); nothing here reads the time.
"""

from __future__ import annotations

import asyncio
import random

from tenacity import AsyncRetrying, RetryCallState, wait_exponential
from tenacity.wait import wait_base

__all__ = ["Backoff", "JitteredWait"]


class JitteredWait(wait_base):
    """A tenacity wait strategy: `base`'s delay, less a random part of up to `jitter` of it.

    The delay lies in [base * (1 - jitter), base]; `rng` draws the part.
    """

    def __init__(self, base: wait_base, *, jitter: float, rng: random.Random) -> None:
        if not 0 <= jitter <= 1:
            raise ValueError(f"need 0 <= jitter <= 1, got {jitter}")
        self.base = base
        self.jitter = jitter
        self.rng = rng

    def __call__(self, retry_state: RetryCallState) -> float:
        return self.base(retry_state) * (1 - self.jitter * self.rng.random())


class Backoff:
    """The delays between reconnect attempts of one link, restarted when the link works again.

    `sleep()` waits the next delay on the event loop; `reset()` starts over from `initial_s`
    (call it once the link has proved itself); `retries` counts the delays since then, so a
    caller can report an outage once rather than at every attempt.
    """

    def __init__(
        self,
        initial_s: float,
        max_s: float,
        *,
        factor: float = 2.0,
        jitter: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        if initial_s <= 0 or max_s < initial_s:
            raise ValueError(f"need 0 < initial_s <= max_s, got {initial_s} and {max_s}")
        if factor < 1:
            raise ValueError(f"need factor >= 1, got {factor}")
        self._wait = JitteredWait(
            wait_exponential(multiplier=initial_s, max=max_s, exp_base=factor),
            jitter=jitter,
            rng=rng if rng is not None else random.Random(),
        )
        # Tenacity's strategies read the attempt number from a call state, and nothing else
        # of it is used here: its timestamps come from time.monotonic, not the loop's clock.
        self._retrying = AsyncRetrying(wait=self._wait)
        self._state = RetryCallState(self._retrying, None, (), {})

    @property
    def retries(self) -> int:
        """Delays handed out since the last `reset()` (or since this backoff was made)."""
        return self._state.attempt_number - 1

    def next_delay_s(self) -> float:
        """The next delay, in seconds; each call moves one step along."""
        delay = self._wait(self._state)
        self._state.prepare_for_next_attempt()
        return delay

    async def sleep(self) -> None:
        """Wait the next delay on the event loop."""
        await asyncio.sleep(self.next_delay_s())

    def reset(self) -> None:
        """Start over from `initial_s`: the link worked."""
        self._state = RetryCallState(self._retrying, None, (), {})
