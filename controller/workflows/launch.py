"""Launching, following and revoking workflows from the studio's side (client layer).

    from controller.workflows import launch_workflow

    run = launch_workflow(dag)          # DagError before anything is sent, naming the node
    for node_id, state in run.progress().items(): ...
    report = run.result(timeout_s=600)  # every node's state, output, timings, model or job
    run.revoke("brief withdrawn")       # cancels the run's controller jobs

The DAG is validated here, with the same agents the workers know, so a bad DAG never reaches
the broker.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import redis
from celery.result import AsyncResult
from celery.states import PROPAGATE_STATES, SUCCESS

from controller.workflows.celery_app import app
from controller.workflows.dag import parse_dag
from controller.workflows.tasks import cancel_jobs, execute_workflow
from gpu_common import clock

# How often a wait for a workflow's report reads its state.
_POLL_S = 0.1


class WorkflowTimeout(TimeoutError):
    """The workflow had not finished within the time waited; it goes on."""


class WorkflowRun:
    """A launched workflow: its run id (the Celery task id) and what the studio can do with it."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def __repr__(self) -> str:
        return f"WorkflowRun({self.run_id!r})"

    def progress(self) -> dict[str, dict[str, Any]]:
        """Each node's latest state (`pending`, `running`, `held`, `succeeded`, ...) and
        reason, in the DAG's order."""
        runs = app.runs()
        dag = runs.dag(self.run_id) or {"nodes": []}
        states = runs.progress(self.run_id)
        order = [node["id"] for node in dag["nodes"]]
        pending = {"state": "pending", "reason": "not started"}
        return {node_id: states.get(node_id, pending) for node_id in order}

    def done(self) -> bool:
        """Whether the workflow has finished (its report is stored)."""
        return bool(AsyncResult(self.run_id, app=app).ready())

    def result(self, timeout_s: float) -> dict[str, Any]:
        """The workflow's report once it has finished, waiting at most `timeout_s`
        (`WorkflowTimeout` then); a workflow that could not run raises its error. A backend
        briefly away (a Redis restart) is waited for.

        It reads the stored state rather than subscribing: nothing is left listening on Redis
        after the call, whatever happens to the server later."""
        deadline = clock.monotonic_s() + timeout_s
        pause = threading.Event()
        while True:
            result = AsyncResult(self.run_id, app=app)
            try:
                state = result.state
                if state == SUCCESS:
                    report: dict[str, Any] = result.result
                    return report
                if state in PROPAGATE_STATES:
                    error = result.result
                    raise error if isinstance(error, BaseException) else RuntimeError(str(error))
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                pass
            if clock.monotonic_s() > deadline:
                raise WorkflowTimeout(
                    f"workflow {self.run_id} not finished after {timeout_s:g} s: "
                    + self._unfinished()
                )
            pause.wait(_POLL_S)

    def _unfinished(self) -> str:
        """The nodes not finished, with their states, for a timeout's message."""
        try:
            progress = self.progress()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            return f"its progress cannot be read ({exc})"
        waiting = [
            f"{node_id} {p['state']} ({p['reason']})"
            for node_id, p in progress.items()
            if p["state"] not in ("succeeded", "failed", "skipped", "cancelled")
        ]
        return "; ".join(waiting) or "every node has finished; the report was not stored"

    def revoke(self, reason: str = "revoked by the caller") -> list[str]:
        """Revoke the workflow: nodes not yet finished end cancelled, and the controller jobs
        it made are cancelled. Returns the jobs that could not be cancelled, with why."""
        return revoke_workflow(self.run_id, reason)


def launch_workflow(dag: dict[str, Any]) -> WorkflowRun:
    """Validate `dag` and send it to the workers. Raises `DagError` (naming the node) for
    an invalid DAG, before anything is sent."""
    app.load_agent_modules()
    parsed = parse_dag(dag, app.agents.checks())
    result = execute_workflow.apply_async((parsed.to_wire(),))
    return WorkflowRun(result.id)


def revoke_workflow(run_id: str, reason: str = "revoked by the caller") -> list[str]:
    """Revoke run `run_id`: mark it revoked (nodes that start from now on are cancelled, held
    ones stop retrying) and cancel every controller job its nodes made. A node that records a
    job after this reads the mark and cancels its own job."""
    runs = app.runs()
    runs.revoke(run_id, reason)
    jobs = sorted(set(runs.jobs(run_id).values()))
    return asyncio.run(cancel_jobs(jobs)) if jobs else []
