"""OpenAPI 3.1 documents for both HTTP APIs (adapter layer), from the route table and the models.

Each API keeps one table, `{(method, path): RouteDoc}`, beside its routes; `add_openapi_route`
walks the application's router, takes the schemas from the pydantic wire models
(`model_json_schema` via `models_json_schema`, so shared models appear once under
`components.schemas`) and serves the document at `GET /openapi.json`. A route without an entry in
the table is an error when the application is built, so the document cannot fall behind the API.

The document is a contract a client (or a property-based tester) can hold the services to: every
constraint a route checks is in its schemas (patterns, lengths, limits, strict types), and every
status it can answer is listed, with the headers that come with it (`Retry-After`). A route's
error bodies are in the shape of its family, read from its path by the same function the error
middleware uses (`gpu_common.error_shapes.error_shape`): Ollama's on `/api/*`, OpenAI's on the
OpenAI routes, ours elsewhere.

`/openapi.json` needs no token: it describes the API, not any state of the machine. The Host and
Origin checks still apply to it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from gpu_common.error_shapes import ERROR_CODE_HEADER, ErrorShape, error_shape
from gpu_common.schema import ErrorResponse, OllamaErrorResponse, OpenAIErrorResponse

__all__ = [
    "OPENAPI_PATH",
    "Param",
    "RouteDoc",
    "add_openapi_route",
    "api_routes",
    "build_openapi",
]

OPENAPI_PATH = "/openapi.json"

# Methods an aiohttp "*" route is documented with (OpenAPI has no wildcard method).
_ANY_METHODS = ("get", "post", "put", "patch", "delete")
_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")
_REF_TEMPLATE = "#/components/schemas/{model}"
_ERROR_TEXT = {
    400: "Malformed or invalid request",
    401: "Missing or wrong bearer token",
    403: "Host or Origin not allowed",
    404: "No such route or resource",
    405: "Method not allowed on this route",
    409: "The current state forbids it",
    413: "Body larger than max_body_bytes",
    422: "The Idempotency-Key was used with a different request",
    500: "Unexpected failure",
    502: "The upstream server failed",
    503: "Unavailable now; see Retry-After where given",
    504: "The GPU memory did not come back in time",
}
# Every route can answer these, whatever its table entry says.
_ALWAYS = (403, 405, 500)
# Statuses Ollama itself answers on its API, which a route passing Ollama through hands on as
# they are: its JSON errors, and gin's plain-text 404 and 405 for a path or method it lacks.
# 503 is Ollama's "server busy" when its queue is full.
_OLLAMA_STATUSES = (400, 404, 405, 500, 503)
_OLLAMA_TEXT_STATUSES = (404, 405)
_RETRY_AFTER = {
    "description": "Seconds after which to ask again (delay-seconds, RFC 9110 10.2.3)",
    "required": False,
    "schema": {"type": "integer", "minimum": 1},
}


@dataclass(frozen=True)
class Param:
    """One documented parameter: a path parameter's schema (pattern, bounds), or a header.

    Path parameters the table does not describe are documented as any string.
    """

    name: str
    schema: Mapping[str, Any]
    location: Literal["path", "header", "query"] = "path"
    required: bool = True
    description: str = ""


@dataclass(frozen=True)
class RouteDoc:
    """How one route is documented.

    `request`: the JSON body model, if any. `response`: the success body model; without one, the
    success body is `content_type` (a stream, a file, Prometheus text), or any of
    `content_types` when it can be several. `public`: no token needed. `errors`: the statuses it
    answers with an `ErrorResponse`, beyond 403, 405 and 500 (and 400 and 413 with a body, 401
    with a token). `params`: schemas of its path parameters and the headers it reads.
    `retry_after`: the statuses whose answers may carry `Retry-After`. `form`: the JSON Schema
    of a `multipart/form-data` body the route takes (besides `request`'s JSON, if any).
    `passthrough`: it hands on whatever Ollama answers, Ollama's own statuses and gin's
    plain-text 404 and 405 included. The shape of its error bodies follows from its path
    (`gpu_common.error_shapes`).
    """

    summary: str
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    content_type: str = "application/json"
    content_types: tuple[str, ...] = ()
    public: bool = False
    errors: tuple[int, ...] = (400, 404)
    request_optional: bool = False
    tags: tuple[str, ...] = field(default_factory=tuple)
    params: tuple[Param, ...] = ()
    retry_after: tuple[int, ...] = ()
    passthrough: bool = False
    form: Mapping[str, Any] | None = None


def api_routes(app: web.Application) -> Iterator[web.AbstractRoute]:
    """Every route of `app`'s own API, in router order. A sub-application's routes (a browser
    UI mounted under a prefix, with its own authentication) are not part of the API."""
    for resource in app.router.resources():
        if isinstance(resource, web.PrefixedSubAppResource):
            continue
        yield from resource


def _route_keys(app: web.Application) -> list[tuple[str, str, str]]:
    """(method, OpenAPI path, table path) for every API route, HEAD left out, in router order."""
    keys: list[tuple[str, str, str]] = []
    for route in api_routes(app):
        if route.method == "HEAD" or route.resource is None:
            continue
        path = route.resource.canonical
        methods = _ANY_METHODS if route.method == "*" else (route.method.lower(),)
        keys.extend((method, _PARAM.sub(r"{\1}", path), path) for method in methods)
    return keys


_ERROR_MODELS: Mapping[ErrorShape, type[BaseModel]] = {
    "service": ErrorResponse,
    "ollama": OllamaErrorResponse,
    "openai": OpenAIErrorResponse,
}
_ERROR_CODE = {
    "description": "The service's own error code (absent on an answer passed through from Ollama)",
    "required": False,
    "schema": {"type": "string"},
}


def _schemas(docs: Mapping[tuple[str, str], RouteDoc]) -> tuple[dict[Any, str], dict[str, Any]]:
    """Refs per (model, mode) and the component schemas, every model listed once."""
    wanted: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {}
    for _, path in docs:
        wanted[(_ERROR_MODELS[error_shape(path)], "validation")] = None
    for doc in docs.values():
        if doc.request is not None:
            wanted[(doc.request, "validation")] = None
        if doc.response is not None:
            wanted[(doc.response, "serialization")] = None
    refs, top = models_json_schema(list(wanted), ref_template=_REF_TEMPLATE)
    return {key: value["$ref"] for key, value in refs.items()}, top.get("$defs", {})


def _error_response(status: int, schema: dict[str, Any], plain_text: bool) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if plain_text:
        content["text/plain"] = {"schema": {"type": "string"}}
    return {"description": _ERROR_TEXT.get(status, "Error"), "content": content}


def _parameters(path: str, doc: RouteDoc) -> list[dict[str, Any]]:
    """Every path parameter of `path` (in order) and every header `doc` names."""
    described = {param.name: param for param in doc.params}
    parameters: list[dict[str, Any]] = []
    for name in _PARAM.findall(path):
        param = described.pop(name, None) or Param(name, {"type": "string"})
        parameters.append(_parameter(param))
    parameters.extend(_parameter(param) for param in described.values())
    return parameters


def _parameter(param: Param) -> dict[str, Any]:
    parameter: dict[str, Any] = {
        "name": param.name,
        "in": param.location,
        "required": True if param.location == "path" else param.required,
        "schema": dict(param.schema),
    }
    if param.description:
        parameter["description"] = param.description
    return parameter


def _operation(
    method: str,
    path: str,
    doc: RouteDoc,
    refs: Mapping[Any, str],
    token_required: bool,
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": doc.summary,
        "operationId": f"{method}_{re.sub(r'[^A-Za-z0-9]+', '_', path).strip('_') or 'root'}",
    }
    if doc.tags:
        operation["tags"] = list(doc.tags)
    parameters = _parameters(path, doc)
    if parameters:
        operation["parameters"] = parameters
    content: dict[str, Any] = {}
    if doc.request is not None:
        content["application/json"] = {"schema": {"$ref": refs[(doc.request, "validation")]}}
    if doc.form is not None:
        content["multipart/form-data"] = {"schema": dict(doc.form)}
    if content:
        operation["requestBody"] = {"required": not doc.request_optional, "content": content}
    success: dict[str, Any] = {"description": doc.summary}
    if doc.response is not None:
        schema = {"$ref": refs[(doc.response, "serialization")]}
        success["content"] = {"application/json": {"schema": schema}}
    else:
        success["content"] = {kind: {} for kind in doc.content_types or (doc.content_type,)}
    if doc.status in doc.retry_after:
        success["headers"] = {"Retry-After": dict(_RETRY_AFTER)}
    responses: dict[str, Any] = {str(doc.status): success}
    errors = set(doc.errors) | set(_ALWAYS)
    if doc.request is not None or doc.form is not None:
        errors |= {400, 413}
    if token_required and not doc.public:
        errors.add(401)
    if doc.passthrough:
        errors |= set(_OLLAMA_STATUSES)
    error_schema = {"$ref": refs[(_ERROR_MODELS[error_shape(path)], "validation")]}
    for status in sorted(errors):
        plain_text = doc.passthrough and status in _OLLAMA_TEXT_STATUSES
        answer = _error_response(status, error_schema, plain_text)
        answer["headers"] = {ERROR_CODE_HEADER: dict(_ERROR_CODE)}
        if status in doc.retry_after:
            answer["headers"]["Retry-After"] = dict(_RETRY_AFTER)
        responses[str(status)] = answer
    operation["responses"] = responses
    if doc.public:
        operation["security"] = []
    return operation


def build_openapi(
    app: web.Application,
    docs: Mapping[tuple[str, str], RouteDoc],
    *,
    title: str,
    version: str,
    description: str,
    token_required: bool,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `app`'s routes as described by `docs`, keyed by
    (METHOD or "*", aiohttp path). Raises KeyError naming any route `docs` does not describe."""
    refs, components = _schemas(docs)
    paths: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    for method, path, table_path in _route_keys(app):
        doc = docs.get((method.upper(), table_path)) or docs.get(("*", table_path))
        if doc is None:
            missing.append(f"{method.upper()} {table_path}")
            continue
        operation = _operation(method, path, doc, refs, token_required)
        paths.setdefault(path, {})[method] = operation
    if missing:
        raise KeyError(f"routes without an OpenAPI entry: {', '.join(missing)}")
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": description},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
    if token_required:
        document["security"] = [{"bearer": []}]
    return document


def add_openapi_route(
    app: web.Application,
    docs: Mapping[tuple[str, str], RouteDoc],
    *,
    title: str,
    version: str,
    description: str,
    token_required: bool,
) -> None:
    """Add `GET /openapi.json` to `app` (call it after every other route). `docs` must
    describe the new route too: `("GET", OPENAPI_PATH)`. The document is built at the first
    request and kept: building it costs about a tenth of a second, which a service restarted
    often should not pay at every start."""
    built: list[dict[str, Any]] = []

    async def openapi(request: web.Request) -> web.Response:
        if not built:
            built.append(
                build_openapi(
                    request.app,
                    docs,
                    title=title,
                    version=version,
                    description=description,
                    token_required=token_required,
                )
            )
        return web.json_response(built[0])

    app.router.add_get(OPENAPI_PATH, openapi)
