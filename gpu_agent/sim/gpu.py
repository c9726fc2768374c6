"""The simulated GPU: one RTX 4070 SUPER shared by every emulated server.

Memory is a ledger of per-process allocations against a fixed total, so the emulated Ollama and
ComfyUI collide exactly as the real ones do: whatever one holds, the other cannot have.
Utilisation, power and temperature follow the work in progress. The GPU is read through the same
`GpuProbe` contract as NVML (`SimGpuProbe`), from any thread.

Figures come from `shared/hardware-figures.md`: 12282 MiB total, 220 W cap, 7 W / 45 °C idle,
about 34 W with a model resident, 150-220 W under load.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from gpu_agent.sim.clock import SimClock
from gpu_agent.sim.errors import SimOutOfMemory
from gpu_common.errors import ProbeError
from gpu_common.probe import GpuProcessReading, GpuReading

MIB = 1024**2
GIB = 1024**3


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """Static facts about the simulated card."""

    name: str = "NVIDIA GeForce RTX 4070 SUPER"
    uuid: str = "GPU-5f0c4a1e-7d3b-4c2a-9e61-4070a5e12c01"
    total_bytes: int = 12282 * MIB
    power_limit_w: float = 220.0
    idle_power_w: float = 7.0
    resident_power_w: float = 34.0
    idle_temperature_c: float = 45.0
    max_temperature_c: float = 76.0
    thermal_time_constant_s: float = 40.0
    driver_version: str = "580.126.09"


RTX_4070_SUPER = GpuSpec()

# Power drawn while each kind of work runs (hardware-figures.md §4 "Power").
WORK_POWER_W = {"diffusion": 210.0, "prefill": 200.0, "decode": 170.0, "load": 60.0}
# Share of the memory controller's time the work keeps busy (NVML's utilization.memory).
WORK_MEMORY_UTIL = {"diffusion": 45, "prefill": 40, "decode": 85, "load": 20}


@dataclass(slots=True)
class _Process:
    pid: int
    name: str
    cmdline: tuple[str, ...]
    compute: bool
    used_bytes: int = 0


class SimGpu:
    """Memory ledger plus activity model of one simulated GPU. Thread-safe."""

    def __init__(self, clock: SimClock, spec: GpuSpec = RTX_4070_SUPER, index: int = 0) -> None:
        self.clock = clock
        self.spec = spec
        self.index = index
        self._lock = threading.Lock()
        self._processes: dict[int, _Process] = {}
        self._active: dict[str, int] = {}
        # Utilisation is the busy share of the time since the previous reading, like NVML's.
        self._busy_s = 0.0
        self._busy_since: float | None = None
        self._last_read_t = clock.now()
        self._temperature_c = spec.idle_temperature_c
        self._temperature_t = clock.now()

    # -- memory ----------------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        return self.spec.total_bytes

    def used_bytes(self) -> int:
        """Bytes allocated by every process together, as NVML's `used` reports."""
        with self._lock:
            return self._used_locked()

    def free_bytes(self) -> int:
        """Bytes no process holds: what the next allocation may take."""
        with self._lock:
            return self.spec.total_bytes - self._used_locked()

    def process_bytes(self, pid: int) -> int:
        """Bytes `pid` holds; 0 for a process not attached."""
        with self._lock:
            proc = self._processes.get(pid)
            return proc.used_bytes if proc else 0

    def holders(self) -> list[tuple[int, str, int]]:
        """(pid, name, bytes) of every process holding memory, by pid; unlike `reading()` this
        changes nothing (utilisation is measured between readings)."""
        with self._lock:
            return [
                (p.pid, p.name, p.used_bytes)
                for p in sorted(self._processes.values(), key=lambda p: p.pid)
                if p.used_bytes > 0
            ]

    def _used_locked(self) -> int:
        return sum(p.used_bytes for p in self._processes.values())

    def attach(
        self, pid: int, name: str, cmdline: tuple[str, ...], *, compute: bool = True
    ) -> None:
        """Make `pid` a GPU process (it holds no memory until it allocates).

        `compute=False` marks a graphics client such as Xorg, which draws no compute power.
        """
        with self._lock:
            self._processes.setdefault(pid, _Process(pid, name, cmdline, compute))

    def detach(self, pid: int) -> None:
        """The process exited: everything it held is released."""
        with self._lock:
            self._processes.pop(pid, None)

    def allocate(self, pid: int, nbytes: int) -> None:
        """Add `nbytes` to `pid`'s allocation; raises `SimOutOfMemory` if it does not fit."""
        if nbytes < 0:
            raise ValueError("allocate a non-negative amount")
        with self._lock:
            proc = self._require(pid)
            free = self.spec.total_bytes - self._used_locked()
            if nbytes > free:
                raise SimOutOfMemory(nbytes, free)
            proc.used_bytes += nbytes

    def release(self, pid: int, nbytes: int) -> None:
        """Return up to `nbytes` of `pid`'s allocation."""
        with self._lock:
            proc = self._processes.get(pid)
            if proc is not None:
                proc.used_bytes = max(0, proc.used_bytes - nbytes)

    def set_allocation(self, pid: int, nbytes: int) -> None:
        """Set `pid`'s allocation to exactly `nbytes`; growing raises `SimOutOfMemory` if short."""
        with self._lock:
            proc = self._require(pid)
            growth = nbytes - proc.used_bytes
            free = self.spec.total_bytes - self._used_locked()
            if growth > free:
                raise SimOutOfMemory(growth, free)
            proc.used_bytes = max(0, nbytes)

    def _require(self, pid: int) -> _Process:
        proc = self._processes.get(pid)
        if proc is None:
            raise KeyError(f"pid {pid} is not attached to the simulated GPU")
        return proc

    # -- activity --------------------------------------------------------------------------

    @contextlib.contextmanager
    def working(self, kind: str) -> Iterator[None]:
        """Mark a kernel stream of `kind` ("decode", "prefill", "diffusion", "load") as running."""
        self._start_work(kind)
        try:
            yield
        finally:
            self._stop_work(kind)

    def contention(self) -> int:
        """How many work streams share the GPU now (at least 1): each runs that much slower."""
        with self._lock:
            streams = sum(n for kind, n in self._active.items() if kind != "load")
        return max(1, streams)

    def _start_work(self, kind: str) -> None:
        with self._lock:
            self._settle_temperature_locked()
            if not any(self._active.values()):
                self._busy_since = self.clock.now()
            self._active[kind] = self._active.get(kind, 0) + 1

    def _stop_work(self, kind: str) -> None:
        with self._lock:
            self._settle_temperature_locked()
            self._active[kind] -= 1
            if not any(self._active.values()) and self._busy_since is not None:
                self._busy_s += self.clock.now() - self._busy_since
                self._busy_since = None

    def _power_locked(self) -> float:
        active = [kind for kind, n in self._active.items() if n > 0]
        if active:
            return min(self.spec.power_limit_w, max(WORK_POWER_W.get(k, 150.0) for k in active))
        holds_memory = any(p.used_bytes > 0 and p.compute for p in self._processes.values())
        return self.spec.resident_power_w if holds_memory else self.spec.idle_power_w

    def _settle_temperature_locked(self) -> None:
        """Advance the first-order thermal model to now at the current power."""
        now = self.clock.now()
        dt = now - self._temperature_t
        if dt <= 0:
            return
        spec = self.spec
        span = spec.max_temperature_c - spec.idle_temperature_c
        load = (self._power_locked() - spec.idle_power_w) / (spec.power_limit_w - spec.idle_power_w)
        target = spec.idle_temperature_c + span * max(0.0, load)
        decay = math.exp(-dt / spec.thermal_time_constant_s)
        self._temperature_c = target + (self._temperature_c - target) * decay
        self._temperature_t = now

    # -- reading ---------------------------------------------------------------------------

    def reading(self) -> GpuReading:
        """A reading as NVML would give it (v2 memory info, per-process list)."""
        with self._lock:
            now = self.clock.now()
            self._settle_temperature_locked()
            busy = self._busy_s
            if self._busy_since is not None:
                busy += now - self._busy_since
                self._busy_since = now
            elapsed = now - self._last_read_t
            self._busy_s = 0.0
            self._last_read_t = now
            active = [kind for kind, n in self._active.items() if n > 0]
            if elapsed > 0:
                util = round(100 * min(1.0, busy / elapsed))
            else:
                util = 100 if active else 0
            mem_util = max((WORK_MEMORY_UTIL.get(k, 30) for k in active), default=0)
            used = self._used_locked()
            processes = tuple(
                GpuProcessReading(p.pid, p.used_bytes, p.name, p.cmdline)
                for p in sorted(self._processes.values(), key=lambda p: p.pid)
                if p.used_bytes > 0
            )
            return GpuReading(
                index=self.index,
                uuid=self.spec.uuid,
                name=self.spec.name,
                memory_total_bytes=self.spec.total_bytes,
                memory_used_bytes=used,
                memory_free_bytes=self.spec.total_bytes - used,
                memory_reserved_bytes=0,
                utilization_gpu_percent=util,
                utilization_memory_percent=mem_util if util else 0,
                temperature_c=round(self._temperature_c),
                power_w=round(self._power_locked(), 1),
                power_limit_w=self.spec.power_limit_w,
                processes=processes,
            )


class SimGpuProbe:
    """The simulated GPU behind the `GpuProbe` contract, so the agent reads it like NVML.

    `failing` makes every read raise `ProbeError`, as NVML does when the driver goes away.
    `stale` makes every read return the readings of the moment it was set, unchanged, as a
    wedged driver's cached counters do: the caller cannot tell them from fresh ones.
    """

    def __init__(self, gpus: list[SimGpu]) -> None:
        self._gpus = gpus
        self.failing = False
        self._frozen: list[GpuReading] | None = None

    @property
    def stale(self) -> bool:
        """Whether reads return the readings frozen when `stale` was set."""
        return self._frozen is not None

    @stale.setter
    def stale(self, value: bool) -> None:
        if not value:
            self._frozen = None
        elif self._frozen is None:
            self._frozen = [gpu.reading() for gpu in self._gpus]

    @property
    def backend(self) -> str:
        return "sim"

    def driver_version(self) -> str | None:
        """The first GPU's simulated driver version; None without GPUs."""
        return self._gpus[0].spec.driver_version if self._gpus else None

    def read(self) -> list[GpuReading]:
        """One reading per GPU; raises `ProbeError` while `failing`."""
        if self.failing:
            raise ProbeError("simulated NVML failure: driver not loaded")
        if self._frozen is not None:
            return list(self._frozen)
        return [gpu.reading() for gpu in self._gpus]

    def close(self) -> None:
        """Nothing to release: the GPUs belong to the simulated desktop."""
        return None
