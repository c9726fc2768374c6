"""Workflows benchmark: 50 campaign DAGs sent at once to one Celery worker of concurrency 2.

Everything runs as processes on this machine (`controller.workflows.services`): Redis, the
simulated desktop and agent at `speed`, the controller, the worker. Figures, on real time:

- completion: from sending the first DAG to the last report, and each DAG's own time (p50, p95);
- GPU busy share: the agent's utilisation samples (NVML's busy share of each sample period)
  averaged over the run, i.e. how much of the run the card was working;
- nothing ran twice: every image node has its own controller job, every job ran once
  (`attempts` 1) and succeeded, and the controller made exactly as many jobs as there are
  image nodes.

    python -m bench workflows        # or: python -m bench.workflows --dags 50 --speed 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench.report import record, table
from controller.workflows.campaign import campaign_dag
from controller.workflows.launch import WorkflowRun, launch_workflow
from controller.workflows.services import running_services
from gpu_common import clock
from gpu_common.stats import percentile

RESULT_TIMEOUT_S = 900.0
SAMPLE_S = 0.25


class UtilisationSampler:
    """Reads the agent's GPU utilisation at every new telemetry sample, in a thread."""

    def __init__(self, agent_url: str) -> None:
        self._url = f"{agent_url}/v1/status"
        self._stop = threading.Event()
        self.samples: list[int] = []
        self._seen: set[str] = set()
        self._thread = threading.Thread(target=self._run, daemon=True, name="gpu-sampler")

    def __enter__(self) -> UtilisationSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        with httpx.Client(timeout=5.0) as client:
            while not self._stop.wait(SAMPLE_S / 2):
                try:
                    telemetry = client.get(self._url).json()["telemetry"]
                except (httpx.HTTPError, ValueError, KeyError):
                    continue
                taken_at = telemetry.get("taken_at")
                if taken_at is None or taken_at in self._seen or not telemetry["gpus"]:
                    continue
                self._seen.add(taken_at)
                util = telemetry["gpus"][0]["utilization_gpu_percent"]
                if util is not None:
                    self.samples.append(util)


def _fleet(controller_url: str) -> dict[str, Any]:
    response = httpx.get(f"{controller_url}/v1/fleet", timeout=10.0)
    response.raise_for_status()
    fleet: dict[str, Any] = response.json()
    return fleet


def _job(controller_url: str, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{controller_url}/v1/images/{job_id}", timeout=10.0)
    response.raise_for_status()
    job: dict[str, Any] = response.json()
    return job


def run(
    dags: int = 50, *, speed: float = 20.0, concurrency: int = 2, save: bool = True
) -> dict[str, Any]:
    """Send `dags` campaign DAGs at once; measure; print a table; record under `workflows`."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-workflows-") as folder,
        running_services(Path(folder), speed=speed, concurrency=concurrency) as services,
    ):
        with UtilisationSampler(services.agent_url) as sampler:
            started = clock.monotonic_s()
            runs: list[WorkflowRun] = [launch_workflow(campaign_dag(seed=i)) for i in range(dags)]
            durations: list[float] = []
            reports: list[dict[str, Any]] = []
            for workflow in runs:
                remaining = RESULT_TIMEOUT_S - (clock.monotonic_s() - started)
                reports.append(workflow.result(timeout_s=max(1.0, remaining)))
            makespan_s = clock.monotonic_s() - started
        for report in reports:
            ends = [n["finished_at"] for n in report["nodes"].values()]
            begins = [n["started_at"] for n in report["nodes"].values()]
            durations.append(_span_s(min(begins), max(ends)))
        image_jobs = [
            node["served_by"].get("job_id")
            for report in reports
            for node in report["nodes"].values()
            if node["agent_name"] == "image"
        ]
        jobs = [_job(services.controller_url, job_id) for job_id in image_jobs if job_id]
        made = sum(_fleet(services.controller_url)["jobs_by_state"].values())
    states = [report["state"] for report in reports]
    nodes = sum(len(report["nodes"]) for report in reports)
    figures: dict[str, Any] = {
        "config": {"dags": dags, "nodes_per_dag": nodes // max(1, dags), "speed": speed,
                   "concurrency": concurrency},
        "completion_s": round(makespan_s, 2),
        "dag_s": {
            "p50": round(percentile(durations, 50), 2),
            "p95": round(percentile(durations, 95), 2),
            "mean": round(statistics.fmean(durations), 2),
        },
        "succeeded": states.count("succeeded"),
        "gpu_busy_share": round(statistics.fmean(sampler.samples) / 100, 3)
        if sampler.samples else None,
        "gpu_samples": len(sampler.samples),
        "image_nodes": len(image_jobs),
        "image_jobs_made": made,
        "distinct_jobs": len(set(image_jobs)),
        "jobs_run_more_than_once": sum(1 for job in jobs if job["attempts"] != 1),
        "jobs_not_succeeded": sum(1 for job in jobs if job["state"] != "succeeded"),
    }  # fmt: skip
    figures["nothing_ran_twice"] = (
        figures["image_nodes"] == figures["image_jobs_made"] == figures["distinct_jobs"]
        and figures["jobs_run_more_than_once"] == 0
    )
    table(
        f"{dags} campaign DAGs ({nodes} nodes) at once, one worker of concurrency {concurrency}, "
        f"desktop x{speed:g}",
        ["completion s", "DAG p50 s", "DAG p95 s", "succeeded", "GPU busy", "image jobs",
         "nothing twice"],
        [[figures["completion_s"], figures["dag_s"]["p50"], figures["dag_s"]["p95"],
          f"{figures['succeeded']}/{dags}", figures["gpu_busy_share"],
          f"{made} for {len(image_jobs)} nodes", figures["nothing_ran_twice"]]],
    )  # fmt: skip
    if save:
        record("workflows", figures)
    return figures


def _span_s(first: str, last: str) -> float:
    return (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="50 workflow DAGs at once through Celery")
    parser.add_argument("--dags", type=int, default=50)
    parser.add_argument("--speed", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args(argv)
    run(args.dags, speed=args.speed, concurrency=args.concurrency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
