"""The simulated desktop as a whole: both emulators on one GPU, and `gpu-agent sim` standalone.

Clients are the real ones: the official `ollama` package, and a ComfyUI websocket client that
follows ComfyUI's own example script (submit, follow to the null `executing`, read history,
fetch the image). In process the desktop runs at speed 1 on the virtual-time loop, so every
timeout below is simulated seconds; the standalone `gpu-agent sim` runs on real time.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from typing import Any

import httpx
import ollama
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.sync.client import connect as ws_connect_sync

from gpu_agent.sim.desktop import SimDesktop
from gpu_agent.sim.gpu import GIB
from gpu_agent.sim.workflows import SDXL, text_to_image
from tests.waiting import wait_until

# Simulated seconds. An SDXL prompt with a cold load takes about ten; Ollama's own load
# timeout is five minutes.
WAIT_S = 60.0
CLIENT_TIMEOUT_S = 300.0


async def run_prompt(desktop: SimDesktop, workflow: dict[str, Any]) -> list[dict[str, Any]]:
    """Submit over HTTP, follow the websocket until the null `executing`; return the frames."""
    client_id = str(uuid.uuid4())
    ws_url = desktop.comfyui_url.replace("http", "ws") + f"/ws?clientId={client_id}"
    frames: list[dict[str, Any]] = []
    async with ws_connect(ws_url, open_timeout=WAIT_S) as ws:
        async with httpx.AsyncClient(base_url=desktop.comfyui_url, timeout=WAIT_S) as http:
            answer = await http.post("/prompt", json={"prompt": workflow, "client_id": client_id})
        assert answer.status_code == 200, answer.text
        prompt_id = answer.json()["prompt_id"]
        while True:
            async with asyncio.timeout(WAIT_S):
                message = await ws.recv(decode=True)
            assert isinstance(message, str)
            frame = json.loads(message)
            frames.append(frame)
            data = frame["data"]
            done = frame["type"] == "executing" and data["node"] is None
            if done and data.get("prompt_id") == prompt_id:
                return frames


async def test_resident_14b_leaves_sdxl_out_of_memory(desktop: SimDesktop) -> None:
    client = ollama.AsyncClient(host=desktop.ollama_url, timeout=CLIENT_TIMEOUT_S)
    await client.generate(model="qwen2.5:14b", prompt="")  # load, as `ollama run` does
    listed = (await client.ps()).models
    assert [m.model for m in listed] == ["qwen2.5:14b"]
    assert listed[0].size_vram == listed[0].size  # it fits on its own

    frames = await run_prompt(desktop, text_to_image(SDXL))
    errors = [f["data"] for f in frames if f["type"] == "execution_error"]
    assert len(errors) == 1
    assert "This error means you ran out of memory on your GPU" in errors[0]["exception_message"]
    assert errors[0]["node_type"] == "KSampler"
    assert desktop.comfyui.stats.failed_oom == 1


async def test_resident_sdxl_pushes_14b_onto_the_cpu(desktop: SimDesktop) -> None:
    frames = await run_prompt(desktop, text_to_image(SDXL))
    assert "execution_success" in [f["type"] for f in frames]
    # ComfyUI keeps the checkpoint resident between prompts ("smart memory").
    assert desktop.gpu.process_bytes(4001) > 6 * GIB

    client = ollama.AsyncClient(host=desktop.ollama_url, timeout=CLIENT_TIMEOUT_S)
    answer = await client.generate(model="qwen2.5:14b", prompt="Why is the sky blue?")
    listed = (await client.ps()).models
    assert [m.model for m in listed] == ["qwen2.5:14b"]
    assert listed[0].size_vram is not None
    assert listed[0].size is not None
    assert listed[0].size_vram < listed[0].size  # partial offload: the silent spill
    assert answer.eval_count is not None
    assert answer.eval_duration is not None
    tokens_per_s = answer.eval_count / (answer.eval_duration / 1e9)
    assert tokens_per_s < 30  # 45 tokens/s when it all fits on the card
    assert desktop.ollama.stats.spilled_generations == 1


async def test_keep_alive_zero_unloads_and_frees_the_memory(desktop: SimDesktop) -> None:
    client = ollama.AsyncClient(host=desktop.ollama_url, timeout=CLIENT_TIMEOUT_S)
    await client.generate(model="llama3.2:3b", prompt="")
    before = desktop.gpu.used_bytes()
    await client.generate(model="llama3.2:3b", prompt="", keep_alive=0)
    await wait_until(lambda: desktop.gpu.used_bytes() <= before - 3 * GIB, what="memory back")
    assert (await client.ps()).models == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(60)
def test_gpu_agent_sim_serves_real_clients(tmp_path: Any) -> None:
    # A subprocess serving real clients runs on real time; there `--speed` compresses the
    # simulated seconds (an 8-step SDXL prompt, about 6 s, takes a few hundredths), and the
    # timeouts below are real seconds.
    ollama_port, comfyui_port = _free_port(), _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpu_agent.cli", "sim", "--ollama-port", str(ollama_port),
         "--comfyui-port", str(comfyui_port), "--speed", "100", "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        urls: dict[str, str] = {}
        for line in proc.stdout:
            name, _, value = line.strip().partition(" ")
            if name in ("ollama", "comfyui"):
                urls[name] = value.strip()
            if "Ctrl+C" in line:
                break
        assert urls == {
            "ollama": f"http://127.0.0.1:{ollama_port}",
            "comfyui": f"http://127.0.0.1:{comfyui_port}",
        }

        client = ollama.Client(host=urls["ollama"], timeout=10)
        names = {m.model for m in client.list().models}
        assert {"qwen2.5:7b", "qwen2.5:14b", "llama3.2:3b", "mistral-small:latest"} <= names
        reply = client.chat(model="llama3.2:3b", messages=[{"role": "user", "content": "hi"}])
        assert reply.message.content
        assert reply.done_reason in ("stop", "length")

        # ComfyUI's websocket example, line for line in spirit: sync socket, urllib for HTTP.
        client_id = str(uuid.uuid4())
        server = urls["comfyui"].removeprefix("http://")
        with ws_connect_sync(f"ws://{server}/ws?clientId={client_id}", open_timeout=5) as ws:
            body = json.dumps(
                {"prompt": text_to_image(SDXL, steps=8), "client_id": client_id}
            ).encode()
            request = urllib.request.Request(f"http://{server}/prompt", data=body)
            with urllib.request.urlopen(request, timeout=5) as response:
                prompt_id = json.loads(response.read())["prompt_id"]
            while True:
                message = json.loads(ws.recv(timeout=10))
                if message["type"] == "executing":
                    data = message["data"]
                    if data["node"] is None and data["prompt_id"] == prompt_id:
                        break
        with urllib.request.urlopen(f"http://{server}/history/{prompt_id}", timeout=5) as r:
            entry = json.loads(r.read())[prompt_id]
        assert entry["status"]["status_str"] == "success"
        image = entry["outputs"]["9"]["images"][0]
        query = f"filename={image['filename']}&subfolder={image['subfolder']}&type={image['type']}"
        with urllib.request.urlopen(f"http://{server}/view?{query}", timeout=5) as r:
            png = r.read()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
