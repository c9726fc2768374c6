"""The reconnect backoff both links use: growth, cap, jitter bounds, replay, reset, the loop."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpu_common.backoff import Backoff


def take(backoff: Backoff, count: int) -> list[float]:
    return [backoff.next_delay_s() for _ in range(count)]


def test_delays_double_up_to_the_cap_without_jitter() -> None:
    assert take(Backoff(0.5, 10.0, jitter=0.0), 8) == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


@given(
    initial_s=st.floats(0.01, 5.0),
    ratio=st.floats(1.0, 100.0),
    jitter=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32),
)
def test_delays_stay_within_bounds(
    initial_s: float, ratio: float, jitter: float, seed: int
) -> None:
    max_s = initial_s * ratio
    delays = take(Backoff(initial_s, max_s, jitter=jitter, rng=random.Random(seed)), 30)
    base = initial_s
    for delay in delays:
        assert base * (1 - jitter) - 1e-9 <= delay <= base + 1e-9
        assert delay <= max_s + 1e-9
        base = min(max_s, base * 2)


def test_default_jitter_keeps_each_delay_in_the_upper_half_of_its_step() -> None:
    delays = take(Backoff(0.2, 5.0, rng=random.Random(3)), 12)
    steps = [min(5.0, 0.2 * 2**n) for n in range(12)]
    assert all(step / 2 <= delay <= step for delay, step in zip(delays, steps, strict=True))
    assert len(set(delays)) == len(delays)


def test_jitter_spreads_delays_of_clients_that_start_together() -> None:
    firsts = {Backoff(1.0, 10.0, rng=random.Random(seed)).next_delay_s() for seed in range(20)}
    assert len(firsts) > 10


def test_a_seeded_backoff_replays_exactly() -> None:
    first = take(Backoff(0.5, 10.0, rng=random.Random(7)), 10)
    assert take(Backoff(0.5, 10.0, rng=random.Random(7)), 10) == first


def test_reset_starts_over_and_clears_the_retry_count() -> None:
    backoff = Backoff(0.5, 10.0, jitter=0.0)
    assert backoff.retries == 0
    assert take(backoff, 3) == [0.5, 1.0, 2.0]
    assert backoff.retries == 3
    backoff.reset()
    assert backoff.retries == 0
    assert backoff.next_delay_s() == 0.5


async def test_sleep_waits_the_delay_on_the_event_loop() -> None:
    # The loop is virtual: its clock moves by exactly the delays slept.
    loop = asyncio.get_running_loop()
    backoff = Backoff(0.5, 10.0, jitter=0.0)
    start = loop.time()
    await backoff.sleep()
    await backoff.sleep()
    assert loop.time() - start == pytest.approx(1.5)
    assert backoff.retries == 2


@pytest.mark.parametrize(
    ("initial_s", "max_s", "factor", "jitter"),
    [(0.0, 1.0, 2.0, 0.5), (2.0, 1.0, 2.0, 0.5), (1.0, 2.0, 0.5, 0.5), (1.0, 2.0, 2.0, 1.5)],
)
def test_delays_reject_nonsense_settings(
    initial_s: float, max_s: float, factor: float, jitter: float
) -> None:
    with pytest.raises(ValueError, match="need"):
        Backoff(initial_s, max_s, factor=factor, jitter=jitter)
