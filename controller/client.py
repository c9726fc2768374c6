"""A typed async client for the studio's controller (client layer: what the studio's tools import).

One `StudioClient` speaks the controller's whole HTTP API: text generation through the
Ollama-compatible `/api/generate` and `/api/chat` (whole or streamed, with the controller's
choice of model, agent and reason read from its headers), image jobs under `/v1/images`
(submit, follow, fetch, cancel), and the `/v1/catalog`, `/v1/fleet` and `/healthz` views.

Errors form one tree; catch at the depth you care about:

    StudioError
    ├── StudioUnavailable     not reached, dropped, or a 5xx other than 503
    │   └── StudioTimeout     connect or read timed out, or a wait ran past its limit
    ├── StudioBusy            503: nothing can serve it within limits now (`retry_after_s`)
    ├── StudioRequestError    4xx, or an error line inside a stream (`status`, `code`, `message`)
    ├── StudioProtocolError   the answer is not what the API promises
    └── JobFailed             an awaited image job failed or was cancelled (`info`)

Retries are limited to what cannot do anything twice: reads (GET) and cancels, any request that
never reached the controller (connect errors), and generations answered 503 (refused before any
work began), which wait for the controller's `Retry-After`. A generation whose answer has begun
is never sent again, nor is an image submission the controller may have received.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import math
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Literal, TypeVar, overload
from urllib.parse import quote

import httpx
import pydantic
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from controller.schema import FleetInfo, ImageJobInfo, ModelsInfo
from gpu_common import clock
from gpu_common.error_shapes import ERROR_CODE_HEADER

log = logging.getLogger(__name__)

M = TypeVar("M", bound=pydantic.BaseModel)
Sleep = Callable[[float], Awaitable[None]]

FINAL_JOB_STATES = frozenset({"succeeded", "failed", "cancelled"})
# Backoff between retries the server gave no delay for: 0.1, 0.2, 0.4 ... at most 2 s.
_BACKOFF_FIRST_S = 0.1
_BACKOFF_MAX_S = 2.0
# wait(): pause before following a job's events again after the stream broke off.
_RESUBSCRIBE_S = 0.2
# Error messages quote at most this much of a body that is not the API's error shape.
_SNIPPET_CHARS = 300
# Connections to the controller, and how many of them stay open between requests.
MAX_CONNECTIONS = 256
MAX_KEEPALIVE_CONNECTIONS = 128
_DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    503: "unavailable",
}


# -- errors ---------------------------------------------------------------------------------


class StudioError(Exception):
    """Base of every error the client raises."""


class StudioUnavailable(StudioError):
    """The controller could not be reached, dropped the connection, or answered a 5xx (not 503).

    `reached_server` is False only when the request certainly never got there (the connection
    was not made), which is what makes a retry of a non-idempotent request safe. `status` and
    `code` are set when the controller did answer."""

    def __init__(
        self,
        message: str,
        *,
        reached_server: bool,
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.reached_server = reached_server
        self.status = status
        self.code = code


class StudioTimeout(StudioUnavailable):
    """Connecting or reading timed out, or a wait ran past its limit."""


class StudioBusy(StudioError):
    """503: nothing can serve the request within its limits now.

    `reason` is the controller's explanation; `retry_after_s` its `Retry-After` (None when it
    did not say)."""

    def __init__(self, reason: str, *, retry_after_s: float | None, code: str) -> None:
        suffix = f"; retry after {retry_after_s:g} s" if retry_after_s is not None else ""
        super().__init__(f"busy: {reason}{suffix}")
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.code = code


class StudioRequestError(StudioError):
    """The request cannot be served as asked: a 4xx answer, or an error line mid-stream (then
    `status` is the stream's own status, 200)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class StudioProtocolError(StudioError):
    """The controller's answer is not what its API promises (not JSON, wrong shape)."""


class JobFailed(StudioError):
    """An image job that was waited for ended failed or cancelled; `info` is its final state."""

    def __init__(self, info: ImageJobInfo) -> None:
        detail = info.error or info.reason
        super().__init__(f"image job {info.id} {info.state}: {detail}")
        self.info = info


# -- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """A finished generation. `model`, `agent` and `reason` are the controller's choice;
    token counts and durations come from Ollama's final line (0 when it omitted them)."""

    text: str
    model: str
    agent: str | None
    reason: str | None
    prompt_tokens: int
    output_tokens: int
    total_duration_s: float
    load_duration_s: float
    tokens_per_s: float | None
    done_reason: str | None


@dataclass(frozen=True)
class Chunk:
    """One piece of a streamed generation; the last has `done` set and `final` filled."""

    text: str
    done: bool
    model: str
    final: Generation | None


class _Retry(Enum):
    """Which failures a request may be sent again after."""

    UNSENT = "unsent"  # only when it never reached the controller
    IDEMPOTENT = "idempotent"  # also after timeouts, 5xx and 503: doing it twice is harmless
    GENERATION = "generation"  # also after 503, which refuses before any work begins


def _retryable(policy: _Retry, exc: BaseException) -> bool:
    if isinstance(exc, StudioUnavailable) and not exc.reached_server:
        return True
    if policy is _Retry.IDEMPOTENT:
        return isinstance(exc, StudioUnavailable | StudioBusy)
    if policy is _Retry.GENERATION:
        return isinstance(exc, StudioBusy)
    return False


def _retry_delay_s(attempt: int, exc: BaseException | None) -> float:
    """The server's `Retry-After` when it gave one, else exponential backoff."""
    if isinstance(exc, StudioBusy) and exc.retry_after_s is not None:
        return exc.retry_after_s
    return float(min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2 ** (attempt - 1)))


def _retry_after_s(value: str | None, now: datetime) -> float | None:
    """`Retry-After` as seconds from `now`: delay-seconds or an HTTP date (RFC 9110, 10.2.3)."""
    if value is None or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


# -- the single place where httpx's failures and error answers become ours -----------------


@contextlib.contextmanager
def _converted(what: str) -> Iterator[None]:
    """Turn httpx's exceptions into the client's tree. Only a failed connect proves that the
    controller never saw the request; after a write began, assume it did."""
    try:
        yield
    except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        raise StudioTimeout(f"{what}: could not connect in time", reached_server=False) from exc
    except httpx.TimeoutException as exc:
        raise StudioTimeout(
            f"{what}: timed out ({type(exc).__name__})", reached_server=True
        ) from exc
    except httpx.ConnectError as exc:
        raise StudioUnavailable(f"{what}: cannot connect: {exc}", reached_server=False) from exc
    except httpx.DecodingError as exc:
        raise StudioProtocolError(f"{what}: undecodable body: {exc}") from exc
    except httpx.TransportError as exc:
        raise StudioUnavailable(
            f"{what}: {type(exc).__name__}: {exc}", reached_server=True
        ) from exc


def _error_fields(payload: Any, default_code: str) -> tuple[str, str]:
    """(code, message) from the controller's `{"error": {"code", "message"}}` or Ollama's
    `{"error": "<message>"}`, which the controller passes through from an agent."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return str(error.get("code") or default_code), str(error.get("message") or "")
    if isinstance(error, str):
        return default_code, error
    return default_code, ""


def _error_from_response(response: httpx.Response, what: str) -> StudioError:
    """The error a finished non-2xx answer (body read) stands for."""
    status = response.status_code
    try:
        payload: Any = json.loads(response.content)
    except ValueError:
        payload = None
    code, message = _error_fields(payload, _DEFAULT_CODES.get(status, "http_error"))
    # The controller names its own code here too: on the Ollama routes the body cannot.
    code = response.headers.get(ERROR_CODE_HEADER) or code
    if not message:
        message = response.text[:_SNIPPET_CHARS].strip() or response.reason_phrase
    if status == 503:
        retry_after = _retry_after_s(response.headers.get("Retry-After"), clock.utc_now())
        return StudioBusy(message, retry_after_s=retry_after, code=code)
    if status >= 500:
        return StudioUnavailable(
            f"{what}: {status} {code}: {message}", reached_server=True, status=status, code=code
        )
    if status >= 400:
        return StudioRequestError(status, code, message)
    return StudioProtocolError(f"{what}: unexpected HTTP {status}")


def _decoded(response: httpx.Response, model: type[M], what: str) -> M:
    try:
        return model.model_validate_json(response.content)
    except pydantic.ValidationError as exc:
        raise StudioProtocolError(f"{what}: not a {model.__name__}: {exc}") from exc


def _json_object(raw: str | bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise StudioProtocolError(f"{what}: not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise StudioProtocolError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def _ollama_error_line(item: dict[str, Any]) -> bool:
    """Ollama ends a failed stream with a line carrying `error`; its chunks never carry one."""
    return item.get("error") is not None


def _envelope_error_line(item: dict[str, Any]) -> bool:
    """An error envelope alone on a line. Job states have an `error` field of their own."""
    return item.keys() == {"error"}


async def _ndjson(
    response: httpx.Response, what: str, is_error: Callable[[dict[str, Any]], bool]
) -> AsyncGenerator[dict[str, Any], None]:
    """The objects of an NDJSON body; a line that `is_error` raises StudioRequestError."""
    with _converted(what):
        async for line in response.aiter_lines():
            if not line.strip():
                continue
            item = _json_object(line, what)
            if is_error(item):
                code, message = _error_fields(item, "stream_error")
                raise StudioRequestError(response.status_code, code, message)
            yield item


# -- generations ----------------------------------------------------------------------------


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _seconds(nanoseconds: Any) -> float:
    return nanoseconds / 1e9 if isinstance(nanoseconds, int | float) and nanoseconds > 0 else 0.0


class _GenerationReader:
    """Folds Ollama's NDJSON lines into chunks and, on the `done` line, a `Generation`."""

    def __init__(self, kind: Literal["generate", "chat"], headers: httpx.Headers) -> None:
        self._kind = kind
        self._model = headers.get("X-GPU-Model")
        self._agent = headers.get("X-GPU-Agent")
        self._reason = headers.get("X-GPU-Reason")
        self._pieces: list[str] = []

    def _piece(self, line: dict[str, Any]) -> str:
        if self._kind == "chat":
            message = line.get("message")
            content = message.get("content") if isinstance(message, dict) else None
        else:
            content = line.get("response")
        return content if isinstance(content, str) else ""

    def read(self, line: dict[str, Any]) -> Chunk:
        piece = self._piece(line)
        self._pieces.append(piece)
        model = self._model or str(line.get("model") or "")
        if not line.get("done"):
            return Chunk(text=piece, done=False, model=model, final=None)
        output_tokens = _count(line.get("eval_count"))
        eval_s = _seconds(line.get("eval_duration"))
        done_reason = line.get("done_reason")
        final = Generation(
            text="".join(self._pieces),
            model=model,
            agent=self._agent,
            reason=self._reason,
            prompt_tokens=_count(line.get("prompt_eval_count")),
            output_tokens=output_tokens,
            total_duration_s=_seconds(line.get("total_duration")),
            load_duration_s=_seconds(line.get("load_duration")),
            tokens_per_s=output_tokens / eval_s if output_tokens and eval_s else None,
            done_reason=done_reason if isinstance(done_reason, str) else None,
        )
        return Chunk(text=piece, done=True, model=model, final=final)


async def _last_generation(chunks: AsyncGenerator[Chunk, None]) -> Generation:
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            if chunk.final is not None:
                return chunk.final
    raise StudioProtocolError("the generation stream ended without a final line")


def _generate_body(
    prompt: str, model: str, system: str | None, options: dict[str, Any] | None
) -> dict[str, Any]:
    # Always streamed: each read then waits only for the next piece, not the whole answer.
    body: dict[str, Any] = {"model": model, "prompt": prompt, "stream": True}
    if system is not None:
        body["system"] = system
    if options is not None:
        body["options"] = options
    return body


def _chat_body(
    messages: list[dict[str, Any]], model: str, options: dict[str, Any] | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
    if options is not None:
        body["options"] = options
    return body


def _constraint_headers(min_quality: float | None, max_latency_s: float | None) -> dict[str, str]:
    headers = {}
    if min_quality is not None:
        headers["X-GPU-Min-Quality"] = repr(float(min_quality))
    if max_latency_s is not None:
        headers["X-GPU-Max-Latency-S"] = repr(float(max_latency_s))
    return headers


# -- the client -----------------------------------------------------------------------------


class StudioClient:
    """The controller's API as typed calls. Use as `async with StudioClient(url) as studio:`.

    `timeout_s` limits each read (the wait for an answer, or for the next piece of a stream)
    and is the default limit of `ImageJob.wait`; `connect_timeout_s` limits connecting.
    `retries` is how many times a safe-to-repeat request is sent again; all retries of one call,
    `Retry-After` waits included, fit within `timeout_s`. `transport` replaces the network (tests
    pass `httpx.MockTransport`); `sleep` is how the client waits between retries.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, not {base_url!r}")
        if not (timeout_s > 0 and connect_timeout_s > 0):
            raise ValueError("timeouts must be positive")
        if retries < 0:
            raise ValueError("retries must be zero or more")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self._sleep = sleep
        headers = {"Accept": "application/json, application/x-ndjson"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            transport=transport,
            follow_redirects=False,
            # Room for 64 concurrent streams and more, each connection kept for the next.
            limits=httpx.Limits(
                max_connections=MAX_CONNECTIONS,
                max_keepalive_connections=MAX_KEEPALIVE_CONNECTIONS,
                keepalive_expiry=clock.http_keepalive_expiry_s(),
            ),
        )

    async def __aenter__(self) -> StudioClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections; the client cannot be used afterwards."""
        await self._http.aclose()

    # -- text ----------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str,
        *,
        model: str = "auto",
        system: str | None = None,
        options: dict[str, Any] | None = None,
        min_quality: float | None = None,
        max_latency_s: float | None = None,
    ) -> Generation:
        """Complete `prompt` with `model` (a name, or `auto`, `auto:fast`, `auto:quality`).

        `min_quality` (0-100) and `max_latency_s` constrain the controller's choice; when nothing
        meets them it answers 503 (`StudioBusy`)."""
        body = _generate_body(prompt, model, system, options)
        headers = _constraint_headers(min_quality, max_latency_s)
        return await _last_generation(self._generation("generate", body, headers))

    def generate_stream(
        self,
        prompt: str,
        *,
        model: str = "auto",
        system: str | None = None,
        options: dict[str, Any] | None = None,
        min_quality: float | None = None,
        max_latency_s: float | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        """`generate` piece by piece. The request is sent on the first iteration; close the
        iterator (`contextlib.aclosing`) if you stop early."""
        body = _generate_body(prompt, model, system, options)
        return self._generation("generate", body, _constraint_headers(min_quality, max_latency_s))

    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        model: str = "auto",
        options: dict[str, Any] | None = None,
        min_quality: float | None = None,
        max_latency_s: float | None = None,
    ) -> Generation:
        """The assistant's answer to `messages` (Ollama's `{"role", "content"}` objects)."""
        body = _chat_body(messages, model, options)
        headers = _constraint_headers(min_quality, max_latency_s)
        return await _last_generation(self._generation("chat", body, headers))

    def chat_stream(
        self,
        messages: list[dict[str, Any]],
        *,
        model: str = "auto",
        options: dict[str, Any] | None = None,
        min_quality: float | None = None,
        max_latency_s: float | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        """`chat` piece by piece; see `generate_stream`."""
        body = _chat_body(messages, model, options)
        return self._generation("chat", body, _constraint_headers(min_quality, max_latency_s))

    async def _generation(
        self, kind: Literal["generate", "chat"], body: dict[str, Any], headers: dict[str, str]
    ) -> AsyncGenerator[Chunk, None]:
        path = f"/api/{kind}"
        what = f"POST {path}"
        # Retries happen only while opening: once the answer has begun it is never asked again.
        response = await self._send("POST", path, _Retry.GENERATION, body=body, headers=headers)
        try:
            reader = _GenerationReader(kind, response.headers)
            async with contextlib.aclosing(_ndjson(response, what, _ollama_error_line)) as lines:
                async for line in lines:
                    chunk = reader.read(line)
                    yield chunk
                    if chunk.done:
                        return
            raise StudioUnavailable(f"{what}: the stream ended early", reached_server=True)
        finally:
            await response.aclose()

    # -- images --------------------------------------------------------------------------

    @overload
    async def generate_image(
        self,
        workflow: dict[str, Any],
        *,
        wait: Literal[False] = False,
        vram_bytes: int | None = None,
        priority: int = 0,
        timeout_s: float | None = None,
        idempotency_key: str | None = None,
        inputs: Mapping[str, bytes] | None = None,
        masks: Mapping[str, bytes] | None = None,
        mask_of: Mapping[str, str] | None = None,
    ) -> ImageJob: ...

    @overload
    async def generate_image(
        self,
        workflow: dict[str, Any],
        *,
        wait: Literal[True],
        vram_bytes: int | None = None,
        priority: int = 0,
        timeout_s: float | None = None,
        idempotency_key: str | None = None,
        inputs: Mapping[str, bytes] | None = None,
        masks: Mapping[str, bytes] | None = None,
        mask_of: Mapping[str, str] | None = None,
    ) -> list[bytes]: ...

    @overload
    async def generate_image(
        self,
        workflow: dict[str, Any],
        *,
        wait: bool,
        vram_bytes: int | None = None,
        priority: int = 0,
        timeout_s: float | None = None,
        idempotency_key: str | None = None,
        inputs: Mapping[str, bytes] | None = None,
        masks: Mapping[str, bytes] | None = None,
        mask_of: Mapping[str, str] | None = None,
    ) -> ImageJob | list[bytes]: ...

    async def generate_image(
        self,
        workflow: dict[str, Any],
        *,
        wait: bool = False,
        vram_bytes: int | None = None,
        priority: int = 0,
        timeout_s: float | None = None,
        idempotency_key: str | None = None,
        inputs: Mapping[str, bytes] | None = None,
        masks: Mapping[str, bytes] | None = None,
        mask_of: Mapping[str, str] | None = None,
    ) -> ImageJob | list[bytes]:
        """Submit a ComfyUI workflow (API format) as an image job.

        `wait=False`: the job's handle at once. `wait=True`: follow it to its end (within
        `timeout_s`, default the client's) and return its output files' bytes; a job that failed
        or was cancelled raises `JobFailed`, one still going at the limit `StudioTimeout` (whose
        message names the job, which goes on). `vram_bytes` is the peak GPU memory if you know it
        better than the controller; higher `priority` runs sooner.

        With an `idempotency_key` (the IETF Idempotency-Key header) the submission is sent
        again after a timeout or a dropped connection too: the controller answers the same key
        with the same job, so a retried caller reattaches instead of submitting twice. The
        handle's `retry_after_s` is the controller's hint for asking again about a held job.

        `inputs` are input pictures (PNG, JPEG or WebP) by the name the workflow's LoadImage or
        LoadImageMask node gives them (`"image": "sketch.png"` takes `inputs={"sketch.png":
        data}`); `masks` are masks named the same way, and `mask_of` paints a mask onto an input
        picture as its alpha channel ({mask name: picture name}, ComfyUI's mask upload). They
        go as one multipart request, stored with the job."""
        body: dict[str, Any] = {"workflow": workflow, "priority": priority}
        if vram_bytes is not None:
            body["vram_bytes"] = vram_bytes
        headers = None
        policy = _Retry.UNSENT
        if idempotency_key is not None:
            headers = {"Idempotency-Key": _sf_string(idempotency_key)}
            policy = _Retry.IDEMPOTENT
        form = _image_form(body, inputs or {}, masks or {}, mask_of or {})
        response = await self._send(
            "POST", "/v1/images", policy, body=None if form else body, headers=headers, form=form
        )
        job = ImageJob(self, _decoded(response, ImageJobInfo, "POST /v1/images"))
        job.retry_after_s = _retry_after_s(response.headers.get("Retry-After"), clock.utc_now())
        if not wait:
            return job
        info = await job.wait(timeout_s)
        if info.state != "succeeded":
            raise JobFailed(info)
        return await job.images()

    async def job(self, job_id: str) -> ImageJobInfo:
        """An image job's current state."""
        path = _job_path(job_id)
        return _decoded(await self._send("GET", path, _Retry.IDEMPOTENT), ImageJobInfo, path)

    async def cancel(self, job_id: str) -> ImageJobInfo:
        """Cancel an image job (a job already ended is left as it is); its state after."""
        path = _job_path(job_id)
        # The controller answers a repeated cancel with the job as it is, so repeating is safe.
        response = await self._send("DELETE", path, _Retry.IDEMPOTENT)
        return _decoded(response, ImageJobInfo, f"DELETE {path}")

    # -- views ---------------------------------------------------------------------------

    async def models(self) -> ModelsInfo:
        """The models the fleet offers (`/v1/catalog`), with quality, footprint, learned speeds
        and whether each is an embedding model."""
        response = await self._send("GET", "/v1/catalog", _Retry.IDEMPOTENT)
        return _decoded(response, ModelsInfo, "GET /v1/catalog")

    async def fleet(self) -> FleetInfo:
        """Every agent's health and memory, held image jobs, and job counts by state."""
        response = await self._send("GET", "/v1/fleet", _Retry.IDEMPOTENT)
        return _decoded(response, FleetInfo, "GET /v1/fleet")

    async def health(self) -> dict[str, Any]:
        """`/healthz`: `{"status", "agents", "healthy_agents"}` (needs no token)."""
        response = await self._send("GET", "/healthz", _Retry.IDEMPOTENT)
        return _json_object(response.content, "GET /healthz")

    # -- plumbing ------------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        path: str,
        policy: _Retry,
        *,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        stream: bool = False,
        form: _Form | None = None,
    ) -> httpx.Response:
        """One request, sent again as `policy` allows; a 2xx response or an error raised.
        `form` (text fields, files) goes as `multipart/form-data` instead of a JSON `body`.

        Streamed and generation responses come back open, for the caller to read and close."""
        stream = stream or policy is _Retry.GENERATION
        what = f"{method} {path}"
        budget_s = self.timeout_s
        # Measured on the one clock, not tenacity's own (the process clock).
        started_s = clock.monotonic_s()

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return _retry_delay_s(state.attempt_number, exc)

        def stop(state: RetryCallState) -> bool:
            # The next wait is computed here too: a Retry-After past the budget ends it now.
            over = clock.monotonic_s() - started_s + wait(state) > budget_s
            return state.attempt_number > self.retries or over

        def note(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.info(
                "%s: %s; trying again in %.1f s (%d of %d)",
                what,
                exc,
                state.upcoming_sleep,
                state.attempt_number,
                self.retries,
            )

        retrying = AsyncRetrying(
            sleep=self._sleep,
            stop=stop,
            wait=wait,
            retry=retry_if_exception(lambda exc: _retryable(policy, exc)),
            before_sleep=note,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._send_once(method, path, body, headers, stream, form)
        raise AssertionError("unreachable: tenacity returns or raises")

    async def _send_once(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        headers: dict[str, str] | None,
        stream: bool,
        form: _Form | None = None,
    ) -> httpx.Response:
        what = f"{method} {path}"
        if form is not None:
            fields, files = form
            request = self._http.build_request(
                method, path, data=fields, files=files, headers=headers
            )
        else:
            request = self._http.build_request(method, path, json=body, headers=headers)
        with _converted(what):
            response = await self._http.send(request, stream=stream)
        if response.is_success:
            return response
        try:
            with _converted(what):
                await response.aread()
        finally:
            await response.aclose()
        raise _error_from_response(response, what)

    async def _open_events(self, job_id: str) -> httpx.Response:
        return await self._send(
            "GET", f"{_job_path(job_id)}/events", _Retry.IDEMPOTENT, stream=True
        )

    async def _output(self, url: str) -> bytes:
        # Output URLs are paths on the controller; the token is not sent anywhere else.
        if not url.startswith("/") or url.startswith("//"):
            raise StudioProtocolError(f"output URL {url!r} is not a path on the controller")
        response = await self._send("GET", url, _Retry.IDEMPOTENT)
        return response.content


# A multipart body: text fields, and (field, (file name, bytes, type)) per file.
_Form = tuple[dict[str, str], list[tuple[str, tuple[str, bytes, str]]]]


def _image_form(
    body: dict[str, Any],
    inputs: Mapping[str, bytes],
    masks: Mapping[str, bytes],
    mask_of: Mapping[str, str],
) -> _Form | None:
    """The multipart form of a job with input pictures; None for a job without any."""
    if not inputs and not masks:
        if mask_of:
            raise ValueError("mask_of names masks, but no masks were given")
        return None
    fields = {"job": json.dumps(body)}
    if mask_of:
        fields["mask_of"] = json.dumps(dict(mask_of))
    files = [
        (field, (name, data, "application/octet-stream"))
        for field, pictures in (("image", inputs), ("mask", masks))
        for name, data in pictures.items()
    ]
    return fields, files


def _sf_string(value: str) -> str:
    """`value` as a structured-field string (RFC 8941), the form Idempotency-Key takes."""
    if not value or not all(" " <= ch <= "~" for ch in value):
        raise ValueError("an idempotency key must be non-empty printable ASCII")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _job_path(job_id: str) -> str:
    return f"/v1/images/{quote(job_id, safe='')}"


class ImageJob:
    """A handle on one image job. `info` is the latest state the client has seen."""

    def __init__(self, client: StudioClient, info: ImageJobInfo) -> None:
        self._client = client
        self.info = info
        # The controller's Retry-After on submission, for a held job (None when not given).
        self.retry_after_s: float | None = None

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def done(self) -> bool:
        """Whether the latest state seen is final (succeeded, failed or cancelled)."""
        return self.info.state in FINAL_JOB_STATES

    def __repr__(self) -> str:
        return f"ImageJob({self.id!r}, state={self.info.state!r})"

    async def refresh(self) -> ImageJobInfo:
        """Ask the controller for the job's state now."""
        self.info = await self._client.job(self.id)
        return self.info

    async def progress(self) -> AsyncGenerator[ImageJobInfo, None]:
        """The job's state each time it changes (`/events`), ending with its final state.

        Each wait for the next change is limited by the client's `timeout_s` (a job held for
        memory may be silent longer: then `StudioTimeout`; `wait()` follows through that)."""
        what = f"GET {_job_path(self.id)}/events"
        response = await self._client._open_events(self.id)
        try:
            async with contextlib.aclosing(_ndjson(response, what, _envelope_error_line)) as lines:
                async for line in lines:
                    try:
                        info = ImageJobInfo.model_validate(line)
                    except pydantic.ValidationError as exc:
                        raise StudioProtocolError(f"{what}: not an ImageJobInfo: {exc}") from exc
                    self.info = info
                    yield info
        finally:
            await response.aclose()

    async def wait(self, timeout_s: float | None = None) -> ImageJobInfo:
        """The job's final state, waiting at most `timeout_s` (default: the client's
        `timeout_s`); then `StudioTimeout`. A failed or cancelled job is returned, not raised."""
        limit_s = self._client.timeout_s if timeout_s is None else timeout_s
        started = clock.monotonic_s()
        try:
            async with asyncio.timeout(limit_s):
                while not self.done:
                    try:
                        async with contextlib.aclosing(self.progress()) as events:
                            async for _ in events:
                                pass
                    except StudioUnavailable as exc:
                        # The stream broke off or fell silent; reading again is harmless.
                        log.info("image job %s: following again after: %s", self.id, exc)
                    if not self.done:
                        await asyncio.sleep(_RESUBSCRIBE_S)
        except TimeoutError as exc:
            elapsed_s = clock.monotonic_s() - started
            raise StudioTimeout(
                f"image job {self.id} still {self.info.state} after {elapsed_s:.1f} s",
                reached_server=True,
            ) from exc
        return self.info

    async def images(self) -> list[bytes]:
        """The output files (PNG bytes) of a succeeded job, in order. A job that failed or was
        cancelled raises `JobFailed`; one not finished yet a 409 `StudioRequestError`."""
        if self.info.state != "succeeded":
            await self.refresh()
        if self.info.state in ("failed", "cancelled"):
            raise JobFailed(self.info)
        if self.info.state != "succeeded":
            raise StudioRequestError(
                409, "conflict", f"image job {self.id} is {self.info.state}; wait() for it first"
            )
        return [await self._client._output(url) for url in self.info.outputs]

    async def cancel(self) -> ImageJobInfo:
        """Cancel the job; its state after."""
        self.info = await self._client.cancel(self.id)
        return self.info
