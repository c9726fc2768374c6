"""An hour of GPU readings per card, for the dashboard's charts (imperative shell).

`MemoryHistory` is a bounded ring buffer: at most one point per GPU every `spacing_s`, none
older than `window_s`, on the engine's clock; each point also carries its wall-clock time for
the chart's axis. `follow_history` fills it from the agents' snapshots as they arrive (the
engine's pulse fires on each), whether or not anyone is looking, so a dashboard opened now shows
the hour before it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import Field

from controller.engine import Engine
from gpu_common.schema import GpuInfo, WireModel

log = logging.getLogger(__name__)

GIB = 1024**3
HISTORY_WINDOW_S = 3600.0
HISTORY_SPACING_S = 1.0
# The most GPUs kept at full length; more share the buffer (and keep less than an hour).
MAX_GPUS = 16
# Without a snapshot for this long, the latest reading is taken again, so the chart's time axis
# keeps moving on an idle card.
IDLE_SAMPLE_S = 5.0


@dataclass(frozen=True, slots=True)
class GpuPoint:
    """One reading of one GPU: memory by owner in bytes, the budget, load, temperature, power.

    "desktop" is every process that is neither Ollama nor ComfyUI (the desktop session, a
    browser); "other" is memory NVML counts that no process accounts for (the driver's own).
    `seq` orders the points across GPUs; `at_s` is the engine's clock, `wall_s` Unix seconds.
    """

    seq: int
    at_s: float
    wall_s: float
    agent: str
    gpu: int
    desktop_bytes: int
    ollama_bytes: int
    comfyui_bytes: int
    other_bytes: int
    budget_bytes: int
    total_bytes: int
    utilization_percent: int | None
    temperature_c: int | None
    power_w: float | None


class GpuSeries(WireModel):
    """Points of one GPU in columns, as the chart takes them: times in Unix seconds, memory
    in GiB; utilisation in percent, temperature in °C and power in W (null when unknown)."""

    agent: str
    gpu: int
    t: list[float]
    desktop_gib: list[float]
    ollama_gib: list[float]
    comfyui_gib: list[float]
    other_gib: list[float]
    budget_gib: list[float]
    total_gib: float = Field(description="the card's memory at the latest point")
    utilization_percent: list[int | None]
    temperature_c: list[int | None]
    power_w: list[float | None]


def _gib(nbytes: int) -> float:
    return round(nbytes / GIB, 3)


def reading(
    seq: int, at_s: float, wall_s: float, agent: str, gpu: GpuInfo, budget_bytes: int
) -> GpuPoint:
    """One GPU's snapshot as a history point."""
    owners = gpu.memory_by_owner_bytes
    ollama = owners.get("ollama", 0)
    comfyui = owners.get("comfyui", 0)
    desktop = owners.get("other", 0)
    return GpuPoint(
        seq=seq,
        at_s=at_s,
        wall_s=wall_s,
        agent=agent,
        gpu=gpu.index,
        desktop_bytes=desktop,
        ollama_bytes=ollama,
        comfyui_bytes=comfyui,
        other_bytes=max(0, gpu.memory_used_bytes - desktop - ollama - comfyui),
        budget_bytes=budget_bytes,
        total_bytes=gpu.memory_total_bytes,
        utilization_percent=gpu.utilization_gpu_percent,
        temperature_c=gpu.temperature_c,
        power_w=gpu.power_w,
    )


class MemoryHistory:
    """The last `window_s` of readings per GPU, one every `spacing_s` at most."""

    def __init__(
        self,
        *,
        window_s: float = HISTORY_WINDOW_S,
        spacing_s: float = HISTORY_SPACING_S,
        max_gpus: int = MAX_GPUS,
    ) -> None:
        self.window_s = window_s
        self.spacing_s = spacing_s
        self._points: deque[GpuPoint] = deque(maxlen=max_gpus * int(window_s / spacing_s + 1))
        self._last_at: dict[tuple[str, int], float] = {}
        self.last_seq = 0

    def __len__(self) -> int:
        return len(self._points)

    def due(self, agent: str, gpu: int, at_s: float) -> bool:
        """Whether a point of this GPU taken at `at_s` would be kept."""
        last = self._last_at.get((agent, gpu))
        return last is None or at_s - last >= self.spacing_s

    def add(self, agent: str, gpu: GpuInfo, budget_bytes: int, at_s: float, wall_s: float) -> bool:
        """Keep a reading of `gpu` on `agent` taken at `at_s`, unless one was kept less than
        `spacing_s` before it; points older than `window_s` go. True when it was kept."""
        if not self.due(agent, gpu.index, at_s):
            return False
        self.last_seq += 1
        self._points.append(reading(self.last_seq, at_s, wall_s, agent, gpu, budget_bytes))
        self._last_at[agent, gpu.index] = at_s
        while self._points and at_s - self._points[0].at_s > self.window_s:
            self._points.popleft()
        return True

    def since(self, seq: int) -> list[GpuPoint]:
        """The points kept after point `seq` (0: all of them), oldest first."""
        if seq >= self.last_seq:
            return []
        return [p for p in self._points if p.seq > seq]

    def series(self, seq: int = 0) -> list[GpuSeries]:
        """The points after `seq` in columns, one series per GPU."""
        return columns(self.since(seq))


def columns(points: Iterable[GpuPoint]) -> list[GpuSeries]:
    """Points in columns, one series per (agent, GPU), in order of first appearance."""
    series: dict[tuple[str, int], GpuSeries] = {}
    for p in points:
        one = series.get((p.agent, p.gpu))
        if one is None:
            one = series[p.agent, p.gpu] = GpuSeries(
                agent=p.agent, gpu=p.gpu, t=[], desktop_gib=[], ollama_gib=[], comfyui_gib=[],
                other_gib=[], budget_gib=[], total_gib=0.0, utilization_percent=[],
                temperature_c=[], power_w=[],
            )  # fmt: skip
        one.t.append(round(p.wall_s, 3))
        one.desktop_gib.append(_gib(p.desktop_bytes))
        one.ollama_gib.append(_gib(p.ollama_bytes))
        one.comfyui_gib.append(_gib(p.comfyui_bytes))
        one.other_gib.append(_gib(p.other_bytes))
        one.budget_gib.append(_gib(p.budget_bytes))
        one.total_gib = _gib(p.total_bytes)
        one.utilization_percent.append(p.utilization_percent)
        one.temperature_c.append(p.temperature_c)
        one.power_w.append(p.power_w)
    return list(series.values())


def sample(engine: Engine, history: MemoryHistory) -> int:
    """Add a point for every GPU of every healthy agent whose turn it is; returns how many."""
    now = engine.clock()
    wall_s: float | None = None
    added = 0
    for name in sorted(engine.links):
        link = engine.links[name]
        status = link.status
        if status is None or not link.health()[0]:
            continue  # a gap in the chart: nothing is known of the card meanwhile
        for gpu in status.telemetry.gpus:
            if not history.due(name, gpu.index, now):
                continue
            if wall_s is None:
                wall_s = engine.wall().timestamp()
            budget = max(0, gpu.memory_total_bytes - engine.fleet.reserve_bytes)
            added += history.add(name, gpu, budget, now, wall_s)
    return added


async def follow_history(engine: Engine, history: MemoryHistory) -> None:
    """Sample on every change the engine signals, and at least every `IDLE_SAMPLE_S`."""
    while True:
        mark = engine.pulse.mark()
        try:
            sample(engine, history)
        except Exception:
            log.exception("dashboard history sample failed; trying again")
        await engine.pulse.wait(IDLE_SAMPLE_S, mark)
