"""The controller's HTTP API (adapter layer): Ollama-compatible LLM routes, image jobs, fleet.

Existing Ollama clients work unchanged against `/api/*`: the controller picks the agent and the
model (for `auto`, `auto:fast`, `auto:quality`), makes room, and streams the agent's answer through
chunk by chunk. Response headers name the choice (`X-GPU-Model`, `X-GPU-Agent`, `X-GPU-Reason`).
When nothing can serve within limits: 503 with `Retry-After` and the reason. Host and Origin
are checked on every request (`gpu_common.hosts`); `/openapi.json` describes every route
(`gpu_common.openapi`) and, like `/healthz`, needs no token.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from controller import __version__
from controller.domain.selection import AUTO_INTENTS
from controller.domain.types import LlmRequest
from controller.domain.workflows import image_key
from controller.engine import Engine
from controller.errors import AgentError
from controller.metrics import make_registry, render
from controller.schema import FleetInfo, ImageJobInfo, ImageSubmit, ModelsInfo
from gpu_common import clock
from gpu_common.errors import BadRequest, NotFound
from gpu_common.hosts import HostPolicy, host_check_middleware
from gpu_common.http import (
    auth_middleware,
    check_workflow,
    error_middleware,
    parse_json,
    read_model,
)
from gpu_common.openapi import OPENAPI_PATH, RouteDoc, add_openapi_route

log = logging.getLogger(__name__)

ENGINE_KEY = web.AppKey("engine", Engine)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_JOB_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# Our own request fields, stripped before the request goes on to Ollama.
_CONSTRAINTS = ("min_quality", "max_latency_s")
# Keep the final NDJSON line of a stream for learning; a line longer than this is not kept.
_MAX_FINAL_LINE = 4 * 1024 * 1024
# The largest context or output length taken into a latency estimate (Ollama caps them anyway).
_MAX_TOKENS = 1 << 20
# ComfyUI's own limits on a latent (MAX_RESOLUTION, EmptyLatentImage's batch_size); it refuses
# more, and the job store keeps these as 64-bit integers.
_MAX_SIDE = 16384
_MAX_BATCH = 4096


def _json(payload: Any, status: int = 200) -> web.Response:
    body = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return web.Response(text=body, status=status, content_type="application/json")


def _ascii(text: str, limit: int = 400) -> str:
    return text.encode("ascii", "replace").decode()[:limit]


def _now() -> str:
    return clock.utc_now().isoformat().replace("+00:00", "Z")


# -- Ollama-compatible LLM routes ------------------------------------------------------------


async def _ollama_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        raise BadRequest("missing request body")
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("model is required")
    options = body.get("options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("options must be an object")
    messages = body.get("messages")
    if messages is not None and not isinstance(messages, list):
        raise BadRequest("messages must be a list")
    return body


def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRequest(f"{name} must be a number") from exc
    if not math.isfinite(number) or number < 0:
        raise BadRequest(f"{name} must be a non-negative number")
    return number


def _prompt_tokens(body: dict[str, Any]) -> int:
    """A rough count (4 characters a token) for the latency estimate; Ollama counts exactly."""
    chars = len(str(body.get("prompt") or "")) + len(str(body.get("system") or ""))
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            chars += len(str(message.get("content") or ""))
    return max(1, chars // 4) + 16


def _positive_int(value: Any) -> int | None:
    """A positive integer option for the estimates, capped; None when it is anything else."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return min(value, _MAX_TOKENS)
    return None


async def _generate(request: web.Request, path: str) -> web.StreamResponse:
    engine = request.app[ENGINE_KEY]
    body = await _ollama_body(request)
    min_quality = _number(
        body.pop("min_quality", request.headers.get("X-GPU-Min-Quality")), "min_quality"
    )
    max_latency = _number(
        body.pop("max_latency_s", request.headers.get("X-GPU-Max-Latency-S")), "max_latency_s"
    )
    options = body.get("options") or {}
    llm_request = LlmRequest(
        model=body["model"].strip(),
        prompt_tokens=_prompt_tokens(body),
        output_tokens=_positive_int(options.get("num_predict")),
        min_quality=min_quality,
        max_latency_s=max_latency,
    )
    route = await engine.llm.acquire(llm_request, num_ctx=_positive_int(options.get("num_ctx")))
    try:
        body["model"] = route.model
        async with route.link.ollama_stream(path, json.dumps(body).encode()) as upstream:
            response = web.StreamResponse(status=upstream.status_code)
            response.content_type = upstream.headers.get("Content-Type", "application/json").split(
                ";"
            )[0]
            response.headers["X-GPU-Model"] = route.model
            response.headers["X-GPU-Agent"] = route.agent
            response.headers["X-GPU-Reason"] = _ascii(route.reason)
            await response.prepare(request)
            last_line, partial = b"", b""
            async for chunk in upstream.aiter_raw():
                await response.write(chunk)
                partial += chunk
                if b"\n" in partial:
                    *complete, partial = partial.split(b"\n")
                    last_line = next(
                        (line for line in reversed(complete) if line.strip()), last_line
                    )
                if len(partial) > _MAX_FINAL_LINE:
                    partial = b""
            # The model is free once the answer is complete: release before the caller sees
            # the end, or its next request could find the model still counted as busy.
            engine.llm.release(route)
            await response.write_eof()
        final_line = partial if partial.strip() else last_line
        try:
            final = json.loads(final_line) if final_line else {}
        except ValueError:
            final = {}
        if upstream.status_code == 200 and isinstance(final, dict):
            await engine.llm.record(route, final)
        return response
    finally:
        engine.llm.release(route)


async def api_generate(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "generate")


async def api_chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


_AUTO_DETAILS = {
    "parent_model": "",
    "format": "virtual",
    "family": "auto",
    "families": ["auto"],
    "parameter_size": "",
    "quantization_level": "",
}


async def api_tags(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    models: dict[str, dict[str, Any]] = {}
    for name in sorted(engine.links):
        try:
            listed = await engine.links[name].ollama_get("tags")
        except AgentError as exc:
            log.info("tags from %s unavailable: %s", name, exc)
            continue
        for model in listed.get("models") or []:
            models.setdefault(model.get("name"), model)
    virtual = [
        {"name": intent, "model": intent, "modified_at": _now(), "size": 0, "digest": "",
         "details": _AUTO_DETAILS}
        for intent in AUTO_INTENTS
    ]  # fmt: skip
    return _json({"models": virtual + [models[k] for k in sorted(models)]})


async def api_ps(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    running: list[dict[str, Any]] = []
    for name in sorted(engine.links):
        try:
            listed = await engine.links[name].ollama_get("ps")
        except AgentError as exc:
            log.info("ps from %s unavailable: %s", name, exc)
            continue
        running.extend(listed.get("models") or [])
    return _json({"models": running})


async def api_show(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    body = await _ollama_body(request) if request.can_read_body else {}
    model = str(body.get("model") or body.get("name") or "")
    if model in AUTO_INTENTS:
        return _json({
            "modelfile": f"# {model}: the controller picks a model per request",
            "parameters": "", "template": "", "details": _AUTO_DETAILS, "model_info": {},
            "capabilities": ["completion"], "modified_at": _now(),
        })  # fmt: skip
    for name in sorted(engine.links):
        status = engine.links[name].status
        if status and any(m.name == model for m in status.ollama.available):
            return _json(await engine.links[name].ollama_post("show", body))
    raise NotFound(f"model '{model}' not found")


async def api_version(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    for link in engine.links.values():
        if link.status and link.status.ollama.version:
            return _json({"version": link.status.ollama.version})
    return _json({"version": "0.0.0"})


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


# -- image jobs, models, fleet ---------------------------------------------------------------


def _job_id(request: web.Request) -> str:
    job_id = request.match_info["job_id"]
    if not _JOB_ID.match(job_id):
        raise BadRequest("job id must be a lowercase UUID")
    return job_id


async def submit_image(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    body = await read_model(request, ImageSubmit)
    if not body.workflow:
        raise BadRequest("workflow must have at least one node")
    check_workflow(body.workflow)
    key = image_key(body.workflow)
    if key.width > _MAX_SIDE or key.height > _MAX_SIDE or key.batch > _MAX_BATCH:
        raise BadRequest(
            f"latent of {key.width}x{key.height}, batch {key.batch}, is beyond ComfyUI's limits "
            f"({_MAX_SIDE} a side, batch {_MAX_BATCH})"
        )
    record = await engine.images.submit(
        body.workflow, vram_hint_bytes=body.vram_bytes, priority=body.priority
    )
    response = _json(engine.images.info(record), status=202)
    response.headers["Location"] = f"/v1/images/{record.job_id}"
    return response


async def get_image(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    return _json(engine.images.info(await engine.images.get(_job_id(request))))


async def cancel_image(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    return _json(engine.images.info(await engine.images.cancel(_job_id(request))))


async def image_events(request: web.Request) -> web.StreamResponse:
    """NDJSON: the job's state each time it changes, until it ends."""
    engine = request.app[ENGINE_KEY]
    job_id = _job_id(request)
    await engine.images.get(job_id)  # 404 before the stream starts
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    async for info in engine.images.watch(job_id):
        await response.write(info.model_dump_json().encode() + b"\n")
    await response.write_eof()
    return response


async def image_output(request: web.Request) -> web.FileResponse:
    engine = request.app[ENGINE_KEY]
    record = await engine.images.get(_job_id(request))
    try:
        index = int(request.match_info["index"])
    except ValueError as exc:
        raise BadRequest("output index must be an integer") from exc
    path = engine.images.output_path(record, index)
    if not path.is_file():
        raise NotFound(f"output #{index} of job {record.job_id} is missing on disk")
    return web.FileResponse(
        path, headers={"Content-Disposition": f'attachment; filename="{path.name}"'}
    )


async def models(request: web.Request) -> web.Response:
    return _json(request.app[ENGINE_KEY].models_info())


async def fleet(request: web.Request) -> web.Response:
    return _json(request.app[ENGINE_KEY].fleet_info())


async def healthz(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    healthy = [name for name, link in engine.links.items() if link.health()[0]]
    return _json({"status": "ok", "agents": len(engine.links), "healthy_agents": len(healthy)})


async def metrics(request: web.Request) -> web.Response:
    payload, content_type = render(request.app[REGISTRY_KEY])
    return web.Response(body=payload, headers={"Content-Type": content_type})


def create_app(engine: Engine, *, token: str | None, max_body_bytes: int) -> web.Application:
    """The controller's aiohttp application. The caller owns `engine`'s lifecycle.

    Host and Origin are checked against the defaults plus `allowed_hosts` and the bind address
    from `engine.settings`.
    """
    settings = engine.settings
    policy = HostPolicy(settings.allowed_hosts, bind_host=settings.host)
    app = web.Application(
        client_max_size=max_body_bytes,
        middlewares=[
            error_middleware("controller"),
            host_check_middleware(policy),
            auth_middleware(token),
        ],
    )
    app[ENGINE_KEY] = engine
    app[REGISTRY_KEY] = make_registry(engine)
    router = app.router
    router.add_get("/healthz", healthz)
    router.add_get("/metrics", metrics)
    router.add_get("/", root)
    router.add_post("/api/generate", api_generate)
    router.add_post("/api/chat", api_chat)
    router.add_get("/api/tags", api_tags)
    router.add_get("/api/ps", api_ps)
    router.add_post("/api/show", api_show)
    router.add_get("/api/version", api_version)
    router.add_post("/v1/images", submit_image)
    router.add_get("/v1/images/{job_id}", get_image)
    router.add_delete("/v1/images/{job_id}", cancel_image)
    router.add_get("/v1/images/{job_id}/events", image_events)
    router.add_get("/v1/images/{job_id}/outputs/{index}", image_output)
    router.add_get("/v1/models", models)
    router.add_get("/v1/fleet", fleet)
    add_openapi_route(
        app,
        ROUTE_DOCS,
        title="gpu-controller",
        version=__version__,
        description=(
            "Schedules LLM requests (Ollama-compatible /api/*) and ComfyUI image jobs across "
            "GPU agents."
        ),
        token_required=token is not None,
    )
    return app


_OLLAMA_ERRORS = (400, 404, 502, 503)

ROUTE_DOCS: dict[tuple[str, str], RouteDoc] = {
    ("GET", "/healthz"): RouteDoc("Liveness and agent health counts", public=True, errors=()),
    ("GET", OPENAPI_PATH): RouteDoc("This document", public=True, errors=()),
    ("GET", "/metrics"): RouteDoc(
        "Prometheus metrics", content_type="text/plain; version=0.0.4", errors=()
    ),
    ("GET", "/"): RouteDoc("Ollama's liveness text", content_type="text/plain", errors=()),
    ("POST", "/api/generate"): RouteDoc(
        "Ollama generate; model may be auto, auto:fast or auto:quality",
        content_type="application/x-ndjson",
        errors=_OLLAMA_ERRORS,
    ),
    ("POST", "/api/chat"): RouteDoc(
        "Ollama chat; model may be auto, auto:fast or auto:quality",
        content_type="application/x-ndjson",
        errors=_OLLAMA_ERRORS,
    ),
    ("GET", "/api/tags"): RouteDoc("Ollama tags, with the auto intents first", errors=()),
    ("GET", "/api/ps"): RouteDoc("Ollama ps, over every agent", errors=()),
    ("POST", "/api/show"): RouteDoc("Ollama show", errors=_OLLAMA_ERRORS),
    ("GET", "/api/version"): RouteDoc("Ollama version", errors=()),
    ("POST", "/v1/images"): RouteDoc(
        "Submit an image job (a ComfyUI workflow in API format)",
        request=ImageSubmit,
        response=ImageJobInfo,
        status=202,
        errors=(400,),
    ),
    ("GET", "/v1/images/{job_id}"): RouteDoc("An image job's state", response=ImageJobInfo),
    ("DELETE", "/v1/images/{job_id}"): RouteDoc(
        "Cancel an image job", response=ImageJobInfo, errors=(400, 404, 502, 503)
    ),
    ("GET", "/v1/images/{job_id}/events"): RouteDoc(
        "NDJSON: the job's ImageJobInfo each time it changes, until it ends",
        content_type="application/x-ndjson",
    ),
    ("GET", "/v1/images/{job_id}/outputs/{index}"): RouteDoc(
        "The n-th output image of a job", content_type="image/png"
    ),
    ("GET", "/v1/models"): RouteDoc(
        "Catalogue with learned speeds and footprints", response=ModelsInfo, errors=()
    ),
    ("GET", "/v1/fleet"): RouteDoc(
        "Agents, GPUs, resident models, held jobs with reasons", response=FleetInfo, errors=()
    ),
}
