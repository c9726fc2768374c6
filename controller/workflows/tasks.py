"""The Celery tasks of studio workflows (imperative shell around `controller.workflows.dag`).

- `execute_workflow_node(node_id, agent_name, input_data)` runs one node through its agent.
  In a DAG it also gets `run_id` and `depends_on`: it reads its dependencies' results from the
  run records, skips (naming the upstream that failed) or fills its `{node_id}` references,
  and records its own result once, so a second delivery of the same node neither runs it
  again nor counts twice in the chord.
- `execute_workflow(dag)` validates the DAG and replaces itself with a Celery canvas: one
  group per level (nodes whose dependencies are all in earlier levels run in parallel), each
  level a chord whose body starts the next, ending in `finish_workflow`, whose report becomes
  the result of the workflow's own task id.

A node whose image job is held gives its worker slot back and retries after the hold's
`Retry-After` (capped by `hold_retry_max_s`). A soft time limit cancels the node's controller
jobs and fails the node with that reason. A failing node never fails its task: it returns a
result in state "failed", so independent branches of the DAG still finish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from datetime import datetime
from typing import Any, TypeVar

from celery import Task, chain, group, signature
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.result import AsyncResult
from celery.states import SUCCESS

from controller.client import StudioClient, StudioError, StudioRequestError
from controller.workflows.agents import NodeContext, NodeFailed, NodeHeld
from controller.workflows.celery_app import app
from controller.workflows.dag import Dag, Node, Run, decide, parse_dag, workflow_state
from controller.workflows.runs import RunStore
from gpu_common import clock

log = logging.getLogger(__name__)

T = TypeVar("T")

NODE_TASK = "controller.workflows.execute_workflow_node"
WORKFLOW_TASK = "controller.workflows.execute_workflow"
FINISH_TASK = "controller.workflows.finish_workflow"
LEVEL_TASK = "controller.workflows.level_done"
# A 409 from the controller: a request with the node's key is still being served; ask again
# after this long.
_IN_FLIGHT_RETRY_S = 1.0


def node_task_id(run_id: str, node_id: str) -> str:
    """The Celery task id of `node_id` in run `run_id` (fixed, so retries and redeliveries of
    one node share it)."""
    return f"{run_id}:{node_id}"


def _stamp() -> str:
    return clock.utc_now().isoformat().replace("+00:00", "Z")


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    # Each task runs its I/O on a loop of its own: a worker thread or process has none.
    return asyncio.run(coroutine)


def _studio() -> StudioClient:
    settings = app.workflow_settings
    return StudioClient(
        settings.controller_url, token=settings.token(), timeout_s=settings.request_timeout_s
    )


async def cancel_jobs(job_ids: list[str]) -> list[str]:
    """Cancel the controller's jobs `job_ids`; what could not be cancelled, with why."""
    problems = []
    async with _studio() as studio:
        for job_id in job_ids:
            try:
                await studio.cancel(job_id)
            except StudioError as exc:
                problems.append(f"{job_id}: {exc}")
    return problems


def _served_by(output: dict[str, Any] | None) -> dict[str, Any]:
    if not output:
        return {}
    return {k: output[k] for k in ("model", "agent", "job_id") if output.get(k) is not None}


def _result(
    node: Node,
    state: str,
    reason: str,
    *,
    started_at: str,
    attempts: int,
    output: dict[str, Any] | None = None,
) -> dict[str, Any]:
    finished_at = _stamp()
    elapsed = datetime.fromisoformat(finished_at) - datetime.fromisoformat(started_at)
    return {
        "node_id": node.id,
        "agent_name": node.agent_name,
        "state": state,
        "reason": reason,
        "output": output,
        "served_by": _served_by(output),
        "started_at": started_at,
        "finished_at": finished_at,
        "duration_s": round(elapsed.total_seconds(), 3),
        "attempts": attempts,
    }


def _already_counted(task: Task) -> bool:
    """Whether this task id's result is already stored (an earlier delivery finished)."""
    return bool(AsyncResult(task.request.id, app=app).state == SUCCESS)


async def _run_agent(
    node: Node, input_data: dict[str, Any], context: NodeContext
) -> dict[str, Any]:
    agent = app.agents.get(node.agent_name)
    async with _studio() as studio:
        context.studio = studio
        return await agent.run(context, input_data)


@app.task(bind=True, name=NODE_TASK, max_retries=None)  # type: ignore[untyped-decorator]
def execute_workflow_node(
    self: Task,
    node_id: str,
    agent_name: str,
    input_data: dict[str, Any],
    *,
    run_id: str | None = None,
    depends_on: list[str] | None = None,
) -> dict[str, Any]:
    """Run one workflow node with the agent `agent_name`; its result as JSON.

    The result: `state` (succeeded, failed, skipped, cancelled), `reason`, `output` (the
    agent's JSON), `served_by` (the model or job), `started_at`, `finished_at`, `attempts`."""
    app.load_agent_modules()
    run_id = run_id or self.request.id
    node = Node(node_id, agent_name, input_data, tuple(depends_on or ()))
    runs = app.runs()
    recorded = runs.result(run_id, node_id)
    if recorded is not None:
        # An earlier delivery finished this node: count it once.
        if _already_counted(self):
            raise Ignore()
        return recorded
    started_at = runs.mark_started(run_id, node_id, _stamp())
    attempts = self.request.retries + 1
    upstream = {d: runs.result(run_id, d) for d in node.depends_on}
    decision = decide(node, upstream, revoked=runs.revoked(run_id))
    if not isinstance(decision, Run):
        result = _result(node, decision.state, decision.reason, started_at=started_at,
                         attempts=attempts)  # fmt: skip
        return _finish(self, runs, run_id, result)
    if node.agent_name not in app.agents.checks():
        result = _result(node, "failed", f"unknown agent {node.agent_name!r}",
                         started_at=started_at, attempts=attempts)  # fmt: skip
        return _finish(self, runs, run_id, result)
    context = NodeContext(
        run_id=run_id,
        node_id=node_id,
        studio=None,  # type: ignore[arg-type]  # set inside the task's own loop
        settings=app.workflow_settings,
        on_job=lambda job_id: _note_job(runs, run_id, node_id, job_id),
        on_progress=lambda state, reason: runs.set_progress(
            run_id, node_id, {"state": state, "reason": reason}
        ),
    )
    if attempts == 1:
        context.report("running", f"{node.agent_name} started")
    try:
        output = _run(_run_agent(node, decision.input_data, context))
    except NodeHeld as held:
        revoked = runs.revoked(run_id)
        if revoked is None:
            settings = app.workflow_settings
            countdown = min(held.retry_after_s or settings.hold_retry_s, settings.hold_retry_max_s)
            runs.set_progress(run_id, node_id, {"state": "held", "reason": held.reason})
            log.info("node %s of %s held (%s); again in %.1f s", node_id, run_id, held, countdown)
            raise self.retry(countdown=countdown, exc=held) from held
        result = _result(node, "cancelled", f"workflow revoked: {revoked}",
                         started_at=started_at, attempts=attempts)  # fmt: skip
        _run(cancel_jobs(context.jobs))
        return _finish(self, runs, run_id, result)
    except SoftTimeLimitExceeded:
        problems = _run(cancel_jobs(context.jobs))
        limit = app.workflow_settings.soft_time_limit_s
        jobs = f"; cancelled job(s) {', '.join(context.jobs)}" if context.jobs else ""
        trouble = f" ({'; '.join(problems)})" if problems else ""
        result = _result(node, "failed", f"soft time limit of {limit:g} s reached{jobs}{trouble}",
                         started_at=started_at, attempts=attempts)  # fmt: skip
        return _finish(self, runs, run_id, result)
    except StudioRequestError as exc:
        if exc.status == 409:
            raise self.retry(countdown=_IN_FLIGHT_RETRY_S, exc=exc) from exc
        result = _result(node, "failed", str(exc), started_at=started_at, attempts=attempts)
        return _finish(self, runs, run_id, result)
    except (NodeFailed, StudioError) as exc:
        reason = exc.reason if isinstance(exc, NodeFailed) else f"{type(exc).__name__}: {exc}"
        state = "failed"
        revoked = runs.revoked(run_id)
        if revoked is not None:
            state, reason = "cancelled", f"workflow revoked: {revoked}"
            _run(cancel_jobs(context.jobs))
        result = _result(node, state, reason, started_at=started_at, attempts=attempts)
        return _finish(self, runs, run_id, result)
    except Exception as exc:
        log.exception("node %s of %s failed", node_id, run_id)
        result = _result(node, "failed", f"{type(exc).__name__}: {exc}",
                         started_at=started_at, attempts=attempts)  # fmt: skip
        return _finish(self, runs, run_id, result)
    revoked = runs.revoked(run_id)
    if revoked is not None:
        _run(cancel_jobs(context.jobs))
        result = _result(node, "cancelled", f"workflow revoked: {revoked}",
                         started_at=started_at, attempts=attempts, output=output)  # fmt: skip
    else:
        result = _result(node, "succeeded", "done", started_at=started_at, attempts=attempts,
                         output=output)  # fmt: skip
    return _finish(self, runs, run_id, result)


def _note_job(runs: RunStore, run_id: str, node_id: str, job_id: str) -> None:
    """Record the node's job where a revoke finds it; if the run was revoked before the
    revoke could see it, stop now (the node then cancels the job itself)."""
    runs.add_job(run_id, node_id, job_id)
    revoked = runs.revoked(run_id)
    if revoked is not None:
        raise NodeFailed(f"workflow revoked: {revoked}")


def _finish(task: Task, runs: RunStore, run_id: str, result: dict[str, Any]) -> dict[str, Any]:
    """Record `result` unless another delivery of the node recorded one first; return the
    recorded one, or stop quietly if that delivery's result is already counted."""
    if runs.finish(run_id, result["node_id"], result):
        return result
    if _already_counted(task):
        raise Ignore()
    recorded = runs.result(run_id, result["node_id"])
    return recorded if recorded is not None else result


@app.task(name=LEVEL_TASK)  # type: ignore[untyped-decorator]
def level_done(results: list[Any] | None = None, *, run_id: str, level: int) -> int:
    """The barrier after one level of a DAG: the next level starts when it has run."""
    return level


@app.task(name=FINISH_TASK)  # type: ignore[untyped-decorator]
def finish_workflow(*_previous: Any, run_id: str, dag: dict[str, Any]) -> dict[str, Any]:
    """The workflow's report: every node's result, the overall state and the timings."""
    parsed = parse_dag(dag, app.agents.checks())
    recorded = app.runs().results(run_id)
    nodes: dict[str, dict[str, Any]] = {}
    for node in parsed.nodes:
        nodes[node.id] = recorded.get(node.id) or {
            "node_id": node.id,
            "agent_name": node.agent_name,
            "state": "failed",
            "reason": "the node left no result",
            "output": None,
            "served_by": {},
            "started_at": None,
            "finished_at": None,
            "duration_s": None,
            "attempts": 0,
        }
    starts = [n["started_at"] for n in nodes.values() if n.get("started_at")]
    ends = [n["finished_at"] for n in nodes.values() if n.get("finished_at")]
    return {
        "run_id": run_id,
        "state": workflow_state(nodes),
        "nodes": nodes,
        "started_at": min(starts) if starts else None,
        "finished_at": max(ends) if ends else None,
    }


def build_canvas(dag: Dag, run_id: str) -> Any:
    """The canvas that runs `dag` as run `run_id`: per level a group of node tasks and a
    barrier (together a chord), then the report."""
    steps: list[Any] = []
    for index, level in enumerate(dag.levels()):
        nodes = [dag.node(node_id) for node_id in level]
        steps.append(
            group(
                signature(
                    NODE_TASK,
                    args=(node.id, node.agent_name, dict(node.input_data)),
                    kwargs={"run_id": run_id, "depends_on": list(node.depends_on)},
                    immutable=True,
                    app=app,
                ).set(task_id=node_task_id(run_id, node.id))
                for node in nodes
            )
        )
        steps.append(
            signature(LEVEL_TASK, kwargs={"run_id": run_id, "level": index}, app=app).set(
                immutable=True
            )
        )
    steps[-1] = signature(
        FINISH_TASK, kwargs={"run_id": run_id, "dag": dag.to_wire()}, immutable=True, app=app
    )
    return chain(*steps)


@app.task(bind=True, name=WORKFLOW_TASK)  # type: ignore[untyped-decorator]
def execute_workflow(self: Task, dag: dict[str, Any]) -> Any:
    """Run `dag` (`{"nodes": [{"id", "agent_name", "input_data", "depends_on"}]}`); the
    result is `finish_workflow`'s report. An invalid DAG fails here, naming the node."""
    app.load_agent_modules()
    parsed = parse_dag(dag, app.agents.checks())
    run_id = self.request.id
    runs = app.runs()
    runs.save_dag(run_id, parsed.to_wire())
    for node in parsed.nodes:
        if runs.result(run_id, node.id) is None:
            runs.set_progress(run_id, node.id, {"state": "pending", "reason": "waiting"})
    raise self.replace(build_canvas(parsed, run_id))
