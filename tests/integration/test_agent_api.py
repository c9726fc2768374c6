"""The agent's HTTP API end to end: a running agent on the simulated desktop, over real sockets.

Every test starts the whole agent (`running_agent`) on a `SimDesktop` and talks to it with httpx,
aiohttp's websocket client or the official `ollama` client, then checks what it answers against
what the simulated desktop really did (GPU ledger, runners, ComfyUI's queue).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, cast

import aiohttp
import httpx
import ollama
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpu_agent.daemon import RunningAgent, running_agent
from gpu_agent.settings import AgentSettings
from gpu_agent.sim.desktop import COMFYUI_PID, SimDesktop
from gpu_agent.sim.gpu import GIB, MIB
from gpu_agent.sim.workflows import SD15, text_to_image
from gpu_common.schema import AgentEvent, AgentStatus, LoadResult, UnloadResult
from tests.integration.error_bodies import error_of
from tests.waiting import wait_until

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GPU_NAME = "NVIDIA GeForce RTX 4070 SUPER"
QWEN = "qwen2.5:7b"
# 5.25 GiB at the default 4096-token context (hardware-figures.md, Ollama footprints).
QWEN_VRAM_BYTES = int(5.25 * GIB)
# Flux runs about 2 simulated seconds a step: slow enough to be caught while it runs.
FLUX = "flux1-schnell-fp8.safetensors"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FINAL_STATES = frozenset({"succeeded", "failed", "interrupted", "cancelled", "unknown"})
# qwen2.5:7b answers this with about 300 tokens: 3.7 simulated seconds of decoding.
LONG_PROMPT = "Why is the sky blue?"
# The agent's sampling beat and staleness limit: its production defaults, in simulated seconds.
SAMPLE_INTERVAL_S = 1.0
STALE_AFTER_S = 5.0
# Every test runs on the virtual-time loop, where waiting costs no real time: clients may wait as
# long as a real one would (a Flux prompt runs for minutes of simulated time).
HTTP_TIMEOUT_S = 600.0


def agent_settings(**overrides: Any) -> AgentSettings:
    """Settings for a test agent: the production sampling beat and realistic, finite timeouts
    (simulated seconds)."""
    values: dict[str, Any] = {
        "port": 0,
        "simulate": True,
        "sample_interval_s": SAMPLE_INTERVAL_S,
        "stale_after_s": STALE_AFTER_S,
        "token": TOKEN,
        "request_timeout_s": 60.0,
        "load_timeout_s": 300.0,
        "unload_timeout_s": 60.0,
        "free_timeout_s": 600.0,
    }
    values.update(overrides)
    return AgentSettings(**values)


def api_client(agent: RunningAgent, **headers: str) -> httpx.AsyncClient:
    """An httpx client for `agent`; the right token unless `headers` say otherwise."""
    return httpx.AsyncClient(
        base_url=agent.url, headers=headers or AUTH, timeout=HTTP_TIMEOUT_S, trust_env=False
    )


def txt2img(*, steps: int = 20, ckpt: str = SD15, size: int = 512, seed: int = 1) -> dict[str, Any]:
    """ComfyUI's default text-to-image graph, in API format."""
    return text_to_image(ckpt, width=size, height=size, steps=steps, seed=seed, prefix="fox")


def slow_txt2img(steps: int = 400) -> dict[str, Any]:
    """A Flux prompt that runs for minutes of simulated time."""
    return txt2img(steps=steps, ckpt=FLUX, size=1024)


async def fetch_status(client: httpx.AsyncClient) -> AgentStatus:
    response = await client.get("/v1/status")
    assert response.status_code == 200, response.text
    return AgentStatus.model_validate_json(response.content)


async def wait_prompt(
    client: httpx.AsyncClient,
    prompt_id: str,
    states: frozenset[str] = FINAL_STATES,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Poll the agent until the prompt is in one of `states` (within `timeout_s` simulated
    seconds); its PromptInfo."""

    async def reached() -> dict[str, Any] | None:
        response = await client.get(f"/v1/comfyui/prompts/{prompt_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body if body["state"] in states else None

    # A poll every simulated quarter second: a prompt's states last seconds, and each poll is a
    # real HTTP round trip.
    info = await wait_until(
        reached, timeout_s=timeout_s, poll_s=0.25, what=f"prompt in {sorted(states)}"
    )
    return cast(dict[str, Any], info)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is the agent's own JSON error, in its route's shape, with this status and
    code; its code and message."""
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["code"] == code
    assert error["message"]
    return error


def runner_pids(desktop: SimDesktop) -> list[int]:
    return [info.pid for info in desktop.ollama.runners()]


def comfyui_gpu_bytes(desktop: SimDesktop) -> int:
    """ComfyUI's GPU memory as the simulated card's ledger has it."""
    return desktop.gpu.process_bytes(COMFYUI_PID)


def ollama_gpu_bytes(desktop: SimDesktop) -> int:
    """Ollama's GPU memory as the simulated card's ledger has it (what NVML would show)."""
    processes = desktop.gpu.reading().processes
    return sum(p.used_bytes or 0 for p in processes if p.name == "ollama")


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Parse a Prometheus exposition into {(sample name, labels): value}."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
async def agent(desktop: SimDesktop) -> AsyncIterator[RunningAgent]:
    async with running_agent(agent_settings(), desktop) as running:
        yield running


@pytest.fixture
async def client(agent: RunningAgent) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(agent) as http:
        yield http


# -- auth and errors ----------------------------------------------------------------------------


async def test_healthz_needs_no_token(agent: RunningAgent) -> None:
    async with api_client(agent, Accept="application/json") as anonymous:
        response = await anonymous.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "telemetry": "ok"}


PROTECTED_ROUTES = [
    ("GET", "/v1/status"),
    ("GET", "/v1/events"),
    ("GET", "/metrics"),
    ("POST", "/v1/ollama/load"),
    ("POST", "/v1/ollama/unload"),
    ("POST", "/v1/comfyui/prompts"),
    ("GET", f"/v1/comfyui/prompts/{uuid.UUID(int=1)}"),
    ("DELETE", f"/v1/comfyui/prompts/{uuid.UUID(int=1)}"),
    ("GET", f"/v1/comfyui/prompts/{uuid.UUID(int=1)}/outputs/0"),
    ("POST", "/v1/comfyui/free"),
    ("GET", "/api/tags"),
    ("POST", "/api/generate"),
    ("GET", "/no/such/route"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED_ROUTES)
async def test_every_other_route_needs_the_token(
    agent: RunningAgent, desktop: SimDesktop, method: str, path: str
) -> None:
    body = {"model": QWEN} if method == "POST" else None
    wrong = [
        {"Accept": "application/json"},
        {"Authorization": "Bearer not-the-token"},
        {"Authorization": TOKEN},  # the token without the scheme
        {"Authorization": f"Basic {TOKEN}"},
    ]
    for headers in wrong:
        async with api_client(agent, **headers) as http:
            response = await http.request(method, path, json=body)
        assert_error(response, 401, "unauthorized")
    # Refused requests reached nothing behind the agent.
    assert desktop.ollama.runners() == []
    assert desktop.ollama.stats.requests == 0


async def test_the_right_token_opens_the_routes(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/status")).status_code == 200
    assert (await client.get("/metrics")).status_code == 200
    assert (await client.get("/api/tags")).status_code == 200
    response = await client.post("/v1/comfyui/free")
    assert response.status_code == 200, response.text


async def test_unknown_route_is_404_json(client: httpx.AsyncClient) -> None:
    error = assert_error(await client.get("/v2/status"), 404, "not_found")
    assert "/v2/status" in error["message"]
    assert_error(await client.get("/v1/comfyui/prompts/x/outputs/0/more"), 404, "not_found")


async def test_wrong_method_is_405_json_with_allow(client: httpx.AsyncClient) -> None:
    response = await client.delete("/v1/status")
    assert_error(response, 405, "method_not_allowed")
    assert "GET" in response.headers["Allow"]
    response = await client.get("/v1/ollama/load")
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


async def test_body_over_the_limit_is_413_json(desktop: SimDesktop) -> None:
    settings = agent_settings(max_body_bytes=4096)
    async with running_agent(settings, desktop) as agent, api_client(agent) as http:
        padding = "x" * 8192
        for path in ("/v1/ollama/load", "/v1/comfyui/prompts", "/api/generate"):
            response = await http.post(path, json={"model": QWEN, "pad": padding})
            error = assert_error(response, 413, "payload_too_large")
            assert "4096" in error["message"]
        # Just under the limit is read, and judged on its content instead.
        response = await http.post("/v1/ollama/load", json={"model": QWEN, "x": "y" * 3000})
        assert_error(response, 400, "bad_request")
    assert desktop.ollama.stats.requests == 0


@pytest.mark.parametrize(
    ("path", "content", "names"),
    [
        ("/v1/ollama/load", b"", ["body"]),
        ("/v1/ollama/load", b'{"model": "qwen2.5:7b"', ["JSON"]),
        ("/v1/ollama/load", b"[1, 2]", ["LoadRequest"]),
        ("/v1/ollama/load", b'{"model": 7}', ["model"]),
        ("/v1/ollama/load", b'{"model": "qwen2.5:7b", "num_ctx": "big"}', ["num_ctx"]),
        ("/v1/ollama/load", b'{"model": "qwen2.5:7b", "num_ctx": 16}', ["num_ctx"]),
        ("/v1/ollama/load", b'{"model": "qwen2.5:7b", "gpu": 1}', ["gpu"]),
        ("/v1/ollama/load", b'{"model": "two words"}', ["model"]),
        ("/v1/ollama/unload", b'{"model": "qwen2.5:7b", "force": "maybe"}', ["force"]),
        ("/v1/ollama/unload", b"{}", ["model"]),
        ("/v1/comfyui/prompts", b'{"workflow": {}}', ["workflow"]),
        ("/v1/comfyui/prompts", b'{"workflow": [1]}', ["workflow"]),
        ("/v1/comfyui/prompts", b'{"workflow": {"1": {}}, "prompt_id": "nope"}', ["prompt_id"]),
        ("/v1/comfyui/free", b'{"unload_models": "yes please"}', ["unload_models"]),
        ("/v1/comfyui/free", b'{"free_everything": true}', ["free_everything"]),
    ],
)
async def test_bad_bodies_are_400_naming_the_problem(
    client: httpx.AsyncClient, desktop: SimDesktop, path: str, content: bytes, names: list[str]
) -> None:
    response = await client.post(
        path, content=content, headers={"Content-Type": "application/json"}
    )
    error = assert_error(response, 400, "bad_request")
    for name in names:
        assert name in error["message"]
    assert desktop.ollama.stats.requests == 0
    assert desktop.comfyui.stats.prompts_run == 0


# -- status -----------------------------------------------------------------------------------


async def test_status_describes_the_desktop(client: httpx.AsyncClient) -> None:
    async def websocket_connected() -> AgentStatus | None:
        status = await fetch_status(client)
        return status if status.comfyui.connection == "websocket" else None

    status = await wait_until(websocket_connected, what="ComfyUI websocket")
    tel = status.telemetry
    assert tel.status == "ok"
    assert tel.reason is None
    assert tel.backend == "sim"
    assert tel.age_s is not None
    assert 0 <= tel.age_s <= SAMPLE_INTERVAL_S
    assert tel.sample_interval_s == SAMPLE_INTERVAL_S
    (gpu,) = tel.gpus
    assert gpu.name == GPU_NAME
    assert gpu.memory_total_bytes == 12_878_610_432
    assert gpu.memory_used_bytes + gpu.memory_free_bytes == gpu.memory_total_bytes
    owners = gpu.memory_by_owner_bytes
    # Xorg, gnome-shell and firefox hold 600 MiB; ComfyUI's CUDA context 400 MiB; Ollama nothing.
    assert owners == {"ollama": 0, "comfyui": 400 * MIB, "other": 600 * MIB}
    assert sum(owners.values()) == gpu.memory_used_bytes
    assert {p.name: p.owner for p in gpu.processes} == {
        "Xorg": "other",
        "gnome-shell": "other",
        "firefox": "other",
        "python3": "comfyui",
    }
    assert tel.host is not None
    assert tel.host.cpu_count >= 1
    assert 0 < tel.host.memory_available_bytes <= tel.host.memory_total_bytes

    assert status.ollama.reachable
    assert status.ollama.error is None
    assert status.ollama.version
    available = {m.name: m for m in status.ollama.available}
    assert QWEN in available
    assert available[QWEN].size_bytes == 4_683_087_332
    assert available[QWEN].parameter_size == "7.6B"
    assert status.ollama.resident == []
    assert status.ollama.in_flight == {}

    assert status.comfyui.reachable
    assert status.comfyui.queue_running == 0
    assert status.comfyui.queue_pending == 0
    assert status.comfyui.prompts == []


# -- Ollama: load and unload ----------------------------------------------------------------------


async def test_load_reports_load_time_and_footprint(
    client: httpx.AsyncClient, desktop: SimDesktop
) -> None:
    response = await client.post("/v1/ollama/load", json={"model": QWEN})
    assert response.status_code == 200, response.text
    result = LoadResult.model_validate_json(response.content)
    assert result.model == QWEN
    assert not result.already_resident
    # A cold 7b load takes about 3.5 simulated seconds (hardware-figures.md); on virtual time
    # the loopback round trips around it add nothing.
    assert 3.5 <= result.load_time_s < 4.0
    assert result.size_bytes == QWEN_VRAM_BYTES
    assert result.vram_bytes == QWEN_VRAM_BYTES
    assert result.context_length == 4096
    assert result.nvml_delta_bytes == QWEN_VRAM_BYTES
    assert ollama_gpu_bytes(desktop) == QWEN_VRAM_BYTES

    status = await fetch_status(client)
    (resident,) = status.ollama.resident
    assert (resident.name, resident.vram_bytes, resident.offloaded) == (
        QWEN,
        QWEN_VRAM_BYTES,
        False,
    )
    assert status.telemetry.gpus[0].memory_by_owner_bytes["ollama"] == QWEN_VRAM_BYTES

    again = LoadResult.model_validate_json(
        (await client.post("/v1/ollama/load", json={"model": QWEN})).content
    )
    assert again.already_resident
    assert again.load_time_s < result.load_time_s
    assert again.nvml_delta_bytes == 0
    assert len(desktop.ollama.runners()) == 1


async def test_load_with_a_larger_context_reports_the_larger_footprint(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/v1/ollama/load", json={"model": QWEN, "num_ctx": 8192})
    assert response.status_code == 200, response.text
    result = LoadResult.model_validate_json(response.content)
    assert result.context_length == 8192
    # The KV cache grows by 224 MiB per extra 4096 tokens of context.
    assert result.vram_bytes == QWEN_VRAM_BYTES + 224 * MIB


async def test_unload_returns_only_when_the_memory_is_back(
    client: httpx.AsyncClient, desktop: SimDesktop
) -> None:
    assert (await client.post("/v1/ollama/load", json={"model": QWEN})).status_code == 200
    (pid,) = runner_pids(desktop)
    assert desktop.gpu.process_bytes(pid) == QWEN_VRAM_BYTES

    response = await client.post("/v1/ollama/unload", json={"model": QWEN})
    assert response.status_code == 200, response.text
    # Checked before anything else can run: the memory was back when the answer came.
    assert desktop.gpu.process_bytes(pid) == 0
    assert ollama_gpu_bytes(desktop) == 0
    result = UnloadResult.model_validate_json(response.content)
    assert result.model == QWEN
    assert result.was_resident
    assert result.confirmed_by == "nvml"
    assert result.freed_bytes == QWEN_VRAM_BYTES
    # Ollama keeps a runner's memory about a simulated second after it stops listing it.
    assert result.wait_s >= 1.0
    status = await fetch_status(client)
    assert status.ollama.resident == []


async def test_unload_of_a_model_that_is_not_resident(
    client: httpx.AsyncClient, desktop: SimDesktop
) -> None:
    response = await client.post("/v1/ollama/unload", json={"model": QWEN})
    assert response.status_code == 200, response.text
    result = UnloadResult.model_validate_json(response.content)
    assert not result.was_resident
    assert result.freed_bytes == 0
    assert desktop.ollama.runners() == []


async def test_unknown_models_are_404_json(client: httpx.AsyncClient, desktop: SimDesktop) -> None:
    error = assert_error(
        await client.post("/v1/ollama/load", json={"model": "nosuch:1b"}), 404, "model_not_found"
    )
    assert "nosuch:1b" in error["message"]
    assert_error(
        await client.post("/v1/ollama/unload", json={"model": "nosuch:1b"}), 404, "model_not_found"
    )
    assert desktop.ollama.runners() == []


async def _read_line(lines: AsyncIterator[str]) -> dict[str, Any]:
    async for line in lines:
        if line.strip():
            parsed: dict[str, Any] = json.loads(line)
            return parsed
    raise AssertionError("the stream ended early")


async def test_generate_streams_through_line_by_line(
    agent: RunningAgent, desktop: SimDesktop
) -> None:
    async with api_client(agent) as http:
        body = {"model": QWEN, "prompt": LONG_PROMPT, "options": {"num_predict": 4096}}
        async with http.stream("POST", "/api/generate", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/x-ndjson"
            lines = response.aiter_lines()
            first = await _read_line(lines)
            first_arrived_at = desktop.clock.wall()
            # The first line is here while the model is still generating the rest.
            assert agent.service.in_flight == {QWEN: 1}
            (runner,) = desktop.ollama.runners()
            assert runner.in_flight == 1
            assert first["done"] is False
            assert first["model"] == QWEN
            pieces = [first["response"]]
            while True:
                line = await _read_line(lines)
                if line["done"]:
                    break
                pieces.append(line["response"])
            last_arrived_at = desktop.clock.wall()
        assert line["done_reason"] == "stop"
        assert line["eval_count"] == len(pieces)
        assert "".join(pieces).strip()
        # Ollama stamps each line as it makes it: the last was made after the first had arrived.
        assert datetime.fromisoformat(line["created_at"]) > first_arrived_at
        # The answer streamed over seconds of simulated decoding (80 tokens a second), and
        # the agent passed each line on as it came: they arrived over the same span.
        made_s = (
            datetime.fromisoformat(line["created_at"]) - datetime.fromisoformat(first["created_at"])
        ).total_seconds()
        arrived_s = (last_arrived_at - first_arrived_at).total_seconds()
        assert made_s >= (len(pieces) - 1) / 80.0
        assert made_s > 1.0
        assert arrived_s == pytest.approx(made_s, abs=0.1)
    assert agent.service.in_flight == {}


async def test_a_client_hanging_up_mid_stream_frees_its_place(
    agent: RunningAgent, desktop: SimDesktop, caplog: pytest.LogCaptureFixture
) -> None:
    async with api_client(agent) as http:
        body = {"model": QWEN, "prompt": LONG_PROMPT}
        async with http.stream("POST", "/api/generate", json=body) as response:
            await _read_line(response.aiter_lines())
            assert agent.service.in_flight == {QWEN: 1}
        # Leaving the block closed the connection before the answer was complete.

        def settled() -> bool:
            runners = desktop.ollama.runners()
            return agent.service.in_flight == {} and [r.in_flight for r in runners] == [0]

        await wait_until(settled, what="the abandoned request to end upstream too")
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        # The agent serves the next request as usual.
        again = await http.post("/api/generate", json={**body, "stream": False})
        assert again.status_code == 200
        assert again.json()["done"] is True


async def test_the_model_named_in_x_gpu_model_is_the_one_counted(agent: RunningAgent) -> None:
    # The controller names the model in the header, so the agent need not parse the body; the
    # header is what counts (here on purpose not the body's model, to tell them apart).
    named = "named-by-the-controller:1b"
    async with api_client(agent, **AUTH, **{"X-GPU-Model": named}) as http:
        body = {"model": QWEN, "prompt": LONG_PROMPT, "options": {"num_predict": 4096}}
        async with http.stream("POST", "/api/generate", json=body) as response:
            first = await _read_line(response.aiter_lines())
            assert first["model"] == QWEN
            assert agent.service.in_flight == {named: 1}
    await wait_until(lambda: agent.service.in_flight == {}, what="the request to end")


async def test_unload_of_a_busy_model_needs_force(agent: RunningAgent, desktop: SimDesktop) -> None:
    async with api_client(agent) as http:
        body = {"model": QWEN, "prompt": LONG_PROMPT, "options": {"num_predict": 4096}}
        async with http.stream("POST", "/api/generate", json=body) as response:
            lines = response.aiter_lines()
            await _read_line(lines)
            refused = await http.post("/v1/ollama/unload", json={"model": QWEN})
            error = assert_error(refused, 409, "conflict")
            assert "force" in error["message"]
            status = await fetch_status(http)
            assert [(m.name, m.in_flight) for m in status.ollama.resident] == [(QWEN, 1)]
            assert status.ollama.in_flight == {QWEN: 1}

            # Forced, Ollama unloads once the running answer is done; the stream is not cut.
            forced = asyncio.create_task(
                http.post("/v1/ollama/unload", json={"model": QWEN, "force": True})
            )
            last = await _read_line(lines)
            while not last["done"]:
                last = await _read_line(lines)
            assert last["done_reason"] == "stop"
        response = await asyncio.wait_for(forced, timeout=60.0)
        assert response.status_code == 200, response.text
        result = UnloadResult.model_validate_json(response.content)
        assert result.was_resident
        assert result.confirmed_by == "nvml"
    assert desktop.ollama.runners() == []
    assert ollama_gpu_bytes(desktop) == 0


async def test_tags_and_errors_pass_through(client: httpx.AsyncClient, desktop: SimDesktop) -> None:
    response = await client.get("/api/tags")
    assert response.status_code == 200
    async with httpx.AsyncClient(trust_env=False) as direct:
        upstream = await direct.get(f"{desktop.ollama_url}/api/tags")
    assert response.json() == upstream.json()
    # Ollama's own error answers come through unchanged.
    missing = await client.post("/api/generate", json={"model": "nosuch:1b", "prompt": "hi"})
    assert missing.status_code == 404
    assert missing.json() == {"error": "model 'nosuch:1b' not found"}
    version = await client.get("/api/version")
    assert version.json() == {"version": desktop.ollama.settings.version}


async def test_the_official_ollama_client_works_through_the_agent(
    agent: RunningAgent, desktop: SimDesktop
) -> None:
    client = ollama.AsyncClient(host=agent.url, headers=AUTH, timeout=HTTP_TIMEOUT_S)
    generated = await client.generate(model=QWEN, prompt="Why is the sky blue?")
    assert generated.done
    assert (generated.response or "").strip()
    assert (generated.eval_count or 0) > 0

    chunks = [
        chunk
        async for chunk in await client.chat(
            model=QWEN, messages=[{"role": "user", "content": "Hello there"}], stream=True
        )
    ]
    assert len(chunks) > 2
    assert chunks[-1].done
    assert "".join(c.message.content or "" for c in chunks).strip()

    listed = await client.ps()
    assert [m.model for m in listed.models] == [QWEN]
    assert agent.service.in_flight == {}
    assert desktop.ollama.stats.requests == 2

    anonymous = ollama.AsyncClient(host=agent.url, timeout=HTTP_TIMEOUT_S)
    with pytest.raises(ollama.ResponseError) as refused:
        await anonymous.generate(model=QWEN, prompt="hi")
    assert refused.value.status_code == 401


# -- ComfyUI ----------------------------------------------------------------------------------


async def test_prompt_runs_to_a_png(client: httpx.AsyncClient, desktop: SimDesktop) -> None:
    response = await client.post("/v1/comfyui/prompts", json={"workflow": txt2img()})
    assert response.status_code == 202, response.text
    submitted = response.json()
    prompt_id = submitted["prompt_id"]
    assert str(uuid.UUID(prompt_id)) == prompt_id
    assert submitted["state"] in {"pending", "running"}
    assert submitted["nodes_total"] == 7

    done = await wait_prompt(client, prompt_id)
    assert done["state"] == "succeeded", done
    assert done["finished_at"] >= done["started_at"] >= done["submitted_at"]
    (output,) = done["outputs"]
    assert output["node_id"] == "9"
    assert output["type"] == "output"

    image = await client.get(f"/v1/comfyui/prompts/{prompt_id}/outputs/0")
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/png"
    assert image.content.startswith(PNG_SIGNATURE)
    assert image.content == (desktop.comfyui.output_dir / output["filename"]).read_bytes()
    assert_error(
        await client.get(f"/v1/comfyui/prompts/{prompt_id}/outputs/1"), 404, "output_not_found"
    )
    assert_error(
        await client.get(f"/v1/comfyui/prompts/{prompt_id}/outputs/first"), 400, "bad_request"
    )
    status = await fetch_status(client)
    assert [(p.prompt_id, p.state) for p in status.comfyui.prompts] == [(prompt_id, "succeeded")]


async def test_a_prompt_that_ends_between_two_samples_still_reports_its_peak(
    desktop: SimDesktop,
) -> None:
    """An SD1.5 image takes a few seconds; with telemetry every 30 s no periodic sample sees
    it run, yet the prompt reports ComfyUI's memory at its peak, read while it ran."""
    settings = agent_settings(sample_interval_s=30.0, stale_after_s=90.0)
    async with running_agent(settings, desktop) as agent, api_client(agent) as client:
        before = comfyui_gpu_bytes(desktop)
        response = await client.post("/v1/comfyui/prompts", json={"workflow": txt2img()})
        assert response.status_code == 202, response.text
        assert response.json()["peak_vram_bytes"] is None
        done = await wait_prompt(client, response.json()["prompt_id"])
        assert done["state"] == "succeeded", done
        # What ComfyUI keeps after the run (weights and the allocator's cache) is what it
        # held at the peak; before the run it held only its CUDA context.
        after = comfyui_gpu_bytes(desktop)
        assert after > before
        assert done["peak_vram_bytes"] >= after
        status = await fetch_status(client)
        assert status.comfyui.prompts[-1].peak_vram_bytes == done["peak_vram_bytes"]


async def test_resubmitting_the_same_prompt_id_runs_it_once(
    client: httpx.AsyncClient, desktop: SimDesktop
) -> None:
    prompt_id = str(uuid.uuid4())
    body = {"workflow": txt2img(seed=7), "prompt_id": prompt_id}
    first = await client.post("/v1/comfyui/prompts", json=body)
    second = await client.post("/v1/comfyui/prompts", json=body)
    assert first.status_code == second.status_code == 202
    assert first.json()["prompt_id"] == second.json()["prompt_id"] == prompt_id
    await wait_prompt(client, prompt_id)
    third = await client.post("/v1/comfyui/prompts", json=body)
    assert third.status_code == 202
    assert third.json()["state"] == "succeeded"
    assert desktop.comfyui.stats.prompts_run == 1


async def test_a_prompt_both_the_agent_and_comfyui_forgot_is_found_by_its_pictures(
    desktop: SimDesktop,
) -> None:
    """A prompt finishes; then the agent restarts and ComfyUI restarts, so neither remembers
    it. Submitted again under its id, it is found by the pictures it saved (their names end
    with its id) and reported as succeeded, not run a second time (a chaos day found this)."""
    prompt_id = str(uuid.uuid4())
    body = {"workflow": txt2img(seed=11), "prompt_id": prompt_id}
    async with running_agent(agent_settings(), desktop) as agent, api_client(agent) as client:
        response = await client.post("/v1/comfyui/prompts", json=body)
        assert response.status_code == 202, response.text
        first = await wait_prompt(client, prompt_id)
    assert first["state"] == "succeeded", first
    (saved,) = first["outputs"]
    assert saved["filename"] == f"fox_{prompt_id}_00001_.png"
    await desktop.restart_comfyui()

    async with running_agent(agent_settings(), desktop) as agent, api_client(agent) as client:
        response = await client.post("/v1/comfyui/prompts", json=body)
        assert response.status_code == 202, response.text
        again = response.json()
        assert again["state"] == "succeeded", again
        assert again["outputs"] == first["outputs"]
        picture = await client.get(f"/v1/comfyui/prompts/{prompt_id}/outputs/0")
        assert picture.content.startswith(PNG_SIGNATURE)
    assert desktop.comfyui.stats.prompts_run == 1


async def test_unknown_prompt_is_404(client: httpx.AsyncClient) -> None:
    missing = uuid.uuid4()
    assert_error(await client.get(f"/v1/comfyui/prompts/{missing}"), 404, "not_found")
    assert_error(await client.delete(f"/v1/comfyui/prompts/{missing}"), 404, "prompt_not_found")


async def test_invalid_workflow_is_400_with_node_errors(
    client: httpx.AsyncClient, desktop: SimDesktop
) -> None:
    workflow = txt2img()
    workflow["4"]["inputs"]["ckpt_name"] = "no-such-model.safetensors"
    response = await client.post("/v1/comfyui/prompts", json={"workflow": workflow})
    error = assert_error(response, 400, "workflow_rejected")
    details = error["details"]
    assert details["error"]["type"] == "prompt_outputs_failed_validation"
    node_errors = details["node_errors"]
    assert set(node_errors) == {"4"}
    assert node_errors["4"]["class_type"] == "CheckpointLoaderSimple"
    assert "ckpt_name" in json.dumps(node_errors["4"]["errors"])
    # Nothing is tracked for a rejected prompt.
    assert (await fetch_status(client)).comfyui.prompts == []
    assert desktop.comfyui.stats.prompts_run == 0


async def test_delete_cancels_a_pending_prompt(
    client: httpx.AsyncClient, desktop: SimDesktop
) -> None:
    running = (await client.post("/v1/comfyui/prompts", json={"workflow": slow_txt2img()})).json()
    await wait_prompt(client, running["prompt_id"], frozenset({"running"}))
    waiting = (await client.post("/v1/comfyui/prompts", json={"workflow": txt2img()})).json()
    assert waiting["state"] == "pending"

    response = await client.delete(f"/v1/comfyui/prompts/{waiting['prompt_id']}")
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "cancelled"

    async def queue_is(running: int, pending: int) -> bool:
        status = await fetch_status(client)
        return (status.comfyui.queue_running, status.comfyui.queue_pending) == (running, pending)

    await wait_until(lambda: queue_is(1, 0), what="one running prompt, none pending")

    # A running prompt is interrupted instead.
    await client.delete(f"/v1/comfyui/prompts/{running['prompt_id']}")
    stopped = await wait_prompt(client, running["prompt_id"])
    assert stopped["state"] in {"cancelled", "interrupted"}
    assert (await wait_prompt(client, waiting["prompt_id"]))["state"] == "cancelled"
    assert desktop.comfyui.stats.prompts_run == 1


async def test_free_waits_until_the_memory_is_released(
    client: httpx.AsyncClient, desktop: SimDesktop
) -> None:
    prompt = (await client.post("/v1/comfyui/prompts", json={"workflow": slow_txt2img(6)})).json()

    async def sampling() -> bool:
        info = (await client.get(f"/v1/comfyui/prompts/{prompt['prompt_id']}")).json()
        return bool(info["state"] == "running" and (info["step"] or 0) >= 1)

    # Past the checkpoint load, into the sampler steps: all the prompt's memory is held.
    await wait_until(sampling, timeout_s=600.0, poll_s=0.25, what="the first sampler step")
    assert desktop.comfyui.loaded_checkpoints()
    held = desktop.gpu.process_bytes(desktop.comfyui.pid)

    response = await client.post("/v1/comfyui/free", json={})
    assert response.status_code == 200, response.text
    # ComfyUI applies /free after the running prompt, and the agent waited for that.
    assert desktop.comfyui.running_prompt_id() is None
    assert desktop.comfyui.loaded_checkpoints() == []
    assert desktop.gpu.process_bytes(desktop.comfyui.pid) <= 400 * MIB + 64 * MIB
    result = response.json()
    assert result["confirmed_by"] == "nvml"
    assert result["freed_bytes"] >= held - 400 * MIB - 64 * MIB
    # The Flux prompt still had five of its six steps ahead of it, about 2 simulated seconds
    # each. (Kept short: while it waits, the agent asks ComfyUI and the GPU every 20 ms.)
    assert result["wait_s"] > 8.0
    assert (await wait_prompt(client, prompt["prompt_id"]))["state"] == "succeeded"


# -- metrics and events ---------------------------------------------------------------------------


async def test_metrics_show_the_state(agent: RunningAgent, desktop: SimDesktop) -> None:
    async with api_client(agent) as http:
        assert (await http.post("/v1/ollama/load", json={"model": QWEN})).status_code == 200
        running = await http.post("/v1/comfyui/prompts", json={"workflow": slow_txt2img()})
        await wait_prompt(http, running.json()["prompt_id"], frozenset({"running"}))
        await http.post("/v1/comfyui/prompts", json={"workflow": txt2img()})
        await wait_until(
            lambda: agent.service.status().comfyui.queue_pending == 1, what="queue read"
        )
        body = {"model": QWEN, "prompt": LONG_PROMPT}
        async with http.stream("POST", "/api/generate", json=body) as stream:
            await _read_line(stream.aiter_lines())
            response = await http.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        samples = metric_samples(response.text)

    def value(metric: str, **labels: str) -> float:
        return samples[(metric, frozenset(labels.items()))]

    gpu = {"gpu": "0", "name": GPU_NAME}
    assert value("gpu_agent_gpu_memory_total_bytes", **gpu) == 12_878_610_432
    used = value("gpu_agent_gpu_memory_used_bytes", **gpu)
    assert used == 12_878_610_432 - value("gpu_agent_gpu_memory_free_bytes", **gpu)
    assert value("gpu_agent_gpu_memory_by_owner_bytes", gpu="0", owner="ollama") == (
        QWEN_VRAM_BYTES
    )
    assert value("gpu_agent_gpu_memory_by_owner_bytes", gpu="0", owner="other") == 600 * MIB
    assert value("gpu_agent_gpu_memory_by_owner_bytes", gpu="0", owner="comfyui") > 4 * GIB
    assert value("gpu_agent_ollama_resident_models") == 1
    assert value("gpu_agent_ollama_model_vram_bytes", model=QWEN) == QWEN_VRAM_BYTES
    assert value("gpu_agent_ollama_requests_in_flight", model=QWEN) == 1
    assert value("gpu_agent_ollama_up") == 1
    assert value("gpu_agent_comfyui_queue_length", state="running") == 1
    assert value("gpu_agent_comfyui_queue_length", state="pending") == 1
    assert value("gpu_agent_comfyui_up") == 1
    assert value("gpu_agent_telemetry_status", status="ok") == 1
    assert 0 <= value("gpu_agent_telemetry_age_seconds") <= SAMPLE_INTERVAL_S


async def test_events_deliver_a_snapshot_then_prompt_and_model_events(
    agent: RunningAgent, client: httpx.AsyncClient
) -> None:
    events: list[AgentEvent] = []
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{agent.url}/v1/events", headers=AUTH) as ws,
    ):

        async def receive_until(wanted: Any) -> AgentEvent:
            # Simulated seconds: an SD 1.5 prompt, with its checkpoint load, takes a few.
            async with asyncio.timeout(120.0):
                while True:
                    message = await ws.receive()
                    assert message.type == aiohttp.WSMsgType.TEXT, message
                    event = AgentEvent.model_validate_json(message.data)
                    events.append(event)
                    if wanted(event):
                        return event

        first = await receive_until(lambda e: True)
        assert first.type == "snapshot"
        assert first.status is not None
        assert first.status.telemetry.gpus[0].name == GPU_NAME

        response = await client.post("/v1/comfyui/prompts", json={"workflow": txt2img()})
        prompt_id = response.json()["prompt_id"]
        await receive_until(
            lambda e: (
                e.type == "prompt"
                and e.prompt is not None
                and e.prompt.prompt_id == prompt_id
                and e.event == "finished"
            )
        )
        assert (await client.post("/v1/ollama/load", json={"model": QWEN})).status_code == 200
        loaded = await receive_until(lambda e: e.type == "model" and e.model == QWEN)
        # The load is announced once, with what it cost.
        assert loaded.event == "loaded"
        assert loaded.detail is not None
        assert loaded.detail["vram_bytes"] == QWEN_VRAM_BYTES
        assert (await client.post("/v1/ollama/unload", json={"model": QWEN})).status_code == 200
        unloaded = await receive_until(lambda e: e.type == "model" and e.event == "unloaded")
        assert unloaded.model == QWEN
        # A snapshot after the unload, whenever it comes, no longer lists the model.
        after = await receive_until(lambda e: e.type == "snapshot")
        assert after.status is not None
        assert after.status.ollama.resident == []
        await ws.close()

    prompt_events = [
        e.event
        for e in events
        if e.type == "prompt" and e.prompt is not None and e.prompt.prompt_id == prompt_id
    ]
    # receive_until returned on the prompt's "finished" event, so the list cannot be empty.
    assert prompt_events, f"no events for prompt {prompt_id}: {events}"
    assert prompt_events[0] == "submitted"
    assert "started" in prompt_events
    assert prompt_events[-1] == "finished"
    finished = [e for e in events if e.type == "prompt" and e.event == "finished"]
    assert len(finished) == 1, finished
    assert finished[0].prompt is not None
    assert finished[0].prompt.state == "succeeded"
    model_events = [(e.event, e.model) for e in events if e.type == "model"]
    assert model_events == [("loaded", QWEN), ("unloaded", QWEN)]
    assert [e.at for e in events] == sorted(e.at for e in events)


async def test_events_need_the_token(agent: RunningAgent) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{agent.url}/v1/events")
    assert refused.value.status == 401


async def test_an_idle_agent_still_sends_snapshots(agent: RunningAgent) -> None:
    # The test agent's telemetry counts as stale after 5 s: it speaks at least twice as often.
    heartbeat_s = agent.service.snapshot_heartbeat_s
    assert heartbeat_s == STALE_AFTER_S / 2
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{agent.url}/v1/events", headers=AUTH) as ws,
    ):
        arrivals: list[float] = []
        async with asyncio.timeout(10 * heartbeat_s):
            while len(arrivals) < 5:
                message = await ws.receive()
                assert message.type == aiohttp.WSMsgType.TEXT, message
                event = AgentEvent.model_validate_json(message.data)
                assert event.type == "snapshot"
                arrivals.append(asyncio.get_running_loop().time())
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert max(gaps) < 2 * heartbeat_s
