"""Plain values the policy core reasons about (pure core).

Bytes are ints, durations and instants are float seconds on the caller's monotonic clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

GB = 1_000_000_000

Task = Literal["generate", "chat", "embed"]
"""What an LLM request asks of its model: a completion, a chat turn, or embeddings."""


def gb(nbytes: float) -> str:
    """Bytes as the "9.1 GB" that reasons print."""
    return f"{nbytes / GB:.1f} GB"


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """What the controller believes about one LLM: measured where it has measured, else defaults.
    An `embedding` model serves only embeddings; the auto intents never pick it."""

    name: str
    quality: float
    vram_bytes: int
    size_bytes: int
    decode_tokens_per_s: float
    prompt_tokens_per_s: float
    load_s: float
    measured: bool = False
    embedding: bool = False

    @property
    def fits_on_gpu(self) -> bool:
        return self.vram_bytes >= self.size_bytes


@dataclass(frozen=True, slots=True)
class ResidentModel:
    """A model an agent's Ollama has loaded."""

    name: str
    vram_bytes: int
    size_bytes: int
    in_flight: int
    loaded_at: float
    last_used_at: float

    @property
    def busy(self) -> bool:
        return self.in_flight > 0

    @property
    def spilled(self) -> bool:
        return self.vram_bytes < self.size_bytes


@dataclass(frozen=True, slots=True)
class RunningImage:
    """The image job an agent's ComfyUI is running for us now."""

    job_id: str
    peak_bytes: int
    family: str
    started_at: float


@dataclass(frozen=True, slots=True)
class AgentState:
    """One agent as the core sees it, gathered by the engine at `now`.

    `used_bytes` is NVML's device-wide figure: the desktop, every Ollama runner and ComfyUI.
    `pending_bytes` is memory promised to work that NVML does not show yet (a load in progress,
    an image job dispatched but not yet at its peak), so two decisions in a row cannot both
    spend the same free memory.
    """

    name: str
    healthy: bool
    total_bytes: int
    used_bytes: int
    reserve_bytes: int
    resident: tuple[ResidentModel, ...] = ()
    pending_bytes: int = 0
    comfy_bytes: int = 0
    comfy_floor_bytes: int = 0
    comfy_family: str | None = None
    image_running: RunningImage | None = None
    llm_queued: tuple[tuple[str, int], ...] = ()
    held_image_since: float | None = None
    unhealthy_reason: str | None = None

    @property
    def budget_bytes(self) -> int:
        """What the controller lets work use: the card less the configured reserve."""
        return max(0, self.total_bytes - self.reserve_bytes)

    @property
    def free_bytes(self) -> int:
        """Budget left after what is in use and what is promised."""
        return self.budget_bytes - self.used_bytes - self.pending_bytes

    @property
    def comfy_freeable_bytes(self) -> int:
        """What ComfyUI's `/free` would give back (its cache, not its CUDA context)."""
        if self.image_running is not None:
            return 0
        return max(0, self.comfy_bytes - self.comfy_floor_bytes)

    def resident_model(self, name: str) -> ResidentModel | None:
        """The model `name` if it is loaded here, else None."""
        return next((m for m in self.resident if m.name == name), None)

    def queued_for(self, model: str) -> int:
        """How many LLM requests here wait for `model` to finish loading."""
        return next((n for name, n in self.llm_queued if name == model), 0)


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Knobs of the policy; every default is what a 12 GB studio desktop wants."""

    # Never evict a model loaded less than this long ago (no thrash) ...
    min_residency_s: float = 30.0
    # ... unless an image job has been held longer than this (no starvation); past it, no new
    # LLM loads start on that agent until the job runs.
    max_hold_s: float = 60.0
    # An image job held less than this lets LLM requests that wait for room go first
    # (interactive requests are short); past it, it competes for room on equal terms.
    image_yield_s: float = 20.0
    # auto: the fastest model whose quality is within this many points of the best candidate.
    auto_quality_slack: float = 12.0
    # Expected output when a request does not say (num_predict).
    default_output_tokens: int = 256
    # Seconds an unload or a ComfyUI /free takes before the memory is back.
    unload_s: float = 1.0
    free_s: float = 0.5
    # Telemetry older than this makes an agent ineligible.
    stale_after_s: float = 10.0


@dataclass(frozen=True, slots=True)
class LlmRequest:
    """One generation to place. `model` is a model name or "auto", "auto:fast", "auto:quality".

    `min_quality` (0-100) and `max_latency_s` are the caller's limits on the choice. For
    "auto:quality" they also say what the caller accepts instead of waiting for the top model
    (see `controller.domain.selection`); without them it waits. `task` "embed" asks for
    embeddings, which produce no output tokens and name their model.
    """

    model: str
    prompt_tokens: int
    output_tokens: int | None = None
    min_quality: float | None = None
    max_latency_s: float | None = None
    task: Task = "generate"


@dataclass(frozen=True, slots=True)
class ImageJob:
    """An image job waiting for GPU memory."""

    job_id: str
    peak_bytes: int
    family: str
    priority: int
    submitted_at: float
    footprint_reason: str = field(default="", compare=False)
