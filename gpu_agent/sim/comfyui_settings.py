"""Settings and counters of the emulated ComfyUI (simulator layer).

Memory figures are ComfyUI's Linux defaults and the PyTorch figures of hardware-figures.md §3c;
times are simulated seconds.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from gpu_agent.sim.catalog import MIB


@dataclass(frozen=True)
class ComfyUISimSettings:
    """How the emulated ComfyUI process behaves; the defaults are a stock Linux install."""

    # --reserve-vram default on Linux: kept free on top of every load's estimate.
    reserve_vram_bytes: int = 400 * MIB
    # CUDA context + cuDNN/cuBLAS workspaces, held while the process lives.
    context_bytes: int = 400 * MIB
    # torch's caching allocator keeps this much of freed activations after a prompt...
    allocator_cache_bytes: int = 512 * MIB
    # ...until the gc pass (soft_empty_cache) this long after the prompt.
    gc_after_prompt_s: float = 10.0
    # /free on an idle worker takes effect after this long.
    free_apply_s: float = 0.3
    # False = --disable-smart-memory: every model is unloaded after every prompt.
    smart_memory: bool = True
    # True = --cpu: the process runs on the CPU, holds nothing on the GPU, and /system_stats
    # reports the machine's RAM as the device's (and torch's) memory.
    cpu: bool = False
    version: str = "0.3.64"


@dataclass
class ComfyUIStats:
    """Counters over the emulator's life (they survive process restarts)."""

    prompts_run: int = 0
    succeeded: int = 0
    failed_oom: int = 0
    lowvram_runs: int = 0
    interrupted: int = 0
    checkpoint_loads: int = 0  # UNet loads onto the GPU (a checkpoint brought in, wholly or partly)
    # Sampler steps run and the simulated seconds they were planned to take (contention and
    # low-VRAM slowdown included), so a test can compare seconds per step between runs.
    sampler_steps: int = 0
    sampler_s: float = 0.0
    # Per prompt id: how often it began executing, how often it ran to its end (success, error,
    # out of memory or interrupt; not a run cut short by a restart) and how often to success,
    # so that a prompt run twice shows even when a restart has wiped the history.
    runs_by_prompt: Counter[str] = field(default_factory=Counter)
    ends_by_prompt: Counter[str] = field(default_factory=Counter)
    successes_by_prompt: Counter[str] = field(default_factory=Counter)

    @property
    def seconds_per_step(self) -> float:
        return self.sampler_s / self.sampler_steps if self.sampler_steps else 0.0
