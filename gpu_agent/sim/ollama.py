"""The emulated Ollama server of the simulated desktop (simulated-desktop layer).

A real aiohttp application speaking Ollama's native API as protocols.md part A describes it: the
same paths, request parsing (keep_alive numbers and Go durations, options), NDJSON streams, final
lines with integer-nanosecond durations, load/unload requests and error bodies. Runners take real
memory on the shared `SimGpu` and work for simulated time on the shared `SimClock`, so the agent
sees loads, partial offload, evictions and keep-alive expiry exactly as on the desktop.

It embeds too (`/api/embed`, the older `/api/embeddings`), with any model as Ollama does, and
refuses generate and chat on an embedding model. Its OpenAI-compatible routes under `/v1`
convert each request to the native one and write the native answer in OpenAI's shape, as
Ollama's own middleware does (`gpu_agent.sim.ollama_openai`); their errors are OpenAI's shape.

Request parsing and response pieces live in `gpu_agent.sim.ollama_wire`, runners and the scheduler
in `gpu_agent.sim.ollama_scheduler`, generated words in `gpu_agent.sim.text`, vectors in
`gpu_agent.sim.vectors`; this module ties them to HTTP and to simulated time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from aiohttp import web
from aiohttp.typedefs import Middleware

from gpu_agent.sim import ollama_openai, text, vectors
from gpu_agent.sim.catalog import Catalog, OllamaModelSpec
from gpu_agent.sim.clock import SimClock
from gpu_agent.sim.faults import ServerFaults, fault_middleware
from gpu_agent.sim.gpu import SimGpu
from gpu_agent.sim.ollama_openai import ChatCompletionWire, CompletionWire
from gpu_agent.sim.ollama_scheduler import (
    RUNNER_PID_OFFSET,
    ApiError,
    Lease,
    OllamaScheduler,
    OllamaSimSettings,
    OllamaStats,
    RunnerInfo,
)
from gpu_agent.sim.ollama_wire import (
    CHAT_FIELDS,
    EMBED_FIELDS,
    EMBEDDINGS_FIELDS,
    GENERATE_FIELDS,
    MESSAGE_FIELDS,
    NATIVE,
    SHOW_FIELDS,
    AnswerWire,
    RequestOptions,
    check_fields,
    error_response,
    go_time,
    json_kind,
    model_details,
    parse_go_duration,
    parse_keep_alive,
    parse_options,
    read_object,
    show_body,
    to_ns,
)
from gpu_common.model_names import normalize_model_name

__all__ = [
    "OllamaEmulator",
    "OllamaSimSettings",
    "OllamaStats",
    "RunnerInfo",
    "parse_go_duration",
    "parse_keep_alive",
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Go's time.Duration(math.MaxInt64): what a negative keep_alive is stored as (~292 years).
FOREVER = timedelta(microseconds=(2**63 - 1) // 1000)
# Tokens the chat template adds around a generate prompt and around each chat message.
GENERATE_TEMPLATE_TOKENS = 12
CHAT_MESSAGE_TOKENS = 4
CHAT_REPLY_TOKENS = 3
MIDSTREAM_ERROR = "an error was encountered while running the model: unexpected EOF"
# Tokens an embedding input gets besides its text: the BOS and EOS the tokenizer adds.
EMBED_SPECIAL_TOKENS = 2


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one generation will produce, decided before any time passes."""

    pieces: list[str]
    done_reason: str
    prompt_tokens: int
    context: list[int]  # generate only; empty = omitted


@dataclass(frozen=True, slots=True)
class _Shape:
    """How generate and chat differ on the wire."""

    chat: bool
    model: str  # echoed as the client sent it

    def chunk(self, created_at: str, piece: str) -> dict[str, Any]:
        head: dict[str, Any] = {"model": self.model, "created_at": created_at}
        if self.chat:
            head["message"] = {"role": "assistant", "content": piece}
        else:
            head["response"] = piece
        head["done"] = False
        return head


# -- the emulator ------------------------------------------------------------------------------


class OllamaEmulator:
    """An Ollama server on the simulated desktop. Serve `make_app()` behind a `LoopbackServer`.

    `faults` is obeyed by middleware on every request; `faults.fail_stream_after_tokens = n` makes
    streamed answers break off after n chunks with a final `{"error": ...}` line. With
    `zombie_runners` set, unloaded runners leave the list but keep their GPU memory (a runner
    process that hangs on exit) until the server is stopped or restarted.
    """

    def __init__(
        self,
        *,
        clock: SimClock,
        gpu: SimGpu,
        catalog: Catalog,
        seed: int = 0,
        settings: OllamaSimSettings = OllamaSimSettings(),  # noqa: B008 - frozen, shared safely
        serve_pid: int = 2001,
    ) -> None:
        self.clock = clock
        self.gpu = gpu
        self.catalog = catalog
        self.seed = seed
        self.settings = settings
        self.serve_pid = serve_pid
        self.faults = ServerFaults()
        self.stats = OllamaStats()
        # Survives restarts: the kernel keeps model files cached, so later loads are warm.
        self._page_cache: set[str] = set()
        self._pids = itertools.count(serve_pid + RUNNER_PID_OFFSET + 1)
        self._rng = random.Random(seed)
        # Answer ids of the OpenAI routes come from their own generator, so serving those
        # routes leaves the scheduler's draws, and so every other answer, as they were.
        self._ids = random.Random(seed)
        self._keep_alive_default_s = (
            math.inf if settings.keep_alive_s < 0 else settings.keep_alive_s
        )
        self._zombie_runners = False
        self._scheduler = self._new_scheduler()
        self._exchanges: dict[asyncio.Task[Any], web.Request] = {}

    def _new_scheduler(self) -> OllamaScheduler:
        scheduler = OllamaScheduler(
            clock=self.clock,
            gpu=self.gpu,
            settings=self.settings,
            stats=self.stats,
            page_cache=self._page_cache,
            pids=self._pids,
            rng=self._rng,
        )
        scheduler.zombie_runners = self._zombie_runners
        return scheduler

    @property
    def zombie_runners(self) -> bool:
        """Whether unloaded runners keep their GPU memory (a fault; off by default)."""
        return self._zombie_runners

    @zombie_runners.setter
    def zombie_runners(self, value: bool) -> None:
        self._zombie_runners = value
        self._scheduler.zombie_runners = value

    # -- lifecycle and inspection -------------------------------------------------------------

    def make_app(self) -> web.Application:
        """A fresh application each call (a restarted server calls it again)."""
        app = web.Application(
            middlewares=[
                self._track_exchange,
                # fault_middleware is typed loosely; it is an aiohttp middleware.
                cast(Middleware, fault_middleware(self.faults, error_response)),
                _gin_errors,
            ]
        )
        r = app.router
        r.add_get("/", self._root)
        r.add_get("/api/version", self._version)
        r.add_get("/api/tags", self._tags)
        r.add_get("/api/ps", self._ps, allow_head=False)
        r.add_post("/api/show", self._show)
        r.add_post("/api/generate", self._generate)
        r.add_post("/api/chat", self._chat)
        r.add_post("/api/embed", self._embed)
        r.add_post("/api/embeddings", self._embeddings)
        r.add_post("/v1/chat/completions", self._openai_chat)
        r.add_post("/v1/completions", self._openai_completion)
        r.add_post("/v1/embeddings", self._openai_embeddings)
        r.add_get("/v1/models", self._openai_models, allow_head=False)
        r.add_get("/v1/models/{model:.+}", self._openai_model, allow_head=False)
        return app

    async def reset(self) -> None:
        """The server process died and came back: runners gone, memory freed, requests cut off.

        Connections of requests in flight are closed without an answer, as a crash leaves them.
        """
        old, self._scheduler = self._scheduler, self._new_scheduler()
        exchanges = list(self._exchanges.items())
        self._exchanges.clear()
        for task, request in exchanges:
            if request.transport is not None:
                request.transport.abort()
            task.cancel()
        await old.close(release_memory=True)

    async def close(self) -> None:
        """Cancel every background task (expiry timers, memory releases, loads)."""
        await self._scheduler.close(release_memory=False)

    def runners(self) -> list[RunnerInfo]:
        """Runners now listed (loading, loaded or stopping), for tests and benchmarks."""
        return self._scheduler.runners()

    def queued_requests(self) -> int:
        """Requests admitted but waiting for a runner or a slot (what OLLAMA_MAX_QUEUE bounds)."""
        return self._scheduler.queued

    # -- middleware --------------------------------------------------------------------------

    @web.middleware
    async def _track_exchange(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._exchanges[task] = request
        try:
            return await handler(request)
        finally:
            self._exchanges.pop(task, None)

    # -- simple endpoints --------------------------------------------------------------------

    async def _root(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="Ollama is running")

    async def _version(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"version": self.settings.version})

    async def _tags(self, request: web.Request) -> web.StreamResponse:
        models = [
            {
                "name": spec.name,
                "model": spec.name,
                "modified_at": spec.modified_at,
                "size": spec.file_size_bytes,
                "digest": spec.digest,
                "details": model_details(spec),
                # Listed since Ollama 0.12 (the model list cache reads them from the GGUF).
                "capabilities": list(spec.capabilities),
            }
            for spec in self.catalog.ollama_models
        ]
        return web.json_response({"models": models})

    async def _ps(self, request: web.Request) -> web.StreamResponse:
        now = self.clock.now()
        wall = self.clock.wall()
        entries = []
        for info in sorted(self.runners(), key=lambda i: i.expires_at, reverse=True):
            spec = self.catalog.ollama_model(info.model)
            assert spec is not None
            if math.isinf(info.expires_at):
                expires = wall + FOREVER
            else:
                expires = wall + timedelta(seconds=info.expires_at - now)
            entries.append(
                {
                    "name": spec.name,
                    "model": spec.name,
                    "size": info.size_bytes,
                    "digest": spec.digest,
                    "details": model_details(spec),
                    "expires_at": go_time(expires.astimezone()),
                    "size_vram": info.size_vram_bytes,
                    "context_length": info.num_ctx,
                }
            )
        return web.json_response({"models": entries})

    async def _show(self, request: web.Request) -> web.StreamResponse:
        body = await read_object(request, "ShowRequest")
        check_fields(body, SHOW_FIELDS, "ShowRequest")
        name = body.get("model") or body.get("name") or ""
        if not name:
            raise ApiError(400, "model is required")
        spec = self.catalog.ollama_model(name)
        if spec is None:
            raise ApiError(404, f"model '{normalize_model_name(name)}' not found")
        return web.json_response(show_body(spec, verbose=bool(body.get("verbose"))))

    # -- generate and chat -------------------------------------------------------------------

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await read_object(request, "GenerateRequest")
        return await self._run_generate(request, body, NATIVE)

    async def _run_generate(
        self, request: web.Request, body: dict[str, Any], wire: AnswerWire
    ) -> web.StreamResponse:
        started_at = self.clock.now()
        self.stats.requests += 1
        check_fields(body, GENERATE_FIELDS, "GenerateRequest")
        keep_alive_s = self._keep_alive(body)
        self._check_top_logprobs(body)
        model = body.get("model") or ""
        if not model:
            raise ApiError(404, "model '' not found")
        if body.get("raw") and (body.get("template") or body.get("system") or body.get("context")):
            raise ApiError(400, "raw mode does not support template, system, or context")
        spec = self._lookup(model)
        shape = _Shape(chat=False, model=model)
        prompt = body.get("prompt") or ""
        if not prompt and keep_alive_s == 0:
            return self._unload(shape, spec, wire, body)
        self._check_think(body, model, spec)
        self._check_capable(spec, model, "generate")
        if not prompt:
            return await self._load(shape, spec, body, keep_alive_s, wire)
        options = parse_options(body.get("options"), spec, self.settings.default_num_ctx)
        plan = self._plan_generate(spec, body, options)
        return await self._serve(
            request, shape, spec, body, options, keep_alive_s, plan, started_at, wire
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_object(request, "ChatRequest")
        return await self._run_chat(request, body, NATIVE)

    async def _run_chat(
        self, request: web.Request, body: dict[str, Any], wire: AnswerWire
    ) -> web.StreamResponse:
        started_at = self.clock.now()
        self.stats.requests += 1
        check_fields(body, CHAT_FIELDS, "ChatRequest")
        messages = body.get("messages") or []
        for message in messages:
            if not isinstance(message, dict):
                raise ApiError(
                    400,
                    f"json: cannot unmarshal {json_kind(message)} into Go struct field "
                    "ChatRequest.messages of type api.Message",
                )
            check_fields(message, MESSAGE_FIELDS, "Message", "messages.")
        keep_alive_s = self._keep_alive(body)
        self._check_top_logprobs(body)
        model = body.get("model") or ""
        if not model:
            raise ApiError(400, "model is required")
        spec = self._lookup(model)
        shape = _Shape(chat=True, model=model)
        if not messages and keep_alive_s == 0:
            return self._unload(shape, spec, wire, body)
        self._check_think(body, model, spec)
        self._check_capable(spec, model, "chat")
        if not messages:
            return await self._load(shape, spec, body, keep_alive_s, wire)
        options = parse_options(body.get("options"), spec, self.settings.default_num_ctx)
        plan = self._plan_chat(spec, body, messages, options)
        return await self._serve(
            request, shape, spec, body, options, keep_alive_s, plan, started_at, wire
        )

    def _keep_alive(self, body: dict[str, Any]) -> float | None:
        value = body.get("keep_alive")
        return None if value is None else parse_keep_alive(value)

    @staticmethod
    def _check_top_logprobs(body: dict[str, Any]) -> None:
        top = body.get("top_logprobs")
        if top is not None and not 0 <= top <= 20:
            raise ApiError(400, "top_logprobs must be between 0 and 20")

    def _lookup(self, model: str) -> OllamaModelSpec:
        spec = self.catalog.ollama_model(model)
        if spec is None:
            raise ApiError(404, f"model '{model}' not found")
        return spec

    @staticmethod
    def _check_capable(spec: OllamaModelSpec, model: str, what: str) -> None:
        """An embedding model neither generates nor chats: 400 in Ollama's words."""
        if spec.embedding:
            raise ApiError(400, f'"{model}" does not support {what}')

    @staticmethod
    def _check_think(body: dict[str, Any], model: str, spec: OllamaModelSpec) -> None:
        think = body.get("think")
        if think not in (None, False) and "thinking" not in spec.capabilities:
            raise ApiError(400, f'"{model}" does not support thinking')

    def _unload(
        self, shape: _Shape, spec: OllamaModelSpec, wire: AnswerWire, body: dict[str, Any]
    ) -> web.StreamResponse:
        """An empty prompt/messages with keep_alive 0: unload, answered at once (any model)."""
        self._scheduler.expire(spec.name)
        return self._single(shape, "unload", wire, body)

    async def _load(
        self,
        shape: _Shape,
        spec: OllamaModelSpec,
        body: dict[str, Any],
        keep_alive_s: float | None,
        wire: AnswerWire,
    ) -> web.StreamResponse:
        """An empty prompt/messages: load the model, answered once it is resident."""
        options = parse_options(body.get("options"), spec, self.settings.default_num_ctx)
        async with self._lease(spec, options, keep_alive_s, need_slot=False):
            pass
        return self._single(shape, "load", wire, body)

    def _single(
        self, shape: _Shape, done_reason: str, wire: AnswerWire, body: dict[str, Any]
    ) -> web.StreamResponse:
        obj = shape.chunk(self._created_at(), "")
        obj["done"] = True
        obj["done_reason"] = done_reason
        if wire is NATIVE:
            # Ollama answers a load or an unload with one JSON object, streamed or not.
            return web.json_response(obj)
        if body.get("stream"):
            return web.Response(body=wire.final(obj), content_type=wire.stream_content_type)
        return web.json_response(wire.whole(obj))

    def _lease(
        self,
        spec: OllamaModelSpec,
        options: RequestOptions,
        keep_alive_s: float | None,
        *,
        need_slot: bool,
    ) -> contextlib.AbstractAsyncContextManager[Lease]:
        return self._scheduler.lease(
            spec,
            num_ctx=options.num_ctx,
            num_gpu=options.num_gpu,
            keep_alive_s=self._keep_alive_default_s if keep_alive_s is None else keep_alive_s,
            need_slot=need_slot,
        )

    def _created_at(self) -> str:
        return go_time(self.clock.wall())

    # -- planning ----------------------------------------------------------------------------

    def _finish_plan(
        self, rng: random.Random, options: RequestOptions, prompt_tokens: int, context: list[int]
    ) -> _Plan:
        natural = text.output_length(rng)
        count, reason = natural, "stop"
        if 0 < options.num_predict < natural:
            count, reason = options.num_predict, "length"
        parts, stopped = text.cut_at_stop(text.pieces(rng, count), options.stop)
        if stopped:
            reason = "stop"
        if context:
            context = context + text.token_ids(rng, len(parts))
        return _Plan(parts, reason, prompt_tokens, context)

    def _plan_generate(
        self, spec: OllamaModelSpec, body: dict[str, Any], options: RequestOptions
    ) -> _Plan:
        prompt = body.get("prompt") or ""
        system = body.get("system") or ""
        raw = bool(body.get("raw"))
        earlier = [int(t) for t in body.get("context") or [] if isinstance(t, int | float)]
        rng = text.keyed_rng(
            "generate",
            self.seed,
            spec.name,
            prompt,
            system,
            body.get("suffix"),
            raw,
            earlier,
            options.seed,
        )
        if raw:
            prompt_tokens = text.count_tokens(prompt) + 1
        else:
            prompt_tokens = (
                text.count_tokens(system) + text.count_tokens(prompt) + GENERATE_TEMPLATE_TOKENS
            ) + len(earlier)
        context = [] if raw else earlier + text.token_ids(rng, prompt_tokens - len(earlier))
        return self._finish_plan(rng, options, prompt_tokens, context)

    def _plan_chat(
        self,
        spec: OllamaModelSpec,
        body: dict[str, Any],
        messages: list[dict[str, Any]],
        options: RequestOptions,
    ) -> _Plan:
        turns = [(m.get("role") or "", m.get("content") or "") for m in messages]
        rng = text.keyed_rng("chat", self.seed, spec.name, turns, options.seed)
        prompt_tokens = CHAT_REPLY_TOKENS + sum(
            CHAT_MESSAGE_TOKENS + text.count_tokens(content) for _, content in turns
        )
        if body.get("tools"):
            prompt_tokens += text.count_tokens(json.dumps(body["tools"]))
        return self._finish_plan(rng, options, prompt_tokens, [])

    # -- serving -----------------------------------------------------------------------------

    async def _serve(
        self,
        request: web.Request,
        shape: _Shape,
        spec: OllamaModelSpec,
        body: dict[str, Any],
        options: RequestOptions,
        keep_alive_s: float | None,
        plan: _Plan,
        started_at: float,
        wire: AnswerWire,
    ) -> web.StreamResponse:
        stream = body.get("stream") is not False
        async with self._lease(spec, options, keep_alive_s, need_slot=True) as lease:
            if lease.spilled:
                self.stats.spilled_generations += 1
            prefill_s = await self._prefill(lease, plan.prompt_tokens)
            if stream:
                return await self._stream(request, shape, lease, plan, prefill_s, started_at, wire)
            return await self._aggregate(shape, lease, plan, prefill_s, started_at, wire)

    async def _prefill(self, lease: Lease, tokens: int) -> float:
        """Process the prompt; returns its simulated duration.

        Reported durations are the simulated GPU's schedule, not the host's event-loop timing,
        so a busy test machine does not make the simulated card look slower.
        """
        with self.gpu.working("prefill"):
            seconds = lease.spec.prompt_seconds(tokens, lease.offload_fraction)
            seconds *= self.gpu.contention()
            await self.clock.sleep(seconds)
        return seconds

    def _fail_after(self) -> int | None:
        after = self.faults.fail_stream_after_tokens
        return None if after is None else max(0, after)

    async def _decode(
        self,
        lease: Lease,
        pieces: list[str],
        emit: Callable[[str], None],
        flush: Callable[[], Awaitable[None]],
    ) -> float:
        """Emit `pieces` on the decode schedule; returns the scheduled decode time (sim s).

        Tokens already due are emitted together without sleeping, so a fast clock costs one
        wake-up per batch rather than one per token; a late wake-up catches up, it does not
        push the schedule back.
        """
        if not pieces:
            return 0.0
        seconds_per_token = lease.spec.seconds_per_token(lease.offload_fraction)
        begin = due = self.clock.now()
        with self.gpu.working("decode"):
            for piece in pieces:
                due += seconds_per_token * self.gpu.contention()
                if self.clock.now() < due:
                    await flush()
                    await self.clock.sleep_until(due)
                emit(piece)
        await flush()
        return due - begin

    def _final(
        self,
        shape: _Shape,
        lease: Lease,
        plan: _Plan,
        prefill_s: float,
        decode_s: float,
        started_at: float,
        content: str,
        eval_count: int,
    ) -> dict[str, Any]:
        obj = shape.chunk(self._created_at(), content)
        obj["done"] = True
        obj["done_reason"] = plan.done_reason
        if plan.context:
            obj["context"] = plan.context
        metrics = {
            "total_duration": to_ns(self.clock.now() - started_at),
            "load_duration": to_ns(lease.load_s),
            "prompt_eval_count": plan.prompt_tokens,
            "prompt_eval_duration": to_ns(prefill_s),
            "eval_count": eval_count,
            "eval_duration": to_ns(decode_s),
        }
        # Every metric is `omitempty` in Ollama's response types.
        obj.update({key: value for key, value in metrics.items() if value})
        return obj

    async def _stream(
        self,
        request: web.Request,
        shape: _Shape,
        lease: Lease,
        plan: _Plan,
        prefill_s: float,
        started_at: float,
        wire: AnswerWire,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200, headers={"Content-Type": wire.stream_content_type}
        )
        await response.prepare(request)
        fail_after = self._fail_after()
        pieces = plan.pieces if fail_after is None else plan.pieces[:fail_after]
        buffer: list[bytes] = []

        def emit(piece: str) -> None:
            buffer.append(wire.chunk(shape.chunk(self._created_at(), piece)))

        async def flush() -> None:
            if buffer:
                data = b"".join(buffer)
                buffer.clear()
                await response.write(data)

        try:
            decode_s = await self._decode(lease, pieces, emit, flush)
            if fail_after is not None:
                # A runner failure after output began: status stays 200, the last line says why.
                await response.write(wire.stream_error(MIDSTREAM_ERROR))
            else:
                final = self._final(
                    shape, lease, plan, prefill_s, decode_s, started_at, "", len(pieces)
                )
                await response.write(wire.final(final))
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away; Ollama stops generating for it
        return response

    async def _aggregate(
        self,
        shape: _Shape,
        lease: Lease,
        plan: _Plan,
        prefill_s: float,
        started_at: float,
        wire: AnswerWire,
    ) -> web.StreamResponse:
        fail_after = self._fail_after()
        pieces = plan.pieces if fail_after is None else plan.pieces[:fail_after]
        collected: list[str] = []

        async def flush() -> None:
            return None

        decode_s = await self._decode(lease, pieces, collected.append, flush)
        if fail_after is not None:
            raise ApiError(500, MIDSTREAM_ERROR)
        final = self._final(
            shape, lease, plan, prefill_s, decode_s, started_at, "".join(collected), len(pieces)
        )
        return web.json_response(wire.whole(final))

    # -- embeddings --------------------------------------------------------------------------

    async def _embed(self, request: web.Request) -> web.StreamResponse:
        body = await read_object(request, "EmbedRequest")
        return web.json_response(await self._embed_native(body))

    async def _embed_native(self, body: dict[str, Any]) -> dict[str, Any]:
        """`/api/embed` (EmbedHandler): every input's vector, L2-normalised, cut to
        `dimensions` when asked; no input only loads the model."""
        started_at = self.clock.now()
        self.stats.embed_requests += 1
        check_fields(body, EMBED_FIELDS, "EmbedRequest")
        keep_alive_s = self._keep_alive(body)
        model = body.get("model") or ""
        if not model:
            raise ApiError(404, "model '' not found")
        inputs = _embed_inputs(body.get("input"))
        spec = self._lookup(model)
        options = parse_options(body.get("options"), spec, self.settings.default_num_ctx)
        async with self._lease(spec, options, keep_alive_s, need_slot=True) as lease:
            if not inputs:
                return {"model": model, "embeddings": []}
            counts = []
            for content in inputs:
                tokens = text.count_tokens(content) + EMBED_SPECIAL_TOKENS
                if body.get("truncate") is False and tokens > options.num_ctx:
                    raise ApiError(400, "the input length exceeds the context length")
                counts.append(min(tokens, options.num_ctx))
            await self._prefill(lease, sum(counts))
            dimensions = body.get("dimensions") or 0
            embeddings = [
                vectors.truncate(vectors.normalize(self._raw_vector(spec, content)), dimensions)
                for content in inputs
            ]
            answer: dict[str, Any] = {
                "model": model,
                "embeddings": embeddings,
                "total_duration": to_ns(self.clock.now() - started_at),
                "load_duration": to_ns(lease.load_s),
                "prompt_eval_count": sum(counts),
            }
        # Durations and counters are `omitempty` in Ollama's EmbedResponse.
        return {key: value for key, value in answer.items() if value or key == "embeddings"}

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        """The older `/api/embeddings` (EmbeddingsHandler): one prompt, its vector not
        normalised; an empty prompt only loads the model."""
        self.stats.embed_requests += 1
        body = await read_object(request, "EmbeddingRequest")
        check_fields(body, EMBEDDINGS_FIELDS, "EmbeddingRequest")
        keep_alive_s = self._keep_alive(body)
        model = body.get("model") or ""
        if not model:
            raise ApiError(400, "model is required")
        spec = self._lookup(model)
        options = parse_options(body.get("options"), spec, self.settings.default_num_ctx)
        prompt = body.get("prompt") or ""
        async with self._lease(spec, options, keep_alive_s, need_slot=True) as lease:
            if not prompt:
                return web.json_response({"embedding": []})
            tokens = text.count_tokens(prompt) + EMBED_SPECIAL_TOKENS
            await self._prefill(lease, min(tokens, options.num_ctx))
            return web.json_response({"embedding": self._raw_vector(spec, prompt)})

    def _raw_vector(self, spec: OllamaModelSpec, content: str) -> list[float]:
        return vectors.raw_embedding(self.seed, spec.name, content, spec.embedding_length)

    # -- the OpenAI-compatible routes ----------------------------------------------------------

    def _answer_id(self, prefix: str) -> str:
        return f"{prefix}-{self._ids.randrange(999)}"

    def _unix_now(self) -> int:
        return int(self.clock.wall().timestamp())

    async def _openai_chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_object(request, "ChatCompletionRequest")
        native = ollama_openai.chat_request(body)
        wire = ChatCompletionWire(
            self._answer_id("chatcmpl"),
            self._unix_now(),
            include_usage=ollama_openai.include_usage(body),
        )
        return await self._run_chat(request, native, wire)

    async def _openai_completion(self, request: web.Request) -> web.StreamResponse:
        body = await read_object(request, "CompletionRequest")
        native = ollama_openai.completion_request(body)
        wire = CompletionWire(
            self._answer_id("cmpl"),
            self._unix_now(),
            include_usage=ollama_openai.include_usage(body),
        )
        return await self._run_generate(request, native, wire)

    async def _openai_embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await read_object(request, "EmbedRequest")
        native, encoding = ollama_openai.embedding_request(body)
        answer = await self._embed_native(native)
        return web.json_response(ollama_openai.embedding_list(native["model"], answer, encoding))

    async def _openai_models(self, request: web.Request) -> web.StreamResponse:
        models = [(spec.name, spec.modified_at) for spec in self.catalog.ollama_models]
        return web.json_response(ollama_openai.model_list(models))

    async def _openai_model(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["model"]
        spec = self.catalog.ollama_model(name)
        if spec is None:
            raise ApiError(404, f"model '{name}' not found")
        return web.json_response(ollama_openai.model_object(name, spec.modified_at))


# -- helpers outside the class -----------------------------------------------------------------


def _embed_inputs(value: object) -> list[str]:
    """The texts of an `/api/embed` request's `input`: a string (empty: none) or a list of
    strings; anything else is 400 `invalid input type`."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ApiError(400, "invalid input type")


@web.middleware
async def _gin_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Ollama's error bodies: gin's plain 404/405 for routing, `{"error": ...}` for the API,
    OpenAI's shape on the `/v1` routes."""
    try:
        return await handler(request)
    except ApiError as exc:
        if request.path.startswith("/v1/"):
            body = ollama_openai.error_body(exc.status, exc.message)
            return web.json_response(body, status=exc.status)
        return error_response(exc.status, exc.message)
    except web.HTTPNotFound:
        return web.Response(status=404, text="404 page not found")
    except web.HTTPMethodNotAllowed:
        return web.Response(status=405, text="405 method not allowed")
