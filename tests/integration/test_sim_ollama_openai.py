"""The emulated Ollama's embeddings and OpenAI-compatible routes, over a real loopback server.

Driven by the official `ollama` and `openai` clients, unchanged, and by plain httpx for what the
clients hide (the SSE framing, error bodies, omitted fields). Virtual time: durations are
simulated seconds at the desktop's real speed.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import ollama
import openai
import pytest

from gpu_agent.sim.catalog import MIB, Catalog
from gpu_agent.sim.clock import SimClock
from gpu_agent.sim.gpu import SimGpu
from gpu_agent.sim.ollama import OllamaEmulator
from gpu_agent.sim.server import LoopbackServer

CLIENT_TIMEOUT_S = 300.0
NOMIC = "nomic-embed-text:latest"
BGE = "bge-m3:latest"
SMALL = "llama3.2:3b"


@dataclass
class Desk:
    """One emulated Ollama on its own simulated GPU, with the three kinds of client."""

    gpu: SimGpu
    emu: OllamaEmulator
    client: ollama.AsyncClient
    oai: openai.AsyncOpenAI
    http: httpx.AsyncClient


@pytest.fixture
async def desk() -> AsyncIterator[Desk]:
    clock = SimClock()
    gpu = SimGpu(clock)
    emu = OllamaEmulator(clock=clock, gpu=gpu, catalog=Catalog(), seed=7)
    server = LoopbackServer(emu.make_app)
    await server.start()
    http = httpx.AsyncClient(base_url=server.url, timeout=CLIENT_TIMEOUT_S)
    oai = openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="ollama", timeout=CLIENT_TIMEOUT_S, max_retries=0
    )
    try:
        yield Desk(
            gpu, emu, ollama.AsyncClient(host=server.url, timeout=CLIENT_TIMEOUT_S), oai, http
        )
    finally:
        await oai.close()
        await http.aclose()
        await server.stop()
        await emu.close()


def _norm(vector: Sequence[float]) -> float:
    return math.sqrt(sum(v * v for v in vector))


async def test_embed_normalises_cuts_and_counts(desk: Desk) -> None:
    answer = await desk.client.embed(model="nomic-embed-text", input=["a cat", "a dog"])

    assert answer.model == "nomic-embed-text"  # as sent
    vectors = answer.embeddings
    assert [len(v) for v in vectors] == [768, 768]
    assert all(abs(_norm(v) - 1.0) < 1e-5 for v in vectors)
    assert vectors[0] != vectors[1]
    assert answer.prompt_eval_count is not None
    assert answer.prompt_eval_count >= 4
    assert answer.total_duration
    assert answer.total_duration >= (answer.load_duration or 0)
    again = await desk.client.embed(model=NOMIC, input="a cat")
    assert again.embeddings == [vectors[0]]

    short = await desk.client.embed(model=NOMIC, input="a cat", dimensions=256)
    assert len(short.embeddings[0]) == 256
    assert abs(_norm(short.embeddings[0]) - 1.0) < 1e-5

    # The older route answers the same vector, not normalised.
    legacy = await desk.client.embeddings(model=NOMIC, prompt="a cat")
    raw = list(legacy.embedding)
    assert abs(_norm(raw) - 1.0) > 0.1
    scale = _norm(raw)
    assert all(abs(r / scale - v) < 1e-5 for r, v in zip(raw, vectors[0], strict=True))


async def test_embedding_models_load_with_their_memory_and_refuse_generate(desk: Desk) -> None:
    loaded = await desk.http.post("/api/embed", json={"model": BGE})
    assert loaded.status_code == 200
    assert loaded.json() == {"model": BGE, "embeddings": []}
    (runner,) = desk.emu.runners()
    assert runner.model == BGE
    assert runner.size_vram_bytes == runner.size_bytes
    # 1.2 GB of F16 weights and a compute graph, no KV cache.
    assert 1_200_000_000 < runner.size_bytes < 1_200_000_000 + 200 * MIB
    assert desk.gpu.used_bytes() >= runner.size_bytes

    for path, what in (("/api/generate", "generate"), ("/api/chat", "chat")):
        body: dict[str, Any] = {"model": "nomic-embed-text", "stream": False}
        if what == "generate":
            body["prompt"] = "hi"
        else:
            body["messages"] = []
        refused = await desk.http.post(path, json=body)
        assert refused.status_code == 400
        assert refused.json() == {"error": f'"nomic-embed-text" does not support {what}'}
    # Unloading goes through generate all the same, as in Ollama.
    unloaded = await desk.http.post("/api/generate", json={"model": BGE, "keep_alive": 0})
    assert unloaded.json()["done_reason"] == "unload"


async def test_embed_errors_in_ollamas_words(desk: Desk) -> None:
    cases = [
        ({"model": "", "input": "x"}, 404, "model '' not found"),
        ({"model": "nope:1b", "input": "x"}, 404, "model 'nope:1b' not found"),
        ({"model": NOMIC, "input": [1, 2]}, 400, "invalid input type"),
        ({"model": NOMIC, "input": "w " * 5000, "truncate": False}, 400, "context length"),
    ]
    for body, status, needle in cases:
        response = await desk.http.post("/api/embed", json=body)
        assert response.status_code == status, body
        assert needle in response.json()["error"]
    missing = await desk.http.post("/api/embeddings", json={"prompt": "x"})
    assert (missing.status_code, missing.json()) == (400, {"error": "model is required"})
    # A long input is cut to the context by default.
    cut = await desk.http.post("/api/embed", json={"model": NOMIC, "input": "w " * 5000})
    assert cut.json()["prompt_eval_count"] == 2048


async def test_tags_list_capabilities(desk: Desk) -> None:
    listed = (await desk.http.get("/api/tags")).json()["models"]
    capabilities = {m["name"]: m["capabilities"] for m in listed}
    assert capabilities[NOMIC] == ["embedding"]
    assert "completion" in capabilities[SMALL]


async def test_openai_chat_not_streamed_and_streamed(desk: Desk) -> None:
    answer = await desk.oai.chat.completions.create(
        model=SMALL, messages=[{"role": "user", "content": "hello"}], max_tokens=12
    )
    assert answer.object == "chat.completion"
    assert answer.id.startswith("chatcmpl-")
    assert answer.system_fingerprint == "fp_ollama"
    assert answer.model == SMALL
    (choice,) = answer.choices
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 12
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 12

    stream = await desk.oai.chat.completions.create(
        model=SMALL,
        messages=[{"role": "user", "content": "tell me"}],
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-2])
    finish, usage = chunks[-2:]
    assert finish.choices[0].finish_reason == "length"
    assert finish.choices[0].delta.content is None
    assert usage.choices == []
    assert usage.usage is not None
    assert usage.usage.completion_tokens == 9
    assert len({c.created for c in chunks}) == 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]).strip()


async def test_openai_stream_framing_ends_with_done(desk: Desk) -> None:
    body = {
        "model": SMALL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "max_tokens": 3,
    }
    async with desk.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        raw = (await response.aread()).decode()
    events = raw.split("\n\n")
    assert events[-1] == ""
    assert events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    finish = json.loads(events[-3].removeprefix("data: "))
    assert finish["choices"] == [{"index": 0, "delta": {}, "finish_reason": "length"}]


async def test_openai_completions_embeddings_and_models(desk: Desk) -> None:
    completion = await desk.oai.completions.create(model=SMALL, prompt="Once", max_tokens=5)
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    assert completion.choices[0].text
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5

    parts = [
        part
        async for part in await desk.oai.completions.create(
            model=SMALL, prompt="Once", max_tokens=4, stream=True
        )
    ]
    assert parts[-1].choices[0].finish_reason == "length"
    assert sum(1 for p in parts if p.choices[0].text) == 4

    embedded = await desk.oai.embeddings.create(model=NOMIC, input=["one", "two"])
    assert [d.index for d in embedded.data] == [0, 1]
    assert len(embedded.data[0].embedding) == 768
    assert embedded.usage.prompt_tokens == embedded.usage.total_tokens > 0
    as_base64 = await desk.http.post(
        "/v1/embeddings", json={"model": NOMIC, "input": "one", "encoding_format": "base64"}
    )
    packed = base64.b64decode(as_base64.json()["data"][0]["embedding"])
    assert list(struct.unpack("<768f", packed)) == pytest.approx(embedded.data[0].embedding)

    listed = await desk.oai.models.list()
    ids = [m.id for m in listed.data]
    assert SMALL in ids
    assert NOMIC in ids
    assert all(m.owned_by == "library" and m.created > 0 for m in listed.data)
    one = await desk.oai.models.retrieve(BGE)
    assert one.id == BGE


async def test_openai_errors_in_openais_shape(desk: Desk) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await desk.oai.chat.completions.create(
            model="nope:1b", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.status_code == 404
    assert caught.value.body == {
        "message": "model 'nope:1b' not found",
        "type": "not_found_error",
        "param": None,
        "code": None,
    }
    with pytest.raises(openai.BadRequestError) as empty:
        await desk.oai.chat.completions.create(model=SMALL, messages=[])
    assert "too short" in empty.value.message
    with pytest.raises(openai.BadRequestError) as wrong:
        await desk.oai.chat.completions.create(
            model=NOMIC, messages=[{"role": "user", "content": "hi"}]
        )
    assert "does not support chat" in wrong.value.message
    bad = await desk.http.post("/v1/embeddings", json={"model": NOMIC, "input": []})
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == "invalid input"
    with pytest.raises(openai.NotFoundError):
        await desk.oai.models.retrieve("nope:1b")
