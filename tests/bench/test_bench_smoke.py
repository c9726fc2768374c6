"""Smoke runs of the benchmarks at minimal sizes: each starts what it measures, measures it and
returns figures of the expected shape with sane values. Timing targets are not checked here.

The overhead and footprint runs start real service processes (`gpu-agent`, `gpu-controller`)
and run on real time; the scheduling runs are on virtual time and must replay exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import pytest

from bench import decisions, footprint, overhead, scheduling
from gpu_agent.sim.workload import busy_hour

PATH_KEYS = {"p50_ms", "p99_ms", "first_p50_ms", "first_p99_ms", "req_per_s", "requests", "errors"}
ADDED_KEYS = {"p50", "p99", "first_p50", "first_p99"}
USAGE_KEYS = {"rss_mib_mean", "rss_mib_max", "cpu_pct_mean", "cpu_pct_max", "samples"}


def _finite(*values: float) -> bool:
    return all(math.isfinite(value) for value in values)


def test_decisions_times_both_calls_for_each_fleet_size() -> None:
    figures = decisions.run(agent_counts=(1, 10, 50), select_reps=3, plan_reps=2, save=False)

    assert set(figures) == {"select", "plan_images"}
    for call, reps in (("select", 3), ("plan_images", 2)):
        assert set(figures[call]) == {"1", "10", "50"}
        for size, fig in figures[call].items():
            assert fig["reps"] == reps
            assert fig["agents"] == int(size)
            assert 0 < fig["median_us"] <= fig["p99_us"]
            assert _finite(fig["mean_us"])
            assert 0 <= fig["placed"] <= fig["cases"]
    assert figures["select"]["10"]["models"] == decisions.MODELS
    assert figures["plan_images"]["1"]["cases"] == decisions.HELD_JOBS
    # The synthetic fleet leaves room for some work and not for all of it.
    assert figures["select"]["10"]["placed"] > 0
    assert 0 < figures["plan_images"]["50"]["placed"] < decisions.HELD_JOBS


def test_synthetic_fleet_is_deterministic_and_fits_the_card() -> None:
    catalog = decisions.synthetic_catalog()
    first = decisions.synthetic_fleet(10, catalog)

    assert first == decisions.synthetic_fleet(10, catalog)
    assert len(catalog) == decisions.MODELS
    for agent in first:
        assert agent.used_bytes <= agent.total_bytes
        assert all(model.name in catalog for model in agent.resident)


def _check_level(figures: Mapping[str, Any], requests: int) -> None:
    assert set(figures) == {*overhead.PATHS, "added_ms", "target_met"}
    for path in overhead.PATHS:
        fig = figures[path]
        assert set(fig) == PATH_KEYS
        assert fig["requests"] == requests
        assert fig["errors"] == 0
        assert 0 < fig["first_p50_ms"] <= fig["p50_ms"] <= fig["p99_ms"]
        assert fig["req_per_s"] > 0
    assert set(figures["added_ms"]) == set(overhead.HOPS)
    for hop, added in figures["added_ms"].items():
        assert set(added) == ADDED_KEYS
        assert _finite(*added.values())
        assert figures["target_met"][hop] == (added["p50"] < overhead.TARGET_ADDED_P50_MS)


@pytest.mark.real_time
@pytest.mark.timeout(120)
async def test_overhead_measures_every_path_at_each_level() -> None:
    figures = await overhead.run(levels=((1, 6), (3, 9)), rounds=2, warmup=1, save=False)

    assert {"c1", "c3", "config"} <= set(figures)
    _check_level(figures["c1"], 6)
    _check_level(figures["c3"], 9)
    assert figures["config"]["model"] == overhead.MODEL


@pytest.mark.real_time
@pytest.mark.timeout(120)
async def test_footprint_samples_each_process_idle_and_under_load() -> None:
    figures = await footprint.run(
        speed=50.0, idle_s=0.3, load_s=1.0, interval_s=0.25, streams=1, save=False
    )

    processes = figures["processes"]
    assert set(processes) == {"agent", "agent_sim", "sim", "controller"}
    for fig in processes.values():
        for window, samples in (("idle", 1), ("load", 4)):
            usage = fig[window]
            assert set(usage) == USAGE_KEYS
            assert usage["samples"] == samples
            # A Python service with aiohttp and httpx loaded: tens of MiB, never gigabytes.
            assert 10 < usage["rss_mib_mean"] <= usage["rss_mib_max"] < 2048
            assert 0 <= usage["cpu_pct_mean"] <= usage["cpu_pct_max"] * 1.01 + 1e-9
    assert processes["agent"]["telemetry"] in {"ok", "degraded", "no_gpu"}
    for route in ("controller", "agent"):
        assert figures["load"][route]["generations"] > 0
        assert figures["load"][route]["errors"] == 0


# A small busy quarter hour: every policy's code path in a few seconds of CPU.
SMALL = scheduling.Scenario(
    "small",
    1,
    lambda seed: busy_hour(
        seed=seed, span_s=90.0, llm_requests=6, sdxl_bursts=1, sdxl_per_burst=2, sd15_jobs=2
    ),
)


@pytest.mark.timeout(300)
def test_scheduling_summarises_every_policy_with_the_json_contract() -> None:
    seeds = [0]
    runs = {
        (p, seed): scheduling.run_one(SMALL, p, seed) for p in scheduling.POLICIES for seed in seeds
    }
    section = scheduling.summarize(SMALL, seeds, runs)

    assert section["seeds"] == 1
    assert set(section["policies"]) == set(scheduling.POLICIES)
    for policy, figures in section["policies"].items():
        for total in ("oom", "spilled", "failed"):
            assert isinstance(figures[total], int)
            assert figures[total] >= 0
        for spread in ("makespan_over_bound", "llm_p95_s", "image_p95_s"):
            assert set(figures[spread]) == {"mean", "worst"}
            assert _finite(*figures[spread].values())
        # No run finishes before its lower bound.
        assert figures["makespan_over_bound"]["mean"] >= 1.0, policy
    ours = section["policies"]["controller"]
    assert ours["oom"] == 0
    assert ours["spilled"] == 0
    assert ours["failed"] == 0
    assert 0.0 <= ours["quality_top_share"]["worst"] <= ours["quality_top_share"]["mean"] <= 1.0
    assert set(scheduling.targets({"small": section})) == {
        "small.no_oom_spill_or_failure",
        "small.makespan_mean_within_1_05",
        "small.makespan_worst_within_1_10",
        "small.llm_p95_not_worse_than_best_baseline",
        "small.quality_top_share_at_least_0_9",
    }


@pytest.mark.timeout(300)
def test_a_scheduling_run_replays_exactly() -> None:
    first = scheduling.run_one(SMALL, "controller", 3)
    again = scheduling.run_one(SMALL, "controller", 3)

    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)
