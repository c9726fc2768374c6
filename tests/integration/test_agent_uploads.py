"""The agent's `POST /v1/comfyui/uploads` and its `/free` on a ComfyUI that runs on the CPU.

Uploads keep ComfyUI's own semantics (a clashing name becomes `name (1).png`, the same file
keeps its name, `overwrite`, a subfolder, a mask painted onto its original), and what the agent
must refuse before ComfyUI sees it is refused with a 400 that says why. On `--cpu`, ComfyUI
reports the machine's RAM as its memory and a `/free` never shows there: the agent takes
ComfyUI's own answer (`confirmed_by: "comfyui"`) instead of waiting for memory that never comes
back, and with nothing running it answers at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gpu_agent.daemon import RunningAgent, running_agent
from gpu_agent.sim.comfyui import ComfyUISimSettings
from gpu_agent.sim.desktop import SimDesktop
from gpu_agent.sim.png import encode_png, gradient_rows, with_alpha
from gpu_agent.sim.workflows import SD15, text_to_image
from gpu_common.image_files import probe_image
from tests.integration.test_agent_api import agent_settings, api_client, wait_prompt
from tests.waiting import wait_until


def picture(width: int, height: int, *, seed: int = 1, alpha: bool = False) -> bytes:
    rows = gradient_rows(width, height, seed)
    if alpha:
        rows = with_alpha(rows, (bytes([255 * (y % 2)]) * width for y in range(height)))
    return encode_png(width, height, rows, alpha=alpha)


@pytest.fixture
async def agent(desktop: SimDesktop) -> AsyncIterator[RunningAgent]:
    async with running_agent(agent_settings(max_upload_bytes=64 * 1024), desktop) as running:
        yield running


@pytest.fixture
async def client(agent: RunningAgent) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(agent) as http:
        yield http


async def upload(
    client: httpx.AsyncClient, data: bytes, name: str, **fields: str
) -> httpx.Response:
    return await client.post(
        "/v1/comfyui/uploads", files={"image": (name, data, "image/png")}, data=fields
    )


async def test_uploads_keep_comfyuis_semantics(
    client: httpx.AsyncClient, desktop: SimDesktop
) -> None:
    first, second = picture(32, 32, seed=1), picture(32, 32, seed=2)
    answer = await upload(client, first, "in.png", subfolder="studio")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"name": "in.png", "subfolder": "studio", "type": "input"}
    assert (await upload(client, first, "in.png", subfolder="studio")).json()["name"] == "in.png"
    clash = await upload(client, second, "in.png", subfolder="studio")
    assert clash.json()["name"] == "in (1).png"
    replaced = await upload(client, second, "in.png", subfolder="studio", overwrite="true")
    assert replaced.json()["name"] == "in.png"
    assert (desktop.comfyui.input_dir / "studio" / "in.png").read_bytes() == second
    mask = await upload(
        client, picture(32, 32, alpha=True), "in-mask.png", subfolder="studio",
        original_filename="in.png", original_subfolder="studio", original_type="input",
    )  # fmt: skip
    assert mask.json() == {"name": "in-mask.png", "subfolder": "studio", "type": "input"}
    composite = probe_image((desktop.comfyui.input_dir / "studio" / "in-mask.png").read_bytes())
    assert (composite.width, composite.has_alpha) == (32, True)


@pytest.mark.parametrize(
    ("name", "fields", "wanted"),
    [
        ("../up.png", {}, "file name"),
        (".hidden.png", {}, "file name"),
        ("in.png", {"subfolder": "../out"}, "subfolder"),
        ("in.png", {"subfolder": "/etc"}, "subfolder"),
        ("in.png", {"type": "models"}, "type must be one of"),
        ("in.png", {"overwrite": "yes"}, "overwrite"),
        ("in.png", {"original_filename": "../x.png"}, "original_filename"),
        ("in.png", {"original_filename": "x.png", "original_type": "x"}, "original_type"),
    ],
)
async def test_uploads_the_agent_refuses(
    client: httpx.AsyncClient, desktop: SimDesktop, name: str, fields: dict[str, str], wanted: str
) -> None:
    response = await upload(client, picture(8, 8), name, **fields)
    assert response.status_code == 400
    assert wanted in response.json()["error"]["message"]
    assert not any(desktop.comfyui.input_dir.rglob("*"))


async def test_an_upload_past_the_limit_or_not_a_form_is_refused(
    client: httpx.AsyncClient,
) -> None:
    too_large = await upload(client, b"\x00" * (64 * 1024 + 1), "big.png")
    assert too_large.status_code == 413
    assert too_large.json()["error"]["code"] == "payload_too_large"
    not_a_form = await client.post("/v1/comfyui/uploads", json={"image": "x"})
    assert not_a_form.status_code == 400
    no_file = await client.post("/v1/comfyui/uploads", data={"type": "input"}, files={})
    assert no_file.status_code == 400


@pytest.fixture
async def cpu_desktop(tmp_path: Path) -> AsyncIterator[SimDesktop]:
    settings = ComfyUISimSettings(cpu=True)
    async with SimDesktop(data_dir=tmp_path / "desktop", comfyui_settings=settings) as desk:
        yield desk


async def test_free_on_a_cpu_device_is_confirmed_by_comfyui(cpu_desktop: SimDesktop) -> None:
    async with (
        running_agent(agent_settings(), cpu_desktop) as agent,
        api_client(agent) as client,
    ):
        # Nothing running: the answer comes at once.
        idle = await client.post("/v1/comfyui/free", json={})
        assert idle.status_code == 200, idle.text
        assert idle.json() == {"freed_bytes": 0, "wait_s": 0.0, "confirmed_by": "comfyui"}
        workflow = text_to_image(SD15, width=512, height=512, steps=30, prefix="cpu")
        prompt = (await client.post("/v1/comfyui/prompts", json={"workflow": workflow})).json()

        async def running() -> bool:
            info = (await client.get(f"/v1/comfyui/prompts/{prompt['prompt_id']}")).json()
            return bool(info["state"] == "running")

        await wait_until(running, timeout_s=60.0, poll_s=0.1, what="the prompt to run")
        busy = await client.post("/v1/comfyui/free", json={})
        assert busy.status_code == 200, busy.text
        result = busy.json()
        # ComfyUI applies /free after the running prompt: the agent waited for that, not for
        # the RAM figure (which /system_stats reports as in use throughout).
        assert result["confirmed_by"] == "comfyui"
        assert result["wait_s"] > 0
        assert cpu_desktop.comfyui.running_prompt_id() is None
        assert (await wait_prompt(client, prompt["prompt_id"]))["state"] == "succeeded"
        assert cpu_desktop.gpu.process_bytes(cpu_desktop.comfyui.pid) == 0
