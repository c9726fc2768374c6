"""The virtual-time loop: time moves only when every task waits, never past unfinished work."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta

import pytest

from gpu_agent.sim.clock import SimClock
from gpu_common import clock
from gpu_common.virtual_time import (
    DEFAULT_START_S,
    DEFAULT_WALL_EPOCH,
    VirtualTimeLoop,
    run_virtual,
)


def test_an_hour_of_sleeping_costs_no_real_time_and_lands_exactly() -> None:
    async def main() -> tuple[float, float, float]:
        start = clock.monotonic_s()
        await asyncio.sleep(3600)
        slept = clock.monotonic_s() - start
        await asyncio.sleep(0.1)
        return start, slept, clock.monotonic_s() - start

    start, slept, after = run_virtual(main())
    assert start == DEFAULT_START_S
    assert slept == 3600.0
    assert after == pytest.approx(3600.1, abs=1e-9)


def test_timers_fire_in_order_at_their_own_instants() -> None:
    async def main() -> list[tuple[str, float]]:
        fired: list[tuple[str, float]] = []
        t0 = clock.monotonic_s()

        async def at(name: str, delay_s: float) -> None:
            await asyncio.sleep(delay_s)
            fired.append((name, clock.monotonic_s() - t0))

        await asyncio.gather(at("c", 30), at("a", 0.5), at("b", 7.25))
        return fired

    assert run_virtual(main()) == [("a", 0.5), ("b", 7.25), ("c", 30.0)]


def test_wall_clock_derives_from_the_same_origin() -> None:
    async def main() -> tuple[float, timedelta]:
        before = clock.utc_now()
        await asyncio.sleep(90)
        return clock.monotonic_s(), clock.utc_now() - before

    now_s, wall_passed = run_virtual(main())
    assert wall_passed == timedelta(seconds=90)
    assert DEFAULT_WALL_EPOCH + timedelta(seconds=now_s) > DEFAULT_WALL_EPOCH


def test_time_stands_still_while_an_executor_job_runs() -> None:
    release = threading.Event()

    async def main() -> tuple[float, float, bool]:
        t0 = clock.monotonic_s()
        timer = asyncio.create_task(asyncio.sleep(100))
        job = asyncio.get_running_loop().run_in_executor(None, release.wait, 30)
        # The job blocks on a real event: a loop that jumped would reach the 100 s timer first.
        asyncio.get_running_loop().call_soon(release.set)
        await job
        job_done_at = clock.monotonic_s() - t0
        timer_pending = not timer.done()
        await timer
        return job_done_at, clock.monotonic_s() - t0, timer_pending

    job_done_at, after_timer, timer_pending = run_virtual(main())
    assert job_done_at == 0.0
    assert timer_pending
    assert after_timer == 100.0


def test_to_thread_results_land_before_time_moves() -> None:
    def work() -> int:
        threading.Event().wait(0.05)  # real work that takes a little real time
        return 42

    async def main() -> tuple[int, float]:
        t0 = clock.monotonic_s()
        sleeper = asyncio.create_task(asyncio.sleep(1))
        result = await asyncio.to_thread(work)
        at = clock.monotonic_s() - t0
        await sleeper
        return result, at

    assert run_virtual(main()) == (42, 0.0)


def test_loopback_sockets_deliver_without_time_passing() -> None:
    async def main() -> tuple[list[bytes], float]:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        t0 = clock.monotonic_s()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # A watchdog timer far away: a loop that jumped while data was in flight would fire it.
        answers = []
        for i in range(200):
            writer.write(b"ping %d\n" % i)
            await writer.drain()
            answers.append(await asyncio.wait_for(reader.readline(), timeout=5))
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return answers, clock.monotonic_s() - t0

    answers, elapsed = run_virtual(main())
    assert answers == [b"ping %d\n" % i for i in range(200)]
    assert elapsed == 0.0


def test_sim_clock_follows_the_loop() -> None:
    async def main() -> tuple[float, float]:
        fast = SimClock(speed=4)
        real = SimClock()
        fast.now(), real.now()
        await asyncio.sleep(10)
        return fast.now(), real.now()

    assert run_virtual(main()) == (40.0, 10.0)


async def test_the_suite_runs_on_virtual_time() -> None:
    assert isinstance(asyncio.get_running_loop(), VirtualTimeLoop)


@pytest.mark.real_time
async def test_real_time_tests_get_a_standard_loop() -> None:
    assert not isinstance(asyncio.get_running_loop(), VirtualTimeLoop)


def test_a_large_transfer_lands_before_time_moves() -> None:
    payload = bytes(range(256)) * (16 * 1024)  # 4 MiB: the kernel splits and paces it

    async def main() -> tuple[bool, float]:
        async def send(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(payload)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(send, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        t0 = clock.monotonic_s()
        ticks = asyncio.create_task(asyncio.sleep(0.001))  # a timer a jump would reach at once
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        received = await asyncio.wait_for(reader.readexactly(len(payload)), timeout=5)
        elapsed = clock.monotonic_s() - t0
        writer.close()
        await ticks
        server.close()
        await server.wait_closed()
        return received == payload, elapsed

    intact, elapsed = run_virtual(main())
    assert intact
    assert elapsed == 0.0


def test_the_same_program_replays_the_same_interleaving() -> None:
    async def main() -> list[str]:
        order: list[str] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            line = await reader.readline()
            await asyncio.to_thread(sum, range(1000))
            writer.write(line)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        async def client(name: str, delay_s: float) -> None:
            await asyncio.sleep(delay_s)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(name.encode() + b"\n")
            order.append(f"{name} sent at {clock.monotonic_s():.3f}")
            order.append(f"{name} got {(await reader.readline()).strip().decode()}")
            writer.close()

        await asyncio.gather(*(client(f"c{i}", (i % 3) * 0.5) for i in range(12)))
        server.close()
        await server.wait_closed()
        return order

    first = run_virtual(main())
    assert len(first) == 24
    assert run_virtual(main()) == first
