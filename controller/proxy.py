"""Handing a placed LLM request to its agent and its answer back (adapter layer).

The Ollama routes and the OpenAI routes share this: the request body, parsed once by the route,
gets the chosen model and is serialised once; the agent learns the model from `X-GPU-Model` and
passes the bytes on unread. The answer streams back chunk by chunk (NDJSON or SSE, whatever the
agent sends), or goes out in one write when it is complete at its first read, with headers that
name the choice (`X-GPU-Model`, `X-GPU-Agent`, `X-GPU-Reason`). Errors Ollama answers pass
through as they are, in the route's own convention, since the agent forwards each family to its
matching Ollama route.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from controller.errors import AgentError
from controller.llm import LlmRouter, Route
from gpu_common.error_shapes import OPENAI_PATHS

# Keep the final NDJSON line of a stream for learning; a line longer than this is not kept.
_MAX_FINAL_LINE = 4 * 1024 * 1024


def header_text(text: str, limit: int = 400) -> str:
    """`text` as a header value: ASCII only, at most `limit` characters."""
    return text.encode("ascii", "replace").decode()[:limit]


async def relay(
    request: web.Request,
    router: LlmRouter,
    route: Route,
    path: str,
    body: dict[str, Any],
    *,
    learn: bool = True,
) -> web.StreamResponse:
    """Send `body` (a JSON object) for `route` to `path` on its agent and stream the answer
    to `request`'s client; releases the route. With `learn`, the answer is Ollama's NDJSON or
    JSON and its final line teaches the router the model's speeds."""
    try:
        body["model"] = route.model
        # Parsed once by the route and serialised once here; the agent learns the model from
        # the header and passes the bytes on unread.
        forwarded = json.dumps(body).encode()
        async with route.link.ollama_stream(path, forwarded, model=route.model) as upstream:
            pieces = upstream.aiter_raw()
            first = await anext(pieces, b"")
            final = _FinalLine(first) if learn else None
            # An answer complete at its first read (not streamed, or short) goes out as one
            # plain response, headers and body in one write; a longer one is streamed.
            whole = upstream.complete
            response: web.StreamResponse
            if whole:
                response = web.Response(status=upstream.status_code, body=first)
            else:
                response = web.StreamResponse(status=upstream.status_code)
            content_type = upstream.headers.get("Content-Type", "application/json")
            response.content_type = content_type.split(";")[0]
            response.headers["X-GPU-Model"] = route.model
            response.headers["X-GPU-Agent"] = route.agent
            response.headers["X-GPU-Reason"] = header_text(route.reason)
            last = b""
            if not whole:
                await response.prepare(request)
                await response.write(first)
                try:
                    async for chunk in pieces:
                        if final is not None:
                            final.feed(chunk)
                        if upstream.complete:
                            last = chunk  # sent with the end of the stream, in one write
                            break
                        await response.write(chunk)
                except AgentError as exc:
                    # The status line is out: the stream ends with an error in its own format,
                    # as Ollama ends a generation that fails midway.
                    final = None
                    last = stream_error(path, f"the answer broke off: {exc}")
            # The model is free once the answer is complete: release before the caller sees
            # the end, or its next request could find the model still counted as busy.
            router.release(route)
            await response.prepare(request)
            await response.write_eof(last)
        learned = final.value() if final is not None else None
        if upstream.status_code == 200 and learned is not None:
            await router.record(route, learned)
        return response
    finally:
        router.release(route)


def stream_error(path: str, message: str) -> bytes:
    """The last piece of a stream that failed after its headers went out: an SSE error event
    on the OpenAI routes, else an NDJSON `{"error": ...}` line as Ollama writes it."""
    if path in OPENAI_PATHS:
        error = {"message": message, "type": "api_error", "param": None, "code": None}
        return b"data: " + json.dumps({"error": error}).encode() + b"\n\n"
    return json.dumps({"error": message}).encode() + b"\n"


class _FinalLine:
    """The last NDJSON line of an answer fed piece by piece: Ollama's final line, with the
    counters the speeds are learned from. A line longer than `_MAX_FINAL_LINE` is not kept."""

    def __init__(self, first: bytes = b"") -> None:
        self._line = b""
        self._partial = b""
        self.feed(first)

    def feed(self, piece: bytes) -> None:
        partial = self._partial + piece
        if b"\n" in partial:
            *complete, partial = partial.split(b"\n")
            self._line = next((line for line in reversed(complete) if line.strip()), self._line)
        self._partial = partial if len(partial) <= _MAX_FINAL_LINE else b""

    def value(self) -> dict[str, Any] | None:
        """The last line as a JSON object; None when it is not one."""
        line = self._partial if self._partial.strip() else self._line
        try:
            value = json.loads(line) if line else {}
        except ValueError:
            return None
        return value if isinstance(value, dict) else None
