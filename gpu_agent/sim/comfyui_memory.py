"""VRAM of the emulated ComfyUI process (simulator layer).

The process holds, on the shared `SimGpu`: its CUDA context (while it lives), the model parts it has
loaded (UNet, CLIP, VAE per checkpoint), the activations of the node running now, and what torch's
caching allocator keeps after activations are freed. ComfyUI counts that cache as free for itself,
so `free_for_comfy()` is device free plus cache, as `cudaMemGetInfo` + torch's inactive blocks are.

`place()` is the pure decision (ComfyUI's `load_models_gpu` / `free_memory` reduced to arithmetic,
hardware-figures.md §3): load a part fully if free >= part + activation + reserve; otherwise
evict other checkpoints (least recently used first), then shed this checkpoint's other parts, then
fall back to a partial load; failing that, out of memory. `ComfyMemory` applies decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gpu_agent.sim.catalog import MIB, Checkpoint
from gpu_agent.sim.clock import SimClock
from gpu_agent.sim.errors import SimOutOfMemory
from gpu_agent.sim.gpu import SimGpu

Part = Literal["clip", "unet", "vae"]
Mode = Literal["full", "lowvram", "partial_clip", "tiled", "oom"]

# Parts of the same checkpoint that may be unloaded to make room for `part`, in that order. The
# UNet may be shed partly (ComfyUI unloads a model by modules until enough is free).
SHED_ORDER: dict[Part, tuple[Part, ...]] = {
    "unet": ("clip", "vae"),
    "vae": ("clip", "unet"),
    "clip": ("vae", "unet"),
}
# A tiled VAE decode needs at least one tile's worth of working memory.
MIN_VAE_TILE_BYTES = 64 * MIB


@dataclass(frozen=True, slots=True)
class Placement:
    """What to do before a node runs: what to evict and shed, and how much of the part to hold."""

    part: Part
    mode: Mode
    resident_bytes: int
    activation_bytes: int
    evict: tuple[str, ...] = ()
    shed: tuple[tuple[Part, int], ...] = ()
    reason: str = ""


def place(
    *,
    part: Part,
    part_bytes: int,
    resident_bytes: int,
    activation_bytes: int,
    reserve_bytes: int,
    free_bytes: int,
    others: list[tuple[str, int]],
    sheddable: list[tuple[Part, int]],
    min_resident_bytes: int,
) -> Placement:
    """Decide how to run a node needing `part` (`part_bytes` in full, `resident_bytes` loaded now).

    `free_bytes` is free for ComfyUI (device free + own cache); `others` are other checkpoints'
    resident bytes in eviction order; `sheddable` this checkpoint's other loaded parts, in order.
    """
    need = part_bytes + activation_bytes + reserve_bytes
    available = free_bytes + resident_bytes
    evict: list[str] = []
    for filename, nbytes in others:
        if available >= need:
            break
        evict.append(filename)
        available += nbytes
    shed: list[tuple[Part, int]] = []
    for shed_part, nbytes in sheddable:
        if available >= need:
            break
        take = min(nbytes, need - available) if shed_part == "unet" else nbytes
        shed.append((shed_part, take))
        available += take
    made_room = tuple(evict), tuple(shed)
    if available >= need:
        reason = f"{part} fits: needs {_mib(need)}, {_mib(available)} free"
        return Placement(part, "full", part_bytes, activation_bytes, *made_room, reason=reason)
    short = f"needs {_mib(need)}, only {_mib(available)} free"
    if part == "unet":
        resident = available - activation_bytes - reserve_bytes
        if resident >= min_resident_bytes:
            reason = f"low-VRAM: {_mib(resident)} of the UNet on the GPU ({short})"
            return Placement(part, "lowvram", resident, activation_bytes, *made_room, reason=reason)
        reason = f"out of memory: {short}; low-VRAM needs {_mib(min_resident_bytes)} resident"
        return Placement(part, "oom", 0, activation_bytes, *made_room, reason=reason)
    if part == "clip":
        resident = max(0, available - activation_bytes - reserve_bytes)
        reason = f"text encoder partly offloaded: {_mib(resident)} on the GPU ({short})"
        return Placement(
            part, "partial_clip", resident, activation_bytes, *made_room, reason=reason
        )
    tile_bytes = available - part_bytes - reserve_bytes
    if tile_bytes >= MIN_VAE_TILE_BYTES:
        reason = f"tiled VAE decode with {_mib(tile_bytes)} working memory ({short})"
        return Placement(part, "tiled", part_bytes, tile_bytes, *made_room, reason=reason)
    reason = f"out of memory for VAE decode: {short}"
    return Placement(part, "oom", 0, activation_bytes, *made_room, reason=reason)


def _mib(nbytes: int) -> str:
    return f"{nbytes / MIB:.0f} MiB"


@dataclass(slots=True)
class LoadedModel:
    """The parts of one checkpoint resident on the GPU, in bytes."""

    checkpoint: Checkpoint
    parts: dict[Part, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())


def part_bytes(checkpoint: Checkpoint, part: Part) -> int:
    family = checkpoint.family
    return {"unet": family.unet_bytes, "clip": family.clip_bytes, "vae": family.vae_bytes}[part]


class ComfyMemory:
    """The ComfyUI process's share of the simulated GPU, kept in step with the `SimGpu` ledger.

    Every change goes through `SimGpu.allocate/release`, so an allocation that does not fit raises
    `SimOutOfMemory` exactly where a CUDA allocation would fail.
    """

    def __init__(
        self,
        *,
        gpu: SimGpu,
        clock: SimClock,
        pid: int,
        context_bytes: int,
        reserve_bytes: int,
        allocator_cache_bytes: int,
    ) -> None:
        self.gpu = gpu
        self.clock = clock
        self.pid = pid
        self.context_bytes = context_bytes
        self.reserve_bytes = reserve_bytes
        self.allocator_cache_bytes = allocator_cache_bytes
        # Least recently used first: eviction order.
        self.models: dict[str, LoadedModel] = {}
        self.cache_bytes = 0
        self.activation_bytes = 0
        # Parts read from disk at least once; later loads come from the page cache (warm).
        self.warm_parts: set[tuple[str, Part]] = set()

    # -- process lifetime ------------------------------------------------------------------

    def start(self, name: str, cmdline: tuple[str, ...]) -> None:
        """The process starts: it appears on the GPU and creates its CUDA context."""
        self.gpu.attach(self.pid, name, cmdline)
        try:
            self.gpu.allocate(self.pid, self.context_bytes)
        except SimOutOfMemory:
            # CUDA initialisation failed: the process exits at once.
            self.gpu.detach(self.pid)
            raise

    def stop(self) -> None:
        """The process exits: the driver frees everything it held. Page-cache warmth stays."""
        self.gpu.detach(self.pid)
        self.models.clear()
        self.cache_bytes = 0
        self.activation_bytes = 0

    # -- readings --------------------------------------------------------------------------

    def free_for_comfy(self) -> int:
        """Bytes a new allocation could use: free on the GPU plus torch's own cache."""
        return self.gpu.free_bytes() + self.cache_bytes

    def weights_bytes(self) -> int:
        """Bytes of model weights resident on the GPU, all checkpoints and parts together."""
        return sum(model.total_bytes for model in self.models.values())

    def torch_reserved_bytes(self) -> int:
        """What torch's allocator holds: weights, live activations and its cache (no context)."""
        return self.weights_bytes() + self.activation_bytes + self.cache_bytes

    def loaded_checkpoints(self) -> list[str]:
        """File names of checkpoints with any part resident, least recently used first."""
        return [name for name, model in self.models.items() if model.total_bytes > 0]

    def resident(self, checkpoint: Checkpoint, part: Part) -> int:
        """Bytes of `part` of `checkpoint` on the GPU now; 0 when not loaded."""
        model = self.models.get(checkpoint.filename)
        return model.parts.get(part, 0) if model else 0

    # -- decisions -------------------------------------------------------------------------

    def plan(self, checkpoint: Checkpoint, part: Part, activation_bytes: int) -> Placement:
        """Decide how to run a node that needs `part` of `checkpoint` plus `activation_bytes`."""
        others = [
            (name, model.total_bytes)
            for name, model in self.models.items()
            if name != checkpoint.filename and model.total_bytes > 0
        ]
        sheddable = [
            (other, self.resident(checkpoint, other))
            for other in SHED_ORDER[part]
            if self.resident(checkpoint, other) > 0
        ]
        return place(
            part=part,
            part_bytes=part_bytes(checkpoint, part),
            resident_bytes=self.resident(checkpoint, part),
            activation_bytes=activation_bytes,
            reserve_bytes=self.reserve_bytes,
            free_bytes=self.free_for_comfy(),
            others=others,
            sheddable=sheddable,
            min_resident_bytes=checkpoint.family.min_resident_bytes,
        )

    def apply(self, checkpoint: Checkpoint, placement: Placement) -> int:
        """Carry out `placement`'s evictions and load; returns the bytes newly loaded."""
        for filename in placement.evict:
            self.unload(filename)
        model = self.models.pop(checkpoint.filename, None) or LoadedModel(checkpoint)
        self.models[checkpoint.filename] = model  # most recently used goes last
        for shed_part, nbytes in placement.shed:
            self._set_part(model, shed_part, model.parts.get(shed_part, 0) - nbytes)
        if placement.mode == "oom":
            return 0
        before = model.parts.get(placement.part, 0)
        self._set_part(model, placement.part, placement.resident_bytes)
        return max(0, placement.resident_bytes - before)

    def _set_part(self, model: LoadedModel, part: Part, nbytes: int) -> None:
        current = model.parts.get(part, 0)
        nbytes = max(0, nbytes)
        if nbytes > current:
            self._grow(nbytes - current)
        elif nbytes < current:
            self.gpu.release(self.pid, current - nbytes)
        if nbytes:
            model.parts[part] = nbytes
        else:
            model.parts.pop(part, None)

    def unload(self, filename: str) -> None:
        """Drop every part of the checkpoint, giving its bytes back to the driver; a no-op if
        it is not loaded."""
        model = self.models.pop(filename, None)
        if model is not None:
            self.gpu.release(self.pid, model.total_bytes)

    def unload_all(self) -> None:
        """Unload every checkpoint (ComfyUI's `/free` with `unload_models`)."""
        for filename in list(self.models):
            self.unload(filename)

    # -- activations and the allocator cache -----------------------------------------------

    def _grow(self, nbytes: int) -> None:
        """Take `nbytes` more, reusing cached blocks first as torch's allocator does."""
        reuse = min(self.cache_bytes, nbytes)
        self.gpu.allocate(self.pid, nbytes - reuse)
        self.cache_bytes -= reuse

    def acquire_activation(self, nbytes: int) -> None:
        """Working memory for the node now running; raises `SimOutOfMemory` if it does not fit."""
        self._grow(nbytes)
        self.activation_bytes += nbytes

    def release_activation(self, nbytes: int) -> None:
        """Free working memory; the allocator keeps up to its cache limit reserved."""
        nbytes = min(nbytes, self.activation_bytes)
        self.activation_bytes -= nbytes
        kept = min(self.cache_bytes + nbytes, self.allocator_cache_bytes)
        self.gpu.release(self.pid, self.cache_bytes + nbytes - kept)
        self.cache_bytes = kept

    def empty_cache(self) -> None:
        """`torch.cuda.empty_cache()`: cached blocks go back to the driver."""
        self.gpu.release(self.pid, self.cache_bytes)
        self.cache_bytes = 0
