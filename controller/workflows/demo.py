"""`make demo`, part three: the campaign DAG through Celery and Redis, with live progress.

Starts Redis, the simulated desktop and its agent, a controller and one Celery worker (two
processes, as on the Mac mini), each its own process; sends the campaign (a brief, two copy
variants, an SDXL image for each, a review) and shows every node's state as it changes, then
what served each node and how long it took. The desktop runs `--speed` times faster than the
real card; the figures it reports stay in the card's own seconds.

    python -m controller.workflows.demo [--speed 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from controller.workflows.campaign import campaign_dag
from controller.workflows.launch import WorkflowRun, launch_workflow
from controller.workflows.services import running_services
from gpu_common import clock

_COLOURS = {
    "pending": "dim",
    "running": "cyan",
    "held": "yellow",
    "succeeded": "green",
    "failed": "red",
    "skipped": "magenta",
    "cancelled": "magenta",
}
_REFRESH_S = 0.2
RESULT_TIMEOUT_S = 300.0


def _progress_table(run: WorkflowRun, elapsed_s: float) -> Table:
    table = Table(title=f"campaign {run.run_id[:8]}, {elapsed_s:4.1f} s", title_justify="left")
    for column in ("node", "state", "why"):
        table.add_column(column)
    for node_id, progress in run.progress().items():
        state = progress["state"]
        table.add_row(node_id, f"[{_COLOURS.get(state, '')}]{state}[/]", progress["reason"][:70])
    return table


def _summary(report: dict[str, Any]) -> Table:
    table = Table(title=f"campaign {report['state']}", title_justify="left")
    for column in ("node", "state", "served by", "took s", "output"):
        table.add_column(column)
    for node_id, node in report["nodes"].items():
        served = node["served_by"]
        by = served.get("model") or (f"job {served['job_id'][:8]}" if "job_id" in served else "")
        output = node["output"] or {}
        text = output.get("text") or " ".join(output.get("outputs") or []) or node["reason"]
        table.add_row(node_id, node["state"], by, f"{node['duration_s'] or 0:.2f}", text[:60])
    return table


def main(argv: list[str] | None = None) -> int:
    """Run the demo; 0 when the campaign succeeded."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", type=float, default=10.0, help="simulated desktop speed")
    args = parser.parse_args(argv)
    console = Console()
    console.rule("Studio workflows on Celery and Redis")
    with tempfile.TemporaryDirectory(prefix="workflows-demo-") as folder:
        console.print(
            "starting Redis, the simulated desktop and agent, the controller and a Celery "
            "worker (concurrency 2) ..."
        )
        with running_services(Path(folder), speed=args.speed) as services:
            console.print(
                f"controller {services.controller_url}, Redis {services.redis_url}; "
                f"desktop at x{args.speed:g}"
            )
            started = clock.monotonic_s()
            run = launch_workflow(campaign_dag())
            pause = threading.Event()
            with Live(_progress_table(run, 0.0), console=console, auto_refresh=False) as live:
                while not run.done():
                    if clock.monotonic_s() - started > RESULT_TIMEOUT_S:
                        break
                    live.update(_progress_table(run, clock.monotonic_s() - started), refresh=True)
                    pause.wait(_REFRESH_S)
                live.update(_progress_table(run, clock.monotonic_s() - started), refresh=True)
            took_s = clock.monotonic_s() - started
            report = run.result(timeout_s=5.0)
            console.print()
            console.print(_summary(report))
            fleet = httpx.get(f"{services.controller_url}/v1/fleet", timeout=10.0).json()
            images = sum(1 for n in report["nodes"].values() if n["agent_name"] == "image")
            console.print(
                f"{len(report['nodes'])} nodes in {took_s:.1f} s. The controller made "
                f"{sum(fleet['jobs_by_state'].values())} image job(s) for {images} image "
                "node(s): each node's submission carries the key workflow/<run>/<node>, so a "
                "retried or redelivered node reattaches to its job."
            )
    return 0 if report["state"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
