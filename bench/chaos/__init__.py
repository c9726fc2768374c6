"""`python -m bench chaos` (`make chaos`): the studio's working day on the simulated stack under
sustained, seeded fault injection, with invariants checked while it runs and at the end.

Each seed plays the working day of `studio_day` (09:00 to 18:00, where all its busy hours fall)
through the controller on virtual time while `FAULTS_PER_SEED` faults of every kind strike
(`bench.chaos.schedule`), a rate of 2,667 a simulated day. Seeds run in parallel processes, each
on its own loop. The figures go to `out/chaos.json`: per seed and in total `faults` by kind,
`image_jobs`, `llm_requests`, `lost`, `doubled`, `hung`, `self_inflicted_oom`,
`self_inflicted_spill`, `recovery_s` per kind (p50, p95 and worst simulated seconds until the
system serves again) and `violations`. A violation stops its seed's run; the seed, the
simulated time and the recent events are printed and kept under `stopped`, and
`python -m bench chaos --seed N` replays that seed alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.chaos.day import DayConfig, DayResult, run_seed
from bench.chaos.invariants import merge_samples, recovery_summary
from bench.chaos.schedule import DAY_S, KINDS
from bench.report import OUT_DIR, table
from gpu_common.clock import perf_s

RESULTS = OUT_DIR / "chaos.json"
HOUR_S = 3600.0
# The working day of `studio_day`: its trickle and all of its busy hours.
START_S = 9 * HOUR_S
SPAN_S = 9 * HOUR_S
FAULTS_PER_SEED = 1000
SEEDS = 10
# The agent samples every 10 s, as a studio might set it for a long unattended run; the
# controller distrusts snapshots after 30 s. Sampling dominates the cost of a simulated hour.
SAMPLE_INTERVAL_S = 10.0


def default_config(span_s: float = SPAN_S, faults: int = FAULTS_PER_SEED) -> DayConfig:
    """`faults` faults over `span_s` seconds of the working day."""
    return DayConfig(
        span_s=span_s,
        faults_per_day=faults * DAY_S / span_s,
        sample_interval_s=SAMPLE_INTERVAL_S,
        start_s=START_S,
    )


# One seed's process may take this long (real seconds) before it counts as stuck.
SEED_TIMEOUT_S = 1800.0


def _seed_in_process(seed: int, config: DayConfig, folder: Path) -> DayResult:
    """One seed's day in a fresh interpreter (`--child`), so seeds share nothing and a process
    that dies says which seed it was and how; its result comes back as JSON in `folder`."""
    out = folder / f"seed-{seed}.json"
    command = [
        sys.executable, "-X", "faulthandler", "-m", "bench", "chaos", "--child", str(out),
        "--seed", str(seed), "--span-s", str(config.span_s), "--faults-per-day",
        repr(config.faults_per_day),
    ]  # fmt: skip
    # A fixed hash seed: set iteration orders, and so the whole run, replay exactly.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    try:
        completed = subprocess.run(command, env=env, check=False, timeout=SEED_TIMEOUT_S)
        status = f"status {completed.returncode}"
    except subprocess.TimeoutExpired:
        status = f"no end within {SEED_TIMEOUT_S:.0f} s"
    if not out.is_file():
        return _broken(seed, f"the seed's process ended without a result ({status})")
    return DayResult(**json.loads(out.read_text()))


def _broken(seed: int, detail: str) -> DayResult:
    """A seed whose run broke down: no figures, one violation saying how."""
    violation = {"invariant": "run completes", "at_s": 0.0, "detail": detail}
    figures: dict[str, Any] = {
        "faults": dict.fromkeys(sorted(KINDS), 0),
        "image_jobs": 0, "llm_requests": 0, "lost": 0, "doubled": 0, "hung": 0,
        "self_inflicted_oom": 0, "self_inflicted_spill": 0, "recovery_s": {},
        "violations": [violation],
    }  # fmt: skip
    stopped = {"seed": seed, **violation, "recent_events": []}
    return DayResult(seed, figures, {"oom": 0, "spill": 0}, {}, stopped, 0.0, {})


def run_seeds(seeds: Sequence[int], config: DayConfig, workers: int) -> list[DayResult]:
    """Every seed's day, `workers` at a time, each in a process of its own (one seed alone runs
    here)."""
    if len(seeds) == 1 and workers <= 1:
        return [run_seed(seeds[0], config)]
    with (
        tempfile.TemporaryDirectory(prefix="chaos-results-") as tmp,
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
    ):
        futures = [pool.submit(_seed_in_process, seed, config, Path(tmp)) for seed in seeds]
        return [future.result() for future in futures]


def _child(out: Path, seed: int, config: DayConfig) -> int:
    result = run_seed(seed, config)
    out.write_text(json.dumps(dataclasses.asdict(result)))
    return 0


def totals(results: Sequence[DayResult]) -> dict[str, Any]:
    """The `total` section: sums over the seeds, recovery times over all their samples."""
    faults = dict.fromkeys(sorted(KINDS), 0)
    for result in results:
        for kind, count in result.figures["faults"].items():
            faults[kind] += count
    total: dict[str, Any] = {"faults": faults}
    for key in ("image_jobs", "llm_requests", "lost", "doubled", "hung",
                "self_inflicted_oom", "self_inflicted_spill"):  # fmt: skip
        total[key] = sum(int(r.figures[key]) for r in results)
    total["recovery_s"] = recovery_summary(merge_samples([r.recovery_samples for r in results]))
    total["violations"] = [
        {"seed": r.seed, **violation} for r in results for violation in r.figures["violations"]
    ]
    return total


def report(results: Sequence[DayResult], config: DayConfig, wall_s: float) -> dict[str, Any]:
    """What `out/chaos.json` holds."""
    return {
        "seeds": {str(r.seed): r.figures for r in results},
        "total": totals(results),
        "foreign_caused": {
            "per_seed": {str(r.seed): r.foreign_caused for r in results},
            "oom": sum(r.foreign_caused["oom"] for r in results),
            "spill": sum(r.foreign_caused["spill"] for r in results),
        },
        "stopped": [r.stopped for r in results if r.stopped is not None],
        "cost": {
            "cpu_s_per_seed": {str(r.seed): r.cpu_s for r in results},
            "cpu_s_total": round(sum(r.cpu_s for r in results), 1),
            "peaks_per_seed": {str(r.seed): r.peaks for r in results},
        },
        "config": {
            "span_s": config.span_s,
            "start_s": config.start_s,
            "faults_per_simulated_day": round(config.faults_per_day, 1),
            "sample_interval_s": config.sample_interval_s,
            "wall_s": round(wall_s, 1),
            "cpus": os.cpu_count(),
        },
    }


def print_report(data: dict[str, Any]) -> None:
    """The per-seed table, the recovery table and any violation's replay details."""
    rows = []
    for seed, figures in data["seeds"].items():
        rows.append([seed, sum(figures["faults"].values()), figures["image_jobs"],
                     figures["llm_requests"], figures["lost"], figures["doubled"], figures["hung"],
                     figures["self_inflicted_oom"], figures["self_inflicted_spill"],
                     len(figures["violations"])])  # fmt: skip
    total = data["total"]
    rows.append(["total", sum(total["faults"].values()), total["image_jobs"],
                 total["llm_requests"], total["lost"], total["doubled"], total["hung"],
                 total["self_inflicted_oom"], total["self_inflicted_spill"],
                 len(total["violations"])])  # fmt: skip
    config = data["config"]
    table(
        f"Chaos: {len(data['seeds'])} seeds, {config['span_s'] / HOUR_S:g} simulated hours each "
        f"at {config['faults_per_simulated_day']:g} faults a simulated day; "
        f"{config['wall_s']} s wall, {data['cost']['cpu_s_total']} CPU s",
        [
            "seed",
            "faults",
            "image jobs",
            "llm requests",
            "lost",
            "doubled",
            "hung",
            "self OOM",
            "self spill",
            "violations",
        ],
        rows,
    )
    recovery = total["recovery_s"]
    table(
        "Recovery after each fault (simulated seconds until the system serves again)",
        ["fault", "count", "p50", "p95", "worst"],
        [
            [kind, total["faults"][kind], *(recovery[kind][q] for q in ("p50", "p95", "worst"))]
            for kind in sorted(recovery)
        ],
    )
    foreign = data["foreign_caused"]
    print(f"caused by foreign allocations (not counted against the controller): "
          f"{foreign['oom']} OOM, {foreign['spill']} spilled generations")  # fmt: skip
    for stopped in data["stopped"]:
        print(f"\nVIOLATION, seed {stopped['seed']} at {stopped['at_s']} simulated s: "
              f"{stopped['invariant']}: {stopped['detail']}")  # fmt: skip
        print(f"replay: python -m bench chaos --seed {stopped['seed']}; recent events:")
        for event in stopped["recent_events"]:
            print("  ", json.dumps(event))


def run(argv: Sequence[str] = ()) -> int:
    """Run the seeds, print the tables, write `out/chaos.json`; 1 when a violation was found."""
    parser = argparse.ArgumentParser(prog="python -m bench chaos", description=__doc__)
    parser.add_argument("--seeds", type=int, default=SEEDS, help="seeds 0..n-1")
    parser.add_argument("--seed", type=int, action="append", help="this seed only (repeatable)")
    parser.add_argument("--span-s", type=float, default=SPAN_S)
    parser.add_argument("--faults", type=int, default=FAULTS_PER_SEED, help="faults per seed")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--faults-per-day", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(list(argv))
    seeds = args.seed if args.seed else list(range(args.seeds))
    config = default_config(args.span_s, args.faults)
    if args.faults_per_day is not None:
        config = dataclasses.replace(config, faults_per_day=args.faults_per_day)
    if args.child is not None:
        return _child(args.child, seeds[0], config)
    started = perf_s()
    results = run_seeds(seeds, config, min(args.workers, len(seeds)))
    data = report(results, config, perf_s() - started)
    print_report(data)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nfigures written to {RESULTS}")
    return 1 if data["total"]["violations"] else 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
