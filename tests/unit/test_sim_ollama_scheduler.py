"""The emulated Ollama's parsing, text and scheduler, without HTTP.

The scheduler runs against a real `SimGpu` at the desktop's real speed on the virtual-time loop,
so its loads and releases take simulated seconds but no real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpu_agent.sim import text
from gpu_agent.sim.catalog import GIB, Catalog, OllamaModelSpec
from gpu_agent.sim.clock import SimClock
from gpu_agent.sim.gpu import GpuSpec, SimGpu
from gpu_agent.sim.ollama_scheduler import (
    ApiError,
    OllamaScheduler,
    OllamaSimSettings,
    OllamaStats,
)
from gpu_agent.sim.ollama_wire import go_time, parse_go_duration, parse_keep_alive
from tests.waiting import wait_until

CATALOG = Catalog()
# Keep-alives far longer than the few simulated minutes a test spends loading models.
DAY_S = 86_400.0


def spec(name: str) -> OllamaModelSpec:
    found = CATALOG.ollama_model(name)
    assert found is not None
    return found


def make_scheduler(
    settings: OllamaSimSettings | None = None,
    *,
    total_bytes: int = GpuSpec().total_bytes,
) -> tuple[OllamaScheduler, SimGpu, OllamaStats]:
    clock = SimClock()
    gpu = SimGpu(clock, GpuSpec(total_bytes=total_bytes))
    stats = OllamaStats()
    scheduler = OllamaScheduler(
        clock=clock,
        gpu=gpu,
        settings=settings or OllamaSimSettings(),
        stats=stats,
        page_cache=set(),
        pids=itertools.count(12_000),
        rng=random.Random(0),
    )
    return scheduler, gpu, stats


async def load(
    scheduler: OllamaScheduler, name: str, *, keep_alive_s: float = 10 * DAY_S, num_ctx: int = 4096
) -> None:
    async with scheduler.lease(
        spec(name), num_ctx=num_ctx, num_gpu=-1, keep_alive_s=keep_alive_s, need_slot=False
    ):
        pass


# -- keep_alive and Go durations ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("300ms", 0.3),
        ("1.5h", 5400.0),
        ("2h45m30.5s", 9930.5),
        ("10µs", 1e-5),
        ("0", 0.0),
        ("-1m", -60.0),
        ("+2s", 2.0),
    ],
)
def test_go_durations(value: str, seconds: float) -> None:
    assert parse_go_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", 'time: invalid duration ""'),
        ("abc", 'time: invalid duration "abc"'),
        ("5", 'time: missing unit in duration "5"'),
        ("5x", 'time: unknown unit "x" in duration "5x"'),
        ("1h5", 'time: missing unit in duration "1h5"'),
    ],
)
def test_bad_go_durations(value: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace(".", r"\.") + "$"):
        parse_go_duration(value)


def test_keep_alive_values() -> None:
    assert parse_keep_alive(0) == 0.0
    assert parse_keep_alive(0.0) == 0.0
    assert parse_keep_alive(90) == 90.0
    assert parse_keep_alive(2.5) == 2.5
    assert parse_keep_alive("24h") == 86400.0
    assert parse_keep_alive(-1) == math.inf
    assert parse_keep_alive("-1m") == math.inf
    for bad, go_type in [(True, "bool"), ({}, "map[string]interface {}"), ([], "[]interface {}")]:
        with pytest.raises(ApiError) as error:
            parse_keep_alive(bad)
        assert (error.value.status, error.value.message) == (400, f"Unsupported type: '{go_type}'")


def test_go_time_formatting() -> None:
    moment = datetime(2026, 9, 14, 10, 21, 7, 418270, tzinfo=UTC)
    assert go_time(moment) == "2026-09-14T10:21:07.41827Z"
    assert go_time(moment.replace(microsecond=0)) == "2026-09-14T10:21:07Z"
    local = moment.astimezone(timezone(timedelta(hours=-7)))
    assert go_time(local) == "2026-09-14T03:21:07.41827-07:00"


# -- text --------------------------------------------------------------------------------------


def test_text_is_a_pure_function_of_its_key() -> None:
    a = text.pieces(text.keyed_rng(1, "m", "prompt"), 50)
    b = text.pieces(text.keyed_rng(1, "m", "prompt"), 50)
    c = text.pieces(text.keyed_rng(2, "m", "prompt"), 50)
    assert a == b
    assert a != c
    assert len(a) == 50
    # Fewer tokens from the same key give a prefix of the longer answer.
    assert text.pieces(text.keyed_rng(1, "m", "prompt"), 20) == a[:20]
    assert a[0][0].isupper()
    assert all(piece.startswith(" ") or piece in ".," for piece in a[1:])


def test_cut_at_stop() -> None:
    parts = ["Hello", " big", " world", "."]
    assert text.cut_at_stop(parts, ()) == (parts, False)
    assert text.cut_at_stop(parts, ("world",)) == (["Hello", " big", " "], True)
    # A stop sequence spanning two pieces.
    assert text.cut_at_stop(parts, ("g w",)) == (["Hello", " bi"], True)
    assert text.cut_at_stop(parts, ("Hello",)) == ([], True)
    assert text.cut_at_stop(parts, ("absent",)) == (parts, False)


def test_token_count_grows_with_text() -> None:
    assert text.count_tokens("") == 0
    assert text.count_tokens("abcd") == 1
    assert text.count_tokens("abcde") == 2


# -- scheduler ---------------------------------------------------------------------------------


async def test_eviction_order_is_shortest_keep_alive_then_name() -> None:
    # A card big enough that only OLLAMA_MAX_LOADED_MODELS forces evictions.
    scheduler, gpu, stats = make_scheduler(
        OllamaSimSettings(max_loaded_models=2), total_bytes=48 * GIB
    )
    try:
        await load(scheduler, "qwen2.5:7b", keep_alive_s=20 * DAY_S)
        await load(scheduler, "llama3.2:3b", keep_alive_s=2 * DAY_S)
        await load(scheduler, "qwen2.5:14b", keep_alive_s=10 * DAY_S)
        assert sorted(r.model for r in scheduler.runners()) == ["qwen2.5:14b", "qwen2.5:7b"]
        assert stats.evictions == 1
        # A request resets the session of a resident runner: now both have ten days.
        await load(scheduler, "qwen2.5:7b", keep_alive_s=10 * DAY_S)
        await load(scheduler, "llama3.2:3b", keep_alive_s=10 * DAY_S)
        assert sorted(r.model for r in scheduler.runners()) == ["llama3.2:3b", "qwen2.5:7b"]
        assert stats.evictions == 2
        await load(scheduler, "qwen2.5:14b", keep_alive_s=10 * DAY_S)
        # Equal sessions: the first name in order goes.
        assert sorted(r.model for r in scheduler.runners()) == ["qwen2.5:14b", "qwen2.5:7b"]
        assert stats.evictions == 3
        assert stats.loads == 5
    finally:
        await scheduler.close(release_memory=True)
    assert gpu.used_bytes() == 0


async def test_a_model_too_big_to_share_evicts_everything_idle() -> None:
    scheduler, _, stats = make_scheduler()
    try:
        await load(scheduler, "qwen2.5:7b")
        await load(scheduler, "llama3.2:3b")
        assert stats.evictions == 0
        await load(scheduler, "qwen2.5:14b")
        assert stats.evictions == 2  # 10 GiB needs more than 80 % of what either leaves free
        assert [r.model for r in scheduler.runners()] == ["qwen2.5:14b"]
    finally:
        await scheduler.close(release_memory=True)


async def test_slots_limit_concurrency_and_queue_is_bounded() -> None:
    scheduler, _, stats = make_scheduler(OllamaSimSettings(num_parallel=2, max_queue=1))
    model = spec("llama3.2:3b")
    release = asyncio.Event()
    holding = 0

    async def hold() -> None:
        nonlocal holding
        async with scheduler.lease(model, num_ctx=4096, num_gpu=-1, keep_alive_s=DAY_S):
            holding += 1
            await release.wait()

    try:
        await load(scheduler, "llama3.2:3b")
        tasks = []
        for expected_holding, expected_queued in [(1, 0), (2, 0), (2, 1)]:
            tasks.append(asyncio.create_task(hold()))
            await wait_until(
                lambda h=expected_holding, q=expected_queued: (
                    holding == h and scheduler.queued == q
                ),
                what=f"{expected_holding} running, {expected_queued} queued",
            )
        assert scheduler.runners()[0].in_flight == 3
        with pytest.raises(ApiError) as full:
            async with scheduler.lease(model, num_ctx=4096, num_gpu=-1, keep_alive_s=DAY_S):
                pass
        assert full.value.status == 503
        assert stats.rejected == 1
        release.set()
        await asyncio.gather(*tasks)
        assert holding == 3
        assert scheduler.queued == 0
        assert scheduler.runners()[0].in_flight == 0
    finally:
        await scheduler.close(release_memory=True)


async def test_cancelled_load_still_completes_and_idles() -> None:
    scheduler, gpu, stats = make_scheduler()
    try:
        task = asyncio.create_task(load(scheduler, "qwen2.5:14b", keep_alive_s=DAY_S))
        await wait_until(lambda: scheduler.runners(), what="the load to start")
        assert scheduler.runners()[0].loading
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await wait_until(lambda: stats.loads == 1, what="the load to finish")
        (runner,) = scheduler.runners()
        assert runner.in_flight == 0
        assert not runner.loading
        assert gpu.process_bytes(runner.pid) == runner.size_vram_bytes
    finally:
        await scheduler.close(release_memory=True)


async def test_reset_releases_every_runner_at_once() -> None:
    scheduler, gpu, _ = make_scheduler()
    await load(scheduler, "llama3.2:3b")
    await load(scheduler, "qwen2.5:7b")
    assert gpu.used_bytes() > 0
    await scheduler.close(release_memory=True)
    assert scheduler.runners() == []
    assert gpu.used_bytes() == 0
    assert gpu.reading().processes == ()


@contextlib.asynccontextmanager
async def running(scheduler: OllamaScheduler) -> AsyncIterator[OllamaScheduler]:
    try:
        yield scheduler
    finally:
        await scheduler.close(release_memory=True)


MODELS = [m.name for m in CATALOG.ollama_models]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(MODELS),
            st.sampled_from([2048, 4096, 8192]),
            st.sampled_from([0.0, 5.0, 300.0, math.inf]),
            st.sampled_from([-1, -1, 0]),
        ),
        min_size=1,
        max_size=8,
    ),
    other_gib=st.sampled_from([0, 2, 6]),
)
async def test_ledger_invariants(steps: list[tuple[str, int, float, int]], other_gib: int) -> None:
    """Whatever the sequence of loads, memory matches the runners and the limits hold.

    Each example runs on the test's virtual-time loop, so loads and keep-alive expiries happen
    at their real simulated times, the same on every run.
    """
    scheduler, gpu, _ = make_scheduler(OllamaSimSettings(max_loaded_models=2))
    gpu.attach(1, "comfy", ("python",))
    gpu.allocate(1, other_gib * GIB)
    async with running(scheduler):
        for name, num_ctx, keep_alive_s, num_gpu in steps:
            async with scheduler.lease(
                spec(name),
                num_ctx=num_ctx,
                num_gpu=num_gpu,
                keep_alive_s=keep_alive_s,
                need_slot=False,
            ):
                runners = scheduler.runners()
                live = [r for r in runners if not r.stopping]
                assert len(runners) <= 2
                assert [r.model for r in live].count(name) == 1
                mine = next(r for r in live if r.model == name)
                assert mine.num_ctx == num_ctx
                assert mine.size_bytes == spec(name).required_bytes(num_ctx)
                assert 0 <= mine.size_vram_bytes <= mine.size_bytes
                if num_gpu == 0:
                    assert mine.size_vram_bytes == 0
                held = sum(gpu.process_bytes(r.pid) for r in runners)
                assert held == sum(r.size_vram_bytes for r in runners)
                assert gpu.used_bytes() == held + other_gib * GIB <= gpu.total_bytes
