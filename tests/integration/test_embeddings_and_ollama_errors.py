"""Embeddings through the agent and the controller, and Ollama's error shape on `/api/*`.

Driven by the official `ollama` client, unchanged, and by raw HTTP for the bodies and headers:
every error on `/api/*` is `{"error": "message"}` with Ollama's status codes, the code in
`X-GPU-Error`; a hold is 503 with `Retry-After`, `X-GPU-Reason` and a message that says why.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from gpu_agent.sim.desktop import SimDesktop
from tests.integration.stack import (
    AGENT_TOKEN,
    AUTH,
    HTTP_TIMEOUT_S,
    IMPATIENT_WAIT_S,
    Stack,
    ollama_client,
    running_stack,
)

NOMIC = "nomic-embed-text:latest"
BGE = "bge-m3:latest"
SMALL = "llama3.2:3b"


@pytest.fixture
async def stack(desktop: SimDesktop, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(
        desktop, tmp_path / "controller", llm_wait_s=IMPATIENT_WAIT_S
    ) as running:
        yield running


async def test_embed_and_embeddings_through_the_controller(stack: Stack) -> None:
    api = ollama_client(stack)
    answer = await api.embed(model="nomic-embed-text", input=["a cat", "a dog"])
    assert [len(v) for v in answer.embeddings] == [768, 768]
    assert all(abs(math.hypot(*v) - 1.0) < 1e-5 for v in answer.embeddings)

    legacy = await api.embeddings(model=BGE, prompt="a cat")
    assert len(legacy.embedding) == 1024

    raw = await stack.http.post("/api/embed", json={"model": NOMIC, "input": "x"})
    assert raw.headers["X-GPU-Model"] == NOMIC
    assert "requested by name" in raw.headers["X-GPU-Reason"]


async def test_embedding_models_take_their_memory_in_the_ledger(stack: Stack) -> None:
    await ollama_client(stack).embed(model=BGE, input="warm up")

    (agent,) = (await stack.fleet())["agents"]
    resident = {m["name"]: m for m in agent["resident"]}
    assert set(resident) == {BGE}
    assert 1_200_000_000 < resident[BGE]["vram_bytes"] < 1_400_000_000
    assert agent["used_bytes"] >= resident[BGE]["vram_bytes"]
    catalog = {m["name"]: m for m in (await stack.http.get("/v1/catalog")).json()["models"]}
    assert catalog[BGE]["embedding"] is True
    assert catalog[BGE]["resident_on"] == ["desk"]
    assert catalog[SMALL]["embedding"] is False
    # The chat intents never take an embedding model, even a resident one.
    reply = await ollama_client(stack).chat(
        model="auto:fast", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3}
    )
    assert reply.model == SMALL


async def test_the_embedding_model_is_named_not_chosen(stack: Stack) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        await ollama_client(stack).embed(model="auto:quality", input="a cat")
    assert caught.value.status_code == 400
    assert "must name its embedding model" in caught.value.error

    wrong_kind = await stack.generate(NOMIC)
    assert wrong_kind.status_code == 400
    assert wrong_kind.json() == {"error": f'"{NOMIC}" does not support generate'}
    assert wrong_kind.headers["X-GPU-Error"] == "bad_request"
    assert stack.resident() == {}


async def test_errors_on_api_are_ollamas_shape(stack: Stack) -> None:
    unknown = await stack.generate("no-such-model:1b")
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "unknown model 'no-such-model:1b'"}
    assert unknown.headers["X-GPU-Error"] == "not_found"
    with pytest.raises(ollama.ResponseError) as caught:
        await ollama_client(stack).chat(model="no-such-model:1b", messages=[])
    assert caught.value.status_code == 404
    assert caught.value.error == "unknown model 'no-such-model:1b'"

    for body, status in ((b"{not json", 400), (b"", 400), (b'{"prompt": "x"}', 400)):
        response = await stack.http.post("/api/generate", content=body)
        assert response.status_code == status, body
        assert isinstance(response.json()["error"], str)

    async with httpx.AsyncClient(base_url=stack.url, trust_env=False) as anonymous:
        refused = await anonymous.get("/api/tags")
    assert refused.status_code == 401
    assert refused.json() == {"error": "missing or wrong bearer token"}
    # The controller's own routes keep its own shape.
    missing = await stack.http.get("/v1/images/00000000-0000-4000-8000-000000000000")
    assert missing.json()["error"]["code"] == "not_found"


async def test_a_hold_is_503_with_retry_after_and_says_why(stack: Stack) -> None:
    response = await stack.http.post(
        "/api/generate",
        json={"model": "auto", "prompt": "hi", "stream": False},
        headers={"X-GPU-Max-Latency-S": "0.001"},
    )
    assert response.status_code == 503
    retry_after = int(response.headers["Retry-After"])
    assert retry_after >= 1
    assert response.headers["X-GPU-Error"] == "no_capacity"
    assert "nothing can serve it" in response.headers["X-GPU-Reason"]
    message = response.json()["error"]
    assert message.startswith(f"server busy, please try again in {retry_after} s: ")
    assert "nothing can serve it" in message

    with pytest.raises(ollama.ResponseError) as caught:
        await ollama.AsyncClient(
            host=stack.url,
            headers={**AUTH, "X-GPU-Max-Latency-S": "0.001"},
            timeout=HTTP_TIMEOUT_S,
        ).generate(model="auto", prompt="hi")
    assert caught.value.status_code == 503
    assert "server busy" in caught.value.error


async def test_the_agent_passes_embeddings_and_openai_routes_through(stack: Stack) -> None:
    agent = ollama.AsyncClient(
        host=stack.agent.url,
        headers={"Authorization": f"Bearer {AGENT_TOKEN}"},
        timeout=HTTP_TIMEOUT_S,
    )
    answer = await agent.embed(model=NOMIC, input="a cat")
    assert len(answer.embeddings[0]) == 768
    legacy = await agent.embeddings(model=NOMIC, prompt="a cat")
    assert len(legacy.embedding) == 768

    async with openai.AsyncOpenAI(
        base_url=f"{stack.agent.url}/v1", api_key=AGENT_TOKEN, timeout=HTTP_TIMEOUT_S, max_retries=0
    ) as oai:
        reply = await oai.chat.completions.create(
            model=SMALL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert reply.usage is not None
        assert reply.usage.completion_tokens == 4
        assert NOMIC in [model.id for model in (await oai.models.list()).data]
        with pytest.raises(openai.NotFoundError):
            await oai.embeddings.create(model="no-such-model:1b", input="x")

    # The agent's own errors on /api/* are Ollama's shape too.
    async with httpx.AsyncClient(base_url=stack.agent.url, trust_env=False) as anonymous:
        refused = await anonymous.post("/api/embed", json={"model": NOMIC})
        assert refused.status_code == 401
        assert refused.json() == {"error": "missing or wrong bearer token"}
        refused_oai = await anonymous.post("/v1/embeddings", json={"model": NOMIC})
        assert refused_oai.status_code == 401
        assert refused_oai.json()["error"]["message"] == "missing or wrong bearer token"
    # An embedding model loads through the agent's own route as any model does.
    loaded = await stack.http.post("/api/embed", json={"model": BGE})
    assert loaded.json()["embeddings"] == []
    assert BGE in stack.resident()
