"""Which error shape each route family answers with, and the bodies (shared value layer).

Clients of each API family expect errors in their own convention, so a route's family, read
from its path, decides the shape of every error it answers, whatever raised it:

    /api/*                                 Ollama's: {"error": "message"}
    /v1/chat/completions, /v1/completions,  OpenAI's: {"error": {"message", "type", "param",
    /v1/embeddings, /v1/models[/...]                  "code"}}
    everything else                        ours: {"error": {"code", "message", "details"?}}

Ollama's JavaScript client would print `[object Object]` for our shape, and OpenAI's SDKs read
`error.message`. Our `code` is kept on the OpenAI shape (its `code` field takes a string) and,
for every shape, in the `X-GPU-Error` header, so a program can still act on it.
"""

from __future__ import annotations

from typing import Any, Literal

ErrorShape = Literal["service", "ollama", "openai"]

ERROR_CODE_HEADER = "X-GPU-Error"
"""Names the service's own error `code` on every error answer it renders itself; an answer
passed through from Ollama has none, which is how a caller tells the two apart."""

OLLAMA_PREFIX = "/api/"
OPENAI_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"}
)
"""The OpenAI-compatible routes Ollama serves under `/v1` (plus `/v1/models/{model}`)."""
_OPENAI_MODEL_PREFIX = "/v1/models/"


def error_shape(path: str) -> ErrorShape:
    """The error convention of the route family `path` belongs to."""
    if path.startswith(OLLAMA_PREFIX) or path == "/api":
        return "ollama"
    if path in OPENAI_PATHS or path.startswith(_OPENAI_MODEL_PREFIX):
        return "openai"
    return "service"


def openai_error_type(status: int) -> str:
    """The `type` of an OpenAI error body for `status`, as Ollama's compatibility layer sets it."""
    if status == 400:
        return "invalid_request_error"
    if status == 404:
        return "not_found_error"
    return "api_error"


def error_body(
    shape: ErrorShape,
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON body of an error in `shape`. `details` travel only in our own shape."""
    if shape == "ollama":
        return {"error": message}
    if shape == "openai":
        return {
            "error": {
                "message": message,
                "type": openai_error_type(status),
                "param": None,
                "code": code,
            }
        }
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return {"error": body}
