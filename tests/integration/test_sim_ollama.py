"""The emulated Ollama behind a real loopback server, driven by the official `ollama` client.

Shapes the client hides (content types, omitted fields, load/unload bodies) are checked with
plain httpx. The loop runs on virtual time, so every duration below is simulated seconds at the
desktop's real speed; every wait is on a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import ollama
import pytest

from gpu_agent.sim.catalog import GIB, MIB, Catalog
from gpu_agent.sim.clock import SimClock
from gpu_agent.sim.gpu import SimGpu
from gpu_agent.sim.ollama import OllamaEmulator, OllamaSimSettings
from gpu_agent.sim.ollama_scheduler import HEADROOM_BYTES
from gpu_agent.sim.server import LoopbackServer
from tests.waiting import wait_until

# Simulated seconds: Ollama's own load timeout. The slowest request here (a partly offloaded
# model writing a few hundred tokens at 9 tokens/s) takes well under a minute.
CLIENT_TIMEOUT_S = 300.0
# Float rounding between the loop's clock and the desktop's: durations compare with this slack.
SLACK_S = 1e-6
CREATED_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
OTHER_PID = 4242  # some other GPU process (ComfyUI, a desktop compositor)


@dataclass
class Desk:
    """One emulated Ollama on its own simulated GPU, with both kinds of client."""

    clock: SimClock
    gpu: SimGpu
    emu: OllamaEmulator
    server: LoopbackServer
    client: ollama.AsyncClient
    http: httpx.AsyncClient


MakeDesk = Callable[..., Awaitable[Desk]]


@pytest.fixture
async def make_desk() -> AsyncIterator[MakeDesk]:
    made: list[Desk] = []

    async def make(settings: OllamaSimSettings | None = None, *, seed: int = 7) -> Desk:
        clock = SimClock()
        gpu = SimGpu(clock)
        emu = OllamaEmulator(
            clock=clock,
            gpu=gpu,
            catalog=Catalog(),
            seed=seed,
            settings=settings or OllamaSimSettings(),
        )
        server = LoopbackServer(emu.make_app)
        await server.start()
        desk = Desk(
            clock=clock,
            gpu=gpu,
            emu=emu,
            server=server,
            client=ollama.AsyncClient(host=server.url, timeout=CLIENT_TIMEOUT_S),
            http=httpx.AsyncClient(base_url=server.url, timeout=CLIENT_TIMEOUT_S),
        )
        made.append(desk)
        return desk

    yield make
    for desk in made:
        await desk.emu.close()
        await desk.client.close()  # type: ignore[no-untyped-call]
        await desk.http.aclose()
        await desk.server.stop()


@pytest.fixture
async def desk(make_desk: MakeDesk) -> Desk:
    return await make_desk()


def tokens_per_s(final: dict[str, object] | ollama.GenerateResponse) -> float:
    eval_count = final["eval_count"]
    eval_duration = final["eval_duration"]
    assert isinstance(eval_count, int)
    assert isinstance(eval_duration, int)
    return eval_count / eval_duration * 1e9


# -- plain endpoints ---------------------------------------------------------------------------


async def test_root_version_and_routing(desk: Desk) -> None:
    root = await desk.http.get("/")
    assert root.status_code == 200
    assert root.text == "Ollama is running"
    assert root.headers["content-type"].startswith("text/plain")
    assert (await desk.http.head("/")).status_code == 200
    version = await desk.http.get("/api/version")
    assert version.json() == {"version": "0.33.0-rc2"}
    missing = await desk.http.get("/api/nothing")
    assert (missing.status_code, missing.text) == (404, "404 page not found")
    wrong_method = await desk.http.get("/api/generate")
    assert wrong_method.status_code == 405


async def test_list_shows_the_catalogue(desk: Desk) -> None:
    listed = await desk.client.list()
    catalog = Catalog()
    assert [m.model for m in listed.models] == [s.name for s in catalog.ollama_models]
    by_name = {m.model: m for m in listed.models}
    qwen = by_name["qwen2.5:7b"]
    spec = catalog.ollama_model("qwen2.5:7b")
    assert spec is not None
    assert qwen.size == spec.file_size_bytes
    assert qwen.digest == spec.digest
    assert qwen.details is not None
    assert qwen.details.parameter_size == "7.6B"
    assert qwen.details.quantization_level == "Q4_K_M"
    assert qwen.modified_at is not None
    raw = (await desk.http.get("/api/tags")).json()
    assert raw["models"][0]["details"]["format"] == "gguf"


async def test_show_and_its_errors(desk: Desk) -> None:
    shown = await desk.client.show("qwen2.5:7b")
    assert shown.capabilities == ["completion", "tools"]
    assert shown.modelinfo is not None
    assert shown.modelinfo["qwen2.context_length"] == 32768
    assert shown.modelinfo["tokenizer.ggml.tokens"] is None
    assert shown.modelfile is not None
    assert "FROM /usr/share/ollama/.ollama/models/blobs/sha256-" in shown.modelfile
    verbose = await desk.http.post("/api/show", json={"name": "qwen2.5:7b", "verbose": True})
    assert verbose.status_code == 200
    assert len(verbose.json()["model_info"]["tokenizer.ggml.tokens"]) > 100
    with pytest.raises(ollama.ResponseError) as missing:
        await desk.client.show("nope")
    assert missing.value.status_code == 404
    assert missing.value.error == "model 'nope:latest' not found"
    no_model = await desk.http.post("/api/show", json={})
    assert (no_model.status_code, no_model.json()) == (400, {"error": "model is required"})


# -- generate and chat -------------------------------------------------------------------------


async def test_generate_not_streamed_reports_a_complete_final_object(desk: Desk) -> None:
    reply = await desk.client.generate("llama3.2:3b", "Why is the sky blue?", stream=False)
    assert reply.done is True
    assert reply.done_reason == "stop"
    assert reply.model == "llama3.2:3b"
    assert reply.created_at is not None
    assert CREATED_AT.match(reply.created_at)
    assert reply.response
    assert isinstance(reply.eval_count, int)
    assert 40 <= reply.eval_count <= 300
    for name in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(reply[name], int), name
        assert reply[name] > 0, name
    # A cold load of the 3B model takes 2 s of simulated time.
    assert reply.load_duration is not None
    assert reply.load_duration >= 2_000_000_000
    assert reply.total_duration is not None
    assert reply.eval_duration is not None
    assert reply.total_duration >= reply.load_duration + reply.eval_duration
    # Decode runs at the catalogue speed (165 tokens/s on the full GPU).
    assert tokens_per_s(reply) == pytest.approx(165, rel=0.01)
    assert reply.context is not None
    assert reply.prompt_eval_count is not None
    assert len(reply.context) == reply.prompt_eval_count + reply.eval_count
    # The second request finds the runner resident: load_duration is tens of milliseconds.
    again = await desk.client.generate("llama3.2:3b", "Why is grass green?", stream=False)
    assert again.load_duration is not None
    assert 10_000_000 <= again.load_duration <= 60_000_000


async def test_generate_streamed_matches_not_streamed(desk: Desk) -> None:
    prompt = "Describe a quiet studio."
    chunks = [part async for part in await desk.client.generate("qwen2.5:7b", prompt, stream=True)]
    assert chunks, "the stream sent nothing"
    final = chunks[-1]
    pieces = chunks[:-1]
    assert all(not p.done for p in pieces)
    assert final.done is True
    assert final.response == ""
    assert final.eval_count == len(pieces)
    assert all(p.created_at and CREATED_AT.match(p.created_at) for p in chunks)
    whole = await desk.client.generate("qwen2.5:7b", prompt, stream=False)
    assert whole.response == "".join(p.response or "" for p in pieces)
    assert whole.eval_count == final.eval_count


async def test_chat_streamed_and_not(desk: Desk) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
    ]
    parts = [
        part async for part in await desk.client.chat("llama3.2:3b", messages=messages, stream=True)
    ]
    assert parts, "the stream sent nothing"
    assert all(p.message.role == "assistant" for p in parts)
    final = parts[-1]
    assert final.done is True
    assert final.done_reason == "stop"
    assert final.message.content == ""
    assert final.eval_count == len(parts) - 1
    assert isinstance(final.prompt_eval_count, int)
    assert final.prompt_eval_count > 10
    whole = await desk.client.chat("llama3.2:3b", messages=messages, stream=False)
    assert whole.message.content == "".join(p.message.content or "" for p in parts[:-1])
    assert whole.eval_duration is not None
    assert whole.eval_duration > 0
    raw = await desk.http.post(
        "/api/chat", json={"model": "llama3.2:3b", "messages": messages, "stream": False}
    )
    assert "context" not in raw.json()


async def test_text_is_deterministic_for_a_seed(make_desk: MakeDesk) -> None:
    first = await make_desk(seed=11)
    second = await make_desk(seed=11)
    other = await make_desk(seed=12)
    prompt = "Plan the render queue."
    a = await first.client.generate("llama3.2:3b", prompt, stream=False)
    b = await second.client.generate("llama3.2:3b", prompt, stream=False)
    c = await other.client.generate("llama3.2:3b", prompt, stream=False)
    assert a.response == b.response
    assert a.context == b.context
    assert a.response != c.response
    seeded = await first.client.generate("llama3.2:3b", prompt, stream=False, options={"seed": 5})
    assert seeded.response != a.response
    capped = await first.client.generate(
        "llama3.2:3b", prompt, stream=False, options={"seed": 5, "num_predict": 10}
    )
    assert capped.done_reason == "length"
    assert capped.eval_count == 10
    assert seeded.response is not None
    assert capped.response is not None
    assert seeded.response.startswith(capped.response)


async def test_stop_sequence_ends_the_answer(desk: Desk) -> None:
    prompt = "Tell a story."
    full = await desk.client.generate("llama3.2:3b", prompt, stream=False)
    assert full.response is not None
    cut_word = full.response.split()[3]
    stopped = await desk.client.generate(
        "llama3.2:3b", prompt, stream=False, options={"stop": [cut_word]}
    )
    assert stopped.done_reason == "stop"
    assert stopped.response is not None
    assert cut_word not in stopped.response
    assert full.response.startswith(stopped.response)


# -- load, unload, keep-alive ------------------------------------------------------------------


async def test_load_then_ps_lists_the_runner(desk: Desk) -> None:
    before = desk.clock.now()
    loaded = await desk.client.generate("qwen2.5:7b")
    assert loaded.done_reason == "load"
    assert loaded.response == ""
    # A cold load takes 3.5 s of simulated time and the call waits for it.
    assert desk.clock.now() - before >= 3.5 - SLACK_S
    ps = await desk.client.ps()
    assert len(ps.models) == 1
    entry = ps.models[0]
    spec = Catalog().ollama_model("qwen2.5:7b")
    assert spec is not None
    assert entry.model == "qwen2.5:7b"
    assert entry.size == spec.required_bytes(4096)
    assert entry.size_vram == entry.size
    assert entry.context_length == 4096
    assert entry.expires_at is not None
    remaining_s = (entry.expires_at - desk.clock.wall()).total_seconds()
    assert 280 < remaining_s <= 300
    (runner,) = desk.emu.runners()
    assert desk.gpu.process_bytes(runner.pid) == entry.size_vram
    reading = desk.gpu.reading()
    assert [p.name for p in reading.processes] == ["ollama"]
    cmdline = reading.processes[0].cmdline
    assert cmdline is not None
    assert cmdline[:3] == ("/usr/local/bin/ollama", "runner", "--model")
    assert cmdline[3].endswith(spec.digest)
    assert desk.emu.stats.loads == 1


async def test_chat_load_and_unload_bodies(desk: Desk) -> None:
    loaded = await desk.http.post("/api/chat", json={"model": "llama3.2:3b", "messages": []})
    assert loaded.headers["content-type"] == "application/json; charset=utf-8"
    body = loaded.json()
    assert set(body) == {"model", "created_at", "message", "done", "done_reason"}
    assert body["message"] == {"role": "assistant", "content": ""}
    assert body["done_reason"] == "load"
    unloaded = await desk.client.chat("llama3.2:3b", messages=[], keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert unloaded.message.content == ""


async def test_unload_answers_at_once_then_frees_memory(
    make_desk: MakeDesk,
) -> None:
    desk = await make_desk(settings=OllamaSimSettings(unload_release_s=60.0))
    await desk.client.generate("llama3.2:3b")
    (runner,) = desk.emu.runners()
    assert desk.gpu.used_bytes() == runner.size_vram_bytes > 0
    asked_at = desk.clock.now()
    reply = await desk.client.generate("llama3.2:3b", keep_alive=0)
    assert reply.done_reason == "unload"
    assert desk.clock.now() - asked_at < 60.0
    ps = await desk.client.ps()
    assert [m.model for m in ps.models] == ["llama3.2:3b"]
    assert ps.models[0].expires_at is not None
    assert abs((ps.models[0].expires_at - desk.clock.wall()).total_seconds()) < 60.0
    assert desk.emu.runners()[0].stopping
    assert desk.gpu.used_bytes() > 0
    await wait_until(lambda: not desk.emu.runners(), what="the runner to go")
    assert desk.clock.now() - asked_at >= 60.0 - SLACK_S
    assert desk.gpu.used_bytes() == 0
    assert desk.gpu.process_bytes(runner.pid) == 0
    assert (await desk.client.ps()).models == []
    # Unloading what is not loaded still answers 200.
    again = await desk.client.generate("llama3.2:3b", keep_alive=0)
    assert again.done_reason == "unload"


async def test_missing_model_is_404(desk: Desk) -> None:
    with pytest.raises(ollama.ResponseError) as generate:
        await desk.client.generate("nope", "hi")
    assert (generate.value.status_code, generate.value.error) == (404, "model 'nope' not found")
    with pytest.raises(ollama.ResponseError) as chat:
        await desk.client.chat("nope:7b", messages=[{"role": "user", "content": "hi"}])
    assert (chat.value.status_code, chat.value.error) == (404, "model 'nope:7b' not found")
    with pytest.raises(ollama.ResponseError) as unload:
        await desk.client.generate("nope", keep_alive=0)
    assert unload.value.status_code == 404
    empty = await desk.http.post("/api/generate", json={"model": ""})
    assert (empty.status_code, empty.json()) == (404, {"error": "model '' not found"})
    chat_empty = await desk.http.post("/api/chat", json={"model": ""})
    assert (chat_empty.status_code, chat_empty.json()) == (400, {"error": "model is required"})


async def test_keep_alive_expiry_unloads_when_idle(desk: Desk) -> None:
    asked_at = desk.clock.now()
    reply = await desk.client.generate("llama3.2:3b", "Hello there.", keep_alive="20s")
    finished_at = desk.clock.now()
    (runner,) = desk.emu.runners()
    # The clock started when the request ended (after a 2 s cold load), not when it arrived.
    assert asked_at + 2.0 < runner.expires_at - 20.0 <= finished_at + SLACK_S
    assert reply.total_duration is not None
    await wait_until(lambda: not desk.emu.runners(), what="keep-alive expiry")
    assert desk.clock.now() >= runner.expires_at - SLACK_S
    assert desk.gpu.used_bytes() == 0
    assert desk.emu.stats.unloads == 1


async def test_negative_keep_alive_pins_the_model(desk: Desk) -> None:
    await desk.client.generate("llama3.2:3b", keep_alive=-1)
    ps = await desk.client.ps()
    assert ps.models[0].expires_at is not None
    assert ps.models[0].expires_at.year >= 2300
    raw = await desk.http.post("/api/generate", json={"model": "llama3.2:3b", "keep_alive": "-1m"})
    assert raw.status_code == 200
    assert desk.emu.runners()[0].expires_at == float("inf")


async def test_request_with_keep_alive_zero_unloads_after_it(desk: Desk) -> None:
    reply = await desk.client.generate("llama3.2:3b", "Short one.", keep_alive=0)
    assert reply.done_reason == "stop"
    await wait_until(lambda: not desk.emu.runners(), what="unload after the request")
    assert desk.gpu.used_bytes() == 0


async def test_bad_keep_alive_is_400(desk: Desk) -> None:
    for value, message in [
        (True, "Unsupported type: 'bool'"),
        ([1], "Unsupported type: '[]interface {}'"),
        ("5x", 'time: unknown unit "x" in duration "5x"'),
        ("5", 'time: missing unit in duration "5"'),
    ]:
        reply = await desk.http.post(
            "/api/generate", json={"model": "llama3.2:3b", "prompt": "hi", "keep_alive": value}
        )
        assert (reply.status_code, reply.json()) == (400, {"error": message}), value
    assert desk.emu.runners() == []


# -- scheduling --------------------------------------------------------------------------------


async def test_small_models_share_the_card(desk: Desk) -> None:
    await desk.client.generate("llama3.2:3b")
    await desk.client.generate("qwen2.5:7b")
    assert sorted(r.model for r in desk.emu.runners()) == ["llama3.2:3b", "qwen2.5:7b"]
    assert desk.emu.stats.evictions == 0
    assert all(r.size_vram_bytes == r.size_bytes for r in desk.emu.runners())


async def test_big_model_evicts_an_idle_one(desk: Desk) -> None:
    await desk.client.generate("qwen2.5:14b")
    evicted_pid = desk.emu.runners()[0].pid
    await desk.client.generate("qwen2.5:7b")
    runners = desk.emu.runners()
    assert [r.model for r in runners] == ["qwen2.5:7b"]
    assert runners[0].size_vram_bytes == runners[0].size_bytes
    assert desk.emu.stats.evictions == 1
    assert desk.gpu.process_bytes(evicted_pid) == 0
    assert desk.gpu.used_bytes() == runners[0].size_vram_bytes


async def test_busy_model_is_evicted_after_its_request(desk: Desk) -> None:
    await desk.client.generate("qwen2.5:14b")
    stream = await desk.client.generate("qwen2.5:14b", "Write at length.", stream=True)
    first = await anext(stream)
    assert not first.done
    load = asyncio.create_task(desk.client.generate("qwen2.5:7b"))
    rest = [part async for part in stream]
    assert rest, "the stream ended without its final object"
    assert rest[-1].done_reason in ("stop", "length")
    await load
    assert [r.model for r in desk.emu.runners()] == ["qwen2.5:7b"]
    assert desk.emu.stats.evictions == 1


async def test_partial_offload_when_another_process_holds_memory(desk: Desk) -> None:
    desk.gpu.attach(OTHER_PID, "python", ("python", "main.py"))
    desk.gpu.allocate(OTHER_PID, 4 * GIB)
    free_before = desk.gpu.free_bytes()
    reply = await desk.client.generate("qwen2.5:14b", "Summarise the brief.", stream=False)
    (entry,) = (await desk.client.ps()).models
    assert entry.size is not None
    assert entry.size_vram is not None
    assert entry.size_vram < entry.size
    assert entry.size_vram == free_before - HEADROOM_BYTES
    assert desk.emu.stats.spilled_generations == 1
    # 14B runs at 45 tokens/s on the full GPU; with a quarter of it on the CPU it is far slower.
    assert tokens_per_s(reply) < 0.6 * 45


async def test_cpu_only_with_num_gpu_zero(desk: Desk) -> None:
    await desk.client.generate("llama3.2:3b", options={"num_gpu": 0})
    (runner,) = desk.emu.runners()
    assert runner.size_vram_bytes == 0
    assert desk.gpu.used_bytes() == 0
    assert (await desk.client.ps()).models[0].size_vram == 0


async def test_mistral_small_never_fits(desk: Desk) -> None:
    # A desktop session holds 600 MiB, as on the real machine.
    desk.gpu.attach(OTHER_PID, "Xorg", ("/usr/lib/xorg/Xorg",), compute=False)
    desk.gpu.allocate(OTHER_PID, 600 * MIB)
    reply = await desk.client.generate("mistral-small", "Explain offloading.", stream=False)
    (runner,) = desk.emu.runners()
    assert runner.model == "mistral-small:latest"
    assert 0 < runner.size_vram_bytes < runner.size_bytes
    assert 9.0 <= tokens_per_s(reply) <= 11.0


async def test_decode_slows_while_the_gpu_is_shared(desk: Desk) -> None:
    alone = await desk.client.generate("llama3.2:3b", "First.", stream=False)
    with desk.gpu.working("diffusion"):  # ComfyUI sampling at the same time
        shared = await desk.client.generate("llama3.2:3b", "Second.", stream=False)
    assert tokens_per_s(alone) == pytest.approx(165, rel=0.01)
    assert tokens_per_s(shared) == pytest.approx(165 / 2, rel=0.01)


async def test_num_ctx_change_forces_a_reload(desk: Desk) -> None:
    await desk.client.generate("qwen2.5:7b", "One.", options={"num_ctx": 4096})
    (first,) = desk.emu.runners()
    reply = await desk.client.generate("qwen2.5:7b", "Two.", options={"num_ctx": 16384})
    (second,) = desk.emu.runners()
    assert second.pid != first.pid
    assert second.num_ctx == 16384
    assert second.size_bytes > first.size_bytes
    assert desk.emu.stats.reloads == 1
    assert desk.emu.stats.loads == 2
    # The reload is warm (1.8 s) and waited for the old runner's memory (1 s).
    assert reply.load_duration is not None
    assert reply.load_duration >= 2_800_000_000
    assert (await desk.client.ps()).models[0].context_length == 16384
    # Sampling options never reload.
    await desk.client.generate(
        "qwen2.5:7b", "Three.", options={"temperature": 0.1, "num_ctx": 16384}
    )
    assert desk.emu.stats.reloads == 1


async def test_queue_full_is_503(make_desk: MakeDesk) -> None:
    desk = await make_desk(settings=OllamaSimSettings(max_queue=1))
    slow = {"num_gpu": 0}  # on the CPU a 14B model makes about 5 tokens/s
    await desk.client.generate("qwen2.5:14b", options=slow)
    running = await desk.client.generate("qwen2.5:14b", "Go on.", stream=True, options=slow)
    await anext(running)
    queued = asyncio.create_task(
        desk.client.generate(
            "qwen2.5:14b", "Me next.", stream=False, options={**slow, "num_predict": 5}
        )
    )
    await wait_until(lambda: desk.emu.queued_requests() == 1, what="the second request to queue")
    with pytest.raises(ollama.ResponseError) as full:
        await desk.client.generate("qwen2.5:14b", "And me.", stream=False, options=slow)
    assert full.value.status_code == 503
    assert full.value.error == "server busy, please try again.  maximum pending requests exceeded"
    assert desk.emu.stats.rejected == 1
    assert isinstance(running, AsyncGenerator)
    await running.aclose()  # the client goes away; its slot frees the queued request
    done = await queued
    assert done.done is True


# -- faults and raw shapes ---------------------------------------------------------------------


async def test_mid_stream_error_line_raises_in_the_client(desk: Desk) -> None:
    desk.emu.faults.fail_stream_after_tokens = 3
    seen: list[ollama.GenerateResponse] = []

    async def consume() -> None:
        async for part in await desk.client.generate("llama3.2:3b", "Go.", stream=True):
            seen.append(part)

    with pytest.raises(ollama.ResponseError) as failure:
        await consume()
    assert len(seen) == 3
    assert failure.value.status_code == -1
    assert "error was encountered while running the model" in failure.value.error
    raw = await desk.http.post("/api/generate", json={"model": "llama3.2:3b", "prompt": "Go."})
    assert raw.status_code == 200
    lines = [json.loads(line) for line in raw.text.splitlines()]
    assert len(lines) == 4
    assert set(lines[-1]) == {"error"}


async def test_raw_shapes(desk: Desk) -> None:
    load = await desk.http.post("/api/generate", json={"model": "llama3.2:3b"})
    assert load.headers["content-type"] == "application/json; charset=utf-8"
    body = load.json()
    assert set(body) == {"model", "created_at", "response", "done", "done_reason"}
    assert (body["model"], body["response"], body["done"]) == ("llama3.2:3b", "", True)
    assert body["done_reason"] == "load"

    streamed = await desk.http.post("/api/generate", json={"model": "llama3.2", "prompt": "hi"})
    assert streamed.status_code == 404  # `llama3.2` means llama3.2:latest, which is not installed

    streamed = await desk.http.post("/api/generate", json={"model": "llama3.2:3b", "prompt": "hi"})
    assert streamed.headers["content-type"] == "application/x-ndjson"
    assert streamed.text.endswith("\n")
    lines = [json.loads(line) for line in streamed.text.splitlines()]
    assert list(lines[0]) == ["model", "created_at", "response", "done"]
    final = lines[-1]
    assert final["done"] is True
    for name in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(final[name], int)
    assert final["eval_count"] == len(lines) - 1

    # A stop sequence that matches the first word leaves nothing to count: the fields go.
    first_word = lines[0]["response"]
    empty = await desk.http.post(
        "/api/generate",
        json={
            "model": "llama3.2:3b",
            "prompt": "hi",
            "stream": False,
            "options": {"stop": [first_word]},
        },
    )
    assert empty.headers["content-type"] == "application/json; charset=utf-8"
    result = empty.json()
    assert result["response"] == ""
    assert "eval_count" not in result
    assert "eval_duration" not in result
    assert result["prompt_eval_count"] > 0

    raw_mode = await desk.http.post(
        "/api/generate", json={"model": "llama3.2:3b", "prompt": "hi", "raw": True, "stream": False}
    )
    assert "context" not in raw_mode.json()
    both = await desk.http.post(
        "/api/generate", json={"model": "llama3.2:3b", "prompt": "hi", "raw": True, "system": "x"}
    )
    assert (both.status_code, both.json()) == (
        400,
        {"error": "raw mode does not support template, system, or context"},
    )


async def test_malformed_requests(desk: Desk) -> None:
    empty = await desk.http.post("/api/generate", content=b"")
    assert (empty.status_code, empty.json()) == (400, {"error": "missing request body"})
    broken = await desk.http.post("/api/chat", content=b"{not json")
    assert broken.status_code == 400
    assert broken.json()["error"].startswith("invalid character")
    wrong_type = await desk.http.post("/api/generate", json={"model": "llama3.2:3b", "prompt": 5})
    assert wrong_type.status_code == 400
    assert wrong_type.json()["error"] == (
        "json: cannot unmarshal number into Go struct field GenerateRequest.prompt of type string"
    )
    bad_option = await desk.http.post(
        "/api/generate",
        json={"model": "llama3.2:3b", "prompt": "hi", "options": {"num_ctx": "big"}},
    )
    assert (bad_option.status_code, bad_option.json()) == (
        500,
        {"error": 'option "num_ctx" must be of type integer'},
    )


async def test_fault_middleware_uses_ollama_error_bodies(desk: Desk) -> None:
    desk.emu.faults.fail(500, "boom", count=1)
    with pytest.raises(ollama.ResponseError) as failure:
        await desk.client.list()
    assert (failure.value.status_code, failure.value.error) == (500, "boom")
    assert (await desk.client.list()).models


async def test_reset_drops_everything_but_the_page_cache(make_desk: MakeDesk) -> None:
    # On the CPU the answer takes many simulated seconds: it is still streaming at the reset.
    desk = await make_desk()
    cpu = {"num_gpu": 0}
    await desk.client.generate("llama3.2:3b", options=cpu)
    stream = await desk.client.generate("llama3.2:3b", "Keep talking.", stream=True, options=cpu)
    await anext(stream)
    assert desk.emu.runners()[0].in_flight == 1
    await desk.emu.reset()
    with pytest.raises(httpx.HTTPError):
        async for _ in stream:
            pass
    assert desk.emu.runners() == []
    assert desk.gpu.reading().processes == ()
    before = desk.clock.now()
    await desk.client.generate("llama3.2:3b")
    assert desk.clock.now() - before >= 1.2 - SLACK_S
    # The weights were still in the page cache: the second load was warm.
    assert (desk.emu.stats.loads, desk.emu.stats.cold_loads) == (2, 1)
    assert desk.gpu.used_bytes() == desk.emu.runners()[0].size_vram_bytes > 0


async def test_created_at_follows_the_simulated_wall_clock(desk: Desk) -> None:
    reply = await desk.client.generate("llama3.2:3b", "Time?", stream=False)
    assert reply.created_at is not None
    stamp = datetime.strptime(reply.created_at[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    assert abs(stamp - desk.clock.wall()) < timedelta(seconds=60)
