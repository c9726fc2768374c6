"""The chaos day at smoke size, and replays of the seeds that found bugs.

Each run is a whole stack on its own virtual-time loop: a quarter of a simulated hour with every
kind of fault costs a few CPU seconds. The replays stop just after the moment their seed once
broke an invariant; they must now pass it. The bugs found hours into the working day would cost
a minute of CPU or more each to replay; their tests stage the same sequence of faults directly,
and `make chaos` replays those seeds whole:

- a prompt run twice after a refused store write, or after an agent restart (seeds 0 and 2):
  `tests/integration/test_system_faults.py`;
- a short image's footprint learned from snapshots that missed it, so the next one ran out of
  memory (seed 9): `test_controller_scenarios.py`, `test_agent_api.py`;
- the reconcile pass submitting a prompt whose dispatch was still unloading a model (seed 9):
  `test_system_faults.py`;
- a stream cut after its headers answered with a second status line (seed 2):
  `test_system_faults.py`;
- one task left behind by each controller crash (seeds 2 and 9):
  `test_controller_restart.py`;
- a finished prompt run again after the agent and ComfyUI both restarted (seed 7):
  `test_agent_api.py`.
"""

from __future__ import annotations

import pytest

from bench.chaos import default_config
from bench.chaos.day import DayConfig, run_seed
from bench.chaos.schedule import KINDS

FIGURE_KEYS = {
    "faults", "image_jobs", "llm_requests", "lost", "doubled", "hung",
    "self_inflicted_oom", "self_inflicted_spill", "recovery_s", "violations",
}  # fmt: skip
NINE_AM_S = 9 * 3600.0


@pytest.mark.timeout(120)
def test_a_short_chaos_span_strikes_every_kind_and_breaks_nothing() -> None:
    """A quarter hour of the working day with every kind of fault: nothing lost, doubled or
    hung, and the system serves again after each fault."""
    config = DayConfig(span_s=900.0, faults_per_day=2000.0, sample_interval_s=5.0,
                       start_s=NINE_AM_S)  # fmt: skip
    result = run_seed(1, config)

    figures = result.figures
    assert result.stopped is None, result.stopped
    assert set(figures) == FIGURE_KEYS
    assert set(figures["faults"]) == set(KINDS)
    assert all(count >= 1 for count in figures["faults"].values()), figures["faults"]
    assert figures["image_jobs"] > 0
    assert figures["llm_requests"] > 0
    assert figures["lost"] == figures["doubled"] == figures["hung"] == 0
    assert figures["self_inflicted_oom"] == figures["self_inflicted_spill"] == 0
    assert figures["violations"] == []
    for kind, quantiles in figures["recovery_s"].items():
        assert kind in KINDS
        assert 0 <= quantiles["p50"] <= quantiles["p95"] <= quantiles["worst"]


def test_the_default_run_is_a_working_day_with_a_thousand_faults() -> None:
    config = default_config()
    assert config.span_s == 9 * 3600.0
    assert config.start_s == NINE_AM_S
    assert round(config.faults_per_day * config.span_s / 86_400) == 1000
    assert config.faults_per_day >= 1000


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("span_s", "until_s", "found"),
    [
        # An unstreamed generation failed by Ollama reached the client as a 500 with no body.
        (3600.0, 1650.0, "llm answered"),
        # A model loaded into room ComfyUI still held (its floor learned as 0 while it was
        # down; an ended job's checkpoint not yet in the snapshot) spilled to the CPU.
        (7200.0, 1620.0, "no self-inflicted spill"),
    ],
)
def test_seed_1_replays_past_the_bugs_it_found(span_s: float, until_s: float, found: str) -> None:
    """Seed 1 of the working day, replayed to just past where it once broke `found`."""
    config = DayConfig(span_s=span_s, faults_per_day=1200.0, sample_interval_s=5.0,
                       start_s=NINE_AM_S, until_s=until_s)  # fmt: skip
    result = run_seed(1, config)
    assert result.stopped is None, result.stopped
    assert result.figures["violations"] == []
    assert result.simulated_s >= until_s
