"""NvmlProbe on a real NVIDIA GPU, checked against `nvidia-smi`.

Skipped where there is no GPU (see conftest.py); `GPU_TESTS=require` makes that a failure.
"""

from __future__ import annotations

import subprocess

import psutil  # type: ignore[import-untyped]
import pytest

from gpu_agent.gpu.nvml import NvmlProbe
from gpu_agent.telemetry import TelemetrySampler
from gpu_common.probe import GpuReading

pytestmark = pytest.mark.gpu

MIB = 1024**2
# memory.used moves between the NVML read and the nvidia-smi run (other processes allocate).
USED_TOLERANCE_MIB = 256
NVIDIA_SMI_TIMEOUT_S = 30.0


def nvidia_smi_gpus(fields: str) -> list[list[str]]:
    """One row per GPU of `nvidia-smi --query-gpu=<fields> --format=csv,noheader,nounits`."""
    done = subprocess.run(
        ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
        timeout=NVIDIA_SMI_TIMEOUT_S,
    )
    return [[cell.strip() for cell in line.split(",")] for line in done.stdout.splitlines() if line]


def test_reads_every_gpu_as_nvidia_smi_does(nvml_probe: NvmlProbe) -> None:
    readings = nvml_probe.read()
    rows = nvidia_smi_gpus("index,uuid,name,memory.total,memory.used")
    assert len(readings) == len(rows) >= 1
    for gpu, (index, uuid, name, total_mib, used_mib) in zip(readings, rows, strict=True):
        assert gpu.index == int(index)
        assert gpu.uuid == uuid
        assert gpu.name == name
        assert abs(gpu.memory_total_bytes / MIB - int(total_mib)) <= 1
        assert abs(gpu.memory_used_bytes / MIB - int(used_mib)) <= USED_TOLERANCE_MIB


def test_driver_version_matches_nvidia_smi(nvml_probe: NvmlProbe) -> None:
    [[version], *_] = nvidia_smi_gpus("driver_version")
    assert nvml_probe.driver_version() == version


def _check_sane(gpu: GpuReading) -> None:
    reserved = gpu.memory_reserved_bytes or 0
    # v2 splits total into reserved + used + free; v1 folds reserved into used. MiB rounding.
    parts = gpu.memory_used_bytes + gpu.memory_free_bytes + reserved
    assert abs(parts - gpu.memory_total_bytes) <= 4 * MIB
    assert 0 <= gpu.memory_used_bytes <= gpu.memory_total_bytes
    if gpu.temperature_c is not None:
        assert 0 <= gpu.temperature_c <= 120
    for percent in (gpu.utilization_gpu_percent, gpu.utilization_memory_percent):
        if percent is not None:
            assert 0 <= percent <= 100
    if gpu.power_limit_w is not None:
        assert gpu.power_limit_w > 0
        if gpu.power_w is not None:
            assert 0 <= gpu.power_w <= gpu.power_limit_w * 1.2


def test_fields_are_sane(nvml_probe: NvmlProbe) -> None:
    for gpu in nvml_probe.read():
        _check_sane(gpu)


def test_processes_are_live_host_processes(nvml_probe: NvmlProbe) -> None:
    first = nvml_probe.read()
    vanished = {p.pid for gpu in first for p in gpu.processes if not psutil.pid_exists(p.pid)}
    if vanished:
        # A process may exit between the read and the check; then NVML must stop listing it.
        again = {p.pid for gpu in nvml_probe.read() for p in gpu.processes}
        assert not (vanished & again)
    for gpu in first:
        for proc in gpu.processes:
            assert proc.used_bytes is None or 0 <= proc.used_bytes <= gpu.memory_total_bytes


def test_close_then_a_new_probe_reads_again() -> None:
    first = NvmlProbe()
    count = len(first.read())
    first.close()
    first.close()
    second = NvmlProbe()
    try:
        assert len(second.read()) == count
    finally:
        second.close()


async def test_sampler_reports_ok_on_the_real_gpu() -> None:
    sampler = TelemetrySampler(NvmlProbe, interval_s=0.05)
    try:
        await sampler.start()
        first = sampler.latest
        assert first is not None
        assert first.status == "ok", first.reason
        assert first.backend == "nvml"
        snapshot = await sampler.wait_for(first.seq, timeout_s=5.0)
        assert snapshot.status == "ok"
        assert len(snapshot.memory_by_owner) == len(snapshot.gpus) >= 1
        for gpu, by_owner in zip(snapshot.gpus, snapshot.memory_by_owner, strict=True):
            _check_sane(gpu)
            # Process allocations are part of what is not free (MiB rounding per process).
            not_free = gpu.memory_total_bytes - gpu.memory_free_bytes
            assert sum(by_owner.values()) <= not_free + len(gpu.processes) * MIB
    finally:
        await sampler.stop()
