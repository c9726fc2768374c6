"""A fake NVML binding module for `NvmlProbe` tests.

It carries the real `pynvml` error classes and constants (importing the binding needs no driver),
and answers the calls `NvmlProbe` makes from devices held in memory. Like the C library it refuses
device calls before `nvmlInit` and after `nvmlShutdown`, and a lost GPU fails every device call
with `NVMLError_GpuIsLost` until it comes back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pynvml

MIB = 1024**2
GIB = 1024**3


@dataclass(slots=True)
class FakeProcess:
    """One entry of `nvmlDeviceGet{Compute,Graphics}RunningProcesses` (v3 struct fields)."""

    pid: int
    usedGpuMemory: int | None
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


@dataclass(slots=True)
class FakeMemoryV1:
    total: int
    free: int
    used: int


@dataclass(slots=True)
class FakeMemoryV2:
    version: int
    total: int
    reserved: int
    free: int
    used: int


@dataclass(slots=True)
class FakeUtilization:
    gpu: int
    memory: int


@dataclass
class FakeDevice:
    """One card. `errors` maps a binding function name to the error class it raises."""

    name: str = "NVIDIA GeForce RTX 4070 SUPER"
    uuid: str = "GPU-00000000-1111-2222-3333-444444444444"
    total_bytes: int = 12282 * MIB
    reserved_bytes: int = 243 * MIB
    used_bytes: int = 600 * MIB
    utilization_gpu: int = 37
    utilization_memory: int = 12
    temperature_c: int = 51
    power_mw: int = 34_512
    power_limit_mw: int = 220_000
    compute: list[FakeProcess] = field(default_factory=list)
    graphics: list[FakeProcess] = field(default_factory=list)
    errors: dict[str, type[Exception]] = field(default_factory=dict)


class FakeNvml:
    """Stands in for the `pynvml` module. Counts init/shutdown and memory-info calls."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    nvmlMemory_v2 = pynvml.nvmlMemory_v2

    def __init__(
        self,
        devices: list[FakeDevice] | None = None,
        *,
        driver_version: str = "580.126.09",
        memory_v2_error: type[Exception] | None = None,
    ) -> None:
        # Every NVMLError_* class of the real binding, so the probe sees the real hierarchy.
        for name in dir(pynvml):
            if name.startswith("NVMLError_"):
                setattr(self, name, getattr(pynvml, name))
        self.devices = devices if devices is not None else [FakeDevice()]
        self.driver_version = driver_version
        # Raised by memory info v2 (FunctionNotFound: an older driver; TypeError: older binding).
        self.memory_v2_error = memory_v2_error
        self.init_error: type[Exception] | None = None
        self.count_error: type[Exception] | None = None
        self.lost = False
        self.initialised = False
        self.init_calls = 0
        self.shutdown_calls = 0
        self.memory_calls: list[int | None] = []

    # -- library lifecycle -----------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error()
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1
        if not self.initialised:
            raise pynvml.NVMLError_Uninitialized()
        self.initialised = False

    def nvmlSystemGetDriverVersion(self) -> str:
        self._require_init()
        return self.driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._require_init()
        if self.count_error is not None:
            raise self.count_error()
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        self._require_init()
        if self.lost:
            raise pynvml.NVMLError_GpuIsLost()
        return self.devices[index]

    # -- device calls ----------------------------------------------------------------------

    def nvmlDeviceGetName(self, handle: FakeDevice) -> str:
        self._device_call(handle, "nvmlDeviceGetName")
        return handle.name

    def nvmlDeviceGetUUID(self, handle: FakeDevice) -> str:
        self._device_call(handle, "nvmlDeviceGetUUID")
        return handle.uuid

    def nvmlDeviceGetMemoryInfo(
        self, handle: FakeDevice, version: int | None = None
    ) -> FakeMemoryV1 | FakeMemoryV2:
        self.memory_calls.append(version)
        self._device_call(handle, "nvmlDeviceGetMemoryInfo")
        free = handle.total_bytes - handle.reserved_bytes - handle.used_bytes
        if version is None:
            # v1 counts the driver's reserved memory as used.
            return FakeMemoryV1(handle.total_bytes, free, handle.used_bytes + handle.reserved_bytes)
        if self.memory_v2_error is not None:
            raise self.memory_v2_error()
        return FakeMemoryV2(
            version, handle.total_bytes, handle.reserved_bytes, free, handle.used_bytes
        )

    def nvmlDeviceGetUtilizationRates(self, handle: FakeDevice) -> FakeUtilization:
        self._device_call(handle, "nvmlDeviceGetUtilizationRates")
        return FakeUtilization(handle.utilization_gpu, handle.utilization_memory)

    def nvmlDeviceGetTemperature(self, handle: FakeDevice, sensor: int) -> int:
        self._device_call(handle, "nvmlDeviceGetTemperature")
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise pynvml.NVMLError_InvalidArgument()
        return handle.temperature_c

    def nvmlDeviceGetPowerUsage(self, handle: FakeDevice) -> int:
        self._device_call(handle, "nvmlDeviceGetPowerUsage")
        return handle.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeDevice) -> int:
        self._device_call(handle, "nvmlDeviceGetEnforcedPowerLimit")
        return handle.power_limit_mw

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeDevice) -> list[FakeProcess]:
        self._device_call(handle, "nvmlDeviceGetComputeRunningProcesses")
        return list(handle.compute)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: FakeDevice) -> list[FakeProcess]:
        self._device_call(handle, "nvmlDeviceGetGraphicsRunningProcesses")
        return list(handle.graphics)

    # -- checks ----------------------------------------------------------------------------

    def _require_init(self) -> None:
        if not self.initialised:
            raise pynvml.NVMLError_Uninitialized()

    def _device_call(self, handle: FakeDevice, function: str) -> None:
        self._require_init()
        if self.lost:
            raise pynvml.NVMLError_GpuIsLost()
        error = handle.errors.get(function)
        if error is not None:
            raise error()
