"""The controller restarted mid-work: every accepted job ends exactly once, nothing runs twice.

Jobs live in the controller's SQLite store and carry a prompt id fixed at creation; the agent
asks ComfyUI about that id before posting it again. So after a graceful stop, and after a
SIGKILL of the controller's process, a restart on the same data directory finds every job,
follows the ones ComfyUI ran meanwhile and dispatches the rest, and ComfyUI runs each prompt
once. The agent and the simulated desktop stay up in the test process the whole time.

An img2img job whose picture was uploaded with it, held when the controller is killed, is
dispatched after the restart with the picture the controller kept in its data folder.

The graceful restart runs on the virtual-time loop like the other in-process tests. The SIGKILL
test runs the controller as a child process, which cannot share the test's virtual clock, so it
runs on real time (`real_time`): its desktop still runs at speed 1, with images kept small so
that the whole test takes a few seconds of real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import struct
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.client import StudioClient
from gpu_agent.daemon import RunningAgent, running_agent
from gpu_agent.sim.desktop import SimDesktop
from gpu_agent.sim.png import encode_png, gradient_rows
from gpu_agent.sim.workflows import SDXL, image_to_image
from tests import waiting
from tests.integration.stack import (
    AGENT_TOKEN,
    AUTH,
    CONTROLLER_TOKEN,
    JOB_TIMEOUT_S,
    PNG_SIGNATURE,
    POLL_S,
    READY_TIMEOUT_S,
    agent_settings,
    free_port,
    running_controller_on,
    sd15,
    sdxl,
)
from tests.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = "llama3.2:3b"
# Real seconds for a child process to start the controller (Python's imports included) and for
# one HTTP call to it: this test cannot run on virtual time.
START_TIMEOUT_S = 30.0
REAL_HTTP_TIMEOUT_S = 30.0
LISTENING = re.compile(r"gpu-controller listening on (\S+)")


@pytest.fixture
async def agent(desktop: SimDesktop) -> AsyncIterator[RunningAgent]:
    async with running_agent(agent_settings(), desktop) as running:
        yield running


async def job_of(http: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await http.get(f"/v1/images/{job_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def states_of(http: httpx.AsyncClient, job_ids: list[str]) -> dict[str, str]:
    return {job_id: (await job_of(http, job_id))["state"] for job_id in job_ids}


async def submit_all(http: httpx.AsyncClient, workflows: list[dict[str, Any]]) -> list[str]:
    job_ids = []
    for workflow in workflows:
        response = await http.post("/v1/images", json={"workflow": workflow})
        assert response.status_code == 202, response.text
        job_ids.append(response.json()["id"])
    return job_ids


def model_named(models: dict[str, Any], name: str) -> dict[str, Any]:
    """The entry for `name` in a `/v1/catalog` answer."""
    found: list[dict[str, Any]] = [m for m in models["models"] if m["name"] == name]
    assert found, f"{name} missing from /v1/catalog: {[m['name'] for m in models['models']]}"
    return found[0]


async def wait_all_final(
    http: httpx.AsyncClient, job_ids: list[str], timeout_s: float = JOB_TIMEOUT_S
) -> dict[str, dict[str, Any]]:
    return await waiting.wait_all_final(
        lambda job_id: job_of(http, job_id), job_ids, timeout_s=timeout_s, poll_s=POLL_S
    )


async def assert_each_succeeded_once(
    http: httpx.AsyncClient, desktop: SimDesktop, jobs: dict[str, dict[str, Any]]
) -> None:
    """Every job succeeded with its output on disk, and ComfyUI ran exactly one prompt each."""
    for job_id, job in jobs.items():
        assert job["state"] == "succeeded", job
        assert job["outputs"] == [f"/v1/images/{job_id}/outputs/0"]
        output = await http.get(job["outputs"][0])
        assert output.status_code == 200
        assert output.content.startswith(PNG_SIGNATURE)
    stats = desktop.comfyui.stats
    assert stats.prompts_run == len(jobs)
    assert stats.succeeded == len(jobs)
    assert stats.failed_oom == 0


# -- graceful stop and start --------------------------------------------------------------------


async def test_restart_resumes_held_and_running_jobs_and_keeps_learned_values(
    desktop: SimDesktop, agent: RunningAgent, tmp_path: Path
) -> None:
    data_dir = tmp_path / "controller"
    workflows = [sdxl(steps=40, seed=1), sd15(seed=2), sdxl(steps=20, seed=3), sd15(seed=4)]

    async with running_controller_on(agent.url, data_dir) as (_, http):
        answer = await http.post(
            "/api/generate",
            json={
                "model": SMALL,
                "prompt": "x" * 400,
                "stream": False,
                "options": {"num_predict": 32},
            },
        )
        assert answer.status_code == 200
        job_ids = await submit_all(http, workflows)
        first = job_ids[0]

        async def one_running_others_held() -> dict[str, str] | None:
            states = await states_of(http, job_ids)
            running = [s for s in states.values() if s in ("dispatched", "running")]
            return states if running and "held" in states.values() else None

        at_stop = await wait_until(
            one_running_others_held, poll_s=POLL_S, what="a job running, others held"
        )
        assert at_stop[first] in ("dispatched", "running")
        before = (await http.get("/v1/catalog")).json()
        learned_speed = model_named(before, SMALL)
        assert learned_speed["samples"] == 1

    async with running_controller_on(agent.url, data_dir) as (controller, http):
        after = (await http.get("/v1/catalog")).json()
        small = model_named(after, SMALL)
        # Learned values came back from the store before anything new was measured.
        assert small["samples"] == 1
        assert small["measured"] is True
        assert small["decode_tokens_per_s"] == learned_speed["decode_tokens_per_s"]

        jobs = await wait_all_final(http, job_ids)
        await assert_each_succeeded_once(http, desktop, jobs)
        if at_stop[first] == "running":
            # The job that was out on the agent was followed, not dispatched again.
            assert jobs[first]["attempts"] == 1
        else:
            # Stopped while its dispatch made room: one the agent never received is planned
            # again (a second attempt); either way ComfyUI ran it once (checked above).
            assert jobs[first]["attempts"] <= 2
        assert controller.engine.images.counts() == {"succeeded": len(job_ids)}
        footprints = (await http.get("/v1/catalog")).json()["image_footprints_bytes"]
        assert set(footprints) == {"sdxl:1024x1024x1", "sd15:512x512x1"}


# -- SIGKILL of the controller's process ---------------------------------------------------------


class ControllerProcess:
    """`python -m controller.cli run` in a child process, on a fixed port and config."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self._config = config
        self._port = port
        self._log = log
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> str:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("GPU_CONTROLLER_") and k != "GPU_AGENT_TOKEN"
        }
        env["PYTHONPATH"] = str(REPO_ROOT)
        with self._log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "controller.cli",
                "run",
                "--config",
                str(self._config),
                "--port",
                str(self._port),
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                cwd=REPO_ROOT,
                env=env,
            )
        assert self.process.stdout is not None
        async with asyncio.timeout(START_TIMEOUT_S):
            while True:
                line = await self.process.stdout.readline()
                if not line:
                    raise AssertionError(f"controller exited at start; see {self._log}")
                match = LISTENING.search(line.decode())
                if match:
                    return match.group(1)

    async def kill(self) -> None:
        """SIGKILL: no shutdown code runs at all."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        async with asyncio.timeout(10.0):
            code = await self.process.wait()
        assert code == -signal.SIGKILL

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10.0):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


def write_config(path: Path, agent_url: str, data_dir: Path) -> None:
    path.write_text(
        f"""
host = "127.0.0.1"
data_dir = "{data_dir}"
token = "{CONTROLLER_TOKEN}"
tick_interval_s = 0.25
min_residency_s = 0.0
stale_after_s = 10.0
request_timeout_s = 60.0
load_timeout_s = 300.0
log_level = "INFO"

[[agents]]
name = "desk"
url = "{agent_url}"
token = "{AGENT_TOKEN}"
"""
    )


@pytest.mark.real_time
@pytest.mark.timeout(90)
async def test_sigkill_mid_run_loses_nothing_and_runs_nothing_twice(
    desktop: SimDesktop, agent: RunningAgent, tmp_path: Path
) -> None:
    config = tmp_path / "controller.toml"
    write_config(config, agent.url, tmp_path / "controller")
    port = free_port()
    # About 15 s of simulated work in all, which here is real time; the first job (about 4 s
    # with its checkpoint load) is out on the agent when the controller dies.
    workflows = [
        sd15(steps=40, seed=1),
        sdxl(steps=10, seed=2),
        sd15(steps=20, seed=3),
        sd15(steps=20, seed=4),
    ]
    first = ControllerProcess(config, port, tmp_path / "first.log")
    second = ControllerProcess(config, port, tmp_path / "second.log")
    try:
        url = await first.start()
        async with httpx.AsyncClient(
            base_url=url, headers=AUTH, timeout=REAL_HTTP_TIMEOUT_S
        ) as http:
            await wait_until(
                lambda: _agent_healthy(http),
                timeout_s=READY_TIMEOUT_S,
                poll_s=POLL_S,
                what="the agent to be healthy",
            )
            job_ids = await submit_all(http, workflows)

            async def some_out() -> dict[str, str] | None:
                states = await states_of(http, job_ids)
                out = [s for s in states.values() if s in ("dispatched", "running")]
                return states if out and "held" in states.values() else None

            at_kill = await wait_until(
                some_out, poll_s=POLL_S, what="a job out on the agent, others held"
            )
            await first.kill()
        assert desktop.comfyui.stats.prompts_run < len(workflows), at_kill

        url = await second.start()
        async with httpx.AsyncClient(
            base_url=url, headers=AUTH, timeout=REAL_HTTP_TIMEOUT_S
        ) as http:
            jobs = await wait_all_final(http, job_ids, timeout_s=60.0)
            assert set(jobs) == set(job_ids)
            await assert_each_succeeded_once(http, desktop, jobs)
            fleet = (await http.get("/v1/fleet")).json()
            assert fleet["jobs_by_state"] == {"succeeded": len(job_ids)}
            assert fleet["held_jobs"] == []
    finally:
        await first.stop()
        await second.stop()


async def _agent_healthy(http: httpx.AsyncClient) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        fleet = (await http.get("/v1/fleet")).json()
        return bool(fleet["agents"]) and all(a["healthy"] for a in fleet["agents"])
    return False


@pytest.mark.real_time
@pytest.mark.timeout(90)
async def test_sigkill_between_upload_and_dispatch_keeps_the_jobs_pictures(
    desktop: SimDesktop, agent: RunningAgent, tmp_path: Path
) -> None:
    """An img2img job accepted with its picture, held behind a running job, survives a SIGKILL
    of the controller: the restarted controller dispatches it with the picture it kept."""
    config = tmp_path / "controller.toml"
    write_config(config, agent.url, tmp_path / "controller")
    port = free_port()
    sketch = encode_png(320, 240, gradient_rows(320, 240, 11))
    # The first job claims most of the card, so the SDXL img2img job (about 9 GB at first)
    # waits for it: it is stored with its picture but not dispatched when the controller dies.
    blocker = sd15(steps=40, seed=1)
    img2img = image_to_image(SDXL, image="sketch.png", width=512, height=512, steps=4)
    first = ControllerProcess(config, port, tmp_path / "first.log")
    second = ControllerProcess(config, port, tmp_path / "second.log")
    try:
        url = await first.start()
        async with (
            StudioClient(url, token=CONTROLLER_TOKEN, timeout_s=REAL_HTTP_TIMEOUT_S) as studio,
            httpx.AsyncClient(base_url=url, headers=AUTH, timeout=REAL_HTTP_TIMEOUT_S) as http,
        ):
            await wait_until(
                lambda: _agent_healthy(http),
                timeout_s=READY_TIMEOUT_S,
                poll_s=POLL_S,
                what="the agent to be healthy",
            )
            gigabytes = 1024**3
            blocking = await studio.generate_image(blocker, vram_bytes=6 * gigabytes)
            job = await studio.generate_image(img2img, inputs={"sketch.png": sketch})
            job_ids = [blocking.id, job.id]

            async def first_out_second_held() -> dict[str, str] | None:
                states = await states_of(http, job_ids)
                out = states[blocking.id] in ("dispatched", "running")
                return states if out and states[job.id] == "held" else None

            await wait_until(first_out_second_held, poll_s=POLL_S, what="one out, one held")
            await first.kill()
        assert desktop.comfyui.stats.prompts_run <= 1
        assert not any(p.is_file() for p in desktop.comfyui.input_dir.rglob("*"))

        url = await second.start()
        async with httpx.AsyncClient(
            base_url=url, headers=AUTH, timeout=REAL_HTTP_TIMEOUT_S
        ) as http:
            jobs = await wait_all_final(http, job_ids, timeout_s=60.0)
            await assert_each_succeeded_once(http, desktop, jobs)
            assert jobs[job.id]["inputs"] == ["sketch.png"]
            output = (await http.get(jobs[job.id]["outputs"][0])).content
            assert struct.unpack(">II", output[16:24]) == (512, 512)
        uploaded = [p.read_bytes() for p in desktop.comfyui.input_dir.rglob("*") if p.is_file()]
        assert uploaded == [sketch]
    finally:
        await first.stop()
        await second.stop()


def controller_tasks() -> list[str]:
    """The running tasks whose coroutine is the controller's own code."""
    package = str(Path(StudioClient.__module__.replace(".", "/")).parent)
    names = []
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        code = getattr(coro, "cr_code", None)
        if code is not None and f"/{package}/" in code.co_filename:
            names.append(code.co_name)
    return sorted(names)


async def test_a_crash_drill_leaves_no_task_of_the_controller_behind(
    agent: RunningAgent, tmp_path: Path
) -> None:
    """An in-process crash stands for SIGKILL, which ends every task of the process; the
    dashboard's history follower once outlived it, one more task per crash of a chaos day."""
    assert controller_tasks() == []
    async with running_controller_on(agent.url, tmp_path / "controller") as (controller, _):
        assert "follow_history" in controller_tasks()
        await controller.crash()
        assert controller_tasks() == []
