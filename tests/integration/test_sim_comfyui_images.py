"""The emulated ComfyUI's uploads, image-only nodes and run-time node errors, over real HTTP.

Uploads follow ComfyUI's `/upload/image` and `/upload/mask` (renaming on a clash, the hash check,
`overwrite`, `subfolder`, `type`); LoadImage, LoadImageMask and VAEEncode make an img2img graph
run; ImageScale, ImageInvert, ImageBlur and SaveImageWebsocket run without weights, the last one
sending ComfyUI's binary frames; ImageToMask of `alpha` passes validation and fails at run time
with an `execution_error` that the history keeps.
"""

from __future__ import annotations

import asyncio
import json
import struct
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from gpu_agent.sim.catalog import MIB
from gpu_agent.sim.comfyui import RAM_TOTAL_BYTES, ComfyUISimSettings
from gpu_agent.sim.png import encode_png, gradient_rows, solid_rows, with_alpha
from gpu_common.image_files import probe_image
from tests.integration.test_sim_comfyui import (
    SD15,
    WAIT_S,
    Desk,
    history,
    queue_prompt,
    start_desk,
)
from tests.waiting import wait_until


def png(width: int, height: int, *, seed: int = 1, alpha: bool = False) -> bytes:
    """A small real PNG (RGBA with a transparent middle when `alpha`)."""
    rows = gradient_rows(width, height, seed)
    if alpha:
        rows = with_alpha(rows, (bytes([255 * (y % 2)]) * width for y in range(height)))
    return encode_png(width, height, rows, alpha=alpha)


@pytest.fixture
async def desk(tmp_path: Path) -> AsyncIterator[Desk]:
    d = await start_desk(tmp_path, ComfyUISimSettings())
    yield d
    await d.http.aclose()
    await d.server.stop()
    await d.emu.close()


async def upload(
    desk: Desk, data: bytes, name: str, path: str = "/upload/image", **fields: str
) -> httpx.Response:
    return await desk.http.post(path, files={"image": (name, data, "image/png")}, data=fields)


class Frames:
    """A websocket client that keeps text frames as JSON and binary frames as bytes."""

    def __init__(self, conn: ClientConnection, client_id: str) -> None:
        self.conn = conn
        self.client_id = client_id
        self.frames: list[dict[str, Any] | bytes] = []

    async def until_done(self, prompt_id: str) -> list[dict[str, Any] | bytes]:
        while True:
            async with asyncio.timeout(WAIT_S):
                raw = await self.conn.recv()
            frame: dict[str, Any] | bytes = raw if isinstance(raw, bytes) else json.loads(raw)
            self.frames.append(frame)
            if (
                isinstance(frame, dict)
                and frame["type"] == "executing"
                and frame["data"]["node"] is None
                and frame["data"].get("prompt_id") == prompt_id
            ):
                return self.frames


async def open_frames(desk: Desk, *, metadata: bool = False) -> Frames:
    client_id = str(uuid.uuid4())
    conn = await connect(f"{desk.ws_url}?clientId={client_id}", open_timeout=WAIT_S)
    await conn.recv()  # the status greeting
    if metadata:
        flags = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
        await conn.send(json.dumps(flags))
        reply = json.loads(await conn.recv())
        assert reply["type"] == "feature_flags"
    return Frames(conn, client_id)


def img2img(image: str, *, width: int = 512, height: int = 384) -> dict[str, Any]:
    """LoadImage -> ImageScale -> VAEEncode -> KSampler (denoise 0.6) -> VAEDecode -> SaveImage."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["1", 0],
                "upscale_method": "bilinear",
                "width": width,
                "height": height,
                "crop": "disabled",
            },
        },
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["4", 2]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "oil", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": 3,
                "steps": 8,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 0.6,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "i2i"}},
    }


# -- uploads -----------------------------------------------------------------------------------


async def test_upload_image_renames_on_a_clash_and_keeps_one_copy_of_equal_files(
    desk: Desk,
) -> None:
    first, other = png(32, 16, seed=1), png(32, 16, seed=2)
    answer = await upload(desk, first, "photo.png")
    assert answer.status_code == 200
    assert answer.json() == {"name": "photo.png", "subfolder": "", "type": "input"}
    # The same bytes again: ComfyUI finds an equal hash and writes nothing new.
    assert (await upload(desk, first, "photo.png")).json()["name"] == "photo.png"
    assert (await upload(desk, other, "photo.png")).json()["name"] == "photo (1).png"
    assert (await upload(desk, png(8, 8, seed=3), "photo.png")).json()["name"] == "photo (2).png"
    replaced = await upload(desk, other, "photo.png", overwrite="true")
    assert replaced.json()["name"] == "photo.png"
    viewed = await desk.http.get("/view", params={"filename": "photo.png", "type": "input"})
    assert viewed.content == other
    nested = await upload(desk, first, "a.png", subfolder="studio", type="temp")
    assert nested.json() == {"name": "a.png", "subfolder": "studio", "type": "temp"}
    info = (await desk.http.get("/object_info/LoadImage")).json()["LoadImage"]
    assert info["input"]["required"]["image"] == [
        ["photo (1).png", "photo (2).png", "photo.png"],
        {"image_upload": True},
    ]


async def test_upload_refusals_as_comfyui_answers_them(desk: Desk) -> None:
    assert (await upload(desk, png(4, 4), "x.png", subfolder="../escape")).status_code == 400
    assert (await upload(desk, png(4, 4), "x.png", type="elsewhere")).status_code == 500
    no_file = await desk.http.post("/upload/image", data={"type": "input"})
    assert no_file.status_code == 400
    nameless = await desk.http.post("/upload/image", files={"image": ("", b"abc", "image/png")})
    assert nameless.status_code == 400


async def test_upload_mask_puts_the_masks_alpha_on_the_original(desk: Desk) -> None:
    await upload(desk, png(40, 20, seed=4), "face.png")
    reference = json.dumps({"filename": "face.png", "subfolder": "", "type": "input"})
    answer = await upload(
        desk, png(40, 20, alpha=True), "face-mask.png", "/upload/mask", original_ref=reference
    )
    assert answer.status_code == 200
    assert answer.json() == {"name": "face-mask.png", "subfolder": "", "type": "input"}
    written = probe_image((desk.emu.input_dir / "face-mask.png").read_bytes())
    assert (written.format, written.width, written.height, written.has_alpha) == (
        "png",
        40,
        20,
        True,
    )
    # A mask of another size cannot go onto the original: ComfyUI's handler raises.
    smaller = await upload(
        desk, png(10, 10, alpha=True), "small.png", "/upload/mask", original_ref=reference
    )
    assert smaller.status_code == 500
    assert (await upload(desk, png(40, 20), "m.png", "/upload/mask")).status_code == 500
    # A missing original: 200 with the name, and nothing written.
    missing = json.dumps({"filename": "nobody.png", "type": "input"})
    quiet = await upload(desk, png(40, 20), "ghost.png", "/upload/mask", original_ref=missing)
    assert quiet.status_code == 200
    assert not (desk.emu.input_dir / "ghost.png").exists()


# -- img2img and the image-only nodes ----------------------------------------------------------


async def test_img2img_from_an_uploaded_picture_runs_with_vae_encode_memory(desk: Desk) -> None:
    await upload(desk, png(1000, 750, seed=9), "sketch.png", subfolder="studio")
    frames = await open_frames(desk)
    prompt_id = str(uuid.uuid4())
    prompt = img2img("studio/sketch.png", width=0, height=384)
    await queue_prompt(desk, prompt, client_id=frames.client_id, prompt_id=prompt_id)
    await frames.until_done(prompt_id)
    entry = (await history(desk, prompt_id))[prompt_id]
    assert entry["status"]["status_str"] == "success", entry["status"]
    image = entry["outputs"]["9"]["images"][0]
    saved = probe_image((await desk.http.get("/view", params=image)).content)
    # Width 0 keeps the aspect ratio (512x384), which the VAE keeps as a multiple of 8.
    assert (saved.width, saved.height) == (512, 384)
    # The VAE (encode, then decode) and the UNet are resident: SD1.5 weights, not just context.
    assert desk.comfy_bytes() > 1500 * MIB
    assert "v1-5-pruned-emaonly-fp16.safetensors" in desk.emu.loaded_checkpoints()


async def test_a_missing_input_image_fails_validation_as_custom_validation(desk: Desk) -> None:
    response = await desk.http.post("/prompt", json={"prompt": img2img("nowhere.png")})
    assert response.status_code == 400
    errors = response.json()["node_errors"]["1"]["errors"]
    assert errors == [
        {
            "type": "custom_validation_failed",
            "message": "Custom validation failed for node",
            "details": "image - Invalid image file: nowhere.png",
            "extra_info": {"input_name": "image"},
        }
    ]


async def test_image_to_mask_of_alpha_passes_validation_and_fails_at_run_time(
    desk: Desk,
) -> None:
    # LoadImage hands on RGB pixels (the alpha goes into its MASK), so channel 3 is missing.
    await upload(desk, png(64, 64, alpha=True), "cut.png")
    prompt: dict[str, dict[str, Any]] = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "cut.png"}},
        "2": {"class_type": "ImageToMask", "inputs": {"image": ["1", 0], "channel": "alpha"}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    frames = await open_frames(desk)
    prompt_id = str(uuid.uuid4())
    queued = await queue_prompt(desk, prompt, client_id=frames.client_id, prompt_id=prompt_id)
    assert queued["node_errors"] == {}
    seen = await frames.until_done(prompt_id)
    errors = [f for f in seen if isinstance(f, dict) and f["type"] == "execution_error"]
    assert len(errors) == 1
    error = errors[0]["data"]
    assert error["prompt_id"] == prompt_id
    assert (error["node_id"], error["node_type"]) == ("2", "ImageToMask")
    assert error["exception_type"] == "IndexError"
    assert error["exception_message"] == "index 3 is out of bounds for dimension 3 with size 3"
    assert error["executed"] == ["1"]
    assert error["traceback"]
    assert all(isinstance(line, str) for line in error["traceback"])
    assert error["current_inputs"]["channel"] == ["alpha"]
    assert isinstance(error["timestamp"], int)
    status = (await history(desk, prompt_id))[prompt_id]["status"]
    assert (status["status_str"], status["completed"]) == ("error", False)
    recorded = dict(status["messages"])["execution_error"]
    assert recorded == error
    # The same graph with the red channel runs.
    prompt["2"]["inputs"]["channel"] = "red"
    rerun = await queue_prompt(desk, prompt, client_id=frames.client_id)
    await frames.until_done(rerun["prompt_id"])
    entry = (await history(desk, rerun["prompt_id"]))[rerun["prompt_id"]]
    assert entry["status"]["status_str"] == "success"


@pytest.mark.parametrize("metadata", [False, True], ids=["plain", "preview_metadata"])
async def test_save_image_websocket_sends_pngs_in_comfyuis_binary_frames(
    desk: Desk, metadata: bool
) -> None:
    prompt = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 48, "height": 32, "batch_size": 2, "color": 0x336699},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {
            "class_type": "ImageBlur",
            "inputs": {"image": ["2", 0], "blur_radius": 2, "sigma": 1.0},
        },
        "4": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["3", 0]}},
    }
    frames = await open_frames(desk, metadata=metadata)
    prompt_id = str(uuid.uuid4())
    await queue_prompt(desk, prompt, client_id=frames.client_id, prompt_id=prompt_id)
    seen = await frames.until_done(prompt_id)
    binary = [f for f in seen if isinstance(f, bytes)]
    assert len(binary) == 2
    for frame in binary:
        kind = struct.unpack(">I", frame[:4])[0]
        if metadata:
            assert kind == 4
            (length,) = struct.unpack(">I", frame[4:8])
            meta = json.loads(frame[8 : 8 + length])
            assert meta == {
                "node_id": "4",
                "prompt_id": prompt_id,
                "display_node_id": "4",
                "parent_node_id": None,
                "real_node_id": "4",
                "image_type": "image/png",
            }
            image = frame[8 + length :]
        else:
            assert (kind, struct.unpack(">I", frame[4:8])[0]) == (1, 2)
            image = frame[8:]
        header = probe_image(image)
        assert (header.format, header.width, header.height) == ("png", 48, 32)
    # The inverted colour: 0x336699 ^ 0xFFFFFF.
    expected = encode_png(48, 32, solid_rows(48, 32, (0xCC, 0x99, 0x66)))
    assert binary[0][-len(expected) :] == expected
    progress = [f["data"]["value"] for f in seen if isinstance(f, dict) and f["type"] == "progress"]
    assert progress == [0, 1]
    entry = (await history(desk, prompt_id))[prompt_id]
    assert entry["status"]["status_str"] == "success"
    assert entry["outputs"] == {}
    # Never cached: the same prompt sends its images again.
    again = await queue_prompt(desk, prompt, client_id=frames.client_id)
    seen = await frames.until_done(again["prompt_id"])
    assert len([f for f in seen if isinstance(f, bytes)]) == 4


async def test_cpu_device_reports_the_ram_and_holds_nothing_on_the_gpu(tmp_path: Path) -> None:
    desk = await start_desk(tmp_path, ComfyUISimSettings(cpu=True))
    try:
        before = desk.comfy_bytes()
        stats = (await desk.http.get("/system_stats")).json()
        assert stats["devices"] == [
            {
                "name": "cpu",
                "type": "cpu",
                "index": None,
                "vram_total": RAM_TOTAL_BYTES,
                "vram_free": stats["devices"][0]["vram_free"],
                "torch_vram_total": RAM_TOTAL_BYTES,
                "torch_vram_free": stats["devices"][0]["vram_free"],
            }
        ]
        assert "--cpu" in stats["system"]["argv"]
        await upload(desk, png(256, 256), "in.png")
        queued = await queue_prompt(desk, img2img("in.png", width=256, height=256))
        entry: dict[str, Any] = {}

        async def done() -> bool:
            nonlocal entry
            entry = (await history(desk, queued["prompt_id"])).get(queued["prompt_id"], {})
            return bool(entry)

        await wait_until(done, timeout_s=WAIT_S, what="the CPU prompt to finish")
        assert entry["status"]["status_str"] == "success"
        assert before == 0
        assert desk.comfy_bytes() == 0
    finally:
        await desk.http.aclose()
        await desk.server.stop()
        await desk.emu.close()
