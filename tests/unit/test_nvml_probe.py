"""NvmlProbe against a fake NVML module: readings, fallbacks, the two failure tiers, recovery."""

from __future__ import annotations

import ctypes

import pynvml
import pytest

from gpu_agent.gpu.nvml import NvmlProbe
from gpu_common.errors import ProbeError
from tests.unit.fake_nvml import GIB, MIB, FakeDevice, FakeNvml, FakeProcess


def test_reads_every_field_with_memory_v2() -> None:
    fake = FakeNvml()
    probe = NvmlProbe(fake)
    [gpu] = probe.read()
    assert probe.backend == "nvml"
    assert probe.driver_version() == "580.126.09"
    assert gpu.index == 0
    assert gpu.name == "NVIDIA GeForce RTX 4070 SUPER"
    assert gpu.uuid == "GPU-00000000-1111-2222-3333-444444444444"
    assert gpu.memory_total_bytes == 12282 * MIB
    assert gpu.memory_reserved_bytes == 243 * MIB
    assert gpu.memory_used_bytes == 600 * MIB
    assert gpu.memory_free_bytes == (12282 - 243 - 600) * MIB
    assert gpu.utilization_gpu_percent == 37
    assert gpu.utilization_memory_percent == 12
    assert gpu.temperature_c == 51
    assert gpu.power_w == pytest.approx(34.512)
    assert gpu.power_limit_w == pytest.approx(220.0)
    assert gpu.processes == ()
    assert fake.memory_calls == [pynvml.nvmlMemory_v2]


@pytest.mark.parametrize(
    "v2_error",
    [pynvml.NVMLError_FunctionNotFound, pynvml.NVMLError_NotSupported, TypeError],
    ids=["old-driver", "not-supported", "old-binding"],
)
def test_falls_back_to_memory_v1_and_remembers(v2_error: type[Exception]) -> None:
    fake = FakeNvml(memory_v2_error=v2_error)
    probe = NvmlProbe(fake)
    first = probe.read()[0]
    second = probe.read()[0]
    for gpu in (first, second):
        # v1 folds the reserved memory into `used` and cannot report it apart.
        assert gpu.memory_reserved_bytes is None
        assert gpu.memory_used_bytes == (600 + 243) * MIB
        assert gpu.memory_free_bytes == (12282 - 243 - 600) * MIB
        assert gpu.memory_total_bytes == 12282 * MIB
    assert fake.memory_calls == [pynvml.nvmlMemory_v2, None, None]


@pytest.mark.parametrize(
    "error",
    [pynvml.NVMLError_NotSupported, pynvml.NVMLError_NoPermission, pynvml.NVMLError_Unknown],
)
def test_unsupported_fields_are_none(error: type[Exception]) -> None:
    device = FakeDevice()
    for function in (
        "nvmlDeviceGetUtilizationRates",
        "nvmlDeviceGetTemperature",
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetEnforcedPowerLimit",
        "nvmlDeviceGetComputeRunningProcesses",
        "nvmlDeviceGetGraphicsRunningProcesses",
    ):
        device.errors[function] = error
    [gpu] = NvmlProbe(FakeNvml([device])).read()
    assert gpu.utilization_gpu_percent is None
    assert gpu.utilization_memory_percent is None
    assert gpu.temperature_c is None
    assert gpu.power_w is None
    assert gpu.power_limit_w is None
    assert gpu.processes == ()
    assert gpu.memory_used_bytes == 600 * MIB


def test_one_unsupported_field_leaves_the_others() -> None:
    device = FakeDevice(errors={"nvmlDeviceGetPowerUsage": pynvml.NVMLError_NotSupported})
    [gpu] = NvmlProbe(FakeNvml([device])).read()
    assert gpu.power_w is None
    assert gpu.power_limit_w == pytest.approx(220.0)
    assert gpu.temperature_c == 51


def test_compute_and_graphics_processes_merge_by_pid() -> None:
    device = FakeDevice(
        compute=[FakeProcess(4001, 5 * GIB), FakeProcess(2001, None), FakeProcess(3001, 2 * GIB)],
        graphics=[FakeProcess(1201, 400 * MIB), FakeProcess(3001, 2 * GIB)],
    )
    [gpu] = NvmlProbe(FakeNvml([device])).read()
    assert [(p.pid, p.used_bytes) for p in gpu.processes] == [
        (1201, 400 * MIB),
        (2001, None),
        (3001, 2 * GIB),  # "C+G": counted once, not twice
        (4001, 5 * GIB),
    ]
    assert all(p.name is None and p.cmdline is None for p in gpu.processes)


def test_known_memory_wins_over_unavailable_for_the_same_pid() -> None:
    device = FakeDevice(compute=[FakeProcess(7, None)], graphics=[FakeProcess(7, 300 * MIB)])
    [gpu] = NvmlProbe(FakeNvml([device])).read()
    assert [(p.pid, p.used_bytes) for p in gpu.processes] == [(7, 300 * MIB)]


def test_reads_every_gpu_in_index_order() -> None:
    devices = [FakeDevice(uuid="GPU-a"), FakeDevice(name="NVIDIA GeForce RTX 3060", uuid="GPU-b")]
    gpus = NvmlProbe(FakeNvml(devices)).read()
    assert [(g.index, g.uuid, g.name) for g in gpus] == [
        (0, "GPU-a", "NVIDIA GeForce RTX 4070 SUPER"),
        (1, "GPU-b", "NVIDIA GeForce RTX 3060"),
    ]


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (pynvml.NVMLError_LibraryNotFound, "no NVIDIA driver: libnvidia-ml.so.1 not found"),
        (pynvml.NVMLError_DriverNotLoaded, "NVIDIA driver not loaded"),
        (pynvml.NVMLError_NoPermission, "no permission"),
        (pynvml.NVMLError_LibRmVersionMismatch, "versions differ"),
        (pynvml.NVMLError_Unknown, "NVML init failed: NVMLError_Unknown: Unknown Error"),
    ],
)
def test_init_failure_is_a_probe_error_with_a_reason(error: type[Exception], reason: str) -> None:
    fake = FakeNvml()
    fake.init_error = error
    with pytest.raises(ProbeError, match=reason):
        NvmlProbe(fake)


def test_gpu_lost_mid_run_then_recovers_on_next_read() -> None:
    fake = FakeNvml()
    probe = NvmlProbe(fake)
    assert probe.read()[0].memory_used_bytes == 600 * MIB

    fake.lost = True
    with pytest.raises(ProbeError, match="GpuIsLost"):
        probe.read()
    assert fake.shutdown_calls == 1
    assert not fake.initialised

    fake.lost = False
    fake.devices[0].used_bytes = 0
    [gpu] = probe.read()
    assert gpu.memory_used_bytes == 0
    assert fake.init_calls == 2


def test_lost_gpu_with_driver_still_gone_keeps_failing_until_it_returns() -> None:
    fake = FakeNvml()
    probe = NvmlProbe(fake)
    fake.lost = True
    with pytest.raises(ProbeError):
        probe.read()
    fake.init_error = pynvml.NVMLError_DriverNotLoaded
    for _ in range(2):
        with pytest.raises(ProbeError, match="driver not loaded"):
            probe.read()
    fake.lost = False
    fake.init_error = None
    assert len(probe.read()) == 1


@pytest.mark.parametrize(
    "error", [pynvml.NVMLError_Unknown, pynvml.NVMLError_Uninitialized, pynvml.NVMLError_GpuIsLost]
)
def test_device_count_failure_reinitialises(error: type[Exception]) -> None:
    fake = FakeNvml()
    probe = NvmlProbe(fake)
    fake.count_error = error
    with pytest.raises(ProbeError, match="NVML stopped answering"):
        probe.read()
    fake.count_error = None
    assert len(probe.read()) == 1
    assert fake.init_calls == 2


def test_fatal_error_in_a_field_call_is_not_hidden_as_none() -> None:
    fake = FakeNvml([FakeDevice(errors={"nvmlDeviceGetTemperature": pynvml.NVMLError_GpuIsLost})])
    probe = NvmlProbe(fake)
    with pytest.raises(ProbeError, match="GpuIsLost"):
        probe.read()
    assert not fake.initialised


def test_card_without_memory_info_fails_without_restarting_nvml() -> None:
    # Unified-memory devices answer NotSupported to both memory calls.
    fake = FakeNvml([FakeDevice(errors={"nvmlDeviceGetMemoryInfo": pynvml.NVMLError_NotSupported})])
    probe = NvmlProbe(fake)
    with pytest.raises(ProbeError, match="GPU 0: memory info unreadable"):
        probe.read()
    assert fake.initialised
    assert fake.init_calls == 1


def test_close_shuts_nvml_down_once() -> None:
    fake = FakeNvml()
    probe = NvmlProbe(fake)
    probe.read()
    probe.close()
    probe.close()
    assert fake.shutdown_calls == 1
    assert not fake.initialised
    with pytest.raises(ProbeError, match="closed"):
        probe.read()


def test_close_after_a_loss_does_not_shut_down_twice() -> None:
    fake = FakeNvml()
    probe = NvmlProbe(fake)
    fake.lost = True
    with pytest.raises(ProbeError):
        probe.read()
    probe.close()
    assert fake.shutdown_calls == 1


def _nvml_library_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def test_real_binding_without_the_library_explains_itself() -> None:
    if _nvml_library_present():
        pytest.skip("libnvidia-ml.so.1 is present; tests/gpu covers the real library")
    with pytest.raises(ProbeError, match=r"^no NVIDIA driver: libnvidia-ml\.so\.1 not found$"):
        NvmlProbe()
