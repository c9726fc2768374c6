"""The agent under faults of the simulated desktop: restarts, dropped and silent websockets, a slow,
dead or hung Ollama, memory that never comes back, and a failing NVML."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import ollama
import pytest

from gpu_agent.daemon import RunningAgent, running_agent
from gpu_agent.sim.desktop import SimDesktop
from gpu_agent.sim.ollama import MIDSTREAM_ERROR
from gpu_common import clock
from gpu_common.schema import UnloadResult
from tests.integration.test_agent_api import (
    AUTH,
    HTTP_TIMEOUT_S,
    LONG_PROMPT,
    QWEN,
    QWEN_VRAM_BYTES,
    agent_settings,
    api_client,
    assert_error,
    fetch_status,
    metric_samples,
    ollama_gpu_bytes,
    runner_pids,
    slow_txt2img,
    txt2img,
    wait_prompt,
)
from tests.waiting import wait_until

# The agent's production defaults, in simulated seconds: on the virtual-time loop a hung peer
# costs no real time, so the timeouts need not be shortened to keep the tests quick.
REQUEST_TIMEOUT_S = 10.0
LOAD_TIMEOUT_S = 300.0
UNLOAD_TIMEOUT_S = 15.0


@pytest.fixture
async def agent(desktop: SimDesktop) -> AsyncIterator[RunningAgent]:
    settings = agent_settings(
        request_timeout_s=REQUEST_TIMEOUT_S,
        load_timeout_s=LOAD_TIMEOUT_S,
        unload_timeout_s=UNLOAD_TIMEOUT_S,
    )
    async with running_agent(settings, desktop) as running:
        yield running


@pytest.fixture
async def client(agent: RunningAgent) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(agent) as http:
        yield http


async def _status_field(client: httpx.AsyncClient, path: str) -> Any:
    value: Any = (await fetch_status(client)).model_dump()
    for part in path.split("."):
        value = value[part]
    return value


async def wait_status(client: httpx.AsyncClient, path: str, expected: Any) -> None:
    """Wait until the agent's status has `expected` at the dotted `path`."""

    async def matches() -> bool:
        return bool(await _status_field(client, path) == expected)

    await wait_until(matches, what=f"status {path} == {expected!r}")


# -- ComfyUI ----------------------------------------------------------------------------------


async def test_comfyui_down_mid_prompt_leaves_it_unknown(
    client: httpx.AsyncClient, desktop: SimDesktop
) -> None:
    prompt = (await client.post("/v1/comfyui/prompts", json={"workflow": slow_txt2img()})).json()
    await wait_prompt(client, prompt["prompt_id"], frozenset({"running"}))

    await desktop.stop_comfyui()
    await wait_status(client, "comfyui.reachable", False)
    status = await fetch_status(client)
    assert status.comfyui.connection in {"polling", "down"}
    # Nothing is decided while ComfyUI cannot be asked.
    still = await client.get(f"/v1/comfyui/prompts/{prompt['prompt_id']}")
    assert still.json()["state"] == "running"
    refused = await client.post("/v1/comfyui/prompts", json={"workflow": txt2img()})
    assert_error(refused, 503, "comfyui_unavailable")

    await desktop.start_comfyui()
    await wait_status(client, "comfyui.reachable", True)
    await wait_status(client, "comfyui.connection", "websocket")
    lost = await wait_prompt(client, prompt["prompt_id"])
    assert lost["state"] == "unknown"
    assert lost["reason"]

    after = (await client.post("/v1/comfyui/prompts", json={"workflow": txt2img()})).json()
    assert (await wait_prompt(client, after["prompt_id"]))["state"] == "succeeded"


async def test_quick_comfyui_restart_mid_prompt_is_noticed(
    client: httpx.AsyncClient, desktop: SimDesktop
) -> None:
    prompt = (await client.post("/v1/comfyui/prompts", json={"workflow": slow_txt2img()})).json()
    await wait_prompt(client, prompt["prompt_id"], frozenset({"running"}))
    await desktop.restart_comfyui()
    assert (await wait_prompt(client, prompt["prompt_id"]))["state"] == "unknown"
    after = (await client.post("/v1/comfyui/prompts", json={"workflow": txt2img()})).json()
    done = await wait_prompt(client, after["prompt_id"])
    assert done["state"] == "succeeded"
    image = await client.get(f"/v1/comfyui/prompts/{after['prompt_id']}/outputs/0")
    assert image.status_code == 200


async def test_dropped_websocket_still_delivers_the_outcome(
    client: httpx.AsyncClient, desktop: SimDesktop
) -> None:
    await wait_status(client, "comfyui.connection", "websocket")
    prompt = (await client.post("/v1/comfyui/prompts", json={"workflow": slow_txt2img(10)})).json()
    await wait_prompt(client, prompt["prompt_id"], frozenset({"running"}))
    await desktop.comfyui.drop_websockets()
    done = await wait_prompt(client, prompt["prompt_id"])
    assert done["state"] == "succeeded"
    assert len(done["outputs"]) == 1
    await wait_status(client, "comfyui.connection", "websocket")


async def test_silent_websocket_still_delivers_the_outcome(
    client: httpx.AsyncClient, desktop: SimDesktop
) -> None:
    await wait_status(client, "comfyui.connection", "websocket")
    desktop.comfyui.faults.websocket_silent = True
    prompt = (await client.post("/v1/comfyui/prompts", json={"workflow": txt2img()})).json()
    done = await wait_prompt(client, prompt["prompt_id"])
    assert done["state"] == "succeeded"
    assert len(done["outputs"]) == 1
    image = await client.get(f"/v1/comfyui/prompts/{prompt['prompt_id']}/outputs/0")
    assert image.status_code == 200


# -- Ollama -----------------------------------------------------------------------------------


async def test_slow_ollama_still_serves(client: httpx.AsyncClient, desktop: SimDesktop) -> None:
    # Every answer comes 2 s late (seconds of the loop's clock, virtual here): slow, but within
    # the agent's request timeout.
    desktop.ollama.faults.response_delay_s = 2.0
    response = await client.post("/v1/ollama/load", json={"model": QWEN})
    assert response.status_code == 200, response.text
    generated = await client.post(
        "/api/generate", json={"model": QWEN, "prompt": "Hi", "stream": False}
    )
    assert generated.status_code == 200
    assert generated.json()["done"] is True
    status = await fetch_status(client)
    assert status.ollama.reachable
    assert [m.name for m in status.ollama.resident] == [QWEN]


async def test_ollama_down_then_back(client: httpx.AsyncClient, desktop: SimDesktop) -> None:
    await desktop.stop_ollama()
    await wait_status(client, "ollama.reachable", False)
    status = await fetch_status(client)
    assert status.ollama.error
    assert "Ollama" in status.ollama.error
    assert status.ollama.resident == []

    error = assert_error(
        await client.post("/v1/ollama/load", json={"model": QWEN}), 503, "ollama_unavailable"
    )
    assert desktop.ollama_url.split("//")[1] in error["message"]
    assert_error(await client.get("/api/tags"), 503, "ollama_unavailable")
    metrics = metric_samples((await client.get("/metrics")).text)
    assert metrics[("gpu_agent_ollama_up", frozenset())] == 0

    await desktop.start_ollama()
    await wait_status(client, "ollama.reachable", True)
    assert (await fetch_status(client)).ollama.error is None
    response = await client.post("/v1/ollama/load", json={"model": QWEN})
    assert response.status_code == 200, response.text


async def test_hung_ollama_fails_the_load_within_the_timeout(
    client: httpx.AsyncClient, desktop: SimDesktop
) -> None:
    desktop.ollama.faults.hang()
    try:
        started = clock.monotonic_s()
        response = await client.post("/v1/ollama/load", json={"model": QWEN})
        elapsed_s = clock.monotonic_s() - started
        error = assert_error(response, 503, "ollama_unavailable")
        assert "in time" in error["message"]
        # Simulated seconds: the agent waited for Ollama, and gave up within its load timeout
        # (its first call, for Ollama's list of running models, already hangs: that one gives up
        # after the request timeout).
        assert REQUEST_TIMEOUT_S <= elapsed_s <= LOAD_TIMEOUT_S
        await wait_status(client, "ollama.reachable", False)
        assert "in time" in ((await fetch_status(client)).ollama.error or "")
        # The agent itself stays responsive.
        assert (await client.get("/healthz")).status_code == 200
    finally:
        desktop.ollama.faults.unhang()
    await wait_status(client, "ollama.reachable", True)
    assert desktop.ollama.runners() == []


async def test_load_slower_than_the_load_timeout_fails_in_time(desktop: SimDesktop) -> None:
    # A cold 7b load takes 3.5 simulated seconds, more than this agent will wait for it.
    load_timeout_s = 2.0
    settings = agent_settings(request_timeout_s=REQUEST_TIMEOUT_S, load_timeout_s=load_timeout_s)
    async with running_agent(settings, desktop) as agent, api_client(agent) as client:
        started = desktop.clock.now()
        response = await client.post("/v1/ollama/load", json={"model": QWEN})
        elapsed_s = desktop.clock.now() - started
        error = assert_error(response, 503, "ollama_unavailable")
        assert "in time" in error["message"]
        assert load_timeout_s <= elapsed_s < load_timeout_s + 0.5
        # Ollama itself goes on loading; the agent is free for the next request.
        assert [r.loading for r in desktop.ollama.runners()] == [True]
        assert (await fetch_status(client)).ollama.reachable


async def test_unload_whose_memory_never_returns_times_out(
    client: httpx.AsyncClient, desktop: SimDesktop
) -> None:
    assert (await client.post("/v1/ollama/load", json={"model": QWEN})).status_code == 200
    (pid,) = runner_pids(desktop)
    desktop.ollama.zombie_runners = True

    started = clock.monotonic_s()
    response = await client.post("/v1/ollama/unload", json={"model": QWEN})
    elapsed_s = clock.monotonic_s() - started
    error = assert_error(response, 504, "unload_timeout")
    assert str(QWEN_VRAM_BYTES) in error["message"]
    # Simulated seconds: the agent waited its whole unload timeout for the memory, no longer.
    assert UNLOAD_TIMEOUT_S <= elapsed_s < UNLOAD_TIMEOUT_S + 0.5
    # Ollama no longer lists the model, but the card says its memory is still taken.
    assert desktop.ollama.runners() == []
    assert desktop.gpu.process_bytes(pid) == QWEN_VRAM_BYTES
    status = await fetch_status(client)
    assert status.telemetry.gpus[0].memory_by_owner_bytes["ollama"] == QWEN_VRAM_BYTES


async def test_nvml_failure_degrades_telemetry_then_recovers(
    client: httpx.AsyncClient, desktop: SimDesktop
) -> None:
    desktop.probe.failing = True
    await wait_status(client, "telemetry.status", "degraded")
    status = await fetch_status(client)
    assert status.telemetry.reason
    assert "GPU read failed" in status.telemetry.reason
    # No stale memory figures are passed off as fresh.
    assert status.telemetry.gpus == []
    health = (await client.get("/healthz")).json()
    assert health == {"status": "ok", "telemetry": "degraded"}
    metrics = metric_samples((await client.get("/metrics")).text)
    assert metrics[("gpu_agent_telemetry_status", frozenset({("status", "degraded")}))] == 1
    assert metrics[("gpu_agent_telemetry_status", frozenset({("status", "ok")}))] == 0

    # Without a GPU reading an unload is confirmed by Ollama's own list.
    assert (await client.post("/v1/ollama/load", json={"model": QWEN})).status_code == 200
    response = await client.post("/v1/ollama/unload", json={"model": QWEN})
    assert response.status_code == 200, response.text
    result = UnloadResult.model_validate_json(response.content)
    assert result.confirmed_by == "ollama"
    assert desktop.ollama.runners() == []

    desktop.probe.failing = False
    await wait_status(client, "telemetry.status", "ok")
    status = await fetch_status(client)
    assert status.telemetry.reason is None
    assert status.telemetry.gpus[0].memory_by_owner_bytes["ollama"] == ollama_gpu_bytes(desktop)
    metrics = metric_samples((await client.get("/metrics")).text)
    assert metrics[("gpu_agent_telemetry_status", frozenset({("status", "ok")}))] == 1


async def test_midstream_ollama_error_is_passed_through(
    agent: RunningAgent, client: httpx.AsyncClient, desktop: SimDesktop
) -> None:
    desktop.ollama.faults.fail_stream_after_tokens = 3
    lines: list[dict[str, Any]] = []
    async with client.stream("POST", "/api/generate", json={"model": QWEN, "prompt": "Hi"}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.strip():
                lines.append(json.loads(line))
    assert [line.get("done") for line in lines[:3]] == [False, False, False]
    assert lines[3:] == [{"error": MIDSTREAM_ERROR}]

    official = ollama.AsyncClient(host=agent.url, headers=AUTH, timeout=HTTP_TIMEOUT_S)
    with pytest.raises(ollama.ResponseError) as failed:
        async for _ in await official.chat(
            model=QWEN, messages=[{"role": "user", "content": "Hi"}], stream=True
        ):
            pass
    assert MIDSTREAM_ERROR in str(failed.value)
    assert agent.service.in_flight == {}


async def test_ollama_dying_mid_stream_ends_it_with_an_error_line(
    agent: RunningAgent, client: httpx.AsyncClient, desktop: SimDesktop
) -> None:
    # The answer takes about 3.7 simulated seconds to decode: Ollama dies after its first line.
    body = {"model": QWEN, "prompt": LONG_PROMPT}
    lines: list[dict[str, Any]] = []
    async with client.stream("POST", "/api/generate", json=body) as response:
        assert response.status_code == 200
        stream = response.aiter_lines()
        async for line in stream:
            if line.strip():
                lines.append(json.loads(line))
                break
        await desktop.stop_ollama()
        async for line in stream:
            if line.strip():
                lines.append(json.loads(line))
    assert lines, "the stream ended before its first line"
    assert lines[0]["done"] is False
    assert not any(line.get("done") for line in lines)
    assert "error" in lines[-1]
    await wait_until(lambda: agent.service.in_flight == {}, what="no requests in flight")
