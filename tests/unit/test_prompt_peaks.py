"""The per-prompt peak bookkeeping: the highest reading while a prompt ran, none without one."""

from __future__ import annotations

import pytest

from gpu_agent.prompt_peaks import PromptPeaks


def test_a_prompt_keeps_its_highest_reading_and_one_never_read_has_none() -> None:
    peaks = PromptPeaks()
    peaks.observe(["a"], 3 << 30)
    peaks.observe(["a", "b"], 7 << 30)
    peaks.observe(["a"], 5 << 30)
    assert peaks.peak("a") == 7 << 30
    assert peaks.peak("b") == 7 << 30
    assert peaks.peak("never-ran") is None


def test_only_the_latest_prompts_are_kept() -> None:
    peaks = PromptPeaks(kept=2)
    for prompt_id in ("a", "b", "c"):
        peaks.observe([prompt_id], 1)
    assert [peaks.peak(p) for p in ("a", "b", "c")] == [None, 1, 1]
    with pytest.raises(ValueError, match="at least 1"):
        PromptPeaks(kept=0)
