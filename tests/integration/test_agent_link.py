"""The controller's `AgentLink` against a real agent on a simulated desktop, and against a small
fake agent (a real aiohttp server on loopback) for the failures a healthy agent never shows."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import WSCloseCode, web

from controller.agents import (
    AgentLink,
    attachment_filename,
    error_fields,
    ollama_path,
    ws_url,
)
from controller.errors import AgentRejected, AgentUnavailable
from gpu_agent.daemon import RunningAgent, running_agent
from gpu_agent.settings import AgentSettings
from gpu_agent.sim.desktop import SimDesktop
from gpu_agent.sim.server import LoopbackServer
from gpu_agent.sim.workflows import SD15, text_to_image
from gpu_common import clock
from gpu_common.schema import (
    AgentEvent,
    AgentStatus,
    ComfyUIInfo,
    OllamaInfo,
    PromptInfo,
    PromptState,
    TelemetryInfo,
    TelemetryStatus,
)
from tests.waiting import wait_until

TOKEN = "t0ken-123"
MODEL = "llama3.2:3b"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FINAL_STATES = frozenset({"succeeded", "failed", "interrupted", "cancelled", "unknown"})


def agent_settings(port: int = 0, stale_after_s: float = 5.0) -> AgentSettings:
    """An agent on the simulated desktop with its production sampling beat (simulated seconds:
    every test here but the pure ones runs on the virtual-time loop)."""
    return AgentSettings(
        port=port,
        simulate=True,
        sample_interval_s=1.0,
        stale_after_s=stale_after_s,
        token=TOKEN,
    )


@dataclass
class Recorder:
    """An `on_event` listener that keeps what it was given."""

    events: list[tuple[str, AgentEvent]] = field(default_factory=list)

    def __call__(self, agent: str, event: AgentEvent) -> None:
        self.events.append((agent, event))

    def of_type(self, kind: str) -> list[AgentEvent]:
        return [event for _, event in self.events if event.type == kind]


@dataclass
class FakeClock:
    """A monotonic clock the test moves by hand."""

    now_s: float = 1000.0

    def __call__(self) -> float:
        return self.now_s


def make_link(url: str, token: str | None = TOKEN, **kwargs: Any) -> AgentLink:
    """A link with the controller's realistic timeouts (simulated seconds) and quick reconnects."""
    kwargs.setdefault("request_timeout_s", 10.0)
    kwargs.setdefault("load_timeout_s", 300.0)
    kwargs.setdefault("free_timeout_s", 130.0)
    kwargs.setdefault("reconnect_initial_s", 0.02)
    kwargs.setdefault("reconnect_max_s", 0.2)
    return AgentLink("desk-1", url, token, **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def poll_prompt(
    link: AgentLink,
    prompt_id: str,
    state: PromptState,
    *,
    until: Callable[[PromptInfo], bool] | None = None,
    timeout_s: float = 600.0,
) -> PromptInfo:
    """Ask the agent about a prompt until it is in `state` (and `until` holds for it), within
    `timeout_s` simulated seconds; fail at once on another final state."""

    async def reached() -> PromptInfo | None:
        info = await link.prompt(prompt_id)
        assert info is not None, f"the agent does not know prompt {prompt_id}"
        if info.state == state and (until is None or until(info)):
            return info
        assert info.state not in FINAL_STATES, info
        return None

    info: PromptInfo = await wait_until(
        reached, timeout_s=timeout_s, poll_s=0.05, what=f"prompt {prompt_id} to be {state}"
    )
    return info


def image_workflow(color: int = 0x3366CC) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": color},
        },
        "2": {
            "class_type": "SaveImage",
            "inputs": {"images": ["1", 0], "filename_prefix": "link-test"},
        },
    }


def txt2img(steps: int) -> dict[str, Any]:
    """ComfyUI's default text-to-image workflow in API format, on SD 1.5."""
    return text_to_image(SD15, width=512, height=512, steps=steps, seed=7, prefix="link-test")


@pytest.fixture
async def agent(desktop: SimDesktop) -> AsyncIterator[RunningAgent]:
    async with running_agent(agent_settings(), desktop) as running:
        yield running


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def link(agent: RunningAgent, recorder: Recorder) -> AsyncIterator[AgentLink]:
    link = make_link(agent.url, on_event=recorder)
    await link.start()
    try:
        yield link
    finally:
        await link.stop()


# -- the event stream from a real agent ----------------------------------------------------


async def test_snapshots_arrive_and_status_is_fresh(link: AgentLink, recorder: Recorder) -> None:
    status = await link.wait_for_snapshot(timeout_s=30.0)

    assert link.connected
    assert link.status is not None
    assert link.status.now >= status.now
    assert status.telemetry.status == "ok"
    assert status.telemetry.gpus[0].memory_total_bytes > 12 * 10**9
    assert status.ollama.reachable
    assert status.comfyui.reachable
    assert link.health() == (True, None)
    age_s = link.age_s()
    assert age_s is not None
    assert 0.0 <= age_s < 1.0
    assert recorder.of_type("snapshot")
    assert {agent for agent, _ in recorder.events} == {"desk-1"}

    refreshed = await link.refresh()
    assert refreshed.now >= status.now
    assert link.status.now >= status.now


async def test_idle_agent_keeps_the_link_fresh(desktop: SimDesktop) -> None:
    # The agent's heartbeat (half its own stale_after_s) must keep a quiet stream fresh.
    async with running_agent(agent_settings(stale_after_s=5.0), desktop) as running:
        link = make_link(running.url, stale_after_s=10.0)
        await link.start()
        try:
            await link.wait_for_snapshot(timeout_s=30.0)
            # Bounded observation, in simulated seconds: health must hold for several stale
            # periods of idleness, looked at ten times a stale period.
            started = clock.monotonic_s()
            checks = 0
            while clock.monotonic_s() - started < 6 * link.stale_after_s:
                healthy, reason = link.health()
                assert healthy, reason
                checks += 1
                await asyncio.sleep(link.stale_after_s / 10)
            assert checks >= 60
        finally:
            await link.stop()


async def test_health_drops_when_agent_stops_and_link_reconnects_on_same_port(
    desktop: SimDesktop,
) -> None:
    async with running_agent(agent_settings(), desktop) as first:
        link = make_link(first.url, stale_after_s=10.0)
        await link.start()
        before = await link.wait_for_snapshot(timeout_s=30.0)
        assert link.health() == (True, None)
        port = int(first.url.rsplit(":", 1)[1])
    try:
        await wait_until(lambda: not link.connected, what="the link to notice the agent left")
        healthy, reason = link.health()
        assert not healthy
        assert reason is not None
        assert reason.startswith("unreachable since")
        # The link keeps trying while the agent is away (and simulated time passes meanwhile, so
        # the restarted agent's start is later than the first one's).
        await wait_until(
            lambda: "Connect" in (link.health()[1] or ""), what="a failed reconnect attempt"
        )

        async with running_agent(agent_settings(port), desktop) as second:
            assert second.url == first.url
            after = await link.wait_for_snapshot(timeout_s=30.0)
            assert link.connected
            assert after.started_at > before.started_at
            assert link.health() == (True, None)
    finally:
        await link.stop()


async def test_wrong_token_is_rejected(agent: RunningAgent) -> None:
    for token in ("wrong-token", None):
        link = make_link(agent.url, token)
        try:
            with pytest.raises(AgentRejected) as caught:
                await link.refresh()
            assert caught.value.status == 401
            assert caught.value.agent_code == "unauthorized"
            assert "bearer token" in caught.value.agent_message

            await link.start()
            await wait_until(
                lambda link=link: "rejected: 401" in (link.health()[1] or ""),
                what="the stream to be refused",
            )
            assert not link.connected
            assert link.status is None
        finally:
            await link.stop()


# -- Ollama through the agent --------------------------------------------------------------


async def test_load_and_unload_via_link(link: AgentLink, recorder: Recorder) -> None:
    loaded = await link.load(MODEL, keep_alive="10m")
    assert loaded.model.startswith("llama3.2")
    assert not loaded.already_resident
    assert loaded.vram_bytes > 2 * 10**9
    assert loaded.load_time_s > 0
    assert loaded.nvml_delta_bytes is not None
    assert loaded.nvml_delta_bytes > 2 * 10**9

    status = await link.refresh()
    assert [m.name for m in status.ollama.resident] == [loaded.model]
    await wait_until(
        lambda: any(e.event == "loaded" for e in recorder.of_type("model")),
        what="a model-loaded event",
    )

    again = await link.load(MODEL)
    assert again.already_resident

    unloaded = await link.unload(MODEL)
    assert unloaded.was_resident
    assert unloaded.confirmed_by == "nvml"
    assert unloaded.freed_bytes >= 0.75 * loaded.vram_bytes
    assert (await link.refresh()).ollama.resident == []
    await wait_until(
        lambda: any(e.event == "unloaded" for e in recorder.of_type("model")),
        what="a model-unloaded event",
    )


async def test_agent_errors_become_agent_rejected(link: AgentLink) -> None:
    with pytest.raises(AgentRejected) as caught:
        await link.load("no-such-model:1b")
    assert caught.value.status == 404
    assert caught.value.agent_code == "model_not_found"
    assert caught.value.agent == "desk-1"

    with pytest.raises(AgentRejected) as caught:
        await link.load(MODEL, num_ctx=1)
    assert caught.value.status == 400
    assert "num_ctx" in caught.value.agent_message


async def test_ollama_stream_generate_yields_ndjson_lines(link: AgentLink) -> None:
    body = json.dumps({"model": MODEL, "prompt": "Say hi.", "options": {"num_predict": 12}})
    lines: list[dict[str, Any]] = []
    async with link.ollama_stream("/api/generate", body.encode()) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        buffer = b""
        async for chunk in response.aiter_raw():
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            lines.extend(json.loads(line) for line in complete if line.strip())
    assert buffer.strip() == b""
    assert len(lines) >= 2
    assert all(line["model"].startswith("llama3.2") for line in lines)
    assert not any(line["done"] for line in lines[:-1])
    assert lines[-1]["done"] is True
    assert "".join(line.get("response", "") for line in lines)

    tags = await link.ollama_get("/api/tags")
    assert MODEL in {model["name"] for model in tags["models"]}
    running = await link.ollama_get("ps")
    assert [model["name"] for model in running["models"]] == [lines[-1]["model"]]
    version = await link.ollama_get("api/version")
    assert isinstance(version["version"], str)
    shown = await link.ollama_post("/api/show", {"model": MODEL})
    assert "details" in shown


async def test_ollama_stream_passes_ollamas_own_errors_through(link: AgentLink) -> None:
    body = json.dumps({"model": "no-such-model:1b", "prompt": "hi"}).encode()
    async with link.ollama_stream("generate", body) as response:
        assert response.status_code == 404
        answer = json.loads(await response.aread())
        assert "not found" in answer["error"]

    with pytest.raises(AgentRejected) as caught:
        await link.ollama_post("/api/show", {"model": "no-such-model:1b"})
    assert caught.value.status == 404
    assert caught.value.agent_code == "ollama"


async def test_ollama_down_makes_the_agent_unavailable(
    link: AgentLink, agent: RunningAgent
) -> None:
    assert agent.desktop is not None
    await agent.desktop.stop_ollama()
    try:
        with pytest.raises(AgentUnavailable, match="ollama_unavailable"):
            await link.ollama_get("/api/tags")
        body = json.dumps({"model": MODEL, "prompt": "hi"}).encode()
        with pytest.raises(AgentUnavailable, match="ollama_unavailable"):
            async with link.ollama_stream("/api/generate", body):
                pytest.fail("the agent's own error must not be yielded as a response")
    finally:
        await agent.desktop.start_ollama()


# -- ComfyUI through the agent -------------------------------------------------------------


async def test_image_prompt_runs_and_its_output_is_a_png(
    link: AgentLink, recorder: Recorder
) -> None:
    prompt_id = str(uuid.uuid4())
    submitted = await link.submit(image_workflow(), prompt_id)
    assert submitted.prompt_id == prompt_id
    assert submitted.state in ("pending", "running", "succeeded")

    info = await poll_prompt(link, prompt_id, "succeeded")
    assert len(info.outputs) == 1

    data, filename, content_type = await link.output(prompt_id, 0)
    assert data.startswith(PNG_SIGNATURE)
    assert filename == info.outputs[0].filename
    assert filename.endswith(".png")
    assert content_type == "image/png"

    with pytest.raises(AgentRejected) as caught:
        await link.output(prompt_id, 1)
    assert caught.value.status == 404

    await wait_until(
        lambda: any(
            e.prompt is not None and e.prompt.prompt_id == prompt_id and e.event == "finished"
            for e in recorder.of_type("prompt")
        ),
        what="the prompt's finished event",
    )


async def test_cancel_a_running_prompt_then_free(link: AgentLink) -> None:
    prompt_id = str(uuid.uuid4())
    await link.submit(txt2img(steps=10_000), prompt_id)

    # Sampling has begun, so the checkpoint is loaded: there is memory for /free to give back.
    await poll_prompt(link, prompt_id, "running", until=lambda info: (info.step or 0) >= 1)
    cancelled = await link.cancel(prompt_id)
    assert cancelled.prompt_id == prompt_id
    await poll_prompt(link, prompt_id, "cancelled")

    freed = await link.free()
    assert freed.confirmed_by == "nvml"
    assert freed.freed_bytes > 10**9
    status = await link.refresh()
    assert status.telemetry.gpus[0].memory_by_owner_bytes.get("comfyui", 0) < freed.freed_bytes


async def test_unknown_prompt_is_none(link: AgentLink) -> None:
    unknown = str(uuid.uuid4())
    assert await link.prompt(unknown) is None
    with pytest.raises(AgentRejected) as caught:
        await link.cancel(unknown)
    assert caught.value.status == 404
    with pytest.raises(AgentRejected) as caught:
        await link.submit(image_workflow(), "not-a-uuid")
    assert caught.value.status == 400


# -- no agent at all -----------------------------------------------------------------------


async def test_nothing_listening_is_unavailable() -> None:
    fake_clock = FakeClock()
    link = make_link(f"http://127.0.0.1:{free_port()}", monotonic=fake_clock)
    try:
        with pytest.raises(AgentUnavailable, match="GET /v1/status failed"):
            await link.refresh()
        with pytest.raises(AgentUnavailable):
            await link.load(MODEL)
        assert link.health() == (False, "unreachable: not started")

        await link.start()
        fake_clock.now_s += 12
        await wait_until(
            lambda: "Connect" in (link.health()[1] or ""), what="a failed connection attempt"
        )
        healthy, reason = link.health()
        assert not healthy
        assert reason is not None
        assert reason.startswith("unreachable since 12 s: ")
        with pytest.raises(AgentUnavailable, match=r"no snapshot within 5 s"):
            await link.wait_for_snapshot(timeout_s=5.0)
    finally:
        await link.stop()


# -- a fake agent, for what a healthy agent never does -------------------------------------


def make_status(telemetry: TelemetryStatus = "ok", reason: str | None = None) -> AgentStatus:
    now = clock.utc_now()
    return AgentStatus(
        agent="fake",
        version="0",
        started_at=now,
        now=now,
        telemetry=TelemetryInfo(
            status=telemetry,
            reason=reason,
            backend="fake",
            driver_version=None,
            taken_at=now,
            age_s=0.0,
            sample_interval_s=1.0,
            gpus=[],
            host=None,
        ),
        ollama=OllamaInfo(
            reachable=True,
            error=None,
            version="0",
            checked_at=now,
            available=[],
            resident=[],
            in_flight={},
        ),
        comfyui=ComfyUIInfo(
            reachable=True,
            connection="websocket",
            last_message_age_s=0.0,
            queue_running=0,
            queue_pending=0,
            prompts=[],
        ),
    )


def snapshot(status: AgentStatus) -> str:
    return AgentEvent(type="snapshot", at=status.now, status=status).model_dump_json()


@dataclass
class FakeAgent:
    """A real aiohttp server speaking the agent's routes with scripted answers.

    `/v1/events` sends what is put on `feed` (text, or an int: close with that code). Each REST
    route answers from `answers[path]` (status, body) in turn, repeating the last one.
    """

    feed: asyncio.Queue[str | int] = field(default_factory=asyncio.Queue)
    answers: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    connections: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/events", self.events)
        app.router.add_route("*", "/{tail:.*}", self.rest)
        return app

    async def events(self, request: web.Request) -> web.WebSocketResponse:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            raise web.HTTPUnauthorized()
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.connections += 1
        sender = asyncio.create_task(self._send_feed(ws))
        try:
            # Reading answers the client's pings and its closing handshake.
            async for _ in ws:
                pass
        finally:
            sender.cancel()
        return ws

    async def _send_feed(self, ws: web.WebSocketResponse) -> None:
        while not ws.closed:
            item = await self.feed.get()
            if isinstance(item, int):
                await ws.close(code=item, message=b"scripted close")
            else:
                await ws.send_str(item)

    async def rest(self, request: web.Request) -> web.Response:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1
        script = self.answers.get(request.path)
        if not script:
            return web.json_response({"error": {"code": "not_found", "message": "no"}}, status=404)
        status, body = script.pop(0) if len(script) > 1 else script[0]
        if status == 0:
            # Hangs until the test ends, to exercise the client's timeout.
            await self.release.wait()
            status = 200
        return web.Response(status=status, body=body, content_type="application/json")


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeAgent, LoopbackServer]]:
    agent = FakeAgent()
    server = LoopbackServer(agent.make_app, shutdown_timeout_s=0.2)
    await server.start()
    try:
        yield agent, server
    finally:
        agent.release.set()
        await server.stop()


async def test_stale_and_degraded_snapshots_make_health_false(
    fake: tuple[FakeAgent, LoopbackServer],
) -> None:
    agent, server = fake
    fake_clock = FakeClock()
    calls: list[str] = []

    def faulty_listener(name: str, event: AgentEvent) -> None:
        calls.append(event.type)
        raise RuntimeError("a listener bug")

    link = make_link(server.url, stale_after_s=10.0, monotonic=fake_clock, on_event=faulty_listener)
    await link.start()
    try:
        await wait_until(lambda: link.connected, what="the stream to open")
        assert link.health() == (False, "connected, no snapshot yet")
        assert link.age_s() is None

        agent.feed.put_nowait(snapshot(make_status()))
        await link.wait_for_snapshot(timeout_s=30.0)
        assert link.health() == (True, None)

        fake_clock.now_s += 15
        assert link.age_s() == 15
        assert link.health() == (False, "stale: last snapshot 15 s ago (limit 10 s)")

        waiting = asyncio.create_task(link.wait_for_snapshot(timeout_s=30.0))
        agent.feed.put_nowait("this is not an event")
        agent.feed.put_nowait(snapshot(make_status("degraded", "NVML: GPU is lost")))
        degraded = await waiting
        assert degraded.telemetry.status == "degraded"
        assert link.health() == (False, "telemetry degraded: NVML: GPU is lost")

        stalled = make_status()
        stalled.telemetry.age_s = 42.0
        agent.feed.put_nowait(snapshot(stalled))
        await link.wait_for_snapshot(timeout_s=30.0)
        assert link.health() == (False, "telemetry stale: sample 42 s old")
        # A listener that raises neither stops the stream nor loses events.
        assert calls == ["snapshot", "snapshot", "snapshot"]
    finally:
        await link.stop()


async def test_reconnects_after_the_agent_closes_or_restarts(
    fake: tuple[FakeAgent, LoopbackServer],
) -> None:
    agent, server = fake
    link = make_link(server.url)
    await link.start()
    try:
        await wait_until(lambda: agent.connections == 1, what="the first connection")
        agent.feed.put_nowait(snapshot(make_status()))
        await wait_until(lambda: link.health()[0], what="a healthy link")

        agent.feed.put_nowait(int(WSCloseCode.GOING_AWAY))
        await wait_until(lambda: agent.connections == 2, what="a reconnect after a close")

        await server.stop()
        await wait_until(lambda: not link.connected, what="the link to see the server go")
        assert "Connect" in (link.health()[1] or "")
        await server.start()
        await wait_until(lambda: agent.connections == 3, what="a reconnect after a restart")
        agent.feed.put_nowait(snapshot(make_status()))
        await wait_until(lambda: link.health()[0], what="a healthy link again")
    finally:
        await link.stop()
    assert link.health() == (False, "unreachable since 0 s: stopped")


async def test_gets_are_retried_but_posts_are_not(
    fake: tuple[FakeAgent, LoopbackServer],
) -> None:
    agent, server = fake
    busy = json.dumps({"error": {"code": "internal", "message": "busy"}}).encode()
    agent.answers["/v1/status"] = [(503, busy), (503, busy), (200, snapshot_body())]
    agent.answers["/v1/ollama/load"] = [(500, busy)]
    link = make_link(server.url)
    try:
        assert link.status is None
        status = await link.refresh()
        assert status.agent == "fake"
        assert link.status == status
        assert agent.hits["/v1/status"] == 3

        agent.answers["/v1/status"] = [(502, b"<html>bad gateway</html>")]
        with pytest.raises(AgentUnavailable, match="502 http_502: <html>bad gateway</html>"):
            await link.refresh()
        assert agent.hits["/v1/status"] == 6

        with pytest.raises(AgentUnavailable, match="500 internal: busy"):
            await link.load(MODEL)
        assert agent.hits["/v1/ollama/load"] == 1
    finally:
        await link.stop()


async def test_invalid_answers_and_timeouts_are_unavailable(
    fake: tuple[FakeAgent, LoopbackServer],
) -> None:
    agent, server = fake
    agent.answers["/v1/status"] = [(200, b'{"agent": "fake"}')]
    agent.answers["/v1/comfyui/free"] = [(0, b"")]
    link = make_link(server.url, request_timeout_s=10.0, free_timeout_s=130.0)
    try:
        with pytest.raises(AgentUnavailable, match="invalid AgentStatus"):
            await link.refresh()
        started = clock.monotonic_s()
        with pytest.raises(AgentUnavailable, match=r"POST /v1/comfyui/free timed out.*130"):
            await link.free()
        # Simulated seconds: the link gave up when its free timeout ran out, not before or later.
        elapsed_s = clock.monotonic_s() - started
        assert 130.0 <= elapsed_s < 131.0
        assert agent.hits["/v1/comfyui/free"] == 1
    finally:
        await link.stop()


def snapshot_body() -> bytes:
    return make_status().model_dump_json().encode()


# -- the pure helpers ----------------------------------------------------------------------


def test_error_fields_read_both_error_shapes() -> None:
    agent_body = json.dumps({"error": {"code": "conflict", "message": "busy"}}).encode()
    assert error_fields(409, agent_body) == ("conflict", "busy")
    assert error_fields(404, b'{"error": "model not found"}') == ("ollama", "model not found")
    assert error_fields(502, b"Bad Gateway") == ("http_502", "Bad Gateway")
    assert error_fields(500, b"") == ("http_500", "HTTP 500")
    assert len(error_fields(500, b"x" * 10_000)[1]) == 300


def test_paths_and_urls() -> None:
    assert {ollama_path(p) for p in ("tags", "/tags", "api/tags", "/api/tags")} == {"/api/tags"}
    for bad in ("", "/api/", "../v1/status", "http://elsewhere/api/tags"):
        with pytest.raises(ValueError, match="not an Ollama API path"):
            ollama_path(bad)
    assert ws_url("http://desk:8765/", "/v1/events") == "ws://desk:8765/v1/events"
    assert ws_url("https://desk", "/v1/events") == "wss://desk/v1/events"
    assert attachment_filename('attachment; filename="ComfyUI_00001_.png"') == (
        "ComfyUI_00001_.png"
    )
    assert attachment_filename(None) is None
