"""The controller's OpenAI-compatible routes (adapter layer): what the OpenAI SDKs, LangChain and
n8n speak, and what Ollama itself serves under `/v1`.

- `POST /v1/chat/completions` and `POST /v1/completions`, streamed (SSE `data:` lines ending in
  `data: [DONE]`) or not, and `POST /v1/embeddings`: placed like the Ollama routes (the intents
  `auto`, `auto:fast` and `auto:quality` are model ids here too; an embedding request names its
  model) and handed to the chosen agent's Ollama through `controller.proxy`, which answers them
  in OpenAI's shape with the concrete model in `model`.
- `GET /v1/models` lists the intents and every model the agents offer, in OpenAI's list shape;
  `GET /v1/models/{model}` one of them.

Every error here is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with
our code in `code` (`gpu_common.error_shapes`). A request nothing can serve within its limits
is held, then answered 503 with `Retry-After`, which OpenAI's clients wait out and retry.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from controller.domain.selection import AUTO_INTENTS
from controller.domain.types import LlmRequest, Task
from controller.engine import Engine
from controller.errors import AgentError
from controller.llm_fields import (
    check_constraint_types,
    llm_route_doc,
    pop_constraints,
    positive_int,
    prompt_tokens,
)
from controller.proxy import relay
from gpu_common.errors import BadRequest, NotFound
from gpu_common.http import parse_json, validate
from gpu_common.openai_schema import (
    OpenAIChatRequest,
    OpenAICompletionRequest,
    OpenAIEmbeddingRequest,
    OpenAIModel,
    OpenAIModelList,
    model_entry,
)
from gpu_common.openapi import Param, RouteDoc

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
# Who owns the intents in the model list: the controller, which resolves them per request.
INTENT_OWNER = "gpu-controller"


class OpenAIRoutes:
    """The handlers of the OpenAI routes, on one engine."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        # The intents exist since the controller started; the list says so.
        self._started = int(engine.wall().timestamp())

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/chat/completions`."""
        return await self._generate(request, CHAT_PATH, OpenAIChatRequest, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/completions`."""
        return await self._generate(request, COMPLETIONS_PATH, OpenAICompletionRequest, "generate")

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/embeddings`."""
        return await self._generate(request, EMBEDDINGS_PATH, OpenAIEmbeddingRequest, "embed")

    async def _generate(
        self, request: web.Request, path: str, model: type[BaseModel], task: Task
    ) -> web.StreamResponse:
        raw = await request.read()
        if not raw:
            raise BadRequest("missing request body")
        body = parse_json(raw)
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        check_constraint_types(body)
        min_quality, max_latency = pop_constraints(body, request.headers)
        # Checked as a whole, but the dict goes on: fields we do not read pass untouched.
        validate(body, model)
        for name in ("max_tokens", "dimensions"):
            # 5.0 counts as an integer here; Ollama's decoder would refuse it.
            if isinstance(body.get(name), float):
                body[name] = int(body[name])
        llm_request = LlmRequest(
            model=str(body["model"]).strip(),
            prompt_tokens=prompt_tokens(body),
            output_tokens=positive_int(body.get("max_tokens")),
            min_quality=min_quality,
            max_latency_s=max_latency,
            task=task,
        )
        route = await self._engine.llm.acquire(llm_request)
        # OpenAI's answers carry no durations to learn speeds from.
        return await relay(request, self._engine.llm, route, path, body, learn=False)

    async def models(self, request: web.Request) -> web.Response:
        """`GET /v1/models`: the intents first, then every model an agent offers."""
        return web.json_response({"object": "list", "data": await self._entries()})

    async def model(self, request: web.Request) -> web.Response:
        """`GET /v1/models/{model}`."""
        name = request.match_info["model"]
        for entry in await self._entries():
            if entry["id"] == name:
                return web.json_response(entry)
        raise NotFound(f"model '{name}' not found")

    async def _entries(self) -> list[dict[str, Any]]:
        entries = [model_entry(i, self._started, INTENT_OWNER) for i in AUTO_INTENTS]
        seen: set[str] = set()
        engine = self._engine
        for name in sorted(engine.links):
            try:
                listed = await engine.links[name].ollama_get("tags")
            except AgentError as exc:
                log.info("tags from %s unavailable: %s", name, exc)
                continue
            for model in listed.get("models") or []:
                model_name = model.get("model") or model.get("name")
                if isinstance(model_name, str) and model_name not in seen:
                    seen.add(model_name)
                    entries.append(model_entry(model_name, _unix_s(model.get("modified_at"))))
        return entries[:3] + sorted(entries[3:], key=lambda e: str(e["id"]))


def _unix_s(go_time: Any) -> int:
    """Unix seconds of Ollama's `modified_at` (RFC 3339 with up to nanoseconds); 0 if absent."""
    if not isinstance(go_time, str):
        return 0
    head, dot, rest = go_time.partition(".")
    if dot:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        go_time = f"{head}.{rest[: min(digits, 6)]}{rest[digits:]}"
    try:
        return int(datetime.fromisoformat(go_time.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def add_openai_routes(router: web.UrlDispatcher, engine: Engine) -> None:
    """Add the OpenAI routes, served on `engine`, to `router`."""
    routes = OpenAIRoutes(engine)
    router.add_post(CHAT_PATH, routes.chat)
    router.add_post(COMPLETIONS_PATH, routes.completions)
    router.add_post(EMBEDDINGS_PATH, routes.embeddings)
    router.add_get("/v1/models", routes.models, allow_head=False)
    router.add_get("/v1/models/{model:.+}", routes.model, allow_head=False)


# An OpenAI route hands on Ollama's answer, its errors included (in OpenAI's shape); 503 with
# Retry-After when nothing can serve the request within limits now.
_STREAM_TYPES = ("application/json", "text/event-stream")

OPENAI_ROUTE_DOCS: dict[tuple[str, str], RouteDoc] = {
    ("POST", CHAT_PATH): llm_route_doc(
        "OpenAI chat completions, streamed as SSE or not; model may be auto, auto:fast or "
        "auto:quality",
        OpenAIChatRequest,
        content_types=_STREAM_TYPES,
    ),
    ("POST", COMPLETIONS_PATH): llm_route_doc(
        "OpenAI completions (a string prompt), streamed as SSE or not; model may be an intent",
        OpenAICompletionRequest,
        content_types=_STREAM_TYPES,
    ),
    ("POST", EMBEDDINGS_PATH): llm_route_doc(
        "OpenAI embeddings by the named model (no intent: an embedding request names its model)",
        OpenAIEmbeddingRequest,
    ),
    ("GET", "/v1/models"): RouteDoc(
        "The intents and every model the agents offer, in OpenAI's list shape",
        response=OpenAIModelList,
        errors=(),
    ),
    ("GET", "/v1/models/{model}"): RouteDoc(
        "One model (or intent) in OpenAI's shape",
        response=OpenAIModel,
        errors=(404,),
        params=(Param("model", {"type": "string", "minLength": 1}),),
    ),
}
