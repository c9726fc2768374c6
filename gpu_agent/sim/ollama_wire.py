"""Ollama's wire format for the emulated server (simulated-desktop layer).

Pure functions with no server state: request bodies checked the way Ollama's Go handlers decode
them (field types, `keep_alive` as seconds or a Go duration, `options` as `api.Options.FromMap`
reads them) with Ollama's error texts, and the response pieces (Go timestamps, model details,
the /api/show body). protocols.md part A is the reference.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any

from aiohttp import web

from gpu_agent.sim import text
from gpu_agent.sim.catalog import OllamaModelSpec
from gpu_agent.sim.ollama_scheduler import ApiError

STOP_TOKENS = MappingProxyType(
    {
        "qwen2": ("<|im_start|>", "<|im_end|>"),
        "llama": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    }
)


# -- request parsing ---------------------------------------------------------------------------

_GO_UNITS_S = MappingProxyType(
    {
        "ns": 1e-9,
        "us": 1e-6,
        "µs": 1e-6,  # U+00B5
        "μs": 1e-6,  # U+03BC
        "ms": 1e-3,
        "s": 1.0,
        "m": 60.0,
        "h": 3600.0,
    }
)
_GO_NUMBER = re.compile(r"(\d*)(?:\.(\d*))?")
_GO_UNIT = re.compile(r"[^0-9.]*")


def parse_go_duration(value: str) -> float:
    """Seconds in a Go duration string ("5m", "1h30m", "300ms", "-1m"); ValueError in Go's words."""
    quoted = json.dumps(value, ensure_ascii=False)
    rest = value
    negative = False
    if rest[:1] in ("-", "+"):
        negative = rest[0] == "-"
        rest = rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise ValueError(f"time: invalid duration {quoted}")
    total_s = 0.0
    while rest:
        number = _GO_NUMBER.match(rest)
        assert number is not None  # the pattern matches the empty string
        whole, fraction = number.group(1), number.group(2)
        if not whole and not fraction:
            raise ValueError(f"time: invalid duration {quoted}")
        rest = rest[number.end() :]
        unit_match = _GO_UNIT.match(rest)
        unit = unit_match.group(0) if unit_match else ""
        if not unit:
            raise ValueError(f"time: missing unit in duration {quoted}")
        if unit not in _GO_UNITS_S:
            raise ValueError(
                f"time: unknown unit {json.dumps(unit, ensure_ascii=False)} in duration {quoted}"
            )
        rest = rest[len(unit) :]
        total_s += float(f"{whole or 0}.{fraction or 0}") * _GO_UNITS_S[unit]
    return -total_s if negative else total_s


def _go_type(value: object) -> str:
    """The Go type `json.Unmarshal` into `any` gives `value`, as reflect prints it."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "[]interface {}"
    return "map[string]interface {}"


def parse_keep_alive(value: object) -> float:
    """Seconds from a request's `keep_alive` (api.Duration); math.inf = forever; ApiError 400."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return math.inf if value < 0 else float(value)
    if isinstance(value, str):
        try:
            seconds = parse_go_duration(value)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return math.inf if seconds < 0 else seconds
    raise ApiError(400, f"Unsupported type: '{_go_type(value)}'")


def json_kind(value: object) -> str:
    """How Go's decoder names a JSON value in "cannot unmarshal X into ..." messages."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _is_str(v: object) -> bool:
    return isinstance(v, str)


def _is_bool(v: object) -> bool:
    return isinstance(v, bool)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_object(v: object) -> bool:
    return isinstance(v, dict)


def _is_array(v: object) -> bool:
    return isinstance(v, list)


def _is_anything(v: object) -> bool:
    return True


def _is_think(v: object) -> bool:
    return isinstance(v, bool | str)


# field -> (accepts the JSON value, Go type of the field). null is always accepted (Go no-op).
_Fields = Mapping[str, tuple[Callable[[object], bool], str]]
GENERATE_FIELDS: _Fields = MappingProxyType(
    {
        "model": (_is_str, "string"),
        "prompt": (_is_str, "string"),
        "suffix": (_is_str, "string"),
        "system": (_is_str, "string"),
        "template": (_is_str, "string"),
        "context": (_is_array, "[]int"),
        "stream": (_is_bool, "bool"),
        "raw": (_is_bool, "bool"),
        "format": (_is_anything, "json.RawMessage"),
        "images": (_is_array, "[]api.ImageData"),
        "options": (_is_object, "map[string]interface {}"),
        "think": (_is_think, "api.ThinkValue"),
        "truncate": (_is_bool, "bool"),
        "shift": (_is_bool, "bool"),
        "logprobs": (_is_bool, "bool"),
        "top_logprobs": (_is_int, "int"),
    }
)
CHAT_FIELDS: _Fields = MappingProxyType(
    {
        "model": (_is_str, "string"),
        "messages": (_is_array, "[]api.Message"),
        "tools": (_is_array, "api.Tools"),
        "stream": (_is_bool, "bool"),
        "format": (_is_anything, "json.RawMessage"),
        "options": (_is_object, "map[string]interface {}"),
        "think": (_is_think, "api.ThinkValue"),
        "truncate": (_is_bool, "bool"),
        "shift": (_is_bool, "bool"),
        "logprobs": (_is_bool, "bool"),
        "top_logprobs": (_is_int, "int"),
    }
)
MESSAGE_FIELDS: _Fields = MappingProxyType(
    {
        "role": (_is_str, "string"),
        "content": (_is_str, "string"),
        "thinking": (_is_str, "string"),
        "images": (_is_array, "[]api.ImageData"),
        "tool_calls": (_is_array, "[]api.ToolCall"),
        "tool_name": (_is_str, "string"),
        "tool_call_id": (_is_str, "string"),
    }
)
EMBED_FIELDS: _Fields = MappingProxyType(
    {
        "model": (_is_str, "string"),
        "input": (_is_anything, "interface {}"),
        "keep_alive": (_is_anything, "api.Duration"),
        "truncate": (_is_bool, "bool"),
        "dimensions": (_is_int, "int"),
        "options": (_is_object, "map[string]interface {}"),
    }
)
EMBEDDINGS_FIELDS: _Fields = MappingProxyType(
    {
        "model": (_is_str, "string"),
        "prompt": (_is_str, "string"),
        "keep_alive": (_is_anything, "api.Duration"),
        "options": (_is_object, "map[string]interface {}"),
    }
)
SHOW_FIELDS: _Fields = MappingProxyType(
    {
        "model": (_is_str, "string"),
        "name": (_is_str, "string"),
        "system": (_is_str, "string"),
        "template": (_is_str, "string"),
        "verbose": (_is_bool, "bool"),
        "options": (_is_object, "map[string]interface {}"),
    }
)

_INT_OPTIONS = frozenset(
    {"num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch"}
    | {"num_gpu", "main_gpu", "num_thread"}
)
_FLOAT_OPTIONS = frozenset(
    {"top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty"}
    | {"frequency_penalty"}
)


def check_fields(body: dict[str, Any], fields: _Fields, struct: str, path: str = "") -> None:
    """Reject a field whose JSON type Go could not decode into `struct`, in Go's words (400)."""
    for name, (accepts, go_type) in fields.items():
        value = body.get(name)
        if value is not None and not accepts(value):
            raise ApiError(
                400,
                f"json: cannot unmarshal {json_kind(value)} into Go struct field "
                f"{struct}.{path}{name} of type {go_type}",
            )


def _go_syntax_error(exc: json.JSONDecodeError) -> str:
    """Go's encoding/json wording for a malformed body (close enough for clients to show)."""
    if exc.pos >= len(exc.doc.rstrip()):
        return "unexpected EOF"
    char = exc.doc[exc.pos]
    if exc.msg.startswith("Expecting property name"):
        return f"invalid character {char!r} looking for beginning of object key string"
    if exc.msg.startswith("Extra data"):
        return f"invalid character {char!r} after top-level value"
    if exc.msg.startswith("Expecting ',' delimiter"):
        return f"invalid character {char!r} after object key:value pair"
    if exc.msg.startswith("Expecting ':' delimiter"):
        return f"invalid character {char!r} after object key"
    return f"invalid character {char!r} looking for beginning of value"


async def read_object(request: web.Request, struct: str) -> dict[str, Any]:
    """The JSON object in the body; 400 for an empty body, bad JSON or a non-object."""
    raw = await request.read()
    if not raw.strip():
        raise ApiError(400, "missing request body")
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ApiError(400, _go_syntax_error(exc)) from None
    except UnicodeDecodeError:
        raise ApiError(400, "invalid character in request body") from None
    if not isinstance(body, dict):
        raise ApiError(
            400, f"json: cannot unmarshal {json_kind(body)} into Go value of type api.{struct}"
        )
    return body


@dataclass(frozen=True, slots=True)
class RequestOptions:
    """The request options the emulator acts on (the rest are type-checked and ignored)."""

    num_ctx: int
    num_gpu: int
    num_predict: int
    seed: int | None
    stop: tuple[str, ...]


def parse_options(
    raw: dict[str, Any] | None, spec: OllamaModelSpec, default_ctx: int
) -> RequestOptions:
    """api.Options.FromMap: wrong types fail the request with 500 and Ollama's message."""
    raw = raw or {}
    for key in sorted(raw):
        value = raw[key]
        if value is None:
            continue
        if key in _INT_OPTIONS and not (isinstance(value, int | float) and not _is_bool(value)):
            raise ApiError(500, f'option "{key}" must be of type integer')
        if key in _FLOAT_OPTIONS and not (isinstance(value, int | float) and not _is_bool(value)):
            raise ApiError(500, f'option "{key}" must be of type float32')
        if key == "use_mmap" and not _is_bool(value):
            raise ApiError(500, f'option "{key}" must be of type boolean')
        if key == "stop":
            if not isinstance(value, list):
                raise ApiError(500, f'option "{key}" must be of type array')
            if not all(isinstance(item, str) for item in value):
                raise ApiError(500, f'option "{key}" must be of an array of strings')

    def integer(key: str, default: int) -> int:
        value = raw.get(key)
        return default if value is None else int(value)

    num_ctx = integer("num_ctx", 0)
    num_ctx = default_ctx if num_ctx <= 0 else num_ctx
    seed = raw.get("seed")
    return RequestOptions(
        # Ollama caps the context at what the model was trained for.
        num_ctx=min(num_ctx, spec.context_length),
        num_gpu=integer("num_gpu", -1),
        num_predict=integer("num_predict", -1),
        seed=None if seed is None else int(seed),
        stop=tuple(raw.get("stop") or ()),
    )


# -- wire formatting ---------------------------------------------------------------------------


def go_time(moment: datetime) -> str:
    """RFC 3339 with trailing zeros of the fraction trimmed and `Z` for UTC, as Go prints it."""
    stamp = moment.strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{moment.microsecond:06d}".rstrip("0")
    if fraction:
        stamp += "." + fraction
    offset = moment.utcoffset()
    if not offset:
        return stamp + "Z"
    minutes = int(offset.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{stamp}{sign}{hours:02d}:{minutes:02d}"


def to_ns(seconds: float) -> int:
    """Simulated seconds as Go's integer-nanosecond time.Duration."""
    return max(0, round(seconds * 1e9))


def ndjson_line(obj: dict[str, Any]) -> bytes:
    """One NDJSON line, compact like Go's encoder."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def model_details(spec: OllamaModelSpec) -> dict[str, Any]:
    """The `details` object shared by /api/tags, /api/ps and /api/show."""
    return {
        "parent_model": "",
        "format": "gguf",
        "family": spec.family,
        "families": [spec.family],
        "parameter_size": spec.parameter_size,
        "quantization_level": spec.quantization_level,
    }


def error_response(status: int, message: str) -> web.StreamResponse:
    """Ollama's error body: `{"error": "<message>"}` with `status`."""
    return web.json_response({"error": message}, status=status)


class AnswerWire:
    """How a generation's answer is written: here Ollama's own NDJSON lines and JSON body.
    The OpenAI-compatible routes write theirs (`gpu_agent.sim.ollama_openai`) from the same
    native chunks and final line."""

    stream_content_type = "application/x-ndjson"

    def chunk(self, obj: dict[str, Any]) -> bytes:
        """One streamed piece (a native chunk object)."""
        return ndjson_line(obj)

    def final(self, obj: dict[str, Any]) -> bytes:
        """The end of a stream, from the native final line (with its counters)."""
        return ndjson_line(obj)

    def stream_error(self, message: str) -> bytes:
        """The last line of a stream that broke off after output began (status stays 200)."""
        return ndjson_line({"error": message})

    def whole(self, obj: dict[str, Any]) -> dict[str, Any]:
        """The body of a non-streamed answer, from the native final object."""
        return obj


NATIVE = AnswerWire()
"""Ollama's own wire; it holds no state, so every request shares it."""


def _parameter_count(spec: OllamaModelSpec) -> int:
    size = spec.parameter_size.upper()
    scale = {"B": 1e9, "M": 1e6}.get(size[-1:], 1.0)
    return int(float(size.rstrip("BM")) * scale)


def show_body(spec: OllamaModelSpec, *, verbose: bool) -> dict[str, Any]:
    """The /api/show answer for `spec`; `verbose` fills the tokenizer arrays and tensors."""
    stops = STOP_TOKENS.get(spec.family, ())
    parameters = "\n".join(f'stop{" " * 27}"{stop}"' for stop in stops)
    blob = f"/usr/share/ollama/.ollama/models/blobs/sha256-{spec.digest}"
    modelfile = (
        '# Modelfile generated by "ollama show"\n'
        "# To build a new Modelfile based on this, replace FROM with:\n"
        f"# FROM {spec.name}\n\n"
        f"FROM {blob}\n"
        f'TEMPLATE """{spec.template}"""\n'
        + "".join(f'PARAMETER stop "{stop}"\n' for stop in stops)
    )
    arch = spec.architecture
    tokens: list[str] | None = list(text.VOCABULARY) if verbose else None
    model_info: dict[str, Any] = {
        "general.architecture": arch,
        "general.file_type": 15,
        "general.parameter_count": _parameter_count(spec),
        "general.quantization_version": 2,
        f"{arch}.context_length": spec.context_length,
        "tokenizer.ggml.model": "gpt2",
        # Ollama blanks the big tokenizer arrays unless `verbose` is set.
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * len(tokens) if tokens is not None else None,
    }
    body: dict[str, Any] = {
        "modelfile": modelfile,
        "parameters": parameters,
        "template": spec.template,
        "details": model_details(spec),
        "model_info": model_info,
        "capabilities": list(spec.capabilities),
        "modified_at": spec.modified_at,
    }
    if verbose:
        body["tensors"] = [
            {"name": "token_embd.weight", "type": "Q4_K", "shape": [text.VOCABULARY_SIZE, 4096]},
            {"name": "output_norm.weight", "type": "F32", "shape": [4096]},
        ]
    return body
