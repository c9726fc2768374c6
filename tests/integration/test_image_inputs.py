"""Image jobs with input pictures: img2img and inpainting through controller, agent and ComfyUI.

The studio client uploads its pictures with the job (one multipart request); the controller
keeps them by content hash in its data folder, hands them to the agent at dispatch, and the agent
uploads them to the emulated ComfyUI, which renames a clashing name as ComfyUI does; the workflow
ComfyUI runs names what it stored. Pictures the controller cannot accept are refused with a 400
(or 413) that says why, and a picture that disappears from the data folder fails its job with
a reason instead of running without it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.client import StudioClient, StudioRequestError
from gpu_agent.sim.desktop import SimDesktop
from gpu_agent.sim.png import encode_png, gradient_rows, with_alpha
from gpu_agent.sim.workflows import SD15, image_to_image
from gpu_common.image_files import probe_image
from tests.integration.stack import CONTROLLER_TOKEN, Stack, running_stack

STUDIO_TIMEOUT_S = 120.0


def picture(width: int, height: int, *, seed: int = 1, alpha: bool = False) -> bytes:
    rows = gradient_rows(width, height, seed)
    if alpha:
        rows = with_alpha(rows, (bytes([255 * (y % 3 == 0)]) * width for y in range(height)))
    return encode_png(width, height, rows, alpha=alpha)


@pytest.fixture
async def stack(desktop: SimDesktop, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(
        desktop, tmp_path / "controller", max_input_pixels=2048 * 2048
    ) as running:
        yield running


@pytest.fixture
async def studio(stack: Stack) -> AsyncIterator[StudioClient]:
    async with StudioClient(
        stack.url, token=CONTROLLER_TOKEN, timeout_s=STUDIO_TIMEOUT_S
    ) as client:
        yield client


def comfy_inputs(stack: Stack) -> dict[str, bytes]:
    """Every file in the emulated ComfyUI's input folder, by path under it."""
    root = stack.desktop.comfyui.input_dir
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


async def post_form(
    stack: Stack, files: list[tuple[str, tuple[str, bytes, str]]], **fields: str
) -> httpx.Response:
    return await stack.http.post("/v1/images", data=fields, files=files)


async def test_img2img_from_an_uploaded_picture_succeeds(
    stack: Stack, studio: StudioClient
) -> None:
    sketch = picture(900, 600, seed=5)
    workflow = image_to_image(SD15, image="sketch.png", width=512, height=384, steps=10)
    job = await studio.generate_image(workflow, inputs={"sketch.png": sketch})
    assert job.info.inputs == ["sketch.png"]
    info = await job.wait()
    assert info.state == "succeeded", info
    images = await job.images()
    header = probe_image(images[0])
    assert (header.format, header.width, header.height) == ("png", 512, 384)
    # ComfyUI holds the picture once, in the controller's folder, under a content name.
    digest = hashlib.sha256(sketch).hexdigest()
    assert comfy_inputs(stack) == {f"gpu-controller/{digest[:32]}.png": sketch}
    # The controller keeps it by its hash, with the job.
    kept = stack.engine.images.inputs.folder
    assert [p.name for p in kept.iterdir()] == [f"{digest}.png"]


async def test_a_clashing_name_on_comfyui_is_renamed_and_the_workflow_follows(
    stack: Stack, studio: StudioClient
) -> None:
    sketch = picture(256, 256, seed=6)
    digest = hashlib.sha256(sketch).hexdigest()
    # Someone else's file already has the name the controller uploads under.
    taken = stack.desktop.comfyui.input_dir / "gpu-controller"
    taken.mkdir()
    (taken / f"{digest[:32]}.png").write_bytes(picture(64, 64, seed=99))
    workflow = image_to_image(SD15, image="mine.png", width=256, height=256, steps=4)
    images = await studio.generate_image(workflow, inputs={"mine.png": sketch}, wait=True)
    assert probe_image(images[0]).width == 256
    assert comfy_inputs(stack)[f"gpu-controller/{digest[:32]} (1).png"] == sketch


async def test_inpainting_paints_the_mask_onto_its_picture(
    stack: Stack, studio: StudioClient
) -> None:
    photo, mask = picture(512, 512, seed=7), picture(512, 512, alpha=True)
    # The mask editor's way: LoadImage of the picture with the mask as its alpha channel.
    workflow = image_to_image(SD15, image="photo-mask.png", width=512, height=512, steps=4)
    images = await studio.generate_image(
        workflow,
        inputs={"photo.png": photo},
        masks={"photo-mask.png": mask},
        mask_of={"photo-mask.png": "photo.png"},
        wait=True,
    )
    assert probe_image(images[0]).width == 512
    composites = {k: v for k, v in comfy_inputs(stack).items() if k.endswith("-mask.png")}
    assert len(composites) == 1
    composite = probe_image(next(iter(composites.values())))
    assert (composite.width, composite.height, composite.has_alpha) == (512, 512, True)


async def test_pictures_the_controller_cannot_take_are_refused_with_reasons(stack: Stack) -> None:
    workflow = image_to_image(SD15, image="in.png")

    async def refused(files: list[Any], **fields: str) -> tuple[int, str]:
        response = await post_form(stack, files, **fields)
        body = response.json()
        return response.status_code, body["error"]["message"]

    job_json = json.dumps({"workflow": workflow})
    gif = b"GIF89a" + b"\x00" * 40
    status, message = await refused([("image", ("in.png", gif, "image/gif"))], job=job_json)
    assert status == 400
    assert "only PNG, JPEG and WebP" in message
    huge = picture(2049, 2048)
    status, message = await refused([("image", ("in.png", huge, "image/png"))], job=job_json)
    assert (status, "2049x2048" in message) == (400, True)
    status, message = await refused(
        [("image", ("other.png", picture(8, 8), "image/png"))], job=job_json
    )
    assert status == 400
    assert "'other.png' is not named by the image input" in message
    status, message = await refused([("image", ("in.png", picture(8, 8), "image/png"))])
    assert (status, message) == (400, "the form needs the job's JSON in the field 'job'")
    status, _ = await refused(
        [("image", (f"in{i}.png", picture(8, 8), "image/png")) for i in range(9)], job=job_json
    )
    assert status == 400
    assert (await stack.fleet())["jobs_by_state"] == {}


async def test_idempotency_key_covers_the_pictures(stack: Stack) -> None:
    job = json.dumps({"workflow": image_to_image(SD15, image="in.png", steps=2)})
    headers = {"Idempotency-Key": '"with-pictures"'}

    async def send(data: bytes) -> httpx.Response:
        return await stack.http.post(
            "/v1/images",
            data={"job": job},
            files=[("image", ("in.png", data, "image/png"))],
            headers=headers,
        )

    first = await send(picture(64, 64, seed=1))
    again = await send(picture(64, 64, seed=1))
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    other = await send(picture(64, 64, seed=2))
    assert other.status_code == 422


async def test_a_picture_lost_from_the_data_folder_fails_its_job_with_the_reason(
    stack: Stack, studio: StudioClient
) -> None:
    sketch = picture(128, 128, seed=3)
    workflow = image_to_image(SD15, image="gone.png", width=128, height=128, steps=2)
    # While the planning lock is held no job is admitted: the picture goes before dispatch.
    async with stack.engine.plan_lock:
        job = await studio.generate_image(workflow, inputs={"gone.png": sketch})
        for path in stack.engine.images.inputs.folder.iterdir():
            path.unlink()
    info = await job.wait()
    assert info.state == "failed"
    assert info.reason == "its input pictures cannot reach ComfyUI"
    assert info.error is not None
    assert "'gone.png'" in info.error
    assert stack.desktop.comfyui.stats.prompts_run == 0
    fleet = await stack.fleet()
    assert fleet["agents"][0]["image_running"] is None
    with pytest.raises(StudioRequestError):
        await studio.generate_image(workflow, inputs={"gone.png": b"not a picture"})
