"""Workers as the Mac mini runs them (`celery -A controller.workflows worker`, prefork, two
processes), and the faults they must survive: a worker SIGKILLed mid-DAG, a soft time limit
on a node whose image job runs long, a Redis restart mid-run.

The workers here take short limits (hard 5 s, soft 4 s) so that a lost worker's tasks come
back after a 6 s visibility timeout instead of an hour.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.workflows import (
    WorkflowApp,
    WorkflowRun,
    execute_workflow_node,
    launch_workflow,
)
from controller.workflows.campaign import campaign_dag
from controller.workflows.settings import WorkflowSettings
from tests.workflows.harness import (
    RedisServer,
    StackThread,
    WorkerProcess,
    sdxl_workflow,
    wait_for,
)

pytestmark = [pytest.mark.real_time, pytest.mark.timeout(60)]

RESULT_TIMEOUT_S = 40.0


@pytest.fixture
def worker_settings(redis_server: RedisServer, sim_stack: StackThread) -> WorkflowSettings:
    return redis_server.settings(
        sim_stack.url,
        time_limit_s=5.0,
        soft_time_limit_s=4.0,
        visibility_timeout_s=6.0,
        restore_interval_s=0.5,
    )


@pytest.fixture
def start_worker(
    workflow_app: WorkflowApp, worker_settings: WorkflowSettings, tmp_path: Path
) -> Iterator[Callable[[str], WorkerProcess]]:
    """Starts named worker subprocesses, ready to take tasks; stops them all after the test."""
    started: list[WorkerProcess] = []

    def ping(name: str) -> bool:
        return bool(workflow_app.control.ping(destination=[name], timeout=0.5))

    def start(name: str) -> WorkerProcess:
        worker = WorkerProcess(worker_settings, name, log=tmp_path / f"{name}.log")
        started.append(worker)
        worker.wait_ready(ping)
        return worker

    yield start
    for worker in started:
        worker.stop()


def job_state(stack: StackThread, job_id: str) -> str | None:
    assert stack.stack is not None
    engine = stack.stack.engine
    record: Any = stack.call(functools.partial(engine.store.get, job_id))
    return record.state if record is not None else None


def jobs_made(stack: StackThread) -> int:
    return sum(stack.job_counts().values())


def test_a_worker_killed_mid_dag_is_replaced_and_no_image_runs_twice(
    workflow_app: WorkflowApp,
    sim_stack: StackThread,
    start_worker: Callable[[str], WorkerProcess],
) -> None:
    jobs_before, prompts_before = jobs_made(sim_stack), sim_stack.prompts_run()
    first = start_worker("first")
    # 150 steps: each image takes more than a second, long enough to kill the worker under it.
    run = launch_workflow(campaign_dag(seed=21, steps=150))
    runs = workflow_app.runs()

    def image_running() -> bool:
        job_id = runs.jobs(run.run_id).get("image_a")
        return job_id is not None and job_state(sim_stack, job_id) in ("dispatched", "running")

    wait_for(image_running, timeout_s=20.0, what="image_a's job to run")
    first.kill()
    start_worker("second")
    report = run.result(RESULT_TIMEOUT_S)

    assert report["state"] == "succeeded", report
    assert jobs_made(sim_stack) - jobs_before == 2
    assert sim_stack.prompts_run() - prompts_before == 2
    jobs = runs.jobs(run.run_id)
    for variant in ("a", "b"):
        node = report["nodes"][f"image_{variant}"]
        assert node["served_by"]["job_id"] == jobs[f"image_{variant}"]
        assert job_state(sim_stack, jobs[f"image_{variant}"]) == "succeeded"


def test_a_soft_time_limit_cancels_the_nodes_job_and_fails_the_node(
    sim_stack: StackThread, start_worker: Callable[[str], WorkerProcess]
) -> None:
    start_worker("limited")
    # 3,000 steps: about twelve minutes on the card, far past the 4 s soft limit here.
    # The limits travel in the message, from the sender's settings: these match the worker's.
    sent = execute_workflow_node.apply_async(
        ("long_render", "image", {"workflow": sdxl_workflow(seed=5, steps=3000)}),
        time_limit=5.0,
        soft_time_limit=4.0,
    )
    result = WorkflowRun(sent.id).result(RESULT_TIMEOUT_S)

    assert result["state"] == "failed"
    assert result["reason"].startswith("soft time limit of 4 s reached; cancelled job(s) ")
    job_id = result["reason"].rsplit(" ", 1)[-1]
    assert wait_for(
        lambda: job_state(sim_stack, job_id) == "cancelled",
        timeout_s=10.0,
        what="the job to be cancelled",
    )


def test_a_redis_restart_mid_run_loses_nothing(
    workflow_app: WorkflowApp,
    redis_server: RedisServer,
    sim_stack: StackThread,
    start_worker: Callable[[str], WorkerProcess],
) -> None:
    jobs_before, prompts_before = jobs_made(sim_stack), sim_stack.prompts_run()
    start_worker("steady")
    run = launch_workflow(campaign_dag(seed=31, steps=150))
    runs = workflow_app.runs()

    def images_running() -> bool:
        jobs = runs.jobs(run.run_id)
        states = [job_state(sim_stack, job_id) for job_id in jobs.values()]
        return len(states) == 2 and "running" in states and "succeeded" not in states

    # The images render (one, the other queued) while Redis goes away: their nodes hold
    # unacknowledged messages, and the copy nodes' results are on disk.
    wait_for(images_running, timeout_s=20.0, what="the image jobs to run")
    brief = runs.result(run.run_id, "brief")
    redis_server.restart()
    report = run.result(RESULT_TIMEOUT_S)

    # What was acknowledged before the restart is still there, unchanged.
    assert report["nodes"]["brief"] == brief
    assert report["state"] == "succeeded", report
    assert jobs_made(sim_stack) - jobs_before == 2
    assert sim_stack.prompts_run() - prompts_before == 2
