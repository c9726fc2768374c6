"""The agent's wire models: every body its HTTP API sends or accepts (adapter layer).

The controller imports these to read the agent, so this module is the one contract between them.
Bytes everywhere; seconds as floats; times as ISO 8601 UTC.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

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


class WireModel(BaseModel):
    """Base of every wire model: unknown fields in requests are errors, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class ErrorBody(WireModel):
    code: str
    message: str
    details: dict[str, Any] | None = None


class ErrorResponse(WireModel):
    error: ErrorBody


# -- telemetry -------------------------------------------------------------------------------


class GpuProcessInfo(WireModel):
    pid: int
    owner: Owner
    name: str | None
    used_bytes: int | None


class GpuInfo(WireModel):
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
    name: str
    size_bytes: int
    family: str | None
    parameter_size: str | None
    quantization_level: str | None


class ResidentModelInfo(WireModel):
    name: str
    size_bytes: int
    vram_bytes: int
    context_length: int | None
    expires_at: datetime | None
    in_flight: int
    offloaded: bool = Field(description="part of the model runs on the CPU (vram < size)")


class OllamaInfo(WireModel):
    reachable: bool
    error: str | None
    version: str | None
    checked_at: datetime | None
    available: list[AvailableModelInfo]
    resident: list[ResidentModelInfo]
    in_flight: dict[str, int]


def _check_model_name(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("model must not be empty")
    if len(value) > MODEL_NAME_MAX or any(ch.isspace() or ord(ch) < 32 for ch in value):
        raise ValueError("model is not a valid model name")
    return value


class LoadRequest(WireModel):
    model: str
    keep_alive: str | float | None = Field(
        default=None, description="Ollama keep_alive: seconds, a Go duration, or negative=forever"
    )
    num_ctx: int | None = Field(default=None, ge=256, le=1_048_576)

    _name = field_validator("model")(_check_model_name)


class LoadResult(WireModel):
    model: str
    already_resident: bool
    load_time_s: float
    size_bytes: int
    vram_bytes: int
    context_length: int | None
    nvml_delta_bytes: int | None = Field(
        description="Ollama's GPU memory before vs after, per NVML"
    )


class UnloadRequest(WireModel):
    model: str
    force: bool = False

    _name = field_validator("model")(_check_model_name)


class UnloadResult(WireModel):
    model: str
    was_resident: bool
    freed_bytes: int
    wait_s: float
    confirmed_by: Literal["nvml", "ollama"]


# -- ComfyUI ---------------------------------------------------------------------------------


class OutputFileInfo(WireModel):
    node_id: str
    filename: str
    subfolder: str
    type: str


class PromptInfo(WireModel):
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


class PromptSubmit(WireModel):
    workflow: dict[str, Any]
    prompt_id: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
    )

    @field_validator("workflow")
    @classmethod
    def _non_empty(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            raise ValueError("workflow must have at least one node")
        return value


class FreeRequest(WireModel):
    unload_models: bool = True
    free_memory: bool = True


class FreeResult(WireModel):
    freed_bytes: int
    wait_s: float
    confirmed_by: Literal["nvml", "comfyui"]


class ComfyUIInfo(WireModel):
    reachable: bool
    connection: ConnectionState
    last_message_age_s: float | None
    queue_running: int
    queue_pending: int
    prompts: list[PromptInfo]


# -- the whole agent -------------------------------------------------------------------------


class AgentStatus(WireModel):
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
