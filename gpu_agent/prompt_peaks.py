"""ComfyUI's GPU memory at its highest while each prompt ran (pure bookkeeping, no I/O).

The telemetry sampler reads the GPU every `sample_interval_s`; an SD1.5 image can come and go
between two readings, and a peak learned from readings that missed the run is too low to plan
the next job on. While a prompt runs the agent reads ComfyUI's memory more often
(`AgentService`'s peak watch) and folds each reading in here; the prompt's record then carries
`peak_vram_bytes`. A prompt with no reading taken while it ran has no peak (None), never a
guess.
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

    def observe(self, running: Iterable[str], comfyui_bytes: int) -> None:
        """One reading of ComfyUI's memory, taken while the prompts `running` ran."""
        for prompt_id in running:
            previous = self._peaks.get(prompt_id)
            self._peaks[prompt_id] = max(comfyui_bytes, previous or 0)
            self._peaks.move_to_end(prompt_id)
        while len(self._peaks) > self._kept:
            self._peaks.popitem(last=False)

    def peak(self, prompt_id: str) -> int | None:
        """The prompt's peak so far, or None when no reading was taken while it ran."""
        return self._peaks.get(prompt_id)
