"""The controller's own wire models (adapter layer): image jobs, models, fleet.

The Ollama-compatible routes speak Ollama's shapes; everything under `/v1` speaks these.
Errors use the agent's `ErrorResponse` shape: `{"error": {"code", "message"}}`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from gpu_common.schema import GpuInfo, ResidentModelInfo, WireModel

JobStateName = Literal["held", "dispatched", "running", "succeeded", "failed", "cancelled"]


class ImageSubmit(WireModel):
    """`POST /v1/images`: a ComfyUI workflow in API format."""

    workflow: dict[str, Any]
    vram_bytes: int | None = Field(
        default=None, ge=0, le=1 << 40, description="peak GPU memory, if the caller knows better"
    )
    priority: int = Field(default=0, ge=-100, le=100)


class ProgressInfo(WireModel):
    node: str | None = None
    step: int | None = None
    steps: int | None = None
    nodes_done: int | None = None
    nodes_total: int | None = None


class ImageJobInfo(WireModel):
    id: str
    state: JobStateName
    reason: str
    agent: str | None
    priority: int
    progress: ProgressInfo | None
    outputs: list[str] = Field(description="URLs of the output files, in order")
    error: str | None
    attempts: int
    vram_bytes: int | None = Field(description="the peak GPU memory the job was admitted with")
    created_at: datetime
    updated_at: datetime


class ModelInfo(WireModel):
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


class ModelsInfo(WireModel):
    models: list[ModelInfo]
    image_footprints_bytes: dict[str, int] = Field(
        description="learned peak memory per family:WIDTHxHEIGHTxBATCH"
    )


class HeldJobInfo(WireModel):
    id: str
    reason: str
    waiting_s: float
    vram_bytes: int | None
    family: str | None


class AgentInfo(WireModel):
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
    agents: list[AgentInfo]
    held_jobs: list[HeldJobInfo]
    jobs_by_state: dict[str, int]
