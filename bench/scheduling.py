"""Scheduling quality: one seeded busy hour, replayed against the controller and today's habits.

Policies, each on a fresh simulated desktop:
- `controller`: every request through the controller (intents `auto:fast` / `auto:quality`);
- `direct`: clients call Ollama and ComfyUI directly (fast -> llama3.2:3b, quality -> qwen2.5:14b);
- `keep_alive_0`: as direct, but every LLM request unloads its model afterwards;
- `reactive_free`: as direct, plus a script that polls ComfyUI and calls `/free` when it is idle.

Measured in simulated seconds: out-of-memory failures, CPU-spilled generations, low-VRAM image
runs, model loads (Ollama runners + ComfyUI checkpoints), LLM latency and image turnaround
(p50/p95), makespan, and makespan over a lower bound (all GPU work done back to back at full speed
with every model loaded once, and no earlier than the arrivals allow).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.report import record, table
from controller.simulated import simulated_stack
from gpu_agent.sim.catalog import CHECKPOINTS, OLLAMA_MODELS
from gpu_agent.sim.desktop import SimDesktop
from gpu_agent.sim.workflows import SD15, SDXL, text_to_image
from gpu_agent.sim.workload import Arrival, ImageArrival, LlmArrival, busy_hour, percentile

SPEED = float(os.environ.get("BENCH_SPEED", "25"))
POLL_SIM_S = 0.5
BASELINE_MODEL = {"auto:fast": "llama3.2:3b", "auto:quality": "qwen2.5:14b"}
TOKEN = "bench-token"
POLICIES = ("controller", "direct", "keep_alive_0", "reactive_free")


@dataclass
class Outcome:
    llm_latency_s: list[float] = field(default_factory=list)
    image_turnaround_s: list[float] = field(default_factory=list)
    eval_counts: dict[int, int] = field(default_factory=dict)
    llm_failed: int = 0
    image_failed: int = 0
    first_arrival_s: float = 0.0
    last_done_s: float = 0.0
    models_chosen: dict[str, int] = field(default_factory=dict)


class Replay:
    """Plays the arrivals against one desktop through `llm` and `image` callables."""

    def __init__(self, desktop: SimDesktop) -> None:
        self.desktop = desktop
        self.outcome = Outcome()
        self.t0 = 0.0

    def now(self) -> float:
        return self.desktop.clock.now() - self.t0

    async def run(
        self,
        arrivals: list[Arrival],
        llm: Callable[[int, LlmArrival], Awaitable[tuple[bool, int, str]]],
        image: Callable[[ImageArrival], Awaitable[bool]],
    ) -> Outcome:
        self.t0 = self.desktop.clock.now()
        self.outcome.first_arrival_s = arrivals[0].at_s

        async def one(index: int, arrival: Arrival) -> None:
            await self.desktop.clock.sleep_until(self.t0 + arrival.at_s)
            if isinstance(arrival, LlmArrival):
                ok, evals, model = await llm(index, arrival)
                if ok:
                    self.outcome.llm_latency_s.append(self.now() - arrival.at_s)
                    self.outcome.eval_counts[index] = evals
                    self.outcome.models_chosen[model] = self.outcome.models_chosen.get(model, 0) + 1
                else:
                    self.outcome.llm_failed += 1
            else:
                if await image(arrival):
                    self.outcome.image_turnaround_s.append(self.now() - arrival.at_s)
                else:
                    self.outcome.image_failed += 1
            self.outcome.last_done_s = max(self.outcome.last_done_s, self.now())

        await asyncio.gather(*(one(i, a) for i, a in enumerate(arrivals)))
        return self.outcome


def workflow_for(arrival: ImageArrival) -> dict[str, Any]:
    if arrival.family == "sdxl":
        return text_to_image(SDXL, steps=arrival.steps, seed=arrival.seed, prefix="bench")
    return text_to_image(SD15, width=512, height=512, steps=arrival.steps, seed=arrival.seed,
                         prefix="bench")  # fmt: skip


async def _direct_llm(
    http: httpx.AsyncClient, index: int, arrival: LlmArrival, *, keep_alive: float | None
) -> tuple[bool, int, str]:
    model = BASELINE_MODEL[arrival.intent]
    body: dict[str, Any] = {
        "model": model,
        "prompt": arrival.prompt,
        "stream": False,
        "options": {"num_predict": arrival.output_tokens, "seed": index},
    }
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    response = await http.post("/api/generate", json=body)
    if response.status_code != 200:
        return False, 0, model
    return True, int(response.json().get("eval_count") or 0), model


async def _direct_image(
    http: httpx.AsyncClient, desktop: SimDesktop, arrival: ImageArrival
) -> bool:
    client_id = str(uuid.uuid4())
    response = await http.post(
        "/prompt", json={"prompt": workflow_for(arrival), "client_id": client_id}
    )
    if response.status_code != 200:
        return False
    prompt_id = response.json()["prompt_id"]
    while True:
        entry = (await http.get(f"/history/{prompt_id}")).json()
        if entry:
            return bool(entry[prompt_id]["status"]["status_str"] == "success")
        await desktop.clock.sleep(POLL_SIM_S)


async def run_baseline(
    policy: str, arrivals: list[Arrival], data_dir: Path
) -> tuple[Outcome, SimDesktop]:
    desktop = SimDesktop(speed=SPEED, data_dir=data_dir)
    await desktop.start()
    timeout = httpx.Timeout(600.0, connect=10.0)
    limits = httpx.Limits(max_connections=200)
    try:
        async with (
            httpx.AsyncClient(
                base_url=desktop.ollama_url, timeout=timeout, limits=limits
            ) as ollama,
            httpx.AsyncClient(
                base_url=desktop.comfyui_url, timeout=timeout, limits=limits
            ) as comfy,
        ):
            keep_alive = 0.0 if policy == "keep_alive_0" else None
            replay = Replay(desktop)
            stop = asyncio.Event()
            freer = (
                asyncio.create_task(_reactive_free(comfy, desktop, stop))
                if policy == "reactive_free"
                else None
            )
            try:
                outcome = await replay.run(
                    arrivals,
                    lambda i, a: _direct_llm(ollama, i, a, keep_alive=keep_alive),
                    lambda a: _direct_image(comfy, desktop, a),
                )
            finally:
                stop.set()
                if freer is not None:
                    await freer
    finally:
        await desktop.stop()
    return outcome, desktop


async def _reactive_free(
    comfy: httpx.AsyncClient, desktop: SimDesktop, stop: asyncio.Event
) -> None:
    """What a studio script does today: every 2 s, if ComfyUI is idle and holds memory, free it."""
    while not stop.is_set():
        queue = (await comfy.get("/queue")).json()
        stats = (await comfy.get("/system_stats")).json()
        held = sum(int(d.get("torch_vram_total") or 0) for d in stats.get("devices", []))
        if not queue["queue_running"] and not queue["queue_pending"] and held > 1024**3:
            await comfy.post("/free", json={"unload_models": True, "free_memory": True})
        await desktop.clock.sleep(2.0)


async def run_controller(arrivals: list[Arrival], data_dir: Path) -> tuple[Outcome, SimDesktop]:
    desktop = SimDesktop(speed=SPEED, data_dir=data_dir / "desktop")
    await desktop.start()
    try:
        async with simulated_stack(
            desktop,
            data_dir / "controller",
            token=TOKEN,
            sample_interval_s=0.05,
            tick_interval_s=0.05,
            llm_wait_s=600.0,
        ) as stack:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            timeout = httpx.Timeout(600.0, connect=10.0)
            async with httpx.AsyncClient(
                base_url=stack.controller.url, headers=headers, timeout=timeout,
                limits=httpx.Limits(max_connections=200),
            ) as http:  # fmt: skip

                async def llm(index: int, arrival: LlmArrival) -> tuple[bool, int, str]:
                    body = {
                        "model": arrival.intent,
                        "prompt": arrival.prompt,
                        "stream": False,
                        "options": {"num_predict": arrival.output_tokens, "seed": index},
                    }
                    response = await http.post("/api/generate", json=body)
                    if response.status_code != 200:
                        return False, 0, "-"
                    model = response.headers.get("X-GPU-Model", "?")
                    return True, int(response.json().get("eval_count") or 0), model

                async def image(arrival: ImageArrival) -> bool:
                    response = await http.post(
                        "/v1/images", json={"workflow": workflow_for(arrival)}
                    )
                    if response.status_code != 202:
                        return False
                    job_id = response.json()["id"]
                    async with http.stream("GET", f"/v1/images/{job_id}/events") as events:
                        last = "held"
                        async for line in events.aiter_lines():
                            if line.strip():
                                last = json.loads(line)["state"]
                    return last == "succeeded"

                outcome = await Replay(desktop).run(arrivals, llm, image)
    finally:
        await desktop.stop()
    return outcome, desktop


def lower_bound_s(arrivals: list[Arrival], eval_counts: dict[int, int]) -> float:
    """All GPU work back to back at full speed, each model loaded once; not before arrivals."""
    specs = {m.name: m for m in OLLAMA_MODELS}
    families = {c.filename: c.family for c in CHECKPOINTS}

    def work_s(index: int, arrival: Arrival) -> float:
        if isinstance(arrival, LlmArrival):
            spec = specs[BASELINE_MODEL[arrival.intent]]
            prompt_tokens = len(arrival.prompt) // 4 + 16
            return spec.prompt_seconds(prompt_tokens, 0.0) + eval_counts.get(
                index, 0
            ) * spec.seconds_per_token(0.0)
        family = families[SDXL if arrival.family == "sdxl" else SD15]
        return 2 * family.text_encode_s + arrival.steps * family.step_s + family.vae_decode_s

    works = [work_s(i, a) for i, a in enumerate(arrivals)]
    loads = sum(specs[m].load_cold_s for m in set(BASELINE_MODEL.values()))
    loads += sum(families[f].load_cold_s for f in (SDXL, SD15))
    serial = sum(works) + loads
    last_index = max(range(len(arrivals)), key=lambda i: arrivals[i].at_s)
    by_arrival = arrivals[last_index].at_s - arrivals[0].at_s + works[last_index]
    return max(serial, by_arrival)


def summarize(outcome: Outcome, desktop: SimDesktop, bound_s: float) -> dict[str, Any]:
    comfy, ollama = desktop.comfyui.stats, desktop.ollama.stats
    makespan = outcome.last_done_s - outcome.first_arrival_s
    return {
        "oom": comfy.failed_oom,
        "spilled": ollama.spilled_generations,
        "lowvram_runs": comfy.lowvram_runs,
        "model_loads": ollama.loads + comfy.checkpoint_loads,
        "llm_p50_s": round(percentile(outcome.llm_latency_s, 50), 3),
        "llm_p95_s": round(percentile(outcome.llm_latency_s, 95), 3),
        "image_p50_s": round(percentile(outcome.image_turnaround_s, 50), 3),
        "image_p95_s": round(percentile(outcome.image_turnaround_s, 95), 3),
        "makespan_s": round(makespan, 3),
        "makespan_over_bound": round(makespan / bound_s, 3),
        "llm_failed": outcome.llm_failed,
        "image_failed": outcome.image_failed,
        "models_chosen": dict(sorted(outcome.models_chosen.items())),
    }


async def run() -> dict[str, Any]:
    arrivals = busy_hour()
    results: dict[str, dict[str, Any]] = {}
    outcomes: dict[str, tuple[Outcome, SimDesktop]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-sched-") as tmp:
        for policy in POLICIES:
            folder = Path(tmp) / policy
            if policy == "controller":
                outcomes[policy] = await run_controller(arrivals, folder)
            else:
                outcomes[policy] = await run_baseline(policy, arrivals, folder)
    bound = lower_bound_s(arrivals, outcomes["direct"][0].eval_counts)
    for policy, (outcome, desktop) in outcomes.items():
        results[policy] = summarize(outcome, desktop, bound)
    columns = ["policy", "oom", "spilled", "lowvram", "loads", "llm p50", "llm p95", "img p50",
               "img p95", "makespan", "/bound", "failed"]  # fmt: skip
    rows = [
        [p, r["oom"], r["spilled"], r["lowvram_runs"], r["model_loads"], r["llm_p50_s"],
         r["llm_p95_s"], r["image_p50_s"], r["image_p95_s"], r["makespan_s"],
         r["makespan_over_bound"], r["llm_failed"] + r["image_failed"]]
        for p, r in results.items()
    ]  # fmt: skip
    llm_count = sum(isinstance(a, LlmArrival) for a in arrivals)
    table(
        f"Scheduling: {llm_count} LLM requests, {len(arrivals) - llm_count} image jobs over "
        f"{arrivals[-1].at_s:.0f} s (simulated seconds; lower bound {bound:.1f} s)",
        columns,
        rows,
    )
    best_baseline_p95 = min(results[p]["llm_p95_s"] for p in POLICIES if p != "controller")
    ours = results["controller"]
    targets = {
        "no_oom": ours["oom"] == 0,
        "no_spill": ours["spilled"] == 0,
        "makespan_within_1_15": ours["makespan_over_bound"] <= 1.15,
        "llm_p95_not_worse_than_best_baseline": ours["llm_p95_s"] <= best_baseline_p95,
    }
    print("targets:", ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items()))
    print("models chosen by the controller:", ours["models_chosen"])
    figures = {
        "policies": results,
        "lower_bound_s": round(bound, 3),
        "targets": targets,
        "speed": SPEED,
        "workload": {"llm_requests": llm_count, "image_jobs": len(arrivals) - llm_count},
    }
    record("scheduling", figures)
    return figures


if __name__ == "__main__":
    asyncio.run(run())
