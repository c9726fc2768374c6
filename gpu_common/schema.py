"""The agent's wire models: every body its HTTP API sends or accepts (adapter layer).

The controller imports these to read the agent, so this module is the one contract between them.
Bytes everywhere; seconds as floats; times as ISO 8601 UTC.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Owner = Literal["ollama", "comfyui", "other"]
TelemetryStatus = Literal["ok", "degraded", "no_gpu"]
PromptState = Literal[
    "pending", "running", "succeeded", "failed", "interrupted", "cancelled", "unknown"
]
FINAL_STATES: frozenset[PromptState] = frozenset(
    {"succeeded", "failed", "interrupted", "cancelled", "unknown"}
)
"""A prompt in one of these states never changes state again."""
OOM_REASON = "ran out of GPU memory"
"""A failed prompt's `reason` when ComfyUI ran out of GPU memory: the controller retries those."""
UNKNOWN_REASON = "ComfyUI no longer knows this prompt (it restarted)"
"""An `unknown` prompt's `reason`: it is in neither ComfyUI's queue nor its history."""
ConnectionState = Literal["websocket", "polling", "down"]

MODEL_NAME_MAX = 200
MODEL_NAME_PATTERN = (
    r"^[^\u0000-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]+$"
)
"""A model name: no whitespace and no control characters (Ollama's names are `ns/name:tag`).
Spelled with explicit code points so that Python and the JSON Schema (ECMA 262) regexes agree."""
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)

GO_DURATION_PATTERN = r"^[-+]?(0|(([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h))+)$"
"""A Go `time.Duration` as Ollama parses `keep_alive` strings: "5m", "1h30m", "-1s", "0"."""

MAX_WORKFLOW_NODES = 2000
"""The most nodes a workflow may have. Real graphs have tens to a few hundred; ComfyUI checks a
graph recursively and keeps every output, so a far larger one is refused up front with a 400
instead of tying up the queue (and, for the controller, the output copy) for minutes."""

WORKFLOW_NODE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["class_type"],
    "properties": {
        "class_type": {"type": "string", "description": "the node's class, e.g. KSampler"},
        "inputs": {"type": "object", "description": "input name -> value or [node_id, output]"},
    },
    "description": "one node in ComfyUI's API format",
}
"""What a workflow node must be: the agent checks that it is an object and ComfyUI the rest; the
controller checks its class_type and inputs itself before it queues the job."""


class WireModel(BaseModel):
    """Base of every wire model: unknown fields in requests are errors, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class RequestModel(WireModel):
    """Base of every request body: strict types, so `0` is no boolean and `"512"` no integer;
    what the schema calls invalid, the service refuses."""

    model_config = ConfigDict(extra="forbid", strict=True)


def integral(value: object) -> object:
    """A request's integer field, before its strict check: JSON Schema counts 677.0 as an
    integer, and so does the service; a string or a boolean still is none."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class ErrorBody(WireModel):
    """An error: a stable `code` to act on, a `message` for people, and optional `details`."""

    code: str
    message: str
    details: dict[str, Any] | None = None


class ErrorResponse(WireModel):
    """Every error the services themselves answer: `{"error": {"code", "message"}}`."""

    error: ErrorBody


class OllamaErrorResponse(WireModel):
    """An error in Ollama's own shape, `{"error": "..."}`, as Ollama's API answers it."""

    error: str


class OpenAIErrorBody(WireModel):
    """An error as OpenAI's API (and Ollama's compatibility layer) words it: `type` is
    `invalid_request_error` (400), `not_found_error` (404) or `api_error`; `code` is ours
    when the service answered itself, null when Ollama did."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(WireModel):
    """An error in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`."""

    error: OpenAIErrorBody


class AgentHealth(WireModel):
    """`GET /healthz`: the agent is up; how its telemetry is."""

    status: Literal["ok"]
    telemetry: TelemetryStatus


# -- telemetry -------------------------------------------------------------------------------


class GpuProcessInfo(WireModel):
    """A process using a GPU, the service it belongs to, and its GPU memory (null when unknown)."""

    pid: int
    owner: Owner
    name: str | None
    used_bytes: int | None


class GpuInfo(WireModel):
    """One GPU: its memory, utilization, temperature and power, and the processes using it."""

    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    memory_reserved_bytes: int | None
    utilization_gpu_percent: int | None
    utilization_memory_percent: int | None
    temperature_c: int | None
    power_w: float | None
    power_limit_w: float | None
    memory_by_owner_bytes: dict[str, int]
    processes: list[GpuProcessInfo]


class HostInfo(WireModel):
    """The host's CPU load and memory."""

    cpu_percent: float
    cpu_count: int
    load_1m: float
    load_5m: float
    load_15m: float
    memory_total_bytes: int
    memory_available_bytes: int
    memory_used_bytes: int
    swap_used_bytes: int


class TelemetryInfo(WireModel):
    """The latest GPU and host reading: when it was taken and, if degraded, why."""

    status: TelemetryStatus
    reason: str | None
    backend: str | None
    driver_version: str | None
    taken_at: datetime | None
    age_s: float | None
    sample_interval_s: float
    gpus: list[GpuInfo]
    host: HostInfo | None


# -- Ollama ----------------------------------------------------------------------------------


class AvailableModelInfo(WireModel):
    """A model Ollama has on disk, and what it can do (`completion`, `embedding`, ...; null
    from an Ollama too old to list capabilities)."""

    name: str
    size_bytes: int
    family: str | None
    parameter_size: str | None
    quantization_level: str | None
    capabilities: list[str] | None = None


class ResidentModelInfo(WireModel):
    """A model Ollama has in memory, and the requests it is serving."""

    name: str
    size_bytes: int
    vram_bytes: int
    context_length: int | None
    expires_at: datetime | None
    in_flight: int
    offloaded: bool = Field(description="part of the model runs on the CPU (vram < size)")


class OllamaInfo(WireModel):
    """Ollama: whether it answers, its models on disk and in memory, and requests in flight."""

    reachable: bool
    error: str | None
    version: str | None
    checked_at: datetime | None
    available: list[AvailableModelInfo]
    resident: list[ResidentModelInfo]
    in_flight: dict[str, int]


def _check_model_name(value: str) -> str:
    if not _MODEL_NAME.match(value):
        raise ValueError("model is not a valid model name (no spaces or control characters)")
    return value


ModelName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MODEL_NAME_MAX,
        json_schema_extra={"pattern": MODEL_NAME_PATTERN},
        description="an Ollama model name, e.g. qwen2.5:14b",
    ),
]
GoDuration = Annotated[str, Field(pattern=GO_DURATION_PATTERN)]


class LoadRequest(RequestModel):
    """A model to load, how long Ollama keeps it, and its context length in tokens."""

    model: ModelName
    keep_alive: float | GoDuration | None = Field(
        default=None, description="Ollama keep_alive: seconds, a Go duration, or negative=forever"
    )
    num_ctx: int | None = Field(default=None, ge=256, le=1_048_576)

    _name = field_validator("model")(_check_model_name)
    _integral = field_validator("num_ctx", mode="before")(integral)


class LoadResult(WireModel):
    """A finished load: how long it took and the memory the model holds."""

    model: str
    already_resident: bool
    load_time_s: float
    size_bytes: int
    vram_bytes: int
    context_length: int | None
    nvml_delta_bytes: int | None = Field(
        description="Ollama's GPU memory before vs after, per NVML"
    )


class UnloadRequest(RequestModel):
    """A model to unload; `force` unloads it even while it serves requests."""

    model: ModelName
    force: bool = False

    _name = field_validator("model")(_check_model_name)


class UnloadResult(WireModel):
    """A finished unload: the memory that came back, how long it took, and what confirmed it."""

    model: str
    was_resident: bool
    freed_bytes: int
    wait_s: float
    confirmed_by: Literal["nvml", "ollama"]


# -- ComfyUI ---------------------------------------------------------------------------------


class OutputFileInfo(WireModel):
    """A file a prompt wrote, as ComfyUI names it."""

    node_id: str
    filename: str
    subfolder: str
    type: str


class PromptInfo(WireModel):
    """A ComfyUI prompt: its state, progress, output files and, if it failed, why."""

    prompt_id: str
    state: PromptState
    submitted_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    node: str | None
    step: int | None
    steps: int | None
    nodes_done: int
    nodes_total: int
    outputs: list[OutputFileInfo]
    error: str | None
    error_type: str | None
    reason: str | None
    peak_vram_bytes: int | None = Field(
        default=None,
        ge=0,
        description="ComfyUI's GPU memory at its highest while the prompt ran, from readings "
        "taken during the run; null when none was",
    )


Workflow = Annotated[
    dict[str, Any],
    Field(
        description="a ComfyUI workflow in API format: node id -> node",
        json_schema_extra={
            "minProperties": 1,
            "maxProperties": MAX_WORKFLOW_NODES,
            "additionalProperties": WORKFLOW_NODE_SCHEMA,
        },
    ),
]
"""A workflow as the wire takes it; the JSON Schema says what `gpu_common.http.check_workflow`
and the models' validators check, so their own error messages stay the ones a client sees."""


class PromptSubmit(RequestModel):
    """A workflow to queue on ComfyUI; sending a `prompt_id` again returns that prompt."""

    workflow: Workflow
    prompt_id: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
    )

    @field_validator("workflow")
    @classmethod
    def _non_empty(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            raise ValueError("workflow must have at least one node")
        return value


class FreeRequest(RequestModel):
    """What ComfyUI should release: its loaded models, its cached memory, or both."""

    unload_models: bool = True
    free_memory: bool = True


UploadType = Literal["input", "output", "temp"]


class UploadResult(WireModel):
    """Where ComfyUI put an uploaded picture (its `/upload/image` answer): the name it chose,
    which differs from the name sent when another file had it, the subfolder and the folder."""

    name: str
    subfolder: str
    type: UploadType

    def reference(self) -> str:
        """The file as LoadImage names it: `subfolder/name`, with ` [type]` unless it is in
        the input folder (ComfyUI's annotated file path)."""
        path = f"{self.subfolder}/{self.name}" if self.subfolder else self.name
        return path if self.type == "input" else f"{path} [{self.type}]"


class FreeResult(WireModel):
    """A finished free: the GPU memory that came back, how long it took, and what confirmed it."""

    freed_bytes: int
    wait_s: float
    confirmed_by: Literal["nvml", "comfyui"]


class ComfyUIInfo(WireModel):
    """ComfyUI: whether it answers, how the agent follows it, its queue and its recent prompts."""

    reachable: bool
    connection: ConnectionState
    last_message_age_s: float | None
    queue_running: int
    queue_pending: int
    prompts: list[PromptInfo]


# -- the whole agent -------------------------------------------------------------------------


class AgentStatus(WireModel):
    """A snapshot of the desktop: GPU and host telemetry, Ollama and ComfyUI."""

    agent: str
    version: str
    started_at: datetime
    now: datetime
    telemetry: TelemetryInfo
    ollama: OllamaInfo
    comfyui: ComfyUIInfo


class AgentEvent(WireModel):
    """One message on `/v1/events`: a status snapshot, or a prompt or model event."""

    type: Literal["snapshot", "prompt", "model"]
    at: datetime
    status: AgentStatus | None = None
    prompt: PromptInfo | None = None
    event: str | None = Field(
        default=None, description="submitted/started/progress/finished, loaded/unloaded"
    )
    model: str | None = None
    detail: dict[str, Any] | None = None
