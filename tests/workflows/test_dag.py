"""The DAG core as tables: validation errors name the node, levels, run or skip, references."""

from __future__ import annotations

from typing import Any

import pytest

from controller.workflows.agents import (
    AgentRegistry,
    NodeContext,
    apply_inputs,
    check_image_input,
    check_llm_input,
)
from controller.workflows.campaign import campaign_dag
from controller.workflows.dag import (
    DagError,
    Node,
    Run,
    Skip,
    decide,
    fill_references,
    parse_dag,
    workflow_state,
)
from controller.workflows.settings import WorkflowSettings
from tests.workflows.harness import sdxl_workflow

CHECKS = AgentRegistry().checks()


def llm(node_id: str, prompt: str = "hi", depends_on: list[str] | None = None) -> dict[str, Any]:
    return {
        "id": node_id,
        "agent_name": "llm",
        "input_data": {"prompt": prompt},
        "depends_on": depends_on or [],
    }


def test_the_campaign_runs_in_four_levels() -> None:
    dag = parse_dag(campaign_dag(), CHECKS)
    assert dag.levels() == [["brief"], ["copy_a", "copy_b"], ["image_a", "image_b"], ["review"]]
    assert parse_dag(dag.to_wire(), CHECKS) == dag


def test_a_node_goes_one_level_below_its_deepest_dependency() -> None:
    dag = parse_dag(
        {
            "nodes": [
                llm("d", depends_on=["a", "c"]),
                llm("a"),
                llm("b"),
                llm("c", depends_on=["b"]),
            ]
        },
        CHECKS,
    )
    assert dag.levels() == [["a", "b"], ["c"], ["d"]]


@pytest.mark.parametrize(
    ("nodes", "node", "fragment"),
    [
        ([llm("a", depends_on=["b"]), llm("b", depends_on=["a"])], "a", "cycle: a -> b -> a"),
        ([llm("a", depends_on=["a"])], "a", "depends on itself"),
        ([llm("a", depends_on=["ghost"])], "a", "unknown node 'ghost'"),
        ([{**llm("a"), "agent_name": "painter"}], "a", "unknown agent 'painter'"),
        ([llm("a"), llm("a")], "a", "more than once"),
        ([llm("a"), llm("b", prompt="use {a}")], "b", "refers to {a} but does not depend"),
        ([{**llm("a"), "input_data": {}}], "a", "exactly one of 'prompt' and 'messages'"),
        ([{**llm("a"), "input_data": {"prompt": "x", "min_quality": 400}}], "a", "min_quality"),
        ([{**llm("a"), "input_data": {"prompt": "x", "temperature": 1}}], "a", "'temperature'"),
        ([{**llm("a"), "depends_on": "b"}], "a", "'depends_on' must be a list"),
        ([{**llm("a"), "extra": 1}], "a", "unknown fields ['extra']"),
        (
            [{"id": "img", "agent_name": "image", "input_data": {"workflow": {}}}],
            "img",
            "'workflow' must be a ComfyUI workflow",
        ),
        (
            [
                {
                    "id": "img",
                    "agent_name": "image",
                    "input_data": {"workflow": sdxl_workflow(), "inputs": {"99.text": "x"}},
                }
            ],
            "img",
            "names workflow node '99'",
        ),
    ],
)
def test_an_invalid_dag_is_refused_naming_the_node(
    nodes: list[dict[str, Any]], node: str, fragment: str
) -> None:
    with pytest.raises(DagError) as caught:
        parse_dag({"nodes": nodes}, CHECKS)
    assert caught.value.node == node
    assert str(caught.value).startswith(f"node {node!r}: ")
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ([], "a DAG is an object"),
        ({"nodes": []}, "non-empty list"),
        ({"nodes": [llm("a")], "edges": []}, "unknown DAG fields"),
        ({"nodes": ["a"]}, "node #0 must be an object"),
        ({"nodes": [{**llm("a"), "id": "has.dot"}]}, "node #0: 'id' must be a name"),
    ],
)
def test_a_malformed_dag_is_refused_saying_what_is_wrong(raw: Any, fragment: str) -> None:
    with pytest.raises(DagError, match=fragment):
        parse_dag(raw, CHECKS)


def ok(output: dict[str, Any]) -> dict[str, Any]:
    return {"state": "succeeded", "reason": "done", "output": output}


NODE = Node("review", "llm", {"prompt": "{a} / {b.model} / {x} / {}"}, ("a", "b"))


@pytest.mark.parametrize(
    ("upstream", "revoked", "expected"),
    [
        (
            {"a": ok({"text": "A"}), "b": ok({"text": "B", "model": "qwen"})},
            None,
            Run({"prompt": "A / qwen / {x} / {}"}),
        ),
        (
            {"a": {"state": "failed", "reason": "OOM"}, "b": ok({})},
            None,
            Skip("skipped", "upstream 'a' failed: OOM"),
        ),
        (
            {"a": ok({}), "b": {"state": "skipped", "reason": "upstream 'z' failed: x"}},
            None,
            Skip("skipped", "upstream 'b' skipped: upstream 'z' failed: x"),
        ),
        ({"a": ok({}), "b": None}, None, Skip("skipped", "upstream 'b' left no result")),
        (
            {"a": ok({}), "b": ok({})},
            "brief withdrawn",
            Skip("cancelled", "workflow revoked: brief withdrawn"),
        ),
    ],
)
def test_a_node_runs_only_when_every_dependency_succeeded(
    upstream: dict[str, Any], revoked: str | None, expected: Run | Skip
) -> None:
    assert decide(NODE, upstream, revoked=revoked) == expected


def test_references_reach_into_nested_inputs_and_outputs_without_text_become_json() -> None:
    filled = fill_references(
        {"inputs": {"6.text": "{copy}"}, "list": ["{img.outputs}", 3], "keep": "{other}"},
        {"copy": {"text": "Oat milk, in bloom"}, "img": {"outputs": ["http://c/1.png"]}},
    )
    assert filled == {
        "inputs": {"6.text": "Oat milk, in bloom"},
        "list": ['["http://c/1.png"]', 3],
        "keep": "{other}",
    }


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        (["succeeded", "succeeded"], "succeeded"),
        (["succeeded", "failed", "skipped"], "failed"),
        (["cancelled", "failed"], "cancelled"),
    ],
)
def test_the_workflow_state_follows_its_nodes(states: list[str], expected: str) -> None:
    results = {f"n{i}": {"state": s} for i, s in enumerate(states)}
    assert workflow_state(results) == expected


@pytest.mark.parametrize(
    ("data", "problems"),
    [
        ({"model": "auto:quality", "prompt": "x", "max_latency_s": 5}, []),
        ({"messages": [{"role": "user", "content": "x"}]}, []),
        (
            {"prompt": "x", "messages": [{"role": "user", "content": "x"}]},
            ["give exactly one of 'prompt' and 'messages'"],
        ),
        (
            {"messages": [{"content": "x"}]},
            ["each message must be an object with 'role' and 'content'"],
        ),
        (
            {"prompt": "x", "model": ""},
            ["'model' must be a model name or an intent such as 'auto:quality'"],
        ),
        ({"prompt": "x", "max_latency_s": 0}, ["'max_latency_s' must be a positive number"]),
    ],
)
def test_llm_input_checks(data: dict[str, Any], problems: list[str]) -> None:
    assert check_llm_input(data) == problems


@pytest.mark.parametrize(
    ("data", "problems"),
    [
        ({"workflow": sdxl_workflow(), "inputs": {"6.text": "x"}, "vram_bytes": 1 << 30}, []),
        ({"workflow": {"1": {"inputs": {}}}}, ["workflow node '1' has no class_type"]),
        (
            {"workflow": sdxl_workflow(), "inputs": {"text": "x"}},
            ["input 'text' must be 'node.input', e.g. '6.text'"],
        ),
        (
            {"workflow": sdxl_workflow(), "vram_bytes": -1},
            ["'vram_bytes' must be a non-negative integer"],
        ),
        (
            {"workflow": sdxl_workflow(), "priority": 500},
            ["'priority' must be an integer from -100 to 100"],
        ),
    ],
)
def test_image_input_checks(data: dict[str, Any], problems: list[str]) -> None:
    assert check_image_input(data) == problems


def test_inputs_set_node_inputs_on_a_copy() -> None:
    workflow = sdxl_workflow()
    changed = apply_inputs(workflow, {"6.text": "a red kite", "3.seed": 7})
    assert changed["6"]["inputs"]["text"] == "a red kite"
    assert changed["3"]["inputs"]["seed"] == 7
    assert workflow["6"]["inputs"]["text"] != "a red kite"


def test_a_registered_agent_is_known_to_validation() -> None:
    registry = AgentRegistry()

    @registry.register("strategist", check=lambda data: [] if "brief" in data else ["needs brief"])
    async def strategist(ctx: NodeContext, data: dict[str, Any]) -> dict[str, Any]:
        return await ctx.llm({"model": "auto:quality", "prompt": data["brief"]})

    checks = registry.checks()
    assert parse_dag(
        {"nodes": [{"id": "s", "agent_name": "strategist", "input_data": {"brief": "b"}}]}, checks
    )
    with pytest.raises(DagError, match="bad input for strategist: needs brief"):
        parse_dag({"nodes": [{"id": "s", "agent_name": "strategist"}]}, checks)


def test_the_celery_settings_are_json_only_with_the_studios_limits() -> None:
    config = WorkflowSettings().celery_config()
    assert config["task_serializer"] == config["result_serializer"] == "json"
    assert config["accept_content"] == ["json"]
    assert (config["task_time_limit"], config["task_soft_time_limit"]) == (600.0, 540.0)
    assert config["task_acks_late"] is True
    assert config["task_reject_on_worker_lost"] is True
    assert config["worker_concurrency"] == 2
    assert config["broker_url"].startswith("redis://")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"soft_time_limit_s": 700}, "soft_time_limit_s must be below time_limit_s"),
        ({"visibility_timeout_s": 300}, "visibility_timeout_s (300) must exceed"),
        ({"broker_url": "amqp://guest@localhost//"}, "must be a redis://"),
    ],
)
def test_settings_that_would_run_a_task_twice_are_refused(
    overrides: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        WorkflowSettings(**overrides)


def test_agent_modules_come_from_a_comma_separated_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GPU_WORKFLOWS_AGENT_MODULES", "studio.agents, studio.personas")
    assert WorkflowSettings().agent_modules == ["studio.agents", "studio.personas"]
    assert WorkflowSettings().celery_config()["imports"][-2:] == [
        "studio.agents",
        "studio.personas",
    ]
