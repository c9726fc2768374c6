"""Learning and estimating GPU memory footprints and speeds (pure core).

LLMs: the VRAM of a fully loaded runner per (model, num_ctx), as the agent measured it; speeds
from Ollama's own final-line counters. Images: ComfyUI's peak process memory per (family,
width, height, batch). A hint in the request beats what was learned; what was learned beats
conservative defaults. Learned values are plain mappings the store persists.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

GIB = 1024**3
MIB = 1024**2

# Weight of a new measurement in the running speed averages.
SPEED_ALPHA = 0.3
# Prompts shorter than this are dominated by fixed overhead; they say little about prefill speed.
MIN_PROMPT_TOKENS_FOR_SPEED = 64


@dataclass(frozen=True, slots=True)
class ImageKey:
    """What sizes an image job's memory: the model family, the latent's width and height (pixels)
    and the batch size."""

    family: str
    width: int
    height: int
    batch: int

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.batch

    def encode(self) -> str:
        """`family:WIDTHxHEIGHTxBATCH`, the key learned peaks are stored under."""
        return f"{self.family}:{self.width}x{self.height}x{self.batch}"

    @staticmethod
    def decode(text: str) -> ImageKey:
        """The key back from `encode`'s text; raises ValueError when it is malformed."""
        family, _, dims = text.partition(":")
        width, height, batch = (int(part) for part in dims.split("x"))
        return ImageKey(family, width, height, batch)


@dataclass(frozen=True, slots=True)
class FamilyDefault:
    """Conservative peak of ComfyUI's process for one family before anything is measured."""

    base_pixels: int
    weights_bytes: int
    activation_bytes: int


# Rounded up from the 4070 SUPER figures: weights + sampler/VAE transient + CUDA context + cache.
IMAGE_DEFAULTS: Mapping[str, FamilyDefault] = {
    "sd15": FamilyDefault(512 * 512, int(2.5 * GIB), int(1.5 * GIB)),
    "sdxl": FamilyDefault(1024 * 1024, int(7.5 * GIB), int(2.5 * GIB)),
    "flux": FamilyDefault(1024 * 1024, int(10.5 * GIB), int(1.5 * GIB)),
    # A workflow with no checkpoint (EmptyImage -> SaveImage) holds little beyond the context.
    "none": FamilyDefault(1024 * 1024, 512 * MIB, 256 * MIB),
}
UNKNOWN_FAMILY = FamilyDefault(1024 * 1024, int(8 * GIB), int(3 * GIB))


def default_image_peak(key: ImageKey) -> int:
    """Conservative peak bytes for `key` before anything is measured: the family's weights plus
    its activations, scaled up (never down) with the pixel count."""
    base = IMAGE_DEFAULTS.get(key.family, UNKNOWN_FAMILY)
    scale = key.pixels / base.base_pixels
    return base.weights_bytes + int(base.activation_bytes * max(1.0, scale))


def estimate_image_peak(
    key: ImageKey, learned: Mapping[str, int], hint_bytes: int | None = None
) -> tuple[int, str]:
    """Expected peak bytes for a job, and where the figure comes from."""
    if hint_bytes is not None:
        return hint_bytes, "hint in the request"
    exact = learned.get(key.encode())
    if exact is not None:
        return exact, f"measured for {key.encode()}"
    # Same family at another size: keep the measured weights, scale the activations.
    base = IMAGE_DEFAULTS.get(key.family, UNKNOWN_FAMILY)
    same_family = sorted(
        (ImageKey.decode(k), v) for k, v in learned.items() if k.startswith(f"{key.family}:")
    )
    if same_family:
        near_key, near_bytes = min(
            same_family, key=lambda kv: (abs(math.log(kv[0].pixels / key.pixels)), kv[0].encode())
        )
        weights = max(
            0, near_bytes - int(base.activation_bytes * near_key.pixels / base.base_pixels)
        )
        activation = int(base.activation_bytes * key.pixels / base.base_pixels)
        estimate = max(weights + activation, near_bytes if key.pixels >= near_key.pixels else 0)
        return estimate, f"scaled from {near_key.encode()}"
    return default_image_peak(key), f"default for {key.family}"


def learn_image_peak(learned: Mapping[str, int], key: ImageKey, peak_bytes: int) -> dict[str, int]:
    """Record a measured peak. Keeps the larger of old and new: a peak that once happened can
    happen again, and admitting on a low figure is what ends in out-of-memory."""
    updated = dict(learned)
    updated[key.encode()] = max(peak_bytes, learned.get(key.encode(), 0))
    return updated


def llm_key(model: str, num_ctx: int) -> str:
    """`model@num_ctx`, the key learned LLM footprints are stored under."""
    return f"{model}@{num_ctx}"


def learn_llm_footprint(
    learned: Mapping[str, int], model: str, num_ctx: int, vram_bytes: int, size_bytes: int
) -> dict[str, int]:
    """Record a loaded runner's size. A partly offloaded runner says nothing about what the
    model needs on the GPU, so only its total size is kept (as what it would need)."""
    updated = dict(learned)
    updated[llm_key(model, num_ctx)] = max(vram_bytes, size_bytes)
    return updated


@dataclass(frozen=True, slots=True)
class SpeedSample:
    """The counters of one finished generation (Ollama's final NDJSON line; ns durations)."""

    prompt_eval_count: int
    prompt_eval_duration_ns: int
    eval_count: int
    eval_duration_ns: int
    load_duration_ns: int


@dataclass(frozen=True, slots=True)
class Speed:
    """Running averages of a model's speeds (None until measured) and the generations behind
    them."""

    decode_tokens_per_s: float | None = None
    prompt_tokens_per_s: float | None = None
    load_s: float | None = None
    samples: int = 0


def _blend(old: float | None, new: float) -> float:
    return new if old is None else (1 - SPEED_ALPHA) * old + SPEED_ALPHA * new


def learn_speed(speed: Speed, sample: SpeedSample, *, was_loaded: bool) -> Speed:
    """Fold one generation into the running averages. `was_loaded`: the request paid a load."""
    decode, prompt, load = speed.decode_tokens_per_s, speed.prompt_tokens_per_s, speed.load_s
    if sample.eval_count > 0 and sample.eval_duration_ns > 0:
        decode = _blend(decode, sample.eval_count / (sample.eval_duration_ns / 1e9))
    if (
        sample.prompt_eval_count >= MIN_PROMPT_TOKENS_FOR_SPEED
        and sample.prompt_eval_duration_ns > 0
    ):
        prompt = _blend(prompt, sample.prompt_eval_count / (sample.prompt_eval_duration_ns / 1e9))
    if was_loaded and sample.load_duration_ns > 0:
        load = _blend(load, sample.load_duration_ns / 1e9)
    return Speed(decode, prompt, load, speed.samples + 1)


def learn_load(speed: Speed, load_s: float) -> Speed:
    """Fold one measured load time (the agent's explicit load) into the running average."""
    return Speed(
        speed.decode_tokens_per_s, speed.prompt_tokens_per_s, _blend(speed.load_s, load_s),
        speed.samples,
    )  # fmt: skip
