"""What each emulated ComfyUI node does when it runs (simulator layer).

Nodes pass small value objects instead of tensors. GPU nodes load model parts through
`ComfyMemory`, hold their activations on the `SimGpu` while they run and take simulated time from
the catalogue's `CheckpointFamily` figures (hardware-figures.md §3); the image nodes write real PNG
files. Failures surface as `NodeFailure` (an exception inside a node) or `Interrupted`.

Image-only nodes run without weights, as in ComfyUI: the loaders read the uploaded file's header
(its size and alpha channel; pixels are not decoded), ImageScale, ImageInvert and ImageBlur
change the value, and SaveImageWebsocket sends each image as a PNG in ComfyUI's binary frames.
A node that cannot work on its input fails at run time as ComfyUI's does, with the exception
type and message the real node raises (ImageToMask of `alpha` on an RGB image: IndexError).
"""

from __future__ import annotations

import asyncio
import hashlib
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
from gpu_common.image_files import NotAnImage, probe_image

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
    """Decoded images (pixels): a gradient keyed by `seed`, or solid 0xRRGGBB `color`.

    ComfyUI's IMAGE is RGB (its loaders drop the alpha channel into a separate MASK), so
    `channels` is 3 for every image the nodes here make.
    """

    width: int
    height: int
    batch: int
    seed: int = 0
    color: int | None = None
    channels: int = 3

    @property
    def tensor_bytes(self) -> int:
        """The size of the float32 tensor ComfyUI holds these images in."""
        return self.batch * self.height * self.width * self.channels * 4


@dataclass(frozen=True, slots=True)
class Mask:
    """A MASK batch (one float per pixel)."""

    width: int
    height: int
    batch: int = 1


@dataclass(slots=True)
class PromptRun:
    """What one running prompt shares with its nodes."""

    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    check_interrupt: Callable[[], None]
    lowvram: bool = False


ProgressCallback = Callable[[int, int], None]
# One image a node sends over the websocket (`value` of `maximum`, the PNG): ComfyUI's progress
# hook with a preview image.
ImageCallback = Callable[[int, int, bytes], None]
NodeResult = tuple[tuple[Any, ...], dict[str, Any] | None]
# Nodes that tell ComfyUI they changed on every run (IS_CHANGED returns the time): never cached.
ALWAYS_CHANGED = frozenset({"SaveImageWebsocket"})
# The image loaders: cached only while their file's content is the same (IS_CHANGED hashes it).
IMAGE_LOADERS = frozenset({"LoadImage", "LoadImageMask"})
# A mask ComfyUI makes when the image has no alpha channel is 64x64 zeros.
EMPTY_MASK_SIDE = 64
# A VAE encodes to latents of 1/8 the side; it crops the image to a multiple of that first.
VAE_SCALE = 8
# ImageBlur holds the image, its padded copy and the result on the GPU at once.
BLUR_COPIES = 3


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
        input_dir: Path,
        rng: random.Random,
    ) -> None:
        self.clock = clock
        self.gpu = gpu
        self.memory = memory
        self.catalog = catalog
        self.stats = stats
        self.output_dir = output_dir
        self.temp_dir = temp_dir
        self.input_dir = input_dir
        self._rng = rng
        self._runs = 0
        # PreviewImage's random filename part is chosen once per node (ComfyUI caches the node).
        self._preview_prefix: dict[str, str] = {}

    async def run(
        self,
        class_type: str,
        node_id: str,
        inputs: dict[str, Any],
        run: PromptRun,
        progress: ProgressCallback,
        image: ImageCallback | None = None,
    ) -> NodeResult:
        """Run one node with resolved inputs; returns its outputs and its UI output (or None).

        `image` sends a node's image over the websocket (SaveImageWebsocket)."""
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
        if class_type in IMAGE_LOADERS:
            return await self._load_image(class_type, inputs), None
        if class_type == "VAEEncode":
            return (await self._encode_pixels(inputs["pixels"], inputs["vae"], run),), None
        if class_type == "ImageScale":
            return (_scaled(inputs["image"], int(inputs["width"]), int(inputs["height"])),), None
        if class_type == "ImageInvert":
            return (_inverted(inputs["image"]),), None
        if class_type == "ImageBlur":
            return (await self._blur(inputs["image"]),), None
        if class_type == "MaskToImage":
            mask: Mask = inputs["mask"]
            return (Images(mask.width, mask.height, mask.batch),), None
        if class_type == "ImageToMask":
            return (_to_mask(inputs["image"], str(inputs["channel"])),), None
        if class_type == "SaveImageWebsocket":
            await self._send_images(inputs["images"], image)
            return (), None
        raise NodeFailure("NotImplementedError", f"node class {class_type} has no runtime")

    def is_changed(self, class_type: str, inputs: dict[str, Any]) -> str | None:
        """What ComfyUI's IS_CHANGED adds to a node's cache key: the loaded file's hash for
        the image loaders, a new value on every run for SaveImageWebsocket; else None."""
        if class_type in ALWAYS_CHANGED:
            self._runs += 1
            return f"run {self._runs}"
        if class_type in IMAGE_LOADERS and isinstance(inputs.get("image"), str):
            path = self.annotated_path(inputs["image"])
            if path is not None and path.is_file():
                return hashlib.sha256(path.read_bytes()).hexdigest()
        return None

    def annotated_path(self, name: str) -> Path | None:
        """The file an image loader's `image` value names: `sub/name.png`, relative to the
        input folder unless it ends in ` [output]`, ` [temp]` or ` [input]`. None for a name
        that would leave its folder."""
        base = self.input_dir
        for kind, folder in (
            ("input", self.input_dir),
            ("output", self.output_dir),
            ("temp", self.temp_dir),
        ):
            if name.endswith(f" [{kind}]"):
                name, base = name[: -len(kind) - 3], folder
        root = base.resolve()
        path = (root / name).resolve()
        return path if path.is_relative_to(root) and path != root else None

    # -- image-only nodes ------------------------------------------------------------------

    async def _load_image(self, class_type: str, inputs: dict[str, Any]) -> tuple[Any, ...]:
        path = self.annotated_path(str(inputs["image"]))
        if path is None or not path.is_file():
            raise NodeFailure(
                "FileNotFoundError",
                f"[Errno 2] No such file or directory: '{path or inputs['image']}'",
            )
        data = await asyncio.to_thread(path.read_bytes)
        try:
            header = probe_image(data)
        except NotAnImage as exc:
            # Pillow's error for a file it cannot open, as LoadImage raises it.
            raise NodeFailure(
                "PIL.UnidentifiedImageError", f"cannot identify image file '{path}'"
            ) from exc
        seed = int.from_bytes(hashlib.sha256(data).digest()[:4], "big")
        width, height = header.width, header.height
        if class_type == "LoadImageMask":
            # Without that channel (an RGB file asked for alpha) the mask is 64x64 zeros.
            has_channel = header.has_alpha or inputs["channel"] != "alpha"
            side = (width, height) if has_channel else (EMPTY_MASK_SIDE, EMPTY_MASK_SIDE)
            return (Mask(*side),)
        mask = Mask(width, height) if header.has_alpha else Mask(EMPTY_MASK_SIDE, EMPTY_MASK_SIDE)
        return Images(width, height, 1, seed), mask

    async def _encode_pixels(self, pixels: Images, vae: CheckpointRef, run: PromptRun) -> Latent:
        family = vae.checkpoint.family
        width = pixels.width // VAE_SCALE * VAE_SCALE
        height = pixels.height // VAE_SCALE * VAE_SCALE
        if width == 0 or height == 0:
            raise NodeFailure(
                "RuntimeError",
                f"Given input size: (3x{pixels.height}x{pixels.width}). Calculated output size: "
                "(128x0x0). Output size is too small",
            )
        ratio = _pixel_ratio(family, width, height) * pixels.batch
        # Encoding is taken to need the memory and time of a decode of the same size: the same
        # network run the other way (no separate published figure).
        transient = min(int(family.vae_activation_bytes * ratio), family.vae_activation_cap_bytes)
        placement = await self._prepare(vae.checkpoint, "vae", transient, run)
        slowdown = TILED_DECODE_SLOWDOWN if placement.mode == "tiled" else 1.0
        try:
            with self.gpu.working("diffusion"):
                encode_s = family.vae_decode_s * ratio * slowdown * self.gpu.contention()
                await self.clock.sleep(encode_s)
        finally:
            self.memory.release_activation(placement.activation_bytes)
        return Latent(width, height, pixels.batch, pixels.seed)

    async def _blur(self, images: Images) -> Images:
        # ImageBlur moves the image to the GPU for its convolution, then back.
        nbytes = images.tensor_bytes * BLUR_COPIES
        try:
            self.memory.acquire_activation(nbytes)
        except SimOutOfMemory as exc:
            raise self._oom(exc.requested_bytes) from exc
        self.memory.release_activation(nbytes)
        return images

    async def _send_images(self, images: Images, send: ImageCallback | None) -> None:
        for index in range(images.batch):
            rows = _rows(images, index)
            png = await asyncio.to_thread(encode_png, images.width, images.height, rows)
            if send is not None:
                send(index, images.batch, png)

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


def _rows(images: Images, index: int) -> Any:
    if images.color is not None:
        rgb = ((images.color >> 16) & 255, (images.color >> 8) & 255, images.color & 255)
        return solid_rows(images.width, images.height, rgb)
    return gradient_rows(images.width, images.height, images.seed + index)


def _write_image(path: Path, images: Images, index: int, text: dict[str, str]) -> None:
    rows = _rows(images, index)
    path.write_bytes(encode_png(images.width, images.height, rows, text=text))


def _scaled(images: Images, width: int, height: int) -> Images:
    """ImageScale's size rule: 0 for one side keeps the aspect ratio; both 0 keep the image."""
    if width == 0 and height == 0:
        return images
    if width == 0:
        width = max(1, round(images.width * height / images.height))
    elif height == 0:
        height = max(1, round(images.height * width / images.width))
    return Images(width, height, images.batch, images.seed, images.color, images.channels)


def _inverted(images: Images) -> Images:
    # A solid colour inverts exactly; a gradient becomes another gradient (pixels are patterns).
    if images.color is not None:
        color = images.color ^ 0xFFFFFF
        return Images(images.width, images.height, images.batch, images.seed, color)
    return Images(images.width, images.height, images.batch, images.seed ^ 0xFFFF)


def _to_mask(images: Images, channel: str) -> Mask:
    index = ("red", "green", "blue", "alpha").index(channel)
    if index >= images.channels:
        # `image[:, :, :, 3]` on ComfyUI's RGB tensor.
        raise NodeFailure(
            "IndexError",
            f"index {index} is out of bounds for dimension 3 with size {images.channels}",
        )
    return Mask(images.width, images.height, images.batch)


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
