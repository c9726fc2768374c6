"""Property-based fuzzing of both HTTP APIs, and their OpenAPI documents.

A simulated desktop, an agent and a controller run for the whole module on an event loop in a
background thread; hypothesis drives them over real sockets from the test thread. That loop is
a standard real-time one, not the virtual-time loop of the other tests: its clients are in
another thread, so it must wait for them in real time instead of jumping its clock ahead (the
fuzzed requests start no simulated work, so the desktop's realistic speed costs nothing). Generated:
arbitrary JSON bodies for every route that takes one, bodies shaped like each request model (its
property names from `/openapi.json`, arbitrary values), and random paths and methods, dot
segments and percent escapes included. Every answer must be below 500, and every 4xx a JSON
`{"error": {"code", "message"}}` that left the desktop, the agent and the controller unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.api import create_app as create_controller_app
from gpu_agent.api import create_app as create_agent_app
from gpu_agent.sim.desktop import SimDesktop
from gpu_common.error_shapes import error_shape
from gpu_common.openapi import OPENAPI_PATH, api_routes
from tests.integration.stack import AGENT_TOKEN, CONTROLLER_TOKEN, running_stack

# The services' websocket keepalive pings (the controller's link to the agent, the agent's to
# ComfyUI) draw their payloads from the global `random` on the background thread, which
# hypothesis would otherwise take for a strategy using `random` when a ping lands mid-draw.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)

# Bounded so the module stays within a few seconds; no deadline, since the first requests warm up.
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TIMEOUT_S = 10.0
START_TIMEOUT_S = 30.0
# Real model names and intents would start real (slow) generations; fuzzed names avoid them.
REAL_MODELS = frozenset(
    {"auto", "auto:fast", "auto:quality", "qwen2.5:7b", "qwen2.5:14b", "llama3.2:3b"}
)


@dataclass(frozen=True)
class Live:
    """The running services, as seen from the test thread."""

    agent_url: str
    controller_url: str
    comfyui_url: str
    ollama_url: str
    agent_routes: frozenset[tuple[str, str]]
    controller_routes: frozenset[tuple[str, str]]


def _routes(app: Any) -> frozenset[tuple[str, str]]:
    return frozenset(
        (route.method, route.resource.canonical)
        for route in api_routes(app)
        if route.method != "HEAD" and route.resource is not None
    )


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """Desktop, agent and controller on a background event loop for the whole module."""
    data_dir = tmp_path_factory.mktemp("fuzz")
    ready: Future[Live] = Future()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def serve() -> None:
        try:
            async with (
                SimDesktop(data_dir=data_dir / "desktop") as desktop,
                running_stack(desktop, data_dir / "controller") as stack,
            ):
                agent_app = create_agent_app(
                    stack.agent.service, token=AGENT_TOKEN, max_body_bytes=1024 * 1024
                )
                controller_app = create_controller_app(
                    stack.engine, token=CONTROLLER_TOKEN, max_body_bytes=1024 * 1024
                )
                ready.set_result(
                    Live(
                        agent_url=stack.agent.url,
                        controller_url=stack.url,
                        comfyui_url=desktop.comfyui_url,
                        ollama_url=desktop.ollama_url,
                        agent_routes=_routes(agent_app),
                        controller_routes=_routes(controller_app),
                    )
                )
                await stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        yield ready.result(timeout=START_TIMEOUT_S)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=START_TIMEOUT_S)
        with contextlib.suppress(RuntimeError):
            loop.close()


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def state(live: Live, client: httpx.Client) -> dict[str, Any]:
    """Everything a refused request must leave as it was."""
    fleet = client.get(f"{live.controller_url}/v1/fleet", headers=_auth(CONTROLLER_TOKEN))
    agent = client.get(f"{live.agent_url}/v1/status", headers=_auth(AGENT_TOKEN))
    queue = client.get(f"{live.comfyui_url}/queue").json()
    history = client.get(f"{live.comfyui_url}/history").json()
    ps = client.get(f"{live.ollama_url}/api/ps").json()
    return {
        "jobs_by_state": fleet.json()["jobs_by_state"],
        "prompts": sorted(p["prompt_id"] for p in agent.json()["comfyui"]["prompts"]),
        "queue": (len(queue["queue_running"]), len(queue["queue_pending"])),
        "history": sorted(history),
        "resident": sorted(m["name"] for m in ps["models"]),
    }


def send(
    base_url: str, method: str, target: str, body: bytes | None, headers: dict[str, str]
) -> tuple[int, str, bytes]:
    """One request with `target` sent exactly as given (no dot-segment normalisation)."""
    parts = urlsplit(base_url)
    assert parts.hostname is not None
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT_S)
    try:
        connection.request(method, target, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        connection.close()


def check_answer(status: int, content_type: str, body: bytes, what: str) -> None:
    assert status < 500, (what, status, body[:300])
    if status >= 400:
        assert content_type.startswith("application/json"), (what, status, content_type)
        error = json.loads(body)["error"]
        if isinstance(error, str):
            assert error, what  # Ollama's shape, on /api/*
            return
        if "type" not in error:  # OpenAI's carries a code only when we answered ourselves
            assert isinstance(error["code"], str), (what, error)
            assert error["code"]
        assert isinstance(error["message"], str), (what, error)
        assert error["message"]


class Watcher:
    """Sends fuzzed requests and checks that refusals leave the state as it was.

    The state is read once after every request and compared with the last one seen, which a
    successful request (rare with fuzzed input) may legitimately change.
    """

    def __init__(self, live: Live) -> None:
        self.live = live
        self.client = httpx.Client(timeout=TIMEOUT_S, trust_env=False)
        self.last: dict[str, Any] | None = None

    def close(self) -> None:
        self.client.close()

    def fuzz(self, base_url: str, token: str, method: str, target: str, body: bytes | None) -> None:
        if self.last is None:
            self.last = state(self.live, self.client)
        headers = {**_auth(token), "Content-Type": "application/json"}
        status, content_type, payload = send(base_url, method, target, body, headers)
        what = f"{method} {target} {(body or b'')[:200]!r}"
        if method == "HEAD":
            assert status < 500, (what, status)  # a HEAD answer carries no body to check
        else:
            check_answer(status, content_type, payload, what)
        now = state(self.live, self.client)
        if status >= 400:
            assert now == self.last, what
        self.last = now


@pytest.fixture(scope="module")
def watcher(live: Live) -> Iterator[Watcher]:
    watching = Watcher(live)
    yield watching
    watching.close()


# -- strategies ------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
fuzzed_model_names = st.one_of(json_values, st.text(max_size=30)).filter(
    lambda value: not (isinstance(value, str) and value in REAL_MODELS)
)

AGENT_BODY_ROUTES = (
    "/v1/ollama/load",
    "/v1/ollama/unload",
    "/v1/comfyui/prompts",
    "/v1/comfyui/free",
)
CONTROLLER_BODY_ROUTES = ("/v1/images", "/api/generate", "/api/chat", "/api/show")


def _encode(value: Any) -> bytes:
    return json.dumps(value).encode()


def _safe_for_llm(body: Any) -> bool:
    """False for bodies that would start a real generation (a real model in the body)."""
    model = body.get("model") if isinstance(body, dict) else None
    return not (isinstance(model, str) and model in REAL_MODELS)


# -- arbitrary JSON bodies -------------------------------------------------------------------


@FUZZ
@given(
    route=st.sampled_from(
        [("agent", path) for path in AGENT_BODY_ROUTES]
        + [("controller", path) for path in CONTROLLER_BODY_ROUTES]
    ),
    body=json_values.filter(_safe_for_llm),
)
def test_arbitrary_json_bodies_are_refused_cleanly(
    live: Live, watcher: Watcher, route: tuple[str, str], body: Any
) -> None:
    which, path = route
    base_url, token = _service(live, which)
    watcher.fuzz(base_url, token, "POST", path, _encode(body))


@FUZZ
@given(
    route=st.sampled_from(
        [("agent", path) for path in AGENT_BODY_ROUTES]
        + [("controller", path) for path in CONTROLLER_BODY_ROUTES]
    ),
    raw=st.binary(max_size=64)
    | st.sampled_from([b"{", b"[" * 5000, b'{"a": NaN}', b'"\\ud800"', b"\xff\xfe{}", b"{}}"]),
)
def test_bytes_that_are_not_json_are_refused_cleanly(
    live: Live, watcher: Watcher, route: tuple[str, str], raw: bytes
) -> None:
    which, path = route
    base_url, token = _service(live, which)
    watcher.fuzz(base_url, token, "POST", path, raw)


def _service(live: Live, which: str) -> tuple[str, str]:
    if which == "agent":
        return live.agent_url, AGENT_TOKEN
    return live.controller_url, CONTROLLER_TOKEN


# -- bodies shaped like each request model ---------------------------------------------------


def _request_shapes(document: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(path, property names) of every documented JSON request body (forms left out)."""
    schemas = document["components"]["schemas"]
    shapes = []
    for path, operations in document["paths"].items():
        for operation in operations.values():
            body = operation.get("requestBody")
            # Forms (picture uploads) have their own tests and Schemathesis' contract run.
            if body is None or "application/json" not in body["content"]:
                continue
            ref = body["content"]["application/json"]["schema"]["$ref"]
            schema = schemas[ref.rsplit("/", 1)[-1]]
            shapes.append((path, sorted(schema["properties"])))
    return shapes


def _shaped(properties: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts with some of the model's own keys, arbitrary values, sometimes an extra key."""
    values = {name: json_values for name in properties}
    if "model" in values:
        values["model"] = fuzzed_model_names
    return st.fixed_dictionaries(
        {}, optional={**values, "unexpected": json_values}
    ) | st.fixed_dictionaries(values)


OLLAMA_FIELDS = [
    "model",
    "prompt",
    "messages",
    "options",
    "stream",
    "min_quality",
    "max_latency_s",
    "system",
    "name",
]


@FUZZ
@given(data=st.data())
def test_bodies_shaped_like_each_request_model_are_answered_cleanly(
    live: Live, watcher: Watcher, data: st.DataObject
) -> None:
    which = data.draw(st.sampled_from(["agent", "controller"]))
    base_url, token = _service(live, which)
    document = watcher.client.get(f"{base_url}{OPENAPI_PATH}").json()
    shapes = _request_shapes(document)
    if which == "controller":
        # The Ollama routes take Ollama's own shapes, not one of our models.
        shapes += [(path, OLLAMA_FIELDS) for path in ("/api/generate", "/api/chat", "/api/show")]
    path, properties = data.draw(st.sampled_from(shapes))
    body = data.draw(_shaped(properties).filter(_safe_for_llm))
    watcher.fuzz(base_url, token, "POST", path, _encode(body))


# -- random paths and methods ----------------------------------------------------------------

segments = st.one_of(
    st.sampled_from(
        [
            "..",
            ".",
            "%2e%2e",
            "%2E%2e%2f",
            "%2f",
            "%00",
            "",
            "v1",
            "images",
            "outputs",
            "events",
            "comfyui",
            "prompts",
            "ollama",
            "fleet",
            "models",
            "status",
            "-1",
            "0",
            "9" * 30,
            "00000000-0000-0000-0000-000000000000",
        ]
    ),
    st.text(max_size=12).map(lambda text: quote(text, safe="")),
)
prefixes = st.sampled_from(
    [
        "",
        "/v1/images",
        "/v1/images/00000000-0000-0000-0000-000000000000",
        "/v1/comfyui/prompts",
        "/v1/comfyui/prompts/00000000-0000-0000-0000-000000000000",
        "/v1/ollama",
        "/v1",
        "/api",
    ]
)
methods = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "TRACE"])


@FUZZ
@given(
    which=st.sampled_from(["agent", "controller"]),
    method=methods,
    prefix=prefixes,
    tail=st.lists(segments, min_size=1, max_size=5),
    query=st.text(max_size=10).map(lambda text: quote(text, safe="=&")),
    body=st.none() | json_values.filter(_safe_for_llm).map(_encode),
)
def test_random_paths_and_methods_are_answered_cleanly(
    live: Live,
    watcher: Watcher,
    which: str,
    method: str,
    prefix: str,
    tail: list[str],
    query: str,
    body: bytes | None,
) -> None:
    base_url, token = _service(live, which)
    target = prefix + "/" + "/".join(tail) + (f"?{query}" if query else "")
    if which == "agent" and target.startswith("/api/"):
        # The agent hands /api/* to Ollama as it is (Ollama's own errors included), and a
        # random Ollama call could pull or delete models: that path has its own tests.
        return
    watcher.fuzz(base_url, token, method, target, body)


# -- the OpenAPI documents -------------------------------------------------------------------


def _resolve_refs(value: Any, schemas: dict[str, Any]) -> int:
    """Every `$ref` in `value` names a component schema; how many there are."""
    found = 0
    if isinstance(value, dict):
        ref = value.get("$ref")
        if isinstance(ref, str):
            assert ref.startswith("#/components/schemas/"), ref
            assert ref.rsplit("/", 1)[-1] in schemas, ref
            found += 1
        for item in value.values():
            found += _resolve_refs(item, schemas)
    elif isinstance(value, list):
        for item in value:
            found += _resolve_refs(item, schemas)
    return found


@pytest.mark.parametrize("which", ["agent", "controller"])
def test_openapi_documents_every_route_without_a_token(live: Live, which: str) -> None:
    base_url, _ = _service(live, which)
    response = httpx.get(f"{base_url}{OPENAPI_PATH}", timeout=TIMEOUT_S, trust_env=False)
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"] == "3.1.0"
    schemas = document["components"]["schemas"]
    assert "ErrorResponse" in schemas
    assert _resolve_refs(document, schemas) > 10

    routes = live.agent_routes if which == "agent" else live.controller_routes
    documented = {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }
    for method, path in routes:
        template = path.replace("{tail:.*}", "{tail}")
        if method == "*":
            assert ("POST", template) in documented, template
        else:
            assert (method, template) in documented, (method, template)
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert any(code.startswith("2") or code == "101" for code in responses), path
            for code, answer in responses.items():
                if int(code) >= 400:
                    schema = answer["content"]["application/json"]["schema"]
                    # Each route family's errors in its own convention.
                    expected = {
                        "ollama": "OllamaErrorResponse",
                        "openai": "OpenAIErrorResponse",
                        "service": "ErrorResponse",
                    }[error_shape(path)]
                    assert schema == {"$ref": f"#/components/schemas/{expected}"}, (path, code)
            public = operation.get("security") == []
            assert public == (path in ("/healthz", OPENAPI_PATH)), (method, path)
            assert ("401" in responses) != public, (method, path)


def test_openapi_names_the_request_and_response_models(live: Live) -> None:
    agent = httpx.get(f"{live.agent_url}{OPENAPI_PATH}", timeout=TIMEOUT_S).json()
    controller = httpx.get(f"{live.controller_url}{OPENAPI_PATH}", timeout=TIMEOUT_S).json()

    def body_ref(document: dict[str, Any], path: str) -> str:
        content = document["paths"][path]["post"]["requestBody"]["content"]
        return str(content["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1])

    assert body_ref(agent, "/v1/ollama/load") == "LoadRequest"
    assert body_ref(agent, "/v1/comfyui/prompts") == "PromptSubmit"
    assert body_ref(controller, "/v1/images") == "ImageSubmit"
    submit = controller["paths"]["/v1/images"]["post"]["responses"]
    assert submit["202"]["content"]["application/json"]["schema"]["$ref"].endswith("ImageJobInfo")
    image_submit = controller["components"]["schemas"]["ImageSubmit"]
    assert image_submit["required"] == ["workflow"]
    assert image_submit["additionalProperties"] is False
    assert agent["paths"]["/v1/comfyui/prompts/{prompt_id}"]["get"]["parameters"][0]["name"] == (
        "prompt_id"
    )
