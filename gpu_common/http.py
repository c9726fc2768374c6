"""What both services' HTTP layers share: the error middleware, bearer auth, strict JSON parsing.

Every failure a route raises becomes a JSON error here (`error_middleware`), so a handler only
raises; the route's family decides the shape (`gpu_common.error_shapes`: Ollama's on `/api/*`,
OpenAI's on the OpenAI routes, ours elsewhere). Parsing is stricter than `json.loads` where a
lax parse would fail later, far from the request.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import BaseModel, ValidationError

from gpu_common.error_shapes import ERROR_CODE_HEADER, ErrorShape, error_body, error_shape
from gpu_common.errors import BadRequest, PayloadTooLarge, ServiceError, Unauthorized
from gpu_common.openapi import OPENAPI_PATH
from gpu_common.schema import MAX_WORKFLOW_NODES as MAX_WORKFLOW_NODES

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
M = TypeVar("M", bound=BaseModel)

PUBLIC_PATHS = frozenset({"/healthz", OPENAPI_PATH})
"""Routes that answer without a token: liveness, and the description of the API."""

# What can put a lone UTF-16 surrogate in a parsed string: a `\\ud800`-style escape, or raw
# surrogate bytes, which `json.loads` decodes with "surrogatepass" (in UTF-8, ED A0..ED BF; a NUL
# byte means UTF-16 or UTF-32). Only bodies containing one of these need the walk over the value.
_MAY_HOLD_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]|\x00")


def error_response(
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    *,
    shape: ErrorShape = "service",
) -> web.Response:
    """An error answer in `shape` (ours by default: `{"error": {"code", "message", "details"?}}`),
    its `code` also in the `X-GPU-Error` header."""
    response = web.json_response(error_body(shape, status, code, message, details), status=status)
    response.headers[ERROR_CODE_HEADER] = code
    return response


def error_middleware(service: str) -> Middleware:
    """The one place where any failure becomes a JSON error, in the shape of the route's family
    (`gpu_common.error_shapes.error_shape`).

    A `ServiceError` carries its `code`, HTTP status, `details()` and `headers()`; aiohttp's own
    HTTP errors keep their status; anything else is a 500 that points at `service`'s log.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        shape = error_shape(request.path)
        try:
            return await handler(request)
        except ServiceError as exc:
            response = error_response(
                exc.http_status, exc.code, str(exc), exc.details(), shape=shape
            )
            response.headers.update(exc.headers())
            return response
        except web.HTTPRequestEntityTooLarge as exc:
            return error_response(
                413, PayloadTooLarge.code, f"body too large: {exc.text}", shape=shape
            )
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
            message = (
                exc.reason if exc.status != 404 else f"no route for {request.method} {request.path}"
            )
            response = error_response(exc.status, code, message, shape=shape)
            if "Allow" in exc.headers:
                # A 405 must say which methods the route does take (RFC 9110, 15.5.6).
                response.headers["Allow"] = exc.headers["Allow"]
            return response
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unexpected error serving %s %s", request.method, request.path)
            return error_response(
                500, "internal", f"internal error; see the {service}'s log", shape=shape
            )

    return middleware


def token_matches(given: str, expected: bytes) -> bool:
    """Whether the `Authorization` value `given` equals `expected`, in constant time.

    Both sides are hashed first, so the comparison sees two 32-byte values whatever the
    lengths: the time depends neither on how much of the token is right nor on its length.
    """
    given_digest = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
    return hmac.compare_digest(given_digest, hashlib.sha256(expected).digest())


def auth_middleware(
    token: str | None,
    *,
    public_paths: Collection[str] = PUBLIC_PATHS,
    own_auth_prefixes: tuple[str, ...] = (),
) -> Middleware:
    """aiohttp middleware requiring `Authorization: Bearer <token>` outside `public_paths`.

    Paths under `own_auth_prefixes` are left to their own authentication (a browser UI that
    exchanges the token for a session cookie once, so it never travels in a URL)."""
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (
            expected is not None
            and request.path not in public_paths
            and not (own_auth_prefixes and request.path.startswith(own_auth_prefixes))
            and not token_matches(request.headers.get("Authorization", ""), expected)
        ):
            raise Unauthorized("missing or wrong bearer token")
        return await handler(request)

    return middleware


def _reject_constant(name: str) -> Any:
    # JSON has no NaN or Infinity; Python's parser accepts them, and they would travel on.
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> Any:
    """The JSON value in `raw`, or BadRequest saying why not.

    Stricter than `json.loads` where a lax parse would fail later, far from the request:
    no NaN or Infinity, no unpaired UTF-16 surrogates (they cannot be stored or re-encoded as
    UTF-8), and nesting too deep to walk is an error, not a crash.
    """
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
        if _MAY_HOLD_SURROGATE.search(raw):
            _check_surrogates(data)
    except RecursionError as exc:
        raise BadRequest("body is nested too deeply") from exc
    except UnicodeEncodeError as exc:
        raise BadRequest("body has a string that is not valid Unicode (a lone surrogate)") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from exc
    return data


def _check_surrogates(value: Any) -> None:
    """Raise UnicodeEncodeError if any string in `value` (keys included) is not valid UTF-8."""
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, dict):
        for key, item in value.items():
            key.encode("utf-8")
            _check_surrogates(item)
    elif isinstance(value, list):
        for item in value:
            _check_surrogates(item)


def validate(data: Any, model: type[M]) -> M:
    """`data` (already parsed) as `model`, or a BadRequest naming each bad field."""
    try:
        return model.model_validate(data)
    except RecursionError as exc:
        raise BadRequest("body is nested too deeply") from exc
    except ValidationError as exc:
        errors = exc.errors()
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])[:100] or 'body'}: {err['msg']}"
            for err in errors[:10]
        )
        more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
        raise BadRequest(f"invalid {model.__name__}: {problems}{more}") from exc


async def read_model(request: web.Request, model: type[M]) -> M:
    """Parse the JSON body into `model`, or raise a 400 that says what is wrong."""
    raw = await request.read()
    if not raw:
        raise BadRequest("missing request body")
    return validate(parse_json(raw), model)


def check_workflow(workflow: dict[str, Any]) -> None:
    """BadRequest when `workflow` has more than `MAX_WORKFLOW_NODES` nodes, or a node that is
    not an object (API format: node id -> {"class_type", "inputs"}); ComfyUI itself answers
    such a node with a 500."""
    if len(workflow) > MAX_WORKFLOW_NODES:
        raise BadRequest(
            f"workflow has {len(workflow)} nodes; at most {MAX_WORKFLOW_NODES} are accepted"
        )
    for node_id, node in workflow.items():
        if not isinstance(node, dict):
            raise BadRequest(
                f"workflow node {node_id!r} is {type(node).__name__}, not an object with "
                f"class_type and inputs (ComfyUI's API format)"
            )
