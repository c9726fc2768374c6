"""Virtual time for asyncio: an event loop whose clock moves only when every task is waiting.

The simulated desktop, the agent and the controller can run together in one process over real
loopback sockets on this loop. When nothing is ready to run and no socket has data, the loop
jumps its clock straight to the next timer instead of sleeping, so a simulated hour costs only
the CPU work done in it, and every duration it reports is the same however busy the machine is.

Rules that keep the jump honest:
- The loop first polls every socket without waiting. Loopback data written by this thread is
  already in the peer's receive queue when `send()` returns, so a poll that finds nothing means
  nothing is in flight.
- While a job submitted with `run_in_executor` (or `asyncio.to_thread`) has not handed its
  result back to the loop, time stands still: the loop waits for it in real time. The SQLite
  store and the NVML sampler run on such threads.
- With no timer at all, the loop blocks on its sockets as any loop does.

Processes started as subprocesses, and the standalone `gpu-agent sim`, run on real time:
clients outside this process cannot share a virtual clock.

The idea is the `looptime` pattern and trio's `MockClock(autojump_threshold=0)`; written here
because neither knows about executor threads.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

T = TypeVar("T")

# Monday 09:00 UTC: a working morning, so a simulated day's timestamps read naturally.
DEFAULT_WALL_EPOCH = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
# A non-zero start, so no code can mistake the loop's first instant for "never".
DEFAULT_START_S = 1000.0
# While an executor job runs, how long one real wait lasts before the loop looks again.
EXECUTOR_POLL_S = 0.05


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """A selector that never sleeps on a timer: it asks its loop to jump the clock instead."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualTimeLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready: list[tuple[selectors.SelectorKey, int]] = super().select(0)
        if ready or (timeout is not None and timeout <= 0) or self.loop is None:
            return ready
        if self.loop.executor_jobs:
            # A thread is working for us: its result must land before time may move.
            wait_s = EXECUTOR_POLL_S if timeout is None else min(timeout, EXECUTOR_POLL_S)
            real: list[tuple[selectors.SelectorKey, int]] = super().select(wait_s)
            return real
        if timeout is None:
            blocked: list[tuple[selectors.SelectorKey, int]] = super().select(None)
            return blocked
        self.loop.advance(timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop on virtual time; see the module docstring for the rules.

    `time()` starts at `start_s`; `wall_epoch` is the wall-clock instant of `time() == 0`, so
    `gpu_agent.clock.utc_now()` gives timestamps that agree with the loop's durations.
    """

    def __init__(
        self,
        *,
        start_s: float = DEFAULT_START_S,
        wall_epoch: datetime = DEFAULT_WALL_EPOCH,
    ) -> None:
        self._virtual_s = float(start_s)
        self.wall_epoch = wall_epoch
        self.executor_jobs = 0
        self.jumps = 0
        selector = _JumpingSelector()
        super().__init__(selector)
        selector.loop = self

    def time(self) -> float:
        """Virtual seconds: they pass only when the loop jumps to its next timer."""
        return self._virtual_s

    def advance(self, seconds: float) -> None:
        """Move the clock `seconds` forward: onto the next timer, which is that far away."""
        if seconds <= 0:
            return
        target = self._virtual_s + seconds
        if self._scheduled:
            # Land exactly on the timer, so float rounding never leaves it a hair in the future.
            head_s: float = self._scheduled[0].when()
            if abs(head_s - target) < 1e-6:
                target = head_s
        self._virtual_s = max(self._virtual_s, target)
        self.jumps += 1

    def run_in_executor(  # type: ignore[override]
        self, executor: Any, func: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        """As asyncio's, but time stands still until the job's result is back on the loop."""
        future = super().run_in_executor(executor, func, *args)
        self.executor_jobs += 1
        future.add_done_callback(self._executor_job_done)
        return future

    def _executor_job_done(self, _future: asyncio.Future[Any]) -> None:
        self.executor_jobs -= 1


def run_virtual(
    main: Coroutine[Any, Any, T],
    *,
    wall_epoch: datetime = DEFAULT_WALL_EPOCH,
    debug: bool | None = None,
) -> T:
    """Run `main` to completion on a fresh `VirtualTimeLoop`, like `asyncio.run`."""

    def factory() -> VirtualTimeLoop:
        return VirtualTimeLoop(wall_epoch=wall_epoch)

    with asyncio.Runner(debug=debug, loop_factory=factory) as runner:
        return runner.run(main)
