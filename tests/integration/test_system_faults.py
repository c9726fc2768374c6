"""System-level faults: the controller, a real agent and the simulated desktop, with one part
failing at a time.

For each fault the system keeps serving what it can, shows the fault where an operator looks
(the controller's `/v1/fleet` and `/metrics`, the agent's `/v1/status` and `/metrics`), and
every accepted image job ends exactly once, in a final state whose reason says what happened.
Everything runs over real loopback sockets on the virtual-time loop, at realistic speed: every
duration and deadline here is in simulated seconds.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.chaos.proxy import LinkProxy
from gpu_agent.daemon import RunningAgent, running_agent
from gpu_agent.settings import AgentSettings
from gpu_agent.sim.desktop import SimDesktop
from gpu_agent.sim.ollama import MIDSTREAM_ERROR
from gpu_agent.sim.workflows import SD15, text_to_image
from gpu_common import clock
from tests import waiting
from tests.integration.error_bodies import error_of
from tests.integration.stack import (
    AGENT_TOKEN,
    JOB_TIMEOUT_S,
    PNG_SIGNATURE,
    POLL_S,
    Stack,
    agent_settings,
    free_port,
    ndjson_lines,
    running_controller_on,
    running_stack,
    sd15,
    sdxl,
)
from tests.waiting import wait_until

SMALL = "llama3.2:3b"
AGENT_AUTH = {"Authorization": f"Bearer {AGENT_TOKEN}"}
# An LLM request that nothing can serve gets its 503 after this long, not the stack's 30 s.
LLM_WAIT_S = 5.0
# The agent's limits on Ollama in the hung and slow Ollama scenarios: one ordinary request, and
# the first byte of a generation (which may wait for a load; 3b loads in 2 s).
AGENT_REQUEST_TIMEOUT_S = 10.0
AGENT_LOAD_TIMEOUT_S = 30.0
# The controller's limit on a load through the agent: beyond the agent's, so the agent's clear
# error arrives first.
CONTROLLER_LOAD_TIMEOUT_S = 60.0


# -- helpers ---------------------------------------------------------------------------------------


@pytest.fixture
async def stack(desktop: SimDesktop, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(desktop, tmp_path / "controller", llm_wait_s=LLM_WAIT_S) as running:
        yield running


def metric_value(text: str, line_start: str) -> float:
    """The value of the one exposition line that starts with `line_start` (name and labels)."""
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric line {line_start!r} in:\n{text}")


async def controller_metric(stack: Stack, line_start: str) -> float:
    return metric_value((await stack.http.get("/metrics")).text, line_start)


@contextlib.asynccontextmanager
async def agent_client(agent_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=agent_url, headers=AGENT_AUTH, timeout=5.0, trust_env=False
    ) as http:
        yield http


async def agent_status(agent_url: str) -> dict[str, Any]:
    async with agent_client(agent_url) as http:
        response = await http.get("/v1/status")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


async def agent_metric(agent_url: str, line_start: str) -> float:
    async with agent_client(agent_url) as http:
        return metric_value((await http.get("/metrics")).text, line_start)


async def fleet_agent(stack: Stack) -> dict[str, Any]:
    (agent,) = (await stack.fleet())["agents"]
    body: dict[str, Any] = agent
    return body


async def wait_fleet(stack: Stack, healthy: bool, what: str) -> dict[str, Any]:
    """The fleet's one agent once its `healthy` flag is `healthy`."""

    async def reached() -> dict[str, Any] | None:
        agent = await fleet_agent(stack)
        return agent if agent["healthy"] is healthy else None

    result: dict[str, Any] = await wait_until(reached, poll_s=POLL_S, what=what)
    return result


async def wait_all_final(
    stack: Stack, job_ids: list[str], timeout_s: float = JOB_TIMEOUT_S
) -> dict[str, dict[str, Any]]:
    return await waiting.wait_all_final(stack.job, job_ids, timeout_s=timeout_s, poll_s=POLL_S)


async def assert_succeeded_once(stack: Stack, jobs: dict[str, dict[str, Any]]) -> None:
    """Every job succeeded with one PNG, and ComfyUI completed exactly one prompt per job."""
    for job_id, job in jobs.items():
        assert job["state"] == "succeeded", job
        assert job["reason"].startswith("finished on desk"), job
        assert job["outputs"] == [f"/v1/images/{job_id}/outputs/0"]
        output = await stack.http.get(job["outputs"][0])
        assert output.status_code == 200
        assert output.content.startswith(PNG_SIGNATURE)
    stats = stack.desktop.comfyui.stats
    assert stats.succeeded == len(jobs)
    assert stats.failed_oom == 0
    counts = stack.engine.images.counts()
    assert counts.get("succeeded", 0) == len(jobs)
    assert not set(counts) - {"succeeded", "failed", "cancelled"}


async def wait_running(stack: Stack, job_id: str) -> dict[str, Any]:
    """The job once ComfyUI is executing it (a sampler step reported)."""

    async def sampling() -> dict[str, Any] | None:
        job = await stack.job(job_id)
        progress = job.get("progress") or {}
        return job if job["state"] == "running" and progress.get("step") else None

    result: dict[str, Any] = await wait_until(
        sampling, poll_s=POLL_S, what=f"job {job_id} sampling"
    )
    return result


# -- 1. ComfyUI restarts mid-prompt ----------------------------------------------------------------


async def test_comfyui_restart_mid_prompt_ends_every_job_once(stack: Stack) -> None:
    # 50 SDXL steps: 12 simulated seconds of sampling, so the restart comes mid-prompt.
    first = await stack.submit(sdxl(steps=50, seed=1))
    second = await stack.submit(sd15(steps=20, seed=2))
    await wait_running(stack, first["id"])
    lost_runs = stack.desktop.comfyui.stats.prompts_run

    await stack.desktop.restart_comfyui()

    jobs = await wait_all_final(stack, [first["id"], second["id"]])
    assert jobs[second["id"]]["state"] == "succeeded", jobs[second["id"]]
    lost = jobs[first["id"]]
    if lost["state"] == "failed":
        assert "restarted" in lost["reason"], lost
        assert stack.desktop.comfyui.stats.succeeded == 1
    else:
        await assert_succeeded_once(stack, jobs)
    # Whatever happened, no prompt completed twice and nothing is left out on the agent.
    assert stack.desktop.comfyui.stats.succeeded <= 2
    assert stack.desktop.comfyui.stats.prompts_run >= lost_runs + 1
    assert (await stack.fleet())["held_jobs"] == []
    agent = await fleet_agent(stack)
    assert agent["healthy"] is True
    assert agent["image_running"] is None


async def test_job_lost_by_a_comfyui_restart_runs_again_and_succeeds(stack: Stack) -> None:
    job = await stack.submit(sdxl(steps=50, seed=1))
    await wait_running(stack, job["id"])
    runs_before = stack.desktop.comfyui.stats.prompts_run

    await stack.desktop.restart_comfyui()

    jobs = await wait_all_final(stack, [job["id"]])
    await assert_succeeded_once(stack, jobs)
    # The lost prompt was dispatched once more and ran once more, to completion once.
    assert jobs[job["id"]]["attempts"] == 2
    assert stack.desktop.comfyui.stats.prompts_run == runs_before + 1


# -- 2. ComfyUI's websocket dropped, then silent ---------------------------------------------------


async def test_dropped_and_silent_comfyui_websocket_still_finishes_jobs(
    desktop: SimDesktop, tmp_path: Path
) -> None:
    # The agent distrusts a websocket quiet for `stale_after_s` (5 s) with work outstanding;
    # 100 SDXL steps (24 simulated seconds) outlast that, so the silent spell is found by polling.
    async with running_stack(desktop, tmp_path / "controller") as stack:
        first = await stack.submit(sdxl(steps=100, seed=1))
        await wait_running(stack, first["id"])
        await desktop.comfyui.drop_websockets()
        desktop.comfyui.faults.websocket_silent = True
        second = await stack.submit(sd15(steps=20, seed=2))
        third = await stack.submit(sdxl(steps=20, seed=3))

        async def polling() -> bool:
            status = await agent_status(stack.agent.url)
            return bool(status["comfyui"]["connection"] == "polling")

        await wait_until(polling, poll_s=POLL_S, what="the agent to fall back to polling ComfyUI")
        # The controller hears of it with the agent's next snapshot.
        await wait_until(
            lambda: fleet_connection(stack, "polling"),
            poll_s=POLL_S,
            what="the fleet to show the polling",
        )

        async def metric_shows_polling() -> bool:
            mode = 'gpu_agent_comfyui_connection{mode="polling"}'
            return bool(await agent_metric(stack.agent.url, mode))

        await wait_until(
            metric_shows_polling, poll_s=POLL_S, what="the agent's metrics to show the polling"
        )

        jobs = await wait_all_final(stack, [first["id"], second["id"], third["id"]])
        await assert_succeeded_once(stack, jobs)
        assert all(job["attempts"] == 1 for job in jobs.values())
        assert desktop.comfyui.stats.prompts_run == 3

        desktop.comfyui.faults.websocket_silent = False
        await wait_until(
            lambda: fleet_connection(stack, "websocket"),
            poll_s=POLL_S,
            what="the websocket trusted again",
        )


async def fleet_connection(stack: Stack, mode: str) -> bool:
    return bool((await fleet_agent(stack))["comfyui_connection"] == mode)


# -- 3. Ollama slow, hung, failing mid-stream, down ------------------------------------------------


def assert_within_the_agents_limits(elapsed_s: float) -> None:
    """The 503 came when one of the agent's limits on Ollama ran out: after its shortest, and
    before the controller's own limit (so the agent's clear error was the one that reached the
    caller)."""
    assert AGENT_REQUEST_TIMEOUT_S <= elapsed_s <= AGENT_LOAD_TIMEOUT_S + 1.0, elapsed_s


async def test_hung_ollama_fails_llm_requests_in_time_while_images_run(
    desktop: SimDesktop, tmp_path: Path
) -> None:
    async with custom_stack(
        desktop,
        tmp_path,
        agent={
            "request_timeout_s": AGENT_REQUEST_TIMEOUT_S,
            "load_timeout_s": AGENT_LOAD_TIMEOUT_S,
        },
        llm_wait_s=LLM_WAIT_S,
        load_timeout_s=CONTROLLER_LOAD_TIMEOUT_S,
    ) as stack:
        desktop.ollama.faults.hang()
        try:
            job = await stack.submit(sd15(steps=20))
            started = clock.monotonic_s()
            response = await stack.generate(SMALL, options={"num_predict": 8})
            elapsed_s = clock.monotonic_s() - started
            assert response.status_code == 503, response.text
            error = error_of(response)
            assert error["code"] == "agent_unavailable"
            assert "Ollama did not answer" in error["message"], error
            assert "in time" in error["message"], error
            # The agent's limit answered it, well before the controller's own.
            assert_within_the_agents_limits(elapsed_s)
            done = await stack.wait_job(job["id"])
            assert done["state"] == "succeeded", done

            async def ollama_down() -> bool:
                status = await agent_status(stack.agent.url)
                return not status["ollama"]["reachable"]

            await wait_until(ollama_down, poll_s=POLL_S, what="the agent to see Ollama hung")
            assert await agent_metric(stack.agent.url, "gpu_agent_ollama_up") == 0
        finally:
            desktop.ollama.faults.unhang()
        await wait_until(
            lambda: ollama_reachable(stack, True),
            poll_s=POLL_S,
            what="Ollama back in the controller's view",
        )
        response = await stack.generate(SMALL, options={"num_predict": 8})
        assert response.status_code == 200, response.text

        # Hung with the model resident: the generation itself gets no answer.
        desktop.ollama.faults.hang()
        try:
            started = clock.monotonic_s()
            response = await stack.generate(SMALL, options={"num_predict": 8})
            elapsed_s = clock.monotonic_s() - started
            assert response.status_code == 503, response.text
            assert "Ollama" in error_of(response)["message"]
            assert_within_the_agents_limits(elapsed_s)
        finally:
            desktop.ollama.faults.unhang()
        assert stack.engine.llm.in_flight == 0


async def test_slow_ollama_beyond_the_limits_gives_a_clear_error(
    desktop: SimDesktop, tmp_path: Path
) -> None:
    async with custom_stack(
        desktop,
        tmp_path,
        agent={
            "request_timeout_s": AGENT_REQUEST_TIMEOUT_S,
            "load_timeout_s": AGENT_LOAD_TIMEOUT_S,
        },
        llm_wait_s=LLM_WAIT_S,
        load_timeout_s=CONTROLLER_LOAD_TIMEOUT_S,
    ) as stack:
        # Every answer from Ollama comes after twice the agent's longest limit.
        desktop.ollama.faults.response_delay_s = 2 * AGENT_LOAD_TIMEOUT_S
        try:
            job = await stack.submit(sd15(steps=20))
            started = clock.monotonic_s()
            response = await stack.generate(SMALL, options={"num_predict": 8})
            elapsed_s = clock.monotonic_s() - started
            assert response.status_code == 503, response.text
            assert "Ollama did not answer" in error_of(response)["message"]
            assert_within_the_agents_limits(elapsed_s)
            assert (await stack.wait_job(job["id"]))["state"] == "succeeded"
        finally:
            desktop.ollama.faults.clear()
        await wait_until(
            lambda: ollama_reachable(stack, True),
            poll_s=POLL_S,
            what="Ollama back in the controller's view",
        )
        response = await stack.generate(SMALL, options={"num_predict": 8})
        assert response.status_code == 200, response.text


async def test_ollama_failing_mid_stream_reaches_the_client_as_its_error_line(
    stack: Stack,
) -> None:
    stack.desktop.ollama.faults.fail_stream_after_tokens = 3
    body = {"model": SMALL, "prompt": "tell a story", "options": {"num_predict": 64}}
    async with stack.http.stream("POST", "/api/generate", json=body) as response:
        assert response.status_code == 200
        lines = await ndjson_lines(response)
    assert [line.get("done") for line in lines[:3]] == [False, False, False]
    assert lines[3:] == [{"error": MIDSTREAM_ERROR}]
    # The request is over for the controller and the agent alike.
    assert stack.engine.llm.in_flight == 0
    await wait_until(
        lambda: stack.agent.service.in_flight == {},
        poll_s=POLL_S,
        what="the agent to count it as ended",
    )
    assert await controller_metric(stack, "gpu_controller_llm_requests_in_flight") == 0
    stack.desktop.ollama.faults.clear()
    response = await stack.generate(SMALL, options={"num_predict": 8})
    assert response.status_code == 200
    assert response.json()["done"] is True


async def test_ollama_failing_an_unstreamed_answer_reaches_the_client_with_its_error(
    stack: Stack,
) -> None:
    """Ollama fails a generation that is not streamed: its 500 and its error reach the client.

    Found by the chaos day (seed 1): the controller read the error body to tell Ollama's
    errors from the agent's, then passed on the emptied answer, a 500 with no body."""
    stack.desktop.ollama.faults.fail_stream_after_tokens = 3
    response = await stack.generate(SMALL, options={"num_predict": 64})
    assert response.status_code == 500, response.text
    assert response.json() == {"error": MIDSTREAM_ERROR}
    assert stack.engine.llm.in_flight == 0
    stack.desktop.ollama.faults.clear()
    response = await stack.generate(SMALL, options={"num_predict": 8})
    assert response.status_code == 200, response.text


async def test_a_dispatch_slowed_by_its_unload_is_not_submitted_before_the_room_is_made(
    stack: Stack,
) -> None:
    """An SDXL job must wait for qwen2.5:14b to be unloaded, and a slow Ollama makes that
    unload take seconds. The reconcile pass, which asks the agent about jobs it has heard
    nothing of, must leave a dispatch under way alone: once it found the prompt unknown and
    submitted it before the unload, into an out-of-memory failure (a chaos day found this)."""
    response = await stack.generate("qwen2.5:14b", options={"num_predict": 8})
    assert response.status_code == 200, response.text
    stack.desktop.ollama.faults.response_delay_s = 4.0
    try:
        job = await stack.submit(sdxl(steps=20))
        done = await stack.wait_job(job["id"])
    finally:
        stack.desktop.ollama.faults.clear()
    assert done["state"] == "succeeded", done
    assert done["attempts"] == 1
    stats = stack.desktop.comfyui.stats
    assert (stats.prompts_run, stats.failed_oom) == (1, 0)
    assert "qwen2.5:14b" not in stack.resident()


async def test_ollama_down_shows_in_the_fleet_and_images_still_run(stack: Stack) -> None:
    await stack.desktop.stop_ollama()
    try:
        agent = await wait_until(
            lambda: ollama_reachable(stack, False),
            poll_s=POLL_S,
            what="the fleet to show Ollama down",
        )
        assert agent["healthy"] is True, "images can still run there"
        assert "Ollama" in (agent["reason"] or ""), agent
        assert await controller_metric(stack, 'gpu_controller_agent_ollama_up{agent="desk"}') == 0
        assert await agent_metric(stack.agent.url, "gpu_agent_ollama_up") == 0

        response = await stack.generate(SMALL, options={"num_predict": 8})
        assert response.status_code == 503, response.text
        assert "Ollama" in error_of(response)["message"]

        job = await stack.submit(sd15(steps=20))
        done = await stack.wait_job(job["id"])
        assert done["state"] == "succeeded", done
    finally:
        await stack.desktop.start_ollama()
    agent = await wait_until(
        lambda: ollama_reachable(stack, True), poll_s=POLL_S, what="Ollama back"
    )
    assert agent["reason"] is None
    assert await controller_metric(stack, 'gpu_controller_agent_ollama_up{agent="desk"}') == 1
    response = await stack.generate(SMALL, options={"num_predict": 8})
    assert response.status_code == 200, response.text


async def ollama_reachable(stack: Stack, reachable: bool) -> dict[str, Any] | None:
    """The fleet's agent once the controller's view of its Ollama is `reachable`."""
    status = stack.engine.links["desk"].status
    if status is None or status.ollama.reachable is not reachable:
        return None
    return await fleet_agent(stack)


# -- 4. NVML errors: the agent cannot see its GPU's memory -----------------------------------------


async def test_no_new_work_on_an_agent_whose_memory_cannot_be_seen(stack: Stack) -> None:
    stack.desktop.probe.failing = True
    try:
        agent = await wait_fleet(stack, False, "the agent unhealthy without telemetry")
        assert "telemetry degraded" in agent["reason"], agent
        assert "GPU read failed" in agent["reason"], agent
        status = await agent_status(stack.agent.url)
        assert status["telemetry"]["status"] == "degraded"
        assert status["telemetry"]["gpus"] == []
        assert (
            await agent_metric(stack.agent.url, 'gpu_agent_telemetry_status{status="degraded"}')
            == 1
        )
        assert await controller_metric(stack, 'gpu_controller_agent_healthy{agent="desk"}') == 0

        job = await stack.submit(sd15(steps=20))

        async def held_with_reason() -> dict[str, Any] | None:
            current = await stack.job(job["id"])
            return current if "telemetry degraded" in current["reason"] else None

        held = await wait_until(
            held_with_reason, poll_s=POLL_S, what="the job held for the telemetry"
        )
        assert held["state"] == "held"
        response = await stack.generate(SMALL, options={"num_predict": 8})
        assert response.status_code == 503, response.text
        assert "telemetry degraded" in error_of(response)["message"]
        fleet = await stack.fleet()
        assert [j["id"] for j in fleet["held_jobs"]] == [job["id"]]
        assert stack.desktop.comfyui.stats.prompts_run == 0
        assert stack.resident() == {}
    finally:
        stack.desktop.probe.failing = False
    await wait_fleet(stack, True, "the agent healthy again")
    done = await stack.wait_job(job["id"])
    assert done["state"] == "succeeded", done
    assert done["attempts"] == 1
    assert stack.desktop.comfyui.stats.prompts_run == 1


# -- 5. The agent restarts with jobs out -----------------------------------------------------------


async def test_agent_restart_with_jobs_out_loses_nothing_and_runs_nothing_twice(
    desktop: SimDesktop, tmp_path: Path
) -> None:
    agent = RestartableAgent(desktop, free_port())
    try:
        url = await agent.start()
        async with running_controller_on(url, tmp_path / "controller") as (controller, http):
            stack = Stack(desktop=desktop, agent=agent.running, controller=controller, http=http)
            job_ids = [
                (await stack.submit(workflow))["id"]
                for workflow in (sdxl(steps=80, seed=1), sd15(steps=20, seed=2), sdxl(seed=3))
            ]
            await wait_running(stack, job_ids[0])

            await agent.stop()
            gone = await wait_fleet(stack, False, "the controller to lose the agent")
            assert gone["connected"] is False
            assert "unreachable" in gone["reason"], gone
            assert await controller_metric(stack, 'gpu_controller_agent_healthy{agent="desk"}') == 0
            await agent.start()
            stack.agent = agent.running

            jobs = await wait_all_final(stack, job_ids)
            await assert_succeeded_once(stack, jobs)
            # The job out on the agent was followed through the restart, not dispatched again.
            assert jobs[job_ids[0]]["attempts"] == 1
            assert desktop.comfyui.stats.prompts_run == len(job_ids)
            assert (await fleet_agent(stack))["healthy"] is True
    finally:
        await agent.stop()


async def test_a_prompt_that_ended_while_the_agent_restarted_is_not_run_again(
    desktop: SimDesktop, tmp_path: Path
) -> None:
    """A prompt ends while its agent restarts, then ComfyUI restarts and forgets it: the
    controller, hearing of nothing meanwhile, asks again and gets the outcome, not a second run.

    Found by the chaos day (seed 2): the new agent process ignored ComfyUI's events for the
    prompt an earlier process had queued, so when the controller asked, nobody knew it and the
    same prompt ran twice."""
    agent = RestartableAgent(desktop, free_port())
    try:
        url = await agent.start()
        async with (
            LinkProxy(url) as proxy,
            running_controller_on(proxy.url, tmp_path / "controller") as (controller, http),
        ):
            stack = Stack(desktop=desktop, agent=agent.running, controller=controller, http=http)
            job = await stack.submit(sdxl(steps=40, seed=1))
            await wait_running(stack, job["id"])
            await proxy.cut()
            await agent.stop()
            await agent.start()
            await wait_until(
                lambda: desktop.comfyui.stats.succeeded == 1,
                poll_s=POLL_S,
                what="ComfyUI to finish the prompt",
            )
            await desktop.restart_comfyui()
            await proxy.restore()

            done = await stack.wait_job(job["id"])
            assert done["state"] == "succeeded", done
            assert done["attempts"] == 1
            output = await stack.http.get(done["outputs"][0])
            assert output.content.startswith(PNG_SIGNATURE)
            stats = desktop.comfyui.stats
            assert (stats.prompts_run, stats.succeeded) == (1, 1)
            assert set(stats.runs_by_prompt.values()) == {1}
    finally:
        await agent.stop()


# SQLite keeps up to this many bytes of a row in its page (4096-byte pages); a row that grows
# past it needs an overflow page, which a file that cannot grow does not have.
ROW_IN_PAGE_BYTES = 4061


def workflow_outgrowing_its_page(outputs: int, prefix_chars: int) -> dict[str, Any]:
    """An SD1.5 workflow whose stored job fits in its page while it runs and, with `outputs`
    output files named after a `prefix_chars` prefix, outgrows it when it succeeds."""
    prefix = "p" * prefix_chars
    workflow = text_to_image(SD15, width=512, height=512, batch=outputs, steps=20, prefix=prefix)
    size = len(json.dumps(workflow, separators=(",", ":")))
    # About 300 bytes of other columns, 3,700 in all: under the page's limit while it runs, and
    # well over it once the outputs' names (and the progress) are stored with the success.
    workflow["6"]["inputs"]["text"] += " " * (3400 - size)
    growth = outputs * (prefix_chars + len("00-_00001_.png") + 3)
    assert 3400 + 300 + growth > ROW_IN_PAGE_BYTES + 300
    return workflow


async def test_news_the_full_store_refused_is_stored_later_not_asked_for_again(
    desktop: SimDesktop, tmp_path: Path
) -> None:
    """A job succeeds while the store's disk is full, then the agent and ComfyUI restart and
    forget it: once the disk has room the job is stored as succeeded, not run again.

    Found by the chaos day (seed 0): the success the store refused was dropped, so the
    controller later asked the agent, which no longer knew the prompt, and ran it again."""
    agent = RestartableAgent(desktop, free_port())
    try:
        url = await agent.start()
        async with running_controller_on(url, tmp_path / "controller") as (controller, http):
            stack = Stack(desktop=desktop, agent=agent.running, controller=controller, http=http)
            job = await stack.submit(workflow_outgrowing_its_page(outputs=4, prefix_chars=180))
            await wait_running(stack, job["id"])
            await controller.engine.store.hold_size(True)
            outputs = tmp_path / "controller" / "outputs" / job["id"]
            await wait_until(
                lambda: outputs.is_dir() and len(list(outputs.iterdir())) == 4,
                poll_s=POLL_S,
                what="the controller to copy the outputs of the finished prompt",
            )
            assert (await stack.job(job["id"]))["state"] == "running"
            await agent.stop()
            await desktop.restart_comfyui()
            await agent.start()
            stack.agent = agent.running
            await controller.engine.store.hold_size(False)

            done = await stack.wait_job(job["id"])
            assert done["state"] == "succeeded", done
            assert len(done["outputs"]) == 4
            stats = desktop.comfyui.stats
            assert (stats.prompts_run, stats.succeeded) == (1, 1)
    finally:
        await agent.stop()


class RestartableAgent:
    """An agent on the shared desktop that can be stopped and started again on one port."""

    def __init__(self, desktop: SimDesktop, port: int, **overrides: Any) -> None:
        self._desktop = desktop
        self._settings = agent_config(port=port, **overrides)
        self._context: contextlib.AbstractAsyncContextManager[RunningAgent] | None = None
        self._running: RunningAgent | None = None

    @property
    def running(self) -> RunningAgent:
        assert self._running is not None, "the agent is stopped"
        return self._running

    async def start(self) -> str:
        self._context = running_agent(self._settings, self._desktop)
        self._running = await self._context.__aenter__()
        return self._running.url

    async def stop(self) -> None:
        context, self._context = self._context, None
        if context is not None:
            await context.__aexit__(None, None, None)


# -- 6. The controller-agent link cut and restored -------------------------------------------------


async def test_link_cut_holds_new_work_and_resumes_without_loss(
    desktop: SimDesktop, tmp_path: Path
) -> None:
    async with (
        running_agent(agent_config(), desktop) as agent,
        LinkProxy(agent.url) as proxy,
        running_controller_on(proxy.url, tmp_path / "controller", llm_wait_s=LLM_WAIT_S) as (
            controller,
            http,
        ),
    ):
        stack = Stack(desktop=desktop, agent=agent, controller=controller, http=http)
        out = await stack.submit(sdxl(steps=100, seed=1))
        await wait_running(stack, out["id"])

        await proxy.cut()
        gone = await wait_fleet(stack, False, "the controller to lose the link")
        assert "unreachable" in gone["reason"], gone
        held = await stack.submit(sd15(steps=20, seed=2))

        async def waiting_for_agent() -> dict[str, Any] | None:
            current = await stack.job(held["id"])
            return current if "unreachable" in current["reason"] else None

        waiting = await wait_until(
            waiting_for_agent, poll_s=POLL_S, what="the new job held for the agent"
        )
        assert waiting["state"] == "held"
        response = await stack.generate(SMALL, options={"num_predict": 8})
        assert response.status_code == 503
        assert "unreachable" in error_of(response)["message"]
        # The desktop finishes what it had meanwhile; the controller cannot know yet.
        await wait_until(
            lambda: desktop.comfyui.stats.succeeded == 1,
            poll_s=POLL_S,
            what="the running prompt to finish",
        )
        assert (await stack.job(out["id"]))["state"] == "running"
        assert desktop.comfyui.stats.prompts_run == 1

        await proxy.restore()
        await wait_fleet(stack, True, "the link back")
        jobs = await wait_all_final(stack, [out["id"], held["id"]])
        await assert_succeeded_once(stack, jobs)
        assert all(job["attempts"] == 1 for job in jobs.values())
        assert desktop.comfyui.stats.prompts_run == 2
        response = await stack.generate(SMALL, options={"num_predict": 8})
        assert response.status_code == 200, response.text


async def test_a_link_cut_mid_stream_ends_the_stream_with_an_error_line(
    desktop: SimDesktop, tmp_path: Path
) -> None:
    """The link to the agent breaks while an answer streams: the client's stream ends with an
    error line in Ollama's format, not with a second status line on the same connection."""
    async with (
        running_agent(agent_config(), desktop) as agent,
        LinkProxy(agent.url) as proxy,
        running_controller_on(proxy.url, tmp_path / "controller", llm_wait_s=LLM_WAIT_S) as (
            controller,
            http,
        ),
    ):
        body = {"model": SMALL, "prompt": "tell a story", "options": {"num_predict": 400}}
        lines: list[dict[str, Any]] = []
        async with http.stream("POST", "/api/generate", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                lines.append(json.loads(line))
                if len(lines) == 3:
                    await proxy.cut()
        assert all(line.get("done") is False for line in lines[:3])
        assert "error" in lines[-1], lines[-1]
        assert "broke off" in lines[-1]["error"]
        assert controller.engine.llm.in_flight == 0
        await proxy.restore()
        async with httpx.AsyncClient(base_url=controller.url, headers=http.headers) as again:
            await wait_until(
                lambda: again_ok(again), poll_s=POLL_S, what="the controller to serve again"
            )


async def again_ok(http: httpx.AsyncClient) -> bool:
    response = await http.post(
        "/api/generate", json={"model": SMALL, "prompt": "hi", "stream": False}
    )
    return response.status_code == 200


# -- stacks with settings of their own -------------------------------------------------------------


def agent_config(port: int = 0, **overrides: Any) -> AgentSettings:
    """The stack's agent settings, with `overrides` (any `AgentSettings` fields)."""
    values = agent_settings(port).model_dump()
    values["token"] = AGENT_TOKEN
    values.update(overrides)
    return AgentSettings(**values)


@contextlib.asynccontextmanager
async def custom_stack(
    desktop: SimDesktop, tmp_path: Path, *, agent: dict[str, Any], **controller: Any
) -> AsyncIterator[Stack]:
    """`running_stack`, with the agent's settings overridden by `agent` and the controller's
    by `controller`."""
    async with (
        running_agent(agent_config(**agent), desktop) as running,
        running_controller_on(running.url, tmp_path / "controller", **controller) as (
            engine_host,
            http,
        ),
    ):
        yield Stack(desktop=desktop, agent=running, controller=engine_host, http=http)
