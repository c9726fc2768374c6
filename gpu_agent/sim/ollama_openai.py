"""The OpenAI-compatible routes of the emulated Ollama (simulated-desktop layer).

Ollama serves OpenAI's API under `/v1` by turning each request into its native one and each
native answer back (`middleware/openai.go`, `openai/openai.go`; protocols-2.md part B). This
module makes the same conversions, with no server state: request converters that raise
`ApiError` with Ollama's messages, and answer writers (`ChatCompletionWire`,
`CompletionWire`) that turn the native chunks and final line into OpenAI's SSE stream or JSON
body, the way Ollama's response writers do:

- a chat stream opens with a chunk whose delta carries the role, sends the content, then a
  chunk with an empty delta and the finish reason, then (with `stream_options.include_usage`)
  a chunk with no choices and the usage, then `data: [DONE]`;
- a completions stream sends each piece, then the usage chunk when asked, then `[DONE]`;
- absent `temperature` and `top_p` become 1.0; `max_tokens` becomes `num_predict`;
- ids are `chatcmpl-N` / `cmpl-N` with N below 999; `system_fingerprint` is `fp_ollama`.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable, Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any

from gpu_agent.sim.ollama_scheduler import ApiError
from gpu_agent.sim.ollama_wire import AnswerWire, check_fields

OPENAI_STREAM = "text/event-stream"
FINGERPRINT = "fp_ollama"
DONE = b"data: [DONE]\n\n"
_IMAGE_PREFIXES = tuple(f"data:image/{kind};base64," for kind in ("jpeg", "jpg", "png", "webp"))
_EFFORTS: Mapping[str, bool | str] = MappingProxyType(
    {
        "none": False,
        "minimal": "low",
        "low": "low",
        "medium": "medium",
        "high": "high",
        "max": "max",
        "xhigh": "max",
        "ultra": "max",
    }
)


def _str(value: object) -> bool:
    return isinstance(value, str)


def _bool(value: object) -> bool:
    return isinstance(value, bool)


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _object(value: object) -> bool:
    return isinstance(value, dict)


def _array(value: object) -> bool:
    return isinstance(value, list)


def _anything(value: object) -> bool:
    return True


# field -> (accepts the JSON value, Go type of the field), as Go's decoder checks them.
CHAT_COMPLETION_FIELDS: Mapping[str, tuple[Callable[[object], bool], str]] = MappingProxyType(
    {
        "model": (_str, "string"),
        "messages": (_array, "[]openai.Message"),
        "stream": (_bool, "bool"),
        "stream_options": (_object, "openai.StreamOptions"),
        "max_tokens": (_int, "int"),
        "seed": (_int, "int"),
        "stop": (_anything, "interface {}"),
        "temperature": (_number, "float64"),
        "frequency_penalty": (_number, "float64"),
        "presence_penalty": (_number, "float64"),
        "top_p": (_number, "float64"),
        "response_format": (_object, "openai.ResponseFormat"),
        "tools": (_array, "[]api.Tool"),
        "reasoning": (_object, "openai.Reasoning"),
        "reasoning_effort": (_str, "string"),
        "logprobs": (_bool, "bool"),
        "top_logprobs": (_int, "int"),
    }
)
COMPLETION_FIELDS: Mapping[str, tuple[Callable[[object], bool], str]] = MappingProxyType(
    {
        "model": (_str, "string"),
        "prompt": (_str, "string"),
        "frequency_penalty": (_number, "float32"),
        "max_tokens": (_int, "int"),
        "presence_penalty": (_number, "float32"),
        "seed": (_int, "int"),
        "stop": (_anything, "interface {}"),
        "stream": (_bool, "bool"),
        "stream_options": (_object, "openai.StreamOptions"),
        "temperature": (_number, "float32"),
        "top_p": (_number, "float32"),
        "suffix": (_str, "string"),
        "logprobs": (_int, "int"),
    }
)
EMBEDDING_FIELDS: Mapping[str, tuple[Callable[[object], bool], str]] = MappingProxyType(
    {
        "model": (_str, "string"),
        "input": (_anything, "interface {}"),
        "dimensions": (_int, "int"),
        "encoding_format": (_str, "string"),
    }
)


def error_body(status: int, message: str) -> dict[str, Any]:
    """OpenAI's error body as Ollama's compatibility layer writes it (`openai.NewError`)."""
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def include_usage(body: dict[str, Any]) -> bool:
    """Whether a streamed request asked for the usage chunk (`stream_options.include_usage`)."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _options(body: dict[str, Any], *, chat: bool) -> dict[str, Any]:
    """The native options of a chat or completions request (`FromChatRequest`,
    `FromCompleteRequest`)."""
    options: dict[str, Any] = {}
    stop = body.get("stop")
    if isinstance(stop, str):
        options["stop"] = [stop]
    elif isinstance(stop, list):
        if not chat and not all(isinstance(item, str) for item in stop):
            bad = next(item for item in stop if not isinstance(item, str))
            raise ApiError(400, f"invalid type for 'stop' field: {type(bad).__name__}")
        options["stop"] = [item for item in stop if isinstance(item, str)]
    if body.get("max_tokens") is not None:
        options["num_predict"] = body["max_tokens"]
    temperature = body.get("temperature")
    options["temperature"] = 1.0 if temperature is None else temperature
    if body.get("seed") is not None:
        options["seed"] = body["seed"]
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) is not None or not chat:
            options[name] = body.get(name) or 0.0
    top_p = body.get("top_p")
    options["top_p"] = top_p if top_p else 1.0
    return options


def _image(url: str) -> str:
    """The base64 image of an `image_url` part (a data URL); 400 in Ollama's words otherwise."""
    if url.startswith(("http://", "https://")):
        raise ApiError(
            400,
            "image URLs are not currently supported, please use base64 encoded data instead",
        )
    data = None
    if url.startswith("data:;base64,"):
        data = url.removeprefix("data:;base64,")
    for prefix in _IMAGE_PREFIXES:
        if url.startswith(prefix):
            data = url.removeprefix(prefix)
    if data is None:
        raise ApiError(400, "invalid image input")
    try:
        base64.b64decode(data, validate=True)
    except ValueError:
        raise ApiError(400, "invalid image input") from None
    return data


def _messages(raw: list[Any]) -> list[dict[str, Any]]:
    """The native messages of a chat request: text parts become messages of their own and
    image parts messages with one image, as `FromChatRequest` splits them."""
    messages: list[dict[str, Any]] = []
    for message in raw:
        if not isinstance(message, dict):
            raise ApiError(
                400,
                "json: cannot unmarshal "
                f"{'array' if isinstance(message, list) else type(message).__name__} "
                "into Go struct field ChatCompletionRequest.messages of type openai.Message",
            )
        role = message.get("role") or ""
        content = message.get("content")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    raise ApiError(400, "invalid message format")
                if part.get("type") == "text" and isinstance(part.get("text"), str):
                    messages.append({"role": role, "content": part["text"]})
                elif part.get("type") == "image_url":
                    url = part.get("image_url")
                    if isinstance(url, dict):
                        url = url.get("url")
                    if not isinstance(url, str):
                        raise ApiError(400, "invalid message format")
                    messages.append({"role": role, "content": "", "images": [_image(url)]})
                else:
                    raise ApiError(400, "invalid message format")
        elif message.get("tool_calls") is not None:
            messages.append({"role": role, "content": ""})
        else:
            raise ApiError(400, f"invalid message content type: {_go_kind(content)}")
    return messages


def _go_kind(value: object) -> str:
    """How Go's `%T` prints a decoded JSON value."""
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "float64"
    return "map[string]interface {}"


def _think(body: dict[str, Any]) -> bool | str | None:
    reasoning = body.get("reasoning")
    effort = (
        reasoning.get("effort") if isinstance(reasoning, dict) else body.get("reasoning_effort")
    )
    if not effort:
        return None
    if effort not in _EFFORTS:
        raise ApiError(
            400,
            f'invalid reasoning value: "{effort}" (must be "minimal", "low", "medium", "high", '
            '"xhigh", "ultra", "max", or "none")',
        )
    return _EFFORTS[effort]


def chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """The native `/api/chat` body of a `/v1/chat/completions` request."""
    check_fields(body, CHAT_COMPLETION_FIELDS, "ChatCompletionRequest")
    if not body.get("messages"):
        raise ApiError(400, "[] is too short - 'messages'")
    native: dict[str, Any] = {
        "model": body.get("model") or "",
        "messages": _messages(body["messages"]),
        "options": _options(body, chat=True),
        "stream": body.get("stream") is True,
    }
    response_format = body.get("response_format")
    if isinstance(response_format, dict):
        kind = str(response_format.get("type") or "").strip().lower()
        schema = response_format.get("json_schema")
        if kind == "json_object":
            native["format"] = "json"
        elif kind == "json_schema" and isinstance(schema, dict) and "schema" in schema:
            native["format"] = schema["schema"]
    if body.get("tools"):
        native["tools"] = body["tools"]
    think = _think(body)
    if think is not None:
        native["think"] = think
    return native


def completion_request(body: dict[str, Any]) -> dict[str, Any]:
    """The native `/api/generate` body of a `/v1/completions` request (a string prompt only)."""
    check_fields(body, COMPLETION_FIELDS, "CompletionRequest")
    native: dict[str, Any] = {
        "model": body.get("model") or "",
        "prompt": body.get("prompt") or "",
        "options": _options(body, chat=False),
        "stream": body.get("stream") is True,
    }
    if body.get("suffix"):
        native["suffix"] = body["suffix"]
    return native


def embedding_request(body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The native `/api/embed` body of a `/v1/embeddings` request, and the encoding asked for
    (`float` or `base64`)."""
    check_fields(body, EMBEDDING_FIELDS, "EmbedRequest")
    encoding = body.get("encoding_format") or ""
    if encoding and encoding.lower() not in ("float", "base64"):
        raise ApiError(
            400,
            f"Invalid value for 'encoding_format' = {encoding}. "
            "Supported values: ['float', 'base64'].",
        )
    given = body.get("input")
    if given == "":
        given = [""]
    if given is None or given == []:
        raise ApiError(400, "invalid input")
    native: dict[str, Any] = {"model": body.get("model") or "", "input": given}
    if body.get("dimensions"):
        native["dimensions"] = body["dimensions"]
    return native, encoding.lower()


def embedding_list(model: str, native: dict[str, Any], encoding: str) -> dict[str, Any]:
    """The `/v1/embeddings` answer for a native `/api/embed` answer (`ToEmbeddingList`)."""
    data = []
    for index, vector in enumerate(native.get("embeddings") or []):
        value: Any = vector
        if encoding == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "embedding": value, "index": index})
    tokens = int(native.get("prompt_eval_count") or 0)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def unix_seconds(go_time: str) -> int:
    """Unix seconds of a Go RFC 3339 timestamp (up to nanoseconds)."""
    head, dot, rest = go_time.partition(".")
    if dot:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        go_time = f"{head}.{rest[: min(digits, 6)]}{rest[digits:]}"
    return int(datetime.fromisoformat(go_time.replace("Z", "+00:00")).timestamp())


def model_object(name: str, modified_at: str) -> dict[str, Any]:
    """One model as `/v1/models` lists it: `owned_by` is the name's namespace."""
    owner = name.split("/")[-2] if "/" in name else "library"
    return {"id": name, "object": "model", "created": unix_seconds(modified_at), "owned_by": owner}


def model_list(models: list[tuple[str, str]]) -> dict[str, Any]:
    """`/v1/models` for (name, modified_at) pairs; Ollama answers `data: null` for none."""
    return {"object": "list", "data": [model_object(n, m) for n, m in models] or None}


def _usage(final: dict[str, Any]) -> dict[str, int]:
    prompt = int(final.get("prompt_eval_count") or 0)
    completion = int(final.get("eval_count") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class _OpenAIWire(AnswerWire):
    """What OpenAI's two generation routes share: SSE framing, the id, one `created` per answer,
    and a late error as an SSE event with an error body (which OpenAI's clients raise)."""

    stream_content_type = OPENAI_STREAM

    def __init__(self, answer_id: str, created: int, *, include_usage: bool) -> None:
        self.answer_id = answer_id
        self.created = created
        self.include_usage = include_usage

    def stream_error(self, message: str) -> bytes:
        return _sse(error_body(500, message))


class ChatCompletionWire(_OpenAIWire):
    """Native chat chunks in, `chat.completion.chunk` SSE events or a `chat.completion` out."""

    def __init__(self, answer_id: str, created: int, *, include_usage: bool) -> None:
        super().__init__(answer_id, created, include_usage=include_usage)
        self._first_sent = False

    def _chunk(
        self, model: str, delta: dict[str, Any], finish_reason: str | None
    ) -> dict[str, Any]:
        return {
            "id": self.answer_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    def _content(self, obj: dict[str, Any]) -> bytes:
        delta: dict[str, Any] = {}
        if not self._first_sent:
            delta["role"] = "assistant"
        delta["content"] = (obj.get("message") or {}).get("content") or ""
        self._first_sent = True
        return _sse(self._chunk(obj["model"], delta, None))

    def chunk(self, obj: dict[str, Any]) -> bytes:
        return self._content(obj)

    def final(self, obj: dict[str, Any]) -> bytes:
        out = b""
        if not self._first_sent or (obj.get("message") or {}).get("content"):
            out += self._content(obj)
        finish = self._chunk(obj["model"], {}, obj.get("done_reason") or "stop")
        out += _sse(finish)
        if self.include_usage:
            out += _sse({**finish, "choices": [], "usage": _usage(obj)})
        return out + DONE

    def whole(self, obj: dict[str, Any]) -> dict[str, Any]:
        message = obj.get("message") or {}
        return {
            "id": self.answer_id,
            "object": "chat.completion",
            "created": self.created,
            "model": obj["model"],
            "system_fingerprint": FINGERPRINT,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": message.get("role") or "assistant",
                        "content": message.get("content") or "",
                    },
                    "finish_reason": obj.get("done_reason") or None,
                }
            ],
            "usage": _usage(obj),
        }


class CompletionWire(_OpenAIWire):
    """Native generate chunks in, `text_completion` SSE events or one `text_completion` out."""

    def _chunk(self, obj: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.answer_id,
            "object": "text_completion",
            "created": self.created,
            "choices": [
                {"text": obj.get("response") or "", "index": 0, "finish_reason": finish_reason}
            ],
            "model": obj["model"],
            "system_fingerprint": FINGERPRINT,
        }
        if self.include_usage:
            chunk["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        return chunk

    def chunk(self, obj: dict[str, Any]) -> bytes:
        return _sse(self._chunk(obj, None))

    def final(self, obj: dict[str, Any]) -> bytes:
        last = self._chunk(obj, obj.get("done_reason") or None)
        out = _sse(last)
        if self.include_usage:
            out += _sse({**last, "choices": [], "usage": _usage(obj)})
        return out + DONE

    def whole(self, obj: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.answer_id,
            "object": "text_completion",
            "created": self.created,
            "model": obj["model"],
            "system_fingerprint": FINGERPRINT,
            "choices": [
                {
                    "text": obj.get("response") or "",
                    "index": 0,
                    "finish_reason": obj.get("done_reason") or None,
                }
            ],
            "usage": _usage(obj),
        }
