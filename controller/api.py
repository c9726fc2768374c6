"""The controller's HTTP API (adapter layer): Ollama-compatible LLM routes, image jobs, fleet.

Existing Ollama clients work unchanged against `/api/*`: the controller picks the agent and the
model (for `auto`, `auto:fast`, `auto:quality`), makes room, and streams the agent's answer through
chunk by chunk (`controller.proxy`). Embedding requests (`/api/embed`, `/api/embeddings`) name
their model. Response headers name the choice (`X-GPU-Model`, `X-GPU-Agent`, `X-GPU-Reason`).
When nothing can serve within limits: 503 with `Retry-After` and the reason. Errors on `/api/*`
are Ollama's shape, `{"error": "..."}`; OpenAI's routes live in `controller.openai_api`. Host
and Origin are checked on every request (`gpu_common.hosts`); `/openapi.json` describes every
route (`gpu_common.openapi`) and, like `/healthz`, needs no token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from controller import __version__
from controller.access import AccessPolicy, ClientRequestsCollector, access_middleware
from controller.dashboard import DASHBOARD_PREFIX, browser_redirect_middleware, create_dashboard
from controller.domain.selection import AUTO_INTENTS
from controller.domain.types import LlmRequest, Task
from controller.engine import Engine
from controller.errors import AgentError, IdempotencyKeyReused
from controller.image_inputs import FORM_SCHEMA, NewInput, digest_inputs, read_submission
from controller.llm_fields import (
    check_constraint_types,
    llm_route_doc,
    pop_constraints,
    positive_int,
    prompt_tokens,
)
from controller.metrics import make_registry, render
from controller.openai_api import OPENAI_ROUTE_DOCS, add_openai_routes
from controller.proxy import relay
from controller.schema import (
    LATENT_CLASSES,
    MAX_LATENT_BATCH,
    MAX_LATENT_SIDE,
    ControllerHealth,
    FleetInfo,
    ImageJobInfo,
    ImageSubmit,
    ModelsInfo,
    OllamaChatRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaModelList,
    OllamaShowRequest,
    OllamaVersion,
)
from controller.store import JobRecord
from gpu_common import clock
from gpu_common.errors import BadRequest, Conflict, NotFound
from gpu_common.forms import is_form
from gpu_common.hosts import HostPolicy, host_check_middleware
from gpu_common.http import (
    check_workflow,
    error_middleware,
    parse_json,
    read_model,
)
from gpu_common.openapi import OPENAPI_PATH, Param, RouteDoc, add_openapi_route

log = logging.getLogger(__name__)

ENGINE_KEY = web.AppKey("engine", Engine)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_JOB_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# Idempotency keys are kept a day (the IETF draft leaves expiry to the server); a claim not
# bound to a job within a minute belonged to a request that died with the process.
_IDEMPOTENCY_KEEP_S = 86400.0
_IDEMPOTENCY_STALE_S = 60.0
_MAX_IDEMPOTENCY_KEY = 255
# Retry-After on a held job's submission, in seconds.
_HELD_RETRY_AFTER_S = 5
# The largest output index documented; larger ones name no output either (404).
_MAX_OUTPUT_INDEX = 2**31 - 1


def _json(payload: Any, status: int = 200) -> web.Response:
    body = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return web.Response(text=body, status=status, content_type="application/json")


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
    check_constraint_types(body)
    return body


async def _generate(request: web.Request, path: str, task: Task) -> web.StreamResponse:
    engine = request.app[ENGINE_KEY]
    body = await _ollama_body(request)
    if task == "embed":
        _check_embed_input(body)
    min_quality, max_latency = pop_constraints(body, request.headers)
    options = body.get("options") or {}
    llm_request = LlmRequest(
        model=body["model"].strip(),
        prompt_tokens=prompt_tokens(body),
        output_tokens=positive_int(options.get("num_predict")),
        min_quality=min_quality,
        max_latency_s=max_latency,
        task=task,
    )
    route = await engine.llm.acquire(llm_request, num_ctx=positive_int(options.get("num_ctx")))
    return await relay(request, engine.llm, route, path, body)


def _check_embed_input(body: dict[str, Any]) -> None:
    """An embedding request's texts: `input` (a string or a list of strings) or the older
    `prompt` (a string); refused before any model is loaded for it, in Ollama's words."""
    given = body.get("input")
    if given is not None and not (
        isinstance(given, str)
        or (isinstance(given, list) and all(isinstance(item, str) for item in given))
    ):
        raise BadRequest("invalid input type")
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise BadRequest("prompt must be a string")


async def api_generate(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "generate", "generate")


async def api_chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat", "chat")


async def api_embed(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "embed", "embed")


async def api_embeddings(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "embeddings", "embed")


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
    inputs: list[NewInput] = []
    if is_form(request):
        # A job with input pictures comes as a form (see controller.image_inputs).
        body, inputs = await read_submission(
            request, engine.input_limits, max_job_bytes=engine.settings.max_body_bytes
        )
    else:
        body = await read_model(request, ImageSubmit)
    if not body.workflow:
        raise BadRequest("workflow must have at least one node")
    check_workflow(body.workflow)
    _check_latent_limits(body.workflow)
    idempotency_key = _idempotency_key(request)
    if idempotency_key is None:
        record = await engine.images.submit(
            body.workflow, vram_hint_bytes=body.vram_bytes, priority=body.priority, inputs=inputs
        )
    else:
        record = await _submit_once(engine, idempotency_key, body, inputs)
    response = _json(engine.images.info(record), status=202)
    response.headers["Location"] = f"/v1/images/{record.job_id}"
    if record.state == "held":
        # A held job is planned again on every change; a caller that gave its worker back
        # asks again after this long (resubmitting with the same key reattaches).
        response.headers["Retry-After"] = str(_HELD_RETRY_AFTER_S)
    return response


def _check_latent_limits(workflow: dict[str, Any]) -> None:
    """BadRequest for a latent node sized beyond ComfyUI's limits, whatever the number's JSON
    type (a float is no size, but its bound is still the document's); the job store keeps
    sizes as 64-bit integers."""
    limits = {"width": MAX_LATENT_SIDE, "height": MAX_LATENT_SIDE, "batch_size": MAX_LATENT_BATCH}
    for node in workflow.values():
        if not isinstance(node, dict) or node.get("class_type") not in LATENT_CLASSES:
            continue
        inputs = node.get("inputs")
        if not isinstance(inputs, dict):
            continue
        for name, limit in limits.items():
            value = inputs.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > limit:
                raise BadRequest(
                    f"latent {name} {value:g} is beyond ComfyUI's limits "
                    f"({MAX_LATENT_SIDE} a side, batch {MAX_LATENT_BATCH})"
                )


def _idempotency_key(request: web.Request) -> str | None:
    """The `Idempotency-Key` header: a structured-field string (`"..."`, RFC 8941) as the IETF
    draft has it, or, as many clients send it, a bare token. None when absent."""
    raw = request.headers.get("Idempotency-Key")
    if raw is None:
        return None
    raw = raw.strip()
    if raw.startswith('"'):
        key = _sf_string(raw)
    else:
        key = raw
        if '"' in key or " " in key:
            raise BadRequest('Idempotency-Key must be a quoted string ("...") or a bare token')
    if not key or len(key) > _MAX_IDEMPOTENCY_KEY or not all(" " <= ch <= "~" for ch in key):
        raise BadRequest(
            f"Idempotency-Key must be 1 to {_MAX_IDEMPOTENCY_KEY} printable ASCII characters"
        )
    return key


def _sf_string(raw: str) -> str:
    """The value of a structured-field string (RFC 8941 3.3.3): `\\"` and `\\\\` are
    its only escapes, and it ends at the closing quote."""
    chars: list[str] = []
    index = 1
    while index < len(raw):
        char = raw[index]
        if char == "\\":
            if index + 1 >= len(raw) or raw[index + 1] not in '"\\':
                raise BadRequest("Idempotency-Key: a string may escape only '\"' and '\\'")
            chars.append(raw[index + 1])
            index += 2
        elif char == '"':
            if index != len(raw) - 1:
                raise BadRequest("Idempotency-Key: text after the closing quote")
            return "".join(chars)
        else:
            chars.append(char)
            index += 1
    raise BadRequest("Idempotency-Key: the string has no closing quote")


async def _submit_once(
    engine: Engine, key: str, body: ImageSubmit, inputs: list[NewInput]
) -> JobRecord:
    """The job for `key`: made now for a new key, the one made before for a repeated request.

    The same key with a different request is refused (422), and so is a repeat while the
    first request with that key is still being served (409), as the IETF draft says."""
    request = body.model_dump(mode="json")
    if inputs:
        request["inputs"] = digest_inputs(inputs)
    digest = hashlib.sha256(
        json.dumps(request, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    claim = await engine.store.claim_key(
        key,
        digest,
        now=engine.wall(),
        expires_after_s=_IDEMPOTENCY_KEEP_S,
        stale_claim_s=_IDEMPOTENCY_STALE_S,
    )
    if claim.outcome == "mismatch":
        raise IdempotencyKeyReused(
            f"Idempotency-Key {key!r} was used with a different request (job {claim.job_id})"
        )
    if claim.outcome == "in_progress":
        raise Conflict(f"a request with Idempotency-Key {key!r} is still being served")
    if claim.outcome == "replay":
        assert claim.job_id is not None
        return await engine.images.get(claim.job_id)
    try:
        # The job and the key's binding are one transaction: no crash leaves a job its key
        # does not name, which a retry would then make a second time.
        return await engine.images.submit(
            body.workflow,
            vram_hint_bytes=body.vram_bytes,
            priority=body.priority,
            idempotency_key=key,
            inputs=inputs,
        )
    except BaseException:
        await engine.store.release_key(key)
        raise


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
    try:
        async for info in engine.images.watch(job_id):
            await response.write(info.model_dump_json().encode() + b"\n")
        await response.write_eof()
    except ConnectionResetError:
        # The follower hung up (a held job may wait for hours); the job goes on without it.
        log.info("the follower of image job %s went away", job_id)
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


async def catalog(request: web.Request) -> web.Response:
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
    # Who may come in (tokens, named clients, trusted networks): see controller.access.
    access = AccessPolicy(
        token=token,
        clients={client.name: client.secret() for client in settings.clients},
        trusted_networks=settings.trusted_networks,
    )
    app = web.Application(
        client_max_size=max_body_bytes,
        middlewares=[
            error_middleware("controller"),
            host_check_middleware(policy),
            browser_redirect_middleware,
            # The dashboard exchanges the token for a session cookie; it checks that itself.
            access_middleware(access, own_auth_prefixes=(DASHBOARD_PREFIX,)),
        ],
    )
    app[ENGINE_KEY] = engine
    app[REGISTRY_KEY] = make_registry(engine)
    app[REGISTRY_KEY].register(ClientRequestsCollector(access))
    router = app.router
    router.add_get("/healthz", healthz)
    router.add_get("/metrics", metrics)
    router.add_get("/", root)
    router.add_post("/api/generate", api_generate)
    router.add_post("/api/chat", api_chat)
    router.add_post("/api/embed", api_embed)
    router.add_post("/api/embeddings", api_embeddings)
    router.add_get("/api/tags", api_tags)
    router.add_get("/api/ps", api_ps)
    router.add_post("/api/show", api_show)
    router.add_get("/api/version", api_version)
    router.add_post("/v1/images", submit_image)
    router.add_get("/v1/images/{job_id}", get_image)
    router.add_delete("/v1/images/{job_id}", cancel_image)
    router.add_get("/v1/images/{job_id}/events", image_events)
    router.add_get("/v1/images/{job_id}/outputs/{index}", image_output)
    router.add_get("/v1/catalog", catalog)
    router.add_get("/v1/fleet", fleet)
    add_openai_routes(router, engine)
    add_openapi_route(
        app,
        ROUTE_DOCS,
        title="gpu-controller",
        version=__version__,
        description=(
            "Schedules LLM requests (Ollama-compatible /api/*) and ComfyUI image jobs across "
            "GPU agents."
        ),
        token_required=not access.open,
    )
    # A browser UI, not part of the API: the OpenAPI document leaves it out.
    app.add_subapp(DASHBOARD_PREFIX, create_dashboard(engine, token=token))
    return app


# What `_idempotency_key` takes: a bare token (printable ASCII, no space or '"'), or a
# structured-field string whose characters (an escaped '"' or '\\' counting as one) are
# printable ASCII; 1 to 255 of them either way.
_IDEMPOTENCY_KEY_PATTERN = r'^([!#-~]{1,N}|"([ !#-\[\]-~]|\\["\\]){1,N}")$'.replace(
    "N", str(_MAX_IDEMPOTENCY_KEY)
)
_JOB_ID_PARAM = Param("job_id", {"type": "string", "pattern": _JOB_ID.pattern})
_OUTPUT_INDEX_PARAM = Param(
    "index",
    {"type": "integer", "minimum": 0, "maximum": _MAX_OUTPUT_INDEX},
    description="0 for the first output; an index the job does not have answers 404",
)
# An LLM route hands on the agent's answer, Ollama's own errors included; 503 with Retry-After
# when nothing can serve the request within limits now (`llm_route_doc`).
_STREAM_TYPES = ("application/x-ndjson", "application/json")

ROUTE_DOCS: dict[tuple[str, str], RouteDoc] = {
    ("GET", "/healthz"): RouteDoc(
        "Liveness and agent health counts", response=ControllerHealth, public=True, errors=()
    ),
    ("GET", OPENAPI_PATH): RouteDoc("This document", public=True, errors=()),
    ("GET", "/metrics"): RouteDoc(
        "Prometheus metrics", content_type="text/plain; version=0.0.4", errors=()
    ),
    ("GET", "/"): RouteDoc(
        "Ollama's liveness text (a browser asking for HTML is sent to /dashboard/)",
        content_type="text/plain",
        errors=(),
    ),
    ("POST", "/api/generate"): llm_route_doc(
        "Ollama generate; model may be auto, auto:fast or auto:quality",
        OllamaGenerateRequest,
        content_types=_STREAM_TYPES,
    ),
    ("POST", "/api/chat"): llm_route_doc(
        "Ollama chat; model may be auto, auto:fast or auto:quality",
        OllamaChatRequest,
        content_types=_STREAM_TYPES,
    ),
    ("POST", "/api/embed"): llm_route_doc(
        "Ollama embed: the vectors of `input` by the named model (no auto intent: an embedding "
        "request names its model)",
        OllamaEmbedRequest,
    ),
    ("POST", "/api/embeddings"): llm_route_doc(
        "Ollama's older embeddings route: the vector of `prompt` by the named model",
        OllamaEmbeddingsRequest,
    ),
    ("GET", "/api/tags"): RouteDoc(
        "Ollama tags, with the auto intents first", response=OllamaModelList, errors=()
    ),
    ("GET", "/api/ps"): RouteDoc(
        "Ollama ps, over every agent", response=OllamaModelList, errors=()
    ),
    ("POST", "/api/show"): RouteDoc(
        "Ollama show (no body: describes no model, 404)",
        request=OllamaShowRequest,
        request_optional=True,
        errors=(400, 404, 500, 502, 503),
    ),
    ("GET", "/api/version"): RouteDoc("Ollama version", response=OllamaVersion, errors=()),
    ("POST", "/v1/images"): RouteDoc(
        "Submit an image job (a ComfyUI workflow in API format); with an Idempotency-Key, "
        "the same key returns the same job. With input pictures (img2img, inpainting), as "
        "multipart/form-data: the JSON in 'job', each picture in 'image' or 'mask' named as "
        "the workflow's LoadImage or LoadImageMask names it",
        request=ImageSubmit,
        form=FORM_SCHEMA,
        response=ImageJobInfo,
        status=202,
        errors=(400, 404, 409, 413, 422),
        params=(
            Param(
                "Idempotency-Key",
                {"type": "string", "pattern": _IDEMPOTENCY_KEY_PATTERN},
                location="header",
                required=False,
                description='a structured-field string ("...") or a bare token naming this '
                "submission: 1 to 255 printable ASCII characters",
            ),
        ),
        retry_after=(202,),
    ),
    ("GET", "/v1/images/{job_id}"): RouteDoc(
        "An image job's state", response=ImageJobInfo, params=(_JOB_ID_PARAM,)
    ),
    ("DELETE", "/v1/images/{job_id}"): RouteDoc(
        "Cancel an image job",
        response=ImageJobInfo,
        errors=(400, 404, 409, 502, 503),
        params=(_JOB_ID_PARAM,),
    ),
    ("GET", "/v1/images/{job_id}/events"): RouteDoc(
        "NDJSON: the job's ImageJobInfo each time it changes, until it ends",
        content_type="application/x-ndjson",
        params=(_JOB_ID_PARAM,),
    ),
    ("GET", "/v1/images/{job_id}/outputs/{index}"): RouteDoc(
        "The n-th output image of a job",
        content_type="image/png",
        params=(_JOB_ID_PARAM, _OUTPUT_INDEX_PARAM),
    ),
    ("GET", "/v1/catalog"): RouteDoc(
        "Catalogue with learned speeds and footprints, embedding models marked",
        response=ModelsInfo,
        errors=(),
    ),
    ("GET", "/v1/fleet"): RouteDoc(
        "Agents, GPUs, resident models, held jobs with reasons", response=FleetInfo, errors=()
    ),
    **OPENAI_ROUTE_DOCS,
}
