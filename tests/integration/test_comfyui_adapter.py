"""The agent's ComfyUI adapter against the emulated ComfyUI on a real loopback server."""

from __future__ import annotations

import asyncio
import socket
import struct
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpu_agent.comfyui import ComfyUIController, PromptEvent, PromptRecord
from gpu_agent.errors import (
    ComfyUIUnavailable,
    OutputNotFound,
    PromptNotFound,
    WorkflowRejected,
)
from gpu_agent.sim.catalog import Catalog
from gpu_agent.sim.clock import SimClock
from gpu_agent.sim.comfyui import ComfyUIEmulator
from gpu_agent.sim.gpu import GIB, SimGpu
from gpu_agent.sim.server import LoopbackServer
from gpu_agent.sim.workflows import SD15, text_to_image
from gpu_common import clock
from gpu_common.schema import OOM_REASON, UNKNOWN_REASON
from tests.waiting import wait_until

# Flux runs about 2.1 s a step after a 15 s cold load: slow enough to be caught mid-run.
FLUX = "flux1-schnell-fp8.safetensors"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The adapter's own default: how long one request to ComfyUI may take (simulated seconds).
REQUEST_TIMEOUT_S = 10.0
# Simulated seconds: the longest wait here is an SD1.5 prompt of 400 steps (~25 s) or the
# adapter reconnecting after a restart (backoff up to 10 s).
WAIT_S = 120.0


def txt2img(
    *, steps: int = 20, width: int = 512, height: int = 512, seed: int = 1, ckpt: str = SD15
) -> dict[str, Any]:
    """ComfyUI's default text-to-image workflow, in API format."""
    return text_to_image(ckpt, width=width, height=height, steps=steps, seed=seed, prefix="fox")


def slow_txt2img() -> dict[str, Any]:
    """A Flux prompt that runs for about a quarter of an hour of simulated time."""
    return txt2img(steps=400, width=1024, height=1024, ckpt=FLUX)


def blank_image(*, width: int = 64, height: int = 48) -> dict[str, Any]:
    """EmptyImage -> SaveImage: a workflow that needs no GPU memory at all."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": width, "height": height, "batch_size": 1, "color": 0},
        },
        "2": {
            "class_type": "SaveImage",
            "inputs": {"filename_prefix": "blank", "images": ["1", 0]},
        },
    }


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@dataclass
class Env:
    clock: SimClock
    gpu: SimGpu
    emulator: ComfyUIEmulator
    server: LoopbackServer
    controller: ComfyUIController
    events: list[PromptEvent] = field(default_factory=list)

    def events_for(self, prompt_id: str) -> list[PromptEvent]:
        return [e for e in self.events if e.record.prompt_id == prompt_id]

    async def final(self, prompt_id: str, *, timeout_s: float = WAIT_S) -> PromptRecord:
        def done() -> bool:
            record = self.controller.get(prompt_id)
            return record is not None and record.final

        await wait_until(done, timeout_s=timeout_s, what=f"prompt {prompt_id} to finish")
        record = self.controller.get(prompt_id)
        assert record is not None
        return record

    async def running(self, prompt_id: str) -> None:
        def started() -> bool:
            record = self.controller.get(prompt_id)
            return record is not None and record.state == "running" and record.step is not None

        await wait_until(started, timeout_s=WAIT_S, what=f"prompt {prompt_id} to run a step")

    async def comfy_get(self, path: str) -> Any:
        async with httpx.AsyncClient(base_url=self.server.url, timeout=REQUEST_TIMEOUT_S) as client:
            response = await client.get(path)
            response.raise_for_status()
            return response.json()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    sim_clock = SimClock()
    gpu = SimGpu(sim_clock)
    emulator = ComfyUIEmulator(
        clock=sim_clock, gpu=gpu, catalog=Catalog(), output_dir=tmp_path / "out"
    )
    await emulator.start_process()
    server = LoopbackServer(emulator.make_app)
    await server.start()
    events: list[PromptEvent] = []
    # The adapter's default timings (reconnect 0.5-10 s, poll 1 s, quiet after 5 s): on the
    # virtual clock they cost no real time.
    controller = ComfyUIController(
        server.url,
        client_id=str(uuid.uuid4()),
        request_timeout_s=REQUEST_TIMEOUT_S,
        on_event=events.append,
    )
    await controller.start()
    await wait_until(lambda: controller.connection == "websocket", what="the websocket")
    yield Env(sim_clock, gpu, emulator, server, controller, events)
    await controller.stop()
    await server.stop()
    await emulator.close()


async def test_a_prompt_runs_to_success_with_progress_and_a_real_png(env: Env) -> None:
    ctl = env.controller
    record = await ctl.submit(txt2img(steps=20))
    assert str(uuid.UUID(record.prompt_id, version=4)) == record.prompt_id
    assert record.nodes_total == 7
    done = await env.final(record.prompt_id)
    assert done.state == "succeeded", done
    assert done.started_at is not None
    assert done.finished_at is not None
    assert done.submitted_at <= done.started_at <= done.finished_at
    assert done.nodes_done == done.nodes_total
    assert done.reason == "finished with 1 output file"
    assert len(done.outputs) == 1
    assert done.outputs[0].node_id == "9"
    assert done.outputs[0].filename.startswith("fox_")

    kinds = [e.kind for e in env.events_for(record.prompt_id)]
    assert kinds[:1] == ["submitted"], kinds
    assert kinds[-1:] == ["finished"], kinds
    assert kinds.count("started") == 1
    steps = [e.record.step for e in env.events_for(record.prompt_id) if e.record.node == "3"]
    assert 20 in steps
    assert env.controller.connection == "websocket"
    assert env.controller.last_message_age_s is not None

    data, filename, content_type = await ctl.fetch_output(record.prompt_id, 0)
    assert filename == done.outputs[0].filename
    assert content_type == "image/png"
    assert png_size(data) == (512, 512)
    with pytest.raises(OutputNotFound):
        await ctl.fetch_output(record.prompt_id, 1)
    with pytest.raises(PromptNotFound):
        await ctl.fetch_output(str(uuid.uuid4()), 0)
    assert await ctl.queue_counts() == (0, 0)
    stats = await ctl.system_stats()
    assert stats["devices"][0]["vram_total"] == env.gpu.total_bytes


async def test_resubmitting_the_same_id_does_not_post_again(env: Env) -> None:
    prompt_id = str(uuid.uuid4())
    first, twin = await asyncio.gather(
        env.controller.submit(blank_image(), prompt_id),
        env.controller.submit(blank_image(), prompt_id),
    )
    again = await env.controller.submit(blank_image(), prompt_id)
    assert again.prompt_id == first.prompt_id == twin.prompt_id == prompt_id
    done = await env.final(prompt_id)
    assert done.state == "succeeded"
    await env.controller.submit(blank_image(), prompt_id)
    assert [e.kind for e in env.events_for(prompt_id)].count("submitted") == 1
    assert env.emulator.stats.prompts_run == 1
    assert [r.prompt_id for r in env.controller.records()] == [prompt_id]


async def test_an_invalid_workflow_is_rejected_with_node_errors(env: Env) -> None:
    workflow = txt2img()
    del workflow["3"]["inputs"]["model"]
    workflow["3"]["inputs"]["sampler_name"] = "no_such_sampler"
    prompt_id = str(uuid.uuid4())
    with pytest.raises(WorkflowRejected) as info:
        await env.controller.submit(workflow, prompt_id)
    rejected = info.value
    assert rejected.error["type"] == "prompt_outputs_failed_validation"
    node = rejected.node_errors["3"]
    assert isinstance(node, dict)
    assert node["class_type"] == "KSampler"
    assert {e["type"] for e in node["errors"]} == {"required_input_missing", "value_not_in_list"}
    assert env.controller.get(prompt_id) is None
    assert env.controller.records() == []


async def test_cancel_a_pending_and_a_running_prompt(env: Env) -> None:
    ctl = env.controller
    long = await ctl.submit(slow_txt2img())
    queued = await ctl.submit(blank_image())
    await env.running(long.prompt_id)
    assert ctl.get(queued.prompt_id).state == "pending"  # type: ignore[union-attr]

    cancelled = await ctl.cancel(queued.prompt_id)
    assert cancelled.state == "cancelled"
    assert cancelled.reason == "cancelled on request before it started"
    assert await ctl.queue_counts() == (1, 0)

    still = await ctl.cancel(long.prompt_id)
    assert still.state == "running"  # cancelled once ComfyUI reports the interrupt
    done = await env.final(long.prompt_id)
    assert done.state == "cancelled"
    assert done.reason == "cancelled on request while it was running"
    assert done.step is None
    assert await ctl.queue_counts() == (0, 0)
    assert await env.comfy_get(f"/history/{queued.prompt_id}") == {}
    again = await ctl.cancel(long.prompt_id)
    assert again == done
    with pytest.raises(PromptNotFound):
        await ctl.cancel(str(uuid.uuid4()))


async def test_out_of_memory_fails_with_the_oom_reason(env: Env) -> None:
    env.gpu.attach(7777, "ollama", ("ollama", "runner"))
    env.gpu.allocate(7777, 11 * GIB)
    record = await env.controller.submit(txt2img())
    done = await env.final(record.prompt_id)
    assert done.state == "failed"
    assert done.reason == OOM_REASON
    assert done.error_type == "torch.OutOfMemoryError"
    assert done.error is not None
    assert done.error.startswith("KSampler: ")
    assert done.node == "3"


async def test_a_dropped_websocket_reconnects_and_the_outcome_still_arrives(env: Env) -> None:
    ctl = env.controller
    record = await ctl.submit(txt2img(steps=400))
    await env.running(record.prompt_id)
    await env.emulator.drop_websockets()
    dropped_at = len(env.events)
    step_at_drop = ctl.get(record.prompt_id).step  # type: ignore[union-attr]
    assert step_at_drop is not None
    done = await env.final(record.prompt_id)
    assert done.state == "succeeded"
    assert len(done.outputs) == 1
    # Progress kept flowing over a new socket: far more steps than the old socket's receive
    # buffer (16 frames) could have held when it was cut.
    later_steps = [
        e.record.step
        for e in env.events[dropped_at:]
        if e.record.prompt_id == record.prompt_id and e.record.step is not None
    ]
    assert later_steps, "no progress arrived after the websocket was dropped"
    assert max(later_steps) > step_at_drop + 100
    await wait_until(lambda: ctl.connection == "websocket", what="the websocket back")


async def test_a_silent_websocket_falls_back_to_polling(env: Env) -> None:
    ctl = env.controller
    env.emulator.faults.websocket_silent = True
    record = await ctl.submit(txt2img(steps=20))
    seen: set[str] = set()

    def settled() -> bool:
        seen.add(ctl.connection)
        current = ctl.get(record.prompt_id)
        return current is not None and current.final

    await wait_until(settled, timeout_s=WAIT_S, what="the prompt settled by polling")
    done = ctl.get(record.prompt_id)
    assert done is not None
    assert done.state == "succeeded"
    assert "polling" in seen
    # The outputs come from /history, since no `executed` message arrived.
    assert len(done.outputs) == 1
    data, _, _ = await ctl.fetch_output(record.prompt_id, 0)
    assert png_size(data) == (512, 512)
    kinds = [e.kind for e in env.events_for(record.prompt_id)]
    assert kinds[:1] == ["submitted"], kinds
    assert kinds[-1:] == ["finished"], kinds


async def test_a_prompt_lost_in_a_restart_becomes_unknown(env: Env) -> None:
    ctl = env.controller
    lost = await ctl.submit(slow_txt2img())
    await env.running(lost.prompt_id)
    await env.emulator.kill_process()
    await env.server.stop()
    await wait_until(lambda: ctl.connection == "down", what="the adapter to see ComfyUI down")
    with pytest.raises(ComfyUIUnavailable):
        await ctl.submit(blank_image())
    assert ctl.get(lost.prompt_id).state == "running"  # type: ignore[union-attr]

    await env.emulator.start_process()
    await env.server.start()
    done = await env.final(lost.prompt_id)
    assert done.state == "unknown"
    assert done.reason == UNKNOWN_REASON
    assert done.error_type == "restart"
    await wait_until(lambda: ctl.connection == "websocket", what="the websocket back")

    later = await ctl.submit(blank_image())
    finished = await env.final(later.prompt_id)
    assert finished.state == "succeeded"
    data, _, _ = await ctl.fetch_output(later.prompt_id, 0)
    assert png_size(data) == (64, 48)


async def test_free_unloads_the_checkpoint(env: Env) -> None:
    record = await env.controller.submit(txt2img())
    assert (await env.final(record.prompt_id)).state == "succeeded"
    assert env.emulator.loaded_checkpoints() == [SD15]
    await env.controller.free()
    await wait_until(lambda: env.emulator.loaded_checkpoints() == [], what="the unload")


async def test_submit_to_a_closed_port_fails_fast() -> None:
    # A port that was free a moment ago and that nothing listens on.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = ComfyUIController(
        f"http://127.0.0.1:{port}", client_id="c", request_timeout_s=REQUEST_TIMEOUT_S
    )
    started = clock.monotonic_s()
    with pytest.raises(ComfyUIUnavailable) as info:
        await controller.submit(blank_image())
    # Refused at once: no timeout ran out.
    assert clock.monotonic_s() - started < REQUEST_TIMEOUT_S
    assert info.value.prompt_id is None  # nothing was sent: no doubt to resolve
    await controller.stop()


async def test_an_unanswered_submit_is_checked_before_posting_again(env: Env) -> None:
    ctl = env.controller
    env.emulator.faults.hang()
    started = clock.monotonic_s()
    with pytest.raises(ComfyUIUnavailable) as info:
        # No id of ours: nothing to look up first, so the POST itself goes unanswered.
        await ctl.submit(blank_image())
    # One request timeout, and no second request after it.
    elapsed_s = clock.monotonic_s() - started
    assert REQUEST_TIMEOUT_S - 1e-6 <= elapsed_s < 2 * REQUEST_TIMEOUT_S
    prompt_id = info.value.prompt_id
    assert prompt_id is not None
    assert ctl.get(prompt_id) is None
    # The held request now reaches ComfyUI, which queues the prompt we gave up on.
    env.emulator.faults.unhang()

    async def in_history() -> bool:
        return bool(await env.comfy_get(f"/history/{prompt_id}"))

    await wait_until(in_history, poll_s=0.1, what="the held prompt in history")
    record = await ctl.submit(blank_image(), prompt_id)
    assert record.state == "succeeded"
    assert env.emulator.stats.prompts_run == 1
    kinds = [e.kind for e in env.events_for(prompt_id)]
    assert kinds == ["submitted", "finished"]


async def test_a_restarted_agent_does_not_run_a_known_prompt_twice(env: Env) -> None:
    """A second adapter (the agent after a restart) given the same id adopts ComfyUI's record."""
    prompt_id = str(uuid.uuid4())
    first = await env.controller.submit(blank_image(), prompt_id)
    assert first.prompt_id == prompt_id

    async def in_history() -> bool:
        return bool(await env.comfy_get(f"/history/{prompt_id}"))

    await wait_until(in_history, poll_s=0.1, what="the prompt in history")
    fresh = ComfyUIController(
        env.server.url, client_id="restarted-agent", request_timeout_s=REQUEST_TIMEOUT_S
    )
    await fresh.start()
    try:
        record = await fresh.submit(blank_image(), prompt_id)
    finally:
        await fresh.stop()
    assert record.state == "succeeded"
    assert record.outputs
    assert env.emulator.stats.prompts_run == 1
