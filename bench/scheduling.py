"""Scheduling quality over many seeds: seeded workloads replayed against the controller and
today's habits, on virtual time, so the same seed gives the same figures on any machine.

Scenarios (`SCENARIOS`): `busy_hour` (one desktop, a busy hour), `studio_day` (one desktop, 24
simulated hours: a bursty working day and a quiet night) and `fleet_4` (four desktops behind one
controller, a busy hour four times as heavy).

Policies, each on fresh simulated desktops:
- `controller`: every request through the controller (intents `auto:fast` / `auto:quality`);
- `direct`: clients call Ollama and ComfyUI directly (fast -> llama3.2:3b, quality ->
  qwen2.5:14b), spreading requests over the desktops in turn;
- `keep_alive_0`: as direct, but every LLM request unloads its model afterwards;
- `reactive_free`: as direct, plus a script that polls ComfyUI and calls `/free` when it is idle.

Each run is one process-independent `run_virtual` call: simulator, agents and controller share
one virtual clock that moves only when every task waits. Figures are simulated seconds: out of
memory failures, CPU-spilled generations, failures, LLM latency and image turnaround (p95),
makespan over a lower bound (all GPU work back to back at full speed, each model loaded once,
spread over the desktops, no earlier than the arrivals allow), and for the controller the share
of `auto:quality` requests served by the best model that fits the card.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.report import record, table
from controller.domain.catalog import default_quality
from controller.settings import ControllerSettings
from controller.simulated import simulated_stack
from gpu_agent.sim.catalog import CHECKPOINTS, OLLAMA_MODELS, OllamaModelSpec
from gpu_agent.sim.desktop import SimDesktop
from gpu_agent.sim.gpu import RTX_4070_SUPER
from gpu_agent.sim.workflows import SD15, SDXL, text_to_image
from gpu_agent.sim.workload import (
    Arrival,
    ImageArrival,
    LlmArrival,
    busy_hour,
    fleet_hour,
    studio_day,
)
from gpu_common.stats import percentile
from gpu_common.virtual_time import run_virtual

POLL_SIM_S = 0.5
BASELINE_MODEL = {"auto:fast": "llama3.2:3b", "auto:quality": "qwen2.5:14b"}
TOKEN = "bench-token"
POLICIES = ("controller", "direct", "keep_alive_0", "reactive_free")
# Seeds per scenario in `make bench`, sized so the whole of `make bench` fits in about ten
# minutes on 2 cores: a controller run costs about 12 CPU seconds per simulated busy hour, most of
# it the agents' once-a-second polling, so a simulated day costs minutes. BENCH_SEEDS=n (or
# `python -m bench.scheduling n`) runs n seeds of every scenario instead.
DEFAULT_SEEDS: dict[str, int] = {"busy_hour": 20, "fleet_4": 2, "studio_day": 1}
# Generous: a request may wait behind a whole burst of image jobs.
HTTP_TIMEOUT_S = 3600.0
DEFAULT_CONTEXT = 4096


@dataclass(frozen=True, slots=True)
class Scenario:
    """A workload and the number of desktops it runs on."""

    name: str
    desktops: int
    arrivals: Callable[[int], list[Arrival]]
    # How often the agents sample the GPU and re-read Ollama and ComfyUI.
    sample_interval_s: float = 1.0


SCENARIOS: dict[str, Scenario] = {
    "busy_hour": Scenario("busy_hour", 1, lambda seed: busy_hour(seed=seed)),
    # A day is mostly quiet: the agent samples every 5 s, as a studio would set it for a day
    # and night of work, which keeps a simulated day to a few CPU minutes.
    "studio_day": Scenario("studio_day", 1, lambda seed: studio_day(seed=seed), 5.0),
    "fleet_4": Scenario("fleet_4", 4, lambda seed: fleet_hour(seed=seed, desktops=4)),
}


def best_fitting_model(models: Sequence[OllamaModelSpec] = OLLAMA_MODELS) -> str:
    """The highest-quality model (by the controller's own default scores) that fits the card's
    budget fully on the GPU at the default context: what `auto:quality` should get."""
    budget = RTX_4070_SUPER.total_bytes - ControllerSettings.model_fields["reserve_bytes"].default
    fitting = [m for m in models if m.required_bytes(DEFAULT_CONTEXT) <= budget]
    best = max(fitting, key=lambda m: default_quality(m.name, m.family, m.parameter_size))
    return best.name


@dataclass
class Outcome:
    """What one run of one policy on one seed measured, in simulated seconds."""

    llm_latency_s: list[float] = field(default_factory=list)
    image_turnaround_s: list[float] = field(default_factory=list)
    eval_counts: dict[int, int] = field(default_factory=dict)
    llm_failed: int = 0
    image_failed: int = 0
    first_arrival_s: float = 0.0
    last_done_s: float = 0.0
    quality_models: dict[str, int] = field(default_factory=dict)
    oom: int = 0
    spilled: int = 0


class Replay:
    """Plays the arrivals in simulated time through `llm` and `image` callables."""

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
        image: Callable[[int, ImageArrival], Awaitable[bool]],
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
                    if arrival.intent == "auto:quality":
                        quality = self.outcome.quality_models
                        quality[model] = quality.get(model, 0) + 1
                else:
                    self.outcome.llm_failed += 1
            else:
                if await image(index, arrival):
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


def _client_id(index: int) -> str:
    # Fixed per arrival, so nothing in a run depends on a random draw.
    return str(uuid.UUID(int=index + 1))


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
    http: httpx.AsyncClient, desktop: SimDesktop, index: int, arrival: ImageArrival
) -> bool:
    response = await http.post(
        "/prompt", json={"prompt": workflow_for(arrival), "client_id": _client_id(index)}
    )
    if response.status_code != 200:
        return False
    prompt_id = response.json()["prompt_id"]
    while True:
        entry = (await http.get(f"/history/{prompt_id}")).json()
        if entry:
            return bool(entry[prompt_id]["status"]["status_str"] == "success")
        await desktop.clock.sleep(POLL_SIM_S)


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


def _tally_desktops(outcome: Outcome, desktops: Sequence[SimDesktop]) -> Outcome:
    outcome.oom = sum(d.comfyui.stats.failed_oom for d in desktops)
    outcome.spilled = sum(d.ollama.stats.spilled_generations for d in desktops)
    return outcome


async def _start_desktops(count: int, data_dir: Path, seed: int) -> list[SimDesktop]:
    desktops = [SimDesktop(seed=seed, data_dir=data_dir / f"desktop-{i + 1}") for i in range(count)]
    for desktop in desktops:
        await desktop.start()
    return desktops


async def run_baseline(
    policy: str, arrivals: list[Arrival], data_dir: Path, *, desktops: int, seed: int
) -> Outcome:
    """One run of a baseline policy: clients talk to Ollama and ComfyUI themselves."""
    desks = await _start_desktops(desktops, data_dir, seed)
    timeout = httpx.Timeout(HTTP_TIMEOUT_S, connect=60.0)
    limits = httpx.Limits(max_connections=400, keepalive_expiry=None)
    keep_alive = 0.0 if policy == "keep_alive_0" else None
    try:
        async with contextlib.AsyncExitStack() as stack:
            ollamas = [
                await stack.enter_async_context(
                    httpx.AsyncClient(base_url=d.ollama_url, timeout=timeout, limits=limits)
                )
                for d in desks
            ]
            comfys = [
                await stack.enter_async_context(
                    httpx.AsyncClient(base_url=d.comfyui_url, timeout=timeout, limits=limits)
                )
                for d in desks
            ]
            stop = asyncio.Event()
            freers = []
            if policy == "reactive_free":
                for comfy, desktop in zip(comfys, desks, strict=True):
                    freers.append(asyncio.create_task(_reactive_free(comfy, desktop, stop)))
            try:
                outcome = await Replay(desks[0]).run(
                    arrivals,
                    lambda i, a: _direct_llm(ollamas[i % desktops], i, a, keep_alive=keep_alive),
                    lambda i, a: _direct_image(comfys[i % desktops], desks[i % desktops], i, a),
                )
            finally:
                stop.set()
                await asyncio.gather(*freers)
    finally:
        for desktop in desks:
            await desktop.stop()
    return _tally_desktops(outcome, desks)


async def run_controller(
    arrivals: list[Arrival],
    data_dir: Path,
    *,
    desktops: int,
    seed: int,
    sample_interval_s: float = 1.0,
) -> Outcome:
    """One run with every request through the controller, on production settings."""
    desks = await _start_desktops(desktops, data_dir, seed)
    try:
        async with simulated_stack(
            desks,
            data_dir / "controller",
            token=TOKEN,
            llm_wait_s=HTTP_TIMEOUT_S,
            sample_interval_s=sample_interval_s,
        ) as stack:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            timeout = httpx.Timeout(HTTP_TIMEOUT_S, connect=60.0)
            async with httpx.AsyncClient(
                base_url=stack.controller.url, headers=headers, timeout=timeout,
                limits=httpx.Limits(max_connections=400, keepalive_expiry=None),
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

                async def image(index: int, arrival: ImageArrival) -> bool:
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

                outcome = await Replay(desks[0]).run(arrivals, llm, image)
    finally:
        for desktop in desks:
            await desktop.stop()
    return _tally_desktops(outcome, desks)


def lower_bound_s(arrivals: list[Arrival], eval_counts: dict[int, int], desktops: int) -> float:
    """All GPU work back to back at full speed, spread evenly over `desktops`, each model loaded
    once per desktop; and no earlier than the last arrival plus its own work."""
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
    serial = sum(works) / desktops + loads
    last_index = max(range(len(arrivals)), key=lambda i: arrivals[i].at_s)
    by_arrival = arrivals[last_index].at_s - arrivals[0].at_s + works[last_index]
    return max(serial, by_arrival)


def run_one(scenario_name: str | Scenario, policy: str, seed: int) -> dict[str, Any]:
    """One (scenario, policy, seed) run on a fresh virtual-time loop; plain JSON-able figures."""
    scenario = SCENARIOS[scenario_name] if isinstance(scenario_name, str) else scenario_name
    arrivals = scenario.arrivals(seed)
    with tempfile.TemporaryDirectory(prefix="bench-sched-") as tmp:
        folder = Path(tmp)
        if policy == "controller":
            coro = run_controller(
                arrivals,
                folder,
                desktops=scenario.desktops,
                seed=seed,
                sample_interval_s=scenario.sample_interval_s,
            )
        else:
            coro = run_baseline(policy, arrivals, folder, desktops=scenario.desktops, seed=seed)
        outcome = run_virtual(coro)
    quality_total = sum(outcome.quality_models.values())
    best = best_fitting_model()
    return {
        "oom": outcome.oom,
        "spilled": outcome.spilled,
        "failed": outcome.llm_failed + outcome.image_failed,
        "makespan_s": outcome.last_done_s - outcome.first_arrival_s,
        "llm_p95_s": percentile(outcome.llm_latency_s, 95),
        "image_p95_s": percentile(outcome.image_turnaround_s, 95),
        "eval_counts": outcome.eval_counts,
        "quality_top_share": (
            outcome.quality_models.get(best, 0) / quality_total if quality_total else 1.0
        ),
        "quality_models": outcome.quality_models,
    }


def _spread(values: list[float], *, higher_is_worse: bool = True) -> dict[str, float]:
    worst = max(values) if higher_is_worse else min(values)
    return {"mean": round(statistics.fmean(values), 4), "worst": round(worst, 4)}


def summarize(
    scenario: Scenario, seeds: Sequence[int], runs: dict[tuple[str, int], dict[str, Any]]
) -> dict[str, Any]:
    """The `scheduling.scenarios.<scenario>` section: totals and mean/worst over seeds."""
    bounds = {
        seed: lower_bound_s(
            scenario.arrivals(seed), runs[("direct", seed)]["eval_counts"], scenario.desktops
        )
        for seed in seeds
    }
    policies: dict[str, Any] = {}
    for policy in POLICIES:
        per_seed = [runs[(policy, seed)] for seed in seeds]
        figures: dict[str, Any] = {
            "oom": sum(r["oom"] for r in per_seed),
            "spilled": sum(r["spilled"] for r in per_seed),
            "failed": sum(r["failed"] for r in per_seed),
            "makespan_over_bound": _spread(
                [r["makespan_s"] / bounds[seed] for r, seed in zip(per_seed, seeds, strict=True)]
            ),
            "llm_p95_s": _spread([r["llm_p95_s"] for r in per_seed]),
            "image_p95_s": _spread([r["image_p95_s"] for r in per_seed]),
        }
        if policy == "controller":
            figures["quality_top_share"] = _spread(
                [r["quality_top_share"] for r in per_seed], higher_is_worse=False
            )
            served: dict[str, int] = {}
            for r in per_seed:
                for model, count in r["quality_models"].items():
                    served[model] = served.get(model, 0) + count
            figures["auto_quality_served_by"] = dict(sorted(served.items()))
        policies[policy] = figures
    arrivals = scenario.arrivals(seeds[0])
    llm_count = sum(isinstance(a, LlmArrival) for a in arrivals)
    return {
        "seeds": len(seeds),
        "desktops": scenario.desktops,
        "workload_seed_0": {"llm_requests": llm_count, "image_jobs": len(arrivals) - llm_count},
        "lower_bound_s": _spread(list(bounds.values())),
        "policies": policies,
    }


def targets(scenarios: dict[str, Any]) -> dict[str, bool]:
    """The controller's targets, checked per scenario."""
    met: dict[str, bool] = {}
    for name, section in scenarios.items():
        ours = section["policies"]["controller"]
        best_baseline_p95 = min(
            section["policies"][p]["llm_p95_s"]["mean"] for p in POLICIES if p != "controller"
        )
        met[f"{name}.no_oom_spill_or_failure"] = (
            ours["oom"] == 0 and ours["spilled"] == 0 and ours["failed"] == 0
        )
        met[f"{name}.makespan_mean_within_1_05"] = ours["makespan_over_bound"]["mean"] <= 1.05
        met[f"{name}.makespan_worst_within_1_10"] = ours["makespan_over_bound"]["worst"] <= 1.10
        met[f"{name}.llm_p95_not_worse_than_best_baseline"] = (
            ours["llm_p95_s"]["mean"] <= best_baseline_p95
        )
        met[f"{name}.quality_top_share_at_least_0_9"] = ours["quality_top_share"]["mean"] >= 0.9
    return met


def seeds_from_environment() -> dict[str, int]:
    """`DEFAULT_SEEDS`, or BENCH_SEEDS seeds of every scenario when that is set."""
    override = os.environ.get("BENCH_SEEDS")
    if override:
        return dict.fromkeys(SCENARIOS, int(override))
    return dict(DEFAULT_SEEDS)


def run(
    *,
    seeds: int | dict[str, int] | None = None,
    scenarios: Sequence[str] = tuple(SCENARIOS),
    workers: int | None = None,
    save: bool = True,
) -> dict[str, Any]:
    """Every (scenario, policy, seed) run, spread over worker processes; prints a table per
    scenario and records the `scheduling` section of out/bench.json."""
    if seeds is None:
        seeds = seeds_from_environment()
    per_scenario = seeds if isinstance(seeds, dict) else dict.fromkeys(scenarios, seeds)
    seed_lists = {name: list(range(per_scenario[name])) for name in scenarios}
    jobs = [(s, p, seed) for s in scenarios for p in POLICIES for seed in seed_lists[s]]
    workers = workers or os.cpu_count() or 1
    results: dict[tuple[str, str, int], dict[str, Any]] = {}
    if workers == 1:
        for job in jobs:
            results[job] = run_one(*job)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for job, result in zip(jobs, pool.map(run_one, *zip(*jobs, strict=True)), strict=True):
                results[job] = result
    sections: dict[str, Any] = {}
    for name in scenarios:
        seed_list = seed_lists[name]
        runs = {(p, seed): results[(name, p, seed)] for p in POLICIES for seed in seed_list}
        sections[name] = summarize(SCENARIOS[name], seed_list, runs)
        _print_table(name, sections[name])
    met = targets(sections)
    print("targets:", ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in met.items()))
    figures = {"scenarios": sections, "targets": met, "best_fitting_model": best_fitting_model()}
    if save:
        record("scheduling", figures)
    return figures


def _print_table(name: str, section: dict[str, Any]) -> None:
    columns = ["policy", "oom", "spilled", "failed", "/bound mean", "/bound worst",
               "llm p95 mean", "llm p95 worst", "img p95 mean", "img p95 worst"]  # fmt: skip
    rows = []
    for policy, f in section["policies"].items():
        rows.append([
            policy, f["oom"], f["spilled"], f["failed"],
            f["makespan_over_bound"]["mean"], f["makespan_over_bound"]["worst"],
            f["llm_p95_s"]["mean"], f["llm_p95_s"]["worst"],
            f["image_p95_s"]["mean"], f["image_p95_s"]["worst"],
        ])  # fmt: skip
    share = section["policies"]["controller"]["quality_top_share"]
    table(
        f"Scheduling, {name}: {section['seeds']} seeds, {section['desktops']} desktop(s) "
        f"(simulated seconds); controller quality_top_share mean {share['mean']}, "
        f"worst {share['worst']}",
        columns,
        rows,
    )


if __name__ == "__main__":
    run(seeds=int(sys.argv[1]) if len(sys.argv) > 1 else None)
