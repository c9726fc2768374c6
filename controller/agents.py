"""The controller's link to one GPU agent (adapter layer of the controller).

An `AgentLink` follows the agent's `/v1/events` websocket stream and keeps its latest
`AgentStatus`, reconnecting with exponential backoff and jitter after any drop, and it calls the
agent's REST endpoints. Every answer is validated with the agent's own wire models
(`gpu_common.schema`).

Failures reach callers as the controller's error tree, converted in one place (the "errors"
section below):

    connect error, timeout, 5xx, malformed answer  ->  AgentUnavailable
    4xx (the agent's own error, its code in `X-GPU-Error`)  ->  AgentRejected

On the Ollama pass-through an error without `X-GPU-Error` is Ollama's own, handed to the caller
as it is.

Only idempotent GETs are retried, and only on `AgentUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterator
from email.message import Message
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import httpx
from pydantic import BaseModel, ValidationError
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus, WebSocketException

from controller.errors import AgentRejected, AgentUnavailable
from gpu_common import clock
from gpu_common.backoff import Backoff
from gpu_common.error_shapes import ERROR_CODE_HEADER, OPENAI_PATHS
from gpu_common.schema import (
    AgentEvent,
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
from gpu_common.tls import verify_for

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

# GETs are retried this many times after the first attempt, with a short jittered backoff.
GET_RETRIES = 2
GET_RETRY_INITIAL_S = 0.1
GET_RETRY_MAX_S = 1.0
# A status snapshot lists up to 50 recent prompts; this leaves ample room above that.
EVENT_MAX_BYTES = 16 * 1024 * 1024
# Error bodies are quoted into messages; a misbehaving server must not flood the logs.
ERROR_TEXT_MAX = 300
# Names the model a streamed request occupies, for the agent (`ollama_stream`).
MODEL_HEADER = "X-GPU-Model"
# Connections to one agent: room for 64 concurrent streams and the REST calls beside them,
# every one kept open between requests so that none is reopened under load.
MAX_CONNECTIONS = 256
MAX_KEEPALIVE_CONNECTIONS = 128


def ws_url(base_url: str, path: str) -> str:
    """The websocket URL of `path` on an agent whose HTTP base URL is `base_url`."""
    base = base_url.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base.removeprefix("https://") + path
    if base.startswith("http://"):
        return "ws://" + base.removeprefix("http://") + path
    raise ValueError(f"agent URL must start with http:// or https://, got {base_url!r}")


def ollama_path(path: str) -> str:
    """`/api/<path>` for any of "tags", "/tags", "api/tags", "/api/tags"."""
    rest = path.lstrip("/")
    rest = rest.removeprefix("api/")
    if not rest or ".." in rest.split("/") or "://" in rest:
        raise ValueError(f"not an Ollama API path: {path!r}")
    return "/api/" + rest


def error_fields(status: int, body: bytes, code: str | None = None) -> tuple[str, str]:
    """`(code, message)` from an error answer: the agent's `{"error": {"code", "message"}}`,
    Ollama's `{"error": "..."}`, OpenAI's `{"error": {"message", "type", ...}}`, or the raw
    text. `code`, from the agent's `X-GPU-Error` header, wins over what the body says."""
    text = body.decode("utf-8", errors="replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            named = error.get("code")
            return code or (named if isinstance(named, str) else "openai"), str(error["message"])[
                :ERROR_TEXT_MAX
            ]
        if isinstance(error, str):
            return code or "ollama", error[:ERROR_TEXT_MAX]
    return code or f"http_{status}", text.strip()[:ERROR_TEXT_MAX] or f"HTTP {status}"


class OllamaStream:
    """An answer of the agent's `/api/*` pass-through, open inside `AgentLink.ollama_stream`:
    its status, its headers (case-insensitive) and its body as it arrives."""

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        converted: Callable[[], contextlib.AbstractContextManager[None]],
        *,
        read: bytes | None = None,
    ) -> None:
        self._response = response
        self._converted = converted
        # The whole body, when it was read already (an error answer, to tell whose it is).
        self._read = read
        self.status_code = response.status
        self.headers = response.headers

    def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body's bytes, each piece as soon as it arrives; a transport failure while
        reading raises `AgentUnavailable` from the iteration itself, so the caller can still
        end its own answer in its own format."""
        if self._read is not None:
            return _once(self._read)
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[bytes]:
        with self._converted():
            async for piece in self._response.content.iter_any():
                yield piece

    @property
    def complete(self) -> bool:
        """Whether the whole body has arrived and been read: the latest piece was the last."""
        return self._read is not None or self._response.content.at_eof()

    async def aread(self) -> bytes:
        """The whole body (what is left of it)."""
        if self._read is not None:
            return self._read
        return await self._response.read()


async def _once(piece: bytes) -> AsyncIterator[bytes]:
    yield piece


def attachment_filename(content_disposition: str | None) -> str | None:
    """The filename of a `Content-Disposition: attachment; filename="..."` header."""
    if not content_disposition:
        return None
    message = Message()
    message["Content-Disposition"] = content_disposition
    return message.get_filename()


class AgentLink:
    """The controller's link to one agent: its latest status and its REST endpoints.

    `start()` begins following `/v1/events`; the REST methods work with or without it. Every
    wait is bounded: `request_timeout_s` for ordinary calls, `load_timeout_s` for model loads,
    unloads (which queue behind a load on the agent) and Ollama streams (whose first byte may
    wait for a load), `free_timeout_s` for `/v1/comfyui/free`. Times for `age_s()` and `health()`
    come from `monotonic`; the jitter of the reconnect backoff comes from `rng`.
    """

    def __init__(
        self,
        name: str,
        url: str,
        token: str | None,
        *,
        request_timeout_s: float = 10.0,
        load_timeout_s: float = 300.0,
        free_timeout_s: float = 130.0,
        stale_after_s: float = 10.0,
        reconnect_initial_s: float = 0.2,
        reconnect_max_s: float = 5.0,
        on_event: Callable[[str, AgentEvent], None] | None = None,
        monotonic: Callable[[], float] = clock.monotonic_s,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self._events_url = ws_url(self.url, "/v1/events")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.request_timeout_s = request_timeout_s
        self.load_timeout_s = load_timeout_s
        self.free_timeout_s = free_timeout_s
        self.stale_after_s = stale_after_s
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = reconnect_max_s
        self._on_event = on_event
        self._monotonic = monotonic
        self._transport = transport
        # Reconnect jitter draws from `rng`; a seeded one replays a run exactly.
        self._rng = rng if rng is not None else random.Random()
        self._http: httpx.AsyncClient | None = None
        self._stream_http: aiohttp.ClientSession | None = None
        self._follower: asyncio.Task[None] | None = None
        self._status: AgentStatus | None = None
        self._snapshot_at: float | None = None
        # Counts snapshots from the stream, so `refresh()` can tell one arrived during its call.
        self._snapshot_seq = 0
        self._message_at: float | None = None
        self._connected = False
        # Event streams opened so far: a change tells a listener that events may have been missed.
        self._streams_opened = 0
        # When the link last lost (or first tried) the stream, and why; None while connected.
        self._down_since: float | None = None
        self._down_reason: str | None = "not started"
        # A dict, not a set: waiters wake in the order they came, run after run.
        self._snapshot_waiters: dict[asyncio.Future[AgentStatus], None] = {}

    def __repr__(self) -> str:
        return f"AgentLink({self.name!r}, {self.url!r}, connected={self._connected})"

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start following `/v1/events` in the background; returns at once."""
        if self._follower is not None and not self._follower.done():
            return
        self._down_since = self._monotonic()
        self._down_reason = "connecting"
        self._follower = asyncio.create_task(self._follow(), name=f"agent-link-{self.name}")

    async def stop(self) -> None:
        """Stop following the stream and close the HTTP client. `start()` may be called again."""
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
        if self._connected:
            log.info("agent %s: event stream closed", self.name)
            self._connected = False
        self._down_since = self._monotonic()
        self._down_reason = "stopped"
        for waiter in self._snapshot_waiters:
            if not waiter.done():
                waiter.set_exception(AgentUnavailable(self.name, "link stopped"))
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()
        streams, self._stream_http = self._stream_http, None
        if streams is not None:
            await streams.close()

    # -- state ----------------------------------------------------------------------------

    @property
    def status(self) -> AgentStatus | None:
        """The latest status: a snapshot from the stream or the answer of `refresh()`."""
        return self._status

    @property
    def connected(self) -> bool:
        """Whether the event stream is open now."""
        return self._connected

    @property
    def streams_opened(self) -> int:
        """How many times the event stream has been opened; events sent while it was closed
        were missed."""
        return self._streams_opened

    def age_s(self) -> float | None:
        """Seconds since the latest message of any type on the stream; None before the first."""
        if self._message_at is None:
            return None
        return max(0.0, self._monotonic() - self._message_at)

    def health(self) -> tuple[bool, str | None]:
        """`(True, None)` when the stream is open, the latest snapshot is younger than
        `stale_after_s` and its telemetry is "ok" and no older than that either; otherwise
        `(False, reason)`."""
        now = self._monotonic()
        if not self._connected:
            since = f" since {now - self._down_since:.0f} s" if self._down_since is not None else ""
            return False, f"unreachable{since}: {self._down_reason or 'unknown'}"
        if self._status is None or self._snapshot_at is None:
            return False, "connected, no snapshot yet"
        age = now - self._snapshot_at
        if age > self.stale_after_s:
            return False, f"stale: last snapshot {age:.0f} s ago (limit {self.stale_after_s:g} s)"
        telemetry = self._status.telemetry
        if telemetry.status != "ok":
            return False, f"telemetry {telemetry.status}: {telemetry.reason or 'no reason given'}"
        if telemetry.age_s is not None and telemetry.age_s > self.stale_after_s:
            # The agent answers, but its GPU sampler has stalled: its memory figures are old.
            return False, f"telemetry stale: sample {telemetry.age_s:.0f} s old"
        return True, None

    async def wait_for_snapshot(self, timeout_s: float) -> AgentStatus:
        """The next snapshot that arrives on the stream from now on.

        Raises `AgentUnavailable` when none arrives within `timeout_s` or the link stops.
        """
        waiter: asyncio.Future[AgentStatus] = asyncio.get_running_loop().create_future()
        self._snapshot_waiters[waiter] = None
        try:
            async with asyncio.timeout(timeout_s):
                return await waiter
        except TimeoutError:
            why = "" if self._connected else f" ({self._down_reason})"
            raise AgentUnavailable(self.name, f"no snapshot within {timeout_s:g} s{why}") from None
        finally:
            self._snapshot_waiters.pop(waiter, None)

    def _store_status(self, status: AgentStatus) -> None:
        self._status = status
        self._snapshot_at = self._monotonic()

    # -- the event stream -----------------------------------------------------------------

    async def _follow(self) -> None:
        backoff = Backoff(self.reconnect_initial_s, self.reconnect_max_s, rng=self._rng)
        while True:
            try:
                async with connect(
                    self._events_url,
                    additional_headers=self._headers,
                    open_timeout=self.request_timeout_s,
                    # Pings find a silently dead peer (a desktop that lost power) within about
                    # `stale_after_s`, which a quiet stream alone would not reveal.
                    ping_interval=self.stale_after_s / 2,
                    ping_timeout=self.stale_after_s / 2,
                    close_timeout=self.request_timeout_s,
                    max_size=EVENT_MAX_BYTES,
                    # Agents are on the LAN; a proxy from the environment must not see the token.
                    proxy=None,
                ) as ws:
                    self._set_up()
                    # Only a stream that delivered something resets the backoff, so an agent
                    # that accepts and drops at once is not hammered.
                    if await self._read(ws):
                        backoff.reset()
                    reason = _close_reason(ws)
            except asyncio.CancelledError:
                raise
            except InvalidStatus as exc:
                code, message = error_fields(
                    exc.response.status_code, bytes(exc.response.body or b"")
                )
                reason = f"rejected: {exc.response.status_code} {code}: {message}"
            except (OSError, TimeoutError, WebSocketException) as exc:
                reason = _describe(exc)
            except Exception as exc:
                # The follower must outlive any surprise, or the link would silently stop.
                log.exception("agent %s: unexpected error on the event stream", self.name)
                reason = f"unexpected error: {_describe(exc)}"
            self._set_down(reason)
            await backoff.sleep()

    async def _read(self, ws: ClientConnection) -> bool:
        """Handle messages until the stream ends; whether any message arrived."""
        received = False
        async for raw in ws:
            received = True
            self._handle(raw)
        return received

    def _handle(self, raw: str | bytes) -> None:
        try:
            event = AgentEvent.model_validate_json(raw)
        except ValidationError as exc:
            log.warning("agent %s: ignoring an invalid event: %s", self.name, _first_error(exc))
            return
        self._message_at = self._monotonic()
        if event.type == "snapshot" and event.status is not None:
            self._snapshot_seq += 1
            self._store_status(event.status)
            for waiter in self._snapshot_waiters:
                if not waiter.done():
                    waiter.set_result(event.status)
        if self._on_event is not None:
            try:
                self._on_event(self.name, event)
            except Exception:
                # One faulty listener must not cut the stream the whole controller relies on.
                log.exception("agent %s: on_event failed for a %s event", self.name, event.type)

    def _set_up(self) -> None:
        if not self._connected:
            log.info("agent %s: event stream connected (%s)", self.name, self._events_url)
        self._streams_opened += 1
        self._connected = True
        self._down_since = None
        self._down_reason = None

    def _set_down(self, reason: str) -> None:
        if self._connected:
            log.warning("agent %s: event stream lost: %s", self.name, reason)
        elif reason != self._down_reason:
            log.info("agent %s: event stream unavailable: %s", self.name, reason)
        self._connected = False
        if self._down_since is None:
            self._down_since = self._monotonic()
        self._down_reason = reason

    # -- REST -----------------------------------------------------------------------------

    async def refresh(self) -> AgentStatus:
        """`GET /v1/status` now; the answer becomes the latest status unless a snapshot from
        the stream arrived while the request was under way (that one is as fresh, and ordering
        by the agent's wall clock would break when that clock is stepped back)."""
        seq = self._snapshot_seq
        status = await self._get_model("/v1/status", AgentStatus)
        if self._snapshot_seq == seq:
            self._store_status(status)
        return status

    async def load(
        self, model: str, *, keep_alive: str | float | None = None, num_ctx: int | None = None
    ) -> LoadResult:
        """Load `model` into Ollama; returns once the agent sees it resident."""
        body = LoadRequest.model_construct(model=model, keep_alive=keep_alive, num_ctx=num_ctx)
        response = await self._send(
            "POST", "/v1/ollama/load", body=body, read_timeout_s=self.load_timeout_s
        )
        return self._parse(response, LoadResult)

    async def unload(self, model: str, *, force: bool = False) -> UnloadResult:
        """Unload `model`; returns once the agent has confirmed its memory is back."""
        body = UnloadRequest.model_construct(model=model, force=force)
        # The agent serialises unloads behind loads, so an unload may wait as long as a load.
        response = await self._send(
            "POST", "/v1/ollama/unload", body=body, read_timeout_s=self.load_timeout_s
        )
        return self._parse(response, UnloadResult)

    async def free(self) -> FreeResult:
        """Ask ComfyUI to unload models and free memory; returns once NVML shows it freed."""
        response = await self._send(
            "POST", "/v1/comfyui/free", body=FreeRequest(), read_timeout_s=self.free_timeout_s
        )
        return self._parse(response, FreeResult)

    async def submit(self, workflow: dict[str, Any], prompt_id: str) -> PromptInfo:
        """Queue an API-format `workflow` on the agent's ComfyUI under `prompt_id`."""
        body = PromptSubmit.model_construct(workflow=workflow, prompt_id=prompt_id)
        response = await self._send("POST", "/v1/comfyui/prompts", body=body)
        return self._parse(response, PromptInfo)

    async def upload(
        self,
        data: bytes,
        filename: str,
        *,
        subfolder: str,
        overwrite: bool,
        mask_of: dict[str, str] | None = None,
    ) -> UploadResult:
        """Hand a picture to the agent, which uploads it to its ComfyUI (onto `mask_of`'s
        original as a mask when given); the answer names the file ComfyUI stored."""
        fields = {
            "type": "input",
            "subfolder": subfolder,
            "overwrite": "true" if overwrite else "false",
        }
        if mask_of is not None:
            fields.update({f"original_{key}": value for key, value in mask_of.items()})
        what = "POST /v1/comfyui/uploads"
        timeout = self._timeout(None)
        with self._converted(what, timeout):
            response = await self._client().post(
                "/v1/comfyui/uploads",
                data=fields,
                files={"image": (filename, data, "application/octet-stream")},
                timeout=timeout,
            )
        self._raise_for_status(response)
        return self._parse(response, UploadResult)

    async def prompt(self, prompt_id: str) -> PromptInfo | None:
        """The agent's view of a prompt, or None when it tracks no such prompt."""
        try:
            return await self._get_model(_prompt_path(prompt_id), PromptInfo)
        except AgentRejected as exc:
            if exc.status == 404:
                return None
            raise

    async def cancel(self, prompt_id: str) -> PromptInfo:
        """Cancel a pending or running prompt."""
        response = await self._send("DELETE", _prompt_path(prompt_id))
        return self._parse(response, PromptInfo)

    async def output(self, prompt_id: str, index: int) -> tuple[bytes, str, str]:
        """Output file `index` of a finished prompt: `(body, filename, content type)`."""
        response = await self._get(f"{_prompt_path(prompt_id)}/outputs/{index}")
        filename = attachment_filename(response.headers.get("Content-Disposition"))
        content_type = response.headers.get("Content-Type", "application/octet-stream")
        return response.content, filename or f"{prompt_id}-{index}", content_type

    @contextlib.asynccontextmanager
    async def ollama_stream(
        self, path: str, body: bytes, *, model: str | None = None
    ) -> AsyncIterator[OllamaStream]:
        """`POST /api/<path>` (or one of Ollama's OpenAI routes, `/v1/chat/completions` and the
        like, given whole) through the agent, streamed: yields the open answer.

        `model`, the model `body` names, travels in the `X-GPU-Model` header too, so the agent
        knows which model the request occupies without parsing the body. Ollama's own answers,
        errors included, are yielded as they are, for the caller to pass through. The agent's
        own errors (its JSON error body) raise as usual. Transport errors while the caller
        reads the body also become `AgentUnavailable`.

        Streams go over aiohttp's client, which costs a request less than httpx's; the other
        calls keep httpx. Until the agent's headers arrive the wait is `load_timeout_s` (the
        first byte may wait for a load), and so is each wait for more of the body.
        """
        url_path = path if path in OPENAI_PATHS else ollama_path(path)
        what = f"POST {url_path}"
        timeout = self._timeout(self.load_timeout_s)
        headers = {"Content-Type": "application/json"}
        if model is not None:
            headers[MODEL_HEADER] = model
        session = self._streams()
        try:
            async with asyncio.timeout(self.load_timeout_s):
                with self._converted(what, timeout):
                    response = await session.post(self.url + url_path, data=body, headers=headers)
        except TimeoutError as exc:
            raise AgentUnavailable(
                self.name, f"{what} timed out (no answer, limit {self.load_timeout_s} s)"
            ) from exc
        except ConnectionResetError as exc:
            # Here a write to the agent: no caller's client is written to before the yield.
            raise AgentUnavailable(self.name, f"{what} failed: {_describe(exc)}") from exc
        try:
            with self._converted(what, timeout):
                answer: bytes | None = None
                if response.status >= 400:
                    answer = await response.read()
                    agent_code = response.headers.get(ERROR_CODE_HEADER)
                    if agent_code is not None:
                        # The agent's own error (Ollama's pass through without the header).
                        self._raise_for_answer(response.status, answer, agent_code)
                # Ollama's own error answer, read whole above, is passed on as it came.
                yield OllamaStream(response, lambda: self._converted(what, timeout), read=answer)
        finally:
            # Back to the pool when the answer was read to its end, else closed: that tells
            # the agent (and Ollama) to stop generating for a caller that went away.
            response.release()

    async def ollama_get(self, path: str) -> Any:
        """`GET /api/<path>` (tags, ps, version) through the agent; the decoded JSON."""
        return _json_body(self.name, await self._get(ollama_path(path)))

    async def ollama_post(
        self, path: str, body: dict[str, Any], *, timeout_s: float | None = None
    ) -> Any:
        """`POST /api/<path>` (e.g. show) through the agent, not streamed; the decoded JSON.

        Waits `timeout_s` for the answer (default `request_timeout_s`)."""
        response = await self._send("POST", ollama_path(path), body=body, read_timeout_s=timeout_s)
        return _json_body(self.name, response)

    # -- HTTP plumbing --------------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        if self._http is None or self._http.is_closed:
            self._http = httpx.AsyncClient(
                base_url=self.url,
                verify=verify_for(self.url),
                headers=self._headers,
                timeout=self._timeout(None),
                transport=self._transport,
                limits=httpx.Limits(
                    max_connections=MAX_CONNECTIONS,
                    max_keepalive_connections=MAX_KEEPALIVE_CONNECTIONS,
                    keepalive_expiry=clock.http_keepalive_expiry_s(),
                ),
                # Agents are on the LAN; a proxy from the environment must not see the token.
                trust_env=False,
            )
        return self._http

    def _streams(self) -> aiohttp.ClientSession:
        if self._stream_http is None or self._stream_http.closed:
            # Idle connections are kept for aiohttp's default 15 s, timed on the loop's clock.
            connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS)
            self._stream_http = aiohttp.ClientSession(
                headers=self._headers,
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=self.request_timeout_s,  # a free connection, or a new one
                    sock_read=self.load_timeout_s,  # each read; the first may wait for a load
                ),
                # Agents are on the LAN; a proxy from the environment must not see the token.
                trust_env=False,
            )
        return self._stream_http

    def _timeout(self, read_timeout_s: float | None) -> httpx.Timeout:
        return httpx.Timeout(self.request_timeout_s, read=read_timeout_s or self.request_timeout_s)

    async def _get_model(self, path: str, model: type[M]) -> M:
        return self._parse(await self._get(path), model)

    async def _get(self, path: str) -> httpx.Response:
        """An idempotent GET, retried on `AgentUnavailable` only."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(1 + GET_RETRIES),
            wait=wait_exponential(multiplier=GET_RETRY_INITIAL_S, max=GET_RETRY_MAX_S)
            + wait_random(0, GET_RETRY_INITIAL_S),
            retry=retry_if_exception_type(AgentUnavailable),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._send("GET", path)
        raise AssertionError("unreachable: tenacity reraises the last error")  # pragma: no cover

    async def _send(
        self,
        method: str,
        path: str,
        *,
        body: BaseModel | dict[str, Any] | None = None,
        read_timeout_s: float | None = None,
    ) -> httpx.Response:
        """One request, whole answer read; any failure raised as the controller's errors."""
        if isinstance(body, BaseModel):
            content: bytes | None = body.model_dump_json().encode()
        elif body is not None:
            content = json.dumps(body).encode()
        else:
            content = None
        headers = {"Content-Type": "application/json"} if content is not None else None
        timeout = self._timeout(read_timeout_s)
        with self._converted(f"{method} {path}", timeout):
            response = await self._client().request(
                method, path, content=content, headers=headers, timeout=timeout
            )
        self._raise_for_status(response)
        return response

    # -- errors: the one place where failures become AgentUnavailable / AgentRejected -------

    @contextlib.contextmanager
    def _converted(self, what: str, timeout: httpx.Timeout) -> Iterator[None]:
        try:
            yield
        except ConnectionResetError:
            # A write to the caller's own client inside a stream's block (aiohttp's server
            # raises a subclass of aiohttp.ClientError): not the agent's failure.
            raise
        except (aiohttp.ConnectionTimeoutError, aiohttp.SocketTimeoutError) as exc:
            is_connect = isinstance(exc, aiohttp.ConnectionTimeoutError)
            limit_s = timeout.connect if is_connect else timeout.read
            raise AgentUnavailable(
                self.name, f"{what} timed out ({type(exc).__name__}, limit {limit_s} s)"
            ) from exc
        except aiohttp.ClientError as exc:
            detail = str(exc) or type(exc).__name__
            raise AgentUnavailable(self.name, f"{what} failed: {detail}") from exc
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ReadTimeout):
                limit_s = timeout.read
            elif isinstance(exc, httpx.WriteTimeout):
                limit_s = timeout.write
            elif isinstance(exc, httpx.PoolTimeout):
                limit_s = timeout.pool
            else:
                limit_s = timeout.connect
            raise AgentUnavailable(
                self.name, f"{what} timed out ({type(exc).__name__}, limit {limit_s} s)"
            ) from exc
        except httpx.HTTPError as exc:
            detail = str(exc) or type(exc).__name__
            raise AgentUnavailable(self.name, f"{what} failed: {detail}") from exc

    def _raise_for_status(self, response: httpx.Response) -> None:
        self._raise_for_answer(
            response.status_code, response.content, response.headers.get(ERROR_CODE_HEADER)
        )

    def _raise_for_answer(self, status: int, body: bytes, code: str | None = None) -> None:
        if status < 400:
            return
        code, message = error_fields(status, body, code)
        if status >= 500:
            raise AgentUnavailable(self.name, f"{status} {code}: {message}")
        raise AgentRejected(self.name, status, code, message)

    def _parse(self, response: httpx.Response, model: type[M]) -> M:
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise AgentUnavailable(
                self.name, f"answered an invalid {model.__name__}: {_first_error(exc)}"
            ) from exc


def _prompt_path(prompt_id: str) -> str:
    return f"/v1/comfyui/prompts/{quote(prompt_id, safe='')}"


def _json_body(agent: str, response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise AgentUnavailable(agent, f"answered a body that is not JSON: {exc}") from exc


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return str(exc)
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _close_reason(ws: ClientConnection) -> str:
    if ws.close_code is None:
        return "stream ended"
    reason = f": {ws.close_reason}" if ws.close_reason else ""
    return f"stream closed by the agent ({ws.close_code}{reason})"


__all__ = ["AgentLink"]
