"""The emulated ComfyUI worker: executes queued prompts one at a time (simulator layer).

`PromptExecutor` walks one prompt's graph as ComfyUI 0.3.64's `PromptExecutor.execute_async`
does: the node output cache (a node whose inputs are recursively unchanged is not run again),
the websocket events and their recipients (protocols.md B3/B3b), history status messages and the
interrupt points (node boundaries and sampler steps). `PromptWorker` is `main.py`'s
`prompt_worker` loop: take, execute, record history, apply `/free` flags, run the gc pass.
"""

from __future__ import annotations

import functools
import json
import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gpu_agent.sim.clock import SimClock
from gpu_agent.sim.comfyui_graph import GraphError, execution_order, is_link, signatures
from gpu_agent.sim.comfyui_memory import ComfyMemory
from gpu_agent.sim.comfyui_queue import PromptQueue, QueueItem
from gpu_agent.sim.comfyui_runtime import Interrupted, NodeFailure, NodeRuntime, PromptRun
from gpu_agent.sim.comfyui_settings import ComfyUISimSettings, ComfyUIStats

log = logging.getLogger(__name__)

_TRACEBACK = [
    '  File "/opt/ComfyUI/execution.py", line 496, in execute\n'
    "    output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data(...)\n",
    '  File "/opt/ComfyUI/execution.py", line 315, in get_output_data\n'
    "    return_values = await _async_map_node_over_list(...)\n",
]


# Binary websocket frames (ComfyUI's protocol.py): a preview image, and one with metadata; the
# image format of a type-1 frame is 1 for JPEG, 2 for PNG.
PREVIEW_IMAGE = 1
PREVIEW_IMAGE_WITH_METADATA = 4
PNG_FORMAT = 2


class EventSink(Protocol):
    """Where websocket events go: `sid=None` broadcasts. Must not block."""

    def send(self, event: str, data: dict[str, Any], sid: str | None) -> None:
        """Deliver `event` with `data` to client `sid`, or to every client when None."""
        ...

    def send_bytes(self, frame: bytes, sid: str | None) -> None:
        """Deliver a binary frame to client `sid`, or to every client when None."""
        ...

    def supports_preview_metadata(self, sid: str | None) -> bool:
        """Whether client `sid` announced `supports_preview_metadata` in its feature flags."""
        ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one prompt ended: its history status, its history result and what ended it."""

    status: dict[str, Any]
    result: dict[str, Any]
    ended: str  # "success", "error", "oom" or "interrupted"


class PromptEvents:
    """The events of one prompt, sent to its client as ComfyUI addresses them.

    `record()` events also go into the history's status messages; without a client they are
    sent only when `broadcast` (execution_interrupted). Progress events go to the client, or
    to everyone when the prompt has none.
    """

    def __init__(self, sink: EventSink, clock: SimClock, item: QueueItem) -> None:
        self._sink = sink
        self._clock = clock
        self.prompt_id = item.prompt_id
        self.client_id = item.client_id
        self.messages: list[list[Any]] = []
        self._progress: dict[str, dict[str, Any]] = {}

    def record(self, event: str, data: dict[str, Any], *, broadcast: bool = False) -> None:
        """Stamp the event with the prompt id and wall time (ms), keep it, and send it."""
        data = {**data, "prompt_id": self.prompt_id, "timestamp": self._clock.wall_ms()}
        self.messages.append([event, data])
        if self.client_id is not None or broadcast:
            self._sink.send(event, data, self.client_id)

    def to_client(self, event: str, data: dict[str, Any]) -> None:
        """Send to the prompt's own client only, unrecorded; dropped when it has none."""
        if self.client_id is not None:
            self._sink.send(event, {**data, "prompt_id": self.prompt_id}, self.client_id)

    def executing(self, node_id: str) -> None:
        self.to_client("executing", {"node": node_id, "display_node": node_id})

    def executed(self, node_id: str, output: Any) -> None:
        self.to_client("executed", {"node": node_id, "display_node": node_id, "output": output})

    def node_state(self, node_id: str, state: str, value: int = 0, maximum: int = 1) -> None:
        """A `progress_state` frame: every node seen so far, with this one updated."""
        entry = self._progress.setdefault(
            node_id,
            {
                "node_id": node_id,
                "prompt_id": self.prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
            },
        )
        entry.update({"value": value, "max": maximum, "state": state})
        if state == "finished":
            entry["value"] = entry["max"]
        nodes = {key: dict(entry) for key, entry in self._progress.items()}
        self._sink.send(
            "progress_state", {"prompt_id": self.prompt_id, "nodes": nodes}, self.client_id
        )

    def step(self, node_id: str, value: int, maximum: int) -> None:
        """One sampler step: the node map first, then the `progress` frame, as ComfyUI does."""
        self.node_state(node_id, "running", value, maximum)
        progress = {"value": value, "max": maximum, "prompt_id": self.prompt_id, "node": node_id}
        self._sink.send("progress", progress, self.client_id)

    def image(self, node_id: str, value: int, maximum: int, png: bytes) -> None:
        """A progress step carrying an image (SaveImageWebsocket), in ComfyUI's order.

        A client that announced `supports_preview_metadata` gets the node map, a type-4 frame
        (JSON metadata, then the PNG) and the `progress` frame; any other client the node map,
        `progress` and a type-1 frame (format 2, PNG, then the image).
        """
        sink, sid = self._sink, self.client_id
        self.node_state(node_id, "running", value, maximum)
        progress = {"value": value, "max": maximum, "prompt_id": self.prompt_id, "node": node_id}
        if sink.supports_preview_metadata(sid):
            metadata = {
                "node_id": node_id,
                "prompt_id": self.prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
                "image_type": "image/png",
            }
            encoded = json.dumps(metadata).encode()
            header = struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(encoded))
            sink.send_bytes(header + encoded + png, sid)
            sink.send("progress", progress, sid)
        else:
            sink.send("progress", progress, sid)
            sink.send_bytes(struct.pack(">II", PREVIEW_IMAGE, PNG_FORMAT) + png, sid)


class PromptExecutor:
    """Runs prompts for one process, keeping ComfyUI's node output cache between them."""

    def __init__(
        self,
        *,
        runtime: NodeRuntime,
        sink: EventSink,
        clock: SimClock,
        memory: ComfyMemory,
        settings: ComfyUISimSettings,
        stats: ComfyUIStats,
    ) -> None:
        self.runtime = runtime
        self.sink = sink
        self.clock = clock
        self.memory = memory
        self.settings = settings
        self.stats = stats
        # Output cache and UI cache, keyed by input signature (ComfyUI's classic cache).
        self._outputs: dict[str, tuple[Any, ...]] = {}
        self._ui: dict[str, Any] = {}
        # The client of the current or last prompt and the node it is on, for reconnects.
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.running_prompt_id: str | None = None
        self._interrupt = False

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Interrupt the running prompt (only if it is `prompt_id`, when given)."""
        if self.running_prompt_id is None:
            return False
        if prompt_id is not None and prompt_id != self.running_prompt_id:
            return False
        self._interrupt = True
        return True

    def reset(self) -> None:
        """`/free` with free_memory: forget every cached node output."""
        self._outputs.clear()
        self._ui.clear()

    def _check_interrupt(self) -> None:
        if self._interrupt:
            raise Interrupted()

    async def execute(self, item: QueueItem) -> Outcome:
        """Run one prompt to its end; events go out as they happen."""
        self._interrupt = False
        self.running_prompt_id = item.prompt_id
        self.client_id = item.client_id
        self.stats.prompts_run += 1
        self.stats.runs_by_prompt[item.prompt_id] += 1
        events = PromptEvents(self.sink, self.clock, item)
        run = PromptRun(item.prompt_id, item.prompt, item.extra_data, self._check_interrupt)
        events.record("execution_start", {})
        try:
            keys = signatures(item.prompt, self._changed(item.prompt))
        except GraphError as exc:
            events.record("execution_cached", {"nodes": []})
            self._report_error(events, item, exc.node_id, "Exception", str(exc), {}, [], [])
            return self._finish(events, run, {}, "error")
        # Classic cache: entries the new prompt does not use are dropped.
        wanted = set(keys.values())
        for cache in (self._outputs, self._ui):
            for key in [key for key in cache if key not in wanted]:
                del cache[key]
        cached = [node_id for node_id, key in keys.items() if key in self._outputs]
        events.record("execution_cached", {"nodes": cached})
        ended = await self._run_nodes(item, keys, cached, events, run)
        if ended == "success":
            events.record("execution_success", {})
        return self._finish(events, run, keys, ended)

    def _changed(self, prompt: Mapping[str, Any]) -> dict[str, str]:
        changed: dict[str, str] = {}
        for node_id, node in prompt.items():
            value = self.runtime.is_changed(node["class_type"], node.get("inputs", {}))
            if value is not None:
                changed[node_id] = value
        return changed

    async def _run_nodes(
        self,
        item: QueueItem,
        keys: Mapping[str, str],
        cached: list[str],
        events: PromptEvents,
        run: PromptRun,
    ) -> str:
        """Stage the nodes in order; how the prompt ended."""
        executed: list[str] = []
        results: dict[str, tuple[Any, ...]] = {}
        for node_id in execution_order(item.prompt, item.outputs, keys, self._outputs):
            node, key = item.prompt[node_id], keys[node_id]
            if key in self._outputs:
                # A cached output node: no `executing`, but its old UI output is sent again.
                events.executed(node_id, self._ui.get(key))
                events.node_state(node_id, "finished")
                continue
            events.node_state(node_id, "running")
            if events.client_id is not None:
                self.last_node_id = node_id
            events.executing(node_id)
            inputs = self._resolve(node, keys, results)
            progress = functools.partial(events.step, node_id)
            image = functools.partial(events.image, node_id)
            try:
                self._check_interrupt()
                outputs, ui = await self.runtime.run(
                    node["class_type"], node_id, inputs, run, progress, image
                )
            except Interrupted:
                interrupted = {
                    "node_id": node_id,
                    "node_type": node["class_type"],
                    "executed": list(executed),
                }
                events.record("execution_interrupted", interrupted, broadcast=True)
                return "interrupted"
            except NodeFailure as exc:
                text, kind = exc.message, exc.exception_type
                self._report_error(events, item, node_id, kind, text, inputs, executed, cached)
                return "oom" if exc.oom else "error"
            results[node_id] = self._outputs[key] = outputs
            if ui is not None:
                self._ui[key] = ui
                events.executed(node_id, ui)
            events.node_state(node_id, "finished")
            executed.append(node_id)
        return "success"

    def _finish(
        self, events: PromptEvents, run: PromptRun, keys: Mapping[str, str], ended: str
    ) -> Outcome:
        outputs: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        for node_id, key in keys.items():
            if key in self._ui:
                outputs[node_id] = self._ui[key]
                meta[node_id] = {
                    "node_id": node_id,
                    "display_node": node_id,
                    "parent_node": None,
                    "real_node_id": node_id,
                }
        self.last_node_id = None
        self.running_prompt_id = None
        if not self.settings.smart_memory:
            self.memory.unload_all()
        self._count(ended, run)
        self.stats.ends_by_prompt[run.prompt_id] += 1
        if ended == "success":
            self.stats.successes_by_prompt[run.prompt_id] += 1
        status = {
            "status_str": "success" if ended == "success" else "error",
            "completed": ended == "success",
            "messages": events.messages,
        }
        return Outcome(status=status, result={"outputs": outputs, "meta": meta}, ended=ended)

    def _count(self, ended: str, run: PromptRun) -> None:
        if run.lowvram:
            self.stats.lowvram_runs += 1
        if ended == "success":
            self.stats.succeeded += 1
        elif ended == "oom":
            self.stats.failed_oom += 1
        elif ended == "interrupted":
            self.stats.interrupted += 1

    def _report_error(
        self,
        events: PromptEvents,
        item: QueueItem,
        node_id: str,
        exception_type: str,
        text: str,
        inputs: Mapping[str, Any],
        executed: list[str],
        cached: list[str],
    ) -> None:
        error = {
            "node_id": node_id,
            "node_type": item.prompt.get(node_id, {}).get("class_type", ""),
            "executed": list(executed),
            "exception_message": text,
            "exception_type": exception_type,
            "traceback": list(_TRACEBACK),
            "current_inputs": {key: [_format(value)] for key, value in inputs.items()},
            "current_outputs": list(cached),
        }
        events.record("execution_error", error)

    def _resolve(
        self,
        node: Mapping[str, Any],
        keys: Mapping[str, str],
        results: Mapping[str, tuple[Any, ...]],
    ) -> dict[str, Any]:
        """The node's inputs with links replaced by the linked outputs (fresh or cached)."""
        resolved: dict[str, Any] = {}
        for name, value in node.get("inputs", {}).items():
            if is_link(value):
                source = str(value[0])
                outputs = results[source] if source in results else self._outputs[keys[source]]
                resolved[name] = outputs[int(value[1])]
            else:
                resolved[name] = value
        return resolved


def _format(value: Any) -> Any:
    if value is None or isinstance(value, int | float | bool | str):
        return value
    return str(value)


class PromptWorker:
    """The process's worker loop (ComfyUI `main.py` `prompt_worker`)."""

    def __init__(
        self,
        *,
        queue: PromptQueue,
        executor: PromptExecutor,
        memory: ComfyMemory,
        sink: EventSink,
        clock: SimClock,
        settings: ComfyUISimSettings,
    ) -> None:
        self.queue = queue
        self.executor = executor
        self.memory = memory
        self.sink = sink
        self.clock = clock
        self.settings = settings

    async def run(self) -> None:
        """Serve the queue until cancelled (a process kill cancels it mid-prompt)."""
        gc_due_s: float | None = None
        timed_out = False
        while True:
            # A wait that timed out means the gc deadline is due, even when the clock reads a
            # hair short of it: waiting again would spin on an ever smaller timeout.
            gc_timed_out, timed_out = timed_out, False
            item = self.queue.take()
            if item is not None:
                outcome = await self._execute(item)
                self.queue.task_done(item, outcome.result, outcome.status)
                if item.client_id is not None:
                    done = {"node": None, "prompt_id": item.prompt_id}
                    self.sink.send("executing", done, item.client_id)
                gc_due_s = self.clock.now() + self.settings.gc_after_prompt_s
                if self.queue.flags:
                    self._apply_flags()
                    gc_due_s = None
                continue
            if self.queue.flags:
                # An idle worker wakes on the flag and applies it shortly after.
                await self.clock.sleep(self.settings.free_apply_s)
                self._apply_flags()
                gc_due_s = None
                continue
            if gc_due_s is not None and (gc_timed_out or self.clock.now() >= gc_due_s):
                self.memory.empty_cache()
                gc_due_s = None
                continue
            timeout_real_s = None
            if gc_due_s is not None:
                timeout_real_s = self.clock.to_real(gc_due_s - self.clock.now())
            timed_out = await self.queue.wait(timeout_real_s)

    async def _execute(self, item: QueueItem) -> Outcome:
        try:
            return await self.executor.execute(item)
        except Exception:
            # A fault in the emulator itself: keep serving, but leave a loud trace.
            log.exception("emulated ComfyUI failed on prompt %s", item.prompt_id)
            self.executor.running_prompt_id = None
            self.executor.last_node_id = None
            status = {"status_str": "error", "completed": False, "messages": []}
            return Outcome(status=status, result={"outputs": {}, "meta": {}}, ended="error")

    def _apply_flags(self) -> None:
        """ComfyUI's flag handling: unload_models defaults to free_memory; then gc + empty_cache."""
        flags = self.queue.take_flags()
        free_memory = bool(flags.get("free_memory", False))
        if flags.get("unload_models", free_memory):
            self.memory.unload_all()
        if free_memory:
            self.executor.reset()
        self.memory.empty_cache()
