"""The VRAM ledger: what each agent holds, and what the controller has promised on it.

Adapter between the agents' wire status and the policy core: `AgentBook` keeps the controller's
own bookkeeping per agent (memory promised to loads and image jobs that NVML does not show yet,
when each model was loaded and last used, requests waiting, the image job running there), and
`agent_state()` folds it with the agent's latest snapshot into the core's `AgentState`.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

from controller.domain.types import AgentState, ResidentModel, RunningImage
from gpu_common.schema import AgentStatus

# Until ComfyUI's floor (its CUDA context) has been observed, assume this much.
DEFAULT_COMFY_FLOOR_BYTES = 400 * 1024**2


@dataclass
class _ImageRun:
    image: RunningImage
    need_bytes: int
    comfy_at_dispatch: int
    comfy_peak: int


@dataclass
class _Ended:
    """A request of ours that ended, which the agent's snapshots may still count as in flight."""

    model: str
    # The agent's in-flight count for the model in the last snapshot before the end.
    reported: int
    snapshots: int = 0


# Snapshots after which an ended request is no longer discounted: the first one may have been
# taken a moment before the agent saw the request end; the second was taken well after.
ENDED_SNAPSHOTS = 2


@dataclass
class AgentBook:
    """The controller's own record of one agent."""

    name: str
    promised: dict[int, int] = field(default_factory=dict)
    seen_at: dict[str, float] = field(default_factory=dict)
    used_at: dict[str, float] = field(default_factory=dict)
    queued: Counter[str] = field(default_factory=Counter)
    # Models a plan is about to unload: no longer offered to new requests.
    unloading: set[str] = field(default_factory=set)
    # ComfyUI frees that plans decided on and have not carried out yet. Until they are done
    # ComfyUI's cache counts as gone, so that two plans cannot both count on the same freed
    # bytes, and no image job counts on reusing a checkpoint that is about to go.
    freeing_comfy: int = 0
    comfy_floor: int | None = None
    comfy_family: str | None = None
    drain_since: float | None = None
    run: _ImageRun | None = None
    # The image run that ended last, until `ENDED_SNAPSHOTS` snapshots have come since: the
    # latest snapshot may predate what ComfyUI still holds of it (the checkpoint it caches).
    settling: _ImageRun | None = None
    settling_snapshots: int = 0
    # The agent's in-flight count per model in its latest snapshot, and requests of ours that
    # ended since, which that count may still include.
    reported: dict[str, int] = field(default_factory=dict)
    ended: list[_Ended] = field(default_factory=list)
    _tokens: itertools.count[int] = field(default_factory=itertools.count)

    # -- promises -------------------------------------------------------------------------

    def promise(self, nbytes: int) -> int:
        """Reserve `nbytes` for work NVML does not show yet; returns a token to release it."""
        token = next(self._tokens)
        self.promised[token] = nbytes
        return token

    def release(self, token: int) -> None:
        """Drop the promise behind `token`; releasing twice is harmless."""
        self.promised.pop(token, None)

    def start_image(self, image: RunningImage, need_bytes: int, comfy_bytes: int) -> None:
        """An image job was dispatched here, needing `need_bytes` beyond `comfy_bytes` (what
        ComfyUI holds at dispatch): until ComfyUI's reading grows, the rest counts as pending."""
        self.run = _ImageRun(image, need_bytes, comfy_bytes, comfy_bytes)

    def finish_image(self, family: str | None, *, ran: bool = True) -> int | None:
        """The run ended; returns ComfyUI's peak memory during it (None if none was running).
        Unless it never `ran` (an admission given back), its memory stays counted as pending
        until snapshots taken after the end show what ComfyUI kept of it."""
        run, self.run = self.run, None
        if run is None:
            return None
        if ran:
            self.settling, self.settling_snapshots = run, 0
        if family is not None:
            self.comfy_family = family
        return run.comfy_peak

    # -- observations ---------------------------------------------------------------------

    def observe(self, status: AgentStatus, now: float) -> None:
        """Fold one snapshot in: residency times, ComfyUI's floor and peak."""
        if self.settling is not None:
            self.settling_snapshots += 1
            if self.settling_snapshots >= ENDED_SNAPSHOTS:
                self.settling = None
        resident = {m.name for m in status.ollama.resident}
        self.reported = {m.name: m.in_flight for m in status.ollama.resident}
        for ended in self.ended:
            ended.snapshots += 1
        # An end is seen once the agent's count drops below what it was before the end, or
        # after enough snapshots that the agent must have seen it.
        self.ended = [
            e
            for e in self.ended
            if e.snapshots < ENDED_SNAPSHOTS and self.reported.get(e.model, 0) >= e.reported
        ]
        for name in resident:
            self.seen_at.setdefault(name, now)
            self.used_at.setdefault(name, now)
            if next(m.in_flight for m in status.ollama.resident if m.name == name):
                self.used_at[name] = now
        for name in list(self.seen_at):
            if name not in resident:
                del self.seen_at[name]
                self.used_at.pop(name, None)
        comfy = comfy_bytes(status)
        if comfy is None:
            return
        if self.run is not None:
            self.run.comfy_peak = max(self.run.comfy_peak, comfy)
        elif (
            # Only a running ComfyUI shows its floor (its CUDA context): one that is down holds
            # nothing, and a floor of 0 would count the next process's context as freeable.
            status.comfyui.reachable
            and comfy > 0
            and (self.comfy_floor is None or comfy < self.comfy_floor)
        ):
            self.comfy_floor = comfy
        if self.run is None and self.comfy_floor is not None and comfy <= self.comfy_floor:
            self.comfy_family = None  # nothing of a checkpoint is left in ComfyUI

    def touch(self, model: str, now: float) -> None:
        """`model` served a request at `now` (seconds, the engine's clock): it is not idle."""
        self.used_at[model] = now

    def end_request(self, model: str) -> None:
        """A request of ours to `model` ended: stop counting it even where the agent's latest
        snapshot, taken before the end, still does."""
        self.ended.append(_Ended(model, self.reported.get(model, 0)))

    def agent_in_flight(self, model: str, reported: int) -> int:
        """The agent's count for `model` less our requests that ended after it was taken."""
        unseen = sum(1 for e in self.ended if e.model == model)
        return max(0, reported - unseen)


def comfy_bytes(status: AgentStatus) -> int | None:
    """GPU memory ComfyUI holds on all the agent's GPUs; None without a GPU reading."""
    gpus = status.telemetry.gpus
    if not gpus:
        return None
    return sum(g.memory_by_owner_bytes.get("comfyui", 0) for g in gpus)


def agent_state(
    book: AgentBook,
    status: AgentStatus | None,
    *,
    healthy: bool,
    reason: str | None,
    reserve_bytes: int,
    now: float,
) -> AgentState:
    """The core's view of one agent: its last snapshot plus what the controller promised."""
    if status is None or not status.telemetry.gpus:
        why = reason or (status.telemetry.reason if status else None) or "no GPU reading"
        return AgentState(book.name, False, 0, 0, reserve_bytes, unhealthy_reason=why)
    # One agent drives one GPU: budgets are per card and a model lives on one card.
    gpu = status.telemetry.gpus[0]
    comfy = gpu.memory_by_owner_bytes.get("comfyui", 0)
    residents = []
    for model in status.ollama.resident:
        if model.name in book.unloading:
            continue
        residents.append(
            ResidentModel(
                name=model.name,
                vram_bytes=model.vram_bytes,
                size_bytes=model.size_bytes,
                # The agent counts requests passing through it; the controller also counts the
                # ones it has routed there that have not reached the agent yet.
                in_flight=max(
                    book.agent_in_flight(model.name, model.in_flight),
                    book.queued.get(model.name, 0),
                ),
                loaded_at=book.seen_at.get(model.name, now),
                last_used_at=book.used_at.get(model.name, now),
            )
        )
    resident_names = {m.name for m in residents}
    pending = sum(book.promised.values())
    used = gpu.memory_used_bytes
    family = book.comfy_family
    floor = (
        book.comfy_floor if book.comfy_floor is not None else min(comfy, DEFAULT_COMFY_FLOOR_BYTES)
    )
    if book.freeing_comfy and book.run is None:
        used -= max(0, comfy - floor)
        comfy = min(comfy, floor)
        family = None
    running = None
    if book.run is None and book.settling is not None:
        # What ComfyUI may still hold of the run that just ended, beyond what is shown.
        shown = max(0, comfy - book.settling.comfy_at_dispatch)
        pending += max(0, book.settling.need_bytes - shown)
    if book.run is not None:
        running = book.run.image
        # What the job will still add: its need less what NVML already shows of it.
        shown = max(0, comfy - book.run.comfy_at_dispatch)
        pending += max(0, book.run.need_bytes - shown)
    return AgentState(
        name=book.name,
        healthy=healthy,
        total_bytes=gpu.memory_total_bytes,
        used_bytes=used,
        reserve_bytes=reserve_bytes,
        resident=tuple(residents),
        pending_bytes=pending,
        comfy_bytes=comfy,
        comfy_floor_bytes=min(floor, comfy),
        comfy_family=family,
        image_running=running,
        # Requests waiting for a model that is still being loaded.
        llm_queued=tuple(
            sorted((m, n) for m, n in book.queued.items() if n > 0 and m not in resident_names)
        ),
        held_image_since=book.drain_since,
        unhealthy_reason=reason,
    )
