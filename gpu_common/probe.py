"""The GPU probe contract (adapter layer).

A probe reads every GPU once per call. Readings are plain frozen values so they can cross threads:
the agent calls `read()` in a worker thread, never on the event loop, because NVML calls block.

Two tiers of failure, as nvitop does it: a probe that cannot read at all raises `ProbeError`;
a field one card does not support is `None` in the reading.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class GpuProcessReading:
    """One process holding GPU memory (`nvidia-smi --query-compute-apps=pid,used_memory`).

    `name` and `cmdline` are filled by the probe when it knows them (the simulated GPU does);
    otherwise the agent looks them up by pid.
    """

    pid: int
    used_bytes: int | None
    name: str | None = None
    cmdline: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One GPU at one instant. Bytes, percent, degrees Celsius and watts; `None` = unsupported."""

    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    memory_reserved_bytes: int | None
    utilization_gpu_percent: int | None
    utilization_memory_percent: int | None
    temperature_c: int | None
    power_w: float | None
    power_limit_w: float | None
    processes: tuple[GpuProcessReading, ...]


class GpuProbe(Protocol):
    """What the agent needs from a GPU backend. All methods block; call them off the loop."""

    @property
    def backend(self) -> str:
        """A short name for status output: "nvml" or "sim"."""
        ...

    def driver_version(self) -> str | None:
        """The driver version (`nvidia-smi --query-gpu=driver_version`), if known."""
        ...

    def read(self) -> list[GpuReading]:
        """Read every GPU. Raises `ProbeError` when nothing can be read."""
        ...

    def close(self) -> None:
        """Release the backend (NVML shutdown). Idempotent."""
        ...
