"""Hostile and bad input against the real agent and controller on the simulated desktop.

Every case asserts two things: a clear 4xx JSON error (`{"error": {"code", "message"}}`), and
that nothing changed: resident models, ComfyUI's queue and history, the agent's prompts, GPU
memory, and for the controller its jobs by state. Requests whose exact bytes matter (dot segments
that httpx would normalise away, odd Host headers) go through `raw_request` on a plain socket.
The tests run on the virtual-time loop: "refused fast" means within `REFUSE_S` simulated seconds,
so nothing was queued behind simulated work; only the token-timing test reads a real clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
import pytest
from aiohttp import web

from controller.images import _safe_name
from gpu_agent.api import create_app
from gpu_agent.daemon import RunningAgent, running_agent
from gpu_agent.sim.desktop import SimDesktop
from gpu_agent.sim.workflows import SD15, text_to_image
from gpu_common import clock
from gpu_common.http import MAX_WORKFLOW_NODES, token_matches
from tests.integration.stack import (
    AGENT_TOKEN,
    AUTH,
    CONTROLLER_TOKEN,
    Stack,
    agent_settings,
    running_stack,
    sd15,
)
from tests.waiting import wait_until

AGENT_AUTH = {"Authorization": f"Bearer {AGENT_TOKEN}"}
# Small limits, so that "too large" costs little to send.
SMALL_BODY_BYTES = 64 * 1024
RAW_TIMEOUT_S = 5.0
# A refusal is answered at once, without waiting on any timer: in well under the time of any
# simulated work it could have been queued behind (a model load takes seconds), in simulated
# seconds.
REFUSE_S = 0.5


# -- helpers ---------------------------------------------------------------------------------


async def raw_request(
    base_url: str,
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> tuple[int, dict[str, str], bytes]:
    """Send exactly `method target` with `headers` (Host defaults to the URL's) on a fresh
    connection; (status, lower-cased headers, body)."""
    parts = urlsplit(base_url)
    assert parts.hostname is not None
    assert parts.port is not None
    all_headers = {"Host": parts.netloc, "Connection": "close"}
    all_headers.update(headers or {})
    if body:
        all_headers["Content-Length"] = str(len(body))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in all_headers.items()
    )
    async with asyncio.timeout(RAW_TIMEOUT_S):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            writer.write(head.encode("latin-1") + b"\r\n" + body)
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    header_blob, _, payload = data.partition(b"\r\n\r\n")
    lines = header_blob.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    response_headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        response_headers[name.strip().lower()] = value.strip()
    return status, response_headers, payload


def error_of(
    status: int,
    body: bytes,
    expected_status: int | tuple[int, ...],
    headers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The `error` object of a JSON error answer, after checking the status and the shape.

    On `/api/*` the body is Ollama's `{"error": "message"}`; its code is in `X-GPU-Error`,
    which `headers` (when given) supply."""
    wanted = (expected_status,) if isinstance(expected_status, int) else expected_status
    assert status in wanted, (status, body[:300])
    payload = json.loads(body)
    if isinstance(payload["error"], str):
        assert payload["error"]
        lowered = {name.lower(): value for name, value in (headers or {}).items()}
        return {"code": lowered.get("x-gpu-error", ""), "message": payload["error"]}
    error: dict[str, Any] = payload["error"]
    assert isinstance(error["code"], str)
    assert error["code"]
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


def http_error(response: httpx.Response, status: int | tuple[int, ...]) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json"), response.headers
    return error_of(response.status_code, response.content, status, response.headers)


async def agent_state(desktop: SimDesktop, agent_url: str) -> dict[str, Any]:
    """What a hostile request must not change on the desktop and in the agent."""
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as http:
        queue = (await http.get(f"{desktop.comfyui_url}/queue")).json()
        history = (await http.get(f"{desktop.comfyui_url}/history")).json()
        status = (await http.get(f"{agent_url}/v1/status", headers=AGENT_AUTH)).json()
    return {
        "resident": sorted(r.model for r in desktop.ollama.runners()),
        "checkpoints": desktop.comfyui.loaded_checkpoints(),
        "queue": (len(queue["queue_running"]), len(queue["queue_pending"])),
        "history": sorted(history),
        "prompts": sorted(p["prompt_id"] for p in status["comfyui"]["prompts"]),
    }


async def controller_state(stack: Stack) -> dict[str, Any]:
    fleet = await stack.fleet()
    return {
        "jobs_by_state": fleet["jobs_by_state"],
        "held": [job["id"] for job in fleet["held_jobs"]],
        "resident": [[m["name"] for m in agent["resident"]] for agent in fleet["agents"]],
        "agent": await agent_state(stack.desktop, stack.agent.url),
    }


def deep_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def many_nodes(count: int) -> dict[str, Any]:
    """An SD1.5 graph with `count` extra SaveImage nodes hanging off its decoder."""
    workflow = sd15()
    decoders = [k for k, n in workflow.items() if n["class_type"] == "VAEDecode"]
    assert decoders, "the SD1.5 workflow has no VAEDecode node"
    decoder = decoders[0]
    for index in range(count):
        workflow[f"save{index}"] = {
            "class_type": "SaveImage",
            "inputs": {"images": [decoder, 0], "filename_prefix": "wide"},
        }
    return workflow


# Bodies that are wrong before any model reads them, for every JSON route.
SYNTAX_CASES: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("malformed", b'{"model": '),
    ("not utf-8", b'{"model": "\xff\xfe"}'),
    ("NaN", b'{"model": NaN}'),
    ("Infinity", b'{"workflow": {"1": {"class_type": "X", "inputs": {"v": Infinity}}}}'),
    ("lone surrogate", b'{"model": "\\ud800", "workflow": {"\\udfff": {}}}'),
    ("too deep", deep_json(30_000)),
    ("array", b"[1, 2, 3]"),
    ("string", b'"hello"'),
    ("null", b"null"),
]


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
async def agent(desktop: SimDesktop) -> AsyncIterator[RunningAgent]:
    settings = agent_settings().model_copy(update={"max_body_bytes": SMALL_BODY_BYTES})
    async with running_agent(settings, desktop) as running:
        yield running


@pytest.fixture
async def agent_http(agent: RunningAgent) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=agent.url, headers=AGENT_AUTH, timeout=10.0, trust_env=False
    ) as http:
        yield http


@pytest.fixture
async def stack(desktop: SimDesktop, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(
        desktop,
        tmp_path / "controller",
        max_body_bytes=SMALL_BODY_BYTES,
        allowed_hosts=["studio.example.org", "*.gpu.example.net"],
    ) as running:
        yield running


# -- the agent -------------------------------------------------------------------------------

AGENT_JSON_ROUTES = ("/v1/ollama/load", "/v1/ollama/unload", "/v1/comfyui/prompts")


async def test_agent_answers_bad_json_with_400_and_changes_nothing(
    agent: RunningAgent, agent_http: httpx.AsyncClient, desktop: SimDesktop
) -> None:
    before = await agent_state(desktop, agent.url)
    for path in AGENT_JSON_ROUTES:
        for name, body in SYNTAX_CASES:
            response = await agent_http.post(path, content=body)
            error = http_error(response, 400)
            assert error["code"] == "bad_request", (path, name, error)
    # /free takes an empty body as "free everything"; anything else must be right.
    for name, body in SYNTAX_CASES[1:]:
        response = await agent_http.post("/v1/comfyui/free", content=body)
        assert http_error(response, 400)["code"] == "bad_request", name
    assert await agent_state(desktop, agent.url) == before


AGENT_MODEL_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/ollama/load", {"model": 7}, "model"),
    ("/v1/ollama/load", {"model": ["qwen2.5:7b"]}, "model"),
    ("/v1/ollama/load", {"model": "qwen2.5:7b", "surprise": 1}, "surprise"),
    ("/v1/ollama/load", {"model": "qwen2.5:7b", "num_ctx": 10**30}, "num_ctx"),
    ("/v1/ollama/load", {"model": "qwen2.5:7b", "num_ctx": "big"}, "num_ctx"),
    ("/v1/ollama/load", {"model": "a b"}, "model"),
    ("/v1/ollama/load", {"model": "x" * 1000}, "model"),
    ("/v1/ollama/load", {"model": "   "}, "model"),
    ("/v1/ollama/unload", {"model": "qwen2.5:7b", "force": "yes please"}, "force"),
    ("/v1/ollama/unload", {}, "model"),
    ("/v1/comfyui/prompts", {"workflow": []}, "workflow"),
    ("/v1/comfyui/prompts", {"workflow": {}}, "at least one node"),
    ("/v1/comfyui/prompts", {"workflow": {"1": {}}, "prompt_id": "../../x"}, "prompt_id"),
    ("/v1/comfyui/prompts", {"workflow": {"1": {}}, "extra": True}, "extra"),
    ("/v1/comfyui/free", {"unload_models": "sure"}, "unload_models"),
    ("/v1/comfyui/free", {"free_memory": True, "everything": True}, "everything"),
]


async def test_agent_rejects_wrong_types_and_unknown_fields(
    agent: RunningAgent, agent_http: httpx.AsyncClient, desktop: SimDesktop
) -> None:
    before = await agent_state(desktop, agent.url)
    for path, body, needle in AGENT_MODEL_CASES:
        started = clock.monotonic_s()
        response = await agent_http.post(path, json=body)
        error = http_error(response, 400)
        assert needle in error["message"], (path, error)
        assert clock.monotonic_s() - started < REFUSE_S, f"{path} took too long to refuse"
    assert await agent_state(desktop, agent.url) == before


async def test_agent_unknown_model_is_404_and_loads_nothing(
    agent: RunningAgent, agent_http: httpx.AsyncClient, desktop: SimDesktop
) -> None:
    before = await agent_state(desktop, agent.url)
    for path in ("/v1/ollama/load", "/v1/ollama/unload"):
        response = await agent_http.post(path, json={"model": "no-such-model:1b"})
        assert http_error(response, (404,))["code"] in ("model_not_found", "not_found"), path
    assert await agent_state(desktop, agent.url) == before


async def test_agent_unknown_node_class_is_400_with_node_errors(
    agent: RunningAgent, agent_http: httpx.AsyncClient, desktop: SimDesktop
) -> None:
    before = await agent_state(desktop, agent.url)
    workflow = sd15()
    workflow["66"] = {"class_type": "EvilNode", "inputs": {"x": 1}}

    response = await agent_http.post("/v1/comfyui/prompts", json={"workflow": workflow})

    error = http_error(response, 400)
    assert error["code"] == "workflow_rejected"
    assert "EvilNode" in error["message"]
    assert "node_errors" in error["details"]
    assert await agent_state(desktop, agent.url) == before


async def test_agent_oversized_body_is_413(
    agent: RunningAgent, agent_http: httpx.AsyncClient, desktop: SimDesktop
) -> None:
    before = await agent_state(desktop, agent.url)
    padding = "x" * (SMALL_BODY_BYTES + 1)
    for path in (*AGENT_JSON_ROUTES, "/v1/comfyui/free"):
        response = await agent_http.post(path, json={"workflow": {"1": {"pad": padding}}})
        assert http_error(response, 413)["code"] == "payload_too_large", path
    assert await agent_state(desktop, agent.url) == before


async def test_agent_huge_workflow_within_the_size_limit_is_refused_fast(
    desktop: SimDesktop,
) -> None:
    # A graph over the node limit but within the default 8 MiB: answered at once, never queued.
    async with running_agent(agent_settings(), desktop) as agent:
        before = await agent_state(desktop, agent.url)
        workflow = many_nodes(5000)
        body = json.dumps({"workflow": workflow}).encode()
        assert len(body) < agent_settings().max_body_bytes
        async with httpx.AsyncClient(base_url=agent.url, headers=AGENT_AUTH, timeout=5.0) as http:
            started = clock.monotonic_s()
            response = await http.post("/v1/comfyui/prompts", content=body)
        error = http_error(response, 400)
        assert f"at most {MAX_WORKFLOW_NODES}" in error["message"]
        assert clock.monotonic_s() - started < REFUSE_S
        assert await agent_state(desktop, agent.url) == before


@pytest.mark.parametrize("node", [None, True, 7, "x", ["KSampler"]])
async def test_a_workflow_node_that_is_not_an_object_is_a_clear_400(
    agent: RunningAgent, agent_http: httpx.AsyncClient, desktop: SimDesktop, node: object
) -> None:
    # ComfyUI answers such a node with a 500; the agent refuses it before ComfyUI sees it.
    before = await agent_state(desktop, agent.url)
    response = await agent_http.post("/v1/comfyui/prompts", json={"workflow": {"": node}})
    error = http_error(response, 400)
    assert "workflow node ''" in error["message"]
    assert "not an object" in error["message"]
    assert await agent_state(desktop, agent.url) == before


async def test_agent_path_tricks_never_escape_their_route(
    agent: RunningAgent, agent_http: httpx.AsyncClient, desktop: SimDesktop
) -> None:
    # A real prompt with a real output, so the tricks have something to aim at.
    submitted = await agent_http.post(
        "/v1/comfyui/prompts", json={"workflow": text_to_image(SD15, steps=2)}
    )
    assert submitted.status_code == 202, submitted.text
    prompt_id = submitted.json()["prompt_id"]

    async def succeeded() -> bool:
        info = (await agent_http.get(f"/v1/comfyui/prompts/{prompt_id}")).json()
        return bool(info["state"] == "succeeded")

    # Two SD1.5 steps after a cold checkpoint load: about 2 simulated seconds.
    await wait_until(succeeded, timeout_s=30.0, poll_s=0.1, what="the prompt to succeed")
    good = await agent_http.get(f"/v1/comfyui/prompts/{prompt_id}/outputs/0")
    assert good.status_code == 200
    assert good.content.startswith(b"\x89PNG")
    assert ".." not in good.headers["content-disposition"]
    before = await agent_state(desktop, agent.url)

    cases: list[tuple[str, str, tuple[int, ...]]] = [
        ("GET", "/v1/comfyui/prompts/../outputs/0", (400,)),
        ("GET", "/v1/comfyui/prompts/%2e%2e/outputs/0", (400,)),
        ("GET", "/v1/comfyui/prompts/..%2F..%2Fetc/outputs/0", (400,)),
        ("GET", f"/v1/comfyui/prompts/{prompt_id}/outputs/-1", (404,)),
        ("GET", f"/v1/comfyui/prompts/{prompt_id}/outputs/{'9' * 30}", (404,)),
        ("GET", f"/v1/comfyui/prompts/{prompt_id}/outputs/{'9' * 5000}", (400,)),
        ("GET", f"/v1/comfyui/prompts/{prompt_id}/outputs/..", (400,)),
        ("GET", f"/v1/comfyui/prompts/{prompt_id}/outputs/0/../../x", (404,)),
        ("GET", f"/v1/comfyui/prompts/{prompt_id}/outputs/1e3", (400,)),
        ("DELETE", "/v1/comfyui/prompts/..", (400,)),
        ("GET", "/v1/comfyui/prompts/" + "a" * 65, (400,)),
        ("GET", "/api/../v1/status", (400,)),
        ("GET", "/api/%2e%2e/%2e%2e/etc/passwd", (400,)),
        ("POST", "/api/./generate", (400,)),
        ("GET", "/../../etc/passwd", (404,)),
    ]
    for method, target, statuses in cases:
        status, headers, body = await raw_request(agent.url, method, target, AGENT_AUTH)
        assert headers["content-type"].startswith("application/json"), (target, headers)
        error_of(status, body, statuses)
    assert await agent_state(desktop, agent.url) == before


# -- tokens, on every route, from the OpenAPI document ----------------------------------------


async def _documented_routes(base_url: str) -> list[tuple[str, str, bool]]:
    """(METHOD, concrete path, public) for every documented operation."""
    async with httpx.AsyncClient(base_url=base_url, timeout=5.0, trust_env=False) as http:
        document = (await http.get("/openapi.json")).json()
    routes = []
    for template, operations in document["paths"].items():
        path = template.replace("{tail}", "tags").replace("{index}", "0")
        path = path.replace("{job_id}", str(uuid.uuid4())).replace("{prompt_id}", "p1")
        for method, operation in operations.items():
            routes.append((method.upper(), path, operation.get("security") == []))
    return routes


@pytest.mark.parametrize("which", ["agent", "controller"])
async def test_every_route_refuses_a_missing_or_wrong_token(stack: Stack, which: str) -> None:
    base_url, token = (
        (stack.agent.url, AGENT_TOKEN) if which == "agent" else (stack.url, CONTROLLER_TOKEN)
    )
    before = await controller_state(stack)
    routes = await _documented_routes(base_url)
    assert len(routes) > 10
    wrong_tokens: list[str | None] = [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Bearer {token[:-1]}",
        f"Bearer {token}x",
        f"Bearer  {token}",
        f"Basic {token}",
        token,
    ]
    for method, path, public in routes:
        for wrong in wrong_tokens:
            headers = {"Content-Type": "application/json"}
            if wrong is not None:
                headers["Authorization"] = wrong
            status, answered, body = await raw_request(
                base_url, method, path, headers, body=b'{"model": "qwen2.5:7b"}'
            )
            if public:
                assert status == 200, (method, path)
                continue
            error = error_of(status, body, 401, answered)
            assert error["code"] == "unauthorized", (method, path, wrong)
    assert await controller_state(stack) == before


def test_the_token_check_is_exact() -> None:
    expected = b"Bearer s3cret-token"
    assert token_matches("Bearer s3cret-token", expected)
    for given in ("", "Bearer s3cret-toke", "Bearer s3cret-tokenn", "bearer s3cret-token",
                  "Bearer s3cret-tokeN", "Bearer s3cret-token ", "\udcff", "Bearer é"):  # fmt: skip
        assert not token_matches(given, expected), given


def test_the_token_check_takes_the_same_time_however_much_is_right() -> None:
    """Both sides are hashed to 32 bytes before `hmac.compare_digest`, so neither a right
    prefix nor the length of the guess shows in the time. Measured in-process (the network
    would drown any difference), as the fastest of many batches, with a loose bound."""
    token = "0123456789abcdef" * 4
    expected = f"Bearer {token}".encode()
    guesses = {
        "all wrong": "Bearer " + "z" * len(token),
        "all but the last": f"Bearer {token[:-1]}z",
        "short": "Bearer z",
    }

    def fastest_batch_s(given: str) -> float:
        times = []
        for _ in range(30):
            started = clock.perf_s()
            for _ in range(2000):
                token_matches(given, expected)
            times.append(clock.perf_s() - started)
        return min(times)

    timings = {name: fastest_batch_s(guess) for name, guess in guesses.items()}
    middle = statistics.median(timings.values())
    for name, seconds in timings.items():
        assert 0.5 < seconds / middle < 2.0, (name, timings)


# -- Host and Origin ------------------------------------------------------------------------


async def test_host_and_origin_tricks_are_403_everywhere(stack: Stack) -> None:
    before = await controller_state(stack)
    for base_url, token in ((stack.agent.url, AGENT_TOKEN), (stack.url, CONTROLLER_TOKEN)):
        auth = {"Authorization": f"Bearer {token}"}
        port = urlsplit(base_url).port
        for path in ("/healthz", "/openapi.json", "/v1/status", "/v1/fleet", "/metrics"):
            for host in (
                f"evil.example.com:{port}",
                "evil.example.com",
                f"127.0.0.1.nip.io:{port}",
                f"localhost.evil.com:{port}",
                f"desk.local.evil.com:{port}",
                f"user@localhost:{port}",
                f"localhost:{port}/x",
                "localhost:abc",
                f"192.0.2.7:{port}",
                "",
            ):
                status, answered, body = await raw_request(
                    base_url, "GET", path, {"Host": host, **auth}
                )
                error = error_of(status, body, 403, answered)
                assert error["code"] == "forbidden_host", (path, host)
            for origin in (
                "http://evil.example.com",
                f"http://evil.example.com:{port}",
                "null",
                "file://",
                "http://localhost.evil.com",
                "not an origin",
            ):
                headers = {"Origin": origin, **auth}
                status, answered, body = await raw_request(base_url, "GET", path, headers)
                error = error_of(status, body, 403, answered)
                assert error["code"] == "forbidden_origin", (path, origin)
        # A rebound page cannot open the event stream either.
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(
                    f"{base_url}/v1/events",
                    headers={**auth, "Origin": "https://evil.example.com"},
                    timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
                )
            assert refused.value.status == 403
    assert await controller_state(stack) == before


async def test_local_names_and_configured_hosts_are_allowed(stack: Stack) -> None:
    port = urlsplit(stack.url).port
    allowed = [
        f"localhost:{port}",
        f"127.0.0.1:{port}",
        f"127.0.0.2:{port}",
        f"[::1]:{port}",
        f"LOCALHOST.:{port}",
        f"desk.local:{port}",
        f"gpu.internal:{port}",
        f"studio.example.org:{port}",
        f"a.b.gpu.example.net:{port}",
    ]
    for host in allowed:
        headers = {"Host": host, "Origin": f"http://{host}", **AUTH}
        status, _, body = await raw_request(stack.url, "GET", "/v1/fleet", headers)
        assert status == 200, (host, body[:200])
    # The agent was not configured with the studio's names.
    agent_port = urlsplit(stack.agent.url).port
    headers = {"Host": f"studio.example.org:{agent_port}", **AGENT_AUTH}
    status, _, body = await raw_request(stack.agent.url, "GET", "/v1/status", headers)
    assert error_of(status, body, 403)["code"] == "forbidden_host"


async def test_the_agent_app_takes_extra_allowed_hosts(agent: RunningAgent) -> None:
    app = create_app(
        agent.service,
        token=AGENT_TOKEN,
        max_body_bytes=SMALL_BODY_BYTES,
        allowed_hosts=["desk.studio.example"],
        bind_host="127.0.0.1",
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}"
        for name, expected in (("desk.studio.example", 200), ("other.studio.example", 403)):
            headers = {"Host": f"{name}:{port}", **AGENT_AUTH}
            status, _, _ = await raw_request(url, "GET", "/v1/status", headers)
            assert status == expected, name
    finally:
        await runner.cleanup()


# -- the controller --------------------------------------------------------------------------


async def test_controller_answers_bad_json_with_400_and_changes_nothing(stack: Stack) -> None:
    before = await controller_state(stack)
    for path in ("/v1/images", "/api/generate", "/api/chat", "/api/show"):
        for name, body in SYNTAX_CASES:
            response = await stack.http.post(path, content=body)
            if path == "/api/show" and name == "empty":
                assert http_error(response, 404)["code"] == "not_found"
                continue
            assert http_error(response, 400)["code"] == "bad_request", (path, name)
    assert await controller_state(stack) == before


CONTROLLER_CASES: list[tuple[str, dict[str, Any], int, str]] = [
    ("/v1/images", {"workflow": sd15(), "vram_bytes": "9 GB"}, 400, "vram_bytes"),
    ("/v1/images", {"workflow": sd15(), "vram_bytes": 1 << 60}, 400, "vram_bytes"),
    ("/v1/images", {"workflow": sd15(), "priority": 10**40}, 400, "priority"),
    ("/v1/images", {"workflow": sd15(), "colour": "blue"}, 400, "colour"),
    ("/v1/images", {"workflow": {"1": {"class_type": "X", "inputs": 5}}}, 400, "inputs"),
    ("/v1/images", {"workflow": {"1": None}}, 400, "class_type"),
    (
        "/v1/images",
        {"workflow": text_to_image(SD15, width=10**30, height=512)},
        400,
        "limits",
    ),
    ("/api/generate", {"prompt": "hi"}, 400, "model"),
    ("/api/generate", {"model": 5, "prompt": "hi"}, 400, "model"),
    ("/api/generate", {"model": "auto", "options": [1]}, 400, "options"),
    ("/api/chat", {"model": "auto", "messages": 5}, 400, "messages"),
    ("/api/generate", {"model": "auto", "min_quality": "high"}, 400, "min_quality"),
    ("/api/generate", {"model": "auto", "min_quality": 10**400}, 400, "min_quality"),
    ("/api/generate", {"model": "auto", "max_latency_s": -1}, 400, "max_latency_s"),
    ("/api/generate", {"model": "no-such-model:1b", "stream": False}, 404, "no-such-model"),
    ("/api/chat", {"model": "no-such-model:1b", "messages": []}, 404, "no-such-model"),
    ("/api/show", {"model": "no-such-model:1b"}, 404, "no-such-model"),
]


async def test_controller_rejects_wrong_values_and_unknown_models(stack: Stack) -> None:
    before = await controller_state(stack)
    for path, body, status, needle in CONTROLLER_CASES:
        started = clock.monotonic_s()
        response = await stack.http.post(path, json=body)
        error = http_error(response, status)
        assert needle in error["message"], (path, body if len(str(body)) < 300 else "...", error)
        assert clock.monotonic_s() - started < REFUSE_S, f"{path} took too long to refuse"
    assert await controller_state(stack) == before


async def test_controller_oversized_body_is_413(stack: Stack) -> None:
    before = await controller_state(stack)
    padding = "x" * (SMALL_BODY_BYTES + 1)
    for path in ("/v1/images", "/api/generate", "/api/chat", "/api/show"):
        response = await stack.http.post(path, json={"model": "auto", "prompt": padding})
        assert http_error(response, 413)["code"] == "payload_too_large", path
    assert await controller_state(stack) == before


async def test_controller_huge_workflow_within_the_size_limit_is_refused_fast(
    desktop: SimDesktop, tmp_path: Path
) -> None:
    async with running_stack(desktop, tmp_path / "controller") as stack:
        before = await controller_state(stack)
        body = json.dumps({"workflow": many_nodes(5000)}).encode()
        assert len(body) < stack.engine.settings.max_body_bytes
        started = clock.monotonic_s()
        response = await stack.http.post("/v1/images", content=body)
        assert f"at most {MAX_WORKFLOW_NODES}" in http_error(response, 400)["message"]
        assert clock.monotonic_s() - started < REFUSE_S
        # At the limit it is an ordinary job: accepted, sent to ComfyUI, judged there.
        workflow = many_nodes(MAX_WORKFLOW_NODES - len(sd15()) - 1)
        workflow["66"] = {"class_type": "EvilNode", "inputs": {}}
        assert len(workflow) == MAX_WORKFLOW_NODES
        job = await stack.submit(workflow)
        done = await stack.wait_job(job["id"])
        assert done["state"] == "failed"
        assert "EvilNode" in (done["error"] or "")
        after = await controller_state(stack)
        assert after["jobs_by_state"] == {"failed": 1}
        assert after["resident"] == before["resident"]


async def test_controller_job_with_an_unknown_node_fails_with_comfyuis_reason(
    stack: Stack,
) -> None:
    workflow = sd15()
    workflow["66"] = {"class_type": "EvilNode", "inputs": {}}
    job = await stack.submit(workflow)

    done = await stack.wait_job(job["id"])

    assert done["state"] == "failed"
    assert "EvilNode" in (done["error"] or "")
    assert done["outputs"] == []
    assert (await stack.fleet())["jobs_by_state"] == {"failed": 1}


async def test_controller_path_tricks_never_escape_their_route(stack: Stack) -> None:
    job = await stack.submit(sd15(steps=2))
    done = await stack.wait_job(job["id"])
    assert done["state"] == "succeeded", done
    good = await stack.http.get(done["outputs"][0])
    assert good.status_code == 200
    assert good.content.startswith(b"\x89PNG")
    before = await controller_state(stack)

    job_id = job["id"]
    cases: list[tuple[str, tuple[int, ...]]] = [
        (f"/v1/images/{job_id}/outputs/../../x", (404,)),
        (f"/v1/images/{job_id}/outputs/..%2F..%2F..%2Fjobs.sqlite3", (400,)),
        (f"/v1/images/{job_id}/outputs/%2e%2e", (400,)),
        (f"/v1/images/{job_id}/outputs/-1", (404,)),
        (f"/v1/images/{job_id}/outputs/{'9' * 40}", (404,)),
        (f"/v1/images/{job_id}/outputs/{'9' * 5000}", (400,)),
        ("/v1/images/../fleet", (400, 404)),
        ("/v1/images/..%2F..%2Fjobs.sqlite3/outputs/0", (400,)),
        (f"/v1/images/{job_id}%2F..%2F..%2Fx/outputs/0", (400,)),
        ("/v1/images/%2e%2e/outputs/0", (400,)),
        ("/../../etc/passwd", (404,)),
    ]
    for target, statuses in cases:
        status, headers, body = await raw_request(stack.url, "GET", target, AUTH)
        assert headers["content-type"].startswith("application/json"), (target, headers)
        error_of(status, body, statuses)
    status, _, body = await raw_request(stack.url, "DELETE", "/v1/images/..", AUTH)
    error_of(status, body, 400)
    assert await controller_state(stack) == before


@pytest.mark.parametrize(
    "filename",
    [
        "../../../../etc/passwd",
        "..",
        ".",
        "",
        "/",
        "/etc/passwd",
        "a/../../b.png",
        "..\\..\\windows\\x.png",
        "....//....//x.png",
        "..%2F..%2Fx.png",
        "\x00../x.png",
        "\u2025\u2215x.png",
        "subdir/ComfyUI_00001_.png",
        "x" * 5000,
    ],
)
def test_a_hostile_comfyui_filename_stays_in_the_job_folder(filename: str, tmp_path: Path) -> None:
    folder = tmp_path / "outputs" / str(uuid.uuid4())
    name = _safe_name(filename)
    stored = f"00-{name}"  # as the scheduler stores output n
    assert "/" not in name
    assert "\\" not in name
    assert "\x00" not in name
    assert stored not in (".", "..")
    assert (folder / stored).resolve().parent == folder.resolve()
