"""Workflows through a real Redis and a real Celery worker (two processes), against the
simulated stack on real time.

The campaign DAG completes with its references filled in; a failed node skips only its
dependents; held image nodes give their worker slots back, so another DAG's LLM nodes run;
revoking a workflow cancels its controller jobs; an invalid DAG never reaches the broker.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
from celery.signals import before_task_publish

from controller.workflows import (
    DagError,
    WorkflowApp,
    WorkflowRun,
    execute_workflow,
    execute_workflow_node,
    launch_workflow,
)
from controller.workflows.campaign import campaign_dag
from tests.integration.stack import AUTH, PNG_SIGNATURE
from tests.workflows.harness import StackThread, WorkerProcess, sdxl_workflow, wait_for

pytestmark = [pytest.mark.real_time, pytest.mark.timeout(60)]

RESULT_TIMEOUT_S = 30.0


def when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def job_record(stack: StackThread, job_id: str) -> Any:
    assert stack.stack is not None
    engine = stack.stack.engine
    return stack.call(functools.partial(engine.store.get, job_id))


def test_the_campaign_dag_completes_with_every_reference_filled(
    worker: WorkerProcess, sim_stack: StackThread
) -> None:
    prompts_before = sim_stack.prompts_run()
    run = launch_workflow(campaign_dag(seed=11))
    report = run.result(RESULT_TIMEOUT_S)

    nodes = report["nodes"]
    assert report["state"] == "succeeded", report
    assert report["run_id"] == run.run_id
    assert {n["state"] for n in nodes.values()} == {"succeeded"}
    # auto:quality is served by the best model that fits the card.
    assert nodes["brief"]["served_by"]["model"] == "qwen2.5:14b"
    assert nodes["brief"]["output"]["reason"]
    for variant in ("a", "b"):
        copy, image = nodes[f"copy_{variant}"], nodes[f"image_{variant}"]
        assert when(copy["started_at"]) >= when(nodes["brief"]["finished_at"])
        assert when(image["started_at"]) >= when(copy["finished_at"])
        # The image job's prompt is the copy node's text.
        job = job_record(sim_stack, image["served_by"]["job_id"])
        assert job.workflow["6"]["inputs"]["text"] == copy["output"]["text"]
        assert job.state == "succeeded"
        (url,) = image["output"]["outputs"]
        png = httpx.get(url, headers=AUTH, timeout=10.0)
        assert png.content.startswith(PNG_SIGNATURE)
    review = nodes["review"]
    assert review["output"]["text"]
    assert when(review["started_at"]) >= max(
        when(nodes[f"image_{v}"]["finished_at"]) for v in ("a", "b")
    )
    assert all(n["duration_s"] >= 0 for n in nodes.values())
    assert sim_stack.prompts_run() - prompts_before == 2


def test_a_failed_node_skips_its_dependents_and_independent_branches_finish(
    worker: WorkerProcess,
) -> None:
    dag = {
        "nodes": [
            {"id": "draft", "agent_name": "llm",
             "input_data": {"model": "no-such-model:1b", "prompt": "draft"}},
            {"id": "polish", "agent_name": "llm", "depends_on": ["draft"],
             "input_data": {"model": "auto:fast", "prompt": "polish {draft}"}},
            {"id": "publish", "agent_name": "llm", "depends_on": ["polish"],
             "input_data": {"model": "auto:fast", "prompt": "publish {polish}"}},
            {"id": "tagline", "agent_name": "llm",
             "input_data": {"model": "auto:fast", "prompt": "a tagline"}},
        ]
    }  # fmt: skip
    report = launch_workflow(dag).result(RESULT_TIMEOUT_S)

    nodes = report["nodes"]
    assert report["state"] == "failed"
    assert nodes["draft"]["state"] == "failed"
    assert "no-such-model:1b" in nodes["draft"]["reason"]
    assert nodes["polish"]["state"] == "skipped"
    assert nodes["polish"]["reason"].startswith("upstream 'draft' failed: ")
    assert nodes["publish"]["reason"].startswith("upstream 'polish' skipped: upstream 'draft'")
    assert nodes["tagline"]["state"] == "succeeded"
    assert nodes["tagline"]["output"]["text"]


def test_held_image_nodes_give_their_slots_back_and_a_revoke_cancels_their_jobs(
    worker: WorkerProcess, sim_stack: StackThread
) -> None:
    assert sim_stack.stack is not None
    fleet = sim_stack.call(sim_stack.stack.fleet)
    # Fits the budget on paper, never beside the desktop session: held until cancelled.
    unplaceable = fleet["agents"][0]["budget_bytes"]
    images = launch_workflow(
        {
            "nodes": [
                {
                    "id": f"image_{n}",
                    "agent_name": "image",
                    "input_data": {"workflow": sdxl_workflow(seed=n), "vram_bytes": unplaceable},
                }
                for n in range(4)
            ]
        }
    )

    def all_held() -> bool:
        progress = images.progress()
        return len(progress) == 4 and all(p["state"] == "held" for p in progress.values())

    wait_for(all_held, timeout_s=20.0, what="four image nodes held")
    text = launch_workflow(
        {
            "nodes": [
                {"id": "one", "agent_name": "llm", "input_data": {"prompt": "one"}},
                {"id": "two", "agent_name": "llm", "input_data": {"prompt": "{one}"},
                 "depends_on": ["one"]},
                {"id": "three", "agent_name": "strategist", "input_data": {"brief": "oat milk"},
                 "depends_on": ["two"]},
            ]
        }
    ).result(RESULT_TIMEOUT_S)  # fmt: skip
    assert text["state"] == "succeeded", text
    assert text["nodes"]["three"]["served_by"]["model"] == "qwen2.5:14b"
    assert not images.done()
    assert all(p["state"] == "held" for p in images.progress().values())

    assert images.revoke("campaign withdrawn") == []
    report = images.result(RESULT_TIMEOUT_S)
    assert report["state"] == "cancelled"
    for node in report["nodes"].values():
        assert node["state"] == "cancelled"
        assert node["reason"] == "workflow revoked: campaign withdrawn"
    jobs = images_jobs(images)
    assert len(jobs) == 4
    for job_id in jobs:
        assert job_record(sim_stack, job_id).state == "cancelled"


def images_jobs(run: WorkflowRun) -> list[str]:
    from controller.workflows import app

    return sorted(app.runs().jobs(run.run_id).values())


def test_a_single_node_runs_as_execute_workflow_node(worker: WorkerProcess) -> None:
    sent = execute_workflow_node.delay(
        "tagline", "llm", {"model": "auto:fast", "prompt": "a tagline for oat milk"}
    )
    result = WorkflowRun(sent.id).result(RESULT_TIMEOUT_S)
    assert result["state"] == "succeeded"
    assert result["output"]["text"]
    assert result["served_by"]["model"] == result["output"]["model"]


@pytest.fixture
def published(workflow_app: WorkflowApp) -> Iterator[list[str]]:
    """The names of the tasks sent to the broker while the test runs."""
    sent: list[str] = []

    def record(sender: str | None = None, **_: Any) -> None:
        sent.append(str(sender))

    before_task_publish.connect(record, weak=False)
    yield sent
    before_task_publish.disconnect(record)


def test_an_invalid_dag_is_refused_before_any_task_is_sent(published: list[str]) -> None:
    dag = campaign_dag()
    dag["nodes"][0]["depends_on"] = ["review"]
    with pytest.raises(DagError, match=r"^node 'brief': is in a cycle: brief -> review -> "):
        launch_workflow(dag)
    dag = campaign_dag()
    dag["nodes"][3]["agent_name"] = "painter"
    with pytest.raises(DagError, match=r"^node 'image_a': unknown agent 'painter'"):
        launch_workflow(dag)
    assert published == []


def test_a_dag_sent_past_validation_fails_in_the_worker_naming_the_node(
    worker: WorkerProcess,
) -> None:
    dag = campaign_dag()
    dag["nodes"][1]["depends_on"] = ["ghost"]
    with pytest.raises(Exception, match="node 'copy_a': depends on unknown node 'ghost'"):
        WorkflowRun(execute_workflow.delay(dag).id).result(RESULT_TIMEOUT_S)
