"""`StudioClient` against the whole studio on loopback, and its retry rules on a mock transport.

The integration half runs a simulated desktop, an agent and a controller on the virtual-time
loop, and checks that the client's typed results carry what the controller really answered: the
chosen model, agent and reason from the headers, token counts and speed from Ollama's final line,
PNG bytes of image jobs, job progress from the event stream, and each error class for its cause.
Every duration and deadline here is in simulated seconds. The mock-transport half pins down when
a request is sent again and how long the client waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.client import (
    Chunk,
    Generation,
    ImageJob,
    JobFailed,
    StudioBusy,
    StudioClient,
    StudioRequestError,
    StudioTimeout,
    StudioUnavailable,
)
from gpu_agent.sim.desktop import SimDesktop
from gpu_agent.sim.workflows import SD15, SDXL, text_to_image
from gpu_common import clock
from tests.integration.stack import (
    AGENT_NAME,
    CONTROLLER_TOKEN,
    PNG_SIGNATURE,
    Stack,
    running_stack,
)

SMALL = "llama3.2:3b"
MODELS = ("auto", "auto:fast", "auto:quality", SMALL)
MODES = ("generate", "generate_stream", "chat", "chat_stream")
PROMPT = "write a haiku about a lighthouse"
# The client's limit on each read, and on each wait for a job: a few images' worth of simulated
# seconds, checkpoint loads included.
STUDIO_TIMEOUT_S = 60.0
# How long the stack's LLM requests wait for room before a 503.
LLM_WAIT_S = 5.0


class RecordingSleep:
    """The client's wait between retries, recorded instead of slept (time is not patched)."""

    def __init__(self) -> None:
        self.delays_s: list[float] = []

    async def __call__(self, delay_s: float) -> None:
        self.delays_s.append(delay_s)
        await asyncio.sleep(0)


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, which follows the 8-byte signature."""
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture
async def stack(desktop: SimDesktop, tmp_path: Path) -> AsyncIterator[Stack]:
    # LLM requests give up waiting for capacity after a few seconds, so a 503 comes soon.
    async with running_stack(desktop, tmp_path / "controller", llm_wait_s=LLM_WAIT_S) as running:
        yield running


@pytest.fixture
async def studio(stack: Stack) -> AsyncIterator[StudioClient]:
    async with StudioClient(
        stack.url, token=CONTROLLER_TOKEN, timeout_s=STUDIO_TIMEOUT_S
    ) as client:
        yield client


async def collect(stream: AsyncIterator[Chunk], into: list[Chunk]) -> None:
    """Append each chunk of `stream` to `into`, so the ones before an error stay visible."""
    async for chunk in stream:
        into.append(chunk)


async def run_mode(studio: StudioClient, mode: str, model: str) -> tuple[list[Chunk], Generation]:
    """One generation in `mode`; the chunks (none for whole answers) and the result."""
    messages = [{"role": "user", "content": PROMPT}]
    if mode == "generate":
        return [], await studio.generate(PROMPT, model=model)
    if mode == "chat":
        return [], await studio.chat(messages, model=model)
    stream = (
        studio.generate_stream(PROMPT, model=model)
        if mode == "generate_stream"
        else studio.chat_stream(messages, model=model)
    )
    chunks = [chunk async for chunk in stream]
    assert chunks, f"{mode} of {model} streamed nothing"
    final = chunks[-1].final
    assert final is not None
    return chunks, final


# -- text ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
async def test_generation_reports_the_controllers_choice_and_ollamas_counts(
    studio: StudioClient, model: str
) -> None:
    for mode in MODES:
        await check_generation(studio, mode, model)


async def check_generation(studio: StudioClient, mode: str, model: str) -> None:
    chunks, result = await run_mode(studio, mode, model)

    offered = {m.name for m in (await studio.models()).models}
    assert result.model in offered
    if model == SMALL:
        assert result.model == SMALL
    else:
        assert f"{model} picks" in (result.reason or "")
    assert result.agent == AGENT_NAME
    assert result.reason is not None
    assert result.reason.startswith(f"{result.model} on {AGENT_NAME}")
    assert result.text.strip()
    assert result.prompt_tokens > 0
    assert result.output_tokens > 0
    assert result.tokens_per_s is not None
    assert result.tokens_per_s > 0
    assert result.done_reason in ("stop", "length")
    assert result.total_duration_s > 0
    assert 0 <= result.load_duration_s <= result.total_duration_s

    if mode.endswith("_stream"):
        assert len(chunks) > 2
        assert all(not c.done and c.final is None for c in chunks[:-1])
        assert chunks[-1].done
        assert {c.model for c in chunks} == {result.model}
        assert "".join(c.text for c in chunks) == result.text


async def test_generation_options_reach_ollama(studio: StudioClient) -> None:
    result = await studio.generate(
        PROMPT, model=SMALL, system="answer briefly", options={"num_predict": 5}
    )

    assert result.output_tokens == 5
    assert result.done_reason == "length"


async def test_error_line_mid_stream_raises_after_the_pieces_sent(
    stack: Stack, studio: StudioClient
) -> None:
    stack.desktop.ollama.faults.fail_stream_after_tokens = 3
    chunks: list[Chunk] = []

    with pytest.raises(StudioRequestError) as raised:
        await collect(studio.generate_stream(PROMPT, model=SMALL), chunks)

    assert raised.value.status == 200
    assert raised.value.code == "stream_error"
    assert raised.value.message
    assert chunks
    assert not any(c.done for c in chunks)
    with pytest.raises(StudioRequestError):
        await studio.chat([{"role": "user", "content": PROMPT}], model=SMALL)


# -- images ----------------------------------------------------------------------------------


async def test_generate_image_wait_returns_png_bytes(studio: StudioClient) -> None:
    workflow = text_to_image(SD15, width=512, height=768, batch=2, steps=10)

    images = await studio.generate_image(workflow, wait=True, timeout_s=STUDIO_TIMEOUT_S)

    assert len(images) == 2
    assert [png_size(image) for image in images] == [(512, 768), (512, 768)]


async def test_image_handle_follows_progress_to_the_end(studio: StudioClient) -> None:
    job = await studio.generate_image(text_to_image(SDXL, steps=30), priority=5)
    assert isinstance(job, ImageJob)
    assert job.info.priority == 5
    assert not job.done

    states = []
    steps = []
    async for info in job.progress():
        states.append(info.state)
        if info.progress is not None and info.progress.step is not None:
            steps.append(info.progress.step)

    assert states, "the job's progress stream showed nothing"
    assert states[-1] == "succeeded"
    assert states.count("succeeded") == 1
    assert "running" in states
    assert steps == sorted(steps)
    assert len(set(steps)) > 2
    assert max(steps) == 30
    assert job.done
    assert (await job.wait()).state == "succeeded"
    assert (await job.refresh()).state == "succeeded"
    assert (await studio.job(job.id)).outputs == job.info.outputs
    [image] = await job.images()
    assert png_size(image) == (1024, 1024)


async def test_cancel_a_running_job(studio: StudioClient) -> None:
    # 100 SDXL steps: 24 simulated seconds of sampling, so it is cancelled mid-run.
    job = await studio.generate_image(text_to_image(SDXL, steps=100))
    sampling = False
    async with contextlib.aclosing(job.progress()) as events:
        async for info in events:
            if info.state == "running" and info.progress and info.progress.step:
                sampling = True
                break
    assert sampling, f"the job ended as {job.info.state} before it was seen sampling"

    await job.cancel()
    final = await job.wait(timeout_s=STUDIO_TIMEOUT_S)

    assert final.state == "cancelled"
    assert (await studio.cancel(job.id)).state == "cancelled"  # a repeated cancel is harmless
    with pytest.raises(JobFailed) as raised:
        await job.images()
    assert raised.value.info.state == "cancelled"


async def test_waiting_for_a_failed_job_raises_job_failed(studio: StudioClient) -> None:
    with pytest.raises(JobFailed) as raised:
        await studio.generate_image(
            text_to_image("no-such-checkpoint.safetensors"), wait=True, timeout_s=STUDIO_TIMEOUT_S
        )

    assert raised.value.info.state == "failed"
    assert raised.value.info.error


async def test_wait_is_bounded_by_its_timeout(studio: StudioClient) -> None:
    # 1000 SDXL steps: four simulated minutes, far longer than the wait.
    job = await studio.generate_image(text_to_image(SDXL, steps=1000))
    limit_s = 5.0
    started = clock.monotonic_s()

    with pytest.raises(StudioTimeout):
        await job.wait(timeout_s=limit_s)

    # Given up at its limit, in simulated seconds, not when the job ended.
    assert limit_s <= clock.monotonic_s() - started < limit_s + 0.5
    assert not job.done
    assert (await job.cancel()).id == job.id


# -- views -----------------------------------------------------------------------------------


async def test_models_fleet_and_health(studio: StudioClient) -> None:
    await studio.generate(PROMPT, model=SMALL)

    models = await studio.models()
    fleet = await studio.fleet()
    health = await studio.health()

    (small,) = [m for m in models.models if m.name == SMALL]
    assert small.agents == [AGENT_NAME]
    assert small.vram_bytes > 0
    [agent] = fleet.agents
    assert agent.name == AGENT_NAME
    assert agent.healthy
    assert SMALL in {r.name for r in agent.resident}
    assert health == {"status": "ok", "agents": 1, "healthy_agents": 1}


# -- errors ----------------------------------------------------------------------------------


async def test_wrong_token_is_a_401(stack: Stack) -> None:
    async with StudioClient(stack.url, token="not-the-token") as client:
        with pytest.raises(StudioRequestError) as raised:
            await client.generate(PROMPT)
        assert (raised.value.status, raised.value.code) == (401, "unauthorized")
        with pytest.raises(StudioRequestError) as raised:
            await client.models()
        assert raised.value.status == 401
        assert (await client.health())["status"] == "ok"  # /healthz needs no token


async def test_unknown_model_and_job_are_404(studio: StudioClient) -> None:
    with pytest.raises(StudioRequestError) as raised:
        await studio.generate(PROMPT, model="no-such-model:1b")
    assert (raised.value.status, raised.value.code) == (404, "not_found")
    assert "no-such-model:1b" in raised.value.message

    with pytest.raises(StudioRequestError) as raised:
        await studio.job(str(uuid.uuid4()))
    assert raised.value.status == 404
    with pytest.raises(StudioRequestError) as raised:
        await studio.cancel("not-a-job-id")
    assert raised.value.status == 400


async def test_unmeetable_latency_is_busy_with_retry_after(stack: Stack) -> None:
    sleep = RecordingSleep()
    async with StudioClient(stack.url, token=CONTROLLER_TOKEN, retries=2, sleep=sleep) as client:
        with pytest.raises(StudioBusy) as raised:
            await client.generate(PROMPT, max_latency_s=0.001)

    busy = raised.value
    assert busy.code == "no_capacity"
    assert busy.retry_after_s is not None
    assert busy.retry_after_s >= 1
    assert busy.reason
    # Refused before any work began, so it was asked again after each Retry-After.
    assert sleep.delays_s == [busy.retry_after_s, busy.retry_after_s]


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_controller_down_is_unavailable_quickly() -> None:
    with refusing_port() as port:
        async with StudioClient(f"http://127.0.0.1:{port}", retries=2) as client:
            started = clock.monotonic_s()
            with pytest.raises(StudioUnavailable) as raised:
                await client.models()
            with pytest.raises(StudioUnavailable):
                await client.generate(PROMPT)
            with pytest.raises(StudioUnavailable):
                await client.generate_image(text_to_image())

    assert not raised.value.reached_server
    # Two quick retries of each request, in simulated seconds: no long back-off.
    assert clock.monotonic_s() - started < 3.0


# -- retry rules on a mock transport ---------------------------------------------------------

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]
BASE_URL = "http://studio.test"
ROUTE_HEADERS = {
    "Content-Type": "application/x-ndjson",
    "X-GPU-Model": SMALL,
    "X-GPU-Agent": AGENT_NAME,
    "X-GPU-Reason": "llama3.2:3b on desk: resident",
}
PIECES = [
    {"model": SMALL, "response": "Hello", "done": False},
    {"model": SMALL, "response": " there", "done": False},
]
FINAL_LINE = {
    "model": SMALL,
    "response": "",
    "done": True,
    "done_reason": "stop",
    "total_duration": 3_000_000_000,
    "load_duration": 1_000_000_000,
    "prompt_eval_count": 12,
    "eval_count": 50,
    "eval_duration": 500_000_000,
}


def ndjson(*lines: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def busy(retry_after: str) -> httpx.Response:
    return httpx.Response(
        503,
        headers={"Retry-After": retry_after},
        json={"error": {"code": "no_capacity", "message": "every model is busy"}},
    )


class Recorder:
    """A mock transport that answers with `answers` in turn and keeps every request."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer.stream, httpx.ByteStream):
            # A fresh response each time, as a server would send: one is read only once.
            return httpx.Response(
                answer.status_code, headers=answer.headers, content=answer.content
            )
        return answer


def mock_client(recorder: Recorder, sleep: RecordingSleep, **kwargs: Any) -> StudioClient:
    return StudioClient(BASE_URL, token="t", transport=recorder.transport, sleep=sleep, **kwargs)


async def test_generation_retries_503_after_retry_after() -> None:
    sleep = RecordingSleep()
    ok = httpx.Response(200, headers=ROUTE_HEADERS, content=ndjson(*PIECES, FINAL_LINE))
    recorder = Recorder(busy("7"), busy("7"), ok)

    async with mock_client(recorder, sleep) as client:
        result = await client.generate("hi", model="auto:fast", min_quality=60)

    assert sleep.delays_s == [7.0, 7.0]
    assert len(recorder.requests) == 3
    assert {r.content for r in recorder.requests} == {recorder.requests[0].content}
    sent = recorder.requests[0]
    assert sent.headers["Authorization"] == "Bearer t"
    assert sent.headers["X-GPU-Min-Quality"] == "60.0"
    assert json.loads(sent.content) == {"model": "auto:fast", "prompt": "hi", "stream": True}
    assert result == Generation(
        text="Hello there",
        model=SMALL,
        agent=AGENT_NAME,
        reason="llama3.2:3b on desk: resident",
        prompt_tokens=12,
        output_tokens=50,
        total_duration_s=3.0,
        load_duration_s=1.0,
        tokens_per_s=100.0,
        done_reason="stop",
    )


async def test_retry_after_as_http_date() -> None:
    sleep = RecordingSleep()
    # The client reads the wall clock through `gpu_common.clock`, virtual here like its durations.
    when = format_datetime(clock.utc_now() + timedelta(seconds=10), usegmt=True)
    ok = httpx.Response(200, headers=ROUTE_HEADERS, content=ndjson(FINAL_LINE))
    recorder = Recorder(busy(when), ok)

    async with mock_client(recorder, sleep) as client:
        await client.generate("hi")

    [delay_s] = sleep.delays_s
    assert 8.0 <= delay_s <= 10.0


async def test_busy_past_the_timeout_is_raised_without_waiting() -> None:
    sleep = RecordingSleep()
    recorder = Recorder(busy("60"))

    async with mock_client(recorder, sleep, timeout_s=5.0) as client:
        with pytest.raises(StudioBusy) as raised:
            await client.generate("hi")

    assert raised.value.retry_after_s == 60.0
    assert raised.value.reason == "every model is busy"
    assert sleep.delays_s == []
    assert len(recorder.requests) == 1


async def test_busy_retries_stop_after_retries() -> None:
    sleep = RecordingSleep()
    recorder = Recorder(busy("1"))

    async with mock_client(recorder, sleep, retries=3) as client:
        with pytest.raises(StudioBusy):
            await client.chat([{"role": "user", "content": "hi"}])

    assert sleep.delays_s == [1.0, 1.0, 1.0]
    assert len(recorder.requests) == 4


async def test_no_retry_once_the_stream_has_started() -> None:
    async def broken_body() -> AsyncIterator[bytes]:
        yield ndjson(*PIECES)
        raise httpx.ReadError("connection reset by peer")

    sleep = RecordingSleep()
    recorder = Recorder(httpx.Response(200, headers=ROUTE_HEADERS, content=broken_body()))
    chunks: list[Chunk] = []

    async with mock_client(recorder, sleep) as client:
        with pytest.raises(StudioUnavailable) as raised:
            await collect(client.generate_stream("hi"), chunks)

    assert raised.value.reached_server
    assert [c.text for c in chunks] == ["Hello", " there"]
    assert len(recorder.requests) == 1
    assert sleep.delays_s == []


async def test_generation_not_retried_on_5xx_or_timeout() -> None:
    sleep = RecordingSleep()
    failed = httpx.Response(500, json={"error": {"code": "internal", "message": "boom"}})
    recorder = Recorder(failed)

    async with mock_client(recorder, sleep) as client:
        with pytest.raises(StudioUnavailable) as raised:
            await client.generate("hi")
        assert (raised.value.status, raised.value.code) == (500, "internal")
        recorder.answers = [httpx.ReadTimeout("no answer")]
        with pytest.raises(StudioTimeout) as timed_out:
            await client.generate("hi")

    assert timed_out.value.reached_server
    assert len(recorder.requests) == 2
    assert sleep.delays_s == []


async def test_image_submit_is_retried_only_when_it_never_reached_the_server() -> None:
    sleep = RecordingSleep()
    accepted = httpx.Response(
        202,
        json={
            "id": str(uuid.uuid4()),
            "state": "held",
            "reason": "waiting for GPU memory",
            "agent": None,
            "priority": 0,
            "progress": None,
            "outputs": [],
            "error": None,
            "attempts": 0,
            "vram_bytes": 1 << 30,
            "created_at": "2025-01-01T00:00:00Z",
            "updated_at": "2025-01-01T00:00:00Z",
        },
    )
    recorder = Recorder(httpx.ConnectError("connection refused"), accepted)

    async with mock_client(recorder, sleep) as client:
        job = await client.generate_image({"1": {"class_type": "EmptyImage"}}, vram_bytes=1 << 30)
        assert job.info.state == "held"
        assert len(recorder.requests) == 2
        assert json.loads(recorder.requests[1].content)["vram_bytes"] == 1 << 30

        recorder.answers = [httpx.ReadTimeout("no answer"), accepted]
        with pytest.raises(StudioTimeout):
            await client.generate_image({"1": {"class_type": "EmptyImage"}})

    assert len(recorder.requests) == 3
    assert len(sleep.delays_s) == 1


async def test_reads_are_retried_after_server_errors() -> None:
    sleep = RecordingSleep()
    models = httpx.Response(200, json={"models": [], "image_footprints_bytes": {"sdxl": 1}})
    recorder = Recorder(httpx.Response(502, text="bad gateway"), busy("2"), models)

    async with mock_client(recorder, sleep) as client:
        info = await client.models()

    assert info.image_footprints_bytes == {"sdxl": 1}
    assert len(recorder.requests) == 3
    assert sleep.delays_s[1] == 2.0


async def test_ollama_shaped_error_bodies_are_understood() -> None:
    sleep = RecordingSleep()
    recorder = Recorder(httpx.Response(404, json={"error": "model 'x' not found"}))

    async with mock_client(recorder, sleep) as client:
        with pytest.raises(StudioRequestError) as raised:
            await client.generate("hi", model="x")

    assert (raised.value.status, raised.value.code) == (404, "not_found")
    assert raised.value.message == "model 'x' not found"
