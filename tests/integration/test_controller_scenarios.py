"""The controller's scenarios end to end: one ledger across Ollama and ComfyUI on one 12 GB card.

Everything goes through real sockets: the controller's HTTP API, the agent's API and event
stream, the emulated Ollama and ComfyUI on the simulated desktop, all on the virtual-time loop
at realistic speed (a cold qwen2.5:14b load takes 5.5 simulated seconds, an SDXL step 0.24 s).
Each scenario checks what the desktop itself saw (no out-of-memory, no CPU spill), not only what
the controller says.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gpu_agent.daemon import running_agent
from gpu_agent.sim.desktop import SimDesktop
from tests.integration.stack import (
    POLL_S,
    Stack,
    agent_settings,
    drain,
    running_controller_on,
    running_stack,
    sd15,
    sdxl,
)
from tests.waiting import wait_until

BIG = "qwen2.5:14b"
SMALL = "llama3.2:3b"
MID = "qwen2.5:7b"
# Deadlines in simulated seconds, sized to the work they wait for (see hardware-figures.md).
# A 14b generation of a few hundred tokens at 45 tokens/s, its load included.
GENERATION_TIMEOUT_S = 60.0
# Several models loaded and unloaded in turn, and SDXL and SD1.5 images between them: about
# 35 simulated seconds of work.
BURST_TIMEOUT_S = 120.0


@pytest.fixture
async def stack(desktop: SimDesktop, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(desktop, tmp_path / "controller") as running:
        yield running


def assert_no_collision(stack: Stack) -> None:
    """Nothing ran out of memory, fell back to low-VRAM mode or spilled to the CPU."""
    comfy, ollama = stack.desktop.comfyui.stats, stack.desktop.ollama.stats
    assert comfy.failed_oom == 0
    assert comfy.lowvram_runs == 0
    assert ollama.spilled_generations == 0


async def load_pinned(stack: Stack, model: str) -> None:
    """Serve one short generation of `model`, which keeps it loaded until unloaded."""
    # keep_alive -1: the model stays until someone unloads it, so any unload seen later is
    # the controller's doing, not Ollama's expiry.
    response = await stack.generate(model, keep_alive=-1, options={"num_predict": 8})
    assert response.status_code == 200, response.text
    assert response.headers["X-GPU-Model"] == model
    assert model in stack.resident()


class Stream:
    """A streamed generation through the controller, read in the background.

    `runs_at_done` is how many prompts ComfyUI had run when the final line arrived.
    """

    def __init__(self, stack: Stack, body: dict[str, Any]) -> None:
        self.started = asyncio.Event()
        self.headers: dict[str, str] = {}
        self.lines: list[dict[str, Any]] = []
        self.runs_at_done: int | None = None
        self.task = asyncio.create_task(self._read(stack, body))

    async def _read(self, stack: Stack, body: dict[str, Any]) -> None:
        async with stack.http.stream("POST", "/api/generate", json=body) as response:
            assert response.status_code == 200
            self.headers = dict(response.headers)
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                chunk = json.loads(line)
                self.lines.append(chunk)
                self.started.set()
                if chunk.get("done"):
                    self.runs_at_done = stack.desktop.comfyui.stats.prompts_run

    async def finished(self, timeout_s: float = GENERATION_TIMEOUT_S) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout_s):
            await self.task
        assert self.lines, "the stream ended without a line"
        return self.lines


# -- 1-3: one ledger across Ollama and ComfyUI --------------------------------------------------


async def test_idle_14b_is_unloaded_for_an_sdxl_job(stack: Stack) -> None:
    await load_pinned(stack, BIG)

    job = await stack.submit(sdxl(steps=10))
    done = await stack.wait_job(job["id"])

    assert done["state"] == "succeeded", done
    assert done["agent"] == "desk"
    assert BIG not in stack.resident()
    assert stack.desktop.ollama.stats.unloads >= 1
    assert stack.desktop.comfyui.stats.prompts_run == 1
    assert_no_collision(stack)


async def test_sdxl_job_waits_for_a_busy_14b_then_runs(stack: Stack) -> None:
    # Seed 2 makes this prompt's answer run to ~290 tokens: about 6.5 simulated seconds at 45
    # tokens/s, long enough to watch the job held behind it.
    await load_pinned(stack, BIG)
    stream = Stream(
        stack,
        {
            "model": BIG,
            "prompt": "tell a long story",
            "options": {"num_predict": 2000, "seed": 2},
        },
    )
    try:
        async with asyncio.timeout(GENERATION_TIMEOUT_S):
            await stream.started.wait()
        job = await stack.submit(sdxl(steps=10))

        async def held_for_14b() -> dict[str, Any] | None:
            current = await stack.job(job["id"])
            return current if f"{BIG} busy" in current["reason"] else None

        held = await wait_until(held_for_14b, poll_s=POLL_S, what="the job held for the busy 14b")
        assert held["state"] == "held"
        fleet = await stack.fleet()
        reasons = {j["id"]: j["reason"] for j in fleet["held_jobs"]}
        assert f"{BIG} busy" in reasons[job["id"]]
        assert not stream.task.done(), "the generation was still streaming"

        lines = await stream.finished()
    finally:
        await drain(stream.task)
    # The generation ran to its natural end; no image ran while it streamed.
    assert lines[-1]["done"] is True
    assert lines[-1]["done_reason"] == "stop"
    assert stream.runs_at_done == 0

    done = await stack.wait_job(job["id"])
    assert done["state"] == "succeeded", done
    assert stack.desktop.comfyui.stats.prompts_run == 1
    assert_no_collision(stack)


async def test_llm_after_images_frees_comfyui_first(stack: Stack) -> None:
    job = await stack.submit(sdxl(steps=10))
    assert (await stack.wait_job(job["id"]))["state"] == "succeeded"
    comfy_before = stack.comfy_bytes()
    assert stack.desktop.comfyui.loaded_checkpoints(), "SDXL stays cached after the job"

    response = await stack.generate(BIG, options={"num_predict": 16})

    assert response.status_code == 200, response.text
    assert response.headers["X-GPU-Model"] == BIG
    assert "free ComfyUI's cache" in response.headers["X-GPU-Reason"]
    assert stack.comfy_bytes() < comfy_before
    assert not stack.desktop.comfyui.loaded_checkpoints()
    size, on_gpu = stack.resident()[BIG]
    assert on_gpu == size, "qwen2.5:14b is loaded fully on the GPU"
    assert response.json()["done"] is True
    assert_no_collision(stack)


async def test_plans_made_while_comfyui_frees_do_not_count_its_cache_twice(stack: Stack) -> None:
    """Plans that pile up while a ComfyUI free is under way see the cache as already gone: a
    second LLM must not count on the same freed bytes, nor an SDXL job on reusing the SDXL
    weights the free is about to drop."""
    first = await stack.submit(sdxl(steps=10))
    assert (await stack.wait_job(first["id"]))["state"] == "succeeded"
    models = {m["name"]: m for m in (await stack.http.get("/v1/catalog")).json()["models"]}
    both_bytes = models[MID]["vram_bytes"] + models[SMALL]["vram_bytes"]

    faults = stack.desktop.comfyui.faults
    faults.hang()  # ComfyUI answers nothing, so the free for the first plan stays under way
    try:
        mid = asyncio.create_task(stack.generate(MID, options={"num_predict": 16}))

        async def promised(nbytes: int) -> bool:
            return bool((await stack.fleet())["agents"][0]["pending_bytes"] >= nbytes)

        # 7b does not fit beside the SDXL cache: its plan frees ComfyUI, and that hangs.
        await wait_until(
            lambda: promised(models[MID]["vram_bytes"]), poll_s=POLL_S, what="the 7b plan"
        )
        small = asyncio.create_task(stack.generate(SMALL, options={"num_predict": 16}))
        job = await stack.submit(sdxl(steps=10, seed=2))

        async def decided() -> bool:
            current = await stack.job(job["id"])
            return await promised(both_bytes) and current["reason"] != "waiting for GPU memory"

        await wait_until(decided, poll_s=POLL_S, what="the 3b load promised and the job decided")
        held = await stack.job(job["id"])
        # The job would reuse SDXL's weights, but they are on their way out: it waits.
        assert held["state"] == "held", held
    finally:
        faults.unhang()
    async with asyncio.timeout(GENERATION_TIMEOUT_S):
        answers = await asyncio.gather(mid, small)
    assert [a.status_code for a in answers] == [200, 200]
    # One free, planned once: the 3b counted on the bytes the 7b's free gives back.
    assert "free ComfyUI's cache" in answers[0].headers["X-GPU-Reason"]
    assert "free ComfyUI's cache" not in answers[1].headers["X-GPU-Reason"]
    done = await stack.wait_job(job["id"])
    assert done["state"] == "succeeded", done
    assert_no_collision(stack)


# -- 4: auto intents -------------------------------------------------------------------------


async def test_auto_fast_and_auto_quality_choose_different_models(stack: Stack) -> None:
    fast = await stack.generate("auto:fast", options={"num_predict": 16})
    quality = await stack.generate("auto:quality", options={"num_predict": 16})

    assert fast.status_code == quality.status_code == 200
    assert "auto:fast picks the lowest expected latency" in fast.headers["X-GPU-Reason"]
    assert "auto:quality picks the highest quality" in quality.headers["X-GPU-Reason"]
    assert fast.headers["X-GPU-Model"] == SMALL
    assert quality.headers["X-GPU-Model"] == BIG
    # Each answer comes from the model the header names.
    assert fast.json()["model"] == SMALL
    assert quality.json()["model"] == BIG
    models = {m["name"]: m for m in (await stack.http.get("/v1/catalog")).json()["models"]}
    assert models[BIG]["quality"] > models[SMALL]["quality"]
    # The best model of all does not fit the card; auto:quality never spills to the CPU.
    best_overall = max(models.values(), key=lambda m: m["quality"])
    assert not best_overall["fits"]
    assert best_overall["name"] != BIG
    assert_no_collision(stack)
    assert stack.desktop.ollama.stats.spilled_generations == 0


# -- 8: what the controller shows ---------------------------------------------------------------


async def test_models_fleet_and_metrics_show_what_was_learned(stack: Stack) -> None:
    before = {m["name"]: m for m in (await stack.http.get("/v1/catalog")).json()["models"]}
    assert not before[SMALL]["measured"]
    assert before[SMALL]["samples"] == 0

    for _ in range(2):
        response = await stack.generate(SMALL, "a" * 400, options={"num_predict": 64})
        assert response.status_code == 200
    held = await stack.submit_unplaceable()
    job = await stack.submit(sd15(steps=4))
    assert (await stack.wait_job(job["id"]))["state"] == "succeeded"

    models = (await stack.http.get("/v1/catalog")).json()
    (small,) = [m for m in models["models"] if m["name"] == SMALL]
    assert small["measured"] is True
    assert small["samples"] == 2
    assert small["resident_on"] == ["desk"]
    assert small["agents"] == ["desk"]
    # Learned from Ollama's own counters: the simulated card decodes 3b at 165 tokens/s.
    assert small["decode_tokens_per_s"] == pytest.approx(165.0, rel=0.1)
    assert small["vram_bytes"] == stack.resident()[SMALL][1]
    assert models["image_footprints_bytes"]["sd15:512x512x1"] > 0

    fleet = await stack.fleet()
    (agent,) = fleet["agents"]
    assert agent["name"] == "desk"
    assert agent["healthy"] is True
    assert agent["connected"] is True
    assert agent["gpus"][0]["name"] == "NVIDIA GeForce RTX 4070 SUPER"
    assert agent["budget_bytes"] == agent["gpus"][0]["memory_total_bytes"] - 512 * 1024**2
    assert [m["name"] for m in agent["resident"]] == [SMALL]
    assert agent["image_running"] is None
    (held_info,) = fleet["held_jobs"]
    assert held_info["id"] == held["id"]
    assert held_info["reason"].startswith("needs ")
    assert fleet["jobs_by_state"] == {"held": 1, "succeeded": 1}

    text = (await stack.http.get("/metrics")).text
    for line in (
        'gpu_controller_agent_healthy{agent="desk"} 1.0',
        'gpu_controller_image_jobs{state="held"} 1.0',
        'gpu_controller_image_jobs{state="succeeded"} 1.0',
        "gpu_controller_llm_requests_in_flight 0.0",
    ):
        assert line in text
    for name in ("agent_budget_bytes", "agent_used_bytes", "agent_free_bytes", "agent_draining"):
        assert f'gpu_controller_{name}{{agent="desk"}}' in text
    assert "gpu_controller_policy_decisions" in text


# -- everything at once ----------------------------------------------------------------------


async def test_a_burst_of_mixed_work_shares_the_card_without_collisions(
    desktop: SimDesktop, tmp_path: Path
) -> None:
    """LLM requests for every size and image jobs of both families, all at once: every plan
    that frees ComfyUI's cache or unloads a model is charged in the ledger before the next
    plan is made, so nothing runs out of memory, falls back to low-VRAM or spills."""
    # Requests queue behind each other and behind image jobs here, so they may wait longer
    # than the stack's usual limit for room.
    async with running_stack(desktop, tmp_path / "controller", llm_wait_s=BURST_TIMEOUT_S) as stack:
        await burst(stack)


async def burst(stack: Stack) -> None:
    models = ["auto:fast", BIG, MID, "auto:quality", SMALL, "auto", BIG, MID]
    workflows = [sdxl(steps=10, seed=1), sd15(seed=2), sdxl(steps=10, seed=3), sd15(seed=4)]

    async def ask(n: int, model: str) -> str:
        response = await stack.generate(model, f"question {n}", options={"num_predict": 40})
        assert response.status_code == 200, response.text
        assert response.json()["done"] is True
        return response.headers["X-GPU-Model"]

    async def draw(workflow: dict[str, Any]) -> dict[str, Any]:
        job = await stack.submit(workflow)
        return await stack.wait_job(job["id"], timeout_s=BURST_TIMEOUT_S)

    async with asyncio.timeout(BURST_TIMEOUT_S):
        served, jobs = await asyncio.gather(
            asyncio.gather(*(ask(n, model) for n, model in enumerate(models))),
            asyncio.gather(*(draw(workflow) for workflow in workflows)),
        )

    assert all(job["state"] == "succeeded" for job in jobs), jobs
    assert served[1] == BIG
    assert served[4] == SMALL
    assert stack.desktop.comfyui.stats.prompts_run == len(workflows)
    assert_no_collision(stack)


async def test_a_short_image_between_two_telemetry_samples_is_learned_at_its_true_peak(
    desktop: SimDesktop, tmp_path: Path
) -> None:
    """With telemetry every 10 s an SD1.5 image comes and goes between two snapshots. Its
    footprint is learned from the agent's readings during the run, not from the snapshots,
    which would show only ComfyUI's context and plan the next job into an out-of-memory
    failure (a chaos day found this)."""
    sparse = agent_settings().model_copy(update={"sample_interval_s": 10.0, "stale_after_s": 30.0})
    async with (
        running_agent(sparse, desktop) as agent,
        running_controller_on(agent.url, tmp_path / "controller", stale_after_s=30.0) as (
            controller,
            http,
        ),
    ):
        stack = Stack(desktop=desktop, agent=agent, controller=controller, http=http)
        job = await stack.submit(sd15(steps=4))
        assert (await stack.wait_job(job["id"]))["state"] == "succeeded"
        held_after = stack.comfy_bytes()
        learned = (await http.get("/v1/catalog")).json()["image_footprints_bytes"]
        assert learned["sd15:512x512x1"] >= held_after
