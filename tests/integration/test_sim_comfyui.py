"""The emulated ComfyUI against real HTTP and websocket clients on loopback.

The client side is written the way ComfyUI's `script_examples/websockets_api_example.py` uses the
server: connect `ws://…/ws?clientId=<uuid4>`, POST /prompt with that client_id, read frames until
`executing` with node None for the prompt, then GET /history/{id} and fetch each image via /view.
"""

from __future__ import annotations

import asyncio
import json
import struct
import uuid
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gpu_agent.sim.catalog import GIB, MIB, Catalog
from gpu_agent.sim.clock import SimClock
from gpu_agent.sim.comfyui import ComfyUIEmulator, ComfyUISimSettings
from gpu_agent.sim.gpu import SimGpu
from gpu_agent.sim.server import LoopbackServer
from tests.waiting import wait_until

XORG_PID = 1200
OTHER_PID = 5000
# Simulated seconds (the loop is on virtual time): the longest quiet spell between two frames
# here is a cold SDXL load (~3.5 s) or a low-VRAM step, far below this.
WAIT_S = 60.0
SD15 = "v1-5-pruned-emaonly-fp16.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
CONTEXT_BYTES = ComfyUISimSettings().context_bytes


def workflow(
    *,
    ckpt: str = SD15,
    seed: int = 1,
    steps: int = 20,
    width: int = 512,
    height: int = 512,
    batch: int = 1,
    text: str = "a lighthouse at dusk",
    prefix: str = "ComfyUI",
) -> dict[str, Any]:
    """ComfyUI's stock text-to-image workflow in API format."""
    return {
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": steps,
                "cfg": 8,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": width, "height": height, "batch_size": batch},
        },
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }


def decode_png(data: bytes) -> tuple[int, int, bytes]:
    """Check every chunk's CRC and return width, height and the raw scanlines."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, payload = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + payload) & 0xFFFFFFFF == crc
        if kind == b"IHDR":
            size = struct.unpack(">II", payload[:8])
        elif kind == b"IDAT":
            idat += payload
        pos += 12 + length
    width, height = size
    raw = zlib.decompress(idat)
    assert len(raw) == height * (1 + 3 * width)
    return width, height, raw


@dataclass
class Desk:
    clock: SimClock
    gpu: SimGpu
    emu: ComfyUIEmulator
    server: LoopbackServer
    http: httpx.AsyncClient
    output_dir: Path

    @property
    def ws_url(self) -> str:
        return f"ws://{self.server.host}:{self.server.port}/ws"

    def comfy_bytes(self) -> int:
        return self.gpu.process_bytes(self.emu.pid)


async def start_desk(tmp_path: Path, settings: ComfyUISimSettings) -> Desk:
    clock = SimClock()
    gpu = SimGpu(clock)
    gpu.attach(XORG_PID, "Xorg", ("/usr/lib/xorg/Xorg",), compute=False)
    gpu.allocate(XORG_PID, 600 * MIB)
    output_dir = tmp_path / "output"
    emu = ComfyUIEmulator(
        clock=clock, gpu=gpu, catalog=Catalog(), output_dir=output_dir, settings=settings
    )
    await emu.start_process()
    server = LoopbackServer(emu.make_app)
    await server.start()
    http = httpx.AsyncClient(base_url=server.url, timeout=WAIT_S)
    return Desk(clock, gpu, emu, server, http, output_dir)


@pytest.fixture
async def desk(tmp_path: Path) -> AsyncIterator[Desk]:
    d = await start_desk(tmp_path, ComfyUISimSettings())
    yield d
    await d.http.aclose()
    await d.server.stop()
    await d.emu.close()


class WsClient:
    """A websocket client reading frames into a list, as the example script does."""

    def __init__(self, conn: ClientConnection, client_id: str) -> None:
        self.conn = conn
        self.client_id = client_id
        self.frames: list[dict[str, Any]] = []

    async def next(self) -> dict[str, Any]:
        async with asyncio.timeout(WAIT_S):
            raw = await self.conn.recv()
        frame: dict[str, Any] = json.loads(raw)
        self.frames.append(frame)
        return frame

    async def until(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        while True:
            frame = await self.next()
            if match(frame):
                return frame

    async def until_done(self, prompt_id: str) -> list[dict[str, Any]]:
        """Frames up to `executing {node: None}` for `prompt_id` (the example's done marker)."""
        start = len(self.frames)
        await self.until(
            lambda f: (
                f["type"] == "executing"
                and f["data"]["node"] is None
                and f["data"].get("prompt_id") == prompt_id
            )
        )
        return self.frames[start:]


async def open_ws(desk: Desk, client_id: str | None = None) -> WsClient:
    client_id = client_id or str(uuid.uuid4())
    conn = await connect(f"{desk.ws_url}?clientId={client_id}", open_timeout=WAIT_S)
    client = WsClient(conn, client_id)
    hello = await client.next()
    assert hello["type"] == "status"
    assert hello["data"]["sid"] == client_id
    return client


async def queue_prompt(desk: Desk, prompt: dict[str, Any], **body: Any) -> dict[str, Any]:
    response = await desk.http.post("/prompt", json={"prompt": prompt, **body})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def history(desk: Desk, prompt_id: str) -> dict[str, Any]:
    response = await desk.http.get(f"/history/{prompt_id}")
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


def types(frames: list[dict[str, Any]]) -> list[str]:
    return [frame["type"] for frame in frames]


def first_frame(frames: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The first frame of type `kind`; fails with the types seen if there is none."""
    found = next((frame for frame in frames if frame["type"] == kind), None)
    assert found is not None, f"no {kind!r} frame among {types(frames)}"
    return found


# -- the example client's round trip ---------------------------------------------------------


async def test_websocket_example_round_trip_saves_real_pngs(desk: Desk) -> None:
    ws = await open_ws(desk)
    prompt_id = str(uuid.uuid4())
    prompt = workflow(width=640, height=384, batch=2, seed=7)
    queued = await queue_prompt(desk, prompt, client_id=ws.client_id, prompt_id=prompt_id)
    assert queued == {"prompt_id": prompt_id, "number": 0, "node_errors": {}}

    await ws.until_done(prompt_id)
    entry = (await history(desk, prompt_id))[prompt_id]
    assert entry["status"]["status_str"] == "success"
    assert entry["status"]["completed"] is True
    assert [m[0] for m in entry["status"]["messages"]] == [
        "execution_start",
        "execution_cached",
        "execution_success",
    ]
    assert entry["prompt"][:2] == [0, prompt_id]
    assert entry["prompt"][3] == {"client_id": ws.client_id}
    assert entry["prompt"][4] == ["9"]
    assert entry["meta"]["9"]["node_id"] == "9"
    images = entry["outputs"]["9"]["images"]
    assert [i["filename"] for i in images] == ["ComfyUI_00001_.png", "ComfyUI_00002_.png"]
    for image in images:
        response = await desk.http.get("/view", params=image)
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        assert response.headers["content-disposition"] == f'filename="{image["filename"]}"'
        width, height, _ = decode_png(response.content)
        assert (width, height) == (640, 384)
        assert (desk.output_dir / image["filename"]).read_bytes() == response.content
    # Different seeds per batch image give different pixels.
    first, second = (desk.output_dir / i["filename"] for i in images)
    assert decode_png(first.read_bytes())[2] != decode_png(second.read_bytes())[2]
    await ws.conn.close()


async def test_exact_message_order_of_a_run(desk: Desk) -> None:
    ws = await open_ws(desk)
    queued = await queue_prompt(desk, workflow(steps=4), client_id=ws.client_id)
    prompt_id = queued["prompt_id"]
    frames = await ws.until_done(prompt_id)

    def remaining(frame: dict[str, Any]) -> int:
        return int(frame["data"]["status"]["exec_info"]["queue_remaining"])

    assert types(frames[:4]) == ["status", "status", "execution_start", "execution_cached"]
    assert [remaining(f) for f in frames[:2]] == [1, 1]
    assert frames[3]["data"]["nodes"] == []
    assert types(frames[-4:]) == ["progress_state", "execution_success", "status", "executing"]
    assert remaining(frames[-2]) == 0
    assert frames[-1]["data"] == {"node": None, "prompt_id": prompt_id}

    # Per node: progress_state(running), executing, [steps], [executed], progress_state(finished).
    body = frames[4:-3]
    order = [f["data"]["node"] for f in body if f["type"] == "executing"]
    assert sorted(order) == ["3", "4", "5", "6", "7", "8", "9"]
    prompt = workflow()
    for node_id in order:  # every link points to a node that ran earlier
        for value in prompt[node_id]["inputs"].values():
            if isinstance(value, list):
                assert order.index(value[0]) < order.index(node_id)
    expected: list[tuple[str, str | None]] = []
    for node_id in order:
        expected += [("progress_state", "running"), ("executing", node_id)]
        if node_id == "3":
            expected += [("progress_state", "running"), ("progress", "3")] * 4
        if node_id == "9":
            expected.append(("executed", "9"))
        expected.append(("progress_state", "finished"))
    seen: list[tuple[str, str | None]] = []
    for frame in body:
        data = frame["data"]
        if frame["type"] == "progress_state":
            # The node a frame is about is the newest in its map.
            seen.append(("progress_state", list(data["nodes"].values())[-1]["state"]))
        else:
            seen.append((frame["type"], data.get("node")))
    assert seen == expected
    steps = [f["data"] for f in body if f["type"] == "progress"]
    assert steps == [
        {"value": v, "max": 4, "prompt_id": prompt_id, "node": "3"} for v in range(1, 5)
    ]
    await ws.conn.close()


async def test_api_prefix_and_queue_endpoints(desk: Desk) -> None:
    info = await desk.http.get("/api/prompt")
    assert info.json() == {"exec_info": {"queue_remaining": 0}}
    queue = await desk.http.get("/api/queue")
    assert queue.json() == {"queue_running": [], "queue_pending": []}
    missing = await desk.http.get(f"/api/history/{uuid.uuid4()}")
    assert missing.status_code == 200
    assert missing.json() == {}


# -- validation --------------------------------------------------------------------------------


async def test_validation_errors_and_the_counter(desk: Desk) -> None:
    async def rejected(body: dict[str, Any]) -> dict[str, Any]:
        response = await desk.http.post("/prompt", json=body)
        assert response.status_code == 400
        result: dict[str, Any] = response.json()
        return result

    unknown = workflow()
    unknown["10"] = {"class_type": "NoSuchNode", "inputs": {}}
    body = await rejected({"prompt": unknown})
    assert body["error"]["type"] == "invalid_prompt"
    assert "NoSuchNode" in body["error"]["message"]
    assert body["node_errors"] == {}

    missing = workflow()
    del missing["3"]["inputs"]["steps"]
    body = await rejected({"prompt": missing})
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    errors = body["node_errors"]["3"]
    assert errors["class_type"] == "KSampler"
    assert errors["dependent_outputs"] == ["9"]
    assert errors["errors"][0]["type"] == "required_input_missing"
    assert errors["errors"][0]["extra_info"] == {"input_name": "steps"}

    body = await rejected({"prompt": workflow(ckpt="nope.safetensors")})
    error = body["node_errors"]["4"]["errors"][0]
    assert error["type"] == "value_not_in_list"
    assert error["extra_info"]["received_value"] == "nope.safetensors"
    assert SD15 in error["details"]

    too_small = await rejected({"prompt": workflow(steps=0)})
    assert too_small["node_errors"]["3"]["errors"][0]["type"] == "value_smaller_than_min"
    too_big = await rejected({"prompt": workflow(width=20000)})
    assert too_big["node_errors"]["5"]["errors"][0]["type"] == "value_bigger_than_max"
    bad_int = workflow()
    bad_int["3"]["inputs"]["seed"] = "abc"
    assert (await rejected({"prompt": bad_int}))["node_errors"]["3"]["errors"][0][
        "type"
    ] == "invalid_input_type"
    mismatch = workflow()
    mismatch["3"]["inputs"]["model"] = ["4", 1]
    assert (await rejected({"prompt": mismatch}))["node_errors"]["3"]["errors"][0][
        "type"
    ] == "return_type_mismatch"
    no_output = workflow()
    del no_output["9"]
    assert (await rejected({"prompt": no_output}))["error"]["type"] == "prompt_no_outputs"
    assert (await rejected({"client_id": "x"}))["error"]["type"] == "no_prompt"
    bad_id = await rejected({"prompt": workflow(), "prompt_id": "ABC"})
    assert bad_id["error"]["type"] == "invalid_prompt_id"
    upper = str(uuid.uuid4()).upper()
    assert (await rejected({"prompt": workflow(), "prompt_id": upper}))["error"][
        "type"
    ] == "invalid_prompt_id"

    # Eleven rejected prompts still advanced the counter; nothing was queued.
    accepted = await queue_prompt(desk, workflow(steps=1))
    assert accepted["number"] == 11
    front = await queue_prompt(desk, workflow(steps=1), front=True)
    assert front["number"] == -12
    explicit = await desk.http.post("/prompt", json={"prompt": workflow(steps=1), "number": 3})
    assert explicit.json()["number"] == 3.0


async def test_bad_json_body_is_a_plain_500(desk: Desk) -> None:
    response = await desk.http.post(
        "/prompt", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("text/plain")


async def test_origin_must_match_host(desk: Desk) -> None:
    port = desk.server.port
    foreign = {"Origin": f"http://localhost:{port}"}
    response = await desk.http.post("/prompt", json={"prompt": workflow()}, headers=foreign)
    assert response.status_code == 403
    assert response.content == b""
    same = await desk.http.get("/prompt", headers={"Origin": f"http://127.0.0.1:{port}"})
    assert same.status_code == 200
    with pytest.raises(InvalidStatus) as refused:
        await connect(desk.ws_url, additional_headers=foreign, open_timeout=WAIT_S)
    assert refused.value.response.status_code == 403


# -- caching, files ------------------------------------------------------------------------


async def test_identical_rerun_is_cached_and_resends_old_files(desk: Desk) -> None:
    ws = await open_ws(desk)
    first = await queue_prompt(desk, workflow(steps=3), client_id=ws.client_id)
    await ws.until_done(first["prompt_id"])
    again = await queue_prompt(desk, workflow(steps=3), client_id=ws.client_id)
    frames = await ws.until_done(again["prompt_id"])
    cached = first_frame(frames, "execution_cached")
    assert sorted(cached["data"]["nodes"]) == ["3", "4", "5", "6", "7", "8", "9"]
    assert [f["data"]["node"] for f in frames if f["type"] == "executing"] == [None]
    executed = [f["data"] for f in frames if f["type"] == "executed"]
    assert executed[0]["node"] == "9"
    assert executed[0]["output"]["images"][0]["filename"] == "ComfyUI_00001_.png"
    entry = (await history(desk, again["prompt_id"]))[again["prompt_id"]]
    assert entry["outputs"]["9"]["images"][0]["filename"] == "ComfyUI_00001_.png"
    assert sorted(p.name for p in desk.output_dir.iterdir()) == ["ComfyUI_00001_.png"]
    newest = (await desk.http.get("/history", params={"max_items": 1})).json()
    assert list(newest) == [again["prompt_id"]]

    # A new seed reruns the sampler and what follows it; the rest stays cached.
    reseeded = await queue_prompt(desk, workflow(steps=3, seed=2), client_id=ws.client_id)
    frames = await ws.until_done(reseeded["prompt_id"])
    cached = first_frame(frames, "execution_cached")
    assert sorted(cached["data"]["nodes"]) == ["4", "5", "6", "7"]
    ran = [f["data"]["node"] for f in frames if f["type"] == "executing"]
    assert ran == ["3", "8", "9", None]
    assert (desk.output_dir / "ComfyUI_00002_.png").is_file()
    await ws.conn.close()


async def test_empty_image_needs_no_gpu_memory(desk: Desk) -> None:
    ws = await open_ws(desk)
    prompt = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 32, "batch_size": 1, "color": 0x336699},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "e"}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    queued = await queue_prompt(desk, prompt, client_id=ws.client_id)
    await ws.until_done(queued["prompt_id"])
    assert desk.comfy_bytes() == CONTEXT_BYTES
    assert desk.emu.loaded_checkpoints() == []
    outputs = (await history(desk, queued["prompt_id"]))[queued["prompt_id"]]["outputs"]
    saved = outputs["2"]["images"][0]
    assert saved == {"filename": "e_00001_.png", "subfolder": "", "type": "output"}
    _, _, raw = decode_png((desk.output_dir / saved["filename"]).read_bytes())
    assert raw[:4] == b"\x00\x33\x66\x99"
    preview = outputs["3"]["images"][0]
    assert preview["type"] == "temp"
    assert preview["filename"].startswith("ComfyUI_temp_")
    assert preview["filename"].endswith("_00001_.png")
    assert len(preview["filename"]) == len("ComfyUI_temp_abcde_00001_.png")
    response = await desk.http.get("/view", params=preview)
    assert decode_png(response.content)[:2] == (64, 32)
    await ws.conn.close()


async def test_view_rejects_bad_requests(desk: Desk) -> None:
    async def status(**params: str) -> tuple[int, bytes]:
        response = await desk.http.get("/view", params=params)
        return response.status_code, response.content

    assert await status(filename="missing.png") == (404, b"")
    assert (await status())[0] == 404
    assert (await status(filename="../secret.png"))[0] == 400
    assert (await status(filename="/etc/passwd"))[0] == 400
    assert (await status(filename="a.png", type="models"))[0] == 400
    assert (await status(filename="a.png", subfolder="../../etc"))[0] == 403


# -- memory: /free, gc, OOM, low-VRAM ----------------------------------------------------------


async def test_sdxl_alone_fits_and_the_gc_pass_returns_the_cache(tmp_path: Path) -> None:
    # A later gc pass than the default leaves room to look at the cache before it runs.
    d = await start_desk(tmp_path, ComfyUISimSettings(gc_after_prompt_s=30.0))
    try:
        ws = await open_ws(d)
        sdxl = workflow(ckpt=SDXL, width=1024, height=1024, steps=8)
        queued = await queue_prompt(d, sdxl, client_id=ws.client_id)
        await ws.until_done(queued["prompt_id"])
        finished_at = d.clock.now()
        entry = (await history(d, queued["prompt_id"]))[queued["prompt_id"]]
        assert entry["status"]["status_str"] == "success"
        assert d.emu.stats.lowvram_runs == 0
        assert d.emu.loaded_checkpoints() == [SDXL]
        weights = int(4897.05 * MIB) + int(1560.80 * MIB) + int(159.56 * MIB)
        # Right after the prompt torch's allocator still caches freed activations...
        assert d.emu.cache_bytes() == 512 * MIB
        assert d.comfy_bytes() == CONTEXT_BYTES + weights + 512 * MIB
        device = (await d.http.get("/system_stats")).json()["devices"][0]
        assert device["vram_total"] == d.gpu.total_bytes
        assert device["vram_free"] == d.gpu.free_bytes() + 512 * MIB
        assert device["torch_vram_total"] == weights + 512 * MIB
        assert device["torch_vram_free"] == 512 * MIB
        # ...until the gc pass; then only the context and the weights remain.
        await wait_until(lambda: d.emu.cache_bytes() == 0, what="the gc pass")
        assert d.clock.now() - finished_at == pytest.approx(30.0, abs=0.05)
        assert d.comfy_bytes() == CONTEXT_BYTES + weights
        await ws.conn.close()
    finally:
        await d.http.aclose()
        await d.server.stop()
        await d.emu.close()


@pytest.mark.parametrize("gc_after_s", [0.3, 7.3])
async def test_the_gc_pass_runs_on_time_whatever_the_rounding(
    tmp_path: Path, gc_after_s: float
) -> None:
    # These deadlines once woke a hair early on virtual time and waited again, forever.
    d = await start_desk(tmp_path, ComfyUISimSettings(gc_after_prompt_s=gc_after_s))
    try:
        ws = await open_ws(d)
        queued = await queue_prompt(d, workflow(steps=3), client_id=ws.client_id)
        await ws.until_done(queued["prompt_id"])
        finished_at = d.clock.now()
        await wait_until(lambda: d.emu.cache_bytes() == 0, what="the gc pass")
        assert d.clock.now() - finished_at == pytest.approx(gc_after_s, abs=0.05)
        await ws.conn.close()
    finally:
        await d.http.aclose()
        await d.server.stop()
        await d.emu.close()


async def test_free_waits_for_the_running_prompt(desk: Desk) -> None:
    ws = await open_ws(desk)
    queued = await queue_prompt(
        desk, workflow(ckpt=SDXL, width=1024, height=1024, steps=120), client_id=ws.client_id
    )
    first_step = await ws.until(lambda f: f["type"] == "progress")
    free = await desk.http.post("/free", json={"unload_models": True, "free_memory": True})
    assert (free.status_code, free.content) == (200, b"")
    # Several sampler steps (well past free_apply_s) later, the models are still resident.
    later = first_step["data"]["value"] + 8
    await ws.until(lambda f: f["type"] == "progress" and f["data"]["value"] >= later)
    assert desk.emu.running_prompt_id() == queued["prompt_id"]
    assert desk.emu.loaded_checkpoints() == [SDXL]
    assert desk.comfy_bytes() > CONTEXT_BYTES + 5 * GIB
    await ws.until_done(queued["prompt_id"])
    await wait_until(lambda: desk.comfy_bytes() == CONTEXT_BYTES, what="memory back to the context")
    assert desk.emu.loaded_checkpoints() == []
    assert (await history(desk, queued["prompt_id"]))[queued["prompt_id"]]["status"][
        "completed"
    ] is True
    await ws.conn.close()


async def test_free_on_an_idle_worker(desk: Desk) -> None:
    ws = await open_ws(desk)
    queued = await queue_prompt(desk, workflow(steps=2), client_id=ws.client_id)
    await ws.until_done(queued["prompt_id"])
    assert desk.emu.loaded_checkpoints() == [SD15]
    # unload_models alone keeps the node cache: an identical rerun runs nothing at all.
    await desk.http.post("/free", json={"unload_models": True})
    await wait_until(lambda: desk.comfy_bytes() == CONTEXT_BYTES, what="memory back to the context")
    again = await queue_prompt(desk, workflow(steps=2), client_id=ws.client_id)
    frames = await ws.until_done(again["prompt_id"])
    assert len(first_frame(frames, "execution_cached")["data"]["nodes"]) == 7
    assert desk.emu.loaded_checkpoints() == []
    # free_memory also forgets cached outputs, so the same prompt runs (and loads) again.
    await desk.http.post("/free", json={"free_memory": True})
    await wait_until(lambda: desk.comfy_bytes() == CONTEXT_BYTES, what="memory back to the context")
    third = await queue_prompt(desk, workflow(steps=2), client_id=ws.client_id)
    frames = await ws.until_done(third["prompt_id"])
    assert first_frame(frames, "execution_cached")["data"]["nodes"] == []
    assert desk.emu.loaded_checkpoints() == [SD15]
    await ws.conn.close()


async def test_oom_when_another_process_holds_10_gib(desk: Desk) -> None:
    desk.gpu.attach(OTHER_PID, "ollama", ("/usr/local/bin/ollama", "runner"))
    desk.gpu.allocate(OTHER_PID, 10 * GIB)
    ws = await open_ws(desk)
    queued = await queue_prompt(
        desk, workflow(ckpt=SDXL, width=1024, height=1024), client_id=ws.client_id
    )
    frames = await ws.until_done(queued["prompt_id"])
    error = first_frame(frames, "execution_error")["data"]
    assert error["node_id"] == "3"
    assert error["node_type"] == "KSampler"
    assert error["exception_type"] == "torch.OutOfMemoryError"
    assert "This error means you ran out of memory on your GPU" in error["exception_message"]
    assert "execution_success" not in types(frames)
    entry = (await history(desk, queued["prompt_id"]))[queued["prompt_id"]]
    assert entry["status"]["status_str"] == "error"
    assert entry["status"]["messages"][-1][0] == "execution_error"
    assert desk.emu.loaded_checkpoints() == []
    assert desk.emu.stats.failed_oom == 1
    await ws.conn.close()


async def test_low_vram_mode_when_5_gib_is_held(desk: Desk) -> None:
    ws = await open_ws(desk)
    sdxl = workflow(ckpt=SDXL, width=1024, height=1024, steps=10)
    baseline = await queue_prompt(desk, sdxl, client_id=ws.client_id)
    await ws.until_done(baseline["prompt_id"])
    full_step_s = desk.emu.stats.seconds_per_step
    assert full_step_s == pytest.approx(0.24)
    await desk.http.post("/free", json={"free_memory": True})
    await wait_until(lambda: desk.comfy_bytes() == CONTEXT_BYTES, what="memory back to the context")
    desk.gpu.attach(OTHER_PID, "ollama", ("/usr/local/bin/ollama", "runner"))
    desk.gpu.allocate(OTHER_PID, 5 * GIB)
    steps_before, seconds_before = desk.emu.stats.sampler_steps, desk.emu.stats.sampler_s

    squeezed = await queue_prompt(desk, sdxl, client_id=ws.client_id)
    frames = await ws.until_done(squeezed["prompt_id"])
    assert "execution_success" in types(frames)
    assert desk.emu.stats.lowvram_runs == 1
    lowvram_step_s = (desk.emu.stats.sampler_s - seconds_before) / (
        desk.emu.stats.sampler_steps - steps_before
    )
    assert lowvram_step_s > full_step_s * 1.05
    # The UNet is only partly resident and CLIP was dropped to make room.
    assert desk.comfy_bytes() < CONTEXT_BYTES + int(4897.05 * MIB) + 512 * MIB
    assert desk.gpu.free_bytes() >= 0
    await ws.conn.close()


async def test_disabled_smart_memory_unloads_after_every_prompt(tmp_path: Path) -> None:
    d = await start_desk(tmp_path, ComfyUISimSettings(smart_memory=False))
    try:
        ws = await open_ws(d)
        queued = await queue_prompt(d, workflow(steps=2), client_id=ws.client_id)
        await ws.until_done(queued["prompt_id"])
        assert d.emu.loaded_checkpoints() == []
        await ws.conn.close()
    finally:
        await d.http.aclose()
        await d.server.stop()
        await d.emu.close()


# -- interrupt, queue edits, crash -----------------------------------------------------------


async def test_interrupt_stops_only_the_running_prompt(desk: Desk) -> None:
    ws = await open_ws(desk)
    long = workflow(ckpt=SDXL, width=1024, height=1024, steps=200)
    running = await queue_prompt(desk, long, client_id=ws.client_id)
    pending = await queue_prompt(desk, workflow(steps=2), client_id=ws.client_id)
    await ws.until(lambda f: f["type"] == "progress")
    # A targeted interrupt naming another prompt does nothing.
    other = await desk.http.post("/interrupt", json={"prompt_id": pending["prompt_id"]})
    assert (other.status_code, other.content) == (200, b"")
    assert desk.emu.running_prompt_id() == running["prompt_id"]
    await desk.http.post("/interrupt", json={"prompt_id": running["prompt_id"]})
    frames = await ws.until_done(running["prompt_id"])
    stopped = first_frame(frames, "execution_interrupted")["data"]
    assert stopped["node_id"] == "3"
    assert stopped["node_type"] == "KSampler"
    assert "execution_success" not in types(frames)
    # The sampler stopped short of its last step. The interrupt may land before another
    # progress frame, so count every step the prompt reported, the one waited for included.
    steps = [
        f["data"]["value"]
        for f in ws.frames
        if f["type"] == "progress" and f["data"].get("prompt_id") == running["prompt_id"]
    ]
    assert steps, f"no progress frame for the running prompt among {types(ws.frames)}"
    assert max(steps) < 200
    entry = (await history(desk, running["prompt_id"]))[running["prompt_id"]]
    assert entry["status"]["status_str"] == "error"
    assert entry["status"]["completed"] is False
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    # The pending prompt was not touched and runs next.
    await ws.until_done(pending["prompt_id"])
    assert (await history(desk, pending["prompt_id"]))[pending["prompt_id"]]["status"][
        "completed"
    ] is True
    assert desk.emu.stats.interrupted == 1
    await ws.conn.close()


async def test_deleting_a_pending_prompt_leaves_no_history(desk: Desk) -> None:
    ws = await open_ws(desk)
    long = workflow(ckpt=SDXL, width=1024, height=1024, steps=150)
    running = await queue_prompt(desk, long, client_id=ws.client_id)
    doomed = await queue_prompt(desk, workflow(steps=2), client_id=ws.client_id)
    await ws.until(lambda f: f["type"] == "progress")
    queue = (await desk.http.get("/queue")).json()
    assert [item[1] for item in queue["queue_running"]] == [running["prompt_id"]]
    assert [item[1] for item in queue["queue_pending"]] == [doomed["prompt_id"]]
    start = len(ws.frames)
    deleted = await desk.http.post("/queue", json={"delete": [doomed["prompt_id"]]})
    assert (deleted.status_code, deleted.content) == (200, b"")
    await ws.until_done(running["prompt_id"])
    statuses = [
        f["data"]["status"]["exec_info"]["queue_remaining"]
        for f in ws.frames[start:]
        if f["type"] == "status"
    ]
    # Deleting the only pending item sends two status frames, then the run ends.
    assert statuses == [1, 1, 0]
    assert (await desk.http.get("/queue")).json()["queue_pending"] == []
    assert await history(desk, doomed["prompt_id"]) == {}
    await ws.conn.close()


async def test_kill_mid_prompt_loses_queue_and_history(desk: Desk) -> None:
    ws = await open_ws(desk)
    done = await queue_prompt(desk, workflow(steps=2), client_id=ws.client_id)
    await ws.until_done(done["prompt_id"])
    long = workflow(ckpt=SDXL, width=1024, height=1024, steps=200)
    running = await queue_prompt(desk, long, client_id=ws.client_id)
    await queue_prompt(desk, workflow(steps=2, seed=9), client_id=ws.client_id)
    await ws.until(lambda f: f["type"] == "progress")

    await desk.emu.kill_process()
    with pytest.raises(ConnectionClosed):
        await ws.until(lambda f: False)
    assert desk.comfy_bytes() == 0
    assert desk.emu.running_prompt_id() is None
    assert all(p.pid != desk.emu.pid for p in desk.gpu.reading().processes)

    # While the process is down the emulator answers 503 rather than a stale queue.
    assert (await desk.http.get("/queue")).status_code == 503
    await desk.emu.start_process()
    assert desk.comfy_bytes() == CONTEXT_BYTES
    assert (await desk.http.get("/queue")).json() == {"queue_running": [], "queue_pending": []}
    assert (await desk.http.get("/history")).json() == {}
    assert await history(desk, running["prompt_id"]) == {}
    assert (desk.output_dir / "ComfyUI_00001_.png").is_file()
    # A fresh process: the counter restarts and the file counter continues from disk.
    ws2 = await open_ws(desk)
    again = await queue_prompt(desk, workflow(steps=2, seed=5), client_id=ws2.client_id)
    assert again["number"] == 0
    await ws2.until_done(again["prompt_id"])
    entry = (await history(desk, again["prompt_id"]))[again["prompt_id"]]
    assert entry["outputs"]["9"]["images"][0]["filename"] == "ComfyUI_00002_.png"
    await ws2.conn.close()


# -- websocket behaviour -------------------------------------------------------------------


async def test_prompt_without_client_id_sends_no_execution_events(desk: Desk) -> None:
    listener = await open_ws(desk)
    queued = await queue_prompt(desk, workflow(steps=3))
    prompt_id = queued["prompt_id"]
    # The broadcast status with an empty queue comes after the history entry is written.
    await listener.until(lambda f: f["type"] == "progress")
    await listener.until(
        lambda f: f["type"] == "status" and f["data"]["status"]["exec_info"]["queue_remaining"] == 0
    )
    seen = set(types(listener.frames))
    assert {"status", "progress", "progress_state"} <= seen
    assert not seen & {"execution_start", "execution_cached", "executing", "executed"}
    assert (await history(desk, prompt_id))[prompt_id]["status"]["completed"] is True
    await listener.conn.close()


async def test_reconnect_mid_run_gets_status_then_the_current_node(desk: Desk) -> None:
    ws = await open_ws(desk)
    long = workflow(ckpt=SDXL, width=1024, height=1024, steps=100)
    queued = await queue_prompt(desk, long, client_id=ws.client_id)
    await ws.until(lambda f: f["type"] == "progress")
    conn = await connect(f"{desk.ws_url}?clientId={ws.client_id}", open_timeout=WAIT_S)
    again = WsClient(conn, ws.client_id)
    hello = await again.next()
    assert hello["type"] == "status"
    assert hello["data"]["sid"] == ws.client_id
    assert await again.next() == {"type": "executing", "data": {"node": "3"}}
    await again.until_done(queued["prompt_id"])
    await conn.close()
    await ws.conn.close()


async def test_feature_flags_and_generated_sid(desk: Desk) -> None:
    conn = await connect(desk.ws_url, open_timeout=WAIT_S)
    client = WsClient(conn, "")
    hello = await client.next()
    sid = hello["data"]["sid"]
    assert len(sid) == 32
    assert "-" not in sid
    await conn.send(
        json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
    )
    reply = await client.next()
    assert reply["type"] == "feature_flags"
    assert reply["data"]["supports_preview_metadata"] is True
    assert reply["data"]["max_upload_size"] == 100 * 1024 * 1024
    await conn.close()


async def test_silent_websocket_drops_frames_and_drop_websockets_cuts_them(desk: Desk) -> None:
    ws = await open_ws(desk)
    desk.emu.faults.websocket_silent = True
    quiet = await queue_prompt(desk, workflow(steps=2), client_id=ws.client_id)

    async def finished() -> bool:
        return bool(await history(desk, quiet["prompt_id"]))

    await wait_until(finished, poll_s=0.1, what="the silent run in history")
    desk.emu.faults.websocket_silent = False
    loud = await queue_prompt(desk, workflow(steps=2, seed=3), client_id=ws.client_id)
    # Nothing from the silent run was buffered: the first frame is the new enqueue.
    opening = await ws.next()
    assert opening["type"] == "status"
    frames = await ws.until_done(loud["prompt_id"])
    assert all(f["data"].get("prompt_id") in (None, loud["prompt_id"]) for f in frames)

    await desk.emu.drop_websockets()
    with pytest.raises(ConnectionClosed):
        await ws.until(lambda f: False)
    ws2 = await open_ws(desk, ws.client_id)
    third = await queue_prompt(desk, workflow(steps=2, seed=4), client_id=ws2.client_id)
    await ws2.until_done(third["prompt_id"])
    await ws2.conn.close()


async def test_object_info_describes_the_nodes(desk: Desk) -> None:
    everything = (await desk.http.get("/object_info")).json()
    assert {
        "CheckpointLoaderSimple",
        "CLIPTextEncode",
        "EmptyLatentImage",
        "KSampler",
        "VAEDecode",
        "SaveImage",
        "PreviewImage",
        "EmptyImage",
    } <= set(everything)
    ksampler = (await desk.http.get("/object_info/KSampler")).json()["KSampler"]
    required = ksampler["input"]["required"]
    assert required["seed"][0] == "INT"
    assert required["seed"][1]["max"] == 2**64 - 1
    assert "dpmpp_2m" in required["sampler_name"][0]
    assert "karras" in required["scheduler"][0]
    assert ksampler["output"] == ["LATENT"]
    assert ksampler["output_node"] is False
    loader = everything["CheckpointLoaderSimple"]
    assert loader["input"]["required"]["ckpt_name"][0] == [
        c.filename for c in Catalog().checkpoints
    ]
    assert loader["output"] == ["MODEL", "CLIP", "VAE"]
    assert everything["SaveImage"]["output_node"] is True
    assert (await desk.http.get("/object_info/Nope")).json() == {}


async def test_faults_answer_500_text(desk: Desk) -> None:
    desk.emu.faults.fail(500, "boom", count=1)
    response = await desk.http.get("/queue")
    assert (response.status_code, response.text) == (500, "boom")
    assert response.headers["content-type"].startswith("text/plain")
    assert (await desk.http.get("/queue")).status_code == 200


async def test_server_restart_closes_sockets_and_serves_a_fresh_app(desk: Desk) -> None:
    ws = await open_ws(desk)
    await desk.server.stop()
    with pytest.raises(ConnectionClosed):
        await ws.until(lambda f: False)
    assert ws.conn.close_code == 1001
    await desk.server.start()
    again = await open_ws(desk)
    queued = await queue_prompt(desk, workflow(steps=2), client_id=again.client_id)
    await again.until_done(queued["prompt_id"])
    await again.conn.close()
