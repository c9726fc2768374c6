"""ComfyUI's GPU memory at its highest while each prompt ran (pure bookkeeping, no I/O).

The telemetry sampler reads the GPU every `sample_interval_s`; an SD1.5 image can come and go
between two readings, and a peak learned from readings that missed the run is too low to plan
the next job on. While a prompt runs the agent reads ComfyUI's memory more often
(`AgentService`'s peak watch) and folds each reading in here; the prompt's record then carries
`peak_vram_bytes`. A prompt with no reading taken while it ran has no peak (None), never a
guess.

A short last node (an SD1.5 VAE decode takes 0.2 s) can still fall between two readings, so a
prompt that ends is closed with one more reading: torch's allocator keeps what the run used,
so the memory just after the end still shows it. Until that reading is in, the prompt's peak
reads None, so nobody learns the figure without it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

# Prompts whose peaks are kept: the running ones and the most recently ended (the agent keeps
# about as many finished prompt records).
KEPT_PROMPTS = 512


class PromptPeaks:
    """The highest ComfyUI memory reading seen while each prompt ran, for the latest
    `KEPT_PROMPTS` prompts."""

    def __init__(self, kept: int = KEPT_PROMPTS) -> None:
        if kept < 1:
            raise ValueError(f"kept must be at least 1, got {kept}")
        self._kept = kept
        self._peaks: OrderedDict[str, int] = OrderedDict()
        self._closing: set[str] = set()

    def observe(self, running: Iterable[str], comfyui_bytes: int) -> None:
        """One reading of ComfyUI's memory, taken while the prompts `running` ran."""
        for prompt_id in running:
            previous = self._peaks.get(prompt_id)
            self._peaks[prompt_id] = max(comfyui_bytes, previous or 0)
            self._peaks.move_to_end(prompt_id)
        while len(self._peaks) > self._kept:
            forgotten, _ = self._peaks.popitem(last=False)
            self._closing.discard(forgotten)

    def peak(self, prompt_id: str) -> int | None:
        """The prompt's peak so far; None when no reading was taken while it ran, or while
        the reading that closes an ended prompt is awaited."""
        if prompt_id in self._closing:
            return None
        return self._peaks.get(prompt_id)

    def begin_close(self, prompt_id: str) -> bool:
        """The prompt ended: its peak waits for the closing reading. False (nothing to close)
        when no reading was taken while it ran."""
        if prompt_id not in self._peaks:
            return False
        self._closing.add(prompt_id)
        return True

    def close(self, prompt_id: str, comfyui_bytes: int | None) -> None:
        """Fold in the reading taken just after the prompt ended (None: it failed) and make
        the peak final."""
        self._closing.discard(prompt_id)
        if comfyui_bytes is not None and prompt_id in self._peaks:
            self._peaks[prompt_id] = max(self._peaks[prompt_id], comfyui_bytes)
