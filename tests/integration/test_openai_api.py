"""The controller's OpenAI-compatible routes, driven by the official `openai` client, unchanged.

The whole stack runs on loopback (simulated desktop, agent, controller) on virtual time: the
client's own retry waits (`Retry-After`) pass in simulated seconds too. What the client hides
(headers, error bodies) is read from its raw responses or with plain httpx.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from gpu_agent.sim.desktop import SimDesktop
from tests.integration.error_bodies import error_of
from tests.integration.stack import (
    CONTROLLER_TOKEN,
    HTTP_TIMEOUT_S,
    IMPATIENT_WAIT_S,
    Stack,
    running_stack,
    sdxl,
)

SMALL = "llama3.2:3b"
TOP = "qwen2.5:14b"
NOMIC = "nomic-embed-text:latest"


@pytest.fixture
async def stack(desktop: SimDesktop, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(
        desktop, tmp_path / "controller", llm_wait_s=IMPATIENT_WAIT_S
    ) as running:
        yield running


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    async with client(stack) as opened:
        yield opened


def client(stack: Stack, *, max_retries: int = 0, http_client: Any = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{stack.url}/v1",
        api_key=CONTROLLER_TOKEN,
        timeout=HTTP_TIMEOUT_S,
        max_retries=max_retries,
        http_client=http_client,
    )


async def test_chat_not_streamed_and_streamed(stack: Stack, api: openai.AsyncOpenAI) -> None:
    raw = await api.chat.completions.with_raw_response.create(
        model="auto:fast", messages=[{"role": "user", "content": "hello"}], max_tokens=10
    )
    answer = raw.parse()
    # The intent is resolved: the answer names the model that served it, and so do headers.
    assert answer.model == SMALL
    assert raw.headers["X-GPU-Model"] == SMALL
    assert raw.headers["X-GPU-Agent"] == "desk"
    assert "auto:fast" in raw.headers["X-GPU-Reason"]
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 10

    stream = await api.chat.completions.create(
        model=SMALL,
        messages=[{"role": "user", "content": "tell me more"}],
        max_tokens=15,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 15
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]).strip()
    # The model is free again once the stream has ended.
    assert stack.engine.books["desk"].queued[SMALL] == 0


async def test_completions_and_embeddings(stack: Stack, api: openai.AsyncOpenAI) -> None:
    completion = await api.completions.create(model="auto:fast", prompt="Once", max_tokens=6)
    assert completion.model == SMALL
    assert completion.choices[0].text
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 6

    embedded = await api.embeddings.create(model="nomic-embed-text", input=["a cat", "a dog"])
    assert [len(item.embedding) for item in embedded.data] == [768, 768]
    assert embedded.usage.prompt_tokens > 0
    # The embedding model was loaded like any model, and the ledger counts its memory.
    (agent,) = (await stack.fleet())["agents"]
    resident = {m["name"]: m for m in agent["resident"]}
    assert 300_000_000 < resident[NOMIC]["vram_bytes"] < 400_000_000


async def test_model_list_and_one_model(stack: Stack, api: openai.AsyncOpenAI) -> None:
    listed = await api.models.list()
    ids = [model.id for model in listed.data]
    assert ids[:3] == ["auto", "auto:fast", "auto:quality"]
    for name in (SMALL, TOP, NOMIC, "bge-m3:latest"):
        assert name in ids
    assert all(model.object == "model" and model.created > 0 for model in listed.data)
    owners = {model.id: model.owned_by for model in listed.data}
    assert owners["auto:quality"] == "gpu-controller"
    assert owners[SMALL] == "library"

    intent = await api.models.retrieve("auto:quality")
    assert intent.id == "auto:quality"
    real = await api.models.retrieve(SMALL)
    assert real.id == SMALL


async def test_unknown_model_and_bad_requests_answer_in_openais_shape(
    stack: Stack, api: openai.AsyncOpenAI
) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        await api.chat.completions.create(
            model="no-such-model:1b", messages=[{"role": "user", "content": "hi"}]
        )
    assert unknown.value.status_code == 404
    assert unknown.value.code == "not_found"
    assert "no-such-model:1b" in unknown.value.message

    with pytest.raises(openai.NotFoundError):
        await api.models.retrieve("no-such-model:1b")

    with pytest.raises(openai.BadRequestError) as intent:
        await api.embeddings.create(model="auto", input="a cat")
    assert "must name its embedding model" in intent.value.message
    assert NOMIC in intent.value.message

    with pytest.raises(openai.BadRequestError) as wrong_kind:
        await api.chat.completions.create(model=NOMIC, messages=[{"role": "user", "content": "hi"}])
    assert "does not support chat" in wrong_kind.value.message

    for body, needle in (
        ({"model": SMALL, "messages": []}, "messages"),
        (
            {"model": SMALL, "messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
            "stream",
        ),
        ({"model": NOMIC, "input": []}, "input"),
        ({"model": NOMIC, "input": "x", "encoding_format": "hex"}, "encoding_format"),
    ):
        path = "/v1/embeddings" if "input" in body else "/v1/chat/completions"
        response = await stack.http.post(path, json=body)
        assert response.status_code == 400, body
        assert needle in error_of(response)["message"]
    # Nothing was loaded for a request that was refused.
    assert stack.resident() == {}


async def test_a_hold_answers_503_with_retry_after_and_the_client_retries(stack: Stack) -> None:
    """An SDXL job holds the card: `auto:quality` waits for the 14b, gets 503 with Retry-After
    while the job runs, and the client's own retries get it served once the job is done."""
    job = await stack.submit(sdxl(steps=30))
    await stack.wait_job(job["id"], "running")
    seen: list[Any] = []

    async def record(response: Any) -> None:
        seen.append(response)

    # The client's own HTTP client, with a hook that sees every answer, retries included.
    hooked = openai.DefaultAsyncHttpxClient(event_hooks={"response": [record]})
    async with hooked as http, client(stack, max_retries=4, http_client=http) as patient:
        answer = await patient.chat.completions.create(
            model="auto:quality", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )

    assert answer.model == TOP
    assert [r.status_code for r in seen][-1] == 200
    held = [r for r in seen if r.status_code == 503]
    assert held, "the request was never held"
    for response in held:
        assert int(response.headers["Retry-After"]) >= 1
        assert "auto:quality waits for qwen2.5:14b" in response.headers["X-GPU-Reason"]
    assert (await stack.job(job["id"]))["state"] == "succeeded"


async def test_a_hold_the_client_does_not_wait_out(api: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as busy:
        await api.chat.completions.create(
            model="auto",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-GPU-Max-Latency-S": "0.001"},
        )
    assert busy.value.status_code == 503
    assert busy.value.code == "no_capacity"
    assert isinstance(busy.value.body, dict)
    message = busy.value.body["message"]
    assert message.startswith("server busy, please try again in ")
    assert "nothing can serve it" in message
    assert int(busy.value.response.headers["Retry-After"]) >= 1
