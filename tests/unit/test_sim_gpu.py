"""The simulated GPU's ledger and activity model."""

from __future__ import annotations

import asyncio

import pytest

from gpu_agent.sim.clock import SimClock
from gpu_agent.sim.errors import SimOutOfMemory
from gpu_agent.sim.gpu import MIB, SimGpu, SimGpuProbe
from gpu_common.errors import ProbeError


@pytest.fixture
def gpu() -> SimGpu:
    return SimGpu(SimClock())


def test_reports_the_4070_super_as_nvml_does(gpu: SimGpu) -> None:
    reading = gpu.reading()
    assert reading.name == "NVIDIA GeForce RTX 4070 SUPER"
    assert reading.memory_total_bytes == 12282 * MIB
    assert reading.memory_used_bytes == 0
    assert reading.memory_free_bytes == reading.memory_total_bytes
    assert reading.power_limit_w == 220.0
    assert reading.power_w == 7.0
    assert reading.processes == ()


def test_allocations_are_per_process_and_bounded(gpu: SimGpu) -> None:
    gpu.attach(10, "ollama", ("ollama", "runner"))
    gpu.attach(20, "python3", ("python3", "main.py"))
    gpu.allocate(10, 10_000 * MIB)
    with pytest.raises(SimOutOfMemory) as info:
        gpu.allocate(20, 3000 * MIB)
    assert info.value.free_bytes == 2282 * MIB
    gpu.allocate(20, 2000 * MIB)
    reading = gpu.reading()
    assert {p.pid: p.used_bytes for p in reading.processes} == {10: 10_000 * MIB, 20: 2000 * MIB}
    assert reading.memory_used_bytes == 12_000 * MIB
    gpu.detach(10)
    assert gpu.used_bytes() == 2000 * MIB
    assert gpu.process_bytes(10) == 0


def test_set_allocation_shrinks_and_grows_within_free(gpu: SimGpu) -> None:
    gpu.attach(1, "p", ("p",))
    gpu.set_allocation(1, 5000 * MIB)
    gpu.set_allocation(1, 1000 * MIB)
    assert gpu.process_bytes(1) == 1000 * MIB
    with pytest.raises(SimOutOfMemory):
        gpu.set_allocation(1, 13_000 * MIB)
    assert gpu.process_bytes(1) == 1000 * MIB


def test_unattached_process_cannot_allocate(gpu: SimGpu) -> None:
    with pytest.raises(KeyError):
        gpu.allocate(99, 1)


async def test_work_raises_utilisation_power_and_temperature() -> None:
    # On the virtual-time loop each sleep is exactly that many simulated seconds, at no cost.
    gpu = SimGpu(SimClock())
    await asyncio.sleep(10.0)
    idle = gpu.reading()
    await asyncio.sleep(10.0)
    with gpu.working("diffusion"):
        assert gpu.contention() == 1
        with gpu.working("decode"):
            assert gpu.contention() == 2
        await asyncio.sleep(30.0)
        partly_busy = gpu.reading()  # 30 busy seconds of the 40 since the idle reading
        await asyncio.sleep(20.0)
        busy = gpu.reading()  # the whole period since the previous reading was busy
    assert idle.utilization_gpu_percent == 0
    assert idle.power_w == 7.0
    assert partly_busy.utilization_gpu_percent == 75
    assert busy.utilization_gpu_percent == 100
    assert busy.power_w == 210.0
    assert busy.temperature_c is not None
    assert idle.temperature_c is not None
    assert busy.temperature_c > idle.temperature_c  # 50 s at 210 W warms the card
    after = gpu.reading()
    assert after.power_w == 7.0


def test_resident_compute_memory_draws_more_than_the_desktop(gpu: SimGpu) -> None:
    gpu.attach(1, "Xorg", ("Xorg",), compute=False)
    gpu.allocate(1, 400 * MIB)
    assert gpu.reading().power_w == 7.0
    gpu.attach(2, "ollama", ("ollama", "runner"))
    gpu.allocate(2, 3000 * MIB)
    assert gpu.reading().power_w == 34.0


def test_probe_fails_like_a_lost_driver(gpu: SimGpu) -> None:
    probe = SimGpuProbe([gpu])
    assert probe.backend == "sim"
    assert len(probe.read()) == 1
    probe.failing = True
    with pytest.raises(ProbeError):
        probe.read()


async def test_clock_reads_the_loop_from_its_first_reading() -> None:
    await asyncio.sleep(100.0)
    clock, fast = SimClock(), SimClock(speed=50)
    assert clock.now() == fast.now() == 0.0
    await asyncio.sleep(2.0)
    assert clock.now() == pytest.approx(2.0)
    assert fast.now() == pytest.approx(100.0)


def test_clock_runs_faster_than_real_time() -> None:
    clock = SimClock(speed=50)
    assert clock.to_real(5.0) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="positive"):
        SimClock(speed=0)
