"""The controller's own wire models (adapter layer): image jobs, models, fleet.

The Ollama-compatible routes speak Ollama's shapes and the OpenAI routes OpenAI's
(`gpu_common.schema`); the controller's own routes under `/v1` speak these, and their errors
are `{"error": {"code", "message"}}` (`gpu_common.error_shapes`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gpu_common.schema import (
    MAX_WORKFLOW_NODES,
    WORKFLOW_NODE_SCHEMA,
    GpuInfo,
    RequestModel,
    ResidentModelInfo,
    WireModel,
    integral,
)

JobStateName = Literal["held", "dispatched", "running", "succeeded", "failed", "cancelled"]

MAX_LATENT_SIDE = 16384
"""ComfyUI's MAX_RESOLUTION: the widest and tallest latent it makes."""
MAX_LATENT_BATCH = 4096
"""EmptyLatentImage's largest batch_size."""
LATENT_CLASSES = ("EmptyLatentImage", "EmptySD3LatentImage")
"""Node classes whose width, height and batch_size size a job (`controller.domain.workflows`)."""

_IMAGE_NODE_SCHEMA: dict[str, Any] = {
    "allOf": [
        WORKFLOW_NODE_SCHEMA,
        {
            "if": {
                "properties": {"class_type": {"enum": list(LATENT_CLASSES)}},
                "required": ["class_type"],
            },
            "then": {
                "properties": {
                    "inputs": {
                        "properties": {
                            "width": {"maximum": MAX_LATENT_SIDE},
                            "height": {"maximum": MAX_LATENT_SIDE},
                            "batch_size": {"maximum": MAX_LATENT_BATCH},
                        }
                    }
                }
            },
        },
    ]
}
# Anything but Python's whitespace (what str.strip() removes), spelled as code points so that
# Python and the JSON Schema (ECMA 262) regexes agree: a model name that is not blank.
_NOT_BLANK = (
    r"[^\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f"
    r"\u205f\u3000]"
)


class ImageSubmit(RequestModel):
    """`POST /v1/images`: a ComfyUI workflow in API format."""

    workflow: dict[str, Any] = Field(
        description="a ComfyUI workflow in API format: node id -> node",
        json_schema_extra={
            "minProperties": 1,
            "maxProperties": MAX_WORKFLOW_NODES,
            "additionalProperties": _IMAGE_NODE_SCHEMA,
        },
    )
    vram_bytes: int | None = Field(
        default=None, ge=0, le=1 << 40, description="peak GPU memory, if the caller knows better"
    )
    priority: int = Field(default=0, ge=-100, le=100)

    _integral = field_validator("vram_bytes", "priority", mode="before")(integral)


class ProgressInfo(WireModel):
    """How far a running image job has got: the node running, its sampler steps, and nodes done."""

    node: str | None = None
    step: int | None = None
    steps: int | None = None
    nodes_done: int | None = None
    nodes_total: int | None = None


class ImageJobInfo(WireModel):
    """An image job: its state and why, where it runs, its progress, and its output files."""

    id: str
    state: JobStateName
    reason: str
    agent: str | None
    priority: int
    progress: ProgressInfo | None
    outputs: list[str] = Field(description="URLs of the output files, in order")
    inputs: list[str] = Field(
        default_factory=list, description="names of the job's input pictures, as uploaded"
    )
    error: str | None
    attempts: int
    vram_bytes: int | None = Field(description="the peak GPU memory the job was admitted with")
    created_at: datetime
    updated_at: datetime


class ModelInfo(WireModel):
    """A catalogue model: quality score, memory needs, speeds, and which agents offer or hold it."""

    name: str
    quality: float
    vram_bytes: int
    size_bytes: int
    fits: bool = Field(description="fits in the smallest agent's budget without CPU spill")
    decode_tokens_per_s: float
    prompt_tokens_per_s: float
    load_s: float
    measured: bool
    samples: int
    agents: list[str]
    resident_on: list[str]
    embedding: bool = Field(
        default=False, description="serves only embeddings; the auto intents never pick it"
    )


class ModelsInfo(WireModel):
    """The model catalogue, and the peak GPU memory learned for each image size."""

    models: list[ModelInfo]
    image_footprints_bytes: dict[str, int] = Field(
        description="learned peak memory per family:WIDTHxHEIGHTxBATCH"
    )


class HeldJobInfo(WireModel):
    """An image job waiting for room on a GPU, why it waits, and since how long (seconds)."""

    id: str
    reason: str
    waiting_s: float
    vram_bytes: int | None
    family: str | None


class AgentInfo(WireModel):
    """An agent as the controller sees it: health, GPU memory budget and use, what runs there."""

    name: str
    url: str
    healthy: bool
    reason: str | None
    connected: bool
    age_s: float | None
    budget_bytes: int
    used_bytes: int
    pending_bytes: int
    free_bytes: int
    draining: bool = Field(description="an image job waited too long: no new LLM loads here")
    gpus: list[GpuInfo]
    resident: list[ResidentModelInfo]
    comfyui_connection: str | None
    image_running: str | None


class FleetInfo(WireModel):
    """Every agent, the image jobs waiting for room, and how many jobs are in each state."""

    agents: list[AgentInfo]
    held_jobs: list[HeldJobInfo]
    jobs_by_state: dict[str, int]


class ControllerHealth(WireModel):
    """`GET /healthz`: the controller is up; how many agents it has, and how many are healthy."""

    status: Literal["ok"]
    agents: int
    healthy_agents: int


# -- Ollama's shapes, as the Ollama-compatible routes take and answer them --------------------


class OllamaRequest(BaseModel):
    """What the controller reads in an Ollama request; every other field goes on to Ollama."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(
        pattern=_NOT_BLANK,
        description="an Ollama model, or auto, auto:fast, auto:quality to let the controller pick",
    )
    options: dict[str, Any] | None = None
    min_quality: float | None = Field(
        default=None, ge=0, description="the least quality score acceptable (or X-GPU-Min-Quality)"
    )
    max_latency_s: float | None = Field(
        default=None,
        ge=0,
        description="the longest acceptable answer time (or X-GPU-Max-Latency-S)",
    )


class OllamaGenerateRequest(OllamaRequest):
    """`POST /api/generate`."""

    prompt: str | None = None


class OllamaChatRequest(OllamaRequest):
    """`POST /api/chat`."""

    messages: list[Any] | None = None


class OllamaEmbedRequest(OllamaRequest):
    """`POST /api/embed`: `model` names an embedding model (or any model; no auto intent)."""

    input: str | list[str] | None = None


class OllamaEmbeddingsRequest(OllamaRequest):
    """`POST /api/embeddings`, Ollama's older route: one `prompt`."""

    prompt: str | None = None


class OllamaShowRequest(BaseModel):
    """`POST /api/show`: the model to describe (an auto intent describes itself)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(pattern=_NOT_BLANK, description="an Ollama model, or an auto intent")


class OllamaModelList(WireModel):
    """`GET /api/tags` and `GET /api/ps`: Ollama's model entries, over every agent."""

    models: list[dict[str, Any]]


class OllamaVersion(WireModel):
    """`GET /api/version`."""

    version: str
