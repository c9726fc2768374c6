"""Host load readings (adapter layer): CPU, load average, RAM and swap of the desktop via psutil.

The scheduler wants these beside the GPU readings because a model that spills layers onto the CPU
slows down with the host, and because swapping desktops answer slowly whatever the GPU says.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil  # type: ignore[import-untyped]  # no stubs in the dev dependencies


@dataclass(frozen=True)
class HostReading:
    """The host at one instant. Percent, load averages (runnable tasks) and bytes.

    `cpu_percent` is the whole-machine CPU use since the previous reading (0-100, like `top`'s
    summary line); the first reading in a process is 0.0 because there is nothing to compare with.
    `memory_used_bytes` is psutil's `used` (excludes cache and buffers), as `free -b` shows it.
    No `__slots__`, so `vars()` and `dataclasses.asdict()` both turn it into a dict.
    """

    cpu_percent: float
    cpu_count: int
    load_1m: float
    load_5m: float
    load_15m: float
    memory_total_bytes: int
    memory_available_bytes: int
    memory_used_bytes: int
    swap_used_bytes: int


def read_host() -> HostReading:
    """Read the host now. Non-blocking: CPU use is measured since the previous call."""
    load_1m, load_5m, load_15m = psutil.getloadavg()
    memory = psutil.virtual_memory()
    swap = psutil.swap_memory()
    return HostReading(
        cpu_percent=float(psutil.cpu_percent(interval=None)),
        cpu_count=int(psutil.cpu_count(logical=True) or os.cpu_count() or 1),
        load_1m=float(load_1m),
        load_5m=float(load_5m),
        load_15m=float(load_15m),
        memory_total_bytes=int(memory.total),
        memory_available_bytes=int(memory.available),
        memory_used_bytes=int(memory.used),
        swap_used_bytes=int(swap.used),
    )
