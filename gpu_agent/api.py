"""The agent's HTTP API (adapter layer): aiohttp app factory, auth, limits, errors, pass-through.

Every error leaves as JSON with a fitting status, converted once, in `error_middleware`: in
Ollama's shape `{"error": "..."}` on the `/api/*` pass-through, in OpenAI's on the OpenAI routes
Ollama serves under `/v1` (passed through too), and as `{"error": {"code", "message"}}` on the
agent's own routes. Every route but `/healthz` and `/openapi.json` needs
`Authorization: Bearer <token>` when a token is configured; the comparison is constant-time.
Before that, every request's Host and Origin are checked (`gpu_common.hosts`), and
`/openapi.json` describes every route (`gpu_common.openapi`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TypeVar

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from yarl import URL

from gpu_agent import __version__
from gpu_agent.errors import (
    ComfyUIError,
    OllamaUnavailable,
)
from gpu_agent.metrics import make_registry, render
from gpu_agent.service import AgentService
from gpu_common.errors import BadRequest, NotFound
from gpu_common.forms import read_form
from gpu_common.hosts import HostPolicy, host_check_middleware
from gpu_common.http import auth_middleware, check_workflow, error_middleware, read_model
from gpu_common.openai_schema import (
    OpenAIChatRequest,
    OpenAICompletionRequest,
    OpenAIEmbeddingRequest,
    OpenAIModel,
    OpenAIModelList,
)
from gpu_common.openapi import OPENAPI_PATH, Param, RouteDoc, add_openapi_route
from gpu_common.schema import (
    AgentEvent,
    AgentHealth,
    AgentStatus,
    FreeRequest,
    FreeResult,
    LoadRequest,
    LoadResult,
    PromptInfo,
    PromptSubmit,
    UnloadRequest,
    UnloadResult,
    UploadResult,
)

log = logging.getLogger(__name__)

SERVICE_KEY = web.AppKey("service", AgentService)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
EVENT_STREAMS_KEY = web.AppKey("event_streams", weakref.WeakSet[web.WebSocketResponse])
PASSTHROUGH_KEY = web.AppKey("passthrough", aiohttp.ClientSession)
MAX_UPLOAD_KEY = web.AppKey("max_upload_bytes", int)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
M = TypeVar("M", bound=BaseModel)

# ComfyUI prompt ids are UUIDs; anything else cannot name a prompt and must not reach a URL.
_PROMPT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# The largest output index documented; larger ones name no output either (404).
_MAX_OUTPUT_INDEX = 2**31 - 1
# A file name ComfyUI is given: no folder part, no leading dot, nothing a shell or URL minds.
_UPLOAD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_. ()-]{0,127}$")
# A subfolder under ComfyUI's folder: names separated by "/", none of them "." or "..".
_SUBFOLDER = re.compile(
    r"^([A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}(/[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63})*)?$"
)
_UPLOAD_TYPES = ("input", "output", "temp")
_UPLOAD_FIELDS = frozenset(
    {"image", "type", "subfolder", "overwrite"}
    | {"original_filename", "original_subfolder", "original_type"}
)
# A path under /api/ may hold no "." or ".." segment.
_DOT_SEGMENT = r"(^|/)\.\.?(/|$)"
# Ollama endpoints whose requests name a model and occupy it while they run.
_MODEL_ROUTES = {
    "/api/generate",
    "/api/chat",
    "/api/embed",
    "/api/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
}
# The OpenAI-compatible routes Ollama serves, passed through like /api/*, and the request
# models that document them.
OPENAI_POST_ROUTES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": OpenAIChatRequest,
    "/v1/completions": OpenAICompletionRequest,
    "/v1/embeddings": OpenAIEmbeddingRequest,
}
# The controller names that model in this header, so its body need not be parsed here; a
# direct Ollama client does not, and its body is read for the name instead.
MODEL_HEADER = "X-GPU-Model"
# Connections from the pass-through to Ollama: room for 64 concurrent streams and more, each
# kept open for the next request (aiohttp's default 15 s, timed on the loop's clock).
PASSTHROUGH_MAX_CONNECTIONS = 256
# Hop-by-hop and framing headers never copied through the pass-through.
_DROP_HEADERS = {
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "authorization",
    "upgrade",
    "te",
    "trailer",
    "proxy-authorization",
    "proxy-authenticate",
    MODEL_HEADER.lower(),
}


def _json(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(
        body=model.model_dump_json().encode(), status=status, content_type="application/json"
    )


# -- handlers ----------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    telemetry = service.status().telemetry
    return web.json_response({"status": "ok", "telemetry": telemetry.status})


async def get_status(request: web.Request) -> web.Response:
    return _json(request.app[SERVICE_KEY].status())


async def events(request: web.Request) -> web.WebSocketResponse:
    service = request.app[SERVICE_KEY]
    ws = web.WebSocketResponse(heartbeat=20.0)
    await ws.prepare(request)
    request.app[EVENT_STREAMS_KEY].add(ws)
    async with service.subscribe() as queue:
        reader = asyncio.create_task(_drain_client(ws))
        try:
            while not ws.closed:
                getter = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                try:
                    await ws.send_str(getter.result().model_dump_json())
                except ConnectionResetError:
                    break  # the follower went away between two events; nothing to report
        finally:
            reader.cancel()
    await ws.close()
    return ws


async def _close_event_streams(app: web.Application) -> None:
    """On shutdown, tell every follower we are going, rather than let the grace period lapse."""
    streams: weakref.WeakSet[web.WebSocketResponse] = app[EVENT_STREAMS_KEY]
    for ws in list(streams):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"agent shutting down")


async def _drain_client(ws: web.WebSocketResponse) -> None:
    """Read (and ignore) client frames so pings, pongs and close are processed."""
    async for msg in ws:
        if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
            break


async def ollama_load(request: web.Request) -> web.Response:
    body = await read_model(request, LoadRequest)
    return _json(await request.app[SERVICE_KEY].load(body))


async def ollama_unload(request: web.Request) -> web.Response:
    body = await read_model(request, UnloadRequest)
    return _json(await request.app[SERVICE_KEY].unload(body))


async def submit_prompt(request: web.Request) -> web.Response:
    body = await read_model(request, PromptSubmit)
    check_workflow(body.workflow)
    info = await request.app[SERVICE_KEY].submit_prompt(body.workflow, body.prompt_id)
    return _json(info, status=202)


def _prompt_id(request: web.Request) -> str:
    prompt_id = request.match_info["prompt_id"]
    if not _PROMPT_ID.match(prompt_id):
        raise BadRequest("prompt id must be 1 to 64 letters, digits, '-' or '_'")
    return prompt_id


async def get_prompt(request: web.Request) -> web.Response:
    prompt_id = _prompt_id(request)
    info = await request.app[SERVICE_KEY].get_prompt(prompt_id)
    if info is None:
        raise NotFound(f"no prompt {prompt_id}")
    return _json(info)


async def cancel_prompt(request: web.Request) -> web.Response:
    return _json(await request.app[SERVICE_KEY].cancel_prompt(_prompt_id(request)))


async def get_output(request: web.Request) -> web.Response:
    prompt_id = _prompt_id(request)
    try:
        index = int(request.match_info["index"])
    except ValueError as exc:
        raise BadRequest("output index must be an integer") from exc
    data, filename, content_type = await request.app[SERVICE_KEY].comfyui.fetch_output(
        prompt_id, index
    )
    safe_name = "".join(ch for ch in filename if ch.isalnum() or ch in "._-") or "output"
    return web.Response(
        body=data,
        content_type=content_type,
        headers={"Content-Disposition": f'attachment; filename="{safe_name}"'},
    )


async def comfyui_upload(request: web.Request) -> web.Response:
    """A picture for ComfyUI, with ComfyUI's own upload semantics (type, subfolder, overwrite,
    a new name on a clash); with `original_filename` it goes to `/upload/mask`, onto that
    original."""
    limit = request.app[MAX_UPLOAD_KEY]
    form = await read_form(
        request,
        max_file_bytes=limit,
        max_files=1,
        max_total_bytes=limit * 2,
        fields=_UPLOAD_FIELDS,
    )
    image = next((f for f in form.files if f.field == "image"), None)
    if image is None:
        raise BadRequest("the form needs a file in the field 'image'")
    if not _UPLOAD_NAME.match(image.filename):
        raise BadRequest(
            "the file name must be 1 to 128 letters, digits, ' ', '_', '.', '(', ')' or '-', "
            "not starting with '.'"
        )
    folder_type = form.fields.get("type", "input")
    if folder_type not in _UPLOAD_TYPES:
        raise BadRequest(f"type must be one of {', '.join(_UPLOAD_TYPES)}")
    subfolder = form.fields.get("subfolder", "")
    if not _SUBFOLDER.match(subfolder):
        raise BadRequest("subfolder must be folder names separated by '/', without '.' or '..'")
    overwrite = form.fields.get("overwrite", "false")
    if overwrite not in ("true", "false"):
        raise BadRequest("overwrite must be 'true' or 'false'")
    mask_of = _original(form.fields)
    result = await request.app[SERVICE_KEY].upload(
        image.data,
        image.filename,
        mask_of=mask_of,
        folder_type=folder_type,
        subfolder=subfolder,
        overwrite=overwrite == "true",
        content_type=image.content_type,
    )
    return _json(result)


def _original(fields: dict[str, str]) -> dict[str, str] | None:
    """The picture a mask goes onto (`original_filename`, `original_subfolder`,
    `original_type`); None for a plain upload (no `original_filename`)."""
    filename = fields.get("original_filename")
    subfolder = fields.get("original_subfolder", "")
    folder_type = fields.get("original_type", "input")
    # Each is checked whenever it is given, with or without a filename.
    if filename is not None and not _UPLOAD_NAME.match(filename):
        raise BadRequest("original_filename must be a plain file name")
    if not _SUBFOLDER.match(subfolder):
        raise BadRequest("original_subfolder must be folder names separated by '/'")
    if folder_type not in _UPLOAD_TYPES:
        raise BadRequest(f"original_type must be one of {', '.join(_UPLOAD_TYPES)}")
    if filename is None:
        return None
    return {"filename": filename, "subfolder": subfolder, "type": folder_type}


async def comfyui_free(request: web.Request) -> web.Response:
    raw = await request.read()
    body = FreeRequest() if not raw else await read_model(request, FreeRequest)
    return _json(await request.app[SERVICE_KEY].free(body))


async def metrics(request: web.Request) -> web.Response:
    payload, content_type = render(request.app[REGISTRY_KEY])
    return web.Response(body=payload, headers={"Content-Type": content_type})


async def ollama_passthrough(request: web.Request) -> web.StreamResponse:
    """Forward `/api/*` and Ollama's OpenAI routes to Ollama, streaming the answer chunk by
    chunk as it arrives."""
    service = request.app[SERVICE_KEY]
    # Only /api/* may reach Ollama: a dot segment ("..", or "%2e%2e" once decoded) would let
    # the upstream URL climb out of it.
    if any(segment in (".", "..") for segment in request.path.split("/")):
        raise BadRequest("path must not contain '.' or '..' segments")
    body = await request.read()
    model = _occupied_model(request, body)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_HEADERS}
    ollama = service.ollama
    # The path as the client spelled it, escapes and all: decoded, a %1F would be a control
    # character no URL may hold, and a %2F a separator it never was.
    url = URL(ollama.base_url + request.rel_url.raw_path_qs, encoded=True)
    session = request.app[PASSTHROUGH_KEY]
    with service.track_request(model):
        try:
            # Until Ollama's headers: the first byte may wait for a model load.
            async with asyncio.timeout(ollama.load_timeout_s):
                upstream = await session.request(
                    request.method, url, data=body, headers=headers, allow_redirects=False
                )
        except TimeoutError as exc:
            raise OllamaUnavailable(
                f"Ollama did not answer {request.method} {request.path} in time "
                f"({type(exc).__name__}; load timeout {ollama.load_timeout_s:g} s)"
            ) from exc
        except aiohttp.ClientError as exc:
            raise OllamaUnavailable(f"cannot reach Ollama: {exc!r}") from exc
        try:
            return await _relay(request, upstream)
        finally:
            # Back to the pool when Ollama's answer was read to its end, else closed: that
            # tells Ollama to stop generating for a client that went away.
            upstream.release()


async def _relay(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    """Send Ollama's answer on to the client, each piece as soon as it arrives.

    An answer complete at its first read (a non-streamed request, a short stream) goes out as
    one plain response, headers and body in one write; a longer one is streamed, its last
    piece sent together with the end of the stream."""
    stream = upstream.content
    try:
        first = await stream.readany()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise OllamaUnavailable(
            f"Ollama's answer broke off before its first byte: {exc!r}"
        ) from exc
    whole = stream.at_eof()
    response: web.StreamResponse
    if whole:
        response = web.Response(status=upstream.status, body=first)
    else:
        response = web.StreamResponse(status=upstream.status)
    # The body goes through as Ollama sent it, so it keeps its encoding too.
    for name in ("Content-Type", "Content-Encoding"):
        if name in upstream.headers:
            response.headers[name] = upstream.headers[name]
    try:
        await response.prepare(request)
        if whole:
            await response.write_eof()
            return response
        await response.write(first)
        last = b""
        try:
            async for chunk in stream.iter_any():
                if stream.at_eof():
                    last = chunk  # sent with the end of the stream, in one write
                    break
                await response.write(chunk)
        except ConnectionResetError:
            raise  # a write to our client: it went away (below)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Headers are gone already; end the stream the way Ollama reports a late error.
            log.warning("Ollama stream broke: %r", exc)
            last = (json.dumps({"error": f"upstream stream broke: {exc!r}"}) + "\n").encode()
        await response.write_eof(last)
    except ConnectionResetError:
        # The client hung up. Closing the upstream stream (by the caller) tells Ollama to stop
        # generating for it, and the request stops counting as in flight.
        log.info("client of %s %s went away mid-stream", request.method, request.path)
    return response


async def _passthrough_session(app: web.Application) -> AsyncIterator[None]:
    """The pass-through's connections to Ollama (aiohttp's client: less work a request than
    the agent's httpx client, which its own calls keep), open while the app runs."""
    ollama = app[SERVICE_KEY].ollama
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=ollama.request_timeout_s,  # a free connection, or a new one, this soon
        sock_read=ollama.load_timeout_s,  # each read of a stream, the first after a load
    )
    connector = aiohttp.TCPConnector(limit=PASSTHROUGH_MAX_CONNECTIONS)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False, trust_env=False
    ) as session:
        app[PASSTHROUGH_KEY] = session
        yield


def _occupied_model(request: web.Request, body: bytes) -> str | None:
    """The model a pass-through request occupies while it runs: from `X-GPU-Model` when the
    controller sent it, else from the body; None for a route that names no model."""
    if request.path not in _MODEL_ROUTES:
        return None
    named = request.headers.get(MODEL_HEADER, "").strip()
    if named:
        return named
    if not body:
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return None  # Ollama itself answers malformed bodies with its own 400
    if isinstance(parsed, dict) and isinstance(parsed.get("model"), str):
        return str(parsed["model"])
    return None


def create_app(
    service: AgentService,
    *,
    token: str | None,
    max_body_bytes: int,
    max_upload_bytes: int = 32 * 1024 * 1024,
    allowed_hosts: Iterable[str] = (),
    bind_host: str | None = None,
) -> web.Application:
    """The agent's aiohttp application. The caller owns `service`'s lifecycle.

    `allowed_hosts` and `bind_host` widen the names a request's Host and Origin may carry
    (`gpu_common.hosts.HostPolicy`).
    """
    policy = HostPolicy(allowed_hosts, bind_host=bind_host)
    app = web.Application(
        client_max_size=max_body_bytes,
        middlewares=[
            error_middleware("agent"),
            host_check_middleware(policy),
            auth_middleware(token),
        ],
    )
    app[SERVICE_KEY] = service
    app[MAX_UPLOAD_KEY] = max_upload_bytes
    app[REGISTRY_KEY] = make_registry(service)
    app[EVENT_STREAMS_KEY] = weakref.WeakSet()
    app.on_shutdown.append(_close_event_streams)
    app.cleanup_ctx.append(_passthrough_session)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/events", events)
    app.router.add_post("/v1/ollama/load", ollama_load)
    app.router.add_post("/v1/ollama/unload", ollama_unload)
    app.router.add_post("/v1/comfyui/prompts", submit_prompt)
    app.router.add_get("/v1/comfyui/prompts/{prompt_id}", get_prompt)
    app.router.add_delete("/v1/comfyui/prompts/{prompt_id}", cancel_prompt)
    app.router.add_get("/v1/comfyui/prompts/{prompt_id}/outputs/{index}", get_output)
    app.router.add_post("/v1/comfyui/uploads", comfyui_upload)
    app.router.add_post("/v1/comfyui/free", comfyui_free)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/api/{tail:.*}", ollama_passthrough)
    for path in OPENAI_POST_ROUTES:
        app.router.add_post(path, ollama_passthrough)
    app.router.add_get("/v1/models", ollama_passthrough, allow_head=False)
    app.router.add_get("/v1/models/{model:.+}", ollama_passthrough, allow_head=False)
    add_openapi_route(
        app,
        ROUTE_DOCS,
        title="gpu-agent",
        version=__version__,
        description="The GPU desktop's agent: telemetry, Ollama and ComfyUI control.",
        token_required=token is not None,
    )
    return app


_PROMPT_ID_PARAM = Param("prompt_id", {"type": "string", "pattern": _PROMPT_ID.pattern})
_OUTPUT_INDEX_PARAM = Param(
    "index",
    {"type": "integer", "minimum": 0, "maximum": _MAX_OUTPUT_INDEX},
    description="0 for the first output; an index the prompt does not have answers 404",
)
# The websocket handshake (RFC 6455 4.1): without it, `/v1/events` answers 400.
_WEBSOCKET_HEADERS = (
    Param("Upgrade", {"type": "string", "const": "websocket"}, location="header"),
    Param(
        "Connection",
        {"type": "string", "pattern": "[Uu][Pp][Gg][Rr][Aa][Dd][Ee]"},
        location="header",
    ),
    Param("Sec-WebSocket-Version", {"type": "string", "const": "13"}, location="header"),
    Param(
        "Sec-WebSocket-Key",
        {"type": "string", "pattern": "^[A-Za-z0-9+/]{22}==$"},
        location="header",
    ),
)

ROUTE_DOCS: dict[tuple[str, str], RouteDoc] = {
    ("GET", "/healthz"): RouteDoc(
        "Liveness and telemetry status", response=AgentHealth, public=True, errors=()
    ),
    ("GET", OPENAPI_PATH): RouteDoc("This document", public=True, errors=()),
    ("GET", "/v1/status"): RouteDoc("One snapshot of the desktop", response=AgentStatus, errors=()),
    ("GET", "/v1/events"): RouteDoc(
        "Websocket: every message is an AgentEvent (snapshots, prompt and model events)",
        response=AgentEvent,
        status=101,
        errors=(400,),
        params=_WEBSOCKET_HEADERS,
    ),
    ("POST", "/v1/ollama/load"): RouteDoc(
        "Load a model; answers once it is resident",
        request=LoadRequest,
        response=LoadResult,
        errors=(400, 404, 502, 503),
    ),
    ("POST", "/v1/ollama/unload"): RouteDoc(
        "Unload a model; answers once NVML shows the memory back",
        request=UnloadRequest,
        response=UnloadResult,
        errors=(400, 404, 409, 502, 503, 504),
    ),
    ("POST", "/v1/comfyui/prompts"): RouteDoc(
        "Queue a workflow on ComfyUI (idempotent on prompt_id); a workflow ComfyUI refuses "
        "answers 400 with its node_errors",
        request=PromptSubmit,
        response=PromptInfo,
        status=202,
        errors=(400, 502, 503),
    ),
    ("GET", "/v1/comfyui/prompts/{prompt_id}"): RouteDoc(
        "A prompt's state; one this agent process never saw is looked up in ComfyUI",
        response=PromptInfo,
        errors=(400, 404, 502, 503),
        params=(_PROMPT_ID_PARAM,),
    ),
    ("DELETE", "/v1/comfyui/prompts/{prompt_id}"): RouteDoc(
        "Cancel a prompt",
        response=PromptInfo,
        errors=(400, 404, 502, 503),
        params=(_PROMPT_ID_PARAM,),
    ),
    ("GET", "/v1/comfyui/prompts/{prompt_id}/outputs/{index}"): RouteDoc(
        "The n-th output file of a prompt, with ComfyUI's content type",
        content_type="*/*",
        errors=(400, 404, 502, 503),
        params=(_PROMPT_ID_PARAM, _OUTPUT_INDEX_PARAM),
    ),
    ("POST", "/v1/comfyui/uploads"): RouteDoc(
        "Upload a picture to ComfyUI with its semantics (a name taken by another file becomes "
        "'name (1).ext'; the same file again keeps its name); with original_filename, onto "
        "that original as its alpha channel (ComfyUI's /upload/mask)",
        response=UploadResult,
        errors=(400, 413, 502, 503),
        form={
            "type": "object",
            "required": ["image"],
            "additionalProperties": False,
            "properties": {
                "image": {"type": "string", "contentMediaType": "application/octet-stream"},
                "type": {"type": "string", "enum": list(_UPLOAD_TYPES)},
                "subfolder": {"type": "string", "pattern": _SUBFOLDER.pattern},
                "overwrite": {"type": "string", "enum": ["true", "false"]},
                "original_filename": {
                    "type": "string",
                    "pattern": _UPLOAD_NAME.pattern,
                    "description": "a mask: the picture it is painted onto",
                },
                "original_subfolder": {"type": "string", "pattern": _SUBFOLDER.pattern},
                "original_type": {"type": "string", "enum": list(_UPLOAD_TYPES)},
            },
        },
    ),
    ("POST", "/v1/comfyui/free"): RouteDoc(
        "Free ComfyUI's memory; answers once it is released (empty body: free everything)",
        request=FreeRequest,
        request_optional=True,
        response=FreeResult,
        errors=(400, 502, 503, 504),
    ),
    ("GET", "/metrics"): RouteDoc(
        "Prometheus metrics", content_type="text/plain; version=0.0.4", errors=()
    ),
    ("*", "/api/{tail}"): RouteDoc(
        "Ollama's own API, passed through and streamed: Ollama's statuses and bodies as it "
        "sends them; 400 for a '.' or '..' segment, 503 when Ollama cannot be reached",
        content_types=("application/json", "application/x-ndjson"),
        errors=(400, 413, 503),
        params=(
            Param(
                "tail",
                {"type": "string", "not": {"pattern": _DOT_SEGMENT}},
                description="the path under /api/; no '.' or '..' segment",
            ),
        ),
        passthrough=True,
    ),
    **{
        ("POST", path): RouteDoc(
            f"Ollama's OpenAI-compatible {path}, passed through and streamed (SSE when asked): "
            "Ollama's statuses and bodies as it sends them; 503 when Ollama cannot be reached",
            request=request,
            content_types=("application/json", "text/event-stream"),
            errors=(400, 413, 503),
            passthrough=True,
        )
        for path, request in OPENAI_POST_ROUTES.items()
    },
    ("GET", "/v1/models"): RouteDoc(
        "Ollama's OpenAI-compatible model list, passed through",
        response=OpenAIModelList,
        errors=(503,),
        passthrough=True,
    ),
    ("GET", "/v1/models/{model}"): RouteDoc(
        "One model in OpenAI's shape, passed through (404 for a model Ollama lacks)",
        response=OpenAIModel,
        errors=(404, 503),
        passthrough=True,
        params=(Param("model", {"type": "string", "not": {"pattern": _DOT_SEGMENT}}),),
    ),
}


__all__ = ["ComfyUIError", "create_app"]
