"""The telemetry sampler over the simulated GPU: cadence, attribution, degraded, no GPU."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC

import pytest

from gpu_agent.host import HostReading, read_host
from gpu_agent.sim.clock import SimClock
from gpu_agent.sim.gpu import MIB, SimGpu, SimGpuProbe
from gpu_agent.telemetry import TelemetrySampler, TelemetrySnapshot
from gpu_common import clock as loop_clock
from gpu_common.errors import ProbeError
from gpu_common.probe import GpuProbe, GpuReading

GIB = 1024**3
# The agent's default cadence; on the virtual-time loop a sampled second costs no real time.
INTERVAL_S = 1.0
# Simulated seconds: a few intervals, enough for any snapshot a test waits on.
WAIT_S = 10 * INTERVAL_S
OLLAMA_PID = 2002
COMFYUI_PID = 4001
XORG_PID = 1201


class ManualClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


class ClosingProbe(SimGpuProbe):
    """The simulated probe, counting `close()` calls."""

    def __init__(self, gpus: list[SimGpu]) -> None:
        super().__init__(gpus)
        self.close_calls = 0

    def close(self) -> None:
        self.close_calls += 1


async def wait_for_status(
    sampler: TelemetrySampler, status: str, timeout_s: float = WAIT_S
) -> TelemetrySnapshot:
    """The latest or a later snapshot with `status`, waiting on the sampler's condition."""
    async with asyncio.timeout(timeout_s):
        seq = 0
        while True:
            snapshot = await sampler.wait_for(seq, timeout_s)
            if snapshot.status == status:
                return snapshot
            seq = snapshot.seq


@pytest.fixture
async def gpu() -> SimGpu:
    # Made inside the test's loop: the simulated clock's origin is on the loop's (virtual) clock.
    gpu = SimGpu(SimClock())
    gpu.attach(XORG_PID, "Xorg", ("/usr/lib/xorg/Xorg", "vt2", "-displayfd", "3"), compute=False)
    gpu.attach(OLLAMA_PID, "ollama", ("/usr/local/bin/ollama", "runner", "--model", "qwen"))
    gpu.attach(
        COMFYUI_PID, "python3", ("python3", "main.py", "--listen", "127.0.0.1", "--port", "8188")
    )
    gpu.allocate(XORG_PID, 400 * MIB)
    return gpu


@pytest.fixture
def probe(gpu: SimGpu) -> ClosingProbe:
    return ClosingProbe([gpu])


@pytest.fixture
async def sampler(probe: ClosingProbe) -> AsyncIterator[TelemetrySampler]:
    sampler = TelemetrySampler(lambda: probe, interval_s=INTERVAL_S)
    await sampler.start()
    yield sampler
    await sampler.stop()


async def test_snapshots_advance_on_the_interval(sampler: TelemetrySampler) -> None:
    first = sampler.latest
    assert first is not None
    assert first.status == "ok"
    second = await sampler.wait_for(first.seq, timeout_s=WAIT_S)
    third = await sampler.wait_for(second.seq, timeout_s=WAIT_S)
    assert first.seq < second.seq < third.seq
    # One sample per interval of the loop's clock, on a fixed cadence.
    assert second.taken_monotonic_s - first.taken_monotonic_s == pytest.approx(INTERVAL_S)
    assert third.taken_monotonic_s - second.taken_monotonic_s == pytest.approx(INTERVAL_S)
    assert third.taken_at.tzinfo is UTC
    assert (third.taken_at - first.taken_at).total_seconds() == pytest.approx(2 * INTERVAL_S)
    assert third.backend == "sim"
    assert third.driver_version == "580.126.09"
    assert third.reason is None
    [gpu] = third.gpus
    assert gpu.name == "NVIDIA GeForce RTX 4070 SUPER"
    assert gpu.memory_used_bytes == 400 * MIB
    assert third.host is not None
    assert third.host.cpu_count >= 1
    assert 0 < third.host.memory_available_bytes <= third.host.memory_total_bytes
    assert third.age_s(third.taken_monotonic_s + 1.5) == pytest.approx(1.5)
    assert third.age_s(third.taken_monotonic_s - 1.0) == 0.0


async def test_memory_by_owner_follows_allocations(sampler: TelemetrySampler, gpu: SimGpu) -> None:
    gpu.allocate(OLLAMA_PID, 5 * GIB)
    gpu.allocate(COMFYUI_PID, 3 * GIB)
    loaded = await sampler.sample_now()
    assert loaded.memory_by_owner == ({"ollama": 5 * GIB, "comfyui": 3 * GIB, "other": 400 * MIB},)
    assert loaded.gpus[0].memory_used_bytes == 8 * GIB + 400 * MIB

    # After an unload the caller takes a fresh sample to confirm the memory came back.
    gpu.release(OLLAMA_PID, 5 * GIB)
    unloaded = await sampler.sample_now()
    assert unloaded.seq > loaded.seq
    assert unloaded.memory_by_owner[0]["ollama"] == 0
    assert unloaded.gpus[0].memory_free_bytes == loaded.gpus[0].memory_free_bytes + 5 * GIB
    assert sampler.latest is not None
    assert sampler.latest.seq >= unloaded.seq


async def test_degraded_while_reads_fail_then_ok_again(
    sampler: TelemetrySampler, probe: ClosingProbe, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gpu_agent.telemetry")
    probe.failing = True
    degraded = await wait_for_status(sampler, "degraded")
    assert degraded.gpus == ()
    assert degraded.memory_by_owner == ()
    assert degraded.reason is not None
    assert "driver not loaded" in degraded.reason
    assert degraded.backend == "sim"
    assert degraded.host is not None
    # Stay degraded for a few more samples: they must not be logged again.
    await sampler.wait_for(degraded.seq + 2, timeout_s=WAIT_S)

    probe.failing = False
    recovered = await wait_for_status(sampler, "ok")
    assert recovered.reason is None
    assert recovered.gpus[0].memory_used_bytes == 400 * MIB
    degraded_logs = [r for r in caplog.records if "degraded" in r.getMessage()]
    assert len(degraded_logs) == 1
    assert degraded_logs[0].levelno == logging.WARNING


async def test_no_gpu_when_the_factory_fails_and_retries_on_schedule(gpu: SimGpu) -> None:
    clock = ManualClock()
    attempts: list[float] = []

    def factory() -> GpuProbe:
        attempts.append(clock.now_s)
        if len(attempts) < 3:
            raise ProbeError("no NVIDIA driver: libnvidia-ml.so.1 not found")
        return SimGpuProbe([gpu])

    sampler = TelemetrySampler(factory, interval_s=60.0, monotonic=clock, retry_init_s=10.0)
    try:
        await sampler.start()
        first = sampler.latest
        assert first is not None
        assert first.status == "no_gpu"
        assert first.reason == "no NVIDIA driver: libnvidia-ml.so.1 not found"
        assert first.gpus == ()
        assert first.backend is None
        assert first.host is not None  # host load is reported even without a GPU

        clock.now_s += 9.0
        assert (await sampler.sample_now()).status == "no_gpu"
        assert len(attempts) == 1  # too soon to try again

        clock.now_s += 1.0
        assert (await sampler.sample_now()).status == "no_gpu"
        assert attempts == [1000.0, 1010.0]

        clock.now_s += 10.0
        ready = await sampler.sample_now()
        assert ready.status == "ok"
        assert ready.backend == "sim"
        assert ready.memory_by_owner[0]["other"] == 400 * MIB
        assert attempts == [1000.0, 1010.0, 1020.0]
    finally:
        await sampler.stop()


async def test_wait_for_times_out_when_nothing_new_arrives(probe: ClosingProbe) -> None:
    sampler = TelemetrySampler(lambda: probe, interval_s=60.0)
    try:
        await sampler.start()
        latest = sampler.latest
        assert latest is not None
        started = loop_clock.monotonic_s()
        with pytest.raises(TimeoutError):
            await sampler.wait_for(latest.seq, timeout_s=5.0)
        # It gave up after its own timeout, not at the next sample a minute later.
        assert loop_clock.monotonic_s() - started == pytest.approx(5.0)
        # An older sequence number is answered at once.
        answered_at = loop_clock.monotonic_s()
        assert (await sampler.wait_for(latest.seq - 1, timeout_s=5.0)).seq == latest.seq
        assert loop_clock.monotonic_s() == answered_at
    finally:
        await sampler.stop()


async def test_wait_for_wakes_on_sample_now(probe: ClosingProbe) -> None:
    sampler = TelemetrySampler(lambda: probe, interval_s=60.0)
    try:
        await sampler.start()
        latest = sampler.latest
        assert latest is not None
        waiter = asyncio.create_task(sampler.wait_for(latest.seq, timeout_s=WAIT_S))
        taken = await sampler.sample_now()
        assert await waiter == taken
    finally:
        await sampler.stop()


async def test_stop_closes_the_probe_once_and_start_again_works(probe: ClosingProbe) -> None:
    sampler = TelemetrySampler(lambda: probe, interval_s=INTERVAL_S)
    await sampler.start()
    assert sampler.running
    await sampler.stop()
    await sampler.stop()
    assert not sampler.running
    assert probe.close_calls == 1

    await sampler.start()
    latest = sampler.latest
    assert latest is not None
    assert (await sampler.wait_for(latest.seq, timeout_s=WAIT_S)).status == "ok"
    await sampler.stop()
    assert probe.close_calls == 2


async def test_host_reader_failure_leaves_gpu_readings(probe: ClosingProbe) -> None:
    calls: list[int] = []

    def flaky_host() -> HostReading:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("/proc is not mounted")
        return read_host()

    sampler = TelemetrySampler(lambda: probe, interval_s=60.0, host_reader=flaky_host)
    try:
        await sampler.start()
        first = sampler.latest
        assert first is not None
        assert first.status == "ok"
        assert first.host is None
        assert first.gpus
        second = await sampler.sample_now()
        assert second.host is not None
    finally:
        await sampler.stop()


async def test_probe_calls_run_off_the_event_loop(gpu: SimGpu) -> None:
    loop_thread_reads: list[bool] = []

    class ThreadCheckingProbe(SimGpuProbe):
        def read(self) -> list[GpuReading]:
            loop_thread_reads.append(_on_loop_thread())
            return super().read()

    def _on_loop_thread() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    sampler = TelemetrySampler(lambda: ThreadCheckingProbe([gpu]), interval_s=60.0)
    try:
        await sampler.start()
        await sampler.sample_now()
    finally:
        await sampler.stop()
    assert loop_thread_reads == [False, False]
