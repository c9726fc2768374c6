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


def test_an_ended_prompt_reads_none_until_its_closing_reading_is_in() -> None:
    peaks = PromptPeaks()
    peaks.observe(["a"], 3 << 30)
    assert peaks.begin_close("a") is True
    assert peaks.peak("a") is None
    peaks.close("a", 4 << 30)
    assert peaks.peak("a") == 4 << 30
    # A failed closing reading leaves the peak as the run's readings had it.
    peaks.observe(["b"], 2 << 30)
    peaks.begin_close("b")
    peaks.close("b", None)
    assert peaks.peak("b") == 2 << 30
    # Nothing to close for a prompt never read while it ran: it keeps no peak.
    assert peaks.begin_close("never-ran") is False
    peaks.close("never-ran", 5 << 30)
    assert peaks.peak("never-ran") is None
