"""Decision time of the pure policy core: `select` (one LLM request) and `plan_images` (a round).

What it measures: wall time of single calls to `controller.domain.selection.select` and
`controller.domain.admission.plan_images` on a synthetic fleet of 1, 10 and 50 agents that each
offer the same 20 models (profiles built by the core's own `catalog.profile` defaults), with a
few models resident per agent, some busy, some with queued requests, a ComfyUI checkpoint cached
here and there and an image job running on about one agent in five. `select` is timed over a
rotating mix of intents (auto, auto:fast, auto:quality, explicit resident and explicit cold
models, constrained requests); `plan_images` over a round of 20 held image jobs of mixed
families, priorities and ages (some past `max_hold_s`).

How to read it: median and p99 in microseconds per call, each call timed alone with
`time.perf_counter_ns` after a warm-up. The engine calls `select` once per LLM request and
`plan_images` once per scheduling pass, both under its planning lock, so these figures bound how
much the core adds to a request and how long the lock is held. "placed" shows the fleet is
neither trivially full nor empty: requests of the mix given a `Choice`, jobs of the round
admitted.
"""

from __future__ import annotations

import gc
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bench.report import percentile, record, table
from controller.domain.admission import Admit, plan_images
from controller.domain.catalog import profile
from controller.domain.footprints import ImageKey, Speed, default_image_peak
from controller.domain.selection import Choice, select
from controller.domain.types import (
    AgentState,
    ImageJob,
    LlmRequest,
    ModelProfile,
    PolicyConfig,
    ResidentModel,
    RunningImage,
)

MIB = 1024**2
GIB = 1024**3
# A 4070 SUPER desktop as NVML shows it (hardware-figures.md §1).
TOTAL_BYTES = 12282 * MIB
DESKTOP_BYTES = 600 * MIB
RESERVE_BYTES = 512 * MIB
COMFY_CONTEXT_BYTES = 400 * MIB
# What ComfyUI holds with a checkpoint of that family cached (weights beyond the CUDA context).
COMFY_CACHED_BYTES = {"sd15": int(2.0 * GIB), "sdxl": int(6.5 * GIB)}

# (parameter size, GGUF file bytes, family) of Q4_K_M models as the Ollama library lists them.
MODEL_SHAPES: tuple[tuple[str, int, str], ...] = (
    ("1.2B", 808_000_000, "llama"),
    ("3.2B", 2_019_393_189, "llama"),
    ("3.8B", 2_300_000_000, "phi3"),
    ("4.3B", 3_300_000_000, "gemma3"),
    ("7.6B", 4_683_087_332, "qwen2"),
    ("8.0B", 4_920_000_000, "llama"),
    ("8.2B", 5_200_000_000, "qwen3"),
    ("12.2B", 8_100_000_000, "gemma3"),
    ("14.8B", 8_988_110_576, "qwen2"),
    ("23.6B", 14_333_927_918, "llama"),
)

NOW_S = 10_000.0
AGENT_COUNTS = (1, 10, 20, 50)
MODELS = 20
HELD_JOBS = 20
WARMUP_CALLS = 20


def synthetic_catalog(models: int = MODELS) -> dict[str, ModelProfile]:
    """`models` profiles cycling through `MODEL_SHAPES`, as the controller would build them
    before measuring anything."""
    catalog: dict[str, ModelProfile] = {}
    for i in range(models):
        parameter_size, file_bytes, family = MODEL_SHAPES[i % len(MODEL_SHAPES)]
        name = f"{family}-{i:02d}:{parameter_size.lower()}"
        catalog[name] = profile(
            name,
            file_bytes=file_bytes,
            family=family,
            parameter_size=parameter_size,
            quality_override=None,
            speed=Speed(),
            footprints={},
        )
    return catalog


def _resident(
    rng: random.Random, catalog: Mapping[str, ModelProfile], room_bytes: int
) -> list[ResidentModel]:
    """Up to three models that fit in `room_bytes`, loaded at various times, some busy."""
    chosen: list[ResidentModel] = []
    for name in rng.sample(sorted(catalog), k=len(catalog)):
        if len(chosen) == 3:
            break
        size = catalog[name].vram_bytes
        if size > room_bytes:
            continue
        room_bytes -= size
        loaded_at = NOW_S - rng.uniform(5.0, 900.0)
        chosen.append(
            ResidentModel(
                name=name,
                vram_bytes=size,
                size_bytes=size,
                in_flight=rng.choice((0, 0, 1, 2)),
                loaded_at=loaded_at,
                last_used_at=rng.uniform(loaded_at, NOW_S),
            )
        )
    return chosen


def synthetic_agent(index: int, catalog: Mapping[str, ModelProfile], seed: int = 0) -> AgentState:
    """One desktop of the fleet; the same (index, seed) always gives the same state."""
    rng = random.Random(seed * 1_000_003 + index)
    family = rng.choice((None, None, "sd15", "sdxl"))
    # One agent in five is running an image job (so its checkpoint is cached); never the first,
    # so that a one-agent fleet has room to admit.
    running = index % 5 == 4
    if running and family is None:
        family = "sdxl"
    comfy_bytes = COMFY_CONTEXT_BYTES + (COMFY_CACHED_BYTES[family] if family else 0)
    budget = TOTAL_BYTES - RESERVE_BYTES
    resident = _resident(rng, catalog, budget - DESKTOP_BYTES - comfy_bytes)
    image_running = None
    if running and family is not None:
        image_running = RunningImage(f"job-run-{index}", comfy_bytes + GIB, family, NOW_S - 3.0)
    queued = tuple((m.name, rng.randint(1, 3)) for m in resident[:1] if m.busy)
    # One agent in ten has gone stale, as a desktop that was switched off would.
    stale = index % 10 == 9
    return AgentState(
        name=f"desk{index:02d}",
        healthy=not stale,
        total_bytes=TOTAL_BYTES,
        used_bytes=DESKTOP_BYTES + comfy_bytes + sum(m.vram_bytes for m in resident),
        reserve_bytes=RESERVE_BYTES,
        resident=tuple(resident),
        comfy_bytes=comfy_bytes,
        comfy_floor_bytes=COMFY_CONTEXT_BYTES,
        comfy_family=family,
        image_running=image_running,
        llm_queued=queued,
        unhealthy_reason="stale: last snapshot 12 s ago" if stale else None,
    )


def synthetic_fleet(agents: int, catalog: Mapping[str, ModelProfile]) -> list[AgentState]:
    return [synthetic_agent(i, catalog) for i in range(agents)]


def request_mix(
    fleet: Sequence[AgentState], catalog: Mapping[str, ModelProfile]
) -> list[LlmRequest]:
    """The requests `select` is timed on, in rotation."""
    resident = next((m.name for a in fleet for m in a.resident), min(catalog))
    cold = next(
        (name for name in sorted(catalog) if all(a.resident_model(name) is None for a in fleet)),
        max(catalog),
    )
    return [
        LlmRequest("auto", prompt_tokens=200),
        LlmRequest("auto:fast", prompt_tokens=60, output_tokens=128),
        LlmRequest("auto:quality", prompt_tokens=600, output_tokens=512),
        LlmRequest(resident, prompt_tokens=120, output_tokens=64),
        LlmRequest(cold, prompt_tokens=120, output_tokens=64),
        LlmRequest("auto", prompt_tokens=300, min_quality=60.0, max_latency_s=20.0),
    ]


def held_jobs(count: int = HELD_JOBS, seed: int = 0) -> list[ImageJob]:
    """A round of held image jobs: mixed families and sizes, a few urgent, some starving."""
    rng = random.Random(seed)
    jobs = []
    for i in range(count):
        family, side = rng.choice((("sd15", 512), ("sd15", 768), ("sdxl", 1024), ("flux", 1024)))
        key = ImageKey(family, side, side, rng.choice((1, 1, 2)))
        jobs.append(
            ImageJob(
                job_id=f"job-{i:02d}",
                peak_bytes=default_image_peak(key),
                family=family,
                priority=rng.choice((0, 0, 0, 1)),
                submitted_at=NOW_S - rng.uniform(0.0, 200.0),
            )
        )
    return jobs


def time_calls(call: Callable[[int], object], reps: int) -> list[float]:
    """Microseconds taken by each of `reps` calls `call(i)`, after a short untimed warm-up."""
    for i in range(min(WARMUP_CALLS, reps)):
        call(i)
    gc.collect()
    samples = []
    for i in range(reps):
        started = time.perf_counter_ns()
        call(i)
        samples.append((time.perf_counter_ns() - started) / 1000)
    return samples


def summary(samples_us: Sequence[float]) -> dict[str, float]:
    return {
        "median_us": percentile(samples_us, 50),
        "p99_us": percentile(samples_us, 99),
        "mean_us": sum(samples_us) / len(samples_us) if samples_us else float("nan"),
        "reps": len(samples_us),
    }


def time_select(agents: int, reps: int, config: PolicyConfig = PolicyConfig()) -> dict[str, float]:
    catalog = synthetic_catalog()
    fleet = synthetic_fleet(agents, catalog)
    requests = request_mix(fleet, catalog)
    samples = time_calls(
        lambda i: select(requests[i % len(requests)], fleet, catalog, NOW_S, config), reps
    )
    placed = sum(isinstance(select(r, fleet, catalog, NOW_S, config), Choice) for r in requests)
    return {
        **summary(samples),
        "agents": agents,
        "models": len(catalog),
        "placed": placed,
        "cases": len(requests),
    }


def time_plan_images(
    agents: int, reps: int, config: PolicyConfig = PolicyConfig()
) -> dict[str, float]:
    fleet = synthetic_fleet(agents, synthetic_catalog())
    jobs = held_jobs()
    samples = time_calls(lambda _: plan_images(jobs, fleet, NOW_S, config), reps)
    placed = sum(isinstance(d, Admit) for d in plan_images(jobs, fleet, NOW_S, config))
    return {**summary(samples), "agents": agents, "placed": placed, "cases": len(jobs)}


def _rows(figures: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for call, by_size in figures.items():
        for size, fig in by_size.items():
            placed = f"{fig['placed']:.0f}/{fig['cases']:.0f}"
            reps = int(fig["reps"])
            rows.append([call, size, fig["median_us"], fig["p99_us"], fig["mean_us"], reps, placed])
    return rows


def run(
    *,
    agent_counts: Sequence[int] = AGENT_COUNTS,
    select_reps: int = 1000,
    plan_reps: int = 300,
    save: bool = True,
) -> dict[str, Any]:
    """Time both core calls for each fleet size; print the table and record `decisions`."""
    figures: dict[str, dict[str, dict[str, float]]] = {
        "select": {str(n): time_select(n, select_reps) for n in agent_counts},
        "plan_images": {str(n): time_plan_images(n, plan_reps) for n in agent_counts},
    }
    table(
        f"Decision time of the policy core ({MODELS} models per agent, {HELD_JOBS} held jobs)",
        ["call", "agents", "median µs", "p99 µs", "mean µs", "calls", "placed"],
        _rows(figures),
    )
    if save:
        record("decisions", figures)
    return figures


if __name__ == "__main__":
    run()
