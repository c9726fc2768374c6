"""What each emulated ComfyUI node does when it runs (simulator layer).

Nodes pass small value objects instead of tensors. GPU nodes load model parts through
`ComfyMemory`, hold their activations on the `SimGpu` while they run and take simulated time from
the catalogue's `CheckpointFamily` figures (hardware-figures.md §3); the image nodes write real PNG
files. Failures surface as `NodeFailure` (an exception inside a node) or `Interrupted`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu_agent.sim.catalog import GIB, MIB, Catalog, Checkpoint, CheckpointFamily
from gpu_agent.sim.clock import SimClock
from gpu_agent.sim.comfyui_memory import ComfyMemory, Part, Placement
from gpu_agent.sim.comfyui_settings import ComfyUIStats
from gpu_agent.sim.errors import SimOutOfMemory
from gpu_agent.sim.gpu import SimGpu
from gpu_agent.sim.png import encode_png, gradient_rows, solid_rows

log = logging.getLogger(__name__)

OOM_TIPS = (
    "This error means you ran out of memory on your GPU.\n\n"
    "TIPS: If the workflow worked before you might have accidentally set the batch_size to a "
    "large number."
)
OOM_EXCEPTION_TYPE = "torch.OutOfMemoryError"
# A tiled VAE decode runs tile by tile; assumed to take twice as long as a whole-image decode.
TILED_DECODE_SLOWDOWN = 2.0
# Batching gain on the sampler: about 6 % per image at batch 4 (hardware-figures.md §3b).
BATCH_GAIN_PER_IMAGE = 0.02
MAX_BATCH_GAIN = 0.1


class NodeFailure(Exception):
    """A node raised: reported as `execution_error` with this exception type and message."""

    def __init__(self, exception_type: str, message: str, *, oom: bool = False) -> None:
        super().__init__(message)
        self.exception_type = exception_type
        self.message = message
        self.oom = oom


class Interrupted(Exception):
    """`/interrupt` reached the running prompt (ComfyUI's InterruptProcessingException)."""


@dataclass(frozen=True, slots=True)
class CheckpointRef:
    """The MODEL, CLIP or VAE output of a checkpoint loader."""

    checkpoint: Checkpoint
    kind: str

    def __str__(self) -> str:
        return f"<{self.kind} of {self.checkpoint.filename}>"


@dataclass(frozen=True, slots=True)
class Conditioning:
    """CLIPTextEncode's output: the prompt text, encoded by this checkpoint's CLIP."""

    checkpoint: Checkpoint
    text: str


@dataclass(frozen=True, slots=True)
class Latent:
    """A latent batch in pixel dimensions; `seed` is the sampler's, 0 before sampling."""

    width: int
    height: int
    batch: int
    seed: int = 0


@dataclass(frozen=True, slots=True)
class Images:
    """Decoded images (pixels): a gradient keyed by `seed`, or solid 0xRRGGBB `color`."""

    width: int
    height: int
    batch: int
    seed: int = 0
    color: int | None = None


@dataclass(slots=True)
class PromptRun:
    """What one running prompt shares with its nodes."""

    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    check_interrupt: Callable[[], None]
    lowvram: bool = False


ProgressCallback = Callable[[int, int], None]
NodeResult = tuple[tuple[Any, ...], dict[str, Any] | None]


class NodeRuntime:
    """Runs nodes of one ComfyUI process against the shared simulated GPU."""

    def __init__(
        self,
        *,
        clock: SimClock,
        gpu: SimGpu,
        memory: ComfyMemory,
        catalog: Catalog,
        stats: ComfyUIStats,
        output_dir: Path,
        temp_dir: Path,
        rng: random.Random,
    ) -> None:
        self.clock = clock
        self.gpu = gpu
        self.memory = memory
        self.catalog = catalog
        self.stats = stats
        self.output_dir = output_dir
        self.temp_dir = temp_dir
        self._rng = rng
        # PreviewImage's random filename part is chosen once per node (ComfyUI caches the node).
        self._preview_prefix: dict[str, str] = {}

    async def run(
        self,
        class_type: str,
        node_id: str,
        inputs: dict[str, Any],
        run: PromptRun,
        progress: ProgressCallback,
    ) -> NodeResult:
        """Run one node with resolved inputs; returns its outputs and its UI output (or None)."""
        if class_type == "CheckpointLoaderSimple":
            checkpoint = self.catalog.checkpoint(inputs["ckpt_name"])
            if checkpoint is None:
                raise NodeFailure(
                    "FileNotFoundError",
                    f"Model in folder 'checkpoints' with "
                    f"filename '{inputs['ckpt_name']}' not found.",
                )
            return tuple(CheckpointRef(checkpoint, kind) for kind in ("MODEL", "CLIP", "VAE")), None
        if class_type == "CLIPTextEncode":
            return (await self._encode(inputs["clip"], str(inputs["text"]), run),), None
        if class_type == "EmptyLatentImage":
            latent = Latent(inputs["width"], inputs["height"], inputs["batch_size"])
            return (latent,), None
        if class_type == "KSampler":
            return (await self._sample(inputs, run, progress),), None
        if class_type == "VAEDecode":
            return (await self._decode(inputs["samples"], inputs["vae"], run),), None
        if class_type == "EmptyImage":
            size = (inputs["width"], inputs["height"], inputs["batch_size"])
            return (Images(*size, color=int(inputs["color"])),), None
        if class_type in ("SaveImage", "PreviewImage"):
            return (), await self._save(class_type, node_id, inputs, run)
        raise NodeFailure("NotImplementedError", f"node class {class_type} has no runtime")

    # -- GPU work --------------------------------------------------------------------------

    async def _prepare(
        self, checkpoint: Checkpoint, part: Part, activation_bytes: int, run: PromptRun
    ) -> Placement:
        """Make room, load the part and take the node's activations, or fail with an OOM."""
        placement = self.memory.plan(checkpoint, part, activation_bytes)
        # ComfyUI prints its load decisions too ("loaded partially", "loaded completely").
        log.log(logging.DEBUG if placement.mode == "full" else logging.INFO, placement.reason)
        if placement.mode == "oom":
            self.memory.apply(checkpoint, placement)
            raise self._oom(placement.activation_bytes)
        try:
            loaded = self.memory.apply(checkpoint, placement)
            if loaded:
                await self._load_time(checkpoint, part, loaded)
            self.memory.acquire_activation(placement.activation_bytes)
        except SimOutOfMemory as exc:
            # Another process took the memory between the estimate and the allocation.
            raise self._oom(exc.requested_bytes) from exc
        return placement

    async def _load_time(self, checkpoint: Checkpoint, part: Part, loaded_bytes: int) -> None:
        family = checkpoint.family
        warm = (checkpoint.filename, part) in self.memory.warm_parts
        load_s = family.load_warm_s if warm else family.load_cold_s
        self.memory.warm_parts.add((checkpoint.filename, part))
        if part == "unet":
            self.stats.checkpoint_loads += 1
        with self.gpu.working("load"):
            await self.clock.sleep(load_s * loaded_bytes / family.weights_bytes)

    def _oom(self, requested_bytes: int) -> NodeFailure:
        """ComfyUI's handling of a CUDA OOM inside a node: unload every model, report it."""
        process_bytes = self.gpu.process_bytes(self.memory.pid)
        message = (
            f"CUDA out of memory. Tried to allocate {requested_bytes / GIB:.2f} GiB. GPU 0 has a "
            f"total capacity of {self.gpu.total_bytes / GIB:.2f} GiB of which "
            f"{self.gpu.free_bytes() / MIB:.2f} MiB is free. Including non-PyTorch memory, this "
            f"process has {process_bytes / GIB:.2f} GiB memory in use.\n{OOM_TIPS}"
        )
        self.memory.unload_all()
        return NodeFailure(OOM_EXCEPTION_TYPE, message, oom=True)

    async def _encode(self, clip: CheckpointRef, text: str, run: PromptRun) -> Conditioning:
        checkpoint = clip.checkpoint
        family = checkpoint.family
        placement = await self._prepare(checkpoint, "clip", 0, run)
        try:
            offloaded = 1.0 - placement.resident_bytes / family.clip_bytes
            with self.gpu.working("diffusion"):
                await self.clock.sleep(
                    family.text_encode_s * (1.0 + family.offload_penalty * offloaded)
                )
        finally:
            self.memory.release_activation(placement.activation_bytes)
        return Conditioning(checkpoint, text)

    async def _sample(
        self, inputs: dict[str, Any], run: PromptRun, progress: ProgressCallback
    ) -> Latent:
        model: CheckpointRef = inputs["model"]
        latent: Latent = inputs["latent_image"]
        family = model.checkpoint.family
        steps = int(inputs["steps"])
        ratio = _pixel_ratio(family, latent.width, latent.height)
        activation = int(family.sampler_activation_bytes * ratio * latent.batch)
        placement = await self._prepare(model.checkpoint, "unet", activation, run)
        if placement.mode == "lowvram":
            run.lowvram = True
        offloaded = 1.0 - placement.resident_bytes / family.unet_bytes
        gain = min(MAX_BATCH_GAIN, BATCH_GAIN_PER_IMAGE * (latent.batch - 1))
        step_s = family.step_s * ratio * latent.batch * (1.0 - gain)
        step_s *= 1.0 + family.offload_penalty * offloaded
        try:
            with self.gpu.working("diffusion"):
                for step in range(steps):
                    # Read per step: another stream starting mid-run slows the remaining steps.
                    this_step_s = step_s * self.gpu.contention()
                    await self.clock.sleep(this_step_s)
                    self.stats.sampler_steps += 1
                    self.stats.sampler_s += this_step_s
                    # ComfyUI's progress hook checks for an interrupt before reporting the step.
                    run.check_interrupt()
                    progress(step + 1, steps)
        finally:
            self.memory.release_activation(placement.activation_bytes)
        seed = int(inputs["seed"])
        return Latent(latent.width, latent.height, latent.batch, seed)

    async def _decode(self, samples: Latent, vae: CheckpointRef, run: PromptRun) -> Images:
        family = vae.checkpoint.family
        ratio = _pixel_ratio(family, samples.width, samples.height) * samples.batch
        transient = min(int(family.vae_activation_bytes * ratio), family.vae_activation_cap_bytes)
        placement = await self._prepare(vae.checkpoint, "vae", transient, run)
        slowdown = TILED_DECODE_SLOWDOWN if placement.mode == "tiled" else 1.0
        try:
            with self.gpu.working("diffusion"):
                decode_s = family.vae_decode_s * ratio * slowdown * self.gpu.contention()
                await self.clock.sleep(decode_s)
        finally:
            self.memory.release_activation(placement.activation_bytes)
        return Images(samples.width, samples.height, samples.batch, samples.seed)

    # -- files -----------------------------------------------------------------------------

    async def _save(
        self, class_type: str, node_id: str, inputs: dict[str, Any], run: PromptRun
    ) -> dict[str, Any]:
        images: Images = inputs["images"]
        if class_type == "PreviewImage":
            base_dir, kind = self.temp_dir, "temp"
            prefix = "ComfyUI" + self._preview_prefix.setdefault(node_id, self._temp_suffix())
        else:
            base_dir, kind = self.output_dir, "output"
            prefix = str(inputs["filename_prefix"])
        folder, name, counter, subfolder = save_path(base_dir, prefix, images.width, images.height)
        text = {"prompt": json.dumps(run.prompt)}
        extra = run.extra_data.get("extra_pnginfo")
        if isinstance(extra, dict):
            text.update({key: json.dumps(value) for key, value in extra.items()})
        results = []
        for index in range(images.batch):
            filename = f"{name.replace('%batch_num%', str(index))}_{counter + index:05}_.png"
            await asyncio.to_thread(_write_image, folder / filename, images, index, text)
            results.append({"filename": filename, "subfolder": subfolder, "type": kind})
        return {"images": results}

    def _temp_suffix(self) -> str:
        return "_temp_" + "".join(self._rng.choice(string.ascii_lowercase) for _ in range(5))


def _pixel_ratio(family: CheckpointFamily, width: int, height: int) -> float:
    return (width * height) / (family.base_width * family.base_height)


def _write_image(path: Path, images: Images, index: int, text: dict[str, str]) -> None:
    if images.color is not None:
        rgb = ((images.color >> 16) & 255, (images.color >> 8) & 255, images.color & 255)
        rows = solid_rows(images.width, images.height, rgb)
    else:
        rows = gradient_rows(images.width, images.height, images.seed + index)
    path.write_bytes(encode_png(images.width, images.height, rows, text=text))


def save_path(base_dir: Path, prefix: str, width: int, height: int) -> tuple[Path, str, int, str]:
    """ComfyUI's `get_save_image_path`: folder, file stem, next counter, subfolder.

    The counter continues from the files already on disk, so it survives a restart.
    """
    prefix = prefix.replace("%width%", str(width)).replace("%height%", str(height))
    normalized = os.path.normpath(prefix)
    subfolder, name = os.path.dirname(normalized), os.path.basename(normalized)
    root = base_dir.resolve()
    folder = (root / subfolder).resolve()
    if not folder.is_relative_to(root):
        raise NodeFailure(
            "Exception",
            "**** ERROR: Saving image outside the output folder is not allowed.\n"
            f" full_output_folder: {folder}\n         output_dir: {root}",
        )
    folder.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"{re.escape(name)}_(\d+)_")
    counters = [int(m.group(1)) for f in os.listdir(folder) if (m := pattern.match(f))]
    return folder, name, max(counters, default=0) + 1, subfolder
