"""The controller's HTTP API over real sockets: Ollama compatibility, capacity errors, image jobs.

Ollama's own client library talks to the controller as if it were Ollama; the image API is
checked for its status codes, headers and streamed events; requests that cannot be served get
503 with `Retry-After` and the core's reason, malformed ones 400, unknown things 404.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from gpu_agent.daemon import running_agent
from gpu_agent.sim.desktop import SimDesktop
from gpu_agent.sim.workflows import blank_image
from tests.integration.error_bodies import error_of
from tests.integration.stack import (
    CONTROLLER_TOKEN,
    IMPATIENT_WAIT_S,
    PNG_SIGNATURE,
    POLL_S,
    Stack,
    agent_settings,
    ndjson_lines,
    ollama_client,
    running_controller_on,
    running_stack,
    sd15,
    sdxl,
)
from tests.waiting import wait_until

SMALL = "llama3.2:3b"
MID = "qwen2.5:7b"
AUTO = ("auto", "auto:fast", "auto:quality")
# How long an impatient stack's LLM requests wait for room before a 503, in simulated seconds.


@pytest.fixture
async def stack(desktop: SimDesktop, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(desktop, tmp_path / "controller") as running:
        yield running


@pytest.fixture
async def impatient(desktop: SimDesktop, tmp_path: Path) -> AsyncIterator[Stack]:
    """A stack whose LLM requests wait only briefly for capacity before a 503."""
    async with running_stack(
        desktop, tmp_path / "controller", llm_wait_s=IMPATIENT_WAIT_S
    ) as running:
        yield running


# -- 5: the official ollama client against the controller -------------------------------------


async def test_ollama_client_lists_virtual_and_real_models(stack: Stack) -> None:
    listed = await ollama_client(stack).list()

    names = [m.model for m in listed.models]
    assert names[:3] == list(AUTO)
    for model in (SMALL, MID, "qwen2.5:14b", "mistral-small:latest"):
        assert model in names
    (real,) = [m for m in listed.models if m.model == SMALL]
    assert real.size is not None
    assert real.size > 0
    assert real.details is not None
    assert real.details.parameter_size == "3.2B"


async def test_ollama_client_generate_and_chat(stack: Stack) -> None:
    api = ollama_client(stack)

    answer = await api.generate(model=SMALL, prompt="say hi", options={"num_predict": 12})
    assert answer.model == SMALL
    assert answer.done is True
    assert answer.eval_count == 12
    assert answer.done_reason == "length"
    assert answer.response

    parts = [
        part
        async for part in await api.generate(
            model=SMALL, prompt="count", stream=True, options={"num_predict": 20}
        )
    ]
    assert len(parts) > 2
    assert parts[-1].done is True
    assert all(not p.done for p in parts[:-1])
    assert parts[-1].eval_count == 20
    assert "".join(p.response or "" for p in parts).strip()

    reply = await api.chat(
        model="auto:fast",
        messages=[{"role": "user", "content": "hello"}],
        options={"num_predict": 10},
    )
    # The controller answers with the concrete model it chose.
    assert reply.model == SMALL
    assert reply.message.role == "assistant"
    assert reply.message.content

    chunks = [
        chunk
        async for chunk in await api.chat(
            model=SMALL,
            messages=[{"role": "user", "content": "tell me more"}],
            stream=True,
            options={"num_predict": 15},
        )
    ]
    assert chunks, "the streamed chat sent nothing"
    assert chunks[-1].done is True
    assert chunks[-1].eval_count == 15
    assert "".join(c.message.content or "" for c in chunks).strip()


async def test_ollama_client_ps_and_show(stack: Stack) -> None:
    api = ollama_client(stack)
    await api.generate(model=SMALL, prompt="warm up", options={"num_predict": 4})

    running = await api.ps()
    assert [m.model for m in running.models] == [SMALL]
    assert running.models[0].size_vram == running.models[0].size

    shown = await api.show(MID)
    assert shown.details is not None
    assert shown.details.family == "qwen2"
    assert shown.modelinfo

    virtual = await api.show("auto:quality")
    assert virtual.details is not None
    assert virtual.details.family == "auto"

    with pytest.raises(ollama.ResponseError) as caught:
        await api.show("no-such-model:1b")
    assert caught.value.status_code == 404


async def test_ollama_client_unknown_model_is_404(stack: Stack) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        await ollama_client(stack).generate(model="no-such-model:1b", prompt="hi")
    assert caught.value.status_code == 404
    assert "no-such-model:1b" in str(caught.value)


# -- 6: nothing can serve ---------------------------------------------------------------------


async def test_unknown_model_is_404_json(stack: Stack) -> None:
    response = await stack.generate("no-such-model:1b")

    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"
    assert "no-such-model:1b" in error_of(response)["message"]


async def test_latency_limit_nothing_meets_is_503_with_retry_after(impatient: Stack) -> None:
    response = await impatient.http.post(
        "/api/generate",
        json={"model": "auto", "prompt": "hi", "stream": False},
        headers={"X-GPU-Max-Latency-S": "0.001"},
    )

    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    error = error_of(response)
    assert error["code"] == "no_capacity"
    assert "nothing can serve it" in error["message"]
    assert "> 0.0 s" in error["message"]
    # Nothing was loaded for a request that was refused.
    assert impatient.resident() == {}


async def test_latency_limit_in_the_body_is_honoured_and_not_sent_on(stack: Stack) -> None:
    response = await stack.generate(SMALL, max_latency_s=60, options={"num_predict": 4})
    assert response.status_code == 200, response.text
    assert response.json()["done"] is True

    bad = await stack.generate(SMALL, max_latency_s="soon")
    assert bad.status_code == 400
    assert "max_latency_s" in error_of(bad)["message"]


async def test_no_agent_left_is_503(desktop: SimDesktop, tmp_path: Path) -> None:
    agent_exit = contextlib.AsyncExitStack()
    async with agent_exit:
        agent = await agent_exit.enter_async_context(running_agent(agent_settings(), desktop))
        async with running_controller_on(
            agent.url, tmp_path / "controller", llm_wait_s=IMPATIENT_WAIT_S
        ) as (controller, http):
            await agent_exit.aclose()  # the agent stops; the controller runs on
            link = controller.engine.links["desk"]
            await wait_until(lambda: not link.health()[0], poll_s=POLL_S, what="the link to notice")

            response = await http.post(
                "/api/generate", json={"model": SMALL, "prompt": "hi", "stream": False}
            )

            assert response.status_code == 503
            assert int(response.headers["Retry-After"]) >= 1
            message = error_of(response)["message"]
            assert "no healthy agent" in message
            assert "desk" in message


# -- 7: the image API ---------------------------------------------------------------------------


async def test_image_job_accepted_followed_and_its_output_fetched(stack: Stack) -> None:
    response = await stack.http.post("/v1/images", json={"workflow": sd15()})

    assert response.status_code == 202
    job = response.json()
    assert response.headers["Location"] == f"/v1/images/{job['id']}"
    assert uuid.UUID(job["id"]).version == 4
    assert job["state"] in ("held", "dispatched")
    assert job["vram_bytes"] > 0

    async with stack.http.stream("GET", f"/v1/images/{job['id']}/events") as events:
        assert events.status_code == 200
        assert events.headers["Content-Type"].startswith("application/x-ndjson")
        states = await ndjson_lines(events)
    # The stream ends by itself with the job's final state, and shows the way there.
    assert states, "the event stream ended without a line"
    assert states[-1]["state"] == "succeeded"
    final = states[-1]["progress"]
    assert final["nodes_done"] == final["nodes_total"] == len(sd15())
    assert any(s["progress"] and s["progress"]["step"] == 20 for s in states)
    seen = [s["state"] for s in states]
    assert "running" in seen
    assert seen.index("running") < len(seen) - 1

    current = await stack.job(job["id"])
    assert current["state"] == "succeeded"
    assert current["agent"] == "desk"
    assert current["outputs"] == [f"/v1/images/{job['id']}/outputs/0"]
    assert current["attempts"] == 1

    output = await stack.http.get(current["outputs"][0])
    assert output.status_code == 200
    assert output.content.startswith(PNG_SIGNATURE)
    assert "attachment" in output.headers["Content-Disposition"]
    missing = await stack.http.get(f"/v1/images/{job['id']}/outputs/1")
    assert missing.status_code == 404
    assert error_of(missing)["code"] == "not_found"

    # A finished job's event stream answers its final state at once.
    async with stack.http.stream("GET", f"/v1/images/{job['id']}/events") as again:
        assert [s["state"] for s in await ndjson_lines(again)] == ["succeeded"]


async def test_delete_a_held_job_cancels_it(stack: Stack) -> None:
    job = await stack.submit_unplaceable()
    held = await wait_until(
        lambda: _reason_set(stack, job["id"]),
        poll_s=POLL_S,
        what="the job to be held with a reason",
    )
    assert held["state"] == "held"
    assert held["reason"].startswith("needs ")

    response = await stack.http.delete(f"/v1/images/{job['id']}")

    assert response.status_code == 200
    assert response.json()["state"] == "cancelled"
    assert response.json()["reason"] == "cancelled by the caller"
    assert (await stack.job(job["id"]))["state"] == "cancelled"
    assert stack.desktop.comfyui.stats.prompts_run == 0
    again = await stack.http.delete(f"/v1/images/{job['id']}")
    assert again.status_code == 200
    assert again.json()["state"] == "cancelled"


async def test_a_job_no_budget_can_hold_fails_at_once(stack: Stack) -> None:
    job = await stack.submit(blank_image(), vram_bytes=64 * 1024**3)

    done = await stack.wait_job(job["id"])

    assert done["state"] == "failed"
    assert "budget" in done["reason"]
    assert done["error"]
    assert stack.desktop.comfyui.stats.prompts_run == 0


async def _reason_set(stack: Stack, job_id: str) -> dict[str, Any] | None:
    job = await stack.job(job_id)
    return job if job["reason"] != "waiting for GPU memory" else None


async def test_delete_a_running_job_cancels_it(stack: Stack) -> None:
    # 50 SDXL steps: 12 simulated seconds of sampling, so it is cancelled mid-run.
    job = await stack.submit(sdxl(steps=50))
    await stack.wait_job(job["id"], "running")
    await wait_until(
        lambda: stack.desktop.comfyui.running_prompt_id() is not None,
        poll_s=POLL_S,
        what="ComfyUI to run the prompt",
    )

    response = await stack.http.delete(f"/v1/images/{job['id']}")

    assert response.status_code == 200
    done = await stack.wait_job(job["id"])
    assert done["state"] == "cancelled"
    assert done["reason"] == "cancelled by the caller"
    assert done["outputs"] == []
    await wait_until(
        lambda: stack.desktop.comfyui.running_prompt_id() is None,
        poll_s=POLL_S,
        what="ComfyUI to stop the prompt",
    )
    assert stack.desktop.comfyui.stats.interrupted == 1
    assert stack.desktop.comfyui.stats.succeeded == 0


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "JSON"),
        (b"[]", ""),
        (json.dumps({"workflow": "a string"}).encode(), "workflow"),
        (json.dumps({"workflow": {}}).encode(), "at least one node"),
        (json.dumps({"workflow": {"1": {"inputs": {}}}}).encode(), "class_type"),
        (json.dumps({"workflow": {"1": {"class_type": 5}}}).encode(), "class_type"),
        (json.dumps({"workflow": {"1": "EmptyImage"}}).encode(), "class_type"),
        (
            json.dumps({"workflow": {"1": {"class_type": "X", "inputs": []}}}).encode(),
            "inputs",
        ),
        (json.dumps({"workflow": blank_image(), "priority": "high"}).encode(), "priority"),
        (json.dumps({"workflow": blank_image(), "vram_bytes": -1}).encode(), "vram_bytes"),
    ],
)
async def test_malformed_image_jobs_are_400(stack: Stack, body: bytes, needle: str) -> None:
    response = await stack.http.post(
        "/v1/images", content=body, headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 400, response.text
    error = error_of(response)
    assert needle in error["message"]
    assert (await stack.fleet())["jobs_by_state"] == {}


async def test_unknown_and_bad_job_ids(stack: Stack) -> None:
    unknown = str(uuid.uuid4())
    for method, path in (
        ("GET", f"/v1/images/{unknown}"),
        ("DELETE", f"/v1/images/{unknown}"),
        ("GET", f"/v1/images/{unknown}/events"),
        ("GET", f"/v1/images/{unknown}/outputs/0"),
    ):
        response = await stack.http.request(method, path)
        assert response.status_code == 404, (method, path)
        assert error_of(response)["code"] == "not_found"

    for bad in ("not-a-uuid", unknown.upper(), "../../etc"):
        response = await stack.http.get(f"/v1/images/{bad}")
        assert response.status_code in (400, 404), bad
        if response.status_code == 400:
            assert "job id" in error_of(response)["message"]
    assert (await stack.http.get("/v1/images/not-a-uuid")).status_code == 400


async def test_requests_without_the_token_are_401(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=5.0, trust_env=False) as anonymous:
        for method, path in (
            ("POST", "/v1/images"),
            ("GET", "/v1/fleet"),
            ("GET", "/v1/catalog"),
            ("GET", "/api/tags"),
            ("POST", "/api/generate"),
        ):
            response = await anonymous.request(method, path, json={"model": SMALL})
            assert response.status_code == 401, path
            assert error_of(response)["code"] == "unauthorized"
        wrong = await anonymous.get("/v1/fleet", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        right = await anonymous.get(
            "/v1/fleet", headers={"Authorization": f"Bearer {CONTROLLER_TOKEN}"}
        )
        assert right.status_code == 200
    with pytest.raises(ollama.ResponseError) as caught:
        await ollama.AsyncClient(host=stack.url, timeout=5.0).list()
    assert caught.value.status_code == 401
    assert stack.desktop.comfyui.stats.prompts_run == 0


async def test_a_cancel_while_the_job_is_being_dispatched_ends_it_once(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    # The DELETE goes out the moment the job is seen dispatched: its submission to the agent is
    # on its way, and the cancel and the submission's answer race.
    ended = []
    for _ in range(3):
        job = await stack.submit(sd15())
        async with stack.http.stream("GET", f"/v1/images/{job['id']}/events") as events:
            async for line in events.aiter_lines():
                if line.strip() and json.loads(line)["state"] == "dispatched":
                    response = await stack.http.delete(f"/v1/images/{job['id']}")
                    assert response.status_code == 200, response.text
                    break
        ended.append(await stack.wait_job(job["id"]))

    assert [job["state"] for job in ended] == ["cancelled"] * 3
    assert all(job["reason"] == "cancelled by the caller" for job in ended)
    assert stack.desktop.comfyui.stats.succeeded == 0
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not failures, [r.getMessage() for r in failures]
