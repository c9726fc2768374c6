"""The prompt queue and history of one emulated ComfyUI process (simulator layer).

Mirrors ComfyUI's `PromptQueue`: a min-heap on `number`, the running item, the history of finished
prompts (insertion order, at most 10000), and the flags `/free` sets for the worker. Every change
of what is queued or running calls `on_update`, which the server turns into a `status` broadcast.
Everything here lives and dies with the process.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_HISTORY_ITEMS = 10000


@dataclass(frozen=True, slots=True)
class QueueItem:
    """One accepted prompt: ComfyUI's `(number, prompt_id, prompt, extra_data, outputs)` tuple."""

    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]

    @property
    def client_id(self) -> str | None:
        client_id = self.extra_data.get("client_id")
        return str(client_id) if client_id is not None else None

    def wire(self) -> list[Any]:
        """The tuple as `/queue` and `/history` show it."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


class PromptQueue:
    """Pending prompts, the running one, history and worker flags."""

    def __init__(self, on_update: Callable[[], None]) -> None:
        self._on_update = on_update
        self._heap: list[tuple[float, str, int, QueueItem]] = []
        self._tiebreak = itertools.count()
        self.running: QueueItem | None = None
        self.history: dict[str, dict[str, Any]] = {}
        self.flags: dict[str, Any] = {}
        self._wake = asyncio.Event()
        # The server's prompt counter: the default `number`, advanced by every POST /prompt.
        self.next_number = 0

    # -- queue -----------------------------------------------------------------------------

    def put(self, item: QueueItem) -> None:
        """Queue an item; lower `number` runs first, ties by prompt id, as ComfyUI orders."""
        heapq.heappush(self._heap, (item.number, item.prompt_id, next(self._tiebreak), item))
        self._on_update()
        self._wake.set()

    def take(self) -> QueueItem | None:
        """Move the first pending item to running; None if nothing is pending."""
        if not self._heap:
            return None
        item = heapq.heappop(self._heap)[3]
        self.running = item
        self._on_update()
        return item

    def pending(self) -> list[QueueItem]:
        """Pending items in heap order (not necessarily sorted), as `/queue` lists them."""
        return [entry[3] for entry in self._heap]

    def remaining(self) -> int:
        """Pending items plus the running one: ComfyUI's `queue_remaining`."""
        return len(self._heap) + (1 if self.running else 0)

    def wipe(self) -> None:
        """Drop every pending item (`/queue` with `clear`); the running one is left alone."""
        self._heap.clear()
        self._on_update()

    def delete(self, prompt_id: str) -> bool:
        """Remove one pending item; deleting the last one wipes the queue (two updates)."""
        for index, entry in enumerate(self._heap):
            if entry[1] == prompt_id:
                if len(self._heap) == 1:
                    self.wipe()
                else:
                    self._heap.pop(index)
                    heapq.heapify(self._heap)
                self._on_update()
                return True
        return False

    def task_done(self, item: QueueItem, result: dict[str, Any], status: dict[str, Any]) -> None:
        """The running item finished: record its history entry."""
        self.running = None
        if len(self.history) > MAX_HISTORY_ITEMS:
            self.history.pop(next(iter(self.history)))
        self.history[item.prompt_id] = {"prompt": item.wire(), "outputs": {}, "status": status}
        self.history[item.prompt_id].update(result)
        self._on_update()

    # -- history ---------------------------------------------------------------------------

    def get_history(
        self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1
    ) -> dict[str, Any]:
        """ComfyUI's history paging: a negative offset with `max_items` means the newest ones."""
        if prompt_id is not None:
            entry = self.history.get(prompt_id)
            return {prompt_id: entry} if entry is not None else {}
        if offset < 0 and max_items is not None:
            offset = len(self.history) - max_items
        out: dict[str, Any] = {}
        for index, (key, entry) in enumerate(self.history.items()):
            if index < offset:
                continue
            out[key] = entry
            if max_items is not None and len(out) >= max_items:
                break
        return out

    def delete_history(self, prompt_id: str) -> None:
        """Forget one history entry; an unknown id is ignored, as ComfyUI does."""
        self.history.pop(prompt_id, None)

    # -- worker wake-ups and flags ---------------------------------------------------------

    def set_flag(self, name: str, value: Any) -> None:
        """Leave the worker a request (`unload_models`, `free_memory`) and wake it."""
        self.flags[name] = value
        self._wake.set()

    def take_flags(self) -> dict[str, Any]:
        """The flags set since the last call, clearing them."""
        flags, self.flags = self.flags, {}
        return flags

    async def wait(self, timeout_real_s: float | None) -> bool:
        """Sleep until something is queued or flagged, or `timeout_real_s` passes; True when
        the time passed (the caller's deadline is due, even if float rounding says otherwise)."""
        try:
            async with asyncio.timeout(timeout_real_s):
                await self._wake.wait()
        except TimeoutError:
            timed_out = True
        else:
            timed_out = False
        self._wake.clear()
        return timed_out
