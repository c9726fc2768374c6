"""The emulated ComfyUI server of the simulated desktop (simulator layer).

A real aiohttp application speaking ComfyUI 0.3.64's HTTP and websocket API (protocols.md part B,
including what a real server was seen to do in B3b), backed by a worker that runs prompts against
the shared `SimGpu`. The emulator outlives its "process": `kill_process()` loses the queue,
history, loaded models and node cache as a crash does, `start_process()` starts a fresh one;
output files on disk stay.

Module map: `comfyui_nodes` (class table), `comfyui_validate` (POST /prompt checks),
`comfyui_queue` (queue, history, flags), `comfyui_exec` (executor and worker loop),
`comfyui_runtime` (what nodes do), `comfyui_memory` (VRAM model), `comfyui_ws` (websockets),
`comfyui_uploads` (`/upload/image` and `/upload/mask`).

Started with `cpu=True` in its settings it is ComfyUI's `--cpu`: its models and activations
live in the machine's RAM (a ledger of their own, which NVML does not see) and `/system_stats`
reports the CPU device with the RAM's figures, as the real server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import random
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse, urlsplit

from aiohttp import WSMsgType, web
from aiohttp.typedefs import Middleware

from gpu_agent.sim.catalog import GIB, Catalog
from gpu_agent.sim.clock import SimClock
from gpu_agent.sim.comfyui_exec import PromptExecutor, PromptWorker
from gpu_agent.sim.comfyui_memory import ComfyMemory
from gpu_agent.sim.comfyui_nodes import NodeClass, build_node_classes
from gpu_agent.sim.comfyui_queue import PromptQueue, QueueItem
from gpu_agent.sim.comfyui_runtime import NodeRuntime
from gpu_agent.sim.comfyui_settings import ComfyUISimSettings, ComfyUIStats
from gpu_agent.sim.comfyui_uploads import UploadFolders, upload_image, upload_mask
from gpu_agent.sim.comfyui_validate import is_canonical_uuid, top_error, validate_prompt
from gpu_agent.sim.comfyui_ws import WsClient, WsHub
from gpu_agent.sim.faults import ServerFaults, fault_middleware
from gpu_agent.sim.gpu import GpuSpec, SimGpu

__all__ = ["ComfyUIEmulator", "ComfyUISimSettings", "ComfyUIStats"]

log = logging.getLogger(__name__)

PROCESS_NAME = "python3"
PROCESS_CMDLINE = ("python3", "main.py", "--listen", "127.0.0.1", "--port", "8188")
# What aiohttp answers when a handler raises; ComfyUI lets a bad JSON body do exactly that.
INTERNAL_ERROR_TEXT = "500 Internal Server Error\n\nServer got itself in trouble"
# --max-upload-size default (100 MB), echoed in the feature_flags reply.
MAX_UPLOAD_SIZE_BYTES = 100 * 1024 * 1024
# The desktop's system RAM as /system_stats reports it.
RAM_TOTAL_BYTES = 64 * GIB
RAM_FREE_BYTES = 48 * GIB
# The RAM as the device a --cpu process allocates from.
_RAM_DEVICE = GpuSpec(name="cpu", uuid="cpu", total_bytes=RAM_TOTAL_BYTES)


@dataclass
class _Process:
    """What one ComfyUI process holds; all of it is lost when the process dies."""

    queue: PromptQueue
    executor: PromptExecutor
    worker: asyncio.Task[None]


def _internal_error() -> web.Response:
    return web.Response(status=500, text=INTERNAL_ERROR_TEXT)


def _status(remaining: int) -> dict[str, Any]:
    return {"status": {"exec_info": {"queue_remaining": remaining}}}


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@web.middleware
async def origin_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """ComfyUI's origin-only check: on a loopback Host, an Origin naming another host gets 403."""
    host, origin = request.headers.get("Host"), request.headers.get("Origin")
    if host and origin:
        host_domain: str | None = host.lower()
        parsed_origin = urlparse(origin)
        origin_domain: str | None = parsed_origin.netloc.lower()
        parsed_host = urlsplit("//" + (host_domain or ""))
        loopback = _is_loopback(parsed_host.hostname)
        # A side without a port is compared by host name only.
        if parsed_origin.port is None:
            host_domain = parsed_host.hostname
        if parsed_host.port is None:
            origin_domain = parsed_origin.hostname
        if loopback and host_domain and origin_domain and host_domain != origin_domain:
            log.warning("request with non matching host and origin %s != %s", host, origin)
            return web.Response(status=403)
    response: web.StreamResponse = await handler(request)
    return response


class ComfyUIEmulator:
    """An emulated ComfyUI 0.3.64 on the simulated desktop's GPU."""

    def __init__(
        self,
        *,
        clock: SimClock,
        gpu: SimGpu,
        catalog: Catalog,
        output_dir: Path,
        seed: int = 0,
        settings: ComfyUISimSettings = ComfyUISimSettings(),  # noqa: B008 - frozen value
        pid: int = 4001,
    ) -> None:
        self.clock = clock
        self.gpu = gpu
        self.catalog = catalog
        self.settings = settings
        self.pid = pid
        self.faults = ServerFaults()
        self.stats = ComfyUIStats()
        self.output_dir = output_dir.resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._scratch = Path(tempfile.mkdtemp(prefix="sim-comfyui-"))
        self.input_dir = self._scratch / "input"
        self.temp_dir = self._scratch / "temp"
        self.input_dir.mkdir()
        self.temp_dir.mkdir()
        self._rng = random.Random(seed)
        # On --cpu the process's memory is the machine's RAM: a device of its own, not the GPU.
        self.device = SimGpu(clock, _RAM_DEVICE) if settings.cpu else gpu
        self._memory = ComfyMemory(
            gpu=self.device,
            clock=clock,
            pid=pid,
            context_bytes=0 if settings.cpu else settings.context_bytes,
            reserve_bytes=settings.reserve_vram_bytes,
            allocator_cache_bytes=settings.allocator_cache_bytes,
        )
        self._hub = WsHub(self.faults)
        self._proc: _Process | None = None
        self._runtime: NodeRuntime | None = None

    def node_classes(self) -> dict[str, NodeClass]:
        """The class table now: the image loaders list the input folder as it is."""
        inputs = (f.name for f in self.input_dir.iterdir() if f.is_file())
        return build_node_classes((c.filename for c in self.catalog.checkpoints), inputs)

    def _image_exists(self, name: str) -> bool:
        """LoadImage's check: the file its `image` value names exists."""
        if self._runtime is None:
            return False
        path = self._runtime.annotated_path(name)
        return path is not None and path.exists()

    # -- process lifecycle -----------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None

    async def start_process(self) -> None:
        """Start the ComfyUI process: GPU context, empty queue, worker. No-op if running."""
        if self._proc is not None:
            return
        self._memory.start(PROCESS_NAME, PROCESS_CMDLINE)
        # ComfyUI empties its temp directory at start-up.
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.temp_dir.mkdir()
        hub = self._hub
        queue: PromptQueue

        def queue_updated() -> None:
            hub.send("status", _status(queue.remaining()), None)

        queue = PromptQueue(queue_updated)
        runtime = NodeRuntime(
            clock=self.clock,
            gpu=self.device,
            memory=self._memory,
            catalog=self.catalog,
            stats=self.stats,
            output_dir=self.output_dir,
            temp_dir=self.temp_dir,
            input_dir=self.input_dir,
            rng=self._rng,
        )
        self._runtime = runtime
        executor = PromptExecutor(
            runtime=runtime,
            sink=hub,
            clock=self.clock,
            memory=self._memory,
            settings=self.settings,
            stats=self.stats,
        )
        worker = PromptWorker(
            queue=queue,
            executor=executor,
            memory=self._memory,
            sink=hub,
            clock=self.clock,
            settings=self.settings,
        )
        task = asyncio.create_task(worker.run(), name=f"comfyui-worker-{self.pid}")
        self._proc = _Process(queue=queue, executor=executor, worker=task)
        hub.start()

    async def kill_process(self) -> None:
        """Crash: the running prompt dies mid-node; queue, history and models are gone."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await proc.worker
        await self._hub.stop()
        await self._hub.drop_all()
        self._memory.stop()

    async def drop_websockets(self) -> None:
        """Cut every websocket abruptly; the server keeps running."""
        await self._hub.drop_all()

    async def close(self) -> None:
        """Stop the process and remove the scratch directories (outputs stay)."""
        await self.kill_process()
        shutil.rmtree(self._scratch, ignore_errors=True)

    # -- inspection helpers ----------------------------------------------------------------

    def loaded_checkpoints(self) -> list[str]:
        """Checkpoints with any part resident on the GPU, least recently used first."""
        return self._memory.loaded_checkpoints()

    def running_prompt_id(self) -> str | None:
        """The prompt executing now; None when idle or while the process is down."""
        return self._proc.executor.running_prompt_id if self._proc else None

    def cache_bytes(self) -> int:
        """Bytes torch's allocator keeps cached (reserved but unused)."""
        return self._memory.cache_bytes

    # -- application -----------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """A fresh aiohttp application for this emulator (one per server start)."""
        faults = fault_middleware(
            self.faults, lambda status, text: web.Response(status=status, text=text)
        )
        # ComfyUI's --max-upload-size (100 MB) bounds every request body.
        app = web.Application(
            middlewares=[cast(Middleware, faults), origin_middleware],
            client_max_size=MAX_UPLOAD_SIZE_BYTES,
        )
        routes: list[tuple[str, str, Any]] = [
            ("GET", "/ws", self._ws),
            ("POST", "/prompt", self._post_prompt),
            ("GET", "/prompt", self._get_prompt),
            ("GET", "/queue", self._get_queue),
            ("POST", "/queue", self._post_queue),
            ("GET", "/history", self._get_history),
            ("GET", "/history/{prompt_id}", self._get_history_item),
            ("POST", "/history", self._post_history),
            ("GET", "/view", self._view),
            # ComfyUI declares its routes with aiohttp's `RouteTableDef.get`, which answers
            # HEAD too.
            ("HEAD", "/view", self._view),
            ("POST", "/upload/image", self._upload_image),
            ("POST", "/upload/mask", self._upload_mask),
            ("POST", "/interrupt", self._post_interrupt),
            ("POST", "/free", self._post_free),
            ("GET", "/system_stats", self._system_stats),
            ("GET", "/object_info", self._object_info),
            ("GET", "/object_info/{node_class}", self._object_info_node),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, "/api" + path, handler)
            app.router.add_route(method, path, handler)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, _app: web.Application) -> None:
        await self._hub.close_all()

    def _process(self) -> _Process:
        if self._proc is None:
            raise web.HTTPServiceUnavailable(text="ComfyUI process is not running")
        return self._proc

    # -- prompts ---------------------------------------------------------------------------

    async def _post_prompt(self, request: web.Request) -> web.Response:
        proc = self._process()
        try:
            body = await request.json()
            return self._accept_prompt(proc.queue, body)
        except Exception:
            # ComfyUI does not guard these: a body that is not JSON (or not an object) is a 500.
            log.warning("POST /prompt failed", exc_info=True)
            return _internal_error()

    def _accept_prompt(self, queue: PromptQueue, body: dict[str, Any]) -> web.Response:
        # The counter advances for every prompt without a `number`, even one rejected below.
        number: float | int
        if "number" in body:
            number = float(body["number"])
        else:
            number = -queue.next_number if body.get("front") else queue.next_number
            queue.next_number += 1
        if "prompt" not in body:
            error = top_error("no_prompt", "No prompt provided", "No prompt provided")
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        prompt = body["prompt"]
        client_prompt_id = body.get("prompt_id")
        if client_prompt_id is None:
            prompt_id = str(uuid.uuid4())
        elif is_canonical_uuid(client_prompt_id):
            prompt_id = str(client_prompt_id)
        else:
            error = top_error(
                "invalid_prompt_id",
                "prompt_id must be a valid UUID",
                "prompt_id must be a UUID string in canonical lowercase hyphenated form; "
                "omit it to let the server generate one",
            )
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        validation = validate_prompt(
            prompt,
            self.node_classes(),
            body.get("partial_execution_targets"),
            image_exists=self._image_exists,
        )
        extra_data = dict(body.get("extra_data") or {})
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if not validation.ok:
            return web.json_response(
                {"error": validation.error, "node_errors": validation.node_errors}, status=400
            )
        queue.put(QueueItem(number, prompt_id, prompt, extra_data, validation.outputs))
        return web.json_response(
            {"prompt_id": prompt_id, "number": number, "node_errors": validation.node_errors}
        )

    async def _get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response(_status(self._process().queue.remaining())["status"])

    async def _get_queue(self, request: web.Request) -> web.Response:
        queue = self._process().queue
        running = [queue.running.wire()] if queue.running else []
        pending = [item.wire() for item in queue.pending()]
        return web.json_response({"queue_running": running, "queue_pending": pending})

    async def _post_queue(self, request: web.Request) -> web.Response:
        queue = self._process().queue
        try:
            body = await request.json()
            if body.get("clear"):
                queue.wipe()
            for prompt_id in body.get("delete", []):
                queue.delete(prompt_id)
        except Exception:
            return _internal_error()
        return web.Response(status=200)

    async def _post_interrupt(self, request: web.Request) -> web.Response:
        executor = self._process().executor
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = {}
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        executor.interrupt(str(prompt_id) if prompt_id else None)
        return web.Response(status=200)

    async def _post_free(self, request: web.Request) -> web.Response:
        queue = self._process().queue
        try:
            body = await request.json()
            unload_models, free_memory = body.get("unload_models"), body.get("free_memory")
        except Exception:
            return _internal_error()
        if unload_models:
            queue.set_flag("unload_models", unload_models)
        if free_memory:
            queue.set_flag("free_memory", free_memory)
        return web.Response(status=200)

    # -- history ---------------------------------------------------------------------------

    async def _get_history(self, request: web.Request) -> web.Response:
        queue = self._process().queue
        try:
            max_items = int(request.query["max_items"]) if "max_items" in request.query else None
            offset = int(request.query.get("offset", -1))
        except ValueError:
            return _internal_error()
        return web.json_response(queue.get_history(max_items=max_items, offset=offset))

    async def _get_history_item(self, request: web.Request) -> web.Response:
        queue = self._process().queue
        return web.json_response(queue.get_history(prompt_id=request.match_info["prompt_id"]))

    async def _post_history(self, request: web.Request) -> web.Response:
        queue = self._process().queue
        try:
            body = await request.json()
            if body.get("clear"):
                queue.history.clear()
            for prompt_id in body.get("delete", []):
                queue.delete_history(prompt_id)
        except Exception:
            return _internal_error()
        return web.Response(status=200)

    # -- files -----------------------------------------------------------------------------

    def _dir_for(self, kind: str) -> Path | None:
        return {"output": self.output_dir, "input": self.input_dir, "temp": self.temp_dir}.get(kind)

    async def _view(self, request: web.Request) -> web.StreamResponse:
        found = self._view_path(request.query)
        if isinstance(found, int):
            return web.Response(status=found)
        return web.FileResponse(found, headers={"Content-Disposition": f'filename="{found.name}"'})

    def _view_path(self, query: Mapping[str, str]) -> Path | int:
        """The file `/view` serves, or the status ComfyUI answers instead (400, 403, 404)."""
        if "filename" not in query:
            return 404
        filename = query["filename"]
        directory: Path | None = None
        for kind in ("output", "input", "temp"):
            if filename.endswith(f" [{kind}]"):
                filename, directory = filename[: -len(kind) - 3], self._dir_for(kind)
        if not filename or filename.startswith("/") or ".." in filename:
            return 400
        if directory is None:
            directory = self._dir_for(query.get("type", "output"))
        if directory is None:
            return 400
        if "subfolder" in query:
            candidate = os.path.abspath(os.path.join(directory, query["subfolder"]))
            if os.path.commonpath((candidate, str(directory))) != str(directory):
                return 403
            directory = Path(candidate)
        path = directory / os.path.basename(filename)
        return path if path.is_file() else 404

    def _upload_folders(self) -> UploadFolders:
        return UploadFolders(input=self.input_dir, output=self.output_dir, temp=self.temp_dir)

    async def _upload_image(self, request: web.Request) -> web.Response:
        self._process()
        post = await request.post()
        return await asyncio.to_thread(upload_image, post, self._upload_folders())

    async def _upload_mask(self, request: web.Request) -> web.Response:
        self._process()
        post = await request.post()
        try:
            return await asyncio.to_thread(upload_mask, post, self._upload_folders())
        except Exception:
            # ComfyUI lets a missing or broken original_ref, or a mask of another size than
            # its image, escape the handler: aiohttp answers 500.
            log.warning("POST /upload/mask failed", exc_info=True)
            return _internal_error()

    # -- information -----------------------------------------------------------------------

    async def _system_stats(self, request: web.Request) -> web.Response:
        self._process()
        memory = self._memory
        if self.settings.cpu:
            # ComfyUI reads psutil for a CPU device: RAM total and available, for torch too.
            device: dict[str, Any] = {
                "name": "cpu",
                "type": "cpu",
                "index": None,
                "vram_total": RAM_TOTAL_BYTES,
                "vram_free": RAM_FREE_BYTES,
                "torch_vram_total": RAM_TOTAL_BYTES,
                "torch_vram_free": RAM_FREE_BYTES,
            }
        else:
            device = {
                "name": f"cuda:0 {self.gpu.spec.name} : cudaMallocAsync",
                "type": "cuda",
                "index": 0,
                "vram_total": self.gpu.total_bytes,
                "vram_free": memory.free_for_comfy(),
                "torch_vram_total": memory.torch_reserved_bytes(),
                "torch_vram_free": memory.cache_bytes,
            }
        argv = [*PROCESS_CMDLINE[1:], "--cpu"] if self.settings.cpu else list(PROCESS_CMDLINE[1:])
        return web.json_response(
            {
                "system": {
                    "os": "posix",
                    "ram_total": RAM_TOTAL_BYTES,
                    "ram_free": RAM_FREE_BYTES,
                    "comfyui_version": self.settings.version,
                    "required_frontend_version": "1.27.10",
                    "installed_templates_version": "0.1.94",
                    "required_templates_version": "0.1.94",
                    "python_version": "3.12.3 (main, Aug 14 2025, 17:47:21) [GCC 13.3.0]",
                    "pytorch_version": "2.8.0+cu128",
                    "embedded_python": False,
                    "argv": argv,
                },
                "devices": [device],
            }
        )

    async def _object_info(self, request: web.Request) -> web.Response:
        classes = self.node_classes()
        return web.json_response({name: cls.object_info() for name, cls in classes.items()})

    async def _object_info_node(self, request: web.Request) -> web.Response:
        cls = self.node_classes().get(request.match_info["node_class"])
        return web.json_response({cls.name: cls.object_info()} if cls else {})

    # -- websocket -------------------------------------------------------------------------

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        proc = self._process()
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.query.get("clientId", "") or uuid.uuid4().hex
        client = WsClient(sid=sid, ws=ws, request=request)
        hub = self._hub
        greeting = [("status", {**_status(proc.queue.remaining()), "sid": sid})]
        executor = proc.executor
        # A client reconnecting to the prompt it is running learns which node is on.
        if executor.client_id == sid and executor.last_node_id is not None:
            greeting.append(("executing", {"node": executor.last_node_id}))
        try:
            await hub.connect(client, greeting)
            first_message = True
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                except json.JSONDecodeError:
                    continue
                if first_message and isinstance(data, dict) and data.get("type") == "feature_flags":
                    client.feature_flags = dict(data.get("data") or {})
                    flags = {
                        "supports_preview_metadata": True,
                        "max_upload_size": MAX_UPLOAD_SIZE_BYTES,
                    }
                    await hub.send_now("feature_flags", flags, sid)
                first_message = False
        finally:
            hub.unregister(client)
        return ws
